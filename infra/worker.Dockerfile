# syntax=docker/dockerfile:1
# adaptflow worker image: Python 3.11, torch, the project (flows, tasks, library), `prefect worker start`.
#
# Build from the repository root (compose does: context `..`):
#   CPU: docker build -f infra/worker.Dockerfile -t adaptflow-worker:cpu .
#   GPU: docker build -f infra/worker.Dockerfile -t adaptflow-worker:gpu \
#          --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
# Only the files listed in infra/worker.Dockerfile.dockerignore enter the build context (never .venv,
# .adaptflow/credentials.json or a .env).
FROM python:3.11-slim

# torch's package index. Default: the CPU wheel (~200 MB, what the Makefile installs). For the GPU image
# pass the CUDA index build matching the host's driver, e.g. .../whl/cu130; its CUDA runtime comes as
# pip packages, so the slim base is enough (the host needs only the NVIDIA driver + container toolkit).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# 1. torch first, from TORCH_INDEX_URL. The project accepts torch>=2.4,<2.14: installed first, this pin
#    satisfies it; left to `pip install .`, PyPI's default torch is a multi-GB CUDA build.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0

# 2. The project and its pinned dependencies; `pip check` fails the build on a broken resolution.
WORKDIR /app
COPY . /app
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install . && pip check

# Non-root at run time; the code under /app stays root-owned and read-only to it. The cache folder exists
# in the image so that a named volume mounted on it inherits the app user's ownership. USER is numeric so
# Kubernetes' runAsNonRoot can verify it (a user *name* makes the kubelet refuse the pod).
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /home/app/.cache/adaptflow /home/app/.prefect \
    && chown -R app:app /home/app
USER 10001:10001

# Encoders come from S3 (`adaptflow encoder push`) or a package, never a model hub at run time: a hub id
# fails fast instead of hanging on a network a worker may not have. ADAPTFLOW_CACHE_DIR keeps verified
# encoder snapshots; mount a volume there to keep them across restarts.
ENV HOME=/home/app \
    HF_HUB_OFFLINE=1 \
    PREFECT_HOME=/home/app/.prefect \
    ADAPTFLOW_CACHE_DIR=/home/app/.cache/adaptflow \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1

# The flow runs from /app (a deployment's working directory: flows/retrain.py:retrain).
# `--with-healthcheck` serves /health on :8080.
EXPOSE 8080
ENTRYPOINT ["prefect", "worker", "start"]
CMD ["--pool", "cpu", "--type", "process", "--with-healthcheck"]
