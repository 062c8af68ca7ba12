"""Security: credentials stay secret, the store demands signatures, weights never execute code, digests are
checked after every download.

- A real run (flow under the Prefect harness, tiny encoder) is grepped for the S3 keys: console output, the
  Prefect flow-run parameters, artifacts and logs, the MLflow run's params/tags/artifacts and the model
  version's tags, and the service logs of the stack.
- The generated credentials file is 0600; SeaweedFS refuses unsigned requests.
- Weights load from safetensors only: a booby-trapped pickle next to (or instead of) them is never unpickled,
  remote code named by ``auto_map`` is never imported, and the code base passes an AST audit
  (``trust_remote_code`` never true, ``torch.load`` only with ``weights_only=True``, no pickle loaders).
- A registered model is safetensors + JSON + code: every file of the version (zip members included) is scanned
  for pickle content, and it loads with MLflow's pickle deserialization switched off.
- Encoder snapshots, published stage outputs and S3 data files are verified after download.
"""

from __future__ import annotations

import ast
import asyncio
import io
import json
import logging
import os
import pickle
import pickletools
import shutil
import stat
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from adaptflow.config import build_config
from adaptflow.encoders import EncoderError, load_encoder, push_encoder, resolve_encoder, snapshot_files
from adaptflow.stack_state import read_stack_state
from adaptflow.store import ArtifactStore, IntegrityError, StoreError
from tests.fixtures.faults import scan_bucket

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("adaptflow", "tasks", "flows")


# ---------------------------------------------------------------------------------------------- credentials


@pytest.fixture
def store(test_settings, fresh_bucket) -> ArtifactStore:
    return ArtifactStore.from_settings(test_settings, bucket=fresh_bucket)


def test_generated_credentials_file_is_0600_and_stays_so(stack_services):
    path = Path(stack_services["state_dir"]) / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path, 0o644)  # someone loosened it: the next read tightens it again
    try:
        assert read_stack_state(stack_services["state_dir"]).credentials["aws_secret_access_key"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.chmod(path, 0o600)


def test_s3_server_rejects_unsigned_requests(test_settings, store):
    store.ensure_bucket()
    store.put_bytes("private.txt", b"secret data")
    for method, data in (("GET", None), ("PUT", b"overwritten"), ("DELETE", None)):
        request = urllib.request.Request(f"{test_settings.s3_endpoint_url}/{store.bucket}/private.txt",
                                         data=data, method=method)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403, method
    listing = urllib.request.Request(f"{test_settings.s3_endpoint_url}/{store.bucket}?list-type=2")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(listing, timeout=10)
    assert refused.value.code == 403
    anonymous = ArtifactStore(store.bucket, endpoint_url=test_settings.s3_endpoint_url, anonymous=True)
    with pytest.raises(StoreError, match="access denied"):
        anonymous.get_bytes("private.txt")
    assert store.get_bytes("private.txt") == b"secret data"


@pytest.fixture
def flow_env(services_env, fresh_bucket, monkeypatch, prefect_harness, test_settings) -> ArtifactStore:
    monkeypatch.setenv("ADAPTFLOW_BUCKET", fresh_bucket)
    return ArtifactStore.from_settings(test_settings, bucket=fresh_bucket)


async def _prefect_records(flow_run_id: str) -> list[str]:
    """Everything Prefect stored about a flow run and its subflow: parameters, artifacts, logs."""
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    parent = UUID(flow_run_id)
    async with get_client() as client:
        runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parent])))
        runs += await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
        ids = [run.id for run in runs]
        assert parent in ids and len(ids) >= 2, "the run and its embed-and-train subflow"
        texts = [json.dumps(run.model_dump(mode="json"), default=str) for run in runs]  # parameters included
        artifacts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        assert artifacts, "no Prefect artifacts stored: the grep would prove nothing"
        texts += [json.dumps(artifact.model_dump(mode="json"), default=str) for artifact in artifacts]
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
        assert logs, "no Prefect logs stored: the grep would prove nothing"
        texts += [log.message for log in logs]
    return texts


def _mlflow_records(settings, model_name: str, tmp_path: Path) -> list[str]:
    """The registered model's and its version's tags, the run's params, tags and every artifact file."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    texts = [json.dumps(client.get_registered_model(model_name).tags)]
    for version in client.search_model_versions(f"name = '{model_name}'"):
        texts.append(json.dumps(version.tags))
        run = client.get_run(version.run_id)
        texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
        local = Path(download_artifacts(run_id=version.run_id, dst_path=str(tmp_path / version.run_id),
                                        tracking_uri=settings.mlflow_tracking_uri))
        files = [p for p in local.rglob("*") if p.is_file()]
        assert files, "no run artifacts downloaded: the grep would prove nothing"
        texts += [p.read_bytes().decode("utf-8", errors="replace") for p in files]
    return texts


# S3 operation -> the IAM action AWS authorises it as
IAM_ACTION = {"HeadObject": "s3:GetObject", "GetObject": "s3:GetObject", "PutObject": "s3:PutObject",
              "CreateMultipartUpload": "s3:PutObject", "UploadPart": "s3:PutObject",
              "CompleteMultipartUpload": "s3:PutObject", "AbortMultipartUpload": "s3:AbortMultipartUpload",
              "ListObjectsV2": "s3:ListBucket", "HeadBucket": "s3:ListBucket", "DeleteObject": "s3:DeleteObject",
              "CreateBucket": "s3:CreateBucket"}
WORKER_POLICY = ROOT / "infra" / "s3-worker-policy.json"


def record_s3_calls(monkeypatch) -> list[tuple[str, str, str | None]]:
    """(operation, bucket, key or prefix) of every request any ArtifactStore of this process sends."""
    calls: list[tuple[str, str, str | None]] = []
    real_init = ArtifactStore.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.client.meta.events.register_first(
            "before-parameter-build.s3", lambda model, params, **_: calls.append(
                (model.name, params.get("Bucket"), params.get("Key", params.get("Prefix")))),
            unique_id="adaptflow-test-audit")

    monkeypatch.setattr(ArtifactStore, "__init__", init)
    return calls


def denied_by_policy(calls, bucket: str, policy: dict) -> list[str]:
    """The recorded calls the worker policy (written for bucket ``adaptflow``) would refuse."""
    from fnmatch import fnmatchcase

    refused = []
    for operation, call_bucket, key in sorted(set(calls), key=str):
        action = IAM_ACTION.get(operation, f"s3:{operation}")
        allowed = False
        for statement in policy["Statement"]:
            if action not in statement["Action"]:
                continue
            resources = [r.replace(":::adaptflow", f":::{bucket}") for r in statement["Resource"]]
            if action == "s3:ListBucket":
                prefixes = statement.get("Condition", {}).get("StringLikeIfExists", {}).get("s3:prefix")
                allowed |= f"arn:aws:s3:::{call_bucket}" in resources and (
                    prefixes is None or key is None or any(fnmatchcase(key, p) for p in prefixes))
            else:
                allowed |= any(fnmatchcase(f"arn:aws:s3:::{call_bucket}/{key}", r) for r in resources)
        if not allowed:
            refused.append(f"{operation} ({action}) on s3://{call_bucket}/{key or ''}")
    return refused


@pytest.fixture
def console_logs(monkeypatch) -> list[str]:
    """Every log record of this test at INFO and above, from any logger, formatted with its traceback: what a
    console would show (hooked into Logger.callHandlers, so Prefect reconfiguring its handlers does not matter)."""
    lines: list[str] = []
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    real = logging.Logger.callHandlers

    def call_handlers(self, record):
        if record.levelno >= logging.INFO:
            lines.append(formatter.format(record))
        return real(self, record)

    monkeypatch.setattr(logging.Logger, "callHandlers", call_handlers)
    return lines


def tiny_film_config(tmp_path, encoder_path, name: str, *, rows: int):
    """A two-class config over ``rows`` short texts and the tiny encoder (no serving smoke test)."""
    frame = pd.DataFrame({"text": [f"good film {i}" if i % 2 else f"bad film {i}" for i in range(rows)],
                          "label": ["pos" if i % 2 else "neg" for i in range(rows)]})
    frame.to_csv(tmp_path / "train.csv", index=False)
    return build_config({"name": name, "data": {"train": str(tmp_path / "train.csv")},
                         "encoder": {"ref": str(encoder_path), "max_length": 16}, "gate": {"smoke_test": False}})


def test_a_real_run_leaks_no_credentials_and_needs_only_the_granted_s3_actions(
        flow_env, tmp_path, tiny_encoder_path, test_settings, stack_services, console_logs, monkeypatch):
    """One real run, two audits: no S3 key in anything it leaves behind, and every S3 request it sends is one
    that infra/s3-worker-policy.json (the documented least privilege) grants. (The CLI's own stdout/stderr are
    grepped in tests/test_bad_input.py.)"""
    from flows.retrain import retrain

    s3_calls = record_s3_calls(monkeypatch)

    config = tiny_film_config(tmp_path, tiny_encoder_path, "security-grep", rows=60)
    summary = retrain(config)
    run_id = summary["run_id"]
    from mlflow import MlflowClient

    uri = test_settings.mlflow_tracking_uri
    flow_run_id = MlflowClient(uri, registry_uri=uri).get_run(run_id).data.tags["adaptflow.flow_run_id"]
    assert any("Finished in state Completed" in line for line in console_logs), console_logs[-5:]
    texts = [*console_logs, json.dumps(summary, default=str)]
    texts += asyncio.run(_prefect_records(flow_run_id))
    texts += _mlflow_records(test_settings, "security-grep", tmp_path)
    logs = Path(stack_services["state_dir"]) / "logs"
    service_logs = [p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file()]
    assert service_logs

    def leaks(value: str, where: list[str]) -> list[str]:
        assert value and len(value) >= 16
        return [t[max(0, t.index(value) - 200): t.index(value) + 50] for t in where if value in t]

    # the secret key: nowhere at all, the services' own logs included
    assert not leaks(test_settings.secret_key, texts + service_logs)
    # the access key id (an identifier, not a secret): not in anything adaptflow, Prefect or MLflow keep. SeaweedFS
    # logs it at start ("Added admin identity ... accessKey=..."), so its logs live in the private (0700) state dir
    assert not leaks(test_settings.aws_access_key_id, texts), "the S3 access key id leaked"
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700 and not Path(stack_services["state_dir"]).stat().st_mode & 0o077

    # least privilege: what the worker really sent, against the policy a team is told to grant
    assert {op for op, _, _ in s3_calls} >= {"PutObject", "GetObject", "HeadObject", "ListObjectsV2"}
    assert {b for _, b, _ in s3_calls} == {flow_env.bucket}
    refused = denied_by_policy(s3_calls, flow_env.bucket, json.loads(WORKER_POLICY.read_text()))
    assert not refused, "the worker policy would refuse:\n" + "\n".join(refused)


# ---------------------------------------------------------------------------------------------- weights


class _Trap:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def tiny_copy(tiny_encoder_path, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_encoder_path, tmp_path / "tiny"))


def test_pickle_weights_are_never_unpickled(tiny_copy, tmp_path):
    marker = tmp_path / "pickle-was-executed"
    with open(tiny_copy / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weights": _Trap(marker)}, f)
    _, model = load_encoder(resolve_encoder(tiny_copy))  # safetensors is there: the .bin is ignored
    assert model is not None and not marker.exists()
    assert "pytorch_model.bin" not in snapshot_files(tiny_copy)  # neither hashed nor pushed

    (tiny_copy / "model.safetensors").unlink()  # only the pickle left: refused, not loaded
    with pytest.raises(EncoderError, match="pickle weights are refused"):
        load_encoder(resolve_encoder(tiny_copy))
    assert not marker.exists()


def test_remote_code_named_by_the_config_is_never_imported(tiny_copy, tmp_path):
    marker = tmp_path / "remote-code-was-executed"
    (tiny_copy / "modeling_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import BertModel\nclass EvilModel(BertModel):\n    pass\n")
    config = json.loads((tiny_copy / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    (tiny_copy / "config.json").write_text(json.dumps(config))
    try:
        _, model = load_encoder(resolve_encoder(tiny_copy))
        assert type(model).__name__ == "BertModel"
    except EncoderError as refused:  # refusing is fine too; running the file is not
        assert "trust_remote_code" in str(refused) or "modeling_evil" in str(refused)
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
            yield node, owner, name, {k.arg: k.value for k in node.keywords if k.arg}


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def test_code_never_loads_untrusted_code_or_pickles():
    """AST audit of adaptflow/, tasks/, flows/: every model load is safetensors-only and remote code stays off."""
    problems, model_loads = [], 0
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node, owner, name, kwargs in _calls(tree):
                where = f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:100]}"
                if "trust_remote_code" in kwargs and not _is_const(kwargs["trust_remote_code"], False):
                    problems.append(f"trust_remote_code not False: {where}")
                if name == "from_pretrained" and "Tokenizer" not in owner and "Config" not in owner:
                    model_loads += 1
                    if not _is_const(kwargs.get("use_safetensors"), True):
                        problems.append(f"model load without use_safetensors=True: {where}")
                    if not _is_const(kwargs.get("trust_remote_code"), False):
                        problems.append(f"model load without an explicit trust_remote_code=False: {where}")
                if name == "load" and owner in ("torch",) and not _is_const(kwargs.get("weights_only"), True):
                    problems.append(f"torch.load without weights_only=True: {where}")
                if name in ("load", "loads", "Unpickler") and owner in ("pickle", "cloudpickle", "dill", "joblib"):
                    problems.append(f"pickle loader: {where}")
                allow_pickle = kwargs.get("allow_pickle", ast.Constant(False))
                if name == "load" and owner in ("np", "numpy") and not _is_const(allow_pickle, False):
                    problems.append(f"numpy load with pickles: {where}")
                if name == "load" and owner == "yaml":
                    problems.append(f"yaml.load (use yaml.safe_load): {where}")
                if name in ("eval", "exec") and not owner:
                    problems.append(f"{name}(): {where}")
    assert model_loads >= 1, "found no model loads: the audit needs updating"
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------- the packaged model

PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".dill", ".pt", ".pth")


def is_pickle_stream(data: bytes) -> bool:
    """True when ``data`` is a pickle (protocol 2-5: PROTO opcode first, then opcodes up to STOP)."""
    if len(data) < 3 or data[0] != pickle.PROTO[0] or not 2 <= data[1] <= 5:
        return False
    try:
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
    except Exception:
        return False
    return True


def pickle_findings(name: str, data: bytes) -> list[str]:
    """Why ``name`` counts as a pickle: its name, its bytes, or those of a zip member (torch.save is a zip)."""
    found = [f"{name}: pickle file name"] if name.lower().endswith(PICKLE_SUFFIXES) else []
    if is_pickle_stream(data):
        found.append(f"{name}: pickle stream")
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for member in archive.namelist():
                found += pickle_findings(f"{name}!{member}", archive.read(member))
    return found


def test_pickle_scanner_finds_pickles():
    """The scanner the next test relies on is not vacuous: plain, cloudpickled and zipped pickles are found."""
    import cloudpickle

    assert pickle_findings("a.json", pickle.dumps({"a": 1}, protocol=2)) == ["a.json: pickle stream"]
    assert pickle_findings("model", cloudpickle.dumps(_Trap(Path("x")))) == ["model: pickle stream"]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps([1, 2]))
    assert pickle_findings("weights", buffer.getvalue()) == ["weights!archive/data.pkl: pickle file name",
                                                             "weights!archive/data.pkl: pickle stream"]
    assert pickle_findings("MLmodel", b"flavors:\n  python_function: {}\n") == []
    assert pickle_findings("head.safetensors", b"\x80\x02 not really a pickle") == []


def test_a_registered_model_is_safetensors_json_and_code_without_pickles(
        flow_env, tmp_path, tiny_encoder_path, test_settings, console_logs, monkeypatch):
    """Register through the real flow, download every file of the version: no pickle anywhere, no cloudpickle
    warning at registration, and it loads and predicts with MLflow's pickle deserialization switched off."""
    import mlflow.pyfunc
    from mlflow.artifacts import download_artifacts

    from flows.retrain import retrain

    config = tiny_film_config(tmp_path, tiny_encoder_path, "no-pickle", rows=40)
    summary = retrain(config)
    model_uri = f"models:/no-pickle/{summary['version']}"
    local = Path(download_artifacts(model_uri, dst_path=str(tmp_path / "model"),
                                    tracking_uri=test_settings.mlflow_tracking_uri))
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert {"MLmodel", "artifacts/head.safetensors", "artifacts/model_spec.json"} <= set(files), files
    assert any(f.startswith("code/adaptflow/") for f in files), f"the library does not travel with it: {files}"
    findings = [hit for f in files for hit in pickle_findings(f, (local / f).read_bytes())]
    assert not findings, f"pickle content in the registered model: {findings}; its files: {files}"
    warned = [line for line in console_logs if "cloudpickle" in line.lower()]
    assert not warned, warned

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(model_uri)
    assert model.predict(pd.DataFrame({"text": ["good film"]}))["label"].tolist()[0] in ("neg", "pos")


# ---------------------------------------------------------------------------------------------- digests


def test_encoder_snapshot_is_verified_after_download(tiny_encoder_path, store, tmp_path):
    s3_ref, digest = push_encoder(tiny_encoder_path, "tiny", store)
    resolved = resolve_encoder(s3_ref, store=store, cache_dir=tmp_path / "cache")
    assert resolved.digest == digest
    prefix = s3_ref.split(f"{store.bucket}/", 1)[1]
    store.put_bytes(f"{prefix}/vocab.txt", b"[PAD]\n[UNK]\n")  # tampered after publishing
    with pytest.raises(EncoderError, match="vocab.txt does not match its manifest"):
        resolve_encoder(s3_ref, store=store, cache_dir=tmp_path / "fresh-cache")
    assert scan_bucket(store) == [f"{store.uri(prefix)}/vocab.txt: size 12 != "
                                  f"{(tiny_encoder_path / 'vocab.txt').stat().st_size} in the manifest"]


def test_published_objects_are_verified_after_download(store, tmp_path):
    store.ensure_bucket()
    store.publish("heads/abc", {"head.safetensors": b"weights", "history.json": b"[]"})
    assert store.get_verified_bytes("heads/abc/head.safetensors") == b"weights"
    assert store.get_verified_file("heads/abc/head.safetensors", tmp_path / "h").read_bytes() == b"weights"
    store.put_bytes("heads/abc/head.safetensors", b"WEIGHTS")  # same size, other bytes
    fresh = ArtifactStore(store.bucket, endpoint_url=store.endpoint_url, client=store.client)
    with pytest.raises(IntegrityError, match="head.safetensors does not match its manifest"):
        fresh.get_verified_bytes("heads/abc/head.safetensors")
    with pytest.raises(IntegrityError):
        fresh.get_verified_file("heads/abc/head.safetensors", tmp_path / "h2")
    assert not (tmp_path / "h2").exists()
    store.put_bytes("heads/unpublished/head.safetensors", b"x")
    with pytest.raises(StoreError, match="not part of a published prefix"):
        fresh.get_verified_bytes("heads/unpublished/head.safetensors")


def test_s3_data_download_is_checked_against_its_etag(store, tmp_path, monkeypatch):
    from adaptflow.data import read_table

    store.ensure_bucket()
    store.put_bytes("incoming/train.csv", b"text,label\nhi,pos\nho,neg\n")
    assert len(read_table(store.uri("incoming/train.csv"), store=store)) == 2
    real = store.client.download_file

    def damaged(bucket, key, filename, **kwargs):  # a transfer that delivers other bytes of the same size
        real(bucket, key, filename, **kwargs)
        Path(filename).write_bytes(Path(filename).read_bytes().replace(b"pos", b"neg"))

    monkeypatch.setattr(store.client, "download_file", damaged)
    with pytest.raises(IntegrityError, match="incoming/train.csv: downloaded bytes have MD5"):
        read_table(store.uri("incoming/train.csv"), store=store)


def test_stages_verify_what_they_read_back(flow_env, tmp_path, tiny_encoder_path, test_settings):
    """A published stage output modified behind its manifest is refused by the next stage, not trained on."""
    from adaptflow.data import read_parquet_bytes, to_parquet_bytes
    from adaptflow.stages import StageContext, ingest_stage, validate_stage

    frame = pd.DataFrame({"text": [f"film {i}" for i in range(20)], "label": ["a", "b"] * 10})
    frame.to_csv(tmp_path / "train.csv", index=False)
    config = build_config({"name": "verify", "data": {"train": str(tmp_path / "train.csv")}})
    settings = test_settings.model_copy(update={"bucket": flow_env.bucket})
    ctx = StageContext(settings, ArtifactStore.from_settings(settings))
    snapshot = ingest_stage(ctx, config)
    key = snapshot["train"].split("/", 3)[3]
    flipped = read_parquet_bytes(ctx.store.get_bytes(key))
    flipped["label"] = flipped["label"].map({"a": "b", "b": "a"})
    ctx.store.put_bytes(key, to_parquet_bytes(flipped))  # relabelled behind the manifest's back
    with pytest.raises(IntegrityError, match="train.parquet does not match its manifest"):
        validate_stage(StageContext(settings, ArtifactStore.from_settings(settings)), config, snapshot)


def test_served_model_refuses_a_head_changed_after_registration(tiny_encoder_path, tmp_path):
    """The pyfunc checks its head against the sha256 recorded at registration (and its encoder's digest)."""
    from types import SimpleNamespace

    from adaptflow.encoders import folder_digest
    from adaptflow.heads import Head, save_head
    from adaptflow.serving import HeadClassifier, ModelSpec
    from adaptflow.store import sha256_file

    head = save_head(Head(32, 2), tmp_path / "head.safetensors", ["neg", "pos"])
    spec = ModelSpec(encoder_ref=str(tiny_encoder_path), encoder_digest=folder_digest(tiny_encoder_path),
                     max_length=16, pooling="mean", dtype="fp32", labels=["neg", "pos"],
                     head_sha256=sha256_file(head)[0])
    (tmp_path / "model_spec.json").write_text(spec.to_json())
    context = SimpleNamespace(artifacts={"head": str(head), "model_spec": str(tmp_path / "model_spec.json")})
    model = HeadClassifier()
    model.load_context(context)  # as registered: loads
    assert model.predict(context, pd.DataFrame({"text": ["good film"]}))["label"].tolist()[0] in ("neg", "pos")

    save_head(Head(32, 2), head, ["neg", "pos"])  # other weights, same place
    with pytest.raises(ValueError, match="changed after registration"):
        HeadClassifier().load_context(context)
