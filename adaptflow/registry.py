"""MLflow: one run per flow run, the pyfunc model, its registered version and aliases.

Registration is idempotent per flow run: the run carries the tag ``adaptflow.flow_run_id``; a retry after a
crash or a tracking-server outage finds that run (and its version, if one was made) instead of making another.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from adaptflow.serving import ModelSpec, pip_requirements

FLOW_RUN_TAG = "adaptflow.flow_run_id"
CHAMPION, CHALLENGER = "champion", "challenger"
LIBRARY_DIR = Path(__file__).resolve().parent
MODEL_CODE = LIBRARY_DIR / "pyfunc_model.py"  # logged as code: nothing in a registered model is a pickle


@dataclass
class DatasetInput:
    """A dataset the run consumed, logged with ``mlflow.log_input``."""

    frame: pd.DataFrame
    name: str
    source: str
    digest: str
    context: str


@dataclass
class RunRecord:
    """Everything one training run logs."""

    params: dict[str, object]
    metrics: dict[str, float]
    tags: dict[str, str]
    datasets: list[DatasetInput] = field(default_factory=list)
    artifacts_dir: Path | None = None  # logged as-is (report, confusion matrix, quarantine report)


@dataclass
class RegisteredVersion:
    """The outcome of a registration."""

    run_id: str
    model_name: str
    version: str
    aliases: list[str]
    model_uri: str


def client_for(tracking_uri: str | None) -> MlflowClient:
    """A client bound to ``tracking_uri`` (also made the process default, which the fluent API needs)."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    return MlflowClient()


def find_run(client: MlflowClient, experiment: str, flow_run_id: str):
    """The run an earlier attempt of this flow run created, or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'")
    return runs[0] if runs else None


def version_of_run(client: MlflowClient, model_name: str, run_id: str):
    """The registered version created from ``run_id``, or None."""
    try:
        versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    return versions[0] if versions else None


def aliases_of(client: MlflowClient, model_name: str, version: str) -> list[str]:
    """The aliases pointing at ``version``."""
    return sorted(client.get_model_version(model_name, version).aliases)


def current_alias(client: MlflowClient, model_name: str, alias: str):
    """The version behind ``alias``, or None when the alias (or the model) does not exist."""
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def log_and_register(
    *,
    tracking_uri: str | None,
    experiment: str,
    model_name: str,
    flow_run_id: str,
    record: RunRecord,
    head_path: Path,
    spec: ModelSpec,
    input_texts: list[str],
    version_tags: dict[str, str],
    adapter_path: Path | None = None,
) -> RegisteredVersion:
    """Log a run with its pyfunc model, register a version, set ``challenger`` (and ``champion`` if none).

    Args:
        flow_run_id: idempotency key; a second call for the same flow run returns the first version.
        input_texts: a few texts for the model's input example and signature.
        adapter_path: a LoRA adapter (adaptflow.adapters) shipped beside the head; the pyfunc merges it.
    """
    client = client_for(tracking_uri)
    mlflow.set_experiment(experiment)
    previous = find_run(client, experiment, flow_run_id)
    if previous is not None:
        existing = version_of_run(client, model_name, previous.info.run_id)
        if existing is not None:  # an earlier attempt registered it, then lost the answer (e.g. MLflow restarted)
            if previous.info.status != "FINISHED":  # its `with start_run` ended with the failure: close it now
                client.set_terminated(previous.info.run_id, "FINISHED")
            return _finish(client, model_name, previous.info.run_id, existing.version, existing.source)

    run_id = previous.info.run_id if previous else None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else f"{model_name}-{flow_run_id[:8]}",
                          tags={FLOW_RUN_TAG: flow_run_id, **record.tags}) as run:
        if run_id is None:  # params are immutable: log them once
            mlflow.log_params({k: str(v)[:6000] for k, v in record.params.items()})
        mlflow.log_metrics(record.metrics)
        for ds in record.datasets:
            dataset = mlflow.data.from_pandas(ds.frame, source=ds.source, name=ds.name, targets="label", digest=ds.digest)
            mlflow.log_input(dataset, context=ds.context)
        if record.artifacts_dir is not None:
            mlflow.log_artifacts(str(record.artifacts_dir))
        model_info = _log_model(head_path, spec, input_texts, adapter_path)
        version = mlflow.register_model(model_info.model_uri, model_name, tags=version_tags)
        return _finish(client, model_name, run.info.run_id, version.version, model_info.model_uri)


def _log_model(head_path: Path, spec: ModelSpec, input_texts: list[str], adapter_path: Path | None = None):
    """Log the pyfunc as code (``MODEL_CODE``; head + spec as artifacts, the library as ``code_paths``) with an
    explicit signature: MLflow stores files, not a cloudpickled object."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "model_spec.json"
        spec_path.write_text(spec.to_json())
        example = pd.DataFrame({"text": input_texts})
        if spec.task == "multilabel":  # a list of labels per row
            output = pd.DataFrame({"labels": pd.Series([[spec.labels[0]]] * len(input_texts), dtype=object)})
        else:
            output = pd.DataFrame({"label": [spec.labels[0]] * len(input_texts)})
        for label in spec.labels:
            output[f"proba_{label}"] = 1.0 / len(spec.labels)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={"head": str(head_path), "model_spec": str(spec_path),
                       **({"adapter": str(adapter_path)} if adapter_path else {})},
            code_paths=[str(LIBRARY_DIR)],
            pip_requirements=pip_requirements(),
            signature=infer_signature(example, output),
            input_example=example,
        )


def _finish(client: MlflowClient, model_name: str, run_id: str, version: str, model_uri: str) -> RegisteredVersion:
    """Point ``challenger`` at the new version; ``champion`` moves only through the gate (or a person)."""
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    return RegisteredVersion(run_id, model_name, str(version), aliases_of(client, model_name, version), model_uri)


# ------------------------------------------------------------------------------------------ alias audit trail
# Every move of an alias is recorded as one registered-model tag ``adaptflow.audit.<ns timestamp>`` holding
# {at, alias, from, to, actor, kind, reason}; ``alias_history`` reads them back in order.
AUDIT_PREFIX = "adaptflow.audit."


def move_alias(client: MlflowClient, model_name: str, alias: str, version: str, *, reason: str, actor: str,
               kind: str) -> dict:
    """Point ``alias`` at ``version`` and append the move to the model's audit trail.

    Args:
        kind: why it moved: ``gate`` (automatic promotion), ``manual`` (adaptflow promote), ``rollback``.
    """
    previous = current_alias(client, model_name, alias)
    entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "alias": alias,
             "from": previous.version if previous else None, "to": str(version), "actor": actor,
             "kind": kind, "reason": reason[:2000]}
    client.set_registered_model_alias(model_name, alias, str(version))
    client.set_registered_model_tag(model_name, f"{AUDIT_PREFIX}{time.time_ns()}", json.dumps(entry))
    return entry


def alias_history(client: MlflowClient, model_name: str) -> list[dict]:
    """The model's alias moves, oldest first."""
    tags = client.get_registered_model(model_name).tags
    keys = sorted((k for k in tags if k.startswith(AUDIT_PREFIX)), key=lambda k: int(k[len(AUDIT_PREFIX):]))
    return [json.loads(tags[k]) for k in keys]


def rollback_target(history: list[dict], current: str | None) -> str | None:
    """The champion before the current one: the ``from`` of the last forward move onto ``current``."""
    for entry in reversed(history):
        if entry["alias"] == CHAMPION and entry["to"] == current and entry["kind"] != "rollback" and entry["from"]:
            return entry["from"]
    return None


def rollback(client: MlflowClient, model_name: str, *, reason: str, actor: str) -> dict:
    """Move ``champion`` back to the previous champion (recorded); ValueError when there is none."""
    current = current_alias(client, model_name, CHAMPION)
    target = rollback_target(alias_history(client, model_name), current.version if current else None)
    if target is None:
        raise ValueError(f"{model_name}: no previous champion to roll back to "
                         f"(current champion: {current.version if current else 'none'}); "
                         f"use `adaptflow promote {model_name} VERSION --reason ...` to pick one")
    return move_alias(client, model_name, CHAMPION, target, reason=reason, actor=actor, kind="rollback")
