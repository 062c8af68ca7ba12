"""A lease lock in the artifact store: mutual exclusion for alias moves, across processes and orchestrators.

The lock object is created with ``If-None-Match: *``, which S3 (and SeaweedFS, MinIO, R2) answer with 412 when
it already exists, so exactly one writer holds it. A lease that outlives ``ttl_seconds`` (its holder crashed)
is broken by the next waiter. Prefect's concurrency limits also serialise runs of one deployment, but two
ad-hoc CLI runs against an ephemeral Prefect share nothing except the store, so the store is where this lives.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from adaptflow.store import ArtifactStore, ConflictError, NotFoundError

log = logging.getLogger("adaptflow")


class LockTimeout(RuntimeError):
    """The lock stayed held by someone else for longer than we were willing to wait."""


@contextmanager
def store_lock(store: ArtifactStore, name: str, *, ttl_seconds: float = 600, wait_seconds: float = 900,
               poll_seconds: float = 1.0) -> Iterator[dict]:
    """Hold ``locks/<name>`` for the duration of the block.

    The lease object is never deleted (the worker needs no s3:DeleteObject): it is created with
    ``If-None-Match: *``, released by overwriting it with ``released`` set, and a released or expired lease is
    taken over with ``If-Match: <its ETag>``, so of two waiters that both see it free exactly one gets it.

    Args:
        ttl_seconds: a lease older than this is considered abandoned and taken over.
        wait_seconds: how long to wait for a live holder before raising LockTimeout.
    """
    key = f"locks/{name}"
    lease = {"owner": f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", "acquired": time.time(),
             "ttl": ttl_seconds}
    deadline = time.monotonic() + wait_seconds
    while True:
        lease["acquired"] = time.time()
        try:
            etag = store.put_bytes(key, json.dumps(lease).encode(), if_none_match=True)
            break
        except ConflictError:
            pass
        holder, current = _read_lease(store, key)
        if holder is not None and (holder.get("released") or
                                   time.time() - holder.get("acquired", 0) > holder.get("ttl", ttl_seconds)):
            if not holder.get("released"):
                log.warning("taking over abandoned lock %s held by %s", key, holder.get("owner"))
            try:
                etag = store.put_bytes(key, json.dumps(lease).encode(), if_match=current)
                break
            except ConflictError:
                continue  # another waiter took it first
        if time.monotonic() > deadline:
            raise LockTimeout(f"lock s3://{store.bucket}/{key} held by {holder and holder.get('owner')} "
                              f"for more than {wait_seconds:.0f}s; if that process is gone, the lease expires "
                              f"{holder and holder.get('ttl')} s after it was taken")
        time.sleep(poll_seconds)
    try:
        yield lease
    finally:
        try:  # only our own lease, unchanged since we took it, is released
            store.put_bytes(key, json.dumps({**lease, "released": time.time()}).encode(), if_match=etag)
        except ConflictError:
            log.warning("lock %s was taken over while held (held longer than its %.0f s ttl?)", key, ttl_seconds)


def _read_lease(store: ArtifactStore, key: str) -> tuple[dict | None, str | None]:
    try:
        body, etag = store.get_bytes_and_etag(key)
    except NotFoundError:
        return None, None
    return json.loads(body), etag
