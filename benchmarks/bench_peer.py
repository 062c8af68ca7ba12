"""adaptflow against what a user would otherwise write, and the fan-out of the embed step (issue 13, section 4).

* ``peer``: the plain-script peer (``benchmarks/peer_script.py``: encode every text once, scikit-learn
  LogisticRegression, fresh process) vs ``adaptflow retrain`` cold (fresh process, empty bucket, a model name
  with no champion yet: orchestration, registry, gate and its serving check included), same rows and split.
* ``peer_incremental``: after 10 % more rows land, the peer re-encodes everything (its run on all rows), adaptflow
  encodes the new rows (the ``incremental`` row's second run).
* ``fanout``: ``benchmarks.fanout``: the same parts embedded by 1 vs 2 gpu-pool workers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

from benchmarks.common import REPO, RT_CONFIG, RT_CSV, Row, fmt_s, log, minilm_path, pipeline_split, write_config


def run_peer(ctx, csv, *, group_column: str | None, encoder_dir: str, tag: str) -> dict:
    """The peer script on the pipeline's own split of ``csv``, as a fresh process; wall time includes its imports."""
    train, test, _ = pipeline_split(csv, group_column=group_column)
    paths = {}
    for name, frame in (("train", train), ("test", test)):
        paths[name] = ctx.work / f"peer-{tag}-{name}.parquet"
        frame[["text", "label"]].to_parquet(paths[name], index=False)
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmarks.peer_script", str(paths["train"]), str(paths["test"]),
                           encoder_dir], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"peer script failed:\n{done.stderr[-2000:]}")
    return {"wall_s": wall, **json.loads(done.stdout.strip().splitlines()[-1])}


def _smoke_inputs(ctx):
    from benchmarks.bench_pipeline import _encoder, _gate, _smoke_rt

    csv, enc = _smoke_rt(ctx), _encoder(ctx)
    return csv, enc, write_config(ctx.work / "peer-smoke.yaml", name="bench-peer", train=csv, encoder=enc,
                                  gate=_gate(ctx))


def bench_peer(ctx) -> Row:
    """Peer script vs ``adaptflow retrain`` cold on rotten_tomatoes (7,889 rows, movie-disjoint split)."""
    if ctx.smoke:
        csv, enc, config = _smoke_inputs(ctx)
        group, encoder_dir = None, enc
    else:
        csv, config, group, encoder_dir = RT_CSV, RT_CONFIG, "movie_name", str(minilm_path())
    log("peer: the plain script, cold")
    peer = run_peer(ctx, csv, group_column=group, encoder_dir=encoder_dir, tag="all")
    ctx.shared["peer_all_rows"] = peer
    log(f"peer: {peer['wall_s']:.1f}s ({peer['encoder_path']}), accuracy {peer['accuracy']:.4f}; now adaptflow, cold")
    # a new model name: no champion, so the gate promotes and runs its serving check, as on a first real run
    run = ctx.runner.retrain(config, [f"name=bench-peer-{uuid.uuid4().hex[:6]}"])
    acc = run.summary["metrics"]["accuracy"]
    ratio = peer["wall_s"] / run.wall_s
    equal = acc >= peer["accuracy"] - 0.005
    data = {"peer": peer, "adaptflow": {"wall_s": run.wall_s, "accuracy": acc, "seconds": run.summary["seconds"],
                                        "decision": run.summary["decision"]}, "ratio": ratio}
    gate = run.summary["seconds"].get("gate", 0.0)
    measured = (f"peer {fmt_s(peer['wall_s'])} ({peer['encoder_path']}, {peer['rows_encoded']:,} texts, of which "
                f"imports {peer['import_s']:.1f} s, encode {peer['encode_s']:.1f} s), acc {peer['accuracy']:.4f}; "
                f"adaptflow {fmt_s(run.wall_s)} (gate {gate:.1f} s), acc {acc:.4f}; **{ratio:.2f}x**")
    notes = ("both cold and in a fresh process: the peer script (`benchmarks/peer_script.py`) encodes every train and "
             "test text once and fits scikit-learn LogisticRegression; adaptflow = `adaptflow retrain "
             "examples/rotten_tomatoes.yaml` with an empty bucket and a new model name (gate, serving check and "
             "promotion included), stack already up; same pipeline split; equal accuracy = within 0.5 point")
    return Row("peer", "vs a plain script (cold)", measured, ">= 2.5x faster at equal accuracy", ratio >= 2.5 and equal,
               notes, data)


def bench_peer_incremental(ctx) -> Row:
    """+10 % rows: the peer re-encodes all rows; adaptflow's incremental run (the ``incremental`` row's) encodes
    the new ones."""
    from benchmarks.bench_pipeline import bench_incremental

    if "incremental" not in ctx.shared:
        log("peer_incremental: running the incremental row first")
        bench_incremental(ctx)
    incr = ctx.shared["incremental"]
    peer = ctx.shared.get("peer_all_rows")
    reused = peer is not None
    if peer is None:
        if ctx.smoke:
            csv, enc, _ = _smoke_inputs(ctx)
            peer = run_peer(ctx, csv, group_column=None, encoder_dir=enc, tag="all")
        else:
            peer = run_peer(ctx, RT_CSV, group_column="movie_name", encoder_dir=str(minilm_path()), tag="all")
    ratio = peer["wall_s"] / incr.wall_s
    data = {"peer": peer, "peer_reused_from_peer_row": reused, "adaptflow_incremental_s": incr.wall_s,
            "adaptflow_encoded": incr.summary["embeddings"]["encoded"], "ratio": ratio}
    measured = (f"peer re-encodes all {peer['rows_encoded']:,} texts: {fmt_s(peer['wall_s'])}; adaptflow encodes "
                f"{incr.summary['embeddings']['encoded']:,} new: {fmt_s(incr.wall_s)}; **{ratio:.1f}x**")
    notes = ("the peer's +10 % run is its run on all rows (it has no cache: the same computation as the peer row's "
             f"run{', reused from there' if reused else ''}); adaptflow's is the `incremental` row's second run (an 11th "
             "partition with 1/11 of the rows lands in the lake, same bucket)")
    return Row("peer_incremental", "vs a plain script (+10% rows)", measured, ">= 5x faster", ratio >= 5, notes, data)


def bench_fanout(ctx) -> Row:
    """1 vs 2 gpu-pool workers (one CPU thread each) embedding the same two parts (``benchmarks.fanout``)."""
    from benchmarks import fanout

    rows, layers = (64, 1) if ctx.smoke else (ctx.fanout_rows, 1)
    result = fanout.run(rows, layers, work=ctx.work / "fanout")
    one, two = result["1_workers"], result["2_workers"]
    ceiling = result["machine_parallelism"]["ceiling"]
    measured = (f"{result['rows_encoded']:,} rows in 2 parts: 1 worker {fmt_s(one['wall_s'])} "
                f"({one['rows_per_s']:,.0f} rows/s), 2 workers {fmt_s(two['wall_s'])} ({two['rows_per_s']:,.0f} "
                f"rows/s): **{result['ratio']:.2f}x**; this machine gave a second single-threaded process "
                f"{ceiling:.2f}x at the time")
    notes = (f"{result['encoder']}, fp32, one thread per worker pinned to its own CPU; Prefect on "
             f"{result['prefect_backend']}; each worker count starts from a cold cache; the ratio is the parent's "
             "wait for both parts (submit to all cached); the ceiling is a pinned matmul in 1 vs 2 processes")
    return Row("fanout", f"fan-out: 1 vs 2 gpu-pool workers ({rows:,} rows)", measured, ">= 1.7x at 200k rows",
               result["ratio"] >= 1.7, notes, result)
