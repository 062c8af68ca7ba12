"""Run the standard benchmarks and write ``benchmarks/results/latest.{json,md}`` (``make bench``).

    python -m benchmarks.run                      # every row (~20 min on 2 cores); also updates RESULTS.md
    python -m benchmarks.run --smoke              # tiny data and a tiny encoder: proves every row runs (CI)
    python -m benchmarks.run --only vs_seed,encoder
    python -m benchmarks.run --only fanout --fanout-rows 20000   # a smaller fan-out than the issue's 200k
    python -m benchmarks.run --services .adaptflow   # use a running stack instead of starting a private one

Every comparison runs both sides in this one invocation and reports ratios: on a shared machine the absolute
times move with other people's load, the ratios much less.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from benchmarks.common import REPO, Row, Runner, Services, loadavg, log, machine_info, rmtree, services  # noqa: E402

HERE = Path(__file__).resolve().parent
ORDER = ["vs_seed", "incremental", "peer", "peer_incremental", "encoder", "overhead", "noop", "memory", "drift", "fanout",
         "gpu"]
NEEDS_SERVICES = {"vs_seed", "incremental", "peer", "peer_incremental", "overhead", "noop", "memory", "drift"}


@dataclass
class Context:
    smoke: bool
    work: Path
    seed_full: bool = False
    fanout_rows: int = 200_000
    svc: Services | None = None
    runner: Runner | None = None
    shared: dict = field(default_factory=dict)


def _bench(name: str):
    from benchmarks import bench_encoder, bench_peer, bench_pipeline, drift

    return {"peer": bench_peer.bench_peer, "peer_incremental": bench_peer.bench_peer_incremental,
            "fanout": bench_peer.bench_fanout, "vs_seed": bench_pipeline.bench_vs_seed, "incremental": bench_pipeline.bench_incremental,
            "overhead": bench_pipeline.bench_overhead, "memory": bench_pipeline.bench_memory,
            "noop": bench_pipeline.bench_noop, "drift": drift.bench_drift,
            "encoder": bench_encoder.bench_encoder, "gpu": bench_encoder.bench_gpu}[name]


def run(names: list[str], *, smoke: bool, services_mode: str, seed_full: bool = False,
        work: Path | None = None, fanout_rows: int = 200_000) -> dict:
    """Run the named benchmarks; returns the results document (also what ``latest.json`` holds)."""
    own_work = work is None
    work = Path(work or tempfile.mkdtemp(prefix="adaptflow-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(smoke=smoke, work=work, seed_full=seed_full, fanout_rows=fanout_rows)
    started, load0 = time.time(), loadavg()
    doc = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "smoke": smoke, "machine": machine_info(),
           "load_avg_start": load0, "rows": []}
    from contextlib import nullcontext

    need = NEEDS_SERVICES & set(names)
    try:
        with (services(services_mode, work) if need else nullcontext()) as svc:
            if svc is not None:
                ctx.svc, ctx.runner = svc, Runner(svc, inprocess=smoke)
                doc["services"] = {"kind": svc.kind, "stack_up_s": svc.up_s}
            for name in names:
                log(f"=== {name}")
                t = time.perf_counter()
                try:
                    row = _bench(name)(ctx)
                except Exception as exc:  # noqa: BLE001 — one failing row must not hide the others
                    traceback.print_exc()
                    row = Row(name, name, f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                              "", False, "see the log", {"error": traceback.format_exc()})
                row.seconds = round(time.perf_counter() - t, 1)
                log(f"=== {name}: {row.measured} ({row.seconds:.0f}s)")
                doc["rows"].append(asdict(row))
    finally:
        if own_work:
            rmtree(work)
    doc["seconds"] = round(time.time() - started, 1)
    doc["load_avg_end"] = loadavg()
    return doc


def markdown(doc: dict) -> str:
    m = doc["machine"]
    head = (f"Measured {doc['started']} on {m['cpu']} ({m['cores']} cores, "
            f"{'avx512_bf16/AMX' if m['cpu_bf16'] else 'no native bf16'}, {m['memory_gb']} GB), "
            f"GPU: {m['gpu'] or 'none'}; torch {m['torch']}; load average {doc['load_avg_start']} at the start, "
            f"{doc['load_avg_end']} at the end; total {doc['seconds'] / 60:.1f} min"
            f"{' — SMOKE MODE: tiny data and encoder, numbers mean nothing' if doc['smoke'] else ''}.")
    lines = [head, "", "| benchmark | measured | target | met |", "| --- | --- | --- | --- |"]
    for r in doc["rows"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[r["met"]]
        lines.append(f"| {r['title']} | {r['measured']} | {r['target']} | {met} |")
    lines.append("")
    for r in doc["rows"]:
        if r["notes"]:
            lines.append(f"- *{r['title']}*: {r['notes']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny data and encoder: proves every benchmark runs")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(ORDER)}")
    p.add_argument("--services", default="stack",
                   help="'stack' (default): start a private stack on free ports; 'env': use the services the "
                        "environment names; else the state dir of a running stack")
    p.add_argument("--seed-full", action="store_true",
                   help="run all 5 seed-loop epochs through the encoder (default: epoch 1, the rest charged its time)")
    p.add_argument("--fanout-rows", type=int, default=200_000,
                   help="rows the fan-out row embeds with 1 and then 2 workers (the issue sizes it at 200k)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where latest.json and latest.md go")
    p.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir, removed at the end)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or ORDER
    unknown = set(names) - set(ORDER)
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(ORDER)}")
    names = [n for n in ORDER if n in names]
    doc = run(names, smoke=args.smoke, services_mode=args.services, seed_full=args.seed_full, work=args.work,
              fanout_rows=args.fanout_rows)
    md = markdown(doc)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (args.out / "latest.md").write_text(md)
    if not args.smoke and names == ORDER and args.out.resolve() == (HERE / "results").resolve():
        record(md)
    print(md)
    return 1 if any(r["measured"].startswith("FAILED") for r in doc["rows"]) else 0


def record(md: str) -> None:
    """Put the table into the tracked RESULTS.md, between its markers (the prose around it stays)."""
    path = HERE / "RESULTS.md"
    begin, end = "<!-- latest:begin -->", "<!-- latest:end -->"
    text = path.read_text() if path.exists() else f"# Benchmark results\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        text += f"\n{begin}\n{end}\n"
    pre, rest = text.split(begin, 1)
    _, post = rest.split(end, 1)
    path.write_text(f"{pre}{begin}\n{md}{end}{post}")


if __name__ == "__main__":
    sys.exit(main())
