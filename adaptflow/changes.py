"""Change detection: did anything that makes a model change since its latest version, and which partitions landed.

Two questions a production loop over a growing lake asks every night:

* **Unchanged run?** A version's *fingerprint* is sha256 over everything that determines it: the ingest snapshot's
  digest (the rows and their split), the config without its non-semantic keys (where it runs, where it is
  logged, which path spells the data or encoder), the encoder snapshot's digest, ``STAGE_VERSIONS`` and the
  library version. ``register_stage`` stores it as the version tag ``adaptflow.fingerprint``; a run whose
  fingerprint equals the latest version's registers nothing (:func:`check_unchanged`). The check imports neither
  torch nor MLflow: the encoder digest comes from the snapshot manifest in S3 (``s3://`` refs) or from hashing
  the folder's files (folders, packages), and the registry is asked over MLflow's REST API.
* **Which partitions are new?** :func:`diff_partitions` compares a listing (``sources.list_partitions``: path,
  size, ETag) with the last one seen, kept at ``watch/<digest>/seen.json`` in the bucket and replaced only by a
  conditional write (:func:`commit_seen`), so two watchers cannot both record one state.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import adaptflow
from adaptflow.config import RunConfig
from adaptflow.stages import STAGE_VERSIONS
from adaptflow.store import ArtifactStore, NotFoundError, parse_s3_uri

FINGERPRINT_TAG = "adaptflow.fingerprint"
# config keys that do not change the model: where it runs, where it is logged, how a path spells the inputs
# (the snapshot digest and the encoder digest stand for the data and the encoder themselves)
NON_SEMANTIC = {"orchestration": None, "mlflow": None, "data": ("train", "test"),
                "encoder": ("ref", "device", "tokens_per_batch")}
# MLflow run metrics that are the model's quality (what `retrain --json` reports as "metrics")
QUALITY_PREFIXES = ("accuracy", "macro_f1", "ece", "precision.", "recall.", "f1.", "support.")


# ------------------------------------------------------------------------------------------------ fingerprint


def semantic_config(config: RunConfig) -> dict:
    """The config as JSON-able data, without the keys in ``NON_SEMANTIC``."""
    tree = config.model_dump(mode="json")
    for section, keys in NON_SEMANTIC.items():
        if keys is None:
            tree.pop(section, None)
        else:
            for key in keys:
                tree.get(section, {}).pop(key, None)
    return tree


def fingerprint(*, data_digest: str, config: RunConfig, encoder_digest: str) -> str:
    """``"sha256:<hex>"`` over what determines a version (see the module docstring)."""
    payload = {"data": data_digest, "config": semantic_config(config), "encoder": encoder_digest,
               "stages": STAGE_VERSIONS, "library": adaptflow.__version__}
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def encoder_digest(ref: str, *, store: ArtifactStore, cache_dir=None) -> str | None:
    """The digest the resolve stage would pin for ``ref``, without torch: an ``s3://`` snapshot's manifest, or the
    hash of a folder's / package's files. None for a hub id (telling would mean asking the hub)."""
    from adaptflow.encoders import EncoderError, resolve_encoder

    if ref.startswith("s3://"):
        bucket, prefix = parse_s3_uri(ref)
        manifest = store.with_bucket(bucket).read_manifest(prefix.strip("/"))
        return (manifest or {}).get("meta", {}).get("digest") or None
    if ref.startswith("hf:"):
        return None
    try:
        resolved = resolve_encoder(ref, store=store, cache_dir=cache_dir) if _is_local(ref) else None
    except EncoderError:
        return None  # the resolve stage will say what is wrong
    return resolved.digest if resolved else None


def _is_local(ref: str) -> bool:
    """A folder or an installed package (not a hub id)."""
    import importlib.util
    from pathlib import Path

    if ref.startswith("package:") or Path(ref).expanduser().is_dir():
        return True
    name = ref.replace("-", "_")
    try:
        return "/" not in ref and name.isidentifier() and importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------ the registry


@dataclass
class LatestVersion:
    """The newest registered version of a model, as much as the unchanged check needs."""

    model_name: str
    version: str
    run_id: str
    tags: dict[str, str]
    aliases: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


class RegistryLookup:
    """Read-only MLflow registry access over the REST API (``requests``, ~0.3 s to import) for ``http(s)``
    tracking URIs; other URIs (``sqlite:``, ``databricks``) go through ``MlflowClient``."""

    def __init__(self, tracking_uri: str | None):
        self.tracking_uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "").rstrip("/")

    @property
    def over_http(self) -> bool:
        return self.tracking_uri.startswith(("http://", "https://"))

    def latest_version(self, model_name: str) -> LatestVersion | None:
        """The highest version of ``model_name`` with its tags, aliases and run metrics; None when it has none."""
        if not self.over_http:
            return self._latest_with_client(model_name)
        found = self._get("model-versions/search", params={
            "filter": f"name = '{model_name}'", "order_by": "version_number DESC", "max_results": 1})
        versions = found.get("model_versions", [])
        if not versions:
            return None
        v = versions[0]
        run = self._get("runs/get", params={"run_id": v["run_id"]}).get("run", {}) if v.get("run_id") else {}
        metrics = {m["key"]: float(m["value"]) for m in run.get("data", {}).get("metrics", [])}
        model = self._get("registered-models/get", params={"name": model_name}).get("registered_model", {})
        aliases = sorted(a["alias"] for a in model.get("aliases", []) if str(a.get("version")) == str(v["version"]))
        return LatestVersion(model_name, str(v["version"]), v.get("run_id", ""),
                             {t["key"]: t["value"] for t in v.get("tags", [])}, aliases, metrics)

    def _get(self, endpoint: str, params: dict) -> dict:
        import requests

        headers = {}
        if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
            headers["Authorization"] = f"Bearer {token}"
        auth = None
        if (user := os.environ.get("MLFLOW_TRACKING_USERNAME")) is not None:
            auth = (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
        response = requests.get(f"{self.tracking_uri}/api/2.0/mlflow/{endpoint}", params=params, headers=headers,
                                auth=auth, timeout=30)
        if response.status_code == 404 and "RESOURCE_DOES_NOT_EXIST" in response.text:
            return {}
        response.raise_for_status()
        return response.json()

    def _latest_with_client(self, model_name: str) -> LatestVersion | None:
        from mlflow.exceptions import MlflowException

        from adaptflow.registry import client_for

        client = client_for(self.tracking_uri or None)
        try:
            versions = client.search_model_versions(f"name = '{model_name}'", max_results=1,
                                                    order_by=["version_number DESC"])
        except MlflowException:
            return None
        if not versions:
            return None
        v = versions[0]
        metrics = dict(client.get_run(v.run_id).data.metrics) if v.run_id else {}
        return LatestVersion(model_name, str(v.version), v.run_id or "", dict(v.tags), sorted(v.aliases), metrics)


# ------------------------------------------------------------------------------------------------ the check


def check_unchanged(config: RunConfig, snapshot: dict, *, store: ArtifactStore, tracking_uri: str | None,
                    cache_dir=None) -> dict:
    """Compare this run's fingerprint with the latest version's.

    Args:
        snapshot: the ingest stage's result (its ``digest``).

    Returns:
        ``{"fingerprint", "unchanged_since"}`` plus, when unchanged, the summary ``retrain --json`` prints for a
        run that registered nothing: ``registered: false``, the version's ``model_name``, ``version``,
        ``aliases``, ``run_id``, ``model_uri``, ``metrics`` and ``rows``. ``unchanged_since`` is None when
        anything differs (or the encoder's digest cannot be told without loading it).
    """
    digest = encoder_digest(config.encoder.ref, store=store, cache_dir=cache_dir)
    if digest is None:
        return {"fingerprint": None, "unchanged_since": None}
    current = fingerprint(data_digest=snapshot["digest"], config=config, encoder_digest=digest)
    latest = RegistryLookup(tracking_uri).latest_version(config.name)
    if latest is None or latest.tags.get(FINGERPRINT_TAG) != current:
        return {"fingerprint": current, "unchanged_since": None,
                "latest_version": latest.version if latest else None}
    return {"fingerprint": current, **unchanged_summary(latest)}


def unchanged_summary(latest: LatestVersion) -> dict:
    """The ``--json`` summary of a run that registered nothing because ``latest`` already is this model."""
    m = latest.metrics
    return {
        "registered": False, "unchanged_since": latest.version,
        "run_id": latest.run_id, "model_name": latest.model_name, "version": latest.version,
        "aliases": latest.aliases, "decision": None,
        "reason": f"nothing changed since version {latest.version} (same data, config, encoder and stage code)",
        "model_uri": f"models:/{latest.model_name}/{latest.version}",
        "metrics": {k: v for k, v in m.items() if k.startswith(QUALITY_PREFIXES)},
        "rows": {k: int(m[f"rows_{k}"]) for k in ("train", "test", "quarantined") if f"rows_{k}" in m},
    }


# ------------------------------------------------------------------------------------------------ partitions seen


@dataclass
class PartitionChanges:
    """What a listing holds that the last seen one did not."""

    new: list[dict]
    changed: list[dict]
    removed: list[dict]
    current: list[dict]  # the whole listing, to record as seen
    seen_etag: str | None  # ETag of the seen state read (None: none yet), for the conditional write

    @property
    def any(self) -> bool:
        """New or changed partitions (a removal alone does not start a retrain)."""
        return bool(self.new or self.changed)


def config_locations(config: RunConfig) -> list[str]:
    """The data locations a config reads (train, then test), flattened."""
    locations: list[str] = []
    for value in (config.data.train, config.data.test):
        if value:
            locations += [value] if isinstance(value, str) else list(value)
    return locations


def seen_key(config_uri: str, config: RunConfig) -> str:
    """``watch/<digest>/seen.json``: one watched state per config URI and data locations."""
    digest = hashlib.sha256(json.dumps([config_uri, config_locations(config)]).encode()).hexdigest()[:16]
    return f"watch/{digest}/seen.json"


def diff_partitions(store: ArtifactStore, key: str, current: list[dict]) -> PartitionChanges:
    """Compare ``current`` (``sources.list_partitions``) with the state last committed at ``key``."""
    try:
        body, etag = store.get_bytes_and_etag(key)
        previous = {p["path"]: p for p in json.loads(body)["partitions"]}
    except NotFoundError:
        previous, etag = {}, None
    now = {p["path"]: p for p in current}
    new = [p for path, p in now.items() if path not in previous]
    changed = [p for path, p in now.items() if path in previous
               and (previous[path].get("etag"), previous[path].get("size")) != (p.get("etag"), p.get("size"))]
    removed = [p for path, p in previous.items() if path not in now]
    return PartitionChanges(new, changed, removed, current, etag)


def commit_seen(store: ArtifactStore, key: str, changes: PartitionChanges) -> str:
    """Record ``changes.current`` as seen, only if nobody replaced the state read (else ``ConflictError``)."""
    body = json.dumps({"partitions": changes.current}, sort_keys=True).encode()
    if changes.seen_etag is None:
        return store.put_bytes(key, body, if_none_match=True)
    return store.put_bytes(key, body, if_match=changes.seen_etag)


def list_config_partitions(config: RunConfig, store: ArtifactStore) -> list[dict]:
    """Every partition the config's data locations name (no rows read)."""
    from adaptflow.sources import list_partitions

    return list_partitions(config_locations(config), store=store)


def precheck(config: RunConfig, settings=None) -> dict:
    """What ``adaptflow retrain`` runs before it imports the flow: ingest (pandas/pyarrow only) + the check."""
    import time

    from adaptflow.stages import StageContext, ingest_stage

    started = time.perf_counter()
    ctx = StageContext.from_env(settings)
    snapshot = ingest_stage(ctx, config)
    result = check_unchanged(config, snapshot, store=ctx.store, tracking_uri=ctx.settings.mlflow_tracking_uri,
                             cache_dir=ctx.settings.cache_dir)
    return {**result, "seconds": {"check_unchanged": round(time.perf_counter() - started, 3)}}
