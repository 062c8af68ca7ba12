"""Per-row embedding cache in S3: (encoder digest, max_length, pooling, dtype, text sha256) -> float32 vector.

Layout under ``embeddings/<key[:24]>/`` (``key`` = sha256 of the canonical settings JSON, so a different
encoder snapshot, truncation, pooling or dtype can never serve a stale vector)::

    shards/<shard-id>/vectors.npy      float32 [rows, dim]
    shards/<shard-id>/hashes.txt       one text sha256 per row, same order
    shards/<shard-id>/_manifest.json   written last (If-None-Match): a shard exists exactly when this does
    corrupt/<shard-id>/_manifest.json  a marker: that shard failed its check and is ignored (meta: the reason)
    index/CURRENT, index/<gen>-<w>.npz the compacted index: sorted row digests -> (shard, row) + the shard table

A shard is immutable and content-addressed: ``shard-id = sha256("<sha256(hashes.txt)>:<sha256(vectors.npy)>")``
(``...:<salt>`` for a shard re-written with the same content as a marked one: ``meta.salt`` in its manifest).
A retried write publishes the same id and is a no-op; a crashed write leaves objects without a manifest, which
readers ignore; and a reader can check a downloaded shard against its own name, not only its manifest.

A shard that fails its check (bit rot, a bad overwrite, a tampered manifest) is never served and never blocks a
run: the reader records a marker (a worker may write but not delete), drops the shard from its index, and the
embed stage encodes its rows again into a new shard (``verify``). ``adaptflow cache verify --repair``, run by an
identity allowed to delete, removes marked and corrupt shards and the objects of crashed writes (``audit``).

Loading the index costs two GETs (the pointer and one generation, :mod:`adaptflow.cache_index`), a LIST of the
shard objects (keys and ETags, 1000 a request) and one of the markers, plus two GETs for each shard published
since that generation: a run's requests follow what changed, not everything ever cached. More than
``COMPACT_AFTER`` such shards, or :meth:`EmbeddingCache.compact` (the embed stage calls it after writing), write
a new generation. The index is additive: readers of ``FORMAT_VERSION`` 2 without it still list the shards, and
shards they write are merged by the next reader that has it, so the version (and every cache key) stays 2.
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

from adaptflow.cache_index import Generation, IndexStore, RowIndex, ShardRecord, to_digests, to_hex
from adaptflow.store import MANIFEST, ArtifactStore, ConflictError, NotFoundError, StoreError

log = logging.getLogger(__name__)

# 2: corrupt-shard markers and salted replacement shards (a version-1 reader would fail on a salted shard's id)
FORMAT_VERSION = 2
MARKERS = "corrupt"  # embeddings/<key>/corrupt/<shard-id>/_manifest.json
_HEX64 = re.compile(r"[0-9a-f]{64}")
THREADS = 8  # parallel GETs when loading the index or shards: S3 latency, not bandwidth, is the limit
COMPACT_AFTER = 16  # shards outside the index (2 GETs each per load) before a load writes a new generation
COMPACT_TRIES = 5  # pointer races lost in a row before a compaction gives up (the shards stay listed: no loss)


class CacheIntegrityError(RuntimeError):
    """A shard's bytes do not match its name or manifest (tampered or corrupted).

    Not transient: a retry downloads the same bytes, so ``tasks/policy.py`` never retries it. ``shard`` is the
    shard's id (None when the problem is not one shard's) and ``reason`` the short description.
    """

    def __init__(self, message: str, *, shard: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.shard, self.reason = shard, reason or message


def text_sha256(text: str) -> str:
    """The row key: sha256 hex of the text's UTF-8 bytes (texts are NFC-normalised upstream by data.py)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_key(*, encoder_digest: str, max_length: int, pooling: str, dtype: str,
              adapter_digest: str | None = None) -> str:
    """sha256 hex of the canonical JSON of everything that changes a vector (an adapter merged into the encoder
    adds its digest: an adapted encoder's vectors never share a key with the frozen one's)."""
    spec = {
        "encoder_digest": encoder_digest,
        "max_length": int(max_length),
        "pooling": pooling,
        "dtype": dtype,
        "format": FORMAT_VERSION,
    }
    if adapter_digest:
        spec["adapter_digest"] = adapter_digest
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shard_id(hashes_sha256: str, vectors_sha256: str, salt: int = 0) -> str:
    """A shard's content-derived id (``salt`` > 0 only for a re-write of a marked shard's content)."""
    return _sha(f"{hashes_sha256}:{vectors_sha256}{f':{salt}' if salt else ''}".encode())


_Shard = ShardRecord  # a published shard as its checked manifest (or the index) describes it


@dataclass(frozen=True)
class CorruptShard:
    """A shard the cache ignores: it failed its check now, or a marker says an earlier reader found it corrupt.

    ``hashes``: the rows it claims to hold (from its hashes.txt, unverified; empty when unreadable).
    """

    id: str
    reason: str
    hashes: tuple[str, ...] = ()


# ---- checks shared by the reader and the audit ------------------------------------------------------------


def _get(store: ArtifactStore, key: str) -> bytes:
    try:
        return store.get_bytes(key)
    except NotFoundError:  # listed in a published manifest, yet gone
        raise CacheIntegrityError(f"{key.rsplit('/', 1)[-1]} is missing") from None


def _read_manifest(store: ArtifactStore, prefix: str) -> dict | None:
    """A shard's manifest (None: not published, or deleted since it was listed)."""
    try:
        body = store.get_bytes(f"{prefix}/{MANIFEST}")
    except NotFoundError:
        return None
    try:
        manifest = json.loads(body)
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
        return manifest
    except ValueError as exc:
        raise CacheIntegrityError(f"its {MANIFEST} is not valid JSON ({exc})") from None


def _shard_from_manifest(shard: str, manifest: dict) -> _Shard:
    """The shard its manifest describes, checked against the content-derived id."""
    try:
        objects, meta = manifest["objects"], manifest.get("meta", {})
        described = _Shard(shard, int(meta["rows"]), int(meta["dim"]), str(objects["hashes.txt"]["sha256"]),
                           str(objects["vectors.npy"]["sha256"]), int(meta.get("salt", 0)),
                           str(meta.get("vectors_md5", "")))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CacheIntegrityError(f"its manifest lacks {exc}") from None
    if shard_id(described.hashes_sha256, described.vectors_sha256, described.salt) != shard:
        raise CacheIntegrityError("its manifest does not match the shard id")
    return described


def _parse_hashes(shard: _Shard, body: bytes) -> np.ndarray:
    got = _sha(body)
    if got != shard.hashes_sha256:
        raise CacheIntegrityError(f"hashes.txt sha256 {got[:12]}... != {shard.hashes_sha256[:12]}...")
    try:
        hashes = to_digests(body.decode("ascii").split())
    except ValueError:
        raise CacheIntegrityError("hashes.txt holds something other than sha256 hex digests") from None
    if len(hashes) != shard.rows:
        raise CacheIntegrityError(f"hashes.txt has {len(hashes)} rows, manifest {shard.rows}")
    return hashes  # S32 digests, in row order


def _parse_vectors(shard: _Shard, body: bytes) -> np.ndarray:
    got = _sha(body)
    if got != shard.vectors_sha256:
        raise CacheIntegrityError(f"vectors.npy sha256 {got[:12]}... != {shard.vectors_sha256[:12]}...")
    vectors = np.load(io.BytesIO(body), allow_pickle=False)
    if vectors.dtype != np.float32 or vectors.shape != (shard.rows, shard.dim):
        raise CacheIntegrityError(f"vectors.npy is {vectors.dtype}{list(vectors.shape)}")
    return vectors


def _fetch_checked(store: ArtifactStore, key: str, parse):
    """``parse(bytes of key)``; a failed check is re-downloaded once (a transfer fault heals, corruption not)."""
    try:
        return parse(_get(store, key))
    except CacheIntegrityError:
        log.debug("%s failed its check: downloading it once more", store.uri(key))
        return parse(_get(store, key))


def _claimed_rows(store: ArtifactStore, prefix: str) -> tuple[str, ...]:
    """The row hashes a shard's hashes.txt lists, unverified (for counting what a corrupt shard held)."""
    try:
        text = store.get_bytes(f"{prefix}/hashes.txt").decode("ascii", errors="replace")
    except StoreError:
        return ()
    return tuple(h for h in text.split() if _HEX64.fullmatch(h))


def check_shard(store: ArtifactStore, prefix: str) -> str | None:
    """Download and fully check the published shard at ``prefix``; None when sound, else why it is corrupt."""
    try:
        manifest = _read_manifest(store, prefix)
        if manifest is None:
            return None  # deleted since it was listed
        shard = _shard_from_manifest(prefix.rsplit("/", 1)[-1], manifest)
        _fetch_checked(store, f"{prefix}/hashes.txt", lambda body: _parse_hashes(shard, body))
        _fetch_checked(store, f"{prefix}/vectors.npy", lambda body: _parse_vectors(shard, body))
    except CacheIntegrityError as exc:
        return exc.reason
    return None


class EmbeddingCache:
    """Vectors for one (encoder, max_length, pooling, dtype), keyed by text sha256, stored as S3 shards.

    Args:
        store: the artifact store holding ``embeddings/``.
        encoder_digest: ``ResolvedEncoder.digest`` of the encoder snapshot.
        max_length: truncation length used when tokenizing.
        pooling: ``"mean"`` or ``"cls"``.
        dtype: the resolved compute dtype, ``"fp32"`` or ``"bf16"`` (vectors are stored float32 either way).
        adapter_digest: ``adaptflow.adapters.adapter_digest`` of a LoRA adapter merged into the encoder, or None.
    """

    def __init__(self, store: ArtifactStore, *, encoder_digest: str, max_length: int, pooling: str, dtype: str,
                 adapter_digest: str | None = None):
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls'; got {pooling!r}")
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be the resolved 'fp32' or 'bf16' (not {dtype!r}); use embed.resolve_dtype")
        if not encoder_digest:
            raise ValueError("encoder_digest is empty: pass ResolvedEncoder.digest")
        self.store = store
        self.spec = {"encoder_digest": encoder_digest, "max_length": int(max_length), "pooling": pooling,
                     "dtype": dtype, "format": FORMAT_VERSION, **({"adapter_digest": adapter_digest} if adapter_digest else {})}
        self.key = cache_key(encoder_digest=encoder_digest, max_length=max_length, pooling=pooling, dtype=dtype,
                             adapter_digest=adapter_digest)
        self.prefix = f"embeddings/{self.key[:24]}"
        # In-memory index, loaded on first use: shard list + row digests sorted -> (shard number, row).
        self._shards: list[_Shard] | None = None
        self._rows = RowIndex()
        self._pending: list[tuple[int, np.ndarray]] = []  # (shard number, S32 digests) not merged yet: writes
        self._corrupt: dict[str, CorruptShard] = {}  # ignored shards: marked earlier, or found corrupt by this one
        self._index_store = IndexStore(store, self.prefix)
        self._generation = 0  # the generation loaded (0: none)
        self._pointer_etag: str | None = None  # the index pointer's ETag when it was read (None: no pointer)
        self._changed = 0  # shards added to or dropped from the loaded generation: what a compaction would record

    def __repr__(self) -> str:
        return f"EmbeddingCache({self.store.uri(self.prefix)}, {self.spec})"

    @property
    def uri(self) -> str:
        return self.store.uri(self.prefix)

    def _shard_prefix(self, shard: str) -> str:
        return f"{self.prefix}/shards/{shard}"

    def _marker_prefix(self, shard: str) -> str:
        return f"{self.prefix}/{MARKERS}/{shard}"

    # ---- index ---------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Reload the index from S3 (picks up shards that other writers published since).

        The compacted index (two GETs) and one LIST of the shards and one of the markers; only the shards the
        index lacks are downloaded (manifest + hashes.txt). A marked shard is skipped unread, and a shard whose
        manifest or hashes.txt fails its check is marked and skipped: it never blocks the run. More than
        ``COMPACT_AFTER`` shards outside the index: a new generation is written (best effort).
        """
        self._load()
        if self._changed > COMPACT_AFTER:
            self.compact()

    def _load(self) -> None:
        gen, self._pointer_etag = self._index_store.read()
        if gen is not None and any(shard_id(s.hashes_sha256, s.vectors_sha256, s.salt) != s.id for s in gen.shards):
            log.warning("cache index %s names a shard that does not match its id: rebuilding from the shards",
                        self.store.uri(self._index_store.prefix))
            gen = None
        self._generation = gen.number if gen is not None else 0
        listed = self._list_shards()  # shard id -> its vectors.npy ETag, for every published (manifest) shard
        marked = {k.split("/")[-2] for k in self.store.list_keys(f"{self._marker_prefix('')}")
                  if k.endswith(f"/{MANIFEST}")}
        shards, in_gen = [], {}
        number = np.full(len(gen.shards) if gen is not None else 0, -1, dtype=np.int64)
        for n, shard in enumerate(gen.shards if gen is not None else []):
            in_gen[shard.id] = n
            if shard.id in listed and shard.id not in marked:
                shard.vectors_etag = listed[shard.id]
                number[n] = len(shards)
                shards.append(shard)
        rows = gen.rows.renumber(number) if gen is not None else RowIndex()
        kept = {s.id for s in shards}
        new = [i for i in listed if i not in marked and i not in kept]
        # objects without a manifest (a crashed write) are simply not listed here: they are invisible
        with ThreadPoolExecutor(THREADS) as pool:
            loaded = list(pool.map(self._load_shard_index, new))
            # what a marked shard claimed, to count the rows encoded again in its place (from the index, else
            # one small GET each)
            known = [i for i in listed if i in marked]
            claimed = list(pool.map(lambda i: tuple(to_hex(gen.rows.rows_of(in_gen[i]))) if i in in_gen
                                    else _claimed_rows(self.store, self._shard_prefix(i)), known))
        self._shards, self._rows, self._pending = shards, rows, []
        self._changed = (len(gen.shards) - len(shards)) if gen is not None else 0
        self._corrupt = {i: CorruptShard(i, "marked corrupt by an earlier reader", held)
                         for i, held in zip(known, claimed)}
        for item in filter(None, loaded):
            if isinstance(item, CorruptShard):
                self._mark(item)
            else:
                item[0].vectors_etag = listed[item[0].id]
                self._add(*item)
        log.debug("embedding cache %s: generation %d, %d shards (%d loaded outside it), %d rows, %d corrupt ignored",
                  self.uri, self._generation, len(self._shards), len(self._pending), len(self._rows) +
                  sum(len(h) for _, h in self._pending), len(self._corrupt))

    def _list_shards(self) -> dict[str, str]:
        """Every published shard (one with a manifest) -> its vectors.npy ETag as listed ("" when absent)."""
        shard_dir, found = f"{self.prefix}/shards/", {}
        for obj in self.store.list_objects(shard_dir):
            shard, _, name = obj["Key"][len(shard_dir) :].partition("/")
            entry = found.setdefault(shard, [False, ""])
            if name == MANIFEST:
                entry[0] = True
            elif name == "vectors.npy":
                entry[1] = str(obj.get("ETag", "")).strip('"')
        return {shard: etag for shard, (published, etag) in found.items() if published}

    def _load_shard_index(self, shard_id: str) -> tuple[_Shard, np.ndarray] | CorruptShard | None:
        prefix = self._shard_prefix(shard_id)
        try:
            manifest = _read_manifest(self.store, prefix)
            if manifest is None:  # listed, then deleted (`adaptflow cache verify --repair` in another process)
                return None
            shard = _shard_from_manifest(shard_id, manifest)
            return shard, _fetch_checked(self.store, f"{prefix}/hashes.txt", lambda body: _parse_hashes(shard, body))
        except CacheIntegrityError as exc:
            return CorruptShard(shard_id, exc.reason, _claimed_rows(self.store, prefix))

    def _add(self, shard: _Shard, digests: np.ndarray) -> None:
        self._pending.append((len(self._shards), digests))
        self._shards.append(shard)
        self._changed += 1

    def _merge_pending(self) -> None:
        if self._pending:
            numbers, digests = zip(*self._pending)
            self._rows = self._rows.merge(RowIndex.of_shards(numbers, digests))
            self._pending = []

    def _mark(self, corrupt: CorruptShard) -> None:
        """Ignore a corrupt shard from now on: drop it from the index and record a marker for other readers."""
        self._corrupt[corrupt.id] = corrupt
        if self._shards is not None and any(s.id == corrupt.id for s in self._shards):
            self._merge_pending()
            number = np.full(len(self._shards), -1, dtype=np.int64)
            keep = [i for i, s in enumerate(self._shards) if s.id != corrupt.id]
            number[keep] = np.arange(len(keep))
            self._rows = self._rows.renumber(number)
            self._shards = [self._shards[i] for i in keep]
            self._changed += 1
        log.warning("embedding cache shard %s is corrupt (%s): ignored, its %d rows are encoded again; "
                    "`adaptflow cache verify --repair` removes it", self.store.uri(self._shard_prefix(corrupt.id)),
                    corrupt.reason, len(corrupt.hashes))
        try:  # a marker, not a delete: workers may write but not delete (infra/s3-worker-policy.json)
            self.store.publish(self._marker_prefix(corrupt.id), {}, {
                "shard": corrupt.id, "reason": corrupt.reason, "rows": len(corrupt.hashes), "cache": self.spec})
        except ConflictError:
            pass  # another reader marked it first
        except StoreError as exc:  # this instance ignores it anyway; the next reader finds it again
            log.warning("could not record the corrupt-shard marker for %s: %s", corrupt.id, exc)

    def compact(self) -> bool:
        """Record every shard this instance serves as a new index generation, if that differs from the loaded one.

        The generation object is written under a new name first, then the pointer is moved with If-Match on the
        ETag read at load time. When another writer moved it meanwhile, this instance reloads (their generation
        plus the LIST, which finds this instance's shards) and tries again, so neither writer's shards are lost.
        Best effort: a refused write (no permission, a fault) is logged and the shards stay found by the LIST.

        Returns:
            True when a new generation became current.
        """
        if self._shards is None:
            self._load()
        for _ in range(COMPACT_TRIES):
            if self._changed == 0:
                return False
            self._merge_pending()
            gen = Generation(self._generation + 1, list(self._shards), self._rows)
            try:
                self._pointer_etag = self._index_store.write(gen, self._pointer_etag)
            except ConflictError:
                log.info("cache index %s moved by another writer: reloading and merging", self.uri)
                self._load()
                continue
            except StoreError as exc:
                log.warning("could not write the cache index for %s (the shards are still listed and served): %s",
                            self.uri, exc)
                return False
            self._generation, self._changed = gen.number, 0
            log.debug("cache index %s: generation %d, %d shards, %d rows", self.uri, gen.number, len(gen.shards),
                      len(gen.rows))
            return True
        log.warning("cache index %s: gave up after %d lost races (the shards are still listed and served)",
                    self.uri, COMPACT_TRIES)
        return False

    @property
    def corrupt_shards(self) -> list[CorruptShard]:
        """The shards this instance ignores: marked by an earlier reader, or found corrupt since its index loaded."""
        self._index()
        return list(self._corrupt.values())

    def _index(self) -> None:
        """Load the index on first use; merge in the shards written since."""
        if self._shards is None:
            self.refresh()
        self._merge_pending()

    def _lookup(self, hashes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised lookup: (positions into the sorted index, found mask) for each requested hash."""
        self._index()
        return self._rows.lookup(to_digests(hashes))

    def __len__(self) -> int:
        self._index()
        return self._rows.unique_count()

    # ---- the contract --------------------------------------------------------------------------------

    def missing(self, hashes: Iterable[str]) -> list[str]:
        """The hashes not in the cache: unique, in first-seen order."""
        unique = list(dict.fromkeys(hashes))
        _, found = self._lookup(unique)
        return [h for h, ok in zip(unique, found) if not ok]

    def found(self, digests: np.ndarray) -> np.ndarray:
        """Per row, whether the cache holds it: ``digests`` an ``S32`` array (``adaptflow.row_keys``), the form
        that keeps millions of rows at 32 bytes each, with no Python object per row."""
        return self._lookup(digests)[1]

    def write_shard(self, hashes: Sequence[str], vectors: np.ndarray) -> str:
        """Publish one shard (objects first, manifest last) and add it to this instance's index.

        Idempotent: writing the same rows again publishes the same shard id and changes nothing.

        Returns:
            The shard id.
        """
        digests = hashes if isinstance(hashes, np.ndarray) and hashes.dtype == np.dtype("S32") else None
        hashes = to_hex(digests) if digests is not None else list(hashes)
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
        md5 = hashlib.md5(vectors_npy, usedforsecurity=False).hexdigest()
        shard = _Shard("", len(hashes), vectors.shape[1], _sha(hashes_txt), _sha(vectors_npy), vectors_md5=md5,
                       vectors_etag=md5)  # just written: as good as checked
        while True:
            # the same content as a marked shard (its rows encoded again, bit for bit) cannot reuse that id:
            # its manifest exists, so publishing would be a no-op; a salt makes a new id, still checkable
            shard.id = shard_id(shard.hashes_sha256, shard.vectors_sha256, shard.salt)
            if shard.id in self._corrupt:
                shard.salt += 1
                continue
            try:
                self.store.publish(
                    self._shard_prefix(shard.id),
                    {"hashes.txt": hashes_txt, "vectors.npy": vectors_npy},
                    {"rows": shard.rows, "dim": shard.dim, "cache": self.spec, "vectors_md5": md5,
                     **({"salt": shard.salt} if shard.salt else {})},
                )
            except ConflictError:
                if self._shards is None:  # is the published one a marked shard? only the index knows
                    self._index()
                    if shard.id in self._corrupt:
                        continue
                log.debug("shard %s already published (a retried write): nothing to do", shard.id)
            break
        if self._shards is not None and all(s.id != shard.id for s in self._shards):
            self._add(shard, digests if digests is not None else to_digests(hashes))
        # (when the index was never loaded, the first read lists S3 and finds this shard there)
        return shard.id

    def verify(self, hashes: Iterable[str]) -> list[CorruptShard]:
        """Check every shard holding one of ``hashes``; what the embed stage calls before trusting the cache.

        A shard whose vectors.npy the index's LIST reported with the MD5 ETag its manifest recorded at write
        time is as written (no request); any other (overwritten, or an ETag that is no plain MD5: multipart,
        SSE-KMS) is downloaded and checked against its sha256, in parallel, ~``THREADS`` shards in memory.
        A corrupt shard is marked and dropped from the index, so its rows show up in :meth:`missing` and are
        encoded again instead of failing a later read. (Bit rot under an unchanged ETag is still caught by
        :meth:`read`'s sha256 check: that read fails, the shard is marked, and the next run heals it.)

        Returns:
            The shards found corrupt by this call (see :attr:`corrupt_shards` for all that are ignored).
        """
        pos, found = self._lookup(hashes if isinstance(hashes, np.ndarray) else list(hashes))
        needed = np.unique(self._rows.shard_of[pos[found]])
        work = [i for i in needed
                if not self._shards[i].vectors_md5 or self._shards[i].vectors_etag != self._shards[i].vectors_md5]

        def check(number: int) -> CorruptShard | None:
            shard = self._shards[number]
            try:
                self._load_vectors(shard)
            except CacheIntegrityError as exc:
                return CorruptShard(shard.id, exc.reason, tuple(to_hex(self._rows.rows_of(number))))
            return None

        with ThreadPoolExecutor(THREADS) as pool:
            bad = [c for c in pool.map(check, work) if c is not None]
        for corrupt in bad:
            self._mark(corrupt)
        return bad

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
        hashes = hashes if isinstance(hashes, np.ndarray) else list(hashes)  # S32 digests stay one array
        pos, found = self._lookup(hashes)
        if not found.all():
            first = to_hex(to_digests(hashes[int(np.argmin(found)) :][:1]))[0]
            raise KeyError(f"{int((~found).sum())} of {len(hashes)} rows are not in the embedding cache {self.uri} "
                           f"(first: {first}); encode them (see missing()) before reading")
        if len(hashes) == 0:
            dims = {s.dim for s in self._shards}
            return np.zeros((0, dims.pop() if len(dims) == 1 else 0), dtype=np.float32)
        shard_no, rows = self._rows.shard_of[pos], self._rows.row_of[pos]
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
        with ThreadPoolExecutor(THREADS) as pool:
            for w in range(0, len(needed), THREADS):  # a window of downloads in flight bounds memory
                window = [self._shards[s] for s in needed[w : w + THREADS]]
                try:
                    for shard_vectors, sel in zip(pool.map(self._load_vectors, window), groups[w : w + THREADS]):
                        out[sel] = shard_vectors[rows[sel]]
                except CacheIntegrityError as exc:  # corrupt since the embed stage checked it: mark, then fail
                    shard = next(s for s in window if s.id == exc.shard)
                    rows_held = to_hex(self._rows.rows_of(self._shards.index(shard)))
                    self._mark(CorruptShard(shard.id, exc.reason, tuple(rows_held)))
                    raise
        return out

    def _load_vectors(self, shard: _Shard) -> np.ndarray:
        try:
            return _fetch_checked(self.store, f"{self._shard_prefix(shard.id)}/vectors.npy",
                                  lambda body: _parse_vectors(shard, body))
        except CacheIntegrityError as exc:
            raise CacheIntegrityError(self._problem(shard, exc.reason), shard=shard.id, reason=exc.reason) from None

    # ---- integrity -----------------------------------------------------------------------------------

    def _problem(self, shard: _Shard, what: str) -> str:
        return (f"embedding cache shard {self.store.uri(self._shard_prefix(shard.id))} is corrupt: {what}. It is "
                "now marked and ignored: re-run, and the embed stage encodes its rows again. "
                "`adaptflow cache verify --repair` (by an identity allowed to delete) removes it.")

    def drop_shard(self, shard: str) -> None:
        """Delete a shard, manifest first (readers stop seeing it at once), then its objects and its marker.

        Needs ``s3:DeleteObject`` (workers lack it); ``adaptflow cache verify --repair`` does this for every
        corrupt shard.
        """
        for prefix in (self._shard_prefix(shard), self._marker_prefix(shard)):
            self.store.delete(f"{prefix}/{MANIFEST}")
            for key in list(self.store.list_keys(f"{prefix}/")):
                self.store.delete(key)
        self._shards = None  # reload on next use
