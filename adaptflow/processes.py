"""Long-running processes recorded by PID: start one in its own session, tell whether a recorded PID is
still that process, stop its whole process group with escalating signals. psutil does the per-OS work.

A process is recorded as its PID and its creation time: a PID the system later hands to someone else has
another creation time, so it is never taken for ours nor signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import psutil

# SIGINT after SIGTERM: Prefect's server only finishes shutting down on a second signal
ESCALATION = ((signal.SIGTERM, 10.0), (signal.SIGINT, 5.0), (signal.SIGKILL, 5.0))
# psutil adds the boot time to a process's start; the boot time read from the kernel can jitter by a second
SAME_START_S = 1.5

_SPAWNED: dict[int, subprocess.Popen] = {}  # children of this process, so they can be reaped


def spawn(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    """Start ``cmd`` in a new session (its own process group, outliving us), output appended to ``log_path``."""
    with open(log_path, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    _SPAWNED[proc.pid] = proc
    return proc


def create_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), None when there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def reap(pid: int, timeout: float = 0) -> None:
    """Wait for ``pid`` if this very process started it (a zombie until then); others are their parent's job."""
    proc = _SPAWNED.get(pid)
    if proc is None:
        return
    try:
        proc.wait(timeout)
        del _SPAWNED[pid]
    except subprocess.TimeoutExpired:
        pass


def is_running(pid: int | None, started: float | None) -> bool:
    """True when ``pid`` is alive (not a zombie) and, where ``started`` was recorded, began at that time."""
    if not pid:
        return False
    reap(pid)
    try:
        proc = psutil.Process(pid)
        alive = proc.status() != psutil.STATUS_ZOMBIE
        return alive and (started is None or abs(proc.create_time() - started) < SAME_START_S)
    except psutil.NoSuchProcess:
        return False


def owns_group(pid: int | None, started: float | None) -> bool:
    """True when process group ``pid`` (started by us at ``started``) still has members that are ours to stop."""
    if not pid:
        return False
    if is_running(pid, started):
        return True
    try:
        leader_alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        leader_alive = False
    # leader gone (its workers may linger): the system never hands out a PID that is still a live group's ID,
    # so members of group ``pid`` are ours; a live leader with another start time is someone else's
    return not leader_alive and bool(group_members(pid))


def group_members(pgid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of process group ``pgid``."""
    members = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(OSError):  # gone meanwhile
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc)
    return members


def rss_mb(pgid: int) -> float | None:
    """Resident memory of a whole process group in MB."""
    total = 0
    for proc in group_members(pgid):
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return round(total / 2**20, 1) if total else None


def stop_groups(groups: dict[str, int], log: Callable[[str], None]) -> dict[str, list[int]]:
    """Stop process groups (name -> PGID): SIGTERM, then SIGINT, then SIGKILL, each awaited a while.

    Returns:
        the PIDs that survived even SIGKILL, by name ({} when all are gone).
    """
    pending = dict(groups)
    for sig, wait in ESCALATION:
        if not pending:
            break
        if sig != signal.SIGTERM:
            log(f"{', '.join(pending)}: still running, sending {sig.name}")
        for pgid in pending.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while (alive := [p for pgid in pending.values() for p in group_members(pgid)]) and time.monotonic() < deadline:
            # in slices: a zombie nobody reaps never counts as gone for psutil, but group_members skips it
            psutil.wait_procs(alive, timeout=min(0.5, max(0.0, deadline - time.monotonic())))
        pending = {name: pgid for name, pgid in pending.items() if group_members(pgid)}
    for pgid in groups.values():
        reap(pgid, timeout=5)
    return {name: [p.pid for p in group_members(pgid)] for name, pgid in pending.items()}
