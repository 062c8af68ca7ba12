"""``adaptflow score``: label a lake's partitions with a registered model, through the embedding cache."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from adaptflow.cli.errors import fail, quiet_console_tracebacks
from adaptflow.cli.options import DEFAULT_STATE_DIR, StateDir

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def score(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION.")],
    input: Annotated[str, typer.Option("--input", "-i", help="A file, folder/prefix of partitions or glob, "
                                       "local or s3://.")],
    output: Annotated[str, typer.Option("--output", "-o", help="A local folder or s3:// prefix for the scores.")],
    text_column: Annotated[str, typer.Option("--text-column", help="The column holding the texts.")] = "text",
    keep_columns: Annotated[str, typer.Option("--keep-columns", help="Input columns copied to the output, "
                                              "comma-separated (e.g. id,dt; Hive keys count).")] = "",
    on_bad_partition: Annotated[str, typer.Option("--on-bad-partition", help="fail: an unreadable partition fails "
                                                  "the run; skip: it is left out and reported.")] = "fail",
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    drift: Annotated[bool, typer.Option("--drift/--no-drift", help="Check the scored rows for drift against the "
                                        "model's training rows (see `adaptflow drift`).")] = True,
    drift_threshold: Annotated[float, typer.Option("--drift-threshold", help="Drifted when the domain "
                                                   "classifier's AUC lower bound exceeds this.")] = 0.6,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on the last line.")] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Score every partition of --input with a registered model into --output (Parquet, manifest last).

    One output partition per input partition under <output>/model=<name>/version=<v>/; partitions already
    scored by this version are skipped. Vectors come from (and go into) the retrain's embedding cache. The
    rows scored are then checked for drift (`adaptflow drift` on them; --no-drift skips it).
    Exit codes: 0 success, 2 bad input (the message names the partition), 1 a service or runtime fault.
    """
    try:
        if on_bad_partition not in ("fail", "skip"):
            raise ValueError(f"--on-bad-partition must be fail or skip, not {on_bad_partition!r}")
        from adaptflow.scoring import ScoreRequest

        request = ScoreRequest(model_uri=model_uri, input=input, output=output, text_column=text_column,
                               keep_columns=keep_columns.split(",") if keep_columns else [],
                               on_bad_partition=on_bad_partition, device=device)
        from adaptflow.settings import load_settings

        os.environ.update(load_settings(state_dir).process_env())  # before Prefect and MLflow read their env
        from flows.score import score as score_flow

        quiet_console_tracebacks()
        summary = score_flow(**request.model_dump(exclude={"tokens_per_batch"}), drift=drift,
                             drift_threshold=drift_threshold)
    except Exception as exc:  # noqa: BLE001 — every failure ends as one readable paragraph
        raise fail(exc, what=f"score {model_uri}") from None
    if as_json:
        print(json.dumps(summary, default=str))
        return
    print_summary(summary)


def print_summary(summary: dict) -> None:
    """A short human-readable account of a scoring run."""
    p, emb = summary["partitions"], summary["embeddings"]
    print(f"\nscored {summary['input']} with {summary['model_name']} version {summary['model_version']} "
          f"into {summary['output']}")
    print(f"  partitions: {p['scored']} scored, {p['skipped']} already scored (skipped), {p['bad']} bad")
    print(f"  rows: {summary['rows']} ({summary['bad_rows']} without text: null label + reason), "
          f"{summary['rows_per_s'] or 0:.0f} rows/s")
    print(f"  embeddings: {emb['encoded']} encoded, {emb['cached']} from cache ({emb['dtype']} on {emb['device']}, "
          f"{emb['tokens_per_s'] or 0:.0f} tokens/s)")
    for item in summary["bad_partitions"]:
        print(f"  left out: {item['reason']}")
    if summary.get("drift"):
        from adaptflow.cli.drift import print_drift

        print_drift(summary["drift"]["drift"])
