"""Benchmark how long the training loop is blocked by checkpoint retention: the Hugging Face Trainer's own
rotation (`save_total_limit`) against ckptkeeper, which deletes in another process.

    python -m benchmarks.bench_trainer_block [--quick] [--only rotation|loop] [--step-seconds S] [--workdir DIR]
                                             [--json FILE]

Everything runs the real training stack (transformers' Trainer, torch on the CPU, offline) on a tiny BERT
built from a config. Nothing is asserted; the script prints markdown tables.

1. The Trainer's rotation. In transformers 5.x the Trainer rotates at the end of `Trainer._save_checkpoint`
   by calling `transformers.trainer_utils.rotate_checkpoints(run_dir, save_total_limit, best, use_mtime=True)`
   (there is no `Trainer._rotate_checkpoints` any more), which `shutil.rmtree`s the old checkpoint. A real
   Trainer (save_total_limit=2) saves checkpoint-10 and checkpoint-20 for real; checkpoint-10's
   `optimizer.pt` is then replaced by a 5 GiB file (--quick: 256 MiB) and the directories get mtimes a
   minute apart, as in a real run. After os.sync(), `Trainer._save_checkpoint` saves checkpoint-30 and
   rotates checkpoint-10 out. The clock runs around the real `rotate_checkpoints` call (a timing wrapper
   around the module global that `_save_checkpoint` calls) and around the whole `_save_checkpoint`. Fresh
   files every repetition. The big file is made two ways: `fallocate` (posix_fallocate: real blocks, but
   ext4 keeps them as unwritten extents and no page holds data) and `written` (the bytes really written
   and fsynced, as torch.save's output is once the kernel has flushed it). Candidate: ckptkeeper's user
   sets save_total_limit=None, so the Trainer deletes nothing; its `rotate_checkpoints` call returns at
   once. Part 2 measures that for real.
2. A real training loop. `Trainer.train()` runs 50 steps (--quick: 30) and saves every 10; each saved
   `optimizer.pt` is padded to 1 GiB (--quick: 32 MiB) of written, fsynced bytes by a wrapper around
   `Trainer._save_optimizer_and_scheduler` (the file is not loadable afterwards; nothing resumes here).
   The tiny model's steps take milliseconds, so a callback sleeps --step-seconds (0.1; quick 0.03) after each
   step as a stand-in for the GPU's compute: the process is busy but neither the CPU nor the disk is.
   With --step-seconds 0 the loop is nothing but back-to-back saves.
   Three setups, interleaved per repetition:
   - `Trainer rotates`: save_total_limit=2, nothing beside it (the baseline);
   - `no deletion`: save_total_limit=None, nothing beside it (the disk fills up; the train() baseline);
   - `ckptkeeper`: save_total_limit=None while `python -m ckptkeeper watch RUN --keep last:2 --settle S`
     runs as a separate process and deletes the old checkpoints while training goes on.
   Inside the training process the script counts and times every `shutil.rmtree` call (the Trainer's
   only way of deleting a checkpoint), every `rotate_checkpoints` call and every `_save_checkpoint` call,
   and the wall time of `train()`. For ckptkeeper it also times how long after train() returned the run
   was down to `last:2` with ckptkeeper's trash empty.

Linux only. The files go to a new temporary directory (--workdir DIR chooses where) that is removed at
the end. Free disk space is checked first: with less than 20 GiB free, the sizes are scaled down and the
script says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Summary,
    WatchProcess,
    fmt,
    fmt_summary,
    load_average,
    machine_lines,
    markdown_table,
    package_version,
    summarize,
)

MiB = 2**20
GiB = 2**30
FULL_ROTATION_BYTES = 5 * GiB
QUICK_ROTATION_BYTES = 256 * MiB
FULL_LOOP_BYTES = 1 * GiB
QUICK_LOOP_BYTES = 32 * MiB
MIN_FREE_FOR_FULL = 20 * GiB
SAVE_STEPS = 10
KEEP = "last:2"
SAVE_TOTAL_LIMIT = 2
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
CHUNK = b"\xa5" * (16 * MiB)


# ---- files ---------------------------------------------------------------------------------------
def make_big_file(path: Path, size: int, fill: str) -> float:
    """Replace `path` by a `size`-byte file: fill "fallocate" (posix_fallocate) or "written" (bytes written,
    then fsync). Returns the seconds it took."""
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if fill == "fallocate":
            os.posix_fallocate(fd, 0, size)
        else:
            write_bytes(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def write_bytes(fd: int, count: int) -> None:
    view = memoryview(CHUNK)
    while count > 0:
        count -= os.write(fd, view[: min(count, len(CHUNK))])


def pad_file(path: Path, size: int) -> None:
    """Append written bytes to `path` until it is `size` bytes long, then fsync it."""
    with open(path, "ab") as f:
        write_bytes(f.fileno(), size - f.tell())
        f.flush()
        os.fsync(f.fileno())


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(m.group(1)) for e in os.listdir(run_dir) if (m := CHECKPOINT.fullmatch(e)))


def empty_dir(path: Path) -> None:
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def fmt_time(s: Summary) -> str:
    """Seconds as `median [min, max]`; in microseconds when all of it is under 10 ms."""
    if s.maximum < 0.01:
        return f"{s.median * 1e6:.0f} µs [{s.minimum * 1e6:.0f}, {s.maximum * 1e6:.0f}]"
    return fmt_summary(s) + " s"


def human(n: float) -> str:
    return f"{n / GiB:.3g} GiB" if n >= GiB else f"{n / MiB:.3g} MiB"


# ---- the training stack --------------------------------------------------------------------------
class Stack:
    """transformers and torch, imported on first use (importing this module stays cheap)."""

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        started = time.perf_counter()
        import torch
        import transformers
        import transformers.trainer

        self.import_seconds = time.perf_counter() - started
        self.torch: Any = torch
        self.transformers: Any = transformers
        self.trainer_module: Any = transformers.trainer
        hf_logging: Any = transformers.utils.logging
        hf_logging.set_verbosity_error()  # the "mtime may not be reliable" warning etc.
        self.progress_bars_were_on = bool(hf_logging.is_progress_bar_enabled())
        hf_logging.disable_progress_bar()  # "Writing model shards"
        torch.set_num_threads(1)

    def close(self) -> None:
        if self.progress_bars_were_on:
            self.transformers.utils.logging.enable_progress_bar()

    def dataset(self, rows: int = 64) -> list[dict[str, Any]]:
        torch = self.torch
        g = torch.Generator().manual_seed(1)
        data = []
        for _ in range(rows):
            ids = torch.randint(8, 100, (16,), generator=g)
            ids[0] = 2
            data.append({"input_ids": ids, "attention_mask": torch.ones(16, dtype=torch.long),
                         "labels": torch.tensor(int((ids == 7).any()))})  # fmt: skip
        return data

    def trainer(self, output_dir: Path, save_total_limit: int | None, max_steps: int, step_pause: float = 0.0) -> Any:
        t = self.transformers
        self.torch.manual_seed(0)
        config = t.BertConfig(
            vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=32, num_labels=2,
        )  # fmt: skip
        args = t.TrainingArguments(
            output_dir=os.fspath(output_dir), save_strategy="steps", save_steps=SAVE_STEPS, max_steps=max_steps,
            save_total_limit=save_total_limit, eval_strategy="no", logging_strategy="no",
            per_device_train_batch_size=8, learning_rate=1e-2, seed=42, report_to="none", use_cpu=True,
            disable_tqdm=True, dataloader_num_workers=0,
        )  # fmt: skip
        trainer = t.Trainer(model=t.BertForSequenceClassification(config), args=args, train_dataset=self.dataset())
        trainer.remove_callback(t.trainer_callback.PrinterCallback)  # it prints the final metrics dict
        if step_pause > 0:
            callback_base: Any = t.TrainerCallback

            class ComputeStandIn(callback_base):  # type: ignore[misc]
                def on_step_end(self, *args: Any, **kwargs: Any) -> None:
                    time.sleep(step_pause)

            trainer.add_callback(ComputeStandIn())
        return trainer


@dataclass
class Timings:
    """What the training process spent where (seconds)."""

    rotate: list[float] = field(default_factory=list)  # each transformers rotate_checkpoints call
    rmtree: list[float] = field(default_factory=list)  # each shutil.rmtree call
    rmtree_paths: list[str] = field(default_factory=list)
    save: list[float] = field(default_factory=list)  # each Trainer._save_checkpoint call


@contextmanager
def instrumented(stack: Stack, trainer: Any) -> Iterator[Timings]:
    """Time the real functions by wrapping them (each wrapper calls the original): the module global
    `rotate_checkpoints` that Trainer._save_checkpoint calls, shutil.rmtree (the Trainer deletes with it),
    and this trainer's `_save_checkpoint`. Everything is put back on exit."""
    timings = Timings()
    module = stack.trainer_module
    real_rotate: Callable[..., Any] = module.rotate_checkpoints
    real_rmtree: Callable[..., Any] = shutil.rmtree
    real_save: Callable[..., Any] = trainer._save_checkpoint

    def rotate(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return real_rotate(*args, **kwargs)
        finally:
            timings.rotate.append(time.perf_counter() - started)

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return real_rmtree(path, *args, **kwargs)
        finally:
            timings.rmtree.append(time.perf_counter() - started)
            timings.rmtree_paths.append(os.fspath(path))

    def save(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return real_save(*args, **kwargs)
        finally:
            timings.save.append(time.perf_counter() - started)

    module.rotate_checkpoints = rotate
    shutil.rmtree = rmtree  # type: ignore[assignment]
    trainer._save_checkpoint = save
    try:
        yield timings
    finally:
        module.rotate_checkpoints = real_rotate
        shutil.rmtree = real_rmtree  # type: ignore[assignment]
        del trainer._save_checkpoint


# ---- 1. the Trainer's rotation of one big checkpoint ---------------------------------------------
@dataclass
class RotationRep:
    limit: int | None  # the Trainer's save_total_limit
    fill: str
    size_bytes: int
    make_seconds: float
    rotate_seconds: float
    save_checkpoint_seconds: float
    rmtree_calls: int
    removed: bool
    left: list[int]


def measure_rotation(
    stack: Stack, workdir: Path, limit: int | None, size: int, fill: str, reps: int
) -> list[RotationRep]:
    run_dir = workdir / f"rotation-{limit}-{fill}"
    run_dir.mkdir()
    trainer = stack.trainer(run_dir, limit, max_steps=100)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    results = []
    try:
        for _ in range(reps):
            empty_dir(run_dir)
            for step in (10, 20):  # two checkpoints: at the limit, nothing rotates yet
                trainer.state.global_step = step
                trainer._save_checkpoint(trainer.model, trial=None)
            old = run_dir / "checkpoint-10"
            made = make_big_file(old / "optimizer.pt", size, fill)
            now = time.time()
            os.utime(old, (now - 120, now - 120))  # saved two minutes ago: the Trainer sorts by mtime
            os.utime(run_dir / "checkpoint-20", (now - 60, now - 60))
            os.sync()
            trainer.state.global_step = 30
            with instrumented(stack, trainer) as timings:
                trainer._save_checkpoint(trainer.model, trial=None)
            results.append(
                RotationRep(
                    limit=limit,
                    fill=fill,
                    size_bytes=size,
                    make_seconds=made,
                    rotate_seconds=sum(timings.rotate),
                    save_checkpoint_seconds=sum(timings.save),
                    rmtree_calls=len(timings.rmtree),
                    removed=not old.exists(),
                    left=checkpoint_steps(run_dir),
                )
            )
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return results


def rotation_table(reps: list[RotationRep]) -> str:
    rows = []
    for limit, fill in dict.fromkeys((r.limit, r.fill) for r in reps):
        mine = [r for r in reps if (r.limit, r.fill) == (limit, fill)]
        size = human(mine[0].size_bytes)
        if limit is None:
            setup = f"ckptkeeper's setup: save_total_limit=None, same tree ({size} optimizer.pt, {fill})"
        else:
            setup = f"Trainer, save_total_limit={limit}: rotates out a checkpoint with a {size} optimizer.pt ({fill})"
        rows.append(
            [
                setup,
                str(len(mine)),
                fmt_time(summarize([r.rotate_seconds for r in mine])),
                fmt_time(summarize([r.save_checkpoint_seconds for r in mine])),
                f"{sum(r.rmtree_calls for r in mine)} ({sum(r.removed for r in mine)} checkpoints gone)",
            ]
        )
    return markdown_table(
        ["setup", "reps", "training blocked in rotate_checkpoints", "whole _save_checkpoint", "rmtree calls"],
        rows,
    )


# ---- 2. a real training loop ---------------------------------------------------------------------
@dataclass
class LoopRep:
    setup: str
    train_seconds: float
    saves: int
    save_seconds: float  # total in _save_checkpoint (includes writing the padded optimizer.pt)
    rotate_seconds: float  # total in rotate_checkpoints
    rotate_max_seconds: float
    rmtree_calls: int
    rmtree_seconds: float
    left_after_train: list[int]
    retention_done_after_train_seconds: float | None = None  # ckptkeeper only
    deleted_log_lines: int | None = None
    watch_exit_code: int | None = None


SETUPS = ("Trainer rotates", "no deletion", "ckptkeeper")


def run_loop(
    stack: Stack,
    workdir: Path,
    setup: str,
    rep: int,
    max_steps: int,
    optimizer_bytes: int,
    settle: float,
    step_pause: float,
) -> LoopRep:
    run_dir = workdir / f"loop-{setup.replace(' ', '-')}-{rep}"
    run_dir.mkdir()
    limit = SAVE_TOTAL_LIMIT if setup == "Trainer rotates" else None
    trainer = stack.trainer(run_dir, limit, max_steps, step_pause)
    real_save_optimizer = trainer._save_optimizer_and_scheduler

    def save_optimizer_and_pad(output_dir: str) -> None:
        real_save_optimizer(output_dir)
        pad_file(Path(output_dir) / "optimizer.pt", optimizer_bytes)

    trainer._save_optimizer_and_scheduler = save_optimizer_and_pad
    watch: WatchProcess | None = None
    try:
        if setup == "ckptkeeper":
            watch = WatchProcess([os.fspath(run_dir), "--keep", KEEP, "--settle", f"{settle:g}"])
            watch.wait_for_line(r"watching ", timeout=60)
        with instrumented(stack, trainer) as timings:
            started = time.perf_counter()
            trainer.train()
            train_seconds = time.perf_counter() - started
        left = checkpoint_steps(run_dir)
        result = LoopRep(
            setup=setup,
            train_seconds=train_seconds,
            saves=len(timings.save),
            save_seconds=sum(timings.save),
            rotate_seconds=sum(timings.rotate),
            rotate_max_seconds=max(timings.rotate, default=0.0),
            rmtree_calls=len(timings.rmtree),
            rmtree_seconds=sum(timings.rmtree),
            left_after_train=left,
        )
        if watch is not None:
            wanted = left[-2:]
            trash = run_dir / "_ckptkeeper" / "trash"
            deadline = time.monotonic() + 60 + 4 * settle
            while checkpoint_steps(run_dir) != wanted or (trash.exists() and any(trash.iterdir())):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"ckptkeeper did not bring {run_dir} down to {wanted} within the deadline:\n" + watch.log_tail()
                    )
                time.sleep(0.01)
            result.retention_done_after_train_seconds = time.perf_counter() - started - train_seconds
            result.deleted_log_lines = watch.count(r" deleted: freed ")
            result.watch_exit_code = watch.stop()
        return result
    finally:
        if watch is not None:
            watch.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def loop_table(reps: list[LoopRep]) -> str:
    baseline = [r for r in reps if r.setup == "no deletion"]
    base_median = summarize([r.train_seconds for r in baseline]).median if baseline else float("nan")
    rows = []
    for setup in SETUPS:
        mine = [r for r in reps if r.setup == setup]
        if not mine:
            continue
        train = summarize([r.train_seconds for r in mine])
        rotate = summarize([r.rotate_seconds for r in mine])
        rotate_max = summarize([r.rotate_max_seconds for r in mine])
        label = {
            "Trainer rotates": f"Trainer rotates (save_total_limit={SAVE_TOTAL_LIMIT})",
            "no deletion": "no deletion (save_total_limit=None, nothing beside)",
            "ckptkeeper": f"ckptkeeper (save_total_limit=None; `watch --keep {KEEP}` beside)",
        }[setup]
        rows.append(
            [
                label,
                str(len(mine)),
                f"{sum(r.rmtree_calls for r in mine) / len(mine):g}",
                fmt_time(rotate),
                fmt_time(rotate_max),
                fmt_summary(train),
                fmt(train.median / base_median, 2),
            ]
        )
    return markdown_table(
        [
            "setup",
            "reps",
            "deletions by the training process per run",
            "blocked in rotate_checkpoints per run",
            "longest single rotate call",
            "train() wall, s",
            "train() / no deletion",
        ],
        rows,
    )


# ---- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_trainer_block", description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small files, 3 repetitions, under a minute")
    parser.add_argument("--only", choices=["rotation", "loop"], help="run one part only")
    parser.add_argument("--workdir", type=Path, help="where the files go (default: a new temp dir)")
    parser.add_argument("--json", type=Path, help="also write every raw figure to this file")
    parser.add_argument(
        "--step-seconds",
        type=float,
        help="loop: the training process sleeps this long after each step, a stand-in for the GPU's compute "
        "time (default 0.1: 1 s between saves; --quick: 0.03; 0 makes the loop nothing but saves)",
    )
    opts = parser.parse_args(argv)
    if opts.step_seconds is None:
        opts.step_seconds = 0.03 if opts.quick else 0.1
    return opts


def file_sizes(quick: bool, saves: int, workdir: Path, free: int) -> tuple[int, int, list[str]]:
    """The optimizer.pt sizes of the rotation and of the loop, scaled down to fit the free space, and a
    note saying so if they were."""
    rotation_bytes = QUICK_ROTATION_BYTES if quick else FULL_ROTATION_BYTES
    loop_bytes = QUICK_LOOP_BYTES if quick else FULL_LOOP_BYTES
    notes = []
    # The most on disk at once: the "no deletion" loop keeps every checkpoint.
    need = max(rotation_bytes, saves * loop_bytes)
    if (free < MIN_FREE_FOR_FULL and not quick) or free < 4 * need:
        scale = min(1.0, free / 4 / need)
        rotation_bytes = max(MiB, int(rotation_bytes * scale) // MiB * MiB)
        loop_bytes = max(MiB, int(loop_bytes * scale) // MiB * MiB)
        notes.append(
            f"only {human(free)} free on {workdir}: sizes scaled down to {human(rotation_bytes)} (rotation) "
            f"and {human(loop_bytes)} per optimizer.pt (loop)"
        )
    return rotation_bytes, loop_bytes, notes


def print_header(quick: bool, workdir: Path, notes: list[str]) -> None:
    print("# How long retention blocks the training loop" + (" (--quick)" if quick else ""))
    print()
    print("Machine:")
    print("\n".join(machine_lines(workdir)))
    for note in notes:
        print(f"- NOTE: {note}")
    sys.stdout.flush()


def rotation_part(stack: Stack, workdir: Path, rotation_bytes: int, reps: int) -> list[dict[str, Any]]:
    """Part 1: measure and report; the raw figures."""
    part_started = time.monotonic()
    rotation: list[RotationRep] = []
    for fill in ("fallocate", "written"):
        rotation += measure_rotation(stack, workdir, SAVE_TOTAL_LIMIT, rotation_bytes, fill, reps)
    # ckptkeeper's setup: the call the Trainer makes with save_total_limit=None (the file's content is
    # irrelevant to it, so fallocate).
    rotation += measure_rotation(stack, workdir, None, rotation_bytes, "fallocate", reps)
    print(
        f"## 1. One rotation: the Trainer deletes a checkpoint holding a {human(rotation_bytes)} optimizer.pt "
        f"(median [min, max], {reps} reps, os.sync() before each)"
    )
    print()
    print(rotation_table(rotation))
    print()
    for fill in ("fallocate", "written"):
        made = summarize([r.make_seconds for r in rotation if r.fill == fill])
        print(f"- making the file ({fill}, fsync included): {fmt_summary(made, 2)} s")
    expected = {SAVE_TOTAL_LIMIT: [20, 30], None: [10, 20, 30]}
    bad = [r for r in rotation if r.left != expected[r.limit]]
    if bad:
        print(f"- WARNING: {len(bad)} reps did not leave the expected checkpoints: {bad}")
    print(f"- part took {time.monotonic() - part_started:.0f} s")
    print()
    sys.stdout.flush()
    return [asdict(r) for r in rotation]


def loop_part(
    stack: Stack, workdir: Path, reps: int, max_steps: int, loop_bytes: int, settle: float, step_seconds: float
) -> list[dict[str, Any]]:
    """Part 2: measure and report; the raw figures."""
    part_started = time.monotonic()
    loop = [
        run_loop(stack, workdir, setup, rep, max_steps, loop_bytes, settle, step_seconds)
        for rep in range(reps)
        for setup in SETUPS[rep % len(SETUPS) :] + SETUPS[: rep % len(SETUPS)]
    ]
    print(
        f"## 2. A real training loop: {max_steps} steps, a save every {SAVE_STEPS} ({max_steps // SAVE_STEPS} "
        f"saves), each optimizer.pt padded to {human(loop_bytes)} written + fsynced, {step_seconds:g} s of "
        f"stand-in compute per step (median [min, max] over {reps} runs)"
    )
    print()
    print(loop_table(loop))
    print()
    print_loop_notes(loop, settle)
    print(f"- part took {time.monotonic() - part_started:.0f} s")
    print()
    return [asdict(r) for r in loop]


def print_loop_notes(loop: list[LoopRep], settle: float) -> None:
    """Part 2's lines under its table: each setup's saves, and how soon ckptkeeper was done."""
    for setup in SETUPS:
        mine = [r for r in loop if r.setup == setup]
        save = summarize([r.save_seconds / max(1, r.saves) for r in mine])
        print(
            f"- {setup}: one _save_checkpoint (writing the padded optimizer.pt included) took "
            f"{fmt_summary(save)} s; checkpoints left when train() returned: "
            f"{sorted({tuple(r.left_after_train) for r in mine})}"
        )
    kk = [r for r in loop if r.setup == "ckptkeeper"]
    done = summarize([r.retention_done_after_train_seconds or 0.0 for r in kk])
    print(
        f"- ckptkeeper: down to `{KEEP}` with its trash empty {fmt_summary(done)} s after train() returned "
        f"(settle {settle:g} s); 'deleted' log lines per run: {[r.deleted_log_lines for r in kk]}; "
        f"exit codes after SIGTERM: {[r.watch_exit_code for r in kk]}"
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    reps = 3 if opts.quick else 5
    max_steps = 30 if opts.quick else 50
    settle = 0.5 if opts.quick else 1.0

    workdir = Path(tempfile.mkdtemp(prefix="ckptkeeper-bench-block-", dir=opts.workdir))
    started = time.monotonic()
    load_start = load_average()
    free = shutil.disk_usage(workdir).free
    rotation_bytes, loop_bytes, notes = file_sizes(opts.quick, max_steps // SAVE_STEPS, workdir, free)
    print_header(opts.quick, workdir, notes)
    raw: dict[str, Any] = {
        "quick": opts.quick,
        "machine": machine_lines(workdir),
        "notes": notes,
        "step_seconds": opts.step_seconds,
        "settle": settle,
    }
    stack: Stack | None = None
    try:
        stack = Stack()
        print(
            f"- torch: {package_version('torch')}, transformers: {package_version('transformers')}, "
            f"accelerate: {package_version('accelerate')} (imported in {stack.import_seconds:.1f} s)"
        )
        print(f"- free disk at the start: {human(free)}")
        print()
        sys.stdout.flush()
        raw["free_bytes_at_start"] = free
        if opts.only in (None, "rotation"):
            raw["rotation"] = rotation_part(stack, workdir, rotation_bytes, reps)
        if opts.only in (None, "loop"):
            raw["loop"] = loop_part(stack, workdir, reps, max_steps, loop_bytes, settle, opts.step_seconds)
        print(f"Total benchmark time: {time.monotonic() - started:.0f} s")
        print(f"Load average (1, 5, 15 min) at the start: {load_start}, at the end: {load_average()}")
        if opts.json:
            opts.json.write_text(json.dumps(raw, indent=2) + "\n")
    finally:
        if stack is not None:
            stack.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
