"""Deleting trash entries off the main thread: the daemon's reaper (so that deleting 100 GB never delays it),
and `prune`'s deleters (so that it renames the next checkpoint out of its run while the last one is deleted)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from ckptkeeper.actions import Stopped, TrashEntry, delete_entry, finish_entry
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


# unlink and rmdir release the GIL, and on a disk each unlink waits more than it works (rm -rf: 0.03 s of CPU in
# 0.3 s), so more threads than cores overlap more of the waits: 199 Trainer-like checkpoints (2,587 unlinks) on this
# project's ext4 VM, loaded, medians of 4: 0.48 s on one thread, 0.38 s on 2, 0.24 s on 4, 0.17 s on 6 (tmpfs, where
# an unlink only works: 0.015 s on 2, 0.017 s on 4). Never more threads than entries (`Deleters.submit`).
DELETER_THREADS = 4
# An archive to another filesystem: the sources go while this thread copies the next checkpoints. On a disk each
# unlink waits for the journal more than it works (4 checkpoints of 1,000 files: 0.36 s wall for 0.09 s of CPU one
# after the other, 0.20 s on 2 threads, 0.14 s on 4), so more threads overlap more of the waits.
ARCHIVE_DELETER_THREADS = 4
IN_FLIGHT = 8  # entries handed over and not yet deleted, at most: each holds a descriptor of the trash


class Deleting:
    """One trash entry handed to `Deleters`; `done` is set once its deletion is over, with `error` what
    stopped it (None: the entry is gone). The deleter that takes it writes `error`, then sets `done`; the
    owner of the Deleters reads `error` only after `done` is set."""

    __slots__ = ("done", "entry", "error")

    def __init__(self, entry: TrashEntry) -> None:
        self.entry = entry
        self.done = threading.Event()
        self.error: Exception | None = None

    def wait(self) -> Exception | None:
        self.done.wait()
        return self.error


class Deleters:
    """Deletes the trash entries of one `prune` on a few threads (`ckptkeeper-deleter-N`) while the thread that
    made it (the command's, which owns this object and alone calls `submit` and `close`) re-checks and renames
    the next checkpoints. The threads share only `queue` (thread-safe, bounded: `submit` waits while IN_FLIGHT
    entries are pending) and `stopping` (an Event); each Deleting they take is theirs until its `done` is set.

    They are daemon threads: a process that dies mid-delete (SIGKILL, SIGTERM's default action) leaves the
    entry in the trash, out of every run directory, finished on the next start like any interrupted removal.
    `close(stop=True)` (Ctrl-C) makes them give up between two entries of the tree they are deleting."""

    def __init__(self, threads: int = DELETER_THREADS, in_flight: int = IN_FLIGHT) -> None:
        self.queue: queue.Queue[Deleting | None] = queue.Queue(maxsize=in_flight)
        self.stopping = threading.Event()
        self.count = threads
        # One more started with each entry until there are `count`: a prune that removes nothing makes none, one that
        # removes one checkpoint makes one.
        self.threads: list[threading.Thread] = []

    def submit(self, entry: TrashEntry) -> Deleting:
        """Take over a trash entry (and its descriptor); called by the owner only."""
        if len(self.threads) < self.count:
            name = f"ckptkeeper-deleter-{len(self.threads)}"
            thread = threading.Thread(target=self._run, name=name, daemon=True)
            self.threads.append(thread)  # first: a Ctrl-C inside start() must not leave a thread `close` never ends
            thread.start()
        deleting = Deleting(entry)
        self.queue.put(deleting)
        return deleting

    def close(self, stop: bool = False, timeout: float = 10.0) -> None:
        """Let the threads end once the queue is empty (or, with `stop`, at once: what they have not deleted
        stays in the trash), waiting at most `timeout` seconds for each."""
        if stop:
            self.stopping.set()
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            if thread.ident is not None:  # started (a Ctrl-C may come before `start` began it)
                thread.join(timeout)

    def _run(self) -> None:
        while (deleting := self.queue.get()) is not None:
            try:
                if self.stopping.is_set():
                    raise Stopped(f"stopped before deleting {deleting.entry.shown}; it is finished on the next start")
                delete_entry(deleting.entry, self.stopping.is_set)
            except Exception as e:  # an OSError, Stopped, or anything unforeseen: the owner reports it
                deleting.error = e
            finally:
                deleting.entry.close()
                deleting.done.set()
