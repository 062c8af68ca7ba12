"""How the CLI reports failures: one paragraph on stderr and a non-zero exit, never a bare traceback."""

from __future__ import annotations

import sys
import textwrap

import typer

# Exit codes: 2 = the input or configuration is wrong (fix it), 1 = a service or runtime fault (retry/check).
EXIT_BAD_INPUT, EXIT_FAULT = 2, 1


def fail(exc: BaseException | str, *, what: str = "adaptflow") -> "typer.Exit":
    """Print ``exc`` as one readable paragraph and return the Exit to raise."""
    message = str(exc).strip() or type(exc).__name__
    if isinstance(exc, BaseException) and not isinstance(exc, ValueError):
        message = f"{type(exc).__name__}: {message}"
    code = EXIT_BAD_INPUT if isinstance(exc, ValueError) else EXIT_FAULT
    body = "\n".join(textwrap.fill(line, 110, subsequent_indent="  ") if len(line) > 110 else line
                     for line in message.splitlines())
    print(f"error: {what} failed:\n{body}", file=sys.stderr)
    return typer.Exit(code)
