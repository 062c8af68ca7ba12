"""Registry task: log the MLflow run, register the model version, set aliases."""

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from adaptflow.config import RunConfig
from adaptflow.stages import register_stage
from tasks.policy import RETRY_DELAYS, is_transient, run_stage


@task(name="register_model", retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=is_transient,
      cache_policy=NO_CACHE)
def register_model(config: RunConfig, **stages: dict) -> dict:
    """Register the trained model; the flow run id makes a retry return the version it already made."""
    return run_stage(register_stage, config, flow_run_id=str(flow_run.id or flow_run.root_flow_run_id), **stages)
