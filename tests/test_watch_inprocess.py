"""The watch Daemon run on a thread of the test process, with a real watchdog observer on a real directory:
for what a separate process cannot reach, such as the observer object itself.

Every test here runs under `no_thread_leaks` (as watchdog's own test suite does): once the test is over, every
thread it started, the daemon's observer, emitter, inotify reader and reaper threads included, has ended.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from watchdog.observers.api import BaseObserver
from watchutil import steps, wait_until

from ckptkeeper.policy import Policy
from ckptkeeper.rules import parse_rules
from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.state import StateDir
from ckptkeeper.watch import Daemon, WatchOptions

SMALL = SimConfig(steps_per_epoch=4, epochs=2, save_steps=2, eval_strategy="no", metric_for_best_model=None)


@pytest.fixture
def no_thread_leaks() -> Iterator[None]:
    """Fail the test if any thread it started is still running a few seconds after it ended."""
    before = set(threading.enumerate())
    yield

    def leaked() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in before and t.is_alive()]

    wait_until(lambda: not leaked(), 5, lambda: f"the test's threads to end; still running: {leaked()}")
    assert not [t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in list(self.records)]

    def has(self, text: str) -> bool:
        return any(text in m for m in self.messages())


@pytest.fixture
def daemon_log() -> Iterator[Collect]:
    """The "ckptkeeper" logger's records during the test (its handlers are restored afterwards)."""
    logger = logging.getLogger("ckptkeeper")
    saved = logger.handlers[:], logger.level, logger.propagate
    handler = Collect()
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield handler
    logger.handlers[:], level, logger.propagate = saved
    logger.setLevel(level)


class DaemonThread:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.result: int | None = None
        self.error: BaseException | None = None
        self.observers: list[BaseObserver] = []  # every observer the daemon has used, seen by `track`
        self.thread = threading.Thread(target=self._run, name="test-daemon")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.daemon.run()
        except BaseException as e:
            self.error = e

    def track(self) -> BaseObserver | None:
        observer = self.daemon.observer
        if observer is not None and observer not in self.observers:
            self.observers.append(observer)
        return observer

    def stop(self, timeout: float = 10.0) -> int | None:
        self.daemon.request_stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the daemon did not stop"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def run_daemon(no_thread_leaks: None, daemon_log: Collect) -> Iterator[Callable[[Daemon], DaemonThread]]:
    started: list[DaemonThread] = []

    def start(daemon: Daemon) -> DaemonThread:
        started.append(DaemonThread(daemon))
        return started[-1]

    yield start
    for handle in started:
        if handle.thread.is_alive():
            handle.stop()
        handle.track()
        for observer in handle.observers:  # every observer it used is stopped, with its emitters
            assert not observer.is_alive(), observer
            assert not [e for e in observer.emitters if e.is_alive()], observer.emitters


def make_daemon(root: Path, keep: str = "last:1", **options: float) -> Daemon:
    settings = {"settle": 0.3, "rescan_interval": 3600.0, **options}
    return Daemon(root, Policy(parse_rules(keep)), root / "_ckptkeeper", WatchOptions(**settings))


def test_a_dead_observer_is_detected_and_replaced_by_polling(
    tmp_path: Path, run_daemon: Callable[[Daemon], DaemonThread], daemon_log: Collect
) -> None:
    source = tmp_path / "source"
    simulate_run(source, SMALL)
    root = tmp_path / "outputs"
    run = root / "run"
    run.mkdir(parents=True)
    for step in (2, 4):
        shutil.copytree(source / f"checkpoint-{step}", run / f"checkpoint-{step}")
    daemon = make_daemon(root)
    handle = run_daemon(daemon)
    wait_until(lambda: steps(run) == [4], 10, lambda: f"checkpoint-2 removed: {daemon_log.messages()}")
    first = handle.track()
    assert first is not None and daemon.mode == "inotify"

    first.stop()  # the observer thread ends, as if it had died
    wait_until(lambda: daemon_log.has("the inotify file watcher stopped unexpectedly; restarting it (polling)"), 5)
    wait_until(lambda: daemon.mode == "polling" and handle.track() is not first, 5)
    replacement = daemon.observer
    assert replacement is not None and replacement.is_alive()
    assert not first.is_alive()

    def arrives(step: int) -> None:
        shutil.copytree(source / f"checkpoint-{step}", run / f"checkpoint-{step}")
        wait_until(lambda: steps(run) == [step], 10, lambda: f"only checkpoint-{step}: {daemon_log.messages()}")

    arrives(6)  # later checkpoints are still handled, through the polling watcher
    arrives(8)
    wait_until(lambda: daemon_log.has("run/checkpoint-6 deleted: freed "), 5)  # logged just after the rename
    assert handle.stop() == 0
    assert not [r for r in daemon_log.records if r.levelno >= logging.ERROR]


def test_stopping_ends_every_thread_and_frees_the_lock(
    tmp_path: Path, run_daemon: Callable[[Daemon], DaemonThread], daemon_log: Collect
) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "run", SMALL)
    daemon = make_daemon(root)
    handle = run_daemon(daemon)
    wait_until(lambda: steps(root / "run") == [8], 10, lambda: str(daemon_log.messages()))
    observer = handle.track()
    assert observer is not None and observer.is_alive()
    assert handle.stop() == 0
    assert not observer.is_alive()
    assert not daemon.reaper.thread.is_alive()
    state = StateDir(root / "_ckptkeeper")
    state.acquire_lock(root)  # free again (raises LockHeld otherwise)
    state.release_lock()


def test_stopping_while_waiting_for_a_missing_root(
    tmp_path: Path, run_daemon: Callable[[Daemon], DaemonThread], daemon_log: Collect
) -> None:
    root = tmp_path / "not-yet"
    handle = run_daemon(make_daemon(root))
    wait_until(lambda: daemon_log.has("does not exist yet; waiting for it to appear"), 5)
    assert handle.stop() == 0
    assert not root.exists()  # never created by the daemon


def test_a_periodic_rescan_of_an_unchanged_run_plans_nothing_again_and_a_change_is_planned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What makes a warm full rescan of 10,000 checkpoints cheap: a run whose trusted checkpoints are the very
    same as at its last pass, which had nothing to remove, is not planned again; any change to it is."""
    from ckptkeeper import policy as policy_module

    root = tmp_path / "outputs"
    simulate_run(root / "a", SMALL)
    simulate_run(root / "b", SMALL)
    daemon = Daemon(root, Policy(parse_rules("last:4")), root / "_ckptkeeper", WatchOptions(settle=0.0))
    planned: list[str] = []
    real_plan_run = policy_module.plan_run

    def counting_plan_run(run: Any, *args: Any) -> Any:
        planned.append(run.path)
        return real_plan_run(run, *args)

    monkeypatch.setattr(policy_module, "plan_run", counting_plan_run)
    daemon.reconcile_all()
    assert sorted(planned) == ["a", "b"]
    planned.clear()
    daemon.reconcile_all(trusting=True)
    assert planned == []  # nothing changed: nothing planned

    shutil.rmtree(root / "b" / "checkpoint-2")  # someone else removed one
    daemon.reconcile_all(trusting=True)
    assert planned == ["b"]
    planned.clear()
    daemon.reconcile_all()  # a thorough pass reads everything again and plans every run
    assert sorted(planned) == ["a", "b"]
    assert steps(root / "a") == [2, 4, 6, 8] and steps(root / "b") == [4, 6, 8]
