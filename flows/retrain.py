"""The retraining flow: labelled data in, a registered MLflow model with aliases out."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "adaptflow")  # library logs show in the flow run

from prefect import flow
from prefect.runtime import flow_run

from adaptflow import serving_check
from adaptflow.config import RunConfig
from tasks.changes import check_unchanged_task
from tasks.data import ingest_data, validate_data
from flows.embed_shard import fan_out_embed
from flows.train_gpu import FLOW_NAME as GPU_FLOW, embed_and_train
from tasks.embedding import resolve_encoder, run_on_gpu_pool, tokenize_texts
from tasks.events import announce_failure, announce_outcome, emit_failed
from tasks.promotion import gate_model
from tasks.registry import register_model
from tasks.training import evaluate_head


@flow(name="retrain", log_prints=True, on_failure=[announce_failure])
def retrain(config: RunConfig, force: bool = False) -> dict:
    """ingest → (unchanged? stop) → validate → tokenize → embed (cached) → fit head → evaluate → register → gate.

    Args:
        config: the validated run configuration (see adaptflow.config.RunConfig).
        force: retrain even when data, config, encoder and stage code equal the latest version's.

    Returns:
        The run summary: model version and aliases, metrics, row counts, cache hits, seconds and S3 requests
        and bytes read per stage;
        for an unchanged run ``registered: false`` and ``unchanged_since`` (the version it would have repeated).
    """
    snapshot = ingest_data(config)  # data first: bad data fails in seconds, before any model is loaded
    check = check_unchanged_task(config, snapshot)
    if check["unchanged_since"] and not force:  # nothing changed: no version, no alias move, no event
        print(check["reason"])
        return {**check, "seconds": {"ingest": snapshot["seconds"], "check_unchanged": check["seconds"]}}
    validated = validate_data(config, snapshot)
    encoder = resolve_encoder(config)
    if config.gate.smoke_test and not (check.get("unchanged_since") or check.get("latest_version")):
        # a first version is promoted unless it misses a floor: its serving check's fresh interpreter imports its
        # libraries while the stages run (later versions, mostly held, start theirs only on promote)
        serving_check.prestart(config.name)
    tokens = tokenize_texts(config, validated, encoder)
    fan_out_embed(config, tokens, encoder)  # above orchestration.shard_rows: parts on the gpu pool, then all cached
    gpu_deployment = config.orchestration.gpu_deployment or os.environ.get("ADAPTFLOW_GPU_DEPLOYMENT")
    if gpu_deployment:  # the heavy part runs on the gpu pool's worker
        trained = run_on_gpu_pool(gpu_deployment, GPU_FLOW, {"config": config.model_dump(mode="json"),
                                  "tokens": tokens, "validated": validated, "encoder": encoder}, str(flow_run.id))
    else:
        trained = embed_and_train(config, tokens, validated, encoder)
    embedded, head = trained["embedded"], trained["head"]
    evaluation = evaluate_head(config, validated, encoder, embedded, head)
    registered = register_model(config, encoder=encoder, snapshot=snapshot, validated=validated,
                                embedded=embedded, head=head, evaluation=evaluation)
    gate = gate_model(config, validated, registered)
    announce_outcome(gate, registered["model_name"], registered["version"])
    stages = {"resolve_encoder": encoder, "ingest": snapshot, "validate": validated, "tokenize": tokens,
              "embed": embedded, "train_head": head, "evaluate": evaluation, "register": registered,
              "gate": gate, "check_unchanged": check}
    return {
        "registered": True,
        "unchanged_since": None,
        "run_id": registered["run_id"],
        "model_name": registered["model_name"],
        "version": registered["version"],
        "aliases": gate["aliases"],
        "decision": gate["decision"],
        "reason": gate["reason"],
        "gate": {k: gate.get(k) for k in ("metric", "delta", "ci_low", "ci_high", "p_value", "champion_version",
                                          "rows_compared", "rows_excluded")},
        "model_uri": f"models:/{registered['model_name']}/{registered['version']}",
        "metrics": evaluation["metrics"],
        "head_kind": head.get("kind", config.head.kind),
        "head_selection": head.get("auto"),  # head.kind: auto: choice, reasons, curves, seconds per candidate
        "rows": validated["rows"],
        "embeddings": {"encoded": embedded["encoded"], "cached": embedded["cached"],
                       "dtype": embedded["dtype"], "tokens_per_s": embedded["tokens_per_s"],
                       "corrupt": embedded.get("corrupt", {"shards_ignored": 0, "rows_reencoded": 0})},
        "artifacts": {"snapshot": snapshot["snapshot"], "validated": validated["validated"],
                      "embeddings": embedded["cache"], "head": head["head"], "adapter": head.get("adapter"),
                      "evaluation": evaluation["evaluation"]},
        "seconds": {name: stage["seconds"] for name, stage in stages.items()},
        "s3": {name: stage.get("s3") for name, stage in stages.items()},  # requests and bytes read per stage
    }


@flow(name="retrain-from-config", log_prints=True)
def retrain_from_config(config_uri: str, overrides: list[str] | None = None, force: bool = False) -> dict:
    """Deployment entry point: load a YAML config (local path or s3:// URI), apply overrides, retrain.

    Args:
        config_uri: where the config lives; configs in S3 let a team change a nightly job without a redeploy.
        overrides: ``key.path=value`` strings, as ``adaptflow retrain --set`` takes them.
        force: retrain even when nothing changed since the latest version.
    """
    from adaptflow.config import load_config

    try:
        config = load_config(config_uri, overrides or [])
    except Exception as exc:  # the retrain subflow's hook announces failures once it runs; this is before it
        emit_failed(None, str(exc), flow_run_id=str(flow_run.id), config_uri=config_uri)
        raise
    return retrain(config, force=force)
