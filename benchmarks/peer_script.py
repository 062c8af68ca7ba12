"""The plain-script peer: what a user writes instead of adaptflow, run cold as its own process.

    python -m benchmarks.peer_script TRAIN.parquet TEST.parquet ENCODER_DIR

Encode every train and test text once (sentence-transformers ``encode()``, which sorts by length, fp32 on the
CPU; where sentence-transformers is not installed, the same done by hand: length-sorted batches of 32 through
the transformers model, masked mean pooling, L2-normalised), then scikit-learn ``LogisticRegression`` on the
vectors, accuracy on the test rows. Prints one JSON line: accuracy, seconds per step, which encoder path ran.
"""

from __future__ import annotations

import json
import sys
import time

STARTED = time.perf_counter()


def encode_plain(model_dir: str, texts: list[str], batch_size: int = 32, max_length: int = 128):
    """Length-sorted fp32 batches, masked mean pooling, L2-normalised (what all-MiniLM-L6-v2's card does)."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    order = np.argsort([len(t) for t in texts])
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            states = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=1)
            out[idx] = pooled.numpy()
    return out


def main(argv: list[str]) -> dict:
    train_path, test_path, model_dir = argv[:3]
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        SentenceTransformer = None
    imported = time.perf_counter()
    train, test = pd.read_parquet(train_path), pd.read_parquet(test_path)
    texts = list(train["text"].astype(str)) + list(test["text"].astype(str))
    if SentenceTransformer is not None:
        model = SentenceTransformer(model_dir, device="cpu")
        model.max_seq_length = 128
        vectors = model.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False)
        path = "sentence-transformers encode()"
    else:
        vectors = encode_plain(model_dir, texts)
        path = "plain fp32 loop"
    encoded = time.perf_counter()
    clf = LogisticRegression(max_iter=1000).fit(vectors[: len(train)], train["label"].astype(str))
    accuracy = float((clf.predict(vectors[len(train):]) == test["label"].astype(str).to_numpy()).mean())
    done = time.perf_counter()
    return {"accuracy": accuracy, "encoder_path": path, "rows_encoded": len(texts), "train_rows": len(train),
            "test_rows": len(test), "import_s": round(imported - STARTED, 2), "encode_s": round(encoded - imported, 2),
            "fit_and_score_s": round(done - encoded, 2), "in_process_s": round(done - STARTED, 2)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
