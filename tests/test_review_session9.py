"""Review of session 9 (b7469ab..43ffee3): read-ahead hints of a one-shot scan, Settings as a plain dataclass
(pydantic only where the quick path declines), prune's per-removal `_Handoff` to its deleters, and the mount
table's per-read index of filesystem types. Real CLI, real filesystems, real daemons; a finding is a test
was a test marked xfail(strict=True); every one is fixed, and says so in its docstring."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cliutil import ckptkeeper, per_removal
from memoutil import evict, resident_pages
from watchutil import Watch, wait_until

from ckptkeeper.cli import main
from ckptkeeper.config import ConfigError, load_settings
from ckptkeeper.paths import MOUNT_TABLE, kernel_sets_ctimes
from ckptkeeper.readahead import hint_checkpoint
from ckptkeeper.regular import open_regular
from ckptkeeper.scan import TIMESTAMP_TICK
from ckptkeeper.simtrainer import SimConfig, simulate_run

StartWatch = Callable[..., Watch]
NO_BEST = "--no-protect-trainer-best"


def make_run(root: Path, checkpoints: int) -> Path:
    run = root / "run"
    simulate_run(run, SimConfig(steps_per_epoch=checkpoints, epochs=1, save_steps=1, eval_strategy="no"))
    return run


def journal(root: Path) -> list[dict[str, Any]]:
    path = root / "_ckptkeeper" / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """`chattr +i PATH` for the block (skipped where the filesystem has no such attribute)."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("chattr +i needs root and chattr")
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode:
        pytest.skip("no immutable attribute here")
    try:
        yield
    finally:
        for found in [path, *path.parent.parent.parent.rglob(path.name)]:
            subprocess.run(["chattr", "-i", str(found)], capture_output=True, check=False)


def unmake_immutable_below(top: Path) -> None:
    for found in top.rglob("*"):
        subprocess.run(["chattr", "-i", str(found)], capture_output=True, check=False)


# ---------------------------------------------------------------------------------------------- 3. _Handoff
def resume_dir_with_a_stuck_file(checkpoint: Path) -> Path:
    """A DeepSpeed-like resume-state directory in `checkpoint` holding one file, dated as old as the checkpoint
    (the newest written stays the highest step)."""
    extra = checkpoint / "global_step2"
    extra.mkdir()
    stuck = extra / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    stuck.write_bytes(b"x" * 100)
    old = (checkpoint / "trainer_state.json").stat()
    for p in (stuck, extra, checkpoint):
        os.utime(p, ns=(old.st_atime_ns, old.st_mtime_ns))
    return stuck


def test_a_slim_whose_trash_entry_cannot_be_deleted_is_failed_and_exit_1(tmp_path: Path) -> None:
    """--keep-weights with prune's deleters: the slim's trash entry (its resume state) goes to a deleter; if it
    cannot be deleted there the slim is FAILED (journal `error`), exit 1, as when it was deleted inline."""
    root = tmp_path / "outputs"
    run = make_run(root, 4)
    stuck = resume_dir_with_a_stuck_file(run / "checkpoint-2")
    time.sleep(TIMESTAMP_TICK + 0.1)
    try:
        with immutable(stuck):
            done = ckptkeeper("prune", root, "--keep", "last:1", "--keep-weights", "last:3", NO_BEST)
    finally:
        unmake_immutable_below(root)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if "run/checkpoint-2" in line]
    assert len(lines) == 1 and lines[0].startswith("FAILED"), done.stdout
    assert "could not be removed there" in lines[0]
    entries = [(e["action"], e["checkpoint"]) for e in per_removal(journal(root))]
    assert entries == [
        ("start-delete", "checkpoint-1"), ("delete", "checkpoint-1"),
        ("start-slim", "checkpoint-2"), ("error", "checkpoint-2"),
        ("start-slim", "checkpoint-3"), ("slim", "checkpoint-3"),
    ]  # fmt: skip
    assert not (run / "checkpoint-2" / "optimizer.pt").exists()  # out of the run: the slim itself happened
    again = ckptkeeper("prune", root, "--keep", "last:1", "--keep-weights", "last:3", NO_BEST)
    assert again.returncode == 0, again.stdout + again.stderr
    assert os.listdir(root / "_ckptkeeper" / "trash") == []


def test_an_archive_copy_whose_source_cannot_be_deleted_in_the_trash_is_failed_and_exit_1(
    tmp_path: Path, tmpfs: Path
) -> None:
    """--archive-to another filesystem: copied, then the source goes to the trash and to a deleter; a source
    that cannot be deleted there is FAILED and exit 1; the archive copy stays whole."""
    root = tmp_path / "outputs"
    run = make_run(root, 3)
    stuck = resume_dir_with_a_stuck_file(run / "checkpoint-1")
    archive = tmpfs / f"archive-{os.getpid()}-{time.monotonic_ns()}"
    time.sleep(TIMESTAMP_TICK + 0.1)
    try:
        with immutable(stuck):
            done = ckptkeeper("prune", root, "--keep", "last:1", "--archive-to", archive, NO_BEST)
    finally:
        unmake_immutable_below(root)
    assert done.returncode == 1, done.stdout + done.stderr
    outcome = {line.split()[1]: line.split()[0] for line in done.stdout.splitlines()[2:4]}
    assert outcome == {"run/checkpoint-1": "FAILED", "run/checkpoint-2": "archived"}, done.stdout
    assert (archive / "run" / "checkpoint-1" / "global_step2" / stuck.name).read_bytes() == b"x" * 100
    actions = [(e["action"], e["checkpoint"]) for e in per_removal(journal(root))]
    assert actions == [
        ("start-archive", "checkpoint-1"), ("error", "checkpoint-1"),
        ("start-archive", "checkpoint-2"), ("archive", "checkpoint-2"),
    ]  # fmt: skip
    shutil.rmtree(archive)


# ---------------------------------------------------------------------------------------------- 4. MountTable
@contextlib.contextmanager
def mounted(kind: str, where: Path, options: str = "") -> Iterator[int]:
    """`mount -t KIND` at `where` for the block; its st_dev."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    where.mkdir(parents=True, exist_ok=True)
    args = ["mount", "-t", kind, *(["-o", options] if options else []), f"review9-{kind}", str(where)]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode:
        pytest.skip(f"mount -t {kind} failed: {done.stderr.strip()}")
    try:
        yield os.stat(where).st_dev
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


@contextlib.contextmanager
def reused_device(where: Path) -> Iterator[tuple[int, Callable[[], int]]]:
    """A tmpfs at `where` (a kernel that sets ctimes) and a function that replaces it by a devpts (one that is
    not in KERNEL_CTIME_FILESYSTEMS) which, anonymous device numbers being reused lowest first, gets the very
    device number the tmpfs had."""
    stack = contextlib.ExitStack()
    with stack:
        device = stack.enter_context(mounted("tmpfs", where))

        def swap() -> int:
            subprocess.run(["umount", str(where)], check=True)
            return stack.enter_context(mounted("devpts", where, "newinstance"))

        yield device, swap


def test_kernel_sets_ctimes_is_not_stale_after_a_device_number_is_reused(tmp_path: Path) -> None:
    """The memo trusts a signature only where the kernel sets ctime: an answer kept for 0:N (a tmpfs) must not
    outlive the tmpfs when another filesystem gets 0:N (as a FUSE mount would)."""
    with reused_device(tmp_path / "m") as (device, swap):
        assert kernel_sets_ctimes({device})
        reads = MOUNT_TABLE.reads
        assert kernel_sets_ctimes({device})
        assert MOUNT_TABLE.reads == reads  # answered from the index: the table did not change
        if swap() != device:
            pytest.skip("the kernel gave the new mount another device number")
        assert not kernel_sets_ctimes({device})
        assert MOUNT_TABLE.types_of(f"{os.major(device)}:{os.minor(device)}") == {"devpts"}


def test_kernel_sets_ctimes_is_not_stale_on_other_threads_or_in_a_forked_child(tmp_path: Path) -> None:
    with reused_device(tmp_path / "m") as (device, swap):
        assert kernel_sets_ctimes({device})
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: asks once the parent has swapped the mounts
            os.close(write)
            os.read(read, 1)
            os._exit(0 if not kernel_sets_ctimes({device}) else 3)
        os.close(read)
        if swap() != device:
            os.write(write, b"x")
            os.waitpid(pid, 0)
            pytest.skip("the kernel gave the new mount another device number")
        answers: list[bool] = []

        def ask(device: int = device) -> None:
            answers.append(kernel_sets_ctimes({device}))

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        os.write(write, b"x")
        os.close(write)
        _, status = os.waitpid(pid, 0)
        assert answers == [False] * 8
        assert os.waitstatus_to_exitcode(status) == 0


# ---------------------------------------------------------------------------------------------- 1. readahead
def metric(port: str, name: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


def test_a_plan_beside_a_running_watch_does_not_wake_the_daemon(tmp_path: Path, watch: StartWatch) -> None:
    """`plan` (no memo of its own state directory: every checkpoint hinted and read) on the root a daemon
    watches: its opens are IN_OPEN/IN_CLOSE_NOWRITE for the daemon's observer, which must not start a pass."""
    root = tmp_path / "outputs"
    make_run(root, 12)
    w = watch(root, "--keep", "last:100", "--metrics-port", "0", "--settle", "0.1")
    line = w.wait_log("serving metrics on http://127.0.0.1:")
    port = line and w.log().split("http://127.0.0.1:", 1)[1].split("/", 1)[0]
    w.wait_log("training finished and its retention is applied")
    wait_until(lambda: 'scope="all"} 1.0' in metric(port, "ckptkeeper_reconcile_duration_seconds_count"), 5)
    before = metric(port, "ckptkeeper_reconcile_duration_seconds_count")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for _ in range(3):
        result = CliRunner().invoke(main, ["plan", str(root), "--keep", "last:100", "--state-dir", str(elsewhere)])
        assert result.exit_code == 0, result.output
    time.sleep(0.5)  # more than the settle time: a pass would have started
    assert metric(port, "ckptkeeper_reconcile_duration_seconds_count") == before
    assert w.alive()


def test_a_plan_leaves_no_descriptor_open_and_hints_nothing_outside_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    run = make_run(root, 12)
    (run / "checkpoint-3" / "trainer_state.json").unlink()
    (run / "checkpoint-3" / "trainer_state.json").mkdir()  # not a file: no open
    os.mkfifo(run / "checkpoint-4" / "model.safetensors.part")
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):
        result = CliRunner().invoke(main, ["plan", str(root), "--keep", "last:100"])
        assert result.exit_code == 0, result.output
    assert sorted(os.listdir("/proc/self/fd")) == before


class BlockedWriter:
    """A thread blocked opening a FIFO for writing: released only when someone opens it for reading."""

    def __init__(self, fifo: Path) -> None:
        self.fifo = fifo
        self.released = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wchan = Path(f"/proc/self/task/{self.thread.native_id}/wchan")
        wait_until(lambda: wchan.read_text() == "wait_for_partner", 5, "the writer blocked in its open")

    def _run(self) -> None:
        fd = os.open(self.fifo, os.O_WRONLY)
        self.released.set()
        os.close(fd)

    def finish(self) -> None:
        if not self.released.is_set():  # release it ourselves
            os.close(os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK))
        self.thread.join(5)


_swap: dict[str, Path] = {}  # the file to replace by a FIFO once the hint has checked it is a regular file
_on_hint_open: dict[str, Callable[[], None]] = {}  # done when the hint opens this checkpoint directory


def _swap_before_open(event: str, args: tuple[object, ...]) -> None:
    """An attacker's rename, timed by the audit hook. open_regular opens the name with O_PATH, checks that it is a
    regular file, then opens that inode through /proc/self/fd: the FIFO is put in the name's place just before
    that second open (`_swap`). `_on_hint_open`: something done as the hint opens a checkpoint directory."""
    if event != "open" or not args:
        return
    caller, path = sys._getframe(1).f_code, str(args[0])
    if caller is open_regular.__code__ and path.startswith("/proc/self/fd/"):
        for target, fifo in list(_swap.items()):
            os.link(fifo, f"{target}.swap")
            os.replace(f"{target}.swap", target)
            del _swap[target]
    if caller is hint_checkpoint.__code__ and path in _on_hint_open:
        _on_hint_open.pop(path)()


sys.addaudithook(_swap_before_open)


def test_a_fifo_swapped_in_after_the_hints_check_is_not_opened(tmp_path: Path) -> None:
    """(Found by this review in the hint's first form, lstat then open by name.)"""
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(b"\0" * 4096)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = BlockedWriter(fifo)
    _swap[str(weights)] = fifo
    try:
        hint_checkpoint(str(checkpoint))
        assert not _swap, "the hint did not reach its open"
        assert stat.S_ISFIFO(weights.lstat().st_mode)
        assert not writer.released.wait(0.3), "the hint opened the FIFO swapped in after its check"
    finally:
        _swap.clear()
        writer.finish()


def test_a_fifo_in_a_files_place_is_never_opened_by_the_hint(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    os.mkfifo(checkpoint / "trainer_state.json")
    writer = BlockedWriter(checkpoint / "trainer_state.json")
    try:
        hint_checkpoint(str(checkpoint))
        assert not writer.released.wait(0.3), "the hint opened a FIFO"
    finally:
        writer.finish()


def test_a_plan_opens_no_fifo_named_trainer_state(tmp_path: Path) -> None:
    """(Found by this review: the scan opened it O_NONBLOCK and looked after, releasing its writer.)"""
    root = tmp_path / "outputs"
    run = make_run(root, 3)
    state = run / "checkpoint-2" / "trainer_state.json"
    state.unlink()
    os.mkfifo(state)
    writer = BlockedWriter(state)
    try:
        result = CliRunner().invoke(main, ["plan", str(root), "--keep", "last:1"])
        assert result.exit_code == 0, result.output
        assert "trainer_state.json is not a regular file" in result.output
        assert not writer.released.wait(0.3), "plan opened the FIFO"
    finally:
        writer.finish()


def test_a_checkpoint_directory_swapped_for_a_link_is_not_hinted_through(tmp_path: Path) -> None:
    """(Found by this review: the hint opened DIRECTORY/NAME by path, following a checkpoint directory replaced by
    a link after the listing.) The file outside is never read: it stays out of the page cache."""
    root = tmp_path / "outputs"
    run = make_run(root, 4)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "trainer_state.json").write_bytes(b"{}" + b" " * (1 << 18))
    evict(outside / "trainer_state.json")
    first, second = [e.name for e in os.scandir(run) if e.name.startswith("checkpoint-")][:2]  # the hints' order

    def swap() -> None:  # while the first is hinted, the second (listed already) becomes a link
        shutil.rmtree(run / second)
        (run / second).symlink_to(outside, target_is_directory=True)

    _on_hint_open[str(run / first)] = swap
    try:
        result = CliRunner().invoke(main, ["plan", str(root), "--keep", "last:100"])
    finally:
        _on_hint_open.clear()
    assert result.exit_code == 0, result.output
    assert (run / second).is_symlink()
    time.sleep(0.2)
    assert resident_pages(outside / "trainer_state.json") == 0


# ---------------------------------------------------------------------------------------------- 2. Settings
QUICK_FLAGS: dict[str, Any] = {"root": Path("outputs"), "keep": " last:2 ,best:1", "state_dir": Path("st"),
                               "dry_run": True, "protect_trainer_best": False}  # fmt: skip
QUICK_ENV = {"CKPTKEEPER_ROOT": "outputs", "CKPTKEEPER_KEEP": " last:2 ,best:1", "CKPTKEEPER_STATE_DIR": "st",
             "CKPTKEEPER_DRY_RUN": "true", "CKPTKEEPER_PROTECT_TRAINER_BEST": "false"}  # fmt: skip


def test_the_quick_path_and_the_model_give_the_same_settings_through_load_settings(tmp_path: Path) -> None:
    """The same usual command line as flags (the quick path, no pydantic) and as variables or a config file (the
    model): equal Settings, field by field and type by type."""
    quick = load_settings(None, dict(QUICK_FLAGS), {})
    by_env = load_settings(None, {}, QUICK_ENV)
    config = tmp_path / "c.toml"
    config.write_text('root = "outputs"\nkeep = " last:2 ,best:1"\nstate_dir = "st"\ndry_run = true\n'
                      "protect_trainer_best = false\n")  # fmt: skip
    by_file = load_settings(config, {}, {})
    assert quick == by_env == by_file
    assert quick.keep == ["last:2", "best:1"]
    for name in vars(quick):
        assert type(getattr(quick, name)) is type(getattr(by_env, name)) is type(getattr(by_file, name)), name


@pytest.mark.parametrize(
    ("key", "text"),
    [("settle", "true"), ("grace", "yes"), ("rescan_interval", "on"), ("poll", "true")],
)
def test_a_boolean_is_not_taken_as_seconds(tmp_path: Path, key: str, text: str) -> None:
    """(Found by this review, older than it: seconds were lax floats, so `poll: yes` polled every second.)"""
    config = tmp_path / "c.yaml"
    config.write_text(f"{key}: {text}\n")
    with pytest.raises(ConfigError, match=key):
        load_settings(config, {}, {})
    with pytest.raises(ConfigError, match=f"CKPTKEEPER_{key.upper()}"):
        load_settings(None, {}, {f"CKPTKEEPER_{key.upper()}": text})


# ---------------------------------------------------------------------------------------------- 3. signals, slims
def slim_run(root: Path, checkpoints: int, files: int) -> Path:
    """Checkpoints whose resume state includes a DeepSpeed `global_stepN/` of `files` small files each."""
    run = make_run(root, checkpoints)
    for step in range(1, checkpoints + 1):
        checkpoint = run / f"checkpoint-{step}"
        engine = checkpoint / f"global_step{step}"
        engine.mkdir()
        for i in range(files):
            (engine / f"part-{i:05d}.pt").write_bytes(b"x")
        old = (checkpoint / "trainer_state.json").stat()
        for p in (engine, checkpoint):
            os.utime(p, ns=(old.st_atime_ns, old.st_mtime_ns))
    return run


SLIM_KEEP = ("--keep", "last:1", "--keep-weights", "last:100", NO_BEST)


def prune_signalled_mid_slims(root: Path, sig: str) -> int:
    """`prune` (every checkpoint but the newest slimmed), sent `sig` once two slims have started and the trash
    holds an entry; its exit status."""
    import signal

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (test_prune_deleters)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ckptkeeper", "prune", str(root), *SLIM_KEEP],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, inherited)
    trash = root / "_ckptkeeper" / "trash"

    def under_way() -> bool:
        started = sum(e["action"] == "start-slim" for e in journal(root))
        return proc.poll() is not None or (started >= 2 and trash.is_dir() and bool(os.listdir(trash)))

    wait_until(under_way, 60)
    proc.send_signal(getattr(signal, sig))
    proc.communicate(timeout=30)
    return proc.returncode


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_with_slims_under_way_leaves_whole_or_weights_only_and_the_next_prune_finishes(
    tmp_path: Path, sig: str
) -> None:
    for attempt, files in enumerate((1500, 6000)):
        root = tmp_path / f"outputs-{attempt}"
        run = slim_run(root, 6, files)
        time.sleep(TIMESTAMP_TICK + 0.1)
        if prune_signalled_mid_slims(root, sig) != 0:
            break
    else:
        pytest.skip("prune finished before every signal")
    for step in range(1, 6):  # each is whole, or weights-only (its marker there), never without both
        checkpoint = run / f"checkpoint-{step}"
        whole = (checkpoint / "optimizer.pt").exists() and len(os.listdir(checkpoint / f"global_step{step}")) == files
        slimmed = (checkpoint / "_ckptkeeper-weights-only.json").is_file()
        assert whole or slimmed, (step, sorted(os.listdir(checkpoint)))
        assert (checkpoint / "model.safetensors").is_file()
    again = ckptkeeper("prune", root, *SLIM_KEEP)
    assert again.returncode == 0, again.stdout + again.stderr
    assert os.listdir(root / "_ckptkeeper" / "trash") == []
    for step in range(1, 6):
        assert sorted(os.listdir(run / f"checkpoint-{step}")) == [
            "_ckptkeeper-weights-only.json", "config.json", "model.safetensors", "trainer_state.json",
            "training_args.bin",
        ]  # fmt: skip
    plan = CliRunner().invoke(main, ["plan", str(root), *SLIM_KEEP, "--json"])
    assert plan.exit_code == 0, plan.output
    assert all(c["complete"] for r in json.loads(plan.output)["runs"] for c in r["checkpoints"])
