"""Heads on synthetic separable data: training, early stopping, determinism, config checks, safetensors I/O."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adaptflow.heads import HeadConfig, fit_head, load_head, predict_proba, save_head, stratified_holdout


def blobs(n=600, k=3, d=16, seed=0, spread=0.6):
    """k Gaussian clusters around random directions (separable after L2-normalisation too)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 2
    y = rng.integers(0, k, n)
    return (centers[y] + spread * rng.normal(size=(n, d))).astype(np.float32), y


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_learns_separable_data_and_logs(kind):
    X, y = blobs()
    Xte, yte = blobs(seed=0, n=1200)[0][600:], blobs(seed=0, n=1200)[1][600:]
    lines = []
    fit = fit_head(X, y, 3, HeadConfig(kind=kind, epochs=30), device="cpu", log=lines.append)
    proba = predict_proba(fit.head, Xte)
    assert proba.shape == (600, 3) and np.allclose(proba.sum(1), 1)
    assert (proba.argmax(1) == yte).mean() > 0.95
    assert lines[0].startswith(f"training {kind} head") and "held out" in lines[0]
    assert lines[1].startswith("epoch 1: train loss") and "val acc" in lines[1] and "rows/s" in lines[1]
    h = fit.history[0]
    assert {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds", "rows_per_s"} <= set(h)
    assert 1 <= fit.best_epoch <= len(fit.history) and fit.seconds > 0


def test_early_stopping_restores_the_best_epoch():
    X, y = blobs(n=300, spread=3.0)  # noisy: validation loss bottoms out, then rises while we overfit
    cfg = HeadConfig(kind="mlp", hidden_dim=256, dropout=0.0, lr=3e-3, epochs=300, patience=3, val_fraction=0.3)
    fit = fit_head(X, y, 3, cfg, device="cpu", log=None)
    assert len(fit.history) < 300
    assert len(fit.history) - fit.best_epoch == 3
    best = min(h["val_loss"] for h in fit.history)
    assert fit.history[fit.best_epoch - 1]["val_loss"] == best
    # the restored weights are the best epoch's: recompute its validation loss on the same hold-out
    _, val = stratified_holdout(y, 0.3, np.random.default_rng(cfg.seed))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(fit.head(torch.from_numpy(X[val])), torch.from_numpy(y[val]))
    assert loss.item() == pytest.approx(best, rel=1e-5)


def test_seeded_and_leaves_global_rng_alone():
    X, y = blobs()
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = fit_head(X, y, 3, HeadConfig(epochs=5, seed=7), device="cpu", log=None)
    assert torch.rand(1) == before  # fit_head forked the RNG
    assert torch.get_num_threads() == threads  # and restored the thread count it lowered for training
    b = fit_head(X, y, 3, HeadConfig(epochs=5, seed=7), device="cpu", log=None)
    c = fit_head(X, y, 3, HeadConfig(epochs=5, seed=8), device="cpu", log=None)
    assert torch.equal(a.head.net.weight, b.head.net.weight)
    assert not torch.equal(a.head.net.weight, c.head.net.weight)


def test_no_validation_trains_every_epoch_and_class_weights_help_a_minority():
    rng = np.random.default_rng(1)
    # 95% class 0, 5% class 1 with overlapping clusters: unweighted training under-predicts the minority
    y = (rng.random(2000) < 0.05).astype(int)
    X = (rng.normal(size=(2000, 8)) + 0.9 * y[:, None]).astype(np.float32)
    plain = fit_head(X, y, 2, HeadConfig(epochs=15, val_fraction=0.0, normalize=False), device="cpu", log=None)
    weighted = fit_head(X, y, 2, HeadConfig(epochs=15, val_fraction=0.0, normalize=False, class_weights=True),
                        device="cpu", log=None)
    assert len(plain.history) == 15 and plain.best_epoch == 15 and "val_loss" not in plain.history[0]
    recall = lambda f: (predict_proba(f.head, X[y == 1]).argmax(1) == 1).mean()
    assert recall(weighted) > recall(plain) + 0.2


def test_stratified_holdout_keeps_class_shares():
    y = np.array([0] * 90 + [1] * 10 + [2])
    train, val = stratified_holdout(y, 0.2, np.random.default_rng(0))
    assert np.bincount(y[val], minlength=3).tolist() == [18, 2, 0]  # a singleton class stays in train
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(101))


@pytest.mark.parametrize("bad, message", [
    ({"kind": "svm"}, "kind must be 'linear' or 'mlp'"),
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"epochs": 2.5}, "epochs must be an integer"),
    ({"lr": 0}, r"lr must be in \(0, 10\]"),
    ({"lr": float("nan")}, "lr must be in"),
    ({"val_fraction": 0.5}, r"val_fraction must be in \[0, 0.5\)"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"patience": 0}, "patience must be an integer >= 1"),
    ({"weight_decay": -1}, "weight_decay must be >= 0"),
    ({"class_weights": "yes"}, "class_weights must be true/false"),
])
def test_config_errors_are_actionable(bad, message):
    with pytest.raises(ValueError, match=message):
        HeadConfig(**bad)


def test_config_defaults():
    assert HeadConfig().lr == 1e-2 and HeadConfig(kind="mlp").lr == 1e-3 and HeadConfig(lr=0.5).lr == 0.5
    assert vars(HeadConfig())["normalize"] is True  # vars() works: stages.py keys its cache on it


def test_fit_refuses_bad_arrays():
    X, y = blobs(n=20)
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 2\)"):
        fit_head(X, y, 2, log=None)
    with pytest.raises(ValueError, match="NaN"):
        fit_head(np.full_like(X, np.nan), y, 3, log=None)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_save_load_round_trip(tmp_path, kind):
    X, y = blobs(n=200)
    fit = fit_head(X, y, 3, HeadConfig(kind=kind, epochs=3, normalize=kind == "linear"), device="cpu", log=None)
    path = save_head(fit.head, tmp_path / "sub" / "head.safetensors", ["a", "b", "c"])
    head, labels = load_head(path)
    assert labels == ["a", "b", "c"] and head.kind == kind and head.normalize == (kind == "linear")
    np.testing.assert_array_equal(predict_proba(head, X), predict_proba(fit.head, X))
    with safe_open(str(path), framework="pt") as f:  # plain safetensors + readable JSON metadata, no pickle
        meta = f.metadata()
    assert json.loads(meta["head"])["in_dim"] == 16 and json.loads(meta["labels"]) == labels
    with pytest.raises(ValueError, match="3 outputs"):
        save_head(fit.head, tmp_path / "x.safetensors", ["a", "b"])


def test_load_refuses_foreign_files(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an adaptflow head"):
        load_head(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        load_head(tmp_path / "missing.safetensors")
