"""The poller of `watch --poll` (observers._QuickPollingEmitter) first compares a plain map of the watched
entries and takes watchdog's snapshot only when it differs (issue #12: `--poll 5` over 5,000 checkpoints under
1 % of a core). It must report every change watchdog's own poller reports: the same paths, for the same
changes, on the same listdir. Real files, real watchdog observers, side by side."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS
from watchdog.utils.dirsnapshot import DirectorySnapshot

from ckptkeeper.observers import POLLED_EVENTS, _polled_lstat, _polling_listdir, _QuickPollingEmitter
from ckptkeeper.simtrainer import SimConfig, simulate_run

POLL = 0.2
SMALL = SimConfig(steps_per_epoch=10, epochs=1, save_steps=5, eval_steps=5)  # checkpoints 5, 10


class Paths(FileSystemEventHandler):
    """Every path an event names, relative to `top` (what the daemon's hints use)."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def on_any_event(self, event: FileSystemEvent) -> None:
        with self.lock:
            for raw in (event.src_path, getattr(event, "dest_path", "")):
                if raw:
                    self.seen.add(os.path.relpath(os.fsdecode(raw), self.top))

    def take(self) -> set[str]:
        with self.lock:
            seen, self.seen = self.seen, set()
        return seen


def observe(top: Path, make: Callable[[Path], BaseObserver]) -> tuple[BaseObserver, Paths]:
    handler = Paths(top)
    observer = make(top)
    observer.schedule(handler, os.fspath(top), recursive=True, event_filter=POLLED_EVENTS)
    observer.start()
    return observer, handler


def quick(top: Path) -> BaseObserver:
    emitter = partial(_QuickPollingEmitter, stat=_polled_lstat, listdir=_polling_listdir(top))
    return BaseObserver(emitter, timeout=POLL)  # type: ignore[arg-type]


def watchdogs(top: Path) -> BaseObserver:
    return PollingObserverVFS(_polled_lstat, _polling_listdir(top), polling_interval=POLL)


def changes(root: Path) -> Iterator[str]:
    """Changes of every kind the daemon hears of, one at a time; yields what each was."""
    run = root / "run"
    (run / "checkpoint-5" / "eval_results.json").write_text("{}")
    yield "a file made inside a checkpoint"
    (run / "checkpoint-5" / "eval_results.json").unlink()
    yield "a file removed inside a checkpoint"
    shutil.copytree(run / "checkpoint-10", run / "checkpoint-15")
    yield "a checkpoint made"
    os.rename(run / "checkpoint-5", run / "old-5")
    yield "a checkpoint renamed"
    shutil.rmtree(run / "old-5")
    yield "a directory removed"
    (root / "other").mkdir()
    yield "a run directory made"
    with open(run / "notes.txt", "w") as f:
        f.write("x" * 10)
    yield "a file written in a run directory"
    with open(run / "notes.txt", "a") as f:
        f.write("more")
    yield "the same file grown in place"


def test_the_quick_poller_reports_what_watchdogs_poller_reports(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for root in (ours, theirs):
        simulate_run(root / "run", SMALL)
    observers = [observe(ours, quick), observe(theirs, watchdogs)]
    try:
        time.sleep(3 * POLL)
        for ours_did, _ in zip(changes(ours), changes(theirs), strict=True):
            time.sleep(4 * POLL)
            seen = [handler.take() for _, handler in observers]
            assert seen[0] == seen[1] and seen[0], (ours_did, seen)
        time.sleep(4 * POLL)
        assert [handler.take() for _, handler in observers] == [set(), set()]  # idle: nothing
    finally:
        for observer, _ in observers:
            observer.stop()
            observer.join()


def test_an_idle_tree_takes_no_snapshot_of_watchdogs(tmp_path: Path) -> None:
    """What makes it cheap: while nothing changes, watchdog's snapshot is never taken after the first."""
    simulate_run(tmp_path / "run", SMALL)
    observer, handler = observe(tmp_path, quick)
    try:
        [emitter] = list(observer.emitters)
        assert isinstance(emitter, _QuickPollingEmitter)
        taken: list[float] = []
        original = emitter._take_snapshot

        def counted() -> DirectorySnapshot:
            taken.append(time.monotonic())
            return original()

        emitter._take_snapshot = counted
        time.sleep(6 * POLL)
        assert taken == []
        (tmp_path / "run" / "checkpoint-5" / "eval_results.json").write_text("{}")
        time.sleep(3 * POLL)
        assert len(taken) >= 1 and handler.take() == {"run/checkpoint-5"}
    finally:
        observer.stop()
        observer.join()
