"""Adversarial review of session 11's refactor (316fde8): `actions._split_below` in one form, `StateDir.one_removal`'s
per-removal `_Spared`, engine.py split into removals.py and recheck.py, KERNEL_DATA_FILESYSTEMS derived. Each test
holds on 316fde8: they pin what the refactor claims not to have changed. Real files, a real size-limited tmpfs, real
threads and processes; no mock of ckptkeeper's code."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mountutil import own_tmpfs

from ckptkeeper.actions import ActionError, _split_below
from ckptkeeper.engine import Pipeline
from ckptkeeper.model import Action
from ckptkeeper.paths import KERNEL_CTIME_FILESYSTEMS, KERNEL_DATA_FILESYSTEMS
from ckptkeeper.policy import Policy, Protections
from ckptkeeper.policy import RootPlan as _RootPlan
from ckptkeeper.rules import parse_rules
from ckptkeeper.scan import TIMESTAMP_TICK
from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.state import RESERVE_NAME, STATE_DIR_NAME, StateDir

Split = Callable[[Path | str, Path | str, str], list[str]]


# ------------------------------------------------------------------------------------ 1. the split, old and new
def _split_before(root: Path | str, checkpoint: Path | str, verb: str) -> list[str]:
    """afba64f's `_split_below`, both branches (its fast path, then the fallback), without the cache."""
    root_text, text = os.fspath(root), os.fspath(checkpoint)
    head, name = os.path.split(text)
    if os.path.isabs(root_text) and os.path.isabs(head) and name not in ("", os.curdir, os.pardir):
        below = os.path.relpath(head, root_text)
        parts = [*(() if below == os.curdir else below.split(os.sep)), name]
    else:
        parts = os.path.relpath(os.path.abspath(checkpoint), os.path.abspath(root)).split(os.sep)
    if parts == [os.curdir] or parts[0] == os.pardir:
        raise ActionError(f"refusing to {verb} {checkpoint}: it is outside the root {root}")
    return parts


def _outcome(split: Split, root: Path | str, checkpoint: Path | str) -> tuple[str, object]:
    try:
        return "parts", split(root, checkpoint, "remove")
    except ActionError as e:
        return "refused", str(e)
    except ValueError as e:  # os.path.relpath of nothing: both forms alike
        return "error", type(e).__name__


def _canonical(path: str) -> str:
    path = os.path.normpath(os.path.abspath(path))
    return "/" + path.lstrip("/")  # `//x` is `/x` on Linux


def _strictly_inside(root: Path | str, checkpoint: Path | str) -> bool:
    r, c = _canonical(os.fspath(root)), _canonical(os.fspath(checkpoint))
    return c != "/" if r == "/" else c.startswith(r + "/")


def _check_pair(root: str, checkpoint: str) -> None:
    for kind in (str, Path):
        new = _outcome(_split_below, kind(root), kind(checkpoint))  # type: ignore[arg-type]
        assert new == _outcome(_split_before, kind(root), kind(checkpoint)), (root, checkpoint)
        if new[0] == "parts":  # safety, independently of the old form: below the root, and reached from it
            parts = new[1]
            assert isinstance(parts, list) and parts and not {"", os.curdir, os.pardir} & set(parts)
            assert _strictly_inside(root, checkpoint), (root, checkpoint, parts)
            assert _canonical(os.path.join(os.path.abspath(root), *parts)) == _canonical(checkpoint)
        elif new[0] == "refused":
            assert not _strictly_inside(root, checkpoint), (root, checkpoint)


COMPONENTS = ["", "a", "b", ".", "..", "checkpoint-1", "\udcff", "x/"]
LEADS = ["/", "//", ""]
PATHS = sorted(
    {lead + "/".join(parts) for lead in LEADS for k in range(4) for parts in itertools.product(COMPONENTS, repeat=k)}
)


@pytest.fixture
def in_a_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Working directory tmp_path/a (relative paths and `..` mean something), with a/b below it."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    return tmp_path


def test_the_split_is_the_old_one_over_a_product_of_awkward_paths(in_a_tree: Path) -> None:
    """Roots and checkpoints built of `..`, `.`, empty parts (`//`), trailing slashes, a non-UTF-8 name (surrogate
    escape), absolute or relative, str or Path: the same parts or the same refusal as afba64f's two branches, and
    never a path outside the root (a 32-million-pair run of a larger alphabet found no difference either)."""
    sample = PATHS[:: max(1, len(PATHS) // 50)]
    for root, checkpoint in itertools.product(sample, PATHS):
        _check_pair(root, checkpoint)


PART = st.sampled_from(["", ".", "..", "a", "b", "checkpoint-7", "\udcfe\udc80", "é", " ", "a..", ".a", "..."])
TAIL = st.sampled_from(["", "/", "/.", "/.."])
PATH = st.builds(
    lambda lead, parts, tail: lead + "/".join(parts) + tail, st.sampled_from(LEADS), st.lists(PART, max_size=6), TAIL
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(root=PATH, checkpoint=PATH)
def test_the_split_is_the_old_one_for_generated_paths(in_a_tree: Path, root: str, checkpoint: str) -> None:
    _check_pair(root, checkpoint)
    _check_pair(root, os.path.join(root, checkpoint.lstrip("/")))  # below the root by construction (or `..` out)


def test_a_relative_root_means_the_working_directory_of_each_call(in_a_tree: Path) -> None:
    """The cache keys on absolute strings: a relative root is made absolute before the lookup, so a chdir between
    two calls never reuses the answer for the old working directory."""
    first = in_a_tree / "a" / "b" / "run" / "checkpoint-1"
    assert _split_below(Path("b"), first, "remove") == ["run", "checkpoint-1"]
    os.chdir(in_a_tree)
    with pytest.raises(ActionError, match="outside the root"):  # `b` is now tmp_path/b: `first` is not below it
        _split_below(Path("b"), first, "remove")
    assert _split_below(Path("a/b"), first, "remove") == ["run", "checkpoint-1"]
    os.chdir(in_a_tree / "a" / "b")
    assert _split_below(Path("."), first, "remove") == ["run", "checkpoint-1"]
    assert _split_below(Path("."), Path("run/checkpoint-1"), "remove") == ["run", "checkpoint-1"]
    with pytest.raises(ActionError, match="outside the root"):
        _split_below(Path("run"), Path("."), "remove")


def test_the_root_itself_and_slash_are_refused_with_the_same_message(in_a_tree: Path) -> None:
    for root, checkpoint in [("/", "/"), ("//", "/"), ("/r", "/r"), ("/r", "/r/"), ("/r/", "/r/x/.."), ("r", ".")]:
        with pytest.raises(ActionError) as new:
            _split_below(Path(root), Path(checkpoint), "archive")
        with pytest.raises(ActionError) as old:
            _split_before(Path(root), Path(checkpoint), "archive")
        assert str(new.value) == str(old.value) and "refusing to archive" in str(new.value)


# ------------------------------------------------------------------------------------ 4. the filesystem sets
def test_kernel_data_filesystems_is_the_set_it_was() -> None:
    """afba64f's literal set; derived now from KERNEL_CTIME_FILESYSTEMS, which a later change could widen."""
    before = {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "zfs", "jfs", "bcachefs", "ramfs"}
    before |= {"vfat", "msdos", "exfat", "ntfs3"}
    assert frozenset(before) == KERNEL_DATA_FILESYSTEMS
    assert isinstance(KERNEL_DATA_FILESYSTEMS, frozenset) and "overlay" in KERNEL_CTIME_FILESYSTEMS


# ------------------------------------------------------------------------------------ 2. one removal's checks
@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 2 MiB tmpfs (root only)."""
    with own_tmpfs(tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}", "2m") as where:
        yield where


def fill(where: Path, name: str) -> Path:
    filler = where / name
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
    return filler


def _line_bytes(entry: dict[str, str]) -> int:
    """The size of `entry`'s journal line (its time has a fixed width)."""
    return len(json.dumps({"time": "2025-01-01T00:00:00.000+00:00", **entry}) + "\n")


def test_the_reserve_given_up_inside_a_removal_is_made_again_inside_it(small_tmpfs: Path) -> None:
    state = StateDir(small_tmpfs / "state")
    state.create()
    reserve = small_tmpfs / "state" / RESERVE_NAME
    try:
        state.record({"action": "finish-trash"})  # the journal's first page, with room left in it
        filler = fill(small_tmpfs, "filler")
        with state.one_removal():
            pad = 4096 - state.journal_path.stat().st_size - _line_bytes({"action": "start-delete", "n": ""})
            state.record({"action": "start-delete", "n": "x" * pad})  # ends the page; the reserve seen: spared
            assert reserve.exists() and state.journal_path.stat().st_size == 4096
            state.record({"action": "start-delete"})  # ENOSPC: the reserve goes, the line is kept
            assert not reserve.exists()  # and no room to make it again
            filler.unlink()
            state.record({"action": "delete"})  # no longer spared: made again now, not at the next removal
            assert reserve.stat().st_size > 0
        lines = [json.loads(line)["action"] for line in state.journal_path.read_text().splitlines()]
        assert lines == ["finish-trash", "start-delete", "start-delete", "delete"]
    finally:
        state.close()


def test_a_journal_line_that_only_partly_fits_a_full_disk_is_not_cut_short_silently(small_tmpfs: Path) -> None:
    """FOUND in session 11's review (older than its refactor; fixed in `StateDir._append`): on a full disk a line
    that crosses into a block the filesystem cannot give was written short (write(2) returns the part that fit)
    and `record` returned as if it were whole: no ENOSPC, so the reserve was not given up, and the `start-delete`
    line written before a removal was lost (cut mid-JSON). Now it is written whole (the part cut off, the reserve
    given up, the line written again), or the write raises."""
    state = StateDir(small_tmpfs / "state")
    state.create()
    try:
        state.record({"action": "finish-trash"})
        fill(small_tmpfs, "filler")
        entry = {"action": "start-delete", "run": "run", "checkpoint": "checkpoint-1", "why": "x" * 6000}
        try:
            state.record(entry)
        except OSError as e:
            assert e.errno == errno.ENOSPC  # refused: nothing is removed, acceptable
            return
        lines = [json.loads(line) for line in state.journal_path.read_text().splitlines()]  # none cut short
        assert [line["action"] for line in lines] == ["finish-trash", "start-delete"]
        assert lines[-1]["checkpoint"] == "checkpoint-1" and lines[-1]["why"] == entry["why"]  # written whole
    finally:
        state.close()


def test_a_thread_journaling_on_a_full_disk_while_removals_come_and_go_sees_only_enospc(small_tmpfs: Path) -> None:
    """The reaper's `record` on a full disk (`_give_up_reserve` each time) against the main thread entering and
    leaving `one_removal`: only ENOSPC reaches the caller (the reaper catches OSError only; anything else ends its
    thread). Holds under the GIL; see the report for `_give_up_reserve`'s two reads of `_spared`."""
    state = StateDir(small_tmpfs / "state")
    state.create()
    fill(small_tmpfs, "filler")
    os.unlink(RESERVE_NAME, dir_fd=state.dir_fd)
    fill(small_tmpfs, "filler2")
    stop, errors, calls = threading.Event(), list[str](), [0]

    def journal() -> None:
        while not stop.is_set():
            try:
                state.record({"action": "error"})
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    errors.append(repr(e))
            except Exception as e:
                errors.append(repr(e))
                return
            calls[0] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=journal)
    try:
        thread.start()
        end = time.monotonic() + 0.5
        while time.monotonic() < end and thread.is_alive():
            with state.one_removal():
                state.create()
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
        state.close()
    assert errors == [] and calls[0] > 100


def test_closed_and_deleted_inside_a_removal_the_state_directory_is_made_again(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    state = StateDir(root / STATE_DIR_NAME)
    state.acquire_lock(root)
    with state.one_removal():
        first = os.fstat(state.dir_fd)  # linked: spared from here on in this removal
        state.close()  # the spared checks go with it
        state.acquire_lock(root)
        shutil.rmtree(state.path)  # deleted, its lock file with it
        again = os.fstat(state.dir_fd)
        assert (again.st_dev, again.st_ino) != (first.st_dev, first.st_ino)
        assert os.path.samestat(again, os.stat(state.path)) and state.trash.is_dir()
        state.record({"action": "start-delete"})
    assert (state.path / "journal.jsonl").exists() and not state.lock_deleted()  # the root's lock kept, the state's new
    assert len(state._root_lock_fds) == 1 + (root / "_ckptkeeper.lock").exists()
    state.close()


# ------------------------------------------------------------------------------------ 3. the split of engine.py
def test_removals_and_recheck_import_nothing_an_object_store_needs() -> None:
    probe = "import sys, json, ckptkeeper.engine, ckptkeeper.removals, ckptkeeper.recheck; print(json.dumps(sorted(sys.modules)))"  # noqa: E501
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    modules = set(json.loads(done.stdout))
    heavy = {"ckptkeeper.destination", "fsspec", "pydantic", "numpy", "socket", "concurrent.futures"}
    assert not heavy & modules


def _run(root: Path) -> Path:
    config = SimConfig(steps_per_epoch=3, epochs=1, save_steps=1, eval_strategy="no", metric_for_best_model=None)
    simulate_run(root / "run", config)
    time.sleep(TIMESTAMP_TICK + 0.05)  # the scan's signatures vouch: the re-check compares them
    return root / "run"


@pytest.mark.parametrize("kind", ["delete", "archive", "slim"])
def test_every_removal_kind_is_rechecked_before_it_acts(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "root"
    run = _run(root)
    rules, weights = parse_rules("last:1"), parse_rules("last:3") if kind == "slim" else ()
    removal = Action.ARCHIVE if kind == "archive" else Action.DELETE
    policy = Policy(rules, Protections(trainer_best=False), removal=removal, weight_rules=weights)
    archive = tmp_path / "archive" if kind == "archive" else None
    p = Pipeline.checked(root, policy, state_dir=root / STATE_DIR_NAME, archive_to=archive)
    planned = p.survey(None).plan
    assert isinstance(planned, _RootPlan)
    (run / "checkpoint-1" / "late.txt").write_text("written after the plan")
    p.acquire()
    try:
        outcomes = {o.checkpoint: str(o.action) for r in p.act(planned) for o in r.outcomes}
    finally:
        p.state.close()
    assert outcomes["checkpoint-1"] == "skipped"
    assert (run / "checkpoint-1" / "late.txt").exists() and (run / "checkpoint-1" / "optimizer.pt").exists()
    assert outcomes["checkpoint-2"] != "skipped"  # the unchanged one is acted on: the test can tell


def test_a_deleted_state_directory_s_descriptors_stay_open_until_close(tmp_path: Path) -> None:
    """The directory found deleted is made anew, and the descriptors of the deleted one are retired, not closed:
    a thread still holding one of their numbers (the daemon's reaper, or the main thread while the reaper made
    it anew) keeps the deleted directory, never a descriptor opened meanwhile under the same number. `close`
    closes them."""
    state = StateDir(tmp_path / "state")
    old_dir, old_trash = state.dir_fd, state.trash_fd
    shutil.rmtree(state.path)
    new_dir = state.dir_fd  # made anew
    assert new_dir not in (old_dir, old_trash) and state.trash_fd not in (old_dir, old_trash)
    for fd in (old_dir, old_trash):
        assert os.fstat(fd).st_nlink == 0  # still the deleted directories
    with pytest.raises(FileNotFoundError):
        os.mkdir("x", dir_fd=old_trash)  # nothing can be made there
    state.close()
    for fd in (old_dir, old_trash, new_dir):
        with pytest.raises(OSError) as e:
            os.fstat(fd)
        assert e.value.errno == errno.EBADF
