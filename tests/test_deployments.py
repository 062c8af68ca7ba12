"""Deployments for real: a Prefect server, process workers on pools `cpu` and `gpu`, two overlapping runs; the
global concurrency limit `gpu` held around embed + fit head; handing work to a pool nobody polls."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from adaptflow import stack
from adaptflow.registry import alias_history, client_for

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture
def prefect_server(tmp_path, monkeypatch):
    """A real `prefect server` (SQLite) on a free port, stopped by PID."""
    # a run denied a slot retries after at most 1 s (default: up to 30 s, which only makes the tests slow)
    monkeypatch.setenv("PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS", "1")
    state_dir = tmp_path / "prefect-stack"
    services = stack.up(state_dir, services=("prefect",), ports={"prefect": stack.free_port(set())}, timeout=120)
    try:
        yield services["prefect"]["api_url"]
    finally:
        stack.down(state_dir)


def start_worker(pool: str, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adaptflow", "worker", "--pool", pool], env=env, cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_online(api_url: str, pool: str, count: int, timeout: float = 180) -> None:
    """Until ``count`` workers of ``pool`` are online (a run is handed to a pool only when one is)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkerStatus
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if sum(w.status == WorkerStatus.ONLINE for w in client.read_workers_for_work_pool(pool)) >= count:
                return
            time.sleep(0.5)
    raise AssertionError(f"{count} worker(s) of pool {pool!r} not online after {timeout} s")


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
        wait_online(prefect_server, "gpu", 1)
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


# ------------------------------------------------------------------------------- the gpu limit and the gpu pool

SLOT_WAIT = "waiting for a slot of concurrency limit 'gpu'"


def wait_for(condition, timeout: float, what: str):
    """Poll ``condition`` until it returns something truthy (returned); fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout} s: {what}")


def run_logs(client, run_ids: list) -> dict:
    """Each flow run's log messages (its tasks' included), as one text."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    texts = {run_id: "" for run_id in run_ids}
    log_filter, offset = LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)), 0
    while page := client.read_logs(log_filter, limit=200, offset=offset):  # the server answers a page at a time
        for log in page:
            texts[log.flow_run_id] += log.message + "\n"
        offset += len(page)
    return texts


def embed_spans(client, run_ids: list) -> dict:
    """(start, end) of each flow run's embed_texts task run, as the Prefect server recorded them (end None while it
    runs); runs whose embed has not started are absent."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)))
    return {r.flow_run_id: (r.start_time, r.end_time) for r in task_runs
            if r.name.startswith("embed_texts") and r.start_time is not None}


def test_gpu_handoff_fails_fast_without_a_worker_and_is_cancelled_past_its_timeout(prefect_server):
    """No worker polls pool gpu: the hand-off fails at once naming the pool and the command (the old code waited
    for ever). A worker that is online but never picks the run up: the wait ends at the timeout, the run is
    cancelled and the error names it."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from adaptflow.config import RunConfig
    from deployments.deploy import GPU_DEPLOYMENT, ensure_pools
    from flows.train_gpu import FLOW_NAME
    from tasks.embedding import run_on_gpu_pool

    config = RunConfig(name="no-worker", data={"train": "unused.csv"}).model_dump(mode="json")
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        ensure_pools()  # pools cpu and gpu exist, the deployment too, but no worker was ever started
        client.create_deployment(client.create_flow_from_name(FLOW_NAME), "gpu", work_pool_name="gpu",
                                 entrypoint="flows/train_gpu.py:embed_and_train")
    outcome: dict = {}

    def hand_over() -> None:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
            try:
                outcome["result"] = run_on_gpu_pool.fn(GPU_DEPLOYMENT, FLOW_NAME, {"config": config}, "parent-run")
            except Exception as exc:  # noqa: BLE001
                outcome["error"] = exc

    thread = threading.Thread(target=hand_over, daemon=True)
    thread.start()
    thread.join(timeout=120)  # only a guard: the old code waited here for ever
    assert not thread.is_alive(), "run_on_gpu_pool is still waiting for a pool that no worker polls"
    error = outcome.get("error")
    assert isinstance(error, ValueError), outcome
    assert "'gpu'" in str(error) and "`adaptflow worker --pool gpu`" in str(error), str(error)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        assert client.read_flow_runs() == [], "nothing may be left queued in a pool nobody polls"
        client.send_worker_heartbeat("gpu", "stuck-worker")  # online, but it will never take a run
        with pytest.raises(TimeoutError, match=r"orchestration\.gpu_timeout_s=2 s") as timed_out:
            run_on_gpu_pool.fn(GPU_DEPLOYMENT, FLOW_NAME, {"config": config}, "parent-run", timeout_s=2)
        (child,) = client.read_flow_runs()
        assert str(child.id) in str(timed_out.value)
        assert client.read_flow_run(child.id).state.is_cancelled()


@pytest.mark.slow
def test_gpu_limit_one_keeps_embeds_apart_two_lets_them_overlap(prefect_server, private_stack, tiny_encoder_path,
                                                                 tmp_path):
    """Two gpu-pool workers, two embed-and-train runs per limit. The test first holds every slot of `gpu` itself:
    both runs must log that they wait and start no embed. Released, limit 1 lets them embed one after the other;
    with limit 2 (S3 paused meanwhile, so an embed that started cannot end) both embeds run at once."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.concurrency.sync import concurrency
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from adaptflow.config import RunConfig
    from adaptflow.stages import StageContext, ingest_stage, resolve_encoder_stage, tokenize_stage, validate_stage
    from deployments.deploy import GPU_DEPLOYMENT

    private = private_stack(("s3",))
    settings = private.settings(cache_dir=tmp_path / "cache")
    data = tmp_path / "reviews.csv"
    pd.read_csv(ROOT / "examples/data/rotten_tomatoes.csv").sample(n=200, random_state=7).to_csv(data, index=False)
    config = RunConfig.model_validate({"name": "gpu-slot-test", "data": {"train": str(data)},
                                       "encoder": {"ref": str(tiny_encoder_path), "max_length": 32},
                                       "head": {"epochs": 2}})
    ctx = StageContext.from_env(settings)  # the parent's part, done here: the runs get its outputs
    snapshot = ingest_stage(ctx, config)
    validated = validate_stage(ctx, config, snapshot)
    encoder = resolve_encoder_stage(ctx, config)
    tokens = tokenize_stage(ctx, config, validated, encoder)
    parameters = {"config": config.model_dump(mode="json"), "tokens": tokens, "validated": validated,
                  "encoder": encoder}

    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "MLFLOW_"))},
           **settings.process_env(), "PREFECT_API_URL": prefect_server, "PREFECT_WORKER_QUERY_SECONDS": "1",
           "HF_HUB_OFFLINE": "1", "ADAPTFLOW_STATE_DIR": str(tmp_path / "none")}
    done = subprocess.run([sys.executable, "-m", "adaptflow", "deploy", str(tmp_path / "unused.yaml")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    workers = [start_worker("gpu", env, tmp_path / f"gpu-{i}.log") for i in range(2)]
    spans: dict[int, list] = {}
    try:
        wait_online(prefect_server, "gpu", 2)
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
            for limit in (1, 2):
                client.update_global_concurrency_limit("gpu", GlobalConcurrencyLimitUpdate(limit=limit))
                with concurrency("gpu", occupy=limit, strict=True):  # every slot is the test's
                    runs = [run_deployment(GPU_DEPLOYMENT, parameters=parameters, timeout=0).id for _ in range(2)]

                    def lined_up():
                        logs = run_logs(client, runs)
                        ended = {r.id for r in client.read_flow_runs() if r.id in runs and r.state.is_final()}
                        return logs if all(SLOT_WAIT in logs[r] or r in ended for r in runs) else None

                    logs = wait_for(lined_up, 300, "both runs waiting for a slot (or ended)")
                    assert all(SLOT_WAIT in text for text in logs.values()), logs
                    assert embed_spans(client, runs) == {}, "a run embedded while the test held every gpu slot"
                    if limit == 2:
                        os.killpg(private.pid("s3"), signal.SIGSTOP)
                try:
                    if limit == 2:  # both hold a slot and are inside embed, which cannot end while S3 is paused
                        wait_for(lambda: len(embed_spans(client, runs)) == 2, 120, "both embeds started")
                finally:
                    if limit == 2:
                        os.killpg(private.pid("s3"), signal.SIGCONT)
                wait_for(lambda: all(client.read_flow_run(r).state.is_final() for r in runs), 300, "both runs end")
                states = [client.read_flow_run(r).state.name for r in runs]
                worker_logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("gpu-*.log"))
                assert states == ["Completed", "Completed"], worker_logs
                # a worker ships its logs in batches: the last ones may land a few seconds after the run's final state
                holding = "holding a slot of concurrency limit 'gpu' after waiting"
                try:
                    wait_for(lambda: all(holding in text for text in run_logs(client, runs).values()), 60, "slot logs")
                except AssertionError:
                    raise AssertionError(run_logs(client, runs)) from None
                spans[limit] = sorted(embed_spans(client, runs).values())
                print(f"limit {limit}: embed intervals " + "; ".join(
                    f"{start:%H:%M:%S.%f} → {end:%H:%M:%S.%f}" for start, end in spans[limit]))
    finally:
        for worker in workers:
            stop(worker)
    (first, second) = spans[1]
    assert first[1] <= second[0], f"limit 1: the embeds overlapped: {spans[1]}"
    (first, second) = spans[2]
    assert second[0] < first[1], f"limit 2: the embeds did not overlap: {spans[2]}"


def test_every_stage_task_is_bounded_and_a_timed_out_attempt_is_not_retried(prefect_harness):
    from prefect import Task, flow

    from tasks import data, embedding, promotion, registry, training
    from tasks.policy import stage_task

    stage_tasks = {t.name: t for module in (data, embedding, promotion, registry, training)
                   for t in vars(module).values() if isinstance(t, Task) and t.name != "run_on_gpu_pool"}
    # run_on_gpu_pool is bounded by orchestration.gpu_timeout_s instead (see the test above)
    assert len(stage_tasks) == 10 and all(t.timeout_seconds for t in stage_tasks.values()), {
        name: t.timeout_seconds for name, t in stage_tasks.items()}
    assert stage_tasks["embed_texts"].timeout_seconds >= 3600 and stage_tasks["fit_head"].timeout_seconds >= 3600
    attempts = []

    @stage_task("hangs", timeout_seconds=1)
    def hangs() -> None:
        attempts.append(time.time())
        time.sleep(120)

    @flow
    def runs_it() -> str:
        return hangs(return_state=True).name

    assert runs_it() == "TimedOut" and len(attempts) == 1, attempts  # the retries (2, 5, 15 s) were not used
