"""``adaptflow deploy`` and ``adaptflow worker``: scheduled retraining on a Prefect server."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from adaptflow.cli.errors import fail
from adaptflow.cli.options import DEFAULT_STATE_DIR, StateDir


def _server_env(state_dir: Optional[Path]) -> dict[str, str]:
    """The services' env, which must include a Prefect server (deployments need one)."""
    from adaptflow.settings import load_settings

    env = load_settings(state_dir).process_env()
    if not env.get("PREFECT_API_URL"):
        raise RuntimeError("deployments need a Prefect server: `adaptflow stack up`, or set PREFECT_API_URL")
    return env


def deploy(
    config: Annotated[str, typer.Argument(help="Config the scheduled runs use: a path the workers can read, or s3://.")],
    cron: Annotated[str, typer.Option(help="Schedule of retrain-nightly (cron, UTC).")] = "0 2 * * *",
    no_gpu: Annotated[bool, typer.Option("--no-gpu", help="Run embed + fit head inline on the cpu pool.")] = False,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Create pools `cpu` and `gpu`, the global concurrency limit `gpu`, and the deployments
    retrain-from-config/retrain-nightly (cron, one at a time), retrain-from-config/retrain-on-demand and
    embed-and-train/gpu. Then start workers: `adaptflow worker --pool cpu` and `adaptflow worker --pool gpu`.
    """
    try:
        os.environ.update(_server_env(state_dir))
        if "://" not in config:
            config = str(Path(config).resolve())
        from deployments.deploy import deploy as deploy_all

        names = deploy_all(config, cron=cron, gpu=not no_gpu)
    except Exception as exc:  # noqa: BLE001
        raise fail(exc, what="deploy") from None
    for name in names:
        print(f"deployed {name}")
    print("start workers: adaptflow worker --pool cpu  |  adaptflow worker --pool gpu")
    print("run now:       prefect deployment run retrain-from-config/retrain-on-demand")


def worker(
    pool: Annotated[str, typer.Option(help="Work pool to serve: cpu or gpu.")] = "cpu",
    limit: Annotated[Optional[int], typer.Option(help="Maximum concurrent flow runs of this worker.")] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Start a Prefect process worker for POOL with the services' endpoints and credentials in its env."""
    try:
        env = {**os.environ, **_server_env(state_dir)}
        prefect = shutil.which("prefect", path=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
        if prefect is None:
            raise RuntimeError("the `prefect` command is not installed next to this Python")
        args = [prefect, "worker", "start", "--pool", pool, "--type", "process"]
        if limit:
            args += ["--limit", str(limit)]
    except Exception as exc:  # noqa: BLE001
        raise fail(exc, what=f"worker --pool {pool}") from None
    os.execve(prefect, args, env)  # the worker replaces this process: signals reach it directly
