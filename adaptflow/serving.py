"""The shipped model: frozen encoder (by ref + digest) + trained head, as an MLflow pyfunc.

The model's artifacts hold the head (safetensors) and a small JSON spec naming the encoder reference and
its digest; ``load_context`` resolves the encoder through adaptflow.encoders and refuses a snapshot whose
digest differs from the one the head was trained on (a silently different encoder would give garbage).
A ``head.kind: lora`` model also ships its adapter (safetensors, MBs), merged into the encoder at load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

# Packages the model needs at inference; pinned to what trained it. Passing them explicitly spares MLflow's
# requirement inference (5-7 s per log_model).
SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas", "mlflow", "boto3", "peft")


@dataclass(frozen=True)
class ModelSpec:
    """What the pyfunc needs besides the head weights to turn text into probabilities."""

    encoder_ref: str
    encoder_digest: str
    max_length: int
    pooling: str
    dtype: str
    labels: list[str]
    head_sha256: str | None = None  # recorded at registration; a head file changed afterwards is refused
    task: str = "multiclass"  # multilabel: sigmoid head with per-label thresholds (adaptflow.multilabel)
    adapter_sha256: str | None = None  # a LoRA adapter shipped as the artifact ``adapter``, checked alike

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        return cls(**json.loads(text))


def pip_requirements() -> list[str]:
    """Pinned requirements of the serving environment (local version tags such as +cpu dropped)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in SERVING_PACKAGES]


def probability_column(label: str) -> str:
    """Output column holding the probability of ``label``."""
    return f"proba_{label}"


class HeadClassifier(mlflow.pyfunc.PythonModel):
    """pyfunc: DataFrame with a ``text`` column → ``label`` and one ``proba_<label>`` column per class.

    A multi-label model (``spec.task == "multilabel"``) returns ``labels`` instead: per row the list of labels
    whose sigmoid probability reaches that label's tuned threshold (possibly empty), and ``proba_<label>`` per
    label (independent probabilities, not summing to 1).
    """

    def load_context(self, context) -> None:
        from adaptflow.embed import resolve_dtype
        from adaptflow.encoders import load_encoder, resolve_expected
        from adaptflow.heads import load_head
        from adaptflow.store import sha256_file

        self.spec = ModelSpec.from_json(Path(context.artifacts["model_spec"]).read_text())
        if self.spec.head_sha256 and sha256_file(Path(context.artifacts["head"]))[0] != self.spec.head_sha256:
            raise ValueError(f"head {context.artifacts['head']} changed after registration (sha256 differs from "
                             f"the recorded {self.spec.head_sha256[:16]}…); re-register the model")
        self.head, self.labels = load_head(context.artifacts["head"])
        self.thresholds = None
        if self.spec.task == "multilabel":
            from adaptflow.multilabel import load_thresholds

            self.thresholds = load_thresholds(context.artifacts["head"])
            if self.thresholds is None:
                raise ValueError(f"model spec says multilabel but head {context.artifacts['head']} has no thresholds")
        store = None
        if self.spec.encoder_ref.startswith("s3://"):
            from adaptflow.settings import load_settings
            from adaptflow.store import ArtifactStore, parse_s3_uri

            settings = load_settings()
            store = ArtifactStore.from_settings(settings, bucket=parse_s3_uri(self.spec.encoder_ref)[0])
        # the snapshot the head was trained on, or a clear error naming both digests
        resolved = resolve_expected(self.spec.encoder_ref, self.spec.encoder_digest, store=store)
        self.tokenizer, self.encoder = load_encoder(resolved)
        if self.spec.adapter_sha256:  # head.kind lora: merge the adapter into (a copy of) the shared snapshot
            from adaptflow.adapters import merge_adapter

            adapter = Path(context.artifacts["adapter"])
            if sha256_file(adapter)[0] != self.spec.adapter_sha256:
                raise ValueError(f"adapter {adapter} changed after registration (sha256 differs from the recorded "
                                 f"{self.spec.adapter_sha256[:16]}…); re-register the model")
            self.encoder = merge_adapter(self.encoder, adapter)
        # bf16 only where the hardware has it natively; fp32 otherwise (same predictions to ~1e-4).
        self.dtype = resolve_dtype("auto", "cpu") if self.spec.dtype == "bf16" else self.spec.dtype

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from adaptflow.data import normalise_text
        from adaptflow.embed import encode, tokenize_texts
        from adaptflow.heads import predict_proba

        if isinstance(model_input, pd.DataFrame):
            if "text" not in model_input.columns:
                raise ValueError(f"input needs a 'text' column; got columns {list(model_input.columns)}")
            texts = model_input["text"]
        else:
            texts = pd.Series(list(model_input))
        texts = [normalise_text(t) or "" for t in texts.astype(str)]
        token_ids = tokenize_texts(self.tokenizer, texts, self.spec.max_length)
        vectors = encode(
            self.encoder, token_ids, pooling=self.spec.pooling, dtype=self.dtype, device="cpu", progress=False
        ).vectors
        if self.thresholds is not None:
            from adaptflow.multilabel import predicted_labels, predict_sigmoid

            proba = predict_sigmoid(self.head, vectors)
            out = pd.DataFrame({"labels": pd.Series(predicted_labels(proba, self.labels, self.thresholds),
                                                    dtype=object)})
        else:
            proba = predict_proba(self.head, vectors)
            out = pd.DataFrame({"label": np.asarray(self.labels, dtype=object)[proba.argmax(axis=1)]})
        for i, label in enumerate(self.labels):
            out[probability_column(label)] = proba[:, i].astype("float64")
        return out


def rows_as_predictions(frame: pd.DataFrame, labels: list[str] | None = None) -> list[dict]:
    """pyfunc output rows → ``{"label": ..., "probabilities": {label: p}}`` dicts (CLI and serving smoke tests);
    a multi-label model's → ``{"labels": [...], "probabilities": {label: p}}``."""
    labels = labels or [c.removeprefix("proba_") for c in frame.columns if c.startswith("proba_")]
    key = "labels" if "labels" in frame.columns else "label"
    return [
        {key: list(row[key]) if key == "labels" else row[key],
         "probabilities": {l: round(float(row[probability_column(l)]), 6) for l in labels}}
        for _, row in frame.iterrows()
    ]
