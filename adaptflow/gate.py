"""The promotion gate's statistics: champion vs challenger on the same test rows → promote, reject or hold.

Both models are scored on identical rows, so their difference is measured *paired*: a bootstrap over rows
resamples both predictions together (bounds on the primary metric's difference), and McNemar's exact test
looks only at the rows where exactly one model is right. Both metrics are higher-is-better, so "the direction
of the primary metric" is up, and every test is **one-sided** at level ``1 − confidence``:

- bootstrap: the challenger is *better* when the lower one-sided bound (the ``1 − confidence`` quantile of the
  resampled differences) is above 0, *worse* when the upper one (the ``confidence`` quantile) is below 0.
  ``ci_low``/``ci_high`` are those two bounds, i.e. together a two-sided interval at ``2·confidence − 1``;
- McNemar: *better* when the challenger is right alone on significantly more discordant rows than the
  champion (``binomtest(..., alternative="greater")``, reported as ``p_value``), *worse* when the reverse
  holds (``p_value_worse``). McNemar compares accuracy, whatever the primary metric: with ``metric: macro_f1``
  it can only confirm a macro-F1 gain when accuracy moves the same way.

A challenger is promoted when it improves the primary metric by at least ``min_delta`` and every selected test
says *better*; it is rejected when it is worse, drops any class's recall by more than ``max_class_drop``, misses
an absolute floor, or when a selected test says it is significantly *worse* (the evidence contradicts a small
gain in the primary metric, e.g. macro-F1 up a little while accuracy fell significantly); anything else is
inconclusive (``on_inconclusive``). Scores come from :mod:`adaptflow.metrics`, the numbers MLflow shows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from adaptflow.metrics import accuracy, class_scores, confusion_matrix, macro_f1

METRICS = ("accuracy", "macro_f1")


class GateRules(BaseModel):
    """How a challenger must compare with the champion (the ``gate:`` config section); checked at construction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: Literal["accuracy", "macro_f1"] = "macro_f1"
    min_delta: float = 0.0
    confidence: float = Field(0.95, ge=0.5, lt=1.0,
                              description="each test is one-sided at level 1 - confidence (see the module docstring)")
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
    p_value_worse: float | None = None  # McNemar, one-sided the other way: "the challenger is right less often"
    evidence: dict[str, str] = field(default_factory=dict)  # per test run: "better", "worse" or "inconclusive"
    rows_compared: int | None = None  # test rows both models were scored on
    rows_excluded: int | None = None  # test rows left out because the champion trained on them (None: unknown)

    def to_dict(self) -> dict:
        return asdict(self)


BOOTSTRAP_BLOCK_VALUES = 1 << 20  # counts or confusion cells held per block of resamples: 8 MB of 8-byte values


def _resample_counts(cells: np.ndarray, n: int, rng: np.random.Generator, block: int):
    """Yield ``[b, len(cells)]`` blocks (``n`` resamples in all) of how often each cell is drawn.

    Resampling all rows with replacement and counting per cell is exactly a multinomial over the cells
    (probabilities = cell share), so no per-row index array is ever built. ``Generator.multinomial`` consumes
    its stream row by row: the same seed gives the same resamples for any ``block``.
    """
    total = int(cells.sum())
    share = cells / total
    for start in range(0, n, block):
        yield rng.multinomial(total, share, size=min(block, n - start))


def paired_bootstrap(y_true, challenger, champion, k: int, metric: str, *, n: int, confidence: float,
                     seed: int = 0, block: int | None = None) -> tuple[float, float]:
    """One-sided bounds of metric(challenger) − metric(champion) at ``confidence``, resampling rows jointly.

    Returns ``(low, high)``: the ``1 − confidence`` and ``confidence`` quantiles of ``n`` resampled
    differences. A row matters only through its (truth, challenger, champion) triple, so the rows are first
    grouped into those (at most ``k³``, usually a handful) cells; each resample is a count per cell. Memory is
    ``O(block × max(cells, k²))`` whatever the number of rows; ``block`` (resamples per block) defaults to
    what fits :data:`BOOTSTRAP_BLOCK_VALUES`.
    """
    y_true, challenger, champion = (np.asarray(v, dtype=np.int64) for v in (y_true, challenger, champion))
    if len(y_true) == 0:
        return 0.0, 0.0
    codes, cells = np.unique((y_true * k + challenger) * k + champion, return_counts=True)
    truth, a, b = codes // (k * k), (codes // k) % k, codes % k
    block = block or max(1, BOOTSTRAP_BLOCK_VALUES // max(len(codes), k * k))
    rng = np.random.default_rng(seed)
    diffs = []
    if metric == "accuracy":
        gain = (a == truth).astype(np.int64) - (b == truth)  # +1 only the challenger right, −1 only the champion
        for counts in _resample_counts(cells, n, rng, block):
            diffs.append(counts @ gain / len(y_true))
    else:
        from scipy.sparse import csr_matrix

        def to_confusions(predicted: np.ndarray):  # [cells] → sparse map of cell counts onto confusion cells
            return csr_matrix((np.ones(len(codes)), (truth * k + predicted, np.arange(len(codes)))),
                              shape=(k * k, len(codes)))

        onto_a, onto_b = to_confusions(a), to_confusions(b)
        for counts in _resample_counts(cells, n, rng, block):
            conf_a = (onto_a @ counts.T).T.reshape(-1, k, k)
            conf_b = (onto_b @ counts.T).T.reshape(-1, k, k)
            diffs.append(macro_f1(conf_a) - macro_f1(conf_b))
    diffs = np.concatenate(diffs)
    return float(np.quantile(diffs, 1 - confidence)), float(np.quantile(diffs, confidence))


def mcnemar_p(y_true, challenger, champion, alternative: Literal["greater", "less"] = "greater") -> float:
    """One-sided exact McNemar p-value: ``greater`` tests "the challenger is right more often", ``less`` the reverse.

    Over the discordant rows (exactly one model right), the challenger's share is Binomial(n, ½) when both
    are equally accurate; 1.0 when there are no discordant rows.
    """
    from scipy.stats import binomtest

    a_right, b_right = np.asarray(challenger) == y_true, np.asarray(champion) == y_true
    only_a, only_b = int(np.sum(a_right & ~b_right)), int(np.sum(~a_right & b_right))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5, alternative=alternative).pvalue)


def _scores(confusion: np.ndarray) -> dict[str, float]:
    return {"accuracy": float(accuracy(confusion)), "macro_f1": float(macro_f1(confusion))}


def _verdict(significant_up: bool, significant_down: bool) -> str:
    return "better" if significant_up else "worse" if significant_down else "inconclusive"


def screen(scores_a: dict[str, float], rules: GateRules, *, has_champion: bool) -> GateDecision | None:
    """The decisions made before any comparison: below an absolute floor → reject; no champion yet → promote
    (the floors cleared); else None (compare with :func:`judge`)."""
    below = {m: v for m, v in rules.min_metric.items() if scores_a[m] < v}
    if below:
        floors = ", ".join(f"{m} {scores_a[m]:.4f} < floor {v}" for m, v in below.items())
        return GateDecision("reject", f"below absolute floor: {floors}", rules.metric, scores_a)
    if not has_champion:
        return GateDecision("promote", "first model of this name (clears the floors)", rules.metric, scores_a)
    return None


def judge(rules: GateRules, scores_a: dict[str, float], scores_b: dict[str, float], recall_deltas: dict[str, float],
          bounds: tuple[float, float], p: float, p_worse: float, *, accuracy: str = "accuracy") -> GateDecision:
    """The decision from the comparison's statistics, by the module's rules (recall drops, ``min_delta``, then
    the evidence of the selected tests).

    Args:
        recall_deltas: challenger minus champion recall per class (or per label).
        bounds: the one-sided bootstrap bounds of the primary metric's difference.
        p, p_worse: McNemar's one-sided p-values (challenger better / worse) on ``accuracy`` (its name: for
            multi-label, subset accuracy).
    """
    low, high = bounds
    delta = scores_a[rules.metric] - scores_b[rules.metric]
    alpha = 1 - rules.confidence
    needed = ["bootstrap", "mcnemar"] if rules.test == "both" else [rules.test]
    evidence = {"bootstrap": _verdict(low > 0, high < 0), "mcnemar": _verdict(p < alpha, p_worse < alpha)}
    evidence = {t: evidence[t] for t in needed}
    verdict = GateDecision("hold", "", rules.metric, scores_a, scores_b, round(delta, 6), round(low, 6),
                           round(high, 6), round(p, 6), recall_deltas, round(p_worse, 6), evidence)
    numbers = (f"one-sided bounds [{low:+.4f}, {high:+.4f}], McNemar p(better)={p:.3g} p(worse)={p_worse:.3g}, "
               f"at confidence {rules.confidence}")

    dropped = {label: d for label, d in recall_deltas.items() if d < -rules.max_class_drop}
    worse = [t for t, e in evidence.items() if e == "worse"]
    if dropped:
        verdict.decision = "reject"
        verdict.reason = "recall dropped beyond max_class_drop={}: {}".format(
            rules.max_class_drop, ", ".join(f"{label} {d:+.3f}" for label, d in dropped.items()))
    elif delta < rules.min_delta:
        verdict.decision = "reject"
        verdict.reason = f"{rules.metric} changed by {delta:+.4f}, less than min_delta={rules.min_delta}"
    elif worse:
        # the gain is too small to stand against significant evidence the other way: not a case for a person
        # to weigh (hold) or for on_inconclusive=promote to wave through
        what = {"bootstrap": f"{rules.metric} (bootstrap)", "mcnemar": f"{accuracy} (McNemar)"}
        verdict.decision = "reject"
        verdict.reason = (f"{rules.metric} changed by {delta:+.4f}, but the challenger is significantly worse in "
                          f"{' and '.join(what[t] for t in worse)}: {accuracy} {scores_a['accuracy']:.4f} vs "
                          f"{scores_b['accuracy']:.4f}; {numbers}")
    elif all(e == "better" for e in evidence.values()):
        verdict.decision = "promote"
        verdict.reason = f"{rules.metric} improved by {delta:+.4f}; {numbers}"
    else:
        verdict.decision = "promote" if rules.on_inconclusive == "promote" else "hold"
        verdict.reason = (f"inconclusive: {rules.metric} {delta:+.4f} but {'/'.join(needed)} does not show an "
                          f"improvement ({numbers}); on_inconclusive={rules.on_inconclusive}")
    return verdict


def decide(y_true, challenger_pred, champion_pred, labels: list[str], rules: GateRules, *, seed: int = 0) -> GateDecision:
    """Compare challenger with champion on the same rows.

    Args:
        y_true, challenger_pred, champion_pred: label indices into ``labels``; ``champion_pred`` None when the
            model has no champion yet (the first model is promoted if it clears the floors).
    """
    y_true, challenger_pred = np.asarray(y_true), np.asarray(challenger_pred)
    k = len(labels)
    conf_a = confusion_matrix(y_true, challenger_pred, k)
    scores_a = _scores(conf_a)
    early = screen(scores_a, rules, has_champion=champion_pred is not None)
    if early is not None:
        return early
    champion_pred = np.asarray(champion_pred)
    conf_b = confusion_matrix(y_true, champion_pred, k)
    recall_change = class_scores(conf_a)[1] - class_scores(conf_b)[1]
    recall_deltas = {label: round(float(d), 6) for label, d in zip(labels, recall_change)}
    bounds = paired_bootstrap(y_true, challenger_pred, champion_pred, k, rules.metric,
                              n=rules.n_bootstrap, confidence=rules.confidence, seed=seed)
    return judge(rules, scores_a, _scores(conf_b), recall_deltas, bounds,
                 mcnemar_p(y_true, challenger_pred, champion_pred, "greater"),
                 mcnemar_p(y_true, challenger_pred, champion_pred, "less"))
