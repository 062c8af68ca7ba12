"""Gate task: champion vs challenger, the decision as a Prefect artifact, ``champion`` moved on promote."""

from prefect.artifacts import create_markdown_artifact

from adaptflow.config import RunConfig
from adaptflow.promotion import gate_markdown, gate_stage
from tasks.policy import run_stage, stage_task


@stage_task("gate_model")
def gate_model(config: RunConfig, validated: dict, registered: dict) -> dict:
    """Decide promote / reject / hold; only promote moves the champion alias."""
    result = run_stage(gate_stage, config, validated=validated, registered=registered)
    create_markdown_artifact(key="gate-decision", markdown=gate_markdown(result),
                             description=f"Gate decision for {config.name} v{registered['version']}")
    return result
