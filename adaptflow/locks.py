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

    Args:
        ttl_seconds: a lease older than this is considered abandoned and broken.
        wait_seconds: how long to wait for a live holder before raising LockTimeout.
    """
    key = f"locks/{name}"
    lease = {"owner": f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", "acquired": time.time(),
             "ttl": ttl_seconds}
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            store.put_bytes(key, json.dumps(lease).encode(), if_none_match=True)
            break
        except ConflictError:
            holder = _read_lease(store, key)
            if holder and time.time() - holder.get("acquired", 0) > holder.get("ttl", ttl_seconds):
                log.warning("breaking abandoned lock %s held by %s", key, holder.get("owner"))
                store.delete(key)
                continue
            if time.monotonic() > deadline:
                raise LockTimeout(f"lock s3://{store.bucket}/{key} held by {holder and holder.get('owner')} "
                                  f"for more than {wait_seconds:.0f}s; if that process is gone, delete the object")
            time.sleep(poll_seconds)
    try:
        yield lease
    finally:
        holder = _read_lease(store, key)
        if holder and holder.get("owner") == lease["owner"]:  # never release a lease someone else broke and took
            store.delete(key)


def _read_lease(store: ArtifactStore, key: str) -> dict | None:
    try:
        return json.loads(store.get_bytes(key))
    except NotFoundError:
        return None
