"""adaptflow.validate: each rule, the report, and the cases where training cannot go on."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from adaptflow.data import TEXT_DTYPE, DataError, read_parquet_bytes, to_parquet_bytes
from adaptflow.validate import QUARANTINE_COLUMNS, LabelCaseError, ValidationRules, validate_split

RULES = ValidationRules()


def frame(rows: list[tuple], start: int = 1) -> pd.DataFrame:
    """``(text, label)`` pairs as a prepare_frame-shaped frame with rows numbered from ``start``."""
    return pd.DataFrame(
        {
            "text": pd.Series([t for t, _ in rows], dtype=object),
            "label": pd.Series([lab for _, lab in rows], dtype=object),
            "group": pd.Series([None] * len(rows), dtype=object),
            "row": range(start, start + len(rows)),
        }
    )


BASE_TRAIN = [("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")]
BASE_TEST = [("a9", "a"), ("b9", "b")]


def run(extra_train=(), extra_test=(), rules=RULES):
    train, test = frame(BASE_TRAIN + list(extra_train)), frame(BASE_TEST + list(extra_test), start=100)
    return validate_split(train, test, rules=rules, source="d.csv")


def reasons(result) -> dict[int, str]:
    return dict(zip(result.quarantine["row"], result.quarantine["reason"]))


def test_clean_data_passes_untouched():
    result = run()
    assert len(result.train) == 4 and len(result.test) == 2 and result.quarantine.empty
    assert result.labels == ["a", "b"] and list(result.quarantine.columns) == QUARANTINE_COLUMNS
    assert result.report["rows_out"] == {"train": 4, "test": 2, "total": 6}


def test_empty_text_and_missing_label():
    result = run([("   ", "a"), (None, "b"), ("c1", None), ("c2", " ")])
    assert reasons(result) == {5: "empty_text", 6: "empty_text", 7: "missing_label", 8: "missing_label"}


def test_conflicting_labels_quarantine_every_copy_across_splits():
    result = run([("same", "a"), ("same", "b")], [("same", "a")])
    assert reasons(result) == {5: "conflicting_labels", 6: "conflicting_labels", 102: "conflicting_labels"}
    assert "same" not in set(result.train["text"]) | set(result.test["text"])


def test_duplicates_are_dropped_once_not_quarantined():
    result = run([("a1", "a"), ("a1", "a")])
    assert result.quarantine.empty and result.train["text"].tolist().count("a1") == 1
    assert result.dropped["row"].tolist() == [5, 6] and set(result.dropped["reason"]) == {"duplicate"}
    assert result.report["reasons"]["duplicate"] == 2 and result.report["dropped"] == 2


def test_leakage_is_dropped_from_train_unless_disabled():
    result = run([("a9", "a")])
    assert "a9" not in set(result.train["text"]) and "a9" in set(result.test["text"])
    assert result.dropped.to_dict("records") == [
        {"split": "train", "row": 5, "text": "a9", "label": "a", "reason": "leakage"}
    ]
    kept = run([("a9", "a")], rules=ValidationRules(drop_leakage=False))
    assert "a9" in set(kept.train["text"]) and kept.report["leakage_found"] == 1 and kept.dropped.empty


def test_unseen_and_rare_labels():
    result = run([("c1", "c")], [("c9", "c"), ("d9", "d")])
    assert reasons(result) == {5: "rare_class", 102: "unseen_label", 103: "unseen_label"}
    assert result.labels == ["a", "b"]
    assert len(run([("c1", "c")], rules=ValidationRules(min_class_count=1)).labels) == 3


def test_report_is_json_and_counts_everything():
    result = run([("", "a"), ("a1", "a"), ("c1", "c")], [("e9", "e")])
    report = json.loads(json.dumps(result.report))
    assert report["rows_in"] == {"train": 7, "test": 3, "total": 10}
    assert report["reasons"] == {
        "empty_text": 1, "missing_label": 0, "conflicting_labels": 0, "rare_class": 1, "unseen_label": 1,
        "duplicate": 1, "leakage": 0,
    }
    assert report["quarantined"] == 3 and report["quarantine_fraction"] == 0.3
    assert report["label_counts"] == {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}}
    assert report["example_rows"]["empty_text"] == [5]


@pytest.mark.parametrize(
    "train, test, rules, match",
    [
        ([], [], RULES, "no rows to validate"),
        ([("", "a")], [(None, "b")], RULES, r"every one of the 2 rows .*empty_text=2 \(rows 1, 100\)"),
        ([("a1", "a"), ("a2", "a")], [("a9", "a")], RULES, r"fewer than 2 classes after cleaning \(\['a'\]\)"),
        (BASE_TRAIN, [("z9", "z")], RULES, "no test rows are left.*unseen_label=1"),
        (BASE_TRAIN + [("", "a")], BASE_TEST, ValidationRules(max_quarantine_fraction=0.1),
         r"1 of 7 rows \(14.3%\) were quarantined, above max_quarantine_fraction=0.1"),
    ],
)
def test_cannot_go_on(train, test, rules, match):
    with pytest.raises(DataError, match=match) as err:
        validate_split(frame(train), frame(test, start=100), rules=rules, source=["train.csv", "test.csv"])
    assert "train.csv + test.csv" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_class_count": 0}, "min_class_count must be >= 1"),
        ({"min_class_count": 2.5}, "min_class_count must be an integer"),
        ({"max_quarantine_fraction": 1.5}, r"max_quarantine_fraction must be a number in \[0, 1\]"),
        ({"drop_leakage": "yes"}, "drop_leakage must be True or False"),
        ({"label_case": "lower"}, "label_case must be one of error, fold"),
    ],
)
def test_rules_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ValidationRules(**kwargs)


def test_parquet_snapshots_validate_the_same():
    train, test = frame(BASE_TRAIN + [("c1", None)]), frame(BASE_TEST, start=100)
    result = validate_split(
        read_parquet_bytes(to_parquet_bytes(train)), read_parquet_bytes(to_parquet_bytes(test)), rules=RULES, source="s"
    )
    assert reasons(result) == {5: "missing_label"} and result.quarantine["label"].tolist() == [None]
    strings = {c: TEXT_DTYPE for c in ("split", "text", "label", "reason")}  # snapshots read back Arrow-held
    pd.testing.assert_frame_equal(read_parquet_bytes(to_parquet_bytes(result.quarantine)),
                                  result.quarantine.astype(strings))


def test_labels_differing_only_by_case_or_spacing_fail_naming_them():
    train = [("a3", "A"), ("a4", "A"), ("a5", " a "), ("b3", "B"), ("b4", "b"), ("b5", "b")]
    with pytest.raises(LabelCaseError, match="differ only by case or spacing") as err:
        run(train, [("a8", "A")])
    message = str(err.value)
    assert isinstance(err.value, DataError) and message.startswith("d.csv: ")
    assert "'A' (3 rows: train rows 5, 6; test rows 102) vs 'a' (3 rows: train rows 1, 2; test rows 100)" in message
    assert "' a ' (1 row: train rows 7)" in message
    assert "'b' (5 rows: train rows 3, 4, 9, 10; test rows 101) vs 'B' (1 row: train rows 8)" in message
    assert "data.label_case: fold" in message


def test_label_case_fold_merges_into_the_most_frequent_spelling_and_counts_rows():
    train = [("a3", "A"), ("a1", "A"), ("b3", " B "), ("b4", "b "), ("c1", "c"), ("c2", "c")]
    result = run(train, [("b8", "B ")], rules=ValidationRules(label_case="fold"))
    assert result.labels == ["a", "b", "c"]
    assert result.report["label_case"] == {"mode": "fold", "folded_rows": 5,
                                           "groups": {"a": {"A": 2}, "b": {" B ": 1, "B ": 1, "b ": 1}}}
    assert set(result.train["label"]) == {"a", "b", "c"} and set(result.test["label"]) == {"a", "b"}
    # "a1" labelled "a" and "A" is one label twice (a duplicate), not a conflict
    assert result.quarantine.empty and result.dropped["row"].tolist() == [6]
    assert run().report["label_case"] == {"mode": "error", "folded_rows": 0, "groups": {}}
