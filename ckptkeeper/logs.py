"""Log output for the daemon: one readable line per event, or JSON lines for log shippers."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, TextIO

from ckptkeeper.colour import Palette
from ckptkeeper.render import reason_json

if TYPE_CHECKING:
    from ckptkeeper.model import Reason

LogFormat = Literal["text", "json"]


EVENT_KEYS = ("run", "checkpoint", "step", "action", "bytes", "reasons")


def event(
    action: str,
    run: str,
    checkpoint: str | None = None,
    step: int | None = None,
    size: int | None = None,
    reasons: Sequence[Reason] = (),
) -> dict[str, object]:
    """`extra=` for a log line about one checkpoint (or run): the fields `--log-format json` adds to it.
    `action` is the journal's word for an outcome (`delete`, `archive`, `slim`, `vanished`, `error`, ...) or
    what the plan decided (`kept`, `kept-weights-only`); `run` is its path below the root (`.` for the root)."""
    fields = {"run": run, "checkpoint": checkpoint, "step": step, "action": action, "bytes": size}
    return {"event": fields | {"reasons": [reason_json(r) for r in reasons]}}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "event", None)
        if isinstance(fields, dict):
            entry.update({k: fields[k] for k in EVENT_KEYS if k in fields})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


_ROLE_OF_ACTION = {
    "kept": "keep",
    "kept-weights-only": "weights-only",
    "delete": "delete",
    "would-delete": "delete",
    "archive": "archive",
    "would-archive": "archive",
    "slim": "weights-only",
    "would-slim": "weights-only",
    "error": "error",
}


class TextFormatter(logging.Formatter):
    """`2026-12-06 09:02:57 INFO    exp1/checkpoint-10 deleted: ...`; on a terminal the message is coloured by
    what happened to the checkpoint (kept, deleted, archived) or by its level (warnings, errors)."""

    def __init__(self, palette: Palette) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S")
        self.palette = palette

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = getattr(record, "event", None)
        role = _ROLE_OF_ACTION.get(str(fields.get("action")), "") if isinstance(fields, dict) else ""
        if record.levelno >= logging.WARNING:
            role = "error" if record.levelno >= logging.ERROR else "warning"
        if not role or not line.endswith(record.message):
            return line
        return line[: len(line) - len(record.message)] + self.palette.paint(record.message, role)


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
        handler.setFormatter(TextFormatter(Palette.for_stream(handler.stream)))
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
