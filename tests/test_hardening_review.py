"""What an adversarial review of the hardening found, each made for real and kept as a test: an alias no
identity reveals (one volume mounted twice by FUSE), a link swapped into a parent of the watched root, a
checkpoint rewritten in place while a prune works, an evaluation job writing into an older checkpoint of a
reused output directory, checkpoints reached through bind mounts, an archive inside another root's
checkpoint, and `--exit-when-done` with a save still being written or a trash entry that cannot go.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cliutil import bind_mount, ckptkeeper
from fuseutil import fuse_mounted
from watchutil import Watch, steps, wait_until

from ckptkeeper.engine import Pipeline
from ckptkeeper.policy import Policy, Protections
from ckptkeeper.rules import parse_rules
from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.state import STATE_DIR_NAME

SMALL = SimConfig(steps_per_epoch=10, epochs=2, save_steps=5, eval_steps=5)  # checkpoints 5, 10, 15, 20
LOOPFS = Path(__file__).parent / "loopfs.py"
DAY = 86400.0
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")


def date_back(checkpoint: Path, when: float) -> None:
    for dirpath, _, filenames in os.walk(checkpoint):
        for name in filenames:
            os.utime(os.path.join(dirpath, name), (when, when))


def fuse_mount(source: Path, mount_point: Path) -> contextlib.AbstractContextManager[Path]:
    return fuse_mounted(mount_point, LOOPFS, str(source), str(mount_point))


# ---------------------------------------------------------------------------------------------- aliases
def test_one_volume_mounted_twice_by_fuse_is_never_taken_for_an_archive(tmp_path: Path) -> None:
    """Two FUSE mounts of one directory have different devices and inodes and their own lines in the mount
    table: nothing but the data shows they are one. The old check called every target "already archived"
    and deleted the checkpoint everywhere."""
    bucket = tmp_path / "bucket"
    simulate_run(bucket / "outputs" / "exp1", SMALL)
    with fuse_mount(bucket, tmp_path / "outputs") as outputs, fuse_mount(bucket, tmp_path / "archive") as archive:
        assert os.stat(outputs).st_dev != os.stat(archive).st_dev
        done = ckptkeeper("prune", outputs / "outputs", "--keep", "last:1", "--archive-to", archive / "outputs")
        assert done.returncode == 1, done
        failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
        assert len(failed) == 3 and all("the same volume mounted twice" in line for line in failed), done.stdout
    assert steps(bucket / "outputs" / "exp1") == [5, 10, 15, 20]


@needs_root
@pytest.mark.parametrize("where", ["ROOT", "--state-dir"])
def test_a_checkpoint_reached_through_a_bind_mount_is_still_a_checkpoint(tmp_path: Path, where: str) -> None:
    root = tmp_path / "out"
    simulate_run(root / "run", SMALL)
    kept = root / "run" / "checkpoint-20"
    before = sorted(os.listdir(kept)), kept.stat().st_mtime_ns
    with bind_mount(kept, tmp_path / "mnt") as mnt:
        if where == "ROOT":
            done = ckptkeeper("prune", mnt, "--keep", "last:1")
            assert "is a checkpoint directory or inside one (checkpoint-20)" in done.stderr, done
        else:
            done = ckptkeeper("prune", root, "--keep", "last:1", "--state-dir", mnt / "state")
            assert "is inside a checkpoint (checkpoint-20)" in done.stderr, done
        assert done.returncode == 2
    assert (sorted(os.listdir(kept)), kept.stat().st_mtime_ns) == before
    assert steps(root / "run") == [5, 10, 15, 20]


def test_an_archive_inside_a_checkpoint_of_another_root_is_refused(tmp_path: Path) -> None:
    simulate_run(tmp_path / "out" / "run", SMALL)
    simulate_run(tmp_path / "other" / "run", SMALL)
    archive = tmp_path / "other" / "run" / "checkpoint-5" / "archive"
    done = ckptkeeper("prune", tmp_path / "out", "--keep", "last:1", "--archive-to", archive)
    assert done.returncode == 2, done
    assert done.stderr == (
        f"Error: --archive-to {archive} is inside a checkpoint (checkpoint-5): the archive would go when that "
        "checkpoint is removed\n"
    )
    assert not archive.exists() and steps(tmp_path / "out" / "run") == [5, 10, 15, 20]


def test_watch_never_follows_a_link_swapped_into_a_parent_of_its_root(tmp_path: Path) -> None:
    """On a shared volume anyone who can rename a parent of the root can put a link there to another
    user's runs: the daemon must neither delete there nor start watching there."""
    alice, bob = tmp_path / "alice" / "job", tmp_path / "bob" / "job"
    simulate_run(alice / "out" / "run", SMALL)
    simulate_run(bob / "out" / "run", SMALL)
    bobs = {c.name: c.stat().st_ino for c in (bob / "out" / "run").iterdir()}
    watch = Watch(alice / "out", ["--keep", "last:4", "--settle", "0", "--rescan-interval", "1"], tmp_path / "w.log")
    try:
        watch.wait_log("watching ")
        os.rename(alice, tmp_path / "alice" / "job.old")
        alice.symlink_to(bob, target_is_directory=True)
        (bob / "out" / "run" / "checkpoint-25").mkdir()  # an event there, as if bob's trainer saved
        watch.wait_log("(a link on its path changed): not following it", timeout=10)
        time.sleep(2)  # two full rescans (--rescan-interval 1) that must not act there either
        now = {c.name: c.stat().st_ino for c in (bob / "out" / "run").iterdir()}
        assert now == {**bobs, "checkpoint-25": now["checkpoint-25"]}
        assert not (bob / "out" / STATE_DIR_NAME).exists() and not (bob / "out" / "_ckptkeeper.lock").exists()
        assert watch.alive()
    finally:
        watch.terminate()


# ---------------------------------------------------------------------------------------------- what was judged
def test_a_checkpoint_rewritten_in_place_after_the_plan_is_left_alone(tmp_path: Path) -> None:
    """A run resumed from an earlier checkpoint saves into an existing directory: same names, same sizes,
    new bytes and times. A removal planned before that must not go through."""
    root = tmp_path / "out"
    simulate_run(root / "run", SMALL)
    policy = Policy(parse_rules("last:1"), Protections(trainer_best=False))
    pipeline = Pipeline.checked(root, policy, state_dir=root / STATE_DIR_NAME)
    plan = pipeline.survey(None).plan
    optimizer = root / "run" / "checkpoint-15" / "optimizer.pt"
    size = optimizer.stat().st_size
    optimizer.write_bytes(os.urandom(size))  # rewritten in place: same size
    pipeline.acquire()
    try:
        results = pipeline.act(plan)
    finally:
        pipeline.state.close()
    assert [(o.checkpoint, o.action) for r in results for o in r.outcomes] == [
        ("checkpoint-5", "delete"),
        ("checkpoint-10", "delete"),
        ("checkpoint-15", "skipped"),
    ]
    assert steps(root / "run") == [15, 20]


def test_an_evaluation_result_written_into_an_older_checkpoint_never_costs_the_resume_point(tmp_path: Path) -> None:
    """A reused output directory (a stale run's 500 and 1000 from days ago) and a live run (10, 20): an
    evaluation job writes its results into checkpoint-10 after 20 was saved. By file times 10 is now the
    newest written; by trainer_state.json's time, 20 is. Both are kept; the warning names the stale ones."""
    root = tmp_path / "out"
    for step, age in ((500, 3 * DAY), (1000, 3 * DAY), (10, 120), (20, 60)):
        simulate_run(tmp_path / "gen", SimConfig(steps_per_epoch=step, epochs=1, save_steps=step, eval_steps=step))
        shutil.move(tmp_path / "gen" / f"checkpoint-{step}", root / f"checkpoint-{step}")
        shutil.rmtree(tmp_path / "gen")
        date_back(root / f"checkpoint-{step}", time.time() - age)
    (root / "checkpoint-10" / "eval_results.json").write_text(json.dumps({"hellaswag": 0.31}))

    plan = ckptkeeper("plan", root, "--keep", "last:1", "--json")
    assert plan.returncode == 0, plan
    [run] = json.loads(plan.stdout)["runs"]
    decisions = {c["name"]: (c["decision"], [r["text"] for r in c["reasons"]]) for c in run["checkpoints"]}
    assert decisions["checkpoint-20"][0] == "keep" and "protected: newest written" in decisions["checkpoint-20"][1]
    assert decisions["checkpoint-10"][0] == "keep" and "protected: newest written" in decisions["checkpoint-10"][1]
    assert decisions["checkpoint-500"][0] == "delete"
    assert run["mixed_runs"] == {
        "newest_written": "checkpoint-20",
        "highest_step": "checkpoint-1000",
        "stale": ["checkpoint-500", "checkpoint-1000"],
    }
    done = ckptkeeper("prune", root, "--keep", "last:1")
    assert done.returncode == 0, done
    assert steps(root) == [10, 20, 1000]


# ---------------------------------------------------------------------------------------------- exit when done
def test_exit_when_done_waits_while_a_newer_save_is_being_written(tmp_path: Path) -> None:
    """The highest complete checkpoint says training stopped (a finished earlier run in a reused output
    directory), but a new save is being written: the watch must not end."""
    root = tmp_path / "out"
    simulate_run(root / "run", SMALL)  # its checkpoint-20 says should_training_stop
    partial = root / "run" / "checkpoint-25"
    partial.mkdir()
    (partial / "config.json").write_text("{}")  # no trainer_state.json yet: a save in progress
    watch = Watch(root, ["--keep", "last:1", "--settle", "0", "--exit-when-done"], tmp_path / "w.log")
    try:
        watch.wait_log("run/checkpoint-20 kept")
        time.sleep(2)
        assert watch.alive(), watch.describe()
        assert "training finished" not in watch.log()
        shutil.rmtree(partial)  # the save is abandoned: now the run is finished
        assert watch.wait_exit(15) == 0, watch.describe()
    finally:
        watch.kill()


def _chattr(flag: str, path: Path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True, check=False).returncode == 0


def test_exit_when_done_waits_while_a_trash_entry_cannot_be_deleted(tmp_path: Path) -> None:
    root = tmp_path / "out"
    simulate_run(root / "run", SMALL)
    stuck = root / "run" / "checkpoint-5" / "optimizer.pt"
    if os.geteuid() != 0 or not _chattr("+i", stuck):
        pytest.skip("needs root and a filesystem with the immutable attribute (chattr +i)")
    trash = root / STATE_DIR_NAME / "trash"
    args = ["--keep", "last:1", "--settle", "0", "--exit-when-done", "--rescan-interval", "1"]
    watch = Watch(root, args, tmp_path / "w.log")
    try:
        watch.wait_log("could not finish deleting")
        time.sleep(2)
        assert watch.alive(), watch.describe()
        for entry in trash.iterdir():
            _chattr("-i", entry / "optimizer.pt")
        assert watch.wait_exit(30) == 0, watch.describe()  # retried at the next full rescan, then done
        assert not list(trash.iterdir())
    finally:
        for entry in trash.glob("*"):
            _chattr("-i", entry / "optimizer.pt")
        watch.kill()


# ---------------------------------------------------------------------------------------------- second review
def test_a_directory_that_only_looks_like_an_old_state_directory_is_refused(tmp_path: Path) -> None:
    """A `journal.jsonl` and a `trash/` are not enough: a trash holding anything ckptkeeper never names
    shows the directory is someone else's (ckptkeeper 0.1's holds only its own entries)."""
    simulate_run(tmp_path / "out" / "run", SMALL)
    home = tmp_path / "home"
    (home / "trash" / "0123456789ab.checkpoint-1").mkdir(parents=True)
    (home / "trash" / "0123456789ab.checkpoint-1" / "thesis.tex").write_text("precious")
    (home / "trash" / "notes.txt").write_text("mine")
    (home / "journal.jsonl").write_text("{}\n")
    done = ckptkeeper("prune", tmp_path / "out", "--keep", "last:1", "--state-dir", home)
    assert done.returncode == 2 and "was not made by ckptkeeper" in done.stderr, done
    assert (home / "trash" / "0123456789ab.checkpoint-1" / "thesis.tex").read_text() == "precious"


@needs_root
def test_prune_starts_and_frees_space_on_a_full_filesystem(tmp_path: Path) -> None:
    """The disk full is the case ckptkeeper is for: its start must need no free block (the lock files'
    "held by" line is best effort)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "ckptkeeper-test", str(mount)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs")
    try:
        root = mount / "out"
        simulate_run(root / "run", SMALL)
        assert ckptkeeper("prune", root, "--keep", "last:4").returncode == 0  # state and lock files made
        filler = mount / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        assert os.statvfs(mount).f_bavail == 0
        done = ckptkeeper("prune", root, "--keep", "last:1")
        assert done.returncode == 0, done
        assert steps(root / "run") == [20] and os.statvfs(mount).f_bavail > 0
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_journal_that_cannot_be_written_stops_each_removal_with_one_line(tmp_path: Path) -> None:
    root = tmp_path / "out"
    simulate_run(root / "run", SMALL)
    assert ckptkeeper("prune", root, "--keep", "last:4").returncode == 0
    journal = root / STATE_DIR_NAME / "journal.jsonl"
    journal.unlink(missing_ok=True)
    journal.mkdir()  # a directory where the journal goes: nothing can be recorded, so nothing is done
    done = ckptkeeper("prune", root, "--keep", "last:1")
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 3 and all(f"cannot write the journal {journal}" in line for line in failed), done.stdout
    assert steps(root / "run") == [5, 10, 15, 20]


def test_health_is_200_while_watch_waits_for_its_root(tmp_path: Path) -> None:
    """A native sidecar's startup probe must pass while the trainer, started only after it, has not made
    the root yet."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "not-yet"
    watch = Watch(root, ["--keep", "last:1", "--metrics-port", str(port)], tmp_path / "w.log")
    try:
        watch.wait_log("does not exist yet")

        def healthz() -> tuple[int, str] | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    return r.status, r.read().decode()
            except OSError:
                return None

        assert wait_until(healthz, 10, "/healthz") == (200, f"waiting for the root {root} to appear\n")
        simulate_run(root / "run", SMALL)
        wait_until(lambda: steps(root / "run") == [20], 20, watch.describe)
    finally:
        watch.terminate()


def test_a_state_directory_in_use_for_another_root_says_so(tmp_path: Path) -> None:
    simulate_run(tmp_path / "a" / "run", SMALL)
    simulate_run(tmp_path / "b" / "run", SMALL)
    state = tmp_path / "state"
    watch = Watch(tmp_path / "a", ["--keep", "last:4", "--state-dir", str(state)], tmp_path / "w.log")
    try:
        watch.wait_log("watching ")
        done = ckptkeeper("prune", tmp_path / "b", "--keep", "last:1", "--state-dir", state)
        assert done.returncode == 4, done
        assert f"pid {watch.pid} on " in done.stderr and f"for {tmp_path / 'a'})" in done.stderr, done.stderr
        assert f"is using the state directory {state}; a state directory serves one root at a time" in done.stderr
    finally:
        watch.terminate()
