"""Data tasks: ingest a snapshot, validate it (quarantine report as a Prefect table artifact)."""

from prefect.artifacts import create_table_artifact

from adaptflow.config import RunConfig
from adaptflow.stages import ingest_stage, validate_stage
from tasks.policy import run_stage, stage_task


@stage_task("ingest_data")
def ingest_data(config: RunConfig) -> dict:
    """Read, normalise, split and snapshot the labelled rows; returns the snapshot's URIs and digest."""
    return run_stage(ingest_stage, config)


@stage_task("validate_data")
def validate_data(config: RunConfig, snapshot: dict) -> dict:
    """Apply the validation rules; bad rows are quarantined with a reason, counted in an artifact."""
    result = run_stage(validate_stage, config, snapshot)
    reasons = {k: v for k, v in result["report"]["reasons"].items() if v}
    create_table_artifact(
        key="validation-report",
        table=[{"reason": reason, "rows": count} for reason, count in reasons.items()] or [{"reason": "none", "rows": 0}],
        description=f"Quarantined rows of {config.name}: {result['rows']['quarantined']} "
                    f"(train {result['rows']['train']}, test {result['rows']['test']} kept); "
                    f"labels folded by case/spacing: {result['report'].get('label_case', {}).get('folded_rows', 0)} "
                    f"rows. Rows: {result['quarantine']}",
    )
    return result
