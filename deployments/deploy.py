"""Register work pools, the ``gpu`` concurrency limit and the retraining deployments on a Prefect server.

- ``retrain-from-config/retrain-nightly``: cron-scheduled, pool ``cpu``, concurrency limit 1 (a second
  scheduled run waits in the queue rather than racing the first).
- ``retrain-from-config/retrain-on-demand``: the same flow without a schedule, also one at a time.
- ``watch-data/watch-data``: every 10 minutes, lists the config's data partitions; new or changed ones emit
  ``adaptflow.data.changed``, on which ``retrain-on-demand`` has a trigger (``prefect.yaml`` declares the same).
  A second trigger starts it on ``adaptflow.drift.detected`` for the config's model (a scoring run or
  ``adaptflow drift`` found the new rows unlike the training rows); with no new labelled rows it registers nothing.
- ``embed-shard/gpu``: one part of the embed step when the rows to encode exceed ``orchestration.shard_rows``
  (``ADAPTFLOW_SHARD_DEPLOYMENT`` in the parents' job variables); each part holds a slot of ``gpu``.
- ``score/score-nightly`` (``deploy_scoring``): batch scoring of a lake with ``models:/NAME@champion``, pool
  ``cpu``, cron and on ``adaptflow.data.changed``; one at a time; idempotent per partition and model version.
- ``embed-and-train/gpu``: the embed + fit-head subflow on pool ``gpu``; the parent deployments call it through
  ``ADAPTFLOW_GPU_DEPLOYMENT`` (set as a job variable); embed + fit head hold one slot of the global limit ``gpu``
  (``tasks/gpu_slot.py``), so runs on several gpu workers never share one GPU.

Run it with ``adaptflow deploy`` (or ``python -m deployments.deploy``). Credentials are never deployment
parameters: workers take them from their own environment (``adaptflow worker`` exports them).
"""

from __future__ import annotations

from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.events import DeploymentEventTrigger
from prefect.exceptions import ObjectNotFound

from flows.embed_shard import FLOW_NAME as SHARD_FLOW, embed_shard
from flows.retrain import retrain_from_config
from flows.score import score as score_flow
from flows.train_gpu import FLOW_NAME as GPU_FLOW, embed_and_train
from flows.watch_data import watch_data

PROJECT_ROOT = Path(__file__).resolve().parents[1]
POOLS = {"cpu": "ingest, validate, tokenize, evaluate, register, gate", "gpu": "embed + fit head"}
GPU_DEPLOYMENT = f"{GPU_FLOW}/gpu"
SHARD_DEPLOYMENT = f"{SHARD_FLOW}/gpu"
NIGHTLY_CRON = "0 2 * * *"
WATCH_INTERVAL_S = 600  # watch-data's schedule (prefect.yaml says the same)
DATA_CHANGED_WINDOW_S = 300  # one retrain per burst of adaptflow.data.changed events
DRIFT_DETECTED = "adaptflow.drift.detected"
DRIFT_WINDOW_S = 3600  # one retrain per hour of drift events, however many scoring runs report it


def data_changed_trigger(config_uri: str) -> DeploymentEventTrigger:
    """retrain-on-demand's trigger: ``adaptflow.data.changed`` for this config starts one run (the first event
    fires, more within the window are ignored), as ``prefect.yaml`` declares it."""
    return DeploymentEventTrigger(
        name="retrain-when-data-lands", description="adaptflow.data.changed for this config starts one retrain",
        match={"prefect.resource.id": f"adaptflow.config.{config_uri}"}, expect={"adaptflow.data.changed"},
        posture="Reactive", threshold=1, within=DATA_CHANGED_WINDOW_S, parameters={"config_uri": config_uri})


def drift_detected_trigger(model_name: str, config_uri: str) -> DeploymentEventTrigger:
    """retrain-on-demand's second trigger: ``adaptflow.drift.detected`` for the config's model starts one run."""
    return DeploymentEventTrigger(
        name="retrain-on-drift", description=f"{DRIFT_DETECTED} for this config's model starts one retrain",
        match={"prefect.resource.id": f"adaptflow.model.{model_name}"}, expect={DRIFT_DETECTED},
        posture="Reactive", threshold=1, within=DRIFT_WINDOW_S, parameters={"config_uri": config_uri})


def ensure_pools(pool_type: str = "process") -> None:
    """Create the ``cpu`` and ``gpu`` work pools and the ``gpu`` global concurrency limit when missing."""
    with get_client(sync_client=True) as client:
        for name, role in POOLS.items():
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, description=f"adaptflow: {role}"))
        try:
            client.read_global_concurrency_limit_by_name("gpu")
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu", limit=1))


def deploy(config_uri: str, *, cron: str = NIGHTLY_CRON, timezone: str = "UTC", source: Path = PROJECT_ROOT,
           pool_type: str = "process", gpu: bool = True) -> list[str]:
    """Create or update the three deployments; returns their ``FLOW/NAME`` names.

    Args:
        config_uri: the YAML config the scheduled runs use (a local path the workers can read, or s3://).
        source: where workers load the flow code from (this checkout by default).
        gpu: route embed + fit head through the ``gpu`` pool; False runs them inline on the cpu worker.
    """
    from adaptflow.config import load_config

    model_name = load_config(config_uri).name  # what drift events name
    ensure_pools(pool_type)
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    job_env = {"env": {"ADAPTFLOW_GPU_DEPLOYMENT": GPU_DEPLOYMENT,
                       "ADAPTFLOW_SHARD_DEPLOYMENT": SHARD_DEPLOYMENT}} if gpu else {}
    parent = retrain_from_config.from_source(source=str(source), entrypoint="flows/retrain.py:retrain_from_config")
    parent.deploy(name="retrain-nightly", work_pool_name="cpu", cron=cron, parameters={"config_uri": config_uri},
                  concurrency_limit=one_at_a_time, job_variables=job_env, print_next_steps=False,
                  description="Nightly retrain → gate → promote", tags=["adaptflow", "nightly"])
    parent.deploy(name="retrain-on-demand", work_pool_name="cpu", parameters={"config_uri": config_uri},
                  concurrency_limit=one_at_a_time, job_variables=job_env, print_next_steps=False,
                  description="Retrain on request (same flow, no schedule)", tags=["adaptflow"],
                  triggers=[data_changed_trigger(config_uri), drift_detected_trigger(model_name, config_uri)])
    names = ["retrain-from-config/retrain-nightly", "retrain-from-config/retrain-on-demand"]
    watcher = watch_data.from_source(source=str(source), entrypoint="flows/watch_data.py:watch_data")
    watcher.deploy(name="watch-data", work_pool_name="cpu", interval=WATCH_INTERVAL_S,
                   parameters={"config_uri": config_uri}, print_next_steps=False, tags=["adaptflow", "watch"],
                   concurrency_limit=ConcurrencyLimitConfig(
                       limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
                   description="List the config's data partitions; new or changed → adaptflow.data.changed")
    names.append("watch-data/watch-data")
    if gpu:
        child = embed_and_train.from_source(source=str(source), entrypoint="flows/train_gpu.py:embed_and_train")
        child.deploy(name="gpu", work_pool_name="gpu", print_next_steps=False,
                     description="Embed (frozen encoder) + fit head on the GPU pool", tags=["adaptflow", "gpu"])
        names.append(GPU_DEPLOYMENT)
        names.append(deploy_shard(source))
    return names


def deploy_shard(source: Path = PROJECT_ROOT) -> str:
    """Create or update ``embed-shard/gpu``: one part of a fanned-out embed step on pool ``gpu`` (the parent
    submits every part; the ``gpu`` limit decides how many run at once)."""
    part = embed_shard.from_source(source=str(source), entrypoint="flows/embed_shard.py:embed_shard")
    part.deploy(name="gpu", work_pool_name="gpu", print_next_steps=False,
                description="Encode one part of the rows (fan-out above orchestration.shard_rows)",
                tags=["adaptflow", "gpu"])
    return SHARD_DEPLOYMENT


SCORE_CRON = "0 4 * * *"  # after retrain-nightly (02:00) has had its chance to promote a new champion
DATA_CHANGED = "adaptflow.data.changed"
SCORE_DEPLOYMENT = "score/score-nightly"


def score_data_changed_trigger(parameters: dict, *, config_uri: str | None = None,
                               within_s: int = 300) -> DeploymentEventTrigger:
    """score-nightly's trigger: ``adaptflow.data.changed`` (for ``config_uri``, or any watched config) starts one
    scoring run; scoring skips what it has already scored, so a run on an unrelated change costs a listing."""
    return DeploymentEventTrigger(
        name="score-when-data-lands", description=f"{DATA_CHANGED} starts one scoring run",
        match={"prefect.resource.id": f"adaptflow.config.{config_uri}" if config_uri else "adaptflow.config.*"},
        expect={DATA_CHANGED}, posture="Reactive", threshold=1, within=within_s,
        parameters=parameters)


def deploy_scoring(model_uri: str, input: str, output: str, *, cron: str = SCORE_CRON, timezone: str = "UTC",
                   source: Path = PROJECT_ROOT, config_uri: str | None = None, keep_columns: list[str] | None = None,
                   pool_type: str = "process") -> str:
    """Create or update ``score/score-nightly`` on pool ``cpu``: cron, and on ``adaptflow.data.changed``; one at a
    time (a second run waits). Returns its ``FLOW/NAME``.

    Args:
        model_uri: usually ``models:/NAME@champion``, so each run scores with whichever version is champion then.
        input / output: the lake to score and where the scores go (see ``adaptflow score``).
        config_uri: only data changes of this watched config trigger a run (default: any).
    """
    ensure_pools(pool_type)
    parameters = {"model_uri": model_uri, "input": input, "output": output,
                  **({"keep_columns": keep_columns} if keep_columns else {})}
    trigger = score_data_changed_trigger(parameters, config_uri=config_uri)
    flow = score_flow.from_source(source=str(source), entrypoint="flows/score.py:score")
    flow.deploy(name="score-nightly", work_pool_name="cpu", cron=cron, parameters=parameters, triggers=[trigger],
                concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
                print_next_steps=False, tags=["adaptflow", "nightly", "score"],
                description="Score new lake partitions with the champion (cached embeddings, idempotent)")
    return SCORE_DEPLOYMENT


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--pools"]:  # before `prefect deploy --all` from prefect.yaml: pools and limits only
        ensure_pools()
    else:
        print("\n".join(deploy(sys.argv[1] if len(sys.argv) > 1 else "examples/rotten_tomatoes.yaml")))
