"""Quality bar: the default head vs scikit-learn LogisticRegression on the same embeddings and the demo split.

Both sides are computed in this one run (the reference is never a constant): the demo config's movie-disjoint
split of examples/data/rotten_tomatoes.csv, all-MiniLM-L6-v2 embeddings (mean pooling, the dtype `auto` picks),
L2-normalised for LogisticRegression as the head normalises its own input. Exit 1 when the head is more than
0.5 point of accuracy below the reference.

    python -m benchmarks.quality [--rows N]   # N > 0 subsamples (smoke runs)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=0, help="subsample this many rows (0 = all)")
    args = parser.parse_args()

    from sklearn.linear_model import LogisticRegression

    from adaptflow.config import load_config
    from adaptflow.data import prepare_frame, read_table, split_frame
    from adaptflow.embed import encode, resolve_dtype, tokenize_texts
    from adaptflow.encoders import load_encoder, resolve_encoder
    from adaptflow.heads import HeadConfig, fit_head, predict_proba

    config = load_config("examples/rotten_tomatoes.yaml")
    d = config.data
    frame = prepare_frame(read_table(d.train), text_column=d.text_column, label_column=d.label_column,
                          group_column=d.group_column, source=d.train)
    if args.rows:
        frame = frame.sample(n=min(args.rows, len(frame)), random_state=0)
    train, test = split_frame(frame, test_size=d.test_size, seed=config.seed, source=d.train)
    labels = sorted(set(train["label"]))
    tokenizer, model = load_encoder(resolve_encoder(config.encoder.ref))
    dtype = resolve_dtype(config.encoder.dtype, "cpu")
    started = time.perf_counter()
    vectors = [encode(model, tokenize_texts(tokenizer, list(part["text"]), config.encoder.max_length),
                      pooling=config.encoder.pooling, dtype=dtype, progress=False).vectors for part in (train, test)]
    encode_s = time.perf_counter() - started
    y = [part["label"].map({label: i for i, label in enumerate(labels)}).to_numpy() for part in (train, test)]

    fit = fit_head(vectors[0], y[0], len(labels), HeadConfig(**config.head.head_kwargs(), seed=config.seed),
                   log=lambda *a: None)
    head_acc = float((predict_proba(fit.head, vectors[1]).argmax(axis=1) == y[1]).mean())
    unit = [v / np.linalg.norm(v, axis=1, keepdims=True) for v in vectors]
    reference = LogisticRegression(max_iter=2000).fit(unit[0], y[0])
    ref_acc = float((reference.predict(unit[1]) == y[1]).mean())
    result = {"rows": {"train": len(train), "test": len(test)}, "dtype": dtype, "encode_s": round(encode_s, 1),
              "head_accuracy": round(head_acc, 4), "sklearn_accuracy": round(ref_acc, 4),
              "difference_points": round(100 * (head_acc - ref_acc), 2), "bar": "head >= sklearn - 0.5 point"}
    print(json.dumps(result))
    return 0 if head_acc >= ref_acc - 0.005 else 1


if __name__ == "__main__":
    raise SystemExit(main())
