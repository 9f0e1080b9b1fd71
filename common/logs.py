"""The `adl` logger: one line per event on stderr, `[adl HH:MM:SS] message`, at INFO and
above unless the CLI's --log-level says otherwise. Every part logs through a child of it,
`logging.getLogger("adl.<part>")` (adl.driver, adl.scheduler, adl.storage, ...), whose
records reach its handler; configure() installs that handler (the CLI, and run_job for a
job run in-process, call it). Records also propagate to the root logger, for whoever
collects them."""
from __future__ import annotations

import logging
import sys
import threading

logger = logging.getLogger("adl")
FORMAT = "[adl %(asctime)s] %(message)s"
DATE_FORMAT = "%H:%M:%S"
_lock = threading.Lock()
_handler: logging.Handler | None = None


class _Masked(logging.Formatter):
    """Registered secrets and key-like text never reach a log line (common/redact.py)."""

    def format(self, record: logging.LogRecord) -> str:
        from common.redact import redact
        return redact(super().format(record))


class _Stderr(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record (a redirected or captured stderr
    included), not as it was when the handler was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure(level: str | int | None = None) -> logging.Logger:
    """The logger with its stderr handler (installed once); level: a name such as "DEBUG"
    or "WARNING", None leaving it as it is (INFO at first)."""
    global _handler
    with _lock:
        if _handler is None:
            _handler = _Stderr()
            _handler.setFormatter(_Masked(FORMAT, DATE_FORMAT))
            logger.addHandler(_handler)
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.INFO)
        if level is not None:
            logger.setLevel(level.upper() if isinstance(level, str) else level)
    return logger
