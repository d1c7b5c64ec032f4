"""Safety under faults, races and hostile input: a full archive disk, a checkpoint that cannot be removed,
readers holding files open, two instances on one root, the root replaced, a read-only root, and a run
directory on another filesystem than the state directory, SIGKILLed mid-delete.

Everything is real: small tmpfs mounts (this suite runs as root) for a disk that fills up and for space
accounting nobody else touches, `chattr +i` for a real EPERM (root ignores modes), a read-only bind mount,
`prune` and `watch` as processes (tests/watchutil.py), other processes reading the checkpoints. Waits poll a
condition with a deadline; "several passes" of the daemon are counted on its own /metrics (the number of full
rescans), never by sleeping. Behaviour of watch.py that falls short is an xfail(strict) naming the defect,
raised as `Defect` so that any other failure of the same test still shows as a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cliutil import per_removal
from watchutil import Watch, journal, steps, wait_until

from ckptkeeper.actions import ARCHIVE_TEMP_PREFIX, RUN_TRASH_NAME
from ckptkeeper.cli import main
from ckptkeeper.scan import checkpoint_step
from ckptkeeper.simtrainer import SimConfig, simulate_run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts (tmpfs, read-only bind) and chattr +i need root")

# Checkpoints 1, 2, 3 (no eval, no Trainer best: `last:N` alone decides), about 0.6 MB each on disk.
THREE = SimConfig(
    steps_per_epoch=3,
    epochs=1,
    save_steps=1,
    eval_strategy="no",
    metric_for_best_model=None,
    optimizer_bytes=600_000,
)
# Checkpoints 2, 4, 6, 8, a few kB each.
SMALL = SimConfig(steps_per_epoch=4, epochs=2, save_steps=2, eval_strategy="no", metric_for_best_model=None)
SETTLE_0 = ("--settle", "0")
RESCAN_1S = ("--rescan-interval", "1")
NO_RESCAN = ("--rescan-interval", "3600")
ENOSPC = "No space left on device"
EPERM = "Operation not permitted"
EROFS = "Read-only file system"

Manifest = dict[str, tuple[int, str]]


class Defect(AssertionError):
    """A shortfall of the daemon (watch.py) that an xfail(strict=True, raises=Defect) test documents."""


def defect_unless(condition: bool, message: str) -> None:
    if not condition:
        raise Defect(message)


# ---------------------------------------------------------------------------------------------- helpers
def manifest(top: Path) -> Manifest:
    """Relative path -> (size, sha256) of every file below `top`; directories as (-1, "")."""
    found: Manifest = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), top)] = (-1, "")
        for name in filenames:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                found[os.path.relpath(full, top)] = (
                    os.path.getsize(full),
                    hashlib.file_digest(f, "sha256").hexdigest(),
                )
    return found


def tree_stamps(top: Path) -> dict[str, tuple[int, int, int]]:
    """Relative path -> (inode, size, mtime_ns) of `top` and everything below: any change shows."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [".", *dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            found[os.path.relpath(os.path.join(dirpath, name), top)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return found


def checkpoint_manifests(run: Path) -> dict[int, Manifest]:
    return {step: manifest(run / f"checkpoint-{step}") for step in steps(run)}


def named(top: Path, prefix: str) -> list[Path]:
    return sorted(p for p in top.rglob("*") if p.name.startswith(prefix))


def ckpt(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m ckptkeeper ARGS` as a process."""
    return subprocess.run(
        [sys.executable, "-m", "ckptkeeper", *map(str, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cli(*args: str | Path) -> Result:
    """The click group in this process: for the runs where a separate process shows nothing more."""
    return CliRunner().invoke(main, [str(a) for a in args])


def used_bytes(mount: Path) -> int:
    st = os.statvfs(mount)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def free_bytes(mount: Path) -> int:
    st = os.statvfs(mount)
    return st.f_bavail * st.f_frsize


def fill(mount: Path, leave: int) -> Path:
    """A file that takes all the free space of `mount` but `leave` bytes."""
    filler = mount / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (free_bytes(mount) - leave))
    assert abs(free_bytes(mount) - leave) <= 8192, free_bytes(mount)
    return filler


def add_checkpoint(run: Path, copy_of: int, step: int) -> None:
    """A new checkpoint built under another name and renamed into place (complete from its first moment)."""
    staged = run / f"tmp-checkpoint-{step}"
    shutil.copytree(run / f"checkpoint-{copy_of}", staged)
    state = json.loads((staged / "trainer_state.json").read_text())
    state["global_step"] = step
    (staged / "trainer_state.json").write_text(json.dumps(state))
    os.rename(staged, run / f"checkpoint-{step}")


def starts(state_dir: Path, action: str, checkpoint: str) -> int:
    return sum(1 for e in journal(state_dir) if e["action"] == action and e.get("checkpoint") == checkpoint)


def error_lines(w: Watch, needle: str = "") -> list[str]:
    return [line for line in w.lines() if " ERROR " in line and needle in line]


def assert_no_traceback(w: Watch) -> None:
    assert "Traceback" not in w.log(), w.describe()
    assert not [line for line in w.lines() if " CRITICAL " in line], w.describe()


# ---------------------------------------------------------------------------------------------- fixtures
Mount = Callable[..., Path]


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mount]:
    """mount(name, size) -> a fresh tmpfs of that size at tmp_path/name (or at an existing directory given
    as `at`); every mount made here is unmounted at the end."""
    made: list[Path] = []

    def mount(name: str, size: str, at: Path | None = None) -> Path:
        where = at or tmp_path / name
        where.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", f"ckptkeeper-{name}", str(where)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"`mount -t tmpfs` failed: {done.stderr.strip()}")
        made.append(where)
        return where

    yield mount
    for where in reversed(made):
        if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def bind_read_only(mounts_made: list[Path], source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True, capture_output=True)
    mounts_made.append(target)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True, capture_output=True)
    return target


@pytest.fixture
def ro_mounts() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for where in reversed(made):
        if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


class Immutable:
    """chattr +i / -i; at the end every entry still marked (found by inode, wherever it was moved below
    tmp_path, e.g. into a trash) is made mutable again, or tmp_path could never be removed."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.marked: set[tuple[int, int]] = set()

    def set(self, path: Path) -> None:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"chattr +i is not available here: {done.stderr.strip()}")
        st = path.lstat()
        self.marked.add((st.st_dev, st.st_ino))

    def clear(self, path: Path) -> None:
        subprocess.run(["chattr", "-i", str(path)], check=True, capture_output=True)
        st = path.lstat()
        self.marked.discard((st.st_dev, st.st_ino))

    def clear_all(self) -> None:
        if not self.marked:
            return
        for dirpath, dirnames, filenames in os.walk(self.top):
            for name in [".", *dirnames, *filenames]:
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                if (st.st_dev, st.st_ino) in self.marked:
                    subprocess.run(["chattr", "-i", full], check=False, capture_output=True)
        self.marked.clear()


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[Immutable]:
    marks = Immutable(tmp_path)
    try:
        yield marks
    finally:
        marks.clear_all()


StartWatch = Callable[..., Watch]


@pytest.fixture
def watch(tmp_path: Path, mounts: Mount, ro_mounts: list[Path], immutable: Immutable) -> Iterator[StartWatch]:
    """Start `ckptkeeper watch ROOT ARGS...`; killed at the end, before the mounts go and the marks are cleared."""
    started: list[Watch] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(root: Path, *args: str) -> Watch:
        w = Watch(root, args, logs / f"watch-{len(started)}.log")
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()


def metrics_url(w: Watch) -> str:
    found = wait_until(
        lambda: re.search(r"serving metrics on (http://\S+)/metrics", w.log()), 15, lambda: f"metrics: {w.describe()}"
    )
    return found.group(1)


def full_rescans(w: Watch) -> int:
    """How many full passes (start-up and every --rescan-interval) the daemon has finished, by its /metrics."""
    with urllib.request.urlopen(metrics_url(w) + "/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(r'^ckptkeeper_reconcile_duration_seconds_count\{scope="all"\} (\S+)$', text, re.MULTILINE)
    return int(float(found.group(1))) if found else 0


def wait_full_rescans(w: Watch, more_than: int, timeout: float = 20) -> int:
    """Wait until the daemon has finished more than `more_than` full passes; return how many."""

    def count() -> int:
        if not w.alive():
            raise AssertionError(f"the watch ended: {w.describe()}")
        n = full_rescans(w)
        return n if n > more_than else 0

    return wait_until(count, timeout, lambda: f"{more_than + 1} full rescans: {w.describe()}")


def healthz(w: Watch) -> tuple[int, str]:
    with urllib.request.urlopen(metrics_url(w) + "/healthz", timeout=5) as response:
        return response.status, response.read().decode().strip()


# ============================================================================================== 1. a full disk
def test_prune_archive_to_a_full_disk_rolls_back_each_copy_and_keeps_the_source(tmp_path: Path, mounts: Mount) -> None:
    archive_fs = mounts("archive-fs", "4m")
    archive = archive_fs / "archive"
    filler = fill(archive_fs, leave=1000 * 1024)  # room for one checkpoint of ~0.6 MB, not two
    root = tmp_path / "outputs"
    run = root / "run"
    simulate_run(run, replace(THREE, steps_per_epoch=4))  # 1, 2, 3, 4
    before = checkpoint_manifests(run)
    assert sorted(before) == [1, 2, 3, 4]

    done = ckpt("prune", root, "--keep", "last:1", "--archive-to", archive)

    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout.splitlines()
    copied = re.escape(f"(copied to {archive}/run/checkpoint-1)")
    assert re.fullmatch(rf"archived      run/checkpoint-1  [\d.]+ kB  no rule keeps it  {copied}", out[2]), out[2]
    for line, step in zip(out[3:5], (2, 3), strict=True):
        source, target = run / f"checkpoint-{step}", archive / "run" / f"checkpoint-{step}"
        assert line.startswith(f"FAILED        run/checkpoint-{step}  (cannot archive {source} to {target}: "), line
        assert line.endswith(f": {ENOSPC})"), line  # one short reason, not one per file
    assert out[5].startswith("Done: removed 1 checkpoint, freed ") and out[5].endswith(
        "; 2 failed (see above). Kept 1."
    )
    assert done.stderr == "Error: 2 checkpoints could not be removed (see the FAILED lines above)\n"
    # Rolled back: no partial copy under any name, the sources whole, nothing left in a trash.
    assert named(archive_fs, ARCHIVE_TEMP_PREFIX) == []
    assert sorted(os.listdir(archive / "run")) == ["checkpoint-1"]
    assert manifest(archive / "run" / "checkpoint-1") == before[1]
    assert checkpoint_manifests(run) == {s: before[s] for s in (2, 3, 4)}
    assert sorted(os.listdir(run)) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert os.listdir(root / "_ckptkeeper" / "trash") == []
    entries = [(e["action"], e["checkpoint"]) for e in per_removal(journal(root / "_ckptkeeper"))]
    assert entries == [
        ("start-archive", "checkpoint-1"),
        ("archive", "checkpoint-1"),
        ("start-archive", "checkpoint-2"),
        ("error", "checkpoint-2"),
        ("start-archive", "checkpoint-3"),
        ("error", "checkpoint-3"),
    ]
    assert all(ENOSPC in e["detail"] for e in journal(root / "_ckptkeeper") if e["action"] == "error")

    # Space again: the next prune archives the rest.
    filler.unlink()
    again = cli("prune", root, "--keep", "last:1", "--archive-to", archive)
    assert again.exit_code == 0, again.output
    assert steps(run) == [4] and steps(archive / "run") == [1, 2, 3]
    assert {s: manifest(archive / "run" / f"checkpoint-{s}") for s in (1, 2, 3)} == {s: before[s] for s in (1, 2, 3)}
    assert named(archive_fs, ARCHIVE_TEMP_PREFIX) == []


def test_watch_archive_to_a_full_disk_keeps_running_retries_and_recovers(
    tmp_path: Path, mounts: Mount, watch: StartWatch
) -> None:
    archive_fs = mounts("archive-fs", "4m")
    archive = archive_fs / "archive"
    filler = fill(archive_fs, leave=400 * 1024)  # not even one checkpoint fits
    root = tmp_path / "outputs"
    run = root / "run"
    simulate_run(run, THREE)  # 1, 2, 3: last:1 archives 1 and 2
    before = checkpoint_manifests(run)
    state_dir = root / "_ckptkeeper"

    w = watch(root, "--keep", "last:1", "--archive-to", str(archive), *SETTLE_0, *RESCAN_1S, "--metrics-port", "0")
    # The start-up pass and at least two full rescans have each tried (and failed) both archives.
    wait_full_rescans(w, 2)
    wait_until(lambda: min(starts(state_dir, "start-archive", f"checkpoint-{s}") for s in (1, 2)) >= 3, 20, w.describe)
    assert error_lines(w, f"run/checkpoint-1 could not be removed: cannot archive {run}/checkpoint-1 to ")
    assert all(f": {ENOSPC}" in line for line in error_lines(w)), error_lines(w)  # short: no list of every file
    for step in (1, 2):  # tried at every pass, said once
        assert len(error_lines(w, f"run/checkpoint-{step} could not be removed: ")) == 1, error_lines(w)
    assert healthz(w) == (200, "ok")
    assert checkpoint_manifests(run) == before  # the sources whole, under their names
    assert list(archive_fs.rglob("checkpoint-*")) == []  # no copy ever got a checkpoint name

    # A checkpoint written later is still noticed and decided on; the one it replaces fails the same way.
    add_checkpoint(run, 3, 4)
    w.wait_log("run/checkpoint-4 kept: newest")
    wait_until(lambda: starts(state_dir, "error", "checkpoint-3") >= 1, 20, w.describe)
    before[4] = manifest(run / "checkpoint-4")

    # Space again: the next full rescan archives all three, whole.
    filler.unlink()
    wait_until(lambda: steps(run) == [4] and steps(archive / "run") == [1, 2, 3], 20, w.describe)
    assert {s: manifest(archive / "run" / f"checkpoint-{s}") for s in (1, 2, 3)} == {s: before[s] for s in (1, 2, 3)}
    assert manifest(run / "checkpoint-4") == before[4]
    w.wait_log("run/checkpoint-3 archived: copied to ")
    wait_until(lambda: os.listdir(state_dir / "trash") == [], 10, w.describe)
    assert w.alive(), w.describe()
    assert w.terminate()[0] == 0
    assert named(archive_fs, ARCHIVE_TEMP_PREFIX) == []
    assert_no_traceback(w)
    assert all(ENOSPC in line for line in error_lines(w)), error_lines(w)
    for step in (1, 2, 3):
        assert len(error_lines(w, f"run/checkpoint-{step} could not be removed: ")) == 1, error_lines(w)


# ============================================================================================== 2. EPERM
@pytest.mark.parametrize("what", ["the checkpoint directory", "a file inside it"])
def test_prune_a_checkpoint_that_cannot_be_removed_is_reported_the_others_go_and_the_next_prune_retries(
    tmp_path: Path, immutable: Immutable, what: str
) -> None:
    root = tmp_path / "outputs"
    run = root / "run"
    simulate_run(run, SMALL)  # 2, 4, 6, 8: last:1 removes 2, 4, 6
    before = manifest(run / "checkpoint-4")
    stuck = run / "checkpoint-4" if what == "the checkpoint directory" else run / "checkpoint-4" / "optimizer.pt"
    immutable.set(stuck)

    done = ckpt("prune", root, "--keep", "last:1")

    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout.splitlines()
    assert [line.split()[:2] for line in out[2:5]] == [
        ["deleted", "run/checkpoint-2"],
        ["FAILED", "run/checkpoint-4"],
        ["deleted", "run/checkpoint-6"],
    ]
    assert done.stderr == "Error: 1 checkpoint could not be removed (see the FAILED lines above)\n"
    trash = root / "_ckptkeeper" / "trash"
    if what == "the checkpoint directory":
        # It cannot leave its name: it stays whole there.
        assert out[3] == f"FAILED        run/checkpoint-4  (cannot move {run}/checkpoint-4 to the trash: {EPERM})"
        assert steps(run) == [4, 8] and manifest(run / "checkpoint-4") == before
        assert os.listdir(trash) == []
    else:
        # It left its name in one rename; the file that cannot go keeps the rest in the trash.
        assert steps(run) == [8]
        [left] = os.listdir(trash)
        assert left.endswith(".checkpoint-4") and checkpoint_step(left) is None
        assert out[3] == (
            f"FAILED        run/checkpoint-4  ({run}/checkpoint-4 was moved to the trash ({trash / left}) but could "
            f"not be removed there: [Errno 1] {EPERM}: '{trash / left / 'optimizer.pt'}'; it is finished on the next "
            "start)"
        )

    immutable.clear_all()
    again = cli("prune", root, "--keep", "last:1")

    assert again.exit_code == 0, again.output
    assert steps(run) == [8] and os.listdir(trash) == []
    if what == "the checkpoint directory":
        assert again.stdout.splitlines()[2].startswith("deleted       run/checkpoint-4  ")
        tail = ["start-delete", "delete"]
    else:
        assert again.stdout.splitlines()[2] == f"finished removing {left}, left in the trash by an interrupted run"
        tail = ["finish-trash"]
    assert [e["action"] for e in per_removal(journal(root / "_ckptkeeper"))] == [
        *["start-delete", "delete", "start-delete", "error", "start-delete", "delete"],
        *tail,
    ]


def test_watch_a_checkpoint_that_cannot_be_renamed_is_retried_each_pass_and_removed_once_it_can(
    tmp_path: Path, immutable: Immutable, watch: StartWatch
) -> None:
    root = tmp_path / "outputs"
    run = root / "run"
    simulate_run(run, SMALL)
    before = manifest(run / "checkpoint-4")
    immutable.set(run / "checkpoint-4")
    state_dir = root / "_ckptkeeper"

    w = watch(root, "--keep", "last:1", *SETTLE_0, *RESCAN_1S, "--metrics-port", "0")
    wait_until(lambda: steps(run) == [4, 8], 15, w.describe)  # the others went
    wait_full_rescans(w, 2)
    wait_until(lambda: starts(state_dir, "start-delete", "checkpoint-4") >= 3, 20, w.describe)  # retried each pass
    [said] = error_lines(w)  # said once
    assert f"run/checkpoint-4 could not be removed: cannot move {run}/checkpoint-4 to the trash: {EPERM}" in said
    assert manifest(run / "checkpoint-4") == before
    assert healthz(w) == (200, "ok")

    immutable.clear(run / "checkpoint-4")
    wait_until(lambda: steps(run) == [8], 15, w.describe)  # by the next full rescan
    w.wait_log("run/checkpoint-4 deleted: freed ")
    assert w.alive(), w.describe()
    assert w.terminate()[0] == 0
    assert_no_traceback(w)


def _watch_with_a_stuck_trash_entry(root: Path, immutable: Immutable, watch: StartWatch) -> Watch:
    """A daemon whose removal of checkpoint-4 fails inside the trash (an immutable file in it)."""
    run = root / "run"
    simulate_run(run, SMALL)
    immutable.set(run / "checkpoint-4" / "optimizer.pt")
    w = watch(root, "--keep", "last:1", *SETTLE_0, *RESCAN_1S, "--metrics-port", "0")
    w.wait_log("could not finish deleting ")
    wait_until(lambda: steps(run) == [8], 15, w.describe)
    return w


def test_watch_a_checkpoint_that_fails_inside_the_trash_leaves_its_name_and_is_finished_on_the_next_start(
    tmp_path: Path, immutable: Immutable, watch: StartWatch
) -> None:
    root = tmp_path / "outputs"
    trash = root / "_ckptkeeper" / "trash"
    w = _watch_with_a_stuck_trash_entry(root, immutable, watch)
    [left] = wait_until(lambda: len(names := os.listdir(trash)) == 1 and names, 10, w.describe)  # 2 and 6 went
    assert left.endswith(".checkpoint-4") and checkpoint_step(left) is None
    [said] = error_lines(w)
    assert f"could not finish deleting {trash / left}: {EPERM} (retried at every full rescan)" in said
    w.wait_log("run/checkpoint-4 deleted: freed ")  # logged (and journaled) as done once renamed
    seen = wait_full_rescans(w, 2)
    assert len(error_lines(w)) == 1  # said once, though retried at every full rescan
    assert w.alive() and healthz(w) == (200, "ok") and seen >= 3

    assert w.terminate()[0] == 0
    immutable.clear_all()
    again = watch(root, "--keep", "last:1", *SETTLE_0, *NO_RESCAN)
    again.wait_log(f"finished removing {left}, left in the trash by an interrupted run")
    wait_until(lambda: os.listdir(trash) == [], 10, again.describe)
    assert again.terminate()[0] == 0
    assert_no_traceback(w)
    assert_no_traceback(again)


def test_watch_retries_a_stuck_trash_entry_on_a_later_rescan(
    tmp_path: Path, immutable: Immutable, watch: StartWatch
) -> None:
    root = tmp_path / "outputs"
    trash = root / "_ckptkeeper" / "trash"
    w = _watch_with_a_stuck_trash_entry(root, immutable, watch)
    immutable.clear_all()
    seen = full_rescans(w)
    wait_full_rescans(w, seen + 1)  # two full rescans after the entry became removable
    defect_unless(os.listdir(trash) == [], f"still in the trash after two full rescans: {os.listdir(trash)}")
    w.wait_log("on a retry")
    finished = [e for e in journal(root / "_ckptkeeper") if e["action"] == "finish-trash"]
    assert [e["why"] for e in finished] == ["deleted on a retry"]
    assert w.terminate()[0] == 0


def test_watch_journals_a_removal_that_failed_inside_the_trash(
    tmp_path: Path, immutable: Immutable, watch: StartWatch
) -> None:
    root = tmp_path / "outputs"
    _watch_with_a_stuck_trash_entry(root, immutable, watch)

    def journaled() -> bool:
        return any(e["action"] == "error" and "checkpoint-4" in json.dumps(e) for e in journal(root / "_ckptkeeper"))

    try:
        wait_until(journaled, 5, "an error entry for checkpoint-4 in the journal")
    except AssertionError as e:
        raise Defect(f"{e}: {journal(root / '_ckptkeeper')}") from None


# ============================================================================================== 3. readers
READER = textwrap.dedent(
    """
    import hashlib, json, os, sys, threading
    directory, expected, held_name = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    held = open(os.path.join(directory, held_name), "rb")  # open before the removal, read after it
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    full = enoent = passes = 0
    partial = []
    while not stop.is_set():
        for name, digest in expected.items():
            try:
                f = open(os.path.join(directory, name), "rb")
            except FileNotFoundError:
                enoent += 1
                continue
            with f:
                if hashlib.sha256(f.read()).hexdigest() == digest:
                    full += 1
                else:
                    partial.append(name)
        passes += 1
        if passes == 1:
            print("READY", flush=True)
    held_ok = hashlib.sha256(held.read()).hexdigest() == expected[held_name]
    held.close()
    print(json.dumps({"full": full, "enoent": enoent, "partial": partial, "passes": passes, "held_ok": held_ok}))
    """
)


@pytest.mark.parametrize("command", ["prune", "watch"])
def test_removal_while_other_processes_hold_files_open_and_read_the_checkpoint(
    tmp_path: Path, mounts: Mount, watch: StartWatch, command: str
) -> None:
    fs = mounts("root-fs", "64m")  # a filesystem of its own: its space accounting is this test's alone
    root = fs / "outputs"
    run = root / "run"
    big = 8 << 20
    simulate_run(run, replace(THREE, steps_per_epoch=2, optimizer_bytes=big))  # 1, 2
    doomed = run / "checkpoint-1"
    expected = {rel: digest for rel, (size, digest) in manifest(doomed).items() if size >= 0}
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(doomed), json.dumps(expected), "optimizer.pt"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    mine = os.open(doomed / "optimizer.pt", os.O_RDONLY)  # and this process holds it open too
    try:
        assert reader.stdout is not None and reader.stdin is not None
        assert reader.stdout.readline().strip() == "READY"
        head = os.read(mine, 1 << 20)

        if command == "prune":
            done = cli("prune", root, "--keep", "last:1")
            assert done.exit_code == 0, done.output
            assert done.stdout.splitlines()[2].startswith("deleted       run/checkpoint-1  ")
        else:
            w = watch(root, "--keep", "last:1", *SETTLE_0, *NO_RESCAN)
            w.wait_log("run/checkpoint-1 deleted: freed ")
        wait_until(lambda: os.listdir(root / "_ckptkeeper" / "trash") == [], 10, "the trash to be emptied")
        assert steps(run) == [2] and not doomed.exists()
        # Unlinked but open: its blocks are still in use, and an open descriptor reads the whole file.
        assert os.fstat(mine).st_nlink == 0
        in_use = used_bytes(fs)
        rest = b"".join(iter(lambda: os.read(mine, 1 << 20), b""))
        assert hashlib.sha256(head + rest).hexdigest() == expected["optimizer.pt"]

        reader.stdin.close()
        summary = json.loads(reader.stdout.readline())
        assert reader.wait(30) == 0
    finally:
        os.close(mine)
        if reader.poll() is None:
            reader.kill()
            reader.wait(30)
    assert summary["partial"] == [], summary  # never a short or mixed file under the checkpoint's name
    assert summary["held_ok"], summary
    assert summary["full"] >= len(expected) and summary["enoent"] > 0, summary  # it read before and after
    # Both descriptors closed: now the space comes back.
    wait_until(lambda: in_use - used_bytes(fs) >= big, 10, lambda: f"{big} bytes freed ({used_bytes(fs)} in use)")
    if command == "watch":
        assert w.terminate()[0] == 0
        assert_no_traceback(w)


# ============================================================================================== 4. two instances
def test_a_watch_holding_the_root_refuses_prune_and_a_second_watch_until_it_is_killed(
    tmp_path: Path, watch: StartWatch
) -> None:
    root = tmp_path / "outputs"
    run = root / "run"
    simulate_run(run, SMALL)
    lock = root / "_ckptkeeper.lock"
    first = watch(root, "--keep", "last:4", *SETTLE_0, *NO_RESCAN)  # keeps everything: only the lock matters
    first.wait_log("watching ")

    refused = ckpt("prune", root, "--keep", "last:1")
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert refused.stderr == (
        f"Error: another ckptkeeper (pid {first.pid} on {socket.gethostname()}) is already working on {root}; "
        f"only one instance may run per root (lock: {lock})\n"
    )
    assert steps(run) == [2, 4, 6, 8]
    second = watch(root, "--keep", "last:1", *SETTLE_0)
    assert second.wait_exit() == 4, second.describe()
    assert f"pid {first.pid} on {socket.gethostname()}" in second.log()
    assert steps(run) == [2, 4, 6, 8] and first.alive()

    first.proc.send_signal(signal.SIGKILL)
    first.wait_exit()
    assert lock.read_text().startswith(f"pid {first.pid} ")  # stale: it still names the dead holder

    done = ckpt("prune", root, "--keep", "last:1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert steps(run) == [8]
    third = watch(root, "--keep", "last:1", *SETTLE_0, *NO_RESCAN)
    third.wait_log("watching ")
    assert lock.read_text().startswith(f"pid {third.pid} ")
    assert third.terminate()[0] == 0


# ============================================================================================== 5. root replaced
# Deleting and recreating the root is covered by tests/test_watch.py; here the old root is moved away
# (`mv outputs outputs.old && mkdir outputs`), so the directory the watcher followed still exists, elsewhere.
@pytest.mark.parametrize("mode", ["inotify", "polling"])
def test_the_root_moved_away_and_replaced_the_old_tree_is_left_alone(
    tmp_path: Path, watch: StartWatch, mode: str
) -> None:
    root, moved = tmp_path / "outputs", tmp_path / "outputs.old"
    simulate_run(root / "old", SMALL)
    w = watch(
        root, "--keep", "last:1", "--settle", "0.3", *NO_RESCAN, *(["--poll", "0.2"] if mode == "polling" else [])
    )
    wait_until(lambda: steps(root / "old") == [8], 15, w.describe)

    os.rename(root, moved)
    root.mkdir()
    wait_until(
        lambda: "was deleted and created again" in w.log() or "is back; watching it again" in w.log(),
        15,
        lambda: f"the daemon to notice the new root: {w.describe()}",
    )
    simulate_run(moved / "after", SMALL)  # below the old root: no longer ckptkeeper's to prune
    simulate_run(root / "new", SMALL)
    wait_until(lambda: steps(root / "new") == [8], 15, w.describe)
    w.wait_log("new/checkpoint-6 deleted: ")
    assert steps(moved / "after") == [2, 4, 6, 8]
    assert "after/" not in w.log() and not [e for e in journal(moved / "_ckptkeeper") if e.get("run") == "after"]
    assert (root / "_ckptkeeper" / "lock").read_text().startswith(f"pid {w.pid} ")  # it locked the new root
    assert (moved / "_ckptkeeper" / "lock").read_text() == ""  # and released the old one's
    assert w.alive(), w.describe()
    assert w.terminate()[0] == 0
    assert_no_traceback(w)
    assert steps(moved / "after") == [2, 4, 6, 8]


# ============================================================================================== 6. read-only root
def test_plan_works_and_prune_explains_on_a_read_only_root(tmp_path: Path, ro_mounts: list[Path]) -> None:
    source = tmp_path / "outputs"
    simulate_run(source / "run", SMALL)
    expected_plan = cli("plan", source, "--keep", "last:1")
    assert expected_plan.exit_code == 0
    ro = bind_read_only(ro_mounts, source, tmp_path / "ro")
    before = tree_stamps(source)

    plan = cli("plan", ro, "--keep", "last:1")
    assert plan.exit_code == 0, plan.output
    assert plan.stdout == expected_plan.stdout.replace(str(source), str(ro))

    prune = ckpt("prune", ro, "--keep", "last:1")
    assert prune.returncode == 1, prune.stdout + prune.stderr
    assert prune.stderr == f"Error: cannot use the state directory {ro / '_ckptkeeper'}: {EROFS}\n"
    assert tree_stamps(source) == before

    # With the state directory elsewhere the lock is taken, and each removal says why it cannot be done.
    state = tmp_path / "state"
    elsewhere = cli("prune", ro, "--keep", "last:1", "--state-dir", state)
    assert elsewhere.exit_code == 1, elsewhere.output
    assert elsewhere.stdout.splitlines()[2:5] == [
        f"FAILED        run/checkpoint-{s}  (cannot move {ro}/run/checkpoint-{s} to the trash: {EROFS})"
        for s in (2, 4, 6)
    ]
    assert tree_stamps(source) == before
    assert [e["action"] for e in journal(state)] == ["start-delete", "error"] * 3


def test_watch_on_a_read_only_root_exits_with_a_message_or_runs_with_the_state_elsewhere(
    tmp_path: Path, ro_mounts: list[Path], watch: StartWatch
) -> None:
    source = tmp_path / "outputs"
    simulate_run(source / "run", SMALL)
    (source / "_ckptkeeper").mkdir()  # left by an earlier run: nothing can be created in it now
    ro = bind_read_only(ro_mounts, source, tmp_path / "ro")
    before = tree_stamps(source)

    w = watch(ro, "--keep", "last:1", *SETTLE_0)
    assert w.wait_exit() == 1, w.describe()
    assert re.fullmatch(rf"Error: cannot watch {ro}: {EROFS} \({ro}/_ckptkeeper/\w+\)\n", w.log()), w.describe()

    elsewhere = watch(ro, "--keep", "last:1", *SETTLE_0, *RESCAN_1S, "--state-dir", str(tmp_path / "state"))
    wait_until(lambda: len(error_lines(elsewhere, EROFS)) >= 3, 15, elsewhere.describe)  # 2, 4, 6 at least once
    wait_until(lambda: starts(tmp_path / "state", "start-delete", "checkpoint-2") >= 3, 20, elsewhere.describe)
    assert elsewhere.alive(), elsewhere.describe()
    assert len(error_lines(elsewhere, "run/checkpoint-2 could not be removed: ")) == 1
    assert tree_stamps(source) == before
    assert elsewhere.terminate()[0] == 0
    assert_no_traceback(elsewhere)


# ============================================================================================== 7. EXDEV
def many_files_checkpoint(run: Path, step: int, directories: int = 100, files: int = 100) -> Path:
    """A complete checkpoint of 10 000 small files: deleting it takes long enough to be interrupted."""
    checkpoint = run / f"checkpoint-{step}"
    payload = os.urandom(64)
    for d in range(directories):
        shard = checkpoint / f"shard-{d:03d}"
        shard.mkdir(parents=True)
        for f in range(files):
            (shard / f"part-{f:03d}.bin").write_bytes(payload)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return checkpoint


def kill_mid_delete(proc: subprocess.Popen[bytes], trash: Path, entries: int, what: Callable[[], str]) -> Path:
    """SIGKILL `proc` as soon as the trash entry it is deleting has lost some of its `entries`."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            [entry] = os.listdir(trash)
            if len(os.listdir(trash / entry)) < entries:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                return trash / entry
        except (FileNotFoundError, ValueError):
            pass
        if proc.poll() is not None:
            pytest.fail(f"it finished before it could be killed mid-delete: {what()}")
    pytest.fail(f"no deletion in {trash} within 30 s: {what()}")


@pytest.mark.parametrize(
    "layout, command",
    [
        ("run directory is a tmpfs mount point", "prune"),
        ("run directory is a tmpfs mount point", "watch"),
        ("--state-dir on another filesystem", "prune"),
    ],
)
def test_sigkill_mid_delete_with_the_run_on_another_filesystem_than_the_state(
    tmp_path: Path, mounts: Mount, watch: StartWatch, layout: str, command: str
) -> None:
    # Both on tmpfs mounts of their own: 10 000 files are quick to write there, and nobody else's I/O interferes.
    args: list[str] = []
    if layout == "run directory is a tmpfs mount point":
        root = tmp_path / "outputs"
        mounts("run-fs", "96m", at=root / "exp")
        state_dir = root / "_ckptkeeper"
    else:
        root = mounts("root-fs", "96m") / "outputs"
        state_dir = tmp_path / "state"
        args = ["--state-dir", str(state_dir)]
    run = root / "exp"
    doomed = many_files_checkpoint(run, 1)
    many_files_checkpoint(run, 2, directories=1, files=3)  # the newest, kept
    whole = {2: manifest(run / "checkpoint-2")}
    entries = len(os.listdir(doomed))
    local_trash = run / RUN_TRASH_NAME

    if command == "prune":
        proc = subprocess.Popen(
            [sys.executable, "-m", "ckptkeeper", "prune", str(root), "--keep", "last:1", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        entry = kill_mid_delete(proc, local_trash, entries, lambda: f"prune exited {proc.returncode}")
    else:
        w = watch(root, "--keep", "last:1", *SETTLE_0, *NO_RESCAN, *args)
        entry = kill_mid_delete(w.proc, local_trash, entries, w.describe)

    # The atomic rename into the state directory was impossible (EXDEV): the checkpoint went, whole and in one
    # rename, to a trash beside it, and is half deleted there, under a name that is not a checkpoint's.
    assert entry.exists() and 0 < len(os.listdir(entry)) < entries
    assert entry.name.endswith(".checkpoint-1") and checkpoint_step(entry.name) is None
    assert not os.path.exists(state_dir / "trash") or os.listdir(state_dir / "trash") == []
    under_names = {p: manifest(p) for p in root.rglob("checkpoint-*") if checkpoint_step(p.name) is not None}
    assert under_names == {run / "checkpoint-2": whole[2]}  # nothing half-deleted under a checkpoint name
    begun = [(e["action"], e.get("checkpoint")) for e in journal(state_dir)]
    assert ("start-delete", "checkpoint-1") in begun  # written before the rename

    # The next start finishes it, and the journal accounts for all of it.
    if command == "prune":
        again = cli("prune", root, "--keep", "last:1", *args)
        assert again.exit_code == 0, again.output
        assert (
            again.stdout.splitlines()[2] == f"finished removing {entry.name}, left in the trash by an interrupted run"
        )
    else:
        restarted = watch(root, "--keep", "last:1", *SETTLE_0, *NO_RESCAN, *args)
        restarted.wait_log(f"finished removing {entry.name}, left in the trash by an interrupted run")
        assert restarted.terminate()[0] == 0
        assert_no_traceback(restarted)
    assert not local_trash.exists()
    assert steps(run) == [2] and manifest(run / "checkpoint-2") == whole[2]
    accounted = [(e["action"], e.get("checkpoint") or e.get("entry")) for e in journal(state_dir)]
    assert accounted[0] == ("start-delete", "checkpoint-1")
    assert accounted[-1] == ("finish-trash", entry.name)
    assert set(accounted[1:-1]) <= {("delete", "checkpoint-1")}  # watch: journaled once renamed (the reaper deletes)
