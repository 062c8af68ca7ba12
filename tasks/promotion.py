"""Gate task: champion vs challenger, the decision as a Prefect artifact, ``champion`` moved on promote."""

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from adaptflow.config import RunConfig
from adaptflow.promotion import gate_markdown, gate_stage
from tasks.policy import RETRY_DELAYS, is_transient, run_stage


@task(name="gate_model", retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=is_transient,
      cache_policy=NO_CACHE)
def gate_model(config: RunConfig, validated: dict, registered: dict) -> dict:
    """Decide promote / reject / hold; only promote moves the champion alias."""
    result = run_stage(gate_stage, config, validated=validated, registered=registered)
    create_markdown_artifact(key="gate-decision", markdown=gate_markdown(result),
                             description=f"Gate decision for {config.name} v{registered['version']}")
    return result
