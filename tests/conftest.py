"""Shared fixtures: real services (SeaweedFS, MLflow server, Prefect harness) and encoders."""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.fixtures.encoders", "tests.fixtures.services", "tests.fixtures.faults"]
