"""``adaptflow predict``: label texts with a registered model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from adaptflow.cli.errors import fail
from adaptflow.cli.options import DEFAULT_STATE_DIR, StateDir


def predict(
    model_uri: Annotated[str, typer.Argument(help="MLflow model URI, e.g. models:/NAME@champion or models:/NAME/3.")],
    text: Annotated[list[str], typer.Option("--text", "-t", help="A text to classify (repeatable).")] = [],
    input_file: Annotated[Optional[Path], typer.Option("--input", "-i", help="A file with one text per line.")] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Print one JSON line per text: {"text", "label", "probabilities"} (a multi-label model: "labels", a list)."""
    from adaptflow.settings import load_settings

    try:
        texts = list(text)
        if input_file is not None:
            texts += [line for line in input_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise ValueError("nothing to classify: pass --text TEXT (repeatable) or --input FILE")
        os.environ.update(load_settings(state_dir).process_env())
        import mlflow.pyfunc
        import pandas as pd

        from adaptflow.serving import rows_as_predictions

        model = mlflow.pyfunc.load_model(model_uri)
        predictions = rows_as_predictions(model.predict(pd.DataFrame({"text": texts})))
    except Exception as exc:  # noqa: BLE001
        raise fail(exc, what=f"predict with {model_uri}") from None
    for t, p in zip(texts, predictions):
        print(json.dumps({"text": t, **p}))
