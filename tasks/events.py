"""Prefect events adaptflow emits, so teams attach automations (Slack, email, webhook) without code.

| event | resource | payload |
| --- | --- | --- |
| ``adaptflow.data.changed`` | ``adaptflow.config.<config uri>`` | ``config_uri``, ``new``, ``changed``, ``removed`` partitions |
| ``adaptflow.model.promoted`` / ``.rejected`` / ``.held`` | ``adaptflow.model.<name>`` | ``model_name``, ``version``, ``reason``, ``metric``, ``delta``, ``champion_version`` |
| ``adaptflow.retrain.failed`` | ``adaptflow.model.<name>`` (or the config) | ``model_name``, ``version`` (null), ``reason``, ``flow_run_id`` |
| ``adaptflow.drift.detected`` | ``adaptflow.model.<name>`` | ``model_name``, ``version``, ``score``, ``ci_low``, ``ci_high``, ``label_psi``, ``input``, ``reasons``, ``monitoring_run_id`` |

Emitted inside a flow run, Prefect relates each event to that flow run, its flow and deployment. Events are
Prefect's, so they live here and not in the library.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

DATA_CHANGED = "adaptflow.data.changed"
RETRAIN_FAILED = "adaptflow.retrain.failed"
DRIFT_DETECTED = "adaptflow.drift.detected"
OUTCOMES = {"promote": "adaptflow.model.promoted", "reject": "adaptflow.model.rejected", "hold": "adaptflow.model.held"}


def config_resource(config_uri: str) -> dict[str, str]:
    """The resource of a watched config: what the retrain-on-demand trigger matches."""
    return {"prefect.resource.id": f"adaptflow.config.{config_uri}", "prefect.resource.name": config_uri}


def model_resource(model_name: str) -> dict[str, str]:
    return {"prefect.resource.id": f"adaptflow.model.{model_name}", "prefect.resource.name": model_name}


def emit_data_changed(config_uri: str, new: list[dict], changed: list[dict], removed: list[dict]) -> str | None:
    """``adaptflow.data.changed`` for ``config_uri``; returns the event id (None when the client is off)."""
    event = emit_event(DATA_CHANGED, resource=config_resource(config_uri),
                       payload={"config_uri": config_uri, "new": new, "changed": changed, "removed": removed})
    return str(event.id) if event else None


def emit_outcome(gate: dict, model_name: str, version: str) -> str | None:
    """``adaptflow.model.promoted|rejected|held`` after the gate decided on ``version``."""
    name = OUTCOMES.get(gate.get("decision", ""))
    if name is None:
        return None
    payload = {"model_name": model_name, "version": str(version), "reason": gate.get("reason"),
               **{k: gate.get(k) for k in ("decision", "metric", "delta", "p_value", "champion_version", "aliases")}}
    event = emit_event(name, resource={**model_resource(model_name), "adaptflow.version": str(version)},
                       payload=payload)
    return str(event.id) if event else None


def emit_failed(model_name: str | None, reason: str, *, flow_run_id: str | None = None,
                config_uri: str | None = None) -> str | None:
    """``adaptflow.retrain.failed``: the model (or, when the config never loaded, the config) and why."""
    resource = model_resource(model_name) if model_name else config_resource(config_uri or "unknown")
    event = emit_event(RETRAIN_FAILED, resource=resource,
                       payload={"model_name": model_name, "version": None, "reason": reason[:4000],
                                "flow_run_id": flow_run_id, "config_uri": config_uri})
    return str(event.id) if event else None


def emit_drift_detected(drift: dict, monitoring_run_id: str | None = None) -> str | None:
    """``adaptflow.drift.detected`` for the model version a drift check found drifted (the ``drift`` report)."""
    payload = {"model_name": drift["model_name"], "version": str(drift["model_version"]),
               "label_psi": drift["label_shift"]["psi"], "monitoring_run_id": monitoring_run_id,
               **{k: drift.get(k) for k in ("score", "ci_low", "ci_high", "input", "reasons")}}
    event = emit_event(DRIFT_DETECTED, resource={**model_resource(drift["model_name"]),
                                                 "adaptflow.version": str(drift["model_version"])}, payload=payload)
    return str(event.id) if event else None


@task(name="announce_outcome", cache_policy=NO_CACHE)
def announce_outcome(gate: dict, model_name: str, version: str) -> str | None:
    """The gate's decision as an event (a task, so the flow run's graph shows it)."""
    return emit_outcome(gate, model_name, version)


def announce_failure(flow, flow_run, state) -> None:
    """``on_failure`` hook of the retrain flow: ``adaptflow.retrain.failed`` with the model name and the message."""
    parameters = flow_run.parameters or {}
    config = parameters.get("config") or {}
    name = config.get("name") if isinstance(config, dict) else getattr(config, "name", None)
    emit_failed(name, state.message or str(state.type), flow_run_id=str(flow_run.id),
                config_uri=parameters.get("config_uri"))
