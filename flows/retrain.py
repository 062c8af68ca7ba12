"""The retraining flow: labelled data in, a registered MLflow model with aliases out."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "adaptflow")  # library logs show in the flow run

from prefect import flow

from adaptflow.config import RunConfig
from tasks.data import ingest_data, validate_data
from tasks.embedding import embed_texts, resolve_encoder, tokenize_texts
from tasks.registry import register_model
from tasks.training import evaluate_head, fit_head


@flow(name="retrain", log_prints=True)
def retrain(config: RunConfig) -> dict:
    """ingest → validate → tokenize → embed (cached) → fit head → evaluate → register.

    Args:
        config: the validated run configuration (see adaptflow.config.RunConfig).

    Returns:
        The run summary: model version and aliases, metrics, row counts, cache hits, seconds per stage.
    """
    encoder = resolve_encoder(config)
    snapshot = ingest_data(config)
    validated = validate_data(config, snapshot)
    tokens = tokenize_texts(config, validated, encoder)
    embedded = embed_texts(config, tokens, encoder)
    head = fit_head(config, validated, encoder, embedded)
    evaluation = evaluate_head(config, validated, encoder, embedded, head)
    registered = register_model(config, encoder=encoder, snapshot=snapshot, validated=validated,
                                embedded=embedded, head=head, evaluation=evaluation)
    stages = {"resolve_encoder": encoder, "ingest": snapshot, "validate": validated, "tokenize": tokens,
              "embed": embedded, "train_head": head, "evaluate": evaluation, "register": registered}
    return {
        "run_id": registered["run_id"],
        "model_name": registered["model_name"],
        "version": registered["version"],
        "aliases": registered["aliases"],
        "model_uri": f"models:/{registered['model_name']}/{registered['version']}",
        "metrics": evaluation["metrics"],
        "rows": validated["rows"],
        "embeddings": {"encoded": embedded["encoded"], "cached": embedded["cached"],
                       "dtype": embedded["dtype"], "tokens_per_s": embedded["tokens_per_s"]},
        "artifacts": {"snapshot": snapshot["snapshot"], "validated": validated["validated"],
                      "embeddings": embedded["cache"], "head": head["head"], "evaluation": evaluation["evaluation"]},
        "seconds": {name: stage["seconds"] for name, stage in stages.items()},
    }
