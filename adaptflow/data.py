"""Read labelled text tables, normalise them to ``text,label,group,row``, split them, and snapshot them.

Every problem with the user's file is raised as :class:`DataError`, naming the file, the column, example
row or line numbers and what to do, so a failed flow run says what to fix instead of showing a traceback.
S3 sources go through ``adaptflow.store`` (imported lazily), then follow the same local code path.
"""

from __future__ import annotations

import datetime
import difflib
import gzip
import hashlib
import io
import json
import math
import tempfile
import unicodedata
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

FRAME_COLUMNS = ["text", "label", "group", "row"]
_TEXT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
SUPPORTED_SUFFIXES = sorted([*_TEXT_FORMATS, ".parquet"] + [s + ".gz" for s in _TEXT_FORMATS])
_EXAMPLES = 5
CHUNK_ROWS = 65_536  # rows turned into Python objects at a time (digests, normalising)
TEXT_DTYPE = pd.ArrowDtype(pa.large_string())  # string columns of prepared frames and snapshots; missing: pd.NA


class DataError(ValueError):
    """A problem with the input data; the message names the file, column, rows and what to do."""


def format_rows(rows: Iterable[int], limit: int = _EXAMPLES) -> str:
    """``"3, 7, 9"`` or ``"3, 7, 9, 11, 12 (and 40 more)"`` for error messages."""
    rows = list(rows)
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f" (and {len(rows) - limit} more)" if len(rows) > limit else "")


def is_missing(value: Any) -> bool:
    """None, NaN, pd.NA and NaT; never raises on lists or arrays."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)


# ----------------------------------------------------------------------------------------------- reading


def read_table(source: str | Path, *, store=None) -> pd.DataFrame:
    """Read a CSV/TSV/JSON-lines (optionally ``.gz``) or Parquet table, local or ``s3://bucket/key``.

    CSV and JSON-lines cells are read as strings (``"1"`` stays ``"1"``), empty cells become None.
    The index is the 0-based data row (for JSON lines: line number - 1), so ``row = index + 1``.
    Raises:
        DataError: missing/empty/header-only file, malformed line, non-UTF-8 bytes, unreadable Parquet.
    """
    name = str(source)
    if name.startswith("s3://"):
        if store is None:
            raise DataError(f"{name}: reading from S3 needs a store; pass store=ArtifactStore.from_settings(settings).")
        from adaptflow.store import parse_s3_uri  # lazy: local reads must not need boto3

        bucket, key = parse_s3_uri(name)
        _format_of(name)  # refuse an unsupported suffix before downloading anything
        if not key or key.endswith("/"):
            raise DataError(f"{name}: names a folder, not a file; point at one CSV/JSONL/Parquet object in it.")
        with tempfile.TemporaryDirectory(prefix="adaptflow-data-") as tmp:
            local = Path(tmp) / PurePosixPath(key).name  # keep the suffix: it decides the format
            _download(store, bucket, key, local, name)
            return _read_local(Path(local), name)
    return _read_local(Path(source), name)


def _download(store, bucket: str, key: str, local: Path, name: str) -> None:
    """Fetch an S3 data file (size and MD5 checked); a missing object or bucket, or a refused read, is bad
    input (DataError: not retried, exit 2). An unreachable server stays a StoreError (transient: retried)."""
    from adaptflow.store import AccessDeniedError, ArtifactStore, BucketNotFoundError, NotFoundError

    if not isinstance(store, ArtifactStore):  # a duck-typed store (tests): just fetch
        store.get_file(key, local)
        return
    store = store.with_bucket(bucket)  # the bucket named in the URI, not necessarily the artifact bucket
    try:
        store.get_file(key, local, verify=True)
    except NotFoundError:
        raise DataError(
            f"{name}: no such object in bucket {store.bucket!r} (at {store._endpoint()}). Check data.train/"
            f"data.test, e.g. list the folder with `aws s3 ls {name.rsplit('/', 1)[0]}/`."
        ) from None
    except BucketNotFoundError:
        raise DataError(
            f"{name}: bucket {store.bucket!r} does not exist at {store._endpoint()}. Check the bucket name in "
            f"the data path, and that AWS_ENDPOINT_URL_S3 points at the store that holds it."
        ) from None
    except AccessDeniedError as exc:
        raise DataError(
            f"{name}: reading it was refused ({exc}). Check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, and that this "
            f"identity may s3:GetObject on {name}."
        ) from None


def _format_of(name: str) -> tuple[str, bool]:
    """``(format, gzipped)`` from the file name."""
    lower = name.lower()
    gz = lower.endswith(".gz")
    suffix = PurePosixPath(lower[:-3] if gz else lower).suffix
    if suffix == ".parquet" and not gz:
        return "parquet", False
    if suffix in _TEXT_FORMATS:
        return _TEXT_FORMATS[suffix], gz
    found = (suffix + (".gz" if gz else "")) or "(no extension)"
    raise DataError(
        f"{name}: unsupported file type {found}. "
        f"Use one of {', '.join(SUPPORTED_SUFFIXES)} (JSON files must hold one object per line)."
    )


def _read_local(path: Path, name: str) -> pd.DataFrame:
    fmt, gz = _format_of(name)
    if not path.exists():
        raise DataError(f"{name}: file not found (looked for {path.resolve()}). Check the path and working directory.")
    if path.is_dir():
        raise DataError(f"{name}: is a directory ({path.resolve()}); point at a data file inside it.")
    if path.stat().st_size == 0:
        raise DataError(f"{name}: the file is empty (0 bytes). Export the dataset again with a header and data rows.")
    if fmt == "parquet":
        df = _read_parquet(path, name)
    elif fmt == "jsonl":
        df = _read_jsonl(path, name, gz)
    else:
        df = _read_csv(path, name, gz, sep="\t" if fmt == "tsv" else ",")
    if len(df) == 0:
        cols = ", ".join(map(str, df.columns)) or "none"
        raise DataError(f"{name}: no data rows (columns: {cols}). Add data rows or point at the right file.")
    return df


def _open_binary(path: Path, gz: bool):
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _non_utf8_lines(path: Path, gz: bool) -> list[int]:
    """Physical line numbers (1-based) holding bytes that are not UTF-8; only called after a decode error."""
    bad = []
    with _open_binary(path, gz) as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(number)
    return bad


def _unreadable(name: str, error: Exception) -> DataError:
    return DataError(f"{name}: cannot read the file ({error}). Check it is complete and really gzip if named .gz.")


def _encoding_error(name: str, lines: list[int]) -> DataError:
    where = f"line(s) {format_rows(lines)}" if lines else "somewhere in the file"
    return DataError(
        f"{name}: not valid UTF-8 at {where}. Re-encode the file as UTF-8, e.g. "
        f"`iconv -f cp1252 -t utf-8 in.csv > out.csv` or pandas `to_csv(..., encoding='utf-8')`."
    )


def _read_csv(path: Path, name: str, gz: bool, sep: str) -> pd.DataFrame:
    try:
        with warnings.catch_warnings():
            # pandas only *warns* when the first data row has more fields than the header, then drops data
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(
                path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                index_col=False, compression="gzip" if gz else None,
            )
    except UnicodeDecodeError:
        raise _encoding_error(name, _non_utf8_lines(path, gz)) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{name}: the file has no header and no rows. Export the dataset again.") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning) as e:
        detail = str(e).strip() if isinstance(e, pd.errors.ParserError) else "a row has more fields than the header"
        raise DataError(
            f"{name}: cannot parse as {'TSV' if sep == chr(9) else 'CSV'} ({detail}). Every row needs as many "
            f"fields as the header; quote fields holding the delimiter, quotes or newlines "
            f"(\"a, b\", inner \" doubled)."
        ) from None
    except (OSError, EOFError) as e:  # e.g. a truncated or fake .gz
        raise _unreadable(name, e) from None
    # keep_default_na=False keeps "NA"/"null" as text; only truly empty cells count as missing
    return df.astype(object).where(df.notna() & (df != ""), None)


def _read_jsonl(path: Path, name: str, gz: bool) -> pd.DataFrame:
    records, lines, bad_json, bad_utf8, nonblank = [], [], [], [], 0
    try:
        with _open_binary(path, gz) as f:
            for number, raw in enumerate(f, start=1):
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    bad_utf8.append(number)
                    continue
                if not line.strip():
                    continue  # blank lines (often a trailing one) carry no record
                nonblank += 1
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    bad_json.append((number, f"{e.msg} at column {e.colno}"))
                    continue
                if not isinstance(obj, dict):
                    bad_json.append((number, f"expected a JSON object, got {type(obj).__name__}"))
                    continue
                # numbers/bools as the strings a CSV would hold (1.0 -> "1"); lists/objects left for prepare_frame
                records.append({k: _scalar_to_str(v) if isinstance(v, (int, float)) else v for k, v in obj.items()})
                lines.append(number)
    except (OSError, EOFError) as e:
        raise _unreadable(name, e) from None
    if bad_utf8:
        raise _encoding_error(name, bad_utf8)
    if bad_json:
        detail = "; ".join(f"line {n}: {msg}" for n, msg in bad_json[:_EXAMPLES])
        more = f" (and {len(bad_json) - _EXAMPLES} more lines)" if len(bad_json) > _EXAMPLES else ""
        raise DataError(
            f"{name}: malformed JSON lines — {detail}{more}. Each line must hold one JSON object "
            f"(JSON lines, not a JSON array); fix or remove these lines."
        )
    if nonblank == 0:
        raise DataError(f"{name}: the file holds only blank lines. Export the dataset again.")
    df = pd.DataFrame.from_records(records, index=pd.Index(np.asarray(lines, dtype=np.int64) - 1))
    return df.astype(object).where(df.notna(), None)


def _read_parquet(path: Path, name: str) -> pd.DataFrame:
    try:
        # position in the file is the row number, whatever index the writer stored
        return pd.read_parquet(path).reset_index(drop=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        message = f"{name}: unreadable Parquet file ({e}). Check the upload is complete or export it again."
        raise DataError(message) from None


# ----------------------------------------------------------------------------------------------- normalising


def normalise_text(value: Any) -> str | None:
    """NFC and stripped; None when missing. Training and serving both call it, so they see the same text."""
    if is_missing(value):
        return None
    # NFC so that composed and decomposed spellings of one text compare (and hash, and embed) equal
    return unicodedata.normalize("NFC", str(value)).strip()


def _scalar_to_str(value: Any) -> str | None:
    """Label/group scalar as a string: integral floats lose ``.0`` (Parquet upcasts int labels with gaps)."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def _type_name(value: Any) -> str:
    return "list" if isinstance(value, (list, tuple, np.ndarray)) else type(value).__name__


def _suggest(name: str, columns: list[str]) -> str:
    """Closest column name, compared case-insensitively."""
    lowered = {str(c).lower(): str(c) for c in columns}
    match = difflib.get_close_matches(str(name).lower(), list(lowered), n=1, cutoff=0.6)
    return f" Did you mean {lowered[match[0]]!r}?" if match else ""


def _normalise(series: pd.Series, *, role: str, column: str, source: str, rows: np.ndarray) -> pa.ChunkedArray:
    """Column values as NFC-stripped Arrow strings (null when missing); anything that is not a fitting scalar raises
    DataError. Values become Python objects :data:`CHUNK_ROWS` at a time; only the Arrow chunks are kept."""
    if role == "text" and (pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)):
        raise DataError(
            f"{source}: text column {column!r} holds {series.dtype} values (rows {format_rows(rows.tolist())}), "
            f"not text. Set text_column to the column holding the texts."
        )
    chunks: list[pa.Array] = []
    bad: list[tuple[int, str]] = []
    arrow_held = _arrow_strings(series.dtype)
    for start in range(0, len(series), CHUNK_ROWS):
        part = series.iloc[start:start + CHUNK_ROWS]
        values = part.tolist()
        chunk = _normalise_chunk(values, rows[start:start + CHUNK_ROWS].tolist(), role, bad)
        if arrow_held and not part.isna().any() and chunk == values:  # already normalised: share the buffers
            chunks.append(pa.array(part).cast(pa.large_string()))
        else:
            chunks.append(pa.array(chunk, pa.large_string()))
        del values, chunk
    if bad:
        kinds = ", ".join(sorted({kind for _, kind in bad}))
        raise DataError(
            f"{source}: {role} column {column!r} holds {kinds} values at rows {format_rows([r for r, _ in bad])}; "
            f"expected {'strings' if role == 'text' else 'strings or integers'}. "
            f"Fix those rows or choose another column."
        )
    return pa.chunked_array(chunks, pa.large_string())


def _arrow_strings(dtype) -> bool:
    """Whether a column holds Arrow strings (pandas' ``str``/``string[pyarrow]``, or an Arrow string dtype)."""
    if isinstance(dtype, pd.StringDtype):
        return dtype.storage == "pyarrow"
    return isinstance(dtype, pd.ArrowDtype) and (pa.types.is_string(dtype.pyarrow_dtype)
                                                 or pa.types.is_large_string(dtype.pyarrow_dtype))


def _normalise_chunk(values: list, rows: list[int], role: str, bad: list[tuple[int, str]]) -> list[str | None]:
    """One chunk of :func:`_normalise`; appends ``(row, kind)`` to ``bad`` for values that do not fit."""
    out: list[str | None] = []
    for row, value in zip(rows, values):
        if isinstance(value, str) or is_missing(value):
            text = normalise_text(value)
        elif role == "time" and isinstance(value, (datetime.date, np.datetime64)):
            text = pd.Timestamp(value).isoformat()  # pd.Timestamp is a datetime.date too
        elif role == "label" and isinstance(value, (list, tuple, np.ndarray)):
            from adaptflow.multilabel import labels_to_json  # a label set (Parquet/JSONL list): multi-label data

            try:
                text = labels_to_json(value)
            except TypeError:
                bad.append((row, "list of non-scalar"))
                text = None
        else:
            text = None if role == "text" else _scalar_to_str(value)
            fractional = role == "label" and isinstance(value, (float, np.floating)) and not float(value).is_integer()
            if text is None or fractional:  # 0.5 is a score, not a class
                bad.append((row, "non-integer number" if fractional else _type_name(value)))
        out.append(text if text or role == "text" else None)
    return out


def prepare_frame(
    df: pd.DataFrame, *, text_column: str, label_column: str, group_column: str | None = None, source: str,
    time_column: str | None = None,
) -> pd.DataFrame:
    """Select and normalise the text/label/group (and time) columns.

    Returns:
        DataFrame with ``text`` (NFC, stripped; missing: null), ``label`` and ``group`` (strings or null), all
        three held as Arrow strings (:data:`TEXT_DTYPE`), and ``row`` (1-based data row in the source: ``index + 1`` for an integer index, else position + 1);
        with ``time_column``, also ``time`` (Arrow string: numbers as ``label`` values are, dates/timestamps ISO 8601).
    """
    columns = [str(c) for c in df.columns]
    wanted = {"text_column": text_column, "label_column": label_column}
    if group_column is not None:
        wanted["group_column"] = group_column
    if time_column is not None:
        wanted["time_column"] = time_column
    for arg, col in wanted.items():
        if col not in df.columns:
            raise DataError(
                f"{source}: column {col!r} ({arg}) not found. Available columns: {', '.join(columns) or 'none'}."
                f"{_suggest(col, columns)} Set {arg} to one of them."
            )
    if text_column == label_column:
        raise DataError(f"{source}: text_column and label_column are both {text_column!r}; they must differ.")
    if pd.api.types.is_integer_dtype(df.index.dtype):
        rows = df.index.to_numpy(dtype=np.int64) + 1
    else:
        rows = np.arange(1, len(df) + 1, dtype=np.int64)

    def column(role: str, name: str | None) -> pd.Series:
        if name is None:
            return pd.Series(pd.arrays.ArrowExtensionArray(pa.nulls(len(df), pa.large_string())))
        values = _normalise(df[name], role=role, column=name, source=source, rows=rows)
        return pd.Series(pd.arrays.ArrowExtensionArray(values))  # Arrow-held: no Python object per row

    frame = pd.DataFrame(
        {"text": column("text", text_column), "label": column("label", label_column),
         "group": column("group", group_column), "row": rows}
    )
    if time_column is not None:
        frame["time"] = column("time", time_column)
    return frame


# ----------------------------------------------------------------------------------------------- splitting


def split_frame(df: pd.DataFrame, *, test_size: float, seed: int, method: str = "hash",
                source: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train, test)``: see :func:`adaptflow.split.split_frame` (hash split by group/text, or by time)."""
    from adaptflow.split import split_frame as split  # the split lives beside the readers, in its own room

    return split(df, test_size=test_size, seed=seed, method=method, source=source)


# ----------------------------------------------------------------------------------------------- snapshots


def frame_digest(df: pd.DataFrame, *, chunk_rows: int = CHUNK_ROWS) -> str:
    """``"sha256:<hex>"`` of the content: columns in sorted order, rows as given; index and dtypes ignored.

    Per column, the bytes hashed are ``json.dumps([name, values], ensure_ascii=False, default=str)`` and a
    newline (missing values as null); they are fed ``chunk_rows`` values at a time, so no whole-column list or
    string is ever built.
    """
    h = hashlib.sha256()
    for column in sorted(df.columns, key=str):
        series = df[column]
        h.update(f"[{json.dumps(str(column), ensure_ascii=False)}, [".encode("utf-8"))
        for start in range(0, len(series), chunk_rows):
            values = [None if is_missing(v) else v for v in series.iloc[start:start + chunk_rows].tolist()]
            items = json.dumps(values, ensure_ascii=False, default=str)[1:-1]  # the chunk's items, no brackets
            h.update(((", " if start else "") + items).encode("utf-8"))
        h.update(b"]]\n")
    return "sha256:" + h.hexdigest()


def to_parquet_bytes(df: pd.DataFrame) -> bytes:
    """Parquet bytes without the index; all-None object columns are stored as strings, not nulls."""
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    for i, field in enumerate(table.schema):
        if pa.types.is_null(field.type):
            table = table.set_column(i, pa.field(field.name, pa.string()), table.column(i).cast(pa.string()))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def read_parquet_bytes(data: bytes) -> pd.DataFrame:
    """Inverse of :func:`to_parquet_bytes`; string columns come back Arrow-held (:data:`TEXT_DTYPE`, missing:
    pd.NA, which :func:`is_missing` knows), not as one Python object per row."""
    try:
        table = pq.read_table(pa.BufferReader(data))
        strings = pa.schema([pa.field(f.name, pa.large_string()) if pa.types.is_string(f.type) else f
                             for f in table.schema])
        table = table.cast(strings)
        return table.to_pandas(types_mapper={pa.large_string(): TEXT_DTYPE}.get, ignore_metadata=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"parquet snapshot ({len(data)} bytes) is unreadable ({e}); rebuild the snapshot.") from None
