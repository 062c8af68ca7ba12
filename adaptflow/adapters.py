"""LoRA adapters: low-rank updates of the encoder's projections, trained with a linear head on its pooled output.

``head.kind: lora`` (adaptflow.config.HeadSection). The encoder snapshot stays the shared, digest-checked one;
what training adds is an *adapter*: peft's LoRA matrices for the ``lora_targets`` linear layers (a few MB for
MiniLM), saved as one safetensors file whose JSON header holds the LoRA settings. Applying it means loading the
snapshot, injecting the adapter (peft) and merging it into the weights: the merged model is an ordinary encoder,
so every encode path (embed, evaluate, gate, batch scoring, the pyfunc) runs it unchanged. Its vectors are
cached under a key that includes the adapter's digest (adaptflow.cache), never beside the frozen encoder's.

Training (:func:`train_lora`) is AdamW over the adapter and the head with a linear warm-up/decay schedule,
mini-batches of similar lengths (less padding), dropout and order seeded per epoch. After every epoch the
adapter, the head, the optimizer's state (tensors as safetensors, scalars as JSON: no pickle) and the history
go to a :class:`Checkpoints`; a run that finds one resumes after its epoch and ends where an unbroken run would.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from safetensors.torch import save_file

from adaptflow.embed import TokenIds, pool
from adaptflow.heads import Head, HeadConfig, stratified_holdout

ADAPTER_FORMAT = "adaptflow-lora/1"
DEFAULT_EPOCHS = 3  # lora when head.epochs is unset (the adamw heads' default of 100 is for a head alone)
DEFAULT_BATCH_SIZE = 16  # lora when head.batch_size is unset: more, smaller steps in few epochs
WARMUP_FRACTION = 0.06  # of all steps: linear warm-up, then linear decay to 0
CHUNK_BATCHES = 50  # rows are shuffled, then sorted by length within chunks of this many batches (less padding)


# ------------------------------------------------------------------------------------------ the adapter file


def lora_config(cfg: HeadConfig) -> LoraConfig:
    """peft's LoraConfig for a head config (biases untouched: the adapter is the low-rank matrices only)."""
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none")


def _settings_json(config: LoraConfig) -> str:
    return json.dumps({"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
                       "target_modules": sorted(config.target_modules), "bias": config.bias}, sort_keys=True)


def save_adapter(state: dict[str, torch.Tensor], config: LoraConfig, path: str | Path) -> Path:
    """Write an adapter (peft state dict) with its LoRA settings in the safetensors header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"format": ADAPTER_FORMAT, "lora": _settings_json(config)})
    return path


def load_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """(state dict, LoraConfig) of an adapter file written by :func:`save_adapter`."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"{path} is not an adaptflow adapter (format {meta.get('format')!r}, want {ADAPTER_FORMAT!r})")
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, LoraConfig(**json.loads(meta["lora"]))


def adapter_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of an adapter file: what keys the adapted encoder's vectors in the cache."""
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def merge_adapter(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """A copy of ``model`` with the adapter at ``path`` merged into its weights (``model`` itself is untouched:
    encoders are loaded once per process and shared)."""
    state, config = load_adapter(path)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    missing = set_peft_model_state_dict(peft_model, state)
    if getattr(missing, "unexpected_keys", None):
        raise ValueError(f"adapter {path} does not fit this encoder: unexpected keys {missing.unexpected_keys[:3]}")
    return peft_model.merge_and_unload().eval()


# ------------------------------------------------------------------------------------------ checkpoints


class Checkpoints(Protocol):
    """Where a training leaves its state after each epoch and finds it again after a crash."""

    def latest(self) -> tuple[dict[str, bytes], dict] | None: ...

    def save(self, epoch: int, objects: dict[str, bytes], meta: dict) -> None: ...


class StoreCheckpoints:
    """Checkpoints in the artifact store: ``<prefix>/epoch-<n>/`` published manifest-last, so a crash mid-write
    leaves no checkpoint, never a torn one."""

    def __init__(self, store, prefix: str):
        self.store, self.prefix = store, prefix.rstrip("/")

    def _epochs(self) -> list[int]:
        found = set()
        for key in self.store.list_keys(f"{self.prefix}/epoch-"):
            part = key[len(self.prefix) + 1:].split("/", 1)[0]
            if key.endswith("/_manifest.json") and part[len("epoch-"):].isdigit():
                found.add(int(part[len("epoch-"):]))
        return sorted(found)

    def latest(self) -> tuple[dict[str, bytes], dict] | None:
        epochs = self._epochs()
        if not epochs:
            return None
        prefix = f"{self.prefix}/epoch-{epochs[-1]:04d}"
        manifest = self.store.read_manifest(prefix)
        objects = {name: self.store.get_verified_bytes(f"{prefix}/{name}", prefix=prefix) for name in manifest["objects"]}
        return objects, manifest["meta"]

    def save(self, epoch: int, objects: dict[str, bytes], meta: dict) -> None:
        from adaptflow.store import ConflictError

        try:
            self.store.publish(f"{self.prefix}/epoch-{epoch:04d}", objects, meta)
        except ConflictError:  # an earlier attempt got this far: same key, same state
            pass

    def uri(self) -> str:
        return self.store.uri(self.prefix)


def _optimizer_objects(optimizer: torch.optim.Optimizer) -> tuple[bytes, dict]:
    """AdamW's state as safetensors bytes (tensors) + a JSON-able dict (param groups, scalar state)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return save_tensors(tensors), {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, data: bytes, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in [*load_tensors(data).items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ------------------------------------------------------------------------------------------ training


@dataclass
class LoraFit:
    """A trained adapter and head."""

    adapter: dict[str, torch.Tensor]  # peft state dict (CPU tensors)
    config: LoraConfig
    head: Head
    history: list[dict]  # one per epoch: epoch, train_loss, val_accuracy, lr, seconds, rows_per_s, tokens_per_s
    val_accuracy: float | None  # of the last epoch on the held-out rows (None: val_fraction 0)
    seconds: float  # wall time of this call (a resumed run: the epochs it trained, plus loading)
    resumed_from: int  # the epoch the run started after (0: from scratch)
    train_rows: int
    val_rows: int


class _Model(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module, head: Head, pooling: str):
        super().__init__()
        self.encoder, self.head, self.pooling = encoder, head, pooling

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.head(pool(hidden, mask, self.pooling))


def _batches(lengths: np.ndarray, rows: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``rows`` in mini-batches: shuffled, sorted by length within chunks (similar lengths share a batch, so
    little padding), batch order shuffled again."""
    rows = rng.permutation(rows)
    chunk = batch_size * CHUNK_BATCHES
    batches = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _tensors(ids: TokenIds, rows: np.ndarray, pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = ids.lengths[rows]
    width = max(int(lengths.max()), 1)
    batch = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        row = ids[int(r)]
        batch[i, : len(row)], mask[i, : len(row)] = row, 1
    return torch.from_numpy(batch).to(device), torch.from_numpy(mask).to(device)


def _lr_factor(step: int, total: int) -> float:
    warmup = max(1, math.ceil(WARMUP_FRACTION * total))
    return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


@torch.no_grad()
def _accuracy(model: _Model, ids: TokenIds, y: np.ndarray, rows: np.ndarray, batch_size: int, pad_id: int,
              device: str, autocast) -> float:
    model.eval()
    correct = 0
    order = rows[np.argsort(-ids.lengths[rows], kind="stable")]
    for start in range(0, len(order), batch_size * 2):
        part = order[start : start + batch_size * 2]
        with autocast():
            logits = model(*_tensors(ids, part, pad_id, device))
        correct += int((logits.float().argmax(1).cpu().numpy() == y[part]).sum())
    return correct / max(1, len(rows))


def resolved_epochs(cfg: HeadConfig) -> int:
    """``head.epochs`` when set, else :data:`DEFAULT_EPOCHS`."""
    return cfg.epochs if "epochs" in cfg.model_fields_set else DEFAULT_EPOCHS


def train_lora(
    encoder: torch.nn.Module,
    ids: TokenIds,
    y: np.ndarray,
    n_classes: int,
    cfg: HeadConfig,
    *,
    pooling: str = "mean",
    device: str = "cpu",
    bf16: bool = False,
    pad_id: int = 0,
    init_head: Head | None = None,
    checkpoints: Checkpoints | None = None,
    log: Callable[[str], None] | None = print,
) -> LoraFit:
    """Train a LoRA adapter on ``encoder`` and a linear head on its pooled output, for ``n_classes`` labels ``y``.

    The public entry point (``head.kind: lora`` and ``head.kind: auto`` call it): ``encoder`` is a Hugging Face
    encoder (copied, never modified), ``ids`` the rows' token ids (unpadded). ``cfg.val_fraction`` of the rows
    (stratified) are held out and scored after every epoch; the rest train. ``init_head`` (a linear Head with
    ``in_dim`` the encoder's width) is the head's starting point, e.g. the L-BFGS head on the frozen vectors;
    None starts from a seeded random one. With ``checkpoints``, each epoch's state is saved there and a
    run that finds a checkpoint resumes after it. ``log`` gets a line per epoch (after its checkpoint).
    """
    log = log or (lambda _msg: None)
    started = time.perf_counter()
    y = np.asarray(y, dtype=np.int64)
    if len(ids) != len(y) or len(y) == 0:
        raise ValueError(f"need one label per row; got {len(ids)} rows and {len(y)} labels")
    epochs, lr = resolved_epochs(cfg), cfg.resolved_lr
    batch_size = cfg.batch_size if "batch_size" in cfg.model_fields_set else DEFAULT_BATCH_SIZE
    train_rows, val_rows = stratified_holdout(y, cfg.val_fraction, np.random.default_rng(cfg.seed))
    config = lora_config(cfg)
    cuda = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.seed)  # adapter init (peft: A random, B zero) and a random head
        model_encoder = get_peft_model(copy.deepcopy(encoder).float(), config)
        head = copy.deepcopy(init_head) if init_head is not None else Head(
            int(encoder.config.hidden_size), n_classes, kind="linear", normalize=cfg.normalize)
        if head.kind != "linear" or head.n_classes != n_classes:
            raise ValueError(f"init_head must be a linear head with {n_classes} outputs; got {head.spec()}")
        model = _Model(model_encoder, head, pooling).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr)
        steps_per_epoch = math.ceil(len(train_rows) / batch_size)
        total = steps_per_epoch * epochs
        history: list[dict] = []
        first = 1
        found = checkpoints.latest() if checkpoints is not None else None
        if found is not None:
            objects, meta = found
            set_peft_model_state_dict(model_encoder, load_tensors(objects["adapter.safetensors"]))
            head.load_state_dict(load_tensors(objects["head.safetensors"]))
            _load_optimizer(optimizer, objects["optimizer.safetensors"], meta["optimizer"])
            history, first = meta["history"], meta["epoch"] + 1
            log(f"lora: resuming after epoch {meta['epoch']} of {epochs} from its checkpoint")
        autocast = lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
        n_params = sum(p.numel() for p in model_encoder.parameters() if p.requires_grad)
        log(f"lora: r={cfg.lora_rank} alpha={cfg.lora_alpha} on {', '.join(cfg.lora_targets)} ({n_params} adapter "
            f"weights), {len(train_rows)} train / {len(val_rows)} validation rows, {epochs} epochs of "
            f"{steps_per_epoch} steps, batch {batch_size}, lr {lr:g}, on {device}{' with bf16 autocast' if bf16 else ''}")
        for epoch in range(first, epochs + 1):
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout: the same masks whether resumed or not
            rng = np.random.default_rng([cfg.seed, epoch])
            model.train()
            loss_sum, tokens, step = 0.0, 0, (epoch - 1) * steps_per_epoch
            for batch in _batches(ids.lengths, train_rows, batch_size, rng):
                for group in optimizer.param_groups:
                    group["lr"] = lr * _lr_factor(step, total)
                xb, mask = _tensors(ids, batch, pad_id, device)
                with autocast():
                    logits = model(xb, mask)
                loss = F.cross_entropy(logits.float(), torch.from_numpy(y[batch]).to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                loss_sum += loss.item() * len(batch)
                tokens += int(mask.sum())
                step += 1
            train_seconds = time.perf_counter() - t0
            accuracy = (_accuracy(model, ids, y, val_rows, batch_size, pad_id, device, autocast)
                        if len(val_rows) else None)
            history.append({"epoch": epoch, "train_loss": loss_sum / len(train_rows), "val_accuracy": accuracy,
                            "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 3),
                            "rows_per_s": round(len(train_rows) / train_seconds, 1),
                            "tokens_per_s": round(tokens / train_seconds, 1)})
            if checkpoints is not None:
                opt_bytes, opt_meta = _optimizer_objects(optimizer)
                checkpoints.save(epoch, {
                    "adapter.safetensors": save_tensors(_cpu(get_peft_model_state_dict(model_encoder))),
                    "head.safetensors": save_tensors(_cpu(head.state_dict())),
                    "optimizer.safetensors": opt_bytes,
                }, {"epoch": epoch, "history": history, "optimizer": opt_meta})
            h = history[-1]
            log(f"lora: epoch {epoch}/{epochs}: train loss {h['train_loss']:.4f}"
                f"{'' if accuracy is None else f', validation accuracy {accuracy:.4f}'}, {h['rows_per_s']} rows/s, "
                f"{h['tokens_per_s']} tokens/s ({h['seconds']:.1f}s)")
        model.eval()
        adapter = _cpu(get_peft_model_state_dict(model_encoder))
    return LoraFit(adapter=adapter, config=config, head=head.cpu().eval(), history=history,
                   val_accuracy=history[-1]["val_accuracy"] if history else None,
                   seconds=time.perf_counter() - started, resumed_from=first - 1, train_rows=len(train_rows),
                   val_rows=len(val_rows))


def _cpu(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}
