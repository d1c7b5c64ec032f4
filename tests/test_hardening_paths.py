"""Issue #10, defects 1, 2, 3, 9 and 11: paths that alias each other, a state directory that is not
ckptkeeper's, check-then-act by path name, one instance per root, and what push_to_hub would upload.

Every case runs the real command (`python -m ckptkeeper ...` as a process) on real directories, real
symlinks and real bind mounts (CI runs as root); the race runs the real engine against a thread that
really swaps a run directory for a symlink.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cliutil import bind_mount, ckptkeeper
from watchutil import Watch, steps, wait_until

from ckptkeeper.engine import Pipeline
from ckptkeeper.layout import Layout, LayoutError
from ckptkeeper.policy import Policy, Protections
from ckptkeeper.rules import parse_rules
from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.state import OWNER_MARK, ROOT_LOCK_NAME, STATE_DIR_NAME, StateDir

SMALL = SimConfig(steps_per_epoch=10, epochs=2, save_steps=5, eval_steps=5)  # checkpoints 5, 10, 15, 20
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")


def tree(top: Path) -> dict[str, tuple[int, int, int]]:
    """Every path below `top` -> (inode, size, mtime_ns), links not followed; `top` itself included."""
    found = {".": (top.lstat().st_ino, 0, top.lstat().st_mtime_ns)}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            found[os.path.relpath(path, top)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return found


def checkpoint_trees(run: Path) -> dict[str, dict[str, tuple[int, int, int]]]:
    return {c.name: tree(c) for c in sorted(run.glob("checkpoint-*")) if not c.is_symlink()}


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """A root with two runs of four complete checkpoints each."""
    root = tmp_path / "outputs"
    simulate_run(root / "exp1", SMALL)
    simulate_run(root / "exp2", SMALL)
    return root


# ---------------------------------------------------------------------------------------------- 1. archive aliases
def _refused_everywhere(root: Path, args: list[str], message: str, tmp_path: Path) -> None:
    """plan, prune and watch refuse the same paths with the same message, exit 2, and change nothing."""
    before = {run: checkpoint_trees(root / run) for run in ("exp1", "exp2")}
    for command in ("plan", "prune"):
        done = ckptkeeper(command, root, "--keep", "last:1", *args)
        assert (done.returncode, done.stderr) == (2, f"Error: {message}\n"), done
    watch = Watch(root, ["--keep", "last:1", *args], tmp_path / "watch.log")
    assert watch.wait_exit(20) == 2, watch.describe()
    assert watch.log().endswith(f"Error: {message}\n"), watch.describe()
    assert {run: checkpoint_trees(root / run) for run in ("exp1", "exp2")} == before
    assert not (root / STATE_DIR_NAME).exists()


def _is_the_root(archive: Path, root: Path) -> str:
    return (
        f"--archive-to {archive} is the root {root} (the same directory, reached another way: a link or a second "
        "mount): archiving there would delete each checkpoint it claims to keep"
    )


def test_an_archive_that_is_a_symlink_to_the_root_is_refused_by_every_command(outputs: Path, tmp_path: Path) -> None:
    link = tmp_path / "archive"
    link.symlink_to(outputs, target_is_directory=True)
    _refused_everywhere(outputs, ["--archive-to", str(link)], _is_the_root(link, outputs), tmp_path)


@needs_root
def test_the_same_volume_mounted_twice_as_root_and_archive_is_refused(outputs: Path, tmp_path: Path) -> None:
    """`-v /data/outputs:/outputs -v /data/outputs:/archive`: two mounts of one directory."""
    with bind_mount(outputs, tmp_path / "mnt" / "archive") as archive:
        _refused_everywhere(outputs, ["--archive-to", str(archive)], _is_the_root(archive, outputs), tmp_path)


@needs_root
def test_an_archive_mounted_from_inside_the_root_is_refused(outputs: Path, tmp_path: Path) -> None:
    """`-v /data/outputs/exp2:/archive`: the archive is a run of the root, mounted elsewhere."""
    with bind_mount(outputs / "exp2", tmp_path / "mnt" / "archive") as archive:
        message = (
            f"--archive-to {archive} is inside the root {outputs}: choose a directory outside it, or ckptkeeper "
            "would later see the archive as runs and prune it"
        )
        _refused_everywhere(outputs, ["--archive-to", str(archive)], message, tmp_path)


@needs_root
def test_an_archive_mounted_from_above_the_root_is_refused(outputs: Path, tmp_path: Path) -> None:
    """`-v /data:/archive` beside `-v /data/outputs:/outputs`: the archive contains the root."""
    with bind_mount(outputs.parent, tmp_path.parent / f"{tmp_path.name}-archive") as archive:
        message = f"--archive-to {archive} contains the root {outputs}: choose a directory apart from it"
        _refused_everywhere(outputs, ["--archive-to", str(archive)], message, tmp_path)


def test_an_archive_run_directory_that_links_back_into_the_root_loses_nothing(outputs: Path, tmp_path: Path) -> None:
    """The archive itself is fine, but ARCHIVE/exp1 is a symlink to the root's own exp1 (or to exp2): each
    archive target then "already exists" as the checkpoint itself, or would move it into another run."""
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "exp1").symlink_to(outputs / "exp1", target_is_directory=True)
    (archive / "exp2").symlink_to(outputs / "exp1", target_is_directory=True)  # another run
    before = {run: checkpoint_trees(outputs / run) for run in ("exp1", "exp2")}

    done = ckptkeeper("prune", outputs, "--keep", "last:1", "--archive-to", archive)

    assert done.returncode == 1, done
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 6 and all("goes through a symlink" in line for line in failed), done.stdout
    assert {run: checkpoint_trees(outputs / run) for run in ("exp1", "exp2")} == before


@needs_root
def test_an_archive_run_directory_mounted_from_the_run_itself_loses_nothing(outputs: Path, tmp_path: Path) -> None:
    """ARCHIVE/exp1 is a bind mount of the root's exp1: every target exists and is the source itself. The old
    code called that "already archived" and deleted the checkpoint everywhere."""
    archive = tmp_path / "archive"
    before = checkpoint_trees(outputs / "exp1")
    with bind_mount(outputs / "exp1", archive / "exp1"):
        done = ckptkeeper("prune", outputs, "--keep", "last:1", "--archive-to", archive)
        assert done.returncode == 1, done
        failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
        assert len(failed) == 3, done.stdout
        assert all(f"{archive / 'exp1'} is inside the root {outputs}" in line for line in failed), done.stdout
        assert checkpoint_trees(outputs / "exp1") == before
    assert sorted(p.name for p in (archive / "exp2").iterdir()) == ["checkpoint-10", "checkpoint-15", "checkpoint-5"]


def test_watch_refuses_an_archive_run_directory_that_links_into_the_root_and_goes_on(
    outputs: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "exp1").symlink_to(outputs / "exp2", target_is_directory=True)
    exp2_before = checkpoint_trees(outputs / "exp2")
    watch = Watch(outputs, ["--keep", "last:1", "--archive-to", str(archive), "--settle", "0"], tmp_path / "w.log")
    try:
        # exp2 (a fine target) is archived; exp1's checkpoints are refused, logged, and stay.
        wait_until(lambda: steps(outputs / "exp2") == [20], 20, watch.describe)
        watch.wait_log("goes through a symlink")
        assert steps(outputs / "exp1") == [5, 10, 15, 20] and watch.alive()
        archived = checkpoint_trees(archive / "exp2")
        assert archived == {c: t for c, t in exp2_before.items() if c != "checkpoint-20"}  # renamed: same inodes
    finally:
        watch.terminate()


# ---------------------------------------------------------------------------------------------- 2. state directory
def test_a_state_directory_that_is_not_ckptkeepers_is_refused_and_its_trash_kept(outputs: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "trash").mkdir(parents=True)
    (home / "trash" / "photo.jpg").write_bytes(b"precious")
    (home / "notes.txt").write_text("mine")
    before = tree(home)
    message = (
        f"the state directory {home} exists and was not made by ckptkeeper (it holds notes.txt, trash): ckptkeeper "
        "deletes what is in a state directory's trash/, so it uses only a new or empty directory, or one it made"
    )
    _refused_everywhere(outputs, ["--state-dir", str(home)], message, tmp_path)
    assert tree(home) == before


def test_an_archive_inside_the_state_directory_is_refused(outputs: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    archive = state / "trash" / "archive"
    message = f"--archive-to {archive} is inside the state directory {state}: they must be apart"
    _refused_everywhere(outputs, ["--state-dir", str(state), "--archive-to", str(archive)], message, tmp_path)
    assert not state.exists()


def test_a_state_directory_inside_a_kept_checkpoint_is_refused_and_the_checkpoint_untouched(
    outputs: Path, tmp_path: Path
) -> None:
    kept = outputs / "exp1" / "checkpoint-20"
    before = tree(kept)
    state = kept / "state"
    message = (
        f"the state directory {state} is inside a checkpoint (checkpoint-20): ckptkeeper never writes inside a "
        "checkpoint"
    )
    _refused_everywhere(outputs, ["--state-dir", str(state)], message, tmp_path)
    assert tree(kept) == before


def test_a_root_that_is_a_checkpoint_is_refused_and_left_untouched(outputs: Path, tmp_path: Path) -> None:
    checkpoint = outputs / "exp1" / "checkpoint-20"
    before = tree(checkpoint)
    for command in ("plan", "prune", "watch"):
        done = ckptkeeper(command, checkpoint, "--keep", "last:1")
        assert done.returncode == 2, done
        assert done.stderr == (
            f"Error: ROOT {checkpoint} is a checkpoint directory or inside one (checkpoint-20): give the directory "
            "that holds the checkpoint-N directories (ckptkeeper never writes inside a checkpoint)\n"
        )
    assert tree(checkpoint) == before


@pytest.mark.parametrize("where", ["the root", "above the root"])
def test_a_state_directory_that_is_or_contains_the_root_is_refused(outputs: Path, tmp_path: Path, where: str) -> None:
    state = outputs if where == "the root" else tmp_path
    word = "is the root" if where == "the root" else "contains the root"
    done = ckptkeeper("prune", outputs, "--keep", "last:1", "--state-dir", state)
    assert done.returncode == 2, done
    assert done.stderr.startswith(f"Error: the state directory {state} {word} {outputs}"), done.stderr
    assert steps(outputs / "exp1") == [5, 10, 15, 20]


@pytest.mark.parametrize("kind", ["new", "empty", "made by ckptkeeper 0.1"])
def test_a_new_empty_or_own_state_directory_is_used_and_marked(outputs: Path, tmp_path: Path, kind: str) -> None:
    state = tmp_path / "state"
    if kind != "new":
        state.mkdir()
    if kind == "made by ckptkeeper 0.1":
        (state / "trash").mkdir()
        (state / "lock").write_text("")
        (state / "journal.jsonl").write_text("")
    done = ckptkeeper("prune", outputs, "--keep", "last:1", "--state-dir", state)
    assert done.returncode == 0, done
    assert (state / OWNER_MARK).is_file() and steps(outputs / "exp1") == [20]


def test_only_trash_entries_named_by_ckptkeeper_are_deleted(outputs: Path) -> None:
    state = StateDir(outputs / STATE_DIR_NAME)
    state.create()
    (state.trash / "aaaaaaaaaaaa.checkpoint-3").mkdir()
    (state.trash / "somebody-elses").mkdir()
    done = ckptkeeper("prune", outputs, "--keep", "last:4")
    assert done.returncode == 0, done
    assert sorted(p.name for p in state.trash.iterdir()) == ["somebody-elses"]
    assert "not a trash entry of ckptkeeper's; left alone" in done.stderr


# ---------------------------------------------------------------------------------------------- 3. check-then-act
SWAPPER = """
import os, sys, time
root, outside = sys.argv[1], sys.argv[2]
run, real, link_target = os.path.join(root, "run"), os.path.join(root, "run.real"), os.path.join(outside, "run")
print("swapping", flush=True)
while True:
    try:
        os.rename(run, real)
        os.symlink(link_target, run)
        end = time.perf_counter() + 0.0002
        while time.perf_counter() < end:
            pass
        os.unlink(run)
        os.rename(real, run)
    except OSError:
        pass
"""


def _put_back(root: Path) -> None:
    """Undo a swap the swapper was killed in the middle of."""
    if (root / "run.real").exists():
        if (root / "run").is_symlink():
            (root / "run").unlink()
        os.rename(root / "run.real", root / "run")


def test_a_run_directory_swapped_for_a_symlink_mid_prune_never_costs_anything_outside(tmp_path: Path) -> None:
    """Another process swaps the run directory for a symlink to another tree (on a shared /outputs any user
    can rename their own run) as fast as it can, while the real engine prunes, round after round. Whatever
    it catches, the tree outside the root keeps every file. (The old code, which checked the path and then
    renamed by the path, lost checkpoints outside within a few dozen rounds.)"""
    root, outside = tmp_path / "root", tmp_path / "outside"
    policy = Policy(parse_rules("last:1"), Protections(trainer_best=False))
    simulate_run(outside / "run", SMALL)
    decoys = checkpoint_trees(outside / "run")
    outcomes: dict[str, int] = {}
    for _ in range(ROUNDS):
        shutil.rmtree(root, ignore_errors=True)
        simulate_run(root / "run", SMALL)
        pipeline = Pipeline.checked(root, policy, state_dir=root / STATE_DIR_NAME)
        state = pipeline.state
        plan = pipeline.survey(None)
        swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(root), str(outside)], stdout=subprocess.PIPE)
        try:
            assert swapper.stdout is not None and swapper.stdout.readline() == b"swapping\n"
            pipeline.acquire()
            for o in [o for r in pipeline.act(plan.plan) for o in r.outcomes]:
                outcomes[o.action] = outcomes.get(o.action, 0) + 1
        finally:
            swapper.kill()
            swapper.wait()
            state.close()
        _put_back(root)
        assert checkpoint_trees(outside / "run") == decoys, outcomes
        assert 20 in steps(root / "run")
    assert outcomes.get("error", 0) + outcomes.get("vanished", 0) + outcomes.get("skipped", 0) > 0, outcomes


ROUNDS = 150


# ------------------------------------------------------------------------------------------- 9. one instance per root
def _hold_root(outputs: Path, tmp_path: Path, *args: str) -> Watch:
    watch = Watch(outputs, ["--keep", "last:4", "--state-dir", str(tmp_path / "state-a"), *args], tmp_path / "a.log")
    watch.wait_log("watching ")
    return watch


def test_prune_with_another_state_directory_beside_watch_on_the_same_root_exits_4(
    outputs: Path, tmp_path: Path
) -> None:
    watch = _hold_root(outputs, tmp_path)
    try:
        done = ckptkeeper("prune", outputs, "--keep", "last:1", "--state-dir", tmp_path / "state-b")
        assert done.returncode == 4, done
        assert f"only one instance may run per root (lock: {outputs / ROOT_LOCK_NAME})" in done.stderr
        assert steps(outputs / "exp1") == [5, 10, 15, 20]
    finally:
        watch.terminate()


@pytest.mark.parametrize("how", ["a symlink", "a bind mount"])
def test_the_root_lock_holds_however_the_root_is_reached(outputs: Path, tmp_path: Path, how: str) -> None:
    if how == "a bind mount" and os.geteuid() != 0:
        pytest.skip("needs root to mount")
    watch = _hold_root(outputs, tmp_path)
    try:
        if how == "a symlink":
            other = tmp_path / "link"
            other.symlink_to(outputs, target_is_directory=True)
            done = ckptkeeper("prune", other, "--keep", "last:1", "--state-dir", tmp_path / "state-b")
        else:
            with bind_mount(outputs, tmp_path / "again") as other:
                done = ckptkeeper("prune", other, "--keep", "last:1", "--state-dir", tmp_path / "state-b")
        assert done.returncode == 4, done
        assert steps(outputs / "exp1") == [5, 10, 15, 20]
    finally:
        watch.terminate()


# ---------------------------------------------------------------------------------------------- 11. push_to_hub
def test_nothing_ckptkeeper_creates_in_an_output_dir_is_uploaded_by_push_to_hub(tmp_path: Path) -> None:
    """The Trainer uploads output_dir at every save with ignore_patterns=["_*", "checkpoint-*"] (transformers
    trainer.py); huggingface_hub's own filter decides. Everything ckptkeeper made there must be filtered out,
    including a trash entry in the middle of a removal and the run-local trash."""
    hub = pytest.importorskip("huggingface_hub.utils")
    output_dir = tmp_path / "outputs"
    simulate_run(output_dir, SMALL)
    (output_dir / "README.md").write_text("model card")
    state = StateDir(output_dir / STATE_DIR_NAME)
    state.acquire_lock(output_dir)
    state.record({"action": "start-delete", "checkpoint": "checkpoint-5"})
    os.rename(output_dir / "checkpoint-5", state.trash / "0123456789ab.checkpoint-5")  # a removal under way
    (output_dir / "_ckptkeeper-trash" / "0123456789ab.checkpoint-10").mkdir(parents=True)
    try:
        files = [os.path.relpath(os.path.join(d, n), output_dir) for d, _, names in os.walk(output_dir) for n in names]
        uploaded = list(hub.filter_repo_objects(files, ignore_patterns=["_*", "checkpoint-*"]))
        assert uploaded == ["README.md"], uploaded
        ours = [f for f in files if "ckptkeeper" in f]
        assert len(ours) >= 4 and not set(ours) & set(uploaded)
    finally:
        state.close()


def test_the_library_refuses_the_same_paths(outputs: Path, tmp_path: Path) -> None:
    link = tmp_path / "archive"
    link.symlink_to(outputs, target_is_directory=True)
    with pytest.raises(LayoutError, match="is the root"):
        Layout.checked(outputs, None, link)
    assert Layout.checked(outputs, None, tmp_path / "elsewhere").archive_dir == tmp_path / "elsewhere"


def test_standby_waits_for_the_lock_and_takes_over_when_the_holder_dies(outputs: Path, tmp_path: Path) -> None:
    first = _hold_root(outputs, tmp_path)
    second = Watch(outputs, ["--keep", "last:1", "--standby", "--settle", "0"], tmp_path / "b.log")
    try:
        second.wait_log("standby: another ckptkeeper")
        time.sleep(0.5)
        assert second.alive() and steps(outputs / "exp1") == [5, 10, 15, 20]
        first.kill()
        second.wait_log("taking over", timeout=10)
        wait_until(lambda: steps(outputs / "exp1") == [20] and steps(outputs / "exp2") == [20], 15, second.describe)
    finally:
        first.kill()
        second.terminate()
