"""Batch scoring: a registered model labels the partitions of a lake, through the per-row embedding cache.

The model is scored from its version tags (head URI, encoder snapshot ref + digest, max_length, pooling, dtype;
see ``stages.register_stage``), not by loading its pyfunc: the vectors come from, and go into, the same cache
the retrain uses (``cache.EmbeddingCache``, keyed by encoder digest, max_length, pooling, dtype). Rows scored
tonight are not encoded again when they come back labelled tomorrow.

Layout, one published prefix per input partition (``relative`` is the partition's path below the input
location, its data suffix dropped)::

    <output>/model=<name>/version=<version>/<relative>/scored.parquet
    <output>/model=<name>/version=<version>/<relative>/_manifest.json   written last

A partition exists exactly when its ``_manifest.json`` does: on S3 through ``ArtifactStore.publish``, in a local
folder through a temp file renamed into place, then the manifest (also renamed into place). The manifest's
``meta.input`` records the input partition's path, size and ETag; a partition already published for the same
ETag is skipped, so a re-run writes nothing and a new model version writes under its own ``version=``.

Each row: the ``--keep-columns`` (Hive keys such as ``dt`` included), ``row`` (its position in the input file),
``label``, one ``proba_<class>`` per class (a multi-label model: also ``labels``, the list of labels at or
above their thresholds, and ``label`` its most probable one), ``reason`` (null, or why the row got no label:
missing or empty text), ``model_name``, ``model_version``, ``encoder_digest``, ``scored_at``.

Streaming: a partition at a time; Parquet partitions in record batches of ``CHUNK_ROWS`` rows, each chunk
tokenized (:func:`adaptflow.embed.tokenize_ragged`), looked up in the cache, its misses encoded with
:func:`adaptflow.embed.iter_encode` (length-sorted, token-budget batches) and written as cache shards, scored by
the head and appended to the partition's Parquet file. CSV/JSONL partitions are read whole (one at a time).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Literal
from urllib.parse import quote

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field, field_validator

from adaptflow.data import DataError, SUPPORTED_SUFFIXES, is_missing, normalise_text
from adaptflow.stages import StageContext
from adaptflow.store import MANIFEST, ConflictError, StoreError, parse_s3_uri, sha256_file

log = logging.getLogger("adaptflow")

DATA_OBJECT = "scored.parquet"
CHUNK_ROWS = 32_768  # rows per record batch: memory per chunk ~ rows x (text + 4 x hidden) bytes
SCORING_FORMAT = 1  # bump when the output's columns or layout change
OUTPUT_COLUMNS = ("row", "label", "reason", "model_name", "model_version", "encoder_digest", "scored_at")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
_VERSION_TAGS = ("adaptflow.head_uri", "adaptflow.encoder_ref", "adaptflow.encoder_digest", "adaptflow.max_length",
                 "adaptflow.pooling", "adaptflow.dtype", "adaptflow.labels")


class ScoreRequest(BaseModel):
    """What one scoring run does (the CLI's and the flow's arguments)."""

    model_uri: str
    input: str
    output: str
    text_column: str = "text"
    keep_columns: list[str] = Field(default_factory=list)
    on_bad_partition: Literal["fail", "skip"] = "fail"
    device: str = "auto"
    tokens_per_batch: int | None = None

    @field_validator("model_uri")
    @classmethod
    def _model_uri(cls, value: str) -> str:
        if not _MODEL_URI.match(value):
            raise ValueError(f"model URI {value!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        return value

    @field_validator("keep_columns")
    @classmethod
    def _keep(cls, value: list[str]) -> list[str]:
        value = [c.strip() for c in value if c.strip()]
        clash = [c for c in value if c in OUTPUT_COLUMNS or c.startswith("proba_")]
        if clash:
            raise ValueError(f"--keep-columns {', '.join(clash)}: these names are output columns of scoring "
                             f"({', '.join(OUTPUT_COLUMNS)}, proba_<class>); rename them in the input or leave "
                             f"them out")
        return list(dict.fromkeys(value))


@dataclass(frozen=True)
class ScoringModel:
    """A registered version as scoring needs it: everything comes from its version tags."""

    name: str
    version: str
    head_uri: str
    encoder_ref: str
    encoder_digest: str
    max_length: int
    pooling: str
    dtype: str
    labels: list[str] = field(default_factory=list)
    adapter_uri: str | None = None  # head.kind lora: the adapter merged into the encoder
    adapter_digest: str | None = None

    def cache_spec(self) -> dict:
        return dict(encoder_digest=self.encoder_digest, max_length=self.max_length, pooling=self.pooling,
                    dtype=self.dtype, adapter_digest=self.adapter_digest)

    def adapter(self) -> dict | None:
        return {"uri": self.adapter_uri, "digest": self.adapter_digest} if self.adapter_uri else None


def resolve_model(tracking_uri: str | None, model_uri: str) -> ScoringModel:
    """``models:/NAME@alias`` or ``models:/NAME/VERSION`` → the version's scoring tags (MlflowClient).

    Raises:
        ValueError: a malformed URI, an unknown model, alias or version, or a version without the tags.
    """
    from mlflow.exceptions import MlflowException

    from adaptflow.registry import client_for

    match = _MODEL_URI.match(model_uri)
    if not match:
        raise ValueError(f"model URI {model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    client = client_for(tracking_uri)
    name, alias = match["name"], match["alias"]
    try:
        version = (client.get_model_version_by_alias(name, alias) if alias
                   else client.get_model_version(name, match["version"]))
    except MlflowException as exc:
        if exc.get_http_status_code() == 404 or "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            raise ValueError(f"{model_uri}: no such registered model version ({exc.message})") from None
        raise
    tags = version.tags
    missing = [t for t in _VERSION_TAGS if t not in tags]
    if missing:
        raise ValueError(f"{model_uri} (version {version.version}) lacks the tags batch scoring needs "
                         f"({', '.join(missing)}): register it with `adaptflow retrain`")
    return ScoringModel(name=name, version=str(version.version), head_uri=tags["adaptflow.head_uri"],
                        encoder_ref=tags["adaptflow.encoder_ref"], encoder_digest=tags["adaptflow.encoder_digest"],
                        max_length=int(tags["adaptflow.max_length"]), pooling=tags["adaptflow.pooling"],
                        dtype=tags["adaptflow.dtype"], labels=list(json.loads(tags["adaptflow.labels"])),
                        adapter_uri=tags.get("adaptflow.adapter_uri"), adapter_digest=tags.get("adaptflow.adapter_digest"))


# ----------------------------------------------------------------------------------------------- output


def output_prefix(output: str, model: ScoringModel, relative: str) -> str:
    """Where one input partition's scores go: ``<output>/model=<name>/version=<v>/<relative minus suffix>``."""
    stem = relative
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return f"{output.rstrip('/')}/model={quote(model.name, safe='-_.')}/version={model.version}/{stem}"


class _Output:
    """Published partitions under an output location: S3 (the store's manifest-last publish) or a local folder."""

    def __init__(self, location: str, ctx: StageContext):
        self.location = location
        self.s3 = location.startswith("s3://")
        if self.s3:
            bucket, _ = parse_s3_uri(location)
            self.store = ctx.store.with_bucket(bucket)
            self.store.ensure_bucket()

    def _key(self, prefix: str) -> str:
        return parse_s3_uri(prefix)[1].strip("/")

    def manifest(self, prefix: str) -> dict | None:
        if self.s3:
            return self.store.read_manifest(self._key(prefix))
        path = Path(prefix) / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else None

    def temp_file(self, prefix: str) -> Path:
        """Where the Parquet file is written first: beside its final place locally (rename is atomic), else /tmp."""
        if self.s3:
            fd, name = tempfile.mkstemp(prefix="adaptflow-score-", suffix=".parquet")
        else:
            Path(prefix).mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=prefix, prefix=f".{DATA_OBJECT}.", suffix=".part")
        os.close(fd)
        return Path(name)

    def publish(self, prefix: str, data: Path, meta: dict) -> None:
        """Make ``data`` the partition's ``scored.parquet``, then write the manifest: visible only when complete."""
        if self.s3:
            try:
                self.store.publish(self._key(prefix), {DATA_OBJECT: data}, meta)
            except ConflictError:  # another run of the same version published it meanwhile: same rows
                log.info("scoring: %s was published meanwhile by another run", prefix)
            return
        folder = Path(prefix)
        if (folder / MANIFEST).exists():
            return
        sha, size = sha256_file(data)
        os.replace(data, folder / DATA_OBJECT)
        manifest = {"objects": {DATA_OBJECT: {"sha256": sha, "size": size}}, "meta": meta,
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        tmp = folder / f".{MANIFEST}.{uuid.uuid4().hex}.part"
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, folder / MANIFEST)


def list_scored(output: str, *, store=None) -> list[dict]:
    """The published scored partitions under ``output`` (any depth): ``{"prefix", "data", "meta"}`` each.

    Objects without a manifest (a write that crashed or is still running) are not listed: readers never see a
    half-written partition.
    """
    found = []
    if output.startswith("s3://"):
        if store is None:
            raise ValueError(f"{output}: listing S3 needs a store")
        bucket, key = parse_s3_uri(output)
        store = store.with_bucket(bucket)
        base = key.strip("/")
        for obj_key in store.list_keys(f"{base}/" if base else ""):
            if obj_key.endswith(f"/{MANIFEST}"):
                prefix = obj_key[: -len(MANIFEST) - 1]
                manifest = store.read_manifest(prefix)
                if manifest is not None and DATA_OBJECT in manifest["objects"]:
                    found.append({"prefix": f"s3://{bucket}/{prefix}", "data": f"s3://{bucket}/{prefix}/{DATA_OBJECT}",
                                  "meta": manifest["meta"]})
        return found
    for path in sorted(Path(output).rglob(MANIFEST)):
        manifest = json.loads(path.read_text())
        if DATA_OBJECT in manifest.get("objects", {}):
            found.append({"prefix": str(path.parent), "data": str(path.parent / DATA_OBJECT), "meta": manifest["meta"]})
    return found


def read_scored(output: str, *, store=None):
    """Every published scored partition under ``output`` as one pyarrow Table (S3 objects checked against their
    manifests); partitions without a manifest are left out."""
    import io

    import pyarrow.parquet as pq

    tables = []
    for part in list_scored(output, store=store):
        if part["data"].startswith("s3://"):
            bucket, key = parse_s3_uri(part["data"])
            tables.append(pq.read_table(io.BytesIO(store.with_bucket(bucket).get_verified_bytes(key))))
        else:
            tables.append(pq.read_table(part["data"]))
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


# ----------------------------------------------------------------------------------------------- input


def partition_batches(part: dict, ctx: StageContext, chunk_rows: int) -> Iterator[pa.Table]:
    """The partition's rows, every column plus its Hive keys, in tables of at most ``chunk_rows`` rows.

    Raises:
        DataError: the partition cannot be read (names it); a transient S3 fault stays a StoreError.
    """
    import pyarrow.dataset as ds

    from adaptflow.data import read_table
    from adaptflow.sources import s3_filesystem

    path, keys = part["path"], part.get("keys") or {}
    try:
        if path.lower().endswith(".parquet"):
            s3 = path.startswith("s3://")
            dataset = ds.dataset(path[len("s3://"):] if s3 else path, format="parquet",
                                 filesystem=s3_filesystem(ctx.settings) if s3 else None)
            names = [n for n in dataset.schema.names if not n.startswith("__index_level_")]
            batches = (pa.Table.from_batches([b]) for b in dataset.to_batches(columns=names, batch_size=chunk_rows))
            empty = dataset.schema.empty_table().select(names)
        else:  # CSV/TSV/JSONL(.gz): the one-file reader, the partition in memory at a time
            table = pa.Table.from_pandas(read_table(path, store=ctx.store), preserve_index=False)
            batches = (table.slice(start, chunk_rows) for start in range(0, table.num_rows, chunk_rows))
            empty = table.schema.empty_table()
        emitted = False
        for batch in batches:
            if batch.num_rows:
                emitted = True
                yield _with_keys(batch, keys, path)
        if not emitted:
            yield _with_keys(empty, keys, path)
    except DataError:
        raise
    except StoreError as exc:
        if exc.transient:
            raise
        raise DataError(f"{path}: cannot be read ({exc})") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        if path.startswith("s3://") and isinstance(exc, OSError) and not isinstance(exc, pa.ArrowInvalid):
            raise StoreError(f"reading {path} failed: {exc}") from None  # no HTTP answer: transient, retried
        raise DataError(f"{path}: unreadable partition ({exc}). Check the upload is complete or export it "
                        f"again.") from None


def _with_keys(table: pa.Table, keys: dict, path: str) -> pa.Table:
    for key, value in keys.items():
        if key in table.column_names:
            raise DataError(f"{path}: partition key {key!r} is also a column of the file; rename one of them.")
        table = table.append_column(key, pa.array([value] * table.num_rows, pa.string()))
    return table


# ----------------------------------------------------------------------------------------------- scoring


@dataclass
class _Counters:
    rows: int = 0
    bad_rows: int = 0
    encoded: int = 0  # distinct texts encoded in this run
    cached: int = 0  # distinct texts (per chunk) read from the cache
    tokens: int = 0  # tokens encoded
    encode_seconds: float = 0.0  # forward passes + cache shard writes, as the embed stage counts them


class _Scorer:
    """One model's head, cache and (lazily loaded) encoder, applied chunk by chunk."""

    def __init__(self, ctx: StageContext, model: ScoringModel, request: ScoreRequest, device: str, sample=None):
        from adaptflow.cache import EmbeddingCache
        from adaptflow.embed import resolve_dtype
        from adaptflow.heads import load_head
        from adaptflow.multilabel import load_thresholds

        self.ctx, self.model, self.request, self.device = ctx, model, request, device
        self.sample = sample  # a drift_check.TextSample fed with every scored text, or None
        resolve_dtype(model.dtype, device)  # a tag this code cannot encode in fails here, not mid-run
        self.cache = EmbeddingCache(ctx.store, **model.cache_spec())
        with tempfile.TemporaryDirectory() as tmp:
            bucket, key = parse_s3_uri(model.head_uri)  # the version may come from another bucket
            head_path = ctx.store.with_bucket(bucket).get_verified_file(key, Path(tmp) / "head.safetensors")
            self.head, self.labels = load_head(head_path)
            self.thresholds = load_thresholds(head_path)  # a multi-label head's; None for one label per row
        self.dim = int(self.head.in_dim)
        self._encoder = None
        self.counters = _Counters()

    def encoder(self):
        if self._encoder is None:
            from adaptflow.stages import load_stage_encoder

            # the version's own snapshot, verified against the digest its cache is keyed on
            self._encoder = load_stage_encoder(self.ctx, {"ref": self.model.encoder_ref,
                                                          "digest": self.model.encoder_digest}, device=self.device,
                                               adapter=self.model.adapter())
        return self._encoder

    def vectors(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(vectors of the distinct texts, index of each text's distinct row): cache hits read, misses encoded."""
        from adaptflow.cache import text_sha256
        from adaptflow.embed import iter_encode, tokenize_ragged

        hashes = [text_sha256(t) for t in texts]
        _, first, inverse = np.unique(np.asarray(hashes, dtype="S64"), return_index=True, return_inverse=True)
        unique = [hashes[i] for i in first]
        vectors = np.empty((len(unique), self.dim), dtype=np.float32)
        if not unique:
            return vectors, inverse
        self.cache.verify(unique)  # a corrupt shard is marked and left out: its rows count as missing
        missing = set(self.cache.missing(unique))
        todo = np.fromiter((h in missing for h in unique), dtype=bool, count=len(unique))
        hit, miss = np.flatnonzero(~todo), np.flatnonzero(todo)
        if len(hit):
            vectors[hit] = self.cache.read([unique[i] for i in hit])
        if len(miss):
            tokenizer, model = self.encoder()
            ids = tokenize_ragged(tokenizer, [texts[first[i]] for i in miss], self.model.max_length)
            miss_hashes = np.asarray([unique[i] for i in miss], dtype=object)
            started, stats = time.perf_counter(), {}
            for idx, vec in iter_encode(model, ids, pooling=self.model.pooling, dtype=self.model.dtype,
                                        device=self.device, tokens_per_batch=self.request.tokens_per_batch,
                                        progress=False, stats=stats):
                self.cache.write_shard(list(miss_hashes[idx]), vec)
                vectors[miss[idx]] = vec
            self.counters.encode_seconds += time.perf_counter() - started
            self.counters.tokens += int(len(ids.values))
        self.counters.encoded += len(miss)
        self.counters.cached += len(hit)
        return vectors, inverse

    def check(self, table: pa.Table, source: str) -> None:
        """The text column and the kept columns must be there (DataError naming the partition)."""
        request = self.request
        if request.text_column not in table.column_names:
            raise DataError(f"{source}: no text column {request.text_column!r} (columns: "
                            f"{', '.join(table.column_names)}); pass --text-column")
        absent = [c for c in request.keep_columns if c not in table.column_names]
        if absent:
            raise DataError(f"{source}: --keep-columns {', '.join(absent)} not found (columns: "
                            f"{', '.join(table.column_names)})")

    def score(self, chunks: list[tuple[pa.Table, int]], *, scored_at: datetime) -> list[pa.Table]:
        """Checked chunks of input rows, each with the input-file position of its first row → their output rows.

        All chunks share one cache lookup and one encoder pass (small partitions are scored together).
        """
        from adaptflow.heads import predict_proba
        from adaptflow.multilabel import predict_sigmoid

        raw = [v for table, _ in chunks for v in table.column(self.request.text_column).to_pylist()]
        n = len(raw)
        texts = [normalise_text(v) if isinstance(v, str) or is_missing(v) else None for v in raw]
        reasons = [None if t else ("missing text" if is_missing(v) else "empty text" if isinstance(v, str)
                                   else f"text is a {type(v).__name__}, not a string")
                   for t, v in zip(texts, raw)]
        good = np.fromiter((r is None for r in reasons), dtype=bool, count=n)
        good_rows = np.flatnonzero(good)
        if self.sample is not None:
            self.sample.add(texts[i] for i in good_rows)
        vectors, inverse = self.vectors([texts[i] for i in good_rows])
        proba = np.full((n, len(self.labels)), np.nan)
        label_index = np.zeros(n, dtype=np.int64)
        if len(good_rows):
            p = (predict_proba if self.thresholds is None else predict_sigmoid)(self.head, vectors)[inverse]
            proba[good_rows], label_index[good_rows] = p, p.argmax(axis=1)
        if self.thresholds is not None:  # multi-label: `labels` lists the labels at or above their thresholds
            chosen = proba >= np.asarray(self.thresholds)  # NaN rows (no text) choose none; masked below
        names = np.asarray(self.labels, dtype=object)
        self.counters.rows += n
        self.counters.bad_rows += int(n - len(good_rows))
        out, offset = [], 0
        for table, start_row in chunks:
            rows, k = slice(offset, offset + table.num_rows), table.num_rows
            offset += k
            missing = ~good[rows]
            columns = {c: table.column(c) for c in self.request.keep_columns}
            columns["row"] = pa.array(np.arange(start_row, start_row + k, dtype=np.int64))
            columns["label"] = pa.array(names[label_index[rows]], pa.string(), mask=missing)
            if self.thresholds is not None:
                columns["labels"] = pa.array([None if m else names[c].tolist() for m, c in zip(missing, chosen[rows])],
                                             pa.list_(pa.string()))
            for j, name in enumerate(self.labels):
                columns[f"proba_{name}"] = pa.array(proba[rows, j], pa.float64(), mask=missing)
            columns["reason"] = pa.array(reasons[rows], pa.string())
            columns["model_name"] = pa.array([self.model.name] * k, pa.string())
            columns["model_version"] = pa.array([self.model.version] * k, pa.string())
            columns["encoder_digest"] = pa.array([self.model.encoder_digest] * k, pa.string())
            columns["scored_at"] = pa.array([scored_at] * k, pa.timestamp("us", tz="UTC"))
            out.append(pa.table(columns))
        return out


def score_location(ctx: StageContext, request: ScoreRequest, model: ScoringModel | None = None, *,
                   chunk_rows: int = CHUNK_ROWS, sample=None) -> dict:
    """Score every partition of ``request.input`` with ``request.model_uri`` into ``request.output``.

    Partitions already published for this model version and input ETag are skipped; an unreadable partition
    fails the run (DataError naming it) or, with ``on_bad_partition="skip"``, is left out and listed.
    ``sample`` (an ``adaptflow.drift_check.TextSample``) receives every scored text: the drift check's new rows.

    Returns:
        The summary: model, partitions scored / skipped / bad, rows, embeddings encoded vs from cache, rows/s,
        tokens/s and the output prefixes written.
    """
    import pyarrow.parquet as pq

    from adaptflow.sources import list_partitions, location_kind

    started = time.perf_counter()
    if location_kind(request.input) in ("hf_disk", "hf_hub"):
        raise DataError(f"{request.input}: a Hugging Face dataset; scoring reads a file, a folder or prefix of "
                        f"partitions, or a glob")
    model = model or resolve_model(ctx.settings.mlflow_tracking_uri, request.model_uri)
    partitions = list_partitions(request.input, store=ctx.store)
    if not partitions:
        raise DataError(f"{request.input}: no data file ({', '.join(SUPPORTED_SUFFIXES)}) there. Check the path; "
                        f"names starting with '_' or '.' are skipped.")
    output = _Output(request.output, ctx)
    device = request.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer: _Scorer | None = None
    scored_at = datetime.now(timezone.utc)
    written, skipped, bad = [], [], []
    pending: list[tuple[dict, str, pa.Table]] = []  # small partitions read, waiting to be scored together

    def left_out(part: dict, problem: DataError) -> None:
        if request.on_bad_partition == "fail":
            flush()  # the good partitions read before it are published: a re-run resumes after them
            raise problem
        log.warning("scoring: partition left out (--on-bad-partition skip): %s", problem)
        bad.append({"path": part["path"], "reason": str(problem)})

    def write(part: dict, prefix: str, tables: Iterator[pa.Table]) -> None:
        """Score ``tables`` (scored already, or to score a chunk at a time) into the partition's Parquet file."""
        tmp, writer, rows = output.temp_file(prefix), None, 0
        try:
            for out in tables:
                writer = writer or pq.ParquetWriter(tmp, out.schema)
                writer.write_table(out)
                rows += out.num_rows
            writer.close()
            writer = None
            output.publish(prefix, tmp, {
                "input": {"path": part["path"], "size": part["size"], "etag": part["etag"]}, "rows": rows,
                "model_name": model.name, "model_version": model.version, "encoder_digest": model.encoder_digest,
                "labels": scorer.labels, "format": SCORING_FORMAT, "scored_at": scored_at.isoformat(timespec="seconds")})
            written.append(prefix)
        finally:
            if writer is not None:
                writer.close()
            tmp.unlink(missing_ok=True)

    def flush() -> None:
        if pending and scorer is not None:
            outs = scorer.score([(table, 0) for _, _, table in pending], scored_at=scored_at)
            for (part, prefix, _), out in zip(pending, outs):
                write(part, prefix, iter([out]))
            pending.clear()

    def streamed(part: dict, chunks: Iterator[pa.Table]) -> Iterator[pa.Table]:
        start = 0
        for table in chunks:
            scorer.check(table, part["path"])
            yield scorer.score([(table, start)], scored_at=scored_at)[0]
            start += table.num_rows

    for part in partitions:
        prefix = output_prefix(request.output, model, part["relative"])
        done = output.manifest(prefix)
        if done is not None:
            if done["meta"].get("input", {}).get("etag") == part["etag"]:
                skipped.append(prefix)
            else:
                left_out(part, DataError(
                    f"{part['path']}: changed since version {model.version} scored it into {prefix} (ETag "
                    f"{done['meta'].get('input', {}).get('etag')} then, {part['etag']} now); remove that prefix to "
                    f"score the partition again"))
            continue
        scorer = scorer or _Scorer(ctx, model, request, device, sample)
        counted = (scorer.counters.rows, scorer.counters.bad_rows)
        try:
            chunks = partition_batches(part, ctx, chunk_rows)
            first = next(chunks)
            scorer.check(first, part["path"])
            second = next(chunks, None)
            if second is None and first.num_rows < chunk_rows:  # a small partition: scored with the next ones
                pending.append((part, prefix, first))
                if sum(t.num_rows for _, _, t in pending) >= chunk_rows:
                    flush()
                continue
            flush()  # keep memory to one chunk's worth of rows
            counted = (scorer.counters.rows, scorer.counters.bad_rows)
            write(part, prefix, streamed(part, itertools.chain([first] if second is None else [first, second],
                                                               chunks)))
        except DataError as exc:
            scorer.counters.rows, scorer.counters.bad_rows = counted  # a partition left out counts no rows
            left_out(part, exc)
    if scorer is not None:
        flush()
    seconds = time.perf_counter() - started
    c = scorer.counters if scorer else _Counters()
    summary = {
        "model_uri": request.model_uri, "model_name": model.name, "model_version": model.version,
        "input": request.input, "output": request.output,
        "partitions": {"total": len(partitions), "scored": len(written), "skipped": len(skipped), "bad": len(bad)},
        "rows": c.rows, "bad_rows": c.bad_rows,
        "embeddings": {"encoded": c.encoded, "cached": c.cached, "dtype": model.dtype, "device": device,
                       "tokens": c.tokens,
                       "tokens_per_s": round(c.tokens / c.encode_seconds, 1) if c.encode_seconds else None},
        "rows_per_s": round(c.rows / seconds, 1) if c.rows else None,
        "seconds": round(seconds, 3),
        "written": written, "skipped": skipped, "bad_partitions": bad,
    }
    log.info("scoring %s v%s: %d partition(s) scored, %d skipped, %d bad; %d rows (%d without text); %d texts "
             "encoded (%s tokens/s), %d from cache", model.name, model.version, len(written), len(skipped), len(bad),
             c.rows, c.bad_rows, c.encoded, summary["embeddings"]["tokens_per_s"], c.cached)
    return summary


def model_dict(model: ScoringModel) -> dict:
    """A ScoringModel as JSON (between flow tasks)."""
    return asdict(model)


def model_from_dict(data: dict) -> ScoringModel:
    """The ScoringModel in ``data`` (what :func:`model_dict` made; other keys, e.g. a task's ``seconds``, ignored)."""
    return ScoringModel(**{f.name: data[f.name] for f in fields(ScoringModel) if f.name in data})


__all__ = ["CHUNK_ROWS", "DATA_OBJECT", "ScoreRequest", "ScoringModel", "list_scored", "model_dict", "model_from_dict",
           "output_prefix", "partition_batches", "read_scored", "resolve_model", "score_location"]
