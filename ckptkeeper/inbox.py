"""The inbox: the only object the watch daemon shares with watchdog's threads.

Event handlers (`Hints`, on watchdog's threads) turn raw events into the run directories to rescan and
put them here; the daemon's main loop takes them out and waits here for the next ones. Handlers never
touch the disk and never delete: events are hints, the disk is the truth.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler

from ckptkeeper.scan import checkpoint_step, never_descended


@dataclass
class Pending:
    """What has been asked to be looked at since the main loop last looked."""

    runs: set[Path] = field(default_factory=set)
    subtrees: set[Path] = field(default_factory=set)
    full: bool = False
    trusting: bool = False  # a periodic full rescan: unchanged checkpoint directories are not walked
    metrics: bool = False  # something changed in a metric source below the root (an evaluation's results)

    def __bool__(self) -> bool:
        return self.full or self.metrics or bool(self.runs or self.subtrees)


class Inbox:
    """Pending work and the wake-up. Shared: `hint` and `request_full_rescan` run on watchdog's threads (and
    the signal handler's `wake`), `take` and `wait` on the main loop; `lock` guards `pending`, and nothing
    else is shared. `hint` is lexical and cheap: no I/O on watchdog's thread."""

    def __init__(self, root: Path, max_depth: int, excluded: Sequence[Path] = (), sources: Sequence[Path] = ()) -> None:
        self.lock = threading.Lock()
        self.pending = Pending()
        self._wake = threading.Event()
        self.root = root
        self.max_depth = max_depth
        self.excluded_below_root = _below(root, excluded)
        self.sources_below_root = _below(root, sources)  # lm-eval directories: never runs, but news for them

    def hint(self, path: Path) -> None:
        """Record which run a changed path belongs to (or, for a path above every run, which subtree)."""
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:
            return
        if any(parts[: len(x)] == x for x in self.sources_below_root):
            with self.lock:
                self.pending.metrics = True
            self._wake.set()
            return
        if any(parts[: len(x)] == x for x in self.excluded_below_root):
            return  # ckptkeeper's own (state directory, archive): by components, never by string prefix
        for index, part in enumerate(parts):
            if checkpoint_step(part) is not None:
                if index <= self.max_depth and not any(never_descended(p) for p in parts[:index]):
                    self._add(runs=[self.root.joinpath(*parts[:index])])
                return
            if never_descended(part):
                return
        # A deleted run directory: its parent sees it go.
        self._add(subtrees=[path], runs=[path.parent] if path != self.root else [])

    def _add(self, runs: Sequence[Path] = (), subtrees: Sequence[Path] = ()) -> None:
        with self.lock:
            self.pending.runs.update(runs)
            self.pending.subtrees.update(subtrees)
        self._wake.set()

    def request_full_rescan(self) -> None:
        with self.lock:
            self.pending.full = True
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def wait(self, timeout: float) -> bool:
        """Wait until woken or `timeout` passes; True (and cleared) when woken."""
        if self._wake.wait(max(timeout, 0.0)):
            self._wake.clear()
            return True
        return False

    def take(self) -> Pending:
        with self.lock:
            taken, self.pending = self.pending, Pending()
        return taken


def _below(root: Path, excluded: Sequence[Path]) -> tuple[tuple[str, ...], ...]:
    """The excluded paths that lie inside the root, as their components below it (lexical, once)."""
    top = Path(os.path.abspath(root))
    below = []
    for path in excluded:
        try:
            parts = Path(os.path.abspath(path)).relative_to(top).parts
        except ValueError:
            continue  # outside the root: no event's path is below it
        if parts:
            below.append(parts)
    return tuple(below)


class Hints(FileSystemEventHandler):
    """Turns raw events into hints for the inbox. Runs on watchdog's threads."""

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if raw:
                self.inbox.hint(Path(os.fsdecode(raw)))
