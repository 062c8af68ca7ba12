"""Classifier heads on frozen embeddings: a (normalised) linear or small MLP layer, trained on numpy arrays.

The encoder is frozen and its vectors are cached, so training a head is a small convex-ish problem that fits
in memory: no DataLoader, no workers, just index a tensor per mini-batch. Weights go to safetensors with a JSON
metadata header (never pickle), so a head file can be inspected and loaded without executing anything.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from adaptflow.head_config import DEFAULT_LR, HeadConfig  # noqa: F401 — re-exported: callers import it from here
from adaptflow.rowfile import RowFile

HEAD_FORMAT = "adaptflow-head/1"
STREAM_BLOCK_ROWS = 32768  # rows per block when training from a RowFile (48 MB of 384-d vectors)


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
    history: list[dict]  # one dict per epoch: epoch, train_loss, val_loss, val_accuracy, lr, seconds, rows_per_s
    best_epoch: int  # 1-based epoch whose weights were kept
    seconds: float


def stratified_holdout(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices with ``fraction`` of each class in val; classes with < 2 rows stay in train."""
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = 0 if fraction == 0 or len(idx) < 2 else min(max(1, round(fraction * len(idx))), len(idx) - 1)
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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

    Seeded and deterministic on CPU. With ``val_fraction > 0``, a stratified slice of the rows is held out, and
    training stops once the validation loss has not improved for ``patience`` epochs; the best epoch's weights
    are restored. ``log`` gets one line per epoch (None silences it).

    ``X`` may be a :class:`~adaptflow.rowfile.RowFile` (rows on local disk, in random order): each epoch then
    visits its blocks of ``block_rows`` rows in a random order and shuffles rows within a block, holding one
    block in memory instead of all of X.
    """
    cfg = config or HeadConfig()
    streamed = isinstance(X, RowFile)
    if not streamed:
        # require(W): torch.from_numpy needs a writable array; copies only when the input is read-only or strided
        X = np.require(X, dtype=np.float32, requirements=["C", "W"])
    y = np.require(y, dtype=np.int64, requirements=["C", "W"])
    if len(X.shape) != 2 or len(X) != len(y) or len(X) == 0:
        raise ValueError(f"need X [n, d] and y [n] with n > 0; got X {X.shape}, y {y.shape}")
    if n_classes < 2 or y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must be integers in [0, {n_classes}) with n_classes >= 2; got {y.min()}..{y.max()}")
    device = device or default_device()
    log = log or (lambda _msg: None)
    t_start = time.perf_counter()

    rng = np.random.default_rng(cfg.seed)
    train_idx, val_idx = stratified_holdout(y, cfg.val_fraction, rng)
    yt = torch.from_numpy(y).to(device)
    tr, va = torch.from_numpy(train_idx).to(device), torch.from_numpy(val_idx).to(device)
    if streamed:  # one pass over the file: check every row, copy out the (small) held-out slice
        Xt, Xva = None, _gather_checked(X, val_idx, block_rows).to(device)
        in_train = np.zeros(len(y), dtype=bool)
        in_train[train_idx] = True
    else:
        if not all(np.isfinite(X[i : i + 65536]).all() for i in range(0, len(X), 65536)):  # no X-sized temporary
            raise ValueError("X contains NaN/inf")
        Xt = torch.from_numpy(X).to(device)  # everything fits in memory: index it per batch, no DataLoader
        # the training rows are gathered per batch (Xt[tr[batch]]), never copied out as a whole: X is the
        # largest array of a run, and one copy of it is enough; the held-out slice is small, so it is copied once
        Xva = Xt[va]
    ytr, yva = yt[tr], yt[va]
    log(f"training {cfg.kind} head: {len(train_idx)} rows ({len(val_idx)} held out), {X.shape[1]} dims, "
        f"{n_classes} classes, on {device}{f', streamed from {X.path} in blocks of {block_rows}' if streamed else ''}")

    weight = None
    if cfg.class_weights:  # inverse frequency ("balanced"): every class weighs as much as the others in total
        counts = np.bincount(y[train_idx], minlength=n_classes).astype(np.float64)
        w = np.where(counts > 0, len(train_idx) / (n_classes * np.maximum(counts, 1)), 0.0)
        weight = torch.tensor(w, dtype=torch.float32, device=device)

    def epoch_batches(gen: torch.Generator):
        """This epoch's mini-batches ``(x, y)``: in memory, one permutation of all training rows; streamed,
        blocks in a random order, rows shuffled within each block."""
        if not streamed:
            perm = torch.randperm(len(train_idx), generator=gen).to(device)
            for start in range(0, len(perm), cfg.batch_size):
                batch = perm[start : start + cfg.batch_size]
                yield Xt[tr[batch]], ytr[batch]
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

    # fork_rng: seed init/shuffle/dropout without touching the caller's global RNG state
    cuda_devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), _single_thread_on_cpu(device):
        torch.manual_seed(cfg.seed)
        head = Head(X.shape[1], n_classes, kind=cfg.kind, hidden_dim=cfg.hidden_dim, dropout=cfg.dropout,
                    normalize=cfg.normalize).to(device)
        # weight decay on matrices only (as nanoGPT): decaying biases just shifts the class priors
        decay = [p for p in head.parameters() if p.dim() >= 2]
        no_decay = [p for p in head.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
        )
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)

        history: list[dict] = []
        best = (math.inf, 0, None)  # (val loss, epoch, state)
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            # cosine decay to 10% over the epoch budget: big steps early, fine convergence near the end
            lr = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cfg.epochs)))
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
            train_loss = total.item() / len(train_idx)

            record = {"epoch": epoch, "train_loss": train_loss, "lr": lr}
            if len(val_idx):
                head.eval()
                with torch.no_grad():
                    logits = head(Xva)
                    record["val_loss"] = F.cross_entropy(logits, yva, weight=weight).item()
                    record["val_accuracy"] = (logits.argmax(1) == yva).float().mean().item()
            dt = time.perf_counter() - t0
            record.update(seconds=dt, rows_per_s=len(train_idx) / max(dt, 1e-9))
            history.append(record)
            val = f", val loss {record['val_loss']:.4f}, val acc {record['val_accuracy']:.4f}" if len(val_idx) else ""
            log(f"epoch {epoch}: train loss {train_loss:.4f}{val}, lr {lr:.2e}, {dt * 1000:.0f}ms, "
                f"{record['rows_per_s']:.0f} rows/s")

            if not len(val_idx):
                continue
            if record["val_loss"] < best[0] - 1e-5:
                best = (record["val_loss"], epoch, {k: v.detach().clone() for k, v in head.state_dict().items()})
            elif epoch - best[1] >= cfg.patience:
                log(f"early stop at epoch {epoch}: no better validation loss for {cfg.patience} epochs, "
                    f"restoring epoch {best[1]}")
                break

    best_epoch = len(history)
    if best[2] is not None:
        head.load_state_dict(best[2])
        best_epoch = best[1]
    head.eval()
    return FitResult(head=head, history=history, best_epoch=best_epoch, seconds=time.perf_counter() - t_start)


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


def config_dict(config: HeadConfig) -> dict:
    """The config as a plain dict (for logging as run parameters)."""
    return asdict(config)
