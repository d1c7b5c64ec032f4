"""Colour for a person at a terminal: what is kept, deleted and archived stands out at a glance.

None when the output is not a terminal (piped, a file, a log shipper), when `NO_COLOR` is set to a
non-empty value (no-color.org), or on a dumb terminal. Text is padded before it is painted, so columns stay aligned."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TextIO

# ANSI SGR codes by what the text says
_CODES = {
    "keep": "32",  # green
    "weights-only": "36",  # cyan
    "delete": "31",  # red
    "archive": "33",  # yellow
    "warning": "33",
    "error": "1;31",  # bold red
}


@dataclass(frozen=True)
class Palette:
    enabled: bool = False

    def paint(self, text: str, role: str) -> str:
        code = _CODES.get(role)
        if not self.enabled or code is None or not text:
            return text
        return f"\033[{code}m{text}\033[0m"

    @classmethod
    def for_stream(cls, stream: TextIO) -> Palette:
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError):  # closed or not a real stream
            tty = False
        return cls(tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb")


PLAIN = Palette()
