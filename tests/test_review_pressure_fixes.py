"""Adversarial review of the fixes made after the first disk-pressure review (#19; tests/test_review_pressure.py):
the unseen-free record of the watch daemon (unseen.py), the pass after the reaper drains (watch.py), the archive
device judged last (pressure.apply), the trimmed releases, the figures per filesystem (engine.measure, metrics).
Each test names a defect, on real filesystems (tmpfs mounted here, a FUSE passthrough) through the CLI, the
daemon as a process, or the library with real scans and measurements (UnseenFrees takes the time as an
argument: it is driven with explicit times, as the daemon's passes give them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from cliutil import bind_mount
from test_review_pressure import (  # `mount` is a fixture
    DAY,
    MB,
    age,
    another_pass,
    checkpoint,
    cli,
    fill,
    floor_for,
    fuse_with_control,
    scrape,
    series,
    verdicts,
)
from watchutil import StartWatch, Watch, wait_until

from ckptkeeper.engine import Pipeline
from ckptkeeper.policy import Policy
from ckptkeeper.pressure import PressurePolicy, parse_floor
from ckptkeeper.rules import parse_rules
from ckptkeeper.unseen import PATIENCE, UnseenFrees

Mount = Callable[..., Path]


@pytest.fixture
def fs(mount: Mount) -> Mount:
    """fs(name, size) -> a fresh tmpfs at tmp_path/name, unmounted at the end (test_review_pressure's `mount`)."""
    return lambda name, size="32m": mount("tmpfs", name, f"size={size}")


def healthz(w: Watch) -> str:
    address = wait_until(lambda: _address(w), 15, w.describe)
    with urllib.request.urlopen(f"{address}/healthz", timeout=5) as response:
        return str(response.read().decode())


def _address(w: Watch) -> str | None:
    for line in w.lines():
        if "serving metrics on " in line:
            return line.split("serving metrics on ")[1].split("/metrics")[0]
    return None


# ---------------------------------------------------------------------------------------------- unseen frees
class Passes:
    """The daemon's bookkeeping of unseen frees over one root, driven pass by pass at given times: each pass
    scans and measures for real (as Reconciler._plan does); a removal is the real deletion of a checkpoint (a
    delete, and the reaper's unlink), reported to `freed` as Reconciler._on_outcome reports it."""

    def __init__(self, root: Path, state: Path) -> None:
        policy = Policy(parse_rules("last:100"), pressure=PressurePolicy(parse_floor("1")))
        self.pipeline = Pipeline.checked(root, policy, state_dir=state)
        self.unseen = UnseenFrees()
        self.log: list[tuple[float, int]] = []  # (when, bytes) of every removal

    def freed_since(self, since: float) -> int:
        return sum(n for when, n in self.log if when >= since)

    def at(self, now: float, remove: str | None = None) -> int:
        """One pass at `now`: the unseen bytes it counts on the root's one filesystem; then `remove` removed."""
        runs = self.pipeline.scan(self.pipeline.find_runs(), None)
        measured = self.pipeline.measure(runs)
        assert measured is not None
        unseen = sum(self.unseen.adjust(measured, runs, now).unseen.values())
        freed: dict[str, int] = {}
        for run in runs:
            for c in run.checkpoints:
                if c.name == remove:
                    shutil.rmtree(self.pipeline.root / run.path / c.name)
                    freed[run.path] = c.size_bytes
                    self.log.append((now, c.size_bytes))
        assert remove is None or freed, remove
        self.unseen.freed(freed, now)
        return unseen


def test_space_freed_long_ago_is_counted_as_long_as_the_daemon_keeps_freeing(fs: Mount, tmp_path: Path) -> None:
    """unseen.UnseenFrees.freed makes each pass that frees something a new record whose `owed` carries what
    was still unseen from before (`earlier`) and whose deadline is now + PATIENCE: the deadline of the earlier
    bytes is renewed. A big checkpoint whose weights an evaluation job holds open (unlinked, it frees nothing)
    is then counted as free for as long as the daemon frees anything at least every 5 minutes (a trainer that
    saves every few minutes with `last:N`: every save deletes one): here all its 4 MB, 600 s after it was
    freed, though the two small removals since showed at once. README: "at most what was freed and for at
    most 5 minutes (then it says so, and trusts statvfs again)": at most the 1 MB freed in the last 5 minutes.
    Fix: keep each freeing with its own deadline (a list of (bytes, deadline)); count min(deficit, the sum of
    those not expired), and warn as each expires."""
    disk = fs("fs")
    root, when = disk / "outputs", time.time() - 2 * DAY
    checkpoint(root / "run", 10, weights=4 * MB, when=when)
    for step in (20, 30, 40):
        checkpoint(root / "run", step, weights=MB, when=when + step)
    passes = Passes(root, tmp_path / "state")
    with open(root / "run" / "checkpoint-10" / "model.safetensors", "rb"):  # an evaluation job reads it
        passes.at(0.0, remove="checkpoint-10")
        assert passes.at(PATIENCE * 2 / 3, remove="checkpoint-20") > 4 * MB * 9 // 10  # as documented, so far
        passes.at(PATIENCE * 4 / 3, remove="checkpoint-30")
        late = passes.at(PATIENCE * 2)
    freed_lately = passes.freed_since(PATIENCE)  # checkpoint-30, 200 s ago
    assert late <= freed_lately, f"{late} bytes counted as still to come, {PATIENCE * 2:.0f} s after the release"


def test_others_writing_grow_the_unseen_count_beyond_what_was_freed_lately(fs: Mount, tmp_path: Path) -> None:
    """The same renewal, with nothing held open: whatever someone else writes on the filesystem after a removal
    makes "free + the bytes of the runs" fall short of the record, and each removal carries that shortfall on
    (`earlier`) with a new deadline. Another job writing 0.6 MB between the daemon's removals of 1 MB (every
    200 s) is counted as space still to come, more at every pass: after five removals 3 MB of real pressure
    is hidden, nearly three times the one removal of the last 5 minutes (all shown as free at once: tmpfs).
    README: "at most what was freed and for at most 5 minutes"."""
    disk = fs("fs")
    root, when = disk / "outputs", time.time() - 2 * DAY
    for step in (10, 20, 30, 40, 50, 60):
        checkpoint(root / "run", step, weights=MB, when=when + step)
    passes = Passes(root, tmp_path / "state")
    interval = PATIENCE * 2 / 3
    for n, step in enumerate((10, 20, 30, 40, 50)):
        passes.at(n * interval, remove=f"checkpoint-{step}")
        (disk / f"other-{n}").write_bytes(b"o" * (MB * 6 // 10))  # another job's output on the same disk
    unseen = passes.at(5 * interval)
    freed_lately = passes.freed_since(5 * interval - PATIENCE)  # checkpoint-50, 200 s ago
    assert unseen <= freed_lately, f"{unseen} bytes counted as still to come"


def test_an_archive_on_the_same_filesystem_is_not_counted_as_space_to_come(
    fs: Mount, tmp_path: Path, watch: StartWatch
) -> None:
    """Reconciler._on_outcome counts every ARCHIVED outcome's bytes as freed (OutcomeKind.frees), whatever
    the archive's filesystem. With --archive-to on the runs' own filesystem an archive is a rename: nothing
    is freed (pressure.frees rightly says 0), but UnseenFrees is told it was, and for the next 5 minutes the
    archived bytes count as free space still to come. A disk under pressure that nothing has changed is
    declared clear at the next pass ("disk pressure is over", ckptkeeper_disk_pressure 0, /healthz without
    its pressure line), and 5 minutes later a warning blames "a file held open?". Fix: count an archive as
    freed only when the archive lies on another filesystem (as pressure.frees does)."""
    disk = fs("fs")
    root, when = disk / "outputs", time.time() - 2 * DAY
    for step in (10, 20, 30, 40):
        checkpoint(root / "run", step, weights=MB, when=when + step)
    rules = ("--keep", "last:2", "--archive-to", str(disk / "archive"))
    floor = floor_for(root, *rules, short=MB // 2)  # archiving 10 and 20 here frees nothing: still short
    w = watch(root, *rules, "--min-free", floor, "--settle", "0.2", "--rescan-interval", "600",
              "--metrics-port", "0", "--state-dir", str(tmp_path / "state"))  # fmt: skip
    w.wait_log("disk pressure begins")
    wait_until((disk / "archive" / "run" / "checkpoint-20").is_dir, 15, w.describe)
    for n in range(2):
        another_pass(w, root / "run", n)
    [v] = verdicts(root, "--keep", "last:2", "--min-free", floor)  # what the disk says now
    assert v["under_pressure"], v["text"]
    assert "disk pressure is over" not in w.log(), w.describe()
    assert "pressure:" in healthz(w), healthz(w)


# ---------------------------------------------------------------------------------------------- metrics
def test_the_pressure_figures_stay_published_while_the_reaper_deletes(
    fs: Mount, tmp_path: Path, watch: StartWatch
) -> None:
    """PressureLog.planned hands DiskGauges.set only the verdicts not deferred for the reaper (FREEING), and
    set() now removes the series of every filesystem it is not given. So a pass made while the reaper still
    deletes, on a disk under pressure (a floor the plan cannot meet, or reported only), removes that disk's
    series: ckptkeeper_disk_pressure (and floor_unmet, free, ...) vanish until the reaper is done, and /healthz
    drops its `pressure:` line. An alert on `ckptkeeper_disk_pressure == 1` resolves and fires again at every
    removal. Fix: leave a deferred disk's series (and the note) as the last measured pass set them; remove only
    the series of filesystems that hold no run any more. (A FUSE passthrough of a tmpfs whose every unlink
    takes 0.1 s keeps the reaper busy for seconds.)"""
    source, mnt, control = fs("source", "64m"), tmp_path / "mnt", tmp_path / "control.json"
    when = time.time() - 2 * DAY
    big = checkpoint(source / "outputs" / "run", 10, when=when)
    (big / "extra").mkdir()
    for n in range(30):
        (big / "extra" / f"f{n}").write_bytes(b"x" * 1000)
    age(big, when)
    for step in (20, 30):
        checkpoint(source / "outputs" / "run", step, when=when + step)
    with fuse_with_control(source, mnt, control):
        root = mnt / "outputs"
        floor = floor_for(root, "--keep", "last:2", short=8 * MB)  # under pressure, whatever is deleted
        control.write_text(json.dumps({"unlink_delay": 0.1}))
        trash = root / "_ckptkeeper" / "trash"
        w = watch(root, "--keep", "last:2", "--min-free", floor, "--settle", "0.2", "--rescan-interval", "600",
                  "--poll", "0.2", "--metrics-port", "0")  # fmt: skip
        w.wait_log("disk pressure begins")
        wait_until(lambda: trash.is_dir() and os.listdir(trash), 15, w.describe)
        another_pass(w, root / "run", 0)
        metrics, health, busy = scrape(w), healthz(w), bool(os.listdir(trash))
        wait_until(lambda: not os.listdir(trash), 30, w.describe)
        another_pass(w, root / "run", 1)
        later = scrape(w)
        w.kill()
    assert busy, "precondition: that pass was planned while the reaper was still deleting"
    assert series(later, "ckptkeeper_disk_pressure"), f"precondition: published once the reaper is done: {later}"
    assert series(metrics, "ckptkeeper_disk_pressure") and "pressure:" in health, f"{metrics}\n{health}"


# ---------------------------------------------------------------------------------------------- archives
def test_an_archive_reached_through_two_paths_is_incoming_once(fs: Mount) -> None:
    """pressure._archived_bytes sums every ARCHIVE decision of the runs on the other filesystems, with no
    `count_once` by identity (as `_planned` and `_candidates` now have): a run directory reached by two
    paths below the root (a bind mount of it) archives one checkpoint, and the archive's filesystem counts
    it twice as incoming. Its verdict is off by a whole checkpoint: it can say "UNDER PRESSURE", "CANNOT MEET
    THE FLOOR" (prune exits 1, floor_unmet=1) where the archive will in fact leave it above its floor.
    Fix: `count_once` there too."""
    disk_a, disk_b = fs("a"), fs("b")
    root, when = disk_a / "outputs", time.time() - 2 * DAY
    for step in (10, 20, 30):
        checkpoint(root / "a", step, weights=MB, when=when + step)
    checkpoint(disk_b / "runs" / "b", 10, weights=MB, when=when)
    rules = ("--keep", "last:2", "--archive-to", str(disk_b / "archive"))
    with bind_mount(disk_b / "runs" / "b", root / "b"):
        b = os.stat(disk_b).st_dev
        [one] = [v for v in verdicts(root, *rules, "--min-free", "1") if v["device"] == b]
        with bind_mount(root / "a", root / "a2"):
            [twice] = [v for v in verdicts(root, *rules, "--min-free", "1") if v["device"] == b]
    size = one["incoming_archive_bytes"]
    assert size > MB, one["text"]  # a/checkpoint-10
    assert twice["incoming_archive_bytes"] == size, twice


# ---------------------------------------------------------------------------------------------- the estimate
def test_a_run_reached_through_two_paths_saves_once(fs: Mount, tmp_path: Path) -> None:
    """The fix that counts a run reached by two paths below the root (a bind mount of it) once covers its
    checkpoints (`count_once` in `_planned` and `_candidates`, `held_bytes`), not its next save:
    pressure._one_disk sums next_save over every run path still training, so the one trainer's next save is
    counted twice, the floor plus next save is a whole checkpoint too high, and with --keep-under-pressure a
    checkpoint is released (here deleted by `prune`) that the floor did not need. Fix: count each run
    directory once (by the identity of its live checkpoint, or of the directory)."""
    disk = fs("fs")
    root, now = disk / "outputs", time.time()
    for i, step in enumerate((10, 20, 30, 40)):  # training: one save every 100 s, the last 100 s ago
        checkpoint(root / "a", step, weights=MB, when=now - 400 + 100 * i)
    rules = ("--keep", "last:4")
    [alone] = verdicts(root, *rules, "--min-free", "1")
    floor = str(alone["free_bytes"] - alone["next_save_bytes"] - MB // 2)  # met, by half a checkpoint
    pressure = ("--min-free", floor, "--keep-under-pressure", "last:1")
    with bind_mount(root / "a", root / "b"):
        [v] = verdicts(root, *rules, *pressure)
        done = cli("prune", root, *rules, *pressure, "--state-dir", tmp_path / "state")
    assert done.exit_code == 0, done.output
    assert v["next_save_bytes"] == alone["next_save_bytes"] and not v["under_pressure"], v["text"]
    assert sorted(p.name for p in (root / "a").iterdir()) == [f"checkpoint-{s}" for s in (10, 20, 30, 40)]


def test_relieving_one_disk_does_not_push_the_archives_disk_under_its_floor(fs: Mount, tmp_path: Path) -> None:
    """The first review's finding (test_archiving_releases_onto_another_runs_filesystem_pushes_it_under_its_floor)
    was fixed by judging the archive's filesystem last, counting what the others archive there: its verdict is
    now right ("UNDER PRESSURE; CANNOT MEET THE FLOOR"), but nothing stops the releases that cause it. The other
    disk is judged first, with no regard for the archive's: its releases still go, and push a disk that holds
    runs (here half a checkpoint above its floor) under the floor that ckptkeeper is there to keep;
    with bigger releases, to no space at all. `prune` says "floor cannot be met" about the disk it has just
    filled itself. Fix: releases archived onto a filesystem that holds runs may take it down to its own floor
    plus next saves, no further (the rest of the shortfall is reported unmet on the first disk)."""
    disk_a, disk_b = fs("a", "24m"), fs("b", "24m")
    root, when = disk_a / "outputs", time.time() - 2 * DAY
    for step in (10, 20, 30):
        checkpoint(root / "a", step, weights=MB, when=when + step)
    checkpoint(disk_b / "runs" / "b", 10, weights=MB, when=when)
    floor = 16 * MB
    fill(disk_a, floor - MB // 2)  # a/checkpoint-10 archived elsewhere meets it
    fill(disk_b, floor + MB // 2)  # met, by half a checkpoint
    rules = ("--keep", "last:3", "--min-free", str(floor))
    with bind_mount(disk_b / "runs" / "b", root / "b"):
        b = os.stat(disk_b).st_dev
        [before] = [v for v in verdicts(root, *rules) if v["device"] == b]
        assert not before["under_pressure"], before["text"]
        archive = ("--archive-to", disk_b / "archive", "--keep-under-pressure", "last:1")
        done = cli("prune", root, *rules, *archive, "--state-dir", tmp_path / "state")
        [after] = [v for v in verdicts(root, *rules) if v["device"] == b]
    assert not after["under_pressure"], f"{after['text']}\nprune said:\n{done.output}"


# ---------------------------------------------------------------------------------------------- prune's exit code
def test_prune_exits_1_when_a_release_it_needed_was_skipped(fs: Mount, tmp_path: Path) -> None:
    """cli.prune decides the exit code for the floor from the plan's verdict (`p.unmet`), made before acting.
    A release that does not happen because the checkpoint changed meanwhile (SKIPPED: "changed since the plan
    was made; left for the next pass"; here an evaluation job writes its results into it) is no error, and
    the verdict said the floor is met: `prune` exits 0 and the disk stays under its floor. There is no next
    pass for `prune`: a trainer's low-disk hook is told the next save is safe when it is not. README: "prune
    exits 1 when the floor cannot be met ... so a low-disk hook can tell that the next save may still fail".
    Fix: exit 1 when a release (or a planned removal the verdict counted) did not free its bytes. (A FUSE
    passthrough holds prune, once checkpoint-10 has left its run, in its next opening of the root, the re-check of
    checkpoint-20's first step: prune deletes trash entries on other threads, so the deletion itself holds
    nothing up.)"""
    source, mnt, control = fs("source", "64m"), tmp_path / "mnt", tmp_path / "control.json"
    when = time.time() - 2 * DAY
    big = checkpoint(source / "outputs" / "run", 10, when=when)
    (big / "extra").mkdir()
    for n in range(30):
        (big / "extra" / f"f{n}").write_bytes(b"x" * 1000)
    age(big, when)
    for step in (20, 30, 40):
        checkpoint(source / "outputs" / "run", step, weights=MB, when=when + step)
    with fuse_with_control(source, mnt, control):
        root = mnt / "outputs"
        rules = ("--keep", "last:3", "--min-free", floor_for(root, "--keep", "last:3", short=MB // 2))
        flags = (*rules, "--keep-under-pressure", "last:1", "--state-dir", str(tmp_path / "state"))
        hold = {"hold_after_rename": "checkpoint-10", "hold_opendir": "/outputs", "hold": 2.0}
        control.write_text(json.dumps({"unlink_delay": 0.1, **hold}))
        prune = subprocess.Popen(
            [sys.executable, "-m", "ckptkeeper", "prune", str(root), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        wait_until(lambda: not (root / "run" / "checkpoint-10").exists() or prune.poll() is not None, 15)
        (root / "run" / "checkpoint-20" / "eval_results.json").write_text('{"eval_loss": 0.5}\n')
        output, _ = prune.communicate(timeout=30)
        [after] = verdicts(root, *rules)
    assert "released run/checkpoint-20" in output and "skipped" in output, output
    assert after["under_pressure"], after["text"]
    assert prune.returncode == 1, output


def test_prune_names_an_unmet_filesystem_with_its_path_escaped(fs: Mount, tmp_path: Path) -> None:
    """cli.prune's new error ("the --min-free floor cannot be met on WHERE") prints Disk.where, a run's path, as
    it is; every other line (the `disk` line, the table, the log) goes through render.shown, which escapes
    control characters so that a directory name holding a newline cannot fake a line of output (the hostile
    corpus' name-run-with-newline). Here the run `exp\\nError: ...` makes the last line of stderr a fake one.
    Fix: shown(p.disk.where)."""
    disk = fs("fs")
    run, when = disk / "outputs" / "exp\nError: all is well", time.time() - 2 * DAY
    for step in (10, 20):
        checkpoint(run, step, weights=MB, when=when + step)
    done = cli("prune", disk / "outputs", "--keep", "last:2", "--min-free", "99%", "--keep-under-pressure", "last:1",
               "--state-dir", tmp_path / "state")  # fmt: skip
    assert done.exit_code == 1, done.output
    assert "floor cannot be met" in done.output and "exp\nError" not in done.output, done.output
