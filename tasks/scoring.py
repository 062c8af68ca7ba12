"""Batch-scoring tasks: resolve the model version's scoring tags, score the partitions (adaptflow.scoring)."""

from __future__ import annotations

from adaptflow.drift import DriftRules
from adaptflow.drift_check import TextSample, save_sample
from adaptflow.scoring import ScoreRequest, model_dict, model_from_dict, resolve_model, score_location
from tasks.policy import run_stage, stage_task


def _resolve(ctx, model_uri: str) -> dict:
    return model_dict(resolve_model(ctx.settings.mlflow_tracking_uri, model_uri))


def _score(ctx, request: dict, model: dict, drift: dict | None) -> dict:
    rules = DriftRules.model_validate(drift) if drift is not None else None
    sample = TextSample(rules.sample_rows, rules.seed) if rules else None
    summary = score_location(ctx, ScoreRequest.model_validate(request), model_from_dict(model), sample=sample)
    # the drift check's new rows: a uniform sample of the texts this run scored (none when all were skipped)
    summary["drift_sample"] = save_sample(ctx, model_from_dict(model), list(sample.texts)) if sample else None
    return summary


@stage_task("resolve_scoring_model", timeout_seconds=600)
def resolve_scoring_model(model_uri: str) -> dict:
    """``models:/NAME@alias`` or ``models:/NAME/VERSION`` → the version's head, encoder and cache settings."""
    return run_stage(_resolve, model_uri)


@stage_task("score_partitions", timeout_seconds=6 * 3600)
def score_partitions(request: dict, model: dict, drift: dict | None = None) -> dict:
    """Score every input partition not yet published for this version; a retry resumes after the published ones.
    With ``drift`` rules, a sample of the scored texts is published for the drift check (``drift_sample``)."""
    return run_stage(_score, request, model, drift)
