"""Metrics against scikit-learn, ECE by hand, MLflow-legal names, the figure and the markdown report."""

import io
import json
import re

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from adaptflow.gate import GateRules, decide
from adaptflow.metrics import (
    accuracy,
    class_scores,
    compute_metrics,
    confusion_matrix_figure,
    expected_calibration_error,
    flat_metrics,
    macro_f1,
    metric_name,
    report_markdown,
)


def random_case(n=500, k=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[y]  # better than chance, not perfect
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, proba


@pytest.mark.parametrize("k, absent", [(2, None), (4, None), (5, 4)])
def test_matches_sklearn(k, absent):
    y, proba = random_case(k=k, seed=k)
    if absent is not None:  # a label nobody has nor predicts: zero row/column, F1 0 in the macro mean
        proba[:, absent] = 0.0
        y = np.where(y == absent, 0, y)
    labels = [f"c{i}" for i in range(k)]
    m = compute_metrics(y, proba, labels)
    pred = proba.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, labels=range(k), average="macro", zero_division=0))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=range(k), zero_division=0)
    for i, label in enumerate(labels):
        assert m["per_class"][label] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]})
    assert m["confusion"] == confusion_matrix(y, pred, labels=range(k)).tolist()
    assert m["n"] == len(y)
    assert json.loads(json.dumps(m)) == m  # plain Python types: stored as metrics.json as is


def test_one_macro_f1_for_evaluate_gate_floors_and_mlflow():
    """A test set without class 'c2' that nobody predicts either: evaluate (hence MLflow) averaged macro-F1 over
    the 2 classes present (0.8x), the gate over the model's 3 labels (0.5x); a floor between the two rejected a
    model whose logged macro-F1 clears it. Now all of them use the model's label set."""
    labels = ["c0", "c1", "c2"]
    y, proba = random_case(n=300, k=3, seed=3)
    proba[:, 2] = 0.0
    y = np.where(y == 2, 1, y)
    pred = proba.argmax(1)
    expected = f1_score(y, pred, labels=range(3), average="macro", zero_division=0)
    logged = flat_metrics(compute_metrics(y, proba, labels))["macro_f1"]  # what evaluate logs to MLflow
    gate = decide(y, pred, None, labels, GateRules())
    assert logged == pytest.approx(expected) and gate.challenger["macro_f1"] == pytest.approx(expected)
    assert gate.challenger["accuracy"] == pytest.approx(accuracy_score(y, pred))
    # a floor just under the number MLflow shows is cleared, just over it is not
    assert decide(y, pred, None, labels, GateRules(min_metric={"macro_f1": logged - 1e-9})).decision == "promote"
    assert decide(y, pred, None, labels, GateRules(min_metric={"macro_f1": logged + 1e-9})).decision == "reject"


def test_scores_of_a_stack_of_confusions_match_one_by_one():
    rng = np.random.default_rng(5)
    stack = rng.integers(0, 20, size=(6, 4, 4))
    stack[0] = 0  # no rows at all
    stack[1, 3, :] = stack[1, :, 3] = 0  # a class with neither support nor predictions
    assert accuracy(stack)[0] == macro_f1(stack)[0] == 0.0 and not np.any(class_scores(stack)[2][0])
    for i, cm in enumerate(stack[1:], start=1):
        y = np.repeat(np.repeat(np.arange(4), 4), cm.ravel())
        pred = np.repeat(np.tile(np.arange(4), 4), cm.ravel())
        assert accuracy(stack)[i] == pytest.approx(accuracy_score(y, pred))
        assert macro_f1(stack)[i] == pytest.approx(f1_score(y, pred, labels=range(4), average="macro", zero_division=0))
        p, r, f, _ = precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
        assert np.allclose(class_scores(stack)[0][i], p) and np.allclose(class_scores(stack)[1][i], r)
        assert np.allclose(class_scores(stack)[2][i], f)


def test_ece_by_hand():
    # 4 rows: two at confidence 0.9 (one right), two at 0.6 (both right) -> bins differ
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert expected_calibration_error(y, proba) == pytest.approx(expected)
    assert expected_calibration_error(np.array([0]), np.array([[1.0, 0.0]])) == 0.0  # confidence 1 fits a bin
    y, proba = random_case()
    # against a straightforward loop over 15 equal-width bins
    conf, correct = proba.max(1), proba.argmax(1) == y
    edges = np.linspace(0, 1, 16)
    loop = sum(abs(correct[sel].mean() - conf[sel].mean()) * sel.mean()
               for lo, hi in zip(edges[:-1], edges[1:]) if (sel := (conf > lo) & (conf <= hi)).any())
    assert compute_metrics(y, proba, list("abcd"))["ece"] == pytest.approx(loop)


def test_flat_metrics_are_mlflow_legal_and_distinct():
    labels = ["fresh", "rotten/bad", "a b", "a_b", "négatif"]
    y, proba = random_case(k=5)
    flat = flat_metrics(compute_metrics(y, proba, labels))
    assert {"accuracy", "macro_f1", "ece", "recall.fresh", "f1.fresh", "precision.fresh", "support.fresh"} <= set(flat)
    assert all(isinstance(v, float) for v in flat.values())
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+", name) for name in flat)
    assert len([n for n in flat if n.startswith("f1.")]) == 5  # "a b" and "a_b" both kept
    assert metric_name("rotten/bad") == "rotten_bad"


def test_shape_errors_are_explicit():
    with pytest.raises(ValueError, match="proba must be"):
        compute_metrics([0, 1], np.ones((2, 3)) / 3, ["a", "b"])
    with pytest.raises(ValueError, match="indices into"):
        compute_metrics([0, 2], np.ones((2, 2)) / 2, ["a", "b"])


def test_confusion_figure_and_markdown_report():
    import matplotlib.pyplot as plt

    labels = ["fresh", "rot|ten"]
    y, proba = random_case(k=2)
    m = compute_metrics(y, proba, labels)
    fig = confusion_matrix_figure(m["confusion"], labels)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert sorted(texts) == sorted(str(v) for row in m["confusion"] for v in row)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    assert png.getvalue().startswith(b"\x89PNG")

    md = report_markdown(m, labels, extra={"model": "demo", "test rows": len(y)})
    assert "| accuracy | %.4f |" % m["accuracy"] in md
    assert "| model | demo |" in md and "### Per class" in md and "### Confusion" in md
    assert "rot\\|ten" in md  # a pipe in a label cannot break the table
    table_rows = [line for line in md.splitlines() if line.startswith("| **")]
    assert len(table_rows) == 2
