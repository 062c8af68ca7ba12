"""The compacted index of one embedding cache: every indexed row's text sha256 -> (shard, row), in one S3 object.

Without it a reader lists every shard and downloads every ``hashes.txt``: a run's cost grows with everything
ever cached. With it a reader GETs a small pointer and one generation object, LISTs the shard manifests (keys
and ETags, 1000 a request) and downloads only the shards published since that generation was written.

Layout under ``embeddings/<key[:24]>/index/``::

    <generation:012d>-<writer>.npz   one generation: np.savez (no pickles), written once (If-None-Match)
    CURRENT                          JSON pointer {generation, object, sha256, size, shards, rows}; replaced
                                     only with If-Match on the ETag its writer read (If-None-Match when absent)

A generation holds the rows sorted by their 32-byte binary digest (``S32``, duplicates kept: a row written
twice by two racing runs is served by whichever shard is still sound), each row's shard number and row in
that shard, and the shard table: id, rows, dim, and the sha256s, salt and MD5 its manifest recorded when it was
checked (the id is content-derived, so the reader re-derives it from these: a manifest tampered with later
changes nothing the index serves, and vectors are still checked against the sha256 on every read).

Why it is safe: a shard exists exactly when its manifest does, and readers LIST the manifests on every load,
so an index is only ever a shortcut to shards that are listed; it never hides one. A writer that crashes
after writing a generation object but before moving the pointer leaves the previous generation current; two
writers racing on the pointer cannot both win (the loser reloads, merges its shards in and tries again), and a
shard missing from every generation is still found by the LIST and merged at the next compaction.
Old generations stay (workers may write, not delete); ``adaptflow cache verify --repair`` removes superseded
ones older than its age limit.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from adaptflow.store import ArtifactStore, NotFoundError

log = logging.getLogger(__name__)

INDEX = "index"  # embeddings/<key>/index/
CURRENT = "CURRENT"
INDEX_FORMAT = 1  # the layout of a generation object; a reader ignores (and the next compaction replaces) others
DIGEST = "S32"


# ---- digests ------------------------------------------------------------------------------------------------


def to_digests(hashes: Iterable[str] | np.ndarray) -> np.ndarray:
    """Hex sha256 strings (or an ``S64`` array of them, or ``S32`` digests) as an ``S32`` array of raw digests.

    Raises:
        ValueError: something that is not 64 hex characters.
    """
    if isinstance(hashes, np.ndarray) and hashes.dtype == np.dtype(DIGEST):
        return hashes
    if isinstance(hashes, np.ndarray) and hashes.dtype == np.dtype("S64"):
        joined = hashes.tobytes().decode("ascii")
    else:
        hashes = list(hashes)
        joined = "".join(hashes)
        if len(joined) != 64 * len(hashes):
            raise ValueError("row hashes must be 64 hex chars (text_sha256)")
    return np.frombuffer(bytes.fromhex(joined), dtype=DIGEST) if joined else np.empty(0, dtype=DIGEST)


def to_hex(digests: np.ndarray) -> list[str]:
    """``S32`` digests back to hex strings (through the raw bytes: an element read alone loses trailing NULs)."""
    return _hex(digests, 32)


def _hex(raw: np.ndarray, width: int) -> list[str]:
    text = np.ascontiguousarray(raw, dtype=f"S{width}").tobytes().hex()
    return [text[i : i + 2 * width] for i in range(0, len(text), 2 * width)]


# ---- the shard table and the sorted rows ---------------------------------------------------------------------


@dataclass
class ShardRecord:
    """One published shard as its (checked) manifest describes it; ``vectors_etag`` is what the latest LIST said."""

    id: str
    rows: int
    dim: int
    hashes_sha256: str
    vectors_sha256: str
    salt: int = 0
    vectors_md5: str = ""  # recorded at write time: a listed ETag equal to it means vectors.npy is as written
    vectors_etag: str = ""  # from the LIST; not stored in a generation


@dataclass
class RowIndex:
    """Rows sorted by digest (stable: the earlier shard's copy of a duplicate first) -> (shard number, row)."""

    hashes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=DIGEST))
    shard_of: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))
    row_of: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))

    def __len__(self) -> int:
        return len(self.hashes)

    @classmethod
    def of_shards(cls, numbers: Sequence[int], hashes: Sequence[np.ndarray]) -> RowIndex:
        """The rows of whole shards (``S32`` digests in each shard's row order; ``numbers[i]`` is shard i's)."""
        if not hashes:
            return cls()
        allh = np.concatenate(hashes)
        shard_no = np.repeat(np.asarray(numbers, dtype=np.int32), [len(h) for h in hashes])
        rows = np.concatenate([np.arange(len(h), dtype=np.int32) for h in hashes])
        order = np.argsort(allh, kind="stable")
        return cls(allh[order], shard_no[order], rows[order])

    def merge(self, other: RowIndex) -> RowIndex:
        """Both indexes' rows, sorted; on equal digests this one's rows first. O(len(self) + len(other))."""
        if len(other) == 0:
            return self
        at = np.searchsorted(self.hashes, other.hashes, side="right")
        return RowIndex(np.insert(self.hashes, at, other.hashes), np.insert(self.shard_of, at, other.shard_of),
                        np.insert(self.row_of, at, other.row_of))

    def renumber(self, new_number: np.ndarray) -> RowIndex:
        """Shard ``i`` becomes ``new_number[i]``; the rows of shards mapped to -1 are dropped."""
        if len(self.shard_of) == 0:
            return self
        mapped = new_number[self.shard_of]
        keep = mapped >= 0
        return RowIndex(self.hashes[keep], mapped[keep].astype(np.int32), self.row_of[keep])

    def lookup(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions, found) for ``S32`` digests; a found position is the first copy of that row."""
        if len(self.hashes) == 0:
            return np.zeros(len(query), dtype=np.int64), np.zeros(len(query), dtype=bool)
        # binary search on the digests' first 8 bytes as integers (~20x faster than on 32-byte strings, whose
        # order they share), then the full digest compared; a row sharing those 8 bytes with another (about
        # rows^2 / 2^65 of them) is looked up again on the whole digest
        keys, wanted = _prefix(self.hashes), _prefix(query)
        order = np.argsort(wanted)  # a sorted query walks the index in order: ~4x faster than random probes
        pos = np.empty(len(query), dtype=np.int64)
        pos[order] = np.minimum(np.searchsorted(keys, wanted[order]), len(keys) - 1)
        found = _same(self.hashes[pos], query)
        clash = ~found & (keys[pos] == wanted)
        if clash.any():
            again = np.minimum(np.searchsorted(self.hashes, query[clash]), len(keys) - 1)
            pos[clash], found[clash] = again, _same(self.hashes[again], query[clash])
        return pos, found

    def rows_of(self, shard_no: int) -> np.ndarray:
        """The digests of one shard's indexed rows."""
        return self.hashes[self.shard_of == shard_no]

    def unique_count(self) -> int:
        if len(self.hashes) == 0:
            return 0
        return int(1 + np.count_nonzero(self.hashes[1:] != self.hashes[:-1]))


def _prefix(digests: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each ``S32`` digest as a native uint64 (big-endian read: the same order)."""
    return np.ascontiguousarray(digests, dtype=DIGEST).view(">u8").reshape(-1, 4)[:, 0].astype(np.uint64)


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise equality of two ``S32`` arrays, as 4 integer compares each (bytes compares are ~6x slower)."""
    words = lambda d: np.ascontiguousarray(d, dtype=DIGEST).view(np.uint64).reshape(-1, 4)  # noqa: E731
    return (words(a) == words(b)).all(axis=1)


@dataclass
class Generation:
    """What one generation object holds."""

    number: int
    shards: list[ShardRecord]
    rows: RowIndex


_TABLE_HEX = {"id": 32, "hashes_sha256": 32, "vectors_sha256": 32, "vectors_md5": 16}


def encode_generation(gen: Generation) -> bytes:
    """The generation as an ``.npz`` (``np.savez``, plain arrays only: loads with ``allow_pickle=False``)."""
    arrays = {
        "format": np.array([INDEX_FORMAT, gen.number], dtype=np.int64),
        "hashes": gen.rows.hashes.astype(DIGEST, copy=False),
        "shard_of": gen.rows.shard_of.astype(np.int32, copy=False),
        "row_of": gen.rows.row_of.astype(np.int32, copy=False),
        "shard_rows": np.array([s.rows for s in gen.shards], dtype=np.int64),
        "shard_dim": np.array([s.dim for s in gen.shards], dtype=np.int32),
        "shard_salt": np.array([s.salt for s in gen.shards], dtype=np.int32),
    }
    for name, width in _TABLE_HEX.items():
        raw = b"".join(bytes.fromhex(getattr(s, name) or "00" * width) for s in gen.shards)
        arrays[f"shard_{name}"] = np.frombuffer(raw, dtype=f"S{width}") if raw else np.empty(0, f"S{width}")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode_generation(body: bytes) -> Generation:
    """A generation from its bytes, checked for shape and order (ValueError when it is not one we can use)."""
    with np.load(io.BytesIO(body), allow_pickle=False) as npz:
        a = {name: npz[name] for name in npz.files}
    fmt, number = (int(x) for x in a["format"])
    if fmt != INDEX_FORMAT:
        raise ValueError(f"index format {fmt}, this reader knows {INDEX_FORMAT}")
    hexes = {name: _hex(a[f"shard_{name}"], width) for name, width in _TABLE_HEX.items()}
    hexes["vectors_md5"] = [h if h.strip("0") else "" for h in hexes["vectors_md5"]]  # zeros: none recorded
    n = len(a["shard_rows"])
    shards = [ShardRecord(hexes["id"][i], int(a["shard_rows"][i]), int(a["shard_dim"][i]), hexes["hashes_sha256"][i],
                          hexes["vectors_sha256"][i], int(a["shard_salt"][i]), hexes["vectors_md5"][i])
              for i in range(n)]
    rows = RowIndex(a["hashes"].astype(DIGEST), a["shard_of"].astype(np.int32), a["row_of"].astype(np.int32))
    if not len(rows.hashes) == len(rows.shard_of) == len(rows.row_of):
        raise ValueError("row arrays differ in length")
    if len(rows.hashes) and (rows.shard_of.min() < 0 or rows.shard_of.max() >= n or rows.row_of.min() < 0
                             or (rows.row_of >= a["shard_rows"][rows.shard_of]).any()):
        raise ValueError("a row points outside its shard")
    keys = _prefix(rows.hashes)
    if len(keys) > 1 and (keys[1:] < keys[:-1]).any():
        raise ValueError("rows are not sorted")  # (on the 8-byte prefixes lookups search; a row is found only by
        # its full digest, so no order can make the index serve another row's vector)
    return Generation(number, shards, rows)


# ---- generations in S3 ---------------------------------------------------------------------------------------


class IndexStore:
    """The pointer and generation objects under ``<cache prefix>/index/``."""

    def __init__(self, store: ArtifactStore, cache_prefix: str):
        self.store = store
        self.prefix = f"{cache_prefix}/{INDEX}"

    @property
    def pointer_key(self) -> str:
        return f"{self.prefix}/{CURRENT}"

    def read(self) -> tuple[Generation | None, str | None]:
        """(the current generation or None, the pointer's ETag or None when there is no pointer yet).

        Two GETs. A generation that is missing, fails its sha256 or does not decode is logged and ignored (the
        caller rebuilds from the shards; its compaction then moves the pointer past it).
        """
        for attempt in range(2):
            try:
                body, etag = self.store.get_bytes_and_etag(self.pointer_key)
            except NotFoundError:
                return None, None
            try:
                pointer = json.loads(body)
                name = str(pointer["object"])
                if "/" in name or not name.endswith(".npz"):
                    raise ValueError(f"bad object name {name!r}")
                data = self.store.get_bytes(f"{self.prefix}/{name}")
                if hashlib.sha256(data).hexdigest() != pointer["sha256"]:
                    raise ValueError("its sha256 does not match the pointer")
                gen = decode_generation(data)
                if gen.number != int(pointer["generation"]):
                    raise ValueError("its generation number does not match the pointer")
                return gen, etag
            except NotFoundError:  # removed between the two GETs (superseded, then repaired): read the pointer again
                if attempt == 0:
                    continue
                log.warning("cache index %s points at a missing generation: ignored", self.store.uri(self.prefix))
            except (ValueError, KeyError, TypeError, OSError) as exc:
                log.warning("cache index %s is unusable (%s): rebuilding from the shards", self.store.uri(self.prefix),
                            exc)
            return None, etag
        return None, etag

    def write_generation(self, gen: Generation) -> dict:
        """Write one generation object (a new name, If-None-Match); returns the pointer that would name it.

        Until :meth:`point` moves ``CURRENT`` to it, nothing reads it: a writer that stops here changes nothing.
        """
        body = encode_generation(gen)
        name = f"{gen.number:012d}-{uuid.uuid4().hex[:12]}.npz"
        self.store.put_bytes(f"{self.prefix}/{name}", body, if_none_match=True)
        return {"format": INDEX_FORMAT, "generation": gen.number, "object": name,
                "sha256": hashlib.sha256(body).hexdigest(), "size": len(body), "shards": len(gen.shards),
                "rows": len(gen.rows), "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def point(self, pointer: dict, expected_etag: str | None) -> str:
        """Move ``CURRENT`` to ``pointer`` only if it still has ``expected_etag`` (None: only if absent).

        Returns:
            The pointer's new ETag.

        Raises:
            ConflictError: another writer moved it first.
        """
        body = json.dumps(pointer, sort_keys=True).encode()
        if expected_etag is None:
            return self.store.put_bytes(self.pointer_key, body, if_none_match=True)
        return self.store.put_bytes(self.pointer_key, body, if_match=expected_etag)

    def write(self, gen: Generation, expected_etag: str | None) -> str:
        """Write ``gen`` and make it current (ConflictError when another writer moved the pointer meanwhile)."""
        return self.point(self.write_generation(gen), expected_etag)

    def current_object(self) -> str | None:
        """The key the pointer names (None without a pointer); for the audit."""
        try:
            return f"{self.prefix}/{json.loads(self.store.get_bytes(self.pointer_key))['object']}"
        except NotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None
