"""ArtifactStore against the session's real SeaweedFS: streaming, content addressing, manifests, error hints."""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from collections import Counter

import pytest

from adaptflow.store import ArtifactStore, ConflictError, NotFoundError, StoreError, parse_s3_uri


@pytest.fixture
def store(test_settings, fresh_bucket) -> ArtifactStore:
    return ArtifactStore.from_settings(test_settings, bucket=fresh_bucket)


def count_calls(store: ArtifactStore) -> Counter:
    """Count the S3 API calls the store's client makes from now on (e.g. calls['PutObject'])."""
    calls: Counter = Counter()
    store.client.meta.events.register("before-call.s3", lambda model, **_: calls.update([model.name]))
    return calls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parse_s3_uri():
    assert parse_s3_uri("s3://b/a/k.json") == ("b", "a/k.json")
    assert parse_s3_uri("s3://b") == ("b", "")
    with pytest.raises(ValueError, match="s3://bucket/key"):
        parse_s3_uri("/local/path")


def test_bytes_round_trip(store):
    store.put_bytes("a/b.txt", b"hello")
    assert store.get_bytes("a/b.txt") == b"hello"
    assert store.exists("a/b.txt") and not store.exists("a/missing")
    assert list(store.list_keys("a/")) == ["a/b.txt"]
    assert store.uri("a/b.txt") == f"s3://{store.bucket}/a/b.txt"
    with pytest.raises(NotFoundError, match="a/missing"):
        store.get_bytes("a/missing")
    store.delete("a/b.txt")
    store.delete("a/b.txt")  # idempotent
    assert not store.exists("a/b.txt")


def test_large_file_streams_multipart(store, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(20 << 20))
    calls = count_calls(store)
    store.put_file("big/big.bin", src)
    assert calls["UploadPart"] >= 3  # 8 MiB parts: streamed, not one 20 MB body
    out = store.get_file("big/big.bin", tmp_path / "down" / "big.bin")
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    assert sorted(p.name for p in out.parent.iterdir()) == ["big.bin"]  # no temp file left behind


def test_failed_download_leaves_nothing(store, tmp_path):
    target = tmp_path / "dl" / "x.bin"
    with pytest.raises(NotFoundError):
        store.get_file("nope/x.bin", target)
    assert list(target.parent.iterdir()) == []


def test_publish_refuses_a_second_writer_and_verify_detects_tampering(store, tmp_path):
    (tmp_path / "w.bin").write_bytes(b"weights" * 1000)
    manifest = store.publish("runs/r1", {"a.json": b"{}", "sub/w.bin": tmp_path / "w.bin"}, meta={"run": 1})
    assert manifest["objects"]["sub/w.bin"] == {
        "sha256": hashlib.sha256(b"weights" * 1000).hexdigest(), "size": 7000,
    }
    assert store.read_manifest("runs/r1")["meta"] == {"run": 1}
    assert store.read_manifest("runs/absent") is None
    assert store.verify_manifest("runs/r1") == []

    with pytest.raises(ConflictError, match="already"):
        store.publish("runs/r1", {"a.json": b"{ }"}, meta={"run": 2})
    assert store.read_manifest("runs/r1")["meta"] == {"run": 1}

    store.put_bytes("runs/r1/a.json", b"[]")  # same size, other content
    store.delete("runs/r1/sub/w.bin")
    problems = store.verify_manifest("runs/r1")
    assert len(problems) == 2
    assert "a.json: sha256" in problems[0] and "sub/w.bin: missing" in problems[1]
    assert "is missing" in store.verify_manifest("runs/absent")[0]


def test_manifest_write_is_conditional_on_the_server(store, monkeypatch):
    # Bypass publish's early HEAD check: the server itself must refuse the second manifest (412).
    store.publish("race/p", {"x": b"1"})
    monkeypatch.setattr(store, "exists", lambda key: False)
    with pytest.raises(ConflictError):
        store.publish("race/p", {"x": b"1"})
    store.put_bytes("k", b"1", if_none_match=True)
    with pytest.raises(ConflictError, match=f"s3://{store.bucket}/k"):
        store.put_bytes("k", b"2", if_none_match=True)
    assert store.get_bytes("k") == b"1"


@pytest.mark.parametrize("name", ["../x", "/abs", "a//b", "_manifest.json"])
def test_publish_rejects_escaping_names(store, name):
    with pytest.raises(ValueError, match="invalid object name"):
        store.publish("bad/names", {"fine.txt": b"ok", name: b"x"})
    assert list(store.list_keys("bad/")) == []  # validated before anything was uploaded


def test_unsigned_request_is_rejected(test_settings, store):
    store.put_bytes("private.txt", b"secret data")
    anon = ArtifactStore(store.bucket, endpoint_url=test_settings.s3_endpoint_url, anonymous=True)
    with pytest.raises(StoreError, match="AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") as err:
        anon.get_bytes("private.txt")
    assert f"s3://{store.bucket}/private.txt" in str(err.value)


def test_wrong_credentials_are_rejected_without_leaking_them(test_settings, store):
    store.put_bytes("private.txt", b"secret data")
    wrong_secret = "wrong-" + uuid.uuid4().hex
    for key_id in (test_settings.aws_access_key_id, "NOSUCHKEYID"):  # SignatureDoesNotMatch, InvalidAccessKeyId
        bad = ArtifactStore(
            store.bucket, endpoint_url=test_settings.s3_endpoint_url, access_key_id=key_id,
            secret_access_key=wrong_secret,
        )
        for op in (lambda: bad.get_bytes("private.txt"), lambda: bad.exists("private.txt"),
                   lambda: bad.put_bytes("other.txt", b"x")):
            with pytest.raises(StoreError, match="check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") as err:
                op()
            assert wrong_secret not in str(err.value) and test_settings.secret_key not in str(err.value)
            assert test_settings.s3_endpoint_url in str(err.value)


def test_missing_credentials_hint(test_settings, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no 1 s instance-metadata probe
    store = ArtifactStore("any-bucket", endpoint_url=test_settings.s3_endpoint_url)
    with pytest.raises(StoreError, match="no S3 credentials.*AWS_ACCESS_KEY_ID"):
        store.get_bytes("k")


def test_missing_bucket_hint(test_settings, tmp_path):
    missing = ArtifactStore.from_settings(test_settings, bucket=f"missing-{uuid.uuid4().hex[:12]}")
    # GET names NoSuchBucket; HEAD (exists, and download_file's first request) answers a bare 404.
    for op in (lambda: missing.get_bytes("k"), lambda: missing.exists("k"),
               lambda: missing.get_file("k", tmp_path / "k"), lambda: missing.read_manifest("p")):
        with pytest.raises(StoreError, match="create it .*ADAPTFLOW_BUCKET") as err:
            op()
        assert not isinstance(err.value, NotFoundError)
        assert missing.bucket in str(err.value)


def test_ensure_bucket_is_idempotent(test_settings):
    store = ArtifactStore.from_settings(test_settings, bucket=f"ensure-{uuid.uuid4().hex[:12]}")
    store.ensure_bucket()
    store.ensure_bucket()
    store.put_bytes("k", b"v")
    assert store.get_bytes("k") == b"v"


def test_unreachable_endpoint_hint():
    endpoint = f"http://127.0.0.1:{free_port()}"
    # One attempt: the default five retry a refused connection for ~10 s.
    store = ArtifactStore("b-b-b", endpoint_url=endpoint, access_key_id="k", secret_access_key="s", max_attempts=1)
    with pytest.raises(StoreError) as err:
        store.get_bytes("k")
    message = str(err.value)
    assert f"is the S3 server at {endpoint} running?" in message
    assert "adaptflow stack up" in message and "AWS_ENDPOINT_URL_S3" in message
    assert "s3://b-b-b/k" in message


def test_endpoint_userinfo_is_not_echoed():
    store = ArtifactStore("b-b-b", endpoint_url=f"http://user:pa55@127.0.0.1:{free_port()}", access_key_id="k",
                          secret_access_key="s", max_attempts=1)
    with pytest.raises(StoreError) as err:
        store.get_bytes("k")
    assert "pa55" not in str(err.value)
