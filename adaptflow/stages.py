"""The retraining stages as plain functions over URIs: what each Prefect task runs, testable without Prefect.

Every stage reads its inputs from the artifact store, writes its outputs under a key derived from everything
that determines them (input digests, settings, the stage's code version), and returns a small JSON-able dict.
An output whose manifest already exists is reused, so re-running an unchanged stage is a lookup, and a key that
covers all inputs cannot produce a stale hit. Objects are published first, the manifest last.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from adaptflow.config import RunConfig
from adaptflow.devices import resolve_device
from adaptflow.settings import Settings, load_settings
from adaptflow.store import ArtifactStore, ConflictError

log = logging.getLogger("adaptflow")

# Bump a stage's version when its code changes what it writes: old outputs then stop matching.
STAGE_VERSIONS = {"ingest": 3, "validate": 2, "tokenize": 2, "train": 2, "evaluate": 2, "lineage": 1}


@dataclass
class StageContext:
    """Settings and the artifact store every stage works against."""

    settings: Settings
    store: ArtifactStore

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> "StageContext":
        settings = settings or load_settings()
        store = ArtifactStore.from_settings(settings)
        store.ensure_bucket()
        return cls(settings, store)


def stage_key(stage: str, **inputs) -> str:
    """A content key for a stage's output: sha256 over the stage, its code version and its inputs."""
    payload = json.dumps({"stage": stage, "version": STAGE_VERSIONS.get(stage, 0), **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _publish_once(ctx: StageContext, prefix: str, objects: dict, meta: dict) -> dict:
    """Publish unless an identical output is already complete; return the manifest's meta."""
    try:
        return ctx.store.publish(prefix, objects, meta)["meta"]
    except ConflictError:  # someone (an earlier attempt, a concurrent run) finished it first: same key, same content
        return ctx.store.read_manifest(prefix)["meta"]


def _cached(ctx: StageContext, prefix: str) -> dict | None:
    manifest = ctx.store.read_manifest(prefix)
    return None if manifest is None else manifest["meta"]


def read_columns(ctx: StageContext, uri: str, columns: list[str]):
    """Some columns of a stage's Parquet output as a pyarrow Table (checked against its manifest): strings stay
    in Arrow buffers, with no Python object per row."""
    import pyarrow.parquet as pq

    from adaptflow.store import parse_s3_uri

    return pq.read_table(io.BytesIO(ctx.store.get_verified_bytes(parse_s3_uri(uri)[1])), columns=columns)


def read_frame(ctx: StageContext, uri: str) -> pd.DataFrame:
    """A stage's Parquet output as a DataFrame, checked against its manifest."""
    from adaptflow.data import read_parquet_bytes
    from adaptflow.store import parse_s3_uri

    return read_parquet_bytes(ctx.store.get_verified_bytes(parse_s3_uri(uri)[1]))  # checked against its manifest


# ---------------------------------------------------------------------------------------------- encoder


def resolve_encoder_stage(ctx: StageContext, config: RunConfig) -> dict:
    """Resolve the encoder once and pin it as a content-addressed S3 snapshot: every later stage, on whichever
    machine, loads exactly that snapshot by ``ref`` + ``digest`` (and refuses other files); max_length is checked
    against the encoder's limit."""
    from adaptflow.encoders import encoder_max_length, load_encoder, pin_encoder, resolve_encoder

    resolved = resolve_encoder(config.encoder.ref, store=ctx.store, cache_dir=ctx.settings.cache_dir)
    tokenizer, model = load_encoder(resolved)  # a broken encoder fails here, before anything is written
    limit = encoder_max_length(tokenizer, model)
    if config.encoder.max_length > limit:
        raise ValueError(
            f"encoder.max_length={config.encoder.max_length} exceeds what encoder {config.encoder.ref} supports "
            f"({limit} positions); set encoder.max_length to at most {limit}"
        )
    pinned = pin_encoder(resolved, ctx.store, cache_dir=ctx.settings.cache_dir)  # later stages load this copy
    return {"ref": pinned, "digest": resolved.digest, "source_ref": config.encoder.ref,
            "hidden_size": int(model.config.hidden_size), "max_positions": limit}


def load_stage_encoder(ctx: StageContext, encoder: dict, *, device: str = "cpu", adapter: dict | None = None):
    """(tokenizer, model) of the resolve stage's snapshot, verified against its digest before anything is written.

    ``adapter`` (``{"uri", "digest"}`` of a LoRA adapter file, adaptflow.adapters) is checked against its digest
    and merged into a copy of the model (the shared snapshot stays frozen).
    """
    from adaptflow.encoders import load_encoder, resolve_expected

    resolved = resolve_expected(encoder["ref"], encoder["digest"], store=ctx.store, cache_dir=ctx.settings.cache_dir)
    tokenizer, model = load_encoder(resolved, device=device)
    if adapter is None:
        return tokenizer, model
    from adaptflow.adapters import adapter_digest, merge_adapter
    from adaptflow.store import parse_s3_uri

    with tempfile.TemporaryDirectory() as tmp:
        bucket, key = parse_s3_uri(adapter["uri"])  # a registered version may come from another bucket
        path = ctx.store.with_bucket(bucket).get_verified_file(key, Path(tmp) / "adapter.safetensors")
        if adapter_digest(path) != adapter["digest"]:
            raise ValueError(f"adapter {adapter['uri']} has digest {adapter_digest(path)}, not the recorded "
                             f"{adapter['digest']}: refusing to encode with it")
        return tokenizer, merge_adapter(model, path).to(device)


# ---------------------------------------------------------------------------------------------- data


def ingest_stage(ctx: StageContext, config: RunConfig) -> dict:
    """Read, normalise and split the source data; snapshot train/test as Parquet under their content digest.

    ``data.train``/``data.test`` may be a file, a folder/prefix of partitions, a glob, a Hugging Face dataset or
    a list (``adaptflow.sources``); the manifest lists every partition read (path, size, ETag, rows), and the
    snapshot's key covers that listing as well as the rows' digest.
    """
    from adaptflow.data import frame_digest, to_parquet_bytes
    from adaptflow.sources import describe, partition_summary, read_source
    from adaptflow.split import split_frame, split_shares

    d = config.data
    columns = dict(text_column=d.text_column, label_column=d.label_column, group_column=d.group_column)
    source = dict(store=ctx.store, settings=ctx.settings)
    by_time = d.split == "time" and not d.test
    read = read_source(d.train, split="train", **columns, **source, time_column=d.time_column if by_time else None)
    train, partitions = read.frame, {"train": read.partitions, "test": []}
    del read  # the frame is held once (as ``train``), so the split below can let go of it
    if d.test:
        read = read_source(d.test, split="test", **columns, **source)
        test, partitions["test"] = read.frame, read.partitions
        del read
    else:
        train, test = split_frame(train, test_size=d.test_size, seed=config.seed, method=d.split,
                                  source=describe(d.train))
    task = resolve_task(config, train, test)
    if task == "multilabel":
        from adaptflow.multilabel import canonical_labels, split_shares as label_shares

        for frame, source in ((train, d.train), (test, d.test or d.train)):
            frame["label"] = canonical_labels(frame["label"], frame["row"].tolist(), delimiter=d.label_delimiter,
                                              source=describe(source))
        shares = label_shares(train, test)
    else:
        shares = split_shares(train, test)
    log.info("ingest: train %s; test %s", partition_summary(partitions["train"]),
             partition_summary(partitions["test"]) if d.test else
             f"{d.split} split of train: test share {shares['test']:.2%} (test_size {d.test_size:.0%}), by label "
             + ", ".join(f"{k} {v:.1%}" for k, v in shares["test_by_label"].items()))
    digest = frame_digest(pd.concat([train.assign(split="train"), test.assign(split="test")], ignore_index=True))
    prefix = f"snapshots/{stage_key('ingest', digest=digest, partitions=partitions)}"
    meta = _cached(ctx, prefix) or _publish_once(
        ctx, prefix,
        {"train.parquet": to_parquet_bytes(train), "test.parquet": to_parquet_bytes(test)},
        {"digest": digest, "sources": [describe(d.train), describe(d.test)], "partitions": partitions,
         "rows": {"train": len(train), "test": len(test)}, "split": None if d.test else d.split, "shares": shares,
         "task": task},
    )
    return {"snapshot": ctx.store.uri(prefix), **meta,
            "train": ctx.store.uri(f"{prefix}/train.parquet"), "test": ctx.store.uri(f"{prefix}/test.parquet")}


def resolve_task(config: RunConfig, train: pd.DataFrame, test: pd.DataFrame) -> str:
    """``config.task``, or when unset, ``multilabel`` if the label column holds label lists (logged), else
    ``multiclass``."""
    from adaptflow.data import DataError
    from adaptflow.multilabel import inferred_task

    if config.task == "multilabel":
        return config.task
    why = inferred_task(pd.concat([train["label"], test["label"]]), config.data.label_delimiter)
    if config.task == "multiclass" and why and "list" in why:
        raise DataError(f"task is multiclass but {why} (label sets, e.g. {train['label'].dropna().iloc[0]}); "
                        f"set task: multilabel, or give one label per row")
    if config.task == "multiclass" or why is None:
        return "multiclass"
    log.info("task inferred: multilabel (%s); set task: multilabel or task: multiclass to say so", why)
    return "multilabel"


def task_of(stage_output: dict) -> str:
    """The task a snapshot/validated/head output was made for (outputs from before multi-label: multiclass)."""
    return stage_output.get("task") or "multiclass"


def validate_stage(ctx: StageContext, config: RunConfig, snapshot: dict) -> dict:
    """Apply the validation rules; clean rows and quarantined rows (with reasons) go to the store."""
    from adaptflow.data import frame_digest, to_parquet_bytes
    from adaptflow.validate import ValidationRules, validate_split

    task = task_of(snapshot)
    if task == "multilabel":
        from adaptflow.multilabel import MultilabelRules, validate_multilabel

        rules = MultilabelRules(min_class_count=config.data.min_class_count,
                                max_quarantine_fraction=config.data.max_quarantine_fraction,
                                label_case=config.data.label_case, empty_labels=config.data.empty_labels)
        validate, key = validate_multilabel, {"rules": vars(rules), "task": task}
    else:
        rules = ValidationRules(min_class_count=config.data.min_class_count,
                                max_quarantine_fraction=config.data.max_quarantine_fraction,
                                label_case=config.data.label_case)
        validate, key = validate_split, {"rules": vars(rules)}
    prefix = f"validated/{stage_key('validate', snapshot=snapshot['digest'], **key)}"
    meta = _cached(ctx, prefix)
    if meta is None:
        source = ", ".join(s for s in snapshot["sources"] if s)
        result = validate(read_frame(ctx, snapshot["train"]), read_frame(ctx, snapshot["test"]),
                          rules=rules, source=source)
        if result.report.get("labels_without_test_rows"):  # multi-label: the hash split stratifies in expectation only
            log.warning("validate: label(s) %s have no test rows: their test scores are 0 (grow the data or "
                        "test_size)", ", ".join(result.report["labels_without_test_rows"]))
        meta = _publish_once(ctx, prefix, {
            "train.parquet": to_parquet_bytes(result.train),
            "test.parquet": to_parquet_bytes(result.test),
            "quarantine.parquet": to_parquet_bytes(result.quarantine),
            "report.json": json.dumps(result.report, indent=2, default=str).encode(),
        }, {"digest": frame_digest(pd.concat([result.train, result.test], ignore_index=True)),
            "labels": result.labels, "rows": {"train": len(result.train), "test": len(result.test),
                                              "quarantined": len(result.quarantine)},
            "report": result.report, "task": task})
    return {"validated": ctx.store.uri(prefix), **meta,
            **{name: ctx.store.uri(f"{prefix}/{name}.parquet") for name in ("train", "test", "quarantine")}}


# ---------------------------------------------------------------------------------------------- text → vectors


TOKENS_ROW_GROUP = 1 << 17  # rows per row group of tokens.parquet: the embed stage encodes one at a time


def tokenize_stage(ctx: StageContext, config: RunConfig, validated: dict, encoder: dict) -> dict:
    """Tokenize each distinct text once (truncated, unpadded); store ids keyed by the text's sha256.

    Streams: texts stay in Arrow buffers, row keys are 32-byte digests (``adaptflow.row_keys``), and ids are
    written as ``list<int32>`` row groups of ``TOKENS_ROW_GROUP`` texts as they are made, so the stage holds
    one row group of ids (4 bytes a token), never a Python object per row: flat in the dataset's size.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from adaptflow.embed import tokenize_ragged
    from adaptflow.row_keys import first_seen, hex_column, text_digests

    prefix = f"tokens/{stage_key('tokenize', data=validated['digest'], encoder=encoder['digest'], max_length=config.encoder.max_length)}"
    meta = _cached(ctx, prefix)
    if meta is None:
        texts = pa.chunked_array([chunk for name in ("train", "test") for chunk in
                                  read_columns(ctx, validated[name], ["text"]).column("text").cast(pa.large_string()).chunks],
                                 type=pa.large_string())
        digests = text_digests(texts)
        distinct = first_seen(digests)  # one row per distinct text, in first-seen order
        texts, digests = texts.take(distinct), digests[distinct]
        tokenizer, _ = load_stage_encoder(ctx, encoder)
        started, total = time.perf_counter(), 0
        schema = pa.schema([("text_sha256", pa.string()), ("ids", pa.list_(pa.int32()))])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tokens.parquet"
            with pq.ParquetWriter(path, schema) as writer:
                for start in range(0, len(texts), TOKENS_ROW_GROUP):
                    ids = tokenize_ragged(tokenizer, texts.slice(start, TOKENS_ROW_GROUP).to_pylist(),
                                          config.encoder.max_length)
                    total += int(len(ids.values))
                    writer.write_table(pa.table({"text_sha256": hex_column(digests[start : start + len(ids)]),
                                                 "ids": ids.to_arrow().cast(pa.list_(pa.int32()))}, schema=schema),
                                       row_group_size=TOKENS_ROW_GROUP)
                if len(texts) == 0:
                    writer.write_table(schema.empty_table())
            log.info("tokenized %d texts, %d tokens in %.2fs", len(texts), total, time.perf_counter() - started)
            meta = _publish_once(ctx, prefix, {"tokens.parquet": path}, {"rows": len(texts), "n_tokens": total})
    return {"tokens": ctx.store.uri(f"{prefix}/tokens.parquet"), **meta}


def _cache_for(ctx: StageContext, config: RunConfig, encoder: dict, dtype: str, adapter: dict | None = None):
    from adaptflow.cache import EmbeddingCache

    return EmbeddingCache(ctx.store, encoder_digest=encoder["digest"], max_length=config.encoder.max_length,
                          pooling=config.encoder.pooling, dtype=dtype,
                          adapter_digest=adapter["digest"] if adapter else None)


def head_adapter(head: dict | None) -> dict | None:
    """The ``{"uri", "digest"}`` of a train stage output's LoRA adapter (None: a head on the frozen encoder)."""
    return {"uri": head["adapter"], "digest": head["adapter_digest"]} if head and head.get("adapter") else None


def encode_missing(ctx: StageContext, cache, texts, *, encoder_ref: str, adapter: dict | None = None,
                   device: str = "cpu") -> int:
    """Encode the ``texts`` (a list, pandas Series or Arrow column) ``cache`` lacks, with its encoder (and
    ``adapter`` merged when the cache is an adapted encoder's); returns how many distinct texts were encoded."""
    import pyarrow as pa

    from adaptflow.embed import tokenize_ragged
    from adaptflow.row_keys import first_seen, text_digests

    digests = text_digests(texts)
    todo = np.flatnonzero(~cache.found(digests))
    if len(todo) == 0:
        return 0
    todo = todo[first_seen(digests[todo])]
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        todo_texts = texts.take(todo).to_pylist()
    else:
        todo_texts = [texts.iloc[i] if isinstance(texts, pd.Series) else texts[i] for i in todo]
    tokenizer, _ = load_stage_encoder(ctx, {"ref": encoder_ref, "digest": cache.spec["encoder_digest"]})
    ids = tokenize_ragged(tokenizer, todo_texts, cache.spec["max_length"])
    encode_into_cache(ctx, cache, [(digests[todo], ids)], encoder_ref=encoder_ref, device=device, adapter=adapter)
    return len(todo)


def embed_device(config: RunConfig) -> str:
    """The device the embed step uses on this machine (``encoder.device``; auto: CUDA when present)."""
    return resolve_device(config.encoder.device)


def embed_cache(ctx: StageContext, config: RunConfig, encoder: dict):
    """The embedding cache the embed stage fills on this machine (dtype resolved for its device)."""
    from adaptflow.embed import resolve_dtype

    return _cache_for(ctx, config, encoder, resolve_dtype(config.encoder.dtype, embed_device(config)))


def encode_into_cache(ctx: StageContext, cache, windows, *, encoder_ref: str, device: str,
                      tokens_per_batch: int | None = None, adapter: dict | None = None) -> float | None:
    """Encode rows and write them to ``cache`` one shard per chunk (a crash loses at most one chunk).

    ``windows`` yields ``(digests, token_ids)`` pairs: ``S32`` row keys (``adaptflow.row_keys``; hex strings
    are accepted too) and a :class:`~adaptflow.embed.TokenIds` (or id lists), one per key. Each window is
    length-sorted and encoded on its own, so only one window's ids need be in memory. The encoder at
    ``encoder_ref`` must be the snapshot the cache is keyed on (its digest is checked before anything is
    encoded), and pooling and dtype are the cache's own: vectors can only land under the key that describes them.
    ``adapter`` must be the one the cache is keyed on (or None for a frozen encoder's cache).

    Returns:
        tokens/s of the forward passes, or None when there was nothing to encode.
    """
    from adaptflow.cache_index import to_digests
    from adaptflow.embed import TokenIds, iter_encode

    if (adapter or {}).get("digest") != cache.spec.get("adapter_digest"):
        raise ValueError(f"adapter {(adapter or {}).get('digest')} is not the one cache {cache.uri} is keyed on "
                         f"({cache.spec.get('adapter_digest')})")
    model, n_tokens, seconds = None, 0, 0.0
    pooling, dtype = cache.spec["pooling"], cache.spec["dtype"]
    for hashes, token_ids in windows:
        if len(hashes) == 0:
            continue
        if model is None:  # loaded once, and only when there is something to encode
            _, model = load_stage_encoder(ctx, {"ref": encoder_ref, "digest": cache.spec["encoder_digest"]},
                                          device=device, adapter=adapter)
        digests = to_digests(hashes)
        started = time.perf_counter()
        n_tokens += len(token_ids.values) if isinstance(token_ids, TokenIds) else sum(map(len, token_ids))
        for indices, vectors in iter_encode(model, token_ids, pooling=pooling, dtype=dtype, device=device,
                                            tokens_per_batch=tokens_per_batch):
            cache.write_shard(digests[indices], vectors)
        seconds += time.perf_counter() - started
    return round(n_tokens / seconds, 1) if model is not None else None


def embed_stage(ctx: StageContext, config: RunConfig, tokens: dict, encoder: dict) -> dict:
    """Encode only the rows the cache has never seen; everything else is read back later by hash.

    Row keys are one ``S32`` array; ids are read and encoded one row group of tokens.parquet at a time, so
    the stage's memory is the keys (32 bytes a row) plus one row group, whatever the dataset's size.
    """
    import pyarrow.parquet as pq

    from adaptflow.cache_index import to_digests
    from adaptflow.embed import TokenIds, release_free_memory, resolve_dtype
    from adaptflow.row_keys import digests_of_hex, is_member
    from adaptflow.store import parse_s3_uri

    device = resolve_device(config.encoder.device)
    dtype = resolve_dtype(config.encoder.dtype, device)
    cache = _cache_for(ctx, config, encoder, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file = pq.ParquetFile(ctx.store.get_verified_file(parse_s3_uri(tokens["tokens"])[1],
                                                                 Path(tmp) / "tokens.parquet"))
        digests = digests_of_hex(tokens_file.read(columns=["text_sha256"]).column("text_sha256"))
        cache.verify(digests)  # a corrupt shard holding some of these rows is marked and left out: they count as missing
        todo = ~cache.found(digests)  # the tokenize stage keeps one row per distinct text
        lost = to_digests([h for shard in cache.corrupt_shards for h in shard.hashes])
        corrupt = {"shards_ignored": len(cache.corrupt_shards),
                   "rows_reencoded": int(is_member(digests[todo], lost).sum())}
        n_rows, n_todo = len(digests), int(todo.sum())
        release_free_memory()  # the temporaries above are garbage now: keep them out of the encode's peak

        def windows():
            start = 0
            for group in range(tokens_file.num_row_groups):
                size = tokens_file.metadata.row_group(group).num_rows
                rows = np.flatnonzero(todo[start : start + size])
                if len(rows):
                    ids = TokenIds.from_arrow(tokens_file.read_row_group(group, columns=["ids"]).column("ids"))
                    yield digests[start + rows], (ids if len(rows) == size else ids.take(rows))
                start += size

        tokens_per_s = encode_into_cache(ctx, cache, windows(), encoder_ref=encoder["ref"], device=device,
                                         tokens_per_batch=config.encoder.tokens_per_batch)
    cache.compact()  # record new shards in the cache index: the next run GETs one generation, not every hashes.txt
    log.info("embeddings: %d rows encoded (%s tokens/s, %s on %s), %d from cache %s",
             n_todo, tokens_per_s, dtype, device, n_rows - n_todo, cache.prefix)
    if corrupt["shards_ignored"]:
        n = corrupt["shards_ignored"]
        log.warning("embeddings: %d corrupt shard%s ignored (%d rows re-encoded) in %s; `adaptflow cache verify "
                    "--repair` removes them", n, "" if n == 1 else "s", corrupt["rows_reencoded"], cache.uri)
    return {"cache": ctx.store.uri(cache.prefix), "dtype": dtype, "device": device,
            "encoded": n_todo, "cached": n_rows - n_todo, "tokens_per_s": tokens_per_s, "corrupt": corrupt}


def _arrays(ctx: StageContext, config: RunConfig, encoder: dict, embedded: dict, frame_uri: str, labels: list[str],
            *, spill_dir: Path, seed: int = 0, multilabel: bool = False, adapter: dict | None = None):
    """(X, y) for one split: vectors from the embedding cache, labels as indices into ``labels`` (multilabel:
    a 0/1 matrix [n, len(labels)]).

    With ``adapter`` the vectors are the adapted encoder's, from its own cache (rows it lacks are encoded first).

    X is an array when it fits the in-memory budget (``rowfile.in_memory_budget``), else a
    :class:`~adaptflow.rowfile.RowFile` under ``spill_dir`` with the rows in a seeded random order (``y``
    permuted alike), which is what the streamed head training needs.
    """
    from adaptflow.row_keys import text_digests
    from adaptflow.rowfile import RowFile, in_memory_budget

    table = read_columns(ctx, frame_uri, ["text", "label"])  # Arrow: no Python object per row
    hashes = text_digests(table.column("text"))
    if multilabel:  # 0/1 targets [n, k] from the rows' label sets
        from adaptflow.multilabel import indicator

        y = indicator(table.column("label").to_pylist(), labels)
    else:
        y = label_indices(table.column("label"), labels)
    cache = _cache_for(ctx, config, encoder, embedded["dtype"], adapter)
    if adapter is not None:
        started, n = time.perf_counter(), encode_missing(ctx, cache, table.column("text"), encoder_ref=encoder["ref"],
                                                         adapter=adapter, device=embed_device(config))
        if n:
            log.info("adapted encoder: %d rows encoded in %.1fs into %s", n, time.perf_counter() - started, cache.uri)
    del table
    dim = int(encoder["hidden_size"])
    if len(hashes) * dim * 4 <= in_memory_budget():
        return cache.read(hashes), y
    perm = np.random.default_rng(seed).permutation(len(hashes))  # row i of the file holds source row perm[i]
    rows = RowFile(Path(spill_dir) / "vectors.f32", len(hashes), dim)
    cache.read(hashes[perm], out=rows)
    log.info("%d x %d vectors (%.0f MB) over the in-memory budget: streaming them from %s",
             len(hashes), dim, len(hashes) * dim * 4 / 2**20, rows.path)
    return rows, y[perm]


def label_indices(column, labels: list) -> np.ndarray:
    """Each row's label as its index in ``labels`` (int64), from an Arrow column without a Python object per row.

    Raises:
        ValueError: a row's label is not in ``labels`` (or missing).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    index = pc.index_in(column, value_set=pa.array(labels).cast(column.type))
    if index.null_count:
        bad = pc.filter(column, pc.is_null(index)).slice(0, 1).to_pylist()
        raise ValueError(f"{index.null_count} rows have labels outside the trained labels {labels} (first: {bad})")
    return index.to_numpy().astype(np.int64)


# ---------------------------------------------------------------------------------------------- head


def training_tokens(ctx: StageContext, config: RunConfig, validated: dict, encoder: dict):
    """(token ids, label indices) of the training rows in the validated frame's order (the tokenize stage's ids)."""
    import pyarrow.parquet as pq

    from adaptflow.embed import TokenIds
    from adaptflow.row_keys import digests_of_hex, text_digests
    from adaptflow.store import parse_s3_uri

    frame = read_columns(ctx, validated["train"], ["text", "label"])
    y = label_indices(frame.column("label"), validated["labels"])
    table = pq.read_table(io.BytesIO(ctx.store.get_verified_bytes(
        parse_s3_uri(tokenize_stage(ctx, config, validated, encoder)["tokens"])[1])))
    keys = digests_of_hex(table.column("text_sha256"))
    order = np.argsort(keys)  # every training text was tokenized: a binary search finds its row
    rows = order[np.searchsorted(keys, text_digests(frame.column("text")), sorter=order)]
    return TokenIds.from_arrow(table.column("ids")).take(rows), y


def lora_trial(ctx: StageContext, config: RunConfig, validated: dict, encoder: dict, head_config, order: np.ndarray):
    """``head.kind: auto``'s LoRA candidate (``head_selection.LoraTrial``): adapters + a linear head trained on the
    trial's training rows (``head.epochs``, no inner hold-out), then scored on the shared hold-out through the
    merged encoder. ``order`` maps the selection's row indices to rows of the validated frame (the arrays may be
    a shuffled spill file). The trial is sized to the budget left: a forward pass's rate is probed, and the
    training rows are cut (stratified) to what ``epochs`` of training steps (~3 forward passes each) afford;
    None when that is under two rows a class."""
    from adaptflow.adapters import merge_adapter, save_adapter, train_lora
    from adaptflow.embed import encode, resolve_dtype
    from adaptflow.head_selection import Trial, candidate_config
    from adaptflow.heads import predict_proba

    def trial(train_rows: np.ndarray, val_rows: np.ndarray, seconds_left: float) -> Trial | None:
        ids, y = training_tokens(ctx, config, validated, encoder)
        device = resolve_device(config.encoder.device)
        tokenizer, model = load_stage_encoder(ctx, encoder, device=device)
        from adaptflow.adapters import resolved_epochs
        from adaptflow.heads import stratified_holdout

        cfg = candidate_config(head_config, "lora").model_copy(update={"val_fraction": 0.0})
        rows, held = order[train_rows], order[val_rows]
        # fit the trial to the budget left: a training step costs ~3 forward passes (forward, backward), and the
        # hold-out is encoded once more at the end; a forward pass's rate is probed on up to 64 rows first
        probe = rows[:64]
        started = time.perf_counter()
        encode(model, ids.take(probe), pooling=config.encoder.pooling, device=device, progress=False)
        forward_rows_per_s = len(probe) / max(time.perf_counter() - started, 1e-6)
        affordable = int((seconds_left * forward_rows_per_s - len(held)) / (3 * resolved_epochs(cfg)))
        if affordable < len(rows):
            if affordable < 2 * len(validated["labels"]):
                return None  # too few rows to learn anything in the time left: select_head says so
            _, keep = stratified_holdout(y[rows], affordable / len(rows), np.random.default_rng(config.seed))
            rows = np.sort(rows[keep])
        log.info("auto head: LoRA trial on %d of %d rows (%.0fs of the budget left, ~%.0f forward rows/s)",
                 len(rows), len(train_rows), seconds_left, forward_rows_per_s)
        fit = train_lora(model, ids.take(rows), y[rows], len(validated["labels"]), cfg,
                         pooling=config.encoder.pooling, device=device,
                         bf16=resolve_dtype(config.encoder.dtype, device) == "bf16",
                         pad_id=int(tokenizer.pad_token_id or 0), log=log.info)
        with tempfile.TemporaryDirectory() as tmp:
            merged = merge_adapter(model, save_adapter(fit.adapter, fit.config, Path(tmp) / "adapter.safetensors"))
        vectors = encode(merged.to(device), ids.take(held), pooling=config.encoder.pooling, device=device,
                         progress=False).vectors
        accuracy = float((predict_proba(fit.head, vectors).argmax(1) == y[held]).mean())
        return Trial(kind="lora", val_accuracy=round(accuracy, 5), train_accuracy=None, seconds=0.0,
                     train_rows=len(rows))

    return trial


def train_stage(ctx: StageContext, config: RunConfig, validated: dict, encoder: dict, embedded: dict) -> dict:
    """Fit the head on cached embeddings; store its weights (safetensors) and training history.

    ``head.kind: auto`` first picks the kind (adaptflow.head_selection), then fits it as that kind alone would
    be; the choice, its reasons, the curves and each candidate's seconds go to ``selection.json`` and ``auto``.
    """
    from adaptflow.heads import HeadConfig, fit_head, save_head

    head_config = HeadConfig(**config.head.head_kwargs(), seed=config.seed)
    if head_config.kind == "lora":
        if task_of(validated) == "multilabel":
            raise ValueError("head.kind 'lora' has no multi-label training; use kind linear or mlp with "
                             "task: multilabel")
        return train_lora_stage(ctx, config, validated, encoder, embedded)
    task = {"task": "multilabel"} if task_of(validated) == "multilabel" else {}  # multiclass keys stay as they were
    key = stage_key('train', data=validated['digest'], cache=embedded['cache'], head=vars(head_config), **task)
    prefix = f"heads/{key}"
    meta = _cached(ctx, prefix)
    if meta is None:
        labels, multilabel = validated["labels"], task_of(validated) == "multilabel"
        device = resolve_device(config.encoder.device)
        with tempfile.TemporaryDirectory() as tmp:
            X, y = _arrays(ctx, config, encoder, embedded, validated["train"], labels, spill_dir=Path(tmp),
                           seed=config.seed, multilabel=multilabel)
            path = Path(tmp) / "head.safetensors"
            fit_config, selection, extra = head_config, None, {}
            if multilabel:
                from adaptflow.multilabel import fit_multilabel_head, save_multilabel_head

                fit = fit_multilabel_head(X, y, head_config, device=device, log=log.info)
                save_multilabel_head(fit.head, path, labels, fit.thresholds)
                extra = {"task": "multilabel", "thresholds": dict(zip(labels, fit.thresholds.round(6).tolist())),
                         "threshold_tuning": fit.cv}
            else:
                if head_config.kind == "auto":
                    from adaptflow.head_selection import candidate_config, select_head
                    from adaptflow.rowfile import RowFile

                    # the row of the frame behind each array row (_arrays spills in a seeded random order)
                    order = (np.random.default_rng(config.seed).permutation(len(y)) if isinstance(X, RowFile)
                             else np.arange(len(y)))
                    selection = select_head(X, y, len(labels), head_config, device=device, log=log.info,
                                            lora=lora_trial(ctx, config, validated, encoder, head_config, order))
                    fit_config = candidate_config(head_config, selection.choice)
                if fit_config.kind == "lora":  # trained as `kind: lora` trains, under that kind's own key
                    del X
                    lora_config = config.model_copy(update={"head": config.head.model_copy(update={"kind": "lora"})})
                    chosen = train_lora_stage(ctx, lora_config, validated, encoder, embedded)
                    auto = {**selection.report(), "final_seconds": chosen["seconds"]}
                    meta = _publish_once(ctx, prefix, {"selection.json": json.dumps(auto, indent=2).encode()},
                                         {**chosen, "kind": "lora", "auto": auto})
                    return meta
                fit = fit_head(X, y, len(labels), fit_config, device=device, log=log.info)
                save_head(fit.head, path, labels)
            del X
            objects = {"head.safetensors": path.read_bytes(), "history.json": json.dumps(fit.history).encode()}
            if selection is not None:
                extra["auto"] = {**selection.report(), "final_seconds": round(fit.seconds, 3)}
                objects["selection.json"] = json.dumps(extra["auto"], indent=2).encode()
            meta = _publish_once(ctx, prefix, objects, {
                "best_epoch": fit.best_epoch, "seconds": round(fit.seconds, 3),
                "labels": labels, "kind": fit_config.kind, "config": vars(fit_config), **extra})
    return {"head": ctx.store.uri(f"{prefix}/head.safetensors"), **meta}


def train_lora_stage(ctx: StageContext, config: RunConfig, validated: dict, encoder: dict, embedded: dict) -> dict:
    """``head.kind: lora``: a LoRA adapter and a linear head trained together on the tokenized training rows.

    The head starts as the L-BFGS linear head on the frozen vectors (from the embed stage's cache); every epoch
    is checkpointed under ``checkpoints/<key>/``, so a killed run resumes. The output holds ``head`` (the head,
    as every kind's) plus ``adapter`` and ``adapter_digest``, the safetensors file later stages merge.
    """
    from adaptflow.adapters import StoreCheckpoints, adapter_digest, resolved_epochs, save_adapter, train_lora
    from adaptflow.embed import resolve_dtype
    from adaptflow.heads import HeadConfig, fit_head, save_head

    head_config = HeadConfig(**config.head.head_kwargs(), seed=config.seed)
    key = stage_key("train", data=validated["digest"], cache=embedded["cache"], head=vars(head_config),
                    encoder=encoder["digest"], max_length=config.encoder.max_length, pooling=config.encoder.pooling)
    prefix = f"heads/{key}"
    meta = _cached(ctx, prefix)
    if meta is None:
        labels = validated["labels"]
        device = resolve_device(config.encoder.device)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            X, y_probe = _arrays(ctx, config, encoder, embedded, validated["train"], labels, spill_dir=Path(tmp),
                                 seed=config.seed)
            probe = fit_head(X, y_probe, len(labels), HeadConfig(
                kind="linear", C=head_config.C, calibrate=False, normalize=head_config.normalize,
                class_weights=head_config.class_weights, seed=config.seed), device=device, log=log.info)
            del X, y_probe
            ids, y = training_tokens(ctx, config, validated, encoder)
            tokenizer, model = load_stage_encoder(ctx, encoder, device=device)
            checkpoints = StoreCheckpoints(ctx.store, prefix=f"checkpoints/{key}")
            fit = train_lora(model, ids, y, len(labels), head_config, pooling=config.encoder.pooling, device=device,
                             bf16=resolve_dtype(config.encoder.dtype, device) == "bf16",
                             pad_id=int(tokenizer.pad_token_id or 0), init_head=probe.head, checkpoints=checkpoints,
                             log=log.info)
            adapter_path = save_adapter(fit.adapter, fit.config, Path(tmp) / "adapter.safetensors")
            head_path = save_head(fit.head, Path(tmp) / "head.safetensors", labels)
            digest = adapter_digest(adapter_path)
            log.info("lora: adapter %.1f MB (%s), validation accuracy %s, %.1fs", adapter_path.stat().st_size / 2**20,
                     digest[:19], fit.val_accuracy, time.perf_counter() - started)
            meta = _publish_once(ctx, prefix, {
                "head.safetensors": head_path.read_bytes(),
                "adapter.safetensors": adapter_path.read_bytes(),
                "history.json": json.dumps(fit.history).encode(),
            }, {"best_epoch": resolved_epochs(head_config), "seconds": round(time.perf_counter() - started, 3),
                "labels": labels, "config": vars(head_config), "adapter_digest": digest,
                "val_accuracy": fit.val_accuracy, "resumed_from": fit.resumed_from, "checkpoints": checkpoints.uri()})
    result = {"head": ctx.store.uri(f"{prefix}/head.safetensors"),
              "adapter": ctx.store.uri(f"{prefix}/adapter.safetensors"), **meta}
    # the training rows' adapted vectors, which drift compares new rows with (a lookup once they are cached)
    cache = _cache_for(ctx, config, encoder, embedded["dtype"], head_adapter(result))
    encoded = encode_missing(ctx, cache, read_columns(ctx, validated["train"], ["text"]).column("text"),
                             encoder_ref=encoder["ref"],
                             adapter=head_adapter(result), device=resolve_device(config.encoder.device))
    if encoded:
        log.info("lora: %d training rows encoded with the adapter into %s", encoded, cache.uri)
    return result


def evaluate_stage(ctx: StageContext, config: RunConfig, validated: dict, encoder: dict, embedded: dict,
                   head: dict) -> dict:
    """Score the head on the test rows: metrics, a confusion-matrix PNG and a markdown report."""
    import matplotlib.pyplot as plt

    from adaptflow.heads import load_head, predict_proba
    from adaptflow.metrics import compute_metrics, confusion_matrix_figure, flat_metrics, report_markdown
    from adaptflow.store import parse_s3_uri

    prefix = f"evaluations/{stage_key('evaluate', head=head['head'], data=validated['digest'])}"
    meta = _cached(ctx, prefix)
    if meta is None:
        labels, multilabel = validated["labels"], task_of(validated) == "multilabel"
        with tempfile.TemporaryDirectory() as tmp:
            X, y = _arrays(ctx, config, encoder, embedded, validated["test"], labels, spill_dir=Path(tmp),
                           multilabel=multilabel, adapter=head_adapter(head))
            path = ctx.store.get_verified_file(parse_s3_uri(head["head"])[1], Path(tmp) / "head.safetensors")
            model, _ = load_head(path)
            if multilabel:
                from adaptflow.multilabel import load_thresholds, predict_sigmoid

                proba, thresholds = predict_sigmoid(model, X), load_thresholds(path)
            else:
                proba = predict_proba(model, X)  # (the rows' order does not matter to the metrics: y is permuted alike)
            del X
        extra = {"model": config.name, "test rows": len(y)}
        if head.get("auto"):  # head.kind: auto: the choice and the validation accuracy of each candidate tried
            candidates = head["auto"]["candidates"]
            extra["head (auto)"] = f"{head['auto']['choice']} (validation accuracy " + ", ".join(
                f"{kind} {c['val_accuracy']:.4f}" for kind, c in candidates.items() if "skipped" not in c) + ")"
        if multilabel:
            from adaptflow.multilabel import (compute_multilabel_metrics, flat_multilabel_metrics,
                                              multilabel_report_markdown, per_label_figure)

            metrics = compute_multilabel_metrics(y, proba, labels, thresholds)
            figure, figure_name = per_label_figure(metrics, labels), "per_label.png"
            report, flat = multilabel_report_markdown(metrics, labels, extra=extra), flat_multilabel_metrics(metrics)
        else:
            metrics = compute_metrics(y, proba, labels)
            figure, figure_name = confusion_matrix_figure(metrics["confusion"], labels), "confusion_matrix.png"
            report, flat = report_markdown(metrics, labels, extra=extra), flat_metrics(metrics)
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=120, bbox_inches="tight")
        plt.close(figure)
        meta = _publish_once(ctx, prefix, {
            "metrics.json": json.dumps(metrics, indent=2).encode(),
            figure_name: png.getvalue(),
            "report.md": report.encode(),
        }, {"metrics": flat, "report": report, "figure": figure_name})
    return {"evaluation": ctx.store.uri(prefix), **meta}


# ---------------------------------------------------------------------------------------------- registry


def register_stage(ctx: StageContext, config: RunConfig, *, flow_run_id: str, encoder: dict, snapshot: dict,
                   validated: dict, embedded: dict, head: dict, evaluation: dict) -> dict:
    """Log the run to MLflow, register the pyfunc model and set its aliases (idempotent per flow run)."""
    from adaptflow.data import frame_digest
    from adaptflow.lineage import ROWS_TAG, publish_rows, row_manifest
    from adaptflow.registry import DatasetInput, RunRecord, log_and_register
    from adaptflow.serving import ModelSpec
    from adaptflow.store import parse_s3_uri, sha256_file

    encoder_ref = encoder["ref"]  # the S3 snapshot the resolve stage pinned: portable, content-addressed
    spec_fields = dict(encoder_ref=encoder_ref, encoder_digest=encoder["digest"], max_length=config.encoder.max_length,
                       pooling=config.encoder.pooling, dtype=embedded["dtype"], labels=validated["labels"],
                       task=task_of(validated))
    # Arrow tables, and Arrow-backed frames for MLflow: the rows' texts never become one Python object each
    train, test = (read_columns(ctx, validated[name], ["text", "label", "row"]) for name in ("train", "test"))
    params = {"config": config.model_dump_json(), **_flatten(config.model_dump())}
    auto = head.get("auto")  # head.kind: auto: what was chosen, and on what evidence
    if auto:
        from adaptflow.head_selection import selection_metrics

        params["auto.choice"] = auto["choice"]
    tags = {"adaptflow.data_digest": validated["digest"], "adaptflow.encoder_ref": encoder_ref,
            "adaptflow.encoder_digest": encoder["digest"], "adaptflow.labels": json.dumps(validated["labels"]),
            # what the gate needs to re-score this version later on other rows, without downloading the model
            "adaptflow.head_uri": head["head"], "adaptflow.max_length": str(config.encoder.max_length),
            "adaptflow.pooling": config.encoder.pooling, "adaptflow.dtype": embedded["dtype"],
            "adaptflow.head_kind": head.get("kind", config.head.kind), "adaptflow.task": task_of(validated)}
    adapter = head_adapter(head)
    if adapter:  # a LoRA head: re-scoring merges this adapter and reads the cache keyed on its digest
        tags.update({"adaptflow.adapter_uri": adapter["uri"], "adaptflow.adapter_digest": adapter["digest"]})
    tags[ROWS_TAG] = publish_rows(  # which rows trained and tested this version: content-keyed, shared by equals
        ctx.store, f"lineage/{stage_key('lineage', validated=validated['validated'], snapshot=snapshot['snapshot'])}",
        row_manifest(train, test, snapshot.get("partitions") or {}), {"snapshot": snapshot["snapshot"]})
    from adaptflow.changes import FINGERPRINT_TAG, fingerprint  # what a later unchanged run is compared with

    tags[FINGERPRINT_TAG] = fingerprint(data_digest=snapshot["digest"], config=config, encoder_digest=encoder["digest"])
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = Path(tmp) / "artifacts"  # logged as the run's artifacts: evaluation/ and validation/
        for name in (evaluation.get("figure", "confusion_matrix.png"), "report.md", "metrics.json"):
            ctx.store.get_verified_file(f"{parse_s3_uri(evaluation['evaluation'])[1]}/{name}", artifacts / "evaluation" / name)
        ctx.store.get_verified_file(parse_s3_uri(validated["quarantine"])[1], artifacts / "validation" / "quarantine.parquet")
        (artifacts / "validation" / "report.json").write_text(json.dumps(validated["report"], indent=2, default=str))
        if auto:
            (artifacts / "head_selection").mkdir()
            (artifacts / "head_selection" / "selection.json").write_text(json.dumps(auto, indent=2))
        head_path = ctx.store.get_verified_file(parse_s3_uri(head["head"])[1], Path(tmp) / "head" / "head.safetensors")
        adapter_path = None
        if adapter:
            adapter_path = ctx.store.get_verified_file(parse_s3_uri(adapter["uri"])[1],
                                                       Path(tmp) / "adapter" / "adapter.safetensors")
            spec_fields["adapter_sha256"] = sha256_file(adapter_path)[0]
        spec = ModelSpec(**spec_fields, head_sha256=sha256_file(head_path)[0])  # the pyfunc re-checks it at load
        record = RunRecord(
            params=params,
            metrics={**evaluation["metrics"], "rows_train": len(train), "rows_test": len(test),
                     "rows_quarantined": validated["rows"]["quarantined"], "rows_encoded": embedded["encoded"],
                     "rows_cached": embedded["cached"], "best_epoch": head["best_epoch"],
                     **(selection_metrics(auto) if auto else {})},
            tags={**tags, "adaptflow.snapshot": snapshot["snapshot"]},
            datasets=[DatasetInput(frame, name, validated[name], _short(frame_digest(frame)), context)
                      for frame, name, context in ((arrow_frame(train), "train", "training"),
                                                   (arrow_frame(test), "test", "evaluation"))],
            artifacts_dir=artifacts,
        )
        version = log_and_register(
            tracking_uri=ctx.settings.mlflow_tracking_uri, experiment=config.mlflow.experiment,
            model_name=config.name, flow_run_id=flow_run_id, record=record, head_path=head_path, spec=spec,
            adapter_path=adapter_path,
            input_texts=test.column("text").slice(0, 3).to_pylist(), version_tags={**tags, "adaptflow.flow_run_id": flow_run_id},
        )
    return {"run_id": version.run_id, "model_name": version.model_name, "version": version.version,
            "aliases": version.aliases, "model_uri": version.model_uri}


def arrow_frame(table) -> pd.DataFrame:
    """``text`` and ``label`` of a validated Table as a pandas frame whose strings stay in Arrow buffers."""
    return table.select(["text", "label"]).to_pandas(types_mapper=pd.ArrowDtype)


def _short(digest: str) -> str:
    """A digest as MLflow datasets take it (at most 36 characters)."""
    return digest.split(":", 1)[-1][:32]


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} → {"a.b": 1}: config sections as MLflow params."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---------------------------------------------------------------------------------------------- hand-over


def handover_key(run_id: str, name: str) -> str:
    """Where a child flow run (e.g. on the gpu pool) leaves its result for the parent run ``run_id``."""
    return f"runs/{run_id}/{name}.json"


def write_handover(ctx: StageContext, run_id: str, name: str, result: dict) -> str:
    """Store a child flow's result for its parent; returns the URI."""
    key = handover_key(run_id, name)
    ctx.store.put_bytes(key, json.dumps(result, default=str).encode())
    return ctx.store.uri(key)


def read_handover(ctx: StageContext, run_id: str, name: str) -> dict:
    """Read what a child flow left for parent run ``run_id``."""
    return json.loads(ctx.store.get_bytes(handover_key(run_id, name)))
