"""Retrain when data lands: the watcher's diff against real S3, the watch-data flow, prefect.yaml, and (slow) the
whole loop on a real Prefect server with process workers."""

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from adaptflow.changes import commit_seen, diff_partitions, list_config_partitions, seen_key
from adaptflow.config import build_config
from adaptflow.store import ArtifactStore, ConflictError
from tests.events_probe import wait_for_events

ROOT = Path(__file__).resolve().parents[1]
REVIEWS = ROOT / "examples" / "data" / "rotten_tomatoes.csv"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def upload_day(s3_client, bucket: str, day: str, rows: pd.DataFrame) -> str:
    key = f"lake/reviews/dt={day}/part-0.parquet"
    s3_client.put_object(Bucket=bucket, Key=key, Body=parquet(rows))
    return f"s3://{bucket}/{key}"


def lake_config(bucket: str, name: str = "watch-test", **extra):
    return build_config({"name": name, "data": {"train": f"s3://{bucket}/lake/reviews/", "group_column": "dt"},
                         **extra})


def test_new_and_changed_partitions_are_found_and_recorded_once(test_settings, s3_client, fresh_bucket):
    rows = pd.read_csv(REVIEWS).sample(n=90, random_state=1)[["text", "label"]]
    store = ArtifactStore.from_settings(test_settings, bucket=fresh_bucket)
    config = lake_config(fresh_bucket)
    key = seen_key("s3://configs/watch.yaml", config)
    first = upload_day(s3_client, fresh_bucket, "2026-11-29", rows.iloc[:30])
    s3_client.put_object(Bucket=fresh_bucket, Key="lake/reviews/_SUCCESS", Body=b"")

    changes = diff_partitions(store, key, list_config_partitions(config, store))
    assert [p["path"] for p in changes.new] == [first] and changes.any and changes.seen_etag is None
    assert changes.new[0]["keys"] == {"dt": "2026-11-29"} and changes.new[0]["etag"]
    commit_seen(store, key, changes)
    with pytest.raises(ConflictError):  # a second watcher that read the same (absent) state cannot record it too
        commit_seen(store, key, changes)

    unchanged = diff_partitions(store, key, list_config_partitions(config, store))
    assert not unchanged.any and not unchanged.removed  # nothing new: no event

    second = upload_day(s3_client, fresh_bucket, "2026-11-30", rows.iloc[30:60])
    upload_day(s3_client, fresh_bucket, "2026-11-29", rows.iloc[60:90])  # rewritten: another ETag
    changes = diff_partitions(store, key, list_config_partitions(config, store))
    assert [p["path"] for p in changes.new] == [second] and [p["path"] for p in changes.changed] == [first]
    commit_seen(store, key, changes)
    assert not diff_partitions(store, key, list_config_partitions(config, store)).any


def test_watch_data_flow_announces_new_partitions_once(services_env, s3_client, fresh_bucket, prefect_harness,
                                                      tmp_path):
    from flows.watch_data import watch_data

    rows = pd.read_csv(REVIEWS).sample(n=40, random_state=2)[["text", "label"]]
    config = tmp_path / "watch.yaml"
    config.write_text(f"name: watch-flow\ndata:\n  train: s3://{fresh_bucket}/lake/reviews/\n")
    path = upload_day(s3_client, fresh_bucket, "2026-12-01", rows)
    first = watch_data(str(config))
    assert first["new"] == 1 and first["event_id"]
    (event,) = wait_for_events("adaptflow.data.changed", f"adaptflow.config.{config}")
    assert [p["path"] for p in event.payload["new"]] == [path] and event.payload["config_uri"] == str(config)
    second = watch_data(str(config))
    assert second["new"] == second["changed"] == 0 and second["event_id"] is None


def test_a_failed_retrain_is_announced_with_its_model_and_reason(services_env, fresh_bucket, monkeypatch,
                                                                 prefect_harness, tmp_path):
    from flows.retrain import retrain

    monkeypatch.setenv("ADAPTFLOW_BUCKET", fresh_bucket)
    config = build_config({"name": "doomed-model", "data": {"train": str(tmp_path / "missing.csv")}})
    with pytest.raises(Exception):
        retrain(config)
    (event,) = wait_for_events("adaptflow.retrain.failed", "adaptflow.model.doomed-model")
    assert event.payload["model_name"] == "doomed-model" and "missing.csv" in event.payload["reason"]


def test_prefect_yaml_declares_the_deployments_and_the_trigger(monkeypatch):
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.events import DeploymentEventTrigger
    from prefect.flows import Flow
    from prefect.utilities.templating import apply_values

    from deployments.deploy import POOLS, data_changed_trigger, drift_detected_trigger

    monkeypatch.setenv("ADAPTFLOW_CONFIG", "s3://configs/reviews.yaml")
    monkeypatch.setenv("ADAPTFLOW_MODEL", "reviews")
    raw = apply_values(yaml.safe_load((ROOT / "prefect.yaml").read_text()), {})  # what `prefect deploy` resolves
    model = PrefectYamlModel.model_validate(raw)
    deployments = {d.name: d for d in model.deployments}
    assert sorted((d.name, d.entrypoint) for d in model.deployments) == [
        ("gpu", "flows/embed_shard.py:embed_shard"), ("gpu", "flows/train_gpu.py:embed_and_train"),
        ("retrain-nightly", "flows/retrain.py:retrain_from_config"),
        ("retrain-on-demand", "flows/retrain.py:retrain_from_config"), ("watch-data", "flows/watch_data.py:watch_data")]
    assert deployments["retrain-nightly"].work_pool.job_variables["env"]["ADAPTFLOW_SHARD_DEPLOYMENT"] == \
        "embed-shard/gpu"
    for d in model.deployments:
        module, name = d.entrypoint.split(":")
        flow = getattr(__import__(module.removesuffix(".py").replace("/", "."), fromlist=[name]), name)
        assert isinstance(flow, Flow) and d.work_pool.name in POOLS
    assert deployments["retrain-nightly"].schedules[0].cron == "0 2 * * *"
    assert deployments["watch-data"].schedules[0].interval.total_seconds() == 600
    assert deployments["retrain-on-demand"].concurrency_limit.collision_strategy == "ENQUEUE"
    assert deployments["retrain-on-demand"].parameters == {"config_uri": "s3://configs/reviews.yaml"}
    data, drift = [DeploymentEventTrigger.model_validate(t) for t in deployments["retrain-on-demand"].triggers]
    assert data == data_changed_trigger("s3://configs/reviews.yaml")  # adaptflow deploy makes the same ones
    assert drift == drift_detected_trigger("reviews", "s3://configs/reviews.yaml")


@pytest.mark.slow
def test_uploaded_partition_retrains_once_and_quiet_ticks_do_nothing(test_settings, s3_client, fresh_bucket,
                                                                      tiny_encoder_path, tmp_path):
    """prefect.yaml deployed with `prefect deploy --all` on a real server; process workers on cpu and gpu."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, LogFilter
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from adaptflow import stack
    from adaptflow.registry import client_for
    from tests.test_deployments import start_worker, stop

    state_dir = tmp_path / "prefect-stack"
    server = stack.up(state_dir, services=("prefect",), ports={"prefect": stack.free_port(set())}, timeout=120)
    api = server["prefect"]["api_url"]
    config = tmp_path / "lake.yaml"
    config.write_text(f"name: lake-test\ndata:\n  train: s3://{fresh_bucket}/lake/reviews/\nencoder:\n"
                      f"  ref: {tiny_encoder_path}\n  max_length: 32\nhead:\n  epochs: 5\ngate:\n  smoke_test: false\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "MLFLOW_"))},
           **test_settings.process_env(), "ADAPTFLOW_BUCKET": fresh_bucket, "PREFECT_API_URL": api,
           "PREFECT_WORKER_QUERY_SECONDS": "1", "HF_HUB_OFFLINE": "1", "ADAPTFLOW_STATE_DIR": str(tmp_path / "none"),
           "ADAPTFLOW_CONFIG": str(config), "ADAPTFLOW_MODEL": "lake-test", "PYTHONPATH": str(ROOT)}
    workers = []
    try:
        for args in (["-m", "deployments.deploy", "--pools"], ["-m", "prefect", "--no-prompt", "deploy", "--all"]):
            done = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        workers = [start_worker(pool, env, tmp_path / f"{pool}.log") for pool in ("cpu", "gpu")]
        logs = lambda: "\n".join((tmp_path / f"{p}.log").read_text()[-4000:] for p in ("cpu", "gpu"))  # noqa: E731
        rows = pd.read_csv(REVIEWS).sample(n=160, random_state=4)[["text", "label"]]
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            names = {f"{client.read_flow(d.flow_id).name}/{d.name}" for d in client.read_deployments()}
            assert names == {"retrain-from-config/retrain-nightly", "retrain-from-config/retrain-on-demand",
                             "watch-data/watch-data", "embed-and-train/gpu", "embed-shard/gpu"}

            on_demand = client.read_deployment_by_name("retrain-from-config/retrain-on-demand").id

            def retrains():  # runs of retrain-on-demand (retrain-nightly's are scheduled for 02:00)
                return client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id={"any_": [on_demand]}))

            def wait(predicate, seconds=600):
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    if value := predicate():
                        return value
                    time.sleep(2)
                pytest.fail(f"gave up waiting\n{logs()}")

            def tick() -> str:
                run = run_deployment("watch-data/watch-data", timeout=0)
                run = wait(lambda: (r := client.read_flow_run(run.id)).state_type.value in TERMINAL and r)
                assert run.state_type.value == "COMPLETED", logs()
                messages = lambda: " ".join(  # noqa: E731 — the run's logs arrive in batches, after its state
                    log.message for log in client.read_logs(LogFilter(flow_run_id={"any_": [run.id]})))
                return wait(lambda: "partition(s):" in (text := messages()) and text)

            uploaded = time.time()
            upload_day(s3_client, fresh_bucket, "2026-11-30", rows.iloc[:80])
            upload_day(s3_client, fresh_bucket, "2026-12-01", rows.iloc[80:])  # a burst: one tick, one event
            assert "2 new" in tick()
            (run,) = wait(lambda: [r for r in retrains() if r.state_type.value in TERMINAL])
            assert run.state_type.value == "COMPLETED", logs()
            assert "event none" in tick()  # nothing new: no event
            # a run on unchanged data (started by hand) registers nothing
            manual = run_deployment("retrain-from-config/retrain-on-demand", timeout=0)
            manual = wait(lambda: (r := client.read_flow_run(manual.id)).state_type.value in TERMINAL and r)
            assert manual.state_type.value == "COMPLETED", logs()
            assert len(retrains()) == 2  # the triggered run and the manual one; the quiet tick started none
    finally:
        for worker in workers:
            stop(worker)
        stack.down(state_dir)
    versions = client_for(test_settings.mlflow_tracking_uri).search_model_versions("name = 'lake-test'")
    assert [v.version for v in versions] == ["1"]
    print(f"\nuploaded partition → registered version: {versions[0].creation_timestamp / 1000 - uploaded:.1f} s")
