"""S3 requests and bytes the embedding cache costs a run, against a private SeaweedFS (issue 13, section 2).

``python -m benchmarks.cache_requests [--rows N ...] [--shard-rows 4096] [--dim 8]``

For each cache size: synthetic row hashes and small vectors are written as ``--shard-rows``-row shards (the
embed stage's chunk size) without an index, as a cache written before the index existed. Then three runs, each
a fresh :class:`~adaptflow.cache.EmbeddingCache` doing what the embed stage does with it (verify, missing,
write the new rows' shards, compact), counted on the store's request counter:

* ``cold index build``: the first run with the index code on that cache (lists and reads every shard's hashes,
  then writes the first generation); what every run cost before the index;
* ``+1 % run``: 1 % new rows; the requests of ``write_shard`` (the shards it writes) are counted apart;
* ``no-change run``: every row cached.

The goal (issue 13): at 1M cached rows a +1 % run makes <= 50 requests for the cache beyond the shards it writes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from benchmarks.common import log

SPEC = dict(encoder_digest="sha256:" + "be" * 32, max_length=128, pooling="mean", dtype="fp32")
GOAL = 50


def synthetic_rows(n: int, start: int, dim: int) -> tuple[list[str], np.ndarray]:
    """``n`` distinct row hashes (sha256-shaped, from a seeded generator) and vectors."""
    rng = np.random.default_rng(start)
    text = rng.bytes(32 * n).hex()
    return [text[i : i + 64] for i in range(0, len(text), 64)], rng.standard_normal((n, dim)).astype(np.float32)


def embed_like_run(store, hashes: list[str], new: tuple[list[str], np.ndarray] | None, shard_rows: int) -> dict:
    """What the embed stage does with the cache, counted: verify, missing, write the missing rows, compact."""
    from adaptflow.cache import EmbeddingCache

    started, before = time.perf_counter(), store.requests.snapshot()
    cache = EmbeddingCache(store, **SPEC)
    wanted = hashes + (new[0] if new else [])
    cache.verify(wanted)
    todo = cache.missing(wanted)
    writes = {"requests": 0, "bytes_read": 0}
    if new:
        lookup = dict(zip(new[0], range(len(new[0]))))
        for i in range(0, len(todo), shard_rows):
            chunk = todo[i : i + shard_rows]
            mark = store.requests.snapshot()
            cache.write_shard(chunk, new[1][[lookup[h] for h in chunk]])
            for k, v in store.requests.since(mark).items():
                writes[k] += v
    cache.compact()
    total = store.requests.since(before)
    return {"requests": total["requests"], "bytes_read": total["bytes_read"], "shard_writes": writes["requests"],
            "cache_requests": total["requests"] - writes["requests"], "encoded": len(todo),
            "seconds": round(time.perf_counter() - started, 2)}


def measure(store, rows: int, *, shard_rows: int, dim: int) -> dict:
    from adaptflow.cache import EmbeddingCache

    prefix_cache = EmbeddingCache(store, **SPEC)
    hashes, vectors = synthetic_rows(rows, 0, dim)
    started, before = time.perf_counter(), store.requests.snapshot()
    for i in range(0, rows, shard_rows):
        prefix_cache.write_shard(hashes[i : i + shard_rows], vectors[i : i + shard_rows])
    shards = -(-rows // shard_rows)
    log(f"{rows} rows: {shards} shards written ({store.requests.since(before)['requests']} requests, "
        f"{time.perf_counter() - started:.0f} s)")
    del vectors
    out = {"rows": rows, "shards": shards, "shard_rows": shard_rows, "dim": dim}
    out["cold_index_build"] = embed_like_run(store, hashes, None, shard_rows)
    log(f"{rows} rows: cold index build {out['cold_index_build']}")
    out["plus_1pct"] = embed_like_run(store, hashes, synthetic_rows(max(1, rows // 100), 1, dim), shard_rows)
    log(f"{rows} rows: +1 % run {out['plus_1pct']}")
    hashes += synthetic_rows(max(1, rows // 100), 1, dim)[0]
    out["no_change"] = embed_like_run(store, hashes, None, shard_rows)
    log(f"{rows} rows: no-change run {out['no_change']}")
    out["goal_met"] = out["plus_1pct"]["cache_requests"] <= GOAL
    return out


def table(results: list[dict]) -> str:
    lines = ["| cached rows | shards | run | requests (cache) | shard writes | bytes read | s |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        for name, key in (("cold index build", "cold_index_build"), ("+1 %", "plus_1pct"),
                          ("no change", "no_change")):
            m = r[key]
            lines.append(f"| {r['rows']:,} | {r['shards']} | {name} | {m['cache_requests']} | {m['shard_writes']} | "
                         f"{m['bytes_read'] / 2**20:.1f} MiB | {m['seconds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    from adaptflow import stack
    from adaptflow.store import ArtifactStore

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--shard-rows", type=int, default=4096, help="rows per shard (embed.DEFAULT_CHUNK_ROWS)")
    parser.add_argument("--dim", type=int, default=8, help="vector width (request counts do not depend on it)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(tmp) / "stack"
        taken: set[int] = set()
        try:
            stack.up(state_dir, services=("s3",), ports={"s3": stack.free_port(taken, twin=True)},
                     bucket="adaptflow-bench", timeout=120, log=lambda m: log(f"stack: {m}"))
            settings = stack.stack_settings(state_dir, cache_dir=Path(tmp) / "cache")
            for rows in args.rows:
                store = ArtifactStore.from_settings(settings, bucket=f"cache-requests-{uuid.uuid4().hex[:8]}")
                store.ensure_bucket()
                results.append(measure(store, rows, shard_rows=args.shard_rows, dim=args.dim))
        finally:
            stack.down(state_dir, log=lambda m: log(f"stack: {m}"))
    print(table(results))
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
