# syntax=docker/dockerfile:1
# MLflow tracking server for infra/compose.yaml (also runs the create-bucket job: it has boto3).
# Full `mlflow`, not mlflow-skinny: the server and the SQL store live in the full package.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    MLFLOW_DISABLE_TELEMETRY=true

# The versions the project pins and tests against (pyproject.toml, .venv): server and clients must agree
# on the REST API and the database schema; boto3 within the project's range.
# psycopg2-binary: the postgresql:// backend store; boto3: the s3:// artifact destination.
RUN pip install mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.43.117

RUN groupadd --gid 10001 mlflow \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin mlflow
USER 10001:10001
WORKDIR /home/mlflow

EXPOSE 5000
# compose passes the full command (backend store, artifact destination, host, port, workers).
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
