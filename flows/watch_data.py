"""The watch-data flow: one tick over a config's data locations; new or changed partitions → one Prefect event.

Deployed with an interval schedule (prefect.yaml: every 10 minutes); ``retrain-on-demand`` has a deployment trigger
on ``adaptflow.data.changed`` for the same config, so landing data starts one retrain.
"""

from __future__ import annotations

from prefect import flow

from tasks.changes import watch_tick


@flow(name="watch-data", log_prints=True)
def watch_data(config_uri: str) -> dict:
    """List the partitions ``config_uri``'s data locations hold and announce what is new since the last tick.

    Args:
        config_uri: the retrain config (a path the worker can read, or s3://); its data.train / data.test are
            watched.
    """
    tick = watch_tick(config_uri)
    print(f"{tick['partitions']} partition(s): {tick['new']} new, {tick['changed']} changed, {tick['removed']} "
          f"removed; event {tick['event_id'] or 'none'}")
    return tick
