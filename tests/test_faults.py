"""Faults mid-run, with real processes stopped by PID: the run survives or resumes, and nothing in the bucket
is left corrupt. Every test ends with ``scan_bucket``: each manifest's objects exist with their recorded digests.

The slow ones (``-m slow``, ``make test-faults``) stop the services of a private stack (``private_stack``) or
SIGKILL a retrain process; the fast ones pin the store's publication protocol that makes the rest possible.
Measured numbers are printed (``-s`` shows them) and asserted loosely.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adaptflow.cache import EmbeddingCache
from adaptflow.config import build_config
from adaptflow.store import ArtifactStore, ConflictError
from tests.fixtures.faults import (
    export_settings,
    manifests,
    reviews,
    scan_bucket,
    shard_rows,
    unpublished_objects,
)


def report(**numbers) -> None:
    print("\nMEASURED " + json.dumps(numbers, default=str))


@pytest.fixture
def store(test_settings, fresh_bucket) -> ArtifactStore:
    return ArtifactStore.from_settings(test_settings, bucket=fresh_bucket)


# ---------------------------------------------------------------------------------------------- publication


def test_a_late_writer_cannot_clobber_a_published_prefix(store, monkeypatch):
    """Writer B checked for the manifest before A published it, then uploads other bytes: refused, A stays sound."""
    store.publish("heads/k", {"head.safetensors": b"weights A", "history.json": b'[{"seconds": 1.0}]'})
    late = ArtifactStore(store.bucket, endpoint_url=store.endpoint_url, client=store.client)
    # B's first manifest check ran before A's publication
    monkeypatch.setattr(late, "exists", _first_call_says_absent(late.exists))
    with pytest.raises(ConflictError, match="published by another writer"):
        late.publish("heads/k", {"head.safetensors": b"weights B", "history.json": b'[{"seconds": 2.0}]'})
    assert store.verify_manifest("heads/k") == []
    assert store.get_bytes("heads/k/head.safetensors") == b"weights A"
    assert scan_bucket(store) == [] and unpublished_objects(store) == []


def _first_call_says_absent(real):
    calls = {"n": 0}

    def exists(key):
        calls["n"] += 1
        return False if calls["n"] == 1 else real(key)

    return exists


def test_a_retry_reuploads_nothing_and_an_abandoned_attempt_is_replaced(store):
    store.put_bytes("heads/r/head.safetensors", b"same bytes")  # a crashed attempt got this far
    started = time.monotonic()
    store.publish("heads/r", {"head.safetensors": b"same bytes", "history.json": b"[]"})
    assert time.monotonic() - started < 2 and store.verify_manifest("heads/r") == []

    store.put_bytes("heads/s/history.json", b'[{"seconds": 9.9}]')  # other bytes: wait out the grace period
    store.publish_grace_s = 1.5
    started = time.monotonic()
    store.publish("heads/s", {"head.safetensors": b"w", "history.json": b'[{"seconds": 1.1}]'})
    waited = time.monotonic() - started
    assert 1.0 <= waited < 10 and store.verify_manifest("heads/s") == []
    report(abandoned_object_replaced_after_s=round(waited, 2))


def test_concurrent_writers_of_one_prefix_leave_one_sound_manifest(store):
    """Eight writers publish different bytes under one key at once: one wins, the rest get ConflictError."""
    outcomes: list[str] = []

    def writer(i: int):
        mine = ArtifactStore(store.bucket, endpoint_url=store.endpoint_url, client=store.client)
        mine.publish_grace_s = 20
        try:
            mine.publish("evaluations/race", {f"part{j}.bin": f"writer {i} part {j}".encode() * 1000 for j in range(4)})
            outcomes.append("published")
        except ConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["conflict"] * 7 + ["published"]
    assert scan_bucket(store) == [] and unpublished_objects(store) == []


# ---------------------------------------------------------------------------------------------- slow: services


def _config(train: Path, name: str, encoder: Path | str, **extra) -> object:
    raw = {"name": name, "data": {"train": str(train), "group_column": "movie_name", "test_size": 0.2},
           "encoder": {"ref": str(encoder), "max_length": 32, "dtype": "fp32"},
           "head": {"epochs": 5}, "gate": {"smoke_test": False}}
    for section, values in extra.items():
        raw.setdefault(section, {}).update(values)
    return build_config(raw)


@pytest.mark.slow
def test_s3_killed_during_embedding_and_restarted_the_run_completes(private_stack, test_settings, prefect_harness,
                                                                      tiny_encoder_path, tmp_path, monkeypatch,
                                                                      restore_mlflow_uris):
    """SeaweedFS SIGKILLed after the 2nd embedding shard, back 8 s later: the embed task retries and resumes."""
    import adaptflow.embed
    from flows.retrain import retrain

    s3 = private_stack(("s3",))
    settings = s3.settings(mlflow_tracking_uri=test_settings.mlflow_tracking_uri, cache_dir=tmp_path / "cache")
    export_settings(monkeypatch, settings)
    data = tmp_path / "reviews.csv"
    reviews(3000, seed=1).to_csv(data, index=False)

    real_iter = adaptflow.embed.iter_encode  # 250-row shards: a dozen of them, so the fault lands mid-stage
    monkeypatch.setattr(adaptflow.embed, "iter_encode", lambda *a, **k: real_iter(*a, **{**k, "chunk_rows": 250}))
    import tasks.embedding

    real_write, real_embed = EmbeddingCache.write_shard, tasks.embedding.embed_stage
    seen = {"shards": 0, "attempts": 0, "failed_writes": 0}

    def embed_stage(*args, **kwargs):  # one call per attempt of the embed_texts task
        seen["attempts"] += 1
        return real_embed(*args, **kwargs)

    def write_shard(self, hashes, vectors):
        try:
            shard = real_write(self, hashes, vectors)
        except Exception:
            seen["failed_writes"] += 1
            raise
        seen["shards"] += 1
        if seen["shards"] == 2:
            s3.stop("s3", signal.SIGKILL)
            s3.restart_later("s3", delay=8)
        return shard

    monkeypatch.setattr(EmbeddingCache, "write_shard", write_shard)
    monkeypatch.setattr(tasks.embedding, "embed_stage", embed_stage)
    started = time.monotonic()
    summary = retrain(_config(data, "fault-s3-restart", tiny_encoder_path))
    seconds = time.monotonic() - started

    store = s3.store()
    assert summary["version"] == "1" and summary["metrics"]["accuracy"] > 0
    assert seen["attempts"] >= 2, "the outage should outlast boto's own retries and fail a task attempt"
    assert summary["embeddings"]["cached"] >= 500  # the retry resumed from the shards stored before the fault
    assert summary["embeddings"]["encoded"] + summary["embeddings"]["cached"] == shard_rows(store)
    problems, orphans = scan_bucket(store), unpublished_objects(store)
    assert problems == []
    assert all("/shards/" in k for k in orphans), orphans  # at most the shard being written when S3 died
    report(test="s3 SIGKILL during embed", seconds=round(seconds, 1), embed_attempts=seen["attempts"],
           failed_shard_writes=seen["failed_writes"], resumed_from_cache=summary["embeddings"]["cached"],
           encoded_after_restart=summary["embeddings"]["encoded"], unpublished_objects=len(orphans),
           events=s3.events)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["before_logging", "after_version_created"])
def test_mlflow_down_at_registration_leaves_exactly_one_version(moment, private_stack, prefect_harness,
                                                                  tiny_encoder_path, tmp_path, monkeypatch,
                                                                  restore_mlflow_uris):
    """MLflow SIGKILLed during registration, back 2 s later: the task retries; the flow run id finds the run
    (and the version, when it was made) instead of making another."""
    import adaptflow.registry as registry
    from mlflow import MlflowClient

    from flows.retrain import retrain

    services = private_stack(("s3", "mlflow"))
    settings = services.settings(cache_dir=tmp_path / "cache")
    export_settings(monkeypatch, settings)
    # surface the outage to the task (MLflow's client alone would retry for ~4 min, re-POSTing blindly)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    data = tmp_path / "reviews.csv"
    reviews(400, seed=2).to_csv(data, index=False)
    calls = {"n": 0}

    def outage():
        services.stop("mlflow", signal.SIGKILL)
        services.restart_later("mlflow", delay=2)

    if moment == "before_logging":
        real = registry.log_and_register

        def log_and_register(**kwargs):
            calls["n"] += 1
            if calls["n"] == 1:
                outage()
            return real(**kwargs)

        monkeypatch.setattr(registry, "log_and_register", log_and_register)
    else:
        real = registry._finish

        def _finish(*args, **kwargs):  # the version exists; the answer (aliases) never arrives
            calls["n"] += 1
            if calls["n"] == 1:
                outage()
            return real(*args, **kwargs)

        monkeypatch.setattr(registry, "_finish", _finish)

    started = time.monotonic()
    summary = retrain(_config(data, f"fault-mlflow-{moment}", tiny_encoder_path))
    seconds = time.monotonic() - started

    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    name = f"fault-mlflow-{moment}"
    versions = client.search_model_versions(f"name = '{name}'")
    assert calls["n"] >= 2, "registration should have been retried"
    assert [v.version for v in versions] == ["1"] and summary["version"] == "1"
    flow_run_id = versions[0].tags["adaptflow.flow_run_id"]
    experiment = client.get_experiment_by_name("adaptflow")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`adaptflow.flow_run_id` = '{flow_run_id}'")
    assert len(runs) == 1 and runs[0].info.run_id == versions[0].run_id == summary["run_id"]
    assert runs[0].info.status == "FINISHED"  # not left RUNNING/FAILED by the attempt the outage interrupted
    aliases = {alias: client.get_model_version_by_alias(name, alias).version for alias in ("champion", "challenger")}
    assert aliases == {"champion": "1", "challenger": "1"}
    assert scan_bucket(services.store()) == []
    report(test=f"mlflow SIGKILL {moment}", seconds=round(seconds, 1), register_attempts=calls["n"],
           versions=len(versions), run_status=runs[0].info.status, events=services.events)


# ---------------------------------------------------------------------------------------------- slow: processes


def _cli(args, env, cwd, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adaptflow", *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture
def cli_env(test_settings, fresh_bucket, tmp_path, prefect_harness) -> dict:
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "ADAPTFLOW_"))}
    env.update(test_settings.process_env())
    env.update({"ADAPTFLOW_BUCKET": fresh_bucket, "ADAPTFLOW_STATE_DIR": str(tmp_path / "no-stack"),
                "ADAPTFLOW_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
                "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "prefect")})
    return env


def _write_config(path: Path, train: Path, name: str, encoder: str, max_length: int) -> Path:
    path.write_text(f"name: {name}\ndata:\n  train: {train}\n  group_column: movie_name\n"
                    f"encoder:\n  ref: {encoder}\n  max_length: {max_length}\n  dtype: fp32\n"
                    "head:\n  epochs: 10\ngate:\n  smoke_test: false\n")
    return path


@pytest.mark.slow
def test_sigkill_during_embedding_then_rerun_encodes_only_the_rest(cli_env, test_settings, tmp_path,
                                                                    tiny_encoder_path):
    """`adaptflow retrain` on 40k rows, SIGKILLed once its first 4096-row shard is stored; a re-run encodes only
    the rows not yet stored, and the cache holds the vectors a fresh encode gives, for rows of both runs."""
    from adaptflow.cache import text_sha256
    from adaptflow.embed import encode, tokenize_texts
    from adaptflow.encoders import load_encoder, resolve_encoder

    store = ArtifactStore.from_settings(test_settings, bucket=cli_env["ADAPTFLOW_BUCKET"])
    base = reviews()
    frame = pd.concat([base.assign(text=base["text"] + suffix) for suffix in ("", " indeed", " really", " so",
                                                                              " then")], ignore_index=True)
    data = tmp_path / "reviews.csv"
    frame.to_csv(data, index=False)  # 40125 rows: ten 4096-row shards
    config = _write_config(tmp_path / "config.yaml", data, "fault-sigkill", str(tiny_encoder_path), 32)

    started = time.monotonic()
    proc = _cli(["retrain", str(config), "--json"], cli_env, tmp_path)
    while proc.poll() is None and time.monotonic() - started < 240:
        if shard_rows(store):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    proc.wait(30)
    killed_after = time.monotonic() - started
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    stored = shard_rows(store)  # what the killed run left (a shard published after the last poll counts too)
    killed_shards = {k for k in manifests(store) if "/shards/" in k}
    assert scan_bucket(store) == []
    orphans_after_kill = unpublished_objects(store)

    rerun = subprocess.run([sys.executable, "-m", "adaptflow", "retrain", str(config), "--json"], env=cli_env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    total = summary["embeddings"]["encoded"] + summary["embeddings"]["cached"]
    assert summary["embeddings"]["cached"] == stored > 0
    assert summary["embeddings"]["encoded"] == total - stored > 0
    assert total == shard_rows(store) == frame["text"].str.strip().nunique()

    # the same vectors for the same rows: the cache vs a fresh in-process encode, for rows of both runs
    resolved = resolve_encoder(str(tiny_encoder_path))
    tokenizer, model = load_encoder(resolved)
    cache = EmbeddingCache(store, encoder_digest=resolved.digest, max_length=32, pooling="mean", dtype="fp32")
    texts = {text_sha256(t): t for t in frame["text"].str.strip()}
    by_killed_run = [h for k in sorted(killed_shards) for h in store.get_bytes(f"{k}/hashes.txt").decode().split()]
    by_rerun = [h for h in texts if h not in set(by_killed_run)]
    sample = [texts[h] for h in by_killed_run[:64] + by_rerun[:64]]
    fresh = encode(model, tokenize_texts(tokenizer, sample, 32), pooling="mean", dtype="fp32", progress=False).vectors
    cached = cache.read([text_sha256(t) for t in sample])
    assert np.allclose(cached, fresh, atol=1e-5), float(np.abs(cached - fresh).max())
    assert scan_bucket(store) == []
    report(test="SIGKILL during embedding", killed_after_s=round(killed_after, 1), rows=total,
           rows_stored_before_kill=stored, rerun_encoded=summary["embeddings"]["encoded"],
           rerun_cached=summary["embeddings"]["cached"], unpublished_objects_after_kill=len(orphans_after_kill),
           max_abs_diff=float(np.abs(cached - fresh).max()), total_seconds=round(time.monotonic() - started, 1))


@pytest.mark.slow
def test_two_runs_of_the_same_config_at_once(cli_env, test_settings, tmp_path, tiny_encoder_path):
    """Two `adaptflow retrain` processes on one config at once: both finish, shared stage outputs are published
    once and stay sound, and the aliases end consistent with the audit trail."""
    from mlflow import MlflowClient

    store = ArtifactStore.from_settings(test_settings, bucket=cli_env["ADAPTFLOW_BUCKET"])
    data = tmp_path / "reviews.csv"
    reviews(1500, seed=3).to_csv(data, index=False)
    config = _write_config(tmp_path / "config.yaml", data, "fault-concurrent", str(tiny_encoder_path), 32)
    started = time.monotonic()
    procs = [_cli(["retrain", str(config), "--json", "--force"], cli_env, tmp_path) for _ in range(2)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    seconds = time.monotonic() - started
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]

    client = MlflowClient(test_settings.mlflow_tracking_uri, registry_uri=test_settings.mlflow_tracking_uri)
    versions = {v.version: v for v in client.search_model_versions("name = 'fault-concurrent'")}
    assert sorted(versions) == ["1", "2"] and sorted(s["version"] for s in summaries) == ["1", "2"]
    assert len({v.tags["adaptflow.flow_run_id"] for v in versions.values()}) == 2
    champion = client.get_model_version_by_alias("fault-concurrent", "champion").version
    challenger = client.get_model_version_by_alias("fault-concurrent", "challenger").version
    from adaptflow.registry import alias_history

    moves = [m for m in alias_history(client, "fault-concurrent") if m["alias"] == "champion"]
    assert moves and moves[-1]["to"] == champion  # the alias is where the last recorded move put it
    assert all(later["from"] == earlier["to"] for earlier, later in zip(moves, moves[1:]))  # no lost update
    assert versions[champion].tags.get("adaptflow.gate.decision") == "promote"
    assert {s["artifacts"]["validated"] for s in summaries} == {summaries[0]["artifacts"]["validated"]}
    problems, orphans = scan_bucket(store), unpublished_objects(store)
    assert problems == [] and orphans == []
    report(test="two concurrent runs", seconds=round(seconds, 1), champion=champion, challenger=challenger,
           decisions=[s.get("decision") for s in summaries],
           embeddings=[s["embeddings"] for s in summaries], champion_moves=len(moves))


@pytest.mark.slow
def test_unreachable_s3_fails_after_bounded_retries_with_exit_1(cli_env, tmp_path, tiny_encoder_path):
    """A wrong endpoint looks like a restarting server: retried (boto, then the task), then exit 1, one paragraph."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "reviews.csv"
    reviews(100, seed=4).to_csv(data, index=False)
    config = _write_config(tmp_path / "config.yaml", data, "fault-nowhere", str(tiny_encoder_path), 32)
    nowhere = f"http://127.0.0.1:{port}"
    env = {**cli_env, "AWS_ENDPOINT_URL_S3": nowhere, "MLFLOW_S3_ENDPOINT_URL": nowhere}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "adaptflow", "retrain", str(config)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=400)
    seconds = time.monotonic() - started
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    paragraph = done.stderr[done.stderr.index("error: retrain "):]
    assert f"is the S3 server at http://127.0.0.1:{port} running?" in paragraph
    assert done.stderr.count("Retry ") >= 3  # the task was retried 3 times before giving up
    report(test="unreachable S3 endpoint", seconds_to_exit_1=round(seconds, 1))
