"""Change-detection tasks: the unchanged-run check that opens every retrain, and one watch tick over the lake."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from adaptflow.changes import check_unchanged, commit_seen, diff_partitions, list_config_partitions, seen_key
from adaptflow.config import RunConfig, load_config
from adaptflow.store import ConflictError
from tasks.events import emit_data_changed
from tasks.policy import RETRY_DELAYS, is_transient, run_stage, stage_context, stage_task


@stage_task("check_unchanged")
def check_unchanged_task(config: RunConfig, snapshot: dict) -> dict:
    """Same data, config, encoder and stage code as the latest version? Then the flow registers nothing."""
    return run_stage(lambda ctx, config, snapshot: check_unchanged(
        config, snapshot, store=ctx.store, tracking_uri=ctx.settings.mlflow_tracking_uri,
        cache_dir=ctx.settings.cache_dir), config, snapshot)


@task(name="watch_tick", retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=is_transient, cache_policy=NO_CACHE)
def watch_tick(config_uri: str) -> dict:
    """List the config's partitions; when some are new or changed, emit ``adaptflow.data.changed`` and record the
    listing as seen (emit first: a crash in between re-announces, it never loses a partition)."""
    ctx = stage_context()
    config = load_config(config_uri)
    key = seen_key(config_uri, config)
    changes = diff_partitions(ctx.store, key, list_config_partitions(config, ctx.store))
    event_id = None
    if changes.any:
        event_id = emit_data_changed(config_uri, changes.new, changes.changed, changes.removed)
    if changes.any or changes.removed or changes.seen_etag is None:
        try:
            commit_seen(ctx.store, key, changes)
        except ConflictError:  # another watcher recorded a state since: its tick announced what it saw
            pass
    return {"config_uri": config_uri, "seen": ctx.store.uri(key), "event_id": event_id,
            "new": len(changes.new), "changed": len(changes.changed), "removed": len(changes.removed),
            "partitions": len(changes.current)}
