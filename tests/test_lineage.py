"""Row lineage through the real flow: a row manifest per version, `models rows --diff`, and a gate that leaves
out the rows the champion trained on (real SeaweedFS, MLflow server, Prefect harness, the tiny encoder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from adaptflow.config import build_config
from adaptflow.data import normalise_text
from adaptflow.lineage import ROWS_TAG, read_rows, text_hashes
from adaptflow.registry import client_for
from adaptflow.store import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]
NAME = "lineage-test"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Train/test files cut from 700 distinct real reviews (row numbers are positions in this sample)."""
    frame = pd.read_csv(ROOT / "examples/data/rotten_tomatoes.csv")[["text", "label"]]
    frame = frame[frame["text"].map(normalise_text).astype(bool)]
    frame = frame.assign(key=frame["text"].map(normalise_text)).drop_duplicates("key").drop(columns="key")
    rows = frame.sample(n=700, random_state=5).reset_index(drop=True)
    folder = tmp_path_factory.mktemp("lineage")

    def save(name: str, part: pd.DataFrame) -> None:
        part.to_csv(folder / f"{name}.csv", index=False)

    save("train1", rows.iloc[:300])
    save("test1", rows.iloc[300:400])
    relabelled = rows.iloc[20:300].copy()  # 20 rows removed, 10 relabelled, 50 added
    relabelled.iloc[:10, 1] = relabelled.iloc[:10, 1].map({"fresh": "rotten", "rotten": "fresh"})
    save("train2", pd.concat([relabelled, rows.iloc[400:450]]))
    save("train3", rows.iloc[460:700])
    save("test_few", pd.concat([rows.iloc[100:150], rows.iloc[300:310]]))  # 50 the champion trained on + 10
    save("test3", pd.concat([rows.iloc[100:160], rows.iloc[300:400]]))  # 60 the champion trained on + 100
    return folder


def config(folder: Path, train: str, test: str, epochs: int = 5):
    return build_config({
        "name": NAME, "seed": 13,
        "data": {"train": str(folder / f"{train}.csv"), "test": str(folder / f"{test}.csv")},
        "encoder": {"ref": os.environ["LINEAGE_TEST_ENCODER"], "max_length": 32},
        "head": {"epochs": epochs}, "gate": {"smoke_test": False},
    })


def hashes_of(path: Path) -> list[str]:
    return text_hashes(pd.read_csv(path)["text"].map(normalise_text))


def run_cli(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "adaptflow", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_row_manifests_diff_and_a_gate_on_rows_neither_model_trained_on(
        services_env, fresh_bucket, monkeypatch, prefect_harness, files, test_settings, tiny_encoder_path, tmp_path):
    from flows.retrain import retrain

    monkeypatch.setenv("ADAPTFLOW_BUCKET", fresh_bucket)
    monkeypatch.setenv("LINEAGE_TEST_ENCODER", str(tiny_encoder_path))
    client = client_for(test_settings.mlflow_tracking_uri)
    store = ArtifactStore.from_settings(test_settings, bucket=fresh_bucket)

    first = retrain(config(files, "train1", "test1"))
    second = retrain(config(files, "train2", "test1"))

    # every version links its row manifest from its tags and its MLflow run
    for summary in (first, second):
        version = client.get_model_version(NAME, summary["version"])
        uri = version.tags[ROWS_TAG]
        assert uri.startswith(f"s3://{fresh_bucket}/lineage/") and uri.endswith("/rows.parquet")
        assert client.get_run(summary["run_id"]).data.tags[ROWS_TAG] == uri
        assert store.verify_manifest(uri[len(f"s3://{fresh_bucket}/"):].rsplit("/", 1)[0]) == []
    rows1 = read_rows(store, client.get_model_version(NAME, first["version"]).tags[ROWS_TAG])
    assert list(rows1.columns) == ["text_sha256", "label", "split", "partition", "row"]
    train1 = rows1[rows1["split"] == "train"]
    assert sorted(train1["text_sha256"]) == sorted(hashes_of(files / "train1.csv"))
    assert set(train1["partition"]) == {str((files / "train1.csv").resolve())}
    assert sorted(train1["row"]) == list(range(1, 301))  # the CSV data row each came from
    source = pd.read_csv(files / "train1.csv")
    some = train1.iloc[7]
    assert text_hashes([normalise_text(source["text"][some["row"] - 1])]) == [some["text_sha256"]]
    assert set(rows1.loc[rows1["split"] == "test", "partition"]) == {str((files / "test1.csv").resolve())}

    # the second version was gated on rows neither model trained on: none to leave out here
    assert second["gate"]["rows_excluded"] == 0 and second["gate"]["rows_compared"] == 100

    # `models rows`: counts per split and label, and the diff as Parquet
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "ADAPTFLOW_"))}
    env.update({**test_settings.process_env(), "ADAPTFLOW_BUCKET": fresh_bucket,
                "ADAPTFLOW_STATE_DIR": str(tmp_path / "no-stack")})
    out = tmp_path / "diff"
    done = run_cli(["models", "rows", NAME, second["version"], "--diff", first["version"], "--json",
                    "--output", str(out)], env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    train2 = pd.read_csv(files / "train2.csv")
    assert result["rows"] == 330 + 100
    assert result["counts"]["train"] == train2["label"].value_counts().to_dict()
    assert sum(result["counts"]["test"].values()) == 100
    assert {k: result["diff"][k] for k in ("added", "removed", "relabelled", "moved")} == {
        "added": 50, "removed": 20, "relabelled": 10, "moved": 0}
    added = pd.read_parquet(out / "added.parquet")
    assert sorted(added["text_sha256"]) == sorted(hashes_of(files / "train2.csv")[280:])
    removed = pd.read_parquet(out / "removed.parquet")
    assert sorted(removed["text_sha256"]) == sorted(hashes_of(files / "train1.csv")[:20])
    relabelled = pd.read_parquet(out / "relabelled.parquet")
    assert len(relabelled) == 10 and (relabelled["label"] != relabelled["old_label"]).all()
    done = run_cli(["models", "rows", NAME, first["version"]], env, tmp_path)
    assert done.returncode == 0 and "train" in done.stdout and "300" in done.stdout, done.stdout + done.stderr

    # a test file overlapping the champion's training rows: those rows are left out of the comparison...
    few = retrain(config(files, "train3", "test_few"))  # ...and when too few are left, the gate holds
    assert few["decision"] == "hold" and "only 10 of 60 test rows" in few["reason"], few["reason"]
    assert few["gate"]["rows_excluded"] == 50 and few["gate"]["rows_compared"] == 10
    gated = retrain(config(files, "train3", "test3"))
    assert gated["gate"]["rows_excluded"] == 60 and gated["gate"]["rows_compared"] == 100, gated
    recorded = json.loads(client.get_model_version(NAME, gated["version"]).tags["adaptflow.gate"])
    assert (recorded["rows_compared"], recorded["rows_excluded"]) == (100, 60)

    # a champion without a row manifest (registered before lineage): all rows, and the reason says so
    champion = client.get_model_version_by_alias(NAME, "champion")
    client.delete_model_version_tag(NAME, champion.version, ROWS_TAG)
    blind = retrain(config(files, "train3", "test3", epochs=6))  # (not the same run again: that may be a no-op)
    assert blind["gate"]["rows_excluded"] is None and blind["gate"]["rows_compared"] == 160
    assert f"champion v{champion.version} has no row manifest" in blind["reason"], blind["reason"]
