"""Hold one slot of the global concurrency limit ``gpu`` (``adaptflow deploy`` creates it) around the GPU work.

Two runs that each hold a slot of a limit of 1 never embed at the same time, on any worker. The wait and what
it cost are logged in the run's logs. Without the limit (an ephemeral run, a server nobody ran ``adaptflow
deploy`` against) the work runs unguarded, said once per flow run; no limit is ever created here.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.sync import concurrency
from prefect.exceptions import MissingContextError, ObjectNotFound
from prefect.logging import get_logger, get_run_logger
from prefect.runtime import flow_run

GPU_LIMIT = "gpu"
# a holder killed without releasing (worker lost, OOM kill) frees its slot when the lease lapses; Prefect renews
# a live holder's lease every 75 % of it
LEASE_SECONDS = 60

_WARNED: set[tuple[str, str]] = set()  # (limit, flow run id): the "no such limit" line is logged once per run


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("adaptflow.gpu_slot")


@contextmanager
def gpu_slot(name: str = GPU_LIMIT) -> Iterator[None]:
    """Occupy one slot of the global concurrency limit ``name`` for the duration of the block.

    Waits (without a bound of its own: the parent run bounds the whole GPU subflow with
    ``orchestration.gpu_timeout_s``) until a slot is free. A missing or inactive limit is not an error: the block
    runs without a slot and a warning says so once per flow run.
    """
    logger = _logger()
    run_id = str(flow_run.id or "")
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            limit = None
    if limit is None or not limit.active:
        if (name, run_id) not in _WARNED:
            _WARNED.add((name, run_id))
            state = "is inactive" if limit is not None else "does not exist on this Prefect server"
            logger.warning("concurrency limit %r %s: running without a slot, nothing keeps two runs off one GPU "
                           "(`adaptflow deploy` creates it)", name, state)
        yield
        return
    logger.info("waiting for a slot of concurrency limit %r (limit %d, %d in use)", name, limit.limit,
                limit.active_slots)
    holder = ConcurrencyLeaseHolder(type="flow_run", id=run_id) if run_id else None
    started = time.monotonic()
    with concurrency(name, occupy=1, lease_duration=LEASE_SECONDS, holder=holder):
        logger.info("holding a slot of concurrency limit %r after waiting %.1f s", name, time.monotonic() - started)
        held = time.monotonic()
        try:
            yield
        finally:
            logger.info("releasing the slot of concurrency limit %r after %.1f s", name, time.monotonic() - held)
