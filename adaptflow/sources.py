"""Where labelled rows come from: one file, a lake of partitions, a glob, a list of these, a Hugging Face dataset.

``data.train`` / ``data.test`` name a *location*; :func:`read_source` decides what it is and reads it into the
normalised ``text,label,group,row`` frame (``adaptflow.data.prepare_frame``), plus a listing of every partition it
read (path, size, ETag, rows) for the ingest snapshot's manifest.

Accepted locations:

* one file (CSV/TSV/JSONL, optionally ``.gz``, or Parquet), local or ``s3://``: read by ``data.read_table``,
  exactly as before (same messages);
* a folder or ``s3://`` prefix of partitions, Hive-style ``key=value/`` folders allowed: every data file under it
  (names starting with ``_`` or ``.`` are skipped, as Spark/Hive write ``_SUCCESS``, ``.crc``); the partition keys
  become string columns, usable as ``group_column``;
* a glob, local or ``s3://`` (``s3://lake/reviews/dt=2026-11-*/*.parquet``): ``*``/``?``/``[..]`` match within
  one path segment; the folders before the first wildcard are the Hive base;
* a ``save_to_disk`` folder of a Hugging Face dataset (``datasets.load_from_disk``), or ``hf://<repo id>`` for a
  hub dataset where a hub is reachable (``datasets.load_dataset``); ``#<split>`` picks a split of a DatasetDict
  (default: ``train`` for data.train, ``test`` for data.test);
* a list of any of these.

Streaming: Parquet partitions are read in record batches (only the needed columns) through ``pyarrow.dataset``,
from S3 through a ``pyarrow.fs.S3FileSystem`` built from the settings (endpoint, credentials, path-style); CSV and
JSONL partitions go through the one-file reader, one partition at a time; Hugging Face datasets are memory-mapped
Arrow read in batches. Only the kept columns of each batch are held, never a whole lake.

The partitions of one location must agree on their columns (file columns plus partition keys); one that
differs fails (DataError) with its path and the differing columns. Formats may be mixed.

Rows: a lake's ``row`` is ``row_offset`` of its partition (in the listing) plus the row within that file (the
data row of a CSV, the line of a JSONL, the position in a Parquet file), so rows stay unique per location and
each maps back to one file. Each listing entry records ``path``, ``format``, ``size`` (bytes), ``etag`` (the
S3 ETag; for local files and HF datasets ``sha256:<hex>`` of the bytes, so a copy or checkout that keeps the
content keeps the value), ``rows`` and ``row_offset``.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd

from adaptflow.data import SUPPORTED_SUFFIXES, DataError, prepare_frame, read_table

BATCH_ROWS = 65_536
_GLOB_CHARS = set("*?[")
_HF_MARKERS = ("dataset_info.json", "state.json")  # a Dataset.save_to_disk folder
_HF_DICT_MARKER = "dataset_dict.json"  # a DatasetDict.save_to_disk folder


@dataclass
class SourceRows:
    """The normalised rows of one location and the partitions they came from."""

    frame: pd.DataFrame
    partitions: list[dict] = field(default_factory=list)


@dataclass
class _Partition:
    path: str  # absolute local path or s3://bucket/key
    size: int
    etag: str
    keys: dict[str, str]  # Hive partition keys from the folders
    relative: str = ""  # the path below the location's base (folder, prefix or glob base)


def describe(location: str | os.PathLike | list[str] | None) -> str | None:
    """One string for messages and the manifest: the location, or the list's items joined by ``, ``."""
    if location is None or isinstance(location, (str, os.PathLike)):
        return None if location is None else os.fspath(location)
    return ", ".join(map(os.fspath, location))


def read_source(location: str | os.PathLike | list[str], *, text_column: str, label_column: str, group_column: str | None = None,
                store=None, settings=None, split: str = "train", time_column: str | None = None) -> SourceRows:
    """Read ``location`` (see the module docstring) into ``text,label,group,row`` plus its partition listing.

    Args:
        store: an ``ArtifactStore`` (S3 listing, one-file S3 reads; its client's credentials).
        settings: ``adaptflow.settings.Settings`` for the pyarrow S3 filesystem (endpoint, credentials).
        split: the split of a Hugging Face DatasetDict when the location names none.
        time_column: also keep this column (a file column or a Hive key) as ``time``, for ``split: time``.
    Raises:
        DataError: bad input (missing files, unreadable partitions, disagreeing columns, missing columns, no rows).
    """
    columns = dict(text_column=text_column, label_column=label_column, group_column=group_column)
    if time_column is not None:
        columns["time_column"] = time_column
    reader = _Reader(columns, store=store, settings=settings, split=split)
    items = [location] if isinstance(location, (str, os.PathLike)) else list(location)
    for item in items:
        reader.add(os.fspath(item))
    if reader.total == 0:
        raise DataError(f"{describe(location)}: no data rows in {len(reader.partitions)} partition(s). "
                        f"Add data rows or point at the right location.")
    frame = pd.concat(reader.frames, ignore_index=True) if len(reader.frames) > 1 else reader.frames[0]
    return SourceRows(frame.reset_index(drop=True), reader.partitions)


def list_partitions(location: str | os.PathLike | list[str], *, store=None) -> list[dict]:
    """The partitions ``location`` names (``path``, ``size``, ``etag``, ``keys``, ``relative``), listed without
    reading a row (``relative``: the path below the folder, prefix or glob base; a single file's name).

    What a watcher compares between ticks (``adaptflow.changes``): S3 objects by their listing's ETag, local files
    by the ``sha256:`` of their bytes, as :func:`read_source` records them. A Hugging Face dataset counts as one
    partition (its Arrow files' digest); a hub id cannot be listed and is skipped.
    """
    reader = _Reader({}, store=store, settings=None, split="train")
    found: list[dict] = []
    items = [location] if isinstance(location, (str, os.PathLike)) else list(location)
    for item in map(os.fspath, items):
        kind = location_kind(item)
        if kind == "hf_hub":
            continue
        if kind == "hf_disk":
            target, _ = _split_suffix(item)
            files = sorted(p for p in Path(target).rglob("*.arrow") if p.is_file())
            digest = hashlib.sha256("".join(_sha256(f) for f in files).encode()).hexdigest()
            parts = [_Partition(item, sum(f.stat().st_size for f in files), f"sha256:{digest}", {})]
        elif kind == "file":
            if item.startswith("s3://"):
                parts = [reader._s3_object(item)]
            else:
                path = Path(item).resolve()
                if not path.is_file():
                    raise DataError(f"{item}: no such file or folder (looked for {path}).")
                parts = [_Partition(str(path), path.stat().st_size, _sha256(path), {})]
        else:
            parts = reader._list(item, kind)
        found += [{"path": p.path, "size": p.size, "etag": p.etag, **({"keys": p.keys} if p.keys else {}),
                   "relative": p.relative or PurePosixPath(p.path).name}  # below the base: scoring's output path
                  for p in parts if p.etag or p.size]
    return found


def location_kind(location: str) -> str:
    """``"file"``, ``"folder"``, ``"glob"``, ``"hf_disk"`` or ``"hf_hub"`` (a lake prefix on S3 is a ``"folder"``)."""
    if location.startswith("hf://"):
        return "hf_hub"
    path, _ = _split_suffix(location)
    if any(c in location for c in _GLOB_CHARS):
        return "glob"
    if location.startswith("s3://"):
        last = location.rstrip("/").rsplit("/", 1)[-1]
        looks_like_file = not location.endswith("/") and "." in last and "=" not in last
        return "file" if looks_like_file else "folder"
    local = Path(path)
    if local.is_dir() and (_is_hf_folder(local)):
        return "hf_disk"
    if Path(location).is_dir():
        return "folder"
    return "file"


# ----------------------------------------------------------------------------------------------- the reader


class _Reader:
    """Accumulates normalised frames and the partition listing over the items of one location."""

    def __init__(self, columns: dict, *, store, settings, split: str):
        self.columns = columns
        self.store, self.settings, self.split = store, settings, split
        self.frames: list[pd.DataFrame] = []
        self.partitions: list[dict] = []
        self.total = 0
        self.row_offset = 0
        self.reference: tuple[str, list[str]] | None = None  # (path, columns) of the first partition
        self._fs = None

    def add(self, location: str) -> None:
        kind = location_kind(location)
        if kind == "file" and "://" not in location and not Path(location).exists() and "." not in Path(location).name:
            raise DataError(f"{location}: no such file or folder (looked for {Path(location).resolve()}). Check the "
                            f"path in data.train/data.test (relative paths are relative to the config file).")
        if kind == "file":
            self._one_file(location)
        elif kind in ("hf_disk", "hf_hub"):
            self._hf(location, kind)
        else:
            parts = self._list(location, kind)
            if not parts:
                what = "matches this glob" if kind == "glob" else "lies under this folder/prefix"
                raise DataError(
                    f"{location}: no data file ({', '.join(SUPPORTED_SUFFIXES)}) {what}. Check the path; "
                    f"names starting with '_' or '.' are skipped.")
            for part in parts:
                self._partition(part, location)

    # ---- one file: the unchanged single-file path

    def _one_file(self, location: str) -> None:
        frame = read_table(location, store=self.store)
        self._check_columns(location, [str(c) for c in frame.columns])
        prepared = prepare_frame(frame, source=location, **self.columns)
        del frame
        if location.startswith("s3://"):
            part = self._s3_object(location)
        else:
            path = Path(location).resolve()
            part = _Partition(str(path), path.stat().st_size, _sha256(path), {})
        self._record(part, _format_name(location), prepared)

    # ---- partitions of a lake

    def _partition(self, part: _Partition, location: str) -> None:
        keys = part.keys
        if part.path.lower().endswith(".parquet"):
            names, batches = self._parquet_batches(part)
            self._columns_of(part, location, names)
            frames, start = [], 0
            for batch in batches:
                frame = batch.to_pandas()
                frame.index = pd.RangeIndex(start, start + len(frame))
                start += len(frame)
                frames.append(prepare_frame(_with_keys(frame, keys), source=part.path, **self.columns))
            prepared = (pd.concat(frames) if len(frames) > 1 else frames[0]) if frames else _empty_frame()
        else:  # CSV/TSV/JSONL(.gz): the one-file reader, one partition in memory at a time
            frame = read_table(part.path, store=self.store)
            self._columns_of(part, location, [str(c) for c in frame.columns])
            frame = frame[[c for c in self._wanted() if c in frame.columns]]
            prepared = prepare_frame(_with_keys(frame, keys), source=part.path, **self.columns)
        self._record(part, _format_name(part.path), prepared)

    def _columns_of(self, part: _Partition, location: str, names: list[str]) -> None:
        """Check a partition's columns (file columns + Hive keys): no clash, same as the others, the needed ones."""
        clash = [k for k in part.keys if k in names]
        if clash:
            raise DataError(f"{part.path}: partition key(s) {', '.join(map(repr, clash))} are also columns of the "
                            f"file; rename the folder key or the column.")
        columns = names + list(part.keys)
        self._check_columns(part.path, columns)
        self._need_columns(location, columns)

    def _record(self, part: _Partition, fmt: str, prepared: pd.DataFrame) -> None:
        rows = len(prepared)
        span = int(prepared["row"].max()) if rows else 0
        prepared = prepared.assign(row=prepared["row"].to_numpy(dtype=np.int64) + self.row_offset)
        self.partitions.append({"path": part.path, "format": fmt, "size": part.size, "etag": part.etag,
                                "rows": rows, "row_offset": self.row_offset,
                                **({"keys": part.keys} if part.keys else {})})
        self.row_offset += span
        self.total += rows
        if rows:
            self.frames.append(prepared.reset_index(drop=True))

    def _wanted(self) -> list[str]:
        return [c for c in self.columns.values() if c is not None]

    def _check_columns(self, path: str, columns: list[str]) -> None:
        if self.reference is None:
            self.reference = (path, list(columns))
            return
        first, expected = self.reference
        missing = [c for c in expected if c not in columns]
        extra = [c for c in columns if c not in expected]
        if missing or extra:
            detail = "; ".join(part for part in (
                f"missing {', '.join(map(repr, missing))}" if missing else "",
                f"extra {', '.join(map(repr, extra))}" if extra else "") if part)
            raise DataError(
                f"{path}: its columns differ from the other partitions' ({detail}; {first} has "
                f"{', '.join(expected)}). Partitions of one source must share their columns: fix this partition "
                f"or leave it out of data.train/data.test.")

    def _need_columns(self, location: str, columns: list[str]) -> None:
        """The text/label/group columns must exist: the one-file message, naming the location."""
        if any(c not in columns for c in self._wanted()):
            prepare_frame(pd.DataFrame(columns=columns), source=location, **self.columns)  # raises DataError

    # ---- Parquet through pyarrow.dataset

    def _parquet_batches(self, part: _Partition):
        """The file's column names and an iterator over record batches of the needed ones."""
        import pyarrow as pa
        import pyarrow.dataset as ds

        s3 = part.path.startswith("s3://")
        fs = self._s3fs() if s3 else None
        path = part.path[len("s3://"):] if s3 else part.path
        try:
            dataset = ds.dataset(path, format="parquet", filesystem=fs)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise self._read_error(part.path, e, s3) from None
        # (a non-range index pandas stored as a column is not data)
        names = [n for n in dataset.schema.names if not n.startswith("__index_level_")]
        wanted = [c for c in self._wanted() if c in names and c not in part.keys]

        def batches() -> Iterator:
            try:
                yield from dataset.to_batches(columns=wanted, batch_size=BATCH_ROWS)
            except (pa.ArrowException, OSError, ValueError) as e:
                raise self._read_error(part.path, e, s3) from None

        return names, batches()

    def _read_error(self, path: str, error: Exception, s3: bool) -> Exception:
        import pyarrow as pa

        if s3 and isinstance(error, OSError) and not isinstance(error, pa.ArrowInvalid):
            from adaptflow.store import StoreError

            return StoreError(f"reading {path} failed: {error}")  # no HTTP answer: transient, retried
        return DataError(f"{path}: unreadable Parquet file ({error}). Check the upload is complete or export it "
                         f"again.")

    def _s3fs(self):
        if self._fs is None:
            self._fs = s3_filesystem(self.settings)
        return self._fs

    # ---- listing

    def _list(self, location: str, kind: str) -> list[_Partition]:
        if location.startswith("s3://"):
            from adaptflow.store import parse_s3_uri

            bucket, key = parse_s3_uri(location)
            if kind == "glob":
                base = _glob_base(key)
                objects = [o for o in self._s3_list(location, bucket, f"{base}/" if base else "")
                           if PurePosixPath("/" + o["Key"]).match("/" + key)]  # whole key, segment by segment
            else:
                base = key.rstrip("/")
                objects = self._s3_list(location, bucket, f"{base}/" if base else "")
            parts = []
            for obj in objects:
                relative = obj["Key"][len(base):].lstrip("/") if base else obj["Key"]
                if _skipped(relative):
                    continue
                uri = f"s3://{bucket}/{obj['Key']}"
                _check_suffix(uri, location)
                parts.append(_Partition(uri, int(obj["Size"]), str(obj.get("ETag", "")).strip('"'),
                                        _hive_keys(relative, uri), relative))
            return sorted(parts, key=lambda p: p.path)
        if kind == "glob":
            base = Path(_glob_base(location))
            paths = [Path(p) for p in globlib.glob(location, recursive=True)]
        else:
            base = Path(location)
            paths = list(base.rglob("*"))
        parts = []
        for path in sorted(p.resolve() for p in paths if p.is_file()):
            try:
                relative = path.relative_to(base.resolve()).as_posix()
            except ValueError:
                relative = path.name
            if _skipped(relative):
                continue
            _check_suffix(str(path), location)
            parts.append(_Partition(str(path), path.stat().st_size, _sha256(path), _hive_keys(relative, str(path)),
                                    relative))
        return parts

    def _s3_list(self, location: str, bucket: str, prefix: str) -> list[dict]:
        """Objects (Key, Size, ETag) whose key starts with ``prefix``; a missing bucket or a refused listing is
        bad input (DataError), an unreachable server stays a transient StoreError."""
        from botocore.exceptions import BotoCoreError, ClientError

        from adaptflow.store import AccessDeniedError, BucketNotFoundError

        if self.store is None:
            raise DataError(f"{location}: reading from S3 needs a store; pass store=ArtifactStore.from_settings(...).")
        store = self.store.with_bucket(bucket)
        try:
            pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return [obj for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
        except (ClientError, BotoCoreError) as exc:
            failure: Exception = exc
        try:  # the store's own listing translates the cause (missing bucket, refused, unreachable) the house way
            list(store.list_keys(prefix))
        except BucketNotFoundError as exc:
            raise DataError(f"{location}: {exc} Check the bucket name in the data path, and that "
                            f"AWS_ENDPOINT_URL_S3 points at the store that holds it.") from None
        except AccessDeniedError as exc:
            raise DataError(f"{location}: listing it was refused ({exc}). Check this identity may s3:ListBucket "
                            f"on {location}.") from None
        raise failure  # failed once, then listed fine: let the original error surface

    def _s3_object(self, uri: str) -> _Partition:
        from adaptflow.store import parse_s3_uri

        bucket, key = parse_s3_uri(uri)
        for obj in self._s3_list(uri, bucket, key):
            if obj["Key"] == key:
                return _Partition(uri, int(obj["Size"]), str(obj.get("ETag", "")).strip('"'), {})
        return _Partition(uri, 0, "", {})  # read a moment ago, gone now: the rows still count

    # ---- Hugging Face datasets

    def _hf(self, location: str, kind: str) -> None:
        import datasets

        target, split = _split_suffix(location)
        if kind == "hf_disk":
            try:
                loaded = datasets.load_from_disk(target)
            except (FileNotFoundError, ValueError, OSError) as e:
                raise DataError(f"{location}: not a readable datasets.save_to_disk folder ({e}).") from None
        else:  # a hub id: needs a reachable hub (not testable offline)
            repo = target[len("hf://"):]
            repo = repo[len("datasets/"):] if repo.startswith("datasets/") else repo
            try:
                loaded = datasets.load_dataset(repo, split=split or self.split)
            except (FileNotFoundError, ValueError) as e:
                raise DataError(f"{location}: cannot load Hugging Face dataset {repo!r} ({e}).") from None
        if isinstance(loaded, datasets.DatasetDict):
            name = split or self.split
            if name not in loaded:
                raise DataError(f"{location}: has splits {', '.join(loaded)}, not {name!r}; name one as "
                                f"{target}#<split>.")
            loaded = loaded[name]
        names = list(loaded.column_names)
        self._check_columns(location, names)
        self._need_columns(location, names)
        wanted = [c for c in self._wanted() if c in names]
        label_names = {c: loaded.features[c] for c in wanted if isinstance(loaded.features[c], datasets.ClassLabel)}
        frames, start = [], 0
        for table in loaded.select_columns(wanted).with_format("arrow").iter(batch_size=BATCH_ROWS):
            frame = table.to_pandas()
            for column, feature in label_names.items():  # ClassLabel ints → their names
                frame[column] = [None if v is None or v != v or v < 0 else feature.int2str(int(v))
                                 for v in frame[column].tolist()]
            frame.index = pd.RangeIndex(start, start + len(frame))
            start += len(frame)
            frames.append(prepare_frame(frame, source=location, **self.columns))
        prepared = (pd.concat(frames) if len(frames) > 1 else frames[0]) if frames else _empty_frame()
        files = sorted({Path(f["filename"]) for f in loaded.cache_files})
        digest = hashlib.sha256()
        for file in files:
            digest.update(_sha256(file).encode())
        self._record(_Partition(location, sum(f.stat().st_size for f in files), "sha256:" + digest.hexdigest(), {}),
                     "arrow", prepared)


# ----------------------------------------------------------------------------------------------- helpers


def s3_filesystem(settings):
    """A ``pyarrow.fs.S3FileSystem`` at the settings' endpoint with their credentials, path-style addressing.

    Any S3-compatible server works through ``settings.s3_endpoint_url`` alone (None: AWS itself).
    """
    from pyarrow import fs

    kwargs: dict = {"region": getattr(settings, "aws_region", None) or "us-east-1"}
    endpoint = getattr(settings, "s3_endpoint_url", None)
    if endpoint:
        parts = urlsplit(endpoint)
        kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/") if parts.scheme else endpoint
        kwargs["scheme"] = parts.scheme or "https"
        kwargs["force_virtual_addressing"] = False  # path-style: local servers do not resolve bucket DNS names
    if settings is not None and settings.aws_access_key_id:
        kwargs["access_key"] = settings.aws_access_key_id
        kwargs["secret_key"] = settings.secret_key
    return fs.S3FileSystem(**kwargs)


def _split_suffix(location: str) -> tuple[str, str | None]:
    """``"folder#test"`` → ``("folder", "test")`` (a Hugging Face split), else ``(location, None)``."""
    if "#" in location:
        target, split = location.rsplit("#", 1)
        if target.startswith("hf://") or _is_hf_folder(Path(target)):
            return target, split
    return location, None


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and ((path / _HF_DICT_MARKER).is_file() or all((path / m).is_file() for m in _HF_MARKERS))


def _glob_base(pattern: str) -> str:
    """The folders before the first segment holding a wildcard."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in _GLOB_CHARS):
            return "/".join(parts[:i])
    return "/".join(parts[:-1])


def _skipped(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.split("/"))


def _check_suffix(path: str, location: str) -> None:
    if not any(path.lower().endswith(s) for s in SUPPORTED_SUFFIXES):
        raise DataError(
            f"{path}: unsupported file type under {location}. Use {', '.join(SUPPORTED_SUFFIXES)} files, remove or "
            f"rename this one (names starting with '_' or '.' are skipped), or pick files with a glob.")


def _format_name(path: str) -> str:
    lower = path.lower()
    name = lower[:-3] if lower.endswith(".gz") else lower
    suffix = PurePosixPath(name).suffix.lstrip(".")
    return {"ndjson": "jsonl", "json": "jsonl"}.get(suffix, suffix) + (".gz" if lower.endswith(".gz") else "")


def _hive_keys(relative: str, path: str) -> dict[str, str]:
    """``dt=2026-11-30/region=eu/part-0.parquet`` → ``{"dt": "2026-11-30", "region": "eu"}`` (values unquoted)."""
    keys: dict[str, str] = {}
    for part in relative.split("/")[:-1]:
        if "=" in part:
            key, value = part.split("=", 1)
            key = unquote(key)
            if key in keys:
                raise DataError(f"{path}: partition key {key!r} appears twice in its folders.")
            keys[key] = unquote(value)
    return keys


def _with_keys(frame: pd.DataFrame, keys: dict[str, str]) -> pd.DataFrame:
    """The Hive keys as string columns."""
    if not keys:
        return frame
    return frame.assign(**{k: pd.Series([v] * len(frame), index=frame.index, dtype=object) for k, v in keys.items()})


def _empty_frame() -> pd.DataFrame:
    return pd.DataFrame({"text": pd.Series([], dtype=object), "label": pd.Series([], dtype=object),
                         "group": pd.Series([], dtype=object), "row": pd.Series([], dtype=np.int64)})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def partition_summary(partitions: Iterable[dict]) -> str:
    """``"3 partitions, 1,234 rows, 5.6 MB"`` for logs."""
    parts = list(partitions)
    return (f"{len(parts)} partition(s), {sum(p['rows'] for p in parts):,} rows, "
            f"{sum(p['size'] for p in parts) / 1e6:.1f} MB")


__all__ = ["SourceRows", "describe", "list_partitions", "location_kind", "partition_summary", "read_source",
           "s3_filesystem"]
