"""Validation rules that turn a raw train/test split into clean rows, a quarantine and a report.

Rows are *quarantined* when they are bad data (empty text, missing or conflicting labels, labels the head
cannot learn) and *dropped* when they are merely redundant (exact duplicates, test texts repeated in train).
Both keep their source ``row`` so a reviewer can find them in the original file.

Label values that are equal after case-folding and whitespace trimming (``fresh``, ``FRESH``, `` Fresh ``) are
one class spelled several ways: by default validation fails naming them (LabelCaseError); with
``label_case="fold"`` each group is merged into its most frequent spelling (the one most of the data, and so
the user, uses; ties: the first in sorted order) and the report counts the rows that changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from adaptflow.data import CHUNK_ROWS, DataError, format_rows, is_missing

LABEL_CASE_MODES = ("error", "fold")
QUARANTINE_REASONS = ("empty_text", "missing_label", "conflicting_labels", "rare_class", "unseen_label")
DROP_REASONS = ("duplicate", "leakage")
QUARANTINE_COLUMNS = ["split", "row", "text", "label", "reason"]
_REQUIRED = ("text", "label", "row")


@dataclass(frozen=True)
class ValidationRules:
    """Thresholds for :func:`validate_split`; checked at construction."""

    min_class_count: int = 2  # train rows a class needs; fewer are quarantined as rare_class
    max_quarantine_fraction: float = 1.0  # fail when a larger share of all rows is quarantined
    drop_leakage: bool = True  # drop train rows whose text also appears in test
    label_case: str = "error"  # labels equal but for case/spacing: "error" fails, "fold" merges them

    def __post_init__(self):
        if isinstance(self.min_class_count, bool) or not isinstance(self.min_class_count, int):
            raise ValueError(f"min_class_count must be an integer >= 1, got {self.min_class_count!r}.")
        if self.min_class_count < 1:
            raise ValueError(f"min_class_count must be >= 1 (1 keeps every class), got {self.min_class_count}.")
        frac = self.max_quarantine_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac <= 1.0:
            raise ValueError(
                f"max_quarantine_fraction must be a number in [0, 1] (0 = no bad rows allowed, 1 = no limit), "
                f"got {frac!r}."
            )
        if not isinstance(self.drop_leakage, bool):
            raise ValueError(f"drop_leakage must be True or False, got {self.drop_leakage!r}.")
        if self.label_case not in LABEL_CASE_MODES:
            raise ValueError(f"label_case must be one of {', '.join(LABEL_CASE_MODES)}, got {self.label_case!r}.")


class LabelCaseError(DataError):
    """Label values differ only by case or spacing (``fresh``/``FRESH``): they would train as separate classes."""


@dataclass
class ValidationResult:
    """Clean splits, quarantined rows (``split,row,text,label,reason``), train labels and a JSON-able report."""

    train: pd.DataFrame
    test: pd.DataFrame
    quarantine: pd.DataFrame
    labels: list[str]
    report: dict
    dropped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=QUARANTINE_COLUMNS))


def _blank(value) -> bool:
    """None/NaN or a whitespace-only string."""
    return not value.strip() if isinstance(value, str) else is_missing(value)


def _blanks(values: pd.Series) -> pd.Series:
    """:func:`_blank` per value, :data:`CHUNK_ROWS` values at a time as Python objects."""
    out = np.empty(len(values), dtype=bool)
    for start in range(0, len(values), CHUNK_ROWS):
        out[start:start + CHUNK_ROWS] = [_blank(v) for v in values.iloc[start:start + CHUNK_ROWS].tolist()]
    return pd.Series(out, index=values.index)


def _source_name(source: str | Sequence[str]) -> str:
    return source if isinstance(source, str) else " + ".join(map(str, source))


def validate_split(
    train: pd.DataFrame, test: pd.DataFrame, *, rules: ValidationRules, source: str | Sequence[str]
) -> ValidationResult:
    """Apply the rules in order; each row gets at most one reason (the first rule that hits it).

    Args:
        train, test: frames from ``prepare_frame``/``split_frame`` (columns ``text, label, row``, optional ``group``).
        source: the file(s) the rows came from, for messages.
    Raises:
        LabelCaseError: labels differ only by case or spacing and ``rules.label_case`` is ``"error"``.
        DataError: nothing usable is left (no rows, all quarantined, < 2 train classes, empty test) or the
            quarantined share exceeds ``rules.max_quarantine_fraction``.
    """
    name = _source_name(source)
    for part, frame in (("train", train), ("test", test)):
        missing = [c for c in _REQUIRED if c not in frame.columns]
        if missing:
            raise ValueError(f"{name}: {part} frame lacks columns {missing}; pass frames from prepare_frame.")
    rows = pd.concat([train.assign(split="train"), test.assign(split="test")], ignore_index=True)
    if "group" not in rows.columns:
        rows["group"] = None
    reason = pd.Series([None] * len(rows), index=rows.index, dtype=object)

    def mark(mask: pd.Series, why: str) -> None:
        reason[mask & reason.isna()] = why  # first rule wins

    def active() -> pd.Series:
        return reason.isna()

    is_train = rows["split"].eq("train")
    mark(_blanks(rows["text"]), "empty_text")
    mark(_blanks(rows["label"]), "missing_label")
    label_case = _label_case(rows, active(), rules.label_case, name)  # before any rule compares labels

    # texts and labels compared as integer codes (equal values, equal codes): no copy of the strings per rule
    text = pd.factorize(rows["text"])[0]
    label = pd.factorize(rows["label"])[0]
    train_side = is_train.to_numpy()

    # the same text with two labels is a labelling error: no side can be trusted, so all copies go
    live = active().to_numpy()
    pairs = pd.DataFrame({"text": text[live], "label": label[live]}).drop_duplicates()
    n_labels = pairs["text"].value_counts()
    mark(pd.Series(np.isin(text, n_labels.index[n_labels > 1]), index=rows.index), "conflicting_labels")

    live = active().to_numpy()
    keys = pd.DataFrame({"split": train_side[live], "text": text[live], "label": label[live]})
    repeated = np.zeros(len(rows), dtype=bool)
    repeated[live] = keys.duplicated(keep="first").to_numpy()
    mark(pd.Series(repeated, index=rows.index), "duplicate")
    leaked = is_train & np.isin(text, text[active().to_numpy() & ~train_side])
    n_leaked = int((leaked & active()).sum())
    if rules.drop_leakage:
        mark(leaked, "leakage")

    # rare classes first: their test rows then fall under unseen_label, as the head cannot predict them
    counts = rows.loc[active() & is_train, "label"].value_counts()
    mark(is_train & rows["label"].isin(counts.index[counts < rules.min_class_count]), "rare_class")
    train_labels = rows.loc[active() & is_train, "label"].unique()
    mark(~is_train & ~rows["label"].isin(train_labels), "unseen_label")

    rows["reason"] = reason
    keep_cols = [c for c in train.columns if c in rows.columns]
    kept = active().to_numpy()
    clean_train, clean_test = (_kept(rows.iloc[start:stop], kept[start:stop], keep_cols)
                               for start, stop in ((0, len(train)), (len(train), len(rows))))
    quarantine = _listing(rows, QUARANTINE_REASONS)
    dropped = _listing(rows, DROP_REASONS)
    labels = sorted(clean_train["label"].unique().tolist())

    total = len(rows)
    fraction = len(quarantine) / total if total else 0.0
    examples = {
        why: sorted(rows.loc[reason.eq(why), "row"].astype(int).tolist())[:5]
        for why in QUARANTINE_REASONS + DROP_REASONS
        if reason.eq(why).any()
    }
    report = {
        "source": name,
        "rows_in": {"train": len(train), "test": len(test), "total": total},
        "rows_out": {"train": len(clean_train), "test": len(clean_test), "total": len(clean_train) + len(clean_test)},
        "reasons": {why: int(reason.eq(why).sum()) for why in QUARANTINE_REASONS + DROP_REASONS},
        "quarantined": len(quarantine),
        "dropped": len(dropped),
        "quarantine_fraction": round(fraction, 6),
        "leakage_found": n_leaked,  # also counted when drop_leakage=False keeps those rows
        "example_rows": examples,
        "labels": labels,
        "label_case": label_case,
        "label_counts": {
            "train": {k: int(v) for k, v in clean_train["label"].value_counts().sort_index().items()},
            "test": {k: int(v) for k, v in clean_test["label"].value_counts().sort_index().items()},
        },
    }
    _check(report, rules, name)
    return ValidationResult(clean_train, clean_test, quarantine, labels, report, dropped)


def _kept(part: pd.DataFrame, keep: np.ndarray, columns: list[str]) -> pd.DataFrame:
    """``part``'s rows where ``keep``, with a fresh index; no copy of the values when every row is kept."""
    part = part[columns] if keep.all() else part.loc[keep, columns]
    return part.reset_index(drop=True)


def _case_key(label) -> str:
    """What two spellings of one label share: case-folded, whitespace trimmed and collapsed."""
    return " ".join(str(label).split()).casefold()


def _label_case(rows: pd.DataFrame, live: pd.Series, mode: str, name: str) -> dict:
    """Find label spellings that collide after case-folding and trimming; fold them in ``rows`` (mode "fold")
    or raise LabelCaseError naming each spelling with its count and example rows (mode "error")."""
    counts = rows.loc[live, "label"].value_counts()  # spelling -> rows, one entry per distinct value
    by_key: dict[str, list] = {}
    for spelling in counts.index:
        by_key.setdefault(_case_key(spelling), []).append(spelling)
    # each group's most frequent spelling first (ties: sorted order), so group[0] is what folding keeps
    groups = [sorted(g, key=lambda s: (-counts[s], str(s))) for g in by_key.values() if len(g) > 1]
    groups.sort(key=lambda g: str(g[0]))
    if not groups:
        return {"mode": mode, "folded_rows": 0, "groups": {}}
    if mode == "error":
        def where(spelling) -> str:
            hit = rows.loc[live & rows["label"].eq(spelling), ["split", "row"]]
            parts = [f"{split} rows {format_rows(sorted(hit.loc[hit['split'].eq(split), 'row'].astype(int)))}"
                     for split in ("train", "test") if hit["split"].eq(split).any()]
            return f"{spelling!r} ({counts[spelling]} row{'s' if counts[spelling] != 1 else ''}: {'; '.join(parts)})"

        listed = "; ".join(" vs ".join(where(s) for s in group) for group in groups)
        raise LabelCaseError(
            f"{name}: label values differ only by case or spacing and would train as separate classes: {listed}. "
            f"Fix the labels in the source, or set data.label_case: fold to merge each group into its most "
            f"frequent spelling."
        )
    mapping = {spelling: group[0] for group in groups for spelling in group[1:]}
    changed = live & rows["label"].isin(list(mapping))
    rows.loc[changed, "label"] = rows.loc[changed, "label"].map(mapping)
    return {"mode": mode, "folded_rows": int(changed.sum()),
            "groups": {str(g[0]): {str(s): int(counts[s]) for s in g[1:]} for g in groups}}


def _listing(rows: pd.DataFrame, reasons: Sequence[str]) -> pd.DataFrame:
    """Rows with one of ``reasons``, train before test, by source row."""
    out = rows.loc[rows["reason"].isin(reasons), QUARANTINE_COLUMNS].copy()
    for column in ("split", "text", "label", "reason"):  # None, not NaN, for missing values whatever dtype came in
        out[column] = out[column].astype(object).where(out[column].notna(), None)
    out["_order"] = out["split"].ne("train")
    return out.sort_values(["_order", "row"], kind="stable").drop(columns="_order").reset_index(drop=True)


def _check(report: dict, rules: ValidationRules, name: str) -> None:
    """Raise DataError when training cannot go on; the message carries the counts and example rows."""
    found = {why: n for why, n in report["reasons"].items() if n}
    summary = ", ".join(
        f"{why}={n} (rows {format_rows(report['example_rows'][why])}{', ...' if n > 5 else ''})"
        for why, n in found.items()
    ) or "no rows removed"
    fix = (
        "See the quarantine table for every row; fix the labels/texts in the source, relax ValidationRules, "
        "or point at the right file."
    )
    out, total = report["rows_out"], report["rows_in"]["total"]
    fraction = report["quarantined"] / total if total else 0.0  # unrounded, unlike the report's copy
    if total == 0:
        problem = "no rows to validate (train and test are empty)"
    elif report["quarantined"] == total:
        problem = f"every one of the {total} rows was quarantined"
    elif fraction > rules.max_quarantine_fraction:
        problem = (
            f"{report['quarantined']} of {total} rows ({fraction:.1%}) were quarantined, "
            f"above max_quarantine_fraction={rules.max_quarantine_fraction:g}"
        )
    elif out["train"] == 0:
        problem = "no train rows are left after cleaning"
    elif out["test"] == 0:
        problem = "no test rows are left after cleaning"
    elif len(report["labels"]) < 2:
        problem = f"train holds fewer than 2 classes after cleaning ({report['labels'] or 'none'})"
    else:
        return
    raise DataError(f"{name}: cannot train: {problem}. Removed: {summary}. {fix}")
