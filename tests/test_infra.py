"""Static checks of infra/: the deployable shapes of the stack (compose, Dockerfiles, Kubernetes, S3 policy).

No Docker engine and no cluster here, so each file is checked by what *can* read it offline:
- compose.yaml is interpolated from .env.example the way compose does it, then checked for the services,
  the dependency graph, the GPU reservation, secrets only through `${VAR:?}`, and cross-service wiring
  (URLs, credentials, database roles); `docker compose config -q` runs too where the CLI has compose;
- the Kubernetes pool template goes through Prefect's own machinery: the server's base-job-template
  validator (undeclared `{{ var }}`), Prefect's JSON-schema validation of variable values, and
  `BaseJobConfiguration.from_template_and_values` rendering, plus the manifest checks prefect-kubernetes
  applies (that package is not installed, so they are mirrored here);
- the S3 policy against the prefixes adaptflow writes; the Dockerfiles against pyproject/Makefile pins;
- seaweedfs/entrypoint.sh and create_bucket.py are executed with stand-ins (no server).
"""

from __future__ import annotations

import asyncio
import copy
import fnmatch
import importlib.util
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import jsonpatch
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE_FILE = INFRA / "compose.yaml"
ENV_EXAMPLE = INFRA / ".env.example"
POOL_TEMPLATE = INFRA / "kubernetes" / "gpu-pool-template.json"
WORKER_DEPLOYMENT = INFRA / "kubernetes" / "worker-deployment.yaml"
S3_POLICY = INFRA / "s3-worker-policy.json"

REQUIRED_SERVICES = {"postgres", "seaweedfs", "create-bucket", "prefect-server", "mlflow", "worker-cpu", "worker-gpu"}
# runs/: a gpu subflow's hand-over to its parent; locks/: the promotion lease (compare-and-swap, never deleted)
ARTIFACT_PREFIXES = [
    "snapshots", "validated", "tokens", "embeddings", "heads", "evaluations", "encoders", "mlflow", "runs", "locks",
    "lineage", "parts", "watch", "checkpoints", "monitoring",
]
GPU_RESERVATION = [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|API_KEY")
REQUIRED_REF = re.compile(r"^\$\{[A-Z][A-Z0-9_]*:\?[^}]*\}$")  # ${VAR:?message}: no default, refuse empty


# ---- helpers: compose-style interpolation ----------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
                            r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}."""

    def substitute(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["bare"]
        op, arg = m["op"], m["arg"]
        present, val = name in env, env.get(name, "")
        if op in (":-", "-"):
            return val if (present and (val or op == "-")) else arg
        if op in (":?", "?"):
            if not present or (op == ":?" and not val):
                raise KeyError(f"compose would refuse to start: {name} is required ({arg})")
            return val
        return val

    return _INTERPOLATION.sub(substitute, value)


def interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    return interpolate(node, env) if isinstance(node, str) else node


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def filled_env() -> dict[str, str]:
    """.env.example with every empty value filled the way its instructions say (hex)."""
    return {k: v or secrets.token_hex(20) for k, v in read_env_file(ENV_EXAMPLE).items()}


def walk_strings(node: Any):
    if isinstance(node, dict):
        for v in node.values():
            yield from walk_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk_strings(v)
    elif isinstance(node, str):
        yield node


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def command_list(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def flag_value(args: list[str], flag: str) -> str:
    for i, arg in enumerate(args):
        if arg == flag:
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {args}")


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def env_values() -> dict[str, str]:
    return filled_env()


@pytest.fixture(scope="module")
def compose(raw_compose, env_values) -> dict:
    return interpolate_tree(raw_compose, env_values)


# ---- every file parses ---------------------------------------------------------------------------------

def test_every_yaml_and_json_file_parses():
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
    assert {COMPOSE_FILE, POOL_TEMPLATE, WORKER_DEPLOYMENT, S3_POLICY} <= set(files)
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            assert docs, f"{path} is empty"


def test_interpolation_helper_follows_compose_rules():
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("a$$b ${SET} $SET ${EMPTY:-d} ${EMPTY-d} ${UNSET:-d} ${SET:?m}", env) == "a$b v v d  d v"
    with pytest.raises(KeyError, match="EMPTY"):
        interpolate("${EMPTY:?set it}", env)
    with pytest.raises(KeyError, match="UNSET"):
        interpolate("${UNSET?set it}", env)


# ---- compose ------------------------------------------------------------------------------------------

def test_compose_has_the_required_services(compose):
    assert REQUIRED_SERVICES <= set(compose["services"])


def test_compose_dependencies_exist_are_acyclic_and_wait_for_health(compose):
    services = compose["services"]
    for name, svc in services.items():
        for target, condition in depends_on(svc).items():
            assert target in services, f"{name} depends on unknown service {target!r}"
            assert condition in ("service_healthy", "service_completed_successfully"), \
                f"{name} -> {target}: waits only for the container start ({condition})"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy; it has no healthcheck"
            else:
                assert services[target].get("restart") == "no", f"{target} is a one-shot job: restart must be 'no'"
    # topological order exists (no cycle)
    remaining = {n: set(depends_on(s)) for n, s in services.items()}
    while remaining:
        ready = [n for n, deps in remaining.items() if not deps & set(remaining)]
        assert ready, f"dependency cycle among {sorted(remaining)}"
        for n in ready:
            del remaining[n]


def test_compose_start_order(compose):
    deps = {n: depends_on(s) for n, s in compose["services"].items()}
    assert deps["create-bucket"] == {"seaweedfs": "service_healthy"}
    assert deps["prefect-server"]["postgres"] == "service_healthy"
    assert deps["mlflow"] == {"postgres": "service_healthy", "create-bucket": "service_completed_successfully"}
    for worker in ("worker-cpu", "worker-gpu"):
        assert deps[worker] == {"prefect-server": "service_healthy", "mlflow": "service_healthy",
                                "create-bucket": "service_completed_successfully"}


def test_long_running_services_have_healthchecks_and_restart(compose):
    for name, svc in compose["services"].items():
        if name == "create-bucket":
            continue
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no healthcheck"
        assert svc.get("restart") == "unless-stopped", name


def test_gpu_worker_reserves_one_nvidia_gpu_and_cpu_worker_none(compose):
    gpu, cpu = compose["services"]["worker-gpu"], compose["services"]["worker-cpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == GPU_RESERVATION
    assert "deploy" not in cpu
    assert gpu["build"]["args"]["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")


def test_workers_poll_their_pools_as_process_workers(compose):
    for name, pool in (("worker-cpu", "cpu"), ("worker-gpu", "gpu")):
        svc = compose["services"][name]
        args = command_list(svc)  # appended to the image's ENTRYPOINT `prefect worker start`
        assert flag_value(args, "--pool") == pool
        assert flag_value(args, "--type") == "process"
        assert "--with-healthcheck" in args  # the compose healthcheck polls its :8080/health
        assert svc["build"]["dockerfile"] == "infra/worker.Dockerfile"
        assert (INFRA / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == INFRA / "worker.Dockerfile"
    assert flag_value(command_list(compose["services"]["worker-gpu"]), "--limit") == "1"


def test_no_literal_secrets_in_compose(raw_compose):
    """Secret-looking variables take `${VAR:?…}` (no default: a default would be a secret in the repo)."""
    checked = 0
    for name, svc in raw_compose["services"].items():
        for key, value in environment(svc).items():
            if SECRET_NAME.search(key):
                assert REQUIRED_REF.match(value), f"{name}.{key} = {value!r}: must be ${{VAR:?…}} from the env file"
                checked += 1
    assert checked >= 10
    for text in walk_strings(raw_compose):
        # credentials inside URLs (postgresql://user:pass@host) must be references too
        for userinfo in re.findall(r"://([^/@\s]+)@", text):
            _, _, password = userinfo.partition(":")
            assert REQUIRED_REF.match(password), f"literal credential in {text!r}"
        # no secret variable with a default value anywhere (e.g. ${POSTGRES_PASSWORD:-postgres})
        for var, op in re.findall(r"\$\{([A-Z0-9_]+)(:?[-?])", text):
            if SECRET_NAME.search(var):
                assert op in (":?", "?"), f"${{{var}{op}…}} gives a secret a default"


def test_env_example_lists_every_variable_and_holds_no_secret(raw_compose):
    template = read_env_file(ENV_EXAMPLE)
    referenced = {m["braced"] or m["bare"] for text in walk_strings(raw_compose)
                  for m in _INTERPOLATION.finditer(text) if not m["escaped"]}
    assert referenced <= set(template), f"not in .env.example: {sorted(referenced - set(template))}"
    assert set(template) <= referenced, f"unused in compose.yaml: {sorted(set(template) - referenced)}"
    for key, value in template.items():
        if SECRET_NAME.search(key):
            assert value == "", f".env.example must leave {key} empty (compose then refuses to start)"
    with pytest.raises(KeyError):  # the unfilled template is refused, not silently used
        interpolate_tree(raw_compose, template)


def test_env_example_fill_instructions_work(tmp_path, raw_compose):
    """The one-liner in .env.example / infra/README.md produces an env file compose accepts."""
    if not (shutil.which("bash") and shutil.which("openssl")):
        pytest.skip("needs bash and openssl")
    text = ENV_EXAMPLE.read_text()
    snippet = re.search(r"#   (while IFS=.*?\\)\n#     (< infra/\.env\.example > \.env)", text)
    assert snippet, ".env.example lost its fill instructions"
    command = snippet[1][:-1] + snippet[2].replace("> .env", f"> {tmp_path / '.env'}")
    subprocess.run(["bash", "-c", command], cwd=ROOT, check=True, timeout=30)
    filled = read_env_file(tmp_path / ".env")
    assert all(filled[k] for k in filled if SECRET_NAME.search(k))
    assert "worker-gpu" in interpolate_tree(raw_compose, filled)["services"]
    assert command.replace(str(tmp_path / ".env"), ".env") in (INFRA / "README.md").read_text().replace("\\\n  ", "")


def test_postgres_serves_both_databases_with_own_roles(compose, raw_compose):
    pg = compose["services"]["postgres"]
    assert pg["image"].split(":")[1].split(".")[0] == "16"
    mounts = [v for v in pg["volumes"] if isinstance(v, str)]
    assert "./postgres/init.sql:/docker-entrypoint-initdb.d/10-init.sql:ro" in mounts
    init = (INFRA / "postgres" / "init.sql").read_text()
    for db, var in (("mlflow", "MLFLOW_DB_PASSWORD"), ("prefect", "PREFECT_DB_PASSWORD")):
        assert re.search(rf"CREATE ROLE {db} LOGIN PASSWORD :'\w+'", init)
        assert re.search(rf"CREATE DATABASE {db} OWNER {db};", init)
        assert rf"\getenv {db}_password {var}" in init
        assert REQUIRED_REF.match(environment(raw_compose["services"]["postgres"])[var])
    assert r"\set ON_ERROR_STOP on" in init
    assert "PASSWORD '" not in init  # no literal password


def test_mlflow_uses_postgres_and_proxies_artifacts_to_s3(compose, raw_compose):
    mlflow = compose["services"]["mlflow"]
    args = command_list(mlflow)
    assert args[:2] == ["mlflow", "server"]
    store = urlsplit(flag_value(args, "--backend-store-uri"))
    assert store.scheme in ("postgresql", "postgresql+psycopg2")
    assert (store.hostname, store.port, store.path, store.username) == ("postgres", 5432, "/mlflow", "mlflow")
    raw_uri = flag_value(command_list(raw_compose["services"]["mlflow"]), "--backend-store-uri")
    assert "${MLFLOW_DB_PASSWORD:?" in raw_uri  # the same password postgres' init.sql gives role mlflow
    bucket = compose["services"]["create-bucket"]["environment"]["ADAPTFLOW_BUCKET"]
    assert flag_value(args, "--artifacts-destination") == f"s3://{bucket}/mlflow" == "s3://adaptflow/mlflow"
    env = environment(mlflow)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE"] == "path"
    assert urlsplit(env["MLFLOW_S3_ENDPOINT_URL"]).hostname == "seaweedfs"
    # the psycopg2 driver the URI names is what the image installs
    assert "psycopg2-binary" in (INFRA / "mlflow.Dockerfile").read_text()


def test_prefect_server_uses_postgres(compose):
    prefect = compose["services"]["prefect-server"]
    assert prefect["image"] == "prefecthq/prefect:3.9.1-python3.11"
    url = urlsplit(environment(prefect)["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert url.scheme == "postgresql+asyncpg"
    assert (url.hostname, url.port, url.path, url.username) == ("postgres", 5432, "/prefect", "prefect")
    assert flag_value(command_list(prefect), "--port") == "4200"


def test_workers_reach_the_services_by_name(compose):
    services = compose["services"]
    s3_port = int(flag_value(command_list(services["seaweedfs"]), "-s3.port"))
    allowed_hosts = environment(services["mlflow"])["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    for name in ("worker-cpu", "worker-gpu"):
        env = environment(services[name])
        for var, (service, port, path) in {"AWS_ENDPOINT_URL_S3": ("seaweedfs", s3_port, ""),
                                          "MLFLOW_TRACKING_URI": ("mlflow", 5000, ""),
                                          "PREFECT_API_URL": ("prefect-server", 4200, "/api")}.items():
            url = urlsplit(env[var])
            assert (url.hostname, url.port, url.path) == (service, port, path), f"{name}.{var}={env[var]}"
        # MLflow 3 answers 403 to a Host header it does not list: the workers' must be listed
        host = urlsplit(env["MLFLOW_TRACKING_URI"]).netloc
        assert any(fnmatch.fnmatch(host, pattern) if "*" in pattern else host == pattern for pattern in allowed_hosts)
        assert env["ADAPTFLOW_BUCKET"] == "adaptflow"


def test_each_service_gets_its_own_s3_identity(raw_compose):
    """admin → bucket job, mlflow → MLflow, worker → workers; SeaweedFS is given all three."""
    services = raw_compose["services"]
    expected = {"create-bucket": "ADMIN", "mlflow": "MLFLOW", "worker-cpu": "WORKER", "worker-gpu": "WORKER"}
    for name, who in expected.items():
        env = environment(services[name])
        assert env["AWS_ACCESS_KEY_ID"].startswith(f"${{S3_{who}_ACCESS_KEY:?"), name
        assert env["AWS_SECRET_ACCESS_KEY"].startswith(f"${{S3_{who}_SECRET_KEY:?"), name
    seaweed_env = environment(services["seaweedfs"])
    script = (INFRA / "seaweedfs" / "entrypoint.sh").read_text()
    for who in ("ADMIN", "MLFLOW", "WORKER"):
        for kind in ("ACCESS", "SECRET"):
            var = f"S3_{who}_{kind}_KEY"
            assert seaweed_env[var].startswith(f"${{{var}:?") and f"${var}" in script


def test_volumes_are_named_or_existing_files(compose):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith((".", "/")):
                assert (INFRA / source).is_file(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source!r} not declared at top level"
                used.add(source)
    assert used == declared
    assert {"postgres-data", "seaweedfs-data"} <= declared


def test_images_are_pinned_and_builds_exist(compose):
    for name, svc in compose["services"].items():
        image = svc.get("image")
        assert image, f"{name}: no image name"
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
        assert tag and tag != "latest", f"{name}: image {image!r} is not pinned"
        if "build" in svc:
            dockerfile = INFRA / svc["build"]["context"] / svc["build"]["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"


def test_published_ports_default_to_loopback(raw_compose, compose):
    for name, svc in raw_compose["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {port} not bound via BIND_ADDRESS"
    assert "ports" not in compose["services"]["postgres"]  # the database is reachable from the network only


def test_seaweedfs_is_configured_for_identities_and_quiet(compose):
    svc = compose["services"]["seaweedfs"]
    args = command_list(svc)
    assert svc["entrypoint"] == ["/bin/sh", "/etc/seaweedfs/entrypoint.sh"]
    assert args[0] == "server" and "-s3" in args
    for flag in ("-s3.autoCreateBucket=false", "-master.telemetry=false", "-ip.bind=0.0.0.0"):
        assert flag in args
    assert "/run/seaweedfs" in svc["tmpfs"] and environment(svc)["S3_CONFIG_PATH"].startswith("/run/seaweedfs/")
    assert int(svc["stop_grace_period"].rstrip("s")) >= 30


def _compose_cli() -> Optional[list[str]]:
    for cli in (["docker", "compose"], ["docker-compose"]):
        if not shutil.which(cli[0]):
            continue
        try:
            out = subprocess.run([*cli, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and re.search(r"v?[2-9]\.\d+", out.stdout):
            return cli
    return None


def test_docker_compose_config_accepts_the_file(tmp_path, env_values):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Docker CLI with compose v2 here (`docker compose version` fails)")
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env_values.items()))
    out = subprocess.run([*cli, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config", "-q"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# ---- Dockerfiles --------------------------------------------------------------------------------------

def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l else "") for l in lines]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(requirements: str, name: str) -> Version:
    m = re.search(rf"(?<![\w-]){re.escape(name)}==([\w.+]+)", requirements)
    assert m, f"{name} not pinned in {requirements!r}"
    return Version(m[1])


def test_worker_dockerfile_installs_torch_before_the_project():
    steps = _instructions(INFRA / "worker.Dockerfile")
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = [args for op, args in steps if op == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "torch==" in r)
    project_step = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert torch_step < project_step
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch_step]
    copy_index = next(i for i, (op, _) in enumerate(steps) if op == "COPY")
    assert steps.index(("RUN", runs[torch_step])) < copy_index, "torch must be installed before the code is copied (layer cache)"
    assert "pip check" in runs[project_step]
    # the same torch the Makefile installs, inside the project's range
    makefile_torch = re.search(r"^TORCH\s*:=\s*torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)[1]
    torch = _pin(runs[torch_step], "torch")
    assert torch == Version(makefile_torch) == Version("2.13.0")
    torch_req = next(Requirement(r) for r in _pyproject()["project"]["dependencies"] if Requirement(r).name == "torch")
    assert torch in torch_req.specifier
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


def test_worker_dockerfile_runs_non_root_offline_as_a_prefect_worker():
    steps = _instructions(INFRA / "worker.Dockerfile")
    users = [a for op, a in steps if op == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), "numeric non-root USER (Kubernetes runAsNonRoot)"
    env = " ".join(a for op, a in steps if op == "ENV")
    assert "HF_HUB_OFFLINE=1" in env
    entrypoint = next(json.loads(a) for op, a in steps if op == "ENTRYPOINT")
    assert entrypoint == ["prefect", "worker", "start"]
    ignore = (INFRA / "worker.Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*" and not any(p.startswith("!.") for p in ignore)  # allow-list, no dotfiles
    for package in _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f"!{package.rstrip('*')}" in ignore, f"{package} would be missing from the image"
    assert f"!{_pyproject()['project']['readme']}" in ignore


def test_mlflow_dockerfile_pins_what_the_project_pins():
    steps = _instructions(INFRA / "mlflow.Dockerfile")
    assert steps[0] == ("FROM", "python:3.11-slim")
    install = next(a for op, a in steps if op == "RUN" and "pip install" in a)
    deps = {Requirement(r).name: Requirement(r) for r in _pyproject()["project"]["dependencies"]}
    assert _pin(install, "mlflow") in deps["mlflow"].specifier
    assert _pin(install, "boto3") in deps["boto3"].specifier
    assert _pin(install, "psycopg2-binary") in deps["psycopg2-binary"].specifier
    assert any(op == "USER" and a.split(":")[0] not in ("0", "root") for op, a in steps)


# ---- SeaweedFS entrypoint and bucket job (run with stand-ins) ---------------------------------------------

def _seaweed_env(tmp_path: Path, **overrides) -> dict[str, str]:
    stub = tmp_path / "weed"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$(dirname "$0")/weed.args"\n')
    stub.chmod(0o755)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "WEED": str(stub),
           "S3_CONFIG_PATH": str(tmp_path / "run" / "s3.json"), "ADAPTFLOW_BUCKET": "adaptflow"}
    for who in ("ADMIN", "MLFLOW", "WORKER"):
        env[f"S3_{who}_ACCESS_KEY"] = f"{who.lower()}-access"
        env[f"S3_{who}_SECRET_KEY"] = secrets.token_hex(20)
    env.update(overrides)
    return env


def test_seaweedfs_entrypoint_renders_least_privilege_identities(tmp_path):
    env = _seaweed_env(tmp_path)
    subprocess.run(["sh", str(INFRA / "seaweedfs" / "entrypoint.sh"), "server", "-s3"], env=env, check=True, timeout=30)
    config_path = Path(env["S3_CONFIG_PATH"])
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    identities = {i["name"]: i for i in json.loads(config_path.read_text())["identities"]}
    assert set(identities) == {"admin", "mlflow", "worker"}
    assert "Admin" in identities["admin"]["actions"]
    for name in ("mlflow", "worker"):
        assert identities[name]["actions"] == ["Read:adaptflow", "Write:adaptflow", "List:adaptflow"]
        assert identities[name]["credentials"] == [{"accessKey": env[f"S3_{name.upper()}_ACCESS_KEY"],
                                                    "secretKey": env[f"S3_{name.upper()}_SECRET_KEY"]}]
    args = (tmp_path / "weed.args").read_text().split()
    assert args == ["server", "-s3", f"-s3.config={config_path}"]


@pytest.mark.parametrize("bad", ['with"quote', "", "new\nline", "sp ace"])
def test_seaweedfs_entrypoint_refuses_values_that_break_json(tmp_path, bad):
    env = _seaweed_env(tmp_path, S3_WORKER_SECRET_KEY=bad)
    out = subprocess.run(["sh", str(INFRA / "seaweedfs" / "entrypoint.sh"), "server"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 64
    assert "S3_WORKER_SECRET_KEY" in out.stderr and (not bad or bad not in out.stderr)
    assert not Path(env["S3_CONFIG_PATH"]).exists() and not (tmp_path / "weed.args").exists()


def _load_create_bucket():
    spec = importlib.util.spec_from_file_location("infra_create_bucket", INFRA / "create_bucket.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FakeS3:
    def __init__(self, outcomes):
        self.outcomes, self.calls = list(outcomes), []

    def create_bucket(self, **kwargs):
        from botocore.exceptions import ClientError

        self.calls.append(kwargs)
        code = self.outcomes.pop(0)
        if code:
            raise ClientError({"Error": {"Code": code, "Message": code}}, "CreateBucket")


@pytest.mark.parametrize("outcomes, rc, calls", [
    ([None], 0, 1),                               # created
    (["BucketAlreadyOwnedByYou"], 0, 1),          # idempotent
    (["ServiceUnavailable", None], 0, 2),         # the filer lagging /healthz: retried
    (["AccessDenied"], 1, 1),                     # wrong identity: no pointless retries
])
def test_create_bucket_job(monkeypatch, outcomes, rc, calls):
    module = _load_create_bucket()
    fake = _FakeS3(outcomes)
    monkeypatch.setattr(module.boto3, "client", lambda *a, **k: fake)
    monkeypatch.setattr(module.time, "sleep", lambda s: None)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://seaweedfs:8333")
    monkeypatch.setenv("ADAPTFLOW_BUCKET", "adaptflow")
    assert module.main() == rc
    assert fake.calls == [{"Bucket": "adaptflow"}] * calls


# ---- Kubernetes: the GPU work pool template ---------------------------------------------------------------

# prefect-kubernetes (not installed here) requires these paths with these values in every job manifest
# (its `_get_base_job_manifest` + the "missing"/"incompatible" validators of KubernetesWorkerJobConfiguration).
K8S_BASE_MANIFEST = {
    "apiVersion": "batch/v1", "kind": "Job", "metadata": {"labels": {}},
    "spec": {"template": {"spec": {"parallelism": 1, "completions": 1, "restartPolicy": "Never",
                                   "containers": [{"name": "prefect-job"}]}}},
}


def _kubernetes_job_configuration():
    from pydantic import ConfigDict
    from prefect.workers.base import BaseJobConfiguration

    class KubernetesJobConfiguration(BaseJobConfiguration):
        """The fields prefect-kubernetes' job configuration adds; extra keys are refused, as typos."""

        model_config = ConfigDict(extra="forbid")
        namespace: str = "default"
        job_manifest: dict[str, Any]
        cluster_config: Optional[dict] = None
        job_watch_timeout_seconds: Optional[int] = None
        pod_watch_timeout_seconds: int = 60
        stream_output: bool = True

    return KubernetesJobConfiguration


class _NoClient:
    """Rendering must not need a Prefect API (no block or variable references in the template)."""

    def __getattr__(self, name):
        raise AssertionError(f"template rendering tried to use the Prefect API ({name})")


def render_pool_template(template: dict, values: Optional[dict] = None):
    """Validate a base job template the way Prefect does, offline, and render it with ``values``.

    1. the server's validator (what `prefect work-pool create` hits): every {{ var }} must be declared;
    2. the variables schema is valid JSON schema, and its defaults and ``values`` conform to it;
    3. Prefect's own rendering (`BaseJobConfiguration.from_template_and_values`);
    4. prefect-kubernetes' manifest rules: required paths present, fixed values unchanged.
    """
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools import validate

    WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=template)
    schema = template["variables"]
    defaults = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    for candidate in (defaults, values or {}):
        validate(candidate, schema, raise_on_error=True, preprocess=True, ignore_required=True)
    config = asyncio.run(_kubernetes_job_configuration().from_template_and_values(
        template, values or {}, client=_NoClient()))
    manifest = config.job_manifest
    # prefect-kubernetes fills these in before it compares (its _ensure_*_is_present validators)
    manifest.setdefault("metadata", {}).setdefault("labels", {})
    manifest["metadata"].setdefault("namespace", config.namespace)
    patch = jsonpatch.JsonPatch.from_diff(manifest, K8S_BASE_MANIFEST)
    missing = sorted(op["path"] for op in patch if op["op"] == "add")
    if missing:
        raise ValueError(f"job manifest is missing required paths: {missing}")
    incompatible = sorted(op["path"] for op in patch if op["op"] == "replace")
    if incompatible:
        raise ValueError(f"job manifest has incompatible values at: {incompatible}")
    leftover = re.findall(r"\{\{.*?\}\}", json.dumps(config.model_dump()))
    if leftover:
        raise ValueError(f"unrendered placeholders: {leftover}")
    return config


@pytest.fixture(scope="module")
def pool_template() -> dict:
    return json.loads(POOL_TEMPLATE.read_text())


def _container(config) -> dict:
    return config.job_manifest["spec"]["template"]["spec"]["containers"][0]


def test_pool_template_has_prefect_base_job_template_shape(pool_template):
    assert set(pool_template) == {"job_configuration", "variables"}
    assert pool_template["variables"]["type"] == "object"
    assert {"job_manifest", "namespace", "env", "command", "name", "labels"} <= set(pool_template["job_configuration"])


def test_pool_template_renders_with_defaults_one_gpu_requested_and_limited(pool_template):
    config = render_pool_template(pool_template)
    pod = config.job_manifest["spec"]["template"]["spec"]
    container = _container(config)
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert container["image"] == pool_template["variables"]["properties"]["image"]["default"]
    assert container["envFrom"] == [{"secretRef": {"name": "adaptflow-runtime"}}]
    assert config.namespace == config.job_manifest["metadata"]["namespace"] == "adaptflow"
    assert pod["serviceAccountName"] == "adaptflow-flow-run" and pod["automountServiceAccountToken"] is False
    # the image's ENTRYPOINT is `prefect worker start`; Prefect puts the flow-run command in `args`
    assert container["command"] == ["/usr/bin/env", "--"]
    assert container["securityContext"]["runAsNonRoot"] is True
    assert "cpu" not in container["resources"]["limits"]  # unset variables drop out, never render as null


def test_pool_template_job_variables_override(pool_template):
    values = {"gpu_count": 2, "image": "ghcr.io/acme/adaptflow-worker:1-gpu",
              "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"}, "namespace": "ml"}
    config = render_pool_template(pool_template, values)
    container = _container(config)
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["image"] == values["image"]
    assert config.job_manifest["spec"]["template"]["spec"]["nodeSelector"] == values["node_selector"]
    assert config.job_manifest["metadata"]["namespace"] == "ml"


@pytest.mark.parametrize("break_it, error", [
    # a typo'd placeholder: Prefect's rendering would silently drop the key; the server validator refuses it
    (lambda t: _container_template(t)["resources"]["limits"].__setitem__("nvidia.com/gpu", "{{ gpu_cont }}"),
     r"undeclared variable\(s\): gpu_cont"),
    (lambda t: t["variables"]["properties"]["gpu_count"].__setitem__("default", 0), "less than the minimum of 1"),
    (lambda t: t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"].__setitem__("restartPolicy", "Always"),
     "incompatible values at: .*restartPolicy"),
    (lambda t: _container_template(t).__setitem__("name", "gpu-job"), "incompatible values at: .*containers/0/name"),
    (lambda t: t["job_configuration"]["job_manifest"].pop("apiVersion"), "missing required paths: .*apiVersion"),
    (lambda t: t["job_configuration"].__setitem__("namespce", "{{ namespace }}"), r"(?s)namespce.*Extra inputs"),
])
def test_pool_template_validation_catches_mistakes(pool_template, break_it, error):
    broken = copy.deepcopy(pool_template)
    break_it(broken)
    with pytest.raises(Exception, match=error):
        render_pool_template(broken)


def test_pool_template_rejects_bad_job_variables(pool_template):
    with pytest.raises(Exception, match="gpu_count"):
        render_pool_template(pool_template, {"gpu_count": "two"})


def _container_template(template: dict) -> dict:
    return template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]


# ---- Kubernetes: worker Deployment and RBAC ---------------------------------------------------------------

@pytest.fixture(scope="module")
def k8s_objects() -> dict[tuple[str, str], dict]:
    docs = [d for d in yaml.safe_load_all(WORKER_DEPLOYMENT.read_text()) if d]
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(objects) == len(docs), "duplicate objects"
    return objects


def test_worker_deployment_runs_the_kubernetes_worker_for_pool_gpu(k8s_objects, pool_template):
    deployment = k8s_objects[("Deployment", "prefect-worker")]
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    args = container["args"]
    assert args[:3] == ["prefect", "worker", "start"]
    assert flag_value(args, "--pool") == "gpu" and flag_value(args, "--type") == "kubernetes"
    assert "--no-create-pool-if-not-found" in args  # the pool comes from gpu-pool-template.json, not defaults
    assert container["image"].startswith("prefecthq/prefect:3.9.1-") and container["image"].endswith("-kubernetes")
    secret = pool_template["variables"]["properties"]["runtime_secret_name"]["default"]
    assert {"secretRef": {"name": secret}} in container["envFrom"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health" and "--with-healthcheck" in args
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_worker_rbac_is_namespaced_and_minimal(k8s_objects, pool_template):
    namespace = pool_template["variables"]["properties"]["namespace"]["default"]
    assert ("Namespace", namespace) in k8s_objects
    for (kind, name), obj in k8s_objects.items():
        assert kind not in ("ClusterRole", "ClusterRoleBinding"), "no cluster-wide rights"
        if kind != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, f"{kind}/{name}"
    deployment = k8s_objects[("Deployment", "prefect-worker")]
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    binding = k8s_objects[("RoleBinding", "prefect-worker")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]
    assert ("ServiceAccount", account) in k8s_objects
    role = k8s_objects[("Role", binding["roleRef"]["name"])]
    rights = {(group, resource): set(rule["verbs"]) for rule in role["rules"]
              for group in rule["apiGroups"] for resource in rule["resources"]}
    assert {"create", "get", "list", "watch", "delete"} <= rights[("batch", "jobs")]
    assert {"get", "list", "watch"} <= rights[("", "pods")] and "get" in rights[("", "pods/log")]
    assert all("*" not in verbs for verbs in rights.values()) and all("*" not in key for key in rights)
    assert not any(resource == "secrets" for _, resource in rights), "the worker needs no access to Secrets"
    assert all(verbs <= {"get", "list", "watch"} for (g, r), verbs in rights.items() if (g, r) != ("batch", "jobs"))
    # the flow-run pods' account: exists, no token
    flow_account = pool_template["variables"]["properties"]["service_account_name"]["default"]
    assert k8s_objects[("ServiceAccount", flow_account)]["automountServiceAccountToken"] is False
    assert not any(s["name"] == flow_account for b in k8s_objects.values() if b["kind"] == "RoleBinding"
                   for s in b["subjects"])


def test_runtime_secret_template_has_the_settings_adaptflow_reads():
    keys = set(read_env_file(INFRA / "kubernetes" / "runtime.env.example"))
    assert {"AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
            "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "ADAPTFLOW_BUCKET"} <= keys
    for key, value in read_env_file(INFRA / "kubernetes" / "runtime.env.example").items():
        if SECRET_NAME.search(key):
            assert value == "", key


def test_readme_documents_the_commands():
    readme = (INFRA / "README.md").read_text()
    assert "docker compose --env-file .env -f infra/compose.yaml up -d" in readme
    assert "prefect work-pool create gpu --type kubernetes --base-job-template infra/kubernetes/gpu-pool-template.json" in readme
    assert "kubectl apply -f infra/kubernetes/worker-deployment.yaml" in readme
    gitignore = (INFRA / ".gitignore").read_text().split()
    assert ".env" in gitignore and "kubernetes/runtime.env" in gitignore


# ---- S3 policy ----------------------------------------------------------------------------------------

def test_s3_worker_policy_grants_only_the_artifact_prefixes():
    policy = json.loads(S3_POLICY.read_text())
    assert policy["Version"] == "2012-10-17"
    statements = policy["Statement"]
    assert all(s["Effect"] == "Allow" and "NotAction" not in s and "NotResource" not in s for s in statements)
    actions = {a for s in statements for a in s["Action"]}
    assert actions == {"s3:GetObject", "s3:PutObject", "s3:ListBucket", "s3:AbortMultipartUpload"}
    for s in statements:
        if "s3:ListBucket" in s["Action"]:
            assert s["Action"] == ["s3:ListBucket"] and s["Resource"] == ["arn:aws:s3:::adaptflow"]
            # IfExists: HeadBucket (adaptflow's bucket check) is authorised as ListBucket with no prefix
            prefixes = s["Condition"]["StringLikeIfExists"]["s3:prefix"]
            assert prefixes == [f"{p}/*" for p in ARTIFACT_PREFIXES]
        else:
            assert s["Resource"] == [f"arn:aws:s3:::adaptflow/{p}/*" for p in ARTIFACT_PREFIXES]
            assert set(s["Action"]) <= {"s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"}


def test_s3_policy_covers_every_prefix_adaptflow_writes(compose):
    """Tie the policy to the code: a new top-level prefix in the library must be added to the policy."""
    used = set()
    for path in (ROOT / "adaptflow").glob("*.py"):
        used |= set(re.findall(r"""\bprefix\s*=\s*f?["']([a-z_]+)/""", path.read_text()))
    mlflow_dest = flag_value(command_list(compose["services"]["mlflow"]), "--artifacts-destination")
    used.add(mlflow_dest.split("/")[3])
    assert used, "found no prefixes in adaptflow/: the pattern needs updating"
    assert used <= set(ARTIFACT_PREFIXES), f"not in s3-worker-policy.json: {sorted(used - set(ARTIFACT_PREFIXES))}"
