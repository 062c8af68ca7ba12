"""adaptflow.split: hash splits that do not move when data grows, time splits that test on the newest rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adaptflow.config import ConfigError, build_config
from adaptflow.data import DataError, prepare_frame, read_table
from adaptflow.sources import read_source
from adaptflow.split import key_hashes, split_frame

ROOT = Path(__file__).resolve().parents[1]
ROTTEN = ROOT / "examples" / "data" / "rotten_tomatoes.csv"
SHARED = Path("/work/shared/data")


def rotten(group_column: str | None = None) -> pd.DataFrame:
    return prepare_frame(read_table(ROTTEN), text_column="text", label_column="label", group_column=group_column,
                         source=str(ROTTEN))


def sides(df: pd.DataFrame, **kw) -> dict[str, str]:
    """text → side, for comparing splits of different frames."""
    train, test = split_frame(df, test_size=kw.pop("test_size", 0.2), seed=kw.pop("seed", 13), **kw)
    return {**dict.fromkeys(train["text"], "train"), **dict.fromkeys(test["text"], "test")}


@pytest.mark.parametrize("group_column", [None, "movie_name"])
def test_appending_rows_never_moves_an_existing_row(group_column):
    df = rotten(group_column).drop_duplicates("text").sample(frac=1.0, random_state=0).reset_index(drop=True)
    base, grown = df.iloc[:3000], df  # +160 %: new texts and, with groups, new rows of existing movies
    before, after = sides(base), sides(grown)
    moved = [t for t, side in before.items() if after[t] != side]
    assert moved == []
    # and a shuffled, re-read copy gives the same sides: nothing depends on position
    assert sides(grown.sample(frac=1.0, random_state=1)) == after


def test_test_share_within_one_point_on_a_realistic_sample():
    df = rotten()  # 7,889 real rows, keyed by text
    for seed in (13, 0, 1):
        train, test = split_frame(df, test_size=0.2, seed=seed)
        assert abs(len(test) / len(df) - 0.2) <= 0.01, seed
        by_label = test["label"].value_counts() / df["label"].value_counts()
        assert (abs(by_label - 0.2) <= 0.02).all(), by_label  # stratified in expectation: within 2 points here


def test_groups_are_disjoint_and_copies_of_a_text_stay_together():
    df = rotten("movie_name")
    train, test = split_frame(df, test_size=0.2, seed=13)
    assert not set(train["group"]) & set(test["group"])
    assert abs(len(test) / len(df) - 0.2) <= 0.01  # seed 13 on the bundled set (other seeds: see the README)
    texts = pd.DataFrame({"text": ["same"] * 5 + [f"t{i}" for i in range(200)], "label": "a", "group": None,
                          "row": np.arange(1, 206)})
    train, test = split_frame(texts, test_size=0.3, seed=0)
    assert (train["text"] == "same").sum() in (0, 5)  # no copy on the other side: no leak to drop later


def test_hash_is_sha256_of_seed_and_key():
    import hashlib

    expected = int.from_bytes(hashlib.sha256(b"13\0g\0Alien").digest()[:8], "big")
    assert int(key_hashes(["g\0Alien"], 13)[0]) == expected  # stable across numpy/pandas versions and machines


def test_tiny_data_still_gets_both_sides():
    df = pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"], "group": None, "row": [1, 2]})
    for seed in range(20):
        train, test = split_frame(df, test_size=0.2, seed=seed)
        assert len(train) == len(test) == 1


def lake(tmp_path: Path) -> Path:
    frame = pd.read_csv(ROTTEN).drop_duplicates("text").head(1000)
    root = tmp_path / "lake"
    for i, day in enumerate(["2026-11-27", "2026-11-28", "2026-11-29", "2026-11-30", "2026-12-01"]):
        part = root / f"dt={day}"
        part.mkdir(parents=True)
        frame.iloc[i * 200:(i + 1) * 200].to_parquet(part / "part-0.parquet", index=False)
    return root


def test_time_split_takes_the_newest_partitions(tmp_path):
    read = read_source(str(lake(tmp_path)), text_column="text", label_column="label", time_column="dt")
    assert set(read.frame["time"]) == {"2026-11-27", "2026-11-28", "2026-11-29", "2026-11-30", "2026-12-01"}
    train, test = split_frame(read.frame, test_size=0.2, seed=13, method="time")
    assert set(test["time"]) == {"2026-12-01"} and len(test) == 200  # the newest day, whole
    train, test = split_frame(read.frame, test_size=0.35, seed=13, method="time")
    assert set(test["time"]) == {"2026-11-30", "2026-12-01"}  # 40 % is the closest share to 35 %
    assert train["time"].max() < test["time"].min()


def test_time_split_by_timestamp_column_and_groups():
    n = 1000
    stamps = pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(n), unit="h")
    df = pd.DataFrame({"text": [f"t{i}" for i in range(n)], "label": ["a", "b"] * (n // 2), "when": stamps,
                       "movie": [f"m{i // 10}" for i in range(n)]})
    df.loc[0, "movie"] = "m99"  # the oldest row belongs to the newest group: it goes with its group
    frame = prepare_frame(df, text_column="text", label_column="label", group_column="movie", time_column="when",
                          source="f.parquet")
    train, test = split_frame(frame, test_size=0.1, seed=0, method="time")
    assert len(test) == 101 and 1 in set(test["row"]) and not set(train["group"]) & set(test["group"])
    assert set(test["row"]) - {1} == set(range(n - 99, n + 1))
    epoch = frame.assign(time=[str(1_700_000_000 + i) for i in range(n)], group=None)  # numbers sort as numbers
    assert split_frame(epoch, test_size=0.1, seed=0, method="time")[1]["row"].min() == n - 99


def test_time_split_refuses_unusable_times():
    df = pd.DataFrame({"text": ["a", "b", "c"], "label": "x", "group": None, "row": [1, 2, 3],
                       "time": ["2026-11-30", None, "yesterday"]})
    with pytest.raises(DataError, match="time column is empty at rows 2"):
        split_frame(df, test_size=0.2, seed=0, method="time", source="f.csv")
    with pytest.raises(DataError, match=r"rows 3 \('yesterday'\) are neither numbers nor dates"):
        split_frame(df.assign(time=["2026-11-30", "2026-12-01", "yesterday"]), test_size=0.2, seed=0, method="time")
    with pytest.raises(DataError, match="same time"):
        split_frame(df.assign(time="2026-11-30"), test_size=0.2, seed=0, method="time")


def test_config_split_and_time_column():
    base = {"name": "m", "data": {"train": "x.csv"}}
    assert build_config(base).data.split == "hash"
    with pytest.raises(ConfigError, match="data.split is 'time' but data.time_column is not set"):
        build_config({"name": "m", "data": {"train": "x.csv", "split": "time"}})
    with pytest.raises(ConfigError, match="'data.split' = 'random'"):
        build_config({"name": "m", "data": {"train": "x.csv", "split": "random"}})
    config = build_config({"name": "m", "data": {"train": "x.csv", "split": "time", "time_column": "dt"}})
    assert (config.data.split, config.data.time_column) == ("time", "dt")


@pytest.mark.skipif(not SHARED.is_dir(), reason="bundled sets at /work/shared/data not present")
@pytest.mark.parametrize("path, group", [("rotten_tomatoes/reviews.csv", "movie_name"),
                                         ("bbc_news/articles.jsonl", None), ("tweets/tweets.parquet", None)])
def test_bundled_sets_share_at_the_default_seed(path, group):
    frame = read_source(str(SHARED / path), text_column="text", label_column="label", group_column=group).frame
    train, test = split_frame(frame, test_size=0.2, seed=13)
    assert abs(len(test) / len(frame) - 0.2) <= 0.01


def test_ingest_keeps_the_partition_key_and_tests_on_the_newest_day(test_settings, fresh_bucket, tmp_path):
    from adaptflow.stages import StageContext, ingest_stage, read_frame, validate_stage
    from adaptflow.store import ArtifactStore

    settings = test_settings.model_copy(update={"bucket": fresh_bucket})
    ctx = StageContext(settings, ArtifactStore.from_settings(settings))
    config = build_config({"name": "m", "data": {"train": str(lake(tmp_path)), "split": "time", "time_column": "dt",
                                                "test_size": 0.2}})
    snapshot = ingest_stage(ctx, config)
    assert snapshot["split"] == "time" and snapshot["rows"] == {"train": 800, "test": 200}
    assert snapshot["shares"]["test"] == 0.2
    validated = validate_stage(ctx, config, snapshot)
    test = read_frame(ctx, validated["test"])
    assert set(test["time"]) == {"2026-12-01"} and len(test) == 200
    assert read_frame(ctx, validated["train"])["time"].max() == "2026-11-30"
    hashed = ingest_stage(ctx, config.model_copy(update={"data": config.data.model_copy(update={"split": "hash"})}))
    assert hashed["split"] == "hash" and hashed["snapshot"] != snapshot["snapshot"]
