"""Fan-out tasks: plan the parts of the embed step, encode one part, run every part on the gpu pool and wait.

The parent submits every part at once as a flow run of the ``embed-shard`` deployment; each part holds a slot of
the global concurrency limit ``gpu`` (``flows/embed_shard.py``), so as many run at once as that limit allows. A
part that fails, crashes, is cancelled or is lost (running, but no heartbeat for 3 periods: its worker died) is
run again alone, up to ``orchestration.part_retries`` times; the whole wait is bounded by
``orchestration.gpu_timeout_s``.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

from prefect import task
from prefect.cache_policies import NO_CACHE

from adaptflow.config import RunConfig
from adaptflow.sharding import missing_rows, part_stage, plan_stage
from tasks.gpu_pool import cancel_flow_run, require_online_worker
from tasks.policy import run_stage, stage_task

HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
MISSED_HEARTBEATS = 3  # a running part silent this many periods is taken as lost
POLL_SECONDS = 2


@stage_task("plan_parts", timeout_seconds=3600)
def plan_embed_parts(config: RunConfig, tokens: dict, encoder: dict) -> dict:
    """Split the rows the cache lacks into parts (none when they do not exceed orchestration.shard_rows)."""
    return run_stage(plan_stage, config, tokens, encoder)


@stage_task("embed_part", timeout_seconds=3 * 3600)
def embed_part(config: RunConfig, part: dict, encoder: dict, dtype: str) -> dict:
    """Encode the rows of one part the cache lacks; a retry resumes from the shards already stored."""
    return run_stage(part_stage, config, part, encoder, dtype)


def _logger():
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_logger, get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("adaptflow.fanout")


def _last_sign_of_life(client, run) -> datetime | None:
    """When running ``run`` was last seen alive: its latest heartbeat event, else when it started running."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    seen = run.state.timestamp
    page = client.read_events(EventFilter(
        occurred=EventOccurredFilter(since=seen or datetime.now(timezone.utc) - timedelta(days=1)),
        event=EventNameFilter(name=[HEARTBEAT_EVENT]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"])), limit=1)
    if page.events:
        seen = max(seen, page.events[0].occurred) if seen else page.events[0].occurred
    return seen


@task(name="run_parts", cache_policy=NO_CACHE)
def run_parts(deployment: str, config: RunConfig, plan: dict, encoder: dict) -> dict:
    """Run every part of ``plan`` as a flow run of ``deployment`` and wait until all are in the cache.

    Raises:
        ConfigError: no worker polls the deployment's pool (see tasks/gpu_pool.py).
        TimeoutError: not done within orchestration.gpu_timeout_s (the unfinished part runs are cancelled).
        RuntimeError: a part failed more than orchestration.part_retries + 1 times.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Crashed

    from tasks.policy import stage_context

    orchestration = config.orchestration
    logger = _logger()
    parts = {part["key"]: part for part in plan["parts"]}
    # a part finished by an earlier attempt of this run (or another run) is a lookup: not submitted at all
    left = missing_rows(stage_context(), config, plan, encoder)
    todo = [key for key in parts if left[key]]
    if not todo:
        return {"parts": len(parts), "submitted": 0, "resubmitted": 0}
    pool = require_online_worker(deployment)
    silence = timedelta(seconds=MISSED_HEARTBEATS * orchestration.part_heartbeat_s)
    with get_client(sync_client=True) as client:  # a run's job variables replace the deployment's "env" whole
        env = dict((client.read_deployment_by_name(deployment).job_variables or {}).get("env") or {})
    job_variables = {"env": {**env, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(orchestration.part_heartbeat_s)}}
    parameters = {"config": config.model_dump(mode="json"), "encoder": encoder, "dtype": plan["dtype"]}

    def submit(key: str):
        return run_deployment(deployment, parameters={**parameters, "part": parts[key]}, timeout=0,
                              job_variables=job_variables).id

    logger.info("embed fan-out: %d parts of %d rows to deployment %s on work pool %r (waiting at most %.0f s)",
                len(todo), plan["todo"], deployment, pool, orchestration.gpu_timeout_s)
    runs = {key: submit(key) for key in todo}
    attempts = {key: 1 for key in todo}
    done: set[str] = set()
    deadline = time.monotonic() + orchestration.gpu_timeout_s
    with get_client(sync_client=True) as client:
        while len(done) < len(runs):
            if time.monotonic() > deadline:
                for key in set(runs) - done:
                    cancel_flow_run(runs[key], f"the parent stopped waiting after orchestration.gpu_timeout_s="
                                    f"{orchestration.gpu_timeout_s:g} s")
                raise TimeoutError(f"embed fan-out: {len(runs) - len(done)} of {len(runs)} parts not done within "
                                   f"orchestration.gpu_timeout_s={orchestration.gpu_timeout_s:g} s (runs "
                                   f"{', '.join(str(runs[k]) for k in set(runs) - done)}; cancelled). Is a worker "
                                   f"of pool {pool!r} busy or stuck?")
            for key in [k for k in runs if k not in done]:
                run = client.read_flow_run(runs[key])
                state = run.state
                if state is None:
                    continue
                if state.is_completed():
                    done.add(key)
                    continue
                why = state.name if state.is_final() else None
                # only a running part can be lost: a pending one may be waiting for its pod/image for minutes
                if why is None and state.is_running():
                    seen = _last_sign_of_life(client, run)
                    if seen is not None and datetime.now(timezone.utc) - seen > silence:
                        why = f"lost (no heartbeat for {silence.total_seconds():.0f} s: its worker is gone?)"
                        client.set_flow_run_state(run.id, Crashed(message=f"adaptflow: {why}"), force=True)
                if why is None:
                    continue
                if attempts[key] > orchestration.part_retries:
                    for other in set(runs) - done - {key}:
                        cancel_flow_run(runs[other], f"part {parts[key]['index']} failed for good")
                    raise RuntimeError(f"embed fan-out: part {parts[key]['index']} ({key}, run {run.name} {run.id}) "
                                       f"ended {why} on attempt {attempts[key]} of "
                                       f"{orchestration.part_retries + 1}: see its logs in Prefect")
                attempts[key] += 1
                runs[key] = submit(key)
                logger.warning("embed fan-out: part %d (%s) run %s %s: running it again alone (attempt %d of %d)",
                               parts[key]["index"], key, run.name, why, attempts[key], orchestration.part_retries + 1)
            if len(done) < len(runs):
                time.sleep(POLL_SECONDS)
    left = missing_rows(stage_context(), config, plan, encoder)
    if any(left.values()):  # a part's run completed, yet its rows are not all in the cache
        raise RuntimeError(f"embed fan-out: parts completed but rows are missing from {plan['cache']}: {left}")
    resubmitted = sum(attempts.values()) - len(attempts)
    logger.info("embed fan-out: all %d parts in the cache (%d re-run)", len(parts), resubmitted)
    return {"parts": len(parts), "submitted": len(todo), "resubmitted": resubmitted}
