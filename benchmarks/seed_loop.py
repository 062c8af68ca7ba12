"""The seed's training loop (the article's recipe), with the encoder frozen: the baseline adaptflow is compared to.

Every epoch re-tokenizes each mini-batch with ``padding="max_length"`` and runs the frozen encoder forward again
(fp32, as the article does); a new ``nn.Linear`` head on the mean-pooled states learns with cross-entropy
(AdamW, lr 1e-3). Evaluation tokenizes and encodes the held-out rows the same way, once, after the last epoch.

``encoder_epochs`` < ``epochs`` makes the benchmark affordable: the first ``encoder_epochs`` epochs run exactly as
above and are timed; the remaining epochs replay the pooled vectors those epochs produced (identical rows, the
encoder is frozen and in eval mode, so the head sees the same inputs and reaches the same weights) and are
charged the mean measured epoch time instead of their own. The reported wall time is then
``load + sum(measured epochs) + (epochs - encoder_epochs) * mean(measured epoch) + evaluation``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class SeedResult:
    accuracy: float
    wall_s: float  # as if every epoch had run the encoder (see module docstring)
    measured_s: float  # wall time actually spent
    load_s: float
    epoch_s: list[float]  # measured epochs only
    eval_s: float
    epochs: int
    encoder_epochs: int
    train_rows: int
    test_rows: int
    batch_size: int
    padded_tokens: int  # tokens pushed through the encoder in the measured part (incl. padding)
    extrapolated: bool = field(init=False)

    def __post_init__(self) -> None:
        self.extrapolated = self.encoder_epochs < self.epochs


def _pooled(model, tokenizer, texts: list[str], max_length: int, torch) -> "torch.Tensor":
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    out = model(**enc).last_hidden_state  # frozen: no parameter requires grad, so no graph is kept
    mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
    return (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9), int(enc["input_ids"].numel())


def train_seed_head(X: np.ndarray, y: np.ndarray, n_classes: int, *, epochs: int = 5, batch_size: int = 32,
                    lr: float = 1e-3, seed: int = 13):
    """The seed's head alone, on pooled vectors already computed (what the loop below does after its encodes):
    a fresh ``nn.Linear`` on the raw pooled vectors, AdamW at ``lr``, ``epochs`` shuffled passes. Returns it."""
    import torch
    import torch.nn.functional as F

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = torch.nn.Linear(X.shape[1], n_classes)
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
        Xt, yt = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(np.asarray(y), dtype=torch.long)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(Xt), generator=gen)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(head(Xt[idx]), yt[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return head.eval()


def run_seed_loop(
    model_path: str,
    train_texts: list[str],
    train_labels: np.ndarray,
    test_texts: list[str],
    test_labels: np.ndarray,
    n_classes: int,
    *,
    epochs: int = 5,
    encoder_epochs: int | None = None,
    max_length: int = 128,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 13,
    log: Callable[[str], None] = print,
) -> SeedResult:
    """Train and evaluate the seed's way; see the module docstring for ``encoder_epochs``."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    encoder_epochs = epochs if encoder_epochs is None else max(1, min(encoder_epochs, epochs))
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    load_s = time.perf_counter() - t0

    torch.manual_seed(seed)
    head = torch.nn.Linear(model.config.hidden_size, n_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    y = torch.tensor(np.asarray(train_labels), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    replay = torch.zeros(len(train_texts), model.config.hidden_size)
    epoch_s, padded = [], 0
    for epoch in range(1, epochs + 1):
        te = time.perf_counter()
        live = epoch <= encoder_epochs
        order = torch.randperm(len(train_texts), generator=gen)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if live:
                pooled, n = _pooled(model, tokenizer, [train_texts[i] for i in idx], max_length, torch)
                replay[idx] = pooled
                padded += n
            else:
                pooled = replay[idx]
            loss = F.cross_entropy(head(pooled), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        dt = time.perf_counter() - te
        if live:
            epoch_s.append(dt)
        log(f"seed loop epoch {epoch}/{epochs}: loss {total / len(order):.4f}, "
            f"{dt:.1f}s{'' if live else ' (replayed; charged the measured epoch mean)'}")

    te = time.perf_counter()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test_texts), batch_size):
            pooled, n = _pooled(model, tokenizer, test_texts[start : start + batch_size], max_length, torch)
            padded += n
            pred = head(pooled).argmax(1).numpy()
            correct += int((pred == np.asarray(test_labels[start : start + batch_size])).sum())
    eval_s = time.perf_counter() - te
    measured = time.perf_counter() - t0
    wall = load_s + sum(epoch_s) + (epochs - encoder_epochs) * float(np.mean(epoch_s)) + eval_s
    return SeedResult(accuracy=correct / max(len(test_texts), 1), wall_s=wall, measured_s=measured, load_s=load_s,
                      epoch_s=epoch_s, eval_s=eval_s, epochs=epochs, encoder_epochs=encoder_epochs,
                      train_rows=len(train_texts), test_rows=len(test_texts), batch_size=batch_size,
                      padded_tokens=padded)
