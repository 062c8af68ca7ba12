"""Batch scoring against real SeaweedFS + MLflow: a model registered by the retrain flow (tiny encoder, fp32)
scores partitioned lakes; idempotence, versions, the shared embedding cache, bad rows and partitions, the
manifest-last output and the CLI."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from adaptflow.config import build_config
from adaptflow.data import DataError
from adaptflow.scoring import ScoreRequest, list_scored, read_scored, score_location
from adaptflow.stages import StageContext
from adaptflow.store import ArtifactStore

WORDS = ["good", "bad", "great", "awful", "fun", "dull", "warm", "cold", "boring", "funny"]
POSITIVE = {"good", "great", "fun", "warm", "funny"}
DAYS = ["2026-11-28", "2026-11-29", "2026-11-30"]


def labelled(n: int, tag: str) -> pd.DataFrame:
    """``n`` distinct labelled texts in the tiny encoder's vocabulary (``tag`` keeps sets of texts apart)."""
    texts = [f"{WORDS[i % 10]} film {tag} {i} the story was {WORDS[(i * 3) % 10]}" for i in range(n)]
    return pd.DataFrame({"text": texts, "label": ["pos" if WORDS[i % 10] in POSITIVE else "neg" for i in range(n)]})


def unlabelled(day: str, n: int = 8) -> pd.DataFrame:
    frame = labelled(n, f"day {day}").drop(columns="label")
    return frame.assign(id=[f"{day}-{i}" for i in range(n)])


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def retrain_config(train: Path, name: str, encoder: Path, epochs: int = 5):
    return build_config({
        "name": name,
        "data": {"train": str(train), "test_size": 0.25},
        "encoder": {"ref": str(encoder), "max_length": 32, "dtype": "fp32", "device": "cpu"},
        "head": {"epochs": epochs},
        "gate": {"smoke_test": False},
    })


@pytest.fixture(scope="module")
def registered(test_settings, s3_client_module, prefect_harness, tiny_encoder_path, tmp_path_factory):
    """A bucket and model ``score-test`` version 1, registered by the retrain flow (tiny encoder, fp32)."""
    from flows.retrain import retrain

    bucket = f"t-{uuid.uuid4().hex[:16]}"
    s3_client_module.create_bucket(Bucket=bucket)
    train = tmp_path_factory.mktemp("train") / "train.csv"
    labelled(80, "train").to_csv(train, index=False)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in test_settings.process_env().items():
            mp.setenv(key, value)
        mp.setenv("ADAPTFLOW_BUCKET", bucket)
        first = retrain(retrain_config(train, "score-test", tiny_encoder_path))
    assert first["version"] == "1"
    return {"bucket": bucket, "train": train, "encoder": tiny_encoder_path}


@pytest.fixture(scope="module")
def s3_client_module(test_settings):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=test_settings.s3_endpoint_url,
                        aws_access_key_id=test_settings.aws_access_key_id,
                        aws_secret_access_key=test_settings.secret_key, region_name=test_settings.aws_region,
                        config=Config(s3={"addressing_style": "path"}))


@pytest.fixture
def ctx(registered, services_env, monkeypatch) -> StageContext:
    monkeypatch.setenv("ADAPTFLOW_BUCKET", registered["bucket"])
    return StageContext.from_env(services_env.model_copy(update={"bucket": registered["bucket"]}))


def upload_lake(s3_client, bucket: str, prefix: str, frames: dict[str, pd.DataFrame]) -> str:
    for day, frame in frames.items():
        s3_client.put_object(Bucket=bucket, Key=f"{prefix}/dt={day}/part-0.parquet", Body=parquet_bytes(frame))
    s3_client.put_object(Bucket=bucket, Key=f"{prefix}/_SUCCESS", Body=b"")
    return f"s3://{bucket}/{prefix}"


def keys(store: ArtifactStore, prefix: str) -> dict[str, str]:
    return {o["Key"]: o["ETag"] for o in store.list_objects(prefix)}


def test_scores_each_partition_once_per_version(ctx, registered, s3_client, tiny_encoder_path, tmp_path):
    frames = {day: unlabelled(day) for day in DAYS}
    lake = upload_lake(s3_client, registered["bucket"], "lake/new", frames)
    out = f"s3://{registered['bucket']}/scores"
    request = ScoreRequest(model_uri="models:/score-test@champion", input=lake, output=out, keep_columns=["id", "dt"])

    first = score_location(ctx, request)
    assert first["partitions"] == {"total": 3, "scored": 3, "skipped": 0, "bad": 0}
    assert first["rows"] == 24 and first["bad_rows"] == 0
    assert first["embeddings"]["encoded"] == 24 and first["embeddings"]["cached"] == 0
    assert first["embeddings"]["tokens"] > 0 and first["embeddings"]["tokens_per_s"] > 0
    assert sorted(first["written"]) == [f"{out}/model=score-test/version=1/dt={d}/part-0" for d in DAYS]

    scored = list_scored(out, store=ctx.store)
    assert len(scored) == 3
    table = read_scored(out, store=ctx.store).to_pandas()
    assert list(table.columns) == ["id", "dt", "row", "label", "proba_neg", "proba_pos", "reason", "model_name",
                                   "model_version", "encoder_digest", "scored_at"]
    assert len(table) == 24 and sorted(table["id"]) == sorted(i for f in frames.values() for i in f["id"])
    assert set(table["dt"]) == set(DAYS) and set(table["label"]) <= {"pos", "neg"} and table["reason"].isna().all()
    assert ((table["proba_neg"] + table["proba_pos"] - 1).abs() < 1e-6).all()
    assert set(table["model_version"]) == {"1"} and set(table["model_name"]) == {"score-test"}
    for part in scored:
        assert part["meta"]["input"]["etag"] and part["meta"]["rows"] == 8
        assert ctx.store.verify_manifest(part["prefix"].split("/", 3)[3]) == []

    # the same partitions again: nothing read, nothing written
    before = keys(ctx.store, "scores/")
    again = score_location(ctx, request)
    assert again["partitions"]["scored"] == 0 and again["partitions"]["skipped"] == 3 and again["rows"] == 0
    assert keys(ctx.store, "scores/") == before

    # a new partition lands: only it is scored
    s3_client.put_object(Bucket=registered["bucket"], Key="lake/new/dt=2026-12-01/part-0.parquet",
                         Body=parquet_bytes(unlabelled("2026-12-01")))
    grown = score_location(ctx, request)
    assert grown["partitions"]["scored"] == 1 and grown["partitions"]["skipped"] == 3

    # a new version writes under its own version=, from the cache (same encoder settings)
    from flows.retrain import retrain

    # (another head setting: the same config and data again would register nothing)
    second = retrain(retrain_config(registered["train"], "score-test", tiny_encoder_path, epochs=6))
    assert second["version"] == "2"
    v2 = score_location(ctx, request.model_copy(update={"model_uri": "models:/score-test/2"}))
    assert v2["partitions"]["scored"] == 4 and v2["embeddings"]["encoded"] == 0 and v2["embeddings"]["cached"] == 32
    assert all("/version=2/" in p for p in v2["written"])
    version_1 = keys(ctx.store, "scores/model=score-test/version=1/")
    assert {k: e for k, e in version_1.items() if k in before} == before  # version 1's partitions untouched


def test_scored_rows_are_not_encoded_again_by_the_retrain(ctx, registered, s3_client, tmp_path):
    """Score unlabelled rows; when they come back labelled, the retrain finds every vector in the cache."""
    from flows.retrain import retrain

    later = labelled(60, "arrives unlabelled")
    lake = tmp_path / "lake"
    for i, day in enumerate(DAYS):
        (lake / f"dt={day}").mkdir(parents=True)
        later.iloc[i * 20:(i + 1) * 20].drop(columns="label").to_csv(lake / f"dt={day}" / "part-0.csv", index=False)
    summary = score_location(ctx, ScoreRequest(model_uri="models:/score-test/1", input=str(lake),
                                               output=str(tmp_path / "scores")))
    assert summary["embeddings"]["encoded"] == 60 and summary["partitions"]["scored"] == 3

    labelled_file = tmp_path / "labelled.csv"
    later.to_csv(labelled_file, index=False)
    result = retrain(retrain_config(labelled_file, "score-reuse", registered["encoder"]))
    assert result["embeddings"]["encoded"] == 0
    assert result["embeddings"]["cached"] == result["rows"]["train"] + result["rows"]["test"]


def test_bad_rows_get_a_null_label_and_a_reason(ctx, registered, tmp_path):
    frame = pd.DataFrame({"text": ["good film the story was fun", "", "   ", None, "awful film dull"],
                          "id": ["a", "b", "c", "d", "e"]})
    source = tmp_path / "in" / "batch.parquet"
    source.parent.mkdir()
    frame.to_parquet(source, index=False)
    summary = score_location(ctx, ScoreRequest(model_uri="models:/score-test/1", input=str(source),
                                               output=str(tmp_path / "out"), keep_columns=["id"]))
    assert summary["rows"] == 5 and summary["bad_rows"] == 3
    table = read_scored(str(tmp_path / "out")).to_pandas().set_index("id")
    assert table.loc[["b", "c", "d"], "label"].isna().all() and table.loc[["b", "c", "d"], "proba_pos"].isna().all()
    assert list(table.loc[["b", "c", "d"], "reason"]) == ["empty text", "empty text", "missing text"]
    assert table.loc[["a", "e"], "label"].notna().all() and table.loc[["a", "e"], "reason"].isna().all()
    assert list(table["row"]) == [0, 1, 2, 3, 4]
    assert (tmp_path / "out" / "model=score-test" / "version=1" / "batch" / "scored.parquet").is_file()


def test_unreadable_partition_fails_naming_it_or_is_skipped(ctx, registered, tmp_path):
    lake = tmp_path / "lake"
    for day in DAYS[:2]:
        (lake / f"dt={day}").mkdir(parents=True)
        unlabelled(day).to_parquet(lake / f"dt={day}" / "part-0.parquet", index=False)
    broken = lake / "dt=2026-11-27" / "part-0.parquet"  # the first partition: the failed run writes nothing
    broken.parent.mkdir()
    broken.write_bytes(b"PAR1 this is not a parquet file")
    request = ScoreRequest(model_uri="models:/score-test/1", input=str(lake), output=str(tmp_path / "out"))

    with pytest.raises(DataError, match="dt=2026-11-27/part-0.parquet"):
        score_location(ctx, request)
    assert list_scored(str(tmp_path / "out")) == []
    skipped = score_location(ctx, request.model_copy(update={"on_bad_partition": "skip"}))
    assert skipped["partitions"] == {"total": 3, "scored": 2, "skipped": 0, "bad": 1}
    assert skipped["bad_partitions"][0]["path"] == str(broken.resolve()) and skipped["rows"] == 16
    assert len(list_scored(str(tmp_path / "out"))) == 2


def test_partitions_without_a_manifest_are_invisible(ctx, registered, tmp_path):
    source = tmp_path / "one.csv"
    unlabelled("x").to_csv(source, index=False)
    out = tmp_path / "out"
    score_location(ctx, ScoreRequest(model_uri="models:/score-test/1", input=str(source), output=str(out)))
    assert [p["prefix"] for p in list_scored(str(out))] == [str(out / "model=score-test" / "version=1" / "one")]
    # a crashed writer: the Parquet object in place, no manifest
    half = out / "model=score-test" / "version=1" / "half"
    half.mkdir()
    pq.write_table(read_scored(str(out)), half / "scored.parquet")
    assert len(list_scored(str(out))) == 1 and read_scored(str(out)).num_rows == 8
    # the same on S3
    store = ctx.store
    store.put_bytes("s3out/model=score-test/version=1/half/scored.parquet", (half / "scored.parquet").read_bytes())
    assert list_scored(f"s3://{registered['bucket']}/s3out", store=store) == []
    assert read_scored(f"s3://{registered['bucket']}/s3out", store=store).num_rows == 0


def test_cli_json_summary_and_exit_codes(ctx, registered, tmp_path, restored_environ):
    from typer.testing import CliRunner

    from adaptflow.cli import app

    source = tmp_path / "lake" / "dt=2026-12-02" / "part-0.jsonl"
    source.parent.mkdir(parents=True)
    source.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(["good fun", "dull"])))
    args = ["score", "models:/score-test@champion", "--input", str(tmp_path / "lake"), "--output",
            str(tmp_path / "out"), "--text-column", "body", "--keep-columns", "id,dt", "--json"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["partitions"]["scored"] == 1 and summary["rows"] == 2 and summary["model_version"] == "1"
    assert set(summary) >= {"embeddings", "rows_per_s", "written", "skipped", "bad_partitions"}
    again = json.loads(CliRunner().invoke(app, args).stdout.strip().splitlines()[-1])
    assert again["partitions"]["skipped"] == 1 and again["partitions"]["scored"] == 0

    (source.parent / "part-1.parquet").write_bytes(b"garbage")
    failed = CliRunner().invoke(app, args)
    assert failed.exit_code == 2 and "part-1.parquet" in failed.output
    unknown = CliRunner().invoke(app, ["score", "models:/no-such-model/7", "--input", str(source), "--output",
                                       str(tmp_path / "o2")])
    assert unknown.exit_code == 2 and "no-such-model" in unknown.output


def test_score_nightly_deployment_has_a_cron_and_a_data_changed_trigger(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client

    from deployments.deploy import SCORE_DEPLOYMENT, deploy_scoring

    params = {"model_uri": "models:/reviews@champion", "input": "s3://lake/reviews/", "output": "s3://lake/scores"}
    assert deploy_scoring(**params, keep_columns=["id", "dt"]) == SCORE_DEPLOYMENT
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(SCORE_DEPLOYMENT)
        assert deployment.work_pool_name == "cpu" and deployment.parameters == {**params, "keep_columns": ["id", "dt"]}
        assert [s.schedule.cron for s in deployment.schedules] == ["0 4 * * *"]
        automations = [a for a in client.read_automations() if a.name == "score-when-data-lands"]
        assert len(automations) == 1
        trigger, action = automations[0].trigger, automations[0].actions[0]
        assert trigger.expect == {"adaptflow.data.changed"} and action.deployment_id == deployment.id
        assert action.parameters == {**params, "keep_columns": ["id", "dt"]}


def test_chunked_and_batched_partitions_score_the_same(ctx, registered, tmp_path):
    """A partition larger than a chunk streams in chunks; small ones are scored together: same rows, same scores."""
    lake = tmp_path / "lake"
    sizes = {"2026-12-03": 8, "2026-12-04": 3, "2026-12-05": 2}
    for day, n in sizes.items():
        (lake / f"dt={day}").mkdir(parents=True)
        frame = unlabelled(day, n)
        if n == 3:
            frame.to_csv(lake / f"dt={day}" / "part-0.csv", index=False)
        else:
            frame.to_parquet(lake / f"dt={day}" / "part-0.parquet", index=False)
    request = ScoreRequest(model_uri="models:/score-test/1", input=str(lake), output=str(tmp_path / "small"),
                           keep_columns=["id", "dt"])
    chunked = score_location(ctx, request, chunk_rows=5)
    whole = score_location(ctx, request.model_copy(update={"output": str(tmp_path / "whole")}))
    assert chunked["partitions"]["scored"] == whole["partitions"]["scored"] == 3
    assert chunked["rows"] == whole["rows"] == 13
    a = read_scored(str(tmp_path / "small")).to_pandas().sort_values("id").reset_index(drop=True)
    b = read_scored(str(tmp_path / "whole")).to_pandas().sort_values("id").reset_index(drop=True)
    assert a.drop(columns="scored_at").equals(b.drop(columns="scored_at"))
    for day, n in sizes.items():
        assert sorted(a.loc[a["dt"] == day, "row"]) == list(range(n))
