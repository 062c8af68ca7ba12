"""Champion/challenger promotion: re-score the champion on the challenger's test rows, decide, move aliases.

The champion is re-scored from its version tags (head URI + embedding settings), not by downloading and
running its pyfunc: its test-row embeddings are usually already in the row cache, and when its encoder
differs only the missing rows are encoded with *its* encoder. The decision and its numbers land on the
model version (tags), in the challenger's MLflow run, and in the audit trail when an alias moves. The whole
decide-and-move happens under a store lease, so two runs finishing together cannot both move ``champion``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from adaptflow.config import RunConfig
from adaptflow.gate import GateDecision, decide
from adaptflow.stages import StageContext, encode_missing, read_frame

log = logging.getLogger("adaptflow")

RESCORE_TAGS = {"adaptflow.head_uri", "adaptflow.encoder_ref", "adaptflow.encoder_digest", "adaptflow.max_length",
                "adaptflow.pooling", "adaptflow.dtype"}
MIN_GATE_ROWS = 30  # fewer test rows left after leaving out the champion's training rows: hold, do not guess
SMOKE_TEXTS = ["This is great.", "This is terrible.", "An ordinary sentence about nothing in particular."]


def score_version(ctx: StageContext, version, texts: list[str]) -> list[str]:
    """Predicted labels of a registered version on ``texts``, via the embedding cache (encoding what is missing)."""
    proba, labels, _ = version_outputs(ctx, version, texts)
    return [labels[i] for i in proba.argmax(axis=1)]


def label_sets_of_version(ctx: StageContext, version, texts: list[str], labels: list[str]) -> np.ndarray:
    """A multi-label version's 0/1 predictions [n, len(labels)] on ``texts``, columns in ``labels`` order (a label
    the version does not know is never predicted; one only it knows is ignored)."""
    proba, own, thresholds = version_outputs(ctx, version, texts)
    if thresholds is None:  # a one-label-per-row model: its one predicted label
        thresholds = [1.0] * len(own)
        proba = (proba == proba.max(axis=1, keepdims=True)).astype(np.float64)
    index = {label: j for j, label in enumerate(labels)}
    out = np.zeros((len(texts), len(labels)), dtype=bool)
    for j, label in enumerate(own):
        if label in index:
            out[:, index[label]] = proba[:, j] >= thresholds[j]
    return out


def version_outputs(ctx: StageContext, version, texts: list[str]) -> tuple[np.ndarray, list[str], list[float] | None]:
    """``(probabilities [n, k], labels, thresholds)`` of a registered version on ``texts`` (thresholds: a
    multi-label version's, else None), via the embedding cache (encoding what is missing)."""
    from adaptflow.cache import EmbeddingCache, text_sha256
    from adaptflow.heads import load_head, predict_proba
    from adaptflow.multilabel import load_thresholds, predict_sigmoid
    from adaptflow.store import parse_s3_uri

    tags = version.tags
    # a LoRA version's vectors are its adapted encoder's, cached under a key with the adapter's digest
    adapter = ({"uri": tags["adaptflow.adapter_uri"], "digest": tags["adaptflow.adapter_digest"]}
               if "adaptflow.adapter_uri" in tags else None)
    cache = EmbeddingCache(ctx.store, encoder_digest=tags["adaptflow.encoder_digest"],
                           max_length=int(tags["adaptflow.max_length"]), pooling=tags["adaptflow.pooling"],
                           dtype=tags["adaptflow.dtype"], adapter_digest=adapter["digest"] if adapter else None)
    hashes = [text_sha256(t) for t in texts]
    # the version's own snapshot, verified against the digest it was trained (and its cache keyed) on
    encoded = encode_missing(ctx, cache, texts, encoder_ref=tags["adaptflow.encoder_ref"], adapter=adapter)
    if encoded:
        log.info("gate: encoded %d test rows with version %s's encoder%s", encoded, version.version,
                 " (adapter merged)" if adapter else "")
    with tempfile.TemporaryDirectory() as tmp:
        bucket, key = parse_s3_uri(tags["adaptflow.head_uri"])  # the version may come from another bucket
        head_path = ctx.store.with_bucket(bucket).get_verified_file(key, Path(tmp) / "head.safetensors")
        head, labels = load_head(head_path)
        thresholds = load_thresholds(head_path)
    vectors = cache.read(hashes)
    proba = predict_proba(head, vectors) if thresholds is None else predict_sigmoid(head, vectors)
    return proba, labels, thresholds


def unseen_by(ctx: StageContext, champion, texts: list[str]) -> tuple[np.ndarray, int | None, str]:
    """Which test rows the champion did not train on: ``(keep mask, rows excluded, note for the reason)``.

    The champion's training rows come from its row manifest (``adaptflow.lineage``); a champion registered
    before manifests existed is compared on every row (``excluded`` None) and the note says so.
    """
    from adaptflow.lineage import rows_of, text_hashes, trained_on

    keep = np.ones(len(texts), dtype=bool)
    if champion is None:
        return keep, 0, ""
    manifest = rows_of(ctx.store, champion)
    if manifest is None:
        return keep, None, (f" (champion v{champion.version} has no row manifest: compared on all {len(texts)} test "
                            f"rows, some of which it may have trained on)")
    seen = trained_on(manifest)
    keep = np.fromiter((h not in seen for h in text_hashes(texts)), dtype=bool, count=len(texts))
    excluded = int((~keep).sum())
    if excluded:
        log.info("gate: %d of %d test rows left out: champion v%s trained on them", excluded, len(texts),
                 champion.version)
    return keep, excluded, (f" (compared on {int(keep.sum())} test rows; {excluded} excluded: champion "
                            f"v{champion.version} trained on them)" if excluded else "")


def smoke_test(model_uri: str, env: dict[str, str], texts: list[str] = SMOKE_TEXTS, timeout: float = 300, *,
               key: str | None = None) -> list[dict]:
    """Load ``model_uri`` through mlflow.pyfunc in a fresh process and predict ``texts``; raise if it cannot.

    ``key`` (the model name): use the interpreter :func:`adaptflow.serving_check.prestart` started for it, which
    has imported its libraries meanwhile but not seen the model."""
    from adaptflow import serving_check

    return serving_check.check(model_uri, env, texts, key=key, timeout=timeout)


def gate_stage(ctx: StageContext, config: RunConfig, *, validated: dict, registered: dict) -> dict:
    """Decide promote / reject / hold for the registered challenger and move ``champion`` on promote."""
    from adaptflow import serving_check
    from adaptflow.locks import store_lock
    from adaptflow.registry import CHAMPION, alias_history, client_for, current_alias, move_alias

    client = client_for(ctx.settings.mlflow_tracking_uri)
    name, version = registered["model_name"], registered["version"]
    challenger = client.get_model_version(name, version)
    test = read_frame(ctx, validated["test"])
    texts, labels = list(test["text"]), validated["labels"]
    index = {label: i for i, label in enumerate(labels)}
    multilabel = validated.get("task") == "multilabel"
    if multilabel:  # 0/1 matrices [n, k]; compared by adaptflow.multilabel.decide_multilabel
        from adaptflow.multilabel import decide_multilabel, indicator

        y_true = indicator(test["label"].tolist(), labels) > 0
        challenger_pred = label_sets_of_version(ctx, challenger, texts, labels)
    else:
        y_true = test["label"].map(index).to_numpy()
        challenger_pred = np.array([index[p] for p in score_version(ctx, challenger, texts)])

    with store_lock(ctx.store, f"promote/{name}") as lease:
        champion = current_alias(client, name, CHAMPION)
        if champion is not None and champion.version == version:
            # a re-run of the gate for the champion itself: nothing to compare, nothing to move or audit
            verdict = GateDecision("hold", f"v{version} is already the champion: nothing to compare, no alias moved",
                                   config.gate.metric, {})
        elif champion is not None and not RESCORE_TAGS <= set(champion.tags):
            # registered without the tags that make re-scoring possible: no evidence, a person decides
            verdict = GateDecision("hold", f"champion v{champion.version} cannot be re-scored (it lacks the tags "
                                   f"{sorted(RESCORE_TAGS - set(champion.tags))}); promote by hand if it should go",
                                   config.gate.metric, {})
        else:
            keep, excluded, note = unseen_by(ctx, champion, texts)
            champion_pred = None
            if excluded and keep.sum() < MIN_GATE_ROWS:
                verdict = GateDecision("hold", f"only {int(keep.sum())} of {len(texts)} test rows are not in champion "
                                       f"v{champion.version}'s training rows ({excluded} excluded); at least "
                                       f"{MIN_GATE_ROWS} are needed to compare: add test rows, or decide by hand",
                                       config.gate.metric, {})
            else:
                kept = [t for t, k in zip(texts, keep) if k]
                if multilabel:
                    if champion is not None:
                        champion_pred = label_sets_of_version(ctx, champion, kept, labels)
                    verdict = decide_multilabel(y_true[keep], challenger_pred[keep], champion_pred, labels,
                                                config.gate, seed=config.seed)
                else:
                    if champion is not None:
                        # a champion label the challenger does not know is simply a wrong answer on that row
                        predicted = score_version(ctx, champion, kept)
                        champion_pred = np.array([index.get(p, (y + 1) % len(labels))
                                                  for p, y in zip(predicted, y_true[keep])])
                    verdict = decide(y_true[keep], challenger_pred[keep], champion_pred, labels, config.gate,
                                     seed=config.seed)
                verdict.reason += note
            verdict.rows_compared, verdict.rows_excluded = int(keep.sum()), excluded
        if verdict.decision == "promote" and config.gate.smoke_test:
            smoke_test(f"models:/{name}/{version}", ctx.settings.process_env(), key=name)
        else:
            serving_check.discard(name)  # a check pre-started for this run is not needed
        moved = None
        if verdict.decision == "promote":
            lease.fence()  # LockLost when another run took the lease over meanwhile: never move on a stale decision
            moved = move_alias(client, name, CHAMPION, version, reason=verdict.reason, actor="adaptflow-gate",
                               kind="gate")
    _record(client, name, version, registered["run_id"], verdict, champion.version if champion else None)
    aliases = sorted(client.get_model_version(name, version).aliases)
    return {**verdict.to_dict(), "champion_version": champion.version if champion else None, "aliases": aliases,
            "alias_move": moved, "history_length": len(alias_history(client, name))}


def _record(client, name: str, version: str, run_id: str, verdict: GateDecision, champion: str | None) -> None:
    """Put the decision on the version (tags) and in the challenger's run (tags, metrics, gate.json)."""
    payload = {**verdict.to_dict(), "champion_version": champion}
    client.set_model_version_tag(name, version, "adaptflow.gate.decision", verdict.decision)
    client.set_model_version_tag(name, version, "adaptflow.gate.reason", verdict.reason[:4000])
    client.set_model_version_tag(name, version, "adaptflow.gate", json.dumps(payload)[:4900])
    client.set_tag(run_id, "adaptflow.gate.decision", verdict.decision)
    numbers = {f"gate_{k}": v for k, v in (("delta", verdict.delta), ("ci_low", verdict.ci_low),
                                           ("ci_high", verdict.ci_high), ("p_value", verdict.p_value),
                                           ("rows_compared", verdict.rows_compared),
                                           ("rows_excluded", verdict.rows_excluded)) if v is not None}
    for key, value in numbers.items():
        client.log_metric(run_id, key, value)
    client.log_dict(run_id, payload, "gate/decision.json")


def gate_markdown(result: dict) -> str:
    """The decision as a short markdown report (Prefect artifact)."""
    lines = [f"## Gate: **{result['decision'].upper()}**", "", result["reason"], "",
             "| metric | challenger | champion |", "| --- | --- | --- |"]
    champion = result.get("champion") or {}
    for metric, value in result["challenger"].items():
        other = champion.get(metric)
        lines.append(f"| {metric} | {value:.4f} | {'' if other is None else f'{other:.4f}'} |")
    if result.get("delta") is not None:
        lines += ["", f"Δ {result['metric']} = {result['delta']:+.4f}, CI [{result['ci_low']:+.4f}, "
                      f"{result['ci_high']:+.4f}] (each bound one-sided), McNemar one-sided p = {result['p_value']:.4g}"]
    if result.get("rows_compared") is not None:
        excluded = result.get("rows_excluded")
        lines += ["", f"Compared on {result['rows_compared']} test rows; " + (
            "the champion has no row manifest, so none could be excluded" if excluded is None else
            f"{excluded} excluded (rows the champion trained on)")]
    if result.get("evidence"):
        lines += ["", "Evidence per test: " + ", ".join(f"{t} {e}" for t, e in result["evidence"].items())]
    if result.get("class_recall_deltas"):
        lines += ["", "| class | Δ recall |", "| --- | --- |"]
        lines += [f"| {label} | {d:+.4f} |" for label, d in result["class_recall_deltas"].items()]
    return "\n".join(lines)
