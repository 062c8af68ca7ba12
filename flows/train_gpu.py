"""The GPU part of retraining as its own flow: embed (cached) + fit head, deployable to the `gpu` pool."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "adaptflow")

from prefect import flow

from adaptflow.config import RunConfig
from tasks.embedding import embed_texts, hand_over
from tasks.gpu_slot import gpu_slot
from tasks.training import fit_head

FLOW_NAME = "embed-and-train"


@flow(name=FLOW_NAME, log_prints=True)
def embed_and_train(config: RunConfig, tokens: dict, validated: dict, encoder: dict, parent_run_id: str = "") -> dict:
    """Encode the rows the cache lacks, then fit the head on the cached arrays, holding a slot of the global
    concurrency limit ``gpu`` for both (the wait is in this run's logs).

    Args:
        tokens, validated, encoder: the parent run's stage outputs (URIs and digests only).
        parent_run_id: when set (run as a deployment), the result is also left in the store for that run.
    """
    with gpu_slot():
        embedded = embed_texts(config, tokens, encoder)
        head = fit_head(config, validated, encoder, embedded)
    result = {"embedded": embedded, "head": head}
    if parent_run_id:
        hand_over(parent_run_id, FLOW_NAME, result)
    return result
