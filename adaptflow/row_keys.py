"""Row keys as fixed-width binary digests: the sha256 of each text, 32 bytes a row in one numpy ``S32`` array.

The embedding cache, the lineage manifest and the gate key rows by ``sha256(text)``. Held as Python hex strings
that costs ~120 bytes and an object per row (plus a set or dict entry wherever one is looked up); held here it
is 32 bytes a row, no objects, and set operations are sorts and binary searches. Stored files keep the 64-char
hex form (``hashes.txt``, ``text_sha256`` columns), converted to and from these arrays buffer by buffer.
"""

from __future__ import annotations

import binascii
import hashlib
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

DIGEST = np.dtype("S32")
CHUNK = 1 << 16  # texts hashed (and hex strings built) per step: bounds the transient Python objects


def _text_chunks(texts) -> Iterable[list]:
    """``texts`` (an Arrow array/chunked array, a pandas Series, or any iterable of str) in lists of CHUNK."""
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        for start in range(0, len(texts), CHUNK):
            yield texts.slice(start, CHUNK).to_pylist()
        return
    if hasattr(texts, "array") and hasattr(texts.array, "_pa_array"):  # pandas ArrowDtype/"string[pyarrow]"
        yield from _text_chunks(texts.array._pa_array)
        return
    batch: list = []
    for text in texts:
        batch.append(text)
        if len(batch) == CHUNK:
            yield batch
            batch = []
    if batch:
        yield batch


def text_digests(texts) -> np.ndarray:
    """sha256 of each text's UTF-8 bytes, as an ``S32`` array in the given order (the hex of row i is
    ``adaptflow.cache.text_sha256(texts[i])``)."""
    parts = [np.frombuffer(b"".join(hashlib.sha256(t.encode("utf-8")).digest() for t in chunk), dtype=DIGEST)
             for chunk in _text_chunks(texts)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=DIGEST)


def first_seen(digests: np.ndarray) -> np.ndarray:
    """Indices of each distinct digest's first row, in row order (``dict.fromkeys`` order, without the dict)."""
    if len(digests) == 0:
        return np.zeros(0, dtype=np.int64)
    _, first = np.unique(np.ascontiguousarray(digests, dtype=DIGEST), return_index=True)
    return np.sort(first)


def hex_column(digests: np.ndarray) -> pa.ChunkedArray:
    """An Arrow string column of 64-char lowercase hex, one per digest (built from buffers, no str objects)."""
    raw = np.ascontiguousarray(digests, dtype=DIGEST)
    chunks = []
    for start in range(0, len(raw), CHUNK * 16):
        part = raw[start : start + CHUNK * 16]
        data = binascii.hexlify(part.tobytes())
        offsets = np.arange(0, 64 * len(part) + 1, 64, dtype=np.int32)
        chunks.append(pa.StringArray.from_buffers(len(part), pa.py_buffer(offsets), pa.py_buffer(data)))
    return pa.chunked_array(chunks, type=pa.string())


def digests_of_hex(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The inverse of :func:`hex_column`: an Arrow column of 64-char hex strings as an ``S32`` array.

    Raises:
        ValueError: a null or a value that is not 64 hex characters.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        if chunk.null_count:
            raise ValueError("row hashes must be 64 hex chars (text_sha256); found a null")
        chunk = chunk.cast(pa.string())
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
        if not (np.diff(offsets) == 64).all():
            raise ValueError("row hashes must be 64 hex chars (text_sha256)")
        data = chunk.buffers()[2].to_pybytes()[offsets[0] : offsets[-1]]
        try:
            parts.append(np.frombuffer(binascii.unhexlify(data), dtype=DIGEST))
        except binascii.Error:
            raise ValueError("row hashes must be 64 hex chars (text_sha256)") from None
    return np.concatenate(parts) if parts else np.empty(0, dtype=DIGEST)


def is_member(digests: np.ndarray, of: np.ndarray) -> np.ndarray:
    """Per digest, whether it is in ``of`` (both ``S32``): one sort of ``of`` and a binary search each."""
    if len(of) == 0 or len(digests) == 0:
        return np.zeros(len(digests), dtype=bool)
    keys = np.sort(np.ascontiguousarray(of, dtype=DIGEST))
    pos = np.minimum(np.searchsorted(keys, digests), len(keys) - 1)
    return keys[pos] == digests
