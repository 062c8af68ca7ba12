"""How the CLI reports failures: one paragraph on stderr and a non-zero exit, never a bare traceback."""

from __future__ import annotations

import sys

import typer

# Exit codes: 2 = the input or configuration is wrong (fix it), 1 = a service or runtime fault (retry/check).
EXIT_BAD_INPUT, EXIT_FAULT = 2, 1


def fail(exc: BaseException | str, *, what: str = "adaptflow") -> "typer.Exit":
    """Print ``exc`` as one readable paragraph and return the Exit to raise."""
    message = str(exc).strip() or type(exc).__name__
    if isinstance(exc, BaseException) and not isinstance(exc, ValueError):
        message = f"{type(exc).__name__}: {message}"
    print(f"error: {what} failed:\n{message}", file=sys.stderr)
    return typer.Exit(EXIT_BAD_INPUT if isinstance(exc, (ValueError, str)) else EXIT_FAULT)
