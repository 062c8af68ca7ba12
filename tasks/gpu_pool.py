"""Handing work to another work pool safely: fail fast when nobody polls it, cancel what ran past its bound."""

from __future__ import annotations

from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import WorkerStatus, WorkPoolStatus
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Cancelling

from adaptflow.config import ConfigError


def require_online_worker(deployment: str) -> str:
    """The work pool of ``deployment`` (``FLOW/NAME``) after checking that a worker polls it.

    Raises:
        ConfigError: the deployment or its pool does not exist, the pool is paused, or no worker of the pool is
            online (a run handed to it would wait for ever); the message names the pool and the command to run.
    """
    with get_client(sync_client=True) as client:
        try:
            pool_name = client.read_deployment_by_name(deployment).work_pool_name
        except ObjectNotFound:
            raise ConfigError(f"deployment {deployment!r} does not exist on this Prefect server: run "
                              "`adaptflow deploy CONFIG`, or unset orchestration.gpu_deployment / "
                              "ADAPTFLOW_GPU_DEPLOYMENT to embed inline") from None
        if not pool_name:
            raise ConfigError(f"deployment {deployment!r} has no work pool: redeploy it with `adaptflow deploy`")
        try:
            pool = client.read_work_pool(pool_name)
        except ObjectNotFound:
            raise ConfigError(f"work pool {pool_name!r} of deployment {deployment!r} does not exist: run "
                              "`adaptflow deploy CONFIG`") from None
        if pool.is_push_pool or pool.is_managed_pool:  # no workers: the server submits the runs itself
            return pool_name
        if pool.status == WorkPoolStatus.PAUSED:
            raise ConfigError(f"work pool {pool_name!r} is paused: resume it (`prefect work-pool resume "
                              f"{pool_name}`) before handing it work")
        workers = client.read_workers_for_work_pool(pool_name)
    if not any(worker.status == WorkerStatus.ONLINE for worker in workers):
        seen = f"{len(workers)} worker(s) seen, none online" if workers else "no worker ever polled it"
        raise ConfigError(f"no worker is polling work pool {pool_name!r} ({seen}): a run handed to it would wait "
                          f"for ever. Start one with `adaptflow worker --pool {pool_name}`, or unset "
                          "orchestration.gpu_deployment / ADAPTFLOW_GPU_DEPLOYMENT to run embed + fit head inline")
    return pool_name


def cancel_flow_run(flow_run_id: UUID, message: str) -> None:
    """Cancel a flow run: one not started yet at once, a running one through its worker (``Cancelling``)."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return
        running = run.state is not None and (run.state.is_running() or run.state.is_pending())
        client.set_flow_run_state(flow_run_id, Cancelling(message=message) if running else Cancelled(message=message),
                                  force=True)
