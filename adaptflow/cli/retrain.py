"""``adaptflow retrain``: run the retraining flow on a config and print its summary."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from adaptflow.cli.errors import fail, quiet_console_tracebacks
from adaptflow.cli.options import DEFAULT_STATE_DIR, StateDir

# No telemetry from the ephemeral Prefect server a run without PREFECT_API_URL starts: offline it only fails,
# and its failure lands on the console as a traceback (SQLite "database is locked", unknown host).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _point_env_at_services(state_dir: Optional[Path]) -> None:
    """Export the stack's (or the user's) endpoints before Prefect and MLflow read their env at import."""
    from adaptflow.settings import load_settings

    settings = load_settings(state_dir)
    if not settings.s3_endpoint_url and not os.environ.get("AWS_ACCESS_KEY_ID"):
        raise RuntimeError(
            "no S3 store is configured: start the local stack with `adaptflow stack up`, or point adaptflow at "
            "your own with AWS_ENDPOINT_URL_S3 (omit for AWS), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and "
            "ADAPTFLOW_BUCKET"
        )
    os.environ.update(settings.process_env())


def retrain(
    config: Annotated[str, typer.Argument(help="YAML config: a local path or an s3:// URI.")],
    set_: Annotated[list[str], typer.Option("--set", help="Override a key, e.g. --set head.epochs=20 (repeatable).")] = [],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on the last line.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if nothing changed since the latest version.")] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Retrain a classifier head and register it in MLflow.

    Runs ingest → validate → tokenize → embed (cached per row) → fit head → evaluate → register as a Prefect
    flow. Services come from the env (AWS_ENDPOINT_URL_S3, MLFLOW_TRACKING_URI, PREFECT_API_URL) or from the
    local stack (`adaptflow stack up`); without a Prefect server the flow runs on an ephemeral one.
    A run whose data, config, encoder and stage code equal the latest version's registers nothing and says so
    (`"registered": false, "unchanged_since": VERSION`), in seconds: torch, Prefect and MLflow are not imported.
    Exit codes: 0 success, 2 bad config or data (the message says what to fix), 1 a service or runtime fault.
    """
    from adaptflow.config import load_config

    try:
        run_config = load_config(config, set_)
        _point_env_at_services(state_dir)
        summary = None if force else _unchanged(run_config)
        if summary is None:
            from flows.retrain import retrain as retrain_flow

            quiet_console_tracebacks()  # the paragraph below says what failed; the Prefect UI keeps the traceback
            summary = retrain_flow(run_config, force=force)
    except Exception as exc:  # noqa: BLE001 — every failure ends as one readable paragraph
        raise fail(exc, what=f"retrain {config}") from None
    if as_json:
        print(json.dumps(summary, default=str))
        return
    print_summary(summary)


def _unchanged(run_config) -> dict | None:
    """The summary of a run that would repeat the latest version (then nothing is registered), else None.

    Runs before the flow is imported (adaptflow.changes: ingest with pandas/pyarrow, the registry over REST). Bad
    data fails here as it would in the flow; a service fault leaves the decision to the flow, which retries."""
    from adaptflow.changes import precheck

    try:
        check = precheck(run_config)
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 — S3/MLflow hiccup: the flow checks again, with retries
        return None
    return check if check["unchanged_since"] else None


def print_summary(summary: dict) -> None:
    """A short human-readable account of a finished run."""
    if summary.get("registered") is False:
        m = summary["metrics"]
        print(f"\nnothing changed since {summary['model_name']} version {summary['unchanged_since']} "
              f"(same data, config, encoder and stage code): nothing registered, no alias moved")
        print(f"  accuracy {m.get('accuracy', float('nan')):.4f}  macro-F1 {m.get('macro_f1', float('nan')):.4f}  "
              f"aliases: {', '.join(summary['aliases']) or 'none'}  (--force retrains anyway)")
        return
    m, rows, emb = summary["metrics"], summary["rows"], summary["embeddings"]
    print(f"\nregistered {summary['model_name']} version {summary['version']} "
          f"(aliases: {', '.join(summary['aliases']) or 'none'}), MLflow run {summary['run_id']}")
    print(f"  accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  ECE {m.get('ece', float('nan')):.4f}")
    print(f"  rows: train {rows['train']}, test {rows['test']}, quarantined {rows['quarantined']}")
    print(f"  embeddings: {emb['encoded']} encoded, {emb['cached']} from cache ({emb['dtype']})")
    if (corrupt := emb.get("corrupt") or {}).get("shards_ignored"):
        n = corrupt["shards_ignored"]
        print(f"  {n} corrupt shard{'' if n == 1 else 's'} ignored ({corrupt['rows_reencoded']} rows re-encoded); "
              "`adaptflow cache verify --repair` removes them")
    print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items()))
