"""The gate's statistics: decisions, one-sided tests in the primary metric's direction, the chunked bootstrap."""

import tracemalloc

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, f1_score

from adaptflow.gate import GateRules, decide, mcnemar_p, paired_bootstrap
from adaptflow.metrics import confusion_matrix, macro_f1

LABELS = ["neg", "pos"]


def predictions(y, accuracy, rng):
    """Predictions that are right on about ``accuracy`` of the rows."""
    wrong = rng.random(len(y)) > accuracy
    return np.where(wrong, 1 - y, y)


@pytest.fixture
def rows():
    rng = np.random.default_rng(0)
    return rng.integers(0, 2, size=1500), rng


def test_clearly_better_challenger_is_promoted(rows):
    y, rng = rows
    result = decide(y, predictions(y, 0.85, rng), predictions(y, 0.70, rng), LABELS, GateRules())
    assert result.decision == "promote" and result.ci_low > 0 and result.p_value < 0.05


def test_worse_challenger_is_rejected(rows):
    y, rng = rows
    result = decide(y, predictions(y, 0.60, rng), predictions(y, 0.75, rng), LABELS, GateRules())
    assert result.decision == "reject" and result.delta < 0


def test_indistinguishable_challenger_is_held_or_promoted_by_policy(rows):
    y, rng = rows
    champion = predictions(y, 0.75, rng)
    challenger = champion.copy()
    # two more right answers: better, but not significantly (a resample misses both with chance e^-2 > 0.05;
    # with three, e^-3 = 0.0498 is just below the one-sided 0.05 that confidence 0.95 now means)
    flip = np.flatnonzero(challenger != y)[:2]
    challenger[flip] = y[flip]
    assert decide(y, challenger, champion, LABELS, GateRules()).decision == "hold"
    assert decide(y, challenger, champion, LABELS, GateRules(on_inconclusive="promote")).decision == "promote"


def test_class_recall_drop_rejects_even_when_the_metric_improves(rows):
    y, _ = rows
    champion, challenger = y.copy(), y.copy()
    champion[np.flatnonzero(y == 1)[:300]] = 0  # champion errs only on 'pos'
    challenger[np.flatnonzero(y == 0)[:200]] = 1  # challenger errs less overall, but only on 'neg'
    result = decide(y, challenger, champion, LABELS, GateRules(metric="accuracy", max_class_drop=0.05))
    assert result.delta > 0 and result.decision == "reject" and "neg" in result.reason


def test_floors_and_first_model(rows):
    y, rng = rows
    weak = predictions(y, 0.55, rng)
    assert decide(y, weak, None, LABELS, GateRules(min_metric={"accuracy": 0.7})).decision == "reject"
    assert decide(y, weak, None, LABELS, GateRules()).decision == "promote"


def test_bootstrap_interval_brackets_the_observed_macro_f1_difference(rows):
    y, rng = rows
    a, b = predictions(y, 0.8, rng), predictions(y, 0.7, rng)
    observed = f1_score(y, a, average="macro") - f1_score(y, b, average="macro")
    low, high = paired_bootstrap(y, a, b, 2, "macro_f1", n=500, confidence=0.95)
    assert low < observed < high
    # one-sided bounds at 0.95 are the 5 % / 95 % quantiles: inside the two-sided 95 % interval (2.5 / 97.5 %)
    wide_low, wide_high = paired_bootstrap(y, a, b, 2, "macro_f1", n=500, confidence=0.975)
    assert wide_low < low < high < wide_high


def test_mcnemar_is_one_sided_binomtest():
    y = np.zeros(20, dtype=int)
    a, b = y.copy(), y.copy()
    assert mcnemar_p(y, a, b) == 1.0
    b[:10] = 1  # ten discordant rows all favouring the challenger a
    assert mcnemar_p(y, a, b) == pytest.approx(0.5 ** 10)  # one-sided: half the old two-sided 2 * 0.5**10
    assert mcnemar_p(y, a, b, "less") == 1.0
    assert mcnemar_p(y, b, a, "less") == pytest.approx(0.5 ** 10)
    a[10:13] = 1  # 10 rows only a is right, 3 only b
    assert mcnemar_p(y, a, b) == pytest.approx(binomtest(10, 13, 0.5, alternative="greater").pvalue)


def imbalanced_trade_off():
    """Champion misses half the minority class; the challenger finds 35 more of it but loses 60 majority rows."""
    y = np.r_[np.zeros(1800, int), np.ones(200, int)]
    champion, challenger = y.copy(), y.copy()
    champion[1800:1900] = 0
    challenger[1800:1865] = 0
    challenger[:60] = 1
    champion[100:140] = challenger[100:140] = 1  # errors both make
    return y, challenger, champion


@pytest.mark.parametrize("on_inconclusive", ["hold", "promote"])
def test_macro_f1_up_a_little_while_accuracy_falls_significantly_is_not_promoted(on_inconclusive):
    """Two-sided McNemar counted a significant *fall* in accuracy as evidence for a macro-F1 gain (promoted)."""
    y, challenger, champion = imbalanced_trade_off()
    f1_gain = f1_score(y, challenger, average="macro") - f1_score(y, champion, average="macro")
    assert 0 < f1_gain < 0.02 and accuracy_score(y, challenger) < accuracy_score(y, champion)
    rules = GateRules(metric="macro_f1", test="mcnemar", on_inconclusive=on_inconclusive)
    result = decide(y, challenger, champion, ["neg", "pos"], rules)
    assert result.delta == pytest.approx(f1_gain, abs=1e-6)
    assert result.decision == "reject" and "significantly worse in accuracy (McNemar)" in result.reason
    assert result.p_value_worse < 0.05 < result.p_value and result.evidence == {"mcnemar": "worse"}
    # "both" rejects too; the bootstrap alone (on macro-F1 itself) finds the small gain inconclusive: hold
    assert decide(y, challenger, champion, ["neg", "pos"], GateRules(test="both")).decision == "reject"
    assert decide(y, challenger, champion, ["neg", "pos"], GateRules(test="bootstrap")).decision == "hold"


def test_accuracy_gain_confirmed_by_one_sided_mcnemar(rows):
    y, rng = rows
    champion = predictions(y, 0.75, rng)
    challenger = np.where(rng.random(len(y)) < 0.3, y, champion)  # fixes ~30 % of the champion's errors
    result = decide(y, challenger, champion, LABELS, GateRules(metric="accuracy", test="mcnemar"))
    assert result.decision == "promote" and result.evidence == {"mcnemar": "better"} and result.p_value < 0.05


def naive_bootstrap(y, a, b, n, confidence, seed=0):
    """The textbook paired bootstrap: resample row indices, score both models on them (macro-F1 as sklearn's,
    which test_metrics checks)."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        diffs.append(macro_f1(confusion_matrix(y[i], a[i], 3)) - macro_f1(confusion_matrix(y[i], b[i], 3)))
    return np.quantile(diffs, 1 - confidence), np.quantile(diffs, confidence)


def test_bootstrap_over_cell_counts_matches_resampling_rows():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 400)
    a = np.where(rng.random(400) < 0.8, y, rng.integers(0, 3, 400))
    b = np.where(rng.random(400) < 0.7, y, rng.integers(0, 3, 400))
    low, high = paired_bootstrap(y, a, b, 3, "macro_f1", n=2000, confidence=0.9)
    naive_low, naive_high = naive_bootstrap(y, a, b, 2000, 0.9)
    assert low == pytest.approx(naive_low, abs=0.01) and high == pytest.approx(naive_high, abs=0.01)


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_bootstrap_same_seed_same_bounds_whatever_the_block(rows, metric):
    y, rng = rows
    a, b = predictions(y, 0.8, rng), predictions(y, 0.78, rng)
    bounds = {paired_bootstrap(y, a, b, 2, metric, n=300, confidence=0.95, seed=7, block=block)
              for block in (None, 1, 7, 300)}
    assert len(bounds) == 1
    assert paired_bootstrap(y, a, b, 2, metric, n=300, confidence=0.95, seed=8) not in bounds


def test_bootstrap_memory_does_not_grow_with_resamples_times_rows():
    """The old bootstrap held n_bootstrap x n_test int64 arrays (4 x 160 MB here); now a few MB at most."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 20_000)
    a, b = np.where(rng.random(len(y)) < 0.8, y, 0), np.where(rng.random(len(y)) < 0.8, y, 1)
    tracemalloc.start()
    try:
        for metric in ("accuracy", "macro_f1"):
            decide(y, a, b, ["x", "y", "z"], GateRules(metric=metric, n_bootstrap=1000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MB"


def test_memory_benchmark_runs(capsys):
    """benchmarks/gate_memory.py end to end on tiny data (its numbers are reported, never asserted)."""
    from benchmarks import gate_memory

    [result] = gate_memory.main(["--rows", "2000", "--bootstrap", "100", "--metric", "macro_f1"])
    assert result["peak_rss_mb"] > 0 and result["decision"] in {"promote", "hold", "reject"}
    assert "metric=macro_f1 rows=2000" in capsys.readouterr().out


def test_rules_are_validated():
    with pytest.raises(ValueError, match="metric"):
        GateRules(metric="auc")
    with pytest.raises(ValueError, match="confidence"):
        GateRules(confidence=1.5)
    with pytest.raises(ValueError, match="extra"):
        GateRules(min_detla=0.1)
