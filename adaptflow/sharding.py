"""Fan-out of the embed step: split the rows to encode into parts, each encoded by its own (gpu-pool) flow run.

The plan is a function of the to-do rows alone: the text sha256s the cache lacks, sorted, cut into
``ceil(n / shard_rows)`` parts of near-equal size (part i = rows [a, b) of that sorted list; sorting by hash
also spreads long and short texts evenly over the parts). A part is identified by a content key over the cache it
fills and its rows, and its token ids live in ``parts/<key>/tokens.parquet`` (published manifest-last), so the
part is self-contained: any worker can encode it from its URI, and running it again is a lookup (a part is done
when every one of its hashes is in the cache; a half-done part encodes only what it still lacks).

This is the library (no Prefect): ``tasks/fanout.py`` submits the parts to the ``embed-shard`` deployment and
waits, ``flows/embed_shard.py`` runs one part.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from adaptflow.config import RunConfig

log = logging.getLogger("adaptflow")

# bump when the plan or a part's stored layout changes: old part keys then stop matching
PLAN_VERSION = 1


@dataclass(frozen=True)
class PlannedPart:
    """One part of a plan: its content key and the positions (into the to-do list given) of its rows."""

    key: str
    rows: np.ndarray


def part_key(cache_key: str, hashes: Sequence[str]) -> str:
    """The content key of a part: the cache it fills and its rows (in the part's order)."""
    digest = hashlib.sha256("\n".join(hashes).encode("ascii")).hexdigest()
    payload = json.dumps({"plan": PLAN_VERSION, "cache": cache_key, "rows": digest}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def plan_parts(todo_hashes: Sequence[str], shard_rows: int | None, cache_key: str) -> list[PlannedPart]:
    """Split the to-do rows into parts of at most ``shard_rows`` rows; [] when they fit in one (or shard_rows is
    0/None: no fan-out).

    Deterministic: the same set of hashes, in any order, gives the same parts with the same keys. Every row is in
    exactly one part.
    """
    n = len(todo_hashes)
    if not shard_rows or n <= shard_rows:
        return []
    array = np.asarray(todo_hashes, dtype="S64")
    order = np.argsort(array, kind="stable")
    count = math.ceil(n / shard_rows)
    bounds = np.linspace(0, n, count + 1).round().astype(np.int64)
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = order[a:b]
        parts.append(PlannedPart(part_key(cache_key, [h.decode() for h in array[rows]]), rows))
    return parts


def part_prefix(key: str) -> str:
    return f"parts/{key}"


def plan_stage(ctx, config: RunConfig, tokens: dict, encoder: dict) -> dict:
    """Plan the fan-out of the embed step and publish each part's token ids (skipped when already published).

    Returns:
        ``parts``: one small dict per part (``key``, ``index``, ``rows``, ``tokens`` URI), [] when the rows to
        encode do not exceed ``orchestration.shard_rows``; ``dtype`` (every part encodes with it, so all vectors
        land in one cache), ``cache``, ``todo`` and ``rows``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from adaptflow.cache_index import to_hex
    from adaptflow.row_keys import digests_of_hex
    from adaptflow.stages import embed_cache
    from adaptflow.store import ConflictError, parse_s3_uri

    cache = embed_cache(ctx, config, encoder)
    table = pq.read_table(io.BytesIO(ctx.store.get_verified_bytes(parse_s3_uri(tokens["tokens"])[1])))
    hashes = digests_of_hex(table.column("text_sha256"))
    cache.verify(hashes)  # a corrupt shard's rows count as missing (as in embed_stage)
    todo_rows = np.flatnonzero(~cache.found(hashes))  # positions in the tokens table (one row per distinct text)
    planned = plan_parts(to_hex(hashes[todo_rows]), config.orchestration.shard_rows, cache.key)
    parts = []
    for index, part in enumerate(planned):
        rows = todo_rows[part.rows]
        prefix = part_prefix(part.key)
        if ctx.store.read_manifest(prefix) is None:
            buffer = io.BytesIO()
            pq.write_table(table.take(pa.array(rows)), buffer)
            try:
                ctx.store.publish(prefix, {"tokens.parquet": buffer.getvalue()},
                                  {"rows": len(rows), "cache": cache.spec, "plan": PLAN_VERSION})
            except ConflictError:
                pass  # an earlier attempt (or a concurrent run) published the same part
        parts.append({"key": part.key, "index": index, "rows": int(len(rows)),
                      "tokens": ctx.store.uri(f"{prefix}/tokens.parquet")})
    if parts:
        log.info("embed fan-out: %d rows to encode > orchestration.shard_rows=%d: %d parts of ~%d rows",
                 len(todo_rows), config.orchestration.shard_rows, len(parts), parts[0]["rows"])
    return {"parts": parts, "dtype": cache.spec["dtype"], "cache": cache.uri, "todo": int(len(todo_rows)),
            "rows": int(len(hashes))}


def part_stage(ctx, config: RunConfig, part: dict, encoder: dict, dtype: str) -> dict:
    """Encode one part into the cache: only its rows the cache still lacks (a finished part is a lookup).

    ``dtype`` is the plan's, so the vectors land in the cache the parent checks, whatever this machine would pick.
    """
    import pyarrow.parquet as pq

    from adaptflow.cache import EmbeddingCache
    from adaptflow.embed import TokenIds
    from adaptflow.row_keys import digests_of_hex
    from adaptflow.stages import embed_device, encode_into_cache
    from adaptflow.store import parse_s3_uri

    table = pq.read_table(io.BytesIO(ctx.store.get_verified_bytes(parse_s3_uri(part["tokens"])[1])))
    hashes = digests_of_hex(table.column("text_sha256"))
    cache = EmbeddingCache(ctx.store, encoder_digest=encoder["digest"], max_length=config.encoder.max_length,
                           pooling=config.encoder.pooling, dtype=dtype)
    cache.verify(hashes)
    rows = np.flatnonzero(~cache.found(hashes))
    device = embed_device(config)
    tokens_per_s = None
    if len(rows):
        ids = TokenIds.from_arrow(table.column("ids")).take(rows)
        tokens_per_s = encode_into_cache(ctx, cache, [(hashes[rows], ids)], encoder_ref=encoder["ref"],
                                         device=device, tokens_per_batch=config.encoder.tokens_per_batch)
    log.info("part %s: %d rows encoded (%s tokens/s, %s on %s), %d already cached", part["key"], len(rows),
             tokens_per_s, dtype, device, len(hashes) - len(rows))
    return {"key": part["key"], "encoded": len(rows), "cached": len(hashes) - len(rows), "device": device,
            "dtype": dtype, "tokens_per_s": tokens_per_s}


def missing_rows(ctx, config: RunConfig, plan: dict, encoder: dict, parts: Sequence[dict] | None = None) -> dict:
    """For each part of ``plan`` (or of ``parts``): how many of its rows the cache still lacks (fresh listing)."""
    import pyarrow.parquet as pq

    from adaptflow.cache import EmbeddingCache
    from adaptflow.row_keys import digests_of_hex
    from adaptflow.store import parse_s3_uri

    cache = EmbeddingCache(ctx.store, encoder_digest=encoder["digest"], max_length=config.encoder.max_length,
                           pooling=config.encoder.pooling, dtype=plan["dtype"])
    result = {}
    for part in plan["parts"] if parts is None else parts:
        table = pq.read_table(io.BytesIO(ctx.store.get_verified_bytes(parse_s3_uri(part["tokens"])[1])),
                              columns=["text_sha256"])
        result[part["key"]] = int((~cache.found(digests_of_hex(table.column("text_sha256")))).sum())
    return result
