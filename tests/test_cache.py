"""The S3 embedding cache against the session's real SeaweedFS: order, misses, half-writes, keys, tampering."""

import io
import json

import numpy as np
import pytest

from adaptflow.cache import CacheIntegrityError, EmbeddingCache, cache_key, text_sha256
from adaptflow.store import ArtifactStore

SPEC = dict(encoder_digest="sha256:" + "ab" * 32, max_length=128, pooling="mean", dtype="fp32")


@pytest.fixture
def store(test_settings, fresh_bucket):
    return ArtifactStore.from_settings(test_settings, bucket=fresh_bucket)


def rows(n, dim=8, seed=0, start=0):
    hashes = [text_sha256(f"text {i}") for i in range(start, start + n)]
    return hashes, np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_write_then_read_in_any_order_from_a_fresh_instance(store):
    cache = EmbeddingCache(store, **SPEC)
    h1, v1 = rows(10, seed=1)
    h2, v2 = rows(7, seed=2, start=10)
    cache.write_shard(h1, v1)
    cache.write_shard(h2, v2)
    hashes, vectors = h1 + h2, np.concatenate([v1, v2])
    order = np.random.default_rng(0).permutation(len(hashes))
    for reader in (cache, EmbeddingCache(store, **SPEC)):  # in-memory index, then one rebuilt from S3
        got = reader.read([hashes[i] for i in order])
        assert got.dtype == np.float32 and got.shape == (17, 8)
        np.testing.assert_array_equal(got, vectors[order])
        assert reader.missing(hashes) == []
        assert len(reader) == 17
    assert cache.read([]).shape == (0, 8)


def test_missing_after_partial_writes_is_unique_and_ordered(store):
    cache = EmbeddingCache(store, **SPEC)
    hashes, vectors = rows(20)
    assert cache.missing(hashes) == hashes
    cache.write_shard(hashes[5:10], vectors[5:10])
    query = hashes[::-1] + hashes[:3]  # reversed, with duplicates
    expected = [h for h in hashes[::-1] if h not in hashes[5:10]]
    assert cache.missing(query) == expected
    assert EmbeddingCache(store, **SPEC).missing(query) == expected
    with pytest.raises(KeyError, match="15 of 20 rows are not in the embedding cache"):
        cache.read(hashes)


def test_retried_write_is_idempotent(store):
    cache = EmbeddingCache(store, **SPEC)
    hashes, vectors = rows(4)
    first = cache.write_shard(hashes, vectors)
    assert cache.write_shard(hashes, vectors) == first  # same content -> same shard, no ConflictError
    assert EmbeddingCache(store, **SPEC).write_shard(hashes, vectors) == first
    assert len(EmbeddingCache(store, **SPEC)) == 4
    assert sum(k.endswith("_manifest.json") for k in store.list_keys(cache.prefix)) == 1


def test_half_written_shard_is_ignored(store):
    cache = EmbeddingCache(store, **SPEC)
    hashes, vectors = rows(6)
    cache.write_shard(hashes[:3], vectors[:3])
    # a writer that crashed between its objects and its manifest
    buf = io.BytesIO()
    np.save(buf, vectors[3:])
    half = f"{cache.prefix}/shards/{'0' * 64}"
    store.put_bytes(f"{half}/vectors.npy", buf.getvalue())
    store.put_bytes(f"{half}/hashes.txt", ("\n".join(hashes[3:]) + "\n").encode())
    fresh = EmbeddingCache(store, **SPEC)
    assert fresh.missing(hashes) == hashes[3:]
    with pytest.raises(KeyError):
        fresh.read(hashes)
    np.testing.assert_array_equal(fresh.read(hashes[:3]), vectors[:3])


@pytest.mark.parametrize("change", [{"max_length": 64}, {"pooling": "cls"}, {"dtype": "bf16"},
                                    {"encoder_digest": "sha256:" + "cd" * 32}])
def test_any_setting_change_is_a_different_key(store, change):
    cache = EmbeddingCache(store, **SPEC)
    hashes, vectors = rows(3)
    cache.write_shard(hashes, vectors)
    other = EmbeddingCache(store, **{**SPEC, **change})
    assert other.key != cache.key and other.prefix != cache.prefix
    assert other.key == cache_key(**{**SPEC, **change})
    assert other.missing(hashes) == hashes  # no stale hit
    with pytest.raises(KeyError):
        other.read(hashes)


def test_tampered_vectors_are_detected_marked_and_replaced(store):
    cache = EmbeddingCache(store, **SPEC)
    hashes, vectors = rows(5)
    other_hashes, other_vectors = rows(4, seed=3, start=5)
    shard = cache.write_shard(hashes, vectors)
    cache.write_shard(other_hashes, other_vectors)
    assert cache.missing(hashes) == []  # this instance's index is loaded before the tampering
    prefix = f"{cache.prefix}/shards/{shard}"
    buf = io.BytesIO()
    np.save(buf, vectors + 1e-3)
    store.put_bytes(f"{prefix}/vectors.npy", buf.getvalue())
    reader = EmbeddingCache(store, **SPEC)
    with pytest.raises(CacheIntegrityError, match="vectors.npy sha256") as caught:
        reader.read(hashes)
    # the message names a remedy that exists; the shard is marked (a worker may write, not delete) and ignored
    assert "adaptflow cache verify --repair" in str(caught.value) and "drop_shard" not in str(caught.value)
    assert caught.value.shard == shard
    assert store.read_manifest(f"{cache.prefix}/corrupt/{shard}")["meta"]["reason"].startswith("vectors.npy sha256")
    fresh = EmbeddingCache(store, **SPEC)
    assert fresh.missing(hashes + other_hashes) == hashes  # skipped unread, the other shard still served
    assert [(c.id, set(c.hashes)) for c in fresh.corrupt_shards] == [(shard, set(hashes))]
    # the same rows encoded again, bit for bit: a new (salted) shard, since the marked id cannot be reused
    again = fresh.write_shard(hashes, vectors)
    assert again != shard and store.read_manifest(f"{cache.prefix}/shards/{again}")["meta"]["salt"] == 1
    for reader in (fresh, EmbeddingCache(store, **SPEC)):
        np.testing.assert_array_equal(reader.read(hashes + other_hashes), np.concatenate([vectors, other_vectors]))
        assert reader.verify(hashes + other_hashes) == []
    # the remedy the message names works (`adaptflow cache verify --repair` deletes as drop_shard does)
    cache.drop_shard(shard)
    assert list(store.list_keys(prefix)) == [] and list(store.list_keys(f"{cache.prefix}/corrupt/")) == []
    assert EmbeddingCache(store, **SPEC).corrupt_shards == []


def test_a_forged_manifest_or_hashes_file_is_skipped_at_index_load(store):
    cache = EmbeddingCache(store, **SPEC)
    (h1, v1), (h2, v2), (h3, v3) = rows(3, seed=1), rows(3, seed=2, start=3), rows(3, seed=3, start=6)
    forged, shortened = cache.write_shard(h1, v1), cache.write_shard(h2, v2)
    cache.write_shard(h3, v3)
    # a forger who rewrites vectors.npy and the manifest still cannot match the content-derived shard id
    buf = io.BytesIO()
    np.save(buf, v1 + 1)
    store.put_bytes(f"{cache.prefix}/shards/{forged}/vectors.npy", buf.getvalue())
    manifest = json.loads(store.get_bytes(f"{cache.prefix}/shards/{forged}/_manifest.json"))
    manifest["objects"]["vectors.npy"]["sha256"] = __import__("hashlib").sha256(buf.getvalue()).hexdigest()
    store.put_bytes(f"{cache.prefix}/shards/{forged}/_manifest.json", json.dumps(manifest).encode())
    store.put_bytes(f"{cache.prefix}/shards/{shortened}/hashes.txt", (h2[0] + "\n").encode())
    fresh = EmbeddingCache(store, **SPEC)
    assert fresh.missing(h1 + h2 + h3) == h1 + h2  # caught as soon as the index is loaded, and skipped
    reasons = {c.id: c.reason for c in fresh.corrupt_shards}
    assert "does not match the shard id" in reasons[forged] and "hashes.txt sha256" in reasons[shortened]
    np.testing.assert_array_equal(fresh.read(h3), v3)


def test_verify_finds_corrupt_vectors_before_a_read_would(store, monkeypatch):
    cache = EmbeddingCache(store, **SPEC)
    (h1, v1), (h2, v2) = rows(4, seed=1), rows(4, seed=2, start=4)
    bad = cache.write_shard(h1, v1)
    cache.write_shard(h2, v2)
    fetched = []
    get = store.get_bytes
    monkeypatch.setattr(store, "get_bytes", lambda key: fetched.append(key) or get(key))
    assert EmbeddingCache(store, **SPEC).verify(h1 + h2) == []
    assert not any(k.endswith("vectors.npy") for k in fetched)  # listed ETags = recorded MD5s: nothing downloaded
    store.put_bytes(f"{cache.prefix}/shards/{bad}/vectors.npy", b"not a numpy file")
    reader = EmbeddingCache(store, **SPEC)
    assert reader.missing(h1 + h2) == []  # the index (hashes) is sound: only the vectors are not
    found = reader.verify(h1[:1] + h2)
    assert [(c.id, sorted(c.hashes)) for c in found] == [(bad, sorted(h1))]
    assert reader.missing(h1 + h2) == h1  # now encoded again rather than failing a later read
    assert EmbeddingCache(store, **SPEC).verify(h1 + h2) == []  # the marker spares later readers the download


def test_read_downloads_only_the_shards_it_needs(store, monkeypatch):
    cache = EmbeddingCache(store, **SPEC)
    shards = [rows(4, seed=i, start=4 * i) for i in range(5)]
    for hashes, vectors in shards:
        cache.write_shard(hashes, vectors)
    fetched = []
    get = store.get_bytes
    monkeypatch.setattr(store, "get_bytes", lambda key: fetched.append(key) or get(key))
    reader = EmbeddingCache(store, **SPEC)
    want = [shards[1][0][2], shards[3][0][0], shards[1][0][0]]
    np.testing.assert_array_equal(reader.read(want), np.stack([shards[1][1][2], shards[3][1][0], shards[1][1][0]]))
    assert sum(k.endswith("vectors.npy") for k in fetched) == 2


def test_bad_inputs_are_refused(store):
    with pytest.raises(ValueError, match="resolve_dtype"):
        EmbeddingCache(store, **{**SPEC, "dtype": "auto"})
    cache = EmbeddingCache(store, **SPEC)
    with pytest.raises(ValueError, match="one hash per row"):
        cache.write_shard(["a" * 64], np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="64 lowercase hex"):
        cache.write_shard(["not-a-hash"], np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        cache.write_shard(["a" * 64], np.full((1, 3), np.nan, np.float32))
