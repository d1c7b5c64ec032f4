"""`ckptkeeper history`: the journal in human form. What went, when, why, and what it freed.

The journal (`journal.jsonl` in the state directory) has a line before every action (`start-delete`, ...) and one
after it (`delete`, `archive`, `slim`, `vanished`, `skipped`, `stopped`, `error`). Here each action becomes one
event: its outcome with the reasons written before it started, or `interrupted` where a crash left only the
start. Reading only: it works on a read-only root, and a last line cut short by a crash (or any line that is not
a JSON object) is passed over and counted, never an error.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptkeeper.model import root_name
from ckptkeeper.render import run_name
from ckptkeeper.units import DURATION_FORMS, count, human_bytes, parse_duration

OUTCOMES = {
    "delete": "deleted",
    "archive": "archived",
    "slim": "made weights only",
    "vanished": "vanished",
    "skipped": "skipped",
    "stopped": "stopped",
    "error": "FAILED",
}
REMOVED = {"delete", "archive"}
FREES = {"delete", "archive", "slim"}
INTERRUPTED = "interrupted"  # a start line with no outcome: finished or undone at the next start


class HistoryError(ValueError):
    """A bad --since value; the message says the valid forms."""


@dataclass(frozen=True)
class Event:
    """One action on one checkpoint, as the journal tells it."""

    time: dt.datetime
    run: str
    checkpoint: str
    what: str  # an OUTCOMES key, or INTERRUPTED
    bytes: int
    why: str
    detail: str


@dataclass(frozen=True)
class Journal:
    events: tuple[Event, ...]
    unreadable: int  # lines passed over: cut short by a crash, or not an action of ckptkeeper's


def parse_since(text: str, now: dt.datetime) -> dt.datetime:
    """`2h`, `90m`, `1h30m`, `3d` before `now`; or a date or time (`2026-12-01`, `2026-12-01T08:00`, local)."""
    value = text.strip()
    seconds = parse_duration(value)
    if seconds is not None:
        try:
            return now - dt.timedelta(seconds=seconds)
        except OverflowError:
            return dt.datetime.min.replace(tzinfo=dt.UTC)  # further back than any journal
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise HistoryError(
            f"invalid --since {text!r}: expected a duration ({DURATION_FORMS}) or a date or time "
            "(2026-12-01, 2026-12-01T08:00)"
        ) from None
    return when if when.tzinfo is not None else when.astimezone()


def read_journal(path: Path) -> Journal:
    """Every event of the journal at `path` (opened without following a link), oldest first."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        lines = f.read().decode("utf-8", "replace").splitlines()
    records, unreadable = [], 0
    for line in lines:
        record = _record(line)
        if record is None:
            unreadable += line.strip() != ""
        else:
            records.append(record)
    return Journal(tuple(_events(records)), unreadable)


def _record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("action"), str):
        return None
    when = _time(record.get("time"))
    if when is None:
        return None
    record["time"] = when
    return record


def _time(value: object) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _events(records: Iterable[dict[str, Any]]) -> list[Event]:
    """Pair each outcome with the start before it (its reasons); a start left alone is an interruption."""
    started: dict[tuple[str, str], dict[str, Any]] = {}
    events = []
    for r in records:
        action, key = r["action"], (str(r.get("run", "")), str(r.get("checkpoint", "")))
        if action.startswith("start-"):
            if key in started:
                events.append(_event(started[key], INTERRUPTED))
            started[key] = r
        elif action in OUTCOMES and r.get("checkpoint") is not None:
            start = started.pop(key, None)
            events.append(_event(r, action, start))
    events += [_event(r, INTERRUPTED) for r in started.values()]
    return sorted(events, key=lambda e: e.time)


def _event(r: dict[str, Any], what: str, start: dict[str, Any] | None = None) -> Event:
    why = r.get("why") or (start or {}).get("why") or ""
    size = r.get("bytes") if what in FREES else 0
    return Event(
        r["time"],
        str(r.get("run", "")),
        str(r.get("checkpoint", "")),
        what,
        size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else 0,
        str(why),
        str(r.get("detail") or ""),
    )


def select(events: Sequence[Event], run: str | None, since: dt.datetime | None, root: str = ".") -> list[Event]:
    """The events of `run` (as the journal names it, or as a person does: the root's own run by `root`, its
    name, which `root_name` makes `.` where a nested run could have it too)."""
    wanted = None if run is None else {"."} if run == root else {run}
    return [e for e in events if (wanted is None or e.run in wanted) and (since is None or e.time >= since)]


def freed(e: Event) -> int:
    """What the event freed: an archive on the same filesystem (one rename) moved its bytes, freed none."""
    moved = e.what == "archive" and e.detail.startswith(("moved to ", "renamed to "))
    return e.bytes if e.what in FREES and not moved else 0


# ---- words ---------------------------------------------------------------------------------------------------
def what_text(e: Event) -> str:
    if e.what == INTERRUPTED:
        return "interrupted (finished or undone at the next start)"
    text = OUTCOMES[e.what]
    return f"{text} ({e.detail})" if e.detail and e.what in ("archive", "error", "skipped", "stopped") else text


def _local(when: dt.datetime) -> str:
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def history_text(root: Path, journal_path: Path, journal: Journal, events: Sequence[Event]) -> str:
    lines = [f"History of {root} (journal {journal_path})"]
    if journal.unreadable:
        verb = "was" if journal.unreadable == 1 else "were"
        lines.append(f"({count(journal.unreadable, 'line')} of the journal could not be read and {verb} passed over)")
    if not events:
        return "\n".join([*lines, "", "Nothing happened in that time." if journal.events else "Nothing yet."])
    header = ["WHEN", "RUN", "CHECKPOINT", "WHAT", "FREED", "WHY"]
    name = root_name(root.resolve())
    rows = [header] + [
        [_local(e.time), run_name(e.run, name), e.checkpoint, what_text(e), _freed_text(e), e.why] for e in events
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines.append("")
    lines += ["  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
    lines += ["", "Totals:", *totals_lines(events, name)]
    return "\n".join(lines)


def _freed_text(e: Event) -> str:
    return human_bytes(freed(e)) if freed(e) else "-"


def _totals(events: Sequence[Event]) -> dict[str, int]:
    return {
        "removed": sum(e.what in REMOVED for e in events),
        "deleted": sum(e.what == "delete" for e in events),
        "archived": sum(e.what == "archive" for e in events),
        "made_weights_only": sum(e.what == "slim" for e in events),
        "failed": sum(e.what == "error" for e in events),
        "bytes_freed": sum(freed(e) for e in events),
    }


def _total_text(t: dict[str, int]) -> str:
    parts = [f"{count(t['removed'], 'checkpoint')} removed"]
    if t["archived"]:
        parts[0] += f" ({t['deleted']} deleted, {t['archived']} archived)"
    if t["made_weights_only"]:
        parts.append(f"{t['made_weights_only']} made weights only")
    if t["failed"]:
        parts.append(f"{t['failed']} failed")
    return ", ".join(parts) + f"; {human_bytes(t['bytes_freed'])} freed"


def totals_lines(events: Sequence[Event], root: str) -> list[str]:
    runs = sorted({e.run for e in events})
    lines = [f"  {run_name(run, root)}: {_total_text(_totals([e for e in events if e.run == run]))}" for run in runs]
    return [*lines, f"  all ({count(len(runs), 'run')}): {_total_text(_totals(events))}"]


def history_json(root: Path, journal_path: Path, journal: Journal, events: Sequence[Event]) -> dict[str, Any]:
    return {
        "root": str(root),
        "journal": str(journal_path),
        "unreadable_lines": journal.unreadable,
        "events": [
            {
                "time": e.time.isoformat(timespec="milliseconds"),
                "run": e.run,
                "checkpoint": e.checkpoint,
                "action": e.what,
                "bytes_freed": freed(e),
                "why": e.why,
                "detail": e.detail,
            }
            for e in events
        ],
        "totals": {run: _totals([e for e in events if e.run == run]) for run in sorted({e.run for e in events})},
        "total": _totals(events),
    }
