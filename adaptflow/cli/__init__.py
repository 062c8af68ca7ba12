"""The ``adaptflow`` command line: stack, encoder, retrain, predict, score, drift."""

from __future__ import annotations

import os

import typer

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# without a server, each command starts Prefect's ephemeral one: 20 s (Prefect's default) was not enough on a
# loaded 2-core machine ("Timed out while attempting to connect to ephemeral Prefect API server")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from adaptflow.cli.cache import app as cache_app  # noqa: E402
from adaptflow.cli.deploy import deploy, worker  # noqa: E402
from adaptflow.cli.drift import drift  # noqa: E402
from adaptflow.cli.encoder import app as encoder_app  # noqa: E402
from adaptflow.cli.models import app as models_app, promote, rollback  # noqa: E402
from adaptflow.cli.predict import predict  # noqa: E402
from adaptflow.cli.retrain import retrain  # noqa: E402
from adaptflow.cli.score import score  # noqa: E402
from adaptflow.cli.stack import app as stack_app  # noqa: E402

app = typer.Typer(
    name="adaptflow",
    help="Retrain classifier heads on frozen pretrained encoders: Prefect runs it, MLflow registers it, "
    "S3 stores every artifact. Start with `adaptflow stack up`, then `adaptflow retrain CONFIG.yaml`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(stack_app, name="stack", help="Start, inspect and stop the local S3 / MLflow / Prefect stack.")
app.add_typer(encoder_app, name="encoder", help="Store encoder snapshots in S3.")
app.add_typer(cache_app, name="cache", help="Check and repair the embedding cache (`cache verify [--repair]`).")
app.add_typer(models_app, name="models", help="Registered models: versions, decisions, alias history.")
app.command()(retrain)
app.command()(predict)
app.command()(score)
app.command()(drift)
app.command()(promote)
app.command()(rollback)
app.command()(deploy)
app.command()(worker)


def main() -> None:
    """Console-script entry point."""
    app()
