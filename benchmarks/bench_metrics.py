"""Benchmark named metrics from lm-eval results (`--metric`, issue #20): `plan` and a `watch` pass over a tree
with many results files, against the same tree without `--metric`.

    python -m benchmarks.bench_metrics [--quick | --full] [--reps N] [--workdir DIR] [--json FILE]

The tree: R runs of C simulated Trainer checkpoints each (small files: the benchmark is about the metrics, not
the disk), and beside the root (`--metric acc_norm=lm-eval:EVALS#/results/synth_likes/acc_norm,none`, as the
issue's example puts `./evals` beside `./outputs`) E lm-eval results files per checkpoint, each a real results
document of tests/fixtures/lm-eval (~9.5 kB) recording its checkpoint's absolute path, in lm-eval's layout
(`EVALS/<sanitized path>/results_<timestamp>.json`, E evaluations of each checkpoint with different dates).
Default 10 x 10 checkpoints with 10 files each (1,000 results files); `--full` the issue's size, 10 x 100 with 10
each (1,000 checkpoints, 10,000 results files); `--quick` (the smoke run) 2 x 10 with 10 each.

Both sides keep every checkpoint, so one tree serves every repetition: with `--metric`, `--keep
best:100000:acc_norm,last:100000` (every results file is read and ranked); without, `--keep
best:100000,last:100000` (the Trainer's eval_loss).

1. `plan ROOT --json`, as a user runs it (a new process, timed around subprocess.run, output discarded), with
   and without `--metric`, interleaved (the order alternates), after one warm-up of each (page cache warm).
   Figures: median [min, max] s, and the ratio with/without of the medians, with the [min, max] of the
   per-repetition ratios.
2. `watch ROOT --poll 5 --settle 0 --rescan-interval I`: the first pass (process start to the last line of
   its startup reconcile, which logs each checkpoint once), then the idle cost: utime + stime from
   /proc/PID/stat, and rchar (bytes read, from /proc/PID/io) over a window that holds one full rescan
   (W = I + 5 s; I = 60 s with --full (the default interval), 15 s by default; --quick: I = 2 s, W = 4 s). A
   results file read again at a rescan would show in rchar. With and without `--metric`, in alternating
   order, each repetition a fresh daemon.

Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    WatchProcess,
    cpu_seconds,
    fmt,
    fmt_summary,
    load_average,
    machine_lines,
    markdown_table,
    memory_kib,
    summarize,
    timed_process,
)
from ckptkeeper.simtrainer import SimConfig, simulate_run

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "lm-eval"
TEMPLATE = FIXTURE / "evals" / "__tmp__lmeval-out__run__checkpoint-80" / "results_2026-12-05T23-12-47.398480.json"
POINTER = "/results/synth_likes/acc_norm,none"
POLL = 5.0
TARGET_IDLE_CPU_PERCENT = 1.0
SANITIZE = re.compile(r'["<>:/|\\?*\[\]]+')  # lm-eval's model_name_sanitized


@dataclass(frozen=True)
class Size:
    runs: int
    checkpoints: int  # per run
    results: int  # results files per checkpoint
    rescan: float  # watch --rescan-interval
    reps: int

    def describe(self) -> str:
        total = self.runs * self.checkpoints
        return (
            f"{self.runs} runs x {self.checkpoints} checkpoints = {total:,} checkpoints, "
            f"{self.results} results files each = {total * self.results:,} results files"
        )


def size_of(opts: argparse.Namespace) -> Size:
    if opts.quick:
        size = Size(2, 10, 10, 2.0, 2)
    elif opts.full:
        size = Size(10, 100, 10, 60.0, 5)
    else:
        size = Size(10, 10, 10, 15.0, 5)
    return Size(size.runs, size.checkpoints, size.results, size.rescan, opts.reps or size.reps)


# ---- the tree ------------------------------------------------------------------------------------------
def write_results(evals: Path, checkpoint: Path, template: dict[str, Any], count: int, seed: int) -> None:
    """`count` results files for `checkpoint`, as `count` lm_eval runs would leave them: dated now (after the
    checkpoint was written, or they would be taken for an earlier checkpoint's), a millisecond apart."""
    recorded = os.fspath(checkpoint)
    folder = evals / SANITIZE.sub("__", recorded)
    folder.mkdir(parents=True)
    doc = dict(template)
    doc["model_name"] = recorded
    doc["config"] = {**template["config"], "model_args": {"pretrained": recorded, "dtype": "float32"}}
    base = time.time()
    for i in range(count):
        doc["date"] = base + i / 1000
        value = ((seed * 7919 + i * 104729) % 1000) / 1000
        doc["results"] = {**template["results"], "synth_likes": {**template["results"]["synth_likes"]}}
        doc["results"]["synth_likes"]["acc_norm,none"] = value
        stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.localtime(doc["date"])) + f".{i + 1:06d}"
        (folder / f"results_{stamp}.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")


def build_tree(work: Path, size: Size) -> tuple[Path, Path, float]:
    """(root, evals, seconds to build): the runs below root, and their results files in evals beside it."""
    started = time.perf_counter()
    root, evals = work / "outputs", work / "evals"
    evals.mkdir(parents=True)
    template = json.loads(TEMPLATE.read_text(encoding="utf-8"))
    for r in range(size.runs):
        config = SimConfig(
            steps_per_epoch=10 * size.checkpoints, epochs=1, save_steps=10, eval_steps=10, logging_steps=10,
            model_floats=256, optimizer_bytes=1024, seed=r,
        )  # fmt: skip
        simulate_run(root / f"run-{r:03d}", config)
    for r in range(size.runs):  # evaluated after every checkpoint was written
        for c in range(1, size.checkpoints + 1):
            checkpoint = root / f"run-{r:03d}" / f"checkpoint-{10 * c}"
            write_results(evals, checkpoint, template, size.results, seed=r * 1000 + c)
    return root, evals, time.perf_counter() - started


def sides(root: Path, evals: Path) -> dict[str, list[str]]:
    """The arguments after ROOT of each side."""
    metric = f"acc_norm=lm-eval:{evals}#{POINTER}"
    return {
        "without --metric": ["--keep", "best:100000,last:100000"],
        "with --metric": ["--metric", metric, "--keep", "best:100000:acc_norm,last:100000"],
    }


# ---- 1. plan -------------------------------------------------------------------------------------------
def check_the_metric_is_read(root: Path, evals: Path, checkpoints: int) -> None:
    """Every checkpoint has acc_norm from its results files (else the benchmark would measure nothing)."""
    argv = [sys.executable, "-m", "ckptkeeper", "plan", os.fspath(root), *sides(root, evals)["with --metric"]]
    done = subprocess.run([*argv, "--json"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"plan exited {done.returncode}: {done.stderr[-500:]}")
    found = [c for run in json.loads(done.stdout)["runs"] for c in run["checkpoints"] if "acc_norm" in c["metrics"]]
    if len(found) != checkpoints:
        raise RuntimeError(f"only {len(found)} of {checkpoints} checkpoints have acc_norm from the results files")


def measure_plan(root: Path, evals: Path, reps: int) -> dict[str, list[float]]:
    commands = {
        label: [sys.executable, "-m", "ckptkeeper", "plan", os.fspath(root), *args, "--json"]
        for label, args in sides(root, evals).items()
    }
    for argv in commands.values():  # warm-up: page cache, .pyc files
        timed_process(argv)
    times: dict[str, list[float]] = {label: [] for label in commands}
    order = list(commands)
    for rep in range(reps):
        for label in order if rep % 2 == 0 else order[::-1]:
            times[label].append(timed_process(commands[label]))
    return times


def plan_rows(times: dict[str, list[float]]) -> list[list[str]]:
    base = times["without --metric"]
    ratios = [w / b for w, b in zip(times["with --metric"], base, strict=True)]
    rows = [["without --metric (baseline)", fmt_summary(summarize(base)), "-"]]
    ratio = statistics.median(times["with --metric"]) / statistics.median(base)
    spread = f"[{fmt(min(ratios), 2)}, {fmt(max(ratios), 2)}]"
    rows.append(["with --metric", fmt_summary(summarize(times["with --metric"])), f"**{ratio:.2f}x** {spread}"])
    return rows


# ---- 2. watch ------------------------------------------------------------------------------------------
def read_chars(pid: int) -> int:
    """rchar of /proc/PID/io: bytes the process asked read() and friends for (page cache included)."""
    with open(f"/proc/{pid}/io", encoding="utf-8") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class WatchSample:
    first_pass_s: float  # process start -> the last line of the startup reconcile
    first_pass_cpu_s: float
    first_pass_read_bytes: int  # rchar up to then: every results file read once shows here
    idle_cpu_s: float
    idle_wall_s: float
    idle_read_bytes: int
    idle_log_lines: int
    rss_mib: float

    @property
    def idle_cpu_percent(self) -> float:
        return 100 * self.idle_cpu_s / self.idle_wall_s


def watch_once(root: Path, args: list[str], size: Size, window: float) -> WatchSample:
    checkpoints = size.runs * size.checkpoints
    argv = [os.fspath(root), *args, "--poll", f"{POLL:g}", "--settle", "0", "--rescan-interval", f"{size.rescan:g}"]
    with WatchProcess(argv) as watch:
        watch.wait_for_line(r"\bwatching ", timeout=120)
        deadline = time.monotonic() + 600
        while watch.count(r" kept: ") < checkpoints:
            if time.monotonic() > deadline or watch.proc.poll() is not None:
                raise RuntimeError(f"the first pass did not log {checkpoints} kept lines:\n" + watch.log_tail())
            time.sleep(0.05)
        watch.wait_quiet(quiet=2.0, timeout=300)
        lines = watch.snapshot()
        first_pass = lines[-1][0] - watch.started
        cpu0, read0, wall0 = cpu_seconds(watch.pid), read_chars(watch.pid), time.monotonic()
        time.sleep(window)
        cpu1, read1, wall1 = cpu_seconds(watch.pid), read_chars(watch.pid), time.monotonic()
        rss = memory_kib(watch.pid)["VmRSS"] / 1024
        idle_lines = len(watch.snapshot()) - len(lines)
        return WatchSample(first_pass, cpu0, read0, cpu1 - cpu0, wall1 - wall0, read1 - read0, idle_lines, rss)


def measure_watch(root: Path, evals: Path, size: Size, window: float) -> dict[str, list[WatchSample]]:
    samples: dict[str, list[WatchSample]] = {label: [] for label in sides(root, evals)}
    order = list(samples)
    for rep in range(size.reps):
        for label in order if rep % 2 == 0 else order[::-1]:
            samples[label].append(watch_once(root, sides(root, evals)[label], size, window))
    return samples


def watch_rows(samples: dict[str, list[WatchSample]]) -> list[list[str]]:
    rows = []
    for label, got in samples.items():
        cpu = summarize([s.idle_cpu_percent for s in got])
        verdict = "met" if cpu.maximum < TARGET_IDLE_CPU_PERCENT else "**missed**"
        rows.append(
            [
                label,
                fmt_summary(summarize([s.first_pass_s for s in got]), 2),
                fmt_summary(summarize([s.first_pass_cpu_s for s in got]), 2),
                fmt_summary(summarize([s.first_pass_read_bytes / 2**20 for s in got]), 1),
                fmt_summary(cpu, 2),
                fmt_summary(summarize([s.idle_read_bytes / 2**20 for s in got]), 2),
                str(sum(s.idle_log_lines for s in got)),
                fmt_summary(summarize([s.rss_mib for s in got]), 1),
                f"< {TARGET_IDLE_CPU_PERCENT:g} %: {verdict}",
            ]
        )
    return rows


# ---- main ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_metrics", description=(__doc__ or "").split("\n")[0]
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the smoke run: 20 checkpoints, 200 results files")
    size.add_argument("--full", action="store_true", help="the issue's size: 1,000 checkpoints, 10,000 files")
    parser.add_argument("--reps", type=int, help="repetitions (default 5; --quick: 2)")
    parser.add_argument("--workdir", type=Path, help="where the tree is built (default: the temp directory)")
    parser.add_argument("--json", type=Path, help="also write every raw figure to this file")
    return parser.parse_args(argv)


def report(size: Size, tree: dict[str, Any], plan: dict[str, list[float]], watch: dict[str, Any]) -> None:
    print(f"## `plan ROOT --json` with and without `--metric` ({size.reps} repetitions, alternating order)")
    print()
    print(markdown_table(["command", "wall s, median [min, max]", "with / without"], plan_rows(plan)))
    print()
    window = watch["window_s"]
    print(
        f"## `watch --poll {POLL:g} --rescan-interval {size.rescan:g}`: first pass, then idle over {window:g} s "
        f"(one full rescan) ({size.reps} repetitions, each a fresh daemon)"
    )
    print()
    headers = ["side", "first pass s", "CPU s to first pass", "MiB read to first pass", "idle CPU % of a core"]
    headers += ["idle MiB read"]
    headers += ["log lines idle", "VmRSS MiB", "target"]
    print(markdown_table(headers, watch_rows(watch["samples"])))
    print()
    print(
        f"- tree: {size.describe()}; {tree['files']:,} files, {tree['mib']:.1f} MiB, built in {tree['build_s']:.1f} s"
    )
    print("- MiB read: rchar of /proc/PID/io (start-up included, up to the first pass; then over the idle window);")
    print(f"  the results files hold {tree['results_mib']:.1f} MiB: reading them all again would show that much")
    print()


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    size = size_of(opts)
    workdir = opts.workdir or Path(tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    label = " (--quick)" if opts.quick else " (--full)" if opts.full else ""
    print(f"# Named metrics from lm-eval results: plan and watch, with and without `--metric`{label}")
    print()
    print("Machine:")
    print("\n".join(machine_lines(workdir)))
    print(f"- load average at start: {load_average()}")
    print()
    sys.stdout.flush()
    with tempfile.TemporaryDirectory(prefix="ckptkeeper-bench-metrics-", dir=workdir) as tmp:
        root, evals, build_s = build_tree(Path(tmp), size)
        tree = tree_facts(Path(tmp), evals, build_s)
        check_the_metric_is_read(root, evals, size.runs * size.checkpoints)
        plan = measure_plan(root, evals, size.reps)
        window = size.rescan + min(5.0, size.rescan)
        samples = measure_watch(root, evals, size, window)
        watch = {"window_s": window, "samples": samples}
    report(size, tree, plan, watch)
    print(f"Load average at the end: {load_average()}")
    print(f"Total benchmark time: {time.monotonic() - started:.0f} s")
    if opts.json:
        raw = {
            "size": asdict(size), "machine": machine_lines(workdir), "tree": tree, "plan_s": plan,
            "watch": {"window_s": window, "samples": {k: [asdict(s) for s in v] for k, v in samples.items()}},
        }  # fmt: skip
        opts.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


def tree_facts(work: Path, evals: Path, build_s: float) -> dict[str, Any]:
    files = [p for p in work.rglob("*") if p.is_file()]
    results = list(evals.rglob("*.json"))
    return {
        "files": len(files),
        "mib": sum(p.stat().st_size for p in files) / 2**20,
        "results_files": len(results),
        "results_mib": sum(p.stat().st_size for p in results) / 2**20,
        "build_s": build_s,
    }


if __name__ == "__main__":
    raise SystemExit(main())
