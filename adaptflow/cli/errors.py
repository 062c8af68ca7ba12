"""How the CLI reports failures: one paragraph on stderr and a non-zero exit, never a bare traceback."""

from __future__ import annotations

import logging
import sys

import typer

# Exit codes: 2 = the input or configuration is wrong (fix it), 1 = a service or runtime fault (retry/check).
EXIT_BAD_INPUT, EXIT_FAULT = 2, 1


def exit_code(exc: BaseException | str) -> int:
    """2 for bad input or configuration, 1 for a service or runtime fault.

    Bad input: a ValueError (DataError, ConfigError, EncoderError) or an S3 answer that will not change on a
    retry (a 4xx: no such bucket or key, access denied, bad credentials). A fault: anything else, including an
    S3 or MLflow server that is unreachable or answers 5xx.
    """
    if isinstance(exc, (ValueError, str)):
        return EXIT_BAD_INPUT
    from adaptflow.store import StoreError

    if isinstance(exc, StoreError) and not exc.transient:
        return EXIT_BAD_INPUT
    return EXIT_FAULT


def fail(exc: BaseException | str, *, what: str = "adaptflow") -> "typer.Exit":
    """Print ``exc`` as one readable paragraph and return the Exit to raise."""
    message = str(exc).strip() or type(exc).__name__
    if isinstance(exc, BaseException) and not isinstance(exc, ValueError):
        message = f"{type(exc).__name__}: {message}"
    print(f"error: {what} failed:\n{message}", file=sys.stderr)
    return typer.Exit(exit_code(exc))


class _NoTracebackFormatter(logging.Formatter):
    """Formats like the wrapped formatter, minus exception tracebacks and stack dumps."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info or record.exc_text or record.stack_info):
            return self.inner.format(record)
        # a copy: the same record still reaches other handlers (Prefect's API log keeps the traceback)
        plain = logging.makeLogRecord(record.__dict__)
        plain.exc_info = plain.exc_text = plain.stack_info = None
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            first = (str(error).strip().splitlines() or [""])[0]
            plain.msg, plain.args = f"{record.getMessage()} [{type(error).__name__}: {first}]", None
        return self.inner.format(plain)


def quiet_console_tracebacks() -> None:
    """Drop tracebacks from what Prefect prints on the console (its API log, and so the UI, keeps them).

    A failed task or flow makes Prefect log the exception with its traceback at ERROR; on a terminal that buries
    the one paragraph the CLI prints at the end. Call after Prefect has configured logging (importing a flow).
    """
    try:
        from prefect.logging.handlers import PrefectConsoleHandler
    except ImportError:  # pragma: no cover - prefect is a dependency
        return
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _NoTracebackFormatter):
                handler.setFormatter(_NoTracebackFormatter(handler.formatter))
