"""The batch-scoring flow: a registered model labels a lake's partitions through the per-row embedding cache."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "adaptflow")  # library logs show in the flow run

from prefect import flow

from adaptflow.scoring import ScoreRequest
from tasks.scoring import resolve_scoring_model, score_partitions


@flow(name="score", log_prints=True)
def score(model_uri: str, input: str, output: str, text_column: str = "text", keep_columns: list[str] | None = None,
          on_bad_partition: str = "fail", device: str = "auto") -> dict:
    """resolve the version's tags → per partition: read → tokenize → cache (encode misses) → head → Parquet.

    Args:
        model_uri: ``models:/NAME@alias`` or ``models:/NAME/VERSION``.
        input: a file, folder/prefix of partitions or glob, local or ``s3://``.
        output: a local folder or ``s3://`` prefix; partitions land under ``model=<name>/version=<v>/``.
        on_bad_partition: ``fail`` (the run fails naming the partition) or ``skip`` (left out and reported).

    Returns:
        The scoring summary (see ``adaptflow.scoring.score_location``).
    """
    request = ScoreRequest(model_uri=model_uri, input=input, output=output, text_column=text_column,
                           keep_columns=keep_columns or [], on_bad_partition=on_bad_partition, device=device)
    model = resolve_scoring_model(request.model_uri)
    return score_partitions(request.model_dump(mode="json"), model)
