"""What every stage task shares: which failures are worth a retry, and running a stage with timing."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.task_engine import TaskRunTimeoutError

from adaptflow.cache import CacheIntegrityError
from adaptflow.embed import release_free_memory
from adaptflow.settings import load_settings
from adaptflow.stages import StageContext

# Backoff for transient faults (a restarting S3 or MLflow server comes back within seconds).
RETRY_DELAYS = [2, 5, 15]

# Wall-time bound of one attempt of each stage task (seconds): a hung call (a socket nobody answers, a stuck
# server) fails the task instead of holding the run, its lock and its gpu slot for ever. Generous: ~10x the
# longest seen (372k rows: embed ~12 min on 2 CPU cores); a timed-out attempt is not retried.
STAGE_TIMEOUTS: dict[str, float] = {
    "ingest_data": 3600,
    "validate_data": 3600,
    "resolve_encoder": 1800,  # may download an encoder snapshot
    "tokenize_texts": 3600,
    "embed_texts": 3 * 3600,  # the GPU step, the longest by far
    "fit_head": 3 * 3600,  # head.kind lora trains the encoder's adapters: an embed-sized step
    "hand_over": 600,
    "evaluate_head": 3600,
    "register_model": 1800,
    "gate_model": 3600,
}
DEFAULT_TIMEOUT = 3600


def is_transient(task, task_run, state) -> bool:
    """Retry I/O and service faults; never retry bad data or configuration (they fail the same way again)."""
    try:
        state.result()
    except TaskRunTimeoutError:  # ran past its stage's timeout_seconds: another attempt would too
        return False
    except ValueError:  # DataError, ConfigError, EncoderError: deterministic, the message says what to fix
        return False
    except CacheIntegrityError:  # the same bytes again; the shard is marked, the next run's embed re-encodes it
        return False
    except Exception as exc:  # noqa: BLE001
        status = getattr(exc, "get_http_status_code", lambda: 500)()
        return not 400 <= status < 500  # an MLflow 4xx (bad parameter, conflict) fails the same way again
    return False


_CONTEXTS: dict[str, StageContext] = {}  # kept in memory only, never logged
_CONTEXTS_LOCK = threading.Lock()


def stage_context() -> StageContext:
    """The StageContext for the current settings, built once per process and settings (a boto3 client and the
    bucket check cost ~0.1 s, nine times a run); settings changed by env make a new one."""
    settings = load_settings()
    # every field in clear (model_dump_json masks the secret key, so a rotated secret would keep the old client)
    key = repr(sorted(settings.model_dump(mode="python").items(), key=lambda kv: kv[0]))
    key += repr(settings.secret_key)
    with _CONTEXTS_LOCK:
        ctx = _CONTEXTS.get(key)
    if ctx is None:
        ctx = StageContext.from_env(settings)
        with _CONTEXTS_LOCK:
            _CONTEXTS[key] = ctx
    return ctx


def run_stage(stage: Callable[..., dict], *args: Any, **kwargs: Any) -> dict:
    """Run one stage against the configured services; add its wall time as ``seconds`` and its S3 traffic as
    ``s3`` (``requests``, ``bytes_read``: this process's store counter across the stage; stages run one at a time)."""
    started = time.perf_counter()
    ctx = stage_context()
    before = ctx.store.requests.snapshot()
    try:
        result = stage(ctx, *args, **kwargs)
    finally:
        # the frames and arrays a stage held are garbage now; give their pages back, or the next stage's peak
        # stacks on top of them (measured: ~240 MB retained after ingest/validate/tokenize of 372k rows)
        release_free_memory()
    return {**result, "seconds": round(time.perf_counter() - started, 3), "s3": ctx.store.requests.since(before)}


def stage_task(name: str, timeout_seconds: float | None = None):
    """The decorator every stage task wears: transient faults retried with backoff, no Prefect result caching
    (each stage's own content keys make a re-run a lookup, with no stale hits), and a wall-time bound per attempt
    (``timeout_seconds``, default ``STAGE_TIMEOUTS[name]``)."""
    return task(name=name, retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS,
                retry_condition_fn=is_transient, cache_policy=NO_CACHE,
                timeout_seconds=timeout_seconds or STAGE_TIMEOUTS.get(name, DEFAULT_TIMEOUT))
