"""Adversarial review of the weights-only keep (#13): each test names a defect found through the real CLI and
fails for that defect's reason until it is fixed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_keep_weights import (
    DEEPSPEED,
    HF_RESUME,
    KEEP,
    ZERO3,
    cli,
    journal,
    make_checkpoint,
    plan_json,
    sim_root,
)

from ckptkeeper.integrity import encode_safetensors
from ckptkeeper.weights import MARKER

ROOT_RULES = ("--keep", "last:1", "--keep-weights", "epoch:all")  # on `epochs_run`: all but the newest weights-only


def epochs_run(root: Path, n: int = 3) -> dict[int, Path]:
    """Checkpoints 10, 20, ... at epochs 1, 2, ...: with ROOT_RULES, all but the newest are kept weights-only."""
    return {i * 10: make_checkpoint(root / "run", i * 10, float(i)) for i in range(1, n + 1)}


def slims(root: Path) -> list[dict[str, Any]]:
    return [e for e in journal(root) if e["action"] == "slim"]


# --- the marker is read through whatever has its name ------------------------------------------------------------


def test_a_fifo_named_like_the_marker_hangs_plan(tmp_path: Path) -> None:
    """scan._marker_mtime opens the marker with a plain open(): no O_NONBLOCK, no O_NOFOLLOW, no regular-file
    check (trainer_state.json is read with all three). A FIFO (or a link to one, anywhere) named like the
    marker blocks `plan`, `prune` and `watch` forever."""
    root = tmp_path / "outputs"
    checkpoints = epochs_run(root)
    os.mkfifo(checkpoints[10] / MARKER)

    try:
        done = subprocess.run(
            [sys.executable, "-m", "ckptkeeper", "plan", str(root), *ROOT_RULES],
            capture_output=True,
            text=True,
            timeout=15,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("`plan` hangs opening a FIFO named like the weights-only marker")
    assert done.returncode in (0, 1), done.stderr


def test_a_marker_with_out_of_range_times_crashes_prune(tmp_path: Path) -> None:
    """_read_marker trusts `directory_times_ns` as it finds it; os.utime raises OverflowError (not OSError) on
    an out-of-range time, which no handler catches: `prune` dies with a traceback after moving the resume
    state of checkpoint-10 to the trash, and the other checkpoints are never slimmed."""
    root = tmp_path / "outputs"
    checkpoints = epochs_run(root)
    (checkpoints[10] / MARKER).write_text(
        json.dumps({"weights_only": True, "by": "ckptkeeper", "directory_times_ns": [10**30, 10**30]})
    )

    result = cli("prune", root, *ROOT_RULES)

    assert not isinstance(result.exception, OverflowError), "prune crashed: OverflowError from os.utime"
    assert result.exit_code in (0, 1), result.output
    assert not any((checkpoints[20] / n).exists() for n in HF_RESUME)  # the pass went on to the next one


def test_a_foreign_file_named_like_the_marker_lets_the_resume_state_go_unrecorded(tmp_path: Path) -> None:
    """_mark treats any entry named like the marker (here a half-written or foreign file) as ckptkeeper's: it
    writes none of its own, then removes the resume state. The checkpoint ends with no record that it lost
    its optimizer state, or of what went."""
    root = tmp_path / "outputs"
    checkpoints = epochs_run(root)
    (checkpoints[10] / MARKER).write_text("not json{")

    assert cli("prune", root, *ROOT_RULES).exit_code in (0, 1)

    resume_gone = not any((checkpoints[10] / n).exists() for n in HF_RESUME)
    if resume_gone:
        record = json.loads((checkpoints[10] / MARKER).read_text())  # JSONDecodeError: no record at all
        assert record["by"] == "ckptkeeper" and sorted(record["resume_state_removed"]) == sorted(HF_RESUME)


# --- "a slim cut short" is guessed from the directory's mtime alone ----------------------------------------------


def test_a_weights_only_checkpoint_changed_later_gets_its_mtime_rewound_and_a_slim_reported(tmp_path: Path) -> None:
    """times_to_restore = the marker's recorded mtime differs from the directory's. After a finished slim, any
    later change to the directory (a tokenizer file copied in with `cp -p`, a file deleted by the user) makes
    the next pass "finish a slim cut short": ckptkeeper rewinds the mtime of a kept checkpoint, journals a
    `slim` of 0 bytes and reports "made 1 weights only"."""
    root = sim_root(tmp_path)
    assert cli("prune", root, *KEEP).exit_code == 0
    checkpoint = root / "run" / "checkpoint-20"
    shutil.copy2(checkpoint / "config.json", checkpoint / "tokenizer_config.json")  # its mtime: the source's
    changed = checkpoint.stat().st_mtime_ns
    entries = journal(root)

    result = cli("prune", root, *KEEP)

    assert result.exit_code == 0, result.output
    assert "made 1 weights only" not in result.output, result.output
    assert journal(root) == entries
    assert checkpoint.stat().st_mtime_ns == changed  # not put back to the time of the first slim


@contextlib.contextmanager
def coarse_timestamps_fs(where: Path) -> Iterator[Path]:
    """An ext2 with 128-byte inodes (1 s timestamps), loop-mounted (root); skipped where that is not possible."""
    image, mount = where / "ext2.img", where / "mnt"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    try:
        made = subprocess.run(
            ["mke2fs", "-q", "-F", "-t", "ext2", "-I", "128", str(image)], capture_output=True, check=False
        )
    except FileNotFoundError:
        pytest.skip("no mke2fs")
    mounted = made.returncode == 0 and subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=False)
    if not mounted or mounted.returncode != 0:
        pytest.skip("cannot make and loop-mount an ext2 (not root?)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_run_moved_to_a_coarser_timestamp_filesystem_is_slimmed_again_at_every_pass(tmp_path: Path) -> None:
    """The marker records the directory's mtime in ns; copied (`cp -a`, rsync -a) to a filesystem with coarser
    timestamps, the directory can never get that exact value back, so every pass (every rescan of `watch`)
    "finishes a slim cut short" again: a utime, two journal lines and an INFO log line per checkpoint, forever."""
    root = sim_root(tmp_path)
    assert cli("prune", root, *KEEP).exit_code == 0
    with coarse_timestamps_fs(tmp_path) as fs:
        copied = fs / "outputs"
        subprocess.run(["cp", "-a", str(root / "run"), str(copied)], check=True)
        state = tmp_path / "state"
        first = cli("prune", copied, *KEEP, "--state-dir", state)
        second = cli("prune", copied, *KEEP, "--state-dir", state)

        assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
        assert [e for e in journal_at(state) if e["action"] == "slim"] == [], second.output


def journal_at(state: Path) -> list[dict[str, Any]]:
    path = state / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- what counts as weights, and as resume state -----------------------------------------------------------------


def test_an_adapter_with_no_tensors_counts_as_weights_outside_and_global_step_is_slimmed(tmp_path: Path) -> None:
    """weights.split decides "weights exist outside the resume state" by file names only. Under DeepSpeed ZeRO-3
    without gathered weights, the Trainer saves a PEFT model with `state_dict={}` and `remove_dummy_checkpoint`
    removes only model.safetensors/pytorch_model.bin: an adapter_model.safetensors holding no tensor stays
    beside global_step<N>/, which holds the only real weights. The plan makes it weights-only and the slim
    deletes global_step<N>/: the milestone kept "for analysis" has no weights left."""
    root = tmp_path / "outputs"
    dummy = encode_safetensors({}, {"format": "pt"})  # what save_pretrained(state_dict={}) writes
    for i in (1, 2):
        entries = {k.replace("global_step40", f"global_step{i * 10}"): v for k, v in ZERO3.items()}
        entries["latest"] = f"global_step{i * 10}".encode()
        entries["adapter_model.safetensors"] = dummy
        entries["adapter_config.json"] = b'{"peft_type": "LORA"}'
        make_checkpoint(root / "run", i * 10, float(i), entries=entries, weights=False)

    code, data = plan_json(root, *ROOT_RULES)

    assert code == 0
    c10 = next(c for c in data["runs"][0]["checkpoints"] if c["name"] == "checkpoint-10")
    assert c10["decision"] == "keep", [r["text"] for r in c10["reasons"]]  # whole: weights only inside


def test_a_latest_file_that_is_not_deepspeeds_is_removed(tmp_path: Path) -> None:
    """`latest` counts as DeepSpeed's whenever weights exist outside, even with no global_step<N>/ beside it to
    point at: a file of the user's named `latest` is deleted ("unknown files stay")."""
    root = tmp_path / "outputs"
    make_checkpoint(root / "run", 10, 1.0, entries={**HF_RESUME, "latest": b"notes: lr sweep 3\n"})
    make_checkpoint(root / "run", 20, 2.0)

    assert cli("prune", root, *ROOT_RULES).exit_code == 0

    assert (root / "run" / "checkpoint-10" / "latest").read_bytes() == b"notes: lr sweep 3\n"


def test_the_bytes_of_a_slim_count_directory_sizes(tmp_path: Path) -> None:
    """weights.resume_bytes sums st_size over every walked entry, directories included (4096 each on ext4):
    a DeepSpeed slim reports, journals and counts in `bytes_to_free` more than it frees, here more than the
    whole checkpoint holds (bytes_kept goes negative)."""
    root = tmp_path / "outputs"
    checkpoint = make_checkpoint(root / "run", 10, 1.0, entries=DEEPSPEED)
    make_checkpoint(root / "run", 20, 2.0)
    moved = sum(len(v) for k, v in DEEPSPEED.items() if k.split("/")[0] in ("global_step80", "latest"))
    moved += len(DEEPSPEED["rng_state.pth"]) + len(DEEPSPEED["scheduler.pt"])
    assert moved < sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())

    code, data = plan_json(root, *ROOT_RULES)
    assert code == 0
    assert data["summary"]["bytes_to_free"] == moved

    assert cli("prune", root, *ROOT_RULES).exit_code == 0
    [slim] = slims(root)
    assert slim["bytes"] == moved


# --- a weights-only checkpoint as the resume point -----------------------------------------------------------------


def test_a_weights_only_newest_checkpoint_gets_no_warning(tmp_path: Path) -> None:
    """The newer checkpoints are gone (the user deleted them after a loss spike, or a disk cleanup): the newest
    complete one, from which the Trainer's `resume_from_checkpoint=True` resumes, is weights-only. The
    Trainer then silently starts a fresh optimizer; the plan shows only the reason "weights only, cannot be
    made whole again" in the table, with no warning that a resume from it loses the optimizer state."""
    root = sim_root(tmp_path)
    assert cli("prune", root, *KEEP).exit_code == 0
    for name in ("checkpoint-70", "checkpoint-78"):
        shutil.rmtree(root / "run" / name)

    result = cli("plan", root, *KEEP)
    code, data = plan_json(root, *KEEP)

    assert result.exit_code == 0 and code == 0
    warnings = [line for line in result.output.splitlines() if "warning" in line.lower()]
    warnings += [json.dumps(w) for w in data["warnings"]]
    assert any("checkpoint-50" in w and ("resume" in w or "optimizer" in w) for w in warnings), result.output
