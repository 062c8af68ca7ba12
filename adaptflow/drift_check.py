"""A registered version's drift on new rows: gather the arrays :mod:`adaptflow.drift` compares.

- training side: the version's row manifest (``adaptflow.lineage``, tag ``adaptflow.rows_uri``) gives the
  training rows' text hashes and labels; their vectors come from the embedding cache the version was trained
  through (nothing is encoded for them; texts are not needed).
- new side: a uniform sample of the new texts (:class:`TextSample`, fed while scoring streams the rows, or by
  :func:`sample_location` reading a lake); their vectors come from the same cache, misses encoded into it. Rows
  the model trained on are left out of the comparison (counted as ``rows.seen_in_training``).
- the version's head scores both samples (prediction drift); its tokenizer measures the new texts (health).

Cost: a sample of at most ``rules.sample_rows`` rows a side, so a check costs the same at 10k and at 10M new rows.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from adaptflow.drift import DriftRules, balanced_sample, embedding_drift, input_health, prediction_drift
from adaptflow.scoring import ScoringModel
from adaptflow.store import ConflictError

log = logging.getLogger("adaptflow")


class TextSample:
    """A uniform random sample of at most ``size`` texts from a stream: each text gets a random key and the
    ``size`` smallest keys are kept, so chunks can be added in any number and order."""

    def __init__(self, size: int, seed: int = 13):
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.keys = np.empty(0)
        self.texts = np.empty(0, dtype=object)
        self.seen = 0

    def add(self, texts) -> None:
        texts = np.asarray(list(texts), dtype=object)
        self.seen += len(texts)
        keys = np.concatenate([self.keys, self.rng.random(len(texts))])
        pool = np.concatenate([self.texts, texts])
        if len(keys) > self.size:
            keep = np.argpartition(keys, self.size)[: self.size]
            keys, pool = keys[keep], pool[keep]
        self.keys, self.texts = keys, pool

    def __len__(self) -> int:
        return len(self.texts)


def sample_location(ctx, location: str, text_column: str, rules: DriftRules) -> tuple[list[str], int]:
    """(a uniform sample of the usable texts of every partition at ``location``, rows read): what ``adaptflow
    drift`` compares when no scoring run hands it a sample. Rows without text are left out, as scoring leaves
    them unlabelled."""
    from adaptflow.data import DataError, SUPPORTED_SUFFIXES, is_missing, normalise_text
    from adaptflow.scoring import CHUNK_ROWS, partition_batches
    from adaptflow.sources import list_partitions

    partitions = list_partitions(location, store=ctx.store)
    if not partitions:
        raise DataError(f"{location}: no data file ({', '.join(SUPPORTED_SUFFIXES)}) there. Check the path; names "
                        f"starting with '_' or '.' are skipped.")
    sample, rows = TextSample(rules.sample_rows, rules.seed), 0
    for part in partitions:
        for table in partition_batches(part, ctx, CHUNK_ROWS):
            if text_column not in table.column_names:
                raise DataError(f"{part['path']}: no text column {text_column!r} (columns: "
                                f"{', '.join(table.column_names)}); pass --text-column")
            values = table.column(text_column).to_pylist()
            rows += len(values)
            sample.add(t for t in (normalise_text(v) if isinstance(v, str) and not is_missing(v) else None
                                   for v in values) if t)
    return list(sample.texts), rows


SAMPLE_FILE = "sample.parquet"


def save_sample(ctx, model: ScoringModel, texts: list[str]) -> str:
    """Publish a sample of new texts (manifest last, content-keyed) for the drift task; returns its URI."""
    import hashlib
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), buffer)
    data = buffer.getvalue()
    prefix = f"monitoring/{model.name}/v{model.version}/samples/{hashlib.sha256(data).hexdigest()[:32]}"
    if ctx.store.read_manifest(prefix) is None:
        try:
            ctx.store.publish(prefix, {SAMPLE_FILE: data}, {"rows": len(texts), "model_name": model.name,
                                                            "model_version": model.version})
        except ConflictError:
            pass  # the same sample, published meanwhile
    return ctx.store.uri(f"{prefix}/{SAMPLE_FILE}")


def load_sample(ctx, uri: str) -> list[str]:
    """The texts :func:`save_sample` published at ``uri`` (verified against its manifest)."""
    import io

    import pyarrow.parquet as pq

    from adaptflow.store import parse_s3_uri

    bucket, key = parse_s3_uri(uri)
    return pq.read_table(io.BytesIO(ctx.store.with_bucket(bucket).get_verified_bytes(key))).column("text").to_pylist()


def _training_side(ctx, model: ScoringModel, client, cache) -> tuple[list[str], dict[str, int]]:
    """(hashes of the training rows whose vectors are cached, training rows per label)."""
    from adaptflow.lineage import rows_of

    version = client.get_model_version(model.name, model.version)
    manifest = rows_of(ctx.store, version)
    if manifest is None:
        raise ValueError(f"{model.name} version {model.version} has no row manifest (tag adaptflow.rows_uri): its "
                         f"training rows are unknown, so drift cannot be measured; retrain to register a version "
                         f"with one")
    train = manifest[manifest["split"] == "train"]
    counts = {str(k): int(v) for k, v in train["label"].value_counts().items()}
    hashes = list(dict.fromkeys(train["text_sha256"]))
    missing = set(cache.missing(hashes))
    cached = [h for h in hashes if h not in missing]
    if not cached:
        raise ValueError(f"none of the {len(hashes)} training rows of {model.name} version {model.version} is in the "
                         f"embedding cache {cache.uri}; drift compares cached vectors (the cache was emptied, or the "
                         f"version was trained against another store)")
    if missing:
        log.warning("drift: %d of %d training rows are not in the cache; comparing with the other %d", len(missing),
                    len(hashes), len(cached))
    return cached, counts


def _new_vectors(ctx, model: ScoringModel, cache, texts: list[str], device: str) -> tuple[list[str], dict]:
    """The new texts' hashes, their misses encoded into ``cache`` first (with the version's adapter, if it has
    one); ``{"encoded", "cached"}`` counts distinct texts."""
    from adaptflow.cache import text_sha256
    from adaptflow.stages import encode_missing

    hashes = [text_sha256(t) for t in texts]
    encoded = encode_missing(ctx, cache, texts, encoder_ref=model.encoder_ref, adapter=model.adapter(), device=device)
    return hashes, {"encoded": encoded, "cached": len(set(hashes)) - encoded}


def _health(ctx, model: ScoringModel, texts: list[str]) -> dict:
    from adaptflow.stages import load_stage_encoder

    tokenizer, _ = load_stage_encoder(ctx, {"ref": model.encoder_ref, "digest": model.encoder_digest})
    # one token past max_length is enough to know a text was cut
    ids = tokenizer(texts, truncation=True, max_length=model.max_length + 1, padding=False,
                    return_attention_mask=False, return_token_type_ids=False)["input_ids"] if texts else []
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    unk = tokenizer.unk_token_id
    unknown = sum(x.count(unk) for x in ids) if unk is not None else 0
    return input_health(lengths, model.max_length, unknown, int(lengths.sum()),
                        np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)))


def check_drift(ctx, model: ScoringModel, texts: list[str], rules: DriftRules | None = None, *, device: str = "cpu",
                input: str | None = None, rows: int | None = None) -> dict:
    """Compare ``texts`` (a sample of the new rows) with ``model``'s training rows.

    Returns:
        The report: ``score``, ``ci_low``, ``ci_high``, ``drifted`` (embedding drift or prediction drift),
        ``embedding`` (with the out-of-fold ``scores`` arrays, for plots; :func:`public_report` drops them),
        ``label_shift``, ``inputs``, ``rows`` and ``seconds``.
    """
    from adaptflow.cache import EmbeddingCache
    from adaptflow.heads import load_head, predict_proba
    from adaptflow.registry import client_for
    from adaptflow.store import parse_s3_uri

    rules = rules or DriftRules()
    started = time.perf_counter()
    cache = EmbeddingCache(ctx.store, **model.cache_spec())
    client = client_for(ctx.settings.mlflow_tracking_uri)
    reference, train_counts = _training_side(ctx, model, client, cache)
    new_hashes, encoded = _new_vectors(ctx, model, cache, texts, device)
    # a row the model trained on tells nothing about drift, and the same vector on both sides of a
    # cross-validated classifier drags its AUC below 0.5 (measured: 0.44 with the training data as "new" rows)
    trained = set(reference)
    unseen = [i for i, h in enumerate(new_hashes) if h not in trained]
    seen_in_training = len(new_hashes) - len(unseen)
    sampled, texts, new_hashes = texts, [texts[i] for i in unseen], [new_hashes[i] for i in unseen]
    ref_rows, new_rows = balanced_sample(len(reference), len(new_hashes), rules)
    ref_vectors = cache.read([reference[i] for i in ref_rows])
    new_vectors = cache.read([new_hashes[i] for i in new_rows])
    embedding = embedding_drift(ref_vectors, new_vectors, rules)
    with tempfile.TemporaryDirectory() as tmp:
        bucket, key = parse_s3_uri(model.head_uri)
        head, labels = load_head(ctx.store.with_bucket(bucket).get_verified_file(key, Path(tmp) / "head.safetensors"))
    new_proba = predict_proba(head, cache.read(new_hashes)) if new_hashes else np.zeros((0, len(labels)))
    labels_report = prediction_drift(labels, train_counts, new_proba, predict_proba(head, ref_vectors), rules)
    inputs = _health(ctx, model, sampled)
    drifted = bool(embedding["drifted"] or labels_report["shifted"])
    reasons = ([f"embedding drift: domain-classifier AUC {embedding['score']} (lower bound {embedding['ci_low']} > "
                f"{rules.threshold})"] if embedding["drifted"] else []) + \
              ([f"prediction drift: PSI {labels_report['psi']} > {rules.label_shift_psi}"] if labels_report["shifted"]
               else [])
    seconds = time.perf_counter() - started
    report = {"score": embedding["score"], "ci_low": embedding["ci_low"], "ci_high": embedding["ci_high"],
              "drifted": drifted, "reasons": reasons, "threshold": rules.threshold,
              "model_name": model.name, "model_version": model.version, "input": input,
              "rows": {"new": rows if rows is not None else len(sampled), "new_sampled": len(sampled),
                       "seen_in_training": seen_in_training,
                       "compared": int(len(new_rows)), "training": int(sum(train_counts.values())),
                       "training_cached": len(reference)},
              "embeddings": encoded, "embedding": embedding, "label_shift": labels_report, "inputs": inputs,
              "labels": labels, "seconds": round(seconds, 3),
              "rows_per_s": round(len(sampled) / seconds, 1) if seconds and sampled else None}
    log.info("drift %s v%s: AUC %s [%s, %s] (threshold %s), label PSI %s, %d new rows sampled, %d compared a side; "
             "%.2f s (%s rows/s)%s", model.name, model.version, embedding["score"], embedding["ci_low"],
             embedding["ci_high"], rules.threshold, labels_report["psi"], len(sampled), len(new_rows), seconds,
             report["rows_per_s"], " — DRIFTED" if drifted else "")
    return report


def public_report(report: dict) -> dict:
    """The report as JSON: the ``{"drift": ...}`` of ``--json``, without the per-row score arrays."""
    embedding = {k: v for k, v in report["embedding"].items() if k != "scores"}
    return {"drift": {**{k: v for k, v in report.items() if k != "embedding"}, "embedding": embedding}}


__all__ = ["TextSample", "check_drift", "load_sample", "public_report", "sample_location", "save_sample"]
