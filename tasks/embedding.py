"""Encoder tasks: resolve the encoder, tokenize, embed (the GPU step; cached per row)."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from adaptflow.config import RunConfig
from adaptflow.stages import (
    StageContext,
    embed_stage,
    read_handover,
    resolve_encoder_stage,
    tokenize_stage,
    write_handover,
)
from tasks.policy import run_stage, stage_task


@stage_task("resolve_encoder")
def resolve_encoder(config: RunConfig) -> dict:
    """Resolve the encoder reference to a verified local snapshot and its digest."""
    return run_stage(resolve_encoder_stage, config)


@stage_task("tokenize_texts")
def tokenize_texts(config: RunConfig, validated: dict, encoder: dict) -> dict:
    """Tokenize every distinct text (truncated, unpadded) and store the ids."""
    return run_stage(tokenize_stage, config, validated, encoder)


@stage_task("embed_texts")
def embed_texts(config: RunConfig, tokens: dict, encoder: dict) -> dict:
    """Encode the rows the embedding cache lacks; a retry resumes from the shards already stored."""
    return run_stage(embed_stage, config, tokens, encoder)


@stage_task("hand_over")
def hand_over(parent_run_id: str, name: str, result: dict) -> str:
    """Leave a child flow's result in the store for its parent run."""
    return write_handover(StageContext.from_env(), parent_run_id, name, result)


@task(name="run_on_gpu_pool", cache_policy=NO_CACHE)
def run_on_gpu_pool(deployment: str, flow_name: str, parameters: dict, parent_run_id: str) -> dict:
    """Run the embed + train subflow as a deployment on the gpu pool and wait; cancelling the parent cancels it."""
    from prefect.deployments import run_deployment

    child = run_deployment(deployment, parameters={**parameters, "parent_run_id": parent_run_id}, timeout=None,
                           poll_interval=2)
    if not child.state or not child.state.is_completed():
        raise RuntimeError(f"deployment {deployment} run {child.name} ({child.id}) ended "
                           f"{child.state.name if child.state else 'without a state'}: see its logs in Prefect")
    return read_handover(StageContext.from_env(), parent_run_id, flow_name)
