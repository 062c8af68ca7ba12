"""Registry task: log the MLflow run, register the model version, set aliases."""

from prefect.runtime import flow_run

from adaptflow.config import RunConfig
from adaptflow.stages import register_stage
from tasks.policy import run_stage, stage_task


@stage_task("register_model")
def register_model(config: RunConfig, **stages: dict) -> dict:
    """Register the trained model; the flow run id makes a retry return the version it already made."""
    return run_stage(register_stage, config, flow_run_id=str(flow_run.id or flow_run.root_flow_run_id), **stages)
