"""Benchmark `ckptkeeper watch`: how fast it reacts to a finished checkpoint, and what it costs while idle.

    python -m benchmarks.bench_watch [--quick] [--workdir DIR] [--json FILE] [--only reaction|idle|idle-poll]
                                     [--window S] [--reps N]

1. Reaction time. A simulated trainer (ckptkeeper.simtrainer) saves a checkpoint every settle + 1 s into a
   run watched by `ckptkeeper watch ROOT --keep last:2 --settle S` (a real subprocess). The clock starts
   right after the save returns (trainer_state.json closed) and stops when the benchmark, polling
   os.path.exists every 5 ms, sees the checkpoint rotated out by `last:2` gone from its name. The daemon
   can only act once the new checkpoint has been unchanged for S seconds, so S is the baseline (for
   polling: S + the poll interval is the worst case); the figure that matters is reaction - S.
2. Idle cost. 100 runs of 50 small checkpoints each (5,000 checkpoints, ~35,000 files; --quick: 20 x 10),
   all kept by `--keep last:1000`. After the startup reconcile is done (the "watching" line, one "kept" line per
   checkpoint, then no log line and no CPU for a while), the daemon's CPU seconds (utime + stime from
   /proc/<pid>/stat) are measured over a window (60 s; --quick: 5 s, 3 repetitions), then VmRSS and VmHWM. Each
   repetition is a fresh daemon. Baseline: the same daemon watching an empty root. `--only idle-poll`: only
   `--poll 5`, over the tree and over an empty root (issue #12, target 4: under 1 % of a core).

Every daemon is a real `python -m ckptkeeper watch` process (whole-process figures).

Figures are printed as markdown tables with the machine. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Summary,
    WatchProcess,
    cpu_seconds,
    fmt,
    fmt_summary,
    load_average,
    machine_lines,
    markdown_table,
    memory_kib,
    summarize,
)
from ckptkeeper.scan import DEFAULT_MAX_DEPTH, ContentCache, find_run_dirs, read_run, scan_root
from ckptkeeper.simtrainer import SimConfig, SimulatedTrainer, simulate_run

SETTLE = 1.0
REACTION_POLL = 0.5
IDLE_POLL = 5.0
IDLE_SHAPE = (100, 50)  # runs x checkpoints: 5,000 checkpoints, the figure
IDLE_SHAPE_QUICK = (20, 10)
EXISTS_POLL = 0.005

# Targets from the issue: printed beside the figures, never asserted.
TARGET_REACTION_P95_OVER_SETTLE = 0.25  # s, inotify
TARGET_IDLE_CPU_PERCENT = 1.0
TARGET_IDLE_RSS_MB = 100.0

# Small files: the benchmark is about the daemon, not the disk. No best model, so `last:2` alone decides.
REACTION_CONFIG = SimConfig(
    steps_per_epoch=10_000, epochs=1, metric_for_best_model=None, model_floats=256, optimizer_bytes=1024
)


def idle_config(seed: int, checkpoints: int) -> SimConfig:
    # A save and an eval every 10 steps; 50 checkpoints: the last trainer_state.json holds 100 log entries.
    return SimConfig(
        steps_per_epoch=10 * checkpoints,
        epochs=1,
        save_steps=10,
        eval_steps=10,
        logging_steps=10,
        model_floats=256,
        optimizer_bytes=1024,
        seed=seed,
    )


# ---- 1. reaction time ------------------------------------------------------------------------------
@dataclass
class ReactionResult:
    mode: str
    settle: float
    poll: float | None
    saves: int
    reactions: list[float] = field(default_factory=list)
    timeouts: int = 0
    deleted_lines: int = 0
    watching_line: str = ""
    exit_code: int | None = None

    @property
    def baseline(self) -> float:
        return self.settle + (self.poll or 0.0)


def measure_reaction(workdir: Path, mode: str, poll: float | None, saves: int, settle: float) -> ReactionResult:
    root = workdir / ("reaction-inotify" if poll is None else "reaction-polling")
    run = root / "run"
    run.mkdir(parents=True)
    trainer = SimulatedTrainer(run, REACTION_CONFIG)
    trainer.save(1, final=False)
    trainer.save(2, final=False)
    result = ReactionResult(mode, settle, poll, saves)
    args = [str(root), "--keep", "last:2", "--settle", f"{settle:g}"]
    if poll is not None:
        args += ["--poll", f"{poll:g}"]
    with WatchProcess(args) as watch:
        _, result.watching_line = watch.wait_for_line(r"\bwatching ", timeout=60)
        watch.wait_quiet(quiet=settle + 0.5, timeout=60)
        next_save = time.time()
        for index in range(saves):
            step = 3 + index
            time.sleep(max(0.0, next_save - time.time()))
            trainer.save(step, final=False)
            saved_at = time.time()  # trainer_state.json is closed: the save has returned
            doomed = run / f"checkpoint-{step - 2}"
            deadline = saved_at + result.baseline + 10.0
            while os.path.exists(doomed) and time.time() < deadline:
                time.sleep(EXISTS_POLL)
            gone_at = time.time()
            if os.path.exists(doomed):
                result.timeouts += 1
            else:
                result.reactions.append(gone_at - saved_at)
            next_save = saved_at + settle + 1.0  # saves never overlap the previous one's settle time
        result.exit_code = watch.stop()
        result.deleted_lines = watch.count(r"checkpoint-\d+ deleted: ")
    return result


def reaction_table(results: list[ReactionResult]) -> str:
    rows = []
    for r in results:
        s = summarize(r.reactions)
        over = s.shifted(r.settle)
        target = ""
        if r.poll is None:
            ok = over.p95 <= TARGET_REACTION_P95_OVER_SETTLE and r.timeouts == 0
            target = f"p95 - S <= {TARGET_REACTION_P95_OVER_SETTLE:g} s: {'met' if ok else 'MISSED'}"
        else:
            ok = s.p95 <= r.baseline + TARGET_REACTION_P95_OVER_SETTLE and r.timeouts == 0
            target = f"(p95 <= S + poll + {TARGET_REACTION_P95_OVER_SETTLE:g} s: {'yes' if ok else 'no'})"
        rows.append(
            [
                r.mode,
                f"{len(r.reactions)}/{r.saves}",
                f"{r.baseline:g}",
                fmt_summary(s),
                fmt(s.p95),
                fmt_summary(over),
                fmt(over.p95),
                fmt(s.p95 - r.baseline),
                fmt(s.median / r.baseline, 2),
                target,
            ]
        )
    return markdown_table(
        [
            "mode",
            "removed/saves",
            "baseline (s)",
            "reaction median [min, max] (s)",
            "reaction p95 (s)",
            "reaction - S median [min, max] (s)",
            "reaction - S p95 (s)",
            "p95 - baseline (s)",
            "median / baseline",
            "target",
        ],
        rows,
    )


# ---- 2. idle cost ------------------------------------------------------------------------------------
@dataclass
class IdleSample:
    cpu_seconds: float
    wall_seconds: float
    rss_kib: int
    hwm_kib: int
    threads: int
    startup_seconds: float  # from the "watching" line to the end of the startup reconcile's log
    startup_cpu_seconds: float  # CPU used from the process start to the start of the window
    lines_in_window: int

    @property
    def cpu_percent(self) -> float:
        return 100.0 * self.cpu_seconds / self.wall_seconds


@dataclass
class IdleResult:
    mode: str
    tree: str
    poll: float | None
    window: float
    samples: list[IdleSample] = field(default_factory=list)
    watching_line: str = ""


def build_idle_tree(root: Path, runs: int, checkpoints: int) -> float:
    started = time.perf_counter()
    for i in range(runs):
        config = idle_config(seed=i, checkpoints=checkpoints)
        assert config.max_steps // config.save_steps == checkpoints
        simulate_run(root / f"run-{i:03d}", config)
    return time.perf_counter() - started


def measure_idle_once(root: Path, poll: float | None, window: float, expect_kept: int) -> tuple[IdleSample, str]:
    args = [str(root), "--keep", "last:1000", "--settle", f"{SETTLE:g}"]
    if poll is not None:
        args += ["--poll", f"{poll:g}"]
    with WatchProcess(args) as watch:
        watching_at, watching_line = watch.wait_for_line(r"\bwatching ", timeout=60)
        deadline = time.monotonic() + 300
        while watch.count(r" kept: ") < expect_kept:
            if time.monotonic() > deadline or watch.proc.poll() is not None:
                raise RuntimeError(f"startup reconcile did not log {expect_kept} kept lines:\n" + watch.log_tail())
            time.sleep(0.05)
        watch.wait_quiet(quiet=2.0, timeout=120)
        lines = watch.snapshot()
        startup = lines[-1][0] - watching_at
        before_lines = len(lines)
        cpu0, wall0 = cpu_seconds(watch.pid), time.monotonic()
        time.sleep(window)
        cpu1, wall1 = cpu_seconds(watch.pid), time.monotonic()
        mem = memory_kib(watch.pid)
        sample = IdleSample(
            cpu_seconds=cpu1 - cpu0,
            wall_seconds=wall1 - wall0,
            rss_kib=mem["VmRSS"],
            hwm_kib=mem["VmHWM"],
            threads=mem.get("Threads", 0),
            startup_seconds=startup,
            startup_cpu_seconds=cpu0,
            lines_in_window=len(watch.snapshot()) - before_lines,
        )
    return sample, watching_line


def measure_idle(
    root: Path, mode: str, tree: str, poll: float | None, window: float, reps: int, kept: int
) -> IdleResult:
    result = IdleResult(mode, tree, poll, window)
    for _ in range(reps):
        sample, result.watching_line = measure_idle_once(root, poll, window, kept)
        result.samples.append(sample)
    return result


def full_scan_cpu(root: Path, reps: int) -> tuple[Summary, Summary]:
    """CPU seconds of one in-process scan of the tree, cold (scan_root: every trainer_state.json and
    safetensors header read) and warm (read_run with a ContentCache that has seen the tree, as the daemon's
    periodic full rescan does): what each full rescan costs the daemon at least."""
    excluded = [root / "_ckptkeeper"]
    cold, warm = [], []
    cache = ContentCache()
    for _ in range(reps):
        started = time.process_time()
        scan_root(root, excluded=excluded, now=time.time(), settle=SETTLE)
        cold.append(time.process_time() - started)
    for run_dir in find_run_dirs(root, DEFAULT_MAX_DEPTH, excluded, []):
        read_run(root, run_dir, time.time(), SETTLE, cache)
    for _ in range(reps):
        started = time.process_time()
        for run_dir in find_run_dirs(root, DEFAULT_MAX_DEPTH, excluded, []):
            read_run(root, run_dir, time.time(), SETTLE, cache, trusting=True)
        warm.append(time.process_time() - started)
    return summarize(cold), summarize(warm)


def idle_table(results: list[IdleResult]) -> str:
    rows = []
    for r in results:
        cpu = summarize([s.cpu_percent for s in r.samples])
        cpu_s = summarize([s.cpu_seconds for s in r.samples])
        rss = summarize([s.rss_kib / 1024 for s in r.samples])
        hwm = summarize([s.hwm_kib / 1024 for s in r.samples])
        startup = summarize([s.startup_seconds for s in r.samples])
        startup_cpu = summarize([s.startup_cpu_seconds for s in r.samples])
        threads = sorted({s.threads for s in r.samples})
        lines = sum(s.lines_in_window for s in r.samples)
        cpu_ok = cpu.median < TARGET_IDLE_CPU_PERCENT and cpu.maximum < TARGET_IDLE_CPU_PERCENT
        rss_ok = rss.maximum < TARGET_IDLE_RSS_MB
        rows.append(
            [
                r.mode,
                r.tree,
                f"{len(r.samples)} x {r.window:g} s",
                fmt_summary(cpu, 2),
                fmt_summary(cpu_s, 2),
                fmt_summary(rss, 1),
                fmt_summary(hwm, 1),
                ",".join(map(str, threads)),
                fmt_summary(startup, 2),
                fmt_summary(startup_cpu, 2),
                str(lines),
                f"CPU < {TARGET_IDLE_CPU_PERCENT:g} %: {'met' if cpu_ok else 'MISSED'}; "
                f"RSS < {TARGET_IDLE_RSS_MB:g} MB: {'met' if rss_ok else 'MISSED'}",
            ]
        )
    return markdown_table(
        [
            "mode",
            "tree",
            "reps x window",
            "CPU % of one core, median [min, max]",
            "CPU s per window",
            "VmRSS MiB",
            "VmHWM MiB",
            "threads",
            "startup reconcile (s)",
            "CPU s before window",
            "log lines in windows",
            "targets",
        ],
        rows,
    )


def _from_watching(line: str) -> str:
    """The log line from its "watching" on (drops the timestamp and level)."""
    return line[line.find("watching") :]


# ---- main --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_watch", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer saves, a small tree, 3 x 5 s idle windows")
    parser.add_argument("--workdir", type=Path, help="where to build the trees (default: a new temp dir)")
    parser.add_argument("--json", type=Path, help="also write every raw figure to this file")
    parser.add_argument("--only", choices=["reaction", "idle", "idle-poll"], help="run one part only")
    parser.add_argument("--window", type=float, help="idle window in seconds (default 60; --quick: 5)")
    parser.add_argument("--reps", type=int, help="idle repetitions (default 5; --quick: 3)")
    parser.add_argument("--keep-files", action="store_true", help="leave the trees behind")
    return parser.parse_args(argv)


def print_header(quick: bool, workdir: Path) -> None:
    print("# ckptkeeper watch benchmark" + (" (--quick)" if quick else ""))
    print()
    print("Machine:")
    print("\n".join(machine_lines(workdir)))
    print()
    sys.stdout.flush()


def reaction_part(workdir: Path, saves: int) -> list[dict[str, Any]]:
    """Measure and report the reaction time, inotify and polling; the raw figures."""
    part_started = time.monotonic()
    reactions = [
        measure_reaction(workdir, "inotify", None, saves, SETTLE),
        measure_reaction(workdir, f"polling {REACTION_POLL:g} s", REACTION_POLL, saves, SETTLE),
    ]
    print(f"## Reaction time (settle S = {SETTLE:g} s, one save every S + 1 s, `--keep last:2`)")
    print()
    print(reaction_table(reactions))
    print()
    for r in reactions:
        print(
            f"- {r.mode}: log said `{_from_watching(r.watching_line)}`; {r.deleted_lines} 'deleted' "
            f"log lines; exit code after SIGTERM {r.exit_code}"
        )
    print(f"- part took {time.monotonic() - part_started:.0f} s")
    print()
    sys.stdout.flush()
    return [asdict(r) for r in reactions]


def idle_part(
    workdir: Path, quick: bool, window: float, reps: int, raw: dict[str, Any], poll_only: bool = False
) -> None:
    """Measure and report the idle cost (into `raw`: "idle" and "full_scan_cpu_seconds"); `poll_only`: only
    polling every IDLE_POLL s, over the tree and over an empty root."""
    part_started = time.monotonic()
    tree = workdir / "idle-tree"
    runs, checkpoints = IDLE_SHAPE_QUICK if quick else IDLE_SHAPE
    build_seconds = build_idle_tree(tree, runs, checkpoints)
    empty = workdir / "idle-empty"
    empty.mkdir()
    files = sum(len(f) for _, _, f in os.walk(tree))
    shape = f"{runs} x {checkpoints}"
    polling = f"polling {IDLE_POLL:g} s"
    if poll_only:
        idle = [measure_idle(empty, f"{polling} (baseline)", "empty root", IDLE_POLL, window, reps, 0)]
    else:
        idle = [
            measure_idle(empty, "inotify (baseline)", "empty root", None, window, reps, 0),
            measure_idle(tree, "inotify", shape, None, window, reps, runs * checkpoints),
        ]
    idle.append(measure_idle(tree, polling, shape, IDLE_POLL, window, reps, runs * checkpoints))
    cold, warm = full_scan_cpu(tree, 1 if poll_only else reps)
    print(
        f"## Idle cost (`--keep last:1000`: everything kept; settle {SETTLE:g} s; full rescan every 60 s, the default)"
    )
    print()
    print(idle_table(idle))
    print()
    print(
        f"- tree: {runs} runs x {checkpoints} checkpoints, {files} files, "
        f"{sum(f.stat().st_size for f in tree.rglob('*') if f.is_file()) / 2**20:.1f} MiB, "
        f"built by the simulated trainer in {build_seconds:.1f} s"
    )
    print(
        f"- one full scan of the tree in-process, CPU s over {cold.n} reps: cold (scan_root, no cache) "
        f"{fmt_summary(cold)}; warm (read_run with a ContentCache, as the daemon's periodic rescan) "
        f"{fmt_summary(warm)} -> {100 * warm.median / 60:.2f} % of a core at one rescan per 60 s"
    )
    for result in idle:
        print(f"- {result.mode}: log said `{_from_watching(result.watching_line)}`")
    print(f"- part took {time.monotonic() - part_started:.0f} s")
    print()
    raw["idle"] = [{**asdict(r), "cpu_percent": [s.cpu_percent for s in r.samples]} for r in idle]
    raw["full_scan_cpu_seconds"] = {"cold": asdict(cold), "warm": asdict(warm)}


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    saves = 6 if opts.quick else 24
    window = opts.window or (5.0 if opts.quick else 60.0)
    reps = opts.reps or (3 if opts.quick else 5)
    workdir = Path(tempfile.mkdtemp(prefix="ckptkeeper-bench-", dir=opts.workdir))
    load_start = load_average()
    started = time.monotonic()
    print_header(opts.quick, workdir)
    raw: dict[str, Any] = {"quick": opts.quick, "machine": machine_lines(workdir)}
    try:
        if opts.only in (None, "reaction"):
            raw["reaction"] = reaction_part(workdir, saves)
        if opts.only in (None, "idle", "idle-poll"):
            idle_part(workdir, opts.quick, window, reps, raw, poll_only=opts.only == "idle-poll")
        print(f"Total benchmark time: {time.monotonic() - started:.0f} s")
        print(f"Load average (1, 5, 15 min) at the start: {load_start}, at the end: {load_average()}")
        if opts.json:
            opts.json.write_text(json.dumps(raw, indent=2) + "\n")
    finally:
        if not opts.keep_files:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"(files kept in {workdir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
