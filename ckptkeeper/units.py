"""Sizes and durations as people read and write them: the one wording of a byte count (decimal units, as
`--min-free 50G` means) and of a span of time (`90s`, `15m`, `1h30m`, `3d`)."""

from __future__ import annotations

import math
import re

_DURATION = re.compile(r"(?:([0-9]+(?:\.[0-9]+)?)([smhd]))+")
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")
DURATION_FORMS = "90s, 15m, 2h, 1h30m, 3d"


def count(n: int, noun: str) -> str:
    """`1 checkpoint`, `2 checkpoints`, `0 checkpoints` (`entry` makes `entries`)."""
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun[:-1]}ies" if noun.endswith("y") and noun[-2:-1] not in "aeiou" else f"{n} {noun}s"


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def parse_duration(text: str) -> float | None:
    """Seconds in `90s`, `15m`, `2h`, `1h30m`, `3d` (parts add up); None when `text` is not a duration."""
    value = text.strip()
    if not _DURATION.fullmatch(value):
        return None
    seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _PART.findall(value))
    return seconds if math.isfinite(seconds) else None


def parse_seconds(value: object) -> float | None:
    """A span of time given as a duration (`2h`) or a plain number of seconds (`3600`, as --settle takes)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if not _SECONDS.fullmatch(text):  # plain ASCII digits only: not `1_000`, `1e-300` or other scripts' digits
            return parse_duration(text)
        seconds = float(text)
    else:
        return None
    return seconds if math.isfinite(seconds) else None


def human_duration(seconds: float) -> str:
    """`45s`, `12m`, `3h12m`, `2d3h`: the two largest units, rounded down."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    first = next((i for i, (n, _) in enumerate(parts) if n), len(parts) - 1)
    return "".join(f"{n}{unit}" for n, unit in parts[first : first + 2] if n) or "0s"
