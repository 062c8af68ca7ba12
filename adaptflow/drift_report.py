"""A drift report for people: a markdown page with two text plots (the Prefect artifact), the same two plots as
a PNG, and an MLflow monitoring run linked to the model version (metrics, the PNG, the JSON report)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

BAR = "█"
WIDTH = 30  # characters of the longest bar


def _bar(share: float) -> str:
    return BAR * int(round(share * WIDTH)) or ("▏" if share > 0 else "")


def score_histogram(reference: np.ndarray, new: np.ndarray, bins: int = 12) -> list[tuple[float, float, float, float]]:
    """(bin low, bin high, share of training rows, share of new rows) of the domain classifier's scores."""
    both = np.concatenate([reference, new])
    edges = np.linspace(float(both.min()), float(both.max()) + 1e-9, bins + 1)
    ref, _ = np.histogram(reference, edges)
    nw, _ = np.histogram(new, edges)
    return [(edges[i], edges[i + 1], ref[i] / max(len(reference), 1), nw[i] / max(len(new), 1)) for i in range(bins)]


def drift_markdown(report: dict) -> str:
    """The report as markdown a person reads at a glance: verdict table, score histogram, label bars."""
    emb, labels, inputs = report["embedding"], report["label_shift"], report["inputs"]
    verdict = "**DRIFTED**" if report["drifted"] else "no drift"
    rows = report["rows"]
    lines = [f"# Drift: {report['model_name']} v{report['model_version']} — {verdict}", "",
             f"New rows: {rows['new']} from `{report.get('input') or 'the scored partitions'}` ({rows['new_sampled']} "
             f"sampled, {rows['compared']} compared with as many of the {rows['training']} training rows).", "",
             "| check | value | verdict |", "| --- | --- | --- |"]
    if emb["score"] is None:
        lines.append(f"| embeddings | {emb.get('note')} | — |")
    else:
        lines.append(f"| embeddings: domain-classifier AUC (0.5 = same) | {emb['score']} [{emb['ci_low']}, "
                     f"{emb['ci_high']}] | {'drifted' if emb['drifted'] else 'stable'} (lower bound vs "
                     f"{emb['threshold']}) |")
    lines.append(f"| predictions: PSI, new vs training rows (vs training labels) | {labels['psi']} "
                 f"({labels['psi_vs_training_labels']}) | {'shifted' if labels['shifted'] else 'stable'} "
                 f"(vs {labels['threshold']}) |")
    low = labels["low_confidence"]
    lines.append(f"| low-confidence predictions (top p < {low['below']}) | new {low['new']}, training {low['train']} | |")
    if inputs.get("rows"):
        lines.append(f"| inputs: tokens p50 / p95 | {inputs['tokens']['p50']} / {inputs['tokens']['p95']} | "
                     f"{inputs['truncated_share']:.1%} truncated at {inputs['max_length']}, "
                     f"{inputs['unknown_token_share'] or 0:.2%} unknown tokens |")
    if emb.get("scores"):
        lines += ["", "## Domain-classifier scores: training rows vs new rows",
                  "A row far right looks new; two overlapping histograms mean no drift.", "", "```text",
                  f"{'score':>15}  {'training':<{WIDTH + 6}} new"]
        for low_edge, high_edge, ref, new in score_histogram(emb["scores"]["reference"], emb["scores"]["new"]):
            lines.append(f"{low_edge:6.2f}..{high_edge:6.2f}  {_bar(ref):<{WIDTH}} {ref:4.0%}  {_bar(new):<{WIDTH}} "
                         f"{new:4.0%}")
        lines.append("```")
    lines += ["", "## Labels: training labels, predicted on training rows, predicted on new rows", "", "```text"]
    width = max((len(k) for k in labels["train"]), default=5)
    for label in labels["train"]:
        for i, (what, key) in enumerate((("labels", "train"), ("predicted", "train_predicted"),
                                         ("new rows", "predicted"))):
            share = labels[key][label] or 0
            lines.append(f"{label if i == 0 else '':>{width}}  {what:<9} {_bar(share):<{WIDTH}} {share:4.0%}")
    lines.append("```")
    if report["reasons"]:
        lines += ["", "Why: " + "; ".join(report["reasons"]) + "."]
    return "\n".join(lines) + "\n"


def drift_figure(report: dict, path: Path) -> Path:
    """The same two plots as a PNG: score histograms (training vs new) and label shares (training vs predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    emb, labels = report["embedding"], report["label_shift"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if emb.get("scores"):
        both = np.concatenate([emb["scores"]["reference"], emb["scores"]["new"]])
        bins = np.linspace(both.min(), both.max(), 30)
        left.hist(emb["scores"]["reference"], bins, alpha=0.6, label="training rows", density=True)
        left.hist(emb["scores"]["new"], bins, alpha=0.6, label="new rows", density=True)
        left.legend()
    left.set_title(f"domain classifier: AUC {emb['score']} [{emb['ci_low']}, {emb['ci_high']}]")
    left.set_xlabel("score (higher: looks new)")
    names = list(labels["train"])
    x = np.arange(len(names))
    for i, (key, what) in enumerate((("train", "training labels"), ("train_predicted", "predicted, training rows"),
                                     ("predicted", "predicted, new rows"))):
        right.bar(x + (i - 1) * 0.27, [labels[key][n] or 0 for n in names], 0.27, label=what)
    right.set_xticks(x, names, rotation=30 if len(names) > 4 else 0)
    right.set_title(f"labels: PSI {labels['psi']}")
    right.legend()
    fig.suptitle(f"{report['model_name']} v{report['model_version']}: {'DRIFTED' if report['drifted'] else 'no drift'}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def drift_metrics(report: dict) -> dict[str, float]:
    """The report's numbers as MLflow metrics (``drift.*``); absent values are left out."""
    labels, inputs = report["label_shift"], report["inputs"]
    values = {"drift.score": report["score"], "drift.ci_low": report["ci_low"], "drift.ci_high": report["ci_high"],
              "drift.drifted": float(report["drifted"]), "drift.label_psi": labels["psi"],
              "drift.label_psi_vs_training_labels": labels["psi_vs_training_labels"],
              "drift.low_confidence_new": labels["low_confidence"]["new"],
              "drift.low_confidence_train": labels["low_confidence"]["train"],
              "drift.truncated_share": inputs.get("truncated_share"),
              "drift.unknown_token_share": inputs.get("unknown_token_share"),
              "drift.rows_new": report["rows"]["new"], "drift.rows_compared": report["rows"]["compared"],
              "drift.seconds": report["seconds"]}
    return {k: float(v) for k, v in values.items() if v is not None}


def log_monitoring_run(tracking_uri: str | None, report: dict, public: dict) -> str:
    """An MLflow run in the version's experiment, tagged with the model name and version; the version gets
    ``adaptflow.drift.*`` tags pointing back at it. Returns the run id."""
    from mlflow.entities import Metric, Param, RunTag

    from adaptflow.registry import client_for

    client = client_for(tracking_uri)
    name, number = report["model_name"], report["model_version"]
    version = client.get_model_version(name, number)
    experiment = client.get_run(version.run_id).info.experiment_id if version.run_id else "0"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run = client.create_run(experiment, run_name=f"drift-{name}-v{number}-{stamp}", tags={
        "adaptflow.monitoring": "drift", "adaptflow.model_name": name, "adaptflow.model_version": str(number),
        "adaptflow.training_run_id": version.run_id or "", "adaptflow.drifted": str(report["drifted"]).lower()})
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in drift_metrics(report).items()],
                     params=[Param("input", str(report.get("input") or "scored partitions")[:6000]),
                             Param("threshold", str(report["threshold"]))],
                     tags=[RunTag("mlflow.note.content", drift_markdown(report)[:5000])])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "drift"
        drift_figure(report, folder / "drift.png")
        (folder / "report.json").write_text(json.dumps(public, indent=1, default=str))
        client.log_artifacts(run_id, str(folder), "drift")
    client.set_terminated(run_id)
    for key, value in (("adaptflow.drift.last_run_id", run_id), ("adaptflow.drift.last_score", str(report["score"])),
                       ("adaptflow.drift.drifted", str(report["drifted"]).lower())):
        client.set_model_version_tag(name, number, key, value)
    return run_id


__all__ = ["drift_figure", "drift_markdown", "drift_metrics", "log_monitoring_run", "score_histogram"]
