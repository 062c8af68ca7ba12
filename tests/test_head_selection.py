"""head.kind: auto on synthetic data: when the linear head underfits the MLP is tried; an MLP that gains enough
stops the step-up before LoRA; a spent budget stops it; LoRA (here a cheap stand-in passed explicitly: the real
trainer is plugged in by the stage) is tried only when the MLP gains too little, and wins only on validation."""

import numpy as np
import pytest

import adaptflow.head_selection as selection_module
from adaptflow.config import ConfigError, build_config
from adaptflow.head_selection import (CURVE_FRACTIONS, Trial, candidate_config, nested_fractions, select_head,
                                      selection_metrics)
from adaptflow.heads import HeadConfig, fit_head


def xor(n=1500, d=6, seed=0):
    """Two classes by the sign of x0 * x1: no linear head does better than chance, a small MLP nearly perfect."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, d)).astype(np.float32)
    return X, (X[:, 0] * X[:, 1] > 0).astype(np.int64)


def linear_blobs(n=600, d=8, seed=0):
    """Two overlapping Gaussian classes: the linear head is already the right shape (it underfits by the gap,
    and an MLP has nothing to add)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, d)) + np.where(y[:, None] == 1, 0.6, -0.6) * np.eye(d)[0] + 3 * np.eye(d)[1]
    return X.astype(np.float32), y


def noise(n=120, d=200, seed=0):
    """Random labels in many dimensions: the linear head memorises the training rows (a wide gap)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 2, n)


class FakeLora:
    """A stand-in LoRA trial with a fixed validation accuracy; records what it was given."""

    def __init__(self, val_accuracy: float):
        self.val_accuracy, self.calls = val_accuracy, []

    def __call__(self, train_rows, val_rows, seconds_left):
        self.calls.append((train_rows, val_rows, seconds_left))
        return Trial("lora", self.val_accuracy, None, 0.0, len(train_rows), payload={"adapter": b"..."})


AUTO = dict(kind="auto", epochs=40, lr=1e-2, hidden_dim=32, batch_size=128)


def test_an_underfitting_linear_head_steps_up_to_the_mlp_that_gains_enough_and_lora_is_not_tried():
    X, y = xor()
    lora, lines = FakeLora(1.0), []
    sel = select_head(X, y, 2, HeadConfig(**AUTO), log=lines.append, lora=lora)
    linear, mlp = sel.trials["linear"], sel.trials["mlp"]
    assert abs(linear.train_accuracy - linear.val_accuracy) < 0.05 and linear.val_accuracy < 0.65
    assert mlp.val_accuracy > 0.85 and sel.choice == "mlp"
    assert lora.calls == [] and set(sel.skipped) == {"lora"}
    assert sel.skipped["lora"].startswith("the MLP gained +")
    assert sel.reasons[0].startswith("linear underfits") and sel.reasons[-1].startswith("chose mlp")
    assert [p["fraction"] for p in linear.curve] == list(CURVE_FRACTIONS)
    assert [p["rows"] for p in linear.curve][-1] == sel.train_rows == 1200 and sel.val_rows == 300
    assert all(line.startswith("auto head: ") for line in lines)


def test_a_linear_head_that_does_not_underfit_is_kept_without_trying_anything_else():
    X, y = noise()
    lora = FakeLora(1.0)
    sel = select_head(X, y, 2, HeadConfig(**AUTO), log=None, lora=lora)
    assert sel.choice == "linear" and list(sel.trials) == ["linear"] and lora.calls == []
    assert sel.trials["linear"].train_accuracy - sel.trials["linear"].val_accuracy >= 0.05
    assert set(sel.skipped) == {"mlp", "lora"} and "does not underfit" in sel.skipped["mlp"]


def test_an_mlp_that_gains_too_little_hands_over_to_lora_which_wins_only_by_validation_accuracy():
    X, y = linear_blobs()
    config = HeadConfig(**AUTO, auto_min_gain=0.5, budget_s=120)
    better = FakeLora(0.99)
    sel = select_head(X, y, 2, config, log=None, lora=better)
    assert set(sel.trials) == {"linear", "mlp", "lora"} and sel.choice == "lora" and sel.skipped == {}
    (train_rows, val_rows, left), = better.calls
    assert len(np.intersect1d(train_rows, val_rows)) == 0 and len(train_rows) + len(val_rows) == len(y)
    assert 0 < left <= 120 and np.bincount(y[val_rows]).min() > 0  # the hold-out has every class

    worse = FakeLora(0.0)
    sel = select_head(X, y, 2, config, log=None, lora=worse)
    assert len(worse.calls) == 1 and sel.choice in {"linear", "mlp"}

    sel = select_head(X, y, 2, config, log=None)  # no trainer passed: skipped, and said why
    assert "lora" not in sel.trials and sel.skipped["lora"] == "no LoRA trainer in this build"
    assert "LoRA is not tried: no LoRA trainer in this build" in sel.reasons[1]

    # a trainer that finds the time left too short for a useful trial: skipped, and said why
    sel = select_head(X, y, 2, config, log=None, lora=lambda train_rows, val_rows, left: None)
    assert "lora" not in sel.trials and sel.skipped["lora"].endswith("left afford too few LoRA training rows")
    assert sel.reasons[2].startswith("LoRA skipped: the ")


def test_a_spent_budget_stops_the_step_up(monkeypatch):
    X, y = linear_blobs()
    sel = select_head(X, y, 2, HeadConfig(**AUTO, budget_s=1e-6), log=None, lora=FakeLora(1.0))
    assert list(sel.trials) == ["linear"] and sel.choice == "linear"
    assert sel.skipped["mlp"].startswith("budget_s") and "budget" in sel.reasons[0]

    # a clock on which each head fit costs 1000 s: the linear curve (3 fits) leaves time, the MLP spends it
    fits = []

    def counted_fit(*args, **kwargs):
        fits.append(kwargs)
        return fit_head(*args, **kwargs)

    monkeypatch.setattr(selection_module, "fit_head", counted_fit)
    lora = FakeLora(1.0)
    sel = select_head(X, y, 2, HeadConfig(**AUTO, budget_s=3500, auto_min_gain=0.5), log=None, lora=lora,
                      clock=lambda: 1000.0 * len(fits))
    assert len(fits) == 4 and set(sel.trials) == {"linear", "mlp"} and lora.calls == []
    assert sel.skipped["lora"] == "budget_s 3500 spent" and "the budget of 3500s is spent" in sel.reasons[1]


def test_candidates_are_configured_as_their_kind_alone_would_be():
    auto = HeadConfig(kind="auto", solver="lbfgs", C=0.5, hidden_dim=32, budget_s=10, seed=7)
    linear, mlp = candidate_config(auto, "linear"), candidate_config(auto, "mlp")
    assert (linear.kind, linear.resolved_solver, linear.C, linear.seed) == ("linear", "lbfgs", 0.5, 7)
    assert (mlp.kind, mlp.resolved_solver, mlp.hidden_dim) == ("mlp", "adamw", 32)
    assert "solver" not in mlp.model_fields_set  # lbfgs is the linear head's; an mlp has only adamw
    with pytest.raises(ValueError, match="kind 'auto' is a choice between heads"):
        fit_head(*linear_blobs(n=40), 2, auto)


def test_the_curve_subsets_are_nested_and_stratified():
    y = np.repeat([0, 1, 2], [40, 80, 8])
    quarter, half, full = nested_fractions(y, (0.25, 0.5, 1.0), np.random.default_rng(0))
    assert set(quarter) <= set(half) <= set(full) and len(full) == len(y)
    assert list(np.bincount(y[quarter])) == [10, 20, 2] and list(np.bincount(y[half])) == [20, 40, 4]


def test_the_report_becomes_flat_mlflow_metrics():
    X, y = xor(n=600, seed=1)
    report = {**select_head(X, y, 2, HeadConfig(**AUTO), log=None).report(), "final_seconds": 1.5}
    metrics = selection_metrics(report)
    assert report["choice"] == "mlp" and report["candidates"]["lora"]["skipped"].startswith("the MLP gained +")
    assert metrics["auto.mlp.val_acc"] == report["candidates"]["mlp"]["val_accuracy"]
    assert {"auto.linear.val_acc", "auto.linear.train_acc", "auto.linear.seconds", "auto.mlp.seconds",
            "auto.linear.curve.25.val_acc", "auto.linear.curve.100.train_acc", "auto.seconds",
            "auto.final_seconds"} <= set(metrics)
    assert not any(key.startswith("auto.lora") for key in metrics)


def test_config_takes_auto_and_checks_its_settings():
    base = {"name": "m", "data": {"train": "x.csv"}}
    head = build_config({**base, "head": {"kind": "auto", "budget_s": 30, "auto_min_gain": 0.02}}).head
    assert (head.kind, head.budget_s, head.auto_min_gain, head.auto_max_gap) == ("auto", 30, 0.02, 0.05)
    for bad in ({"budget_s": 0}, {"auto_min_gain": 2}, {"auto_max_gap": -0.1}):
        with pytest.raises(ConfigError, match=f"head.{next(iter(bad))}"):
            build_config({**base, "head": {"kind": "auto", **bad}})


def test_rows_streamed_from_a_rowfile_and_a_sample_of_large_sets_are_indexed_as_the_callers_rows(tmp_path,
                                                                                                 monkeypatch):
    from adaptflow.rowfile import RowFile

    X, y = linear_blobs(n=400)
    config = HeadConfig(**AUTO, auto_min_gain=0.5)
    in_memory = select_head(X, y, 2, config, log=None, lora=FakeLora(0.5))
    with RowFile(tmp_path / "x.f32", len(X), X.shape[1]) as rows:
        rows[np.arange(len(X))] = X
        streamed = select_head(rows, y, 2, config, log=None, lora=(lora := FakeLora(0.5)))

    def evidence(sel):  # everything but the seconds
        return sel.choice, {kind: (t.val_accuracy, t.train_accuracy, [(p["rows"], p["train_accuracy"],
                                                                         p["val_accuracy"]) for p in t.curve])
                            for kind, t in sel.trials.items()}

    assert evidence(streamed) == evidence(in_memory) and set(streamed.trials) == {"linear", "mlp", "lora"}

    monkeypatch.setattr(selection_module, "MAX_ROWS", 100)  # above it, the trials use a stratified sample
    sampled = select_head(X, y, 2, config, log=None, lora=lora)
    (train_rows, val_rows, _), = lora.calls[1:]
    assert sampled.train_rows + sampled.val_rows == 100 and len(train_rows) + len(val_rows) == 100
    assert len(np.intersect1d(train_rows, val_rows)) == 0 and max(train_rows.max(), val_rows.max()) < len(y)
    assert abs(np.mean(y[np.concatenate([train_rows, val_rows])]) - np.mean(y)) < 0.03
