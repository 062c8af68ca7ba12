"""The pipeline rows: adaptflow vs the seed loop, incremental retrain, fixed overhead, and memory."""

from __future__ import annotations

import statistics
import uuid

import numpy as np
import pandas as pd

from benchmarks.common import MINILM, RT_CONFIG, RT_CSV, TWEETS, Row, build_probe_encoder, build_tiny_encoder, \
    fmt_s, log, minilm_path, pipeline_split, write_config
from benchmarks.seed_loop import run_seed_loop


def _gate(ctx) -> dict | None:
    """Smoke mode skips the gate's serving check (a fresh interpreter loading the model: ~10 s a run)."""
    return {"smoke_test": False} if ctx.smoke else None


def _encoder(ctx) -> str:
    return str(build_tiny_encoder(ctx.work / "tiny-encoder")) if ctx.smoke else MINILM


def _smoke_rt(ctx, rows: int = 120) -> "Path":
    """Smoke mode's data: a class-balanced slice of rotten_tomatoes."""
    path = ctx.work / f"rt{rows}.csv"
    if not path.exists():
        df = pd.read_csv(RT_CSV)
        df.groupby("label", group_keys=False).head(rows // 2).to_csv(path, index=False)
    return path


# ---------------------------------------------------------------------------------------------- vs seed


def bench_vs_seed(ctx) -> Row:
    """The seed's loop and ``adaptflow retrain`` (cold) on the same data, split, encoder, epochs, batch size."""
    epochs, batch = 5, 32
    # val_fraction=0: adaptflow trains on every train row, as the seed loop does (no early-stopping hold-out)
    sets = [f"head.epochs={epochs}", f"head.batch_size={batch}", "head.val_fraction=0", "name=bench-vs-seed",
            "mlflow.experiment=adaptflow-bench"]
    if ctx.smoke:
        csv, enc = _smoke_rt(ctx), _encoder(ctx)
        config = write_config(ctx.work / "smoke-rt.yaml", name="bench-vs-seed", train=csv, encoder=enc,
                              gate=_gate(ctx))
        train, test, labels = pipeline_split(csv)
    else:
        csv, enc, config = RT_CSV, str(minilm_path()), RT_CONFIG  # the bundled example config, as shipped
        train, test, labels = pipeline_split(csv, group_column="movie_name")
    lab = {label: i for i, label in enumerate(labels)}
    live = epochs if ctx.seed_full else 1
    log(f"vs_seed: seed loop, {len(train)} train / {len(test)} test rows, {live} of {epochs} epochs through the encoder")
    seed = run_seed_loop(enc if ctx.smoke else str(minilm_path()), list(train.text), train.label.map(lab).to_numpy(),
                         list(test.text), test.label.map(lab).to_numpy(), len(labels), epochs=epochs,
                         encoder_epochs=live, batch_size=batch, log=lambda m: log(f"vs_seed: {m}"))
    log(f"vs_seed: seed loop {seed.wall_s:.0f}s (measured {seed.measured_s:.0f}s), accuracy {seed.accuracy:.4f}; "
        "now adaptflow retrain, cold")
    run = ctx.runner.retrain(config, sets)
    ctx.shared["cold_rt"] = run
    acc = run.summary["metrics"]["accuracy"]
    ratio = seed.wall_s / run.wall_s
    stack = ctx.svc.up_s
    data = {"seed": seed.__dict__, "adaptflow": {"wall_s": run.wall_s, "accuracy": acc, "summary": run.summary,
                                                 "peak_rss_mb": run.peak_rss_mb},
            "ratio": ratio, "ratio_incl_stack_up": None if stack is None else seed.wall_s / (run.wall_s + stack),
            "stack_up_s": stack, "settings": {"epochs": epochs, "batch_size": batch, "max_length": 128,
                                              "train_rows": len(train), "test_rows": len(test)}}
    how = "measured" if not seed.extrapolated else f"epoch 1 measured, epochs 2-{epochs} charged its time"
    smoke = run.summary.get("seconds", {}).get("gate", 0.0)  # mostly the fresh-interpreter serving check
    data["ratio_without_gate"] = seed.wall_s / max(run.wall_s - smoke, 1e-9)
    measured = (f"seed {fmt_s(seed.wall_s)} ({how}), acc {seed.accuracy:.4f}; adaptflow {fmt_s(run.wall_s)}, "
                f"acc {acc:.4f}; **{ratio:.1f}x** ({data['ratio_without_gate']:.1f}x without the gate's "
                f"{smoke:.1f} s, a fresh-interpreter serving check the seed has no counterpart for)")
    with_stack = "" if stack is None else (f"; counting its start-up ({stack:.0f} s, once per machine) too: "
                                           f"{data['ratio_incl_stack_up']:.1f}x")
    notes = (f"{len(train)} train / {len(test)} test rows (movie-disjoint), {epochs} epochs, batch {batch}, "
             f"max_length 128, mean pooling; adaptflow = `adaptflow retrain examples/rotten_tomatoes.yaml` in a "
             f"fresh process with an empty bucket, stack already up{with_stack}")
    return Row("vs_seed", "vs the seed loop", measured, ">= 20x faster at equal or better accuracy",
               ratio >= 20 and acc >= seed.accuracy, notes, data)


# ---------------------------------------------------------------------------------------------- incremental


def bench_incremental(ctx) -> Row:
    """Cold run on a lake of 10 daily partitions, then a retrain after an 11th partition (+10 % rows) landed in the
    same lake, on the same bucket: what a nightly job over a growing lake does."""
    df = pd.read_csv(_smoke_rt(ctx) if ctx.smoke else RT_CSV)
    rng = np.random.default_rng(7)
    new = np.zeros(len(df), dtype=bool)
    new[rng.choice(len(df), size=round(len(df) / 11), replace=False)] = True
    lake = ctx.work / "incr-lake"
    for day, part in enumerate(np.array_split(np.flatnonzero(~new), 10), start=1):
        (lake / f"dt=2026-11-{day:02d}").mkdir(parents=True, exist_ok=True)
        df.iloc[part].to_parquet(lake / f"dt=2026-11-{day:02d}" / "part-0.parquet", index=False)
    enc = _encoder(ctx)
    group = None if ctx.smoke else "movie_name"
    cfg = write_config(ctx.work / "incr.yaml", name="bench-incremental", train=lake, encoder=enc,
                       group_column=group, gate=_gate(ctx))
    log(f"incremental: cold run on {int((~new).sum())} rows in 10 partitions")
    cold = ctx.runner.retrain(cfg)
    (lake / "dt=2026-11-11").mkdir()
    df[new].to_parquet(lake / "dt=2026-11-11" / "part-0.parquet", index=False)  # the new day lands
    log(f"incremental: +{int(new.sum())} rows in an 11th partition, same bucket")
    incr = ctx.runner.retrain(cfg, bucket=cold.bucket)
    ctx.shared["incremental"] = incr  # the peer_incremental row compares the peer with this run
    e0, e1 = cold.summary["embeddings"], incr.summary["embeddings"]
    distinct_new = (e1["encoded"] + e1["cached"]) - (e0["encoded"] + e0["cached"])
    share = incr.wall_s / cold.wall_s
    exact = e1["encoded"] == distinct_new
    data = {"rows_base": int((~new).sum()), "rows_added": int(new.sum()), "cold": {"wall_s": cold.wall_s,
            "summary": cold.summary}, "incremental": {"wall_s": incr.wall_s, "summary": incr.summary},
            "encoded": e1["encoded"], "cached": e1["cached"], "new_distinct_texts": distinct_new, "wall_share": share,
            "gate_rows_compared": incr.summary.get("gate", {}).get("rows_compared"),
            "gate_rows_excluded": incr.summary.get("gate", {}).get("rows_excluded")}
    embed0, embed1 = cold.summary["seconds"].get("embed", 0.0), incr.summary["seconds"].get("embed", 0.0)
    data["embed_share"] = embed1 / max(embed0, 1e-9)
    measured = (f"+{int(new.sum())} rows: encoded {e1['encoded']} (new distinct texts {distinct_new}), cached "
                f"{e1['cached']}; {fmt_s(incr.wall_s)} vs cold {fmt_s(cold.wall_s)} = **{100 * share:.0f}%** "
                f"(embed stage {embed1:.1f} s vs {embed0:.1f} s = {100 * data['embed_share']:.0f}%); gate compared "
                f"{data['gate_rows_compared']} rows, excluded {data['gate_rows_excluded']} the champion trained on")
    return Row("incremental", "incremental (+10% rows, a new partition)", measured, "encoded == new rows; wall <= 25% of cold",
               exact and share <= 0.25, "each run a fresh `adaptflow retrain` process; stage seconds in the JSON",
               data)


# ---------------------------------------------------------------------------------------------- overhead


def bench_overhead(ctx) -> Row:
    """Fixed cost per run: 100 rows, warm stack, fresh bucket each time; median of 3 after one warm-up."""
    path = ctx.work / "rt100.csv"
    pd.read_csv(RT_CSV).groupby("label", group_keys=False).head(50).to_csv(path, index=False)
    cfg = write_config(ctx.work / "overhead.yaml", name="bench-overhead", train=path, encoder=_encoder(ctx), gate=_gate(ctx))
    n = 1 if ctx.smoke else 3
    if not ctx.smoke:
        log("overhead: warm-up run")
        ctx.runner.retrain(cfg)
    runs = []
    for i in range(n):
        runs.append(ctx.runner.retrain(cfg))
        log(f"overhead: run {i + 1}/{n}: {runs[-1].wall_s:.1f}s")
    walls = [r.wall_s for r in runs]
    med = sorted(runs, key=lambda r: r.wall_s)[len(runs) // 2]
    stages = med.summary.get("seconds", {})
    in_stages = sum(v for v in stages.values() if isinstance(v, (int, float)))
    imports = [import_floor_s() for _ in range(n)]
    floor = statistics.median(imports)
    cpu = [r.cpu_s for r in runs if r.cpu_s is not None]
    data = {"walls": walls, "median_s": statistics.median(walls), "cpu_s": cpu, "stages": stages, "stages_sum_s": in_stages,
            "outside_stages_s": med.wall_s - in_stages, "peak_rss_mb": med.peak_rss_mb, "import_floor_s": imports,
            "beyond_imports_s": statistics.median(walls) - floor}
    top = ", ".join(f"{k} {v:.1f}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1])[:4])
    measured = (f"median **{fmt_s(statistics.median(walls))}** per run (min {fmt_s(min(walls))}), of which "
                f"{floor:.1f} s is importing torch/transformers/Prefect/MLflow, **{data['beyond_imports_s']:.1f} s** "
                f"the rest; stages {in_stages:.1f} s (largest: {top})"
                + (f"; CPU {statistics.median(cpu):.1f} s a run, children included" if cpu else ""))
    return Row("overhead", "fixed overhead (100 rows)", measured, "<= 10 s per run, warm stack",
               statistics.median(walls) <= 10,
               "each run a fresh `adaptflow retrain` process and a fresh bucket; the import floor is a `python -c` "
               "that only imports what a run imports (first use inside a stage included), timed in the same run",
               data)


def bench_noop(ctx) -> Row:
    """A night without new data: the whole `adaptflow retrain --json` process on data, config and encoder the latest
    version was trained on (warm stack, same bucket); median of 3 after the run that registers the version."""
    data = _smoke_rt(ctx) if ctx.smoke else RT_CSV
    cfg = write_config(ctx.work / "noop.yaml", name="bench-noop", train=data, encoder=_encoder(ctx), gate=_gate(ctx))
    bucket = f"bench-noop-{uuid.uuid4().hex[:8]}"
    first = ctx.runner.retrain(cfg, bucket=bucket, force=False)
    log(f"noop: first run {first.wall_s:.1f}s (registered: {first.summary.get('registered')})")
    runs = []
    for i in range(1 if ctx.smoke else 3):
        runs.append(ctx.runner.retrain(cfg, bucket=bucket, force=False))
        log(f"noop: run {i + 1}: {runs[-1].wall_s:.1f}s")
        if runs[-1].summary.get("registered") is not False:
            raise RuntimeError(f"an unchanged run registered version {runs[-1].summary.get('version')}")
    walls = [r.wall_s for r in runs]
    median = statistics.median(walls)
    since = runs[-1].summary["unchanged_since"]
    data_out = {"walls": walls, "median_s": median, "first_run_s": first.wall_s, "unchanged_since": since,
                "check_s": runs[-1].summary.get("seconds", {}), "peak_rss_mb": runs[-1].peak_rss_mb}
    measured = (f"median **{fmt_s(median)}** per unchanged run (min {fmt_s(min(walls))}; the run that registered "
                f"version {since}: {fmt_s(first.wall_s)}); nothing registered, no alias moved")
    return Row("noop", "no-op run (nothing changed)", measured, "<= 5 s for the whole CLI process, warm stack",
               median <= 5,
               "each run a fresh `adaptflow retrain CONFIG --json` process (no --force) on the bundled rotten_tomatoes "
               "rows, data/config/encoder unchanged since the version it names; torch, Prefect and MLflow stay "
               "unimported (tests/test_changes.py)", data_out)


IMPORTS = ("import flows.retrain, mlflow.pyfunc, matplotlib.pyplot; "
           "from transformers import AutoModel, AutoTokenizer, BertModel")


def import_floor_s() -> float:
    """Seconds a fresh interpreter takes only to import what a retrain process imports."""
    import subprocess
    import sys
    import time

    from benchmarks.common import REPO

    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS], cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------- memory


def synthetic_repeat(src: pd.DataFrame, times: int, text_column: str = "text") -> pd.DataFrame:
    """``times`` copies of ``src``; copy k > 0 gets the suffix `` #k`` on every text, so no text repeats (the
    per-row cache must encode all of them) and lengths grow by ~2 tokens at most."""
    parts = [src]
    for k in range(1, times):
        part = src.copy()
        part[text_column] = part[text_column].astype(str) + f" #{k}"
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def bench_memory(ctx) -> Row:
    """Peak RSS of a retrain process on tweets (37k rows) and on a 10x synthetic repetition of it."""
    if ctx.smoke:  # one child process: proves the measurement runs (a second size would double the smoke time)
        src = pd.read_csv(_smoke_rt(ctx))[["text", "label"]]
        real, probe, times = _encoder(ctx), None, 1
    else:
        if not TWEETS.is_file():
            return Row("memory", "memory (peak RSS)", f"skipped: {TWEETS} not found", "<= 2.5 GB and flat", None,
                       "set ADAPTFLOW_TWEETS to tweets.parquet (the shared data set) to run this row")
        src = pd.read_parquet(TWEETS)[["text", "label"]]
        real, probe, times = MINILM, str(build_probe_encoder(ctx.work / "probe-encoder")), 10
    one = ctx.work / "mem-1x.parquet"
    src.to_parquet(one, index=False)
    plan = [("1x", one, real, len(src))]
    if probe:
        many = ctx.work / f"mem-{times}x.parquet"
        synthetic_repeat(src, times).to_parquet(many, index=False)
        plan += [("1x_probe", one, probe, len(src)), (f"{times}x_probe", many, probe, len(src) * times)]
    head = {"epochs": 20}  # enough to reach the head's steady memory; the time is not what is measured here
    runs = {}
    for label, data, enc, n in plan:
        # one model name per run: a retrain of a name with a champion also re-scores that champion (encoding the
        # test rows with its encoder), which is the gate's cost, not this dataset size's
        cfg = write_config(ctx.work / f"mem-{label}.yaml", name=f"bench-memory-{label}-{uuid.uuid4().hex[:6]}", train=data, encoder=enc, head=head,
                           gate=_gate(ctx))
        log(f"memory: {label} ({n} rows, encoder {enc})")
        runs[label] = ctx.runner.retrain(cfg, subprocess_=True)
        log(f"memory: {label}: peak RSS {runs[label].peak_rss_mb:.0f} MB (with children {runs[label].peak_rss_tree_mb:.0f} MB) "
            f"in {runs[label].wall_s:.0f}s")
    real_peak = runs["1x"].peak_rss_mb
    data = {"rows": len(src), "times": times, "peak_rss_mb": {k: r.peak_rss_mb for k, r in runs.items()},
            "peak_rss_with_children_mb": {k: r.peak_rss_tree_mb for k, r in runs.items()},
            "wall_s": {k: r.wall_s for k, r in runs.items()}, "encoders": {"real": real, "probe": probe},
            "summaries": {k: {"rows": r.summary.get("rows"), "embeddings": r.summary.get("embeddings"),
                              "seconds": r.summary.get("seconds")} for k, r in runs.items()}}
    if not probe:
        return Row("memory", "memory (peak RSS)", f"{len(src):,} rows: **{real_peak:,.0f} MB** (smoke: one size)",
                   "<= 2.5 GB; flat in dataset size (<= 1.25x at 10x)", None, "", data)
    p1, pn = runs["1x_probe"].peak_rss_mb, runs[f"{times}x_probe"].peak_rss_mb
    growth = pn / p1
    per_row_kb = (pn - p1) * 1024 / (len(src) * (times - 1))
    data.update(growth=growth, kb_per_extra_row=per_row_kb)
    measured = (f"{len(src):,} rows: **{real_peak:,.0f} MB**; {times}x ({len(src) * times:,} rows): "
                f"**{pn:,.0f} MB** vs {p1:,.0f} MB at 1x with the same encoder (x{growth:.2f}, "
                f"{per_row_kb:.2f} KB/extra row)")
    notes = (f"peak RSS (VmHWM) of the `adaptflow retrain` process itself; with the children it waits for (the gate's "
             f"serving check in a fresh interpreter) the largest is {max(r.peak_rss_tree_mb for r in runs.values()):,.0f} MB; "
             f"the {times}x rows use a 1-layer cut of "
             "MiniLM (same tokenizer and 384-d vectors, so tokens, vectors and frames are as large) to keep the run "
             f"short; copy k of each text gets the suffix ' #k'")
    return Row("memory", "memory (peak RSS)", measured, "<= 2.5 GB; flat in dataset size (<= 1.25x at 10x)",
               max(real_peak, pn) <= 2500 and growth <= 1.25, notes, data)
