"""End to end: disk pressure (`--min-free`, `--keep-under-pressure`, issue #19) on small real filesystems.

Each test mounts a filesystem of its own (CI runs as root; skipped where mounting is not allowed): a tmpfs with a
size limit, or a loop-mounted ext4 image. What is expected is worked out here from the run's own records (the
saves in order, each eval's loss and epoch, the Trainer's best at each save), the rules, the documented release
order (milestones oldest first, then `last`, then `best`; protected never) and sizes measured on the filesystem:
never from ckptkeeper's planner.

- The simulated Trainer (ckptkeeper.simtrainer in its own process: this file is also its script, `python
  tests/test_e2e_pressure.py simtrain RUN RECORDS PACE`) writes ~1 MB checkpoints beside a real `ckptkeeper watch
  --keep best:1,last:3,epoch:all` on a 7.75 MiB tmpfs. With the keep rules alone the save the rules predict fails
  with ENOSPC. With `--min-free 1.3M --keep-under-pressure last:1` every save succeeds with the floor still free
  after it, the watch exits by itself, what is left is what the rules and the order predict, the log says when
  pressure began and each release (milestones, oldest first), and nothing protected was ever released.
- `prune --min-free 2M --keep-under-pressure last:1` as a trainer's low-disk hook on a nearly full tmpfs releases as
  few checkpoints as needed (3 of 4 candidates) in the documented order, which here differs from plain age (a `last`
  checkpoint goes before an older one `best:3` keeps), and says so in the documented lines; a second call finds no
  pressure and removes nothing.
- On ext4 with 20% of the blocks reserved, free space is what an unprivileged writer may use (f_bavail): the floor
  is short by f_bavail and met by f_bfree, and ckptkeeper reports and acts on f_bavail.
- The real Hugging Face Trainer (tests/e2e/train_hf.py, CPU, ~0.35 MB checkpoints) does the same as the simulated
  one on a 2.5 MiB tmpfs with `--min-free 450K` (~10-14 s each: most of it importing torch and transformers).

The expectation replays the rules after each save, as the watch applies them once a save is complete and settled
(it acts ~0.22 s after a save here; the saves come 0.6 s apart). The floor is larger than one checkpoint, so even a
watch that missed a save entirely would not make the next one fail.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cliutil import ckptkeeper
from e2eutil import TRAIN_SCRIPT, json_lines, require_training_stack
from watchutil import StartWatch, Watch, wait_until

from ckptkeeper.simtrainer import SaveEvent, SimConfig, SimulatedTrainer

HERE = Path(__file__).resolve()
MiB = 1 << 20
KEEP = "best:1,last:3,epoch:all"
LAST = 3  # the `last:3` of KEEP
PRESSURE_RULES = "last:1"  # only the newest: under pressure everything else --keep keeps may go
TIER = {"epoch": 1, "last": 2, "best": 3}  # the documented release order: milestones, then last, then best
SETTLE = "0.2"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")

# The simulated run: 16 saves of ~1.0 MB (5, 10, ..., 80), 8 epochs of 10 steps; its eval loss turns up after 60%
# of the run, so the Trainer's best (step 45) is an old checkpoint that only `best` and the protection keep.
SIM = SimConfig(
    steps_per_epoch=10,
    epochs=8,
    save_steps=5,
    eval_steps=5,
    optimizer_bytes=800_000,
    model_floats=50_000,
    overfit_after=0.6,
    seed=0,
)
SIM_FS = 7936 * 1024  # 7.75 MiB: the keep rules alone need 8 checkpoints at once, pressure leaves room for 5
SIM_FLOOR, SIM_FLOOR_BYTES = "1.3M", 1_300_000
SIM_PACE = 0.12  # s per step: a save every 0.6 s, time for the watch (settle 0.2 s) to act between two saves
HOOK_FLOOR, HOOK_FLOOR_BYTES = "2M", 2_000_000

# The real Trainer: 5 epochs of 26 steps, evaluate and save every 10 steps (13 saves of ~0.35 MB; best at step 40).
HF_ARGS = ("--epochs", "5", "--save-steps", "10", "--step-sleep", "0.06")
HF_FS = 2560 * 1024
HF_FLOOR, HF_FLOOR_BYTES = "450K", 450_000
HF_SECONDS = 240.0


# ==== the script side: the simulated Trainer's process ==========================================================


def _script_simtrain(argv: list[str]) -> int:
    """`simtrain RUN_DIR RECORDS PACE`: train SIM into RUN_DIR; after each save append to RECORDS its step, time,
    eval, the Trainer's best then (and whether its directory is there) and the free space right after it."""
    run_dir, records, pace = Path(argv[0]), Path(argv[1]), float(argv[2])
    trainer = SimulatedTrainer(run_dir, SIM)

    def on_save(event: SaveEvent) -> None:
        vfs = os.statvfs(run_dir)
        (entry,) = [e for e in trainer.log_history if "eval_loss" in e and e["step"] == event.step]
        best = trainer.best_model_checkpoint
        record = {
            "step": event.step,
            "t": time.time(),
            "loss": entry["eval_loss"],
            "epoch": entry["epoch"],
            "best": step_of(best) if best else None,
            "best_on_disk": best is None or os.path.isdir(best),
            "free": vfs.f_bavail * vfs.f_frsize,
        }
        with records.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    try:
        saved = trainer.train(pace, on_save)
    except OSError as e:
        print(f"save failed: {e}", file=sys.stderr)
        return 1
    print(f"finished: {len(saved)} saves")
    return 0


# ==== what is expected, from the run's records =================================================================


def step_of(path: str) -> int:
    match = CHECKPOINT.fullmatch(Path(path).name)
    assert match, path
    return int(match.group(1))


@dataclass(frozen=True)
class Save:
    step: int
    best: int | None  # the Trainer's best checkpoint right after this save (its best_model_checkpoint)
    t: float  # when the save was over


@dataclass(frozen=True)
class History:
    """What a run says of itself: its saves in order, and each eval's loss and epoch by step."""

    saves: tuple[Save, ...]
    loss: Mapping[int, float]
    epoch: Mapping[int, float]


def kept_by_rules(present: Collection[int], history: History, best_n: int = 1) -> dict[int, set[str]]:
    """`best:N,last:3,epoch:all` over the complete checkpoints present: step -> the kinds of rule keeping it."""
    steps = sorted(present)
    reasons: dict[int, set[str]] = {}
    for step in steps[-LAST:]:
        reasons.setdefault(step, set()).add("last")
    for step in sorted(steps, key=lambda s: (history.loss[s], s))[:best_n]:
        reasons.setdefault(step, set()).add("best")
    newest_of_epoch = {math.ceil(round(history.epoch[s], 6)): s for s in steps}  # by step: the newest wins
    for step in newest_of_epoch.values():
        reasons.setdefault(step, set()).add("epoch")
    return reasons


def release_order(
    present: Collection[int], reasons: Mapping[int, set[str]], protected: Collection[int | None]
) -> list[int]:
    """The candidates for release in the documented order: a checkpoint counts in its latest tier; oldest first."""
    candidates = [s for s in present if s not in protected]
    return sorted(candidates, key=lambda s: (max(TIER[kind] for kind in reasons[s]), s))


@dataclass(frozen=True)
class Replay:
    present: list[int]  # what is left at the end
    released: list[int]  # in the order released
    released_as: list[set[str]]  # the kinds of rule that kept each when it was released
    before: list[int]  # per save: how many complete checkpoints were kept when it began


def replay(history: History, capacity: int | None = None, final_capacity: int | None = None) -> Replay:
    """The rules applied after each save, as the watch does once the save is complete; with capacities, pressure
    too: at most `capacity` complete checkpoints leave the floor plus a next save free while training, at most
    `final_capacity` leave the floor free after the last save (training stopped: no next save). Over that, the
    candidates go one at a time in the documented order; the newest and the Trainer's best never."""
    present: list[int] = []
    released: list[int] = []
    released_as: list[set[str]] = []
    before: list[int] = []
    for i, save in enumerate(history.saves):
        before.append(len(present))
        present.append(save.step)
        reasons = kept_by_rules(present, history)
        protected = {save.step, save.best}
        present = [s for s in present if s in reasons or s in protected]
        limit = final_capacity if i == len(history.saves) - 1 else capacity
        for step in release_order(present, reasons, protected):
            if limit is None or len(present) <= limit:
                break
            present.remove(step)
            released.append(step)
            released_as.append(reasons[step])
    return Replay(present, released, released_as, before)


def fits(room: int, per_checkpoint: int, what: str) -> int:
    """How many checkpoints fit in `room` bytes; the test needs the answer well away from a whole number."""
    count = room / per_checkpoint
    assert 0.1 < count % 1 < 0.9, (
        f"{what}: {count:.2f} checkpoints of {per_checkpoint} bytes fit in {room} bytes, too close to a whole "
        "number for a sure prediction: the checkpoint sizes changed; adjust the filesystem size or the floor"
    )
    return int(count)


def first_overflow(run: Replay, room: int, per_checkpoint: int) -> int | None:
    """Which save (0-based; len(run.before) is the save after the last one replayed) is the first that cannot be
    written beside what the rules keep when it begins; None: every one fits."""
    most = fits(room, per_checkpoint, "with the keep rules alone")
    kept_before = [*run.before, len(run.present)]
    return next((i for i, kept in enumerate(kept_before) if kept + 1 > most), None)


# ==== the filesystem ===========================================================================================


class Mounts:
    """Filesystems mounted for one test, unmounted (lazily) at its end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.mounted: list[Path] = []

    def _mount(self, args: Sequence[str], name: str) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a small filesystem needs root and mount(8)")
        where = self.base / name
        where.mkdir()
        done = subprocess.run(["mount", *args, str(where)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"`mount {' '.join(args)}` failed: {done.stderr.strip()}")
        self.mounted.append(where)
        return where

    def tmpfs(self, size: int) -> Path:
        return self._mount(["-t", "tmpfs", "-o", f"size={size}", "ckptkeeper-pressure"], f"tmpfs-{len(self.mounted)}")

    def ext4(self, size: int, reserved_percent: int) -> Path:
        mkfs = shutil.which("mkfs.ext4")
        if mkfs is None:
            pytest.skip("mkfs.ext4 is not installed")
        image = self.base / f"ext4-{len(self.mounted)}.img"
        with image.open("wb") as f:
            f.truncate(size)
        subprocess.run([mkfs, "-q", "-F", "-m", str(reserved_percent), str(image)], check=True, capture_output=True)
        return self._mount(["-o", "loop", str(image)], f"ext4-{len(self.mounted)}")

    def unmount_all(self) -> None:
        for where in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    made = Mounts(tmp_path)
    yield made
    made.unmount_all()


def free_bytes(path: Path) -> int:
    vfs = os.statvfs(path)
    return vfs.f_bavail * vfs.f_frsize


def sizes(checkpoint: Path) -> tuple[int, int]:
    """(the bytes of its files, the bytes the filesystem gives it: blocks of its files and directories)."""
    apparent, allocated = 0, checkpoint.lstat().st_blocks * 512
    for dirpath, dirnames, filenames in os.walk(checkpoint):
        for name in dirnames:
            allocated += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def complete_steps(run_dir: Path) -> set[int]:
    """The checkpoints the Trainer finished writing (trainer_state.json is its last file)."""
    return {s for s in all_steps(run_dir) if (run_dir / f"checkpoint-{s}" / "trainer_state.json").is_file()}


def all_steps(run_dir: Path) -> set[int]:
    return {step_of(e.name) for e in run_dir.iterdir() if CHECKPOINT.fullmatch(e.name)}


def newest_sizes(run_dir: Path) -> tuple[int, int]:
    """(the largest checkpoint's bytes, the most blocks any takes): the next save, and the room a save takes."""
    found = [sizes(run_dir / f"checkpoint-{s}") for s in complete_steps(run_dir)]
    return max(a for a, _ in found), max(b for _, b in found)


# ==== the simulated Trainer beside the watch ===================================================================


@dataclass(frozen=True)
class Trained:
    """One training process beside one watch on a small filesystem."""

    out: Path  # the watched root
    run: Path  # the run directory
    watch: Watch
    free_at_start: int  # once the watch holds its state directory (lock, journal, reserve), before training
    proc: subprocess.CompletedProcess[str]
    records: Path

    def context(self) -> str:
        on_disk = sorted(all_steps(self.run)) if self.run.is_dir() else None
        return (
            f"--- trainer exit {self.proc.returncode}\n{self.proc.stdout[-2000:]}\n{self.proc.stderr[-3000:]}\n"
            f"--- on disk: {on_disk}; free {free_bytes(self.out)}\n--- {self.watch.describe()}"
        )


def start_watch(start: StartWatch, out: Path, *pressure: str) -> tuple[Watch, int]:
    out.mkdir()
    watch = start(out, "--keep", KEEP, *pressure, "--settle", SETTLE, "--exit-when-done", "--log-format", "json")
    watch.wait_log("watching ", timeout=30)
    return watch, free_bytes(out)


def train_simulated(fs: Path, start: StartWatch, records: Path, *pressure: str) -> Trained:
    out = fs / "out"
    watch, free = start_watch(start, out, *pressure)
    command = [sys.executable, str(HERE), "simtrain", str(out / "run"), str(records), str(SIM_PACE)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    return Trained(out, out / "run", watch, free, proc, records)


def sim_history(records: Path) -> tuple[History, list[dict[str, Any]]]:
    entries = json_lines(records)
    saves = tuple(Save(e["step"], e["best"], e["t"]) for e in entries)
    history = History(saves, {e["step"]: e["loss"] for e in entries}, {e["step"]: e["epoch"] for e in entries})
    return history, entries


def all_saves() -> list[int]:
    return [s for s in range(1, SIM.max_steps + 1) if s % SIM.save_steps == 0 or s == SIM.max_steps]


# ==== what the watch said ======================================================================================

RELEASED = re.compile(r"(?:\S+/)?checkpoint-(\d+) released \(delete\): disk pressure: .+ free < .+, was (.+)$")


def log_entries(watch: Watch) -> list[dict[str, Any]]:
    return json_lines(watch.log_path)


def releases_logged(entries: Sequence[dict[str, Any]]) -> list[tuple[float, int, str]]:
    """(when, step, the reasons it had) of every `released` line, in order."""
    found = []
    for e in entries:
        match = RELEASED.match(str(e.get("message", "")))
        if match:
            when = _log_time(e)
            found.append((when, int(match.group(1)), match.group(2)))
    return found


def _log_time(entry: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(entry["time"]).timestamp()


def check_nothing_protected_released(history: History, released: Sequence[tuple[float, int, str]]) -> None:
    """At each release, a newer save was over and the Trainer's best then was another checkpoint. (The best only
    moves to newer steps, so a checkpoint that was the best at a later save was the best at every save the watch
    could have seen before.)"""
    for when, step, reasons in released:
        done = [s for s in history.saves if s.t <= when]
        assert done, f"checkpoint-{step} released at {when} before any save was over"
        assert step < done[-1].step, f"checkpoint-{step} was the newest checkpoint when it was released ({reasons})"
        assert step != done[-1].best, f"checkpoint-{step}, the Trainer's best then, was released ({reasons})"


def check_journal(out: Path, released: Sequence[int]) -> None:
    """The journal's removals for pressure are exactly the releases, each started and done; no other says so."""
    entries = json_lines(out / "_ckptkeeper" / "journal.jsonl")
    pressure = [e for e in entries if str(e.get("why", "")).startswith("disk pressure:")]
    assert [(e["action"], e["step"]) for e in pressure] == [
        (action, step) for step in released for action in ("start-delete", "delete")
    ], entries
    others = [e for e in entries if e not in pressure]
    assert all("disk pressure:" not in str(e.get("why", "")) for e in others), others


# ==== the tests: simulated Trainer ============================================================================


def test_keep_rules_alone_fill_the_disk_and_a_save_fails_with_enospc(
    mounts: Mounts, watch: StartWatch, tmp_path: Path
) -> None:
    fs = mounts.tmpfs(SIM_FS)
    trained = train_simulated(fs, watch, tmp_path / "saves.jsonl")
    history, _ = sim_history(trained.records)
    assert trained.proc.returncode == 1, trained.context()
    assert "save failed: [Errno 28] No space left on device" in trained.proc.stderr, trained.context()
    made = [s.step for s in history.saves]
    assert made == all_saves()[: len(made)] and len(made) < len(all_saves()), made
    failed = all_saves()[len(made)]
    assert failed in all_steps(trained.run) and failed not in complete_steps(trained.run), trained.context()

    # The watch kept up: what is left is what the rules keep (the failed save stays: it is incomplete).
    expected = replay(history)
    wait_until(lambda: complete_steps(trained.run) == set(expected.present), 15, trained.context)
    assert free_bytes(fs) < sizes(trained.run / f"checkpoint-{made[-1]}")[1], trained.context()
    # ... and the rules alone predict that very save cannot be written beside what they keep.
    _, per_checkpoint = newest_sizes(trained.run)
    assert first_overflow(expected, trained.free_at_start, per_checkpoint) == len(made), expected
    assert trained.watch.alive(), trained.context()
    errors = [e for e in log_entries(trained.watch) if e.get("level") == "error" or "unparsed" in e]
    assert not errors, errors


def test_floor_and_pressure_rules_let_every_save_succeed(mounts: Mounts, watch: StartWatch, tmp_path: Path) -> None:
    fs = mounts.tmpfs(SIM_FS)
    pressure = ("--min-free", SIM_FLOOR, "--keep-under-pressure", PRESSURE_RULES)
    trained = train_simulated(fs, watch, tmp_path / "saves.jsonl", *pressure)
    history, entries = sim_history(trained.records)
    assert trained.proc.returncode == 0, trained.context()
    assert [s.step for s in history.saves] == all_saves(), trained.context()
    assert trained.watch.wait_exit(30) == 0, trained.context()
    # The floor held: right after every save (before the watch could act on it) at least 1.3 MB was free, and
    # the Trainer's best was on disk at every save.
    low = [(e["step"], e["free"]) for e in entries if e["free"] < SIM_FLOOR_BYTES]
    assert not low, f"free space fell below the floor right after these saves: {low}\n{trained.context()}"
    assert all(e["best_on_disk"] for e in entries), entries

    next_save, per_checkpoint = newest_sizes(trained.run)
    room = trained.free_at_start - SIM_FLOOR_BYTES
    capacity = fits(room - next_save, per_checkpoint, "while training")
    expected = replay(history, capacity, fits(room, per_checkpoint, "after the last save"))
    assert expected.released, f"the sizes no longer put the disk under pressure: {expected}"
    assert all_steps(trained.run) == set(expected.present), f"expected {expected}\n{trained.context()}"
    check_pressure_log(trained, history, expected)


def check_pressure_log(trained: Trained, history: History, expected: Replay) -> None:
    """The watch logged pressure beginning, each release in order (milestones here: `was epoch N`), nothing
    at ERROR (the floor was met), and never released a protected checkpoint; the journal agrees."""
    entries = log_entries(trained.watch)
    messages = [str(e.get("message")) for e in entries]
    assert any(m.startswith("disk pressure begins: disk ") and "UNDER PRESSURE; releasing" in m for m in messages)
    released = releases_logged(entries)
    assert [step for _, step, _ in released] == expected.released, trained.context()
    kinds = [set(re.findall(r"\b(epoch|last|best)\b", reasons)) for _, _, reasons in released]
    assert kinds == expected.released_as, released
    check_nothing_protected_released(history, released)
    errors = [e for e in entries if e.get("level") == "error" or "unparsed" in e]
    assert not errors, errors
    check_journal(trained.out, expected.released)


# ==== the tests: prune as a low-disk hook, and ext4 ============================================================


class _Stop(Exception):
    pass


def run_still_training(run_dir: Path, last_step: int) -> History:
    """The simulated Trainer's saves up to `last_step`, stopped there: the newest says training goes on."""
    trainer = SimulatedTrainer(run_dir, SIM)
    saves: list[Save] = []

    def on_save(event: SaveEvent) -> None:
        best = trainer.best_model_checkpoint
        saves.append(Save(event.step, step_of(best) if best else None, time.time()))
        if event.step >= last_step:
            raise _Stop

    with contextlib.suppress(_Stop):
        trainer.train(0.0, on_save)
    evals = [e for e in trainer.log_history if "eval_loss" in e]
    return History(tuple(saves), {e["step"]: e["eval_loss"] for e in evals}, {e["step"]: e["epoch"] for e in evals})


def fill_to(fs: Path, free: int) -> None:
    """Write a file that leaves about `free` bytes free (a page less at most)."""
    size = free_bytes(fs) - free
    assert size > 0, (free_bytes(fs), free)
    with (fs / "filler").open("wb") as f:
        f.write(b"\0" * size)
    os.sync()


HOOK_KEEP = "best:3,last:3,epoch:all"  # the 3rd best (step 30, also epoch 3) goes after the newer `last` step 40


HOOK_ARGS = ("--keep", HOOK_KEEP, "--min-free", HOOK_FLOOR, "--keep-under-pressure", PRESSURE_RULES)


def prepared_run(fs: Path) -> tuple[Path, set[int], list[int], dict[int, set[str]]]:
    """A run stopped at step 50 (training goes on), pruned by HOOK_KEEP (what a watch would have done already):
    the root, the steps left, the release candidates in the documented order, and why each is kept."""
    root = fs / "out"
    history = run_still_training(root / "run", 50)
    pruned = ckptkeeper("prune", root, "--keep", HOOK_KEEP)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    present = complete_steps(root / "run")
    reasons = kept_by_rules(present, history, best_n=3)
    assert present == set(reasons) | {50, history.saves[-1].best}, (present, reasons)
    return root, present, release_order(present, reasons, {50, history.saves[-1].best}), reasons


def mb(text: str) -> float:
    number, unit = text.split()
    return float(number) * {"B": 1e-6, "kB": 1e-3, "MB": 1.0}[unit]


def hook(root: Path) -> subprocess.CompletedProcess[str]:
    """`prune ROOT --keep ... --min-free 2M --keep-under-pressure last:1`, as a trainer's low-disk hook calls it."""
    done = ckptkeeper("prune", root, *HOOK_ARGS)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_prune_as_a_low_disk_hook_releases_as_few_as_needed_in_order(mounts: Mounts) -> None:
    fs = mounts.tmpfs(16 * MiB)
    root, present, order, reasons = prepared_run(fs)
    assert order[:3] == [10, 20, 40] and order[3] == 30, order  # epoch 1, epoch 2, then last before best
    candidate = [sizes(root / "run" / f"checkpoint-{s}")[0] for s in order]
    next_save = sizes(root / "run" / "checkpoint-50")[0]
    needed = HOOK_FLOOR_BYTES + next_save
    fill_to(fs, needed - sum(candidate[:2]) - candidate[2] // 2)  # two releases are not enough, three are
    free = free_bytes(fs)
    count = next(k for k in range(len(order) + 1) if free + sum(candidate[:k]) >= needed)
    assert count == 3, (free, needed, candidate)

    lines = hook(root).stdout.splitlines()
    head = re.compile(
        rf"disk {re.escape(str(root / 'run'))}: (\S+ \S+) free < 2\.0 MB floor \+ (\S+ \S+) next save: "
        r"UNDER PRESSURE; releasing 3 checkpoints frees (\S+ \S+)"
    )
    (figures,) = [m for line in lines if (m := head.fullmatch(line))]
    assert abs(mb(figures[1]) - free / 1e6) <= 0.051 and abs(mb(figures[2]) - next_save / 1e6) <= 0.051, figures
    assert abs(mb(figures[3]) - sum(candidate[:3]) / 1e6) <= 0.051, figures
    released = {
        int(m[1]): m[2] for x in lines if (m := re.fullmatch(r"released run/checkpoint-(\d+) \(delete\): (.*)", x))
    }
    assert set(released) == set(order[:3]), lines
    for step, why in released.items():
        assert why.startswith("disk pressure: ") and set(re.findall(r"was (epoch|last|best)", why)) == reasons[step]
    assert sorted(x.split()[1] for x in lines if x.startswith("deleted ")) == sorted(
        f"run/checkpoint-{s}" for s in order[:3]
    ), lines
    assert "Done: removed 3 checkpoints, freed 3.0 MB. Kept 3." in lines, lines
    assert complete_steps(root / "run") == present - set(order[:3]), lines
    assert free_bytes(fs) >= needed, (free_bytes(fs), needed)

    again = hook(root).stdout
    assert re.search(r"next save: no pressure$", again, re.MULTILINE), again
    assert "Done: removed 0 checkpoints, freed 0 B. Kept 3." in again, again


def test_on_ext4_the_floor_counts_only_what_an_unprivileged_writer_may_use(mounts: Mounts) -> None:
    fs = mounts.ext4(24 * MiB, reserved_percent=20)
    root, _, order, _ = prepared_run(fs)
    first = sizes(root / "run" / f"checkpoint-{order[0]}")[0]
    next_save = sizes(root / "run" / "checkpoint-50")[0]
    needed = HOOK_FLOOR_BYTES + next_save
    fill_to(fs, needed - first // 2)  # f_bavail: one release short; f_bfree: megabytes to spare
    vfs = os.statvfs(fs)
    bavail, bfree = vfs.f_bavail * vfs.f_frsize, vfs.f_bfree * vfs.f_frsize
    assert bavail < needed <= bavail + first and bfree > needed + first, (bavail, bfree, needed, first)
    plan = ckptkeeper("plan", root, *HOOK_ARGS, "--json")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    (verdict,) = json.loads(plan.stdout)["disk_pressure"]
    assert verdict["free_bytes"] == bavail != bfree, (verdict, bavail, bfree)
    assert verdict["under_pressure"] and verdict["floor_met"], verdict
    assert [r["checkpoint"] for r in verdict["released"]] == [f"checkpoint-{order[0]}"], verdict

    pruned = hook(root).stdout
    assert [x.split()[1] for x in pruned.splitlines() if x.startswith("deleted ")] == [f"run/checkpoint-{order[0]}"]
    assert free_bytes(fs) >= needed, (free_bytes(fs), needed)


# ==== the tests: the real Trainer =============================================================================


def train_real(fs: Path, start: StartWatch, tmp_path: Path, *pressure: str) -> tuple[Trained, dict[str, Any]]:
    require_training_stack()
    out = fs / "out"
    watch, free = start_watch(start, out, *pressure)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": os.fspath(tmp_path / "hf-home"),
        "PYTHONUNBUFFERED": "1",
    }
    summary_path = tmp_path / "summary.json"
    command = [sys.executable, os.fspath(TRAIN_SCRIPT), os.fspath(out), "--summary", os.fspath(summary_path), *HF_ARGS]
    proc = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=HF_SECONDS, check=False
    )
    trained = Trained(out, out, watch, free, proc, summary_path)
    assert summary_path.exists(), trained.context()
    return trained, json.loads(summary_path.read_text(encoding="utf-8"))


def real_history(summary: dict[str, Any]) -> History:
    saves = tuple(
        Save(r["global_step"], step_of(r["best_model_checkpoint"]) if r["best_model_checkpoint"] else None, r["t"])
        for r in summary["saves"]
    )
    evals = [e for e in summary["log_history"] if "eval_loss" in e]
    return History(saves, {e["step"]: e["eval_loss"] for e in evals}, {e["step"]: e["epoch"] for e in evals})


@pytest.mark.e2e
def test_real_trainer_with_keep_rules_alone_fails_to_save(mounts: Mounts, watch: StartWatch, tmp_path: Path) -> None:
    fs = mounts.tmpfs(HF_FS)
    trained, summary = train_real(fs, watch, tmp_path)
    history = real_history(summary)
    assert trained.proc.returncode != 0 and not summary["ok"], trained.context()
    # torch.save reports a short write as "unexpected pos"/"file write failed", without the errno; the disk is full.
    error = summary["error"]["message"]
    assert re.search(r"No space left on device|unexpected pos|file write failed", error), summary["error"]
    made = [s.step for s in history.saves]
    failed = made[-1] + 10
    assert failed in all_steps(trained.run) and failed not in complete_steps(trained.run), trained.context()

    expected = replay(history)
    wait_until(lambda: complete_steps(trained.run) == set(expected.present), 15, trained.context)
    _, per_checkpoint = newest_sizes(trained.run)
    assert free_bytes(fs) < per_checkpoint, trained.context()
    assert first_overflow(expected, trained.free_at_start, per_checkpoint) == len(made), expected
    assert trained.watch.alive(), trained.context()


@pytest.mark.e2e
def test_real_trainer_with_floor_and_pressure_rules_finishes(mounts: Mounts, watch: StartWatch, tmp_path: Path) -> None:
    fs = mounts.tmpfs(HF_FS)
    pressure = ("--min-free", HF_FLOOR, "--keep-under-pressure", PRESSURE_RULES)
    trained, summary = train_real(fs, watch, tmp_path, *pressure)
    history = real_history(summary)
    assert trained.proc.returncode == 0 and summary["ok"], trained.context()
    assert [s.step for s in history.saves] == [*range(10, 130, 10), 130], trained.context()
    assert summary["best_model_loaded"], summary["load_best"]
    for record in summary["saves"]:  # the Trainer's best was on disk at every save
        best = record["best_model_checkpoint"]
        assert best is None or Path(best).name in record["checkpoints_on_disk"], record
    assert trained.watch.wait_exit(30) == 0, trained.context()

    next_save, per_checkpoint = newest_sizes(trained.run)
    room = trained.free_at_start - HF_FLOOR_BYTES
    capacity = fits(room - next_save, per_checkpoint, "while training")
    expected = replay(history, capacity, fits(room, per_checkpoint, "after the last save"))
    assert expected.released, f"the sizes no longer put the disk under pressure: {expected}"
    assert all_steps(trained.run) == set(expected.present), f"expected {expected}\n{trained.context()}"
    check_pressure_log(trained, history, expected)


if __name__ == "__main__":
    if sys.argv[1:2] == ["simtrain"]:
        sys.exit(_script_simtrain(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} simtrain RUN_DIR RECORDS PACE")
