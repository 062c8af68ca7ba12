"""Bad input, case by case: each fails precisely (file / line / column / key and what to do) or is quarantined
and counted, and nothing partial is ever published.

Most cases run the stages in-process (``adaptflow.stages`` over the session's real SeaweedFS), which is where
the messages are made; a few run the whole flow (under the session's Prefect harness) or the CLI (a real
subprocess) to prove the outcome end to end: exit code, one paragraph, no traceback, no registered version.
Cases that fail at config or ingest never load an encoder.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from adaptflow.config import ConfigError, build_config, load_config
from adaptflow.data import DataError
from adaptflow.encoders import EncoderError
from adaptflow.stages import StageContext, ingest_stage, resolve_encoder_stage, validate_stage
from adaptflow.store import AccessDeniedError, ArtifactStore, StoreError
from adaptflow.validate import LabelCaseError
from tests.fixtures.faults import scan_bucket, unpublished_objects

ROOT = Path(__file__).resolve().parents[1]
POS = ["a warm funny film", "great acting and music", "the best story", "fun cast and good plot", "love this movie"]
NEG = ["a dull boring film", "awful acting", "the worst plot", "cold and bad music", "hate this movie"]


def clean_rows(n: int = 40) -> list[tuple[str, str]]:
    """``n`` distinct labelled texts, two classes."""
    return [(f"{(POS if i % 2 else NEG)[i % 5]} number {i}", "pos" if i % 2 else "neg") for i in range(n)]


def csv_text(rows, header=("text", "label")) -> str:
    frame = pd.DataFrame(rows, columns=list(header))
    return frame.to_csv(index=False)


@pytest.fixture
def ctx(test_settings, fresh_bucket) -> StageContext:
    """The stages' context over a fresh bucket of the session's SeaweedFS."""
    settings = test_settings.model_copy(update={"bucket": fresh_bucket})
    return StageContext(settings, ArtifactStore.from_settings(settings))


def make_config(train, *, test=None, name="bad-input", encoder=None, **data):
    raw = {"name": name, "data": {"train": str(train), **({"test": str(test)} if test else {}), **data},
           "gate": {"smoke_test": False}}
    if encoder is not None:
        raw["encoder"] = encoder
    return build_config(raw)


def data_stages(ctx: StageContext, config) -> dict:
    return validate_stage(ctx, config, ingest_stage(ctx, config))


def assert_nothing_partial(store: ArtifactStore, *, allowed: tuple[str, ...] = ("snapshots/",),
                           inputs: tuple[str, ...] = ()) -> None:
    """Every published prefix is sound, no object is outside one (but the test's ``inputs``), and nothing past
    the ``allowed`` stages exists."""
    assert scan_bucket(store) == []
    assert [k for k in unpublished_objects(store) if not k.startswith(inputs)] == []
    assert all(k.startswith(allowed + inputs) for k in store.list_keys("")), sorted(store.list_keys(""))


# ---------------------------------------------------------------------------------------------- fail: files


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _parquet(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_parquet(path, index=False)
    return path


CLEAN = csv_text(clean_rows())
FAILING_FILES = {
    # case: (file name, content or None for "absent", data settings, [phrases the message must hold])
    "missing file": ("missing.csv", None, {}, ["missing.csv", "file not found", "Check the path"]),
    "empty file": ("empty.csv", "", {}, ["empty.csv", "empty (0 bytes)", "Export the dataset again"]),
    "header only": ("header.csv", "text,label\n", {}, ["header.csv", "no data rows", "columns: text, label"]),
    "missing text column": ("cols.csv", CLEAN.replace("text,label", "review,label", 1), {},
                            ["column 'text' (text_column) not found", "Available columns: review, label",
                             "Set text_column"]),
    "misspelled text column": ("cols.csv", CLEAN.replace("text,label", "Txt,label", 1), {},
                               ["column 'text' (text_column) not found", "Did you mean 'Txt'?"]),
    "missing label column": ("cols.csv", CLEAN.replace("text,label", "text,labels", 1), {},
                             ["column 'label' (label_column) not found", "Did you mean 'labels'?",
                              "Set label_column"]),
    "all texts empty": ("blank.csv", csv_text([("", "pos"), ("   ", "neg")] * 10), {},
                        ["every one of the 20 rows was quarantined", "empty_text=20 (rows 1, 2, 3, 4, 5"]),
    "a single class": ("one.csv", csv_text([(t, "pos") for t, _ in clean_rows()]), {},
                       ["fewer than 2 classes", "['pos']"]),
    "every row quarantined (conflicting labels)": (
        "conflict.csv", csv_text([r for t, _ in clean_rows(10) for r in ((t, "pos"), (t, "neg"))]), {},
        ["every one of the 20 rows was quarantined", "conflicting_labels=20 (rows 1, 2, 3, 4, 5"]),
    "too many rows quarantined": (
        "mostly_bad.csv", csv_text(clean_rows(10) + [("", "pos")] * 12), {"max_quarantine_fraction": 0.5},
        ["12 of 22 rows (54.5%) were quarantined", "above max_quarantine_fraction=0.5"]),
    "non-UTF-8 bytes (fails naming the line)": (
        "latin1.csv", b"\n".join(CLEAN.encode().split(b"\n")[:2] + [b"caf\xe9 cr\xe8me,pos"]  # cp1252 on line 3
                                 + CLEAN.encode().split(b"\n")[2:]), {},
        ["not valid UTF-8 at line(s) 3", "iconv -f cp1252 -t utf-8"]),
    "malformed JSONL line (fails naming the line)": (
        "rows.jsonl", "\n".join(json.dumps({"text": t, "label": y}) for t, y in clean_rows(6))
        + '\n{"text": "broken, "label": "pos"}\n', {},
        ["rows.jsonl: malformed JSON lines", "line 7: Expecting ',' delimiter", "fix or remove these lines"]),
}


@pytest.mark.parametrize("case", list(FAILING_FILES))
def test_bad_file_fails_naming_the_problem_and_publishes_nothing_partial(case, ctx, tmp_path):
    name, content, data, phrases = FAILING_FILES[case]
    path = tmp_path / name
    if content is not None:
        _write(path, content)
    with pytest.raises(DataError) as failure:
        data_stages(ctx, make_config(path, **data))
    message = str(failure.value)
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    assert str(path) in message or name in message
    assert_nothing_partial(ctx.store)


PARQUET_CASES = {
    "numbers as texts": (pd.DataFrame({"text": list(range(10)), "label": ["a", "b"] * 5}),
                         ["text column 'text' holds int64 values", "Set text_column"]),
    # a flat list is a label set (multi-label data, adaptflow.multilabel); a list of lists is no label at all
    "nested lists as labels": (pd.DataFrame({"text": [f"t{i}" for i in range(6)], "label": [[["a"]], [["b"]]] * 3}),
                               ["label column 'label' holds list of non-scalar values at rows 1, 2, 3, 4, 5",
                                "expected strings or integers"]),
    "scores as labels": (pd.DataFrame({"text": [f"t{i}" for i in range(6)], "label": [0.5, 1.0] * 3}),
                         ["label column 'label' holds non-integer number values at rows 1, 3, 5"]),
}


@pytest.mark.parametrize("case", list(PARQUET_CASES))
def test_parquet_with_wrong_column_types_fails_naming_column_and_rows(case, ctx, tmp_path):
    frame, phrases = PARQUET_CASES[case]
    path = _parquet(tmp_path / "typed.parquet", frame)
    with pytest.raises(DataError) as failure:
        data_stages(ctx, make_config(path))
    for phrase in phrases:
        assert phrase in str(failure.value)
    assert_nothing_partial(ctx.store, allowed=())


# ---------------------------------------------------------------------------------------------- fail: S3 sources


def test_missing_s3_key_is_bad_input_naming_the_uri(ctx):
    ctx.store.ensure_bucket()
    uri = ctx.store.uri("incoming/train.csv")
    with pytest.raises(DataError, match=rf"{uri}: no such object in bucket .*aws s3 ls"):
        data_stages(ctx, make_config(uri))
    assert_nothing_partial(ctx.store, allowed=())


def test_missing_s3_bucket_is_bad_input_naming_the_bucket(ctx):
    ctx.store.ensure_bucket()
    with pytest.raises(DataError, match="s3://no-such-bucket-af/train.csv: bucket 'no-such-bucket-af' does not exist"):
        data_stages(ctx, make_config("s3://no-such-bucket-af/train.csv"))
    assert_nothing_partial(ctx.store, allowed=())


def test_s3_data_is_read_from_the_bucket_its_uri_names(ctx, s3_client, fresh_bucket, test_settings):
    """A data file in another bucket than the artifacts' (a team's landing bucket) is read from there."""
    import uuid

    landing = f"landing-{uuid.uuid4().hex[:10]}"
    s3_client.create_bucket(Bucket=landing)
    s3_client.put_object(Bucket=landing, Key="daily/train.csv", Body=CLEAN.encode())
    snapshot = ingest_stage(ctx, make_config(f"s3://{landing}/daily/train.csv"))
    assert snapshot["rows"]["train"] + snapshot["rows"]["test"] == 40


def test_wrong_credentials_fail_fast_without_echoing_them(ctx, test_settings):
    ctx.store.ensure_bucket()
    ctx.store.put_bytes("incoming/train.csv", CLEAN.encode())
    secret = "wrong-secret-" + "x" * 20
    bad = ArtifactStore(ctx.store.bucket, endpoint_url=test_settings.s3_endpoint_url,
                        access_key_id=test_settings.aws_access_key_id, secret_access_key=secret)
    with pytest.raises(DataError) as failure:
        data_stages(StageContext(ctx.settings, bad), make_config(ctx.store.uri("incoming/train.csv")))
    message = str(failure.value)
    assert "incoming/train.csv: reading it was refused" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert secret not in message and test_settings.secret_key not in message
    # the artifact store itself with those keys: a 4xx, so not retried (tasks/policy.py) and exit 2
    with pytest.raises(AccessDeniedError) as denied:
        bad.put_bytes("x", b"1")
    assert not denied.value.transient and secret not in str(denied.value)
    assert_nothing_partial(ctx.store, allowed=(), inputs=("incoming/",))


def test_wrong_endpoint_is_a_transient_fault_naming_the_endpoint(ctx, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    nowhere = ArtifactStore("adaptflow", endpoint_url=f"http://127.0.0.1:{port}", access_key_id="k",
                            secret_access_key="s", max_attempts=1)
    path = _write(tmp_path / "train.csv", CLEAN)
    with pytest.raises(StoreError) as failure:
        data_stages(StageContext(ctx.settings, nowhere), make_config(path))
    assert f"is the S3 server at http://127.0.0.1:{port} running?" in str(failure.value)
    assert failure.value.transient  # a restarting server comes back: the task retries (see test_faults)


def test_retry_policy_retries_faults_and_never_bad_input():
    """tasks/policy.is_transient over the errors above: bad input fails once; an unreachable server is retried."""
    from tasks.policy import is_transient

    def state(exc):
        def result():
            raise exc
        return SimpleNamespace(result=result)

    assert not is_transient(None, None, state(DataError("bad rows")))
    assert not is_transient(None, None, state(EncoderError("no such encoder")))
    assert not is_transient(None, None, state(AccessDeniedError("denied")))
    assert not is_transient(None, None, state(StoreError("no such bucket", status=404)))
    assert is_transient(None, None, state(StoreError("cannot reach the S3 server")))
    assert is_transient(None, None, state(StoreError("503 SlowDown", status=503)))


# ---------------------------------------------------------------------------------------------- fail: encoder


@pytest.fixture
def tiny_copy(tiny_encoder_path, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_encoder_path, tmp_path / "tiny"))


def _corrupt(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _pickle_only(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


ENCODER_CASES = {
    "ref that does not exist": (lambda folder: folder / "no-such-encoder", {},
                                ["encoder folder", "no-such-encoder", "does not exist", "accepted encoder refs"]),
    "unknown package or hub id": (lambda folder: "no_such_encoder_package_xyz", {},
                                  ["no_such_encoder_package_xyz", "Pass a local folder, an s3:// snapshot"]),
    "corrupted safetensors": (lambda folder: _corrupt(folder) or folder, {},
                              ["corrupted safetensors file", "model.safetensors", "re-download or re-export"]),
    "pickle-only weights": (lambda folder: _pickle_only(folder) or folder, {},
                            ["only pickle weights (pytorch_model.bin)", "refused", "convert to safetensors"]),
    "max_length beyond the encoder's limit": (lambda folder: folder, {"max_length": 512},
                                              ["encoder.max_length=512 exceeds", "(128 positions)",
                                               "set encoder.max_length to at most 128"]),
}


@pytest.mark.parametrize("case", list(ENCODER_CASES))
def test_bad_encoder_fails_before_any_data_is_read(case, ctx, tiny_copy, tmp_path):
    make_ref, encoder, phrases = ENCODER_CASES[case]
    ref = make_ref(tiny_copy)
    config = make_config(tmp_path / "never-read.csv", encoder={"ref": str(ref), **encoder})
    with pytest.raises(ValueError) as failure:  # EncoderError (a ValueError): never retried, exit 2
        resolve_encoder_stage(ctx, config)
    for phrase in phrases:
        assert phrase in str(failure.value), str(failure.value)
    assert list(ctx.store.list_keys("")) == []


# ---------------------------------------------------------------------------------------------- fail: config


CONFIG_CASES = {
    "unknown top-level key": ("haed:\n  epochs: 3\n", ["unknown key 'haed'", "did you mean 'head'?"]),
    "misspelled nested key": ("data:\n  train: x.csv\n  text_colum: review\n",
                              ["unknown key 'data.text_colum'", "did you mean 'data.text_column'?"]),
    "unknown key with no close match": ("encoder:\n  zzz: 1\n", ["unknown key 'encoder.zzz'", "valid keys here: ref"]),
    "wrong type": ("head:\n  epochs: many\n", ["'head.epochs' = 'many'", "valid integer"]),
    "wrong type in a list field": ("data:\n  train: x.csv\n  test_size: half\n", ["'data.test_size' = 'half'"]),
    "max_length out of range": ("encoder:\n  max_length: 100000\n", ["'encoder.max_length' = 100000",
                                                                      "less than or equal to 8192"]),
    "not a mapping": ("- a\n- b\n", ["expected a mapping at the top"]),
    "not YAML": ("name: [unclosed\n", ["not valid YAML"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_names_the_key_and_the_fix(case, tmp_path):
    text, phrases = CONFIG_CASES[case]
    base = "name: bad-config\ndata:\n  train: x.csv\n"
    if text.startswith("data:"):
        base = "name: bad-config\n"
    path = _write(tmp_path / "config.yaml", text if case in ("not a mapping", "not YAML") else base + text)
    with pytest.raises(ConfigError) as failure:
        load_config(path)
    for phrase in phrases:
        assert phrase in str(failure.value), str(failure.value)
    assert str(path) in str(failure.value)


def test_bad_override_names_the_key(tmp_path):
    path = _write(tmp_path / "config.yaml", "name: x\ndata:\n  train: x.csv\n")
    with pytest.raises(ConfigError, match=r"'head.epochs' = 'ten'"):
        load_config(path, ["head.epochs=ten"])
    with pytest.raises(ConfigError, match=r"unknown key 'head.epoch' — did you mean 'head.epochs'\?"):
        load_config(path, ["head.epoch=10"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["head.epochs"])


# ---------------------------------------------------------------------------------------------- succeed, quarantined


def messy_split(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A train and a test file with every kind of bad row the rules quarantine or drop, and the counts."""
    train = clean_rows(40)
    test = [(f"{t} (test)", y) for t, y in clean_rows(12)]
    leaked = [(f"leaked text {i}", "pos" if i % 2 else "neg") for i in range(3)]
    train += [(f"no label here {i}", None) for i in range(3)]  # missing labels
    train += [("", "pos"), ("  ", "neg")]  # empty texts
    train += [("same text two labels", "pos"), ("same text two labels", "neg"),
              ("another disputed one", "neg"), ("another disputed one", "pos")]  # conflicting labels
    train += leaked  # also in test: dropped from train
    test += leaked + [("a neutral take", "neutral"), ("meh", "neutral")]  # label unseen in train
    paths = (_write(tmp_path / "train.csv", csv_text(train)), _write(tmp_path / "test.csv", csv_text(test)))
    expected = {"missing_label": 3, "empty_text": 2, "conflicting_labels": 4, "unseen_label": 2, "leakage": 3}
    return *paths, expected


def test_bad_rows_are_quarantined_counted_and_reported(ctx, tmp_path):
    train, test, expected = messy_split(tmp_path)
    validated = data_stages(ctx, make_config(train, test=test))
    reasons = {k: v for k, v in validated["report"]["reasons"].items() if v}
    assert reasons == expected
    assert validated["rows"] == {"train": 40, "test": 15, "quarantined": 11}  # leakage is dropped, not quarantined
    assert validated["labels"] == ["neg", "pos"]
    quarantine = pd.read_parquet(io.BytesIO(ctx.store.get_bytes(validated["quarantine"].split("/", 3)[3])))
    assert len(quarantine) == 11 and quarantine["row"].notna().all() and quarantine["reason"].notna().all()
    assert set(quarantine.loc[quarantine["reason"] == "unseen_label", "split"]) == {"test"}
    assert scan_bucket(ctx.store) == [] and unpublished_objects(ctx.store) == []


def awkward_but_valid(tmp_path: Path) -> tuple[Path, int]:
    """A CSV that is valid but awkward: BOM, numeric labels, quoted newlines/delimiters/quotes, 1M characters."""
    rows = [(t, "1" if y == "pos" else "0") for t, y in clean_rows(36)]
    rows += [("a film,\nwith \"quotes\", commas\nand three lines", "1"),
             ("one, two; three\ttabs, and a trailing comma,", "0"),
             ("great " * 166_667, "1"),  # ~1M characters: truncated to max_length tokens
             ("déjà vu — naïve café", "0")]
    body = pd.DataFrame(rows, columns=["text", "label"]).to_csv(index=False)
    return _write(tmp_path / "awkward.csv", b"\xef\xbb\xbf" + body.encode()), len(rows)


def test_awkward_but_valid_csv_is_read_as_clean(ctx, tmp_path):
    path, n = awkward_but_valid(tmp_path)
    validated = data_stages(ctx, make_config(path))
    assert validated["rows"]["quarantined"] == 0 and validated["labels"] == ["0", "1"]
    assert validated["rows"]["train"] + validated["rows"]["test"] == n
    texts = pd.concat([pd.read_parquet(io.BytesIO(ctx.store.get_bytes(validated[s].split("/", 3)[3])))
                       for s in ("train", "test")])["text"]
    assert "a film,\nwith \"quotes\", commas\nand three lines" in set(texts)
    assert max(map(len, texts)) > 999_000


def mixed_case_rows(n: int = 40) -> list[tuple[str, str]]:
    """``clean_rows`` labelled fresh/rotten, 4 rows each spelled FRESH, ROTTEN and " Fresh " (data rows 2, 12, 22, 32;
    3, 13, 23, 33; 4, 14, 24, 34): 12 rows to fold."""
    spelled = {1: "FRESH", 2: "ROTTEN", 3: " Fresh "}
    return [(t, spelled.get(i % 10, "fresh" if y == "pos" else "rotten")) for i, (t, y) in enumerate(clean_rows(n))]


def test_labels_differing_only_by_case_fail_or_fold_when_configured(ctx, tmp_path):
    path = _write(tmp_path / "mixed.csv", csv_text(mixed_case_rows()))
    with pytest.raises(LabelCaseError, match="differ only by case or spacing") as err:
        data_stages(ctx, make_config(path))
    for phrase in ("mixed.csv", "'FRESH' (4 rows", "'Fresh' (4 rows", "'fresh' (12 rows", "'ROTTEN' (4 rows",
                   "'rotten' (16 rows", "data.label_case: fold"):
        assert phrase in str(err.value), str(err.value)
    assert_nothing_partial(ctx.store)

    validated = data_stages(ctx, make_config(path, label_case="fold"))
    assert validated["labels"] == ["fresh", "rotten"] and validated["rows"]["quarantined"] == 0
    assert validated["report"]["label_case"] == {
        "mode": "fold", "folded_rows": 12, "groups": {"fresh": {"FRESH": 4, "Fresh": 4}, "rotten": {"ROTTEN": 4}}}
    report = json.loads(ctx.store.get_bytes(validated["validated"].split("/", 3)[3] + "/report.json"))
    assert report["label_case"]["folded_rows"] == 12


# ---------------------------------------------------------------------------------------------- whole flow


@pytest.fixture
def flow_env(services_env, fresh_bucket, monkeypatch, prefect_harness, test_settings) -> ArtifactStore:
    monkeypatch.setenv("ADAPTFLOW_BUCKET", fresh_bucket)
    return ArtifactStore.from_settings(test_settings, bucket=fresh_bucket)


def registered_versions(settings, name: str) -> list:
    from mlflow import MlflowClient

    uri = settings.mlflow_tracking_uri  # registry_uri too: mlflow's process-wide one may point elsewhere
    return MlflowClient(uri, registry_uri=uri).search_model_versions(f"name = '{name}'")


def test_flow_succeeds_on_messy_and_awkward_data(flow_env, tmp_path, tiny_encoder_path, test_settings):
    """End to end with the tiny encoder: quarantined rows are counted in the summary; awkward input is clean."""
    from flows.retrain import retrain

    encoder = {"ref": str(tiny_encoder_path), "max_length": 32}
    train, test, expected = messy_split(tmp_path)
    summary = retrain(make_config(train, test=test, name="bad-input-messy", encoder=encoder))
    assert summary["rows"] == {"train": 40, "test": 15, "quarantined": 11}
    assert summary["version"] == "1"

    path, n = awkward_but_valid(tmp_path)
    summary = retrain(make_config(path, name="bad-input-awkward", encoder=encoder))
    assert summary["rows"]["quarantined"] == 0 and summary["rows"]["train"] + summary["rows"]["test"] == n
    tokens = [k for k in flow_env.list_keys("tokens/") if k.endswith("tokens.parquet")]
    longest = max(len(ids) for key in tokens for ids in pd.read_parquet(io.BytesIO(flow_env.get_bytes(key)))["ids"])
    assert longest == 32  # the 1M-character text: truncated, not dropped, not a crash
    assert scan_bucket(flow_env) == [] and unpublished_objects(flow_env) == []


def test_flow_failing_on_bad_data_registers_nothing(flow_env, tmp_path, tiny_encoder_path, test_settings):
    from flows.retrain import retrain

    path = _write(tmp_path / "one.csv", csv_text([(t, "pos") for t, _ in clean_rows()]))
    with pytest.raises(DataError, match="fewer than 2 classes"):
        retrain(make_config(path, name="bad-input-never-registered", encoder={"ref": str(tiny_encoder_path)}))
    assert registered_versions(test_settings, "bad-input-never-registered") == []
    assert_nothing_partial(flow_env)


# ---------------------------------------------------------------------------------------------- the CLI


def run_cli(args, env, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "adaptflow", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def cli_env(test_settings, fresh_bucket, tmp_path, prefect_harness) -> dict:
    """The CLI's environment: the session's services, and the harness's Prefect API (an ephemeral Prefect server
    per CLI call would add ~10-20 s each; tests/test_cli.py covers that path)."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "ADAPTFLOW_"))}
    env.update(test_settings.process_env())
    env.update({"ADAPTFLOW_BUCKET": fresh_bucket, "ADAPTFLOW_STATE_DIR": str(tmp_path / "no-stack"),
                "PREFECT_HOME": str(tmp_path / "prefect"), "HF_HUB_OFFLINE": "1",
                "PREFECT_API_URL": PREFECT_API_URL.value()})
    return env


def cli_config(tmp_path: Path, train: str, encoder: Path) -> Path:
    text = (f"name: bad-input-cli\ndata:\n  train: {train}\nencoder:\n  ref: {encoder}\n  max_length: 32\n"
            "gate:\n  smoke_test: false\n")
    return _write(tmp_path / "config.yaml", text)


def assert_one_paragraph(stderr: str, *phrases: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    paragraph = stderr[stderr.index("error: retrain "):]
    for phrase in phrases:
        assert phrase in paragraph, paragraph
    return paragraph


def test_cli_bad_data_exits_2_with_one_paragraph_and_no_traceback(cli_env, tmp_path, tiny_encoder_path,
                                                                  test_settings):
    path = _write(tmp_path / "conflict.csv", csv_text([r for t, _ in clean_rows(10) for r in ((t, "pos"), (t, "neg"))]))
    done = run_cli(["retrain", str(cli_config(tmp_path, str(path), tiny_encoder_path)), "--json"], cli_env, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert_one_paragraph(done.stderr, "conflict.csv", "every one of the 20 rows was quarantined",
                         "conflicting_labels=20")
    assert done.stdout.strip() == ""  # no summary line: nothing was registered
    for secret in (test_settings.secret_key, test_settings.aws_access_key_id):
        assert secret not in done.stderr + done.stdout
    assert registered_versions(test_settings, "bad-input-cli") == []


def test_cli_labels_differing_only_by_case_exit_2_or_fold_into_two_classes(cli_env, tmp_path, tiny_encoder_path,
                                                                          test_settings):
    path = _write(tmp_path / "mixed.csv", csv_text(mixed_case_rows()))
    config = str(cli_config(tmp_path, str(path), tiny_encoder_path))
    done = run_cli(["retrain", config, "--json"], cli_env, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert_one_paragraph(done.stderr, "mixed.csv", "differ only by case or spacing", "'FRESH' (4 rows",
                         "'ROTTEN' (4 rows", "data.label_case: fold")
    assert registered_versions(test_settings, "bad-input-cli") == []

    done = run_cli(["retrain", config, "--json", "--set", "data.label_case=fold"], cli_env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(k for k in summary["metrics"] if k.startswith("support.")) == ["support.fresh", "support.rotten"]
    assert summary["rows"]["train"] + summary["rows"]["test"] == 40
    store = ArtifactStore.from_settings(test_settings, bucket=cli_env["ADAPTFLOW_BUCKET"])
    report = json.loads(store.get_bytes(summary["artifacts"]["validated"].split("/", 3)[3] + "/report.json"))
    assert report["labels"] == ["fresh", "rotten"] and report["label_case"]["folded_rows"] == 12


def test_cli_wrong_credentials_exit_2_without_echoing_them(cli_env, tmp_path, tiny_encoder_path, test_settings):
    store = ArtifactStore.from_settings(test_settings, bucket=cli_env["ADAPTFLOW_BUCKET"])
    store.put_bytes("incoming/train.csv", CLEAN.encode())
    secret = "not-the-secret-" + "y" * 24
    env = {**cli_env, "AWS_SECRET_ACCESS_KEY": secret}
    config = cli_config(tmp_path, store.uri("incoming/train.csv"), tiny_encoder_path)
    done = run_cli(["retrain", str(config)], env, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert_one_paragraph(done.stderr, "access denied", "AWS_ACCESS_KEY_ID")
    assert secret not in done.stderr + done.stdout and test_settings.secret_key not in done.stderr + done.stdout
