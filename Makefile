# adaptflow — all set-up goes through these targets; each is idempotent.
# Install order matters: torch==2.13.0 (a local CPU wheel) first, then the rest; a bare `torch`
# requirement resolved on a clean machine would pull a multi-GB CUDA build.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
PYTEST_ARGS ?=

export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: install demo shell test test-faults bench stack-up stack-down clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	$(PIP) check
	touch $(STAMP)

demo: install
	$(VENV)/bin/adaptflow stack up
	$(VENV)/bin/adaptflow retrain examples/rotten_tomatoes.yaml
	$(VENV)/bin/adaptflow predict models:/rotten-tomatoes-sentiment@champion \
		--text "A warm, funny and beautifully acted film." \
		--text "A tedious, clumsy mess that wastes its cast."

# An interactive shell with the venv activated (adaptflow, mlflow, uvicorn, prefect on PATH) and, when the local
# stack is up, its endpoints and keys exported (what `eval "$(adaptflow stack env)"` does); `exit` to leave.
# With commands on stdin instead of a terminal it runs them: `echo 'adaptflow stack status' | make -s shell`.
shell: install
	@. $(VENV)/bin/activate && \
	{ ! adaptflow stack status >/dev/null 2>&1 || eval "$$(adaptflow stack env)"; } && \
	exec "$${SHELL:-/bin/bash}"

test: install
	$(PIP) check
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-faults: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks.run

stack-up: install
	$(VENV)/bin/adaptflow stack up

stack-down: install
	$(VENV)/bin/adaptflow stack down

clean:
	-$(VENV)/bin/adaptflow stack down
	rm -rf $(VENV) .adaptflow *.egg-info
