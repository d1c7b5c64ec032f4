"""The state directory: the per-root lock (between real processes) and the journal."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptkeeper.state import LockHeld, StateDir

HOLDER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from ckptkeeper.state import StateDir
    state = StateDir(Path(sys.argv[1]))
    state.acquire_lock(Path(sys.argv[2]))
    print("LOCKED", os.getpid(), flush=True)
    sys.stdin.read()  # hold the lock until stdin closes (or the process is killed)
    state.release_lock()
    print("RELEASED", flush=True)
    """
)

CONTENDER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from ckptkeeper.state import LockHeld, StateDir
    state = StateDir(Path(sys.argv[1]))
    try:
        state.acquire_lock(Path(sys.argv[2]))
    except LockHeld as e:
        print(e)
        sys.exit(4)
    print("ACQUIRED", os.getpid())
    state.release_lock()
    """
)


def contend(state_dir: Path, root: Path) -> subprocess.CompletedProcess[str]:
    """Try to take the lock in a fresh process; exit 0 when it got it, 4 with the message when refused."""
    return subprocess.run(
        [sys.executable, "-c", CONTENDER, str(state_dir), str(root)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock of tmp_path/root, started and ended by this fixture."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "root" / "_ckptkeeper"), str(tmp_path / "root")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the holder has the lock (or has died: then it is empty)
    assert line.split() == ["LOCKED", str(proc.pid)], line
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()  # our own child, by its handle
        proc.wait(timeout=60)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir(exist_ok=True)
    return tmp_path / "root"


def test_a_second_instance_in_another_process_is_refused_naming_the_holder(
    root: Path, holder: subprocess.Popen[str]
) -> None:
    state = StateDir(root / "_ckptkeeper")
    with pytest.raises(LockHeld) as refused:
        state.acquire_lock(root)
    message = str(refused.value)
    assert f"pid {holder.pid} " in message
    assert str(root) in message and "only one instance" in message

    other = contend(root / "_ckptkeeper", root)
    assert other.returncode == 4
    assert f"pid {holder.pid} " in other.stdout


def test_the_lock_of_a_killed_holder_is_free_again(root: Path, holder: subprocess.Popen[str]) -> None:
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=60) == -signal.SIGKILL
    lock_file = root / "_ckptkeeper" / "lock"
    assert f"pid {holder.pid} " in lock_file.read_text()  # stale: the dead holder is still written there

    state = StateDir(root / "_ckptkeeper")
    state.acquire_lock(root)
    try:
        assert lock_file.read_text().startswith(f"pid {os.getpid()} ")
        assert contend(root / "_ckptkeeper", root).returncode == 4
    finally:
        state.release_lock()
    assert contend(root / "_ckptkeeper", root).returncode == 0


def test_a_released_lock_can_be_taken_by_the_next_process(root: Path, holder: subprocess.Popen[str]) -> None:
    assert holder.stdin is not None and holder.stdout is not None
    assert contend(root / "_ckptkeeper", root).returncode == 4
    holder.stdin.close()
    assert holder.stdout.readline().strip() == "RELEASED"
    assert holder.wait(timeout=60) == 0
    taken = contend(root / "_ckptkeeper", root)
    assert taken.returncode == 0, taken.stdout + taken.stderr


def test_two_state_dirs_in_one_process_exclude_each_other_and_release_is_idempotent(root: Path) -> None:
    first, second = StateDir(root / "_ckptkeeper"), StateDir(root / "_ckptkeeper")
    first.acquire_lock(root)
    with pytest.raises(LockHeld, match=rf"pid {os.getpid()} "):
        second.acquire_lock(root)
    first.release_lock()
    first.release_lock()
    second.acquire_lock(root)
    second.release_lock()
    assert (root / "_ckptkeeper" / "trash").is_dir()  # taking the lock creates the state directory


def test_journal_appends_and_reads_back_in_order_with_a_utc_time(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.create()
    assert state.read_journal() == []
    state.record({"action": "delete", "run": "exp1", "checkpoint": "checkpoint-5", "step": 5, "bytes": 10})
    state.record({"action": "archive", "run": ".", "checkpoint": "checkpoint-7", "step": 7, "bytes": 20})

    entries = state.read_journal()
    assert [(e["action"], e["checkpoint"]) for e in entries] == [
        ("delete", "checkpoint-5"),
        ("archive", "checkpoint-7"),
    ]
    for entry in entries:
        when = dt.datetime.fromisoformat(entry["time"])
        assert when.utcoffset() == dt.timedelta(0)
        assert abs(dt.datetime.now(dt.UTC) - when) < dt.timedelta(minutes=5)
    lines = state.journal_path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)


def test_journal_skips_a_partial_last_line_and_a_garbled_one(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.create()
    state.record({"action": "delete", "checkpoint": "checkpoint-1"})
    with open(state.journal_path, "a") as f:
        f.write("not json at all\n")
    state.record({"action": "delete", "checkpoint": "checkpoint-2"})
    with open(state.journal_path, "a") as f:
        f.write('{"time": "2025-01-01T00:00:00.000+00:00", "action": "del')  # a crash cut this write short

    assert [e["checkpoint"] for e in state.read_journal()] == ["checkpoint-1", "checkpoint-2"]


def test_an_entry_recorded_after_a_cut_short_line_is_not_lost_with_it(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.create()
    state.record({"action": "delete", "checkpoint": "checkpoint-1"})
    with open(state.journal_path, "a") as f:
        f.write('{"time": "2025-01-01T00:00:00.000+00:00", "action": "del')  # a crash cut this write short

    state.record({"action": "delete", "checkpoint": "checkpoint-3"})

    assert [e["checkpoint"] for e in state.read_journal()] == ["checkpoint-1", "checkpoint-3"]
    assert state.journal_path.read_text().endswith("\n")


def test_journal_can_be_written_before_anything_else_created_the_state_dir(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "fresh" / "_ckptkeeper")
    state.record({"action": "error", "checkpoint": "checkpoint-1"})
    assert [e["action"] for e in state.read_journal()] == ["error"]


@pytest.mark.parametrize("linked", ["state dir", "trash"])
def test_a_state_directory_or_trash_that_is_a_symlink_is_refused(tmp_path: Path, linked: str) -> None:
    """The trash is emptied without asking: through a link it would be somebody else's directory."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "trash").mkdir(parents=True)
    precious = elsewhere / "trash" / "precious.txt"
    precious.write_text("not ckptkeeper's")
    state_path = tmp_path / "root" / "_ckptkeeper"
    state_path.parent.mkdir()
    if linked == "state dir":
        state_path.symlink_to(elsewhere)
    else:
        state_path.mkdir()
        (state_path / "trash").symlink_to(elsewhere / "trash")
    with pytest.raises(OSError, match="not a directory of its own"):
        StateDir(state_path).acquire_lock(tmp_path / "root")
    assert precious.read_text() == "not ckptkeeper's"
