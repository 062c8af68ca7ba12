"""The promotion gate: champion vs challenger on the same test rows → promote, reject or hold.

Both models are scored on identical rows, so their difference is measured *paired*: a bootstrap over rows
resamples both predictions together (the CI of the metric difference), and McNemar's exact test looks only
at the rows where exactly one model is right. A challenger is promoted only when it improves the primary
metric by at least ``min_delta`` and the evidence excludes "no difference" at ``confidence``; it is rejected
when it is worse, drops any class's recall by more than ``max_class_drop``, or misses an absolute floor.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

METRICS = ("accuracy", "macro_f1")


class GateRules(BaseModel):
    """How a challenger must compare with the champion (the ``gate:`` config section); checked at construction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: Literal["accuracy", "macro_f1"] = "macro_f1"
    min_delta: float = 0.0
    confidence: float = Field(0.95, ge=0.5, lt=1.0)
    test: Literal["bootstrap", "mcnemar", "both"] = "bootstrap"
    n_bootstrap: int = Field(1000, ge=100, description="resamples; fewer give an unusable interval")
    on_inconclusive: Literal["hold", "promote"] = "hold"
    # 0.10, not tighter: one class's recall on a few hundred test rows moves by ~3 points between two equally
    # good heads, so a tighter default blocks genuine improvements (measured on rotten_tomatoes)
    max_class_drop: float = Field(0.10, ge=0.0, le=1.0, description="largest tolerated drop of any class's recall")
    min_metric: dict[Literal["accuracy", "macro_f1"], float] = Field(default_factory=dict,
                                                                    description="absolute floors")
    smoke_test: bool = Field(True, description="load the model in a fresh process and predict before promoting")


@dataclass
class GateDecision:
    """The verdict and the numbers behind it (all JSON-able)."""

    decision: Literal["promote", "reject", "hold"]
    reason: str
    metric: str
    challenger: dict[str, float]
    champion: dict[str, float] | None = None
    delta: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    class_recall_deltas: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def _scores(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 from a confusion matrix (classes absent from both sides score 0 F1, as sklearn)."""
    tp = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    denom = predicted + actual
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"accuracy": float(tp.sum() / max(confusion.sum(), 1)), "macro_f1": float(f1.mean())}


def _recalls(confusion: np.ndarray) -> np.ndarray:
    actual = confusion.sum(axis=1)
    return np.divide(np.diag(confusion), actual, out=np.zeros(len(actual)), where=actual > 0)


def _batched_macro_f1(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """Macro-F1 of each bootstrap resample; rows of ``y_true``/``y_pred`` are resamples."""
    b = y_true.shape[0]
    flat = (np.arange(b)[:, None] * k * k + y_true * k + y_pred).ravel()
    confusion = np.bincount(flat, minlength=b * k * k).reshape(b, k, k).astype(float)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    denom = confusion.sum(axis=1) + confusion.sum(axis=2)
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0).mean(axis=1)


def paired_bootstrap(y_true, challenger, champion, k: int, metric: str, *, n: int, confidence: float,
                     seed: int = 0) -> tuple[float, float]:
    """Percentile CI of metric(challenger) − metric(champion), resampling rows jointly."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y_true), size=(n, len(y_true)))
    yt, a, b = y_true[idx], challenger[idx], champion[idx]
    if metric == "accuracy":
        diffs = (a == yt).mean(axis=1) - (b == yt).mean(axis=1)
    else:
        diffs = _batched_macro_f1(yt, a, k) - _batched_macro_f1(yt, b, k)
    alpha = (1 - confidence) / 2
    return float(np.quantile(diffs, alpha)), float(np.quantile(diffs, 1 - alpha))


def mcnemar_p(y_true, challenger, champion) -> float:
    """Two-sided exact McNemar p-value over the discordant rows."""
    a_right, b_right = challenger == y_true, champion == y_true
    only_a, only_b = int(np.sum(a_right & ~b_right)), int(np.sum(~a_right & b_right))
    n = only_a + only_b
    if n == 0:
        return 1.0
    # P(X <= min) under Binomial(n, 1/2), in log space so large n stays finite
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
                 for i in range(min(only_a, only_b) + 1)]
    top = max(log_terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in log_terms)
    return float(min(1.0, 2 * tail))


def decide(y_true, challenger_pred, champion_pred, labels: list[str], rules: GateRules, *, seed: int = 0) -> GateDecision:
    """Compare challenger with champion on the same rows.

    Args:
        y_true, challenger_pred, champion_pred: label indices into ``labels``; ``champion_pred`` None when the
            model has no champion yet (the first model is promoted if it clears the floors).
    """
    y_true, challenger_pred = np.asarray(y_true), np.asarray(challenger_pred)
    k = len(labels)
    conf_a = _confusion(y_true, challenger_pred, k)
    scores_a = _scores(conf_a)
    below = {m: v for m, v in rules.min_metric.items() if scores_a[m] < v}
    if below:
        floors = ", ".join(f"{m} {scores_a[m]:.4f} < floor {v}" for m, v in below.items())
        return GateDecision("reject", f"below absolute floor: {floors}", rules.metric, scores_a)
    if champion_pred is None:
        return GateDecision("promote", "first model of this name (clears the floors)", rules.metric, scores_a)

    champion_pred = np.asarray(champion_pred)
    conf_b = _confusion(y_true, champion_pred, k)
    scores_b = _scores(conf_b)
    recall_deltas = {label: round(float(d), 6) for label, d in zip(labels, _recalls(conf_a) - _recalls(conf_b))}
    delta = scores_a[rules.metric] - scores_b[rules.metric]
    low, high = paired_bootstrap(y_true, challenger_pred, champion_pred, k, rules.metric,
                                 n=rules.n_bootstrap, confidence=rules.confidence, seed=seed)
    p = mcnemar_p(y_true, challenger_pred, champion_pred)
    verdict = GateDecision("hold", "", rules.metric, scores_a, scores_b, round(delta, 6), round(low, 6),
                           round(high, 6), round(p, 6), recall_deltas)

    dropped = {label: d for label, d in recall_deltas.items() if d < -rules.max_class_drop}
    if dropped:
        verdict.decision = "reject"
        verdict.reason = "recall dropped beyond max_class_drop={}: {}".format(
            rules.max_class_drop, ", ".join(f"{label} {d:+.3f}" for label, d in dropped.items()))
    elif delta < rules.min_delta:
        verdict.decision = "reject"
        verdict.reason = f"{rules.metric} changed by {delta:+.4f}, less than min_delta={rules.min_delta}"
    else:
        evidence = {"bootstrap": low > 0, "mcnemar": p < 1 - rules.confidence}
        needed = ["bootstrap", "mcnemar"] if rules.test == "both" else [rules.test]
        if all(evidence[t] for t in needed):
            verdict.decision = "promote"
            verdict.reason = (f"{rules.metric} improved by {delta:+.4f} (CI [{low:+.4f}, {high:+.4f}], "
                              f"McNemar p={p:.3g}) at confidence {rules.confidence}")
        else:
            verdict.decision = "promote" if rules.on_inconclusive == "promote" else "hold"
            verdict.reason = (f"inconclusive: {rules.metric} {delta:+.4f} but CI [{low:+.4f}, {high:+.4f}] / "
                              f"McNemar p={p:.3g} does not exclude no difference at {rules.confidence}; "
                              f"on_inconclusive={rules.on_inconclusive}")
    return verdict
