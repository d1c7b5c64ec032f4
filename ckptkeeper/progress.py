"""How an upload to an object store goes: bytes sent, rate and time left, said at an interval.

`UploadProgress` is told the bytes sent from the upload threads (thread-safe) and hands a line to `say` at most
every `interval` seconds: the watch daemon logs one every 10 s; `prune` on a terminal redraws a bar on stderr
(`TerminalBar`), and says nothing when its output is not a terminal. The clock is a parameter, for tests."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from ckptkeeper.units import human_bytes

Clock = Callable[[], float]
WATCH_INTERVAL = 10.0
BAR_INTERVAL = 0.2
BAR_WIDTH = 24


class UploadProgress:
    """Progress of one checkpoint's upload; `say(line)` is called at most once per `interval`."""

    def __init__(
        self,
        what: str,
        total: int,
        say: Callable[[str], None],
        interval: float,
        clock: Clock = time.monotonic,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self.what, self.total, self.say, self.interval, self.clock = what, total, say, interval, clock
        self.on_bytes = on_bytes
        self.sent = 0
        self.started = clock()
        self.last_said = self.started
        self._lock = threading.Lock()

    def __call__(self, sent: int) -> None:
        with self._lock:
            self.sent += sent
            now = self.clock()
            due = now - self.last_said >= self.interval
            if due:
                self.last_said = now
            line = self.line(now) if due else None
        if self.on_bytes is not None:
            self.on_bytes(sent)
        if line is not None:
            self.say(line)

    def line(self, now: float) -> str:
        """`exp1/checkpoint-20: 1.2 GB of 4.0 GB (30%), 85.0 MB/s, about 33 s left`."""
        elapsed = max(now - self.started, 1e-9)
        rate = self.sent / elapsed
        share = 100 * self.sent // self.total if self.total else 100
        left = (self.total - self.sent) / rate if rate > 0 else None
        when = f"about {_duration(left)} left" if left is not None else "time left unknown"
        return f"{self.what}: {human_bytes(self.sent)} of {human_bytes(self.total)} ({share}%), " + (
            f"{human_bytes(int(rate))}/s, {when}"
        )

    def close(self) -> None:
        """Nothing to say at the end: the outcome line says it."""


class TerminalBar(UploadProgress):
    """`prune` on a terminal: one line redrawn in place on stderr, cleared at the end."""

    def __init__(self, what: str, total: int, stream: TextIO = sys.stderr, clock: Clock = time.monotonic) -> None:
        super().__init__(what, total, self._draw, BAR_INTERVAL, clock)
        self.stream = stream
        self.drawn = False

    def _draw(self, line: str) -> None:
        done = BAR_WIDTH * self.sent // self.total if self.total else BAR_WIDTH
        self.stream.write(f"\r[{'#' * done}{'.' * (BAR_WIDTH - done)}] {line}\x1b[K")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"
