"""Head hyper-parameters (``HeadConfig``), without torch: ``config.py`` validates a config's ``head:`` section at
load with it, and the no-op path of ``adaptflow retrain`` must not import torch (adaptflow.changes)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_LR = {"linear": 1e-2, "mlp": 1e-3}


@dataclass
class HeadConfig:
    """Head hyper-parameters, validated at construction.

    The defaults were tuned on all-MiniLM-L6-v2 embeddings of rotten_tomatoes (movie-disjoint splits) to match
    scikit-learn's LogisticRegression(C=1) on the same L2-normalised vectors.
    """

    kind: str = "linear"  # "linear" or "mlp" (Linear-GELU-Dropout-Linear)
    epochs: int = 100  # an upper bound (and the cosine schedule's length): early stopping ended at 13-21 there
    lr: float | None = None  # None: 1e-2 for linear, 1e-3 for mlp (each tuned; mlp at 1e-2 lost ~0.5pt)
    batch_size: int = 64  # small batches = more steps per epoch: 64 beat 128/256 by ~0.2pt at lr 1e-2
    weight_decay: float = 1e-4  # decoupled (AdamW), weights only
    hidden_dim: int = 256  # mlp only
    dropout: float = 0.1  # mlp only
    class_weights: bool = False  # inverse-frequency loss weights: minority recall up, accuracy down (~1pt there)
    val_fraction: float = 0.1  # stratified hold-out for early stopping; 0 trains all epochs on everything
    patience: int = 10  # epochs without a better validation loss before stopping
    seed: int = 13
    normalize: bool = True  # L2-normalise inputs (the reference recipe; scale-free across encoders)

    def __post_init__(self):
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(message)  # config.py prefixes the file and section

        need(self.kind in ("linear", "mlp"), f"kind must be 'linear' or 'mlp'; got {self.kind!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.kind]
        need(_is_int(self.epochs) and self.epochs >= 1, f"epochs must be an integer >= 1; got {self.epochs!r}")
        need(_is_num(self.lr) and 0 < self.lr <= 10, f"lr must be in (0, 10] (e.g. 1e-2); got {self.lr!r}")
        need(_is_int(self.batch_size) and self.batch_size >= 1, f"batch_size must be >= 1; got {self.batch_size!r}")
        need(_is_num(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be >= 0; got {self.weight_decay!r}")
        need(_is_int(self.hidden_dim) and self.hidden_dim >= 1, f"hidden_dim must be >= 1; got {self.hidden_dim!r}")
        need(_is_num(self.dropout) and 0 <= self.dropout < 1, f"dropout must be in [0, 1); got {self.dropout!r}")
        need(isinstance(self.class_weights, bool), f"class_weights must be true/false; got {self.class_weights!r}")
        need(_is_num(self.val_fraction) and 0 <= self.val_fraction < 0.5,
             f"val_fraction must be in [0, 0.5) (0 disables early stopping); got {self.val_fraction!r}")
        need(_is_int(self.patience) and self.patience >= 1, f"patience must be an integer >= 1; got {self.patience!r}")
        need(_is_int(self.seed), f"seed must be an integer; got {self.seed!r}")
        need(isinstance(self.normalize, bool), f"normalize must be true/false; got {self.normalize!r}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)
