"""Benchmark start-up time: `ckptkeeper --help`, `--version`, `plan`/`prune` of a root with one checkpoint, and
`watch` of it to its first log line, against `python -c pass`.

    python -m benchmarks.bench_startup [--quick] [--reps N] [--json FILE]

Each command runs as a new process, the way a user runs it: the `ckptkeeper` console script that sits
beside sys.executable (its shebang names the same interpreter), and `python -m ckptkeeper`. The baseline is
the same interpreter running `python -c pass`, so the interpreter's own start-up (and the site-packages
.pth files every process of this environment reads) is measured once and subtracted. Every command runs with
Python's bytecode cache, as after `pip install` (benchmarks.common.command_env); one row shows `plan` without it
(PYTHONDONTWRITEBYTECODE=1, as this project's development machines run everything). Each repetition runs
every command once, in a rotated order; a warm-up run of each comes first (page cache). The clock is
time.perf_counter() around subprocess.run (fork, exec, imports, output, exit), stdout and stderr to
/dev/null. `watch` never exits by itself: its clock runs from the spawn to the first line it prints (stdout
and stderr read from one pipe as they arrive: what a user sees first), then it is stopped (SIGTERM, wait),
not counted (benchmarks.common.timed_first_line); once with the default observer (inotify), once with `--poll 1`.
Figures: median [min, max], and median - baseline median (target: at most 0.25 s more for --help and --version,
0.15 s for the commands that do work).

It then runs `python -X importtime -m ckptkeeper --help` a few times and prints what the imports cost:
the 5 heaviest packages (self time summed over every module of the package) and the 5 heaviest single
imports by cumulative time, each as the median over those runs. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    command_env,
    fmt,
    fmt_summary,
    machine_lines,
    markdown_table,
    package_version,
    summarize,
    timed_first_line,
    timed_process_cpu,
)
from ckptkeeper.simtrainer import SimConfig, simulate_run

TARGET_OVER_BASELINE = 0.25  # s, for --help and --version: printed, never asserted
TARGET_WORK_OVER_BASELINE = 0.15  # s, for a command that does work (issue #12): printed, never asserted
WORK_PLAN = "ckptkeeper plan ROOT (1 checkpoint)"
WORK_PRUNE = "ckptkeeper prune ROOT (1 checkpoint)"
WORK_PLAN_UNCACHED = "ckptkeeper plan ROOT (1 checkpoint), no bytecode cache"
WORK_WATCH = "ckptkeeper watch ROOT (1 checkpoint), to its first log line"
WORK_WATCH_POLL = "ckptkeeper watch --poll 1 ROOT (1 checkpoint), to its first log line"
WORK = (WORK_PLAN, WORK_PRUNE, WORK_WATCH, WORK_WATCH_POLL)  # their target: TARGET_WORK_OVER_BASELINE
FIRST_LINE = {WORK_WATCH, WORK_WATCH_POLL}  # timed to their first line, then stopped
# As this project's development machines ran every command before the benchmarks gave them a bytecode cache
# (common.command_env): ckptkeeper's modules compiled from source at every start. (`env` costs an exec.)
UNCACHED = ["env", "-u", "PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE=1"]
IMPORTTIME_RUNS = 3


def console_script() -> Path | None:
    """The `ckptkeeper` script installed beside the interpreter, as a shell finds it in an activated venv."""
    beside = Path(sys.executable).parent / "ckptkeeper"
    if beside.is_file():
        return beside
    found = shutil.which("ckptkeeper")
    return Path(found) if found else None


def commands(root: Path) -> list[tuple[str, list[str]]]:
    """The baseline first; then ckptkeeper's commands, and `plan`/`prune`/`watch` of `root` (one checkpoint),
    which do work: read the checkpoint and check its files (prune and watch take the lock and write the state
    directory; watch starts its observer and says so in its first line)."""
    py = sys.executable
    cmds: list[tuple[str, list[str]]] = [("python -c pass (baseline)", [py, "-c", "pass"])]
    script = console_script()
    if script is not None:
        cmds += [("ckptkeeper --help", [str(script), "--help"]), ("ckptkeeper --version", [str(script), "--version"])]
        work = [str(root), "--keep", "last:1"]
        cmds += [
            (WORK_PLAN, [str(script), "plan", *work]),
            (WORK_PRUNE, [str(script), "prune", *work]),
            (WORK_PLAN_UNCACHED, [*UNCACHED, str(script), "plan", *work]),
            (WORK_WATCH, [str(script), "watch", *work]),
            (WORK_WATCH_POLL, [str(script), "watch", *work, "--poll", "1"]),
        ]
    cmds += [
        ("python -m ckptkeeper --help", [py, "-m", "ckptkeeper", "--help"]),
        ("python -m ckptkeeper --version", [py, "-m", "ckptkeeper", "--version"]),
    ]
    return cmds


def timed(label: str, argv: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one run: to the first line for `watch`, else to the exit."""
    return timed_first_line(argv) if label in FIRST_LINE else timed_process_cpu(argv)


def measure(cmds: list[tuple[str, list[str]]], reps: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds (user + system of the process and its children; for `watch`, of its threads until its
    first line) of every command, per repetition."""
    for label, argv in cmds:  # warm-up: page cache, .pyc files
        timed(label, argv)
    times: dict[str, list[float]] = {label: [] for label, _ in cmds}
    cpu: dict[str, list[float]] = {label: [] for label, _ in cmds}
    for rep in range(reps):
        shift = rep % len(cmds)
        for label, argv in cmds[shift:] + cmds[:shift]:
            wall, used = timed(label, argv)
            times[label].append(wall)
            cpu[label].append(used)
    return times, cpu


# ---- python -X importtime -------------------------------------------------------------------------
def parse_importtime(stderr: str) -> list[tuple[str, int, int]]:
    """(module, self us, cumulative us) for each `import time:` line, in the order printed."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line[len("import time:") :].split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue  # the header line
        rows.append((parts[2].strip(), int(parts[0]), int(parts[1])))
    return rows


def importtime_rows(args: list[str]) -> list[tuple[str, int, int]]:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        env=command_env(),
        check=False,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return parse_importtime(done.stderr.decode("utf-8", "replace"))


@dataclass(frozen=True)
class ImportProfile:
    """Medians over several `-X importtime` runs, in ms."""

    self_ms: dict[str, float]  # module -> its own import time
    cumulative_ms: dict[str, float]  # module -> with everything it imported
    total_ms: float  # sum of every self time

    def heaviest_packages(self, skip: set[str], n: int = 5) -> list[tuple[str, float]]:
        """Self time summed per top-level package, over the modules not in `skip`."""
        packages: dict[str, float] = defaultdict(float)
        for name, ms in self.self_ms.items():
            if name not in skip:
                packages[name.split(".")[0]] += ms
        return sorted(packages.items(), key=lambda x: -x[1])[:n]

    def heaviest_imports(self, skip: set[str], n: int = 5) -> list[tuple[str, float]]:
        return sorted(((k, v) for k, v in self.cumulative_ms.items() if k not in skip), key=lambda x: -x[1])[:n]


def importtime_profile(args: list[str], runs: int) -> ImportProfile:
    self_ms: dict[str, list[float]] = defaultdict(list)
    cumulative_ms: dict[str, list[float]] = defaultdict(list)
    totals = []
    importtime_rows(args)  # warm-up
    for _ in range(runs):
        rows = importtime_rows(args)
        for name, self_us, cumulative_us in rows:
            self_ms[name].append(self_us / 1000)
            cumulative_ms[name].append(cumulative_us / 1000)
        totals.append(sum(self_us for _, self_us, _ in rows) / 1000)
    return ImportProfile(
        {k: statistics.median(v) for k, v in self_ms.items()},
        {k: statistics.median(v) for k, v in cumulative_ms.items()},
        statistics.median(totals),
    )


# ---- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_startup", description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 repetitions instead of 30")
    parser.add_argument("--reps", type=int, help="repetitions of each command (default 30; --quick: 10)")
    parser.add_argument("--json", type=Path, help="also write every raw figure to this file")
    return parser.parse_args(argv)


def print_header(quick: bool) -> Path | None:
    """Print the report's title and machine; the console script measured, if there is one."""
    print("# Start-up time benchmark" + (" (--quick)" if quick else ""))
    print()
    print("Machine:")
    print("\n".join(machine_lines(Path(sys.executable).parent)))
    print(f"- click: {package_version('click')}, pydantic: {package_version('pydantic')}")
    print()
    script = console_script()
    if script is None:
        print("(no `ckptkeeper` console script beside the interpreter or on PATH: measuring `python -m` only)")
        print()
    sys.stdout.flush()
    return script


def wall_time_rows(
    cmds: list[tuple[str, list[str]]], times: dict[str, list[float]], cpu: dict[str, list[float]]
) -> list[list[str]]:
    """One row per command: its wall time, and (but for the first, the baseline) how much more it takes; the
    same for CPU time (steadier where other processes share the machine)."""
    baseline_label = cmds[0][0]
    baseline, baseline_cpu = summarize(times[baseline_label]), summarize(cpu[baseline_label])
    rows = []
    for label, _ in cmds:
        s, c = summarize(times[label]), summarize(cpu[label])
        if label == baseline_label:
            rows.append([label, fmt_summary(s), "-", "-", fmt_summary(c), "-"])
            continue
        over = s.median - baseline.median
        target = TARGET_WORK_OVER_BASELINE if label.startswith(WORK) else TARGET_OVER_BASELINE
        verdict = "met" if over <= target else "**missed**"
        cpu_over = f"+{fmt(c.median - baseline_cpu.median)}"
        rows.append([label, fmt_summary(s), f"+{fmt(over)}", f"<= +{target:g} s: {verdict}", fmt_summary(c), cpu_over])
    return rows


def print_wall_times(rows: list[list[str]], reps: int, script: Path | None) -> None:
    print(f"## Wall time per process start, s ({reps} repetitions each, median [min, max])")
    print()
    headers = ["command", "wall s", "median - baseline", "target", "CPU s", "CPU median - baseline"]
    print(markdown_table(headers, rows))
    print()
    if script is not None:
        print(f"- console script: {script}")
    print(f"- interpreter: {sys.executable}")
    print()


def importtime_part() -> dict[str, Any]:
    """Profile the imports of `ckptkeeper --help` against `python -c pass`, report; the raw figures."""
    profile = importtime_profile(["-m", "ckptkeeper", "--help"], IMPORTTIME_RUNS)
    base_profile = importtime_profile(["-c", "pass"], IMPORTTIME_RUNS)
    in_baseline = set(base_profile.self_ms)
    added_ms = sum(ms for name, ms in profile.self_ms.items() if name not in in_baseline)
    packages = profile.heaviest_packages(in_baseline)
    modules = profile.heaviest_imports(in_baseline)
    print(f"## `python -X importtime -m ckptkeeper --help` (median of {IMPORTTIME_RUNS} runs)")
    print()
    print(
        f"Sum of every import's self time: {profile.total_ms:.1f} ms; `python -c pass` imports "
        f"{len(in_baseline)} modules for {base_profile.total_ms:.1f} ms (site, the .pth files). The "
        f"{len(set(profile.self_ms) - in_baseline)} modules only ckptkeeper imports take {added_ms:.1f} ms "
        "(-X importtime itself inflates these). The 5 heaviest of them:"
    )
    print()
    print(markdown_table(["package (self time of its modules)", "ms"], [[n, f"{ms:.1f}"] for n, ms in packages]))
    print()
    print(markdown_table(["single import (cumulative)", "ms"], [[n, f"{ms:.1f}"] for n, ms in modules]))
    print()
    return {
        "runs": IMPORTTIME_RUNS,
        "total_self_ms": profile.total_ms,
        "python_c_pass_self_ms": base_profile.total_ms,
        "added_self_ms": added_ms,
        "heaviest_packages_self_ms": packages,
        "heaviest_imports_cumulative_ms": modules,
    }


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    reps = opts.reps or (10 if opts.quick else 30)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ckptkeeper-bench-startup-") as work:
        root = Path(work) / "outputs"
        simulate_run(root, SimConfig(steps_per_epoch=10, epochs=1))
        cmds = commands(root)
        script = print_header(opts.quick)
        times, cpu = measure(cmds, reps)
    print_wall_times(wall_time_rows(cmds, times, cpu), reps, script)
    importtime = importtime_part()
    print(f"Total benchmark time: {time.monotonic() - started:.0f} s")

    if opts.json:
        raw: dict[str, Any] = {
            "quick": opts.quick,
            "reps": reps,
            "machine": machine_lines(Path(sys.executable).parent),
            "commands": dict(cmds),
            "seconds": times,
            "cpu_seconds": cpu,
            "baseline": cmds[0][0],
            "target_over_baseline_s": TARGET_OVER_BASELINE,
            "target_work_over_baseline_s": TARGET_WORK_OVER_BASELINE,
            "work": [label for label in WORK if label in times],
            "to_first_line": sorted(FIRST_LINE & set(times)),
            "importtime": importtime,
        }
        opts.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
