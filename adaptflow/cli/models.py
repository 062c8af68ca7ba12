"""``adaptflow promote | rollback | models history | models rows``: move and inspect the champion alias (with an
audit trail) and the rows behind each version."""

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


@app.command()
def rows(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version whose row manifest to show.")],
    diff: Annotated[Optional[str], typer.Option("--diff", metavar="OTHER",
                                                help="Compare with version OTHER: added/removed/relabelled rows.")] = None,
    output: Annotated[Optional[Path], typer.Option(help="Folder for the --diff Parquet files "
                                                   "(default ./<name>-rows-v<OTHER>-v<VERSION>).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object: counts (and the diff's).")] = False,
    state_dir: StateDir = None,
) -> None:
    """Which rows trained and tested VERSION: counts per split and label; with --diff OTHER, the rows added,
    removed, relabelled (and moved across the split) since OTHER, written as Parquet."""
    from adaptflow.lineage import ROWS_TAG, counts, diff_rows, rows_of
    from adaptflow.settings import load_settings
    from adaptflow.store import ArtifactStore

    try:
        client = _client(state_dir)
        store = ArtifactStore.from_settings(load_settings(state_dir))
        manifests = {}
        for v in [version] + ([diff] if diff else []):
            manifest = rows_of(store, client.get_model_version(name, v))
            if manifest is None:
                raise ValueError(f"{name} v{v} has no row manifest (tag {ROWS_TAG}): it was registered before "
                                 f"adaptflow recorded row lineage; retrain to get one")
            manifests[v] = manifest
    except Exception as exc:  # noqa: BLE001
        raise fail(exc, what=f"models rows {name} {version}") from None
    rows_now = manifests[version]
    result: dict = {"name": name, "version": version, "rows": len(rows_now), "counts": counts(rows_now),
                    "rows_uri": client.get_model_version(name, version).tags[ROWS_TAG]}
    if diff:
        changes = diff_rows(rows_now, manifests[diff])
        folder = output or Path(f"{name}-rows-v{diff}-v{version}")
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for kind, frame in changes.items():
            path = folder / f"{kind}.parquet"
            frame.to_parquet(path, index=False)
            files[kind] = str(path)
        result["diff"] = {"against": diff, **{kind: len(frame) for kind, frame in changes.items()}, "files": files}
    if as_json:
        print(json.dumps(result))
        return
    print(f"{name} v{version}: {result['rows']} rows ({result['rows_uri']})")
    for split, per_label in result["counts"].items():
        print(f"  {split:<6} {sum(per_label.values()):>8}  " + ", ".join(f"{k} {n}" for k, n in per_label.items()))
    if diff:
        d = result["diff"]
        print(f"vs v{diff}: {d['added']} added, {d['removed']} removed, {d['relabelled']} relabelled, "
              f"{d['moved']} moved across the split → {folder}/")
