"""An S3 artifact store over boto3 that works against any endpoint (AWS, MinIO, R2, SeaweedFS).

Only the endpoint URL changes between providers: the client always uses path-style addressing (no
virtual-host DNS names, which local servers do not resolve) and only sends/validates checksums when an
operation requires them (boto3 >= 1.36 otherwise adds CRC trailers that several third-party servers reject).

A *published prefix* is a set of objects plus ``<prefix>/_manifest.json`` listing each object's sha256 and
size. The manifest is written last and only if absent (``If-None-Match: *``), so a reader treats a prefix
as complete exactly when its manifest exists, and a second writer cannot replace it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import botocore.session
from boto3.s3.transfer import TransferConfig
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, EndpointConnectionError
from botocore.exceptions import NoCredentialsError, PartialCredentialsError, ReadTimeoutError

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
_CHUNK = 1 << 20
_AUTH_CODES = {
    "403", "Forbidden", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed", "MissingSecurityHeader",
}
_NOT_FOUND_CODES = {"404", "NotFound", "NoSuchKey"}
# 412 is the answer to a failed If-None-Match; AWS answers 409 while a concurrent conditional write is in flight.
_CONFLICT_CODES = {"412", "PreconditionFailed", "ConditionalRequestConflict"}


class StoreError(RuntimeError):
    """An S3 operation failed; the message names the object, the endpoint and what to check.

    ``status`` is the HTTP status behind it (None: no answer, e.g. the server is unreachable).
    ``get_http_status_code()`` follows MLflow's exceptions, so one retry rule serves both (tasks/policy.py):
    a 4xx (access denied, no such bucket or key, conditional write refused) fails the same way again and is
    not retried; no answer, a timeout or a 5xx is transient and is.
    """

    status: int | None = None

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status

    def get_http_status_code(self) -> int:
        return self.status or 503

    @property
    def transient(self) -> bool:
        return not 400 <= self.get_http_status_code() < 500


class ConflictError(StoreError):
    """A conditional write was refused because the object already exists."""

    status = 412


class NotFoundError(StoreError):
    """The object (not the bucket) does not exist."""

    status = 404


class BucketNotFoundError(StoreError):
    """The bucket does not exist at this endpoint."""

    status = 404


class AccessDeniedError(StoreError):
    """The credentials were refused, or this identity may not perform the operation."""

    status = 403


class IntegrityError(StoreError):
    """Downloaded bytes do not match the digest or size recorded for them (manifest or ETag)."""

    status = 500  # a re-download may heal a transfer error; a corrupt object fails again, loudly


class RequestCounter:
    """S3 requests sent and response bytes read through one boto3 client, from all threads.

    Counted from botocore's events, so every path (``publish``, the transfer manager's ranged GETs, paginated
    LISTs) is included: ``requests`` counts each HTTP attempt (a retried call counts twice, as S3 bills it);
    ``bytes_read`` adds each GET's ``Content-Length`` and every other response's body (LIST XML, errors).
    ``tasks/policy.py`` reports the difference across a stage as its ``s3``.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._requests = 0
        self._bytes = 0

    def snapshot(self) -> dict[str, int]:
        """``{"requests": n, "bytes_read": b}`` so far."""
        with self._lock:
            return {"requests": self._requests, "bytes_read": self._bytes}

    def since(self, before: Mapping[str, int]) -> dict[str, int]:
        """What was counted after ``before`` (an earlier :meth:`snapshot`)."""
        now = self.snapshot()
        return {k: now[k] - int(before.get(k, 0)) for k in now}

    def on_send(self, **_) -> None:  # before-send: once per HTTP attempt; returning None lets it go out
        with self._lock:
            self._requests += 1

    def on_response(self, http_response=None, parsed=None, model=None, **_) -> None:  # after-call
        if model is not None and model.has_streaming_output:
            size = int((parsed or {}).get("ContentLength") or 0)
        else:
            size = len(getattr(http_response, "content", b"") or b"")
        with self._lock:
            self._bytes += size


_COUNTERS: "weakref.WeakKeyDictionary[object, RequestCounter]" = weakref.WeakKeyDictionary()
_COUNTERS_LOCK = threading.Lock()


def request_counter(client) -> RequestCounter:
    """The one :class:`RequestCounter` of a boto3 S3 client (stores sharing a client share its counter)."""
    with _COUNTERS_LOCK:
        counter = _COUNTERS.get(client)
        if counter is None:
            counter = _COUNTERS[client] = RequestCounter()
            client.meta.events.register("before-send.s3", counter.on_send)
            client.meta.events.register("after-call.s3", counter.on_response)
        return counter


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; the key may be empty."""
    parts = urlsplit(str(uri))
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r} (expected s3://bucket/key)")
    return parts.netloc, parts.path.lstrip("/")


def sha256_file(path: Path) -> tuple[str, int]:
    """The sha256 hex digest and size (bytes read) of a file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest(), f.tell()


def _join(prefix: str, name: str) -> str:
    return f"{prefix.strip('/')}/{name}" if prefix.strip("/") else name


def _check_object_name(name: str) -> None:
    # Names become both S3 keys and (in encoders.py) local relative paths: refuse anything that escapes.
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or name == MANIFEST:
        raise ValueError(f"invalid object name in a published prefix: {name!r}")


class ArtifactStore:
    """Objects in one bucket of an S3-compatible server.

    Args:
        bucket: the bucket every key refers to.
        endpoint_url: e.g. ``http://127.0.0.1:8333``; None means AWS itself.
        access_key_id / secret_access_key: None falls back to boto3's chain (env, ~/.aws, instance role).
        region: signing region; any value works for MinIO/SeaweedFS.
        anonymous: send unsigned requests (public buckets).
        max_attempts: total tries per request (standard retry mode: throttling, 5xx, dropped connections).
            A refused connection is retried too, so a stopped server takes ~5-15 s to report.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str = "us-east-1",
        anonymous: bool = False,
        max_attempts: int = 5,
        client=None,
    ):
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        if client is None:
            config = Config(
                # botocore's "max_attempts" counts *retries* (5 -> 6 requests); "total_max_attempts" counts tries.
                retries={"mode": "standard", "total_max_attempts": max_attempts},
                s3={"addressing_style": "path"},
                connect_timeout=5,
                read_timeout=60,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                signature_version=UNSIGNED if anonymous else None,
            )
            client = _new_session().client(
                "s3", endpoint_url=endpoint_url, aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key, region_name=region, config=config,
            )
        self.client = client
        self.requests = request_counter(client)  # S3 requests and bytes read so far (shared with with_bucket)
        self._bucket_ok = False  # set once the bucket is known to exist; saves a HEAD per missing key
        self._manifests: dict[str, dict] = {}  # published prefix -> its manifest (for verified reads)
        # 8 MiB parts, 4 threads: enough for a local server on 2 cores; the "classic" client behaves the
        # same with or without awscrt installed.
        self.transfer = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20,
                                       max_concurrency=4, preferred_transfer_client="classic")

    @classmethod
    def from_settings(cls, settings, bucket: str | None = None) -> ArtifactStore:
        """A store for ``bucket`` (default ``settings.bucket``) at the endpoint and credentials in ``settings``."""
        return cls(bucket or settings.bucket, endpoint_url=settings.s3_endpoint_url,
                   access_key_id=settings.aws_access_key_id, secret_access_key=settings.secret_key,
                   region=settings.aws_region)

    def with_bucket(self, bucket: str) -> ArtifactStore:
        """The same endpoint and client, another bucket (for s3:// refs naming a different bucket)."""
        if bucket == self.bucket:
            return self
        return ArtifactStore(bucket, endpoint_url=self.endpoint_url, region=self.region, client=self.client)

    def __repr__(self) -> str:
        return f"ArtifactStore(bucket={self.bucket!r}, endpoint={self._endpoint()!r})"

    # ---- basic objects -------------------------------------------------------------------------------

    def uri(self, key: str = "") -> str:
        """``s3://bucket/key``."""
        return f"s3://{self.bucket}/{key}"

    def ensure_bucket(self) -> None:
        """Create the bucket unless it already exists (idempotent, race-safe)."""
        if self._bucket_exists():
            return
        kwargs = {"Bucket": self.bucket}
        if self.region and self.region != "us-east-1" and self.endpoint_url is None:
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as exc:
            if _code(exc) == "BucketAlreadyExists":  # taken by another account (AWS's global namespace)
                raise StoreError(
                    f"bucket {self.bucket!r} is owned by someone else at {self._endpoint()}: set ADAPTFLOW_BUCKET "
                    "to another name", status=409
                ) from None
            if _code(exc) != "BucketAlreadyOwnedByYou":  # that one means a concurrent create won: fine
                raise self._error(exc, "", "create bucket") from None
        except BotoCoreError as exc:
            raise self._error(exc, "", "create bucket") from None
        self._bucket_ok = True

    def exists(self, key: str) -> bool:
        """True when ``key`` exists (a missing bucket raises StoreError rather than answering False)."""
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except (ClientError, BotoCoreError) as exc:
            err = self._error(exc, key, "HEAD")
            if isinstance(err, NotFoundError):
                return False
            raise err from None

    def delete(self, key: str) -> None:
        """Delete ``key`` (no error when it is already gone)."""
        self._call("DELETE", key, self.client.delete_object, Bucket=self.bucket, Key=key)

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        """Write ``data`` at ``key``; returns the new ETag.

        Args:
            if_none_match: only if ``key`` does not exist yet (else ConflictError).
            if_match: only if ``key`` still has this ETag (compare-and-swap; else ConflictError).
        """
        extra = {"IfNoneMatch": "*"} if if_none_match else {}
        if if_match is not None:
            extra["IfMatch"] = if_match
        resp = self._call("PUT", key, self.client.put_object, Bucket=self.bucket, Key=key, Body=data, **extra)
        return str(resp.get("ETag", ""))

    def get_bytes_and_etag(self, key: str) -> tuple[bytes, str]:
        """The content of ``key`` and its ETag, for a later ``put_bytes(..., if_match=etag)``."""
        resp = self._call("GET", key, self.client.get_object, Bucket=self.bucket, Key=key)
        try:
            return resp["Body"].read(), str(resp.get("ETag", ""))
        except BotoCoreError as exc:
            raise self._error(exc, key, "GET") from None

    def get_bytes(self, key: str) -> bytes:
        """The content of ``key`` (NotFoundError when absent)."""
        resp = self._call("GET", key, self.client.get_object, Bucket=self.bucket, Key=key)
        try:
            return resp["Body"].read()
        except BotoCoreError as exc:
            raise self._error(exc, key, "GET") from None

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        """Upload a local file, streaming (multipart above 8 MiB)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cannot upload {path}: no such file")
        self._call("upload", key, self.client.upload_file, str(path), self.bucket, key, Config=self.transfer)

    def get_file(self, key: str, path: str | os.PathLike, *, verify: bool = False) -> Path:
        """Download ``key`` to ``path``; it lands via a temp file in the same folder and an atomic rename,
        so ``path`` is either absent/old or complete, never partial.

        Args:
            verify: check the download against the object's size and, where its ETag is a plain MD5 (a
                single-part upload on AWS, MinIO, SeaweedFS), its MD5; IntegrityError when they differ.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        head = self._call("HEAD", key, self.client.head_object, Bucket=self.bucket, Key=key) if verify else None
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        try:
            self._call("download", key, self.client.download_file, self.bucket, key, tmp, Config=self.transfer)
            if head is not None:
                self._check_etag(key, Path(tmp), head)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def _check_etag(self, key: str, path: Path, head: dict) -> None:
        size, etag = path.stat().st_size, str(head.get("ETag", "")).strip('"')
        if size != head.get("ContentLength"):
            raise IntegrityError(f"{self.uri(key)}: downloaded {size} bytes, the server reports "
                                 f"{head.get('ContentLength')}; it changed during the download, or the transfer broke")
        if re.fullmatch(r"[0-9a-f]{32}", etag):
            with open(path, "rb") as f:
                md5 = hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False))
            if md5.hexdigest() != etag:
                raise IntegrityError(f"{self.uri(key)}: downloaded bytes have MD5 {md5.hexdigest()}, the object's "
                                     f"ETag is {etag}; it changed during the download, or the transfer broke")

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Every key under ``prefix``, in the server's (lexicographic) order."""
        return (obj["Key"] for obj in self.list_objects(prefix))

    def list_objects(self, prefix: str = "") -> Iterator[dict]:
        """Every object under ``prefix`` as the listing describes it (``Key``, ``Size``, ``LastModified``, ...)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        try:
            for page in pages:
                yield from page.get("Contents", [])
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, prefix, "LIST") from None

    # ---- published prefixes --------------------------------------------------------------------------

    def publish(
        self, prefix: str, objects: Mapping[str, bytes | os.PathLike], meta: dict | None = None
    ) -> dict:
        """Upload ``objects`` under ``prefix``, then its manifest, which makes the prefix visible as complete.

        Objects are never overwritten behind a published manifest: each is written only if absent
        (``If-None-Match: *``; files > 8 MiB after a HEAD). An object already there with the same bytes is
        kept (a retry re-uploads nothing). One with other bytes is either a concurrent writer's, still
        uploading, or left by a crashed attempt; the writer then waits, for at most ``publish_grace_s`` from
        that object's last write, for the other writer's manifest (then raises ConflictError: the prefix is
        published, by them), and replaces it only once it is older than that, i.e. abandoned.

        Args:
            prefix: the folder-like key prefix; should be unique per content (e.g. contain a digest).
            objects: relative name -> bytes or a local file path.
            meta: JSON-serialisable data stored in the manifest.

        Returns:
            The manifest written.

        Raises:
            ConflictError: a manifest already exists at ``prefix`` (or appeared while this one was uploading).
        """
        for name in objects:  # all names before any upload: a bad one must not leave a half-written prefix
            _check_object_name(name)
        prefix = prefix.strip("/")
        manifest_key = _join(prefix, MANIFEST)
        # Fail before uploading anything when the prefix is already published (the conditional write below
        # still settles races).
        if self.exists(manifest_key):
            raise ConflictError(f"{self.uri(manifest_key)} already exists: {self.uri(prefix)} is already published")
        entries: dict[str, dict] = {}
        abandoned = False  # once one object proved abandoned, the others of that attempt are too
        for name in sorted(objects):
            value, key = objects[name], _join(prefix, name)
            if isinstance(value, (bytes, bytearray, memoryview)):
                value = bytes(value)
                sha, size = hashlib.sha256(value).hexdigest(), len(value)
            else:
                sha, size = sha256_file(Path(value))
            entries[name] = {"sha256": sha, "size": size}
            abandoned = self._put_unless_published(key, value, sha, size, manifest_key, abandoned)
        manifest = {
            "objects": entries,
            "meta": meta or {},
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        self.put_bytes(manifest_key, body, if_none_match=True)
        log.debug("published %s (%d objects)", self.uri(prefix), len(entries))
        return manifest

    #: seconds an object of an unpublished prefix must be left alone before another writer may replace it
    publish_grace_s: float = 30.0

    def _put(self, key: str, value: bytes | os.PathLike) -> None:
        if isinstance(value, bytes):
            self.put_bytes(key, value)
        else:
            self.put_file(key, value)

    def _put_unless_published(
        self, key: str, value: bytes | os.PathLike, sha: str, size: int, manifest_key: str, abandoned: bool
    ) -> bool:
        """Write one object of a prefix being published without clobbering another writer's; see publish()."""
        if abandoned:
            self._put(key, value)
            return True
        if isinstance(value, bytes):
            try:
                self.put_bytes(key, value, if_none_match=True)
                return False
            except ConflictError:
                pass
        elif not self.exists(key):
            self.put_file(key, value)  # multipart uploads take no If-None-Match here: HEAD, then write
            return False
        while True:
            age = self._same_or_age(key, sha, size)
            if age is None:  # already holds exactly these bytes: nothing to upload
                return False
            if self.exists(manifest_key):
                raise ConflictError(
                    f"{self.uri(manifest_key.rsplit('/', 1)[0])} was published by another writer meanwhile"
                )
            if age >= self.publish_grace_s:
                log.warning("replacing %s: left by an interrupted publish %.0f s ago", self.uri(key), age)
                self._put(key, value)
                return True
            time.sleep(min(0.5, self.publish_grace_s - age))

    def _same_or_age(self, key: str, sha: str, size: int) -> float | None:
        """None when ``key`` holds these bytes, else the seconds since it was last written (server clock)."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            err = self._error(exc, key, "HEAD")
            if isinstance(err, NotFoundError):
                return float("inf")  # gone meanwhile (dropped): free to write
            raise err from None
        if head.get("ContentLength") == size and self._sha256_of(key) == sha:
            return None
        now = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        try:
            server_now = parsedate_to_datetime(now) if now else datetime.now(timezone.utc)
        except (TypeError, ValueError):
            server_now = datetime.now(timezone.utc)
        return max(0.0, (server_now - head["LastModified"]).total_seconds())

    def _sha256_of(self, key: str) -> str | None:
        """The sha256 of an object's bytes, streamed (None when it vanished meanwhile)."""
        try:
            body = self._call("GET", key, self.client.get_object, Bucket=self.bucket, Key=key)["Body"]
            h = hashlib.sha256()
            for chunk in body.iter_chunks(_CHUNK):
                h.update(chunk)
            return h.hexdigest()
        except NotFoundError:
            return None

    # ---- verified reads ------------------------------------------------------------------------------

    def get_verified_bytes(self, key: str, *, prefix: str | None = None) -> bytes:
        """The content of ``key``, checked against the manifest of its published prefix.

        Args:
            prefix: the published prefix holding ``key`` (default: its parent "folder").

        Raises:
            IntegrityError: the bytes differ from what the manifest recorded, or the manifest omits ``key``.
            NotFoundError: ``key`` or the prefix's manifest is missing.
        """
        prefix, name, expected = self._expected(key, prefix)
        data = self.get_bytes(key)
        self._compare(key, hashlib.sha256(data).hexdigest(), len(data), expected)
        return data

    def get_verified_file(self, key: str, path: str | os.PathLike, *, prefix: str | None = None) -> Path:
        """Download ``key`` like :meth:`get_file` and check it against its prefix's manifest; a file that does
        not match is removed again, never left behind."""
        prefix, name, expected = self._expected(key, prefix)
        path = self.get_file(key, path)
        sha, size = sha256_file(path)
        try:
            self._compare(key, sha, size, expected)
        except IntegrityError:
            path.unlink(missing_ok=True)
            raise
        return path

    def _expected(self, key: str, prefix: str | None) -> tuple[str, str, dict]:
        prefix = (prefix if prefix is not None else key.rsplit("/", 1)[0]).strip("/")
        name = key[len(prefix) + 1:] if prefix else key
        manifests = self._manifests  # a published manifest never changes: cache it
        if prefix not in manifests:
            manifest = self.read_manifest(prefix)
            if manifest is None:
                raise NotFoundError(f"{self.uri(_join(prefix, MANIFEST))} does not exist: {self.uri(key)} is not "
                                    "part of a published prefix (an interrupted write?); re-run the stage")
            manifests[prefix] = manifest
        expected = manifests[prefix]["objects"].get(name)
        if expected is None:
            raise IntegrityError(f"{self.uri(key)} is not listed in {self.uri(_join(prefix, MANIFEST))}")
        return prefix, name, expected

    def _compare(self, key: str, sha: str, size: int, expected: dict) -> None:
        if (sha, size) != (expected["sha256"], expected["size"]):
            raise IntegrityError(
                f"{self.uri(key)} does not match its manifest (sha256 {sha[:12]}.. size {size}, expected "
                f"{expected['sha256'][:12]}.. size {expected['size']}): the object was modified or damaged after "
                "publishing; delete its prefix and re-run the stage that wrote it"
            )

    def read_manifest(self, prefix: str) -> dict | None:
        """The manifest of a published prefix, or None when it is not (yet) published."""
        key = _join(prefix, MANIFEST)
        try:
            body = self.get_bytes(key)
        except NotFoundError:
            return None
        try:
            manifest = json.loads(body)
            if not isinstance(manifest.get("objects"), dict):
                raise ValueError("no 'objects' mapping")
        except (ValueError, AttributeError) as exc:
            raise StoreError(
                f"{self.uri(key)} is not a valid manifest ({exc}); delete the prefix and republish"
            ) from None
        return manifest

    def verify_manifest(self, prefix: str) -> list[str]:
        """Re-read every object listed in the manifest and compare sha256 and size.

        Returns:
            One line per problem (missing manifest, missing object, size or sha256 mismatch); [] when sound.
        """
        manifest = self.read_manifest(prefix)
        if manifest is None:
            return [f"{self.uri(_join(prefix, MANIFEST))} is missing: the prefix is not published"]
        problems = []
        for name, expected in sorted(manifest["objects"].items()):
            key = _join(prefix, name)
            try:
                body = self._call("GET", key, self.client.get_object, Bucket=self.bucket, Key=key)["Body"]
                h, size = hashlib.sha256(), 0
                for chunk in body.iter_chunks(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
            except NotFoundError:
                problems.append(f"{self.uri(key)}: missing")
                continue
            if size != expected["size"]:
                problems.append(f"{self.uri(key)}: size {size} != {expected['size']} in the manifest")
            elif h.hexdigest() != expected["sha256"]:
                problems.append(f"{self.uri(key)}: sha256 {h.hexdigest()} != {expected['sha256']} in the manifest")
        return problems

    # ---- error translation ---------------------------------------------------------------------------

    def _call(self, op: str, key: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, key, op) from None
        except Exception as exc:
            # upload_file wraps a ClientError into S3UploadFailedError, keeping it only as __context__.
            inner = exc.__cause__ or exc.__context__
            if isinstance(inner, (ClientError, BotoCoreError)):
                raise self._error(inner, key, op) from None
            raise

    def _endpoint(self) -> str:
        if not self.endpoint_url:
            return f"AWS S3 ({self.region})"
        parts = urlsplit(self.endpoint_url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return f"{parts.scheme}://{netloc}{parts.path}"  # userinfo dropped: it could hold credentials

    def _bucket_exists(self) -> bool:
        if self._bucket_ok:
            return True
        try:
            self.client.head_bucket(Bucket=self.bucket)
            self._bucket_ok = True
            return True
        except ClientError as exc:
            if _code(exc) in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise self._error(exc, "", "HEAD bucket") from None
        except BotoCoreError as exc:
            raise self._error(exc, "", "HEAD bucket") from None

    def _error(self, exc: Exception, key: str, op: str) -> StoreError:
        """Translate a botocore exception into a StoreError that says what to check (never any secret)."""
        where, endpoint = self.uri(key), self._endpoint()
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
            return StoreError(
                f"cannot reach the S3 server for {where}: is the S3 server at {endpoint} running? "
                "Start it with `adaptflow stack up` or set AWS_ENDPOINT_URL_S3 to a reachable endpoint."
            )
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return AccessDeniedError(
                f"no S3 credentials for {where} at {endpoint}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "(or run `adaptflow stack up`, which records local credentials).", status=401
            )
        if isinstance(exc, ReadTimeoutError):
            return StoreError(f"{op} {where} timed out at {endpoint}: the S3 server is overloaded or stuck.",
                              status=504)
        if not isinstance(exc, ClientError):
            return StoreError(f"{op} {where} failed at {endpoint}: {exc}")
        code, status = _code(exc), exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = exc.response.get("Error", {}).get("Message", "")
        if code == "NoSuchBucket" or (code in _NOT_FOUND_CODES and not self._bucket_exists_quietly()):
            return BucketNotFoundError(
                f"bucket {self.bucket!r} does not exist at {endpoint} ({op} {where}): create it "
                "(`adaptflow stack up` creates the default one) or set ADAPTFLOW_BUCKET to an existing bucket."
            )
        if code in _NOT_FOUND_CODES:
            return NotFoundError(f"{where} does not exist (at {endpoint})")
        if code in _CONFLICT_CODES or status == 412:
            return ConflictError(f"{where} already exists at {endpoint}: the conditional write was refused")
        if code in _AUTH_CODES or status == 403:
            return AccessDeniedError(
                f"access denied ({code}) for {op} {where} at {endpoint}: check AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, and that this identity may use the bucket."
            )
        if code == "InvalidBucketName":
            return StoreError(
                f"invalid bucket name {self.bucket!r}: use 3-63 lowercase letters, digits, '-' and '.' "
                "(set ADAPTFLOW_BUCKET).", status=400
            )
        return StoreError(f"{op} {where} failed at {endpoint}: {code or status} {message}".rstrip(), status=status)

    def _bucket_exists_quietly(self) -> bool:
        # HEAD answers a bare 404 for both a missing key and a missing bucket: ask the bucket to tell them apart.
        try:
            return self._bucket_exists()
        except StoreError:
            return True  # cannot tell: report the key as missing rather than invent a bucket problem


_loader_lock = threading.Lock()
_loader = None


def _new_session() -> boto3.session.Session:
    """A private session (boto3's default one is not thread-safe) sharing one parsed-model loader: a fresh
    loader re-reads the S3 service model, ~130 ms per store instead of ~10 ms."""
    global _loader
    core = botocore.session.get_session()
    with _loader_lock:
        if _loader is None:
            _loader = core.get_component("data_loader")
        else:
            core.register_component("data_loader", _loader)
    return boto3.session.Session(botocore_session=core)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
