"""Embeddings too large to hold in memory: float32 rows in a local file, read and written by block.

A retrain's largest array is its training matrix (rows x hidden x 4 bytes: 460 MB for 300k MiniLM rows). Above
a size budget the train stage writes it here instead, and the head trains from it a block at a time, so the
process's memory stays flat in the number of rows. Reads and writes use ``pread``/``pwrite``: the bytes pass
through the OS page cache, which the kernel can drop under pressure and which is not this process's RSS (an
``mmap`` would count every page touched as resident).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# Above this many bytes of vectors, the train and evaluate stages stream from a RowFile (override with
# ADAPTFLOW_IN_MEMORY_MB). 256 MB = ~175k rows of 384-d vectors: the demo and tweets (37k) stay in memory.
DEFAULT_IN_MEMORY_BYTES = 256 << 20


def in_memory_budget() -> int:
    """Bytes of vectors a stage may hold in memory (``ADAPTFLOW_IN_MEMORY_MB`` overrides the default)."""
    value = os.environ.get("ADAPTFLOW_IN_MEMORY_MB")
    if value is None:
        return DEFAULT_IN_MEMORY_BYTES
    try:
        mb = float(value)
    except ValueError:
        raise ValueError(f"ADAPTFLOW_IN_MEMORY_MB must be a number of megabytes; got {value!r}") from None
    return int(mb * (1 << 20))


class RowFile:
    """``n_rows`` x ``dim`` float32 rows in the file at ``path`` (created zero-filled, removed by :meth:`close`).

    Supports what the train/evaluate stages need: ``rows[positions] = vectors`` (scattered writes, e.g. from
    cache shards), :meth:`read` of a contiguous block, ``len()`` and ``shape``.
    """

    def __init__(self, path: str | Path, n_rows: int, dim: int):
        if n_rows < 0 or dim < 1:
            raise ValueError(f"need n_rows >= 0 and dim >= 1; got {n_rows} x {dim}")
        self.path, self.n_rows, self.dim = Path(path), int(n_rows), int(dim)
        self._row_bytes = self.dim * 4
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, self.n_rows * self._row_bytes)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_rows, self.dim

    def __len__(self) -> int:
        return self.n_rows

    def __setitem__(self, positions, vectors: np.ndarray) -> None:
        """Write ``vectors[i]`` to row ``positions[i]`` (runs of consecutive positions go in one call)."""
        positions = np.atleast_1d(np.asarray(positions, dtype=np.int64))
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(positions), self.dim)
        if len(positions) and (positions.min() < 0 or positions.max() >= self.n_rows):
            raise IndexError(f"row positions must be in [0, {self.n_rows})")
        order = np.argsort(positions, kind="stable")
        positions, vectors = positions[order], vectors[order]
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1  # split into runs of consecutive rows
        for run_pos, run_vec in zip(np.split(positions, breaks), np.split(vectors, breaks)):
            if len(run_pos):
                os.pwrite(self._fd, run_vec.tobytes(), int(run_pos[0]) * self._row_bytes)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a new float32 array."""
        start, stop = max(0, int(start)), min(self.n_rows, int(stop))
        out = np.empty((max(0, stop - start), self.dim), dtype=np.float32)
        if len(out):
            got = os.preadv(self._fd, [memoryview(out).cast("B")], start * self._row_bytes)
            if got != out.nbytes:
                raise OSError(f"{self.path}: short read ({got} of {out.nbytes} bytes)")
        return out

    def blocks(self, block_rows: int):
        """``(start, rows)`` for consecutive blocks of ``block_rows`` rows."""
        for start in range(0, self.n_rows, block_rows):
            yield start, self.read(start, start + block_rows)

    def close(self) -> None:
        """Close and delete the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RowFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 — interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"RowFile({self.path}, {self.n_rows} x {self.dim})"
