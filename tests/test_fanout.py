"""Fan-out of the embed step: the plan (fast), parts encoded into the cache (real S3), and for real on a Prefect
server backed by PostgreSQL with two process workers on pool `gpu` (slow: two parts at once, a worker killed
mid-part, vectors equal to an inline run's)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from adaptflow.config import RunConfig
from adaptflow.sharding import missing_rows, part_stage, plan_parts, plan_stage
from adaptflow.stages import (StageContext, embed_stage, ingest_stage, resolve_encoder_stage, tokenize_stage,
                              validate_stage)
from tests.fixtures.postgres import pg_databases  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
REVIEWS = ROOT / "examples" / "data" / "rotten_tomatoes.csv"


def fake_hashes(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [hashlib.sha256(rng.bytes(8)).hexdigest() for _ in range(n)]


def test_plan_covers_every_row_once_with_keys_independent_of_order():
    hashes = fake_hashes(1000)
    parts = plan_parts(hashes, 300, "cache-a")
    assert len(parts) == 4 and all(len(p.rows) <= 300 for p in parts)
    rows = np.concatenate([p.rows for p in parts])
    assert sorted(rows.tolist()) == list(range(1000))  # each row in exactly one part
    shuffled = list(np.random.default_rng(1).permutation(hashes))
    again = plan_parts(shuffled, 300, "cache-a")
    assert [p.key for p in again] == [p.key for p in parts]  # the same rows in any order: the same parts
    assert [{shuffled[i] for i in p.rows} for p in again] == [{hashes[i] for i in p.rows} for p in parts]
    assert [p.key for p in plan_parts(hashes, 300, "cache-b")] != [p.key for p in parts]  # another cache
    assert len({p.key for p in parts}) == 4
    assert plan_parts(hashes, 1000, "cache-a") == [] and plan_parts(hashes, 0, "cache-a") == []
    assert plan_parts(hashes, None, "cache-a") == []


def small_config(data: Path, encoder: Path, shard_rows: int | None, **orchestration) -> RunConfig:
    return RunConfig.model_validate({
        "name": "fanout-test", "data": {"train": str(data)},
        "encoder": {"ref": str(encoder), "max_length": 32, "dtype": "fp32"},
        "orchestration": {"shard_rows": shard_rows, **orchestration}})


def prepare(ctx: StageContext, config: RunConfig) -> tuple[dict, dict]:
    """The parent's stages before embed: (tokens, encoder)."""
    validated = validate_stage(ctx, config, ingest_stage(ctx, config))
    encoder = resolve_encoder_stage(ctx, config)
    return tokenize_stage(ctx, config, validated, encoder), encoder


def cached_vectors(ctx: StageContext, config: RunConfig, tokens: dict, encoder: dict, embedded: dict) -> np.ndarray:
    """Every tokenized row's vector, in the tokens file's order."""
    import io

    import pyarrow.parquet as pq

    from adaptflow.cache import EmbeddingCache
    from adaptflow.store import parse_s3_uri

    table = pq.read_table(io.BytesIO(ctx.store.get_verified_bytes(parse_s3_uri(tokens["tokens"])[1])))
    cache = EmbeddingCache(ctx.store, encoder_digest=encoder["digest"], max_length=config.encoder.max_length,
                           pooling=config.encoder.pooling, dtype=embedded["dtype"])
    return cache.read(table.column("text_sha256").to_pylist())


@pytest.fixture
def reviews(tmp_path) -> Path:
    path = tmp_path / "reviews.csv"
    pd.read_csv(REVIEWS).sample(n=300, random_state=3).to_csv(path, index=False)
    return path


def test_parts_fill_the_cache_and_a_finished_part_is_a_lookup(test_settings, s3_client, tiny_encoder_path, reviews):
    buckets = {}
    for name in ("parts", "inline"):
        buckets[name] = f"fanout-{name}-{os.urandom(6).hex()}"
        s3_client.create_bucket(Bucket=buckets[name])
    ctx = StageContext.from_env(test_settings.model_copy(update={"bucket": buckets["parts"]}))
    config = small_config(reviews, tiny_encoder_path, shard_rows=100)
    tokens, encoder = prepare(ctx, config)

    plan = plan_stage(ctx, config, tokens, encoder)
    assert plan["todo"] == plan["rows"] == tokens["rows"] and len(plan["parts"]) == 3
    assert sum(p["rows"] for p in plan["parts"]) == plan["todo"]
    assert plan_stage(ctx, config, tokens, encoder)["parts"] == plan["parts"]  # the same plan, already published
    assert all(ctx.store.read_manifest(f"parts/{p['key']}") for p in plan["parts"])

    first = plan["parts"][0]
    assert part_stage(ctx, config, first, encoder, plan["dtype"])["encoded"] == first["rows"]
    left = missing_rows(ctx, config, plan, encoder)
    assert left[first["key"]] == 0 and all(left[p["key"]] == p["rows"] for p in plan["parts"][1:])
    again = part_stage(ctx, config, first, encoder, plan["dtype"])
    assert again["encoded"] == 0 and again["cached"] == first["rows"]  # a re-run of a finished part: a lookup
    # a new plan only covers what is left
    assert plan_stage(ctx, config, tokens, encoder)["todo"] == plan["todo"] - first["rows"]

    for part in plan["parts"][1:]:
        part_stage(ctx, config, part, encoder, plan["dtype"])
    assert not any(missing_rows(ctx, config, plan, encoder).values())
    embedded = embed_stage(ctx, config, tokens, encoder)
    assert embedded["encoded"] == 0 and embedded["cached"] == plan["rows"]  # the embed stage after it: a lookup
    fanned = cached_vectors(ctx, config, tokens, encoder, embedded)

    inline_ctx = StageContext.from_env(test_settings.model_copy(update={"bucket": buckets["inline"]}))
    inline_config = small_config(reviews, tiny_encoder_path, shard_rows=None)
    inline_tokens, inline_encoder = prepare(inline_ctx, inline_config)
    assert plan_stage(inline_ctx, inline_config, inline_tokens, inline_encoder)["parts"] == []  # no fan-out
    inline = embed_stage(inline_ctx, inline_config, inline_tokens, inline_encoder)
    assert inline["encoded"] == plan["rows"]
    np.testing.assert_allclose(cached_vectors(inline_ctx, inline_config, inline_tokens, inline_encoder, inline),
                               fanned, rtol=0, atol=1e-6)


def test_no_shard_deployment_means_no_fan_out(monkeypatch, tiny_encoder_path, reviews):
    from flows.embed_shard import fan_out_embed, shard_deployment

    monkeypatch.delenv("ADAPTFLOW_SHARD_DEPLOYMENT", raising=False)
    config = small_config(reviews, tiny_encoder_path, shard_rows=1)
    assert shard_deployment(config) is None
    assert fan_out_embed(config, {}, {}) is None  # nothing planned, nothing read: inline embed as before
    monkeypatch.setenv("ADAPTFLOW_SHARD_DEPLOYMENT", "embed-shard/gpu")
    assert shard_deployment(config) == "embed-shard/gpu"
    assert fan_out_embed(small_config(reviews, tiny_encoder_path, shard_rows=0), {}, {}) is None


# ------------------------------------------------------------------------ for real: Prefect on PostgreSQL, 2 workers


def part_task_runs(client, run_ids: list) -> dict:
    """{flow run id: (start, end)} of each flow run's embed_part task run that has started (end None: running)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)))
    return {r.flow_run_id: (r.start_time, r.end_time) for r in task_runs
            if r.name.startswith("embed_part") and r.start_time is not None}


def worker_of(run, workers: list[subprocess.Popen]) -> int:
    """Index of the worker whose process tree runs flow run ``run`` (its infrastructure_pid is HOST:PID)."""
    pid = int(str(run.infrastructure_pid).rsplit(":", 1)[-1])
    ancestors = {p.pid for p in psutil.Process(pid).parents()} | {pid}
    (index,) = [i for i, w in enumerate(workers) if w.pid in ancestors]
    return index


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a worker, its process group and every process it started (its flow runs' own sessions too): what a
    lost machine looks like to the rest."""
    tree = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGKILL)
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=30)


@pytest.mark.slow
def test_parts_run_at_once_on_two_workers_and_a_killed_workers_part_finishes_on_the_other(
        pg_databases, private_stack, tiny_encoder_path, reviews, tmp_path, monkeypatch):
    """Prefect server on PostgreSQL, two process workers on pool `gpu`, limit `gpu` = 2, two parts. S3 is paused
    once both parts are submitted, so neither part can finish: both embed_part task runs must be running at once.
    The worker of one part is then killed with its whole tree; Prefect (3.9.1) leaves that run Running for ever,
    so the parent must notice the missing heartbeats, mark it Crashed and run the part again: it completes on the
    other worker. The vectors equal an inline run's."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from adaptflow import stack
    from deployments.deploy import SHARD_DEPLOYMENT, deploy_shard, ensure_pools
    from tasks.fanout import run_parts
    from tests.fixtures.faults import export_settings
    from tests.test_deployments import stop, wait_for, wait_online

    server, names = pg_databases
    prefect_dir = tmp_path / "prefect-stack"
    monkeypatch.setenv("PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS", "1")
    api = stack.up(prefect_dir, services=("prefect",), ports={"prefect": stack.free_port(set())}, timeout=150,
                   postgres=server, databases={"prefect": names["prefect"]})["prefect"]["api_url"]
    workers: list[subprocess.Popen] = []
    private = private_stack(("s3",))
    try:
        settings = export_settings(monkeypatch, private.settings(cache_dir=tmp_path / "cache"))
        monkeypatch.setenv("ADAPTFLOW_STATE_DIR", str(tmp_path / "none"))
        ctx = StageContext.from_env(settings)
        config = small_config(reviews, tiny_encoder_path, shard_rows=150, part_heartbeat_s=30, gpu_timeout_s=900)
        tokens, encoder = prepare(ctx, config)
        plan = plan_stage(ctx, config, tokens, encoder)
        assert len(plan["parts"]) == 2

        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            ensure_pools()
            deploy_shard()
            client.update_global_concurrency_limit("gpu", GlobalConcurrencyLimitUpdate(limit=2))
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "MLFLOW_"))},
               **settings.process_env(), "PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "1",
               "HF_HUB_OFFLINE": "1", "ADAPTFLOW_STATE_DIR": str(tmp_path / "none")}
        # one flow run at a time each (as one GPU each): the two parts must go to the two workers
        workers = [subprocess.Popen([sys.executable, "-m", "adaptflow", "worker", "--pool", "gpu", "--limit", "1"],
                                    env=env, cwd=ROOT, stdout=(tmp_path / f"gpu-{i}.log").open("w"),
                                    stderr=subprocess.STDOUT, start_new_session=True) for i in range(2)]
        wait_online(api, "gpu", 2)

        outcome: dict = {}

        def parent() -> None:
            with temporary_settings(updates={PREFECT_API_URL: api}):
                try:
                    outcome["result"] = run_parts.fn(SHARD_DEPLOYMENT, config, plan, encoder)
                except Exception as exc:  # noqa: BLE001
                    outcome["error"] = exc

        thread = threading.Thread(target=parent, daemon=True)
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            thread.start()
            first = wait_for(lambda: (runs := client.read_flow_runs()) and len(runs) == 2 and runs, 120,
                             "both parts submitted")
            os.killpg(private.pid("s3"), signal.SIGSTOP)  # no part can finish now
            try:
                ids = [run.id for run in first]
                spans = wait_for(lambda: len(s := part_task_runs(client, ids)) == 2 and s, 240,
                                 "both parts inside embed_part")
                # both task runs started and neither ended: the two parts run at once, on the two workers
                assert all(end is None for _, end in spans.values()), spans
                runs = [client.read_flow_run(i) for i in ids]
                owners = [worker_of(run, workers) for run in runs]
                assert sorted(owners) == [0, 1], owners
                victim = runs[0]
                kill_tree(workers[owners[0]])
            finally:
                os.killpg(private.pid("s3"), signal.SIGCONT)
            thread.join(timeout=600)
            assert not thread.is_alive(), "the parent still waits"
            logs = "\n".join(p.read_text()[-3000:] for p in tmp_path.glob("gpu-*.log"))
            assert "result" in outcome, (outcome, logs)
            assert outcome["result"]["resubmitted"] == 1, outcome
            lost = client.read_flow_run(victim.id)
            assert lost.state.is_crashed() and "no heartbeat" in lost.state.message, lost.state
            every = client.read_flow_runs()
            again = [r for r in every if r.id not in ids]
            assert len(again) == 1 and again[0].state.is_completed()
            assert again[0].parameters["part"]["key"] == victim.parameters["part"]["key"]
            assert str(again[0].id) in (tmp_path / f"gpu-{owners[1]}.log").read_text()  # run by the survivor
            print("part intervals: " + "; ".join(f"{s:%H:%M:%S.%f} → {e}" for s, e in spans.values()))
    finally:
        for worker in workers:
            stop(worker)
        stack.down(prefect_dir)

    assert not any(missing_rows(ctx, config, plan, encoder).values())
    embedded = embed_stage(ctx, config, tokens, encoder)
    assert embedded["encoded"] == 0
    fanned = cached_vectors(ctx, config, tokens, encoder, embedded)
    inline_ctx = StageContext.from_env(settings.model_copy(update={"bucket": "inline"}))
    inline_tokens, inline_encoder = prepare(inline_ctx, config)
    inline = embed_stage(inline_ctx, config.model_copy(update={"orchestration": config.orchestration.model_copy(
        update={"shard_rows": None})}), inline_tokens, inline_encoder)
    assert inline["encoded"] == plan["rows"]
    np.testing.assert_allclose(cached_vectors(inline_ctx, config, inline_tokens, inline_encoder, inline), fanned,
                               rtol=0, atol=1e-6)
