"""`adaptflow cache verify [--repair]`: find corrupt embedding-cache shards and crashed writes, and remove them."""

from __future__ import annotations

import json

import typer

from adaptflow.cli.errors import fail
from adaptflow.settings import load_settings
from adaptflow.store import ArtifactStore, StoreError

app = typer.Typer(
    help="Check and repair the per-row embedding cache in the S3 store.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# exit code when problems were found and left in place (0: none, or all repaired; 2/1: bad input/fault)
EXIT_PROBLEMS = 1


@app.callback()
def _group() -> None:
    """Check and repair the per-row embedding cache in the S3 store."""  # keeps `verify` a subcommand


@app.command()
def verify(
    repair: bool = typer.Option(False, "--repair", help="Delete what is found (needs s3:DeleteObject)."),
    min_age: float = typer.Option(3600.0, "--min-age", help="Seconds before unpublished objects count as "
                                  "orphaned (younger ones may be a write in flight)."),
    bucket: str | None = typer.Option(None, help="Bucket to check (default: ADAPTFLOW_BUCKET / the stack's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Download and check every shard under embeddings/; list corrupt shards (also those a run marked and
    ignored) and orphaned objects of crashed writes. Exit 1 when problems are left; with --repair they are
    deleted (each manifest first) and the exit is 0. Runs never need this: they skip corrupt shards and
    encode their rows again; it frees the space and the markers, by an identity allowed to delete."""
    from adaptflow.cache_audit import audit, repair as repair_problems

    try:
        store = ArtifactStore.from_settings(load_settings(), bucket=bucket)
        found = audit(store, min_age_s=min_age)
        deleted = repair_problems(store, found.problems + found.superseded) if repair else 0
    except (StoreError, OSError, ValueError) as exc:
        raise fail(exc, what="cache verify") from None
    problems = [{"kind": p.kind, "prefix": store.uri(p.prefix), "reason": p.reason, "objects": len(p.keys)}
                for p in found.problems]
    if as_json:
        typer.echo(json.dumps({"bucket": store.bucket, "caches": found.caches, "shards": found.shards,
                               "problems": problems, "recent_objects": found.recent_objects,
                               "superseded_index_objects": len(found.superseded),
                               "repaired": repair, "deleted_objects": deleted}))
    else:
        for p in problems:
            typer.echo(f"{p['kind']:8} {p['prefix']}  {p['reason']}")
        summary = f"{found.caches} cache(s), {found.shards} shard(s) checked: "
        summary += f"{len(problems)} problem(s)" if problems else "no problems"
        if found.superseded:
            summary += (f"; {len(found.superseded)} superseded index generation(s)"
                        + (" deleted" if repair else " (--repair deletes them)"))
        if found.recent_objects:
            summary += f"; {found.recent_objects} unpublished object(s) younger than {min_age:.0f} s left alone"
        typer.echo(summary)
        if repair and problems:
            typer.echo(f"removed {len(problems)} problem(s): {deleted} object(s) deleted")
        elif problems:
            typer.echo("run `adaptflow cache verify --repair` (as an identity allowed to delete) to remove them")
    if problems and not repair:
        raise typer.Exit(EXIT_PROBLEMS)
