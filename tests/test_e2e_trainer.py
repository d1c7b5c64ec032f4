"""End to end: a real Hugging Face Trainer trains while a real `ckptkeeper watch` prunes beside it.

Two real processes: `tests/e2e/train_hf.py` (transformers' Trainer, torch on the CPU, offline) evaluates
and saves every 10 steps for 3 epochs with `load_best_model_at_end=True` (best by eval_loss), while
`python -m ckptkeeper watch OUT --keep best:1,last:2,epoch:all --settle 0.5 --exit-when-done` watches
its output directory. Afterwards the test checks, from the run's own records (its log_history and what a
TrainerCallback saw on disk after every save), never from ckptkeeper's planner:

- the Trainer finished (exit 0, no FileNotFoundError) and really loaded its best checkpoint at the end,
  and the Trainer's current best was on disk at every save;
- the daemon exited 0 by itself once training was over and retention was applied;
- the output directory holds exactly the checkpoints the rules and protections name;
- the journal has a start-delete and a delete line for each removed checkpoint and nothing else;
- no kept checkpoint was touched: same files, sizes and mtimes as right after the Trainer wrote it.

The training stack is part of the test requirements (`pip install '.[test,e2e]'`, which `.ci/run` does):
when it is missing this test fails, it is never skipped.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2eutil import (
    TRAIN_SCRIPT,
    checkpoints_on_disk,
    file_listing,
    json_lines,
    require_training_stack,
    stop,
    tail,
    wait_for,
)

pytestmark = pytest.mark.e2e

KEEP = "best:1,last:2,epoch:all"
SETTLE = 0.5
STEP_SLEEP = 0.05  # 78 optimizer steps -> the run spans ~4 s more, so saves arrive one by one
DAEMON_READY_SECONDS = 30.0
TRAIN_SECONDS = 240.0  # ~15 s here (most of it importing torch and transformers)
DAEMON_DONE_SECONDS = 30.0  # after training: settle, prune, exit


# ---- helpers ---------------------------------------------------------------------------------------


def journal_time(entry: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(entry["time"]).timestamp()


def expected_survivors(
    saved_steps: list[int], log_history: list[dict[str, Any]], trainer_best: int
) -> dict[int, list[str]]:
    """What `best:1,last:2,epoch:all` plus the protections keep, worked out here from the run's own
    log_history: step -> the reasons it is kept."""
    steps = sorted(saved_steps)
    eval_loss: dict[int, float] = {}
    epoch: dict[int, float] = {}
    for entry in log_history:
        if "eval_loss" in entry:
            step = entry["step"]
            assert step not in eval_loss, f"two eval entries at step {step}: {log_history}"
            eval_loss[step] = entry["eval_loss"]
            epoch[step] = entry["epoch"]
    missing = [s for s in steps if s not in eval_loss]
    assert not missing, f"saves without an eval at their step (eval and save steps should coincide): {missing}"
    assert not any(math.isnan(eval_loss[s]) for s in steps), f"NaN eval_loss: {eval_loss}"

    reasons: dict[int, list[str]] = {}

    def keep(step: int, why: str) -> None:
        reasons.setdefault(step, []).append(why)

    for step in steps[-2:]:
        keep(step, "last 2")
    best = min(steps, key=lambda s: (eval_loss[s], s))  # lowest loss; on a tie the lower step
    keep(best, f"best eval_loss={eval_loss[best]:.4f}")
    newest_in_bucket: dict[int, int] = {}
    for step in steps:
        bucket = math.ceil(round(epoch[step], 6))
        newest_in_bucket[bucket] = max(step, newest_in_bucket.get(bucket, step))
    for bucket, step in newest_in_bucket.items():
        keep(step, f"epoch {bucket}")
    keep(steps[-1], "protected: newest")
    keep(trainer_best, "protected: trainer best")
    return reasons


@dataclass(frozen=True)
class RunFiles:
    """Where one test run's two processes write: the output directory and each process's records."""

    out: Path
    summary: Path
    daemon_log: Path
    daemon_stdout: Path
    train_stdout: Path
    train_stderr: Path
    journal: Path

    @classmethod
    def under(cls, tmp_path: Path) -> RunFiles:
        out = tmp_path / "out"
        return cls(
            out=out,
            summary=tmp_path / "summary.json",
            daemon_log=tmp_path / "daemon.log",
            daemon_stdout=tmp_path / "daemon.stdout",
            train_stdout=tmp_path / "train.stdout",
            train_stderr=tmp_path / "train.stderr",
            journal=out / "_ckptkeeper" / "journal.jsonl",
        )

    def context(self) -> str:
        return (
            f"--- daemon log (tail)\n{tail(self.daemon_log)}\n--- trainer stderr (tail)\n{tail(self.train_stderr)}\n"
            f"--- journal\n{tail(self.journal, 60)}\n--- on disk: {sorted(os.listdir(self.out))}"
        )


def start_daemon(files: RunFiles, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    with files.daemon_log.open("wb") as dlog, files.daemon_stdout.open("wb") as dout:
        return subprocess.Popen(
            [sys.executable, "-m", "ckptkeeper", "watch", os.fspath(files.out), "--keep", KEEP, "--settle", str(SETTLE),
             "--exit-when-done", "--log-format", "json"],
            stdout=dout, stderr=dlog, stdin=subprocess.DEVNULL, cwd=cwd, env=env,
        )  # fmt: skip


def start_trainer(files: RunFiles, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    with files.train_stdout.open("wb") as tout, files.train_stderr.open("wb") as terr:
        return subprocess.Popen(
            [sys.executable, os.fspath(TRAIN_SCRIPT), os.fspath(files.out), "--summary", os.fspath(files.summary),
             "--epochs", "3", "--save-steps", "10", "--step-sleep", str(STEP_SLEEP)],
            stdout=tout, stderr=terr, stdin=subprocess.DEVNULL, cwd=cwd, env=env,
        )  # fmt: skip


def train_beside_the_daemon(
    files: RunFiles, env: dict[str, str], cwd: Path
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], float]:
    """Start the daemon, train once it watches, and wait until both have exited: (the daemon, the trainer,
    how long training took)."""
    daemon = start_daemon(files, env, cwd)
    trainer: subprocess.Popen[bytes] | None = None
    try:

        def daemon_ready() -> bool:
            assert daemon.poll() is None, f"the daemon exited early ({daemon.returncode})\n{files.context()}"
            return any(str(e.get("message", "")).startswith("watching ") for e in json_lines(files.daemon_log))

        wait_for(daemon_ready, DAEMON_READY_SECONDS, "the daemon did not start watching", files.context)

        started = time.monotonic()
        trainer = start_trainer(files, env, cwd)
        running_trainer = trainer
        wait_for(lambda: running_trainer.poll() is not None, TRAIN_SECONDS, "training did not finish", files.context)
        train_seconds = time.monotonic() - started
        wait_for(
            lambda: daemon.poll() is not None,
            DAEMON_DONE_SECONDS,
            "`ckptkeeper watch --exit-when-done` did not exit after training finished",
            files.context,
        )
        return daemon, running_trainer, train_seconds
    finally:
        if trainer is not None:
            stop(trainer)
        stop(daemon)


def check_trainer_loaded_its_best(
    files: RunFiles, trainer: subprocess.Popen[bytes], train_seconds: float
) -> dict[str, Any]:
    """The Trainer finished and loaded its best model, which was never taken away from it; its summary."""
    context, out = files.context, files.out
    stderr_text = files.train_stderr.read_text(encoding="utf-8", errors="replace")
    assert trainer.returncode == 0, f"the training script failed ({trainer.returncode})\n{context()}"
    assert "FileNotFoundError" not in stderr_text, context()
    summary: dict[str, Any] = json.loads(files.summary.read_text(encoding="utf-8"))
    assert summary["ok"] and summary["error"] is None, summary["error"]
    assert train_seconds < 120, f"training took {train_seconds:.0f} s; it should take well under a minute"
    load_best = summary["load_best"]
    assert summary["best_model_loaded"], f"the Trainer did not load its best model at the end: {load_best}"
    assert load_best["called"] and load_best["best_dir_existed"] and load_best["weights_existed"], load_best
    assert not load_best["not_found_warning"], summary["warnings"]
    assert load_best["weights_equal_best"], load_best["weights_detail"]
    best_step = summary["best_global_step"]
    assert isinstance(best_step, int), summary
    best_dir = Path(summary["best_model_checkpoint"])
    assert best_dir == out / f"checkpoint-{best_step}", (best_dir, best_step)
    assert (best_dir / "model.safetensors").is_file(), f"the Trainer's best {best_dir} is gone\n{context()}"

    saves = summary["saves"]
    assert saves, "the training script recorded no saves"
    for record in saves:
        # The Trainer's best at each save was on disk then (it only records a best that exists).
        current_best = record["best_global_step"]
        assert f"checkpoint-{current_best}" in record["checkpoints_on_disk"], record
        assert record["best_model_checkpoint"] == os.fspath(out / f"checkpoint-{current_best}"), record
    return summary


def check_daemon_exited_by_itself(files: RunFiles, daemon: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
    """The daemon exited 0 once training was over, with no error logged; its log entries."""
    daemon_entries = json_lines(files.daemon_log)
    assert daemon.returncode == 0, f"the daemon exited {daemon.returncode}\n{files.context()}"
    assert any("exiting (--exit-when-done)" in str(e.get("message")) for e in daemon_entries), files.context()
    errors = [e for e in daemon_entries if e.get("level") == "error" or "unparsed" in e]
    assert not errors, f"the daemon logged errors: {errors}"
    return daemon_entries


def check_survivors(files: RunFiles, summary: dict[str, Any]) -> tuple[dict[int, list[str]], list[int]]:
    """Exactly the checkpoints the rules and protections name are left: (step -> why it is kept, the steps
    removed)."""
    saves, best_step = summary["saves"], summary["best_global_step"]
    saved_steps = [record["global_step"] for record in saves]
    assert len(set(saved_steps)) == len(saved_steps), saved_steps
    for record in saves:  # the epoch each save saw is the one its eval logged
        (entry,) = [e for e in summary["log_history"] if "eval_loss" in e and e["step"] == record["global_step"]]
        assert entry["epoch"] == record["epoch"], (entry, record)
    survivors = expected_survivors(saved_steps, summary["log_history"], best_step)
    kept_only_as_best = {"best eval_loss", "protected: trainer best"} >= {r.split("=")[0] for r in survivors[best_step]}
    assert kept_only_as_best, (
        f"the Trainer's best (step {best_step}) is also kept for {survivors[best_step]}: this run no longer shows "
        "that the best survives only thanks to the best rule and the trainer-best protection; adjust the "
        "training settings (learning rate, noise, seed) so that the best is an older, mid-epoch checkpoint"
    )
    removed = sorted(set(saved_steps) - set(survivors))
    assert removed, f"nothing was due for removal: {survivors}"
    on_disk = checkpoints_on_disk(files.out)
    assert on_disk == set(survivors), (
        f"on disk {sorted(on_disk)}, expected {sorted(survivors)} "
        f"({ {s: survivors[s] for s in sorted(survivors)} }); saved {saved_steps}\n{files.context()}"
    )
    trash = files.out / "_ckptkeeper" / "trash"
    assert not trash.exists() or not os.listdir(trash), f"the trash still holds {os.listdir(trash)}"
    return survivors, removed


def check_journal(
    files: RunFiles, removed: list[int], saves: list[dict[str, Any]], daemon_entries: list[dict[str, Any]]
) -> None:
    """The journal records each removal, and nothing else; some while the Trainer was still saving."""
    entries = json_lines(files.journal)
    assert {e.get("action") for e in entries} <= {"start-delete", "delete"}, entries
    for step in removed:
        name = f"checkpoint-{step}"
        actions = [e["action"] for e in entries if e.get("checkpoint") == name]
        assert actions == ["start-delete", "delete"], f"{name}: journal actions {actions}\n{entries}"
    touched = {e.get("checkpoint") for e in entries}
    assert touched == {f"checkpoint-{s}" for s in removed}, f"journal names {touched}, removed {removed}"
    deleted_while_training = [e for e in entries if e["action"] == "delete" and journal_time(e) < saves[-1]["t"]]
    assert deleted_while_training, (
        f"no checkpoint was removed while the Trainer was still saving (last save at {saves[-1]['t']}): "
        f"the daemon did not act live\n{entries}"
    )
    # --log-format json: each deletion is a line with its structured fields, and its message says what it freed
    deletions = {e.get("checkpoint"): e for e in daemon_entries if e.get("action") == "delete"}
    for step in removed:
        entry = deletions.get(f"checkpoint-{step}")
        assert entry is not None, daemon_entries
        assert f"/checkpoint-{step} deleted: freed " in str(entry["message"]), entry
        assert entry["step"] == step and entry["bytes"] > 0 and entry["reasons"], entry


def check_kept_untouched(out: Path, survivors: dict[int, list[str]], saves: list[dict[str, Any]]) -> None:
    """No kept checkpoint was touched since the Trainer wrote it."""
    by_step = {record["global_step"]: record for record in saves}
    for step in sorted(survivors):
        checkpoint = out / f"checkpoint-{step}"
        assert file_listing(checkpoint) == by_step[step]["files"], f"{checkpoint.name} changed after it was saved"
        assert checkpoint.stat().st_mtime_ns == by_step[step]["dir_mtime_ns"], f"{checkpoint.name}: mtime changed"


# ---- the test --------------------------------------------------------------------------------------
def test_watch_prunes_a_real_trainer_run_that_loads_its_best_model(tmp_path: Path) -> None:
    require_training_stack()
    files = RunFiles.under(tmp_path)
    files.out.mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": os.fspath(tmp_path / "hf-home"),
        "PYTHONUNBUFFERED": "1",
    }
    daemon, trainer, train_seconds = train_beside_the_daemon(files, env, tmp_path)
    summary = check_trainer_loaded_its_best(files, trainer, train_seconds)
    daemon_entries = check_daemon_exited_by_itself(files, daemon)
    survivors, removed = check_survivors(files, summary)
    check_journal(files, removed, summary["saves"], daemon_entries)
    check_kept_untouched(files.out, survivors, summary["saves"])
