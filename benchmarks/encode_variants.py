"""What else might speed up the CPU encode, each measured against the library default in the same process.

    python -m benchmarks.encode_variants [--rows 2000] [--only sdpa_vs_eager,compile,int8]

Each variant runs right after a baseline encode of the same rows (the library defaults: length-sorted,
token-budgeted, bf16 where the CPU has it, one worker per core) and reports its speed as a ratio to that
baseline, so a shared machine's load cancels out; variants that change numbers also report the cosine of
their vectors to the baseline's. Results go to stdout as a markdown table (benchmarks/RESULTS.md keeps the
latest). Not part of ``make bench``: these are the experiments behind the defaults, not targets.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from benchmarks.common import RT_CSV, log, minilm_path

VARIANTS = ("sdpa_vs_eager", "compile", "int8", "fp32_threads")


def _cosine(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    c = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(c.mean()), float(c.min())


def _timed(model, ids, **kw):
    from adaptflow.embed import encode

    t = time.perf_counter()
    r = encode(model, ids, progress=False, **kw)
    return r, time.perf_counter() - t


def run(rows: int, only: list[str]) -> list[dict]:
    import pandas as pd
    from transformers import AutoModel, AutoTokenizer

    from adaptflow.embed import resolve_dtype, tokenize_ragged

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    texts = pd.read_csv(RT_CSV)["text"].drop_duplicates().head(rows).tolist()
    ids = tokenize_ragged(tok, texts, 128)
    dtype = resolve_dtype("auto", "cpu")
    _timed(model, ids[:256], dtype=dtype)  # warm-up (bf16 copy, allocator)
    out = []

    def compare(name: str, variant, note: str = "", **kw):
        base, tb = _timed(model, ids, dtype=dtype)
        res, tv = variant()
        cos = _cosine(base.vectors, res.vectors)
        row = {"variant": name, "ratio": tb / tv, "baseline_tok_s": base.tokens / tb, "variant_tok_s": res.tokens / tv,
               "cosine_mean": cos[0], "cosine_min": cos[1], "note": note, **kw}
        log(f"{name}: {row['ratio']:.2f}x the default ({row['variant_tok_s']:.0f} vs {row['baseline_tok_s']:.0f} tok/s), "
            f"cosine min {cos[1]:.5f}")
        out.append(row)

    if "sdpa_vs_eager" in only:  # transformers loads BERT with SDPA attention by default; eager is the old path
        eager = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
        compare("eager attention instead of SDPA", lambda: _timed(eager, ids, dtype=dtype))
    if "compile" in only:  # inductor, dynamic shapes (every batch has its own padded length)
        compiled = copy.deepcopy(model)
        compiled.forward = torch.compile(compiled.forward, dynamic=True)
        t = time.perf_counter()
        _timed(compiled, ids[:64], dtype="fp32")
        compile_s = time.perf_counter() - t
        compare("torch.compile (inductor, dynamic, fp32)", lambda: _timed(compiled, ids, dtype="fp32"),
                note=f"compile {compile_s:.0f} s not counted; the default runs {dtype}", compile_s=compile_s)
    if "int8" in only:  # dynamic int8 Linear weights, fp32 activations: faster, but it changes the vectors
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        compare("int8 dynamic quantisation (Linear)", lambda: _timed(q, ids, dtype="fp32"))
        if len(texts) >= 1000:  # the accuracy check: the default head on each side's vectors, demo split
            out[-1]["accuracy_points"] = _accuracy_delta(model, q, tok, dtype)
            out[-1]["note"] = f"head accuracy {out[-1]['accuracy_points']:+.2f} pt vs the default (demo split, 3 seeds)"
    if "fp32_threads" in only:  # one forward over all cores instead of one single-threaded worker per core
        compare("one multi-threaded forward (workers=1)", lambda: _timed(model, ids, dtype=dtype, workers=1))
    return out


def _accuracy_delta(model, quantized, tok, dtype: str) -> float:
    """Accuracy points (int8 minus default) of the default head trained on each side's vectors of the demo split."""
    from adaptflow.embed import encode, tokenize_ragged
    from benchmarks.bench_encoder import _head_accuracy
    from benchmarks.common import pipeline_split

    train, test, labels = pipeline_split(RT_CSV, group_column="movie_name")
    texts = list(dict.fromkeys([*train.text, *test.text]))
    index = {t: i for i, t in enumerate(texts)}
    ids = tokenize_ragged(tok, texts, 128)
    acc = [_head_accuracy(encode(m, ids, dtype=dt, progress=False).vectors, train, test, labels, index, (13, 1, 2))
           for m, dt in ((model, dtype), (quantized, "fp32"))]
    log(f"int8: head accuracy {acc[1]:.4f} vs {acc[0]:.4f} with the default vectors")
    return 100 * (acc[1] - acc[0])


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | speed vs default | tokens/s (variant / default) | cosine to default (mean / min) | note |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ratio']:.2f}x | {r['variant_tok_s']:,.0f} / {r['baseline_tok_s']:,.0f} | "
                     f"{r['cosine_mean']:.5f} / {r['cosine_min']:.5f} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.encode_variants", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2000,
                   help="distinct rotten_tomatoes texts to time (default 2000; int8's accuracy check uses all, from 1000)")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    args = p.parse_args(argv)
    only = [v.strip() for v in args.only.split(",") if v.strip()] or list(VARIANTS)
    if set(only) - set(VARIANTS):
        p.error(f"unknown variant(s) {sorted(set(only) - set(VARIANTS))}; choose from {', '.join(VARIANTS)}")
    print(markdown(run(args.rows, only)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
