"""Training tasks: fit the head, evaluate it (report as a Prefect markdown artifact)."""

from prefect.artifacts import create_markdown_artifact

from adaptflow.config import RunConfig
from adaptflow.stages import evaluate_stage, train_stage
from tasks.policy import run_stage, stage_task


@stage_task("fit_head")
def fit_head(config: RunConfig, validated: dict, encoder: dict, embedded: dict) -> dict:
    """Train the classifier head on the cached embeddings."""
    return run_stage(train_stage, config, validated, encoder, embedded)


@stage_task("evaluate_head")
def evaluate_head(config: RunConfig, validated: dict, encoder: dict, embedded: dict, head: dict) -> dict:
    """Score the head on the test rows and publish the evaluation report."""
    result = run_stage(evaluate_stage, config, validated, encoder, embedded, head)
    create_markdown_artifact(key="evaluation-report", markdown=result["report"],
                             description=f"Evaluation of {config.name} on held-out rows")
    return result
