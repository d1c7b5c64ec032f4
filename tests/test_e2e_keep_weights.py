"""End to end: `--keep-weights` beside a real Hugging Face Trainer, then resuming from what is left (#13).

Session 1: `tests/e2e/train_hf.py`'s run (transformers' Trainer, torch on the CPU, offline; 3 epochs of 26 steps,
evaluate and save every 10 steps, `load_best_model_at_end=True` by eval_loss) trains while a real
`python -m ckptkeeper watch OUT --keep last:2 --keep-weights epoch:all --settle 0.5 --exit-when-done` works beside
it. Session 2: a second Trainer process resumes with `resume_from_checkpoint=True` for a 4th epoch, beside a second
daemon (stopped with SIGTERM once it has applied retention: the run is already "finished" when it starts).

This file is also the training and loading script those processes run (`python tests/test_e2e_keep_weights.py
train|outputs ...`): it reuses train_hf.py's run unchanged and adds, through a Trainer subclass, a callback that
at every save (in the trainer process, right after the Trainer wrote the checkpoint, so before ckptkeeper can act
on it; the newest checkpoint is protected anyway) records the model's logits on a fixed input, the identity and
hash of model.safetensors and the sizes of the resume state, and what the resume really loaded.

Checked from those records, never from ckptkeeper's planner:
- both trainings finish and load their best model at the end; the daemons log no warning or error;
- on disk exactly: whole = the last 2, the newest and the Trainer's best; weights-only = the newest of each epoch
  otherwise; every other checkpoint removed. Whole ones are untouched (files, sizes, mtimes). Each weights-only one
  has the marker (naming what went, and the directory's times), no optimizer/scheduler/RNG state, every other
  file untouched, model.safetensors the same inode and bytes, and the directory mtime of right after its save;
- every weights-only checkpoint loads with `AutoModelForSequenceClassification.from_pretrained` (no missing or
  unexpected keys) and gives bit-identical logits to the model's at its save; a copy with one tensor altered
  does not (the comparison can fail);
- the resumed Trainer picked the newest checkpoint, which was whole, and really loaded its optimizer state (equal
  to its optimizer.pt, not a fresh optimizer) and continued from its global step;
- the journal holds start-slim/slim for each slimmed checkpoint (exact bytes = the resume state recorded at the
  save) and start-delete/delete for each removal; the daemon logged "made weights only: ... freed X" lines that
  match those bytes; a slim already done is not redone by the second daemon; `plan --json` afterwards has
  nothing left to free.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2eutil import checkpoints_on_disk, file_listing, json_lines, require_training_stack, stop, tail, wait_for

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve()
KEEP = "last:2"
KEEP_WEIGHTS = "epoch:all"
SETTLE = 0.5
STEP_SLEEP = 0.05  # 78 steps -> ~4 s more, so saves arrive one by one and slims happen while training
EPOCHS = 3
RESUMED_EPOCHS = 4
MARKER = "_ckptkeeper-weights-only.json"
# The resume state as the issue names it (for a single-process CPU run: optimizer.pt, scheduler.pt, rng_state.pth).
RESUME_STATE = re.compile(r"optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth")
PROBE_ROWS, PROBE_SEED = 8, 3  # the fixed input the logits are computed on
DAEMON_READY_SECONDS = 30.0
TRAIN_SECONDS = 240.0
DAEMON_DONE_SECONDS = 30.0


# ==== the script side: runs in the training and loading subprocesses (torch is imported only there) ===============


def _probe_batch() -> dict[str, Any]:
    import torch
    from e2e.train_hf import SyntheticRows

    rows = SyntheticRows(PROBE_ROWS, seed=PROBE_SEED, noise=0.0).rows
    return {key: torch.stack([r[key] for r in rows]) for key in ("input_ids", "attention_mask")}


def _logits(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The model's logits on `batch` in eval mode: their exact bytes (hex) and values."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(**batch).logits.detach().cpu().contiguous()
    finally:
        model.train(was_training)
    return {"hex": logits.numpy().tobytes().hex(), "values": logits.tolist()}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _states_equal(saved: dict[Any, Any], now: dict[Any, Any]) -> bool:
    import torch

    if set(saved) != set(now):
        return False
    for key, entry in saved.items():
        if set(entry) != set(now[key]):
            return False
        for name, value in entry.items():
            other = now[key][name]
            same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
            if not same:
                return False
    return True


def _script_train(argv: list[str]) -> int:
    """`train OUTPUT_DIR --records R.jsonl [--resume] TRAIN_HF_ARGS...`: train_hf.py's run, plus this test's
    records (appended to R.jsonl) and, with --resume, `resume_from_checkpoint=True`."""
    import torch
    from e2e import train_hf

    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--records", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    opts, rest = parser.parse_known_args(argv)
    run_dir: Path = opts.output_dir
    records: Path = opts.records
    resume: bool = opts.resume
    probe = _probe_batch()

    class RecordAtSave(train_hf.TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            checkpoint = run_dir / f"checkpoint-{state.global_step}"
            weights = checkpoint / "model.safetensors"
            _append(
                records,
                {
                    "event": "save",
                    "global_step": state.global_step,
                    "logits": _logits(model, probe),
                    "weights_inode": weights.stat().st_ino,
                    "weights_sha256": sha256_of(weights),
                    "resume_state": {
                        e.name: e.stat().st_size for e in checkpoint.iterdir() if RESUME_STATE.fullmatch(e.name)
                    },
                },
            )

    class KeepWeightsTrainer(train_hf.ObservedTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.add_callback(RecordAtSave())

        def train(self, *args: Any, **kwargs: Any) -> Any:
            return super().train(resume_from_checkpoint=True if resume else None)

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            entries = sorted(os.listdir(checkpoint)) if checkpoint else None
            super()._load_optimizer_and_scheduler(checkpoint)
            if checkpoint is None:
                return
            optimizer_file = Path(checkpoint) / "optimizer.pt"
            now = self.optimizer.state_dict()["state"]
            saved = torch.load(optimizer_file, weights_only=True)["state"] if optimizer_file.exists() else None
            _append(
                records,
                {
                    "event": "resume",
                    "checkpoint": checkpoint,
                    "entries": entries,
                    "global_step": self.state.global_step,
                    "optimizer_state_entries": len(now),
                    "optimizer_state_equals_file": saved is not None and _states_equal(saved, now),
                },
            )

    train_hf.ObservedTrainer = KeepWeightsTrainer  # train_hf.train() builds its Trainer through this name
    return int(train_hf.main([os.fspath(run_dir), *rest]))


def _script_outputs(argv: list[str]) -> int:
    """`outputs RESULT.json CHECKPOINT...`: load each with from_pretrained; its logits and loading info."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(1)  # as train_hf.py does
    probe = _probe_batch()
    result: dict[str, Any] = {}
    for checkpoint in argv[1:]:
        model, info = AutoModelForSequenceClassification.from_pretrained(checkpoint, output_loading_info=True)
        result[checkpoint] = {
            "class": type(model).__name__,
            "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
            "logits": _logits(model, probe),
        }
    Path(argv[0]).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


# ==== the test side ================================================================================================


@dataclass(frozen=True)
class Layout:
    """What the rules and protections leave, worked out from the run's own records: step -> why."""

    whole: dict[int, list[str]]
    weights_only: dict[int, str]
    removed: list[int]


def expected_layout(saved_steps: list[int], log_history: list[dict[str, Any]], trainer_best: int) -> Layout:
    """`--keep last:2 --keep-weights epoch:all` plus the protections (newest, Trainer's best)."""
    steps = sorted(saved_steps)
    epoch = {e["step"]: e["epoch"] for e in log_history if "eval_loss" in e}
    missing = [s for s in steps if s not in epoch]
    assert not missing, f"saves without an eval at their step: {missing}"
    whole: dict[int, list[str]] = {}
    for step in steps[-2:]:
        whole.setdefault(step, []).append("last 2")
    whole.setdefault(steps[-1], []).append("protected: newest")
    whole.setdefault(trainer_best, []).append("protected: trainer best")
    newest_in_bucket: dict[int, int] = {}
    for step in steps:
        bucket = math.ceil(round(epoch[step], 6))
        newest_in_bucket[bucket] = max(step, newest_in_bucket.get(bucket, step))
    weights_only = {s: f"epoch {b}" for b, s in newest_in_bucket.items() if s not in whole}
    removed = [s for s in steps if s not in whole and s not in weights_only]
    return Layout(whole, weights_only, removed)


def human(n: int) -> str:
    """Bytes as the daemon's log writes them (decimal units, one decimal)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def from_human(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]


@dataclass(frozen=True)
class Files:
    tmp: Path
    out: Path
    records: Path  # the script's own records (both sessions)
    journal: Path

    @classmethod
    def under(cls, tmp_path: Path) -> Files:
        out = tmp_path / "out"
        return cls(tmp_path, out, tmp_path / "records.jsonl", out / "_ckptkeeper" / "journal.jsonl")

    def log(self, name: str) -> Path:
        return self.tmp / name

    def context(self, session: int) -> str:
        return (
            f"--- daemon log (tail)\n{tail(self.log(f'daemon{session}.log'))}\n"
            f"--- trainer stderr (tail)\n{tail(self.log(f'train{session}.stderr'))}\n"
            f"--- journal\n{tail(self.journal, 60)}\n--- on disk: {sorted(os.listdir(self.out))}"
        )


def start_daemon(files: Files, session: int, env: dict[str, str], exit_when_done: bool) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "ckptkeeper", "watch", os.fspath(files.out), "--keep", KEEP,
            "--keep-weights", KEEP_WEIGHTS, "--settle", str(SETTLE), "--log-format", "json"]  # fmt: skip
    if exit_when_done:
        argv.append("--exit-when-done")
    with files.log(f"daemon{session}.log").open("wb") as err, files.log(f"daemon{session}.stdout").open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=files.tmp, env=env)


def start_trainer(files: Files, session: int, env: dict[str, str], extra: list[str]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, os.fspath(HERE), "train", os.fspath(files.out), "--records", os.fspath(files.records),
            *extra, "--summary", os.fspath(files.log(f"summary{session}.json")),
            "--save-steps", "10", "--step-sleep", str(STEP_SLEEP)]  # fmt: skip
    with files.log(f"train{session}.stdout").open("wb") as out, files.log(f"train{session}.stderr").open("wb") as err:
        return subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=files.tmp, env=env)


def wait_until_watching(files: Files, session: int, daemon: subprocess.Popen[bytes]) -> None:
    log = files.log(f"daemon{session}.log")

    def ready() -> bool:
        assert daemon.poll() is None, f"the daemon exited early ({daemon.returncode})\n{files.context(session)}"
        return any(str(e.get("message", "")).startswith("watching ") for e in json_lines(log))

    wait_for(ready, DAEMON_READY_SECONDS, "the daemon did not start watching", lambda: files.context(session))


def read_records(files: Files) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """The script's records: save records by step, and the resume records."""
    entries = json_lines(files.records)
    saves = {e["global_step"]: e for e in entries if e.get("event") == "save"}
    return saves, [e for e in entries if e.get("event") == "resume"]


def check_training(files: Files, session: int, trainer: subprocess.Popen[bytes]) -> dict[str, Any]:
    """The training finished and loaded its best model at the end; its summary."""
    context = files.context(session)
    assert trainer.returncode == 0, f"training session {session} failed ({trainer.returncode})\n{context}"
    stderr_text = files.log(f"train{session}.stderr").read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in stderr_text, context
    summary: dict[str, Any] = json.loads(files.log(f"summary{session}.json").read_text(encoding="utf-8"))
    assert summary["ok"] and summary["error"] is None, summary["error"]
    load_best = summary["load_best"]
    assert summary["best_model_loaded"], f"load_best_model_at_end did not load the best: {load_best}"
    assert not load_best["not_found_warning"] and load_best["weights_equal_best"], load_best
    assert Path(summary["best_model_checkpoint"]) == files.out / f"checkpoint-{summary['best_global_step']}"
    return summary


def check_daemon_log(files: Files, session: int) -> list[str]:
    """No warning or error in the daemon's log; its messages."""
    entries = json_lines(files.log(f"daemon{session}.log"))
    bad = [e for e in entries if e.get("level") in {"warning", "error", "critical"} or "unparsed" in e]
    assert not bad, f"daemon {session} logged: {bad}"
    return [str(e.get("message")) for e in entries]


def check_layout(files: Files, layout: Layout, saves: dict[int, dict[str, Any]], records: dict[int, Any]) -> None:
    """Exactly the expected checkpoints are on disk, whole ones untouched, weights-only ones slimmed right."""
    out = files.out
    on_disk = checkpoints_on_disk(out)
    expected = set(layout.whole) | set(layout.weights_only)
    assert on_disk == expected, f"on disk {sorted(on_disk)}, expected {sorted(expected)} ({layout})"
    for step in layout.whole:
        checkpoint = out / f"checkpoint-{step}"
        assert file_listing(checkpoint) == saves[step]["files"], f"{checkpoint.name} (whole) changed after its save"
        assert checkpoint.stat().st_mtime_ns == saves[step]["dir_mtime_ns"], f"{checkpoint.name}: mtime changed"
    for step in layout.weights_only:
        check_weights_only(out / f"checkpoint-{step}", saves[step], records[step])
    trash = out / "_ckptkeeper" / "trash"
    assert not trash.exists() or not os.listdir(trash), f"the trash still holds {os.listdir(trash)}"
    strays = [e for e in os.listdir(out) if not re.fullmatch(r"checkpoint-\d+|_ckptkeeper|_ckptkeeper\.lock", e)]
    assert not strays, f"stray entries in the run: {strays}"


def check_weights_only(checkpoint: Path, save: dict[str, Any], record: dict[str, Any]) -> None:
    name = checkpoint.name
    resume_state = record["resume_state"]
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= set(resume_state), (name, resume_state)
    marker_path = checkpoint / MARKER
    assert marker_path.is_file(), f"{name} is weights-only but has no {MARKER}: {sorted(os.listdir(checkpoint))}"
    marker = json.loads(marker_path.read_text(encoding="utf-8"))
    assert marker["weights_only"] is True, marker
    assert sorted(marker["resume_state_removed"]) == sorted(resume_state), (name, marker, resume_state)
    assert marker["directory_times_ns"][1] == save["dir_mtime_ns"], (name, marker)
    left = [e for e in os.listdir(checkpoint) if RESUME_STATE.fullmatch(e)]
    assert not left, f"{name}: resume state left in a weights-only checkpoint: {left}"
    listing = file_listing(checkpoint)
    assert listing.pop(MARKER)[0] == marker_path.stat().st_size
    kept_files = {k: v for k, v in save["files"].items() if k not in resume_state}
    assert listing == kept_files, f"{name}: the files to keep changed: {listing} != {kept_files}"
    assert checkpoint.stat().st_mtime_ns == save["dir_mtime_ns"], f"{name}: directory mtime changed by the slim"
    weights = checkpoint / "model.safetensors"
    assert weights.stat().st_ino == record["weights_inode"], f"{name}: model.safetensors is another file now"
    assert sha256_of(weights) == record["weights_sha256"], f"{name}: model.safetensors' bytes changed"


def check_journal(
    entries: list[dict[str, Any]], layout: Layout, slimmed: list[int], removed: list[int], records: dict[int, Any]
) -> None:
    """This session's journal lines: start/outcome pairs for exactly the slims and removals expected."""
    assert {e.get("action") for e in entries} <= {"start-delete", "delete", "start-slim", "slim"}, entries
    by_checkpoint: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        by_checkpoint.setdefault(e["checkpoint"], []).append(e)
    expected = {f"checkpoint-{s}" for s in [*slimmed, *removed]}
    assert set(by_checkpoint) == expected, f"journal names {sorted(by_checkpoint)}, expected {sorted(expected)}"
    for step in removed:
        actions = [e["action"] for e in by_checkpoint[f"checkpoint-{step}"]]
        assert actions == ["start-delete", "delete"], (step, actions)
    for step in slimmed:
        assert step in layout.weights_only, step
        lines = by_checkpoint[f"checkpoint-{step}"]
        assert [e["action"] for e in lines] == ["start-slim", "slim"], (step, lines)
        resume_state = records[step]["resume_state"]
        assert lines[1]["bytes"] == sum(resume_state.values()), (step, lines[1], resume_state)
        assert lines[1]["detail"] == f"removed {', '.join(sorted(resume_state))}", (step, lines[1])


def check_freed_reported(messages: list[str], slimmed: list[int], layout: Layout, records: dict[int, Any]) -> None:
    """The daemon said, for each slim, what it removed and how much that freed; the sum is the resume state's."""
    freed = {}
    for step in slimmed:
        resume_state = records[step]["resume_state"]
        head = f"/checkpoint-{step} made weights only: "  # after the run's name (the output_dir's)
        said = [m.split("/", 1)[1] for m in messages if head in m and "/" in m]
        expected = f"{head[1:]}removed {', '.join(sorted(resume_state))}, freed {human(sum(resume_state.values()))} ("
        assert len(said) == 1 and said[0].startswith(expected), f"{said} != [{expected!r}...]"
        freed[step] = from_human(said[0].rsplit("freed ", 1)[1].split(" (", 1)[0])
        assert layout.weights_only[step] in said[0], (step, said)  # why: the rule that keeps its weights
    recorded = sum(sum(records[s]["resume_state"].values()) for s in slimmed)
    assert math.isclose(sum(freed.values()), recorded, abs_tol=50 * len(slimmed)), (freed, recorded)


def check_resumed(files: Files, resume: list[dict[str, Any]], first: dict[str, Any], second: dict[str, Any]) -> None:
    """The second Trainer resumed from the newest checkpoint, whole, with its optimizer state and global step."""
    newest = first["global_step"]
    assert len(resume) == 1, resume
    (record,) = resume
    assert Path(record["checkpoint"]) == files.out / f"checkpoint-{newest}", record
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= set(record["entries"]), record
    assert MARKER not in record["entries"], record
    assert record["global_step"] == newest, record
    assert record["optimizer_state_entries"] > 0, f"the resumed Trainer started a fresh optimizer: {record}"
    assert record["optimizer_state_equals_file"], f"the optimizer state is not the checkpoint's: {record}"
    new_steps = [s["global_step"] for s in second["saves"]]
    assert new_steps and min(new_steps) == (newest // 10 + 1) * 10, f"the resumed run's saves: {new_steps}"
    assert second["global_step"] == RESUMED_EPOCHS * newest // EPOCHS, second["global_step"]
    before = [e for e in second["log_history"] if e["step"] <= newest]
    saved_history = [e for e in first["log_history"] if "train_runtime" not in e]  # logged after the last save
    assert before == saved_history, "the resumed run's history does not continue the first one"


def check_outputs(files: Files, env: dict[str, str], steps: list[int], records: dict[int, Any]) -> None:
    """Every weights-only checkpoint loads with from_pretrained and gives the logits of its save; an altered copy
    does not."""
    tampered = files.tmp / "tampered"
    shutil.copytree(files.out / f"checkpoint-{steps[0]}", tampered)
    alter_one_tensor(tampered / "model.safetensors")
    result_path = files.tmp / "outputs.json"
    checkpoints = [os.fspath(files.out / f"checkpoint-{s}") for s in steps]
    proc = subprocess.run(
        [sys.executable, os.fspath(HERE), "outputs", os.fspath(result_path), *checkpoints, os.fspath(tampered)],
        capture_output=True, text=True, cwd=files.tmp, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(result_path.read_text(encoding="utf-8"))
    for step, path in zip(steps, checkpoints, strict=True):
        loaded = result[path]
        assert loaded["class"] == "BertForSequenceClassification", loaded
        assert not any(loaded["loading_info"].values()), f"checkpoint-{step}: {loaded['loading_info']}"
        assert same_outputs(loaded["logits"], records[step]["logits"]), (
            f"checkpoint-{step} loaded gives other logits than the model at its save: "
            f"{loaded['logits']['values']} != {records[step]['logits']['values']}"
        )
    assert not same_outputs(result[os.fspath(tampered)]["logits"], records[steps[0]]["logits"]), (
        "an altered copy gave the same logits: the comparison cannot fail"
    )


def same_outputs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(a["hex"] == b["hex"])


def alter_one_tensor(path: Path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(os.fspath(path), framework="numpy") as f:
        metadata = f.metadata()
    tensors = load_file(os.fspath(path))
    name = next(k for k in sorted(tensors) if k.startswith("classifier."))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, os.fspath(path), metadata=metadata)


def check_plan_has_nothing_left(files: Files, env: dict[str, str], layout: Layout) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ckptkeeper", "plan", os.fspath(files.out), "--keep", KEEP,
         "--keep-weights", KEEP_WEIGHTS, "--json"],
        capture_output=True, text=True, cwd=files.tmp, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["summary"]["bytes_to_free"] == 0, plan["summary"]
    decisions = {c["step"]: c["decision"] for run in plan["runs"] for c in run["checkpoints"]}
    assert decisions == {**dict.fromkeys(layout.whole, "keep"), **dict.fromkeys(layout.weights_only, "weights-only")}


def journal_time(entry: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(entry["time"]).timestamp()


# ---- the two sessions -------------------------------------------------------------------------------------------


def run_first_session(files: Files, env: dict[str, str]) -> tuple[dict[str, Any], subprocess.Popen[bytes]]:
    """Train 3 epochs beside `watch --exit-when-done`; both must end by themselves."""
    daemon = start_daemon(files, 1, env, exit_when_done=True)
    trainer: subprocess.Popen[bytes] | None = None
    try:
        wait_until_watching(files, 1, daemon)
        trainer = start_trainer(files, 1, env, ["--epochs", str(EPOCHS)])
        running = trainer
        wait_for(lambda: running.poll() is not None, TRAIN_SECONDS, "training did not finish", lambda: files.context(1))
        wait_for(lambda: daemon.poll() is not None, DAEMON_DONE_SECONDS, "`watch --exit-when-done` did not exit",
                 lambda: files.context(1))  # fmt: skip
    finally:
        if trainer is not None:
            stop(trainer)
        stop(daemon)
    assert daemon.returncode == 0, f"the daemon exited {daemon.returncode}\n{files.context(1)}"
    return check_training(files, 1, trainer), trainer


def run_second_session(files: Files, env: dict[str, str]) -> dict[str, Any]:
    """Resume for a 4th epoch beside a new daemon, stopped (SIGTERM) once the expected layout is reached."""
    daemon = start_daemon(files, 2, env, exit_when_done=False)
    trainer: subprocess.Popen[bytes] | None = None
    try:
        wait_until_watching(files, 2, daemon)
        trainer = start_trainer(files, 2, env, ["--resume", "--epochs", str(RESUMED_EPOCHS)])
        running = trainer
        wait_for(lambda: running.poll() is not None, TRAIN_SECONDS, "training did not finish", lambda: files.context(2))
        summary = check_training(files, 2, trainer)
        saves, _ = read_records(files)
        final = expected_layout(list(saves), summary["log_history"], summary["best_global_step"])
        wanted = set(final.whole) | set(final.weights_only)

        def applied() -> bool:
            trash = files.out / "_ckptkeeper" / "trash"
            slimmed = all(
                (files.out / f"checkpoint-{s}" / MARKER).exists()
                and not any(RESUME_STATE.fullmatch(e) for e in os.listdir(files.out / f"checkpoint-{s}"))
                for s in final.weights_only
            )
            on_disk = checkpoints_on_disk(files.out)
            return on_disk == wanted and slimmed and (not trash.exists() or not os.listdir(trash))

        wait_for(applied, DAEMON_DONE_SECONDS, "the second daemon did not apply retention", lambda: files.context(2))
        time.sleep(2 * SETTLE)  # let it finish its pass (the slims leave no checkpoint behind to wait for)
        daemon.terminate()
        daemon.wait(timeout=30)
    finally:
        if trainer is not None:
            stop(trainer)
        stop(daemon)
    assert daemon.returncode == 0, f"the second daemon exited {daemon.returncode} on SIGTERM\n{files.context(2)}"
    return summary


# ---- the test ---------------------------------------------------------------------------------------------------
def test_keep_weights_beside_a_real_trainer_then_resume(tmp_path: Path) -> None:
    require_training_stack()
    started = time.monotonic()
    files = Files.under(tmp_path)
    files.out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HOME": os.fspath(tmp_path / "hf-home"), "PYTHONUNBUFFERED": "1"}  # fmt: skip

    # Session 1: 3 epochs beside `watch --keep last:2 --keep-weights epoch:all --exit-when-done`.
    first, _ = run_first_session(files, env)
    saves = {s["global_step"]: s for s in first["saves"]}
    records, _ = read_records(files)
    assert set(records) == set(saves), (sorted(records), sorted(saves))
    layout = expected_layout(list(saves), first["log_history"], first["best_global_step"])
    assert len(layout.weights_only) >= 2 and layout.removed, layout
    check_layout(files, layout, saves, records)
    journal1 = json_lines(files.journal)
    check_journal(journal1, layout, sorted(layout.weights_only), layout.removed, records)
    messages = check_daemon_log(files, 1)
    check_freed_reported(messages, sorted(layout.weights_only), layout, records)
    assert any("exiting (--exit-when-done)" in m for m in messages), messages
    last_save = max(s["t"] for s in first["saves"])
    assert any(e["action"] == "slim" and journal_time(e) < last_save for e in journal1), (
        f"no checkpoint was slimmed while the Trainer was still saving\n{journal1}"
    )

    # Session 2: resume (resume_from_checkpoint=True) for a 4th epoch beside a new daemon.
    second = run_second_session(files, env)
    saves |= {s["global_step"]: s for s in second["saves"]}
    records, resume = read_records(files)
    check_resumed(files, resume, first, second)
    final = expected_layout(list(saves), second["log_history"], second["best_global_step"])
    check_layout(files, final, saves, records)
    journal2 = json_lines(files.journal)[len(journal1) :]
    newly_slimmed = sorted(set(final.weights_only) - set(layout.weights_only))
    newly_removed = sorted(set(saves) - set(final.whole) - set(final.weights_only) - set(layout.removed))
    assert newly_slimmed, final  # the first run's last checkpoint, now an epoch milestone only
    check_journal(journal2, final, newly_slimmed, newly_removed, records)
    check_freed_reported(check_daemon_log(files, 2), newly_slimmed, final, records)

    # Every weights-only checkpoint loads and gives the outputs it gave when it was saved.
    check_outputs(files, env, sorted(final.weights_only), records)
    check_plan_has_nothing_left(files, env, final)
    elapsed = time.monotonic() - started
    assert elapsed < 120, f"the test took {elapsed:.0f} s; it should take well under a minute"


if __name__ == "__main__":
    sys.exit({"train": _script_train, "outputs": _script_outputs}[sys.argv[1]](sys.argv[2:]))
