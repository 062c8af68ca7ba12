"""A lease lock in the artifact store: mutual exclusion for alias moves, across processes and orchestrators.

The lease object is created with ``If-None-Match: *``, which S3 (and SeaweedFS, MinIO, R2) answer with 412 when
it already exists, so exactly one writer holds it. While held, a heartbeat thread rewrites it every ``ttl/3``
with ``If-Match: <our last ETag>``; each write changes the body (a ``beat`` counter), hence the ETag, so the
ETag is the lease's *generation*. Before the action the lock guards, the holder calls :meth:`Lease.fence`: one
more conditional write, which fails (LockLost) when anyone else has written the lease since.

A waiter never compares clocks across machines: it takes a lease over only when it saw the same generation
unchanged for longer than the lease's ``ttl`` on its *own* monotonic clock (or when the lease is released).
The wall-clock fields in the lease (``acquired``, ``renewed``) are for people reading it, never for decisions.
Prefect's concurrency limits also serialise runs of one deployment, but two ad-hoc CLI runs against an
ephemeral Prefect share nothing except the store, so the store is where this lives.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from adaptflow.store import ArtifactStore, ConflictError, NotFoundError, StoreError

log = logging.getLogger("adaptflow")


class LockTimeout(RuntimeError):
    """The lock stayed held by someone else for longer than we were willing to wait."""


class LockLost(RuntimeError):
    """Our lease was taken over (it went unrenewed past its ttl) before the action it guards: do not act.

    Left retryable on purpose (no 4xx status, see tasks/policy.py): a retry takes the lock again and decides
    afresh against whatever the other holder did meanwhile.
    """


class Lease:
    """A held lease on ``locks/<name>``: renewed in the background; :meth:`fence` right before the guarded action.

    Only :func:`store_lock` makes these.
    """

    def __init__(self, store: ArtifactStore, key: str, body: dict, etag: str):
        self.store, self.key, self.owner, self.ttl = store, key, body["owner"], float(body["ttl"])
        self._body, self._etag = body, etag
        self._lost: str | None = None  # why the lease is no longer ours, once known
        self._mutex = threading.Lock()  # the heartbeat and fence() both write: one at a time, each from our last ETag
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-heartbeat:{key}", daemon=True)

    def fence(self) -> None:
        """Prove the lease is still ours, right before the guarded action: a write with ``If-Match`` our last ETag.

        It also renews the lease, so another run can take it over only after a full ttl without renewal from
        now: the guarded action (one alias move) must finish well within that.

        Raises:
            LockLost: someone else took the lease over (we went unrenewed past the ttl, e.g. the process was
                paused); the guarded action must not happen.
            StoreError: the store did not answer; nothing is known, so nothing should be done either.
        """
        self._write(self._body)

    # ---- internals ------------------------------------------------------------------------------------

    def _write(self, body: dict) -> None:
        with self._mutex:
            if self._lost:
                raise LockLost(self._lost)
            beat = int(self._body.get("beat", 0)) + 1
            new = {**body, "beat": beat, "renewed": time.time()}
            try:
                self._etag = self.store.put_bytes(self.key, json.dumps(new).encode(), if_match=self._etag)
            except ConflictError:
                # a retried PUT whose first try landed answers 412 too: then the lease holds exactly our bytes
                holder, etag = _read_lease(self.store, self.key)
                if not (holder and holder.get("owner") == self.owner and holder.get("beat") == beat):
                    self._lost = (f"lock {self.store.uri(self.key)} was taken over by "
                                  f"{holder.get('owner') if holder else 'nobody (it is gone)'} while {self.owner} "
                                  f"held it: it went unrenewed for more than its {self.ttl:g} s ttl (process paused "
                                  "or store unreachable?)")
                    raise LockLost(self._lost) from None
                self._etag = etag
            self._body = new

    def _heartbeat(self) -> None:
        interval = self.ttl / 3
        while not self._stop.wait(interval):
            try:
                self._write(self._body)
            except LockLost as exc:
                log.error("%s", exc)
                return
            except StoreError as exc:  # transient: the next beat tries again; fence() will tell for sure
                log.warning("could not renew lock %s: %s", self.key, exc)

    def _release(self) -> None:
        self._stop.set()
        self._thread.join()
        try:  # only our own lease, unchanged since our last write, is released
            self._write({**self._body, "released": time.time()})
        except LockLost:
            log.warning("lock %s was taken over while held (unrenewed for more than its %g s ttl)", self.key, self.ttl)


@contextmanager
def store_lock(store: ArtifactStore, name: str, *, ttl_seconds: float = 120, wait_seconds: float = 900,
               poll_seconds: float = 1.0) -> Iterator[Lease]:
    """Hold ``locks/<name>`` for the duration of the block; yields the :class:`Lease` (call ``fence()`` on it
    right before the action the lock guards).

    The lease object is never deleted (the worker needs no s3:DeleteObject): it is created with
    ``If-None-Match: *``, renewed and released by overwriting it with ``If-Match: <our last ETag>``, and a
    released or abandoned lease is taken over with ``If-Match: <its ETag>``, so of two waiters that both see it
    free exactly one gets it.

    Args:
        ttl_seconds: a lease not renewed for this long (its holder crashed or hangs) is taken over; the holder
            renews every third of it. Recorded in the lease: waiters use the holder's value.
        wait_seconds: how long to wait for a live holder before raising LockTimeout.
    """
    key = f"locks/{name}"
    body = {"owner": f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", "ttl": ttl_seconds,
            "acquired": time.time(), "beat": 0}
    started = time.monotonic()
    deadline = started + wait_seconds
    seen, seen_since = None, started  # the lease generation (ETag) we watch, and since when (our clock)
    generations = 0  # how many we saw: more than one means the holder renewed while we waited
    while True:
        try:
            etag = store.put_bytes(key, json.dumps(body).encode(), if_none_match=True)
            break
        except ConflictError:
            pass
        holder, current = _read_lease(store, key)
        now = time.monotonic()
        if current != seen:
            seen, seen_since, generations = current, now, generations + 1
        if holder is not None:
            ttl = _number(holder.get("ttl"), ttl_seconds)
            abandoned = now - seen_since > ttl
            if holder.get("released") or abandoned:
                if not holder.get("released"):
                    log.warning("taking over abandoned lock %s held by %s (unrenewed for %.0f s, its ttl is %g s)",
                                key, holder.get("owner"), now - seen_since, ttl)
                try:
                    etag = store.put_bytes(key, json.dumps(body).encode(), if_match=current)
                    break
                except ConflictError:
                    continue  # another waiter took it first, or the holder renewed it just now
        if now > deadline:
            why = ("it was renewed meanwhile (its holder is alive and working)" if generations > 1 else
                   f"it has not changed for the {now - seen_since:.0f} s we watched; a lease is taken over once "
                   f"unchanged for its ttl ({holder and holder.get('ttl')} s): raise wait_seconds above that")
            raise LockTimeout(f"lock s3://{store.bucket}/{key} held by {holder and holder.get('owner')} for more "
                              f"than {wait_seconds:.0f}s: {why}")
        time.sleep(poll_seconds)
    lease = Lease(store, key, body, etag)
    lease._thread.start()
    try:
        yield lease
    finally:
        lease._release()


def _number(value, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _read_lease(store: ArtifactStore, key: str) -> tuple[dict | None, str | None]:
    try:
        body, etag = store.get_bytes_and_etag(key)
    except NotFoundError:
        return None, None
    try:
        holder = json.loads(body)
    except ValueError:  # not a lease we can read: treated as one with the waiter's ttl
        holder = {}
    return (holder if isinstance(holder, dict) else {}), etag
