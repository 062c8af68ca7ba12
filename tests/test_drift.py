"""Drift: the statistics on arrays, their calibration on real MiniLM vectors of the bundled sets, and the checks a
scoring run and `adaptflow drift` make against real SeaweedFS + MLflow + Prefect (report, monitoring run, the
markdown artifact, ``adaptflow.drift.detected``)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from adaptflow.drift import DriftRules, delong_interval, embedding_drift, input_health, prediction_drift, psi
from adaptflow.drift_check import TextSample

# the bundled real sets beside the checkout (../shared/data), or the workplace's copy (a git worktree elsewhere)
DATA = next((p for p in (Path(__file__).resolve().parents[2] / "shared" / "data", Path("/work/shared/data"))
             if p.is_dir()), Path("../shared/data"))


# ------------------------------------------------------------------------------------------ statistics


def test_delong_auc_equals_sklearn_and_its_interval_covers_it():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.4
    scores = rng.normal(size=400) + 0.8 * y
    scores[:50] = np.round(scores[:50])  # ties: midranks
    auc, low, high = delong_interval(scores, y, 0.95)
    assert auc == pytest.approx(roc_auc_score(y, scores))
    assert low < auc < high and 0.05 < high - low < 0.25
    # a wider level, a wider interval
    _, low99, high99 = delong_interval(scores, y, 0.99)
    assert low99 < low and high99 > high


def test_same_distribution_is_not_flagged_and_a_shift_is():
    rng = np.random.default_rng(1)
    reference, new = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    same = embedding_drift(reference, new, DriftRules())
    assert not same["drifted"] and 0.4 < same["score"] < 0.6 and same["ci_low"] < 0.6
    shifted = embedding_drift(reference, new + np.eye(16)[0] * 1.5, DriftRules())
    assert shifted["drifted"] and shifted["ci_low"] > 0.6
    assert len(shifted["scores"]["reference"]) == len(shifted["scores"]["new"]) == 600
    few = embedding_drift(reference[:5], new[:5], DriftRules())
    assert few["score"] is None and not few["drifted"] and "too few rows" in few["note"]


def test_prediction_drift_psi_and_low_confidence():
    assert psi([50, 50], [50, 50]) == pytest.approx(0.0, abs=1e-9)
    assert psi([50, 50], [90, 10]) > 0.25
    proba = np.array([[0.9, 0.1]] * 90 + [[0.45, 0.55]] * 10)
    balanced = np.array([[0.2, 0.8]] * 10 + [[0.8, 0.2]] * 10)
    result = prediction_drift(["neg", "pos"], {"neg": 50, "pos": 50}, proba, balanced, DriftRules())
    assert result["shifted"] and result["predicted"] == {"neg": 0.9, "pos": 0.1}
    assert result["psi"] == result["psi_vs_training_labels"] > 0.25
    assert result["low_confidence"] == {"below": 0.6, "new": 0.1, "train": 0.0}
    # a head that favours one class does so on its training rows too: no shift, whatever the labels say
    biased = prediction_drift(["neg", "pos"], {"neg": 50, "pos": 50}, proba, proba[::-1], DriftRules())
    assert not biased["shifted"] and biased["psi"] == 0.0 and biased["psi_vs_training_labels"] > 0.25
    # a large PSI on a handful of rows is not evidence: the chi-square test holds it back
    neg, pos = [0.8, 0.2], [0.2, 0.8]
    few = prediction_drift(["neg", "pos"], {"neg": 5, "pos": 5}, np.array([neg] * 4 + [pos] * 2),
                           np.array([neg] * 2 + [pos] * 4), DriftRules())
    assert few["psi"] > 0.2 and few["p_value"] > 0.05 and not few["shifted"]


def test_input_health_counts_truncation_and_unknown_tokens():
    health = input_health(np.array([5, 10, 33, 40]), 32, unknown_tokens=8, total_tokens=88,
                          char_lengths=np.array([10, 30, 150, 200]))
    assert health["truncated_share"] == 0.5 and health["unknown_token_share"] == pytest.approx(8 / 88, abs=1e-5)
    assert health["rows"] == 4 and health["tokens"]["p50"] == 21


def test_text_sample_is_bounded_and_uniform_over_chunks():
    counts = np.zeros(100)
    for seed in range(200):
        sample = TextSample(10, seed)
        for start in range(0, 100, 7):  # chunks of uneven size
            sample.add(str(i) for i in range(start, min(start + 7, 100)))
        assert len(sample) == 10 and sample.seen == 100 and len(set(sample.texts)) == 10
        counts[[int(t) for t in sample.texts]] += 1
    # every row equally likely (expected 20 each): early and late rows alike
    assert counts[:50].sum() == pytest.approx(counts[50:].sum(), rel=0.15) and counts.min() > 5


# ------------------------------------------------------------------------ calibration on real vectors


@pytest.fixture(scope="module")
def minilm_vectors(minilm_path):
    """MiniLM vectors (mean pooling, fp32) of 600 rotten_tomatoes reviews, 100 tweets and 100 BBC articles."""
    from adaptflow.embed import iter_encode, tokenize_ragged
    from adaptflow.encoders import load_encoder

    tokenizer, model = load_encoder(minilm_path)
    texts = {
        "rotten_tomatoes": pd.read_csv(DATA / "rotten_tomatoes" / "reviews.csv")["text"].sample(600, random_state=0),
        "tweets": pd.read_parquet(DATA / "tweets" / "tweets.parquet")["text"].sample(100, random_state=0),
        "bbc_news": pd.read_json(DATA / "bbc_news" / "articles.jsonl", lines=True)["text"].sample(100, random_state=0),
    }
    out = {}
    for name, series in texts.items():
        ids = tokenize_ragged(tokenizer, series.tolist(), 128)
        vectors = np.empty((len(series), model.config.hidden_size), dtype=np.float32)
        for rows, v in iter_encode(model, ids, pooling="mean", dtype="fp32", device="cpu", progress=False):
            vectors[rows] = v
        out[name] = vectors
    return out


def test_no_false_alarms_on_random_halves_and_other_domains_are_flagged(minilm_vectors):
    """The issue's calibration, at test size: 20 random halves of one set (rows of the training distribution the
    model did not train on) are flagged at most once (5 %); tweets and news against film reviews always."""
    reviews = minilm_vectors["rotten_tomatoes"]
    flagged, scores = 0, []
    for seed in range(20):
        order = np.random.default_rng(seed).permutation(len(reviews))
        half = len(reviews) // 2
        result = embedding_drift(reviews[order[:half]], reviews[order[half:]], DriftRules(seed=seed))
        flagged += result["drifted"]
        scores.append(result["score"])
    assert flagged <= 1, scores
    assert 0.4 < float(np.mean(scores)) < 0.6
    for other in ("tweets", "bbc_news"):
        result = embedding_drift(reviews[:100], minilm_vectors[other], DriftRules())
        assert result["drifted"] and result["ci_low"] > 0.9, (other, result["score"], result["ci_low"])


# ------------------------------------------------------------------------------ end to end on the stack


@pytest.fixture(scope="module")
def drift_model(test_settings, prefect_harness, minilm_path, tmp_path_factory):
    """Model ``drift-test`` v1, registered by the retrain flow on 240 film reviews (the real MiniLM: a random tiny
    encoder cannot tell tweets from reviews), and 200 other reviews it never saw."""
    import boto3
    from botocore.config import Config

    from adaptflow.config import build_config
    from flows.retrain import retrain

    s3 = boto3.client("s3", endpoint_url=test_settings.s3_endpoint_url, aws_access_key_id=test_settings.aws_access_key_id,
                      aws_secret_access_key=test_settings.secret_key, region_name=test_settings.aws_region,
                      config=Config(s3={"addressing_style": "path"}))
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=bucket)
    reviews = pd.read_csv(DATA / "rotten_tomatoes" / "reviews.csv")[["text", "label"]].sample(440, random_state=1)
    folder = tmp_path_factory.mktemp("drift")
    reviews.iloc[:240].to_csv(folder / "train.csv", index=False)
    (folder / "new" / "dt=2026-12-02").mkdir(parents=True)
    reviews.iloc[240:][["text"]].to_parquet(folder / "new" / "dt=2026-12-02" / "part-0.parquet", index=False)
    config = build_config({"name": "drift-test", "data": {"train": str(folder / "train.csv"), "test_size": 0.25},
                           "encoder": {"ref": str(minilm_path), "max_length": 64, "dtype": "fp32",
                                       "device": "cpu"},
                           "gate": {"smoke_test": False}})
    with pytest.MonkeyPatch.context() as mp:
        for key, value in test_settings.process_env().items():
            mp.setenv(key, value)
        mp.setenv("ADAPTFLOW_BUCKET", bucket)
        assert retrain(config)["version"] == "1"
    return {"bucket": bucket, "folder": folder}


@pytest.fixture
def drift_env(drift_model, services_env, monkeypatch):
    monkeypatch.setenv("ADAPTFLOW_BUCKET", drift_model["bucket"])
    return services_env


def monitoring_runs(client, version: str):
    return client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.`adaptflow.monitoring` = 'drift' and tags.`adaptflow.model_version` = '{version}' and "
        f"tags.`adaptflow.model_name` = 'drift-test'", order_by=["attributes.start_time DESC"])


def test_scoring_run_checks_its_rows_for_drift(drift_model, drift_env, tmp_path):
    """Unseen reviews from the training distribution: scored, checked, not drifted; the report is an MLflow
    monitoring run linked to the version and a Prefect markdown artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from adaptflow.registry import client_for
    from flows.score import score

    summary = score("models:/drift-test@champion", str(drift_model["folder"] / "new"), str(tmp_path / "scores"))
    assert summary["rows"] == 200 and summary["drift_sample"].startswith("s3://")
    drift = summary["drift"]["drift"]
    assert set(drift) >= {"score", "ci_low", "ci_high", "drifted", "label_shift", "inputs"}
    assert not drift["drifted"] and drift["ci_low"] < 0.6 and drift["rows"]["new"] == 200, drift["reasons"]
    assert drift["embeddings"] == {"encoded": 0, "cached": 200}  # scoring put every vector in the cache
    assert drift["rows"]["seen_in_training"] == 0
    assert drift["rows"]["compared"] == drift["rows"]["training_cached"] == drift["rows"]["training"]
    assert 150 < drift["rows"]["training"] < 210  # the hash split's ~75 % of 240
    assert drift["label_shift"]["psi"] is not None and set(drift["label_shift"]["train"]) == {"fresh", "rotten"}
    assert drift["inputs"]["rows"] == 200 and 0 <= drift["inputs"]["truncated_share"] <= 1

    client = client_for(drift_env.mlflow_tracking_uri)
    (run, *_) = monitoring_runs(client, "1")
    assert run.info.run_id == summary["drift"]["monitoring_run_id"]
    assert run.data.metrics["drift.score"] == drift["score"] and run.data.metrics["drift.drifted"] == 0.0
    version = client.get_model_version("drift-test", "1")
    assert version.tags["adaptflow.drift.last_run_id"] == run.info.run_id
    assert run.data.tags["adaptflow.training_run_id"] == version.run_id and version.tags["adaptflow.drift.drifted"] == "false"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "drift")} == {"drift/drift.png",
                                                                                "drift/report.json"}
    with get_client(sync_client=True) as prefect:
        (artifact, *_) = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["drift-report"])),
                                                limit=1, sort="CREATED_DESC")
    assert "# Drift: drift-test v1 — no drift" in artifact.data and "training" in artifact.data


def test_drift_command_flags_another_domain_and_emits_the_event(drift_model, drift_env, tmp_path, restored_environ):
    """`adaptflow drift` on tweets against the film-review model: drifted, `--json` shape, and the event."""
    from typer.testing import CliRunner

    from adaptflow.cli import app
    from tests.events_probe import wait_for_events

    tweets = pd.read_parquet(DATA / "tweets" / "tweets.parquet")[["text"]].sample(200, random_state=2)
    tweets.to_parquet(tmp_path / "tweets.parquet", index=False)
    done = CliRunner().invoke(app, ["drift", "models:/drift-test/1", "--input", str(tmp_path / "tweets.parquet"), "--json"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout.strip().splitlines()[-1])
    drift = result["drift"]
    assert drift["drifted"] and drift["ci_low"] > 0.6 and drift["rows"]["new"] == 200, (drift["score"], drift["ci_low"])
    assert drift["embeddings"]["encoded"] == 200  # rows never scored are encoded into the cache on the way
    (event, *_) = wait_for_events("adaptflow.drift.detected", "adaptflow.model.drift-test")
    assert event.payload["version"] == "1" and event.payload["score"] == drift["score"]
    assert event.payload["monitoring_run_id"] == result["monitoring_run_id"]

    # the training file itself: its training rows are left out (the same vector on both sides would drag the AUC
    # below 0.5); the test rows it also holds are compared
    from flows.drift import check_drift

    own = check_drift("models:/drift-test/1", str(drift_model["folder"] / "train.csv"))["drift"]
    assert own["rows"]["seen_in_training"] == own["rows"]["training"] and own["rows"]["new"] == 240
    assert own["rows"]["compared"] == 240 - own["rows"]["training"] and not own["drifted"]

    bad = CliRunner().invoke(app, ["drift", "models:/drift-test/1", "--input", str(tmp_path / "none"), "--json"])
    assert bad.exit_code == 2 and "none" in bad.output


def test_adaptflow_deploy_retrains_the_configs_model_on_drift(prefect_harness, tmp_path):
    """`adaptflow deploy CONFIG` gives retrain-on-demand the trigger prefect.yaml declares: the drift event of the
    config's model starts it."""
    from prefect.client.orchestration import get_client

    from deployments.deploy import deploy

    config = tmp_path / "reviews.yaml"
    config.write_text("name: drift-deployed\ndata:\n  train: reviews.csv\n")
    assert "retrain-from-config/retrain-on-demand" in deploy(str(config), gpu=False)
    with get_client(sync_client=True) as client:
        on_demand = client.read_deployment_by_name("retrain-from-config/retrain-on-demand")
        (automation,) = [a for a in client.read_automations() if a.name == "retrain-on-drift"]
    assert automation.trigger.expect == {"adaptflow.drift.detected"}
    assert automation.trigger.match.model_dump()["prefect.resource.id"] == "adaptflow.model.drift-deployed"
    assert automation.actions[0].deployment_id == on_demand.id
    assert automation.actions[0].parameters == {"config_uri": str(config)}
