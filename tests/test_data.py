"""adaptflow.data: reading files (and their failure modes), normalising, splitting, snapshots."""

from __future__ import annotations

import gzip
import json
import time
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from adaptflow.data import (
    TEXT_DTYPE,
    DataError,
    frame_digest,
    is_missing,
    normalise_text,
    prepare_frame,
    read_parquet_bytes,
    read_table,
    split_frame,
    to_parquet_bytes,
)

ROTTEN = Path(__file__).resolve().parents[1] / "examples" / "data" / "rotten_tomatoes.csv"


def write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def plain(series: pd.Series) -> list:
    """Values with missing ones as None (prepared frames and snapshots hold Arrow strings: missing is pd.NA)."""
    return [None if is_missing(v) else v for v in series.tolist()]


def prepare(df, **kw):
    kw.setdefault("source", "f.csv")
    return prepare_frame(df, text_column="text", label_column="label", **kw)


# ---------------------------------------------------------------------------------------------- read_table


def test_csv_bom_quoted_newlines_delimiters_and_numeric_labels(tmp_path):
    path = write(tmp_path / "d.csv", '\ufefftext,label\n"Good, really\ngood",1\n"He said ""no""",0\nNA,\n')
    df = read_table(path)
    assert list(df.columns) == ["text", "label"]  # BOM gone from the first header
    assert df["text"].tolist() == ["Good, really\ngood", 'He said "no"', "NA"]  # "NA" is text, not missing
    assert df["label"].tolist() == ["1", "0", None]  # strings, empty cell -> None


def test_tsv_and_gzipped_csv(tmp_path):
    assert read_table(write(tmp_path / "d.tsv", "text\tlabel\na, b\tx\n"))["text"].tolist() == ["a, b"]
    gz = write(tmp_path / "d.csv.gz", gzip.compress(b"text,label\nhi,1\n"))
    assert read_table(gz).to_dict("list") == {"text": ["hi"], "label": ["1"]}


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("empty.csv", b"", r"empty\.csv: the file is empty"),
        ("header.csv", b"text,label\n", r"no data rows \(columns: text, label\)"),
        ("blank.jsonl", b"\n\n", "only blank lines"),
        ("extra.csv", b"text,label\na,1\nb,2,3\n", r"Expected 2 fields in line 3"),
        ("first_extra.csv", b"text,label\na,1,3\n", "more fields than the header"),
        ("data.xlsx", b"x", r"unsupported file type \.xlsx"),
        ("bad.parquet", b"not a parquet file", "unreadable Parquet"),
    ],
)
def test_read_errors_name_the_file_and_the_fix(tmp_path, name, content, match):
    with pytest.raises(DataError, match=match):
        read_table(write(tmp_path / name, content))


def test_missing_file_gives_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"file not found .*{tmp_path / 'nope.csv'}"):
        read_table("nope.csv")


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = write(tmp_path / "d.csv", b"text,label\nfine,1\ncaf\xe9,0\nok,1\n")
    with pytest.raises(DataError, match=r"not valid UTF-8 at line\(s\) 3\. Re-encode"):
        read_table(path)
    path = write(tmp_path / "d.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"line\(s\) 2"):
        read_table(path)


def test_jsonl_rows_are_line_numbers_and_numbers_become_strings(tmp_path):
    path = write(tmp_path / "d.jsonl", '\ufeff{"text": "a", "label": 1}\n\n{"text": "b", "label": 2.0, "x": true}\n')
    df = read_table(path)
    assert df["label"].tolist() == ["1", "2"] and df["x"].tolist() == [None, "True"]
    assert prepare(df)["row"].tolist() == [1, 3]  # blank line 2 skipped, rows cite file lines


def test_malformed_jsonl_line_names_line_and_error(tmp_path):
    path = write(tmp_path / "d.ndjson", '{"text": "a"}\n{"text": "b",}\n["c"]\n')
    with pytest.raises(DataError) as err:
        read_table(path)
    msg = str(err.value)
    assert "d.ndjson" in msg and "line 2: Expecting property name" in msg and "line 3: expected a JSON object" in msg


def test_s3_source_goes_through_the_store(tmp_path):
    class FakeStore:  # has what read_table uses of ArtifactStore
        def __init__(self):
            self.keys = []

        def get_file(self, key, path):
            self.keys.append(key)
            return write(Path(path), "text,label\nhi,pos\n")

    store = FakeStore()
    df = read_table("s3://bucket/data/train.csv", store=store)
    assert store.keys == ["data/train.csv"] and df["text"].tolist() == ["hi"]
    with pytest.raises(DataError, match="needs a store"):
        read_table("s3://bucket/data/train.csv")


# ---------------------------------------------------------------------------------------------- prepare_frame


def test_prepare_normalises_and_numbers_rows(tmp_path):
    decomposed = unicodedata.normalize("NFD", "  café \n")
    df = read_table(write(tmp_path / "d.csv", f'text,label,movie\n"{decomposed}", pos ,m1\n,,\n'))
    out = prepare(df, group_column="movie")
    assert list(out.columns) == ["text", "label", "group", "row"]
    assert plain(out["text"]) == ["café", None] and out["text"][0] == unicodedata.normalize("NFC", "café")
    assert plain(out["label"]) == ["pos", None] and plain(out["group"]) == ["m1", None]
    assert out["row"].tolist() == [1, 2]
    assert normalise_text(decomposed) == "café" and normalise_text(None) is None


def test_prepare_keeps_row_numbers_through_filtering():
    df = pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "y", "x"]}).iloc[[2, 0]]
    assert prepare(df)["row"].tolist() == [3, 1]


@pytest.mark.parametrize(
    "arg, wanted, suggestion", [("text_column", "txt", "text"), ("label_column", "Label", "label")]
)
def test_missing_column_lists_columns_and_closest_match(arg, wanted, suggestion):
    df = pd.DataFrame({"text": ["a"], "label": ["x"], "movie_name": ["m"]})
    kw = {"text_column": "text", "label_column": "label", arg: wanted}
    with pytest.raises(DataError, match=f"f.csv: column '{wanted}' \\({arg}\\) not found. Available columns: "
                       f"text, label, movie_name. Did you mean '{suggestion}'"):
        prepare_frame(df, source="f.csv", **kw)


def test_parquet_types_are_checked_and_float_labels_repaired(tmp_path):
    path = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["a", "b", "c"], "label": [1.0, np.nan, 0.0], "n": [1, 2, 3]}).to_parquet(path)
    out = prepare(read_table(path), source="d.parquet")
    assert plain(out["label"]) == ["1", None, "0"]  # parquet upcast int labels with a gap to float
    with pytest.raises(DataError, match=r"d.parquet: text column 'n' holds int64 values .*Set text_column"):
        prepare_frame(read_table(path), text_column="n", label_column="label", source="d.parquet")

    pd.DataFrame({"text": [["a"], ["b", "c"]], "label": [1.0, 0.5]}).to_parquet(path)
    with pytest.raises(DataError, match=r"text column 'text' holds list values at rows 1, 2;"):
        prepare(read_table(path), source="d.parquet")
    with pytest.raises(DataError, match=r"label column 'label' holds non-integer number values at rows 2"):
        prepare_frame(read_table(path).assign(t="x"), text_column="t", label_column="label", source="d.parquet")


def test_million_character_text_passes_quickly(tmp_path):
    path = write(tmp_path / "big.csv", "text,label\n" + "word " * 200_000 + ",x\nshort,y\n")
    start = time.perf_counter()
    out = prepare(read_table(path))
    assert len(out["text"][0]) == 999_999 and time.perf_counter() - start < 2


# ---------------------------------------------------------------------------------------------- split_frame


def frame(n_per_label: dict[str, int], groups: int | None = None) -> pd.DataFrame:
    labels = [lab for lab, n in n_per_label.items() for _ in range(n)]
    df = pd.DataFrame({"text": [f"t{i}" for i in range(len(labels))], "label": labels})
    df["group"] = [f"g{i % groups}" for i in range(len(df))] if groups else None
    df["row"] = np.arange(1, len(df) + 1)
    return df


def test_split_is_deterministic_and_approximately_stratified():
    df = frame({"a": 1600, "b": 400})
    train, test = split_frame(df, test_size=0.25, seed=3)
    again = split_frame(df, test_size=0.25, seed=3)[1]
    assert test.equals(again) and not test.equals(split_frame(df, test_size=0.25, seed=4)[1])
    shares = test["label"].value_counts() / df["label"].value_counts()
    assert (abs(shares - 0.25) < 0.04).all(), shares  # by hash: stratified in expectation only
    assert sorted(train["row"].tolist() + test["row"].tolist()) == list(range(1, 2001))
    assert train["row"].is_monotonic_increasing and test["row"].is_monotonic_increasing  # input order kept


def test_group_split_is_disjoint_and_balanced():
    df = frame({"a": 3000, "b": 1000}, groups=800)
    df.loc[df.index[:10], "group"] = None  # ungrouped rows are keyed by their text
    train, test = split_frame(df, test_size=0.3, seed=0)
    assert not set(train["group"].dropna()) & set(test["group"].dropna())
    assert abs(len(test) / len(df) - 0.3) < 0.05
    assert abs((test["label"] == "b").mean() - 0.25) < 0.05


def test_split_rejects_what_it_cannot_split():
    with pytest.raises(ValueError, match="test_size must be a fraction"):
        split_frame(frame({"a": 4}), test_size=1.5, seed=0)
    with pytest.raises(DataError, match="share one group"):
        split_frame(frame({"a": 4}, groups=1), test_size=0.5, seed=0, source="f.csv")
    with pytest.raises(DataError, match="at least 2"):
        split_frame(frame({"a": 1}), test_size=0.5, seed=0)
    _, test = split_frame(frame({"a": 5, "b": 5}, groups=2), test_size=0.1, seed=0)
    assert len(test) == 5  # two groups: one must go to test even though it is more than 10%


# ---------------------------------------------------------------------------------------------- snapshots


def test_digest_and_parquet_round_trip():
    df = prepare(pd.DataFrame({"text": ["b", "a", None], "label": ["x", None, "y"]}))
    back = read_parquet_bytes(to_parquet_bytes(df))
    assert plain(back["group"]) == [None, None, None] and plain(back["label"]) == ["x", None, "y"]
    assert all(back[c].dtype == TEXT_DTYPE for c in ("text", "label", "group"))  # Arrow-held, no object per row
    assert frame_digest(back) == frame_digest(df) == frame_digest(df[list(reversed(df.columns))])
    assert frame_digest(df) != frame_digest(df.iloc[::-1]) and frame_digest(df).startswith("sha256:")
    with pytest.raises(DataError, match="unreadable"):
        read_parquet_bytes(b"junk")


def _whole_column_digest(df: pd.DataFrame) -> str:
    """The digest as it was first written: one json.dumps per whole column."""
    import hashlib

    h = hashlib.sha256()
    for column in sorted(df.columns, key=str):
        values = [None if is_missing(v) else v for v in df[column].tolist()]
        h.update(json.dumps([str(column), values], ensure_ascii=False, default=str).encode("utf-8"))
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


@pytest.mark.parametrize("chunk_rows", [1, 3, 4, 1000])
def test_chunked_digest_equals_the_whole_column_formula(chunk_rows):
    df = pd.DataFrame({
        "text": ["caf\u00e9", None, "\u65e5\u672c \"q\" \\ \n", float("nan"), "", "x", "\U0001f600", "y", "z"],
        "label": pd.Series(["a", "b", None, "a", "b", "a", "b", "a", "b"], dtype=object),
        "row": np.arange(1, 10, dtype=np.int64),
        "score": [0.5, float("nan"), 1e300, -0.0, 2.0, 3.25, 7.0, 1.5, 0.1],
        "mixed": pd.Series([1, "1", None, 2.5, True, pd.NA, "\u00e9", 3, None], dtype=object),
        1: ["k"] * 9,  # a non-string column name
    })
    expected = _whole_column_digest(df)
    assert frame_digest(df, chunk_rows=chunk_rows) == expected
    assert frame_digest(df.iloc[:0], chunk_rows=chunk_rows) == _whole_column_digest(df.iloc[:0])
    arrow = df.assign(text=df["text"].astype(pd.ArrowDtype(pa.large_string())))  # Arrow-held text: same digest
    assert frame_digest(arrow, chunk_rows=chunk_rows) == expected


# ---------------------------------------------------------------------------------------------- real data


def test_real_rotten_tomatoes_group_split_by_movie():
    df = prepare(read_table(ROTTEN), group_column="movie_name", source=str(ROTTEN))
    assert len(df) == 7889 and df["text"].notna().all() and set(df["label"]) == {"fresh", "rotten"}
    train, test = split_frame(df, test_size=0.2, seed=13)
    assert not set(train["group"]) & set(test["group"])
    assert abs(len(test) / len(df) - 0.2) <= 0.05
    assert set(train["label"]) == set(test["label"]) == {"fresh", "rotten"}
    assert json.dumps(frame_digest(train))  # plain string
