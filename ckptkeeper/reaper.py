"""The reaper: deletes trash entries on its own thread, so that deleting 100 GB never delays the daemon."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from ckptkeeper.actions import TrashEntry, finish_entry
from ckptkeeper.state import StateDir

log = logging.getLogger("ckptkeeper")


class Reaper:
    """Deletes trash entries on its own thread (`ckptkeeper-reaper`), which owns everything here except
    `queue` (thread-safe) and `stuck` (guarded by its lock; the main loop reads it for --exit-when-done).

    An entry it cannot delete (a file made immutable, a permission taken away) is journaled and logged once,
    kept aside, and tried again at every full rescan (`retry_stuck`). What it has not finished at shutdown
    stays in the trash, out of every run directory, and is finished on the next start."""

    def __init__(self, state: StateDir | None = None, on_drained: Callable[[], None] | None = None) -> None:
        self.state = state
        self.on_drained = on_drained  # called when the queue runs empty (--exit-when-done waits for that)
        self.queue: queue.Queue[TrashEntry | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="ckptkeeper-reaper", daemon=True)
        self._stuck_lock = threading.Lock()
        self.stuck: dict[Path, tuple[TrashEntry, str]] = {}  # trash entry -> itself, why it could not be deleted
        self._stopping = False

    def start(self) -> None:
        self.thread.start()

    def dispose(self, trash_entry: TrashEntry) -> None:
        """Take over a trash entry (and its descriptor); called on the main thread."""
        self.queue.put(trash_entry)

    def busy(self) -> bool:
        """Entries handed over and not yet deleted (or given up on): their space is not free yet."""
        return self.queue.unfinished_tasks > 0

    def retry_stuck(self) -> None:
        with self._stuck_lock:
            entries = [entry for entry, _ in self.stuck.values()]
        for entry in entries:
            self.dispose(entry)

    def _run(self) -> None:
        while (entry := self.queue.get()) is not None:
            try:
                self._delete(entry)
            finally:
                self.queue.task_done()
            if self.on_drained is not None and self.queue.unfinished_tasks == 0:
                self.on_drained()

    def _delete(self, entry: TrashEntry) -> None:
        problems: list[str] = []
        finished = finish_entry(entry, problems)
        with self._stuck_lock:
            held = self.stuck.pop(entry.shown, None)
            before = held[1] if held is not None else None
            if problems:
                self.stuck[entry.shown] = (entry, problems[0])
        if not problems:
            entry.close()
        if problems and before != problems[0]:
            log.error("could not finish deleting %s (retried at every full rescan)", problems[0])
            self._record({"action": "error", "entry": problems[0], "why": "could not finish a removal in the trash"})
        elif finished and before is not None:
            log.info("finished deleting %s on a retry", entry.shown)
            self._record({"action": "finish-trash", "entry": entry.name, "why": "deleted on a retry"})

    def _record(self, line: dict[str, str]) -> None:
        if self.state is not None:
            try:
                self.state.record(line)
            except OSError as e:
                log.error("cannot write the journal: %s", e.strerror or e)

    def stop(self, timeout: float) -> None:
        self.queue.put(None)  # counted as unfinished (the thread ends on it without marking it done)
        self._stopping = True
        self.thread.join(timeout)

    def left(self) -> int:
        """Trash entries handed over and not deleted yet (after a stop: left for the next start)."""
        return max(0, self.queue.unfinished_tasks - (1 if self._stopping else 0))
