"""The benchmarks in smoke mode: every row runs end to end on tiny data with a tiny encoder (numbers mean nothing).

Benchmarks are not timed tests; this only proves that `make bench` executes: every row, the JSON and the
markdown table, against the session's real S3 + MLflow and the Prefect test harness.
"""

import json

import pytest

from benchmarks import run as bench


# the fan-out row starts its own S3, Prefect server and two workers (minutes): it has its own slow smoke test below
FAST = [name for name in bench.ORDER if name != "fanout"]


def test_smoke_runs_every_row(services_env, prefect_harness, tmp_path):
    doc = bench.run(FAST, smoke=True, services_mode="env", work=tmp_path / "work")
    rows = {r["name"]: r for r in doc["rows"]}
    assert list(rows) == FAST
    failed = {name: r["data"].get("error", r["measured"]) for name, r in rows.items() if r["measured"].startswith("FAILED")}
    assert not failed, failed
    assert rows["incremental"]["data"]["encoded"] == rows["incremental"]["data"]["new_distinct_texts"] > 0
    assert rows["memory"]["data"]["peak_rss_mb"]["1x"] > 0  # a child process, measured by wait4
    assert rows["vs_seed"]["data"]["seed"]["extrapolated"] and rows["vs_seed"]["data"]["ratio"] > 0
    assert rows["encoder"]["data"]["runs"]["bf16"]["ceiling_tokens_per_s"] > 0
    assert len(rows["drift"]["data"]["halves_auc"]) == 20 and rows["drift"]["data"]["scored_rows"] == 300
    peer = rows["peer"]["data"]
    assert peer["peer"]["rows_encoded"] == peer["peer"]["train_rows"] + peer["peer"]["test_rows"] > 0
    assert peer["adaptflow"]["decision"] == "promote" and peer["ratio"] > 0  # a new name: the serving check ran
    assert rows["peer_incremental"]["data"]["peer_reused_from_peer_row"]
    assert rows["peer_incremental"]["data"]["adaptflow_encoded"] == rows["incremental"]["data"]["encoded"]
    md = bench.markdown(doc)
    assert md.count("\n| ") == 2 + len(FAST) and "SMOKE MODE" in md
    json.dumps(doc, default=str)


@pytest.mark.slow
def test_smoke_fanout_row(tmp_path):
    doc = bench.run(["fanout"], smoke=True, services_mode="env", work=tmp_path / "work")
    row = doc["rows"][0]
    assert not row["measured"].startswith("FAILED"), row["data"].get("error", row["measured"])
    fanout = row["data"]
    assert fanout["rows_encoded"] == 64 and fanout["1_workers"]["wall_s"] > 0 and fanout["2_workers"]["wall_s"] > 0
    assert len(fanout["1_workers"]["parts"]) == len(fanout["2_workers"]["parts"]) == 2 and fanout["ratio"] > 0


def test_cli_arguments_and_results_files(tmp_path, monkeypatch):
    with pytest.raises(SystemExit):
        bench.main(["--only", "nope"])
    monkeypatch.setattr(bench, "HERE", tmp_path)
    bench.record("| table |\n")
    bench.record("| newer |\n")
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| newer |" in text and "| table |" not in text and text.count("<!-- latest:begin -->") == 1


def test_encode_variants_compare_against_the_default():
    """The experiments behind the encode defaults run and report a ratio and a cosine per variant."""
    from benchmarks import encode_variants

    rows = encode_variants.run(48, ["sdpa_vs_eager", "int8"])
    assert [r["variant"] for r in rows] == ["eager attention instead of SDPA", "int8 dynamic quantisation (Linear)"]
    for r in rows:
        assert r["ratio"] > 0 and r["variant_tok_s"] > 0
    assert rows[0]["cosine_min"] > 0.99  # same maths, another kernel
    assert 0.5 < rows[1]["cosine_min"] < 1.0  # int8 changes the vectors: the table shows by how much
    assert encode_variants.markdown(rows).count("\n| ") == 3
