"""What prune's fifth session took out of each removal (issue #12), each with what it must still do: the re-check's
signature taken through descriptors is the scan's signature, entry for entry; the state directory is still found
deleted at the first use inside a removal; the removal marker, emptied as it is opened, still names a live removal and
covers what a killed engine left; a run's path below the root, split once per run directory, is what the old
formula gave; trash names are still ckptkeeper's and still differ. Real files, no mock of ckptkeeper's code."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from ckptkeeper import pins
from ckptkeeper.actions import ActionError, _split_below, _trash_name
from ckptkeeper.recheck import _signature_at
from ckptkeeper.scan import lstat_signature
from ckptkeeper.state import JOURNAL_NAME, RESERVE_NAME, TRASH_ENTRY, StateDir


def checkpoint_with_everything(run: Path) -> Path:
    """A checkpoint with files, a DeepSpeed-like subdirectory two levels deep, an empty one, a link and a FIFO."""
    checkpoint = run / "checkpoint-5"
    (checkpoint / "global_step5" / "deeper").mkdir(parents=True)
    (checkpoint / "empty").mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"w" * 100)
    (checkpoint / "global_step5" / "states.pt").write_bytes(b"s" * 10)
    (checkpoint / "global_step5" / "deeper" / "more.pt").write_bytes(b"m")
    os.symlink("/etc/passwd", checkpoint / "link")
    os.mkfifo(checkpoint / "global_step5" / "fifo")
    return checkpoint


def test_the_signature_through_descriptors_is_the_scans(tmp_path: Path) -> None:
    run = tmp_path / "run"
    checkpoint = checkpoint_with_everything(run)
    run_fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert _signature_at(run_fd, checkpoint) == lstat_signature(checkpoint)
        (checkpoint / "global_step5" / "deeper" / "more.pt").write_bytes(b"mm")  # a change two levels down
        now = _signature_at(run_fd, checkpoint)
        assert now == lstat_signature(checkpoint)
        kinds = {rel: kind for rel, kind, *_ in now[1]}
        assert kinds["link"] == stat.S_IFLNK and kinds["global_step5/fifo"] == stat.S_IFIFO  # links not followed
        assert kinds["global_step5/deeper/more.pt"] == stat.S_IFREG and kinds["empty"] == stat.S_IFDIR
    finally:
        os.close(run_fd)


def test_the_signature_through_descriptors_follows_no_link_in_the_checkpoints_place(tmp_path: Path) -> None:
    run = tmp_path / "run"
    checkpoint = checkpoint_with_everything(run)
    os.symlink(checkpoint, run / "checkpoint-6")
    (run / "checkpoint-7").write_text("a file")
    run_fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in ("checkpoint-6", "checkpoint-7"):  # an error that is not "gone": the re-check says "changed"
            with pytest.raises(OSError) as raised:
                _signature_at(run_fd, run / name)
            assert not isinstance(raised.value, FileNotFoundError)
        with pytest.raises(FileNotFoundError):
            _signature_at(run_fd, run / "checkpoint-8")
    finally:
        os.close(run_fd)


def test_a_state_directory_deleted_before_a_removal_is_found_at_its_first_use(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.create()
    state.record({"action": "before"})
    shutil.rmtree(tmp_path / "state")
    with state.one_removal():
        state.record({"action": "inside"})  # the first use checks, finds it deleted, makes it anew
        state.record({"action": "inside again"})
        assert (tmp_path / "state" / RESERVE_NAME).exists()
    lines = [json.loads(line)["action"] for line in (tmp_path / "state" / JOURNAL_NAME).read_text().splitlines()]
    assert lines == ["inside", "inside again"]
    # Outside a removal, every use checks again, and a reserve removed meanwhile is made again at the next line
    (tmp_path / "state" / RESERVE_NAME).unlink()
    state.record({"action": "after"})
    assert (tmp_path / "state" / RESERVE_NAME).exists()
    shutil.rmtree(tmp_path / "state")
    state.record({"action": "after it was deleted again"})
    assert (tmp_path / "state" / JOURNAL_NAME).read_text().count("\n") == 1
    state.close()


def test_the_removal_marker_names_a_live_removal_only_and_covers_a_killed_engines_words(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / pins.REMOVING_NAME).write_text(json.dumps({"run": "old", "checkpoint": "x" * 6000}))  # a killed one's
    dir_fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert pins.removal_under_way(dir_fd) is None  # no flock: stale, whatever it says
        with pins.guarded_removal(dir_fd, state, "run", "checkpoint-10") as pin:
            assert pin is None
            found = pins.removal_under_way(dir_fd)
            assert found is not None and (found["run"], found["checkpoint"]) == ("run", "checkpoint-10")
        assert pins.removal_under_way(dir_fd) is None
        assert (state / pins.REMOVING_NAME).read_bytes() == b""  # emptied
        with pins.guarded_removal(dir_fd, state, "run", "checkpoint-20"):
            found = pins.removal_under_way(dir_fd)
            assert found is not None and found["checkpoint"] == "checkpoint-20"
    finally:
        os.close(dir_fd)


def _split_as_before(root: Path | str, checkpoint: Path | str, verb: str) -> list[str]:
    below = os.path.relpath(os.path.abspath(checkpoint), os.path.abspath(root))
    parts = below.split(os.sep)
    if below == os.curdir or parts[0] == os.pardir:
        raise ActionError(f"refusing to {verb} {checkpoint}: it is outside the root {root}")
    return parts


def _outcome(split: object, root: Path | str, checkpoint: Path | str) -> tuple[str, object]:
    try:
        return "parts", split(root, checkpoint, "remove")  # type: ignore[operator]
    except ActionError as e:
        return "refused", str(e)


def test_a_path_below_the_root_splits_as_it_did(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    roots = ["/r", "/r/out", "/r/out/", "/", "/r/x/../out", "out", "/other"]
    paths = [
        "/r/out/run/checkpoint-1", "/r/out/checkpoint-1", "/r/out", "/r", "/r/out/../run/checkpoint-2",
        "/r/out/run/..", "/r/out/run/./checkpoint-3", "/checkpoint-1", "out/run/checkpoint-1", "/r/out/run/-",
        "/r/outer/checkpoint-1", "/r/out/a/b/c/checkpoint-9",
    ]  # fmt: skip
    for root, path in itertools.product(roots, paths):
        for kind in (str, Path):
            assert _outcome(_split_below, kind(root), kind(path)) == _outcome(_split_as_before, kind(root), kind(path))


def test_trash_names_are_ckptkeepers_and_differ() -> None:
    names = {_trash_name("checkpoint-10") for _ in range(1000)}
    assert len(names) == 1000
    assert all(TRASH_ENTRY.fullmatch(name) and name.endswith(".checkpoint-10") for name in names)
