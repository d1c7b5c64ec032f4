"""Full reconcile of a large root, cold and warm, against a plain loop that json.loads every trainer_state.json.

The tree: R runs of C checkpoints, each checkpoint written by the simulated Trainer (logging every step,
an eval every 5 steps), each `trainer_state.json` holding at least 500 log entries, a small
`model.safetensors` and the other files a Trainer writes. Full mode: 100 runs x 100 checkpoints = 10,000.
The rules keep everything (`last:1000`), so nothing is removed and every pass reads the whole root.

Measured in this process, alternating the order each repetition (page cache warm for both: the tree was
just written and is read once before timing):

- baseline: `os.walk`-free loop over the same checkpoint directories: open + json.load each trainer_state.json;
- cold: a new `Daemon` (fresh content cache), `reconcile_all()`: find the runs, lstat every entry,
  parse trainer_state.json, check the safetensors headers, plan, log the decisions (to /dev/null);
- warm: `reconcile_all(trusting=True)` again on the same Daemon, as its periodic rescans do: files
  unchanged, so nothing is parsed again, and an unchanged checkpoint directory is not even walked;
- warm, thorough: `reconcile_all()` as every 10th periodic rescan: an lstat of every file, nothing parsed;
- plan: `engine.Pipeline.checked(...).survey()`, what `ckptkeeper plan` does (no cache).

Targets: cold <= 1.0x the baseline; warm <= 0.2 s.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import fmt, fmt_summary, machine_lines, markdown_table, summarize
from ckptkeeper.engine import Pipeline
from ckptkeeper.policy import Policy
from ckptkeeper.rules import parse_rules
from ckptkeeper.scan import checkpoint_step
from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.watch import Daemon, WatchOptions

KEEP = "last:1000"
MIN_ENTRIES = 500


def build_tree(root: Path, runs: int, per_run: int) -> tuple[int, int]:
    """Simulate one run, keep its last `per_run` checkpoints (each with >= MIN_ENTRIES log entries), and
    copy it to `runs` run directories. Returns (checkpoints, bytes of trainer_state.json in all)."""
    template = root.parent / "template"
    save_steps = 5
    # Logging every step plus an eval every 5 steps: step s has s + s/5 entries; start past MIN_ENTRIES.
    first = -(-MIN_ENTRIES * 5 // 6 // save_steps) * save_steps
    config = SimConfig(
        steps_per_epoch=first + save_steps * (per_run - 1),
        epochs=1,
        save_steps=save_steps,
        eval_steps=save_steps,
        logging_steps=1,
        model_floats=256,
        optimizer_bytes=512,
    )
    simulate_run(template, config)
    for entry in template.iterdir():
        step = checkpoint_step(entry.name)
        if step is not None and step < first:
            shutil.rmtree(entry)
    kept = sorted(template.iterdir())
    for path in kept:
        entries = len(json.loads((path / "trainer_state.json").read_bytes())["log_history"])
        assert entries >= MIN_ENTRIES, (path, entries)
    assert len(kept) == per_run, len(kept)
    state_bytes = sum((p / "trainer_state.json").stat().st_size for p in kept)
    for i in range(runs):
        shutil.copytree(template, root / f"sweep-{i // 10:02d}" / f"run-{i:03d}")
    shutil.rmtree(template)
    os.sync()
    return runs * per_run, runs * state_bytes


def state_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*/checkpoint-*/trainer_state.json"))


def baseline_pass(files: list[Path]) -> float:
    started = time.perf_counter()
    for path in files:
        with open(path, "rb") as f:
            json.load(f)
    return time.perf_counter() - started


def new_daemon(root: Path, state_dir: Path) -> Daemon:
    return Daemon(root, Policy(parse_rules(KEEP)), state_dir, WatchOptions(settle=0.0))


def timed(fn: Any) -> float:
    gc.collect()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@dataclass
class Figures:
    """Seconds per repetition of each pass."""

    base: list[float] = field(default_factory=list)
    cold: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    thorough: list[float] = field(default_factory=list)
    plan: list[float] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_reconcile", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 runs x 20 checkpoints, 3 repetitions")
    parser.add_argument("--workdir", type=Path, help="where to build the tree (default: a new temp dir)")
    parser.add_argument("--json", type=Path, help="also write every raw figure to this file")
    parser.add_argument("--reps", type=int, help="repetitions (default 5, quick 3)")
    return parser.parse_args(argv)


@contextlib.contextmanager
def daemon_log_to_devnull() -> Iterator[None]:
    """The daemon logs one "kept" line per checkpoint on its first pass, as it would to a terminal."""
    with open(os.devnull, "w") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log = logging.getLogger("ckptkeeper")
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        try:
            yield
        finally:
            log.removeHandler(handler)


def print_header(quick: bool, workdir: Path, runs: int, per_run: int, tree: tuple[int, int], built_in: float) -> None:
    checkpoints, state_bytes = tree
    print("# ckptkeeper full-reconcile benchmark" + (" (--quick)" if quick else ""))
    print()
    print("Machine:")
    print("\n".join(machine_lines(workdir)))
    print(
        f"- tree: {runs} runs x {per_run} checkpoints = {checkpoints}; trainer_state.json "
        f"{state_bytes / checkpoints / 1024:.0f} KiB on average ({state_bytes / 2**20:.0f} MiB in all), "
        f">= {MIN_ENTRIES} log entries each; built in {built_in:.0f} s"
    )
    print()
    sys.stdout.flush()


def plan_pass(root: Path, state_dir: Path) -> None:
    """What `ckptkeeper plan` does: check the paths, then scan and plan the whole root (no cache)."""
    Pipeline.checked(root, Policy(parse_rules(KEEP)), state_dir=state_dir).survey(None)


def measure(root: Path, state_dir: Path, files: list[Path], checkpoints: int, reps: int) -> Figures:
    """Each repetition: the baseline and a cold pass (in alternating order), then warm, thorough and plan."""
    f = Figures()
    for rep in range(reps):
        daemon = new_daemon(root, state_dir)

        def cold_pass(d: Daemon = daemon) -> None:
            d.reconcile_all()

        if rep % 2 == 0:
            f.base.append(timed(lambda: baseline_pass(files)))
            f.cold.append(timed(cold_pass))
        else:
            f.cold.append(timed(cold_pass))
            f.base.append(timed(lambda: baseline_pass(files)))
        assert len(daemon.tracker.cache) == checkpoints, len(daemon.tracker.cache)
        assert sum(len(d) for d in daemon.decision_log.decisions.values()) == checkpoints
        assert all(w == "kept" for d in daemon.decision_log.decisions.values() for w in d.values())
        f.warm.append(timed(lambda d=daemon: d.reconcile_all(trusting=True)))
        f.thorough.append(timed(cold_pass))
        f.plan.append(timed(lambda: plan_pass(root, state_dir)))
        print(
            f"- rep {rep + 1}: baseline {f.base[-1]:.3f} s, cold {f.cold[-1]:.3f} s, warm {f.warm[-1]:.3f} s, "
            f"warm thorough {f.thorough[-1]:.3f} s, plan {f.plan[-1]:.3f} s"
        )
        sys.stdout.flush()
    return f


def over(values: list[float], base: list[float]) -> list[float]:
    return [v / b for v, b in zip(values, base, strict=True)]


def results_table(f: Figures) -> str:
    s_ratio, s_warm = summarize(over(f.cold, f.base)), summarize(f.warm)
    return markdown_table(
        ["pass", "seconds, median [min, max]", "x baseline, median [min, max]", "target", "met"],
        [
            ["baseline: json.load every trainer_state.json", fmt_summary(summarize(f.base)), "1", "", ""],
            [
                "cold: new daemon, `reconcile_all()`",
                fmt_summary(summarize(f.cold)),
                fmt_summary(s_ratio, 2),
                "<= 1.0x",
                "yes" if s_ratio.median <= 1.0 else "**no**",
            ],
            [
                "warm: same daemon, files unchanged (periodic rescan)",
                fmt_summary(s_warm),
                fmt_summary(summarize(over(f.warm, f.base)), 3),
                "<= 0.2 s",
                "yes" if s_warm.median <= 0.2 else "**no**",
            ],
            [
                "warm, thorough (every 10th rescan): lstat of every file",
                fmt_summary(summarize(f.thorough)),
                fmt_summary(summarize(over(f.thorough, f.base)), 3),
                "",
                "",
            ],
            [
                "`ckptkeeper plan` (Pipeline.survey, no cache)",
                fmt_summary(summarize(f.plan)),
                fmt_summary(summarize(over(f.plan, f.base)), 2),
                "",
                "",
            ],
        ],
    )


def print_results(f: Figures, checkpoints: int, runs: int, reps: int) -> None:
    print()
    print(f"## Full reconcile, {checkpoints} checkpoints in {runs} runs, nothing to remove ({reps} repetitions)")
    print()
    print(results_table(f))
    print()
    s_base, s_cold, s_warm = summarize(f.base), summarize(f.cold), summarize(f.warm)
    print(
        f"- per checkpoint: baseline {fmt(s_base.median / checkpoints * 1e3)} ms, cold "
        f"{fmt(s_cold.median / checkpoints * 1e3)} ms, warm {fmt(s_warm.median / checkpoints * 1e6, 1)} us"
    )


def write_json(path: Path, f: Figures, quick: bool, workdir: Path, checkpoints: int, runs: int) -> None:
    raw = {
        "benchmark": "reconcile",
        "quick": quick,
        "machine": machine_lines(workdir),
        "checkpoints": checkpoints,
        "runs": runs,
        "baseline_s": f.base,
        "cold_s": f.cold,
        "warm_s": f.warm,
        "warm_thorough_s": f.thorough,
        "plan_s": f.plan,
        "cold_ratio": over(f.cold, f.base),
    }
    path.write_text(json.dumps(raw, indent=2))


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    runs, per_run = (10, 20) if opts.quick else (100, 100)
    reps = opts.reps or (3 if opts.quick else 5)
    workdir = Path(tempfile.mkdtemp(prefix="ckptkeeper-bench-reconcile-", dir=opts.workdir))
    try:
        with daemon_log_to_devnull():
            root = workdir / "root"
            root.mkdir()
            started = time.monotonic()
            checkpoints, state_bytes = build_tree(root, runs, per_run)
            files = state_files(root)
            assert len(files) == checkpoints
            print_header(opts.quick, workdir, runs, per_run, (checkpoints, state_bytes), time.monotonic() - started)
            baseline_pass(files)  # the page cache holds the tree for every measurement below
            figures = measure(root, workdir / "state", files, checkpoints, reps)
            print_results(figures, checkpoints, runs, reps)
            if opts.json:
                write_json(opts.json, figures, opts.quick, workdir, checkpoints, runs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
