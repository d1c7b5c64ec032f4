"""`ckptkeeper watch` as a real process beside a (simulated) Trainer, on a real filesystem.

Every test starts `python -m ckptkeeper watch ...` (tests/watchutil.py), changes the disk the way a Trainer,
a user or a cluster does, and waits for conditions with a deadline: the log saying something, the disk
reaching a state, the process exiting. Expectations come from the SPEC's rules and the simulated Trainer's
deterministic metrics, cross-checked with the pure planner on a dry copy of the same run.
"""

from __future__ import annotations

import json
import math
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from watchutil import (
    StartWatch,
    TrainerThread,
    Watch,
    count_files,
    journal,
    journal_time,
    manifest,
    planned,
    steps,
    wait_until,
)

from ckptkeeper.model import Run
from ckptkeeper.policy import plan_run
from ckptkeeper.rules import parse_rules
from ckptkeeper.scan import checkpoint_step, read_run
from ckptkeeper.simtrainer import SaveEvent, SimConfig, simulate_run

SETTLE = ("--settle", "0.3")
NO_RESCAN = ("--rescan-interval", "3600")  # only events (and settle re-checks) can make the daemon look
# 8 steps, a checkpoint every 2 (2, 4, 6, 8), no eval and no Trainer best: `last:N` alone decides.
SMALL = SimConfig(steps_per_epoch=4, epochs=2, save_steps=2, eval_strategy="no", metric_for_best_model=None)


def rm_rf(path: Path) -> None:
    """`rm -rf`: what another process removes meanwhile (the daemon's reaper emptying its trash) is fine."""

    def gone_already(function: object, name: str, info: tuple[type[BaseException], BaseException, object]) -> None:
        if not isinstance(info[1], FileNotFoundError):
            raise info[1]

    shutil.rmtree(path, onerror=gone_already)


def assert_no_failure_logged(w: Watch) -> None:
    text = w.log()
    assert "Traceback" not in text, w.describe()
    assert not [line for line in text.splitlines() if " ERROR " in line or " CRITICAL " in line], w.describe()


# ---- 1. a live Trainer run ------------------------------------------------------------------------------------
# 27 steps, 9 per epoch, a save and an eval every 3 steps: checkpoints 3, 6, ..., 27. Eval loss falls, then
# rises after 45 % of training (overfit_after), so the best checkpoint is neither the last nor an epoch end.
LIVE = SimConfig(steps_per_epoch=9, epochs=3, save_steps=3, eval_steps=3, overfit_after=0.45, seed=0)
LIVE_KEEP = "best:1,last:2,epoch:all"


def test_a_live_trainer_run_is_pruned_to_exactly_the_expected_checkpoints(tmp_path: Path, watch: StartWatch) -> None:
    # The expectation, from the rules and the simulated Trainer's deterministic metrics (a dry run).
    dry = tmp_path / "dry"
    assert simulate_run(dry, LIVE) == list(range(3, 28, 3))
    history = json.loads((dry / "checkpoint-27" / "trainer_state.json").read_text())["log_history"]
    evals = [(e["eval_loss"], e["step"]) for e in history if "eval_loss" in e and not math.isnan(e["eval_loss"])]
    best = min(evals)[1]  # the lowest eval_loss; on a tie the lower step
    last_2 = {24, 27}
    per_epoch = {9, 18, 27}  # epochs 1/3..1.0 -> bucket 1, 4/3..2.0 -> 2, 7/3..3.0 -> 3: the highest step of each
    expected = last_2 | per_epoch | {best}
    assert best == 12  # not kept by another rule: the best rule really decides something here
    assert expected == {9, 12, 18, 24, 27}
    assert planned(dry, LIVE_KEEP)[0] == expected  # the pure planner on the finished dry run agrees
    # For each removed checkpoint: the first save after which the rules remove it (planner on each prefix).
    checkpoints = read_run(dry, dry).checkpoints
    removable_after: dict[int, int] = {}
    for k in range(1, len(checkpoints) + 1):
        plan = plan_run(Run(".", checkpoints[:k]), parse_rules(LIVE_KEEP))
        for d in plan.removed:
            removable_after.setdefault(d.checkpoint.step, checkpoints[k - 1].step)
    assert removable_after.keys() == {3, 6, 15, 21}

    root = tmp_path / "outputs"
    root.mkdir()
    w = watch(root, "--keep", LIVE_KEEP, *SETTLE)
    w.wait_log("watching ")
    # trainer_state.json, written last, stays half-written for 0.5 s: longer than the 0.3 s settle time.
    trainer = TrainerThread(root / "run", LIVE, pace=0.01, state_write_pause=0.5)
    trainer.start()
    trainer.finish(60)
    written = trainer.state_written
    w.wait_log("run run: training finished and its retention is applied")

    assert steps(root / "run") == sorted(expected), w.describe()
    # What is kept was never touched: same bytes as the dry run (trainer_state.json names its own directory).
    for step in expected:
        live, reference = root / "run" / f"checkpoint-{step}", dry / f"checkpoint-{step}"
        assert manifest(live).keys() == manifest(reference).keys()
        for rel in manifest(reference):
            if rel != "trainer_state.json" and (reference / rel).is_file():
                assert (live / rel).read_bytes() == (reference / rel).read_bytes(), rel

    entries = journal(root / "_ckptkeeper")
    assert {e["action"] for e in entries} == {"start-delete", "delete"}, entries
    starts = {e["step"]: journal_time(e) for e in entries if e["action"] == "start-delete"}
    assert sorted(starts) == sorted(removable_after)
    assert len([e for e in entries if e["action"] == "delete"]) == len(removable_after)
    # A half-written trainer_state.json never made the checkpoint being written count: each removal came only
    # after the trainer_state.json of the save that makes it removable was completely written, plus the settle
    # time (journal times are truncated to the millisecond, file times may lag a kernel tick).
    for step, started in starts.items():
        trigger = removable_after[step]
        assert started >= written[trigger] + 0.3 - 0.02, (
            f"checkpoint-{step} was removed {written[trigger] + 0.3 - started:.3f} s too early: before "
            f"checkpoint-{trigger} (whose completion makes it removable) was completely written and settled"
        )
    assert_no_failure_logged(w)
    assert w.terminate()[0] == 0


# ---- 2. rename into place -------------------------------------------------------------------------------------
@pytest.mark.parametrize("staging", ["run directory", "outside the root"])
def test_a_checkpoint_renamed_into_place_is_noticed_and_applied(
    tmp_path: Path, watch: StartWatch, staging: str
) -> None:
    source = tmp_path / "source"
    simulate_run(source, SMALL)
    root = tmp_path / "outputs"
    run = root / "run"
    run.mkdir(parents=True)
    for step in (2, 4):
        shutil.copytree(source / f"checkpoint-{step}", run / f"checkpoint-{step}")
    w = watch(root, "--keep", "last:2", *SETTLE, *NO_RESCAN)
    w.wait_log("run/checkpoint-4 kept: ")

    # Built completely under a name that is not a checkpoint name, then renamed in one step.
    staged = (run if staging == "run directory" else tmp_path) / "tmp-checkpoint-6"
    shutil.copytree(source / "checkpoint-6", staged)
    os.rename(staged, run / "checkpoint-6")
    wait_until(lambda: steps(run) == [4, 6], 10, w.describe)
    w.wait_log("run/checkpoint-2 deleted: freed ")
    w.wait_log("run/checkpoint-6 kept: newest")
    assert_no_failure_logged(w)
    assert w.terminate()[0] == 0


# ---- 3. run directories that appear later ----------------------------------------------------------------------
def test_run_directories_created_after_start_are_noticed_at_depth_1_and_3(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    root.mkdir()
    w = watch(root, "--keep", "last:1", *SETTLE, *NO_RESCAN)
    w.wait_log("watching ")
    shallow, deep = root / "late", root / "new" / "a" / "b"
    simulate_run(shallow, SMALL)  # mkdir -p, then the checkpoints right away
    simulate_run(deep, SMALL)
    wait_until(lambda: steps(shallow) == [8] and steps(deep) == [8], 10, w.describe)
    w.wait_log("late/checkpoint-6 deleted: ")
    w.wait_log("new/a/b/checkpoint-6 deleted: ")
    assert_no_failure_logged(w)
    assert w.terminate()[0] == 0


# ---- 4. the root deleted and recreated -------------------------------------------------------------------------
@pytest.mark.parametrize("recreate", ["at once", "after the daemon noticed"])
def test_the_root_deleted_and_recreated_while_watching(tmp_path: Path, watch: StartWatch, recreate: str) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "old", SMALL)
    w = watch(root, "--keep", "last:1", *SETTLE, *NO_RESCAN)
    wait_until(lambda: steps(root / "old") == [8], 10, w.describe)

    rm_rf(root)  # with the state directory and its lock
    if recreate == "after the daemon noticed":
        w.wait_log("is gone; waiting for it to come back")
    root.mkdir()  # "at once": `rm -rf outputs && mkdir outputs`, quicker than any periodic check
    # Logged either way; "at once" may also be seen as gone-then-back if a check falls between the two steps.
    wait_until(
        lambda: "is back; watching it again" in w.log() or "was deleted and created again" in w.log(),
        10,
        lambda: f"the daemon to notice the new root: {w.describe()}",
    )
    simulate_run(root / "new", SMALL)  # only now: the events of the new root must reach the daemon
    wait_until(lambda: steps(root / "new") == [8], 10, w.describe)
    w.wait_log("new/checkpoint-6 deleted: ")
    assert w.alive(), w.describe()
    # It holds the lock of the new root, not the deleted one's: a second instance is refused.
    second = watch(root, "--keep", "last:1")
    assert second.wait_exit() == 4, second.describe()
    assert f"pid {w.pid} on " in second.log()
    assert_no_failure_logged(w)
    assert w.terminate()[0] == 0


# ---- 5. checkpoints removed by someone else --------------------------------------------------------------------
def test_checkpoints_removed_by_someone_else_during_the_daemons_pass(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    run = root / "run"
    many = SimConfig(steps_per_epoch=60, epochs=1, save_steps=1, eval_strategy="no", metric_for_best_model=None)
    simulate_run(run, many)  # checkpoint-1..60: `last:1` removes 59 of them in one pass
    journal_path = root / "_ckptkeeper" / "journal.jsonl"
    taken: list[int] = []

    def rival() -> None:
        """Like the Trainer's rotation: rmtree the newest doomed checkpoints as soon as the pass begins."""
        deadline = time.monotonic() + 30
        while not journal_path.exists() and time.monotonic() < deadline:
            time.sleep(0.0005)
        for step in range(59, 0, -1):
            if (run / f"checkpoint-{step}").exists():
                taken.append(step)
                shutil.rmtree(run / f"checkpoint-{step}", ignore_errors=True)

    racer = threading.Thread(target=rival, daemon=True)
    racer.start()
    w = watch(root, "--keep", "last:1", "--settle", "0", *NO_RESCAN)
    racer.join(40)
    wait_until(lambda: steps(run) == [60], 10, w.describe)
    w.wait_log(" vanished: ")  # logged as such, not as an error
    # A checkpoint gone before the daemon touched it is not an action of ckptkeeper's: only what it did is
    # journaled (one that vanishes between its start-delete line and the rename is journaled as vanished).
    outcomes = {e["action"] for e in journal(root / "_ckptkeeper")}
    assert outcomes <= {"start-delete", "delete", "vanished", "skipped"}, outcomes
    assert taken, "the rival found nothing to remove"
    assert w.alive(), w.describe()
    assert_no_failure_logged(w)
    assert w.terminate()[0] == 0


def test_rotation_and_removals_at_random_moments_never_crash_the_daemon(tmp_path: Path, watch: StartWatch) -> None:
    seed = random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    root = tmp_path / "outputs"
    run = root / "run"
    root.mkdir()
    w = watch(root, "--keep", "last:1", *SETTLE)
    w.wait_log("watching ")
    # The Trainer's own rotation (save_total_limit=2) plus a rival removing, at random moments, a checkpoint
    # older than the newest saved one: one that `last:1` also removes once the newest has settled.
    rotating = SimConfig(
        steps_per_epoch=16, epochs=1, save_steps=2, eval_strategy="no", metric_for_best_model=None, save_total_limit=2
    )
    saves: queue.Queue[int | None] = queue.Queue()
    trainer = TrainerThread(run, rotating, pace=0.06, on_save=lambda e: saves.put(e.step))
    removed: list[int] = []

    def rival() -> None:
        while (newest := saves.get()) is not None:
            time.sleep(rng.uniform(0.0, 0.45))  # a random moment, around when the daemon acts (settle 0.3 s)
            candidates = [s for s in steps(run) if s < newest]
            if candidates:
                victim = rng.choice(candidates)
                removed.append(victim)
                shutil.rmtree(run / f"checkpoint-{victim}", ignore_errors=True)

    racer = threading.Thread(target=rival, daemon=True)
    racer.start()
    trainer.start()
    trainer.finish(60)
    saves.put(None)
    racer.join(10)
    wait_until(lambda: steps(run) == [16], 10, lambda: f"only checkpoint-16 left (seed {seed}): {w.describe()}")
    assert w.alive(), f"seed {seed}: {w.describe()}"
    assert_no_failure_logged(w)
    assert w.terminate()[0] == 0, f"seed {seed}"


# ---- 6. polling ------------------------------------------------------------------------------------------------
def test_polling_mode_works_end_to_end(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    root.mkdir()
    w = watch(root, "--keep", "last:2", *SETTLE, "--poll", "0.2", *NO_RESCAN)
    w.wait_log("(polling; settle 0.3 s; full rescan every 3600 s)")
    fds = [_fd_target(w.pid, fd) for fd in os.listdir(f"/proc/{w.pid}/fd")]
    assert not [fd for fd in fds if "inotify" in fd], fds  # no inotify instance at all
    trainer = TrainerThread(root / "run", SMALL, pace=0.05, state_write_pause=0.2)
    trainer.start()
    trainer.finish(30)
    wait_until(lambda: steps(root / "run") == [6, 8], 10, w.describe)
    for step in (2, 4):
        w.wait_log(f"run/checkpoint-{step} deleted: freed ")
    assert_no_failure_logged(w)
    assert w.terminate()[0] == 0


def _fd_target(pid: int, fd: str) -> str:
    """What a descriptor of `pid` is open on; "" for one closed since it was listed (the daemon's first pass, its
    imports, open and close files meanwhile)."""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except FileNotFoundError:
        return ""


# ---- 7. inotify cannot start -----------------------------------------------------------------------------------
EXHAUST = """
import ctypes, errno, sys
limit = int(sys.argv[1])
with open("/proc/sys/user/max_inotify_instances", "w") as f:  # this user namespace's own limit
    f.write(str(limit))
libc = ctypes.CDLL(None, use_errno=True)
held = []
while True:
    fd = libc.inotify_init1(0o2000000)  # IN_CLOEXEC
    if fd < 0:
        print("EXHAUSTED", len(held), errno.errorcode.get(ctypes.get_errno(), "?"), flush=True)
        break
    held.append(fd)
sys.stdin.read()  # hold every instance until the test kills this process
"""


def test_falls_back_to_polling_when_inotify_cannot_start(tmp_path: Path, watch: StartWatch) -> None:
    limits = Path("/proc/sys/fs/inotify/max_user_instances")
    if not limits.exists():
        pytest.skip("no inotify on this system (/proc/sys/fs/inotify/max_user_instances is missing)")
    if not (shutil.which("unshare") and shutil.which("nsenter")):
        pytest.skip("needs unshare and nsenter (util-linux) to exhaust inotify in a private user namespace")
    # The instance limit is per user. Exhausting this user's real limit (max_user_instances, shared with every
    # other process of the user on the machine) would break them for the duration; instead the helper gets a
    # user namespace of its own, lowers that namespace's limit, and exhausts it with inotify_init until EMFILE.
    # The watch then joins that namespace: for it, inotify cannot start, exactly as on an exhausted machine.
    system_limit = int(limits.read_text())
    limit = min(8, system_limit)
    helper = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", sys.executable, "-c", EXHAUST, str(limit)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert helper.stdout is not None
        first = helper.stdout.readline().split()
        if first[:1] != ["EXHAUSTED"]:
            helper.kill()
            _, err = helper.communicate(timeout=10)
            pytest.skip(f"cannot create a user namespace to exhaust inotify in (unshare: {err.strip()})")
        assert first == ["EXHAUSTED", str(limit), "EMFILE"], first

        root = tmp_path / "outputs"
        run = root / "run"
        simulate_run(run, SMALL)
        enter = ["nsenter", f"--target={helper.pid}", "--user", "--preserve-credentials", "--"]
        w = watch(root, "--keep", "last:1", *SETTLE, *NO_RESCAN, prefix=enter)
        w.wait_log("falling back to polling")
        w.wait_log("(polling; settle 0.3 s")
        wait_until(lambda: steps(run) == [8], 10, w.describe)  # the first full pass
        simulate_run(root / "later", SMALL)  # noticed by the polling watcher
        wait_until(lambda: steps(root / "later") == [8], 10, w.describe)
        assert_no_failure_logged(w)
        assert w.terminate()[0] == 0
    finally:
        helper.kill()  # releases every inotify instance it held
        helper.communicate(timeout=10)


# ---- 9. SIGTERM in the middle of deleting a large checkpoint ---------------------------------------------------
def stop_while_deleting(root: Path, files: int, blob: bytes, watch: StartWatch) -> list[Path]:
    """A run with checkpoint-10 and -20 of `files` real files each (DeepSpeed-style per-rank shards) plus small
    checkpoint-30 and -40; `last:2` removes the two big ones in one pass. SIGTERM as soon as the reaper has
    begun deleting; check the exit and that no checkpoint-N is half-removed. Returns the trash entries left
    unfinished (none if the reaper happened to finish everything before the process ended)."""
    run = root / "run"
    four = SimConfig(steps_per_epoch=40, epochs=1, save_steps=10, eval_strategy="no", metric_for_best_model=None)
    simulate_run(run, four)
    for step in (10, 20):
        shards = run / f"checkpoint-{step}" / f"global_step{step}"
        shards.mkdir()
        saved = (run / f"checkpoint-{step}" / "trainer_state.json").stat().st_mtime_ns
        for i in range(files):
            (shards / f"zero_pp_rank_{i}_mp_rank_00_optim_states.pt").write_bytes(blob)
            # Saved with the checkpoint, before 30 and 40: else 20 is the newest written (SPEC "Protections" 1).
            os.utime(shards / f"zero_pp_rank_{i}_mp_rank_00_optim_states.pt", ns=(saved, saved))
    os.sync()  # on disk, as checkpoints written a while ago are: freeing their blocks takes real time
    total = count_files(run / "checkpoint-10") + count_files(run / "checkpoint-20")
    before = {step: manifest(run / f"checkpoint-{step}") for step in (30, 40)}

    w = watch(root, "--keep", "last:2", "--settle", "0", "--grace", "10", *NO_RESCAN)
    trash = root / "_ckptkeeper" / "trash"

    def in_trash() -> int:
        return count_files(trash) if trash.is_dir() else 0

    def deleting() -> bool:  # both renamed into the trash, and the reaper has begun
        return trash.is_dir() and len(os.listdir(trash)) == 2 and 0 < in_trash() < total

    wait_until(deleting, 60, lambda: f"the reaper to start deleting: {w.describe()}")
    code, took = w.terminate(timeout=15)
    assert code == 0, w.describe()
    assert took < 10, f"exit took {took:.1f} s, longer than --grace 10"
    print(f"{2 * files} files of {len(blob)} B: exit {took:.2f} s after SIGTERM, {in_trash()} of {total} left")

    # No checkpoint-N is half-removed: what carries the name is whole, what is in the trash has another name.
    assert steps(run) == [30, 40]
    assert {step: manifest(run / f"checkpoint-{step}") for step in (30, 40)} == before
    named = [p for p in root.rglob("checkpoint-*") if p.is_dir() and checkpoint_step(p.name) is not None]
    assert sorted(named) == [run / "checkpoint-30", run / "checkpoint-40"]
    assert all(checkpoint_step(e.name) is None for e in trash.iterdir())
    return list(trash.iterdir())


def test_sigterm_while_deleting_a_large_checkpoint(tmp_path: Path, watch: StartWatch) -> None:
    blob = os.urandom(100_000)
    # 2 x 2500 files of 100 kB (500 MB): this disk deletes them in 1.5-9 s, well over the daemon's 1 s wait for
    # its reaper. Should a faster disk free them all within it, the stop did not land mid-delete: go bigger.
    for attempt, files in enumerate((2500, 6000)):
        root = tmp_path / f"attempt-{attempt}" / "outputs"
        leftovers = stop_while_deleting(root, files, blob, watch)
        if leftovers:
            break
    else:
        pytest.fail("the reaper always finished deleting 1.2 GB within its 1 s wait: nothing was left to check")

    # The lock is free: the next instance starts at once and finishes what is left in the trash.
    again = watch(root, "--keep", "last:2", "--settle", "0", *NO_RESCAN)
    for entry in leftovers:
        again.wait_log(f"finished removing {entry.name}, left in the trash by an interrupted run", timeout=60)
    again.wait_log("watching ")
    assert list((root / "_ckptkeeper" / "trash").iterdir()) == []
    finished = [e["entry"] for e in journal(root / "_ckptkeeper") if e["action"] == "finish-trash"]
    assert sorted(finished) == sorted(e.name for e in leftovers)
    assert steps(root / "run") == [30, 40]
    assert_no_failure_logged(again)
    assert again.terminate()[0] == 0


# ---- 10. one instance per root ---------------------------------------------------------------------------------
def test_a_second_instance_exits_4_and_a_killed_ones_lock_is_stale(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "run", SMALL)
    first = watch(root, "--keep", "last:1", *SETTLE)
    first.wait_log("watching ")

    second = watch(root, "--keep", "last:1", *SETTLE)
    assert second.wait_exit() == 4
    message = second.log()
    assert f"pid {first.pid} on " in message, message
    assert f"(lock: {root / '_ckptkeeper.lock'})" in message, message
    assert first.alive(), first.describe()

    first.proc.send_signal(signal.SIGKILL)
    first.wait_exit()
    third = watch(root, "--keep", "last:1", *SETTLE)
    third.wait_log("watching ")
    simulate_run(root / "next", SMALL)  # and it works
    wait_until(lambda: steps(root / "next") == [8], 10, third.describe)
    assert_no_failure_logged(third)
    assert third.terminate()[0] == 0


# ---- 11. --exit-when-done --------------------------------------------------------------------------------------
def test_exit_when_done_waits_for_the_final_checkpoint(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "finished", SMALL)  # a run that finished before: alone it would be done
    live = root / "live"
    first_saved, go_on = threading.Event(), threading.Event()

    def on_save(event: SaveEvent) -> None:
        if event.step == 2:
            first_saved.set()
            go_on.wait(30)  # the Trainer pauses after its first checkpoint until the watch has seen it

    trainer = TrainerThread(live, SMALL, pace=0.05, state_write_pause=0.2, on_save=on_save)
    trainer.start()
    assert first_saved.wait(30)
    w = watch(root, "--keep", "last:1", *SETTLE, "--exit-when-done", *NO_RESCAN)
    w.wait_log("live/checkpoint-2 kept: ")
    w.wait_log("run finished: training finished and its retention is applied")
    assert w.alive(), w.describe()
    go_on.set()
    while trainer.is_alive():  # the whole time the run is still training, the watch runs
        assert w.alive(), w.describe()
        time.sleep(0.02)
    trainer.finish()
    assert w.wait_exit(15) == 0, w.describe()
    assert steps(live) == [8] and steps(root / "finished") == [8]
    assert "exiting (--exit-when-done)" in w.log()
    assert_no_failure_logged(w)


# ---- 12. --dry-run ---------------------------------------------------------------------------------------------
def test_dry_run_logs_would_delete_and_changes_nothing(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "run", SMALL)
    w = watch(root, "--keep", "last:1", *SETTLE, "--dry-run", *NO_RESCAN)
    w.wait_log("(dry run: nothing is removed)")
    for step in (2, 4, 6):
        w.wait_log(f"run/checkpoint-{step} would delete (dry run; no rule keeps it")
    simulate_run(root / "late", SMALL)  # noticed by events, and still nothing is removed
    for step in (2, 4, 6):
        w.wait_log(f"late/checkpoint-{step} would delete (dry run; no rule keeps it")
    before = manifest(root)
    assert w.terminate()[0] == 0
    assert manifest(root) == before
    assert steps(root / "run") == steps(root / "late") == [2, 4, 6, 8]
    assert not (root / "_ckptkeeper").exists()
    assert " deleted: " not in w.log()
    assert_no_failure_logged(w)


# ---- 13. log formats -------------------------------------------------------------------------------------------
def json_records(w: Watch) -> list[dict[str, object]]:
    records = []
    for line in w.lines():
        record = json.loads(line)  # every line is one JSON object
        assert isinstance(record, dict), line
        assert {"time", "level", "message"} <= record.keys(), line
        assert isinstance(record["time"], str) and record["time"][:2] == "20", line
        records.append(record)
    return records


def test_json_log_format_gives_one_json_object_per_line(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "run", SMALL)
    w = watch(root, "--keep", "last:1", *SETTLE, "--log-format", "json", *NO_RESCAN)
    wait_until(lambda: steps(root / "run") == [8], 10, w.describe)
    w.wait_log("run/checkpoint-6 deleted: freed ")
    assert w.terminate()[0] == 0
    records = json_records(w)
    by_message = {str(r["message"]).split(":")[0]: r["level"] for r in records}
    assert by_message["run/checkpoint-2 deleted"] == "info"
    assert by_message["received SIGTERM"] == "info"
    assert any(str(r["message"]).startswith(f"watching {root} (inotify;") for r in records)
    assert w.stdout() == ""


def test_quiet_hides_info_lines_and_keeps_warnings(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"  # not there yet: a warning
    w = watch(root, "--keep", "last:1", *SETTLE, "--log-format", "json", "-q", *NO_RESCAN)
    w.wait_log("does not exist yet")
    staged = tmp_path / "staged"
    simulate_run(staged / "run", SMALL)
    os.rename(staged, root)
    wait_until(lambda: steps(root / "run") == [8], 10, w.describe)  # it works, silently
    assert w.terminate()[0] == 0
    records = json_records(w)
    assert [r["level"] for r in records] == ["warning"], records
    assert "does not exist yet; waiting for it to appear" in str(records[0]["message"])


def test_a_file_rewritten_in_place_is_seen_by_a_later_full_rescan_when_polling(
    tmp_path: Path, watch: StartWatch
) -> None:
    """The poller does not look inside checkpoints and most periodic rescans trust an unchanged checkpoint
    directory; a file rewritten in place (same inode, no entry added or removed) must still be seen, by
    the thorough rescan that comes every few periodic ones."""
    root = tmp_path / "outputs"
    simulate_run(root / "run", SMALL)
    w = watch(root, "--keep", "last:4", *SETTLE, "--poll", "0.2", "--rescan-interval", "0.1", "-v")
    w.wait_log("run/checkpoint-8 kept: ")
    state = root / "run" / "checkpoint-8" / "trainer_state.json"
    inode = state.stat().st_ino
    with open(state, "r+b") as f:  # in place: the directory's own mtime and ctime do not change
        data = f.read()
        f.seek(0)
        f.write(data.replace(b'"global_step": 8', b'"global_step": 9'))
        f.truncate()
    assert state.stat().st_ino == inode
    w.wait_log("global_step 9 in trainer_state.json does not match checkpoint-8", timeout=20)
    assert steps(root / "run") == [2, 4, 6, 8]
    assert_no_failure_logged(w)
    assert w.terminate()[0] == 0
