"""Adversarial review of prune's fifth session (session 10): the re-check's signature through descriptors, the
state directory checked once per removal, the pins guard's removal marker (written in place on the branch: reverted,
finding 1), trash names, the path split once per run, the tree delete's inline unlink, four deleter threads. Real
processes, real filesystems (a btrfs loop mount), real signals; the engine's moments are found with audit hooks in
the child. Each FINDING below failed for its reason before its fix and passes since."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptkeeper.scan import lstat_signature
from ckptkeeper.simtrainer import SimConfig, simulate_run

# The end of every hooked command below: the audit hook `hook` installed, then the command line run as `ckptkeeper`.
RUN_HOOKED = """
sys.addaudithook(hook)
from ckptkeeper.cli import main
main(sys.argv[1:])
"""

# `ckptkeeper pin R10_DO` of the root R10_ROOT, its exit code and output written to R10_OUT (from inside a hook).
PIN = """
def pin():
    cmd = [sys.executable, "-m", "ckptkeeper", "pin", "--root", os.environ["R10_ROOT"], os.environ["R10_DO"]]
    done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    with open(os.environ["R10_OUT"], "w") as f:
        f.write(f"{done.returncode}\\n{done.stdout}{done.stderr}")
"""

# A `prune` whose main thread, just before it renames the checkpoint named R10_AT into the trash (the audit event
# of os.rename: the pins guard's marker is taken, the start line written), is SIGKILLed (R10_DO=kill) or frees the
# file R10_FREE and runs `ckptkeeper pin R10_DO`, writing its exit code and output to R10_OUT.
HOOKED_PRUNE = (
    r"""
import os, signal, subprocess, sys
"""
    + PIN
    + r"""
def hook(event, args):
    if event != "os.rename" or args[0] != os.environ["R10_AT"]:
        return
    if os.environ["R10_DO"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os.unlink(os.environ["R10_FREE"])
    pin()

"""
    + RUN_HOOKED
)


def make_run(root: Path, checkpoints: int) -> Path:
    run = root / "run"
    # Small files (kept inline by btrfs: deleting them frees no data space).
    config = SimConfig(
        steps_per_epoch=checkpoints,
        epochs=1,
        save_steps=1,
        eval_strategy="no",
        metric_for_best_model=None,
        model_floats=100,
        optimizer_bytes=100,
    )
    simulate_run(run, config)
    return run


def run_hooked(script: str, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """`python -c SCRIPT ARGS...` (a hooked `ckptkeeper`: RUN_HOOKED) with these environment variables added."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def hooked_prune(root: Path, at: str, do: str, free: Path, out: Path) -> subprocess.CompletedProcess[str]:
    args = ["prune", str(root), "--keep", "last:2", "--no-protect-trainer-best"]
    env = {"R10_AT": at, "R10_DO": do, "R10_ROOT": str(root), "R10_FREE": str(free), "R10_OUT": str(out)}
    return run_hooked(HOOKED_PRUNE, args, **env)


def fill(where: Path) -> Path:
    """Write `where`/filler until the filesystem says ENOSPC; returns the filler (deleting it frees the space)."""
    filler = where / "filler"
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(b"\0" * (1 << 20))
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
    return filler


@pytest.fixture
def btrfs(tmpfs: Path, tmp_path: Path) -> Iterator[Path]:
    """A fresh 160 MiB btrfs (copy on write: an overwrite in place needs new data space), its image on a tmpfs."""
    if os.geteuid() != 0 or shutil.which("mkfs.btrfs") is None:
        pytest.skip("needs root and mkfs.btrfs")
    image = tmpfs / f"review10-{uuid.uuid4().hex[:8]}.img"
    where = tmp_path / "btrfs"
    where.mkdir()
    try:
        subprocess.run(["truncate", "-s", "160M", str(image)], check=True)
        if subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], capture_output=True, check=False).returncode:
            pytest.skip("mkfs.btrfs failed")
        mounting = ["mount", "-o", "loop", str(image), str(where)]
        if subprocess.run(mounting, capture_output=True, check=False).returncode:
            pytest.skip("cannot loop-mount a btrfs")
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
        image.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- 1. the marker in place
def test_a_pin_that_succeeds_during_a_removal_on_a_full_copy_on_write_disk_is_kept(btrfs: Path) -> None:
    """FINDING, fixed by reverting it (prunefast d0010f2, pins.guarded_removal): the marker's words were written over
    the old ones, no longer truncated first. A killed engine's words stay in the file (its flock died with it). On a
    copy-on-write filesystem (btrfs, ZFS) with its data space full, an overwrite in place fails with ENOSPC (suppressed:
    "its words are for messages"), so the next removal holds the flock under the dead engine's words, which name another
    checkpoint; `removal_under_way` trusts them, and a `pin` of the checkpoint being removed succeeds (exit 0, "pinned")
    while it is deleted: G22 broken. main truncates first, so the marker is empty (or names the right checkpoint) and
    any pin is refused. Passes on main."""
    root = btrfs / "root"
    run = make_run(root, 4)
    out = btrfs.parent / "pin.out"
    killed = hooked_prune(root, "checkpoint-1", "kill", btrfs / "none", out)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run / "checkpoint-1").is_dir()  # killed before the rename: whole under its name
    filler = fill(btrfs)  # a saving run fills the disk: what pressure pruning is for
    target = run / "checkpoint-2"
    done = hooked_prune(root, "checkpoint-2", str(target), filler, out)
    assert done.returncode in (0, 1), done.stderr
    code, _, said = out.read_text().partition("\n")
    assert not (code == "0" and not target.exists()), f"pin exited 0 ({said.strip()}), then the checkpoint went"


# A `prune` during which the disk fills: the moment it renames checkpoint-1 (its marker's words written), a saving
# run writes R10_FREE until ENOSPC; the moment it renames checkpoint-2, that file is deleted (the run's own rotation)
# and `ckptkeeper pin R10_DO` is run, its exit code and output written to R10_OUT.
FILLED_MID_PRUNE = (
    r"""
import os, subprocess, sys
"""
    + PIN
    + r"""
def hook(event, args):
    if event != "os.rename" or args[0] not in ("checkpoint-1", "checkpoint-2"):
        return
    if args[0] == "checkpoint-1":
        try:
            with open(os.environ["R10_FREE"], "wb") as f:
                while True:
                    f.write(bytes(1 << 20))
        except OSError:
            return
    os.unlink(os.environ["R10_FREE"])
    pin()

"""
    + RUN_HOOKED
)


def test_a_pin_during_a_removal_is_refused_when_the_disk_filled_during_the_previous_one(btrfs: Path) -> None:
    """FINDING (the same, with no crash): the disk (btrfs) fills while checkpoint-1 is removed; its marker's
    blanking in place fails, so its words stay; the marker of checkpoint-2's removal cannot be written over them
    either, and a `pin` of checkpoint-2 made during that removal, once the saving run's rotation freed some space,
    exits 0 while checkpoint-2 is deleted. Passes on main (truncated, the marker is empty: pin refused)."""
    root = btrfs / "root"
    run = make_run(root, 4)
    out, target = btrfs.parent / "pin.out", run / "checkpoint-2"
    env = {"R10_DO": str(target), "R10_ROOT": str(root), "R10_FREE": str(btrfs / "filler"), "R10_OUT": str(out)}
    args = ["prune", str(root), "--keep", "last:2", "--no-protect-trainer-best"]
    done = run_hooked(FILLED_MID_PRUNE, args, **env)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    code, _, said = out.read_text().partition("\n")
    assert not (code == "0" and not target.exists()), f"pin exited 0 ({said.strip()}), then the checkpoint went"


# ------------------------------------------------------------------------------- 2. the state directory, once
# A `prune` that, the moment its pins guard reads the pins (the marker opened just before: the state directory was
# checked then), removes the state directory's trash (R10_RMTRASH: `rmdir`, it is empty) or the whole state
# directory (R10_RMSTATE), once; then lets the removal go on.
STATE_GONE_PRUNE = (
    r"""
import os, shutil, sys

marked = []

def hook(event, args):
    if event != "open" or not args or not isinstance(args[0], str) or len(marked) > 1:
        return
    if args[0] == "removing":
        marked.append(1)
    elif args[0] == "pins.json" and marked:
        marked.append(2)
        if os.environ.get("R10_RMTRASH"):
            os.rmdir(os.environ["R10_RMTRASH"])
        else:
            shutil.rmtree(os.environ["R10_RMSTATE"])

"""
    + RUN_HOOKED
)


def state_gone_prune(root: Path, state: Path, **env: str) -> subprocess.CompletedProcess[str]:
    args = ["prune", str(root), "--state-dir", str(state), "--keep", "last:2", "--no-protect-trainer-best"]
    return run_hooked(STATE_GONE_PRUNE, args, **env)


def test_a_trash_deleted_mid_removal_is_never_reported_as_the_checkpoint_vanishing(tmp_path: Path) -> None:
    """FINDING, fixed (`actions._not_found`) (prunefast 7634f6f, StateDir.one_removal): the trash is checked once, at
    the pins guard; removed right after (an operator's `rmdir` of an empty directory, a cleanup job), the rename into it
    fails with ENOENT, which `_into_trash` takes for the checkpoint's own absence: the outcome and the journal say the
    checkpoint "vanished" (removed by someone else) while it is whole under its name. main checks at the rename, makes
    the trash anew, and removes it; either way a whole checkpoint must not be recorded as gone. Passes on main."""
    root, state = tmp_path / "root", tmp_path / "state"
    run = make_run(root, 3)
    done = state_gone_prune(root, state, R10_RMTRASH=str(state / "trash"))
    whole = (run / "checkpoint-1").is_dir()
    lines = [json.loads(x) for x in (state / "journal.jsonl").read_text().splitlines()]
    said = [x["action"] for x in lines if x.get("checkpoint") == "checkpoint-1"]
    assert not (whole and "vanished" in said), (said, done.stdout)
    assert not (whole and "vanished" in done.stdout.lower()), done.stdout


# A `prune` whose state directory is deleted (`rm -rf`) the moment it renames checkpoint-1 into the trash; then, the
# moment it renames checkpoint-2, a second `prune --dry-run` of the same root (it takes the lock too) is run and its
# exit code written to R10_OUT.
LOCK_GONE_PRUNE = (
    r"""
import os, shutil, subprocess, sys

def hook(event, args):
    if event != "os.rename" or args[0] not in ("checkpoint-1", "checkpoint-2"):
        return
    if args[0] == "checkpoint-1":
        shutil.rmtree(os.environ["R10_RMSTATE"])
        return
    cmd = [sys.executable, "-m", "ckptkeeper", *sys.argv[1:]]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=10)
        said = f"{done.returncode}\n{done.stdout}{done.stderr}"
    except subprocess.TimeoutExpired:  # it took the lock and waits for this one's removal marker
        said = "timeout\nthe second prune took the root's lock"
    with open(os.environ["R10_OUT"], "w") as f:
        f.write(said)

"""
    + RUN_HOOKED
)


def test_a_prune_whose_state_directory_is_deleted_keeps_its_root_lock(tmp_path: Path) -> None:
    """FINDING, in main too, fixed (state.StateDir.create -> close -> release_lock): a state directory found
    deleted was made anew by `create`, whose `close` also let go of the root's lock and the state lock, never taken
    again: the rest of the prune ran unlocked and a second `prune` of the same root started beside it (G7/G13),
    then waited for the first one's marker. Now the root's lock stays held and the state lock is taken again in the
    new directory: the second `prune` exits 4 at once."""
    root, state = tmp_path / "root", tmp_path / "state"
    run = make_run(root, 4)
    out = tmp_path / "second.out"
    args = ["prune", str(root), "--state-dir", str(state), "--keep", "last:2", "--no-protect-trainer-best"]
    run_hooked(LOCK_GONE_PRUNE, args, R10_RMSTATE=str(state), R10_OUT=str(out))
    code, _, said = out.read_text().partition("\n")
    assert code == "4", f"a second prune ran beside the first (exit {code}):\n{said}"
    # checkpoint-1 stays whole: its trash went at its very rename (an error, retried at the next pass)
    assert sorted(os.listdir(run)) == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]


# ------------------------------------------------------------------------------- 3. the signature by descriptors
def _checkpoint_tree(run: Path) -> Path:
    """A checkpoint with a DeepSpeed-like nested tree, a link, a hard link and a FIFO in it."""
    c = run / "checkpoint-1"
    (c / "global_step1" / "deep" / "deeper").mkdir(parents=True)
    for rel in ("model.safetensors", "global_step1/a.pt", "global_step1/deep/b.pt", "global_step1/deep/deeper/c"):
        (c / rel).write_bytes(rel.encode())
    (c / "link").symlink_to("model.safetensors")
    os.link(c / "global_step1" / "a.pt", c / "hard.pt")
    os.mkfifo(c / "fifo")
    return c


def _mutations(c: Path, outside: Path) -> list[tuple[str, object]]:
    (outside / "file").write_bytes(b"")

    def swap_dir_for_link() -> None:
        shutil.copytree(c / "global_step1" / "deep", outside / "deep", symlinks=True)
        shutil.rmtree(c / "global_step1" / "deep")
        (c / "global_step1" / "deep").symlink_to(outside / "deep")

    return [
        ("nested file replaced by a hard link", lambda: os.replace(c / "hard.pt", c / "global_step1/deep/b.pt")),
        ("a hard link made from outside", lambda: os.link(c / "global_step1/deep/deeper/c", outside / "c")),
        ("fifo swapped for a file", lambda: os.replace(outside / "file", c / "fifo")),
        ("nested directory swapped for a link", swap_dir_for_link),
        ("deep entry chmod'ed", lambda: os.chmod(c / "global_step1" / "a.pt", 0o600)),
        ("nested directory renamed", lambda: os.rename(c / "global_step1", c / "global_step2")),
    ]


def test_the_signature_through_descriptors_is_the_scan_s_and_sees_every_nested_swap(tmp_path: Path) -> None:
    """HELD: `recheck._signature_at` (fstatat below the checkpoint's descriptor) equals `scan.lstat_signature`
    (the walk by path) on a tree with nested directories, a link, a hard link and a FIFO, and changes with each
    swap below it (a nested file replaced, a hard link made from outside, a FIFO replaced, a nested directory
    swapped for a link to a copy, a chmod three levels down, a nested directory renamed)."""
    from ckptkeeper.recheck import _signature_at
    run, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    run.mkdir()
    c = _checkpoint_tree(run)
    run_fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    try:
        before = _signature_at(run_fd, c)
        assert before == lstat_signature(c)
        for what, mutate in _mutations(c, outside):
            time.sleep(0.12)  # past the timestamp tick: the case where the signature vouches
            assert callable(mutate)
            mutate()
            if not c.exists():
                break
            now = _signature_at(run_fd, c)
            assert now == lstat_signature(c), what
            assert now != before, f"not seen: {what}"
            before = now
    finally:
        os.close(run_fd)


# ------------------------------------------------------------------------------- 4. the mount table, once per read
# A `prune` that, as its pins guard opens the marker of the removal of checkpoint-1 (scan and re-check behind it),
# mounts a tmpfs inside that checkpoint and writes a file there (R10_MNT).
MOUNTING_PRUNE = (
    r"""
import os, subprocess, sys

done = []

def hook(event, args):
    if event != "open" or not args or args[0] != "removing" or done:
        return
    done.append(1)
    where = os.environ["R10_MNT"]
    os.mkdir(where)
    subprocess.run(["mount", "-t", "tmpfs", "review10", where], check=True)
    with open(os.path.join(where, "precious"), "w") as f:
        f.write("data")

"""
    + RUN_HOOKED
)


def test_a_mount_made_inside_a_checkpoint_after_the_scan_is_seen_by_the_cached_mount_points(tmp_path: Path) -> None:
    """HELD: `MountTable.points` (made once per read of the table) still sees a tmpfs mounted inside the checkpoint
    after the scan and re-check, just before its rename: nothing on that filesystem is deleted, and the
    checkpoint is not taken apart under its name."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    root = tmp_path / "root"
    run = make_run(root, 3)
    where = run / "checkpoint-1" / "mnt"
    args = ["prune", str(root), "--keep", "last:2", "--no-protect-trainer-best"]
    try:
        done = run_hooked(MOUNTING_PRUNE, args, R10_MNT=str(where))
        assert (where / "precious").read_text() == "data", done.stdout
        assert "mount" in done.stdout, done.stdout  # refused, naming the mount point
        assert (run / "checkpoint-1" / "trainer_state.json").exists(), done.stdout
    finally:
        table = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True, check=False)
        for p in table.stdout.split():
            if p.startswith(str(tmp_path)):
                subprocess.run(["umount", "-l", p], check=False)


# ------------------------------------------------------------------------------- 5. four deleters, SIGKILL
# A `prune` SIGKILLed (by whichever deleter thread it is) the moment its fourth tree delete of a trash entry begins:
# entries before it may be half deleted by the other deleter threads, that one is whole in the trash.
KILLED_AMID_DELETERS = (
    r"""
import os, signal, sys

begun = []

def hook(event, args):
    if event == "ckptkeeper.delete_tree":
        begun.append(args[0])
        if len(begun) == 4:
            os.kill(os.getpid(), signal.SIGKILL)

"""
    + RUN_HOOKED
)


def _bulk_up(run: Path, files: int) -> None:
    for c in sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):  # newest written: highest
        extra = c / "global_step"
        extra.mkdir()
        for i in range(files):
            (extra / f"shard-{i}.pt").write_bytes(b"x" * 64)


def test_sigkill_amid_four_deleter_threads_leaves_every_entry_to_the_next_prune(tmp_path: Path) -> None:
    """HELD: a prune killed while its (now four) deleter threads each hold a half-deleted trash entry leaves every
    checkpoint whole under its name or out of the run; the next prune finishes each leftover, journals it, and
    ends with exactly the kept checkpoints and an empty trash."""
    root = tmp_path / "root"
    run = make_run(root, 10)
    _bulk_up(run, 300)
    manifest = {c.name: sorted(p.name for p in c.rglob("*")) for c in run.glob("checkpoint-*")}
    args = ["prune", str(root), "--keep", "last:2", "--no-protect-trainer-best"]
    trash = root / "_ckptkeeper" / "trash"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AMID_DELETERS, *args], capture_output=True, timeout=60, check=False
    )
    assert killed.returncode == -signal.SIGKILL
    for c in run.glob("checkpoint-*"):
        assert sorted(p.name for p in c.rglob("*")) == manifest[c.name], f"{c.name} half-deleted under its name"
    left = os.listdir(trash)
    again = subprocess.run(
        [sys.executable, "-m", "ckptkeeper", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert sorted(os.listdir(run)) == ["checkpoint-10", "checkpoint-9"], again.stdout
    assert os.listdir(trash) == []
    lines = [json.loads(x) for x in (root / "_ckptkeeper" / "journal.jsonl").read_text().splitlines()]
    started = {x["checkpoint"] for x in lines if str(x.get("action", "")).startswith("start-")}
    assert started >= {f"checkpoint-{i}" for i in range(1, 9)}, started
    assert len(left) >= 1, "no trash entry was left by the kill: the test did not reach its moment"


def test_a_marker_longer_than_its_4_kib_still_refuses_a_pin_of_the_checkpoint_being_removed(tmp_path: Path) -> None:
    """HELD: a run path whose marker words pass MARKER_BYTES (six components of emoji, 12 bytes each as JSON
    escapes) is written whole past the 4 KiB and blanked only there: `pin` of the checkpoint under removal reads
    4 KiB it cannot parse and is refused, and once the removal is over a pin of another checkpoint succeeds
    (the marker's flock is gone, its tail past 4 KiB read by no one)."""
    root = tmp_path / "root"
    deep = root.joinpath(*(["\N{GRINNING FACE}" * 60] * 6))
    run = make_run(deep, 4).parent / "run"
    out = tmp_path / "pin.out"
    target = run / "checkpoint-1"
    env = dict(os.environ, R10_AT="checkpoint-1", R10_DO=str(target), R10_ROOT=str(root))
    env |= {"R10_FREE": str(tmp_path / "free"), "R10_OUT": str(out)}
    (tmp_path / "free").write_bytes(b"")
    args = ["prune", str(root), "--max-depth", "8", "--keep", "last:2", "--no-protect-trainer-best"]
    done = subprocess.run(
        [sys.executable, "-c", HOOKED_PRUNE, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    code, _, said = out.read_text().partition("\n")
    assert code != "0" and not target.exists(), said
    assert "(pid ?)" in said  # the words, past 4 KiB, could not be read: refused for any checkpoint
    again = subprocess.run(
        [sys.executable, "-m", "ckptkeeper", "pin", "--root", str(root), str(run / "checkpoint-3")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 0, again.stdout + again.stderr
