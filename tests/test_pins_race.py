"""The race of `pin` against removals (SPEC "Pins and leases"): a pin that succeeds guarantees the checkpoint stays;
a removal already under way makes `pin` fail. Real processes only: a `ckptkeeper prune` (or `watch`) removing
many checkpoints, some large (an archive copy to another filesystem takes time), and a pinning process
(tests/pin_worker.py, the code of `ckptkeeper pin`) pinning checkpoints at random moments of it; plus real
`ckptkeeper pin` commands, and a daemon SIGKILLed mid-removal, pinned, and started again.

Asserted every round: every checkpoint a pin succeeded on is still there afterwards, with every entry it had
right after the pin (a slim after the pin would take its resume state). And, over the rounds, that the race
was really run: pins refused because the removal was under way, and removals the engine skipped because a pin
came after the plan (`pinned since the plan was made`).

To see it fail, make `pins.guarded_removal` yield None without reading the pins or taking the marker (the
engine then acts on its plan alone): pins succeed on checkpoints that are then removed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ckptkeeper.simtrainer import SimConfig, simulate_run
from tests.watchutil import wait_until

WORKER = Path(__file__).with_name("pin_worker.py")
BIG = 24 << 20  # bytes of optimizer.pt in the large checkpoints: an archive copy of one takes tens of ms
SMALL_FILES = 120  # extra files in every checkpoint: a recheck, a copy and a delete each take a while
SEED = int(os.environ.get("CKPTKEEPER_PIN_RACE_SEED", "0")) or random.randrange(1 << 30)
# What the commands run with: this test's own CKPTKEEPER_* variables are not ckptkeeper settings (it refuses them).
ENV = {k: v for k, v in os.environ.items() if not k.startswith("CKPTKEEPER_")}


class Pinner:
    """tests/pin_worker.py, started once: pins checkpoints at the given moments, and says how each went."""

    def __init__(self) -> None:
        env = {**ENV, "PYTHONPATH": os.pathsep.join([str(WORKER.parent.parent), *sys.path])}
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "READY"

    def start(self, root: Path, state: Path, schedule: list[tuple[float, Path]]) -> None:
        pins = [[delay, str(path)] for delay, path in schedule]
        self._send({"root": str(root), "state": str(state), "pins": pins})

    def chase(self, root: Path, state: Path, stop: Path) -> None:
        """Pin each checkpoint the moment the journal says its removal started, until `stop` exists."""
        self._send({"root": str(root), "state": str(state), "chase": str(state / "journal.jsonl"), "stop": str(stop)})

    def _send(self, command: dict[str, object]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def results(self) -> list[str]:
        assert self.proc.stdout is not None
        lines = []
        while (line := self.proc.stdout.readline().rstrip("\n")) != "END":
            assert line, "the pin worker ended early"
            lines.append(line)
        return lines

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def pinner() -> Iterator[Pinner]:
    p = Pinner()
    yield p
    p.close()


@pytest.fixture(scope="module")
def chaser() -> Iterator[Pinner]:
    p = Pinner()
    yield p
    p.close()


@dataclass
class Tally:
    pinned: int = 0
    refused_removing: int = 0
    refused_gone: int = 0
    skipped_pinned: int = 0
    lost: list[str] = field(default_factory=list)

    def take(self, lines: list[str]) -> dict[Path, list[str]]:
        """The checkpoints pinned, with the entries each had; counts the rest."""
        pinned: dict[Path, list[str]] = {}
        for line in lines:
            kind, path, rest = line.split(" ", 2)
            if kind == "PINNED":
                self.pinned += 1
                pinned[Path(path)] = json.loads(rest)
            elif "removing it right now" in rest:
                self.refused_removing += 1
            else:
                self.refused_gone += 1
        return pinned

    def check(self, pinned: dict[Path, list[str]], when: str) -> None:
        for path, entries in pinned.items():
            try:
                now = set(os.listdir(path))
            except OSError as e:
                self.lost.append(f"{when}: {path} was pinned (pin succeeded) and is gone: {e}")
                continue
            missing = sorted(set(entries) - now)
            if missing:
                self.lost.append(f"{when}: {path} was pinned with {missing} in it, which are gone")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of 12 checkpoints with SMALL_FILES extra files each; 4 hold a large optimizer.pt."""
    top = tmp_path_factory.mktemp("pin-race-template") / "outputs"
    run = top / "exp1"
    simulate_run(run, SimConfig(steps_per_epoch=12, epochs=4, save_steps=4))
    rng = random.Random(1)
    for i, checkpoint in enumerate(checkpoints(top)):  # by step: the newest written is the highest step
        for n in range(SMALL_FILES):
            (checkpoint / f"extra_{n:03d}.bin").write_bytes(rng.randbytes(64))
        if i % 3 == 0:
            (checkpoint / "optimizer.pt").write_bytes(rng.randbytes(BIG))
    return top


def fresh_root(template: Path, where: Path) -> Path:
    """A copy of the template made of hard links (cheap); its checkpoints are new directories."""
    where.mkdir(parents=True)
    root = where / "outputs"
    subprocess.run(["cp", "-al", str(template), str(root)], check=True)
    return root


def checkpoints(root: Path) -> list[Path]:
    return sorted((root / "exp1").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def prune_args(root: Path, mode: str, archive: Path) -> list[str]:
    args = [sys.executable, "-m", "ckptkeeper", "prune", str(root), "--keep", "last:1"]
    if mode == "archive":
        args += ["--archive-to", str(archive)]
    if mode == "slim":
        args += ["--keep-weights", "every:8"]
    return args


def start_prune(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    """A prune, once it has printed its first line (the plan is made: its removals start now)."""
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=ENV
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline()


def acting_time(args: list[str]) -> float:
    """How long a prune takes from its plan to its exit."""
    proc, first = start_prune(args)
    started = time.monotonic()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{first}{out}{err}"
    return time.monotonic() - started


ROUNDS = {"delete": 6, "archive": 7, "slim": 5}


@pytest.mark.parametrize("mode", list(ROUNDS))
def test_a_pin_that_succeeds_is_never_followed_by_the_checkpoint_s_removal(
    mode: str, template: Path, pinner: Pinner, chaser: Pinner, tmp_path: Path, tmpfs: Path
) -> None:
    rng = random.Random(SEED + len(mode))
    tally = Tally()
    archive_top = Path(tmpfs) / f"pin-race-{os.getpid()}-{mode}"
    try:
        # The first prune, with no pin, measures how long one takes: pins are spread over that much time.
        calibration = fresh_root(template, tmp_path / "calibrate")
        window = acting_time(prune_args(calibration, mode, archive_top / "calibrate"))
        for n in range(ROUNDS[mode]):
            tally = _round(mode, n, template, (pinner, chaser), tmp_path, archive_top, window, rng, tally)
    finally:
        shutil.rmtree(archive_top, ignore_errors=True)
    assert not tally.lost, f"seed {SEED}: " + "\n".join(tally.lost)
    print(f"{mode}: {tally}")
    assert tally.pinned > 0 and tally.refused_gone > 0 and tally.skipped_pinned > 0, tally
    if mode != "delete":  # a delete leaves its name within microseconds of its start: the chaser finds it gone
        assert tally.refused_removing >= ROUNDS[mode], tally  # the chaser's pins, at least one a round


def _round(
    mode: str,
    n: int,
    template: Path,
    pinners: tuple[Pinner, Pinner],
    tmp_path: Path,
    archive_top: Path,
    window: float,
    rng: random.Random,
    tally: Tally,
) -> Tally:
    """One prune; pins at random moments of it (the pinner, two `ckptkeeper pin` commands), and a pin of each
    checkpoint the moment its removal starts (the chaser)."""
    pinner, chaser = pinners
    root = fresh_root(template, tmp_path / f"round-{n}")
    state, stop = root / "_ckptkeeper", tmp_path / f"stop-{n}"
    chosen = [c for c in checkpoints(root)[:-1] if rng.random() < 0.7]
    schedule = sorted((rng.uniform(0, window), c) for c in chosen)
    cli_pin = _cli_pin_later(chosen, rng)  # they take a while to start; most land in the prune's removals
    chaser.chase(root, state, stop)
    prune, _ = start_prune(prune_args(root, mode, archive_top / f"round-{n}"))
    pinner.start(root, state, schedule)
    out, err = prune.communicate(timeout=120)
    stop.touch()
    lines = pinner.results() + chaser.results() + _cli_results(cli_pin)
    assert prune.returncode == 0, f"{out}\n{err}"
    pinned = tally.take(lines)
    tally.skipped_pinned += out.count("pinned since the plan was made")
    tally.check(pinned, f"{mode} round {n}")
    shutil.rmtree(root.parent, ignore_errors=True)
    return tally


def _cli_pin_later(chosen: list[Path], rng: random.Random) -> list[tuple[Path, subprocess.Popen[str]]]:
    """Real `ckptkeeper pin` commands on two more checkpoints (they start as slowly as any command)."""
    started = []
    for c in rng.sample(chosen, min(2, len(chosen))):
        proc = subprocess.Popen(
            [sys.executable, "-m", "ckptkeeper", "pin", "--root", str(c.parent.parent), "--note", "cli", str(c)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=ENV,
        )
        started.append((c, proc))
    return started


def _cli_results(started: list[tuple[Path, subprocess.Popen[str]]]) -> list[str]:
    lines = []
    for c, proc in started:
        _, err = proc.communicate(timeout=60)
        if proc.returncode == 0:
            try:
                entries = sorted(os.listdir(c))
            except OSError as e:
                entries = [f"<gone: {e}>"]
            lines.append(f"PINNED {c} {json.dumps(entries)}")
        else:
            lines.append(f"REFUSED {c} {err.strip()}")
    return lines


# ------------------------------------------------------------------------------------- a daemon killed mid-removal
def journal_starts(state: Path) -> list[dict[str, object]]:
    try:
        text = (state / "journal.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [e for e in map(json.loads, text.splitlines()) if str(e.get("action", "")).startswith("start-")]


def watch_args(root: Path, archive: Path, *more: str) -> list[str]:
    return [
        sys.executable, "-m", "ckptkeeper", "watch", str(root), "--keep", "last:1", "--archive-to", str(archive),
        "--settle", "0", "--rescan-interval", "3600", *more,
    ]  # fmt: skip


def test_a_daemon_killed_mid_removal_then_a_pin_then_a_restart_loses_no_pinned_checkpoint(
    template: Path, pinner: Pinner, tmp_path: Path, tmpfs: Path
) -> None:
    rng = random.Random(SEED)
    tally = Tally()
    archive_top = Path(tmpfs) / f"pin-kill-{os.getpid()}"
    killed_mid = 0
    try:
        for n in range(4):
            killed_mid += _kill_round(n, template, pinner, tmp_path, archive_top / f"round-{n}", rng, tally)
    finally:
        shutil.rmtree(archive_top, ignore_errors=True)
    assert not tally.lost, f"seed {SEED}: " + "\n".join(tally.lost)
    print(f"killed mid-removal {killed_mid} of 4: {tally}")
    assert tally.pinned > 0, tally


def _kill_round(
    n: int, template: Path, pinner: Pinner, tmp_path: Path, archive: Path, rng: random.Random, tally: Tally
) -> int:
    """A watch archiving to another filesystem, SIGKILLed once some removals started; then every checkpoint
    left is pinned, and a new watch runs until done. Returns 1 when the kill landed mid-removal."""
    root = fresh_root(template, tmp_path / f"kill-{n}")
    state = root / "_ckptkeeper"
    daemon = subprocess.Popen(watch_args(root, archive), stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    started = rng.randrange(4)
    try:
        wait_until(lambda: len(journal_starts(state)) > started, 60, "removals to start")
        time.sleep(rng.uniform(0, 0.05))
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
    mid = _mid_removal(state)
    pinner.start(root, state, [(0.0, c) for c in checkpoints(root)])
    pinned = tally.take(pinner.results())
    tally.check(pinned, f"kill round {n}, after the kill")
    again = subprocess.run(
        watch_args(root, archive, "--exit-when-done"), capture_output=True, text=True, timeout=120, check=False, env=ENV
    )
    assert again.returncode == 0, again.stderr
    tally.check(pinned, f"kill round {n}, after the restart")
    shutil.rmtree(root.parent, ignore_errors=True)
    return mid


def _mid_removal(state: Path) -> int:
    """1 when the kill left a removal marker naming a checkpoint (its flock died with the daemon)."""
    try:
        return 1 if (state / "removing").read_text().strip() else 0
    except OSError:
        return 0
