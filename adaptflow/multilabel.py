"""Multi-label classification: a text carries any number of labels (topics, tags, policy flags), or none.

**Labels in the data.** The label column may hold a JSON list (``["corn", "grain"]`` in a CSV cell or a JSONL
field), a Parquet list, or a string split by ``data.label_delimiter`` (``corn|grain``); a plain value is a
one-label set. Rows are normalised to one canonical string per row, the JSON list of the row's labels sorted and
de-duplicated (:func:`labels_to_json`), so snapshots, digests, duplicates and the split treat a label set like any
other label value. ``task: multilabel`` says so; when ``task`` is unset and the column holds lists (or the
delimiter), the task is inferred and the log says it was.

**Split.** The hash split (:mod:`adaptflow.split`) is kept as it is: a row's side depends on its text (or group)
only, so growing data never moves a row. Label sets are not stratified exactly (iterative stratification would
move rows as data grows); instead validation checks that every kept label has rows on both sides and reports
the labels that have none in test (their scores are then 0 by definition). A label with no train rows cannot be
learnt: it is removed from test rows (and a test row left with no label is quarantined as ``unseen_label``).

**Validation.** As for one label per row (:mod:`adaptflow.validate`), plus: a row with an empty label set is
kept as all-negative (``data.empty_labels: keep``) or quarantined (``quarantine``, reason ``no_labels``); a label
on fewer than ``data.min_class_count`` train rows is removed from every row and reported (``rare_labels``), and a
row whose every label was removed is quarantined as ``rare_class``.

**Head.** One sigmoid output per label with binary cross-entropy. ``solver: lbfgs`` (the linear default)
minimises ``sum BCE + ||W||^2 / (2C)`` full-batch, which is exactly scikit-learn's
``OneVsRestClassifier(LogisticRegression(C))`` (the labels' problems are independent; biases unpenalised).
Each label's decision threshold is tuned for F1 on out-of-fold probabilities of a k-fold cross-validation
on the training rows (``head.cv_folds``, each fold fit like the final head); ``solver: adamw`` (and ``kind:
mlp``) tunes them on its early-stopping hold-out instead. The thresholds are stored in the head's safetensors
metadata (JSON), beside its labels.

**Metrics and gate.** Micro- and macro-F1, per-label precision/recall/F1/support, subset accuracy (every label
of the row right; also reported as ``accuracy`` so the gate's floors apply) and Hamming loss. The gate compares
challenger and champion on the same rows with a paired bootstrap over rows (``macro_f1`` by default), McNemar on
subset accuracy, and ``max_class_drop`` applied to each label's recall.
"""

from __future__ import annotations

import json
import math
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from adaptflow.data import DataError, format_rows, is_missing
from adaptflow.validate import ValidationResult

TASKS = ("multiclass", "multilabel")
EMPTY_LABEL_POLICIES = ("keep", "quarantine")
QUARANTINE_REASONS = ("empty_text", "missing_label", "no_labels", "conflicting_labels", "rare_class", "unseen_label")
DROP_REASONS = ("duplicate", "leakage")
QUARANTINE_COLUMNS = ["split", "row", "text", "label", "reason"]
DEFAULT_THRESHOLD = 0.5
HEAD_TASK_KEY = "task"  # safetensors metadata: "multilabel" on a sigmoid head
HEAD_THRESHOLDS_KEY = "thresholds"  # safetensors metadata: JSON list, one per label


# ----------------------------------------------------------------------------------------------- label sets


def _clean(value) -> str | None:
    """One label as an NFC-stripped string (integral numbers without ``.0``); None when missing or blank."""
    if is_missing(value):
        return None
    if isinstance(value, (bool, np.bool_)):
        text = str(bool(value))
    elif isinstance(value, (int, np.integer)):
        text = str(int(value))
    elif isinstance(value, (float, np.floating)):
        text = str(int(value)) if float(value).is_integer() else repr(float(value))
    elif isinstance(value, str):
        text = value
    else:
        raise TypeError(type(value).__name__)
    return unicodedata.normalize("NFC", text).strip() or None


def labels_to_json(labels) -> str:
    """The canonical form of a label set: a JSON list, sorted, without duplicates or blanks."""
    cleaned = {c for c in (_clean(v) for v in labels) if c is not None}
    return json.dumps(sorted(cleaned), ensure_ascii=False)


def is_list(value) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def parse_labels(value, delimiter: str | None = None) -> list[str] | None:
    """A cell of the label column as a sorted label list; None when the cell is missing.

    A list (Parquet, JSONL) is taken as it is; a string starting with ``[`` must be a JSON list; else a string is
    split on ``delimiter`` when one is set, and otherwise is a one-label set.
    Raises:
        ValueError: a ``[`` string that is not a JSON list, or a list holding lists/objects.
    """
    if not is_list(value) and is_missing(value):
        return None
    if is_list(value):
        items = list(value)
    elif isinstance(value, str) and value.strip().startswith("["):
        try:
            items = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON list ({exc.msg})") from None
        if not isinstance(items, list):
            raise ValueError("not a JSON list")
    elif isinstance(value, str) and delimiter:
        items = value.split(delimiter)
    else:
        items = [value]
    try:
        return json.loads(labels_to_json(items))
    except TypeError as exc:
        raise ValueError(f"a label inside the list is a {exc}, not a string or number") from None


def inferred_task(labels: pd.Series, delimiter: str | None = None) -> str | None:
    """Why the label column looks multi-label (for the log), or None: it holds lists, JSON lists, or the delimiter."""
    values = [v for v in labels.tolist() if is_list(v) or not is_missing(v)]
    if any(is_list(v) for v in values):
        return "the label column holds lists"
    strings = [v for v in values if isinstance(v, str)]
    if strings and all(s.strip().startswith("[") and s.strip().endswith("]") for s in strings):
        return "every label value is a JSON list"
    if delimiter and any(delimiter in s for s in strings):
        return f"label values contain data.label_delimiter {delimiter!r}"
    return None


def canonical_labels(labels: pd.Series, rows: Sequence[int], *, delimiter: str | None, source: str) -> pd.Series:
    """Each cell as its canonical JSON list (:func:`labels_to_json`), None where missing; DataError on bad cells."""
    out, bad = [], []
    for row, value in zip(rows, labels.tolist()):
        try:
            parsed = parse_labels(value, delimiter)
        except ValueError as exc:
            bad.append((row, str(exc)))
            continue
        out.append(None if parsed is None else json.dumps(parsed, ensure_ascii=False))
    if bad:
        detail = "; ".join(f"row {r}: {why}" for r, why in bad[:5])
        raise DataError(f"{source}: label column cells that are not label lists at rows "
                        f"{format_rows([r for r, _ in bad])} ({detail}). Write each cell as a JSON list "
                        f'(["a", "b"]), or a string split by data.label_delimiter.')
    return pd.Series(out, index=labels.index, dtype=object)


def label_sets(values: Sequence[str | None]) -> list[list[str]]:
    """Canonical JSON cells back to lists ([] for None)."""
    return [json.loads(v) if isinstance(v, str) else [] for v in values]


def indicator(values: Sequence[str | None], labels: Sequence[str]) -> np.ndarray:
    """``[n, k]`` 0/1 matrix (float32) of canonical cells over ``labels``; labels outside ``labels`` are ignored."""
    index = {label: j for j, label in enumerate(labels)}
    Y = np.zeros((len(values), len(labels)), dtype=np.float32)
    for i, row in enumerate(label_sets(values)):
        for label in row:
            j = index.get(label)
            if j is not None:
                Y[i, j] = 1.0
    return Y


def split_shares(train: pd.DataFrame, test: pd.DataFrame) -> dict:
    """The test share overall and per label (a row counts for each of its labels), for logs and the manifest."""
    n = len(train) + len(test)
    count_train = pd.Series([l for s in label_sets(train["label"].tolist()) for l in s], dtype=object).value_counts()
    count_test = pd.Series([l for s in label_sets(test["label"].tolist()) for l in s], dtype=object).value_counts()
    labels = sorted(set(count_train.index) | set(count_test.index))
    return {"test": round(len(test) / n, 4) if n else 0.0,
            "test_by_label": {str(l): round(float(count_test.get(l, 0)) / float(count_train.get(l, 0) +
                                                                                 count_test.get(l, 0)), 4)
                              for l in labels}}


# ----------------------------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class MultilabelRules:
    """What :func:`validate_multilabel` enforces (from the ``data:`` section)."""

    min_class_count: int = 2  # train rows a label needs; rarer labels are removed and reported
    max_quarantine_fraction: float = 1.0
    drop_leakage: bool = True
    empty_labels: str = "keep"  # a row with no label: "keep" (all-negative) or "quarantine"
    label_case: str = "error"  # labels equal but for case/spacing: "error" fails, "fold" merges them

    def __post_init__(self):
        if self.empty_labels not in EMPTY_LABEL_POLICIES:
            raise ValueError(f"empty_labels must be one of {', '.join(EMPTY_LABEL_POLICIES)}, "
                             f"got {self.empty_labels!r}")
        if self.label_case not in ("error", "fold"):
            raise ValueError(f"label_case must be 'error' or 'fold', got {self.label_case!r}")
        if self.min_class_count < 1:
            raise ValueError(f"min_class_count must be >= 1, got {self.min_class_count}")


def _case_key(label: str) -> str:
    return " ".join(label.split()).casefold()


def _fold_case(sets: list[list[str] | None], mode: str, name: str) -> dict:
    """Labels equal but for case/spacing: raise (``error``) or rewrite ``sets`` in place to the most frequent
    spelling (``fold``); returns the report entry."""
    from adaptflow.validate import LabelCaseError  # the same error as for one label per row

    counts = pd.Series([l for s in sets if s for l in s], dtype=object).value_counts()
    groups: dict[str, list[str]] = {}
    for spelling in counts.index:
        groups.setdefault(_case_key(spelling), []).append(spelling)
    clashes = [sorted(g, key=lambda s: (-counts[s], s)) for g in groups.values() if len(g) > 1]
    if not clashes:
        return {"mode": mode, "folded_rows": 0, "groups": {}}
    if mode == "error":
        listed = "; ".join(" vs ".join(f"{s!r} ({counts[s]} rows)" for s in g) for g in clashes)
        raise LabelCaseError(f"{name}: labels differ only by case or spacing and would train as separate labels: "
                             f"{listed}. Fix them in the source, or set data.label_case: fold.")
    mapping = {s: g[0] for g in clashes for s in g[1:]}
    folded = 0
    for i, s in enumerate(sets):
        if s and any(l in mapping for l in s):
            sets[i] = sorted({mapping.get(l, l) for l in s})
            folded += 1
    return {"mode": mode, "folded_rows": folded, "groups": {g[0]: {s: int(counts[s]) for s in g[1:]} for g in clashes}}


def validate_multilabel(train: pd.DataFrame, test: pd.DataFrame, *, rules: MultilabelRules,
                        source: str) -> ValidationResult:
    """Clean a multi-label split (see the module docstring); each row gets at most one reason, the first rule's.

    Raises:
        DataError: nothing usable is left (no rows, < 2 labels, an empty side) or too large a share quarantined.
    """
    rows = pd.concat([train.assign(split="train"), test.assign(split="test")], ignore_index=True)
    if "group" not in rows.columns:
        rows["group"] = None
    reason = pd.Series([None] * len(rows), index=rows.index, dtype=object)
    is_train = rows["split"].eq("train")

    def mark(mask, why: str) -> None:
        mask = pd.Series(mask, index=rows.index)
        reason[mask & reason.isna()] = why

    def active() -> pd.Series:
        return reason.isna()

    sets: list[list[str] | None] = [None if not isinstance(v, str) else json.loads(v) for v in rows["label"]]
    mark(rows["text"].map(lambda t: not t.strip() if isinstance(t, str) else True), "empty_text")
    mark([s is None for s in sets], "missing_label")
    label_case = _fold_case(sets, rules.label_case, source)
    rows["label"] = [None if s is None else json.dumps(s, ensure_ascii=False) for s in sets]
    empty = pd.Series([s == [] for s in sets], index=rows.index)
    if rules.empty_labels == "quarantine":
        mark(empty, "no_labels")

    live = rows[active()]
    n_sets = live.groupby("text", sort=False)["label"].nunique()
    mark(rows["text"].isin(n_sets.index[n_sets > 1]), "conflicting_labels")
    live = rows[active()]
    mark(live.duplicated(subset=["split", "text", "label"], keep="first").reindex(rows.index, fill_value=False),
         "duplicate")
    leaked = is_train & rows["text"].isin(set(rows.loc[active() & ~is_train, "text"]))
    n_leaked = int((leaked & active()).sum())
    if rules.drop_leakage:
        mark(leaked, "leakage")

    # rare labels leave every row; a row left with none of its labels is quarantined (it was not a negative)
    counts = pd.Series([l for s, ok in zip(sets, active() & is_train) if ok for l in s], dtype=object).value_counts()
    rare = {str(l): int(c) for l, c in counts.items() if c < rules.min_class_count}
    known = set(counts.index) - set(rare)
    removed_unseen: dict[str, int] = {}
    for i in rows.index[active()]:
        before = sets[i]
        after = [l for l in before if l in known]
        if len(after) == len(before):
            continue
        for l in before:
            if l not in known and l not in rare:
                removed_unseen[l] = removed_unseen.get(l, 0) + 1
        if not after:
            mark(rows.index == i, "rare_class" if is_train[i] else "unseen_label")
        sets[i] = after
    rows["reason"] = reason
    keep = active()
    rows.loc[keep, "label"] = [json.dumps(sets[i], ensure_ascii=False) for i in rows.index[keep]]
    columns = [c for c in train.columns if c in rows.columns]
    clean_train = rows.loc[keep & is_train, columns].reset_index(drop=True)
    clean_test = rows.loc[keep & ~is_train, columns].reset_index(drop=True)
    labels = sorted(known)

    def listing(reasons) -> pd.DataFrame:
        out = rows.loc[rows["reason"].isin(reasons), QUARANTINE_COLUMNS].copy()
        out["_order"] = out["split"].ne("train")
        return out.sort_values(["_order", "row"], kind="stable").drop(columns="_order").reset_index(drop=True)

    quarantine, dropped = listing(QUARANTINE_REASONS), listing(DROP_REASONS)
    per_label = {part: {l: int(c) for l, c in zip(labels, indicator(frame["label"].tolist(), labels).sum(0))}
                 for part, frame in (("train", clean_train), ("test", clean_test))}
    total = len(rows)
    report = {
        "task": "multilabel",
        "source": source,
        "rows_in": {"train": len(train), "test": len(test), "total": total},
        "rows_out": {"train": len(clean_train), "test": len(clean_test), "total": len(clean_train) + len(clean_test)},
        "reasons": {why: int(reason.eq(why).sum()) for why in QUARANTINE_REASONS + DROP_REASONS},
        "quarantined": len(quarantine),
        "dropped": len(dropped),
        "quarantine_fraction": round(len(quarantine) / total, 6) if total else 0.0,
        "leakage_found": n_leaked,
        "example_rows": {why: sorted(rows.loc[reason.eq(why), "row"].astype(int).tolist())[:5]
                         for why in QUARANTINE_REASONS + DROP_REASONS if reason.eq(why).any()},
        "labels": labels,
        "label_case": label_case,
        "label_counts": per_label,
        "empty_labels": {"policy": rules.empty_labels, "rows": int((empty & keep).sum())},
        "rare_labels": rare,  # label -> train rows it had (below min_class_count): removed from every row
        "unseen_labels": removed_unseen,  # label -> test rows it was removed from (no train rows)
        "labels_without_test_rows": [l for l in labels if per_label["test"][l] == 0],
        "labels_per_row": {part: round(float(indicator(f["label"].tolist(), labels).sum(1).mean()), 4)
                           if len(f) else 0.0 for part, f in (("train", clean_train), ("test", clean_test))},
    }
    problem = None
    if total == 0:
        problem = "no rows to validate"
    elif report["quarantined"] / total > rules.max_quarantine_fraction:
        problem = (f"{report['quarantined']} of {total} rows were quarantined, above "
                   f"max_quarantine_fraction={rules.max_quarantine_fraction:g}")
    elif len(clean_train) == 0 or len(clean_test) == 0:
        problem = f"no {'train' if len(clean_train) == 0 else 'test'} rows are left after cleaning"
    elif len(labels) < 2:
        problem = f"fewer than 2 labels have {rules.min_class_count}+ train rows ({labels or 'none'})"
    if problem:
        found = ", ".join(f"{w}={n}" for w, n in report["reasons"].items() if n) or "no rows removed"
        raise DataError(f"{source}: cannot train: {problem}. Removed: {found}; rare labels: {rare or 'none'}. "
                        f"See the quarantine table; fix the source or relax data.min_class_count/"
                        f"max_quarantine_fraction.")
    return ValidationResult(clean_train, clean_test, quarantine, labels, report, dropped)  # label: JSON lists


# ----------------------------------------------------------------------------------------------- thresholds


def tune_thresholds(proba: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Per label, the threshold (predict ``p >= t``) with the highest F1 on these rows.

    Candidates are the midpoints between consecutive distinct probabilities (all rows at or above a cut are
    predicted positive); among equal F1 the highest threshold wins. A label without positive rows keeps 0.5.
    """
    proba, Y = np.asarray(proba, dtype=np.float64), np.asarray(Y) > 0
    thresholds = np.full(proba.shape[1], DEFAULT_THRESHOLD)
    for j in range(proba.shape[1]):
        positives = int(Y[:, j].sum())
        if positives == 0:
            continue
        order = np.argsort(-proba[:, j], kind="stable")
        p, y = proba[order, j], Y[order, j]
        tp = np.cumsum(y)
        f1 = 2 * tp / (positives + np.arange(1, len(p) + 1))
        last_of_tie = np.append(p[1:] < p[:-1], True)  # a cut can only fall between distinct probabilities
        f1 = np.where(last_of_tie, f1, -1.0)
        best = int(np.argmax(f1))
        below = p[best + 1] if best + 1 < len(p) else 0.0
        thresholds[j] = (p[best] + below) / 2
    return thresholds


# ----------------------------------------------------------------------------------------------- the head


@dataclass
class MultilabelFit:
    head: object  # adaptflow.heads.Head with one output per label
    thresholds: np.ndarray
    history: list[dict]
    best_epoch: int
    seconds: float
    cv: dict | None = None  # thresholds' source: {"method", "rows", "folds"?, "oof_macro_f1_at_0.5", "oof_macro_f1"}


def fit_multilabel_head(X, Y: np.ndarray, config=None, *, device: str = "cpu",
                        log: Callable[[str], None] | None = print) -> MultilabelFit:
    """Train a sigmoid head on embeddings ``X`` [n, d] and 0/1 targets ``Y`` [n, k]; tune per-label thresholds.

    See the module docstring for the two solvers. ``X`` may be a RowFile (it is read into memory).
    """
    import torch

    from adaptflow.heads import HeadConfig
    from adaptflow.rowfile import RowFile

    cfg = config or HeadConfig()
    if cfg.kind not in ("linear", "mlp"):
        raise ValueError(f"head.kind {cfg.kind!r} has no multi-label training; use kind linear or mlp with "
                         f"task: multilabel")
    if isinstance(X, RowFile):
        X = X.read(0, len(X))
    X = np.require(X, dtype=np.float32, requirements=["C", "W"])
    Y = np.require(Y, dtype=np.float32, requirements=["C", "W"])
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y) or len(X) == 0 or Y.shape[1] < 1:
        raise ValueError(f"need X [n, d] and Y [n, k] with n > 0; got X {X.shape}, Y {Y.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN/inf")
    log = log or (lambda _m: None)
    started = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as adaptflow.heads: small problems run faster on one thread when cores are shared
    try:
        with torch.random.fork_rng():
            if cfg.resolved_solver == "lbfgs":
                fit = _fit_lbfgs(X, Y, cfg, device, log)
            else:
                fit = _fit_adamw(X, Y, cfg, device, log)
    finally:
        torch.set_num_threads(before)
    fit.head.eval()
    fit.seconds = time.perf_counter() - started
    return fit


def _new_head(cfg, in_dim: int, k: int, device: str, zero: bool):
    import torch
    from torch import nn

    from adaptflow.heads import Head

    torch.manual_seed(cfg.seed)
    head = Head(in_dim, k, kind=cfg.kind, hidden_dim=cfg.hidden_dim, dropout=cfg.dropout,
                normalize=cfg.normalize).to(device)
    if zero and cfg.kind == "linear":
        nn.init.zeros_(head.net.weight)  # convex: start where sklearn does
        nn.init.zeros_(head.net.bias)
    return head


def _pos_weight(cfg, Y: np.ndarray, device: str):
    """``class_weights``: each label's positives weigh negatives/positives (balanced per label)."""
    import torch

    if not cfg.class_weights:
        return None
    pos = Y.sum(0)
    return torch.tensor(np.where(pos > 0, (len(Y) - pos) / np.maximum(pos, 1), 1.0), dtype=torch.float32,
                        device=device)


def _lbfgs(head, X, Y, C: float, pos_weight, max_iter: int, on_pass=None) -> int:
    """Minimise (sum of BCE + ||W||^2 / (2C)) / n full-batch; returns the passes over the rows."""
    import torch.nn.functional as F

    from adaptflow.heads import lbfgs_optimizer

    n = len(X)
    matrices = [p for p in head.parameters() if p.dim() >= 2]
    optimizer = lbfgs_optimizer(head, max_iter)
    passes = 0

    def closure():
        nonlocal passes
        optimizer.zero_grad()
        data = F.binary_cross_entropy_with_logits(head(X), Y, pos_weight=pos_weight, reduction="sum") / n
        loss = data + sum((p * p).sum() for p in matrices) / (2.0 * C * n)
        loss.backward()
        passes += 1
        if on_pass is not None:
            on_pass(data.item(), loss.item())
        return loss

    head.train()
    optimizer.step(closure)
    return passes


def _macro_f1_at(proba: np.ndarray, Y: np.ndarray, thresholds) -> float:
    return float(multilabel_scores(Y, proba >= thresholds)["macro_f1"])


def _fit_lbfgs(X, Y, cfg, device, log) -> MultilabelFit:
    import torch

    from adaptflow.heads import PassHistory

    n, k = Y.shape
    pos_weight = _pos_weight(cfg, Y, device)
    Xt, Yt = torch.from_numpy(X).to(device), torch.from_numpy(Y).to(device)
    log(f"training multi-label linear head by L-BFGS: {n} rows, {X.shape[1]} dims, {k} labels "
        f"({Y.sum(1).mean():.2f} per row), on {device}")
    folds_n = min(cfg.cv_folds, n)
    cv = None
    thresholds = np.full(k, DEFAULT_THRESHOLD)
    if folds_n >= 2 and n >= 2 * folds_n:
        folds = np.random.default_rng(cfg.seed).permutation(n) % folds_n
        oof = np.zeros((n, k))
        for f in range(folds_n):
            tr, va = folds != f, folds == f
            head = _new_head(cfg, X.shape[1], k, device, zero=True)
            # C scaled to the fold's size: the same penalty per row as the final head
            _lbfgs(head, Xt[torch.from_numpy(tr)], Yt[torch.from_numpy(tr)], cfg.C * n / int(tr.sum()),
                   pos_weight, cfg.max_iter)
            with torch.no_grad():
                oof[va] = torch.sigmoid(head(Xt[torch.from_numpy(va)])).cpu().numpy()
        thresholds = tune_thresholds(oof, Y)
        cv = {"method": f"{folds_n}-fold cross-validation", "rows": n,
              "oof_macro_f1_at_0.5": round(_macro_f1_at(oof, Y, DEFAULT_THRESHOLD), 5),
              "oof_macro_f1": round(_macro_f1_at(oof, Y, thresholds), 5)}
        log(f"per-label thresholds by {folds_n}-fold cross-validation: out-of-fold macro-F1 "
            f"{cv['oof_macro_f1_at_0.5']:.4f} at 0.5 -> {cv['oof_macro_f1']:.4f} tuned "
            f"(thresholds {thresholds.min():.2f}..{thresholds.max():.2f})")
    else:
        log(f"thresholds stay at {DEFAULT_THRESHOLD}: too few rows ({n}) for {cfg.cv_folds}-fold cross-validation")
    head = _new_head(cfg, X.shape[1], k, device, zero=True)
    history = on_pass = PassHistory(n)

    passes = _lbfgs(head, Xt, Yt, cfg.C, pos_weight, cfg.max_iter, on_pass)
    log(f"L-BFGS: {passes} passes over the {n} rows, C = {cfg.C:g}, train loss {history[-1]['train_loss']:.4f}, "
        f"{n * passes / max(sum(h['seconds'] for h in history), 1e-9):.0f} rows/s")
    return MultilabelFit(head, thresholds, history, passes, 0.0, cv)


def _fit_adamw(X, Y, cfg, device, log) -> MultilabelFit:
    """Mini-batch AdamW on BCE; early stopping and the thresholds both use a random hold-out of ``val_fraction``."""
    import torch
    import torch.nn.functional as F

    n, k = Y.shape
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(n)
    n_val = int(round(cfg.val_fraction * n)) if cfg.val_fraction > 0 and n >= 10 else 0
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    pos_weight = _pos_weight(cfg, Y[train], device)
    Xt, Yt = torch.from_numpy(X).to(device), torch.from_numpy(Y).to(device)
    tr = torch.from_numpy(train).to(device)
    head = _new_head(cfg, X.shape[1], k, device, zero=False)
    decay = [p for p in head.parameters() if p.dim() >= 2]
    no_decay = [p for p in head.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.resolved_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    log(f"training multi-label {cfg.kind} head by AdamW: {len(train)} rows ({n_val} held out for early stopping "
        f"and thresholds), {k} labels, on {device}")
    history, best = [], (math.inf, 0, None)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        lr = cfg.resolved_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cfg.epochs)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        head.train()
        total = 0.0
        order = tr[torch.randperm(len(tr), generator=gen).to(device)]
        for s in range(0, len(order), cfg.batch_size):
            batch = order[s : s + cfg.batch_size]
            loss = F.binary_cross_entropy_with_logits(head(Xt[batch]), Yt[batch], pos_weight=pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        record = {"epoch": epoch, "train_loss": total / len(train), "lr": lr}
        if n_val:
            head.eval()
            with torch.no_grad():
                record["val_loss"] = F.binary_cross_entropy_with_logits(head(Xt[val]), Yt[val]).item()
        dt = time.perf_counter() - t0
        record.update(seconds=dt, rows_per_s=len(train) / max(dt, 1e-9))
        history.append(record)
        if not n_val:
            continue
        if record["val_loss"] < best[0] - 1e-5:
            best = (record["val_loss"], epoch, {key: v.detach().clone() for key, v in head.state_dict().items()})
        elif epoch - best[1] >= cfg.patience:
            log(f"early stop at epoch {epoch}; best validation loss at epoch {best[1]}")
            break
    if best[2] is not None:
        head.load_state_dict(best[2])
    thresholds, cv = np.full(k, DEFAULT_THRESHOLD), None
    if n_val:
        head.eval()
        with torch.no_grad():
            held = torch.sigmoid(head(Xt[val])).cpu().numpy()
        thresholds = tune_thresholds(held, Y[val])
        cv = {"method": "hold-out", "rows": n_val,
              "oof_macro_f1_at_0.5": round(_macro_f1_at(held, Y[val], DEFAULT_THRESHOLD), 5),
              "oof_macro_f1": round(_macro_f1_at(held, Y[val], thresholds), 5)}
    log(f"AdamW: {len(history)} epochs, kept epoch {best[1] or len(history)}")
    return MultilabelFit(head, thresholds, history, best[1] or len(history), 0.0, cv)


def predict_sigmoid(head, X, *, batch_size: int = 65536) -> np.ndarray:
    """Per-label probabilities [n, k] (float64) of a multi-label head."""
    import torch

    from adaptflow.rowfile import RowFile

    head.eval()
    device = next(head.parameters()).device
    out = np.empty((len(X), head.n_classes), dtype=np.float64)
    with torch.no_grad():
        for start in range(0, len(X), batch_size):
            block = X.read(start, start + batch_size) if isinstance(X, RowFile) else X[start : start + batch_size]
            xb = torch.from_numpy(np.asarray(block, dtype=np.float32)).to(device)
            out[start : start + batch_size] = torch.sigmoid(head(xb).float()).cpu().numpy()
    return out


def save_multilabel_head(head, path: str | Path, labels: list[str], thresholds: Sequence[float]) -> Path:
    """:func:`adaptflow.heads.save_head` plus ``task: multilabel`` and the thresholds in the JSON metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from adaptflow.heads import save_head

    if len(thresholds) != len(labels):
        raise ValueError(f"{len(thresholds)} thresholds for {len(labels)} labels")
    path = save_head(head, path, labels)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    meta[HEAD_TASK_KEY] = "multilabel"
    meta[HEAD_THRESHOLDS_KEY] = json.dumps([round(float(t), 6) for t in thresholds])
    save_file(tensors, str(path), metadata=meta)
    return path


def load_thresholds(path: str | Path) -> list[float] | None:
    """The per-label thresholds of a multi-label head file; None for a softmax (one label per row) head."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get(HEAD_TASK_KEY) != "multilabel":
        return None
    return [float(t) for t in json.loads(meta[HEAD_THRESHOLDS_KEY])]


# ----------------------------------------------------------------------------------------------- metrics


def _counts(Y: np.ndarray, P: np.ndarray, weights: np.ndarray | None = None):
    """tp, fp, fn per label (``[k]``, or ``[b, k]`` with row weights ``[b, n]`` for bootstrap resamples)."""
    Y, P = np.asarray(Y) > 0, np.asarray(P) > 0
    cells = [(P & Y), (P & ~Y), (~P & Y)]
    if weights is None:
        return [c.sum(0).astype(np.float64) for c in cells]
    return [weights @ c.astype(np.float64) for c in cells]


def _f1(tp, fp, fn):
    both = 2 * tp + fp + fn
    return np.divide(2 * tp, both, out=np.zeros_like(both, dtype=np.float64), where=both > 0)


def multilabel_scores(Y: np.ndarray, P: np.ndarray) -> dict[str, float]:
    """macro_f1, micro_f1, subset accuracy (also as ``accuracy``) and Hamming loss of predictions ``P``."""
    Y, P = np.asarray(Y) > 0, np.asarray(P) > 0
    tp, fp, fn = _counts(Y, P)
    subset = float(np.all(P == Y, axis=1).mean()) if len(Y) else 0.0
    return {"macro_f1": float(_f1(tp, fp, fn).mean()), "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
            "accuracy": subset, "subset_accuracy": subset,
            "hamming_loss": float((P != Y).mean()) if Y.size else 0.0}


def compute_multilabel_metrics(Y: np.ndarray, proba: np.ndarray, labels: Sequence[str],
                               thresholds: Sequence[float]) -> dict:
    """Scores of ``proba >= thresholds`` against 0/1 targets ``Y`` [n, k]: JSON-able.

    Returns:
        ``{"task", "n", "macro_f1", "micro_f1", "micro_precision", "micro_recall", "accuracy" (= subset
        accuracy), "subset_accuracy", "hamming_loss", "per_class": {label: {precision, recall, f1, support,
        predicted, threshold}}}``. As sklearn with ``zero_division=0``: a label with no predictions and no
        support scores 0.
    """
    Y, proba = np.asarray(Y) > 0, np.asarray(proba, dtype=np.float64)
    if proba.shape != Y.shape or proba.shape[1] != len(labels):
        raise ValueError(f"proba {proba.shape} and Y {Y.shape} must both be [n, {len(labels)} labels]")
    P = proba >= np.asarray(thresholds, dtype=np.float64)
    tp, fp, fn = _counts(Y, P)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=tp + fn > 0)
    f1 = _f1(tp, fp, fn)
    micro_p = float(tp.sum() / (tp.sum() + fp.sum())) if tp.sum() + fp.sum() else 0.0
    micro_r = float(tp.sum() / (tp.sum() + fn.sum())) if tp.sum() + fn.sum() else 0.0
    return {
        "task": "multilabel", "n": int(len(Y)), **multilabel_scores(Y, P),
        "micro_precision": micro_p, "micro_recall": micro_r,
        "per_class": {str(label): {"precision": float(precision[j]), "recall": float(recall[j]), "f1": float(f1[j]),
                                   "support": int(tp[j] + fn[j]), "predicted": int(tp[j] + fp[j]),
                                   "threshold": float(thresholds[j])}
                      for j, label in enumerate(labels)},
    }


def flat_multilabel_metrics(m: dict) -> dict[str, float]:
    """``{name: float}`` for MLflow: the summary scores, then ``precision|recall|f1|support|threshold.<label>``."""
    from adaptflow.metrics import metric_name

    flat = {key: float(m[key]) for key in ("accuracy", "macro_f1", "micro_f1", "micro_precision", "micro_recall",
                                           "subset_accuracy", "hamming_loss")}
    used: set[str] = set()
    for label, scores in m["per_class"].items():
        name = metric_name(label)
        while name in used:
            name += "_"
        used.add(name)
        for key in ("precision", "recall", "f1", "support", "threshold"):
            flat[f"{key}.{name}"] = float(scores[key])
    return flat


def per_label_figure(m: dict, labels: Sequence[str]):
    """A matplotlib Figure: precision, recall and F1 per label (bars), support and threshold in the tick labels."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    k = len(labels)
    fig, ax = plt.subplots(figsize=(8, min(2 + 0.45 * k, 30)))
    y = np.arange(k)
    for offset, key, colour in ((-0.27, "precision", "#4c72b0"), (0.0, "recall", "#dd8452"), (0.27, "f1", "#55a868")):
        ax.barh(y + offset, [m["per_class"][str(l)][key] for l in labels], height=0.26, label=key, color=colour)
    ax.set_yticks(y, [f"{l}  (n={m['per_class'][str(l)]['support']}, t={m['per_class'][str(l)]['threshold']:.2f})"
                      for l in labels])
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="score", title=f"per label (macro-F1 {m['macro_f1']:.3f}, micro-F1 {m['micro_f1']:.3f})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def multilabel_report_markdown(m: dict, labels: Sequence[str], extra: dict | None = None) -> str:
    """A markdown report: summary table and per-label table (replaces the confusion table)."""
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["## Evaluation (multi-label)", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {cell(k)} | {cell(v)} |" for k, v in (extra or {}).items()]
    lines += [f"| rows | {m['n']} |", f"| macro F1 | {m['macro_f1']:.4f} |", f"| micro F1 | {m['micro_f1']:.4f} |",
              f"| micro precision | {m['micro_precision']:.4f} |", f"| micro recall | {m['micro_recall']:.4f} |",
              f"| subset accuracy | {m['subset_accuracy']:.4f} |", f"| Hamming loss | {m['hamming_loss']:.4f} |",
              "", "### Per label", "", "| label | precision | recall | F1 | support | predicted | threshold |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label in labels:
        s = m["per_class"][str(label)]
        lines.append(f"| {cell(label)} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['support']} | "
                     f"{s['predicted']} | {s['threshold']:.3f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- gate


def paired_bootstrap_rows(Y, A, B, metric: str, *, n: int, confidence: float, seed: int = 0,
                          block_values: int = 1 << 22) -> tuple[float, float]:
    """One-sided bounds of metric(A) − metric(B) over ``n`` resamples of the rows (drawn jointly for both).

    A resample is a count per row (a multinomial over the rows), so the per-label tp/fp/fn of a resample are
    ``counts @ indicators``; memory is ``O(block × rows)``.
    """
    Y, A, B = (np.asarray(v) > 0 for v in (Y, A, B))
    rows = len(Y)
    if rows == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    block = max(1, block_values // rows)
    subset_a, subset_b = np.all(A == Y, axis=1).astype(np.float64), np.all(B == Y, axis=1).astype(np.float64)
    diffs = []
    for start in range(0, n, block):
        w = rng.multinomial(rows, np.full(rows, 1.0 / rows), size=min(block, n - start)).astype(np.float64)
        if metric == "accuracy":
            diffs.append(w @ (subset_a - subset_b) / rows)
            continue
        scores = []
        for P in (A, B):
            tp, fp, fn = _counts(Y, P, w)
            scores.append(_f1(tp, fp, fn).mean(1) if metric == "macro_f1" else
                          _f1(tp.sum(1), fp.sum(1), fn.sum(1)))
        diffs.append(scores[0] - scores[1])
    diffs = np.concatenate(diffs)
    return float(np.quantile(diffs, 1 - confidence)), float(np.quantile(diffs, confidence))


def decide_multilabel(Y, challenger, champion, labels: list[str], rules, *, seed: int = 0):
    """Promote / reject / hold a multi-label challenger against the champion (0/1 predictions [n, k] each, in
    ``labels`` order; ``champion`` None for the first model), by the rules of :func:`adaptflow.gate.decide`:
    floors, per-label recall drops (``max_class_drop``), ``min_delta``, then the evidence of the selected tests
    (paired bootstrap of ``rules.metric`` over rows; McNemar on subset accuracy)."""
    from adaptflow.gate import judge, mcnemar_p, screen

    Y, A = np.asarray(Y) > 0, np.asarray(challenger) > 0
    scores_a = {k: v for k, v in multilabel_scores(Y, A).items() if k in ("accuracy", "macro_f1", "micro_f1",
                                                                         "hamming_loss")}
    early = screen(scores_a, rules, has_champion=champion is not None)
    if early is not None:
        return early
    B = np.asarray(champion) > 0
    scores_b = {k: v for k, v in multilabel_scores(Y, B).items() if k in scores_a}

    def recall(P):
        tp, _, fn = _counts(Y, P)
        return np.divide(tp, tp + fn, out=np.zeros_like(tp), where=tp + fn > 0)

    recall_deltas = {label: round(float(d), 6) for label, d in zip(labels, recall(A) - recall(B))}
    bounds = paired_bootstrap_rows(Y, A, B, rules.metric, n=rules.n_bootstrap, confidence=rules.confidence,
                                   seed=seed)
    right_a, right_b = np.all(A == Y, axis=1).astype(int), np.all(B == Y, axis=1).astype(int)
    ones = np.ones(len(Y), dtype=int)
    return judge(rules, scores_a, scores_b, recall_deltas, bounds, mcnemar_p(ones, right_a, right_b, "greater"),
                 mcnemar_p(ones, right_a, right_b, "less"), accuracy="subset accuracy")


def predicted_labels(proba: np.ndarray, labels: Sequence[str], thresholds: Sequence[float]) -> list[list[str]]:
    """Per row, the labels whose probability reaches their threshold (in ``labels`` order; possibly none)."""
    P = np.asarray(proba) >= np.asarray(thresholds, dtype=np.float64)
    names = np.asarray(labels, dtype=object)
    return [names[row].tolist() for row in P]

