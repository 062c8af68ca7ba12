"""``adaptflow stack``: start, inspect and stop the local SeaweedFS (S3), MLflow and Prefect servers."""

from __future__ import annotations

import json
import shlex
from typing import Annotated, Optional

import typer

from adaptflow.cli.errors import fail
from adaptflow.cli.options import DEFAULT_STATE_DIR, StateDir

app = typer.Typer(
    help="The local stack: SeaweedFS as S3, an MLflow tracking server and a Prefect server, all on 127.0.0.1.\n\n"
    "State, data and logs live in the state dir (default .adaptflow/, or $ADAPTFLOW_STATE_DIR); adaptflow "
    "commands find the services from there on their own. `down` keeps the data; `up` again brings it back "
    "on the same ports.",
    no_args_is_help=True,
    add_completion=False,
)

AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object (service -> url, healthy, pid, ...).")]


def _echo_err(message: str) -> None:
    typer.echo(message, err=True)


def _print_status(status: dict) -> None:
    for name, info in status.items():
        if not info["url"]:
            typer.echo(f"{name:8} not started")
            continue
        state = "healthy" if info["healthy"] else ("UNHEALTHY" if info["running"] else "stopped")
        extra = f"  pid {info['pid']}, {info['rss_mb']} MB" if info["running"] else ""
        typer.echo(f"{name:8} {state:9} {info['url']}{extra}")
        if name == "s3" and info.get("bucket"):
            typer.echo(f"{'':18} bucket s3://{info['bucket']} (keys: credentials.json in the state dir)")
        if info.get("database") and info["database"] != "sqlite":
            typer.echo(f"{'':18} DB  {info['database']}")
        if info.get("ui"):
            typer.echo(f"{'':18} UI  {info['ui']}")
        if info.get("api_url"):
            typer.echo(f"{'':18} API {info['api_url']}")


@app.command()
def up(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    only: Annotated[
        Optional[str], typer.Option(help="Comma-separated subset of s3,mlflow,prefect (mlflow brings s3 along).")
    ] = None,
    s3_port: Annotated[Optional[int], typer.Option(help="S3 port (default 8333, or a free one if taken).")] = None,
    mlflow_port: Annotated[Optional[int], typer.Option(help="MLflow port (default 5000, or a free one).")] = None,
    prefect_port: Annotated[Optional[int], typer.Option(help="Prefect port (default 4200, or a free one).")] = None,
    bucket: Annotated[
        str, typer.Option(help="S3 bucket to create; MLflow artifacts go to s3://BUCKET/mlflow.")
    ] = "adaptflow",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the services to become healthy.")] = 90,
    postgres: Annotated[Optional[str], typer.Option(
        help="Keep MLflow's and Prefect's state in PostgreSQL at this server URL (postgresql://USER@HOST:PORT), "
        "in databases created when missing, instead of SQLite files: the production shape, natively.")] = None,
    mlflow_db: Annotated[str, typer.Option(help="MLflow's database name (with --postgres).")] = "adaptflow_mlflow",
    prefect_db: Annotated[str, typer.Option(help="Prefect's database name (with --postgres).")] = "adaptflow_prefect",
    as_json: AsJson = False,
) -> None:
    """Start the services that are not running yet (idempotent) and wait until they answer."""
    from adaptflow import stack

    services = tuple(s.strip() for s in only.split(",") if s.strip()) if only else stack.SERVICES
    if set(services) - set(stack.SERVICES):
        raise typer.BadParameter(f"choose from {','.join(stack.SERVICES)}", param_hint="--only")
    ports = {k: v for k, v in {"s3": s3_port, "mlflow": mlflow_port, "prefect": prefect_port}.items() if v}
    try:
        status = stack.up(state_dir, services=services, ports=ports, bucket=bucket, timeout=timeout, log=_echo_err,
                          postgres=postgres, databases={"mlflow": mlflow_db, "prefect": prefect_db})
    except stack.StackError as exc:
        raise fail(exc, what="stack up") from None
    if as_json:
        typer.echo(json.dumps(status))
        return
    _print_status(status)
    typer.echo(
        f"\nadaptflow commands run here find these services by themselves (state dir {state_dir}).\n"
        f"To point other tools (mlflow, prefect, aws, your scripts) at them:\n"
        f"  eval \"$(adaptflow stack env --state-dir {shlex.quote(str(state_dir))})\""
    )


@app.command()
def status(state_dir: StateDir = DEFAULT_STATE_DIR, as_json: AsJson = False) -> None:
    """Show each service's URL and health; exit 1 when a started service is not healthy."""
    from adaptflow import stack

    result = stack.status(state_dir)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        _print_status(result)
    started = [info for info in result.values() if info["url"]]
    if not started or not all(info["healthy"] for info in started):
        raise typer.Exit(1)


@app.command()
def down(state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Stop every service of this state dir (SIGTERM, then harder); the data stays for the next `up`."""
    from adaptflow import stack

    running = {name: info["pid"] for name, info in stack.status(state_dir).items() if info["running"]}
    try:
        stack.down(state_dir, log=_echo_err)
    except stack.StackError as exc:
        raise fail(exc, what="stack down") from None
    stopped = ", ".join(f"{name} (pid {pid})" for name, pid in running.items()) or "nothing was running"
    typer.echo(f"stopped: {stopped}; data kept in {state_dir}")


@app.command()
def env(state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Print `export` lines (secrets included) for `eval "$(adaptflow stack env)"`."""
    from adaptflow import stack

    # the stack's own values, not whatever the current shell already exports
    for key, value in stack.stack_settings(state_dir).process_env().items():
        typer.echo(f"export {key}={shlex.quote(value)}")
