"""``adaptflow drift``: do the rows at a location still look like what a registered model trained on?"""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from adaptflow.cli.errors import fail, quiet_console_tracebacks
from adaptflow.cli.options import DEFAULT_STATE_DIR, StateDir

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def drift(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION.")],
    input: Annotated[str, typer.Option("--input", "-i", help="A file, folder/prefix of partitions or glob, "
                                       "local or s3:// (no labels needed).")],
    text_column: Annotated[str, typer.Option("--text-column", help="The column holding the texts.")] = "text",
    threshold: Annotated[float, typer.Option("--threshold", help="Drifted when the domain classifier's AUC lower "
                                             "confidence bound exceeds this (0.5 = indistinguishable).")] = 0.6,
    sample_rows: Annotated[int, typer.Option("--sample-rows", help="Rows compared per side at most.")] = 5000,
    as_json: Annotated[bool, typer.Option("--json", help="Print {\"drift\": {...}} as one JSON object on the last "
                                          "line.")] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Compare the rows at --input with the model's training rows (vectors from the embedding cache).

    Embedding drift (a domain classifier's held-out AUC with a confidence interval), prediction drift (PSI of the
    predicted labels vs the training labels, low-confidence share) and input health (lengths, truncation,
    unknown tokens). The report goes to a Prefect artifact and an MLflow monitoring run; drifted rows emit
    adaptflow.drift.detected. Exit codes: 0 checked (drifted or not), 2 bad input, 1 a service or runtime fault.
    """
    try:
        from adaptflow.drift import DriftRules

        DriftRules(threshold=threshold, sample_rows=sample_rows)  # bad values fail here, naming the option's field
        from adaptflow.settings import load_settings

        os.environ.update(load_settings(state_dir).process_env())  # before Prefect and MLflow read their env
        from flows.drift import check_drift

        quiet_console_tracebacks()
        result = check_drift(model_uri=model_uri, input=input, text_column=text_column, threshold=threshold,
                             sample_rows=sample_rows)
    except Exception as exc:  # noqa: BLE001 — every failure ends as one readable paragraph
        raise fail(exc, what=f"drift {model_uri}") from None
    if as_json:
        print(json.dumps({"drift": result["drift"], "monitoring_run_id": result["monitoring_run_id"]}, default=str))
        return
    print_drift(result["drift"])


def print_drift(drift: dict) -> None:
    """A short human-readable account of a drift check."""
    rows, labels, inputs = drift["rows"], drift["label_shift"], drift["inputs"]
    verdict = "DRIFTED" if drift["drifted"] else "no drift"
    print(f"\ndrift of {drift['model_name']} version {drift['model_version']} on {drift.get('input')}: {verdict}")
    print(f"  embeddings: domain-classifier AUC {drift['score']} [{drift['ci_low']}, {drift['ci_high']}] "
          f"(drifted above {drift['threshold']}; 0.5 = like the training rows), {rows['compared']} rows a side")
    print(f"  predictions: PSI {labels['psi']} vs its predictions on the training rows "
          f"({labels['psi_vs_training_labels']} vs the training labels); low-confidence "
          f"{labels['low_confidence']['new']} (training {labels['low_confidence']['train']})")
    if inputs.get("rows"):
        print(f"  inputs: tokens p50 {inputs['tokens']['p50']}, p95 {inputs['tokens']['p95']}; "
              f"{inputs['truncated_share']:.1%} truncated; {inputs['unknown_token_share'] or 0:.2%} unknown tokens")
    for reason in drift["reasons"]:
        print(f"  why: {reason}")
