"""The local stack's state files, in its state dir (default ``.adaptflow/``)::

    stack.json         which services run where, under which PID (format in docs/INTERFACES.md)
    credentials.json   the S3 admin key pair, mode 0600, generated on the first ``up``

``read_stack_state`` is the one reader (settings.py fills gaps from it, stack.py starts and stops by it);
writes replace a file whole, so a reader never sees half of one, and ``locked`` serializes ``up``/``down``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE_DIR = Path(".adaptflow")
STACK_FILE = "stack.json"
CREDENTIALS_FILE = "credentials.json"


@dataclass(frozen=True)
class StackState:
    """What ``stack.json`` and ``credentials.json`` hold ({} where the stack was never started)."""

    services: dict[str, dict]
    credentials: dict[str, str]


def read_stack_state(state_dir: Path | str) -> StackState:
    """The recorded services and the S3 key pair; a loosened credentials file is made 0600 again."""
    stack_path, creds_path = Path(state_dir) / STACK_FILE, Path(state_dir) / CREDENTIALS_FILE
    services = json.loads(stack_path.read_text()).get("services", {}) if stack_path.is_file() else {}
    creds = {}
    if creds_path.is_file():
        if creds_path.stat().st_mode & 0o077:  # someone loosened it: the secret key must stay private
            with contextlib.suppress(PermissionError):  # not ours to fix; reading it still works
                os.chmod(creds_path, 0o600)
        creds = json.loads(creds_path.read_text())
    return StackState(services=services, credentials=creds)


def write_services(state_dir: Path, services: dict) -> None:
    """Record the services in ``stack.json`` (temp file + rename: readers see the old or the new file)."""
    path = Path(state_dir) / STACK_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"services": services}, indent=2) + "\n")
    os.replace(tmp, path)


def create_credentials(state_dir: Path) -> dict[str, str]:
    """The S3 admin key pair, generated into a 0600 ``credentials.json`` unless one exists."""
    existing = read_stack_state(state_dir).credentials
    if existing:
        return existing
    creds = {"aws_access_key_id": "adaptflow-" + secrets.token_hex(8), "aws_secret_access_key": secrets.token_hex(32)}
    # created 0600 from the start (not chmod-ed afterwards), so the secret is never world-readable
    fd = os.open(Path(state_dir) / CREDENTIALS_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f)
    return creds


@contextlib.contextmanager
def locked(state_dir: Path):
    """One ``up``/``down`` at a time per state dir: two concurrent ``up``s would start every service twice."""
    with open(Path(state_dir) / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
