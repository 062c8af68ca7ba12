"""Train/test splits that do not move when data grows: by hash (the default) or by time.

**hash** — a row's side is a pure function of its *key* and the seed: the key is its group (``group_column``)
when it has one, else its normalised text. ``sha256("<seed>\\0g\\0<group>")`` (or ``\\0t\\0<text>``) read as a
64-bit integer below ``test_size · 2⁶⁴`` means test. Nothing about the other rows enters, so appending rows or
partitions never moves an existing row across sides, every copy of a text (and every row of a group) lands on
one side, and the same rows give the same split on any machine and any version of numpy/pandas.
The price is that the shares are binomial, not exact: the test share's standard deviation is
``sqrt(p(1-p)·Σ sᵢ²)/N`` over the keys' row counts ``sᵢ`` (≈ 0.3 points at 8k ungrouped rows, more when a few
groups are large), and each label's share is only stratified in expectation.

**time** — the newest rows are the test set (train on the past, test on the recent): the rows at or after a
cut-off time, the cut-off chosen so that the test share is closest to ``test_size``. Rows of one time (e.g. one
``dt=`` partition) never straddle the cut-off; with groups, a group's time is its newest row's. Growing data
moves the cut-off forward by design (yesterday's test rows become training rows).

Both keep group-disjointness and the input's row order within each side.
"""

from __future__ import annotations

import hashlib
from itertools import islice
from typing import Iterable, Iterator, Literal

import numpy as np
import pandas as pd

from adaptflow.data import CHUNK_ROWS, DataError, format_rows

SplitMethod = Literal["hash", "time"]
_SCALE = float(2**64)


def split_frame(df: pd.DataFrame, *, test_size: float, seed: int, method: SplitMethod = "hash",
                source: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train, test)`` of a ``prepare_frame`` frame (``time`` column needed for ``method="time"``).

    Both parts keep the input's row order and get a fresh index (``row`` keeps the provenance).
    Raises:
        ValueError: ``test_size`` outside (0, 1) or an unknown method.
        DataError: fewer than 2 rows, a single group, or (time) missing or unreadable times.
    """
    if not 0.0 < float(test_size) < 1.0:
        raise ValueError(f"test_size must be a fraction between 0 and 1 (exclusive), got {test_size!r}.")
    where = f"{source}: " if source else ""
    if len(df) < 2:
        raise DataError(f"{where}{len(df)} row(s) left; a train/test split needs at least 2. Add data rows.")
    codes, keys = _keys(df, where)
    if method == "hash":
        is_test = hash_sides(codes, keys, test_size=test_size, seed=seed)
    elif method == "time":
        is_test = time_sides(df, codes, test_size=test_size, where=where)
    else:
        raise ValueError(f"unknown split method {method!r}; use 'hash' or 'time'.")
    return df[~is_test].reset_index(drop=True), df[is_test].reset_index(drop=True)


def _keys(df: pd.DataFrame, where: str) -> tuple[np.ndarray, Iterator[str]]:
    """Per row, the code of its split key (its group, else its text), and the distinct keys in code order.

    Groups and texts are factorised separately (no per-row strings are built); the distinct keys are spelled
    out lazily, :data:`CHUNK_ROWS` at a time, as ``g\\0<group>`` or ``t\\0<text>``.
    """
    if "group" in df.columns:
        group_codes, groups = pd.factorize(df["group"], use_na_sentinel=True)
    else:
        group_codes, groups = np.full(len(df), -1, dtype=np.int64), pd.Index([], dtype=object)
    grouped = group_codes >= 0
    if grouped.all() and len(groups) < 2:
        raise DataError(
            f"{where}all rows share one group ({groups[0]!r}); a group-disjoint split needs at "
            f"least 2 groups. Use another group_column or none.")
    text_codes, texts = pd.factorize(df["text"].fillna(""))
    n_groups = len(groups)
    combined = np.where(grouped, group_codes, n_groups + text_codes)
    codes, used = pd.factorize(combined)

    def spelled() -> Iterator[str]:
        for start in range(0, len(used), CHUNK_ROWS):
            part = used[start:start + CHUNK_ROWS]
            is_group = part < n_groups
            group_keys = iter(groups[part[is_group]].tolist())
            text_keys = iter(texts[part[~is_group] - n_groups].tolist())
            for key_is_group in is_group.tolist():
                yield f"g\0{next(group_keys)}" if key_is_group else f"t\0{next(text_keys)}"

    return codes, spelled()


def key_hashes(keys: Iterable[str], seed: int) -> np.ndarray:
    """``uint64`` per key: the first 8 bytes (big-endian) of ``sha256("<seed>\\0<key>")``.

    One digest per distinct key, taken :data:`CHUNK_ROWS` keys at a time; each chunk's 8-byte prefixes are
    joined into one buffer, so no per-key Python object outlives its chunk.
    """
    prefix = f"{int(seed)}\0".encode()
    keys, parts = iter(keys), []
    while chunk := list(islice(keys, CHUNK_ROWS)):
        joined = b"".join(hashlib.sha256(prefix + str(k).encode("utf-8")).digest()[:8] for k in chunk)
        parts.append(np.frombuffer(joined, dtype=">u8").astype(np.uint64))
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)


def hash_sides(codes: np.ndarray, keys: Iterable[str], *, test_size: float, seed: int) -> np.ndarray:
    """Boolean ``is_test`` per row: its key's hash below ``test_size · 2⁶⁴``.

    Only when that leaves one side empty (a handful of rows) does the key nearest that side cross over, so the
    split is never unusable; that is the one case in which more data can move a row back.
    """
    hashes = key_hashes(keys, seed)
    threshold = np.uint64(min(int(float(test_size) * _SCALE), 2**64 - 1))
    key_test = hashes < threshold
    if not key_test.any():
        key_test[np.argmin(hashes)] = True
    elif key_test.all():
        key_test[np.argmax(hashes)] = False
    return key_test[codes]


def time_sides(df: pd.DataFrame, codes: np.ndarray, *, test_size: float, where: str = "") -> np.ndarray:
    """Boolean ``is_test`` per row: the rows at or after the cut-off time (see the module docstring)."""
    if "time" not in df.columns:
        raise ValueError("a time split needs the frame's 'time' column (read with time_column=...).")
    times = parse_times(df["time"], df["row"].to_numpy(), where)
    grouped = df["group"].notna().to_numpy() if "group" in df.columns else np.zeros(len(df), dtype=bool)
    if grouped.any():  # a group lives at its newest row's time, so it stays on one side
        newest = pd.Series(times).groupby(codes).transform("max").to_numpy()
        times = np.where(grouped, newest, times)
    values, counts = np.unique(times, return_counts=True)
    if len(values) < 2:
        raise DataError(f"{where}every row has the same time ({_show(values[0])}); a time split needs at least two "
                        f"distinct times. Use split: hash, or add newer data.")
    tail = np.cumsum(counts[::-1])[::-1]  # rows at or after values[j]
    candidates = np.arange(1, len(values))  # j = 0 would put every row in the test set
    best = candidates[np.argmin(np.abs(tail[candidates] / len(times) - float(test_size)))]
    return times >= values[best]


def parse_times(values: pd.Series, rows: np.ndarray, where: str = "") -> np.ndarray:
    """Times as sortable numbers: numbers as they are, else dates/timestamps (ISO 8601 and the like) in ns UTC."""
    missing = values.isna().to_numpy()
    if missing.any():
        raise DataError(f"{where}the time column is empty at rows {format_rows(rows[missing].tolist())}; every row "
                        f"needs a time for split: time. Fill those rows or drop them.")
    text = values.astype(str)  # NaN-missing strings: an Arrow-held column's NaN-free numbers stay numbers
    numbers = pd.to_numeric(text, errors="coerce")
    if numbers.notna().all():
        return numbers.to_numpy(dtype=np.float64)
    stamps = pd.to_datetime(text, errors="coerce", utc=True, format="mixed")
    bad = stamps.isna().to_numpy()
    if bad.any():
        examples = ", ".join(repr(v) for v in values[bad].head(3).tolist())
        raise DataError(f"{where}time column values at rows {format_rows(rows[bad].tolist())} ({examples}) are neither "
                        f"numbers nor dates; use ISO dates like 2026-11-30 or epoch seconds.")
    return stamps.to_numpy(dtype="datetime64[ns]").astype(np.int64).astype(np.float64)


def _show(value) -> str:
    return repr(value.item() if hasattr(value, "item") else value)


def split_shares(train: pd.DataFrame, test: pd.DataFrame) -> dict:
    """The test share overall and per label, for logs and the ingest manifest."""
    n = len(train) + len(test)
    labels = pd.concat([train["label"], test["label"]]).fillna("(missing)")  # Arrow-held labels stay so
    per_label = test["label"].fillna("(missing)").value_counts()
    totals = labels.value_counts()
    return {"test": round(len(test) / n, 4) if n else 0.0,
            "test_by_label": {str(k): round(float(per_label.get(k, 0)) / float(v), 4) for k, v in totals.items()}}
