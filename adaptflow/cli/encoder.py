"""`adaptflow encoder ...`: publish an encoder snapshot to the S3 store, or show what a ref resolves to."""

from __future__ import annotations

import json
import typer

from adaptflow.cli.errors import fail
from adaptflow.encoders import EncoderError, push_encoder, resolve_encoder
from adaptflow.settings import load_settings
from adaptflow.store import ArtifactStore, StoreError

app = typer.Typer(
    help="Publish encoders to the S3 store and inspect encoder refs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Expected failures (bad ref, unreachable store, wrong credentials) end in one paragraph, not a traceback.
_EXPECTED = (EncoderError, StoreError, OSError, ValueError)


@app.callback()
def _group() -> None:
    """Publish encoders to the S3 store and inspect encoder refs."""  # keeps `push` a subcommand


@app.command()
def push(
    ref: str = typer.Argument(..., help="Encoder ref: a folder, package:NAME, an s3:// snapshot or a hub id."),
    name: str = typer.Argument(..., help="Name under encoders/ in the bucket, e.g. minilm."),
    bucket: str | None = typer.Option(None, help="Bucket to publish to (default: ADAPTFLOW_BUCKET / the stack's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Publish an encoder's files (safetensors only) as s3://BUCKET/encoders/NAME/<digest16>; idempotent."""
    try:
        settings = load_settings()
        store = ArtifactStore.from_settings(settings, bucket=bucket)
        s3_ref, digest = push_encoder(ref, name, store, cache_dir=settings.cache_dir)
    except _EXPECTED as exc:  # exit 2 for a bad ref/name (ValueError), 1 for a store fault
        raise fail(exc, what="encoder push") from None
    if as_json:
        typer.echo(json.dumps({"ref": s3_ref, "digest": digest, "name": name, "source_ref": ref}))
    else:
        typer.echo(s3_ref)
        typer.echo(f"digest {digest}")


@app.command()
def resolve(
    ref: str = typer.Argument(..., help="Encoder ref to resolve (downloads s3:// snapshots into the cache)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Show where an encoder ref resolves to and its digest."""
    try:
        settings = load_settings()
        store = ArtifactStore.from_settings(settings) if ref.startswith("s3://") else None
        resolved = resolve_encoder(ref, store=store, cache_dir=settings.cache_dir)
    except _EXPECTED as exc:
        raise fail(exc, what="encoder resolve") from None
    info = {"ref": resolved.ref, "source": resolved.source, "path": str(resolved.path), "digest": resolved.digest}
    typer.echo(json.dumps(info) if as_json else "\n".join(f"{k}: {v}" for k, v in info.items()))
