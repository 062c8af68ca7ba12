"""`adaptflow stack` for real: up, status, data through a down/up cycle, ports, credentials, auth."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import urllib.error
import urllib.request

import boto3
import psutil
import pytest
from botocore.config import Config
from typer.testing import CliRunner

from adaptflow import stack
from adaptflow.cli.stack import app
from adaptflow.ports import free_port, port_free
from adaptflow.settings import load_settings
from adaptflow.stack_state import read_stack_state, write_services

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)  # the service was its group's leader: any survivor (a worker) still answers
    except ProcessLookupError:
        return True
    return False


def alive(proc: psutil.Process) -> bool:
    """True while ``proc`` (that very process, not a reuse of its PID) runs; a zombie counts as gone."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def recorded_ports(state_dir) -> list[int]:
    services = read_stack_state(state_dir).services
    return [p for e in services.values() for p in (e["port"], *e.get("ports", {}).values())]


def test_up_status_down_up_keeps_data(tmp_path):
    d = str(tmp_path / "state")
    taken: set[int] = set()  # explicit free ports: never take (or move) a developer's 8333/5000/4200
    ports = {name: free_port(taken, twin=name == "s3") for name in stack.SERVICES}
    argv = ["--state-dir", d, "--s3-port", str(ports["s3"]), "--mlflow-port", str(ports["mlflow"])]
    try:
        result = cli("up", *argv, "--prefect-port", str(ports["prefect"]), "--timeout", "120")
        assert result.exit_code == 0, result.output

        result = cli("status", "--state-dir", d, "--json")
        assert result.exit_code == 0, result.output
        status = json.loads(result.stdout)  # exactly one JSON object
        assert set(status) == {"s3", "mlflow", "prefect"}
        assert all(s["healthy"] and s["url"] for s in status.values()), status
        assert status["prefect"]["api_url"] == f"http://127.0.0.1:{ports['prefect']}/api"
        pids = [s["pid"] for s in status.values()]
        # each service with every process it started (MLflow's and Prefect's workers)
        tree = [p for pid in pids for p in (psutil.Process(pid), *psutil.Process(pid).children(recursive=True))]
        assert len(tree) > len(pids)

        # idempotent: a second up leaves the running services alone
        assert cli("up", "--state-dir", d, "--json").exit_code == 0
        assert [s["pid"] for s in stack.status(d).values()] == pids

        assert stat.S_IMODE(os.stat(tmp_path / "state" / "credentials.json").st_mode) == 0o600
        settings = stack.stack_settings(d)
        s3 = boto3.client(
            "s3", endpoint_url=settings.s3_endpoint_url, aws_access_key_id=settings.aws_access_key_id,
            aws_secret_access_key=settings.secret_key, region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )  # fmt: skip
        s3.put_object(Bucket=settings.bucket, Key="keep/me.txt", Body=b"still here")
        with pytest.raises(urllib.error.HTTPError) as denied:  # no signature, no access
            urllib.request.urlopen(f"{settings.s3_endpoint_url}/{settings.bucket}/keep/me.txt", timeout=5)
        assert denied.value.code == 403

        import mlflow

        experiment_id = mlflow.MlflowClient(settings.mlflow_tracking_uri).create_experiment("kept")
        assert "AWS_ENDPOINT_URL_S3=" in cli("env", "--state-dir", d).stdout

        result = cli("down", "--state-dir", d)
        assert result.exit_code == 0, result.output
        assert all(group_gone(pid) for pid in pids)
        assert not [p for p in tree if alive(p)]  # no worker left behind either
        assert all(port_free(p) for p in recorded_ports(d))
        result = cli("status", "--state-dir", d, "--json")
        assert result.exit_code == 1 and not any(s["healthy"] for s in json.loads(result.stdout).values())

        # someone takes MLflow's recorded port meanwhile: up says so and picks another one
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the old server's TIME_WAITs
            squatter.bind(("127.0.0.1", ports["mlflow"]))
            squatter.listen()
            result = cli("up", "--state-dir", d, "--only", "s3,mlflow", "--json", "--timeout", "120")
        assert result.exit_code == 0, result.output
        assert f"port {ports['mlflow']}" in result.stderr and "in use by" in result.stderr
        status = json.loads(result.stdout)
        assert status["s3"]["url"] == settings.s3_endpoint_url  # recorded port reused: same URL
        assert status["mlflow"]["url"] != settings.mlflow_tracking_uri and status["mlflow"]["healthy"]
        assert s3.get_object(Bucket=settings.bucket, Key="keep/me.txt")["Body"].read() == b"still here"
        kept = mlflow.MlflowClient(status["mlflow"]["url"]).get_experiment_by_name("kept")
        assert kept is not None and kept.experiment_id == experiment_id
    finally:
        stack.down(d)
    assert all(group_gone(s["pid"]) for s in status.values() if s["pid"])


def test_requested_port_taken_is_named(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = runner.invoke(app, ["up", "--state-dir", str(tmp_path), "--only", "s3", "--s3-port", str(port)])
    assert result.exit_code == 1
    assert f"port {port}" in result.stderr and f"pid {os.getpid()}" in result.stderr  # who holds it
    assert read_stack_state(tmp_path).services == {}  # nothing started


def test_a_reused_pid_is_not_ours(tmp_path):
    """A recorded PID now held by another process (same PID, other start) is neither reported nor stopped."""
    stranger = subprocess.Popen(["sleep", "600"], start_new_session=True)  # its own group, like a service
    try:
        started = psutil.Process(stranger.pid).create_time()
        port = free_port(set())
        write_services(tmp_path, {"mlflow": {"url": f"http://127.0.0.1:{port}", "port": port,
                                             "pid": stranger.pid, "create_time": started - 3600}})  # fmt: skip
        assert not stack.status(tmp_path)["mlflow"]["running"]
        stack.down(tmp_path)
        assert stranger.poll() is None  # not signalled
        assert read_stack_state(tmp_path).services["mlflow"]["pid"] is None and port_free(port)
    finally:
        stranger.kill()
        stranger.wait()


def test_settings_and_stack_read_the_same_state(tmp_path, monkeypatch):
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "ADAPTFLOW_BUCKET"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    write_services(tmp_path, {"s3": {"url": "http://127.0.0.1:18333", "port": 18333, "bucket": "b"},
                              "mlflow": {"url": "http://127.0.0.1:15000", "port": 15000}})  # fmt: skip
    creds = tmp_path / "credentials.json"
    creds.write_text(json.dumps({"aws_access_key_id": "id", "aws_secret_access_key": "secret"}))
    os.chmod(creds, 0o644)  # loosened: whoever reads it first (here the settings) makes it private again
    settings = load_settings(tmp_path)
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert settings.from_stack and settings.secret_key == "secret" and settings.bucket == "b"
    assert stack.stack_settings(tmp_path).model_dump(exclude={"from_stack"}) == settings.model_dump(exclude={"from_stack"})


from tests.fixtures.postgres import pg_databases  # noqa: E402,F401  (fixture)


@pytest.mark.slow
def test_up_on_postgres_runs_mlflow_and_prefect_there_and_down_stops_them(tmp_path, pg_databases):
    """`up --postgres URL`: the databases are created, MLflow and Prefect keep their state there, both answer their
    health checks, `down` stops them; a second `up` without the option keeps the recorded databases."""
    import psycopg2

    server, names = pg_databases
    d = str(tmp_path / "state")
    taken: set[int] = set()
    ports = {name: free_port(taken, twin=name == "s3") for name in stack.SERVICES}
    argv = ["--state-dir", d, "--s3-port", str(ports["s3"]), "--mlflow-port", str(ports["mlflow"]),
            "--prefect-port", str(ports["prefect"]), "--timeout", "150"]
    try:
        result = cli("up", *argv, "--postgres", server, "--mlflow-db", names["mlflow"], "--prefect-db",
                     names["prefect"], "--json")
        assert result.exit_code == 0, result.output
        status = json.loads(result.stdout)
        assert all(s["healthy"] for s in status.values()), status
        assert status["mlflow"]["database"] == f"{server}/{names['mlflow']}"
        assert status["prefect"]["database"] == f"{server}/{names['prefect']}"
        assert not (tmp_path / "state" / "mlflow" / "mlflow.db").exists()

        import mlflow

        mlflow.MlflowClient(status["mlflow"]["url"]).create_experiment("on-postgres")
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: status["prefect"]["api_url"]}), \
                get_client(sync_client=True) as client:
            client.create_flow_from_name("stored-in-postgres")
        with psycopg2.connect(f"{server}/{names['mlflow']}") as db, db.cursor() as cursor:
            cursor.execute("SELECT name FROM experiments WHERE name = 'on-postgres'")
            assert cursor.fetchall() == [("on-postgres",)]
        with psycopg2.connect(f"{server}/{names['prefect']}") as db, db.cursor() as cursor:
            cursor.execute("SELECT name FROM flow WHERE name = 'stored-in-postgres'")
            assert cursor.fetchall() == [("stored-in-postgres",)]

        pids = [s["pid"] for s in status.values()]
        assert cli("down", "--state-dir", d).exit_code == 0
        assert all(group_gone(pid) for pid in pids)
        assert all(port_free(p) for p in recorded_ports(d))

        result = cli("up", "--state-dir", d, "--only", "mlflow", "--json", "--timeout", "150")  # no --postgres
        assert result.exit_code == 0, result.output
        status = json.loads(result.stdout)
        assert status["mlflow"]["database"] == f"{server}/{names['mlflow']}"
        assert mlflow.MlflowClient(status["mlflow"]["url"]).get_experiment_by_name("on-postgres") is not None
    finally:
        stack.down(d)


def test_postgres_option_checks_its_url_and_names_an_unreachable_server(tmp_path):
    result = runner.invoke(app, ["up", "--state-dir", str(tmp_path), "--only", "prefect", "--postgres",
                                 "mysql://root@127.0.0.1:3306"])
    assert result.exit_code == 1 and "postgresql://USER" in result.stderr
    port = free_port(set())  # nothing listens there
    result = runner.invoke(app, ["up", "--state-dir", str(tmp_path), "--only", "prefect", "--postgres",
                                 f"postgresql://postgres@127.0.0.1:{port}"])
    assert result.exit_code == 1 and f"cannot reach PostgreSQL at 127.0.0.1:{port}" in result.stderr
    assert not stack.status(tmp_path)["prefect"]["running"]  # nothing started
