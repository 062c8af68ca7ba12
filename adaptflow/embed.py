"""Tokenization and the frozen forward pass: length-sorted, token-budgeted, dynamically padded encoding.

The encoder never changes during a run, so every text is embedded once (and cached per row by
``cache.py``). Throughput comes from these, in order of impact (measured on 2 EPYC cores, all-MiniLM-L6-v2,
``python -m benchmarks.run --only encoder``; see benchmarks/RESULTS.md):

1. Sorting rows by length, so that each batch pads to almost the length of its own rows. Random order pads
   short sentences to the longest in the batch and wastes most of the matmuls on [PAD].
2. Batches sized by a *token* budget (rows x padded length), not a row count: short rows run in large batches,
   long rows in small ones, and memory per batch stays roughly constant (no OOM on the long tail).
3. bf16 where the hardware does bf16 natively (CUDA, AVX512-BF16/AMX CPUs), with the weights cast to bf16 *once*
   per model (a cached copy): autocast re-casts frozen weights on every call (its weight cache only covers
   weights that require grad), which cost ~30% of the CPU time. Cosine to fp32 >= 0.9998, accuracy of the head
   unchanged within 0.2 point.
4. On CPU, one single-threaded worker per physical core, each on its own batch, instead of one forward
   spread over all cores: no barrier after every op, so a core taken by another process delays one batch
   rather than all of them (2.5x the throughput at load average 5 on 2 cores; no slower on an idle machine).
5. On glibc, keeping freed activation buffers in the heap (``mallopt``): otherwise every batch's multi-MB
   tensors are mmap'ed and page-faulted afresh.

Token ids can travel as :class:`TokenIds` (one flat int32 array + offsets) instead of lists of Python ints: 4
bytes per token instead of ~36, which is what keeps a tokenize/embed stage over millions of rows small.
"""

from __future__ import annotations

import copy
import ctypes
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "cls")
DTYPES = ("fp32", "bf16")
# Padded tokens per forward pass. On 2 AMD EPYC cores (AVX512-BF16), all-MiniLM-L6-v2, rotten_tomatoes
# (~27 tokens a row): 2k-8k are within noise of each other once activation buffers are reused (point 5 above);
# beyond 8k the activations fall out of cache and padding grows. On a GPU, bigger batches keep the device busy;
# 32k is a conservative guess (activations ~1 GB for a 1024-wide encoder).
DEFAULT_TOKENS_PER_BATCH = {"cpu": 4096, "cuda": 32768}
DEFAULT_CHUNK_ROWS = 4096


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises native bf16 arithmetic (AVX512-BF16 or AMX-BF16)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume no (fp32 is always correct, only slower)
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_dtype(requested: str, device: str) -> str:
    """Turn ``"auto"|"fp32"|"bf16"`` into ``"fp32"|"bf16"`` for ``device``.

    ``auto`` picks bf16 on CUDA and on CPUs with native bf16; elsewhere bf16 is emulated and slower than fp32.
    """
    if requested in DTYPES:
        return requested
    if requested != "auto":
        raise ValueError(f"dtype must be one of 'auto', 'fp32', 'bf16'; got {requested!r}")
    if str(device).startswith("cuda"):
        return "bf16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def physical_cores() -> int:
    """Physical cores available to this process (hyperthread siblings counted once)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("?", str(cpu)))
    return max(1, len(cores))


def configure_cpu_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``num_threads`` (default: all physical cores) and return it.

    Hyperthreads share the FMA units, so more threads than physical cores only adds contention; and torch's own
    default can see the host's cores rather than the container's CPU quota.
    """
    n = num_threads or physical_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


_ALLOCATOR_TUNED = False
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 — glibc only
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Batches of varying shapes fragment the heap: without this, a 37k-row encode left ~500 MB of free but
    resident memory behind (measured), which counts in the process's peak RSS like live data.
    """
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


def keep_freed_buffers_in_heap(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Ask glibc to serve allocations up to ``mmap_threshold`` from the heap and to keep up to ``trim_threshold``
    of freed memory there (process-wide, once; a no-op elsewhere). Returns whether it was applied.

    Each batch allocates activations of several MB; by default glibc mmaps such blocks and returns them on free,
    so every batch page-faults ~0.5 GB of fresh zeroed pages (measured: 141k minor faults per 20k tokens).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    libc = _libc()
    if not libc:
        return False
    try:
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))
    except (OSError, AttributeError):
        ok = False
    _ALLOCATOR_TUNED = ok
    return ok


# ---------------------------------------------------------------------------------------------- token ids


class TokenIds(Sequence):
    """Ragged token ids: one flat ``values`` array and ``offsets`` (row i is ``values[offsets[i]:offsets[i+1]]``).

    A drop-in for ``list[list[int]]`` wherever ``iter_encode`` takes token ids, at 4 bytes a token; rows come out
    as int arrays (views). Build with :func:`tokenize_ragged`, :meth:`from_lists` or :meth:`from_arrow`.
    """

    __slots__ = ("values", "offsets")

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        values, offsets = np.asarray(values), np.asarray(offsets, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(values):
            raise ValueError("offsets must start at 0 and end at len(values)")
        self.values, self.offsets = values, offsets

    @classmethod
    def from_lists(cls, rows: Iterable[Sequence[int]]) -> "TokenIds":
        rows = [np.asarray(r, dtype=np.int32) for r in rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        return cls(np.concatenate(rows) if rows else np.zeros(0, np.int32), offsets)

    @classmethod
    def from_arrow(cls, array) -> "TokenIds":
        """From a pyarrow ``list<int>`` Array or ChunkedArray (e.g. a Parquet column), without Python ints."""
        import pyarrow as pa

        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
        if array.offset or array.null_count:
            array = pa.concat_arrays([array])  # normalise a sliced array's offsets
        offsets = array.offsets.to_numpy().astype(np.int64)
        values = array.values.to_numpy(zero_copy_only=False)
        return cls(values[offsets[0] : offsets[-1]], offsets - offsets[0])

    def to_arrow(self):
        import pyarrow as pa

        return pa.ListArray.from_arrays(pa.array(self.offsets.astype(np.int32) if self.offsets[-1] < 2**31
                                                 else self.offsets), pa.array(self.values))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        if i < 0:
            i += len(self)
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def take(self, rows: Sequence[int] | np.ndarray) -> "TokenIds":
        """The given rows, in the given order, as a new (compact) TokenIds."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, lengths = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if len(rows) == 0:
            return TokenIds(self.values[:0], offsets)
        # positions of every kept token: start of its row + position within the row
        index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return TokenIds(self.values[index], offsets)

    def __eq__(self, other) -> bool:
        if isinstance(other, TokenIds):
            return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.values, other.values)
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"TokenIds({len(self)} rows, {len(self.values)} tokens)"


def _check_max_length(max_length: int) -> None:
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (room for the special tokens); got {max_length}")


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int, *, batch_size: int = 1000) -> list[list[int]]:
    """Token ids per text: truncated to ``max_length``, unpadded (padding happens per batch in ``iter_encode``).

    Args:
        tokenizer: a fast (Rust) tokenizer; called on ``batch_size`` texts at a time, which is where it is fast.
        texts: the texts, in row order.
        max_length: the longest sequence kept, special tokens included.
    """
    _check_max_length(max_length)
    texts = list(texts)
    ids: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            truncation=True,
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        ids.extend(list(x) for x in enc["input_ids"])
    return ids


def iter_tokenize(tokenizer, texts: Iterable[str], max_length: int, *, batch_size: int = 1000) -> Iterator[TokenIds]:
    """Like :func:`tokenize_texts`, as one :class:`TokenIds` per ``batch_size`` texts (no Python int per token)."""
    _check_max_length(max_length)
    batch: list[str] = []

    def flush() -> TokenIds:
        enc = tokenizer(batch, truncation=True, max_length=max_length, padding=True, return_tensors="np",
                        return_token_type_ids=False)
        mask = enc["attention_mask"].astype(bool)  # selects the real tokens in order, whatever the padding side
        offsets = np.zeros(len(batch) + 1, dtype=np.int64)
        np.cumsum(mask.sum(1), out=offsets[1:])
        return TokenIds(enc["input_ids"][mask].astype(np.int32), offsets)

    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            yield flush()
            batch = []
    if batch:
        yield flush()


def tokenize_ragged(tokenizer, texts: Iterable[str], max_length: int, *, batch_size: int = 1000) -> TokenIds:
    """All texts' ids as one :class:`TokenIds` (same ids as :func:`tokenize_texts`, ~1/9 of the memory)."""
    parts = list(iter_tokenize(tokenizer, texts, max_length, batch_size=batch_size))
    if not parts:
        return TokenIds(np.zeros(0, np.int32), np.zeros(1, np.int64))
    offsets = [parts[0].offsets]
    for p in parts[1:]:
        offsets.append(p.offsets[1:] + offsets[-1][-1])
    return TokenIds(np.concatenate([p.values for p in parts]), np.concatenate(offsets))


def token_budget_batches(lengths: np.ndarray, tokens_per_batch: int) -> list[np.ndarray]:
    """Row indices grouped into batches, longest rows first, each with rows x longest length <= the budget.

    Longest-first puts the largest padded shape (the memory peak) at the start, so an OOM shows up in the
    first second rather than at the end of a long run. A single row longer than the budget gets its own batch.
    """
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)  # rows are sorted, so the first row sets the padded length
        rows = max(1, tokens_per_batch // longest)
        batches.append(order[start : start + rows])
        start += rows
    return batches


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Sentence vectors from token states: masked ``mean`` (as sentence-transformers) or the ``cls`` token."""
    hidden = hidden.float()  # pool in fp32 whatever the forward pass ran in: sums over tokens lose bits in bf16
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


# ---------------------------------------------------------------------------------------------- forward passes


class _HFForward:
    """Any Hugging Face encoder: ``last_hidden_state`` of ``model(input_ids, attention_mask)``."""

    def __init__(self, model):
        self.model = model

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state


_PREPARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PREPARED_LOCK = threading.Lock()


def _weights_signature(model) -> tuple:
    params = list(model.parameters())
    return (len(params), *(p._version for p in params[:4]), str(params[0].device) if params else "", str(
        params[0].dtype) if params else "")


def forward_fn(model, dtype: str, device: str = "cpu"):
    """The callable ``(input_ids, attention_mask) -> last_hidden_state`` that encodes in ``dtype`` on ``device``.

    fp32 runs ``model`` itself. bf16 runs a bf16 copy of it, made once and cached for as long as ``model`` lives
    (rebuilt if its weights change in place): the caller's model is never modified beyond ``.to(device).eval()``.
    Autocast would give the same numbers ~25% slower on CPU: it re-casts every frozen weight on every call.
    """
    if dtype == "fp32":
        return _HFForward(model)
    key = (dtype, str(device))
    with _PREPARED_LOCK:
        entry = _PREPARED.setdefault(model, {})
        sig = _weights_signature(model)
        cached = entry.get(key)
        if cached is not None and cached[0] == sig:
            return cached[1]
        clone = copy.copy(model)  # shallow, with its own module table: drop the pooler (never used here)
        clone._modules = dict(model._modules)
        if "pooler" in clone._modules:
            clone._modules["pooler"] = None
        fn = _HFForward(copy.deepcopy(clone).to(torch.bfloat16).eval())
        entry[key] = (sig, fn)
        return fn


# ---------------------------------------------------------------------------------------------- encoding


def _lengths(token_ids) -> np.ndarray:
    if isinstance(token_ids, TokenIds):
        return token_ids.lengths.astype(np.int64)
    return np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(token_ids))


def cpu_workers(n_batches: int, workers: int | None = None) -> int:
    """How many single-threaded workers encode on the CPU: one per physical core (``ADAPTFLOW_ENCODE_WORKERS``
    overrides), or 1 (one multi-threaded forward at a time) when there are too few batches to share."""
    n = workers or int(os.environ.get("ADAPTFLOW_ENCODE_WORKERS", 0)) or physical_cores()
    return n if n > 1 and n_batches >= 2 * n else 1


def _batch_tensors(token_ids, ragged: TokenIds | None, lengths: np.ndarray, rows: np.ndarray, pad_id: int):
    """(ids, mask) int64 tensors for ``rows``, padded to the longest of them only (dynamic padding)."""
    row_lengths = lengths[rows]
    width = max(int(row_lengths.max()), 1)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    if ragged is not None:
        starts = ragged.offsets[rows]
        for i in range(len(rows)):
            ids[i, : row_lengths[i]] = ragged.values[starts[i] : starts[i] + row_lengths[i]]
    else:
        for i, r in enumerate(rows):
            ids[i, : row_lengths[i]] = token_ids[r]
    mask = (np.arange(width)[None, :] < row_lengths[:, None]).astype(np.int64)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def _encoded_batches(run, batches: list[np.ndarray], workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(rows, run(rows))`` for each batch, in order; with ``workers`` > 1, computed by that many single-threaded
    threads, at most 2 batches per worker ahead of the consumer (which keeps memory bounded and lets the
    caller's work between chunks, e.g. S3 writes, overlap with encoding).

    Why threads of one intra-op thread each rather than one forward over all cores: every op of a multi-threaded
    forward ends in a barrier, and on a shared machine one descheduled thread stalls all of them; independent
    batches never wait for each other (measured 2.5x the throughput at load average 5 on 2 cores, and no slower
    when the machine is idle). The ops release the GIL, so the threads run in parallel.
    """
    if workers <= 1:
        for rows in batches:
            yield rows, run(rows)
        return

    local = threading.local()

    def task(rows):
        if not getattr(local, "single", False):  # OpenMP's thread count is per calling thread
            torch.set_num_threads(1)
            local.single = True
        return run(rows)

    main_threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="adaptflow-encode")
    try:
        pending: deque = deque()
        it = iter(batches)
        for rows in islice(it, 2 * workers):
            pending.append((rows, pool.submit(task, rows)))
        while pending:
            rows, future = pending.popleft()
            vectors = future.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(task, nxt)))
            yield rows, vectors
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True)
        torch.set_num_threads(main_threads)  # MKL's count is process-wide: the workers set it to 1


def iter_encode(
    model,
    token_ids: Sequence[Sequence[int]] | TokenIds,
    *,
    pooling: str = "mean",
    dtype: str = "fp32",
    device: str = "cpu",
    tokens_per_batch: int | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: bool = True,
    stats: dict | None = None,
    workers: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encode token id lists in length-sorted, token-budgeted batches; yield ``(indices, vectors)`` chunks.

    Chunks hold about ``chunk_rows`` rows, in length order rather than input order, so a caller can persist
    each one as it comes (a crashed run resumes from its cache). ``indices`` point into ``token_ids``.

    Args:
        model: a frozen Hugging Face encoder (``last_hidden_state`` output); moved to ``device``.
        token_ids: per row, its ids (lists, arrays, or a :class:`TokenIds`).
        pooling: ``"mean"`` (masked mean over real tokens) or ``"cls"``.
        dtype: ``"fp32"`` or ``"bf16"``; resolve ``"auto"`` first with ``resolve_dtype``.
        tokens_per_batch: budget of padded tokens per forward pass (rows x longest row); None picks the
            device's default (``DEFAULT_TOKENS_PER_BATCH``).
        stats: when given, filled with ``rows``, ``tokens``, ``padded_tokens``, ``seconds`` and ``workers``.
        workers: CPU only: parallel single-threaded workers (default: see :func:`cpu_workers`).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (resolve 'auto' with resolve_dtype); got {dtype!r}")
    device_type = torch.device(device).type
    if tokens_per_batch is None:
        tokens_per_batch = DEFAULT_TOKENS_PER_BATCH.get(device_type, DEFAULT_TOKENS_PER_BATCH["cpu"])
    if tokens_per_batch < 1 or chunk_rows < 1:
        raise ValueError("tokens_per_batch and chunk_rows must be >= 1")
    if device_type == "cpu":
        configure_cpu_threads()
        keep_freed_buffers_in_heap()
    model = model.to(device).eval()
    forward = forward_fn(model, dtype, device)
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    lengths = _lengths(token_ids)
    batches = token_budget_batches(lengths, tokens_per_batch)
    n_tokens = int(lengths.sum())
    n_padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    ragged = token_ids if isinstance(token_ids, TokenIds) else None
    n_workers = cpu_workers(len(batches), workers) if device_type == "cpu" else 1

    def run(rows: np.ndarray) -> np.ndarray:
        ids, mask = _batch_tensors(token_ids, ragged, lengths, rows, pad_id)
        ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        # inference mode per batch, never held across a yield (the caller's code must not run under it)
        with torch.inference_mode():
            return pool(forward(ids, mask), mask, pooling).cpu().numpy()

    t0, waited = time.perf_counter(), 0.0  # waited: time the caller spent between chunks (e.g. writing to S3)
    bar = tqdm(total=len(lengths), unit="row", desc=f"encode {dtype}", disable=not progress)
    out_idx: list[np.ndarray] = []
    out_vec: list[np.ndarray] = []
    pending = 0
    results = _encoded_batches(run, batches, n_workers)
    try:
        for rows, vectors in results:
            out_vec.append(vectors)
            out_idx.append(rows)
            pending += len(rows)
            bar.update(len(rows))
            if pending >= chunk_rows or rows is batches[-1]:
                chunk = np.concatenate(out_idx), np.concatenate(out_vec)
                out_idx, out_vec, pending = [], [], 0
                if device_type == "cpu":
                    release_free_memory()  # once a chunk (~30 batches): bounds the heap, costs < 1 ms
                paused = time.perf_counter()
                yield chunk
                waited += time.perf_counter() - paused
    finally:  # also when the caller stops early (GeneratorExit): stop the workers, close the bar
        results.close()
        bar.close()
        if device_type == "cpu":
            release_free_memory()
    # encoding time only, so tokens/s measures the encoder (with workers, encoding overlaps the caller's time,
    # so this errs on the slow side only when the caller is slower than the encoder)
    seconds = max(time.perf_counter() - t0 - waited, 1e-9) if n_workers == 1 else time.perf_counter() - t0
    logger.info(
        "encoded %d rows (%d tokens, %.0f%% padding) in %.1fs: %.0f rows/s, %.0f tokens/s [%s, %s, %d tok/batch, "
        "%d worker(s)]",
        len(lengths), n_tokens, 100 * (1 - n_tokens / max(n_padded, 1)), seconds,
        len(lengths) / max(seconds, 1e-9), n_tokens / max(seconds, 1e-9), device, dtype, tokens_per_batch,
        n_workers,
    )
    if stats is not None:
        stats.update(rows=len(lengths), tokens=n_tokens, padded_tokens=n_padded, seconds=seconds, workers=n_workers)


@dataclass
class EncodeResult:
    """All vectors in input order, plus what it cost."""

    vectors: np.ndarray  # [n, hidden] float32
    tokens: int  # real (unpadded) tokens encoded
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def encode(model, token_ids: Sequence[Sequence[int]] | TokenIds, **kwargs) -> EncodeResult:
    """Encode everything and return the vectors in input order (``kwargs`` as in ``iter_encode``)."""
    hidden_size = int(model.config.hidden_size)
    vectors = np.zeros((len(token_ids), hidden_size), dtype=np.float32)
    stats: dict = {}
    t0 = time.perf_counter()
    for idx, vec in iter_encode(model, token_ids, stats=stats, **kwargs):
        vectors[idx] = vec
    tokens = stats.get("tokens", 0)
    return EncodeResult(vectors=vectors, tokens=tokens, seconds=time.perf_counter() - t0)
