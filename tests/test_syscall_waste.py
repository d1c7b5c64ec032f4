"""What issue #12's strace found wasted, taken out without losing what each call was for: the mount table is
read again only when the kernel says it changed (a mount made a moment ago is still seen by the removal
guard), and the journal is held open between lines (a journal rotated, removed or cut short by a crash is
still handled as when it was opened for every line)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cliutil import bind_mount

from ckptkeeper.actions import ActionError, delete_checkpoint, mount_points_below
from ckptkeeper.paths import MountTable
from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.state import JOURNAL_NAME, StateDir

SMALL = SimConfig(steps_per_epoch=10, epochs=1, save_steps=5, eval_steps=5)  # checkpoints 5, 10


def test_the_mount_table_is_read_again_only_after_a_mount_or_an_unmount(
    tmp_path: Path, mount: Callable[..., Path]
) -> None:
    table = MountTable()
    first = table.mounts()
    assert table.reads == 1 and first
    assert table.mounts() == first and table.reads == 1  # nothing changed: not read again
    fs = mount("tmpfs", "fs")
    found = table.mounts()
    assert table.reads == 2 and ("/" + "/".join(found[-1].point)) == str(fs)
    assert table.mounts() == found and table.reads == 2
    subprocess.run(["umount", str(fs)], check=True)
    assert table.mounts() == first and table.reads == 3


def test_the_types_a_device_is_mounted_with_follow_the_table(tmp_path: Path, mount: Callable[..., Path]) -> None:
    """kernel_sets_ctimes asks types_of for every checkpoint a scan judges: no copy of the table, and a mount
    made since the last question is seen by the next one (the scan memo's trust depends on it)."""
    table = MountTable()
    root_device = os.stat("/").st_dev
    assert table.types_of(f"{os.major(root_device)}:{os.minor(root_device)}")  # / is mounted with some type
    fs = mount("tmpfs", "fs")
    device = os.stat(fs).st_dev
    wanted = f"{os.major(device)}:{os.minor(device)}"
    assert table.types_of(wanted) == frozenset({"tmpfs"}) and table.reads == 2
    assert table.types_of(wanted) == frozenset({"tmpfs"}) and table.reads == 2  # not read again
    subprocess.run(["umount", str(fs)], check=True)
    assert table.types_of(wanted) == frozenset() and table.reads == 3


def test_a_mount_made_inside_a_checkpoint_after_earlier_looks_still_stops_its_removal(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    root = tmp_path / "out"
    simulate_run(root / "run", SMALL)
    checkpoint = root / "run" / "checkpoint-5"
    assert mount_points_below(checkpoint) == []  # the table is read (and held) before the mount
    state = StateDir(root / "_ckptkeeper")
    (tmp_path / "elsewhere").mkdir()
    with bind_mount(tmp_path / "elsewhere", checkpoint / "mounted"):
        (tmp_path / "elsewhere" / "precious").write_text("not the checkpoint's")
        with pytest.raises(ActionError, match="a filesystem is mounted inside it"):
            delete_checkpoint(root, checkpoint, state)
    state.close()
    assert (tmp_path / "elsewhere" / "precious").read_text() == "not the checkpoint's"
    assert checkpoint.is_dir()


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_journal_is_held_open_and_follows_its_name(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.record({"action": "one"})
    held = os.stat(state.journal_path).st_ino
    state.record({"action": "two"})
    assert [e["action"] for e in lines(state.journal_path)] == ["one", "two"]
    os.rename(state.journal_path, tmp_path / "state" / "journal.old")  # rotated away
    state.record({"action": "three"})
    assert [e["action"] for e in lines(state.journal_path)] == ["three"]
    assert os.stat(state.journal_path).st_ino != held
    state.journal_path.unlink()  # removed
    state.record({"action": "four"})
    assert [e["action"] for e in lines(state.journal_path)] == ["four"]
    state.close()


def test_a_line_cut_short_under_a_held_journal_is_not_joined_to_the_next(tmp_path: Path) -> None:
    """A line another writer left cut short (a crash of an earlier instance, here written from outside while
    the journal is held): the next line starts on a fresh line, as it did when each line opened the file."""
    state = StateDir(tmp_path / "state")
    state.record({"action": "one"})
    with open(state.journal_path, "a") as f:
        f.write('{"action": "cut sh')
    state.record({"action": "two"})
    first, cut, second = state.journal_path.read_text().splitlines()
    assert (json.loads(first)["action"], cut, json.loads(second)["action"]) == ("one", '{"action": "cut sh', "two")
    state.close()


def test_a_journal_replaced_by_a_symlink_is_refused_as_before(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.record({"action": "one"})
    (tmp_path / "elsewhere").write_text("")
    state.journal_path.unlink()
    os.symlink(tmp_path / "elsewhere", state.journal_path)
    with pytest.raises(OSError):
        state.record({"action": "two"})
    assert (tmp_path / "elsewhere").read_text() == ""
    assert (tmp_path / "state" / JOURNAL_NAME).is_symlink()
    state.close()


def test_prune_in_process_leaves_no_descriptor_open(tmp_path: Path) -> None:
    """`prune` called again and again in one process (a notebook, a test suite) keeps no descriptor of the state
    directory: each pass lets go of its lock and its directories."""
    from click.testing import CliRunner

    from ckptkeeper.cli import main

    root = tmp_path / "outputs"
    simulate_run(root / "exp", SimConfig(steps_per_epoch=10, epochs=1, save_steps=5, eval_steps=5))
    CliRunner().invoke(main, ["prune", str(root), "--keep", "last:100"])  # the mount table, opened once
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        result = CliRunner().invoke(main, ["prune", str(root), "--keep", "last:100"])
        assert result.exit_code == 0, result.output
    assert len(os.listdir("/proc/self/fd")) == before
