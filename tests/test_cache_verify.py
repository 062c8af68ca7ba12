"""A corrupt embedding-cache shard is skipped and its rows re-encoded; `adaptflow cache verify [--repair]`.

Real SeaweedFS and the tiny random encoder; the corruption is what bit rot or a bad overwrite leaves: the
shard's vectors.npy replaced in S3 by other bytes of the same shape.
"""

import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from adaptflow import stages
from adaptflow.cache import CacheIntegrityError, EmbeddingCache, text_sha256
from adaptflow.config import build_config
from adaptflow.store import ArtifactStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "good bad great awful boring funny warm cold love hate story plot actor music fun dull".split()


@pytest.fixture
def ctx(test_settings, fresh_bucket) -> stages.StageContext:
    settings = test_settings.model_copy(update={"bucket": fresh_bucket})
    return stages.StageContext(settings, ArtifactStore.from_settings(settings))


@pytest.fixture
def small_shards(monkeypatch):
    """40-row shards, so a few hundred rows make several (a real cache holds 4096-row shards)."""
    import adaptflow.embed

    real = adaptflow.embed.iter_encode
    monkeypatch.setattr(adaptflow.embed, "iter_encode", lambda *a, **k: real(*a, **{**k, "chunk_rows": 40}))


def write_data(folder, n=160, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.choice(["pos", "neg"], size=n)
    texts = [f"{' '.join(rng.choice(WORDS, size=4))} {i}" for i in range(n)]
    path = folder / "train.csv"
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
    return path


def config_for(train, encoder_path):
    return build_config({"name": "corrupt-shard", "data": {"train": str(train)},
                         "encoder": {"ref": str(encoder_path), "max_length": 32, "device": "cpu", "dtype": "fp32",
                                     "tokens_per_batch": 256},
                         "head": {"epochs": 3}, "gate": {"smoke_test": False}})


def stages_to_tokens(ctx, config) -> tuple[dict, dict, dict]:
    """(encoder, validated, tokens): the stages before embed, run against the real store."""
    encoder = stages.resolve_encoder_stage(ctx, config)
    validated = stages.validate_stage(ctx, config, stages.ingest_stage(ctx, config))
    return encoder, validated, stages.tokenize_stage(ctx, config, validated, encoder)


def cache_of(ctx, config, encoder):
    return EmbeddingCache(ctx.store, encoder_digest=encoder["digest"], max_length=config.encoder.max_length,
                          pooling=config.encoder.pooling, dtype="fp32")


def shard_manifests(store, cache):
    return sorted(k for k in store.list_keys(f"{cache.prefix}/shards/") if k.endswith("/_manifest.json"))


def corrupt_vectors(store, shard_prefix):
    """Overwrite a published shard's vectors.npy with other vectors of the same shape (bit rot, a bad copy)."""
    vectors = np.load(io.BytesIO(store.get_bytes(f"{shard_prefix}/vectors.npy")))
    buf = io.BytesIO()
    np.save(buf, vectors + 1e-3)
    store.put_bytes(f"{shard_prefix}/vectors.npy", buf.getvalue())
    return int(len(vectors))


def test_a_corrupt_shard_is_skipped_and_its_rows_encoded_again(ctx, tmp_path, tiny_encoder_path, small_shards,
                                                                caplog):
    config = config_for(write_data(tmp_path), tiny_encoder_path)
    encoder, validated, tokens = stages_to_tokens(ctx, config)
    first = stages.embed_stage(ctx, config, tokens, encoder)
    assert first["cached"] == 0

    cache = cache_of(ctx, config, encoder)
    texts = pd.concat([stages.read_frame(ctx, validated[s])["text"] for s in ("train", "test")])
    hashes = [text_sha256(t) for t in texts]
    clean = cache.read(hashes)
    manifests = shard_manifests(ctx.store, cache)
    assert len(manifests) >= 3
    bad_prefix = manifests[1].rsplit("/", 1)[0]
    bad_rows = corrupt_vectors(ctx.store, bad_prefix)

    with caplog.at_level(logging.INFO, logger="adaptflow"):
        second = stages.embed_stage(ctx, config, tokens, encoder)
    # skipped, its rows encoded again (the run goes on), and said so in the log and the stage's result
    assert second["encoded"] == bad_rows and second["cached"] == first["encoded"] - bad_rows
    assert second["corrupt"] == {"shards_ignored": 1, "rows_reencoded": bad_rows}
    assert first["corrupt"] == {"shards_ignored": 0, "rows_reencoded": 0}
    assert f"1 corrupt shard ignored ({bad_rows} rows re-encoded)" in caplog.text
    # what later stages read is a clean encode again, from a fresh index (the marked shard is never served)
    np.testing.assert_allclose(cache_of(ctx, config, encoder).read(hashes), clean, atol=1e-5)
    head = stages.train_stage(ctx, config, validated, encoder, second)
    assert stages.evaluate_stage(ctx, config, validated, encoder, second, head)["metrics"]["accuracy"] >= 0

    # a later run neither re-checks into a failure nor re-encodes: the marker keeps the shard out of the index
    third = stages.embed_stage(ctx, config, tokens, encoder)
    assert third["encoded"] == 0 and third["corrupt"] == {"shards_ignored": 1, "rows_reencoded": 0}


def test_a_corrupt_shard_found_by_a_read_is_marked_and_healed_by_the_next_embed(ctx, tmp_path, tiny_encoder_path,
                                                                                small_shards):
    """Corruption that appears between the embed stage and a read: that read fails (not retried), the shard is
    marked, and the next run's embed stage encodes its rows again."""
    from tasks.policy import is_transient

    config = config_for(write_data(tmp_path, n=100, seed=1), tiny_encoder_path)
    encoder, validated, tokens = stages_to_tokens(ctx, config)
    stages.embed_stage(ctx, config, tokens, encoder)
    cache = cache_of(ctx, config, encoder)
    bad_rows = corrupt_vectors(ctx.store, shard_manifests(ctx.store, cache)[0].rsplit("/", 1)[0])
    texts = stages.read_frame(ctx, validated["train"])["text"]
    with pytest.raises(CacheIntegrityError, match="adaptflow cache verify --repair") as caught:
        cache.read([text_sha256(t) for t in texts])
    assert "drop_shard" not in str(caught.value)

    class Failed:  # a task state whose result raises what the read raised
        def result(self):
            raise caught.value

    assert is_transient(None, None, Failed()) is False  # a retry would download the same bytes
    again = stages.embed_stage(ctx, config, tokens, encoder)
    assert again["corrupt"] == {"shards_ignored": 1, "rows_reencoded": bad_rows}


def run_cli(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "adaptflow", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_cache_verify_lists_then_repairs_corrupt_shards_and_orphans(ctx, test_settings, tmp_path, tiny_encoder_path,
                                                                    small_shards):
    config = config_for(write_data(tmp_path, n=100, seed=2), tiny_encoder_path)
    encoder, validated, tokens = stages_to_tokens(ctx, config)
    stages.embed_stage(ctx, config, tokens, encoder)
    cache = cache_of(ctx, config, encoder)
    manifests = shard_manifests(ctx.store, cache)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "ADAPTFLOW_"))}
    env.update({**test_settings.process_env(), "ADAPTFLOW_BUCKET": ctx.store.bucket,
                "ADAPTFLOW_STATE_DIR": str(tmp_path / "no-stack"), "PYTHONPATH": ROOT})

    clean = run_cli(["cache", "verify", "--json"], env, tmp_path)
    assert clean.returncode == 0, clean.stderr[-3000:]
    report = json.loads(clean.stdout.strip().splitlines()[-1])
    assert report["problems"] == [] and report["shards"] == len(manifests) and report["caches"] == 1

    bad = manifests[0].rsplit("/", 1)[0]
    corrupt_vectors(ctx.store, bad)
    orphan = f"{cache.prefix}/shards/{'0' * 64}"  # a writer that crashed before its manifest
    ctx.store.put_bytes(f"{orphan}/vectors.npy", b"partial")
    found = run_cli(["cache", "verify", "--json", "--min-age", "0"], env, tmp_path)
    assert found.returncode == 1, found.stderr[-3000:]
    problems = json.loads(found.stdout.strip().splitlines()[-1])["problems"]
    assert sorted((p["kind"], p["prefix"]) for p in problems) == [("corrupt", ctx.store.uri(bad)),
                                                                   ("orphan", ctx.store.uri(orphan))]
    assert "vectors.npy sha256" in next(p["reason"] for p in problems if p["kind"] == "corrupt")
    # without --min-age, a fresh orphan may be a write in flight: left alone
    recent = json.loads(run_cli(["cache", "verify", "--json"], env, tmp_path).stdout.strip().splitlines()[-1])
    assert [p["kind"] for p in recent["problems"]] == ["corrupt"] and recent["recent_objects"] == 1

    repaired = run_cli(["cache", "verify", "--repair", "--min-age", "0"], env, tmp_path)
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    assert "removed" in repaired.stdout
    assert not any(k.startswith((f"{bad}/", f"{orphan}/")) for k in ctx.store.list_keys(cache.prefix))
    again = run_cli(["cache", "verify", "--min-age", "0"], env, tmp_path)
    assert again.returncode == 0 and "no problems" in again.stdout, again.stdout + again.stderr
    # the repaired cache simply lacks those rows: the next embed encodes them
    assert stages.embed_stage(ctx, config, tokens, encoder)["encoded"] > 0


def test_the_run_summary_reports_the_corrupt_shard(services_env, fresh_bucket, monkeypatch, prefect_harness, tmp_path,
                                                  tiny_encoder_path, small_shards, test_settings):
    """What `adaptflow retrain --json` prints: embeddings.corrupt in the flow's summary."""
    from flows.retrain import retrain

    monkeypatch.setenv("ADAPTFLOW_BUCKET", fresh_bucket)
    config = config_for(write_data(tmp_path, n=120, seed=3), tiny_encoder_path)
    first = retrain(config)
    assert first["embeddings"]["corrupt"] == {"shards_ignored": 0, "rows_reencoded": 0}
    store = ArtifactStore.from_settings(test_settings, bucket=fresh_bucket)
    manifest = next(k for k in store.list_keys("embeddings/") if "/shards/" in k and k.endswith("/_manifest.json"))
    bad_rows = corrupt_vectors(store, manifest.rsplit("/", 1)[0])
    second = retrain(config, force=True)  # unforced, an unchanged run registers nothing (test_changes)
    assert second["embeddings"]["corrupt"] == {"shards_ignored": 1, "rows_reencoded": bad_rows}
    assert second["embeddings"]["encoded"] == bad_rows and second["version"] == "2"


def test_the_printed_summary_names_the_corrupt_shard(capsys):
    from adaptflow.cli.retrain import print_summary

    summary = {"model_name": "m", "version": "2", "aliases": ["challenger"], "run_id": "r",
               "metrics": {"accuracy": 0.9, "macro_f1": 0.9, "ece": 0.1},
               "rows": {"train": 1, "test": 1, "quarantined": 0},
               "embeddings": {"encoded": 16, "cached": 144, "dtype": "fp32",
                              "corrupt": {"shards_ignored": 1, "rows_reencoded": 16}}, "seconds": {"embed": 1.0}}
    print_summary(summary)
    assert "1 corrupt shard ignored (16 rows re-encoded)" in capsys.readouterr().out
