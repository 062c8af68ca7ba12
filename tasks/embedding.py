"""Encoder tasks: resolve the encoder, tokenize, embed (the GPU step; cached per row)."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from adaptflow.config import RunConfig
from adaptflow.stages import embed_stage, resolve_encoder_stage, tokenize_stage
from tasks.policy import RETRY_DELAYS, is_transient, run_stage


@task(name="resolve_encoder", retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=is_transient,
      cache_policy=NO_CACHE)
def resolve_encoder(config: RunConfig) -> dict:
    """Resolve the encoder reference to a verified local snapshot and its digest."""
    return run_stage(resolve_encoder_stage, config)


@task(name="tokenize_texts", retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=is_transient,
      cache_policy=NO_CACHE)
def tokenize_texts(config: RunConfig, validated: dict, encoder: dict) -> dict:
    """Tokenize every distinct text (truncated, unpadded) and store the ids."""
    return run_stage(tokenize_stage, config, validated, encoder)


@task(name="embed_texts", retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=is_transient,
      cache_policy=NO_CACHE)
def embed_texts(config: RunConfig, tokens: dict, encoder: dict) -> dict:
    """Encode the rows the embedding cache lacks; a retry resumes from the shards already stored."""
    return run_stage(embed_stage, config, tokens, encoder)
