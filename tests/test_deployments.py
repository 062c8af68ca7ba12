"""Deployments for real: a Prefect server, process workers on pools `cpu` and `gpu`, two overlapping runs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from adaptflow import stack
from adaptflow.registry import alias_history, client_for

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture
def prefect_server(tmp_path):
    """A real `prefect server` (SQLite) on a free port, stopped by PID."""
    state_dir = tmp_path / "prefect-stack"
    services = stack.up(state_dir, services=("prefect",), ports={"prefect": stack.free_port(set())}, timeout=120)
    try:
        yield services["prefect"]["api_url"]
    finally:
        stack.down(state_dir)


def start_worker(pool: str, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adaptflow", "worker", "--pool", pool], env=env, cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """A Prefect worker needs a second signal; escalate to SIGKILL if it still runs."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
        if process.poll() is not None:
            return
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def test_gpu_subflow_runs_on_its_pool_and_overlapping_runs_wait(prefect_server, test_settings, fresh_bucket,
                                                                 tiny_encoder_path, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    data = tmp_path / "reviews.csv"
    pd.read_csv(ROOT / "examples/data/rotten_tomatoes.csv").sample(n=200, random_state=5).to_csv(data, index=False)
    config = tmp_path / "config.yaml"
    config.write_text(f"name: deploy-test\ndata:\n  train: {data}\nencoder:\n  ref: {tiny_encoder_path}\n"
                      "  max_length: 32\nhead:\n  epochs: 5\ngate:\n  smoke_test: false\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "MLFLOW_"))},
           **test_settings.process_env(), "ADAPTFLOW_BUCKET": fresh_bucket, "PREFECT_API_URL": prefect_server,
           "PREFECT_WORKER_QUERY_SECONDS": "1", "HF_HUB_OFFLINE": "1", "ADAPTFLOW_STATE_DIR": str(tmp_path / "none")}
    done = subprocess.run([sys.executable, "-m", "adaptflow", "deploy", str(config)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    workers = [start_worker(pool, env, tmp_path / f"{pool}.log") for pool in ("cpu", "gpu")]
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
            runs = [run_deployment("retrain-from-config/retrain-on-demand", timeout=0, parameters={"force": True})
                    for _ in range(2)]  # forced: an unchanged second run would register nothing (test_changes)
            deadline = time.monotonic() + 420
            with get_client(sync_client=True) as client:
                while time.monotonic() < deadline:
                    runs = [client.read_flow_run(run.id) for run in runs]
                    if all(run.state_type.value in TERMINAL for run in runs):
                        break
                    time.sleep(2)
                children = [r for r in client.read_flow_runs() if r.name and r.parent_task_run_id
                            and r.deployment_id and client.read_deployment(r.deployment_id).name == "gpu"]
        logs = "\n".join((tmp_path / f"{p}.log").read_text()[-3000:] for p in ("cpu", "gpu"))
        assert [run.state_type.value for run in runs] == ["COMPLETED", "COMPLETED"], logs
        first, second = sorted(runs, key=lambda r: r.start_time)
        assert first.end_time <= second.start_time, "concurrency limit 1: the second run must wait for the first"
        assert len(children) == 2 and all(child.work_pool_name == "gpu" for child in children)
        assert all(child.state_type.value == "COMPLETED" for child in children)
    finally:
        for worker in workers:
            stop(worker)

    client = client_for(test_settings.mlflow_tracking_uri)
    versions = client.search_model_versions("name = 'deploy-test'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    moves = alias_history(client, "deploy-test")
    assert [(m["from"], m["to"]) for m in moves] == [(None, "1")]  # the second (identical) model was held
    assert client.get_model_version_by_alias("deploy-test", "champion").version == "1"
    assert client.get_model_version_by_alias("deploy-test", "challenger").version == "2"
