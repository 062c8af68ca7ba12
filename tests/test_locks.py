"""The promotion lease (adaptflow.locks) against the session's real SeaweedFS: renewed while held, fenced before
the alias move, and judged abandoned only by the waiter's own clock.

Short ttls (2-4 s) keep these quick; a paused holder is a real process stopped with SIGSTOP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from adaptflow.locks import LockTimeout, store_lock
from adaptflow.registry import CHAMPION, alias_history, client_for, move_alias
from adaptflow.store import ArtifactStore, ConflictError

ROOT = Path(__file__).resolve().parents[1]

# What gate_stage does inside the lock, in a process of its own: hold the lease, do the long work (here: wait
# for a line on stdin, while the test pauses the process), then fence and move champion.
HOLDER = """
import sys
from adaptflow.locks import store_lock
from adaptflow.registry import CHAMPION, client_for, move_alias
from adaptflow.settings import load_settings
from adaptflow.store import ArtifactStore

name, version, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3])
settings = load_settings()
client = client_for(settings.mlflow_tracking_uri)
with store_lock(ArtifactStore.from_settings(settings), f"promote/{name}", ttl_seconds=ttl, poll_seconds=0.1) as lease:
    print("held", flush=True)
    sys.stdin.readline()
    lease.fence()
    move_alias(client, name, CHAMPION, version, reason="decided before the pause", actor="paused-holder", kind="gate")
print("moved", flush=True)
"""


@pytest.fixture
def store(test_settings, fresh_bucket) -> ArtifactStore:
    return ArtifactStore.from_settings(test_settings, bucket=fresh_bucket)


def lease_body(store: ArtifactStore, name: str) -> dict:
    return json.loads(store.get_bytes(f"locks/{name}"))


def test_paused_holder_cannot_move_champion_after_another_run_took_over(store, test_settings, tmp_path):
    client = client_for(test_settings.mlflow_tracking_uri)
    name = f"lock-test-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    for _ in range(2):
        client.create_model_version(name, source=store.uri(f"models/{name}"))
    env = {**os.environ, **test_settings.process_env(), "ADAPTFLOW_BUCKET": store.bucket}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, name, "1", "2"], cwd=ROOT, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held", holder.communicate(timeout=60)[1][-3000:]
        os.kill(holder.pid, signal.SIGSTOP)  # paused mid-work: its heartbeat stops with it
        try:
            # another run: waits until the paused holder's lease went unrenewed for its ttl, then promotes v2
            with store_lock(store, f"promote/{name}", ttl_seconds=2, wait_seconds=120, poll_seconds=0.1) as lease:
                lease.fence()
                move_alias(client, name, CHAMPION, "2", reason="the other run", actor="other-run", kind="gate")
        finally:
            os.kill(holder.pid, signal.SIGCONT)
        out, err = holder.communicate("go\n", timeout=120)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert holder.returncode != 0 and "moved" not in out
    assert "LockLost" in err and "was taken over" in err, err[-3000:]
    assert client.get_model_version_by_alias(name, CHAMPION).version == "2"
    assert [(m["actor"], m["to"]) for m in alias_history(client, name)] == [("other-run", "2")]
    assert lease_body(store, f"promote/{name}")["released"]  # the lease object stays (no s3:DeleteObject), released


def test_renewed_lease_is_kept_well_past_its_ttl(store):
    name = f"renewed-{uuid.uuid4().hex[:8]}"
    with store_lock(store, name, ttl_seconds=4, poll_seconds=0.1) as lease:
        first = lease_body(store, name)
        with pytest.raises(LockTimeout, match="renewed meanwhile"):  # waits 3 ttls: never takes it over
            with store_lock(store, name, ttl_seconds=4, wait_seconds=12, poll_seconds=0.1):
                pytest.fail("a waiter took over a lease its holder kept renewing")
        lease.fence()  # still ours
        assert lease_body(store, name)["owner"] == first["owner"] == lease.owner
        assert lease_body(store, name)["beat"] > first["beat"]
    assert lease_body(store, name)["released"]


def test_waiter_ignores_the_holders_wall_clock(store):
    """A holder on another machine whose clock is a month off: its ``acquired`` time decides nothing."""
    key, month = "locks/skewed", 30 * 24 * 3600
    # a live holder whose clock is a month behind (and renews every 0.5 s): never taken over
    body = {"owner": "far-host:1:behind", "ttl": 4, "acquired": time.time() - month, "beat": 0}
    etag = store.put_bytes(key, json.dumps(body).encode(), if_none_match=True)
    stop = threading.Event()

    def renew():
        nonlocal etag
        while not stop.wait(0.5):
            body["beat"] += 1
            etag = store.put_bytes(key, json.dumps(body).encode(), if_match=etag)

    beats = threading.Thread(target=renew, daemon=True)
    beats.start()
    try:
        with pytest.raises(LockTimeout, match="renewed meanwhile"):
            with store_lock(store, "skewed", ttl_seconds=4, wait_seconds=10, poll_seconds=0.1):
                pytest.fail("a waiter took over a renewed lease because the holder's clock is behind")
    finally:
        stop.set()
        beats.join()
    assert lease_body(store, "skewed")["owner"] == "far-host:1:behind"

    # a dead holder whose clock is a month ahead: taken over once unchanged for its ttl on the waiter's clock
    body = {"owner": "far-host:2:ahead", "ttl": 2, "acquired": time.time() + month, "beat": 0}
    ahead = store.put_bytes(key, json.dumps(body).encode(), if_match=etag)
    with store_lock(store, "skewed", ttl_seconds=2, wait_seconds=60, poll_seconds=0.1) as lease:
        assert lease_body(store, "skewed")["owner"] == lease.owner
    with pytest.raises(ConflictError):  # the old holder's generation is gone: its next renewal would fail
        store.put_bytes(key, json.dumps(body).encode(), if_match=ahead)
