"""Classifier heads on frozen embeddings: a (normalised) linear or small MLP layer, trained on numpy arrays.

The encoder is frozen and its vectors are cached, so training a head is a small problem that fits in memory:
no DataLoader, no workers. The default linear head is scikit-learn LogisticRegression's convex problem solved
full-batch by L-BFGS, then given a cross-validated logit temperature; the MLP (or ``solver: adamw``) indexes a
tensor per mini-batch, early-stops on a hold-out and refits on every row (see adaptflow.config.HeadSection).
Weights go to safetensors with a JSON
metadata header (never pickle), so a head file can be inspected and loaded without executing anything.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from adaptflow.config import HeadSection
from adaptflow.devices import resolve_device
from adaptflow.rowfile import RowFile

HEAD_FORMAT = "adaptflow-head/1"
DEFAULT_LR = {"linear": 1e-2, "mlp": 1e-3, "lora": 1e-3}
STREAM_BLOCK_ROWS = 32768  # rows per block when training from a RowFile (48 MB of 384-d vectors)
CV_MAX_ROWS = 20000  # the temperature is cross-validated on at most this many rows (a stratified sample)


class HeadConfig(HeadSection):
    """A head's full configuration: a config file's ``head:`` settings (adaptflow.config.HeadSection: every
    field, bound and message is stated there, once) plus the run's seed (folds, init, shuffling, dropout)."""

    seed: int = 13

    @property
    def resolved_solver(self) -> str:
        return self.solver or ("lbfgs" if self.kind == "linear" else "adamw")

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.kind]


class Head(nn.Module):
    """Optional L2-normalisation, then Linear (or Linear-GELU-Dropout-Linear)."""

    def __init__(self, in_dim: int, n_classes: int, *, kind="linear", hidden_dim=256, dropout=0.1, normalize=True):
        super().__init__()
        self.in_dim, self.n_classes, self.kind = in_dim, n_classes, kind
        self.hidden_dim, self.dropout, self.normalize = hidden_dim, dropout, normalize
        if kind == "linear":
            self.net = nn.Linear(in_dim, n_classes)
        else:
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, n_classes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = F.normalize(x, dim=-1)
        return self.net(x)

    def spec(self) -> dict:
        """Everything needed to rebuild this module (stored in the safetensors metadata)."""
        return {"kind": self.kind, "in_dim": self.in_dim, "n_classes": self.n_classes,
                "hidden_dim": self.hidden_dim, "dropout": self.dropout, "normalize": self.normalize}


@dataclass
class FitResult:
    head: Head
    history: list[dict]  # adamw: one dict per epoch (epoch, train_loss, val_loss, val_accuracy, lr, seconds,
    # rows_per_s); lbfgs: one per pass over the training rows (epoch, train_loss, objective, seconds, rows_per_s)
    best_epoch: int  # adamw: epochs the kept head trained for (chosen by early stopping); lbfgs: passes over X
    seconds: float
    C: float | None = None  # lbfgs: the inverse L2 strength used
    temperature: float | None = None  # lbfgs: the logits were divided by it (1: not calibrated)
    cv: dict[str, float] | None = None  # lbfgs with calibrate: out-of-fold log-loss at T = 1 and at T


def stratified_holdout(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices with ``fraction`` of each class in val; classes with < 2 rows stay in train."""
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = 0 if fraction == 0 or len(idx) < 2 else min(max(1, round(fraction * len(idx))), len(idx) - 1)
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def stratified_folds(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """A fold number in ``[0, k)`` per row, every class dealt round-robin over the folds (sizes differ by <= 1)."""
    folds, dealt = np.empty(len(y), dtype=np.int64), 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        folds[idx] = (dealt + np.arange(len(idx))) % k
        dealt += len(idx)
    return folds


@contextmanager
def _single_thread_on_cpu(device: str):
    """Train on one CPU thread: 64x384 mini-batches are too small to split, and when other processes share
    the cores, OpenMP barriers made 2 threads 2-10x slower than 1 (measured on 2 cores, linear and mlp)."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_head(
    X: np.ndarray | RowFile,
    y: np.ndarray,
    n_classes: int,
    config: HeadConfig | None = None,
    *,
    device: str | None = None,
    log: Callable[[str], None] | None = print,
    block_rows: int = STREAM_BLOCK_ROWS,
) -> FitResult:
    """Train a head on embeddings ``X`` [n, d] and integer labels ``y`` in ``[0, n_classes)``.

    Seeded and deterministic on CPU; the kept head has trained on every row (see :class:`~adaptflow.config.HeadSection`
    for the two solvers). ``log`` gets one line per step of note (None silences it).

    ``X`` may be a :class:`~adaptflow.rowfile.RowFile` (rows on local disk, in random order): L-BFGS then reads
    it block by block (``block_rows`` rows) once per pass, and AdamW visits its blocks in a random order and
    shuffles rows within a block; either way one block is in memory instead of all of X.
    """
    cfg = config or HeadConfig()
    if cfg.kind == "auto":
        raise ValueError("kind 'auto' is a choice between heads, not a head: adaptflow.head_selection.select_head "
                         "picks the kind, then fit_head trains it")
    streamed = isinstance(X, RowFile)
    if not streamed:
        # require(W): torch.from_numpy needs a writable array; copies only when the input is read-only or strided
        X = np.require(X, dtype=np.float32, requirements=["C", "W"])
    y = np.require(y, dtype=np.int64, requirements=["C", "W"])
    if len(X.shape) != 2 or len(X) != len(y) or len(X) == 0:
        raise ValueError(f"need X [n, d] and y [n] with n > 0; got X {X.shape}, y {y.shape}")
    if n_classes < 2 or y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must be integers in [0, {n_classes}) with n_classes >= 2; got {y.min()}..{y.max()}")
    if not streamed and not all(np.isfinite(X[i : i + 65536]).all() for i in range(0, len(X), 65536)):
        raise ValueError("X contains NaN/inf")  # checked in slices: no X-sized temporary
    device = device or resolve_device()
    log = log or (lambda _msg: None)
    fit = _fit_lbfgs if cfg.resolved_solver == "lbfgs" else _fit_adamw
    # fork_rng: seed init/shuffle/dropout without touching the caller's global RNG state
    cuda_devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    t_start = time.perf_counter()
    with torch.random.fork_rng(devices=cuda_devices), _single_thread_on_cpu(device):
        result = fit(X, y, n_classes, cfg, device, log, block_rows)
    result.head.eval()
    result.seconds = time.perf_counter() - t_start
    return result


def _unused(cfg: HeadConfig) -> str:
    """A note for the first log line when settings of the other solver were set (they are ignored)."""
    lbfgs = cfg.resolved_solver == "lbfgs"
    unused = sorted(cfg.model_fields_set & ({"epochs", "lr", "batch_size", "weight_decay", "val_fraction", "patience"}
                                            if lbfgs else {"C", "calibrate", "cv_folds", "max_iter"}))
    if not unused:
        return ""
    return (f" ({', '.join(unused)} not used by solver {cfg.resolved_solver}; solver: "
            f"{'adamw' if lbfgs else 'lbfgs'} uses {'it' if len(unused) == 1 else 'them'})")


def _class_weight(cfg: HeadConfig, y: np.ndarray, n_classes: int, device: str) -> torch.Tensor | None:
    """Inverse frequency ("balanced"): every class weighs as much as the others in total."""
    if not cfg.class_weights:
        return None
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32, device=device)


def _new_head(cfg: HeadConfig, in_dim: int, n_classes: int, device: str) -> Head:
    torch.manual_seed(cfg.seed)
    return Head(in_dim, n_classes, kind=cfg.kind, hidden_dim=cfg.hidden_dim, dropout=cfg.dropout,
                normalize=cfg.normalize).to(device)


# ------------------------------------------------------------------------------------------ L-BFGS (linear)


class PassHistory(list):
    """The training history of a full-batch fit: one entry per pass over the rows (call it after each)."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows, self.last = rows, time.perf_counter()

    def __call__(self, data: float, objective: float) -> None:
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        self.append({"epoch": len(self) + 1, "train_loss": data, "objective": objective, "seconds": dt,
                     "rows_per_s": self.rows / max(dt, 1e-9)})


def lbfgs_optimizer(head: nn.Module, max_iter: int) -> torch.optim.LBFGS:
    """Full-batch L-BFGS as every head here uses it (strong Wolfe line search; sklearn-like tolerances)."""
    return torch.optim.LBFGS(head.parameters(), lr=1, max_iter=max_iter, max_eval=max_iter * 5 // 4,
                             tolerance_grad=1e-6, tolerance_change=1e-10, history_size=10,
                             line_search_fn="strong_wolfe")


def _lbfgs(head: Head, chunks: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]], n_rows: int, C: float,
           weight: torch.Tensor | None, max_iter: int, on_pass: Callable[[float, float], None] | None = None) -> int:
    """Minimise (sum of cross-entropy + ||W||^2 / (2C)) / n_rows over ``chunks()`` (all rows, in pieces) from the
    head's current weights, full-batch. Returns the passes over the rows (function evaluations)."""
    n_classes = head.n_classes
    # sklearn's binary model is one weight vector w with ||w||^2/(2C); the equivalent softmax pair (w/2, -w/2)
    # costs half that under the same penalty, so two classes take it doubled to keep C's meaning
    penalty = (2.0 if n_classes == 2 else 1.0) / (2.0 * C)
    matrices = [p for p in head.parameters() if p.dim() >= 2]  # biases unpenalised, as sklearn's intercept
    optimizer = lbfgs_optimizer(head, max_iter)
    passes = 0

    def closure():
        nonlocal passes
        optimizer.zero_grad(set_to_none=False)
        data = 0.0
        for xb, yb in chunks():  # backward per chunk: only one chunk's graph is alive at a time
            loss = F.cross_entropy(head(xb), yb, weight=weight, reduction="sum") / n_rows
            loss.backward()
            data += loss.item()
        reg = penalty / n_rows * sum((p * p).sum() for p in matrices)
        reg.backward()
        passes += 1
        if on_pass is not None:
            on_pass(data, data + reg.item())
        return data + reg.item()

    head.train()
    optimizer.step(closure)
    return passes


def _tensor_chunks(X: torch.Tensor, y: torch.Tensor, rows: int = 65536):
    return lambda: ((X[s : s + rows], y[s : s + rows]) for s in range(0, len(X), rows))


def _temperature(X: torch.Tensor, y: torch.Tensor, n_classes: int, C: float, cfg: HeadConfig, weight,
                 device: str, log) -> tuple[float, float, float]:
    """The logit temperature T minimising the out-of-fold log-loss (stratified k-fold, each fold fit like the
    final head); returns (T, log-loss at T = 1, log-loss at T)."""
    folds = torch.from_numpy(stratified_folds(y.cpu().numpy(), cfg.cv_folds, np.random.default_rng(cfg.seed)))
    folds = folds.to(device)
    logits = torch.zeros(len(y), n_classes, device=device)
    for f in range(cfg.cv_folds):
        tr, va = folds != f, folds == f  # train on the other folds, score this one
        head = _zero_linear(cfg, X.shape[1], n_classes, device)
        # C scaled to the fold's size: the same penalty per row as the final head on all rows, so the fold models
        # are as confident as it will be and the temperature fitted on them transfers
        _lbfgs(head, _tensor_chunks(X[tr], y[tr]), int(tr.sum()), C * len(y) / int(tr.sum()), weight, cfg.max_iter)
        with torch.no_grad():
            logits[va] = head(X[va])
    log_t = torch.zeros((), device=device, requires_grad=True)  # T = exp(log_t) > 0
    optimizer = torch.optim.LBFGS([log_t], lr=1, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y, weight=weight)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        before = F.cross_entropy(logits, y, weight=weight).item()
        after = F.cross_entropy(logits / log_t.exp(), y, weight=weight).item()
    T = float(log_t.detach().exp()) if after < before else 1.0
    log(f"logit temperature {T:.3f} by {cfg.cv_folds}-fold cross-validation on {len(y)} rows "
        f"(held-out log-loss {before:.4f} at T = 1, {min(before, after):.4f} at T = {T:.3f})")
    return T, before, min(before, after)


def _zero_linear(cfg: HeadConfig, in_dim: int, n_classes: int, device: str) -> Head:
    head = _new_head(cfg, in_dim, n_classes, device)
    nn.init.zeros_(head.net.weight)  # the problem is convex: start where sklearn does
    nn.init.zeros_(head.net.bias)
    return head


def _fit_lbfgs(X, y, n_classes, cfg: HeadConfig, device, log, block_rows) -> FitResult:
    streamed = isinstance(X, RowFile)
    rng = np.random.default_rng(cfg.seed)
    # the temperature is cross-validated on at most CV_MAX_ROWS rows (a stratified sample; X itself when
    # that is all of it)
    sample = np.arange(len(y))
    if len(y) > CV_MAX_ROWS:
        _, sample = stratified_holdout(y, CV_MAX_ROWS / len(y), rng)
    if streamed:  # one pass over the file: check every row, copy out the sample
        Xs = _gather_checked(X, sample, block_rows).to(device)
    else:
        Xs = torch.from_numpy(X).to(device)
        Xs = Xs if len(sample) == len(y) else Xs[torch.from_numpy(sample).to(device)]
    ys = torch.from_numpy(y[sample]).to(device)
    weight = _class_weight(cfg, y, n_classes, device)
    log(f"training linear head by L-BFGS: {len(y)} rows, {X.shape[1]} dims, {n_classes} classes, on {device}"
        f"{f', streamed from {X.path} in blocks of {block_rows}' if streamed else ''}{_unused(cfg)}")
    C, T, cv = cfg.C, 1.0, None
    if cfg.calibrate and len(ys) >= 2 * cfg.cv_folds:
        T, before, after = _temperature(Xs, ys, n_classes, C, cfg, weight, device, log)
        cv = {"log_loss_t1": round(before, 5), "log_loss": round(after, 5)}
    elif cfg.calibrate:
        log(f"no temperature: too few rows ({len(ys)}) for {cfg.cv_folds}-fold cross-validation")

    head = _zero_linear(cfg, X.shape[1], n_classes, device)
    history = on_pass = PassHistory(len(y))

    if len(sample) < len(y):  # warm start from the sample's solution, then all rows
        _lbfgs(head, _tensor_chunks(Xs, ys), len(ys), C, weight, cfg.max_iter)
    del Xs
    if streamed:
        yt = torch.from_numpy(y).to(device)

        def chunks():
            for start, block in X.blocks(block_rows):
                yield torch.from_numpy(block).to(device), yt[start : start + len(block)]
    else:
        chunks = _tensor_chunks(torch.from_numpy(X).to(device), torch.from_numpy(y).to(device))
    passes = _lbfgs(head, chunks, len(y), C, weight, cfg.max_iter, on_pass)
    with torch.no_grad():  # logits / T is the same linear map with W / T and b / T: the file format is unchanged
        head.net.weight /= T
        head.net.bias /= T
    log(f"L-BFGS: {passes} passes over the {len(y)} rows, C = {C:g}, train loss {history[-1]['train_loss']:.4f}, "
        f"logits divided by T = {T:.3f}")
    return FitResult(head=head, history=history, best_epoch=passes, seconds=0.0, C=C, temperature=T, cv=cv)


# -------------------------------------------------------------------------------------- AdamW (mini-batch)


def _fit_adamw(X, y, n_classes, cfg: HeadConfig, device, log, block_rows) -> FitResult:
    """Early stopping on a stratified hold-out picks the epoch count; then the head is refit on every row."""
    streamed = isinstance(X, RowFile)
    rng = np.random.default_rng(cfg.seed)
    train_idx, val_idx = stratified_holdout(y, cfg.val_fraction, rng)
    yt = torch.from_numpy(y).to(device)
    if streamed:  # one pass over the file: check every row, copy out the (small) held-out slice
        Xt, Xva = None, _gather_checked(X, val_idx, block_rows).to(device)
    else:
        Xt = torch.from_numpy(X).to(device)  # everything fits in memory: index it per batch, no DataLoader
        # the training rows are gathered per batch (Xt[rows[batch]]), never copied out as a whole: X is the
        # largest array of a run, and one copy of it is enough; the held-out slice is small, so it is copied once
        Xva = Xt[torch.from_numpy(val_idx).to(device)]
    yva = yt[torch.from_numpy(val_idx).to(device)]
    lr0 = cfg.resolved_lr
    log(f"training {cfg.kind} head by AdamW: {len(train_idx)} rows ({len(val_idx)} held out to choose the epoch "
        f"count, then refit on all {len(y)}), {X.shape[1]} dims, {n_classes} classes, on {device}"
        f"{f', streamed from {X.path} in blocks of {block_rows}' if streamed else ''}{_unused(cfg)}")

    def run(rows: np.ndarray, max_epochs: int, validate: bool) -> tuple[Head, list[dict], int]:
        weight = _class_weight(cfg, y[rows], n_classes, device)
        tr = torch.from_numpy(rows).to(device)
        in_train = np.zeros(len(y), dtype=bool)
        in_train[rows] = True

        def epoch_batches(gen: torch.Generator):
            """This epoch's mini-batches ``(x, y)``: in memory, one permutation of the rows; streamed,
            blocks in a random order, rows shuffled within each block."""
            if not streamed:
                perm = torch.randperm(len(rows), generator=gen).to(device)
                for start in range(0, len(perm), cfg.batch_size):
                    batch = tr[perm[start : start + cfg.batch_size]]
                    yield Xt[batch], yt[batch]
                return
            n_blocks = math.ceil(len(y) / block_rows)
            for b in torch.randperm(n_blocks, generator=gen).tolist():
                start = b * block_rows
                keep = in_train[start : start + block_rows]
                xb = torch.from_numpy(X.read(start, start + block_rows)[keep]).to(device)
                yb = yt[start : start + block_rows][torch.from_numpy(keep).to(device)]
                perm = torch.randperm(len(xb), generator=gen).to(device)
                for s in range(0, len(perm), cfg.batch_size):
                    batch = perm[s : s + cfg.batch_size]
                    yield xb[batch], yb[batch]

        head = _new_head(cfg, X.shape[1], n_classes, device)
        # weight decay on matrices only (as nanoGPT): decaying biases just shifts the class priors
        decay = [p for p in head.parameters() if p.dim() >= 2]
        no_decay = [p for p in head.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr0)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        history: list[dict] = []
        best = (math.inf, 0, None)  # (val loss, epoch, state)
        for epoch in range(1, max_epochs + 1):
            t0 = time.perf_counter()
            # cosine decay to 10% over the epoch budget: big steps early, fine convergence near the end
            lr = lr0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cfg.epochs)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            head.train()
            total = torch.zeros((), device=device)  # summed on device: .item() per step would sync a GPU
            for xb, yb in epoch_batches(gen):
                loss = F.cross_entropy(head(xb), yb, weight=weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * len(yb)
            record = {"epoch": epoch, "train_loss": total.item() / len(rows), "lr": lr}
            if validate:
                head.eval()
                with torch.no_grad():
                    logits = head(Xva)
                    record["val_loss"] = F.cross_entropy(logits, yva, weight=weight).item()
                    record["val_accuracy"] = (logits.argmax(1) == yva).float().mean().item()
            dt = time.perf_counter() - t0
            record.update(seconds=dt, rows_per_s=len(rows) / max(dt, 1e-9))
            history.append(record)
            val = f", val loss {record['val_loss']:.4f}, val acc {record['val_accuracy']:.4f}" if validate else ""
            log(f"epoch {epoch}: train loss {record['train_loss']:.4f}{val}, lr {lr:.2e}, {dt * 1000:.0f}ms, "
                f"{record['rows_per_s']:.0f} rows/s{'' if validate or len(val_idx) == 0 else ' (refit)'}")
            if not validate:
                continue
            if record["val_loss"] < best[0] - 1e-5:
                best = (record["val_loss"], epoch, {k: v.detach().clone() for k, v in head.state_dict().items()})
            elif epoch - best[1] >= cfg.patience:
                log(f"early stop at epoch {epoch}: no better validation loss for {cfg.patience} epochs; "
                    f"best at epoch {best[1]}")
                break
        if best[2] is not None:
            head.load_state_dict(best[2])
            return head, history, best[1]
        return head, history, len(history)

    if not len(val_idx):
        head, history, best_epoch = run(train_idx, cfg.epochs, validate=False)
        return FitResult(head=head, history=history, best_epoch=best_epoch, seconds=0.0)
    _, history, best_epoch = run(train_idx, cfg.epochs, validate=True)
    # the held-out rows are worth training on: same schedule, same seed, every row, for the chosen epochs
    log(f"refit on all {len(y)} rows for {best_epoch} epochs")
    head, refit, _ = run(np.arange(len(y)), best_epoch, validate=False)
    for record in refit:
        record["refit"] = True
    return FitResult(head=head, history=history + refit, best_epoch=best_epoch, seconds=0.0)


def _gather_checked(X: RowFile, rows: np.ndarray, block_rows: int) -> torch.Tensor:
    """``X[rows]`` (sorted row indices) read block by block, every block checked for NaN/inf on the way."""
    out, taken = np.empty((len(rows), X.shape[1]), dtype=np.float32), 0
    for start, block in X.blocks(block_rows):
        if not np.isfinite(block).all():
            raise ValueError(f"X contains NaN/inf (rows {start}..{start + len(block) - 1} of {X.path})")
        sel = rows[(rows >= start) & (rows < start + len(block))]
        out[taken : taken + len(sel)] = block[sel - start]
        taken += len(sel)
    return torch.from_numpy(out)


@torch.no_grad()
def predict_proba(head: Head, X: np.ndarray | RowFile, *, batch_size: int = 65536) -> np.ndarray:
    """Class probabilities [n, n_classes] (float64) for embeddings ``X`` (an array or a RowFile)."""
    head.eval()
    device = next(head.parameters()).device
    if not isinstance(X, RowFile):
        X = np.asarray(X, dtype=np.float32)
    out = np.empty((len(X), head.n_classes), dtype=np.float64)
    for start in range(0, len(X), batch_size):
        block = X.read(start, start + batch_size) if isinstance(X, RowFile) else X[start : start + batch_size]
        xb = torch.from_numpy(block).to(device)
        out[start : start + batch_size] = torch.softmax(head(xb).float(), dim=-1).cpu().numpy()
    return out


def save_head(head: Head, path: str | Path, labels: list[str]) -> Path:
    """Write weights + a JSON header (spec, labels) as safetensors at ``path``."""
    labels = [str(label) for label in labels]
    if len(labels) != head.n_classes:
        raise ValueError(f"{len(labels)} labels for a head with {head.n_classes} outputs")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    metadata = {"format": HEAD_FORMAT, "head": json.dumps(head.spec()), "labels": json.dumps(labels)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_head(path: str | Path, *, device: str = "cpu") -> tuple[Head, list[str]]:
    """Rebuild a head saved by ``save_head``; returns ``(head, labels)``, the head in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no head file at {path}")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != HEAD_FORMAT:
            raise ValueError(f"{path} is not an adaptflow head (format {meta.get('format')!r}, want {HEAD_FORMAT!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    spec, labels = json.loads(meta["head"]), json.loads(meta["labels"])
    head = Head(spec["in_dim"], spec["n_classes"], kind=spec["kind"], hidden_dim=spec["hidden_dim"],
                dropout=spec["dropout"], normalize=spec["normalize"])
    head.load_state_dict(tensors, strict=True)
    if len(labels) != head.n_classes:
        raise ValueError(f"{path}: {len(labels)} labels for {head.n_classes} outputs")
    return head.to(device).eval(), labels

