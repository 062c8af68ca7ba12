"""Peak memory and time of one gate decision (``adaptflow.gate.decide``) on many test rows.

Each case runs in a fresh Python process, so its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) is its own:
``peak`` is the whole process at its highest, ``decide`` how far that peak rose during the call (which includes
the first import of scipy.stats/scipy.sparse that ``decide`` triggers; "again" times a second call, imports
done). Synthetic predictions: a champion right on
~78 % of the rows, a challenger on ~80 %, errors spread over the other classes.

    python -m benchmarks.gate_memory                 # 200k rows, 3 classes, 1000 resamples, both metrics
    python -m benchmarks.gate_memory --rows 20000    # any size
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(metric: str, rows: int, classes: int, n_bootstrap: int) -> dict:
    """Build the predictions, then time one ``decide`` and read the peak RSS around it."""
    import numpy as np

    from adaptflow.gate import GateRules, decide

    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, rows)

    def predictions(share_right: float):
        wrong = rng.random(rows) > share_right
        return np.where(wrong, (y + rng.integers(1, classes, rows)) % classes, y)

    challenger, champion = predictions(0.80), predictions(0.78)
    rules = GateRules(metric=metric, test="both", n_bootstrap=n_bootstrap, max_class_drop=1.0)
    labels = [f"c{i}" for i in range(classes)]
    before = _peak_mb()
    start = time.perf_counter()
    verdict = decide(y, challenger, champion, labels, rules)
    seconds = time.perf_counter() - start
    peak = _peak_mb()
    start = time.perf_counter()
    decide(y, challenger, champion, labels, rules)  # again, with scipy already imported
    warm = time.perf_counter() - start
    return {"metric": metric, "rows": rows, "classes": classes, "n_bootstrap": n_bootstrap, "seconds": seconds,
            "seconds_warm": warm, "peak_rss_mb": peak, "decide_rss_mb": peak - before, "decision": verdict.decision}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--metric", choices=["accuracy", "macro_f1"], action="append")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.metric[0], args.rows, args.classes, args.bootstrap)))
        return []
    results = []
    for metric in args.metric or ["accuracy", "macro_f1"]:
        done = subprocess.run([sys.executable, "-m", "benchmarks.gate_memory", "--child", "--metric", metric,
                               "--rows", str(args.rows), "--classes", str(args.classes),
                               "--bootstrap", str(args.bootstrap)], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1])
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"gate decide  metric={r['metric']:<8} rows={r['rows']} classes={r['classes']} "
              f"n_bootstrap={r['n_bootstrap']}  {r['seconds']:.3f} s (again: {r['seconds_warm']:.3f} s)  peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(+{r['decide_rss_mb']:.0f} MB during decide)  -> {r['decision']}", flush=True)
    return results


if __name__ == "__main__":
    main()
