"""Removal actions on a real filesystem: delete (rename into the trash, then remove), archive (rename, or a
verified copy to another filesystem), the last-chance guard, and finishing what an interrupted removal left.

What the code does to the filesystem is observed, not mocked: an audit hook (sys.addaudithook) records the
renames, copies and tree removals the standard library performs, in order, without changing them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cliutil import per_removal

from ckptkeeper.actions import (
    ARCHIVE_TEMP_PREFIX,
    RUN_TRASH_NAME,
    ActionError,
    Vanished,
    archive_checkpoint,
    delete_checkpoint,
    empty_trash,
    removal_guard,
    rename_to_trash,
)
from ckptkeeper.engine import PassResult, Pipeline, default_state_dir, finish_leftovers
from ckptkeeper.integrity import encode_safetensors
from ckptkeeper.model import Action
from ckptkeeper.policy import Policy, Protections
from ckptkeeper.rules import parse_rules
from ckptkeeper.scan import checkpoint_step
from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.state import StateDir

# ---------------------------------------------------------------------------------------------- observation
_recording: list[list[tuple[str, ...]]] = []
_WATCHED = {"os.rename", "shutil.rmtree", "ckptkeeper.copy_tree", "ckptkeeper.delete_tree"}


def tree_size(path: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            if not stat.S_ISDIR(st.st_mode):
                total += st.st_size
    return total


def _real(path: str, dir_fd: object) -> str:
    """The path an audited call acts on: ckptkeeper acts through directory descriptors (`dir_fd`, and
    /proc/self/fd/N/... paths), which are shown here as the directories they are open on."""
    if isinstance(dir_fd, int) and not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    magic = re.match(r"/proc/self/fd/(\d+)(/.*)?$", path)
    if magic:
        path = os.readlink(f"/proc/self/fd/{magic.group(1)}") + (magic.group(2) or "")
    return path


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _recording and event in _WATCHED:
        if event == "os.rename":  # (src, dst, src_dir_fd, dst_dir_fd)
            paths: tuple[str, ...] = (_real(os.fspath(args[0]), args[2]), _real(os.fspath(args[1]), args[3]))
        elif event in ("shutil.rmtree", "ckptkeeper.delete_tree"):  # (path, dir_fd)
            paths = (_real(os.fspath(args[0]), args[1]),)
        elif event == "ckptkeeper.copy_tree":  # (src, src_dir_fd, dst, dst_dir_fd)
            paths = (_real(args[0], args[1]), _real(args[2], args[3]))
        else:
            paths = tuple(_real(os.fspath(a), None) for a in args[:2] if isinstance(a, str | os.PathLike))
        _recording[-1].append((event, *paths))


sys.addaudithook(_audit)


@pytest.fixture
def fs_calls() -> Iterator[list[tuple[str, ...]]]:
    """(event, path, [path]) for every os.rename, shutil.rmtree, tree delete and tree copy while the test runs."""
    calls: list[tuple[str, ...]] = []
    _recording.append(calls)
    try:
        yield calls
    finally:
        _recording.remove(calls)


def renames(calls: list[tuple[str, ...]]) -> list[tuple[Path, Path]]:
    return [(Path(c[1]), Path(c[2])) for c in calls if c[0] == "os.rename"]


# ---------------------------------------------------------------------------------------------- helpers
Manifest = dict[str, tuple[str, int, str]]


def manifest(top: Path) -> Manifest:
    """Relative path -> (kind, size, sha256 or link target) for everything below `top`, links not followed."""
    found: Manifest = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, top)
            if os.path.islink(full):
                found[rel] = ("link", 0, os.readlink(full))
            elif os.path.isdir(full):
                found[rel] = ("dir", 0, "")
            else:
                with open(full, "rb") as f:
                    found[rel] = ("file", os.path.getsize(full), hashlib.file_digest(f, "sha256").hexdigest())
    return found


def stamps(top: Path) -> dict[str, tuple[int, int, int]]:
    """Relative path -> (inode, mtime_ns, size) of `top` itself and of everything below it."""
    found = {".": (top.lstat().st_ino, top.lstat().st_mtime_ns, 0)}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            found[os.path.relpath(os.path.join(dirpath, name), top)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return found


def make_checkpoint(run: Path, step: int, payload: int = 4096) -> Path:
    """A checkpoint-like directory: a valid safetensors file, a state file, a binary and a subdirectory."""
    directory = run / f"checkpoint-{step}"
    (directory / "global_step").mkdir(parents=True)
    data = os.urandom(4 * 64)
    (directory / "model.safetensors").write_bytes(encode_safetensors({"w": ("float32", [64], data)}, {"format": "pt"}))
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (directory / "optimizer.pt").write_bytes(os.urandom(payload))
    (directory / "global_step" / "zero_rank_0.pt").write_bytes(os.urandom(512))
    return directory


def pipeline_for(root: Path, policy: Policy, archive: Path | None = None) -> Pipeline:
    return Pipeline.checked(root, policy, state_dir=default_state_dir(root), archive_to=archive)


def act(pipeline: Pipeline, planned: PassResult) -> PassResult:
    """Carry out a plan made earlier, under the root's lock."""
    pipeline.acquire()
    try:
        return PassResult(planned.plan, pipeline.act(planned.plan))
    finally:
        pipeline.release()


def trash_is_empty(state: StateDir) -> bool:
    return not state.trash.exists() or not any(state.trash.iterdir())


@pytest.fixture
def other_fs(tmpfs: Path) -> Iterator[Path]:
    """A fresh directory on another filesystem than tmp_path, removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="ckptkeeper-test-", dir=tmpfs))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- delete
def test_delete_renames_into_the_state_trash_then_removes_it_there(
    tmp_path: Path, fs_calls: list[tuple[str, ...]]
) -> None:
    root = tmp_path / "root"
    doomed, neighbour = make_checkpoint(root / "run", 10), make_checkpoint(root / "run", 20)
    neighbour_before = manifest(neighbour)
    state = StateDir(root / "_ckptkeeper")

    delete_checkpoint(root, doomed, state)

    [(source, trashed)] = renames(fs_calls)
    assert source == doomed
    assert trashed.parent == state.trash
    assert trashed.name.endswith(".checkpoint-10") and checkpoint_step(trashed.name) is None
    assert fs_calls[-1] == ("ckptkeeper.delete_tree", str(trashed))  # removed there, after the rename
    assert not doomed.exists()
    assert trash_is_empty(state) and state.trash.is_dir()
    assert manifest(neighbour) == neighbour_before


def test_rename_to_trash_keeps_the_whole_checkpoint_under_a_non_checkpoint_name(tmp_path: Path) -> None:
    root = tmp_path / "root"
    checkpoint = make_checkpoint(root / "run", 3)
    before, inode = manifest(checkpoint), checkpoint.stat().st_ino
    state = StateDir(root / "_ckptkeeper")

    trashed = rename_to_trash(checkpoint, state)

    assert trashed.parent == state.trash and checkpoint_step(trashed.name) is None
    assert trashed.stat().st_ino == inode  # one rename of the whole directory, not a copy
    assert manifest(trashed) == before
    assert not checkpoint.exists()


def test_prune_journals_each_removal_before_and_after(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "run", SimConfig(steps_per_epoch=10, epochs=1, save_steps=5, eval_steps=5))
    size = tree_size(root / "run" / "checkpoint-5")
    policy = Policy(parse_rules("last:1"), Protections(trainer_best=False))
    pipeline = pipeline_for(root, policy)
    state = pipeline.state
    plan = pipeline.survey(None)

    totals = act(pipeline, plan)

    assert [(o.checkpoint, o.action) for o in totals.outcomes] == [("checkpoint-5", "delete")]
    assert not (root / "run" / "checkpoint-5").exists() and (root / "run" / "checkpoint-10").is_dir()
    lines = state.journal_path.read_text().splitlines()
    assert len(lines) == 2
    start, entry = json.loads(lines[0]), json.loads(lines[1])
    # The intent is written before the rename, so a crash mid-removal still leaves what and why.
    assert {k: start[k] for k in ("action", "run", "checkpoint", "step", "bytes", "why")} == {
        "action": "start-delete",
        "run": "run",
        "checkpoint": "checkpoint-5",
        "step": 5,
        "bytes": size,
        "why": "no rule keeps it (keep last:1)",
    }
    assert {k: entry[k] for k in ("action", "run", "checkpoint", "step", "bytes")} == {
        "action": "delete",
        "run": "run",
        "checkpoint": "checkpoint-5",
        "step": 5,
        "bytes": size,
    }
    assert size > 0
    assert entry["why"] == "no rule keeps it (keep last:1)"
    when = dt.datetime.fromisoformat(entry["time"])
    assert when.tzinfo is not None and abs(dt.datetime.now(dt.UTC) - when) < dt.timedelta(minutes=5)


def test_delete_of_a_checkpoint_that_vanished_raises_vanished(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    state = StateDir(root / "_ckptkeeper")
    gone = root / "run" / "checkpoint-3"

    with pytest.raises(Vanished):
        delete_checkpoint(root, gone, state)
    with pytest.raises(Vanished):
        rename_to_trash(gone, state)
    with pytest.raises(Vanished):
        archive_checkpoint(root, gone, tmp_path / "archive" / "run" / "checkpoint-3", state)
    assert trash_is_empty(state)


def test_prune_reports_a_checkpoint_removed_by_someone_else_as_vanished_not_as_an_error(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "run", SimConfig(steps_per_epoch=10, epochs=1, save_steps=5, eval_steps=5))
    policy = Policy(parse_rules("last:1"), Protections(trainer_best=False))
    pipeline = pipeline_for(root, policy)
    state = pipeline.state
    plan = pipeline.survey(None)
    shutil.rmtree(root / "run" / "checkpoint-5")  # the Trainer's own rotation got there first

    totals = act(pipeline, plan)

    assert [(o.checkpoint, o.action) for o in totals.outcomes] == [("checkpoint-5", "vanished")]
    assert totals.errors == [] and sum(o.bytes for o in totals.removed) == 0
    assert all(e["action"] != "error" for e in state.read_journal())
    assert (root / "run" / "checkpoint-10").is_dir()


# ---------------------------------------------------------------------------------------------- the guard
def _not_named(name: str) -> Callable[[Path, Path], tuple[Path, str]]:
    def build(root: Path, outside: Path) -> tuple[Path, str]:
        path = root / "run" / name
        path.mkdir(parents=True)
        (path / "trainer_state.json").write_text("{}")
        return path, "is not named checkpoint-<step>"

    return build


def _symlink_to_outside(root: Path, outside: Path) -> tuple[Path, str]:
    target = make_checkpoint(outside, 7)
    (root / "run").mkdir(parents=True)
    (root / "run" / "checkpoint-7").symlink_to(target, target_is_directory=True)
    return root / "run" / "checkpoint-7", "it is a symlink"


def _symlink_to_inside(root: Path, outside: Path) -> tuple[Path, str]:
    target = make_checkpoint(root / "other", 8)
    (root / "run").mkdir(parents=True)
    (root / "run" / "checkpoint-8").symlink_to(target, target_is_directory=True)
    return root / "run" / "checkpoint-8", "it is a symlink"


def _file(root: Path, outside: Path) -> tuple[Path, str]:
    (root / "run").mkdir(parents=True)
    (root / "run" / "checkpoint-5").write_bytes(b"not a directory")
    return root / "run" / "checkpoint-5", "it is not a directory"


def _through_symlinked_run_inside(root: Path, outside: Path) -> tuple[Path, str]:
    make_checkpoint(root / "real-run", 5)
    (root / "linked-run").symlink_to(root / "real-run", target_is_directory=True)
    return root / "linked-run" / "checkpoint-5", "goes through a symlink"


def _through_symlinked_run_outside(root: Path, outside: Path) -> tuple[Path, str]:
    make_checkpoint(outside / "run", 5)
    root.mkdir(parents=True)
    (root / "escape").symlink_to(outside / "run", target_is_directory=True)
    return root / "escape" / "checkpoint-5", "outside the root"


def _not_below_root(root: Path, outside: Path) -> tuple[Path, str]:
    root.mkdir(parents=True)
    return make_checkpoint(outside / "run", 6), "outside the root"


GUARD_CASES = {
    "name checkpoint-abc": _not_named("checkpoint-abc"),
    "name tmp-checkpoint-10": _not_named("tmp-checkpoint-10"),
    "name checkpoint-10.bak": _not_named("checkpoint-10.bak"),
    "name checkpoint-007": _not_named("checkpoint-007"),
    "symlink checkpoint-N to outside the root": _symlink_to_outside,
    "symlink checkpoint-N to a checkpoint inside the root": _symlink_to_inside,
    "file named checkpoint-5": _file,
    "path through a symlinked run directory inside the root": _through_symlinked_run_inside,
    "path through a symlinked run directory to outside the root": _through_symlinked_run_outside,
    "checkpoint not below the root": _not_below_root,
}


@pytest.mark.parametrize("case", GUARD_CASES, ids=lambda c: c.replace(" ", "-"))
def test_removal_guard_refuses_and_nothing_is_touched(tmp_path: Path, case: str) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    path, reason = GUARD_CASES[case](root, outside)
    state = StateDir(root / "_ckptkeeper")
    before = manifest(tmp_path)

    problem = removal_guard(root, path)

    assert problem is not None and reason in problem
    with pytest.raises(ActionError, match="refusing to remove") as deleted:
        delete_checkpoint(root, path, state)
    assert not isinstance(deleted.value, Vanished)
    with pytest.raises(ActionError, match="refusing to archive"):
        archive_checkpoint(root, path, tmp_path / "archive" / "run" / path.name, state)
    assert manifest(tmp_path) == before  # not one entry created, changed, moved or removed, links included


def test_removal_guard_accepts_a_checkpoint_below_a_root_given_through_a_symlink_or_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    checkpoint = make_checkpoint(root / "sweep" / "lr-1", 5)
    (tmp_path / "root-link").symlink_to(root, target_is_directory=True)
    assert removal_guard(root, checkpoint) is None
    assert removal_guard(tmp_path / "root-link", tmp_path / "root-link" / "sweep" / "lr-1" / "checkpoint-5") is None
    monkeypatch.chdir(tmp_path)
    assert removal_guard(Path("root"), Path("root/sweep/lr-1/checkpoint-5")) is None
    assert removal_guard(Path("root-link"), Path("root-link/sweep/lr-1/checkpoint-5")) is None


def _outside_targets(outside: Path) -> tuple[Path, Path]:
    secret = outside / "secret.bin"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_bytes(os.urandom(10000))
    data_dir = outside / "datasets"
    (data_dir / "shard").mkdir(parents=True)
    (data_dir / "shard" / "part-0.arrow").write_bytes(os.urandom(5000))
    (data_dir / "README").write_text("keep me")
    return secret, data_dir


@pytest.mark.parametrize("how", ["delete", "archive to another filesystem"])
def test_removing_a_checkpoint_with_links_to_outside_the_root_removes_only_the_links(
    tmp_path: Path, how: str, request: pytest.FixtureRequest
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    secret, data_dir = _outside_targets(outside)
    checkpoint = make_checkpoint(root / "run", 9)
    (checkpoint / "linked-file.bin").symlink_to(secret)
    (checkpoint / "linked-dir").symlink_to(data_dir, target_is_directory=True)
    (checkpoint / "global_step" / "relative-link").symlink_to(os.path.relpath(secret, checkpoint / "global_step"))
    outside_before = manifest(outside)
    state = StateDir(root / "_ckptkeeper")

    if how == "delete":
        delete_checkpoint(root, checkpoint, state)
    else:
        target = request.getfixturevalue("other_fs") / "archive" / "run" / "checkpoint-9"
        assert archive_checkpoint(root, checkpoint, target, state) == "copied"
        assert target.joinpath("linked-dir").is_symlink() and target.joinpath("linked-file.bin").is_symlink()
        assert os.readlink(target / "linked-dir") == str(data_dir)

    assert not checkpoint.exists() and trash_is_empty(state)
    assert manifest(outside) == outside_before  # byte-identical, every file and directory still there


# ---------------------------------------------------------------------------------------------- archive
@pytest.mark.parametrize("run_path", ["sweep/lr-1", "."])
def test_archive_on_the_same_filesystem_is_one_rename_to_archive_run_path_checkpoint(
    tmp_path: Path, run_path: str, fs_calls: list[tuple[str, ...]]
) -> None:
    root, archive = tmp_path / "outputs", tmp_path / "archive"
    run = root / run_path
    simulate_run(run, SimConfig(steps_per_epoch=10, epochs=1, save_steps=5, eval_steps=5))
    source = run / "checkpoint-5"
    before, inode = manifest(source), source.stat().st_ino
    policy = Policy(parse_rules("last:1"), Protections(trainer_best=False), Action.ARCHIVE)
    pipeline = pipeline_for(root, policy, archive)
    state = pipeline.state
    plan = pipeline.survey(None)
    fs_calls.clear()

    totals = act(pipeline, plan)

    target = archive / run_path / "checkpoint-5" if run_path != "." else archive / "checkpoint-5"
    assert [(o.checkpoint, o.action, o.detail) for o in totals.outcomes] == [
        ("checkpoint-5", "archive", f"moved to {target}")
    ]
    assert renames(fs_calls) == [(source, target)]
    assert not any(c[0] == "ckptkeeper.copy_tree" for c in fs_calls)
    assert target.stat().st_ino == inode and manifest(target) == before
    assert not source.exists() and (run / "checkpoint-10").is_dir()
    [start, entry] = state.read_journal()
    assert (start["action"], start["run"], start["checkpoint"], start["step"]) == (
        "start-archive",
        run_path,
        "checkpoint-5",
        5,
    )
    assert entry["action"] == "archive" and entry["checkpoint"] == "checkpoint-5" and entry["bytes"] > 0
    assert start["bytes"] == entry["bytes"] and start["why"] == entry["why"]
    assert entry["detail"] == f"moved to {target}"


def test_archive_to_another_filesystem_copies_under_a_temporary_name_then_renames_then_removes_the_source(
    tmp_path: Path, other_fs: Path, fs_calls: list[tuple[str, ...]]
) -> None:
    root = tmp_path / "root"
    source = make_checkpoint(root / "run", 5, payload=3 << 20)
    before = manifest(source)
    target = other_fs / "archive" / "run" / "checkpoint-5"
    state = StateDir(root / "_ckptkeeper")

    assert archive_checkpoint(root, source, target, state) == "copied"

    [attempt, into_place, to_trash] = renames(fs_calls)
    assert attempt == (source, target)  # refused by the kernel: another filesystem (EXDEV)
    copy = next(c for c in fs_calls if c[0] == "ckptkeeper.copy_tree")
    temp = Path(copy[2])
    assert Path(copy[1]) == source
    assert temp.parent == target.parent and temp.name.startswith(f"{ARCHIVE_TEMP_PREFIX}checkpoint-5.")
    assert into_place == (temp, target)
    assert to_trash[0] == source and to_trash[1].parent == state.trash
    calls = [c[0] for c in fs_calls]
    assert calls.index("ckptkeeper.copy_tree") < fs_calls.index(("os.rename", str(temp), str(target)))
    assert fs_calls.index(("os.rename", str(temp), str(target))) < fs_calls.index(
        ("os.rename", str(source), str(to_trash[1]))
    )
    assert manifest(target) == before
    assert not source.exists() and trash_is_empty(state)
    assert sorted(p.name for p in target.parent.iterdir()) == ["checkpoint-5"]  # no temporary left


@pytest.mark.parametrize("where", ["same filesystem", "another filesystem"])
def test_archive_whose_identical_copy_is_already_in_place_removes_the_source(
    tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    # An earlier archive put the copy in place and was stopped before it removed the source.
    root = tmp_path / "root"
    source = make_checkpoint(root / "run", 12)
    base = tmp_path if where == "same filesystem" else request.getfixturevalue("other_fs")
    target = base / "archive" / "run" / "checkpoint-12"
    shutil.copytree(source, target, symlinks=True)
    before = manifest(target)
    state = StateDir(root / "_ckptkeeper")

    assert archive_checkpoint(root, source, target, state) == "already archived"

    assert not source.exists() and trash_is_empty(state)
    assert manifest(target) == before


def _extra_file(target: Path) -> None:
    (target / "extra.txt").write_text("not in the source")


def _missing_file(target: Path) -> None:
    (target / "optimizer.pt").unlink()


def _different_size(target: Path) -> None:
    with open(target / "optimizer.pt", "ab") as f:
        f.write(b"x")


def _same_size_different_bytes(target: Path) -> None:
    # e.g. checkpoint-500 of an earlier training run into the same output_dir: same layout, other weights
    data = bytearray((target / "optimizer.pt").read_bytes())
    data[100] ^= 0xFF
    (target / "optimizer.pt").write_bytes(bytes(data))


DIFFERENCES = {
    "an extra file": _extra_file,
    "a missing file": _missing_file,
    "a different size": _different_size,
    "same sizes, different bytes": _same_size_different_bytes,
}


@pytest.mark.parametrize("difference", DIFFERENCES, ids=lambda d: d.replace(" ", "-").replace(",", ""))
def test_archive_whose_target_exists_and_differs_fails_and_keeps_the_source(tmp_path: Path, difference: str) -> None:
    root = tmp_path / "root"
    source = make_checkpoint(root / "run", 12)
    target = tmp_path / "archive" / "run" / "checkpoint-12"
    shutil.copytree(source, target, symlinks=True)
    DIFFERENCES[difference](target)
    source_before, target_before = manifest(source), manifest(target)
    state = StateDir(root / "_ckptkeeper")

    with pytest.raises(ActionError, match="already exists and differs"):
        archive_checkpoint(root, source, target, state)

    assert manifest(source) == source_before
    assert manifest(target) == target_before
    assert trash_is_empty(state)


def test_leftover_archive_temporaries_are_cleared_on_the_next_archive_of_that_checkpoint(
    tmp_path: Path, other_fs: Path
) -> None:
    root = tmp_path / "root"
    source = make_checkpoint(root / "run", 5)
    parent = other_fs / "archive" / "run"
    stale = parent / f"{ARCHIVE_TEMP_PREFIX}checkpoint-5.0123456789ab"  # a copy cut short by a crash
    shutil.copytree(source, stale)
    (stale / "optimizer.pt").write_bytes(b"half")
    unrelated = parent / f"{ARCHIVE_TEMP_PREFIX}checkpoint-50.0123456789ab"  # another checkpoint's
    unrelated.mkdir()
    state = StateDir(root / "_ckptkeeper")
    before = manifest(source)

    assert archive_checkpoint(root, source, parent / "checkpoint-5", state) == "copied"

    assert {p.name for p in parent.iterdir()} == {"checkpoint-5", unrelated.name}
    assert manifest(parent / "checkpoint-5") == before


@pytest.mark.parametrize("mode", ["delete", "archive, same filesystem", "archive, another filesystem"])
def test_prune_never_touches_a_kept_checkpoint_nor_its_mtime(
    tmp_path: Path, mode: str, request: pytest.FixtureRequest
) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "run", SimConfig(steps_per_epoch=10, epochs=2, save_steps=4, eval_steps=4))
    archive = None
    if mode == "archive, same filesystem":
        archive = tmp_path / "archive"
    elif mode == "archive, another filesystem":
        archive = request.getfixturevalue("other_fs") / "archive"
    policy = Policy(parse_rules("last:2"), removal=Action.ARCHIVE if archive else Action.DELETE)
    pipeline = pipeline_for(root, policy, archive)
    plan = pipeline.survey(None)
    [run_plan] = plan.plan.runs
    kept = [root / "run" / d.checkpoint.name for d in run_plan.kept]
    assert len(run_plan.removed) >= 2 and len(kept) >= 2
    before = {p.name: (stamps(p), manifest(p)) for p in kept}

    totals = act(pipeline, plan)

    assert len(totals.removed) == len(run_plan.removed) and totals.errors == []
    assert {p.name: (stamps(p), manifest(p)) for p in kept} == before


# ---------------------------------------------------------------------------------------------- trash elsewhere
@pytest.mark.parametrize("elsewhere", ["state dir on tmpfs", "run on tmpfs"])
def test_state_dir_on_another_filesystem_uses_a_run_local_trash(
    tmp_path: Path, other_fs: Path, elsewhere: str, fs_calls: list[tuple[str, ...]]
) -> None:
    if elsewhere == "state dir on tmpfs":
        root, state = tmp_path / "root", StateDir(other_fs / "state")
    else:
        root, state = other_fs / "root", StateDir(tmp_path / "state")
    run = root / "run"
    doomed = make_checkpoint(run, 4)
    kept = make_checkpoint(run, 8)
    kept_before = manifest(kept)

    delete_checkpoint(root, doomed, state)

    [to_state_trash, to_run_trash] = renames(fs_calls)
    assert to_state_trash[0] == doomed and to_state_trash[1].parent == state.trash  # EXDEV: another filesystem
    assert to_run_trash[0] == doomed and to_run_trash[1].parent == run / RUN_TRASH_NAME
    assert checkpoint_step(to_run_trash[1].name) is None
    assert fs_calls[-1] == ("ckptkeeper.delete_tree", str(to_run_trash[1]))
    assert not doomed.exists() and not any((run / RUN_TRASH_NAME).iterdir()) and trash_is_empty(state)
    assert manifest(kept) == kept_before

    # What an interrupted removal leaves there is finished on the next start.
    cut_short = make_checkpoint(run, 6)
    leftover = run / RUN_TRASH_NAME / "0123456789ab.checkpoint-6"
    os.rename(cut_short, leftover)
    (leftover / "optimizer.pt").unlink()

    assert finish_leftovers(root, state, [run]) == [leftover.name]
    assert not (run / RUN_TRASH_NAME).exists()
    assert [(e["action"], e["entry"]) for e in state.read_journal()] == [("finish-trash", leftover.name)]
    assert manifest(kept) == kept_before


def test_finish_leftovers_completes_every_interrupted_removal_and_journals_it(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    secret, data_dir = _outside_targets(outside)
    outside_before = manifest(outside)
    runs = [root / "exp1", root / "exp2"]
    kept = [make_checkpoint(r, 10) for r in runs]
    kept_before = [manifest(k) for k in kept]
    state = StateDir(root / "_ckptkeeper")
    state.create()
    partial = state.trash / "aaaaaaaaaaaa.checkpoint-5"
    os.rename(make_checkpoint(runs[0], 5), partial)
    (partial / "model.safetensors").unlink()
    (state.trash / "bbbbbbbbbbbb.checkpoint-6").write_bytes(b"a stray file")
    (state.trash / "cccccccccccc.checkpoint-7").symlink_to(data_dir, target_is_directory=True)
    (state.trash / "dddddddddddd.checkpoint-8").symlink_to(secret)
    (runs[1] / RUN_TRASH_NAME).mkdir()
    local = runs[1] / RUN_TRASH_NAME / "eeeeeeeeeeee.checkpoint-3"
    os.rename(make_checkpoint(runs[1], 3), local)
    expected = [*sorted(p.name for p in state.trash.iterdir()), local.name]

    finished = finish_leftovers(root, state, runs)

    assert finished == expected
    assert state.trash.is_dir() and not any(state.trash.iterdir())
    assert not (runs[1] / RUN_TRASH_NAME).exists()
    assert manifest(outside) == outside_before  # links in the trash are removed, never followed
    assert [manifest(k) for k in kept] == kept_before
    entries = state.read_journal()
    assert [(e["action"], e["entry"]) for e in entries] == [("finish-trash", name) for name in expected]
    assert all(e["why"] and e["time"] for e in entries)

    # Nothing left: the next start finishes nothing and journals nothing.
    assert finish_leftovers(root, state, runs) == []
    assert len(state.read_journal()) == len(expected)
    assert empty_trash(tmp_path / "no-such-trash") == []


def _chattr(flag: str, path: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", flag, str(path)], check=False, capture_output=True).returncode == 0


def test_a_removal_that_fails_inside_the_trash_is_an_error_outcome_and_the_pass_goes_on(tmp_path: Path) -> None:
    # An immutable file (or, for a non-root user, a directory owned by someone else) cannot be unlinked:
    # the checkpoint leaves its name in one rename, then removing it from the trash fails.
    root = tmp_path / "outputs"
    run = root / "run"
    simulate_run(run, SimConfig(steps_per_epoch=20, epochs=1, save_steps=5, eval_steps=5))
    stuck = run / "checkpoint-5" / "scheduler.pt"
    if os.geteuid() != 0 or not _chattr("+i", stuck):
        pytest.skip("needs root and a filesystem with the immutable attribute (chattr +i)")
    policy = Policy(parse_rules("last:1"), Protections(trainer_best=False))
    pipeline = pipeline_for(root, policy)
    state = pipeline.state
    try:
        plan = pipeline.survey(None)
        totals = act(pipeline, plan)
        outcomes = [(o.checkpoint, o.action) for o in totals.outcomes]
        assert outcomes == [
            ("checkpoint-5", "error"),
            ("checkpoint-10", "delete"),
            ("checkpoint-15", "delete"),
        ]
        assert "trash" in totals.errors[0].detail
        [left] = list(state.trash.iterdir())
        assert left.name.endswith(".checkpoint-5") and (left / "scheduler.pt").exists()
        assert sorted(p.name for p in run.iterdir()) == ["checkpoint-20"]
        journal = per_removal(state.read_journal())
        assert [(e["action"], e["checkpoint"]) for e in journal] == [
            ("start-delete", "checkpoint-5"),
            ("error", "checkpoint-5"),
            ("start-delete", "checkpoint-10"),
            ("delete", "checkpoint-10"),
            ("start-delete", "checkpoint-15"),
            ("delete", "checkpoint-15"),
        ]
        assert journal[1]["bytes"] == 0 and journal[1]["detail"] == totals.errors[0].detail
    finally:
        for candidate in [stuck, *state.trash.glob("*/scheduler.pt")]:
            if candidate.exists():
                _chattr("-i", candidate)

    assert finish_leftovers(root, state) == [left.name]
    assert trash_is_empty(state)


@pytest.mark.parametrize("state_where", ["state dir on the same filesystem", "state dir on tmpfs"])
def test_a_checkpoint_whose_run_directory_cannot_change_is_an_action_error_and_stays_whole(
    tmp_path: Path, state_where: str, request: pytest.FixtureRequest
) -> None:
    # An immutable run directory (as a read-only one for a non-root user): nothing can leave it or be
    # created in it, so neither the rename to the trash nor the run-local trash can be made.
    root = tmp_path / "root"
    checkpoint = make_checkpoint(root / "run", 4)
    before = manifest(checkpoint)
    base = tmp_path if state_where == "state dir on the same filesystem" else request.getfixturevalue("other_fs")
    state = StateDir(base / "state")
    if os.geteuid() != 0 or not _chattr("+i", root / "run"):
        pytest.skip("needs root and a filesystem with the immutable attribute (chattr +i)")
    try:
        with pytest.raises(ActionError, match="cannot move") as refused:
            delete_checkpoint(root, checkpoint, state)
        assert not isinstance(refused.value, Vanished)
    finally:
        _chattr("-i", root / "run")
    assert manifest(checkpoint) == before
    assert sorted(p.name for p in (root / "run").iterdir()) == ["checkpoint-4"]
    assert trash_is_empty(state)


def test_one_trash_entry_that_cannot_be_removed_does_not_block_finishing_the_others(tmp_path: Path) -> None:
    root = tmp_path / "root"
    state = StateDir(root / "_ckptkeeper")
    state.create()
    stuck = state.trash / "aaaaaaaaaaaa.checkpoint-5"
    os.rename(make_checkpoint(root / "run", 5), stuck)
    fine = state.trash / "bbbbbbbbbbbb.checkpoint-6"
    os.rename(make_checkpoint(root / "run", 6), fine)
    if os.geteuid() != 0 or not _chattr("+i", stuck / "optimizer.pt"):
        pytest.skip("needs root and a filesystem with the immutable attribute (chattr +i)")
    try:
        problems: list[str] = []
        finished = finish_leftovers(root, state, stuck=problems)
        assert finished == [fine.name]
        assert not fine.exists() and stuck.exists() and (stuck / "optimizer.pt").exists()
        assert problems == [f"{stuck}: Operation not permitted"]
        assert [(e["action"], e["entry"], e["why"]) for e in state.read_journal()] == [
            ("finish-trash", fine.name, "left by an interrupted removal"),
            ("error", problems[0], "could not finish a removal left in the trash"),
        ]
    finally:
        _chattr("-i", stuck / "optimizer.pt")
    # The stuck entry stays in the trash and is tried again on the next start.
    assert finish_leftovers(root, state) == [stuck.name]
    assert trash_is_empty(state)
    assert [(e["action"], e["entry"]) for e in state.read_journal()][2:] == [("finish-trash", stuck.name)]


def test_empty_trash_skips_an_entry_it_cannot_remove_describes_it_and_finishes_the_rest(tmp_path: Path) -> None:
    trash = tmp_path / "trash"
    trash.mkdir()
    first = trash / "aaaaaaaaaaaa.checkpoint-1"
    first.mkdir()
    (first / "model.safetensors").write_bytes(b"x" * 100)
    stuck = trash / "bbbbbbbbbbbb.checkpoint-2"
    stuck.mkdir()
    (stuck / "optimizer.pt").write_bytes(b"y" * 100)
    last = trash / "cccccccccccc.checkpoint-3"  # a file under an entry name: still ckptkeeper's to delete
    last.write_bytes(b"z")
    if os.geteuid() != 0 or not _chattr("+i", stuck / "optimizer.pt"):
        pytest.skip("needs root and a filesystem with the immutable attribute (chattr +i)")
    try:
        problems: list[str] = []
        assert empty_trash(trash, stuck=problems) == [first.name, last.name]
        assert problems == [f"{stuck}: Operation not permitted"]
        assert sorted(os.listdir(trash)) == [stuck.name]
        # Without a `stuck` list the entry is still skipped, silently.
        assert empty_trash(trash) == []
        assert sorted(os.listdir(trash)) == [stuck.name]
        # `only` names the single entry to finish.
        problems.clear()
        assert empty_trash(trash, only=stuck.name, stuck=problems) == []
        assert problems == [f"{stuck}: Operation not permitted"]
    finally:
        _chattr("-i", stuck / "optimizer.pt")
    assert empty_trash(trash, only=stuck.name) == [stuck.name]
    assert os.listdir(trash) == []
