"""The serving check: a registered model must load and predict in a fresh interpreter before it is promoted.

Most of that check's time is the fresh interpreter importing its libraries (MLflow, pandas, torch,
transformers), not loading the model. :func:`prestart` starts the interpreter early, while the embeddings,
the head and the version are made, with only those libraries imported; it then waits for one request on stdin (a
model URI and a few texts), loads that model with ``mlflow.pyfunc.load_model`` and predicts. The model does not
exist in it before the request arrives, so it checks exactly what a cold process checks: the logged code, the
artifacts, the spec and the encoder snapshot load and predict. :func:`check` uses the pre-started interpreter
when there is one for the same key and environment, else starts one then.

An interpreter nobody asks exits by itself: at end of input (its parent gone) or after ``IDLE_S`` seconds.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading

log = logging.getLogger("adaptflow")

IDLE_S = 1800  # a pre-started interpreter that gets no request within this exits
CHILD = r"""
import json, select, sys
import mlflow.pyfunc, pandas as pd  # the libraries the model needs, imported ahead; the model itself comes later
import torch
from transformers import AutoModel, AutoTokenizer
from adaptflow.serving import rows_as_predictions
ready, _, _ = select.select([sys.stdin], [], [], float(sys.argv[1]))
line = sys.stdin.readline() if ready else ""
if not line.strip():
    sys.exit(0)  # nobody asked: the run failed or chose not to promote
request = json.loads(line)
m = mlflow.pyfunc.load_model(request["model_uri"])
print(json.dumps(rows_as_predictions(m.predict(pd.DataFrame({"text": request["texts"]})))))
"""


class ServingCheck:
    """One fresh interpreter, waiting for the model it is to load."""

    def __init__(self, env: dict[str, str]):
        self.env = dict(env)
        self.stderr = tempfile.TemporaryFile()  # a file, not a pipe: its import warnings can never block it
        self.process = subprocess.Popen([sys.executable, "-c", CHILD, str(IDLE_S)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                        env={**os.environ, **self.env})

    def alive(self) -> bool:
        return self.process.poll() is None

    def run(self, model_uri: str, texts: list[str], timeout: float) -> list[dict]:
        """Load ``model_uri`` and predict ``texts`` in this interpreter; RuntimeError with its stderr if it cannot."""
        try:
            out, _ = self.process.communicate(json.dumps({"model_uri": model_uri, "texts": texts}) + "\n",
                                              timeout=timeout)
        except subprocess.TimeoutExpired:
            self.discard()
            raise RuntimeError(f"serving smoke test of {model_uri} did not finish in {timeout:.0f} s") from None
        self.stderr.seek(0)
        err = self.stderr.read().decode(errors="replace")
        self.stderr.close()
        lines = out.strip().splitlines()
        if self.process.returncode != 0 or not lines:
            raise RuntimeError(f"serving smoke test of {model_uri} failed in a fresh process:\n{err[-2000:]}")
        return json.loads(lines[-1])

    def discard(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait()
        if not self.stderr.closed:
            self.stderr.close()


_WAITING: dict[str, ServingCheck] = {}
_LOCK = threading.Lock()


def prestart(key: str, env: dict[str, str] | None = None) -> None:
    """Start a fresh interpreter for the check :func:`check` will run under ``key`` (a model name); ``env`` as the
    check will pass it (default: the settings' process env)."""
    if env is None:
        from adaptflow.settings import load_settings

        env = load_settings().process_env()
    with _LOCK:
        waiting = _WAITING.get(key)
        if waiting is not None and waiting.alive() and waiting.env == env:
            return
        if waiting is not None:
            waiting.discard()
        _WAITING[key] = ServingCheck(env)


def discard(key: str) -> None:
    """Stop the interpreter pre-started under ``key``, if any (the run will not promote)."""
    with _LOCK:
        waiting = _WAITING.pop(key, None)
    if waiting is not None:
        waiting.discard()


def check(model_uri: str, env: dict[str, str], texts: list[str], *, key: str | None = None,
          timeout: float = 300) -> list[dict]:
    """Load ``model_uri`` through mlflow.pyfunc in a fresh interpreter and predict ``texts``; raise if it cannot.

    Uses the interpreter pre-started under ``key`` when it is still waiting with the same ``env``."""
    with _LOCK:
        waiting = _WAITING.pop(key, None) if key is not None else None
    if waiting is not None and not (waiting.alive() and waiting.env == env):
        waiting.discard()
        waiting = None
    log.info("serving check of %s in a fresh interpreter (%s)", model_uri,
             "pre-started, libraries imported" if waiting else "started now")
    return (waiting or ServingCheck(env)).run(model_uri, texts, timeout)


@atexit.register
def _stop_waiting() -> None:
    for key in list(_WAITING):
        discard(key)
