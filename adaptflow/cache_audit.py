"""Audit and repair of the embedding caches in a bucket (``adaptflow cache verify [--repair]``).

Every shard of every cache under ``embeddings/`` is checked in full; corrupt or reader-marked shards, objects of
crashed writes (no manifest, older than an age limit) and markers whose shard is gone are reported, and
``repair`` deletes them, manifest first. Deleting needs ``s3:DeleteObject``, which workers do not have: this is
the operator's command. Readers never need it (see adaptflow.cache: corrupt shards are marked and skipped).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

from adaptflow.cache import MARKERS, THREADS, check_shard
from adaptflow.cache_index import CURRENT, INDEX
from adaptflow.store import MANIFEST, ArtifactStore, NotFoundError

log = logging.getLogger(__name__)

@dataclass
class CacheProblem:
    """One thing ``adaptflow cache verify`` reports, with the objects ``--repair`` deletes (a manifest first).

    ``kind``: ``corrupt`` (a published shard failing its check, or marked by a reader), ``orphan`` (objects
    of a shard with no manifest, left by a crashed write, older than the age limit) or ``marker`` (a corrupt
    marker whose shard is gone).
    """

    kind: str
    prefix: str
    reason: str
    keys: list[str] = field(default_factory=list)


@dataclass
class CacheAudit:
    """What :func:`audit` found under ``embeddings/``."""

    caches: int = 0
    shards: int = 0
    problems: list[CacheProblem] = field(default_factory=list)
    recent_objects: int = 0  # unpublished objects younger than the age limit: maybe a write in flight, left alone
    index_objects: int = 0  # the compacted indexes' pointers and generations (adaptflow.cache_index): not problems
    # index generations no pointer names any more, older than the age limit: space, not a problem; --repair deletes
    superseded: list[CacheProblem] = field(default_factory=list)


def current_generation(store: ArtifactStore, index_prefix: str) -> str | None:
    """The generation object ``<index_prefix>/CURRENT`` names, or None."""
    try:
        return json.loads(store.get_bytes(f"{index_prefix}/{CURRENT}")).get("object")
    except (NotFoundError, ValueError):
        return None


def audit(store: ArtifactStore, *, min_age_s: float = 3600.0, root: str = "embeddings/") -> CacheAudit:
    """Check every shard of every embedding cache in the bucket (each fully downloaded, 8 at a time).

    Args:
        min_age_s: objects without a manifest count as orphaned only when the newest one of their shard is
            at least this old (a writer publishes its manifest seconds after its objects).
    """
    now = datetime.now(timezone.utc)
    pointers: dict[str, str | None] = {}  # index prefix -> the generation its CURRENT names
    groups: dict[str, list[dict]] = {}  # "embeddings/<key>/<shards|corrupt>/<id>" -> its objects
    for obj in store.list_objects(root):
        parts = obj["Key"].split("/")
        groups.setdefault("/".join(parts[:4]) if len(parts) > 4 else obj["Key"], []).append(obj)
    result = CacheAudit(caches=len({k.split("/")[1] for k in groups if k.count("/") >= 1}))

    def published(prefix: str) -> bool:
        return any(o["Key"] == f"{prefix}/{MANIFEST}" for o in groups.get(prefix, []))

    def keys(prefix: str) -> list[str]:  # the manifest first: readers stop seeing the prefix at once
        names = sorted(o["Key"] for o in groups.get(prefix, []))
        return sorted(names, key=lambda k: not k.endswith(f"/{MANIFEST}"))

    shards = [p for p in groups if p.count("/") == 3 and p.split("/")[2] == "shards" and published(p)]
    result.shards = len(shards)
    with ThreadPoolExecutor(THREADS) as pool:
        reasons = dict(zip(shards, pool.map(lambda p: check_shard(store, p), shards)))
    for prefix, objects in sorted(groups.items()):
        parts = prefix.split("/")
        kind = parts[2] if len(parts) == 4 else None
        if kind == INDEX:  # embeddings/<key>/index/<CURRENT | generation>: derived from the shards, rebuilt at will
            result.index_objects += len(objects)
            index_prefix = "/".join(parts[:3])
            if index_prefix not in pointers:
                pointers[index_prefix] = current_generation(store, index_prefix)
            if parts[3] not in (CURRENT, pointers[index_prefix]):
                age = min((now - o["LastModified"]).total_seconds() for o in objects)
                if age >= min_age_s:  # a younger one may be a compaction whose pointer move is in flight
                    result.superseded.append(CacheProblem("superseded", prefix, "an index generation no pointer "
                                                          f"names, {age:.0f} s old", [prefix]))
            continue
        marker = "/".join([*parts[:2], MARKERS, parts[3]]) if kind == "shards" else None
        if kind == "shards" and published(prefix):
            if marker in groups:
                meta = (store.read_manifest(marker) or {}).get("meta", {})
                reason = f"marked corrupt by a reader: {meta.get('reason', '?')}"
                result.problems.append(CacheProblem("corrupt", prefix, reason, keys(prefix) + keys(marker)))
            elif reasons.get(prefix):
                result.problems.append(CacheProblem("corrupt", prefix, reasons[prefix], keys(prefix)))
        elif kind == MARKERS:
            if not published("/".join([*parts[:2], "shards", parts[3]])):
                result.problems.append(CacheProblem("marker", prefix, "a corrupt marker whose shard is gone",
                                                    keys(prefix)))
        else:  # objects of a shard that was never published (or of no shard at all)
            age = min((now - o["LastModified"]).total_seconds() for o in objects)
            if age < min_age_s:
                result.recent_objects += len(objects)
                continue
            reason = f"{len(objects)} object(s) without a {MANIFEST}, newest {age:.0f} s old (an interrupted write)"
            result.problems.append(CacheProblem("orphan", prefix, reason, keys(prefix)))
    return result


def repair(store: ArtifactStore, problems: Iterable[CacheProblem]) -> int:
    """Delete what ``problems`` name, each manifest first; needs ``s3:DeleteObject``. Returns objects deleted.

    Deleting rather than moving to a quarantine prefix: a shard is derived data (its rows are encoded again
    from the tokens), its marker and this command's output record why it went, and a copy would need a prefix
    outside the worker policy.
    """
    deleted = 0
    for problem in problems:
        for key in dict.fromkeys(problem.keys):
            store.delete(key)
            deleted += 1
        log.info("removed %s (%s): %s", store.uri(problem.prefix), problem.kind, problem.reason)
    return deleted
