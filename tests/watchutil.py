"""Helpers for the `ckptkeeper watch` tests: run the daemon as a real process, read its log, wait for
conditions with a deadline (never a fixed sleep), drive the simulated Trainer on a thread, and describe
what is on disk."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ckptkeeper.model import Action
from ckptkeeper.policy import Protections, plan_run
from ckptkeeper.rules import parse_rules
from ckptkeeper.scan import checkpoint_step, read_run
from ckptkeeper.simtrainer import SaveEvent, SimConfig, SimulatedTrainer

T = TypeVar("T")
POLL_SECONDS = 0.02


def wait_until(predicate: Callable[[], T], timeout: float, what: str | Callable[[], str] = "the condition") -> T:
    """Poll `predicate` every 20 ms until it returns something truthy (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g} s waiting for {detail}")
        time.sleep(POLL_SECONDS)


class Watch:
    """One `python -m ckptkeeper watch ROOT ARGS...` process; stderr (its log) goes to a file."""

    def __init__(
        self, root: Path, args: Sequence[str], log_path: Path, prefix: Sequence[str] = (), cwd: Path | None = None
    ) -> None:
        self.log_path = log_path
        self.out_path = log_path.with_suffix(".stdout")
        self.command = [*prefix, sys.executable, "-m", "ckptkeeper", "watch", str(root), *args]
        with open(log_path, "wb") as err, open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd)
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def lines(self) -> list[str]:
        return self.log().splitlines()

    def stdout(self) -> str:
        return self.out_path.read_text(encoding="utf-8", errors="replace")

    def describe(self) -> str:
        state = "running" if self.proc.poll() is None else f"exited with {self.proc.returncode}"
        return f"`{' '.join(self.command)}` ({state}); its log:\n{self.log()}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_log(self, text: str, timeout: float = 15.0, count: int = 1) -> str:
        """Wait until `text` occurs `count` times in the log; fail at once if the process ends first."""

        def seen() -> bool:
            found = self.log().count(text) >= count
            if not found and not self.alive():
                raise AssertionError(f"the watch ended before logging {text!r}: {self.describe()}")
            return found

        wait_until(seen, timeout, lambda: f"{text!r} (x{count}) in the log of {self.describe()}")
        return self.log()

    def wait_exit(self, timeout: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the watch did not exit within {timeout:g} s: {self.describe()}") from None

    def terminate(self, timeout: float = 15.0) -> tuple[int, float]:
        """SIGTERM; return the exit code and the seconds it took to exit."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.wait_exit(timeout)
        return code, time.monotonic() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


StartWatch = Callable[..., Watch]  # the `watch` fixture (conftest.py): start a daemon, killed at the end


class TrainerThread(threading.Thread):
    """SimulatedTrainer.train on a thread; `saves` records (step, time.time()) right after each save ends,
    i.e. once trainer_state.json is completely written."""

    def __init__(
        self,
        output_dir: Path,
        config: SimConfig,
        pace: float = 0.0,
        state_write_pause: float = 0.0,
        on_save: Callable[[SaveEvent], None] | None = None,
    ) -> None:
        super().__init__(name="simulated-trainer", daemon=True)
        self.trainer = SimulatedTrainer(output_dir, config)
        self.pace = pace
        self.state_write_pause = state_write_pause
        self.user_on_save = on_save
        self.saves: list[tuple[int, float]] = []
        # step -> when its trainer_state.json was last written, by the file's own times (what settle measures;
        # unlike `saves`, not delayed when this thread is scheduled late)
        self.state_written: dict[int, float] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.trainer.train(self.pace, self._saved, self.state_write_pause)
        except BaseException as e:
            self.error = e

    def _saved(self, event: SaveEvent) -> None:
        self.saves.append((event.step, time.time()))
        st = os.stat(event.path / "trainer_state.json")
        self.state_written[event.step] = max(st.st_mtime, st.st_ctime)
        if self.user_on_save is not None:
            self.user_on_save(event)

    def finish(self, timeout: float = 60.0) -> list[tuple[int, float]]:
        self.join(timeout)
        assert not self.is_alive(), f"the simulated trainer did not finish within {timeout:g} s"
        if self.error is not None:
            raise self.error
        return self.saves


def steps(run_dir: Path) -> list[int]:
    """The steps of the checkpoint directories directly in `run_dir` (none if it does not exist)."""
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    found = (checkpoint_step(n) for n in names if (run_dir / n).is_dir())
    return sorted(s for s in found if s is not None)


def manifest(top: Path) -> dict[str, int]:
    """Relative path -> size of every file below `top`; directories as -1."""
    found: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames:
            found[os.path.relpath(os.path.join(dirpath, n), top)] = -1
        for n in filenames:
            full = os.path.join(dirpath, n)
            found[os.path.relpath(full, top)] = os.lstat(full).st_size
    return found


def count_files(top: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(top))


def planned(run_dir: Path, keep: str, trainer_best: bool = True) -> tuple[set[int], set[int]]:
    """(kept, removed) steps of `run_dir` as it is on disk now, by the pure planner."""
    plan = plan_run(read_run(run_dir, run_dir), parse_rules(keep), Protections(trainer_best), Action.DELETE)
    assert plan.refusal is None, plan.refusal
    return {d.checkpoint.step for d in plan.kept}, {d.checkpoint.step for d in plan.removed}


def journal(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / "journal.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def journal_time(entry: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(entry["time"]).timestamp()
