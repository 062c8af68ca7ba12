"""Per-row embedding cache in S3: (encoder digest, max_length, pooling, dtype, text sha256) -> float32 vector.

Layout under ``embeddings/<key[:24]>/`` (``key`` = sha256 of the canonical settings JSON, so a different
encoder snapshot, truncation, pooling or dtype can never serve a stale vector)::

    shards/<shard-id>/vectors.npy      float32 [rows, dim]
    shards/<shard-id>/hashes.txt       one text sha256 per row, same order
    shards/<shard-id>/_manifest.json   written last (If-None-Match): a shard exists exactly when this does

A shard is immutable and content-addressed: ``shard-id = sha256("<sha256(hashes.txt)>:<sha256(vectors.npy)>")``.
A retried write publishes the same id and is a no-op; a crashed write leaves objects without a manifest, which
readers ignore; and a reader can check a downloaded shard against its own name, not only its manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from adaptflow.store import MANIFEST, ArtifactStore, ConflictError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")
_THREADS = 8  # parallel GETs when loading the index or shards: S3 latency, not bandwidth, is the limit


class CacheIntegrityError(RuntimeError):
    """A shard's bytes do not match its name or manifest (tampered or corrupted)."""


def text_sha256(text: str) -> str:
    """The row key: sha256 hex of the text's UTF-8 bytes (texts are NFC-normalised upstream by data.py)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_key(*, encoder_digest: str, max_length: int, pooling: str, dtype: str) -> str:
    """sha256 hex of the canonical JSON of everything that changes a vector."""
    spec = {
        "encoder_digest": encoder_digest,
        "max_length": int(max_length),
        "pooling": pooling,
        "dtype": dtype,
        "format": FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class _Shard:
    id: str
    rows: int
    dim: int
    hashes_sha256: str
    vectors_sha256: str


class EmbeddingCache:
    """Vectors for one (encoder, max_length, pooling, dtype), keyed by text sha256, stored as S3 shards.

    Args:
        store: the artifact store holding ``embeddings/``.
        encoder_digest: ``ResolvedEncoder.digest`` of the encoder snapshot.
        max_length: truncation length used when tokenizing.
        pooling: ``"mean"`` or ``"cls"``.
        dtype: the resolved compute dtype, ``"fp32"`` or ``"bf16"`` (vectors are stored float32 either way).
    """

    def __init__(self, store: ArtifactStore, *, encoder_digest: str, max_length: int, pooling: str, dtype: str):
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls'; got {pooling!r}")
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be the resolved 'fp32' or 'bf16' (not {dtype!r}); use embed.resolve_dtype")
        if not encoder_digest:
            raise ValueError("encoder_digest is empty: pass ResolvedEncoder.digest")
        self.store = store
        self.spec = {"encoder_digest": encoder_digest, "max_length": int(max_length), "pooling": pooling,
                     "dtype": dtype, "format": FORMAT_VERSION}
        self.key = cache_key(encoder_digest=encoder_digest, max_length=max_length, pooling=pooling, dtype=dtype)
        self.prefix = f"embeddings/{self.key[:24]}"
        # In-memory index, loaded on first use: shard list + sorted unique row hashes -> (shard number, row).
        self._shards: list[_Shard] | None = None
        self._hashes: list[np.ndarray] = []  # per shard, 'S64' arrays, kept to rebuild the sorted index
        self._sorted: np.ndarray = np.empty(0, dtype="S64")
        self._shard_of = np.empty(0, dtype=np.int32)
        self._row_of = np.empty(0, dtype=np.int32)
        self._stale = True  # the sorted index lags self._hashes (rebuilt lazily: writes come in bursts)

    def __repr__(self) -> str:
        return f"EmbeddingCache({self.store.uri(self.prefix)}, {self.spec})"

    @property
    def uri(self) -> str:
        return self.store.uri(self.prefix)

    def _shard_prefix(self, shard_id: str) -> str:
        return f"{self.prefix}/shards/{shard_id}"

    # ---- index ---------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Reload the index from S3 (picks up shards that other writers published since)."""
        shard_dir = f"{self.prefix}/shards/"
        manifests = [k for k in self.store.list_keys(shard_dir) if k.endswith(f"/{MANIFEST}")]
        ids = [k[len(shard_dir) : -len(MANIFEST) - 1] for k in manifests]
        # objects without a manifest (a crashed write) are simply not listed here: they are invisible
        with ThreadPoolExecutor(_THREADS) as pool:
            loaded = list(pool.map(self._load_shard_index, ids))
        self._shards, self._hashes = [], []
        for shard, hashes in filter(None, loaded):
            self._add(shard, hashes)
        log.debug("embedding cache %s: %d shards, %d rows", self.uri, len(self._shards), sum(map(len, self._hashes)))

    def _load_shard_index(self, shard_id: str) -> tuple[_Shard, np.ndarray] | None:
        prefix = self._shard_prefix(shard_id)
        manifest = self.store.read_manifest(prefix)
        if manifest is None:  # listed, then deleted (drop_shard by another process)
            return None
        objects, meta = manifest["objects"], manifest.get("meta", {})
        shard = _Shard(shard_id, int(meta["rows"]), int(meta["dim"]),
                       objects["hashes.txt"]["sha256"], objects["vectors.npy"]["sha256"])
        body = self.store.get_bytes(f"{prefix}/hashes.txt")
        self._check(shard, hashes_sha256=_sha(body))
        hashes = np.array(body.decode("ascii").split(), dtype="S64")
        if len(hashes) != shard.rows:
            raise CacheIntegrityError(self._problem(shard, f"hashes.txt has {len(hashes)} rows, manifest {shard.rows}"))
        return shard, hashes

    def _add(self, shard: _Shard, hashes: np.ndarray) -> None:
        self._shards.append(shard)
        self._hashes.append(hashes)
        self._stale = True

    def _index(self) -> None:
        """Load the index on first use; rebuild the sorted arrays after writes."""
        if self._shards is None:
            self.refresh()
        if not self._stale:
            return
        if self._hashes:
            allh = np.concatenate(self._hashes)
            shard_no = np.repeat(np.arange(len(self._hashes), dtype=np.int32), [len(h) for h in self._hashes])
            rows = np.concatenate([np.arange(len(h), dtype=np.int32) for h in self._hashes])
            # unique keeps the first copy of a row written twice (two runs racing on the same texts): same vector
            self._sorted, first = np.unique(allh, return_index=True)
            self._shard_of, self._row_of = shard_no[first], rows[first]
        else:  # every shard dropped
            self._sorted = np.empty(0, dtype="S64")
            self._shard_of = self._row_of = np.empty(0, dtype=np.int32)
        self._stale = False

    def _lookup(self, hashes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised lookup: (positions into the sorted index, found mask) for each requested hash."""
        self._index()
        query = np.asarray(list(hashes), dtype="S64")
        if len(self._sorted) == 0:
            return np.zeros(len(query), dtype=np.int64), np.zeros(len(query), dtype=bool)
        pos = np.minimum(np.searchsorted(self._sorted, query), len(self._sorted) - 1)
        return pos, self._sorted[pos] == query

    def __len__(self) -> int:
        self._index()
        return len(self._sorted)

    # ---- the contract --------------------------------------------------------------------------------

    def missing(self, hashes: Iterable[str]) -> list[str]:
        """The hashes not in the cache: unique, in first-seen order."""
        unique = list(dict.fromkeys(hashes))
        _, found = self._lookup(unique)
        return [h for h, ok in zip(unique, found) if not ok]

    def write_shard(self, hashes: Sequence[str], vectors: np.ndarray) -> str:
        """Publish one shard (objects first, manifest last) and add it to this instance's index.

        Idempotent: writing the same rows again publishes the same shard id and changes nothing.

        Returns:
            The shard id.
        """
        hashes = list(hashes)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(hashes) or not hashes:
            raise ValueError(f"need a non-empty [rows, dim] array with one hash per row; got {vectors.shape} "
                             f"for {len(hashes)} hashes")
        bad = next((h for h in hashes if not isinstance(h, str) or not _HEX64.fullmatch(h)), None)
        if bad is not None:
            raise ValueError(f"row hashes must be 64 lowercase hex chars (text_sha256); got {bad!r}")
        if not np.isfinite(vectors).all():
            raise ValueError("vectors contain NaN/inf: refusing to cache them (check the encoder's dtype)")
        hashes_txt = ("\n".join(hashes) + "\n").encode("ascii")
        buffer = io.BytesIO()
        np.save(buffer, vectors, allow_pickle=False)
        vectors_npy = buffer.getvalue()
        shard = _Shard("", len(hashes), vectors.shape[1], _sha(hashes_txt), _sha(vectors_npy))
        shard.id = _sha(f"{shard.hashes_sha256}:{shard.vectors_sha256}".encode())
        try:
            self.store.publish(
                self._shard_prefix(shard.id),
                {"hashes.txt": hashes_txt, "vectors.npy": vectors_npy},
                {"rows": shard.rows, "dim": shard.dim, "cache": self.spec},
            )
        except ConflictError:
            log.debug("shard %s already published (a retried write): nothing to do", shard.id)
        if self._shards is not None and all(s.id != shard.id for s in self._shards):
            self._add(shard, np.asarray(hashes, dtype="S64"))
        # (when the index was never loaded, the first read lists S3 and finds this shard there)
        return shard.id

    def read(self, hashes: Sequence[str], out=None) -> np.ndarray:
        """Vectors for ``hashes`` in the given order, float32 [n, dim].

        Only the shards holding requested rows are downloaded, a few at a time, each verified against its
        name, and dropped once its rows are copied out: memory stays ~ output + a few shards.

        Args:
            out: where to put the rows instead of a new array: anything with ``out[positions] = vectors`` and
                ``len(out) == len(hashes)``, e.g. a :class:`~adaptflow.rowfile.RowFile` (then memory stays ~ a
                few shards). Returned.

        Raises:
            KeyError: some hashes are not cached (the message counts them and shows the first).
            CacheIntegrityError: a shard's bytes do not match its id or manifest.
        """
        hashes = list(hashes)
        pos, found = self._lookup(hashes)
        if not found.all():
            first = hashes[int(np.argmin(found))]
            raise KeyError(f"{int((~found).sum())} of {len(hashes)} rows are not in the embedding cache {self.uri} "
                           f"(first: {first}); encode them (see missing()) before reading")
        if not hashes:
            dims = {s.dim for s in self._shards}
            return np.zeros((0, dims.pop() if len(dims) == 1 else 0), dtype=np.float32)
        shard_no, rows = self._shard_of[pos], self._row_of[pos]
        # group the requested rows by shard with one argsort instead of a pass over all rows per shard
        order = np.argsort(shard_no, kind="stable")
        needed, starts = np.unique(shard_no[order], return_index=True)
        groups = np.split(order, starts[1:])
        dims = {self._shards[s].dim for s in needed}
        if len(dims) != 1:
            raise CacheIntegrityError(f"{self.uri}: shards disagree on the vector width ({sorted(dims)})")
        dim = dims.pop()
        if out is None:
            out = np.empty((len(hashes), dim), dtype=np.float32)
        elif len(out) != len(hashes) or out.shape[1] != dim:
            raise ValueError(f"out is {tuple(out.shape)}; need ({len(hashes)}, {dim})")
        with ThreadPoolExecutor(_THREADS) as pool:
            for w in range(0, len(needed), _THREADS):  # a window of downloads in flight bounds memory
                window = [self._shards[s] for s in needed[w : w + _THREADS]]
                for shard_vectors, sel in zip(pool.map(self._load_vectors, window), groups[w : w + _THREADS]):
                    out[sel] = shard_vectors[rows[sel]]
        return out

    def _load_vectors(self, shard: _Shard) -> np.ndarray:
        body = self.store.get_bytes(f"{self._shard_prefix(shard.id)}/vectors.npy")
        self._check(shard, vectors_sha256=_sha(body))
        vectors = np.load(io.BytesIO(body), allow_pickle=False)
        if vectors.dtype != np.float32 or vectors.shape != (shard.rows, shard.dim):
            raise CacheIntegrityError(self._problem(shard, f"vectors.npy is {vectors.dtype}{list(vectors.shape)}"))
        return vectors

    # ---- integrity -----------------------------------------------------------------------------------

    def _check(self, shard: _Shard, *, hashes_sha256: str | None = None, vectors_sha256: str | None = None) -> None:
        """Bytes must match the manifest, and the manifest must match the shard's content-derived id."""
        if _sha(f"{shard.hashes_sha256}:{shard.vectors_sha256}".encode()) != shard.id:
            raise CacheIntegrityError(self._problem(shard, "its manifest does not match the shard id"))
        for name, got, want in (("hashes.txt", hashes_sha256, shard.hashes_sha256),
                                ("vectors.npy", vectors_sha256, shard.vectors_sha256)):
            if got is not None and got != want:
                raise CacheIntegrityError(self._problem(shard, f"{name} sha256 {got[:12]}... != {want[:12]}..."))

    def _problem(self, shard: _Shard, what: str) -> str:
        return (f"embedding cache shard {self.store.uri(self._shard_prefix(shard.id))} is corrupt: {what}. "
                f"Drop it (EmbeddingCache.drop_shard('{shard.id}'), or delete that prefix) and re-run: "
                "its rows will be encoded again.")

    def drop_shard(self, shard_id: str) -> None:
        """Delete a shard, manifest first (readers stop seeing it at once), then its objects."""
        prefix = self._shard_prefix(shard_id)
        self.store.delete(f"{prefix}/{MANIFEST}")
        for key in list(self.store.list_keys(f"{prefix}/")):
            self.store.delete(key)
        self._shards = None  # reload on next use
        self._stale = True
