"""Drift statistics: do new rows still look like the rows a model trained on? Pure numpy/scikit-learn on arrays.

Three questions, each answered with an effect size (at 100k rows every difference is "significant", so no
decision rests on a p-value alone):

- **embedding drift** (the decision): a domain classifier — L2-regularised logistic regression, the same family
  as our heads — learns to tell training vectors from new vectors; its held-out AUC (out-of-fold predictions of
  a stratified k-fold) is the score: 0.5 when the two samples are indistinguishable, 1.0 when every new row is
  recognisably new. The confidence interval is DeLong's (the AUC's variance from its structural components), and
  the rows have *drifted* when the interval's lower end exceeds ``threshold`` (0.6 by default: a classifier that
  is right about which sample a row came from in more than 60 % of pairs, with confidence). Both samples are cut
  to the same size (at most ``sample_rows`` each), so the score means the same at 1k and at 1M rows.
- **prediction drift**: the model's predicted-label distribution on the new rows against its predictions on the
  training sample (and, reported, against the training labels), as the population stability index (PSI; 0.1
  "moderate", 0.25 "major" in credit-scoring practice; ``label_shift_psi`` flags it), and the share of
  low-confidence predictions (top probability below ``low_confidence``) on the new rows and on the training sample.
  Shifted when the PSI exceeds ``label_shift_psi`` and a chi-square test of the two count vectors rejects
  equality at ``label_shift_alpha`` (at 50 rows a side a PSI of 0.2 is often noise; at 5,000 never).
- **input health** of the new rows: token length quantiles, the share truncated at ``max_length`` and the share
  of unknown tokens.

Everything here takes arrays; :mod:`adaptflow.drift_check` gathers them (row manifest, embedding cache, head).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import chi2_contingency, norm, rankdata

MIN_ROWS = 20  # fewer rows on either side: no verdict (``drifted`` False, ``note`` says why)


class DriftRules(BaseModel):
    """How drift is measured and decided (``adaptflow drift`` options, ``score`` flow parameter ``drift``)."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.6, gt=0.5, lt=1.0, description="drifted when the domain classifier's AUC lower "
                             "confidence bound exceeds this")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="two-sided level of the AUC interval")
    sample_rows: int = Field(5000, ge=MIN_ROWS, description="rows per side (new, training) at most; more are sampled")
    folds: int = Field(5, ge=2, le=20, description="cross-validation folds of the domain classifier")
    label_shift_psi: float = Field(0.2, gt=0, description="prediction drift flagged when the PSI of the predicted "
                                   "labels vs the training labels exceeds this")
    label_shift_alpha: float = Field(0.01, gt=0, lt=0.5, description="level of the chi-square test that must also "
                                     "reject for a prediction drift (keeps small samples' noise from deciding)")
    low_confidence: float = Field(0.6, gt=0, lt=1, description="a prediction whose top probability is below this "
                                  "counts as low-confidence")
    seed: int = 13


def delong_interval(scores: np.ndarray, is_new: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """(AUC, low, high) of ``scores`` separating ``is_new`` rows from the others; DeLong's variance, midranks.

    DeLong, DeLong & Clarke-Pearson (1988); the O(n log n) form of Sun & Xu (2014).
    """
    pos, neg = scores[is_new], scores[~is_new]
    m, n = len(pos), len(neg)
    ranks = rankdata(np.concatenate([pos, neg]))
    auc = (ranks[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (ranks[:m] - rankdata(pos)) / n  # per new row: share of training rows it outscores
    v01 = 1.0 - (ranks[m:] - rankdata(neg)) / m  # per training row: share of new rows that outscore it
    se = float(np.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / n))
    z = float(norm.ppf(0.5 + confidence / 2))
    return float(auc), max(0.0, float(auc) - z * se), min(1.0, float(auc) + z * se)


def balanced_sample(n_reference: int, n_new: int, rules: DriftRules) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of equal-size random samples of both sides (at most ``rules.sample_rows`` each)."""
    rng = np.random.default_rng(rules.seed)
    k = min(n_reference, n_new, rules.sample_rows)
    return (np.sort(rng.choice(n_reference, k, replace=False)), np.sort(rng.choice(n_new, k, replace=False)))


def embedding_drift(reference: np.ndarray, new: np.ndarray, rules: DriftRules) -> dict:
    """The domain classifier's held-out AUC, its interval and the verdict, plus the out-of-fold scores of both
    samples (for the histogram). Call with samples of equal size (:func:`balanced_sample`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    n_ref, n_new = len(reference), len(new)
    result = {"score": None, "ci_low": None, "ci_high": None, "drifted": False, "threshold": rules.threshold,
              "rows": {"reference": n_ref, "new": n_new}, "method": "domain classifier AUC (logistic regression, "
              f"{rules.folds}-fold out-of-fold), DeLong {rules.confidence:.0%} interval"}
    if min(n_ref, n_new) < MIN_ROWS:
        result["note"] = f"too few rows for a verdict ({n_ref} training, {n_new} new; {MIN_ROWS} needed on each side)"
        return result
    X = np.concatenate([reference, new]).astype(np.float64)
    X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)  # as the heads see them
    y = np.concatenate([np.zeros(n_ref, dtype=bool), np.ones(n_new, dtype=bool)])
    folds = StratifiedKFold(min(rules.folds, n_ref, n_new), shuffle=True, random_state=rules.seed)
    scores = cross_val_predict(LogisticRegression(C=1.0, max_iter=500), X, y, cv=folds, method="decision_function")
    auc, low, high = delong_interval(scores, y, rules.confidence)
    result.update(score=round(auc, 4), ci_low=round(low, 4), ci_high=round(high, 4), drifted=bool(low > rules.threshold))
    result["scores"] = {"reference": scores[~y], "new": scores[y]}
    return result


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index of two count (or share) vectors over the same bins."""
    p = np.asarray(expected, dtype=np.float64) + eps
    q = np.asarray(actual, dtype=np.float64) + eps
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((q - p) * np.log(q / p)))


def prediction_drift(labels: list[str], train_counts: dict[str, int], new_proba: np.ndarray,
                     reference_proba: np.ndarray, rules: DriftRules) -> dict:
    """The predicted-label distribution on the new rows against the training rows, and low-confidence shares.

    Two PSIs: ``psi`` compares the predictions on the new rows with the model's predictions on the training
    sample, and decides ``shifted``; ``psi_vs_training_labels`` compares them with the training labels. The
    first isolates a change in the data from the model's own bias: a head that favours one class does so on its
    training rows too (measured: a weak head predicting one class for 95 % of rows scores PSI 4.8 against the
    labels of rows drawn from its own training distribution).

    Args:
        labels: the model's classes, in its probability columns' order.
        train_counts: training rows per label (the row manifest's ``train`` split).
        new_proba, reference_proba: the head's probabilities on the new rows and on the training sample.
    """
    def predicted(p: np.ndarray) -> np.ndarray:
        return np.bincount(p.argmax(axis=1), minlength=len(labels)).astype(np.float64) if len(p) else np.zeros(len(labels))

    def low(p: np.ndarray) -> float | None:
        return round(float((p.max(axis=1) < rules.low_confidence).mean()), 4) if len(p) else None

    def shares(v: np.ndarray) -> dict:
        return {label: round(float(x / v.sum()), 4) if v.sum() else None for label, x in zip(labels, v)}

    def psi_or_none(a: np.ndarray, b: np.ndarray) -> float | None:
        return round(psi(a, b), 4) if a.sum() and b.sum() else None

    train = np.asarray([train_counts.get(label, 0) for label in labels], dtype=np.float64)
    new, reference = predicted(new_proba), predicted(reference_proba)
    value = psi_or_none(reference, new)
    p_value = None
    if value is not None:
        seen = (new + reference) > 0  # classes neither sample predicts carry no information
        p_value = float(chi2_contingency(np.stack([reference[seen], new[seen]]))[1]) if seen.sum() > 1 else 1.0
    # the effect size decides, the test only keeps a small sample's noise from deciding (PSI has no error bar)
    shifted = bool(value is not None and value > rules.label_shift_psi and p_value < rules.label_shift_alpha)
    return {"psi": value, "shifted": shifted, "p_value": None if p_value is None else round(p_value, 6),
            "threshold": rules.label_shift_psi, "psi_vs_training_labels": psi_or_none(train, new),
            "train": shares(train), "train_predicted": shares(reference), "predicted": shares(new),
            "low_confidence": {"below": rules.low_confidence, "new": low(new_proba), "train": low(reference_proba)}}


def input_health(token_lengths: np.ndarray, max_length: int, unknown_tokens: int, total_tokens: int,
                 char_lengths: np.ndarray) -> dict:
    """Length quantiles, the truncated share and the unknown-token share of the new rows.

    Args:
        token_lengths: tokens per text *before* truncation (special tokens included), capped anywhere above
            ``max_length`` (a longer text only needs to be known as longer).
    """
    if not len(token_lengths):
        return {"rows": 0}
    q = lambda a: {f"p{p}": int(np.percentile(a, p)) for p in (5, 50, 95)}  # noqa: E731
    return {"rows": int(len(token_lengths)), "tokens": q(token_lengths), "chars": q(char_lengths),
            "truncated_share": round(float((token_lengths > max_length).mean()), 4), "max_length": max_length,
            "unknown_token_share": round(unknown_tokens / total_tokens, 5) if total_tokens else None}


__all__ = ["DriftRules", "balanced_sample", "delong_interval", "embedding_drift", "input_health", "prediction_drift",
           "psi"]
