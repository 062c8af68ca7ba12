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
from tasks.gpu_pool import cancel_flow_run, require_online_worker
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
def run_on_gpu_pool(deployment: str, flow_name: str, parameters: dict, parent_run_id: str,
                    timeout_s: float | None = None) -> dict:
    """Run the embed + train subflow as a deployment on the gpu pool and wait; cancelling the parent cancels it.

    Fails at once (ConfigError) when no worker polls the deployment's pool. Waits at most ``timeout_s`` (default:
    ``orchestration.gpu_timeout_s`` of ``parameters["config"]``); past it, the child run is cancelled and a
    TimeoutError names it.
    """
    from prefect.deployments import run_deployment
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_logger, get_run_logger

    if timeout_s is None:
        timeout_s = RunConfig.model_validate(parameters["config"]).orchestration.gpu_timeout_s
    pool = require_online_worker(deployment)
    try:
        logger = get_run_logger()
    except MissingContextError:  # called outside a flow run (its body, from a test)
        logger = get_logger("adaptflow.gpu_pool")
    logger.info("handing embed + fit head to deployment %s on work pool %r (waiting at most %.0f s)", deployment,
                pool, timeout_s)
    child = run_deployment(deployment, parameters={**parameters, "parent_run_id": parent_run_id}, timeout=timeout_s,
                           poll_interval=2)
    if child.state is None or not child.state.is_final():
        cancel_flow_run(child.id, f"parent {parent_run_id} stopped waiting after orchestration.gpu_timeout_s="
                        f"{timeout_s:g} s")
        raise TimeoutError(f"deployment {deployment} run {child.name} ({child.id}) did not finish within "
                           f"orchestration.gpu_timeout_s={timeout_s:g} s (it was "
                           f"{child.state.name if child.state else 'never scheduled'}); it was cancelled. Is a "
                           f"worker of pool {pool!r} busy or stuck? See the run's logs in Prefect")
    if not child.state.is_completed():
        raise RuntimeError(f"deployment {deployment} run {child.name} ({child.id}) ended "
                           f"{child.state.name}: see its logs in Prefect")
    return read_handover(StageContext.from_env(), parent_run_id, flow_name)
