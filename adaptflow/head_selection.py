"""``head.kind: auto``: step up from the linear head only when it falls short, and say why.

One stratified validation hold-out (``VAL_FRACTION`` of the training rows) serves every candidate:

1. linear: its learning curve, fit (uncalibrated: accuracy does not depend on the temperature) on
   ``CURVE_FRACTIONS`` of the remaining rows, train and validation accuracy at each point. When the two are within
   ``auto_max_gap`` at the full size (or within sampling noise: :func:`underfit_tolerance`), the head underfits:
   more capacity may help, so
2. mlp: fit like ``kind: mlp`` on the same rows, scored on the same hold-out. When it gains less than
   ``auto_min_gain`` over the linear head and some of ``budget_s`` is left,
3. lora: a pluggable trial (:data:`LoraTrial`, e.g. adapters on the encoder), given the same rows and the
   seconds that remain; skipped with a logged reason when none is passed.

The best validation accuracy wins (a tie goes to the simpler head). The caller then trains the chosen kind on
every row exactly as that kind alone would be (:func:`candidate_config`), so the registered model is an ordinary
linear / mlp / lora model; :meth:`Selection.report` holds the choice, the reasons, the curves and each trial's
seconds for the stage's report and the MLflow run (:func:`selection_metrics`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adaptflow.heads import HeadConfig, fit_head, predict_proba, stratified_holdout
from adaptflow.rowfile import RowFile

VAL_FRACTION = 0.2  # of the training rows, stratified: the hold-out every candidate is scored on
CURVE_FRACTIONS = (0.25, 0.5, 1.0)  # of the remaining rows: the linear head's learning curve
MAX_ROWS = 50_000  # trials run on a stratified sample of at most this many rows (the final fit uses all)
ORDER = ("linear", "mlp", "lora")  # simplest first: ties go to the earlier one


@dataclass
class Trial:
    """One candidate's result on the shared hold-out."""

    kind: str
    val_accuracy: float
    train_accuracy: float | None
    seconds: float
    train_rows: int
    curve: list[dict] = field(default_factory=list)  # {"fraction", "rows", "train_accuracy", "val_accuracy"}
    tolerance: float | None = None  # linear: the gap under which it underfits (underfit_tolerance)
    payload: Any = None  # what the trial made that the caller may reuse (e.g. a LoRA adapter); not reported

    def report(self) -> dict:
        out = {"kind": self.kind, "val_accuracy": self.val_accuracy, "train_accuracy": self.train_accuracy,
               "seconds": self.seconds, "train_rows": self.train_rows, "curve": self.curve}
        if self.train_accuracy is not None:
            out["gap"] = round(self.train_accuracy - self.val_accuracy, 5)
        if self.tolerance is not None:
            out["tolerance"] = self.tolerance
        return out


LoraTrial = Callable[[np.ndarray, np.ndarray, float], "Trial | None"]
"""``lora(train_rows, val_rows, seconds_left) -> Trial``: train on the training rows at ``train_rows`` (indices
into the rows given to :func:`select_head`, i.e. the order of its ``y``), score on ``val_rows``, within about
``seconds_left`` seconds; ``Trial(kind="lora", ...)`` with its validation accuracy and seconds, or None when the
time left affords no useful trial (LoRA is then skipped, and the report says why)."""


@dataclass
class Selection:
    """What :func:`select_head` decided, and on what evidence."""

    choice: str
    trials: dict[str, Trial]
    skipped: dict[str, str]  # kind -> why it was not tried
    reasons: list[str]  # one line per decision, in order
    seconds: float
    train_rows: int
    val_rows: int
    settings: dict

    def report(self) -> dict:
        """JSON-able: the choice, the reasons, each candidate's accuracies, curve and seconds."""
        candidates: dict[str, dict] = {kind: trial.report() for kind, trial in self.trials.items()}
        candidates.update({kind: {"skipped": why} for kind, why in self.skipped.items()})
        return {"choice": self.choice, "reasons": self.reasons, "seconds": round(self.seconds, 3),
                "train_rows": self.train_rows, "val_rows": self.val_rows, **self.settings,
                "candidates": candidates}


def candidate_config(config: HeadConfig, kind: str) -> HeadConfig:
    """``config`` as a head of ``kind`` would have it: the settings given, ``kind`` replaced (an mlp drops
    ``solver: lbfgs``, which is the linear head's)."""
    given = config.model_dump(exclude_unset=True)
    given.pop("seed", None)
    if kind == "mlp" and given.get("solver") == "lbfgs":
        del given["solver"]
    return HeadConfig(**{**given, "kind": kind}, seed=config.seed)


def _accuracy(head, X: np.ndarray, y: np.ndarray) -> float:
    return float((predict_proba(head, X).argmax(1) == y).mean())


def nested_fractions(y: np.ndarray, fractions: tuple[float, ...], rng: np.random.Generator) -> list[np.ndarray]:
    """For each fraction, sorted row indices holding about that share of every class; each set contains the
    smaller ones (one shuffle per class), so the curve's points differ only by the rows added."""
    order = {c: rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)}
    return [np.sort(np.concatenate([idx[: max(1, round(f * len(idx)))] for idx in order.values()]))
            for f in fractions]


def underfit_tolerance(max_gap: float, val_accuracy: float, val_rows: int) -> float:
    """The train-minus-validation accuracy gap under which a head underfits: ``max_gap``, or two standard errors
    of the validation accuracy when that is wider (on a small hold-out the gap is mostly sampling noise)."""
    return max(max_gap, 2 * math.sqrt(val_accuracy * (1 - val_accuracy) / max(val_rows, 1)))


def _gather(X: np.ndarray | RowFile, rows: np.ndarray) -> np.ndarray:
    """``X[rows]`` (sorted indices) in memory; a RowFile is read block by block."""
    if not isinstance(X, RowFile):
        return np.asarray(X[rows], dtype=np.float32)
    out, taken = np.empty((len(rows), X.shape[1]), dtype=np.float32), 0
    for start, block in X.blocks(32768):
        sel = rows[(rows >= start) & (rows < start + len(block))]
        out[taken : taken + len(sel)] = block[sel - start]
        taken += len(sel)
    return out


def select_head(
    X: np.ndarray | RowFile,
    y: np.ndarray,
    n_classes: int,
    config: HeadConfig,
    *,
    device: str = "cpu",
    log: Callable[[str], None] | None = print,
    lora: LoraTrial | None = None,
    lora_missing: str = "no LoRA trainer in this build",
    clock: Callable[[], float] = time.perf_counter,
) -> Selection:
    """Pick the head kind for ``X`` [n, d] (array or RowFile) and labels ``y`` (see the module docstring).

    Args:
        config: the ``kind: auto`` head config; ``budget_s``, ``auto_max_gap`` and ``auto_min_gain`` steer the
            step-up, the other settings go to each candidate (:func:`candidate_config`).
        lora: the LoRA trial, or None: then LoRA is skipped and ``lora_missing`` says why.
        clock: seconds, monotonic (the budget is measured with it).
    """
    log = log or (lambda _msg: None)
    t0 = clock()
    elapsed = lambda: clock() - t0  # noqa: E731
    rng = np.random.default_rng(config.seed)
    y = np.asarray(y, dtype=np.int64)
    rows = np.arange(len(y))
    if len(y) > MAX_ROWS:  # trials on a stratified sample; indices stay those of the caller's rows
        _, rows = stratified_holdout(y, MAX_ROWS / len(y), rng)
    train_rows, val_rows = (rows[i] for i in stratified_holdout(y[rows], VAL_FRACTION, rng))
    if len(val_rows) == 0:
        raise ValueError(f"kind 'auto' needs at least 2 rows of a class to hold out for validation; got {len(y)} rows")
    Xtr, ytr, Xva, yva = _gather(X, train_rows), y[train_rows], _gather(X, val_rows), y[val_rows]
    settings = {"budget_s": config.budget_s, "auto_max_gap": config.auto_max_gap,
                "auto_min_gain": config.auto_min_gain}
    log(f"auto head: {len(train_rows)} training rows, {len(val_rows)} held out for validation (stratified "
        f"{VAL_FRACTION:.0%}), budget {config.budget_s:g}s, underfit gap < {config.auto_max_gap:g}, "
        f"MLP gain for no LoRA >= {config.auto_min_gain:g}")
    trials: dict[str, Trial] = {}
    skipped: dict[str, str] = {}
    reasons: list[str] = []

    def decide(line: str) -> None:
        reasons.append(line)
        log(f"auto head: {line}")

    # 1. linear, with its learning curve
    linear_cfg = candidate_config(config, "linear").model_copy(update={"calibrate": False})
    started, curve = clock(), []
    for fraction, subset in zip(CURVE_FRACTIONS, nested_fractions(ytr, CURVE_FRACTIONS, rng)):
        t = time.perf_counter()
        fit = fit_head(Xtr[subset], ytr[subset], n_classes, linear_cfg, device=device, log=None)
        dt = time.perf_counter() - t
        point = {"fraction": fraction, "rows": int(len(subset)), "train_accuracy": round(_accuracy(fit.head, Xtr[subset], ytr[subset]), 5),
                 "val_accuracy": round(_accuracy(fit.head, Xva, yva), 5), "seconds": round(dt, 3)}
        curve.append(point)
        log(f"auto head: linear on {point['rows']} rows ({fraction:.0%}): train acc {point['train_accuracy']:.4f}, "
            f"val acc {point['val_accuracy']:.4f}, {dt:.2f}s ({len(subset) / max(dt, 1e-9):.0f} rows/s)")
    full = curve[-1]
    trials["linear"] = Trial("linear", full["val_accuracy"], full["train_accuracy"], round(clock() - started, 3),
                             len(train_rows), curve)
    gap = full["train_accuracy"] - full["val_accuracy"]
    tolerance = underfit_tolerance(config.auto_max_gap, full["val_accuracy"], len(val_rows))
    trials["linear"].tolerance = round(tolerance, 5)

    # 2. mlp, when the linear head underfits
    if gap >= tolerance:
        skipped["mlp"] = skipped["lora"] = "the linear head does not underfit"
        decide(f"linear train acc {full['train_accuracy']:.4f} vs val acc {full['val_accuracy']:.4f}: gap "
               f"{gap:.4f} >= {tolerance:.4f}, it does not underfit; a larger head would fit the noise, "
               f"not the signal: no step-up")
    elif elapsed() >= config.budget_s:
        skipped["mlp"] = skipped["lora"] = f"budget_s {config.budget_s:g} spent"
        decide(f"linear underfits (gap {gap:.4f} < {tolerance:.4f}) but the budget of "
               f"{config.budget_s:g}s is spent ({elapsed():.1f}s): no MLP")
    else:
        decide(f"linear underfits: train acc {full['train_accuracy']:.4f} vs val acc {full['val_accuracy']:.4f}, "
               f"gap {gap:.4f} < {tolerance:.4f}: trying the MLP")
        started = clock()
        fit = fit_head(Xtr, ytr, n_classes, candidate_config(config, "mlp"), device=device, log=None)
        trials["mlp"] = Trial("mlp", round(_accuracy(fit.head, Xva, yva), 5), round(_accuracy(fit.head, Xtr, ytr), 5),
                              round(clock() - started, 3), len(train_rows))
        mlp = trials["mlp"]
        gain = mlp.val_accuracy - full["val_accuracy"]
        log(f"auto head: mlp on {len(train_rows)} rows: train acc {mlp.train_accuracy:.4f}, val acc "
            f"{mlp.val_accuracy:.4f} ({gain:+.4f} over linear), {mlp.seconds:.2f}s ({fit.best_epoch} epochs)")
        # 3. lora, when the mlp gains too little
        if gain >= config.auto_min_gain:
            skipped["lora"] = f"the MLP gained {gain:+.4f} >= {config.auto_min_gain:g}"
            decide(f"mlp gains {gain:+.4f} >= {config.auto_min_gain:g} on validation: no LoRA")
        elif lora is None:
            skipped["lora"] = lora_missing
            decide(f"mlp gains {gain:+.4f} < {config.auto_min_gain:g}, but LoRA is not tried: {lora_missing}")
        elif elapsed() >= config.budget_s:
            skipped["lora"] = f"budget_s {config.budget_s:g} spent"
            decide(f"mlp gains {gain:+.4f} < {config.auto_min_gain:g}, but the budget of {config.budget_s:g}s "
                   f"is spent ({elapsed():.1f}s): no LoRA")
        else:
            left = config.budget_s - elapsed()
            decide(f"mlp gains {gain:+.4f} < {config.auto_min_gain:g}: trying LoRA with {left:.0f}s left")
            started = clock()
            trial = lora(train_rows, val_rows, left)
            if trial is None:  # the time left affords too few rows to learn anything
                skipped["lora"] = f"the {left:.0f}s left afford too few LoRA training rows"
                decide(f"LoRA skipped: {skipped['lora']}")
            elif trial.kind != "lora":
                raise ValueError(f"the LoRA trial returned a {trial.kind!r} trial")
            else:
                trial.seconds = round(clock() - started, 3)
                trials["lora"] = trial
                log(f"auto head: lora: val acc {trial.val_accuracy:.4f} "
                    f"({trial.val_accuracy - full['val_accuracy']:+.4f} over linear), {trial.seconds:.2f}s")

    choice = max(trials, key=lambda kind: (trials[kind].val_accuracy, -ORDER.index(kind)))
    decide(f"chose {choice}: val acc " + ", ".join(f"{k} {t.val_accuracy:.4f}" for k, t in trials.items())
           + f" ({elapsed():.1f}s of trials)")
    return Selection(choice=choice, trials=trials, skipped=skipped, reasons=reasons, seconds=elapsed(),
                     train_rows=len(train_rows), val_rows=len(val_rows), settings=settings)


def selection_metrics(report: dict) -> dict[str, float]:
    """A :meth:`Selection.report` as flat MLflow metrics: ``auto.<kind>.val_acc`` / ``train_acc`` / ``seconds``,
    the linear curve as ``auto.linear.curve.<percent>.val_acc`` / ``train_acc``, ``auto.seconds``."""
    out = {"auto.seconds": float(report["seconds"])}
    if "final_seconds" in report:
        out["auto.final_seconds"] = float(report["final_seconds"])
    for kind, trial in report["candidates"].items():
        if "skipped" in trial:
            continue
        out[f"auto.{kind}.val_acc"] = float(trial["val_accuracy"])
        if trial.get("train_accuracy") is not None:
            out[f"auto.{kind}.train_acc"] = float(trial["train_accuracy"])
        out[f"auto.{kind}.seconds"] = float(trial["seconds"])
        for point in trial.get("curve", []):
            pct = round(point["fraction"] * 100)
            out[f"auto.{kind}.curve.{pct}.val_acc"] = float(point["val_accuracy"])
            out[f"auto.{kind}.curve.{pct}.train_acc"] = float(point["train_accuracy"])
    return out
