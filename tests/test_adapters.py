"""head.kind lora: adapters trained with the head, checkpointed per epoch, resumed after a kill; end to end on the
tiny encoder (train → register → predict in a fresh process → gate against a linear champion, batch scoring)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from adaptflow.adapters import StoreCheckpoints, load_adapter, merge_adapter, save_adapter, train_lora
from adaptflow.config import build_config
from adaptflow.embed import encode, tokenize_ragged
from adaptflow.encoders import load_encoder
from adaptflow.heads import HeadConfig, predict_proba, stratified_holdout
from adaptflow.store import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]
LORA = {"kind": "lora", "epochs": 3, "lr": 5e-3, "batch_size": 16, "lora_rank": 4, "val_fraction": 0.2}


def film_rows(n: int) -> pd.DataFrame:
    words = ["good great fun warm", "bad awful dull boring"]
    return pd.DataFrame({"text": [f"{words[i % 2].split()[i % 4]} film {i} the story" for i in range(n)],
                         "label": ["pos" if i % 2 == 0 else "neg" for i in range(n)]})


@pytest.fixture(scope="module")
def tiny(tiny_encoder_path):
    tokenizer, model = load_encoder(tiny_encoder_path)
    frame = film_rows(80)
    return tokenizer, model, tokenize_ragged(tokenizer, list(frame["text"]), 16), (frame["label"] == "pos").to_numpy()


def test_merged_adapter_gives_the_vectors_training_saw(tiny, tmp_path):
    """The pyfunc path (merge, then the frozen-encoder encode) reproduces the trained model's predictions, the
    shared encoder is left untouched, and the adapter file is small next to the encoder."""
    tokenizer, model, ids, y = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = train_lora(model, ids, y.astype(int), 2, HeadConfig(**LORA), pad_id=tokenizer.pad_token_id, log=None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(fit.history) == 3 and fit.val_rows == 16 and 0 <= fit.val_accuracy <= 1
    path = save_adapter(fit.adapter, fit.config, tmp_path / "adapter.safetensors")
    state, config = load_adapter(path)
    assert config.r == 4 and set(state) == set(fit.adapter) and state  # peft's LoRA matrices only
    assert path.stat().st_size < sum(v.numel() * 4 for v in model.state_dict().values()) / 2
    merged = merge_adapter(model, path)
    adapted = encode(merged, ids, pooling="mean", progress=False).vectors
    frozen = encode(model, ids, pooling="mean", progress=False).vectors
    assert np.abs(adapted - frozen).max() > 1e-3  # the adapter changed the encoder
    # the held-out rows scored by the merged encoder + head (the serving path) as training scored them
    _, val = stratified_holdout(y.astype(int), LORA["val_fraction"], np.random.default_rng(HeadConfig().seed))
    served = (predict_proba(fit.head, adapted[val]).argmax(1) == y[val].astype(int)).mean()
    assert served == pytest.approx(fit.val_accuracy)


KILL_AFTER_EPOCH_1 = """
import os, signal, sys
import numpy as np
from adaptflow.adapters import StoreCheckpoints, train_lora
from adaptflow.embed import tokenize_ragged
from adaptflow.encoders import load_encoder
from adaptflow.heads import HeadConfig
from adaptflow.settings import load_settings
from adaptflow.store import ArtifactStore
sys.path.insert(0, sys.argv[3])
from tests.test_adapters import LORA, film_rows

tokenizer, model = load_encoder(sys.argv[1])
frame = film_rows(80)
ids = tokenize_ragged(tokenizer, list(frame["text"]), 16)
store = ArtifactStore.from_settings(load_settings(), bucket=os.environ["ADAPTFLOW_BUCKET"])

def log(line):
    print(line, flush=True)
    if "epoch 1/" in line:  # after epoch 1's checkpoint is published: die as a killed worker does
        os.kill(os.getpid(), signal.SIGKILL)

train_lora(model, ids, (frame["label"] == "pos").to_numpy().astype(int), 2, HeadConfig(**LORA),
           pad_id=tokenizer.pad_token_id, checkpoints=StoreCheckpoints(store, sys.argv[2]), log=log)
"""


def test_a_killed_training_resumes_from_its_last_checkpoint_and_ends_as_an_unbroken_one(
        services_env, fresh_bucket, monkeypatch, tiny, tiny_encoder_path, test_settings):
    monkeypatch.setenv("ADAPTFLOW_BUCKET", fresh_bucket)
    store = ArtifactStore.from_settings(test_settings, bucket=fresh_bucket)
    done = subprocess.run([sys.executable, "-c", KILL_AFTER_EPOCH_1, str(tiny_encoder_path), "checkpoints/killed",
                           str(ROOT)], capture_output=True, text=True, timeout=300, env={**os.environ})
    assert done.returncode == -9, done.stderr[-2000:]
    assert "epoch 1/3" in done.stdout and "epoch 2/3" not in done.stdout
    assert [k.split("/")[2] for k in store.list_keys("checkpoints/killed/") if k.endswith("_manifest.json")] == [
        "epoch-0001"]
    objects = store.read_manifest("checkpoints/killed/epoch-0001")["objects"]
    assert set(objects) == {"adapter.safetensors", "head.safetensors", "optimizer.safetensors"}  # no pickle

    tokenizer, model, ids, y = tiny
    lines: list[str] = []
    resumed = train_lora(model, ids, y.astype(int), 2, HeadConfig(**LORA), pad_id=tokenizer.pad_token_id,
                         checkpoints=StoreCheckpoints(store, "checkpoints/killed"), log=lines.append)
    assert resumed.resumed_from == 1 and "resuming after epoch 1 of 3" in lines[0]
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3] and not any("epoch 1/3" in l for l in lines)
    unbroken = train_lora(model, ids, y.astype(int), 2, HeadConfig(**LORA), pad_id=tokenizer.pad_token_id,
                          checkpoints=StoreCheckpoints(store, "checkpoints/unbroken"), log=None)
    assert unbroken.resumed_from == 0
    for name, tensor in unbroken.adapter.items():
        torch.testing.assert_close(resumed.adapter[name], tensor, rtol=1e-5, atol=1e-6)
    for name, tensor in unbroken.head.state_dict().items():
        torch.testing.assert_close(resumed.head.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    assert resumed.history[-1]["val_accuracy"] == unbroken.history[-1]["val_accuracy"]


@pytest.fixture
def flow_env(services_env, fresh_bucket, monkeypatch, prefect_harness, test_settings) -> ArtifactStore:
    monkeypatch.setenv("ADAPTFLOW_BUCKET", fresh_bucket)
    return ArtifactStore.from_settings(test_settings, bucket=fresh_bucket)


def film_config(tmp_path: Path, encoder_path: Path, head: dict):
    film_rows(120).to_csv(tmp_path / "films.csv", index=False)
    return build_config({"name": "lora-test", "data": {"train": str(tmp_path / "films.csv")},
                         "encoder": {"ref": str(encoder_path), "max_length": 16}, "head": head,
                         "gate": {"smoke_test": False}})


def test_lora_trains_registers_serves_and_is_gated_against_a_linear_champion(flow_env, tmp_path, tiny_encoder_path,
                                                                            test_settings):
    from flows.retrain import retrain
    from adaptflow.cache import EmbeddingCache, text_sha256
    from adaptflow.promotion import score_version, smoke_test
    from adaptflow.registry import client_for
    from adaptflow.scoring import ScoreRequest, read_scored, score_location
    from adaptflow.stages import StageContext, read_frame

    linear = retrain(film_config(tmp_path, tiny_encoder_path, {"kind": "linear"}))
    assert "champion" in linear["aliases"] and linear["artifacts"]["adapter"] is None

    lora = retrain(film_config(tmp_path, tiny_encoder_path, LORA))
    assert lora["artifacts"]["adapter"].endswith("/adapter.safetensors")
    # the gate compared the LoRA challenger with the linear champion on the same test rows
    assert lora["gate"]["champion_version"] == linear["version"]
    assert lora["gate"]["rows_compared"] == lora["rows"]["test"] and lora["decision"] in ("promote", "reject", "hold")
    assert lora["rows"] == linear["rows"]

    client = client_for(test_settings.mlflow_tracking_uri)
    tags = client.get_model_version("lora-test", lora["version"]).tags
    assert tags["adaptflow.adapter_uri"] == lora["artifacts"]["adapter"]
    assert tags["adaptflow.encoder_digest"] == client.get_model_version("lora-test", linear["version"]).tags[
        "adaptflow.encoder_digest"]  # the encoder is shared, unchanged; the adapter rides beside it
    version = client.get_model_version("lora-test", lora["version"])

    # the adapted encoder's vectors live under their own cache key, apart from the frozen encoder's
    ctx = StageContext.from_env()
    spec = dict(encoder_digest=tags["adaptflow.encoder_digest"], max_length=16, pooling="mean",
                dtype=tags["adaptflow.dtype"])
    frozen, adapted = EmbeddingCache(ctx.store, **spec), EmbeddingCache(
        ctx.store, **spec, adapter_digest=tags["adaptflow.adapter_digest"])
    assert frozen.prefix != adapted.prefix
    test_texts = list(read_frame(ctx, lora["artifacts"]["validated"] + "/test.parquet")["text"])
    hashes = [text_sha256(t) for t in test_texts]
    assert not adapted.missing(hashes) and not frozen.missing(hashes)  # evaluate filled the adapted one
    assert np.abs(adapted.read(hashes) - frozen.read(hashes)).max() > 1e-3

    # served in a fresh interpreter from the registered files: the same answers as the gate's re-scoring
    served = smoke_test(lora["model_uri"], test_settings.process_env(), texts=test_texts[:6])
    assert [p["label"] for p in served] == score_version(ctx, version, test_texts[:6])

    # batch scoring goes through the adapted cache too
    lake = tmp_path / "lake"
    lake.mkdir()
    pd.DataFrame({"text": test_texts[:6]}).to_csv(lake / "part.csv", index=False)
    score_location(ctx, ScoreRequest(model_uri=lora["model_uri"], input=str(lake), output=str(tmp_path / "scored")))
    scored = read_scored(str(tmp_path / "scored"), store=ctx.store).to_pandas()
    assert list(scored.sort_values("row")["label"]) == [p["label"] for p in served]


def test_lora_settings_are_checked_at_load():
    from adaptflow.config import ConfigError

    base = {"name": "m", "data": {"train": "x.csv"}}
    config = build_config({**base, "head": {"kind": "lora", "lora_rank": 4, "lora_targets": ["query", "value"]}})
    assert config.head.lora_rank == 4 and config.head.lora_targets == ["query", "value"]
    with pytest.raises(ConfigError, match="lora trains adapters and head with 'adamw'"):
        build_config({**base, "head": {"kind": "lora", "solver": "lbfgs"}})
    with pytest.raises(ConfigError, match="did you mean 'head.lora_rank'"):
        build_config({**base, "head": {"kind": "lora", "lora_rnak": 4}})
    with pytest.raises(ConfigError, match="head.lora_targets"):
        build_config({**base, "head": {"kind": "lora", "lora_targets": []}})
