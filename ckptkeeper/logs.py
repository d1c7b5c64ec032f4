"""Log output for the daemon: one readable line per event, or JSON lines for log shippers."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _WatchdogNoise(logging.Filter):
    """Two harmless races inside watchdog (7.x) that must not look like failures:
    - "InotifyEmitter.queue_events() called when the thread is inactive", logged at ERROR when an emitter
      is stopped between two reads of its own loop (every shutdown or watcher restart);
    - a RuntimeWarning "Callback with id ... already exists for watch" when a directory moved in (a
      checkpoint renamed into a run-local trash) is walked for watches it already has."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name.startswith("watchdog"):
            return not message.startswith("InotifyEmitter.queue_events() called when the thread is inactive")
        if record.name == "py.warnings":
            return not ("watchdog" in message and "already exists for watch" in message)
        return True


def configure_logging(fmt: LogFormat = "text", verbosity: int = 0, stream: TextIO | None = None) -> None:
    """verbosity: -1 quiet (warnings and errors), 0 normal, 1 debug. Logs go to stderr by default."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_WatchdogNoise())
    logger = logging.getLogger("ckptkeeper")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    # watchdog's own warnings (an inotify queue overflow) go to the same place.
    watchdog_logger = logging.getLogger("watchdog")
    watchdog_logger.handlers[:] = [handler]
    watchdog_logger.setLevel(logging.WARNING if verbosity < 1 else logging.INFO)
    watchdog_logger.propagate = False
    # Python warnings (raised by libraries on their threads) too, so --log-format json stays JSON lines.
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.handlers[:] = [handler]
    warnings_logger.propagate = False
