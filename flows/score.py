"""The batch-scoring flow: a registered model labels a lake's partitions through the per-row embedding cache,
then the rows it scored are checked for drift against the model's training rows."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "adaptflow")  # library logs show in the flow run

from prefect import flow

from adaptflow.drift import DriftRules
from adaptflow.scoring import ScoreRequest
from tasks.drift import check_model_drift
from tasks.scoring import resolve_scoring_model, score_partitions


@flow(name="score", log_prints=True)
def score(model_uri: str, input: str, output: str, text_column: str = "text", keep_columns: list[str] | None = None,
          on_bad_partition: str = "fail", device: str = "auto", drift: bool = True,
          drift_threshold: float = 0.6) -> dict:
    """resolve the version's tags → per partition: read → tokenize → cache (encode misses) → head → Parquet
    → drift of the scored rows vs the training rows (artifact, monitoring run, ``adaptflow.drift.detected``).

    Args:
        model_uri: ``models:/NAME@alias`` or ``models:/NAME/VERSION``.
        input: a file, folder/prefix of partitions or glob, local or ``s3://``.
        output: a local folder or ``s3://`` prefix; partitions land under ``model=<name>/version=<v>/``.
        on_bad_partition: ``fail`` (the run fails naming the partition) or ``skip`` (left out and reported).
        drift: check the rows this run scored for drift (nothing scored, e.g. all skipped: no check).
        drift_threshold: drifted when the domain classifier's AUC lower bound exceeds it.

    Returns:
        The scoring summary (see ``adaptflow.scoring.score_location``), with ``drift`` (the report, or None).
    """
    request = ScoreRequest(model_uri=model_uri, input=input, output=output, text_column=text_column,
                           keep_columns=keep_columns or [], on_bad_partition=on_bad_partition, device=device)
    rules = DriftRules(threshold=drift_threshold).model_dump() if drift else None
    model = resolve_scoring_model(request.model_uri)
    summary = score_partitions(request.model_dump(mode="json"), model, rules)
    report = None
    if rules and summary["drift_sample"]:
        report = check_model_drift(model, summary["drift_sample"], input, summary["rows"] - summary["bad_rows"],
                                   rules, summary["embeddings"]["device"])
    return {**summary, "drift": report}
