"""`prune` deletes trash entries on deleter threads (`reaper.Deleters`) while it renames the next checkpoints.

What must not change, checked on a real filesystem with `ckptkeeper prune` as a process (or in-process where
the thread that deletes is the point): the outcome lines come in plan order; each removal's journal lines are
its start then its outcome, written once the entry is deleted; a trash entry that cannot be deleted is a
FAILED line and exit 1 while the others go; SIGTERM, SIGINT and SIGKILL with deletions under way end the
process at once (SIGINT: within its grace), every checkpoint whole under its name or out of its run, what was
not deleted in the trash, and the next prune finishes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cliutil import ckptkeeper, per_removal

from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.state import TRASH_ENTRY

KEEP = ("--keep", "last:1", "--no-protect-trainer-best")
Manifest = dict[str, int]


def make_run(root: Path, checkpoints: int, files: int) -> Path:
    """A Trainer-like run of `checkpoints` checkpoints, each with `files` more small files in `shards/`."""
    run = root / "run"
    simulate_run(run, SimConfig(steps_per_epoch=checkpoints, epochs=1, save_steps=1, eval_strategy="no"))
    for step in steps(run):  # in step order: the newest written stays the highest step
        checkpoint = run / f"checkpoint-{step}"
        (checkpoint / "shards").mkdir()
        for i in range(files):
            (checkpoint / "shards" / f"part-{i:05d}.json").write_bytes(b"{}\n")
    return run


def manifest(top: Path) -> Manifest:
    return {str(p.relative_to(top)): p.lstat().st_size for p in top.rglob("*")}


def journal(root: Path) -> list[dict[str, Any]]:
    path = root / "_ckptkeeper" / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def steps(run: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("checkpoint-")) for p in run.glob("checkpoint-*"))


# ---------------------------------------------------------------------------------------------- order
def test_outcomes_in_plan_order_and_each_removal_journaled_start_then_outcome(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    run = make_run(root, 30, 100)  # more than the deleters take at once (IN_FLIGHT): `submit` waits too

    done = ckptkeeper("prune", root, *KEEP)

    assert done.returncode == 0, done.stdout + done.stderr
    removed = list(range(1, 30))
    lines = done.stdout.splitlines()
    assert [line.split()[:2] for line in lines[2:31]] == [["deleted", f"run/checkpoint-{s}"] for s in removed]
    assert lines[31].startswith("Done: removed 29 checkpoints, freed ")
    assert steps(run) == [30] and os.listdir(root / "_ckptkeeper" / "trash") == []
    entries = journal(root)
    assert [(e["action"], e["checkpoint"]) for e in per_removal(entries)] == [
        (action, f"checkpoint-{s}") for s in removed for action in ("start-delete", "delete")
    ]
    starts = [e["checkpoint"] for e in entries if e["action"] == "start-delete"]
    outcomes = [e["checkpoint"] for e in entries if e["action"] == "delete"]
    assert starts == outcomes == [f"checkpoint-{s}" for s in removed]  # both in plan order


def test_the_trash_entries_are_deleted_off_the_main_thread_and_all_before_prune_returns(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ckptkeeper.cli import main

    root = tmp_path / "outputs"
    make_run(root, 6, 50)
    deleted_on: list[str] = []

    def audit(event: str, args: tuple[Any, ...]) -> None:
        if event == "ckptkeeper.delete_tree" and str(args[0]).endswith(tuple(f".checkpoint-{s}" for s in range(1, 6))):
            deleted_on.append(threading.current_thread().name)

    sys.addaudithook(audit)  # stays for the session: it records only while this test's entries are deleted
    result = CliRunner().invoke(main, ["prune", str(root), *KEEP])

    assert result.exit_code == 0, result.output
    assert len(deleted_on) == 5 and all(name.startswith("ckptkeeper-deleter-") for name in deleted_on), deleted_on
    assert not [t for t in threading.enumerate() if t.name.startswith("ckptkeeper-deleter-")]


# ---------------------------------------------------------------------------------------------- failure
@pytest.mark.skipif(os.geteuid() != 0, reason="chattr +i needs root")
def test_a_trash_entry_that_cannot_be_deleted_is_failed_in_its_place_and_exit_1(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    run = make_run(root, 12, 100)
    stuck = run / "checkpoint-5" / "shards" / "part-00042.json"
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(stuck)], check=False).returncode:
        pytest.skip("no immutable attribute here (chattr +i)")
    trash = root / "_ckptkeeper" / "trash"
    try:
        done = ckptkeeper("prune", root, *KEEP)
        [left] = os.listdir(trash)
        subprocess.run(["chattr", "-i", str(trash / left / "shards" / "part-00042.json")], check=True)
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=False, capture_output=True)

    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr == "Error: 1 checkpoint could not be removed (see the FAILED lines above)\n"
    lines = done.stdout.splitlines()[2:13]
    assert [line.split()[:2] for line in lines] == [
        ["FAILED" if s == 5 else "deleted", f"run/checkpoint-{s}"] for s in range(1, 12)
    ]
    where = trash / left / "shards" / "part-00042.json"
    assert lines[4] == (
        f"FAILED        run/checkpoint-5  ({run}/checkpoint-5 was moved to the trash ({trash / left}) but could not "
        f"be removed there: [Errno 1] Operation not permitted: '{where}'; it is finished on the next start)"
    )
    entries = per_removal(journal(root))
    assert [(e["action"], e["checkpoint"]) for e in entries] == [
        (action, f"checkpoint-{s}")
        for s in range(1, 12)
        for action in ("start-delete", "error" if s == 5 else "delete")
    ]
    assert entries[9]["bytes"] == 0 and entries[9]["detail"] == lines[4].split("  (", 1)[1][:-1]
    again = ckptkeeper("prune", root, *KEEP)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.splitlines()[2] == f"finished removing {left}, left in the trash by an interrupted run"
    assert os.listdir(trash) == [] and steps(run) == [12]


# ---------------------------------------------------------------------------------------------- signals
def wait_for_deletions_under_way(root: Path, proc: subprocess.Popen[str]) -> None:
    """Until two removals have started and the trash holds an entry being deleted."""
    trash = root / "_ckptkeeper" / "trash"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        started = sum(e["action"] == "start-delete" for e in journal(root)) if trash.exists() else 0
        if started >= 2 and os.listdir(trash):
            return
        time.sleep(0.002)
    pytest.fail(f"no deletion under way in time (exit {proc.poll()})")


def prune_signalled(root: Path, sig: signal.Signals) -> tuple[subprocess.Popen[str], str, float]:
    """`prune` of every checkpoint but the newest, sent `sig` once deletions are under way: the process, its
    stderr, and how long it took to end after the signal."""
    # As in a terminal: a suite started in the background by a shell inherits SIGINT ignored, which a child keeps
    # (and Python then installs no KeyboardInterrupt); a handler here becomes the default in the child at exec.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ckptkeeper", "prune", str(root), *KEEP],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, inherited)
    wait_for_deletions_under_way(root, proc)
    proc.send_signal(sig)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=30)
    return proc, err, time.monotonic() - sent


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
def test_a_signal_with_deletions_under_way_leaves_only_whole_checkpoints_and_the_trash(
    tmp_path: Path, sig: signal.Signals
) -> None:
    for attempt, files in enumerate((1200, 4000, 12000)):  # on a fast disk, 8 x 1200 can be gone before the signal
        root = tmp_path / f"outputs-{attempt}"
        run = make_run(root, 8, files)
        before = {s: manifest(run / f"checkpoint-{s}") for s in steps(run)}
        proc, err, took = prune_signalled(root, sig)
        if proc.returncode != 0:
            break
    else:
        pytest.fail("prune finished before every signal, with 12,000 files per checkpoint")

    assert took < 10, took  # SIGINT: the deleters stop between two files, within prune's grace
    if sig is signal.SIGINT:
        assert proc.returncode == 1 and err.endswith("Aborted!\n"), err
        assert "Traceback" not in err
    else:
        assert proc.returncode == -sig
    for s in steps(run):  # what is still under its name is whole
        assert manifest(run / f"checkpoint-{s}") == before[s], s
    trash = os.listdir(root / "_ckptkeeper" / "trash")
    assert all(TRASH_ENTRY.fullmatch(name) for name in trash), trash
    left = sorted(trash)
    again = ckptkeeper("prune", root, *KEEP)
    assert again.returncode == 0, again.stdout + again.stderr
    finished = [
        m.group(1) for m in re.finditer(r"^finished removing (\S+), left in the trash", again.stdout, re.MULTILINE)
    ]
    assert sorted(finished) == left
    assert steps(run) == [8] and manifest(run / "checkpoint-8") == before[8]
    assert os.listdir(root / "_ckptkeeper" / "trash") == []
