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


class _WatchdogStopNoise(logging.Filter):
    """watchdog (7.x) logs "InotifyEmitter.queue_events() called when the thread is inactive" at ERROR when an
    emitter is stopped between two reads of its own loop: a race inside watchdog on every stop (shutdown,
    watcher restart), after which the thread simply ends. Nothing is lost; it must not look like a failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name.startswith("watchdog")
            and record.getMessage().startswith("InotifyEmitter.queue_events() called when the thread is inactive")
        )


def configure_logging(fmt: LogFormat = "text", verbosity: int = 0, stream: TextIO | None = None) -> None:
    """verbosity: -1 quiet (warnings and errors), 0 normal, 1 debug. Logs go to stderr by default."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_WatchdogStopNoise())
    logger = logging.getLogger("ckptkeeper")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    # watchdog's own warnings (an inotify queue overflow) go to the same place.
    watchdog_logger = logging.getLogger("watchdog")
    watchdog_logger.handlers[:] = [handler]
    watchdog_logger.setLevel(logging.WARNING if verbosity < 1 else logging.INFO)
    watchdog_logger.propagate = False
