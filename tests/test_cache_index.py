"""The compacted cache index against the session's real SeaweedFS: racing writers, a crashed writer, request
counts that do not grow with the shards, corrupt markers, and the audit beside index objects."""

import io
import threading

import numpy as np

from adaptflow.cache import EmbeddingCache
from adaptflow.cache_audit import audit, repair
from adaptflow.cache_index import Generation, IndexStore
from tests.test_cache import SPEC, rows as cache_rows, store  # noqa: F401 (store is a fixture)


def rows(n, dim=4, seed=0, start=0):
    return cache_rows(n, dim=dim, seed=seed, start=start)


def indexed_shards(store, cache) -> set[str]:
    gen, _ = IndexStore(store, cache.prefix).read()
    return set() if gen is None else {s.id for s in gen.shards}


def requests(store, fn):
    """(fn's result, the S3 requests it made)."""
    before = store.requests.snapshot()
    result = fn()
    return result, store.requests.since(before)["requests"]


def test_the_store_counts_requests_and_bytes_read(store):
    store.put_bytes("a/b", b"x" * 1000)
    before = store.requests.snapshot()
    assert store.get_bytes("a/b") == b"x" * 1000
    assert store.requests.since(before) == {"requests": 1, "bytes_read": 1000}
    assert store.with_bucket("other").requests is store.requests  # one client, one counter


def test_two_writers_racing_on_the_pointer_lose_nothing(store):
    seed = EmbeddingCache(store, **SPEC)
    base = seed.write_shard(*rows(3, seed=99, start=900))
    assert seed.compact()  # a first generation: the race below is on If-Match, not If-None-Match
    a, b = EmbeddingCache(store, **SPEC), EmbeddingCache(store, **SPEC)
    assert len(a) == len(b) == 3  # both loaded the same generation
    mine = [a.write_shard(*rows(3, seed=i, start=3 * i)) for i in range(2)]
    theirs = [b.write_shard(*rows(3, seed=10 + i, start=100 + 3 * i)) for i in range(2)]
    assert a.compact() is True
    assert b.compact() is True  # its pointer ETag is stale: it reloads (A's generation + the LIST), then writes
    assert indexed_shards(store, a) == {base, *mine, *theirs}
    hashes = [h for i in range(2) for h in rows(3, start=3 * i)[0]] + \
        [h for i in range(2) for h in rows(3, start=100 + 3 * i)[0]]
    fresh = EmbeddingCache(store, **SPEC)
    assert fresh.missing(hashes) == []
    # everything is in the index: a reader GETs the pointer and one generation, and LISTs shards and markers
    assert requests(store, lambda: len(EmbeddingCache(store, **SPEC)))[1] == 4


def test_concurrent_writers_each_compacting_keep_every_shard(store):
    written, start = [], threading.Barrier(4)
    first = EmbeddingCache(store, **SPEC)
    written.append(first.write_shard(*rows(2, seed=99, start=99_000)))
    assert first.compact()

    def writer(w):
        cache = EmbeddingCache(store, **SPEC)
        len(cache)
        ids = [cache.write_shard(*rows(2, seed=w, start=1000 * w + 2 * i)) for i in range(2)]
        start.wait()
        cache.compact()
        written.extend(ids)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(written) == 9 and indexed_shards(store, EmbeddingCache(store, **SPEC)) == set(written)


def test_a_writer_crashing_before_the_pointer_moves_leaves_the_previous_generation(store):
    cache = EmbeddingCache(store, **SPEC)
    (h1, v1), (h2, v2) = rows(4, seed=1), rows(4, seed=2, start=4)
    first = cache.write_shard(h1, v1)
    assert cache.compact()
    index = IndexStore(store, cache.prefix)
    gen, _ = index.read()
    # another writer publishes a shard, writes its generation object, and dies before moving CURRENT
    second = EmbeddingCache(store, **SPEC).write_shard(h2, v2)
    index.write_generation(Generation(gen.number + 1, gen.shards, gen.rows))
    assert index.read()[0].number == gen.number  # the previous generation is still the current one
    reader = EmbeddingCache(store, **SPEC)
    # pointer + generation + 2 LISTs + the unindexed shard's manifest and hashes.txt
    assert requests(store, lambda: reader.missing(h1 + h2))[1] == 6
    np.testing.assert_array_equal(reader.read(h1 + h2), np.concatenate([v1, v2]))
    assert reader.compact() and indexed_shards(store, cache) == {first, second}
    assert audit(store, min_age_s=0).problems == []  # the dead writer's generation is no orphan shard


def test_an_unusable_generation_is_rebuilt_from_the_shards(store):
    cache = EmbeddingCache(store, **SPEC)
    hashes, vectors = rows(5)
    cache.write_shard(hashes, vectors)
    cache.compact()
    index = IndexStore(store, cache.prefix)
    store.put_bytes(index.current_object(), b"not an npz")  # bit rot, a bad copy
    reader = EmbeddingCache(store, **SPEC)
    np.testing.assert_array_equal(reader.read(hashes), vectors)
    assert reader.compact() and index.read()[0] is not None


def test_requests_on_an_unchanged_cache_do_not_grow_with_the_shards(store):
    counts = {}
    for n in (10, 100):
        spec = {**SPEC, "max_length": n}  # one cache per size, in the same bucket
        cache = EmbeddingCache(store, **spec)
        hashes = []
        for i in range(n):
            h, v = rows(2, seed=i, start=10_000 * n + 2 * i)
            cache.write_shard(h, v)
            hashes += h
        assert cache.compact()

        def run():  # what the embed stage does on a cache holding every row
            fresh = EmbeddingCache(store, **spec)
            assert fresh.verify(hashes) == [] and fresh.missing(hashes) == []
            assert fresh.compact() is False  # nothing changed: nothing written

        counts[n] = requests(store, run)[1]
    assert counts[10] == counts[100] <= 4, counts  # the old reader: a LIST + 2 GETs a shard, 21 vs 201


def test_corrupt_markers_still_exclude_a_shard_after_compaction(store):
    cache = EmbeddingCache(store, **SPEC)
    (h1, v1), (h2, v2) = rows(4, seed=1), rows(4, seed=2, start=4)
    bad = cache.write_shard(h1, v1)
    cache.write_shard(h2, v2)
    assert cache.compact() and bad in indexed_shards(store, cache)
    buf = io.BytesIO()
    np.save(buf, v1 + 1e-3)
    store.put_bytes(f"{cache.prefix}/shards/{bad}/vectors.npy", buf.getvalue())
    marker = EmbeddingCache(store, **SPEC)
    assert [c.id for c in marker.verify(h1 + h2)] == [bad]  # marked, not compacted: the index still names it
    assert bad in indexed_shards(store, cache)
    for _ in range(2):  # once with the shard in the current generation, once after a compaction dropped it
        fresh = EmbeddingCache(store, **SPEC)
        assert fresh.missing(h1 + h2) == h1
        assert [(c.id, sorted(c.hashes)) for c in fresh.corrupt_shards] == [(bad, sorted(h1))]
        np.testing.assert_array_equal(fresh.read(h2), v2)
        fresh.compact()
    assert bad not in indexed_shards(store, cache)
    again = EmbeddingCache(store, **SPEC)
    replacement = again.write_shard(h1, v1)  # the rows encoded again: a salted shard
    assert again.compact() and replacement in indexed_shards(store, cache)
    np.testing.assert_array_equal(EmbeddingCache(store, **SPEC).read(h1 + h2), np.concatenate([v1, v2]))


def test_cache_verify_recognises_index_objects(store):
    cache = EmbeddingCache(store, **SPEC)
    cache.write_shard(*rows(3))
    cache.compact()
    cache.write_shard(*rows(3, seed=1, start=3))
    cache.compact()
    found = audit(store, min_age_s=0)
    assert found.problems == [] and found.shards == 2
    assert found.index_objects == 3  # CURRENT and two generations
    # the first generation is superseded: space, not a problem; repair deletes it and the index still serves
    assert len(found.superseded) == 1 and found.superseded[0].keys[0].endswith(".npz")
    assert repair(store, found.superseded) == 1
    after = audit(store, min_age_s=0)
    assert after.superseded == [] and after.index_objects == 2 and after.problems == []
    assert len(EmbeddingCache(store, **SPEC).read(rows(3)[0] + rows(3, seed=1, start=3)[0])) == 6


def test_run_stage_reports_the_stage_s3_traffic(services_env, fresh_bucket, monkeypatch):
    from tasks.policy import run_stage

    monkeypatch.setenv("ADAPTFLOW_BUCKET", fresh_bucket)

    def stage(ctx):
        ctx.store.put_bytes("k", b"12345")
        return {"got": ctx.store.get_bytes("k").decode()}

    result = run_stage(stage)
    assert result["got"] == "12345" and result["s3"] == {"requests": 2, "bytes_read": 5}


def test_lookup_finds_rows_that_share_the_searched_prefix():
    from adaptflow.cache_index import RowIndex, to_digests, to_hex

    rng = np.random.default_rng(0)
    raw = bytearray(rng.bytes(32 * 200))
    for i in range(0, 100, 2):  # pairs of rows whose first 8 bytes agree (the integer keys the search uses)
        raw[32 * (i + 1) : 32 * (i + 1) + 8] = raw[32 * i : 32 * i + 8]
    raw[-32:] = b"\x00" * 32  # trailing NUL bytes survive the round trip
    digests = np.frombuffer(bytes(raw), dtype="S32")
    index = RowIndex.of_shards([0, 1], [digests[:120], digests[120:]]).merge(RowIndex())
    assert to_digests(to_hex(digests)).tobytes() == digests.tobytes()
    query = np.concatenate([digests[::-1], np.frombuffer(rng.bytes(32 * 5), dtype="S32")])
    pos, found = index.lookup(query)
    assert found.tolist() == [True] * 200 + [False] * 5
    assert (index.hashes[pos[:200]] == query[:200]).all()
    assert (index.shard_of[pos[:200]] == np.r_[np.ones(80), np.zeros(120)]).all()
    assert (index.row_of[pos[:200]] == np.r_[np.arange(79, -1, -1), np.arange(119, -1, -1)]).all()
