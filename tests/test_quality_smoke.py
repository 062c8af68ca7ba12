"""benchmarks/quality.py --smoke: the learning curve runs end to end (tiny random encoder, 400 example rows, 2 seeds;
its numbers mean nothing, the bars are judged on the full run recorded in benchmarks/RESULTS.md)."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import quality

ROOT = Path(__file__).resolve().parents[1]


def test_quality_smoke_runs_the_three_classifiers_per_cell(tmp_path):
    out = tmp_path / "quality.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--smoke", "--seeds", "2", "--json", str(out),
                           "--lora", "--lora-rows", "120", "--lora-epochs", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1 = a bar missed, which tiny random vectors may do
    doc = json.loads(out.read_text())
    (data,) = doc["datasets"]
    assert data["name"] == "rotten_tomatoes" and "movie-disjoint" in data["test"] and data["rows"] == 400
    assert [c["size"] for c in data["cells"]] == [100, "full"]
    for cell in data["cells"]:
        assert [r["seed"] for r in cell["runs"]] == [0, 1]
        for name in ("head", "LR", "seed_loop"):
            assert 0.3 < cell["mean"][name]["accuracy"] <= 1 and 0 <= cell["mean"][name]["ece"] <= 1
        diffs = [100 * (r["head"]["accuracy"] - r["LR"]["accuracy"]) for r in cell["runs"]]
        assert cell["head_minus_lr_points"] == {"mean": sum(diffs) / 2, "worst": min(diffs)}
    # the exit code is the table's verdict: mean head - LR >= -0.3 point and mean ECE <= 0.05 in every cell
    assert (done.returncode == 0) == doc["met"] == all(quality.verdict(c) for c in data["cells"])
    table = done.stdout.split("\n{")[0]
    test_rows = data["cells"][0]["test_rows"]  # the hash split's share is near, not exactly, 20 %
    assert 60 <= test_rows <= 100 and all(c["test_rows"] == test_rows for c in data["cells"])
    assert table.count(f"\n| rotten_tomatoes ({test_rows}, movie-disjoint) |") == 2
    multi = doc["multilabel"]  # the multi-label row: our head vs OvR LogisticRegression on 400 Reuters rows
    assert multi["rows"] == 400 and [r["seed"] for r in multi["runs"]] == [0, 1] and multi["labels"] >= 5
    for scores in (multi["mean"]["head"], multi["mean"]["head_at_0.5"], multi["ovr_lr"]):
        assert 0 <= scores["micro_f1"] <= 1 and 0 <= scores["macro_f1"] <= 1
    assert multi["met"] == quality.multilabel_verdict(multi)  # reported; only full runs' exit code counts it
    assert f"\n| reuters_topics ({multi['test_rows']}, hash split) | {multi['train_rows']} |" in table
    # the LoRA row: adapters + head on 120 of the training rows vs the frozen head on the same rows and test rows
    lora = data["lora"]
    assert lora["train_rows"] == 120 and lora["test_rows"] == test_rows and lora["epochs"] == 1
    assert [h["epoch"] for h in lora["lora"]["history"]] == [1] and 0 < lora["lora"]["adapter_mb"] < 1
    for side in ("frozen", "lora"):
        assert 0.3 < lora[side]["accuracy"] <= 1 and lora[side]["seconds"] >= 0
    assert lora["gain_points"] == round(100 * (lora["lora"]["accuracy"] - lora["frozen"]["accuracy"]), 2)
    assert "\n| rotten_tomatoes | 120 | 1 | " in table


def test_verdict_bars():
    cell = {"head_minus_lr_points": {"mean": -0.29, "worst": -2.0}, "mean": {"head": {"ece": 0.05}}}
    assert quality.verdict(cell)
    assert not quality.verdict({**cell, "head_minus_lr_points": {"mean": -0.31, "worst": 0}})
    assert not quality.verdict({**cell, "mean": {"head": {"ece": 0.051}}})
    assert quality.multilabel_verdict({"head_minus_ovr_points": {"macro_f1": -0.3}})
    assert not quality.multilabel_verdict({"head_minus_ovr_points": {"macro_f1": -0.31}})
