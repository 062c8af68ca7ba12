"""TCP ports on 127.0.0.1 for the local stack: is one free, pick a free one, who holds one, which to use.

Free ports are picked below Linux's ephemeral range (32768+): there, an outgoing connection elsewhere could
grab the port between our check and the service's bind, or right after a stop.
"""

from __future__ import annotations

import secrets
import socket
from typing import Callable

import psutil

HOST = "127.0.0.1"
LOWEST, EPHEMERAL = 10000, 32768
# SeaweedFS assumes gRPC = HTTP + 10000 in places, so some ports need this twin free as well
TWIN_OFFSET = 10000


class PortError(RuntimeError):
    """No usable port: the message names the port, who holds it and what to do."""


def port_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:``port``."""
    with socket.socket() as s:
        # SO_REUSEADDR as the servers use it: a TIME_WAIT left by a stopped service is no conflict
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(taken: set[int], *, twin: bool = False) -> int:
    """A free port not in ``taken`` (added to it); with ``twin``, port + 10000 is free too."""
    high = EPHEMERAL - (TWIN_OFFSET if twin else 0)
    for _ in range(500):
        port = secrets.randbelow(high - LOWEST) + LOWEST
        pair = {port, port + TWIN_OFFSET} if twin else {port}
        if not pair & taken and all(port_free(p) for p in pair):
            taken |= pair
            return port
    raise PortError(f"no free port found on {HOST} between {LOWEST} and {EPHEMERAL - 1}")


def who_listens(port: int) -> str | None:
    """'pid N (command line)' of the process listening on ``port``, when the OS tells us."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:  # macOS lists other processes' sockets to root only
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            try:
                command = " ".join(psutil.Process(conn.pid).cmdline())
            except psutil.Error:
                command = "?"
            return f"pid {conn.pid} ({command[:120]})"
    return None


def choose_port(
    name: str, requested: int | None, recorded: int | None, default: int, taken: set[int], log: Callable[[str], None]
) -> int:
    """The port for service ``name``: ``requested`` (must be free), else its ``recorded`` port (URLs stay stable)
    or its ``default`` when free and not ``taken``, else a free one, with a note to ``log``."""
    if requested:
        if not port_free(requested):
            owner = who_listens(requested) or "another process"
            raise PortError(
                f"port {requested} requested for {name} is already in use by {owner}. Stop that process, "
                f"or pick another port (e.g. `adaptflow stack up --{name}-port N`), or omit the port to get a free one."
            )
        return requested
    candidate = recorded or default
    if candidate not in taken and port_free(candidate):
        return candidate
    port = free_port(taken)
    owner = who_listens(candidate) or "another process"
    log(f"{name}: {'recorded' if recorded else 'default'} port {candidate} is in use by {owner}; using port {port}")
    return port
