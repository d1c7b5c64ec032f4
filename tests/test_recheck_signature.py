"""The re-check before a removal compares the lstat signature the scan took with a fresh one (issue #12),
instead of reading the checkpoint again: every entry below the checkpoint counts (DeepSpeed's global_step*/
included), with its type, inode, size, mtime and ctime; a checkpoint written a moment before the scan is
read again in full, as its signature cannot vouch for it. Real files, the real Pipeline."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from ckptkeeper.engine import Pipeline
from ckptkeeper.model import Checkpoint
from ckptkeeper.policy import Policy, Protections
from ckptkeeper.rules import parse_rules
from ckptkeeper.scan import TIMESTAMP_TICK, lstat_signature, read_checkpoint
from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.state import STATE_DIR_NAME

SMALL = SimConfig(steps_per_epoch=10, epochs=2, save_steps=5, eval_steps=5)  # checkpoints 5, 10, 15, 20


def with_deepspeed_state(checkpoint: Path) -> Path:
    """A DeepSpeed-like `global_step<N>/` of two files in the checkpoint; returns one of them."""
    inner = checkpoint / f"global_step{checkpoint.name.removeprefix('checkpoint-')}"
    inner.mkdir()
    (inner / "mp_rank_00_model_states.pt").write_bytes(b"m" * 64)
    (inner / "zero_pp_rank_0_optim_states.pt").write_bytes(b"o" * 128)
    return inner / "zero_pp_rank_0_optim_states.pt"


def made_run(root: Path) -> Path:
    run = root / "run"
    simulate_run(run, SMALL)
    for step in (5, 10, 15, 20):
        with_deepspeed_state(run / f"checkpoint-{step}")
    time.sleep(TIMESTAMP_TICK + 0.05)  # older than a look's tick: the scan's signatures vouch
    return run


def pipeline(root: Path) -> Pipeline:
    policy = Policy(parse_rules("last:1"), Protections(trainer_best=False))
    return Pipeline.checked(root, policy, state_dir=root / STATE_DIR_NAME)


def act(p: Pipeline, planned: object) -> list[tuple[str, str]]:
    from ckptkeeper.policy import RootPlan

    assert isinstance(planned, RootPlan)
    p.acquire()
    try:
        results = p.act(planned)
    finally:
        p.state.close()
    return [(o.checkpoint, str(o.action)) for r in results for o in r.outcomes]


def test_the_signature_holds_every_entry_below_the_checkpoint_with_its_type(tmp_path: Path) -> None:
    run = made_run(tmp_path / "out")
    checkpoint = run / "checkpoint-5"
    identity, signature = lstat_signature(checkpoint)
    st = checkpoint.lstat()
    assert identity == (st.st_dev, st.st_ino)
    entries = {rel: (kind, ino, size) for rel, kind, ino, size, _, _ in signature}
    assert entries["."][0] == stat.S_IFDIR
    assert entries["global_step5"][0] == stat.S_IFDIR
    inner = checkpoint / "global_step5" / "zero_pp_rank_0_optim_states.pt"
    assert entries["global_step5/zero_pp_rank_0_optim_states.pt"] == (stat.S_IFREG, inner.stat().st_ino, 128)
    assert len(signature) == sum(1 for _ in checkpoint.rglob("*")) + 1
    # What the scan records is the same signature
    scanned = read_checkpoint(checkpoint, 5)
    assert scanned.signature == signature and scanned.identity == identity and scanned.signature_vouches


def test_a_file_rewritten_in_place_inside_global_step_after_the_plan_is_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "out"
    run = made_run(root)
    p = pipeline(root)
    planned = p.survey(None).plan
    checkpoints: dict[str, Checkpoint] = {c.name: c for c in planned.runs[0].run.checkpoints}
    assert all(c.signature_vouches for c in checkpoints.values())
    optimizer = run / "checkpoint-10" / "global_step10" / "zero_pp_rank_0_optim_states.pt"
    optimizer.write_bytes(b"O" * 128)  # same size, same inode: only its times say it changed
    assert act(p, planned) == [("checkpoint-5", "delete"), ("checkpoint-10", "skipped"), ("checkpoint-15", "delete")]
    assert sorted(c.name for c in run.iterdir() if c.name.startswith("checkpoint-")) == [
        "checkpoint-10",
        "checkpoint-20",
    ]


def test_an_entry_replaced_by_one_of_another_type_after_the_plan_is_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "out"
    run = made_run(root)
    p = pipeline(root)
    planned = p.survey(None).plan
    scheduler = run / "checkpoint-15" / "scheduler.pt"
    scheduler.unlink()
    os.symlink("/dev/null", scheduler)
    assert act(p, planned) == [("checkpoint-5", "delete"), ("checkpoint-10", "delete"), ("checkpoint-15", "skipped")]
    assert (run / "checkpoint-15").is_dir()


def test_a_checkpoint_written_a_moment_before_the_scan_is_read_again_in_full(tmp_path: Path) -> None:
    """Its signature cannot vouch (a change in the same tick of the file-time clock may keep every time), so
    the re-check reads it all again, as before signatures; it still goes when nothing changed."""
    root = tmp_path / "out"
    run = made_run(root)
    fresh = run / "checkpoint-10" / "extra.json"
    fresh.write_text("{}\n")
    os.utime(fresh, (1e9, 1e9))  # an old mtime (not the newest written); its ctime is now, whatever utime does
    p = pipeline(root)
    planned = p.survey(None).plan
    vouched = {c.name: c.signature_vouches for c in planned.runs[0].run.checkpoints}
    assert vouched == {"checkpoint-5": True, "checkpoint-10": False, "checkpoint-15": True, "checkpoint-20": True}
    assert act(p, planned) == [("checkpoint-5", "delete"), ("checkpoint-10", "delete"), ("checkpoint-15", "delete")]


def test_a_checkpoint_gone_before_its_removal_is_vanished_not_an_error(tmp_path: Path) -> None:
    root = tmp_path / "out"
    run = made_run(root)
    p = pipeline(root)
    planned = p.survey(None).plan
    for entry in sorted((run / "checkpoint-5").rglob("*"), reverse=True):
        entry.rmdir() if entry.is_dir() else entry.unlink()
    (run / "checkpoint-5").rmdir()
    assert act(p, planned)[0] == ("checkpoint-5", "vanished")
