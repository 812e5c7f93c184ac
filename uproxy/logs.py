"""structlog configuration, done once by the CLI.

Events are snake_case names with fields: `log.info("listener_started", service=..., port=...)`.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Literal, TextIO

import structlog

LogFormat = Literal["auto", "console", "json"]

# python-iptables points file descriptor 1 at a pipe while it works (in worker threads); every
# write to stdout holds this lock so that no log line is swallowed by that pipe.
STDOUT_LOCK = threading.RLock()


class _LockedPrintLogger(structlog.PrintLogger):
    def __init__(self, file: TextIO) -> None:
        super().__init__(file)
        self._out = file

    def msg(self, message: str) -> None:
        # One write per line: the worker processes share the main process's stdout, and a line
        # written in two pieces (print's text, then its newline) interleaves with theirs.
        with STDOUT_LOCK:
            self._out.write(message + "\n")
            self._out.flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _LockedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def emit(self, record: logging.LogRecord) -> None:
        with STDOUT_LOCK:
            super().emit(record)


def _locked_logger_factory(out: TextIO) -> Any:
    def factory(*_: Any) -> _LockedPrintLogger:
        return _LockedPrintLogger(out)

    return factory


def configure_logging(
    level: str = "info", fmt: LogFormat = "auto", stream: TextIO | None = None
) -> None:
    out = stream if stream is not None else sys.stdout
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=_locked_logger_factory(out),
        cache_logger_on_first_use=True,
    )
    # asyncio and friends log through the standard library; route their warnings the same way.
    handler = _LockedStreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
