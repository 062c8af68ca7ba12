"""Drift tasks: sample a lake's new rows, compare them with a version's training rows (adaptflow.drift_check);
the report becomes a Prefect markdown artifact and an MLflow monitoring run, and ``adaptflow.drift.detected``
when the rows drifted."""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact

from adaptflow.drift import DriftRules
from adaptflow.drift_check import check_drift, load_sample, public_report, sample_location, save_sample
from adaptflow.drift_report import drift_markdown, log_monitoring_run
from adaptflow.scoring import model_from_dict
from tasks.events import emit_drift_detected
from tasks.policy import run_stage, stage_task


def _sample(ctx, model: dict, input: str, text_column: str, rules: dict) -> dict:
    texts, rows = sample_location(ctx, input, text_column, DriftRules.model_validate(rules))
    return {"sample": save_sample(ctx, model_from_dict(model), texts), "rows": rows}


def _check(ctx, model: dict, sample: str, input: str, rows: int | None, rules: dict, device: str) -> dict:
    report = check_drift(ctx, model_from_dict(model), load_sample(ctx, sample), DriftRules.model_validate(rules),
                         device=device, input=input, rows=rows)
    public = public_report(report)
    run_id = log_monitoring_run(ctx.settings.mlflow_tracking_uri, report, public)
    return {**public, "monitoring_run_id": run_id, "markdown": drift_markdown(report)}


@stage_task("sample_new_rows", timeout_seconds=3600)
def sample_new_rows(model: dict, input: str, text_column: str, rules: dict) -> dict:
    """A uniform sample of the texts at ``input`` (at most ``rules.sample_rows``), published for the check."""
    return run_stage(_sample, model, input, text_column, rules)


@stage_task("check_model_drift", timeout_seconds=3600)
def check_model_drift(model: dict, sample: str, input: str, rows: int | None, rules: dict, device: str = "cpu") -> dict:
    """New rows vs the version's training rows → report, artifact, monitoring run, and the event when drifted."""
    result = run_stage(_check, model, sample, input, rows, rules, device)
    drift = result["drift"]
    create_markdown_artifact(key="drift-report", markdown=result.pop("markdown"),
                             description=f"Drift of {drift['model_name']} v{drift['model_version']} on {input}")
    if drift["drifted"]:
        result["event_id"] = emit_drift_detected(drift, result["monitoring_run_id"])
    return result
