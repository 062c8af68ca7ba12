"""Classification metrics from probabilities: accuracy, macro-F1, per-class scores, confusion, calibration.

Plain numpy (scikit-learn is a dev-only dependency; the tests check these numbers against it). A class with
no predictions or no support gets precision/recall/F1 0 rather than NaN, as sklearn's ``zero_division=0``.

This is the project's one definition of the scores: evaluate (``compute_metrics``, hence MLflow's metrics),
the gate's decision, its bootstrap resamples and its floors (``min_metric``) all call the functions below.
Macro-F1 is the mean F1 over **the model's label set** (all ``labels``, in order): a class that neither occurs
in the test rows nor is predicted contributes F1 0, as sklearn's
``f1_score(y, pred, labels=range(k), average="macro", zero_division=0)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

ECE_BINS = 15


def compute_metrics(y_true: Sequence[int], proba: np.ndarray, labels: Sequence[str]) -> dict:
    """Scores of predictions ``argmax(proba)`` against integer labels ``y_true`` (indices into ``labels``).

    Returns:
        ``{"n", "accuracy", "macro_f1", "ece", "per_class": {label: {precision, recall, f1, support}},
        "confusion": [[count]] (rows = true, columns = predicted, in ``labels`` order)}``; JSON-serialisable.
    """
    y = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    k = len(labels)
    if proba.ndim != 2 or proba.shape != (len(y), k):
        raise ValueError(f"proba must be [n={len(y)}, {k} labels]; got {proba.shape}")
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"y_true must hold indices into the {k} labels; got {y.min()}..{y.max()}")
    pred = proba.argmax(axis=1)
    confusion = confusion_matrix(y, pred, k)
    precision, recall, f1 = class_scores(confusion)
    support = confusion.sum(axis=1)
    return {
        "n": int(len(y)),
        "accuracy": float(accuracy(confusion)),
        "macro_f1": float(macro_f1(confusion)),
        "ece": expected_calibration_error(y, proba),
        "per_class": {
            str(label): {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                         "support": int(support[i])}
            for i, label in enumerate(labels)
        },
        "confusion": confusion.tolist(),
    }


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], k: int) -> np.ndarray:
    """Counts ``[k, k]`` (rows = true, columns = predicted) of label indices ``0..k-1``."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def class_scores(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 of a confusion ``[k, k]`` or of a stack of them ``[..., k, k]``.

    F1 is ``2·tp / (support + predicted)`` (equal to ``2PR / (P + R)``), 0 where the class has neither.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support, predicted = cm.sum(axis=-1), cm.sum(axis=-2)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    both = support + predicted
    f1 = np.divide(2 * tp, both, out=np.zeros_like(tp), where=both > 0)
    return precision, recall, f1


def accuracy(confusion: np.ndarray) -> float | np.ndarray:
    """Share of rows on the diagonal (0 for no rows), per confusion of a stack ``[..., k, k]``."""
    cm = np.asarray(confusion, dtype=np.float64)
    total = cm.sum(axis=(-2, -1))
    return np.divide(np.trace(cm, axis1=-2, axis2=-1), total, out=np.zeros_like(total), where=total > 0)


def macro_f1(confusion: np.ndarray) -> float | np.ndarray:
    """Mean F1 over all ``k`` labels of the confusion (see the module docstring), per confusion of a stack."""
    return class_scores(confusion)[2].mean(axis=-1)


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE: sum over equal-width confidence bins of (bin share) x |accuracy - mean confidence|."""
    if len(y_true) == 0:
        return 0.0
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(np.float64)
    # bins (lo, hi]: a confidence of exactly 1.0 lands in the last bin, 0 cannot occur (max over >= 2 classes)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    # per bin: |sum(correct) - sum(confidence)| / n == (bin share) x |accuracy - mean confidence|
    gap = np.abs(np.bincount(bins, correct, n_bins) - np.bincount(bins, confidence, n_bins))
    return float(gap.sum() / len(y_true))


def metric_name(label: str) -> str:
    """A label made MLflow-legal: ASCII letters, digits, ``_ - .``; anything else (``/`` included) becomes ``_``.

    MLflow also allows ``/`` and spaces, but refuses names that are not normalised paths ("a/../b", "a//b"):
    dropping ``/`` avoids that whole class of errors.
    """
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", str(label).strip()) or "_"


def flat_metrics(m: dict) -> dict[str, float]:
    """``{name: float}`` for MLflow: accuracy, macro_f1, ece, then ``precision|recall|f1|support.<label>``."""
    flat = {"accuracy": float(m["accuracy"]), "macro_f1": float(m["macro_f1"]), "ece": float(m["ece"])}
    used: set[str] = set()
    for label, scores in m["per_class"].items():
        name = metric_name(label)
        while name in used:  # two labels that sanitise alike must not overwrite each other
            name += "_"
        used.add(name)
        for key in ("precision", "recall", "f1", "support"):
            flat[f"{key}.{name}"] = float(scores[key])
    return flat


def confusion_matrix_figure(confusion: Sequence[Sequence[int]], labels: Sequence[str]):
    """A matplotlib Figure of the confusion matrix (rows true, columns predicted), each cell annotated.

    Uses the Agg backend (no display needed). The caller saves it and calls ``plt.close(fig)``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless workers and CI; a no-op when a backend is already in use
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, dtype=np.int64)
    k = len(labels)
    size = min(3 + 0.6 * k, 16)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    # colour by row share, so a small class's errors are as visible as a big one's
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set(xticks=range(k), yticks=range(k), xticklabels=labels, yticklabels=labels,
           xlabel="predicted", ylabel="true", title="confusion matrix")
    plt.setp(ax.get_xticklabels(), rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    if k <= 30:  # beyond that the numbers are unreadable anyway
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    return fig


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def report_markdown(m: dict, labels: Sequence[str], extra: dict | None = None) -> str:
    """A markdown report: summary table, per-class table, confusion table (for a Prefect artifact)."""
    lines = ["## Evaluation", "", "| metric | value |", "| --- | --- |"]
    for key, value in (extra or {}).items():
        lines.append(f"| {_cell(key)} | {_cell(value)} |")
    lines += [f"| rows | {m.get('n', sum(map(sum, m['confusion'])))} |",
              f"| accuracy | {m['accuracy']:.4f} |",
              f"| macro F1 | {m['macro_f1']:.4f} |",
              f"| ECE ({ECE_BINS} bins) | {m['ece']:.4f} |",
              "", "### Per class", "",
              "| class | precision | recall | F1 | support |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for label in labels:
        s = m["per_class"][str(label)]
        lines.append(f"| {_cell(label)} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['support']} |")
    lines += ["", "### Confusion (rows: true, columns: predicted)", "",
              "| true \\ predicted | " + " | ".join(_cell(label) for label in labels) + " |",
              "| --- |" + " ---: |" * len(labels)]
    for label, row in zip(labels, m["confusion"]):
        lines.append(f"| **{_cell(label)}** | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
