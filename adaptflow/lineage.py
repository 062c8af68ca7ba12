"""Row lineage: which rows trained and tested each registered version, and how two versions' rows differ.

Every registered version links (version tag and run tag ``adaptflow.rows_uri``) to a row manifest, one Parquet
file ``lineage/<key>/rows.parquet`` published manifest-last like every stage output. The key is content-derived
(the validated rows and the snapshot they came from), so versions trained on the same rows share one manifest
and a retried registration rewrites nothing. One row per validated train/test row:

| column | meaning |
| --- | --- |
| ``text_sha256`` | sha256 of the normalised text (the embedding cache's row key) |
| ``label`` | the label it was trained / tested with |
| ``split`` | ``train`` or ``test`` |
| ``partition`` | the source partition (file, S3 object, HF dataset) as listed in the ingest snapshot |
| ``row`` | its row in that partition (CSV data row, JSON line, Parquet position; 1-based) |

Texts themselves are not copied: the manifest proves which rows were used without duplicating the data.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

ROWS_TAG = "adaptflow.rows_uri"
ROWS_FILE = "rows.parquet"
ROW_COLUMNS = ["text_sha256", "label", "split", "partition", "row"]


def text_hashes(texts) -> list[str]:
    """sha256 hex per text: ``adaptflow.cache.text_sha256``, the embedding cache's and the gate's row key."""
    from adaptflow.cache import text_sha256

    return [text_sha256(t) for t in texts]


def _locate(rows: np.ndarray, partitions: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(index into ``partitions``, row within it) per lake ``row`` (its partition's ``row_offset`` + its row)."""
    if not partitions:
        return np.full(len(rows), -1, dtype=np.int64), rows
    offsets = np.asarray([p["row_offset"] for p in partitions], dtype=np.int64)
    # a partition holds rows (row_offset, next row_offset]: the last offset below the row (an empty partition
    # shares its offset with the next one, and the later of equal offsets is the one holding rows)
    index = np.searchsorted(offsets, rows, side="left") - 1
    index = np.clip(index, 0, len(partitions) - 1)
    return index, rows - offsets[index]


def row_manifest(train, test, partitions: dict):
    """The manifest of one version's rows (see the module docstring), as a pyarrow Table.

    Args:
        train, test: the validated rows (``text``, ``label``, ``row``) as pyarrow Tables (pandas frames are
            converted): keys are hashed chunk by chunk, so no Python object per row is held.
        partitions: the ingest snapshot's ``{"train": [...], "test": [...]}`` listing; test rows come from the
            ``test`` listing when the config named a separate test location, else from the ``train`` one.
    """
    import pyarrow as pa

    from adaptflow.row_keys import hex_column, text_digests

    sources = {"train": partitions.get("train") or [], "test": partitions.get("test") or partitions.get("train") or []}
    paths = list(dict.fromkeys(p["path"] for side in ("train", "test") for p in sources[side]))
    code_of = {path: i for i, path in enumerate(paths)}
    parts = []
    for side, table in (("train", train), ("test", test)):
        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table[["text", "label", "row"]], preserve_index=False)
        listing = sources[side]
        index, row = _locate(table.column("row").to_numpy().astype(np.int64), listing)
        to_code = np.asarray([code_of[p["path"]] for p in listing] + [-1], dtype=np.int32)  # -1: no listing
        codes = to_code[index]
        parts.append(pa.table({
            "text_sha256": hex_column(text_digests(table.column("text"))),
            "label": table.column("label"),
            "split": pa.DictionaryArray.from_arrays(pa.array(np.full(len(row), 0 if side == "train" else 1,
                                                                     dtype=np.int8)), pa.array(["train", "test"])),
            "partition": pa.DictionaryArray.from_arrays(pa.array(codes, mask=codes < 0), pa.array(paths, pa.string())),
            "row": pa.array(row, pa.int64()),
        }))
    return pa.concat_tables(parts, promote_options="permissive")


def manifest_bytes(manifest) -> bytes:
    """Parquet bytes (zstd; split and partition dictionary-encoded) of a manifest Table (or DataFrame)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(manifest, pd.DataFrame):
        manifest = pa.Table.from_pandas(manifest, preserve_index=False)
    buffer = io.BytesIO()
    pq.write_table(manifest, buffer, compression="zstd")
    return buffer.getvalue()


def publish_rows(store, prefix: str, manifest, meta: dict | None = None) -> str:
    """Publish the manifest under ``prefix`` (manifest-last; an identical earlier publication is kept); its URI."""
    from adaptflow.store import ConflictError

    if store.read_manifest(prefix) is None:
        try:
            store.publish(prefix, {ROWS_FILE: manifest_bytes(manifest)}, {"rows": len(manifest), **(meta or {})})
        except ConflictError:
            pass  # published meanwhile by a concurrent or earlier attempt: same key, same content
    return store.uri(f"{prefix}/{ROWS_FILE}")


def read_rows(store, uri: str) -> pd.DataFrame:
    """A row manifest, checked against its publication manifest (any bucket)."""
    import pyarrow.parquet as pq

    from adaptflow.store import parse_s3_uri

    bucket, key = parse_s3_uri(uri)
    table = pq.read_table(io.BytesIO(store.with_bucket(bucket).get_verified_bytes(key)))
    frame = table.to_pandas()
    for column in ("split", "partition"):
        frame[column] = frame[column].astype(object)
    return frame


def rows_of(store, version) -> pd.DataFrame | None:
    """The row manifest of a registered version (an MLflow ModelVersion), None when it has none (older ones)."""
    uri = (version.tags or {}).get(ROWS_TAG)
    return read_rows(store, uri) if uri else None


def counts(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    """``{split: {label: rows}}``."""
    table = manifest.groupby(["split", "label"], dropna=False).size()
    out: dict[str, dict[str, int]] = {}
    for (split, label), n in table.items():
        out.setdefault(str(split), {})[str(label)] = int(n)
    return out


def diff_rows(new: pd.DataFrame, old: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """How ``new``'s rows differ from ``old``'s, by text sha256.

    Returns ``added`` (in new only), ``removed`` (in old only), ``relabelled`` (in both, label changed:
    ``label`` is new's, ``old_label`` old's) and ``moved`` (in both, split changed: ``split`` new's, ``old_split``).
    """
    new = new.drop_duplicates("text_sha256")
    old = old.drop_duplicates("text_sha256")
    both = new.merge(old[["text_sha256", "label", "split"]], on="text_sha256", suffixes=("", "_old"))
    both = both.rename(columns={"label_old": "old_label", "split_old": "old_split"})
    return {
        "added": new[~new["text_sha256"].isin(old["text_sha256"])].reset_index(drop=True),
        "removed": old[~old["text_sha256"].isin(new["text_sha256"])].reset_index(drop=True),
        "relabelled": both[both["label"] != both["old_label"]].reset_index(drop=True),
        "moved": both[both["split"] != both["old_split"]].reset_index(drop=True),
    }


def trained_on(manifest: pd.DataFrame) -> set[str]:
    """The text sha256s a version trained on."""
    return set(manifest.loc[manifest["split"] == "train", "text_sha256"])
