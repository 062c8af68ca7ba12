"""One part of a fanned-out embed step as its own flow (deployable to the `gpu` pool), and the fan-out wiring."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "adaptflow")

from prefect import flow

from adaptflow.config import RunConfig
from tasks.fanout import embed_part, plan_embed_parts, run_parts
from tasks.gpu_slot import gpu_slot

FLOW_NAME = "embed-shard"


@flow(name=FLOW_NAME, log_prints=True)
def embed_shard(config: RunConfig, part: dict, encoder: dict, dtype: str) -> dict:
    """Encode the rows of one part the cache lacks, holding a slot of the global concurrency limit ``gpu``.

    Args:
        part: ``key``, ``index``, ``rows`` and the ``tokens`` URI of the part (adaptflow.sharding.plan_stage).
        encoder: the resolve stage's output; dtype: the plan's (all parts fill one cache).
    """
    with gpu_slot():
        return embed_part(config, part, encoder, dtype)


def shard_deployment(config: RunConfig) -> str | None:
    """The embed-shard deployment to fan out to: orchestration.shard_deployment, else ADAPTFLOW_SHARD_DEPLOYMENT."""
    return config.orchestration.shard_deployment or os.environ.get("ADAPTFLOW_SHARD_DEPLOYMENT") or None


def fan_out_embed(config: RunConfig, tokens: dict, encoder: dict) -> dict | None:
    """When a shard deployment is configured and the rows to encode exceed orchestration.shard_rows, encode them
    as parts on the gpu pool and wait until all are cached (the embed stage after it is then a lookup).
    None when there is nothing to fan out."""
    deployment = shard_deployment(config)
    if not deployment or not config.orchestration.shard_rows:
        return None
    plan = plan_embed_parts(config, tokens, encoder)
    if not plan["parts"]:
        return None
    return {**run_parts(deployment, config, plan, encoder), "todo": plan["todo"]}
