import numpy as np
import pytest
from sklearn.metrics import f1_score

from adaptflow.gate import GateRules, decide, mcnemar_p, paired_bootstrap

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
    flip = np.flatnonzero(challenger != y)[:3]  # three more right answers: better, but not significantly
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


def test_mcnemar_exact_values():
    y = np.zeros(20, dtype=int)
    a, b = y.copy(), y.copy()
    assert mcnemar_p(y, a, b) == 1.0
    b[:10] = 1  # ten discordant rows all favouring a: p = 2 * 0.5**10
    assert mcnemar_p(y, a, b) == pytest.approx(2 * 0.5 ** 10)


def test_rules_are_validated():
    with pytest.raises(ValueError, match="metric"):
        GateRules(metric="auc")
    with pytest.raises(ValueError, match="confidence"):
        GateRules(confidence=1.5)
    with pytest.raises(ValueError, match="extra"):
        GateRules(min_detla=0.1)
