"""The drift row: calibration (false alarms on unseen rows of the training distribution, scores on other
domains) and cost (a drift check vs scoring the same new rows), on the rotten_tomatoes model.

    python -m benchmarks.run --only drift
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from benchmarks.common import (REPO, RT_CONFIG, RT_CSV, TWEETS, Row, build_tiny_encoder, environment, log,
                               write_config)

BBC = REPO.parent / "shared" / "data" / "bbc_news" / "articles.jsonl"
HALVES = 20


def bench_drift(ctx) -> Row:
    """Retrain the rotten_tomatoes model cold; then (1) 20 checks on random halves of its test rows (the training
    distribution, never trained on), (2) a check on tweets and on BBC news, (3) scoring N tweets vs checking them."""
    from adaptflow.cache import text_sha256
    from adaptflow.data import normalise_text
    from adaptflow.drift import DriftRules
    from adaptflow.drift_check import TextSample, check_drift
    from adaptflow.lineage import rows_of
    from adaptflow.registry import client_for
    from adaptflow.scoring import ScoreRequest, resolve_model, score_location
    from adaptflow.settings import load_settings
    from adaptflow.stages import StageContext

    n_new, n_bbc = (300, 60) if ctx.smoke else (10_000, 500)
    if ctx.smoke:
        rt = pd.read_csv(RT_CSV).groupby("label", group_keys=False).head(200)
        rt.to_csv(ctx.work / "drift-rt.csv", index=False)
        config = write_config(ctx.work / "drift-rt.yaml", name="bench-drift", train=ctx.work / "drift-rt.csv",
                              encoder=str(build_tiny_encoder(ctx.work / "tiny-encoder")), gate={"smoke_test": False})
    else:
        rt, config = pd.read_csv(RT_CSV), RT_CONFIG
    run = ctx.runner.retrain(config, ["name=bench-drift", "mlflow.experiment=adaptflow-bench"])
    version = str(run.summary["version"])
    log(f"drift: model bench-drift v{version} trained cold in {run.wall_s:.0f}s")
    with environment({**ctx.svc.env, "ADAPTFLOW_BUCKET": run.bucket}):
        settings = load_settings()
        sctx = StageContext.from_env(settings)
        model = resolve_model(settings.mlflow_tracking_uri, f"models:/bench-drift/{version}")
        manifest = rows_of(sctx.store, client_for(settings.mlflow_tracking_uri).get_model_version("bench-drift", version))
        test_hashes = set(manifest.loc[manifest["split"] == "test", "text_sha256"])
        texts = [normalise_text(t) for t in rt["text"].dropna().astype(str)]
        unseen = [t for t in dict.fromkeys(texts) if t and text_sha256(t) in test_hashes]

        # (1) calibration: random halves of rows the model never trained on
        flagged, scores, seconds = 0, [], []
        for seed in range(HALVES):
            order = np.random.default_rng(seed).permutation(len(unseen))[: len(unseen) // 2]
            report = check_drift(sctx, model, [unseen[i] for i in order], DriftRules(seed=seed))
            flagged += report["drifted"]
            scores.append(report["score"])
            seconds.append(report["seconds"])
        log(f"drift: {flagged}/{HALVES} halves of {len(unseen)} unseen test rows flagged; AUC mean "
            f"{np.mean(scores):.3f}, max {np.max(scores):.3f}")

        # (2) + (3): score N tweets (encoded: a new domain), then check the rows that run scored
        tweets = pd.read_parquet(TWEETS)[["text"]].sample(n_new, random_state=0)
        lake = ctx.work / "drift-tweets" / "part-0.parquet"
        lake.parent.mkdir(parents=True, exist_ok=True)
        tweets.to_parquet(lake, index=False)
        rules = DriftRules()
        sample = TextSample(rules.sample_rows, rules.seed)
        t = time.perf_counter()
        scored = score_location(sctx, ScoreRequest(model_uri=f"models:/bench-drift/{version}", input=str(lake.parent),
                                                   output=str(ctx.work / "drift-scores"), device="cpu"), model,
                                sample=sample)
        score_s = time.perf_counter() - t
        tweet_report = check_drift(sctx, model, list(sample.texts), rules, input=str(lake.parent), rows=scored["rows"])
        bbc = pd.read_json(BBC, lines=True)["text"].sample(n_bbc, random_state=0).tolist()
        bbc_report = check_drift(sctx, model, [normalise_text(t) for t in bbc], rules)
    ratio = tweet_report["seconds"] / score_s
    met = flagged <= HALVES * 0.05 and tweet_report["drifted"] and bbc_report["drifted"] and ratio <= 0.10
    return Row(
        "drift", "drift: false alarms / other domains / cost",
        f"{flagged}/{HALVES} same-distribution halves flagged (AUC mean {np.mean(scores):.3f}, max "
        f"{np.max(scores):.3f}); tweets AUC {tweet_report['score']} [{tweet_report['ci_low']}, "
        f"{tweet_report['ci_high']}], BBC AUC {bbc_report['score']}; check {tweet_report['seconds']:.1f} s = "
        f"{ratio:.1%} of scoring {scored['rows']} rows ({score_s:.0f} s)",
        "≤ 5 % false alarms; other domains flagged; check ≤ 10 % of scoring", met,
        f"model: rotten_tomatoes {'(smoke: 400 rows, tiny encoder)' if ctx.smoke else 'example config (MiniLM)'}; "
        f"halves of its {len(unseen)} test rows, each checked against its training rows (threshold "
        f"{rules.threshold} on the AUC's lower 95 % bound); scoring encodes every tweet (tokens/s "
        f"{scored['embeddings']['tokens_per_s']}), the check reads the sample's vectors from the cache",
        {"halves_flagged": flagged, "halves_auc": scores, "halves_check_s": seconds, "unseen_rows": len(unseen),
         "tweets": {k: tweet_report[k] for k in ("score", "ci_low", "ci_high", "drifted", "seconds")},
         "tweets_label_shift": {k: v for k, v in tweet_report["label_shift"].items() if k != "low_confidence"},
         "bbc": {k: bbc_report[k] for k in ("score", "ci_low", "ci_high", "drifted", "seconds")},
         "score_s": round(score_s, 2), "scored_rows": scored["rows"], "check_to_score": round(ratio, 4)})
