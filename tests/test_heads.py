"""Heads on synthetic data: training, the sklearn reference, early stopping + refit, determinism, config checks,
safetensors I/O."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adaptflow.heads import (HeadConfig, fit_head, load_head, predict_proba, save_head, stratified_folds,
                             stratified_holdout)
from adaptflow.metrics import expected_calibration_error


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
    assert 1 <= fit.best_epoch <= len(fit.history) and fit.seconds > 0
    if kind == "linear":  # L-BFGS on all rows, then a cross-validated temperature
        assert lines[0].startswith("training linear head by L-BFGS: 600 rows")
        assert lines[0].endswith("(epochs not used by solver lbfgs; solver: adamw uses it)")
        assert any(line.startswith("logit temperature") for line in lines)
        assert {"epoch", "train_loss", "objective", "seconds", "rows_per_s"} <= set(fit.history[0])
        assert fit.C == 1.0 and fit.temperature > 0 and fit.cv["log_loss"] <= fit.cv["log_loss_t1"]
    else:
        assert lines[0].startswith("training mlp head by AdamW") and "held out" in lines[0]
        assert lines[1].startswith("epoch 1: train loss") and "val acc" in lines[1] and "rows/s" in lines[1]
        h = fit.history[0]
        assert {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds", "rows_per_s"} <= set(h)


def realistic(n_train, k=4, d=96, seed=0, n_test=3000):
    """Sentence-embedding-like data: a shared offset (all vectors point one way, as mean-pooled encoders give),
    weak class directions, anisotropic noise; a linear model reaches ~80 % and small n overfits easily."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(3, 0.2, d)
    offset = rng.normal(size=d) * 4
    directions = rng.normal(size=(k, d)) * 0.35
    y = rng.integers(0, k, n_train + n_test)
    X = (offset + directions[y] + rng.normal(size=(len(y), d)) * scales).astype(np.float32)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


@pytest.mark.parametrize("n", [300, 1000])
def test_default_linear_head_matches_logistic_regression(n):
    """The issue's bar: the default head loses nothing against LogisticRegression(C=1) on the same L2-normalised
    vectors, at small sizes too, and is calibrated (ECE <= 0.05). Before: the AdamW head with early stopping on
    a 10 % hold-out agreed with it on ~90-95 % of test rows and lost up to a few points."""
    from sklearn.linear_model import LogisticRegression

    X, y, Xte, yte = realistic(n)
    unit = lambda A: A / np.linalg.norm(A, axis=1, keepdims=True)
    reference = LogisticRegression(max_iter=5000).fit(unit(X), y)
    fit = fit_head(X, y, 4, device="cpu", log=None)
    proba = predict_proba(fit.head, Xte)
    ours, theirs = proba.argmax(1), reference.predict(unit(Xte))
    assert (ours == theirs).mean() >= 0.995  # same objective, same optimum: the same predictions
    assert abs((ours == yte).mean() - (theirs == yte).mean()) <= 0.003
    assert expected_calibration_error(yte, proba) <= 0.05


def test_binary_head_is_sklearns_model_with_the_same_C():
    """Two classes: sklearn fits one vector w with ||w||^2/(2C); the softmax pair's difference is that w."""
    from sklearn.linear_model import LogisticRegression

    X, y, _, _ = realistic(500, k=2)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    reference = LogisticRegression(C=4.0, tol=1e-8, max_iter=10000).fit(unit, y)
    fit = fit_head(X, y, 2, HeadConfig(C=4.0, calibrate=False), device="cpu", log=None)
    w, b = fit.head.net.weight.detach().numpy(), fit.head.net.bias.detach().numpy()
    np.testing.assert_allclose(w[1] - w[0], reference.coef_[0], atol=2e-3 * np.abs(reference.coef_).max())
    assert (b[1] - b[0]) == pytest.approx(reference.intercept_[0], abs=1e-2)


def test_early_stopping_picks_the_epochs_then_refits_on_every_row():
    X, y = blobs(n=300, spread=3.0)  # noisy: validation loss bottoms out, then rises while we overfit
    cfg = HeadConfig(kind="mlp", hidden_dim=256, dropout=0.0, lr=3e-3, epochs=300, patience=3, val_fraction=0.3)
    lines = []
    fit = fit_head(X, y, 3, cfg, device="cpu", log=lines.append)
    search = [h for h in fit.history if not h.get("refit")]
    refit = [h for h in fit.history if h.get("refit")]
    assert len(search) < 300 and len(search) - fit.best_epoch == 3
    best = min(h["val_loss"] for h in search)
    assert search[fit.best_epoch - 1]["val_loss"] == best
    # then the same schedule on all 300 rows (the held-out 90 too) for the chosen number of epochs
    assert len(refit) == fit.best_epoch and f"refit on all 300 rows for {fit.best_epoch} epochs" in lines
    assert all("val_loss" not in h for h in refit)
    assert [h["lr"] for h in refit] == [h["lr"] for h in search[: fit.best_epoch]]
    assert refit[0]["rows_per_s"] > 0


def test_seeded_and_leaves_global_rng_alone():
    X, y = blobs()
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = fit_head(X, y, 3, HeadConfig(kind="mlp", epochs=5, seed=7), device="cpu", log=None)
    assert torch.rand(1) == before  # fit_head forked the RNG
    assert torch.get_num_threads() == threads  # and restored the thread count it lowered for training
    b = fit_head(X, y, 3, HeadConfig(kind="mlp", epochs=5, seed=7), device="cpu", log=None)
    c = fit_head(X, y, 3, HeadConfig(kind="mlp", epochs=5, seed=8), device="cpu", log=None)
    for wa, wb, wc in zip(a.head.parameters(), b.head.parameters(), c.head.parameters()):
        assert torch.equal(wa, wb)
    assert not torch.equal(a.head.net[0].weight, c.head.net[0].weight)
    lin = [fit_head(X, y, 3, HeadConfig(seed=s), device="cpu", log=None).head.net.weight for s in (7, 7)]
    assert torch.equal(*lin)  # the linear head is convex from zero: the seed only deals the folds


def test_no_validation_trains_every_epoch_and_class_weights_help_a_minority():
    rng = np.random.default_rng(1)
    # 95% class 0, 5% class 1 with overlapping clusters: unweighted training under-predicts the minority
    y = (rng.random(2000) < 0.05).astype(int)
    X = (rng.normal(size=(2000, 8)) + 0.9 * y[:, None]).astype(np.float32)
    recall = lambda f: (predict_proba(f.head, X[y == 1]).argmax(1) == 1).mean()
    for solver in ("adamw", "lbfgs"):
        plain = fit_head(X, y, 2, HeadConfig(solver=solver, epochs=15, val_fraction=0.0, normalize=False),
                         device="cpu", log=None)
        weighted = fit_head(X, y, 2, HeadConfig(solver=solver, epochs=15, val_fraction=0.0, normalize=False,
                                                class_weights=True), device="cpu", log=None)
        if solver == "adamw":
            assert len(plain.history) == 15 and plain.best_epoch == 15 and "val_loss" not in plain.history[0]
        assert recall(weighted) > recall(plain) + 0.2, solver


def test_stratified_folds_deal_every_class_evenly():
    y = np.array([0] * 23 + [1] * 7 + [2])
    folds = stratified_folds(y, 5, np.random.default_rng(0))
    assert sorted(np.bincount(folds).tolist()) == [6, 6, 6, 6, 7]
    for c in (0, 1):
        counts = np.bincount(folds[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1


def test_stratified_holdout_keeps_class_shares():
    y = np.array([0] * 90 + [1] * 10 + [2])
    train, val = stratified_holdout(y, 0.2, np.random.default_rng(0))
    assert np.bincount(y[val], minlength=3).tolist() == [18, 2, 0]  # a singleton class stays in train
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(101))


@pytest.mark.parametrize("bad, message", [
    ({"kind": "svm"}, r"kind\n  Input should be 'linear', 'mlp', 'auto' or 'lora'"),
    ({"epochs": 0}, r"epochs\n  Input should be greater than or equal to 1"),
    ({"epochs": 2.5}, "epochs\n  Input should be a valid integer, got a number with a fractional part"),
    ({"lr": 0}, r"lr\n  Input should be greater than 0"),
    ({"lr": float("nan")}, "lr\n  Input should be a finite number"),
    ({"C": -1}, r"C\n  Input should be greater than 0"),
    ({"val_fraction": 0.5}, r"val_fraction\n  Input should be less than 0.5"),
    ({"dropout": 1.0}, "dropout\n  Input should be less than 1"),
    ({"batch_size": 0}, "batch_size\n  Input should be greater than or equal to 1"),
    ({"patience": 0}, "patience\n  Input should be greater than or equal to 1"),
    ({"weight_decay": -1}, "weight_decay\n  Input should be greater than or equal to 0"),
    ({"class_weights": "yes"}, "class_weights\n  Input should be a valid boolean"),
    ({"kind": "mlp", "solver": "lbfgs"}, "solver 'lbfgs' is for kind 'linear'"),
    ({"epoch": 5}, "epoch\n  Extra inputs are not permitted"),
])
def test_config_errors_are_actionable(bad, message):
    with pytest.raises(ValueError, match=message):
        HeadConfig(**bad)


def test_config_defaults():
    assert HeadConfig().resolved_solver == "lbfgs" and HeadConfig(kind="mlp").resolved_solver == "adamw"
    assert HeadConfig().resolved_lr == 1e-2 and HeadConfig(kind="mlp").resolved_lr == 1e-3
    assert HeadConfig(lr=0.5).resolved_lr == 0.5 and HeadConfig().C == 1.0 and HeadConfig().calibrate
    assert vars(HeadConfig())["normalize"] is True  # vars() works: stages.py keys its cache on it
    json.dumps(vars(HeadConfig()))


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
