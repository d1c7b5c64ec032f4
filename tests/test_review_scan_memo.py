"""Adversarial review of the scan memo (`ckptkeeper/scan_memo.py`, commit 8723942): can `plan` or `prune` be made
to decide on stale or forged memo contents, i.e. otherwise than with the memo file deleted? Real files, real
mounts (FUSE, tmpfs, a loop-mounted ext4 with 1 s timestamps), the real CLI; nothing of ckptkeeper is mocked.

The tests that fail at 8723942 are findings (left failing on purpose); the others are attacks that held."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cliutil import mounted
from fuseutil import fuse_mounted
from memoutil import CONFIG, settled, settled_outputs

from ckptkeeper.cli import main
from ckptkeeper.scan import TIMESTAMP_TICK, lstat_signature
from ckptkeeper.scan_memo import MEMO_NAME, digest
from ckptkeeper.simtrainer import simulate_run
from ckptkeeper.state import STATE_DIR_NAME

KEEP_ALL = ("--keep", "last:100")
TESTS = Path(__file__).parent


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args: str | Path) -> Result:
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return result


def plan(root: Path, *args: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ok("plan", root, *(args or KEEP_ALL), "--json").output)
    return data


def judged_in(planned: dict[str, Any]) -> dict[str, tuple[bool, str | None]]:
    """checkpoint -> (complete, why not) in a plan's JSON."""
    return {
        f"{r['run']}/{d['name']}": (d["complete"], d.get("incomplete_reason"))
        for r in planned["runs"]
        for d in r["checkpoints"]
    }


def plan_without_memo(root: Path, memo: Path, *args: str) -> dict[str, Any]:
    """The plan with the memo file out of the way (then put back, unchanged)."""
    aside = memo.with_name("aside.json")
    memo.rename(aside)
    try:
        return plan(root, *args)
    finally:
        aside.rename(memo)


def corrupt_in_place(path: Path) -> None:
    """Truncated JSON padded to the file's size, written into the same inode, its times put back."""
    before = path.stat()
    text = path.read_bytes()
    with open(path, "r+b") as f:
        f.write(text[: len(text) // 2].ljust(len(text), b" "))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def steps(run: Path) -> list[int]:
    return sorted(int(p.name.rsplit("-", 1)[1]) for p in run.iterdir() if p.name.startswith("checkpoint-"))


# ------------------------------------------------------------------------- a filesystem whose ctime follows mtime
REMOTE_FS = '''
import sys
sys.path.insert(0, sys.argv[4])
import mfusepy as fuse
from loopfs import Passthrough

class CtimeIsMtime(Passthrough):
    """What sshfs reports (SFTP v3 carries no ctime: st_ctime = st_mtime), and the kernel's vfat too (one on-disk
    field; utime sets both): a utime that puts mtime back puts ctime back."""

    def getattr(self, path, fh=None):
        attrs = super().getattr(path, fh)
        attrs["st_ctime"] = attrs["st_mtime"]
        return attrs

class Behind(Passthrough):
    """A remote whose clock is 5 s behind this machine's, with whole-second times (sshfs to such a server)."""

    def getattr(self, path, fh=None):
        attrs = super().getattr(path, fh)
        for key in ("st_atime", "st_mtime", "st_ctime"):
            attrs[key] = (attrs[key] - 5 * 10**9) // 10**9 * 10**9
        return attrs

kind = {"ctime-is-mtime": CtimeIsMtime, "behind": Behind}[sys.argv[3]]
fuse.FUSE(kind(sys.argv[1]), sys.argv[2], foreground=True, allow_other=True, use_ino=True,
          attr_timeout=0, entry_timeout=0)
'''


@contextlib.contextmanager
def remote_mount(source: Path, mount_point: Path, kind: str) -> Iterator[Path]:
    """A FUSE passthrough of `source` whose file times are as `kind` says (REMOTE_FS)."""
    script = mount_point.parent / "remote_fs.py"
    script.write_text(REMOTE_FS)
    with fuse_mounted(mount_point, script, str(source), str(mount_point), kind, str(TESTS)):
        yield mount_point


def test_finding_a_rewrite_with_mtime_put_back_where_ctime_follows_mtime_deletes_the_last_good_checkpoint(
    tmp_path: Path,
) -> None:
    """FINDING (data loss). `lstat_signature`'s argument ("no system call lets a writer set ctime") holds for
    ext4/xfs/btrfs/tmpfs, not for sshfs or vfat, where ctime is mtime: checkpoint-30's trainer_state.json rewritten
    in place (same inode, same size) and its mtime put back (`rsync --inplace -t`, `cp -p`, `touch -r`) keeps the
    signature, and the memo's "complete" is believed. `--keep last:1` then takes broken checkpoint-30 for the
    newest resume point and deletes checkpoint-25, the only intact one. With the memo deleted, 30 is read, found
    broken (never removed), and 25 is kept."""
    source = tmp_path / "source"
    simulate_run(source / "outputs" / "exp", CONFIG)
    state = tmp_path / "state"
    with remote_mount(source, tmp_path / "mnt", "ctime-is-mtime") as mnt:
        root = mnt / "outputs"
        settled()
        ok("prune", root, *KEEP_ALL, "--state-dir", state)
        corrupt_in_place(root / "exp" / "checkpoint-30" / "trainer_state.json")
        memo = state / MEMO_NAME
        fresh = plan_without_memo(root, memo, "--keep", "last:1", "--state-dir", str(state))
        assert fresh["summary"]["removed"] == 4  # 5 .. 20: 25 is the newest intact checkpoint, 30 is broken
        ok("prune", root, "--keep", "last:1", "--state-dir", state)
        assert steps(root / "exp") == [25, 30]  # at 8723942: [30], the broken one alone


def test_the_same_rewrite_on_a_filesystem_with_a_kernel_ctime_is_read_again(tmp_path: Path) -> None:
    """Held (the control of the finding above): on the local filesystem the same rewrite moves ctime."""
    root = tmp_path / "outputs"
    simulate_run(root / "exp", CONFIG)
    settled()
    ok("prune", root, *KEEP_ALL)
    corrupt_in_place(root / "exp" / "checkpoint-30" / "trainer_state.json")
    ok("prune", root, "--keep", "last:1")
    assert steps(root / "exp") == [25, 30]


# ------------------------------------------------------------------------- a read error of one look, remembered
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def without_read_override() -> None:
    """In the child before exec: root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (as another user, or a container
    that drops them, is): a file's mode bits then apply to it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_finding_a_read_error_of_one_prune_is_remembered_as_the_checkpoints_contents(tmp_path: Path) -> None:
    """FINDING (wrong plan). `_read_contents` turns any OSError opening trainer_state.json into a problem
    ("cannot read trainer_state.json: Permission denied"); `read_checkpoint` writes it into the memo like any
    other contents. A condition of the reader, not of the files (a prune as another user or without
    CAP_DAC_OVERRIDE, EIO, ESTALE, EMFILE, a group or ACL granted since), is then the checkpoint's verdict at every
    later plan and prune until a file of it changes: here root's plan calls checkpoint-30 incomplete, which it
    reads fine without the memo."""
    if os.geteuid() != 0:
        pytest.skip("needs root (to drop the capability that lets it read any file)")
    root = tmp_path / "outputs"
    simulate_run(root / "exp", CONFIG)
    (root / "exp" / "checkpoint-30" / "trainer_state.json").chmod(0o000)
    settled()
    done = subprocess.run(
        [sys.executable, "-m", "ckptkeeper", "prune", str(root), *KEEP_ALL],
        capture_output=True, text=True, timeout=60, check=False, preexec_fn=without_read_override,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done
    memo = root / STATE_DIR_NAME / MEMO_NAME
    held = json.loads(memo.read_bytes())["entries"]
    assert len(held) == 5 and not [k for k in held if k.endswith("checkpoint-30")]  # fixed: what it could not read
    fresh = plan_without_memo(root, memo)
    assert judged_in(fresh)["exp/checkpoint-30"] == (True, None)  # root reads it, without the memo
    assert judged_in(plan(root))["exp/checkpoint-30"] == (True, None)


# ------------------------------------------------------------------------- 1 s timestamps, and a mixture
@contextlib.contextmanager
def one_second_fs(where: Path) -> Iterator[Path]:
    """A loop-mounted ext4 with 128-byte inodes: file times in whole seconds."""
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs root and mkfs.ext4")
    image = where.with_name(where.name + ".img")
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-I", "128", str(image)], capture_output=True, check=True)
    with mounted(where, "-o", "loop", str(image)):
        yield where


def rewrite_within_the_second_of_a_prune(root: Path, state: Path, behind: int = 0) -> bool:
    """Rewrite checkpoint-30's trainer_state.json (broken, same size, in place) early in a second, prune in that
    second after TIMESTAMP_TICK, rewrite it again (intact, then broken: its last look was intact) before the
    second ends. False when the second ended first (the caller tries again)."""
    target = root / "exp" / "checkpoint-30" / "trainer_state.json"
    good = target.read_bytes()
    broken = good[: len(good) // 2].ljust(len(good), b" ")
    time.sleep(1.02 - time.time() % 1)  # just after a second begins
    second = int(time.time())
    with open(target, "r+b") as f:
        f.write(good)
    time.sleep(TIMESTAMP_TICK + 0.1)
    ok("prune", root, *KEEP_ALL, "--state-dir", state)
    with open(target, "r+b") as f:
        f.write(broken)
    return int(time.time()) == second and target.stat().st_ctime == second - behind


def rewrite_within_a_second_of_a_prune(root: Path, state: Path, behind: int = 0) -> None:
    """rewrite_within_the_second_of_a_prune, tried up to three times; the test is skipped if no try fits."""
    if not any(rewrite_within_the_second_of_a_prune(root, state, behind) for _ in range(3)):
        pytest.skip("could not do it within one second three times")


def test_a_rewrite_within_the_second_of_the_look_on_a_1s_filesystem_is_read_again(tmp_path: Path) -> None:
    """Held: every time is whole, so the window is a second and more; the look is not written down."""
    with one_second_fs(tmp_path / "fs") as fs:
        root, state = fs / "outputs", tmp_path / "state"
        simulate_run(root / "exp", CONFIG)
        rewrite_within_a_second_of_a_prune(root, state)
        assert judged_in(plan(root, *KEEP_ALL, "--state-dir", str(state)))["exp/checkpoint-30"][0] is False


def test_finding_a_finer_grained_mount_inside_a_1s_checkpoint_shrinks_the_window(tmp_path: Path) -> None:
    """FINDING (wrong plan; data loss as in the ctime finding, with `last:1`). `timestamp_granularity` takes any
    time with a fraction of a second for proof that *all* the checkpoint's times are fine-grained. A checkpoint on
    a 1 s filesystem with a finer one mounted inside it (a DeepSpeed `global_step30/` on tmpfs or another
    volume) is given a 0.1 s window: trainer_state.json rewritten in place later in the same second as the look
    keeps mtime and ctime (whole seconds), the look was written down, and the memo's "complete" is believed."""
    with one_second_fs(tmp_path / "fs") as fs:
        root, state = fs / "outputs", tmp_path / "state"
        simulate_run(root / "exp", CONFIG)
        inner = root / "exp" / "checkpoint-30" / "global_step30"
        inner.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "ckptkeeper-inner", str(inner)], check=True)
        try:
            (inner / "mp_rank_00_model_states.pt").write_bytes(b"x" * 64)
            time.sleep(0.3)
            rewrite_within_a_second_of_a_prune(root, state)
            fresh = plan_without_memo(root, state / MEMO_NAME, *KEEP_ALL, "--state-dir", str(state))
            assert judged_in(fresh)["exp/checkpoint-30"][0] is False  # read: broken
            assert judged_in(plan(root, *KEEP_ALL, "--state-dir", str(state)))["exp/checkpoint-30"][0] is False
        finally:
            subprocess.run(["umount", "-l", str(inner)], check=False)


def test_finding_file_times_of_a_clock_behind_this_one_vouch_for_a_look_they_cannot(tmp_path: Path) -> None:
    """FINDING (wrong plan; data loss as in the ctime finding, with `last:1`). `_vouches` compares file times with
    this machine's clock, as if the filesystem's were the same. A remote whose clock is behind (sshfs, NFS, a FUSE
    object store: the server sets the times; the settle check already allows for "a writer whose clock is
    behind") makes a file written a moment ago look seconds old: trainer_state.json rewritten in place within the
    same (server) second after the look keeps its signature, and the memo's "complete" is believed."""
    source = tmp_path / "source"
    simulate_run(source / "outputs" / "exp", CONFIG)
    state = tmp_path / "state"
    with remote_mount(source, tmp_path / "mnt", "behind") as mnt:
        root = mnt / "outputs"
        rewrite_within_a_second_of_a_prune(root, state, behind=5)
        fresh = plan_without_memo(root, state / MEMO_NAME, *KEEP_ALL, "--state-dir", str(state))
        assert judged_in(fresh)["exp/checkpoint-30"][0] is False  # read: broken
        assert judged_in(plan(root, *KEEP_ALL, "--state-dir", str(state)))["exp/checkpoint-30"][0] is False


# ------------------------------------------------------------------------- forged and odd memos
@pytest.fixture
def root(tmp_path: Path) -> Path:
    return settled_outputs(tmp_path)


def forge(root: Path, name: str, **changes: object) -> None:
    """Rewrite the memo entry of exp/`name` with `changes` (the digest left as prune wrote it)."""
    memo = root / STATE_DIR_NAME / MEMO_NAME
    data = json.loads(memo.read_bytes())
    [key] = [k for k in data["entries"] if k.endswith(os.sep + name)]
    data["entries"][key][1].update(changes)
    memo.write_text(json.dumps(data))


def test_finding_a_memo_number_too_big_for_a_float_makes_plan_and_prune_crash(root: Path) -> None:
    """FINDING (cosmetic: nothing is removed, but no prune ever runs again, and only prune rewrites the memo).
    `_finite` calls math.isfinite on any int, which raises OverflowError beyond a float's range: the memo's
    "an entry of the wrong shape is ignored" does not hold for {"eval_loss": 10**400}."""
    ok("prune", root, *KEEP_ALL)
    forge(root, "checkpoint-30", metrics={"eval_loss": 10**400})
    fresh = plan_without_memo(root, root / STATE_DIR_NAME / MEMO_NAME)
    assert plan(root) == fresh


def test_finding_a_memo_planted_by_another_user_is_believed(root: Path) -> None:
    """FINDING (wrong plan; hardening). The memo is read whoever owns it and whoever may write it: an entry saying
    `problems: []` for a checkpoint that is being saved (its digest is of lstat data anyone who can list the run
    can compute) is believed, and `last:1` would delete every intact checkpoint. Write access to the state
    directory already lets one drop pins (no ownership check there either), so this is no new class of threat;
    but the memo widens it from "what is pinned" to "what every checkpoint is", and a check is cheap."""
    saving = root / "exp" / "checkpoint-30"
    (saving / "checkpoint-is-incomplete.txt").write_text("saving")
    settled()
    ok("prune", root, *KEEP_ALL)  # writes no entry for it: incomplete
    memo = root / STATE_DIR_NAME / MEMO_NAME
    data = json.loads(memo.read_bytes())
    [(key, entry)] = [(k, v) for k, v in data["entries"].items() if k.endswith(os.sep + "checkpoint-25")]
    _, signature = lstat_signature(saving)
    data["entries"][key.replace("checkpoint-25", "checkpoint-30")] = [digest(signature), entry[1]]  # "complete"
    memo.write_text(json.dumps(data))
    os.chown(memo, 65534, 65534)
    memo.chmod(0o666)
    fresh = plan_without_memo(root, memo, "--keep", "last:1")
    assert plan(root, "--keep", "last:1") == fresh


def test_held_non_finite_values_in_a_memo_are_not_believed(root: Path) -> None:
    ok("prune", root, *KEEP_ALL)
    fresh = plan(root)
    for value in (math.nan, math.inf):
        forge(root, "checkpoint-30", metrics={"eval_loss": value})
        assert plan(root) == fresh


def test_held_a_dry_run_prune_writes_no_memo(root: Path) -> None:
    ok("prune", root, "--keep", "last:1", "--dry-run")
    assert not (root / STATE_DIR_NAME / MEMO_NAME).exists()
    assert steps(root / "exp") == [5, 10, 15, 20, 25, 30]


def test_held_slimmed_checkpoints_plan_the_same_from_the_memo(root: Path) -> None:
    """--keep-weights: the marker round trip (slimmed by one prune, written down by the next, planned from it)."""
    ok("prune", root, "--keep", "last:2", "--keep-weights", "last:100")
    settled()
    ok("prune", root, "--keep", "last:2", "--keep-weights", "last:100")
    memo = root / STATE_DIR_NAME / MEMO_NAME
    assert plan(root, "--keep", "last:2", "--keep-weights", "last:100") == plan_without_memo(
        root, memo, "--keep", "last:2", "--keep-weights", "last:100"
    )


def test_held_a_run_directory_swapped_for_another_with_the_same_names_is_read(root: Path, tmp_path: Path) -> None:
    """The keys are path strings, but the digest is of inodes and ctimes: another run moved into the place of
    this one (rename dance, or a bind mount) matches no entry."""
    other = tmp_path / "other"
    simulate_run(other / "exp", CONFIG)
    corrupt_in_place(other / "exp" / "checkpoint-30" / "trainer_state.json")
    settled()
    ok("prune", root, *KEEP_ALL)
    (root / "exp").rename(tmp_path / "away")
    (other / "exp").rename(root / "exp")
    assert judged_in(plan(root))["exp/checkpoint-30"][0] is False


def test_held_non_utf8_names_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    name = os.fsdecode(b"exp-\xff")
    simulate_run(root / name, CONFIG)
    settled()
    ok("prune", root, *KEEP_ALL)
    memo = root / STATE_DIR_NAME / MEMO_NAME
    assert len(json.loads(memo.read_bytes())["entries"]) == 6
    assert plan(root) == plan_without_memo(root, memo)
