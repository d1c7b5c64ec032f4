"""What disk pressure (`--min-free`) costs a user: `ckptkeeper plan` and `ckptkeeper watch`, as whole commands.

    python -m benchmarks.bench_pressure [--quick] [--reps N] [--json FILE] [--workdir DIR] [--keep-files]

The tree: 20 runs of 50 checkpoints each (--quick: 4 x 10) written by the simulated Trainer
(ckptkeeper.simtrainer): 10 epochs of 50 steps, a save and an eval every 10 steps, small files (a 1 KiB
model, a 1 KiB optimizer.pt, the Trainer's other files); every run finished (its last checkpoint says
should_training_stop), so no run is counted as still training in part 1. Keep rules: `best:1,last:5,epoch:all`.

1. `ckptkeeper plan ROOT --keep best:1,last:5,epoch:all` (the baseline) against the same command plus
   `--min-free 1 --keep-under-pressure best:1,last:2` (a 1-byte floor: never under pressure, so the cost is
   measuring the filesystems and judging them) and plus `--min-free 99% --keep-under-pressure best:1,last:2`
   (always under pressure: every checkpoint the pressure rules allow is released, and the floor still cannot be
   met). Each is a new process as a user runs it (the console script beside sys.executable, or
   `python -m ckptkeeper`), stdout and stderr captured, its wall time taken by time.perf_counter() around
   subprocess.run. One untimed `--json` run of each first (a warm-up, and the figures of what each plans),
   then N repetitions, the order of the three rotating with the repetition. Ratio: each side over the
   baseline of the same repetition (paired).
2. `ckptkeeper watch ROOT --keep best:1,last:5,epoch:all --settle 0` with and without
   `--min-free 1 --keep-under-pressure best:1,last:2`. The tree is first pruned once by the same rules
   (`ckptkeeper prune`: the steady state a daemon keeps), and one more run, `live`, gets 5 checkpoints from
   a simulated Trainer that goes on saving (never finished: it counts as still training). Each repetition
   starts one daemon per side (order rotating; benchmarks.common.WatchProcess, a real subprocess whose log
   lines are stamped on arrival), waits for its startup reconcile to go quiet, then lets the trainer save one
   checkpoint at a time (5 per daemon; --quick: 2). The clock starts when the save returns
   (trainer_state.json closed; time.monotonic()) and stops at the arrival of the log line
   `live/checkpoint-N kept: ...`, and, when the checkpoint falling out of `last:5` is not the best (which
   stays), at its `... deleted: ...` line. `--settle 0`: a checkpoint counts as soon as its checks pass, so
   the figure is the daemon's work (events, debounce of 0.05 s, scan, plan, act), not a wait. The other runs
   do not change; with --min-free every pass also plans every other known run (scanned from the content
   cache). Between saves the daemon must go quiet (no log line and under 0.02 CPU s for 0.5 s);
   its CPU time (/proc/<pid>/stat) from just before each save to then is the CPU of that save.

Every CKPTKEEPER_* variable is left out of the commands' environment (flags alone make the difference).
Figures: median [min, max]; a line that never came is a miss and is counted as such. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.bench_startup import console_script
from benchmarks.common import (
    WatchProcess,
    cpu_seconds,
    filesystem_of,
    fmt,
    fmt_summary,
    load_average,
    machine_lines,
    markdown_table,
    summarize,
)
from ckptkeeper.simtrainer import SaveEvent, SimConfig, SimulatedTrainer, simulate_run

KEEP = "best:1,last:5,epoch:all"
UNDER = "best:1,last:2"
LAST = 5  # the N of last:N in KEEP
BASELINE = "baseline"
NO_PRESSURE = "--min-free 1"
PRESSURE = "--min-free 99%"
PLAN_SIDES = {
    BASELINE: [],
    NO_PRESSURE: ["--min-free", "1", "--keep-under-pressure", UNDER],
    PRESSURE: ["--min-free", "99%", "--keep-under-pressure", UNDER],
}
WATCH_SIDES = {side: PLAN_SIDES[side] for side in (BASELINE, NO_PRESSURE)}
SETTLE = 0.0
LIVE = "live"
SAVE_STEPS = 10
LINE_TIMEOUT = 30.0  # s: a line not seen by then is a miss
QUIET = 0.5  # s without a log line (and almost no CPU) before the next save
CPU_QUIET = 0.02  # CPU s in those QUIET s (two clock ticks)


def run_config(seed: int, checkpoints: int) -> SimConfig:
    """Five saves (and evals) per epoch of 50 steps: `checkpoints` of them, the last one final."""
    return SimConfig(
        steps_per_epoch=5 * SAVE_STEPS,
        epochs=checkpoints // 5,
        save_steps=SAVE_STEPS,
        eval_steps=SAVE_STEPS,
        logging_steps=SAVE_STEPS,
        model_floats=256,
        optimizer_bytes=1024,
        seed=seed,
    )


# The live run: one epoch longer than the benchmark lasts (epoch:all keeps only its newest), an eval per save.
LIVE_CONFIG = SimConfig(
    steps_per_epoch=1_000_000,
    epochs=1,
    save_steps=SAVE_STEPS,
    eval_steps=SAVE_STEPS,
    logging_steps=SAVE_STEPS,
    model_floats=256,
    optimizer_bytes=1024,
    seed=12345,
)


def command(verb: str, root: Path, side: str) -> list[str]:
    script = console_script()
    start = [str(script)] if script is not None else [sys.executable, "-m", "ckptkeeper"]
    return [*start, verb, str(root), "--keep", KEEP, *PLAN_SIDES[side]]


def shown_command(verb: str, side: str) -> str:
    return " ".join(["ckptkeeper", verb, "ROOT", "--keep", KEEP, *PLAN_SIDES[side]])


def run_command(args: list[str]) -> tuple[float, str]:
    """A command as a user runs it: its wall time and its stdout; RuntimeError unless it exits 0."""
    started = time.perf_counter()
    done = subprocess.run(args, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {done.returncode}:\n{done.stdout}{done.stderr}")
    return elapsed, done.stdout


# ---- 1. plan ------------------------------------------------------------------------------------------------
@dataclass
class PlanFigures:
    seconds: dict[str, list[float]] = field(default_factory=lambda: {side: [] for side in PLAN_SIDES})
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)  # side -> the plan's JSON "summary"
    pressure: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # side -> its "disk_pressure"

    def ratios(self, side: str) -> list[float]:
        return [s / b for s, b in zip(self.seconds[side], self.seconds[BASELINE], strict=True)]


def plan_part(root: Path, reps: int) -> PlanFigures:
    figures = PlanFigures()
    for side in PLAN_SIDES:  # untimed: a warm-up, and what each side plans
        _, out = run_command([*command("plan", root, side), "--json"])
        doc = json.loads(out)
        figures.summary[side] = doc["summary"]
        figures.pressure[side] = doc.get("disk_pressure") or []
    sides = list(PLAN_SIDES)
    for rep in range(reps):
        for side in sides[rep % len(sides) :] + sides[: rep % len(sides)]:
            seconds, _ = run_command(command("plan", root, side))
            figures.seconds[side].append(seconds)
    return figures


def plan_what(figures: PlanFigures, side: str) -> str:
    s = figures.summary[side]
    text = f"keeps {s['kept']}, removes {s['removed']}"
    for p in figures.pressure[side]:
        state = "under pressure" if p["under_pressure"] else "no pressure"
        text += f"; {state}, {len(p['released'])} released"
        text += "" if p["floor_met"] else ", floor not met"
    return text


def plan_table(figures: PlanFigures) -> str:
    rows = []
    for side in PLAN_SIDES:
        ratio = "1" if side == BASELINE else f"**{fmt_summary(summarize(figures.ratios(side)))}**"
        rows.append(
            [
                f"`{shown_command('plan', side)}`",
                plan_what(figures, side),
                fmt_summary(summarize(figures.seconds[side])),
                ratio,
            ]
        )
    return markdown_table(["command", "what it plans", "wall s, median [min, max]", "ratio to baseline, paired"], rows)


# ---- 2. watch -----------------------------------------------------------------------------------------------
class _Stop(Exception):
    """Ends the live trainer's thread."""


class LiveTrainer:
    """SimulatedTrainer.train on a thread that saves one checkpoint each time it is asked: `save()` lets it run to
    its next save and returns the step and time.monotonic() right after that save returned."""

    def __init__(self, run: Path, config: SimConfig) -> None:
        self.trainer = SimulatedTrainer(run, config)
        self._go = threading.Semaphore(0)
        self._saved: queue.Queue[tuple[int, float] | BaseException] = queue.Queue()
        self._stopping = False
        self._thread = threading.Thread(target=self._train, name="live-trainer", daemon=True)

    def _on_save(self, event: SaveEvent) -> None:
        self._saved.put((event.step, time.monotonic()))  # trainer_state.json is closed: the save has returned
        self._go.acquire()
        if self._stopping:
            raise _Stop

    def _train(self) -> None:
        try:
            self.trainer.train(on_save=self._on_save)
        except _Stop:
            pass
        except BaseException as e:
            self._saved.put(e)

    def save(self) -> tuple[int, float]:
        if self._thread.is_alive():
            self._go.release()
        else:
            self._thread.start()
        item = self._saved.get(timeout=60)
        if isinstance(item, BaseException):
            raise RuntimeError("the live trainer failed") from item
        return item

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stopping = True
            self._go.release()
            self._thread.join(10)


@dataclass
class WatchSide:
    kept: list[list[float]] = field(default_factory=list)  # per repetition: save -> "kept" line, s
    deleted: list[list[float]] = field(default_factory=list)  # per repetition: save -> "deleted" line, s
    cpu: list[float] = field(default_factory=list)  # daemon CPU s per save (to quiet)
    missed_kept: int = 0
    missed_deleted: int = 0
    best_stayed: int = 0  # saves whose checkpoint out of last:N was the best: no deletion expected
    pressure_lines: int = 0  # "disk pressure" log lines (none expected: a 1-byte floor)
    exit_codes: list[int] = field(default_factory=list)
    watching_line: str = ""

    def all_kept(self) -> list[float]:
        return [x for rep in self.kept for x in rep]

    def all_deleted(self) -> list[float]:
        return [x for rep in self.deleted for x in rep]


def prepare_watch_root(root: Path) -> tuple[LiveTrainer, str]:
    """Prune the tree once (the daemon's steady state) and start the live run with LAST checkpoints."""
    _, out = run_command(command("prune", root, BASELINE))
    live = LiveTrainer(root / LIVE, LIVE_CONFIG)
    for _ in range(LAST):
        live.save()
    return live, out.strip().splitlines()[-1]


def go_quiet(watch: WatchProcess, quiet: float, timeout: float) -> None:
    """Wait until, for `quiet` seconds, no log line arrived and the daemon used under CPU_QUIET CPU seconds.
    (WatchProcess.wait_quiet judges CPU over whole seconds: at least 1 s per save.)"""
    deadline = time.monotonic() + timeout
    since, cpu = time.monotonic(), cpu_seconds(watch.pid)
    while True:
        time.sleep(0.05)
        now = time.monotonic()
        if watch.proc.poll() is not None or now > deadline:
            raise RuntimeError(f"watch did not go quiet (exit code {watch.proc.returncode}):\n" + watch.log_tail())
        lines = watch.snapshot()
        if (lines and lines[-1][0] > since) or cpu_seconds(watch.pid) - cpu >= CPU_QUIET:
            since, cpu = now, cpu_seconds(watch.pid)  # not quiet: the window starts again
        elif now - since >= quiet:
            return


def one_save(watch: WatchProcess, live: LiveTrainer, side: WatchSide, kept: list[float], deleted: list[float]) -> None:
    run = live.trainer.output_dir
    steps = sorted(
        int(p.name[11:]) for p in run.iterdir() if p.name.startswith("checkpoint-") and p.name[11:].isdigit()
    )
    cpu0 = cpu_seconds(watch.pid)
    step, saved_at = live.save()
    doomed = steps[-LAST] if len(steps) >= LAST else None  # the checkpoint falling out of last:N
    try:
        stamp, _ = watch.wait_for_line(rf"(?<![\w/]){LIVE}/checkpoint-{step} kept: ", LINE_TIMEOUT)
        kept.append(stamp - saved_at)
    except RuntimeError:
        side.missed_kept += 1
    if doomed is not None and doomed == live.trainer.best_step:
        side.best_stayed += 1
    elif doomed is not None:
        try:
            stamp, _ = watch.wait_for_line(rf"(?<![\w/]){LIVE}/checkpoint-{doomed} deleted: ", LINE_TIMEOUT)
            deleted.append(stamp - saved_at)
        except RuntimeError:
            side.missed_deleted += 1
    go_quiet(watch, QUIET, timeout=120)
    side.cpu.append(cpu_seconds(watch.pid) - cpu0)


def watch_once(root: Path, live: LiveTrainer, name: str, side: WatchSide, saves: int) -> None:
    args = [str(root), "--keep", KEEP, "--settle", f"{SETTLE:g}", *WATCH_SIDES[name]]
    kept: list[float] = []
    deleted: list[float] = []
    with WatchProcess(args) as watch:
        _, side.watching_line = watch.wait_for_line(r"\bwatching ", timeout=60)
        go_quiet(watch, QUIET, timeout=120)
        for _ in range(saves):
            one_save(watch, live, side, kept, deleted)
        side.exit_codes.append(watch.stop())
        side.pressure_lines += watch.count(r"disk pressure")
    side.kept.append(kept)
    side.deleted.append(deleted)


def watch_part(root: Path, reps: int, saves: int) -> tuple[dict[str, WatchSide], str, int]:
    live, pruned = prepare_watch_root(root)
    known = sum(1 for p in root.glob("*/checkpoint-*"))
    sides = {name: WatchSide() for name in WATCH_SIDES}
    names = list(WATCH_SIDES)
    try:
        for rep in range(reps):
            for name in names[rep % 2 :] + names[: rep % 2]:
                watch_once(root, live, name, sides[name], saves)
    finally:
        live.stop()
    return sides, pruned, known


def paired(sides: dict[str, WatchSide], kind: str) -> list[float]:
    """Per repetition: the median of --min-free's saves over the baseline's."""
    base, other = getattr(sides[BASELINE], kind), getattr(sides[NO_PRESSURE], kind)
    return [statistics.median(o) / statistics.median(b) for b, o in zip(base, other, strict=True) if b and o]


def watch_table(sides: dict[str, WatchSide], saves: int) -> str:
    rows = []
    for name, s in sides.items():
        ratio_kept = "1" if name == BASELINE else f"**{fmt_summary(summarize(paired(sides, 'kept')))}**"
        ratio_deleted = "1" if name == BASELINE else fmt_summary(summarize(paired(sides, "deleted")))
        rows.append(
            [
                f"`{' '.join(['ckptkeeper watch ROOT --keep', KEEP, '--settle 0', *WATCH_SIDES[name]])}`",
                f"{len(s.all_kept())}/{len(s.kept) * saves}, {s.missed_kept} missed",
                fmt_summary(summarize(s.all_kept())),
                ratio_kept,
                f"{len(s.all_deleted())}, {s.missed_deleted} missed, {s.best_stayed} best stayed",
                fmt_summary(summarize(s.all_deleted())),
                ratio_deleted,
                fmt_summary(summarize(s.cpu)),
            ]
        )
    return markdown_table(
        [
            "daemon",
            "kept lines/saves",
            "save → `kept` line, s",
            "ratio to baseline, paired",
            "deletions",
            "save → `deleted` line, s",
            "ratio to baseline, paired",
            "daemon CPU s per save",
        ],
        rows,
    )


# ---- report -------------------------------------------------------------------------------------------------
def build_tree(root: Path, runs: int, checkpoints: int) -> float:
    started = time.perf_counter()
    for i in range(runs):
        simulate_run(root / f"run-{i:02d}", run_config(seed=i, checkpoints=checkpoints))
    return time.perf_counter() - started


def print_header(quick: bool, work: Path, runs: int, checkpoints: int, built: float, root: Path) -> None:
    files = sum(1 for p in root.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print("# Disk pressure benchmark" + (" (--quick)" if quick else ""))
    print()
    print("Machine:")
    print("\n".join(machine_lines(work)))
    print()
    print(
        f"The tree: {runs} runs x {checkpoints} checkpoints ({runs * checkpoints}), {files} files, "
        f"{size / 2**20:.1f} MiB, written by the simulated Trainer in {built:.1f} s; every run finished."
    )
    print()
    sys.stdout.flush()


def print_plan(figures: PlanFigures, reps: int) -> None:
    print(f"## 1. `ckptkeeper plan` with and without `--min-free` ({reps} repetitions, interleaved)")
    print()
    print(plan_table(figures))
    print()
    for side in (NO_PRESSURE, PRESSURE):
        for p in figures.pressure[side]:
            print(f"- {side}: {p['text']}")
    print()
    sys.stdout.flush()


def print_watch(sides: dict[str, WatchSide], reps: int, saves: int, pruned: str, known: int) -> None:
    print(
        f"## 2. `ckptkeeper watch`: reaction to one new checkpoint, with and without `--min-free` "
        f"({reps} repetitions x {saves} saves, one daemon per side and repetition, interleaved)"
    )
    print()
    print(watch_table(sides, saves))
    print()
    print(
        f"- `--settle {SETTLE:g}`; the tree pruned once first (`{shown_command('prune', BASELINE)}`: {pruned}); "
        f"then {known} checkpoints in all, the live run's {LAST} included"
    )
    base, other = sides[BASELINE], sides[NO_PRESSURE]
    both = base.all_kept() and other.all_kept()
    ratio = statistics.median(other.all_kept()) / statistics.median(base.all_kept()) if both else float("nan")
    print(f"- ratio of the medians over all saves (kept line): {fmt(ratio)}")
    for name, s in sides.items():
        print(
            f"- {name}: exit codes after SIGTERM {sorted(set(s.exit_codes))}; {s.pressure_lines} 'disk pressure' "
            f"log lines; log said `{s.watching_line[s.watching_line.find('watching') :]}`"
        )
    print()
    sys.stdout.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_pressure", description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 4 x 10 tree, 2 repetitions, 2 saves per daemon")
    parser.add_argument("--workdir", type=Path, help="where to build the tree (default: a new temp dir)")
    parser.add_argument("--json", type=Path, help="also write every raw figure to this file")
    parser.add_argument("--reps", type=int, help="repetitions (default 7; --quick: 2)")
    parser.add_argument("--keep-files", action="store_true", help="leave the work directory (the tree) behind")
    return parser.parse_args(argv)


def raw_figures(plan: PlanFigures, sides: dict[str, WatchSide], opts: argparse.Namespace, reps: int) -> dict[str, Any]:
    return {
        "quick": opts.quick,
        "reps": reps,
        "plan": {
            "commands": {side: shown_command("plan", side) for side in PLAN_SIDES},
            "seconds": plan.seconds,
            "ratios_over_baseline": {side: plan.ratios(side) for side in PLAN_SIDES if side != BASELINE},
            "summary": plan.summary,
            "disk_pressure": plan.pressure,
        },
        "watch": {
            "settle": SETTLE,
            "sides": {name: {**asdict(s), "args": WATCH_SIDES[name]} for name, s in sides.items()},
            "ratios_kept": paired(sides, "kept"),
            "ratios_deleted": paired(sides, "deleted"),
        },
    }


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # The commands are compared as flags make them: no setting may come from the environment (CKPTKEEPER_MIN_FREE...).
    dropped = sorted(name for name in os.environ if name.startswith("CKPTKEEPER_"))
    for name in dropped:
        del os.environ[name]
    reps = opts.reps or (2 if opts.quick else 7)
    runs, checkpoints = (4, 10) if opts.quick else (20, 50)
    saves = 2 if opts.quick else 5
    work = Path(tempfile.mkdtemp(prefix="ckptkeeper-bench-pressure-", dir=opts.workdir))
    started = time.monotonic()
    load_start = load_average()
    try:
        root = work / "tree"
        built = build_tree(root, runs, checkpoints)
        print_header(opts.quick, work, runs, checkpoints, built, root)
        if dropped:
            print(f"(left out of the commands' environment: {', '.join(dropped)})\n")
        plan = plan_part(root, reps)
        print_plan(plan, reps)
        sides, pruned, known = watch_part(root, reps, saves)
        print_watch(sides, reps, saves, pruned, known)
        print(f"- tree on {filesystem_of(work)}")
        print()
        print(f"Total benchmark time: {time.monotonic() - started:.0f} s")
        print(f"Load average (1, 5, 15 min) at the start: {load_start}; at the end: {load_average()}")
        if opts.json:
            raw = {**raw_figures(plan, sides, opts, reps), "machine": machine_lines(work)}
            opts.json.write_text(json.dumps(raw, indent=2) + "\n")
    finally:
        if opts.keep_files:
            print(f"(files kept in {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
