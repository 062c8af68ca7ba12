"""Command-line options that several commands share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adaptflow.stack_state import DEFAULT_STATE_DIR

__all__ = ["DEFAULT_STATE_DIR", "StateDir"]

# the local stack's state dir: `stack` commands run the services there, the others find them there
StateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir", envvar="ADAPTFLOW_STATE_DIR", help="The local stack's state dir (state, data and logs)."
    ),
]
