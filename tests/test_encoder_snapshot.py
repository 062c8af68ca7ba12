"""Resolve once, load that snapshot everywhere: the embedding cache cannot be filled by another encoder."""

import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adaptflow import stages
from adaptflow.cache import EmbeddingCache, text_sha256
from adaptflow.config import build_config
from adaptflow.encoders import EncoderMismatchError, folder_digest, push_encoder
from adaptflow.store import ArtifactStore
from tests.fixtures.encoders import build_tiny_encoder


@pytest.fixture
def ctx(services_env, s3_client):
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=bucket)
    settings = services_env.model_copy(update={"bucket": bucket})
    return stages.StageContext(settings, ArtifactStore.from_settings(settings))


def _config(tmp_path: Path, ref: Path):
    rng = np.random.default_rng(0)
    texts = [f"{' '.join(rng.choice(['good', 'bad', 'film', 'story', 'music'], size=4))} {i}" for i in range(60)]
    pd.DataFrame({"text": texts, "label": rng.choice(["pos", "neg"], size=60)}).to_csv(tmp_path / "t.csv", index=False)
    return build_config({"name": "pinned", "data": {"train": str(tmp_path / "t.csv")},
                         "encoder": {"ref": str(ref), "max_length": 32, "dtype": "fp32"}})


def _shards(ctx, cache: EmbeddingCache) -> list[str]:
    return [k for k in ctx.store.list_keys(f"{cache.prefix}/shards/") if k.endswith("_manifest.json")]


def test_encoder_swapped_between_tokenize_and_embed_cannot_poison_the_cache(ctx, tmp_path):
    folder = build_tiny_encoder(tmp_path / "enc", seed=0)
    original = folder_digest(folder)
    config = _config(tmp_path, folder)
    encoder = stages.resolve_encoder_stage(ctx, config)
    assert encoder["ref"].startswith(f"s3://{ctx.store.bucket}/encoders/") and encoder["digest"] == original
    assert encoder["source_ref"] == str(folder)
    validated = stages.validate_stage(ctx, config, stages.ingest_stage(ctx, config))
    tokens = stages.tokenize_stage(ctx, config, validated, encoder)

    # the folder now holds another encoder (an upgraded package, another machine's copy at the same path)
    shutil.rmtree(folder)
    build_tiny_encoder(folder, seed=1)
    assert folder_digest(folder) != original

    embedded = stages.embed_stage(ctx, config, tokens, encoder)
    cache = EmbeddingCache(ctx.store, encoder_digest=original, max_length=32, pooling="mean", dtype="fp32")
    texts = list(dict.fromkeys(pd.concat([stages.read_frame(ctx, validated[s])["text"] for s in ("train", "test")])))
    cached = cache.read([text_sha256(t) for t in texts])

    # what the original encoder gives for the same texts, encoded apart from the pipeline
    reference = build_tiny_encoder(tmp_path / "reference", seed=0)
    assert folder_digest(reference) == original
    from adaptflow.embed import encode, tokenize_texts
    from adaptflow.encoders import load_encoder, resolve_encoder

    tokenizer, model = load_encoder(resolve_encoder(reference))
    expected = encode(model, tokenize_texts(tokenizer, texts, 32), pooling="mean", dtype="fp32", device="cpu",
                      progress=False).vectors
    assert embedded["encoded"] == len(texts)
    np.testing.assert_allclose(cached, expected, atol=1e-5)


def test_a_load_that_finds_other_files_fails_naming_both_digests_and_writes_nothing(ctx, tmp_path):
    config = _config(tmp_path, build_tiny_encoder(tmp_path / "a", seed=0))
    encoder = stages.resolve_encoder_stage(ctx, config)
    validated = stages.validate_stage(ctx, config, stages.ingest_stage(ctx, config))
    tokens = stages.tokenize_stage(ctx, config, validated, encoder)
    other_ref, other_digest = push_encoder(build_tiny_encoder(tmp_path / "b", seed=1), "other", ctx.store)

    with pytest.raises(EncoderMismatchError) as caught:
        stages.embed_stage(ctx, config, tokens, {**encoder, "ref": other_ref})  # a ref that is not that digest
    assert encoder["digest"] in str(caught.value) and other_digest in str(caught.value)
    cache = EmbeddingCache(ctx.store, encoder_digest=encoder["digest"], max_length=32, pooling="mean", dtype="fp32")
    assert _shards(ctx, cache) == []


def test_every_run_after_the_first_finds_the_pinned_snapshot(ctx, tmp_path):
    config = _config(tmp_path, build_tiny_encoder(tmp_path / "c", seed=2))
    first = stages.resolve_encoder_stage(ctx, config)
    second = stages.resolve_encoder_stage(ctx, config)
    assert first == second  # same content, same content-addressed ref: nothing pushed twice
    objects = [k for k in ctx.store.list_keys("encoders/") if k.endswith("_manifest.json")]
    assert len(objects) == 1
