"""adaptflow.sources: lakes of partitions (local folders, S3 prefixes, globs, lists, HF datasets) read against the
session's real SeaweedFS, their listing in the ingest snapshot, and one retrain over an S3 prefix."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pandas as pd
import pytest

from adaptflow.config import ConfigError, build_config, load_config
from adaptflow.data import DataError
from adaptflow.sources import read_source
from adaptflow.stages import StageContext, ingest_stage
from adaptflow.store import ArtifactStore

DAYS = ["2026-11-28", "2026-11-29", "2026-11-30"]
WORDS = ["good", "bad", "great", "awful", "fun", "dull"]


def day_frame(day: str, n: int = 12) -> pd.DataFrame:
    """``n`` distinct labelled reviews for one day, with a movie column."""
    return pd.DataFrame({
        "text": [f"{WORDS[i % 6]} film seen {day} number {i}" for i in range(n)],
        "label": ["pos" if i % 2 == 0 else "neg" for i in range(n)],
        "movie": [f"movie-{i % 4}" for i in range(n)],
    })


def as_bytes(frame: pd.DataFrame, fmt: str) -> bytes:
    if fmt == "parquet":
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return buffer.getvalue()
    if fmt == "csv":
        return frame.to_csv(index=False).encode()
    lines = "".join(json.dumps(r) + "\n" for r in frame.to_dict("records")).encode()
    return gzip.compress(lines) if fmt == "jsonl.gz" else lines


def write_lake(root: Path, days=DAYS, fmts=("parquet",) * 3) -> Path:
    for day, fmt in zip(days, fmts):
        folder = root / f"dt={day}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"part-0.{fmt}").write_bytes(as_bytes(day_frame(day), fmt))
    (root / "_SUCCESS").write_bytes(b"")  # what Spark leaves behind: skipped
    return root


def upload_lake(s3_client, bucket: str, prefix: str, days=DAYS, fmts=("parquet",) * 3) -> None:
    for day, fmt in zip(days, fmts):
        s3_client.put_object(Bucket=bucket, Key=f"{prefix}/dt={day}/part-0.{fmt}", Body=as_bytes(day_frame(day), fmt))


def read(location, **kw):
    kw.setdefault("text_column", "text")
    kw.setdefault("label_column", "label")
    return read_source(location, **kw)


@pytest.fixture
def s3(test_settings, fresh_bucket):
    """(store, settings) for the session's SeaweedFS, artifacts in a fresh bucket."""
    settings = test_settings.model_copy(update={"bucket": fresh_bucket})
    return {"store": ArtifactStore.from_settings(settings), "settings": settings}


# ---------------------------------------------------------------------------------------------- local lakes


def test_local_hive_folder_partition_keys_become_columns(tmp_path):
    lake = write_lake(tmp_path / "lake")
    got = read(lake, group_column="dt")
    assert len(got.frame) == 36
    assert got.frame["group"].tolist() == [d for d in DAYS for _ in range(12)]  # the key as a column, as a group
    assert got.frame["row"].tolist() == list(range(1, 37))  # unique per location: offset + row in the file
    assert [p["path"] for p in got.partitions] == [str((lake / f"dt={d}" / "part-0.parquet").resolve()) for d in DAYS]
    first = got.partitions[0]
    assert first["keys"] == {"dt": DAYS[0]} and first["rows"] == 12 and first["row_offset"] == 0
    assert first["size"] == (lake / f"dt={DAYS[0]}" / "part-0.parquet").stat().st_size
    assert first["etag"].startswith("sha256:") and len({p["etag"] for p in got.partitions}) == 3
    # a file column as the group works as well
    assert set(read(lake, group_column="movie").frame["group"]) == {f"movie-{i}" for i in range(4)}


def test_mixed_parquet_csv_and_jsonl_gz_partitions_read_alike(tmp_path):
    mixed = read(write_lake(tmp_path / "mixed", fmts=("parquet", "csv", "jsonl.gz")), group_column="dt")
    plain = read(write_lake(tmp_path / "plain"), group_column="dt")
    pd.testing.assert_frame_equal(mixed.frame, plain.frame)
    assert [p["format"] for p in mixed.partitions] == ["parquet", "csv", "jsonl.gz"]


def test_partition_with_other_columns_fails_naming_its_path_and_the_columns(tmp_path):
    lake = write_lake(tmp_path / "lake", fmts=("parquet", "csv", "parquet"))
    odd = lake / f"dt={DAYS[1]}" / "part-0.csv"
    odd.write_bytes(as_bytes(day_frame(DAYS[1]).rename(columns={"text": "review"}), "csv"))
    with pytest.raises(DataError) as failure:
        read(lake)
    message = str(failure.value)
    assert str(odd) in message and "missing 'text'" in message and "extra 'review'" in message


def test_local_glob_and_a_list_of_locations(tmp_path):
    lake = write_lake(tmp_path / "lake")
    globbed = read(str(lake / "dt=2026-11-2*" / "*.parquet"), group_column="dt")
    assert set(globbed.frame["group"]) == {"2026-11-28", "2026-11-29"} and len(globbed.partitions) == 2
    extra = tmp_path / "extra.csv"
    extra.write_bytes(as_bytes(day_frame("extra"), "csv"))
    both = read([str(lake / "dt=2026-11-30"), str(extra)])
    assert len(both.frame) == 24 and [p["rows"] for p in both.partitions] == [12, 12]
    assert both.frame["row"].tolist() == list(range(1, 25))
    with pytest.raises(DataError, match="no-lake: no such file or folder"):
        read([str(lake), str(tmp_path / "no-lake")])
    with pytest.raises(DataError, match="no data file .* matches this glob"):
        read(str(lake / "dt=2025-*" / "*"))


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    frame = day_frame("hf")
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "plain"))
    got = read(str(tmp_path / "plain"), group_column="movie")
    assert got.frame["text"].tolist() == frame["text"].tolist() and got.frame["label"].tolist() == frame["label"].tolist()
    assert got.partitions[0]["rows"] == 12 and got.partitions[0]["etag"].startswith("sha256:")

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    splits = datasets.DatasetDict({
        name: datasets.Dataset.from_dict({"text": [f"{name} text {i}" for i in range(6)], "label": [0, 1] * 3},
                                         features=features) for name in ("train", "test")})
    splits.save_to_disk(str(tmp_path / "dict"))
    train = read(str(tmp_path / "dict"))  # data.train takes the train split
    assert train.frame["label"].tolist() == ["neg", "pos"] * 3  # ClassLabel ids become their names
    test = read(str(tmp_path / "dict"), split="test")
    assert test.frame["text"].tolist()[0] == "test text 0"
    assert read(f"{tmp_path / 'dict'}#test").frame.equals(test.frame)
    with pytest.raises(DataError, match="has splits train, test, not 'validation'"):
        read(f"{tmp_path / 'dict'}#validation")


def test_config_takes_a_list_and_resolves_each_item_relative_to_the_file(tmp_path):
    (tmp_path / "job.yaml").write_text("name: m\ndata:\n  train: [lake, 'more/dt=*/*.parquet', s3://b/p]\n")
    config = load_config(tmp_path / "job.yaml")
    assert config.data.train == [str(tmp_path / "lake"), str(tmp_path / "more" / "dt=*" / "*.parquet"), "s3://b/p"]
    with pytest.raises(ConfigError, match="data.train"):
        build_config({"name": "m", "data": {"train": []}})


# ---------------------------------------------------------------------------------------------- S3 lakes


def test_s3_prefix_glob_and_etags(s3, s3_client, fresh_bucket):
    upload_lake(s3_client, fresh_bucket, "lake/reviews", fmts=("parquet", "csv", "jsonl.gz"))
    s3_client.put_object(Bucket=fresh_bucket, Key="lake/reviews/_SUCCESS", Body=b"")
    s3_client.put_object(Bucket=fresh_bucket, Key="lake/reviews2/dt=x/part-0.csv", Body=b"not,this\n1,2\n")
    got = read(f"s3://{fresh_bucket}/lake/reviews", group_column="dt", **s3)
    assert len(got.frame) == 36 and set(got.frame["group"]) == set(DAYS)
    for part in got.partitions:
        key = part["path"].split("/", 3)[3]
        head = s3_client.head_object(Bucket=fresh_bucket, Key=key)
        assert part["etag"] == head["ETag"].strip('"') and part["size"] == head["ContentLength"]
    assert [p["rows"] for p in got.partitions] == [12, 12, 12]
    local = read(write_lake(Path(str(s3["settings"].cache_dir)) / fresh_bucket, fmts=("parquet", "csv", "jsonl.gz")),
                 group_column="dt")
    pd.testing.assert_frame_equal(got.frame, local.frame)  # same rows as the same lake on disk

    globbed = read(f"s3://{fresh_bucket}/lake/reviews/dt=2026-11-2*/*", group_column="dt", **s3)
    assert set(globbed.frame["group"]) == {"2026-11-28", "2026-11-29"}


def test_s3_partition_with_other_columns_and_missing_bucket_are_bad_input(s3, s3_client, fresh_bucket):
    upload_lake(s3_client, fresh_bucket, "lake")
    odd = f"lake/dt={DAYS[2]}/part-1.parquet"
    s3_client.put_object(Bucket=fresh_bucket, Key=odd, Body=as_bytes(day_frame("x").drop(columns="movie"), "parquet"))
    with pytest.raises(DataError) as failure:
        read(f"s3://{fresh_bucket}/lake", **s3)
    assert f"s3://{fresh_bucket}/{odd}" in str(failure.value) and "missing 'movie'" in str(failure.value)
    with pytest.raises(DataError, match="bucket 'no-such-lake-af' does not exist"):
        read("s3://no-such-lake-af/lake/", **s3)
    with pytest.raises(DataError, match="no data file"):
        read(f"s3://{fresh_bucket}/nothing-here/", **s3)


def test_snapshot_lists_partitions_and_its_digest_follows_them(s3, s3_client, fresh_bucket):
    ctx = StageContext(s3["settings"], s3["store"])
    ctx.store.ensure_bucket()
    upload_lake(s3_client, fresh_bucket, "lake", days=DAYS[:2], fmts=("parquet", "csv"))
    config = build_config({"name": "lake", "data": {"train": f"s3://{fresh_bucket}/lake/", "group_column": "dt"}})
    first = ingest_stage(ctx, config)
    listed = ctx.store.read_manifest(first["snapshot"].split("/", 3)[3])["meta"]["partitions"]["train"]
    assert [(p["path"].rsplit("/", 2)[-2], p["rows"]) for p in listed] == [(f"dt={d}", 12) for d in DAYS[:2]]
    assert all(p["etag"] and p["size"] > 0 for p in listed)
    assert first["sources"] == [f"s3://{fresh_bucket}/lake/", None]
    assert ingest_stage(ctx, config)["digest"] == first["digest"]  # unchanged lake: same snapshot

    upload_lake(s3_client, fresh_bucket, "lake", days=DAYS[2:], fmts=("jsonl.gz",))  # a day lands
    grown = ingest_stage(ctx, config)
    assert grown["digest"] != first["digest"] and len(grown["partitions"]["train"]) == 3
    assert grown["rows"]["train"] + grown["rows"]["test"] == 36

    relabelled = day_frame(DAYS[0]).assign(label=lambda f: f["label"].where(f.index != 0, "neg"))
    s3_client.put_object(Bucket=fresh_bucket, Key=f"lake/dt={DAYS[0]}/part-0.parquet", Body=as_bytes(relabelled, "parquet"))
    changed = ingest_stage(ctx, config)  # a late label in an old partition
    assert changed["digest"] != grown["digest"]
    assert changed["partitions"]["train"][0]["etag"] != grown["partitions"]["train"][0]["etag"]


def test_one_file_snapshot_lists_that_file(s3, tmp_path):
    ctx = StageContext(s3["settings"], s3["store"])
    ctx.store.ensure_bucket()
    path = tmp_path / "train.csv"
    path.write_bytes(as_bytes(day_frame("one", 20), "csv"))
    snapshot = ingest_stage(ctx, build_config({"name": "one", "data": {"train": str(path)}}))
    [part] = snapshot["partitions"]["train"]
    assert part["path"] == str(path) and part["rows"] == 20 and part["size"] == path.stat().st_size
    assert snapshot["sources"] == [str(path), None]


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def flow_env(services_env, fresh_bucket, monkeypatch, prefect_harness):
    monkeypatch.setenv("ADAPTFLOW_BUCKET", fresh_bucket)
    return fresh_bucket


def test_retrain_over_an_s3_prefix_grouped_by_partition_key(flow_env, s3_client, tiny_encoder_path, test_settings):
    from flows.retrain import retrain

    days = [f"2026-11-{d:02d}" for d in range(20, 28)]
    upload_lake(s3_client, flow_env, "lake/reviews", days=days, fmts=("parquet", "csv", "jsonl.gz") * 3)
    config = build_config({
        "name": "lake-e2e",
        "data": {"train": f"s3://{flow_env}/lake/reviews/", "group_column": "dt", "test_size": 0.25},
        "encoder": {"ref": str(tiny_encoder_path), "max_length": 32},
        "head": {"epochs": 3},
        "gate": {"smoke_test": False},
    })
    summary = retrain(config)
    assert summary["version"] == "1"
    assert summary["rows"]["train"] + summary["rows"]["test"] + summary["rows"]["quarantined"] == 96
    store = ArtifactStore.from_settings(test_settings, bucket=flow_env)
    prefix = summary["artifacts"]["snapshot"].split("/", 3)[3]
    meta = store.read_manifest(prefix)["meta"]
    assert len(meta["partitions"]["train"]) == 8 and meta["sources"][0] == f"s3://{flow_env}/lake/reviews/"
    sides = {name: set(pd.read_parquet(io.BytesIO(store.get_bytes(f"{prefix}/{name}.parquet")))["group"])
             for name in ("train", "test")}
    assert sides["train"] | sides["test"] == set(days) and not sides["train"] & sides["test"]  # split by day


def test_example_lake_holds_the_example_csv_rows():
    """examples/data/rotten_tomatoes_lake (examples/partition_lake.py) reads as the same rows as the CSV."""
    from adaptflow.data import prepare_frame, read_table

    root = Path(__file__).resolve().parents[1] / "examples"
    config = load_config(root / "rotten_tomatoes_partitioned.yaml")
    lake = read(config.data.train, group_column="movie_name")
    csv = root / "data" / "rotten_tomatoes.csv"
    one = prepare_frame(read_table(csv), text_column="text", label_column="label", group_column="movie_name",
                        source=str(csv))
    assert len(lake.partitions) == 4 and [p["keys"]["dt"] for p in lake.partitions] == DAYS_EXAMPLE
    pd.testing.assert_frame_equal(lake.frame[["text", "label", "group"]], one[["text", "label", "group"]])


DAYS_EXAMPLE = ["2026-11-27", "2026-11-28", "2026-11-29", "2026-11-30"]
