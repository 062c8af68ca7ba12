"""``adaptflow promote | rollback | models history``: move and inspect the champion alias, with an audit trail."""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from adaptflow.cli.errors import fail
from adaptflow.cli.options import DEFAULT_STATE_DIR, StateDir

app = typer.Typer(help="Inspect registered models and their alias history.", no_args_is_help=True)


def _client(state_dir: Optional[Path]):
    from adaptflow.registry import client_for
    from adaptflow.settings import load_settings

    settings = load_settings(state_dir)
    os.environ.update(settings.process_env())
    if not settings.mlflow_tracking_uri:
        raise RuntimeError("no MLflow tracking server: `adaptflow stack up`, or set MLFLOW_TRACKING_URI")
    return client_for(settings.mlflow_tracking_uri)


def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to make champion.")],
    reason: Annotated[str, typer.Option(help="Why (recorded in the audit trail).")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Make VERSION the champion by hand, bypassing the gate (recorded with your user name and reason)."""
    from adaptflow.registry import CHAMPION, move_alias

    try:
        client = _client(state_dir)
        client.get_model_version(name, version)  # fails clearly for an unknown model/version
        entry = move_alias(client, name, CHAMPION, version, reason=reason, actor=getpass.getuser(), kind="manual")
    except Exception as exc:  # noqa: BLE001
        raise fail(exc, what=f"promote {name} {version}") from None
    print(f"{name}: champion {entry['from'] or '(none)'} → {entry['to']} ({entry['reason']})")


def rollback(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    reason: Annotated[str, typer.Option(help="Why (recorded in the audit trail).")] = "manual rollback",
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Move champion back to the previous champion (recorded)."""
    from adaptflow.registry import rollback as rollback_alias

    try:
        entry = rollback_alias(_client(state_dir), name, reason=reason, actor=getpass.getuser())
    except Exception as exc:  # noqa: BLE001
        raise fail(exc, what=f"rollback {name}") from None
    print(f"{name}: champion {entry['from']} → {entry['to']} (rollback: {entry['reason']})")


@app.command()
def history(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object: versions and alias moves.")] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Versions with their gate decisions, current aliases, and every alias move (who, when, from → to, why)."""
    from adaptflow.registry import alias_history

    try:
        client = _client(state_dir)
        model = client.get_registered_model(name)
        moves = alias_history(client, name)
        versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    except Exception as exc:  # noqa: BLE001
        raise fail(exc, what=f"models history {name}") from None
    rows = [{"version": v.version, "aliases": sorted(v.aliases), "decision": v.tags.get("adaptflow.gate.decision"),
             "reason": v.tags.get("adaptflow.gate.reason"), "created": v.creation_timestamp} for v in versions]
    if as_json:
        print(json.dumps({"name": name, "aliases": dict(model.aliases), "versions": rows, "moves": moves}))
        return
    print(f"{name}: aliases {dict(model.aliases)}")
    for row in rows:
        print(f"  v{row['version']:<4} {','.join(row['aliases']) or '-':<22} {row['decision'] or '-':<8} "
              f"{row['reason'] or ''}")
    print("alias moves:")
    for move in moves:
        print(f"  {move['at']}  {move['alias']}: {move['from'] or '(none)'} → {move['to']}  "
              f"[{move['kind']} by {move['actor']}] {move['reason']}")
