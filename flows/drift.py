"""The drift flow: do the rows at a location still look like what a registered model trained on?"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "adaptflow")  # library logs show in the flow run

from prefect import flow

from adaptflow.drift import DriftRules
from tasks.drift import check_model_drift, sample_new_rows
from tasks.scoring import resolve_scoring_model


@flow(name="check-drift", log_prints=True)
def check_drift(model_uri: str, input: str, text_column: str = "text", threshold: float = 0.6,
                sample_rows: int = 5000, device: str = "cpu") -> dict:
    """resolve the version → sample the rows at ``input`` → compare with its training rows (cached vectors)
    → markdown artifact, MLflow monitoring run, and ``adaptflow.drift.detected`` when drifted.

    Args:
        model_uri: ``models:/NAME@alias`` or ``models:/NAME/VERSION``.
        input: a file, folder/prefix of partitions or glob, local or ``s3://`` (rows need no labels).
        threshold: drifted when the domain classifier's AUC lower bound exceeds it.
        sample_rows: rows compared per side at most.

    Returns:
        ``{"drift": {"score", "ci_low", "ci_high", "drifted", "label_shift", "inputs", ...}, "monitoring_run_id"}``.
    """
    rules = DriftRules(threshold=threshold, sample_rows=sample_rows).model_dump()
    model = resolve_scoring_model(model_uri)
    sample = sample_new_rows(model, input, text_column, rules)
    return check_model_drift(model, sample["sample"], input, sample["rows"], rules, device)
