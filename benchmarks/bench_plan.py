"""Benchmark `ckptkeeper plan` as a user runs it, against a Python loop that json.loads every trainer_state.json
(issue #12, target 3), both as whole commands (new processes), page cache warm and dropped.

    python -m benchmarks.bench_plan [--quick] [--full] [--reps N] [--workdir DIR] [--json FILE]

The tree is bench_reconcile's: runs of checkpoints written by the simulated Trainer, every
trainer_state.json holding at least 500 log entries (~140 KiB), a small model.safetensors and the Trainer's
other files. Sizes: 1,000 checkpoints (10 runs x 100) by default; `--full` adds 10,000 (100 x 100), the
issue's two sizes; `--quick` 100 (10 x 10). Both sides are new processes, timed around subprocess.run:

- baseline: `python -c "for p in glob(ROOT/*/*/checkpoint-*/trainer_state.json): json.load(open(p, 'rb'))"`;
- `ckptkeeper plan ROOT --keep last:1000` (everything kept; the table printed to /dev/null), a first look: its
  `--state-dir` is an empty directory, so there is no scan memo (`ckptkeeper.scan_memo`) and every file is read;
- the same after one `ckptkeeper prune ROOT --keep last:1000` (which removes nothing and writes the scan memo
  into the root's state directory): what a user sees at every `plan` or `prune` after the first `prune`.

Warm: both run once untimed, then each repetition times both in alternating order. Cold: before each timed
side, `sync` and `echo 3 > /proc/sys/vm/drop_caches` (root only; where it cannot be written the cold rows
say so and are skipped). Ratios are per repetition, plan / baseline. Targets: cold <= 0.8x, warm <= 0.6x.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_reconcile import build_tree
from benchmarks.common import (
    command_parser,
    fmt,
    fmt_summary,
    load_average,
    machine_lines,
    markdown_table,
    start_report,
    summarize,
    timed_process,
    timed_process_cpu,
)

TARGET_COLD = 0.8
TARGET_WARM = 0.6
DROP_CACHES = "/proc/sys/vm/drop_caches"
BASELINE = (
    "import glob, json, sys\n"
    "for p in glob.glob(sys.argv[1] + '/*/*/checkpoint-*/trainer_state.json'):\n"
    "    with open(p, 'rb') as f:\n"
    "        json.load(f)\n"
)


def sizes(quick: bool, full: bool) -> list[tuple[int, int]]:
    """(runs, checkpoints per run) of each tree."""
    if quick:
        return [(10, 10)]
    return [(10, 100), (100, 100)] if full else [(10, 100)]


def drop_caches() -> bool:
    """Write back and drop the page cache (root only); False where it cannot."""
    os.sync()
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


SIDES = ("baseline", "plan", "memo")


def commands(root: Path) -> dict[str, list[str]]:
    plan = [sys.executable, "-m", "ckptkeeper", "plan", str(root), "--keep", "last:1000"]
    return {
        "baseline": [sys.executable, "-c", BASELINE, str(root)],
        "plan": [*plan, "--state-dir", str(root.parent / "empty-state")],
        "memo": plan,
    }


def write_memo(root: Path) -> None:
    """One `prune` that removes nothing: the scan memo the `memo` side reads."""
    (root.parent / "empty-state").mkdir(exist_ok=True)
    timed_process([sys.executable, "-m", "ckptkeeper", "prune", str(root), "--keep", "last:1000"])
    assert (root / "_ckptkeeper" / "scan-memo.json").is_file(), "prune wrote no scan memo"


def measure_size(root: Path, runs: int, per_run: int, reps: int) -> dict[str, Any]:
    started = time.monotonic()
    checkpoints, state_bytes = build_tree(root, runs, per_run)
    built = time.monotonic() - started
    argv = commands(root)
    write_memo(root)
    for command in argv.values():
        timed_process(command)  # warm-up: the tree, the interpreter and its modules in the page cache
    times: dict[str, dict[str, list[float]]] = {"warm": {s: [] for s in SIDES}, "cold": {s: [] for s in SIDES}}
    cpu: dict[str, list[float]] = {s: [] for s in SIDES}
    cold_ok = True
    for rep in range(reps):
        order = list(SIDES[rep % 3 :] + SIDES[: rep % 3])
        for side in order:
            wall, used = timed_process_cpu(argv[side])
            times["warm"][side].append(wall)
            cpu[side].append(used)
        for side in order:
            cold_ok = cold_ok and drop_caches()
            if cold_ok:
                times["cold"][side].append(timed_process(argv[side]))
    return {
        "checkpoints": checkpoints,
        "runs": runs,
        "trainer_state_bytes": state_bytes,
        "built_seconds": built,
        "cold_available": cold_ok,
        "seconds": times,
        "warm_cpu_seconds": cpu,
    }


SIDE_NAMES = {"plan": "first look", "memo": "after a prune"}


def row(figures: dict[str, Any], cache: str, side: str) -> list[str]:
    base, plan = figures["seconds"][cache]["baseline"], figures["seconds"][cache][side]
    target = TARGET_COLD if cache == "cold" else TARGET_WARM
    if not plan:
        return [f"{figures['checkpoints']:,}", cache, "not measured: cannot drop the page cache here", "", "", "", ""]
    ratios = [p / b for p, b in zip(plan, base, strict=True)]
    r = summarize(ratios)
    verdict = "met" if r.median <= target else "**missed**"
    used = figures["warm_cpu_seconds"]
    cpu = summarize([p / b for p, b in zip(used[side], used["baseline"], strict=True)])
    loop_cpu, plan_cpu = summarize(used["baseline"]).median, summarize(used[side]).median
    cpu_cell = f"{fmt(loop_cpu)} / {fmt(plan_cpu)} ({fmt(cpu.median, 2)}x)"
    return [
        f"{figures['checkpoints']:,}",
        f"{cache}, {SIDE_NAMES[side]}",
        fmt_summary(summarize(base)),
        fmt_summary(summarize(plan)),
        f"**{fmt(r.median, 2)}x** [{fmt(r.minimum, 2)}, {fmt(r.maximum, 2)}]",
        f"<= {target:g}x: {verdict}",
        cpu_cell if cache == "warm" else "",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser(
        "benchmarks.bench_plan",
        __doc__,
        quick="100 checkpoints, 2 repetitions (the smoke run)",
        reps="repetitions (default 5; --quick: 2)",
    )
    parser.add_argument("--full", action="store_true", help="1,000 and 10,000 checkpoints, as the issue says")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    reps = opts.reps or (2 if opts.quick else 5)
    started, load_start = time.monotonic(), load_average()
    title = "`ckptkeeper plan` against a json.load loop, whole commands" + (" (--quick)" if opts.quick else "")
    workdir = start_report(title, opts.workdir)
    figures = []
    for runs, per_run in sizes(opts.quick, opts.full):
        with tempfile.TemporaryDirectory(prefix="ckptkeeper-bench-plan-", dir=workdir) as tmp:
            figures.append(measure_size(Path(tmp) / "root", runs, per_run, reps))
    print(f"## Plan a whole root ({reps} repetitions, alternating order, median [min, max] s)")
    print()
    headers = ["checkpoints", "page cache, plan", "json.load loop, s", "ckptkeeper plan, s", "plan / loop", "target"]
    headers.append("CPU s, loop / plan (ratio)")
    rows = [row(f, cache, side) for f in figures for cache in ("warm", "cold") for side in ("plan", "memo")]
    print(markdown_table(headers, rows))
    print()
    for f in figures:
        print(
            f"- {f['checkpoints']:,} checkpoints in {f['runs']} runs, {f['trainer_state_bytes'] / 2**20:.0f} MiB "
            f"of trainer_state.json, built in {f['built_seconds']:.0f} s"
        )
    print(f"- load average (1, 5, 15 min) at the start: {load_start}; at the end: {load_average()}")
    print(f"- total benchmark time: {time.monotonic() - started:.0f} s")
    if opts.json:
        raw = {"quick": opts.quick, "reps": reps, "machine": machine_lines(workdir), "sizes": figures}
        opts.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
