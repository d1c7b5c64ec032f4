"""Shared helpers for the benchmarks: the machine, summary statistics, a `ckptkeeper watch` subprocess
whose log lines are timestamped as they arrive, its CPU time and memory from /proc, and markdown tables.

Linux only (/proc). Nothing here asserts a timing: the benchmarks print figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Where measured commands keep Python's bytecode (see command_env).
PYCACHE = Path(tempfile.gettempdir()) / "ckptkeeper-bench-pycache"
_warmed: set[str] = set()


def command_env() -> dict[str, str]:
    """The environment a measured command runs in: this one, with Python's bytecode cache, as a user has it
    after `pip install` (which compiles every module). Where PYTHONDONTWRITEBYTECODE is set (this
    project's development machines set it), every start would otherwise compile ckptkeeper's modules from
    source, about 45 ms that no installed copy pays. The cache is kept under PYCACHE
    (PYTHONPYCACHEPREFIX), so nothing is written beside the sources."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    return env


def warm_bytecode(python: str = sys.executable) -> None:
    """Compile, once per benchmark process and interpreter, what a command imports into PYCACHE (the first
    run with a new cache prefix compiles every module, third-party ones included)."""
    if python in _warmed:
        return
    modules = "ckptkeeper.cli, ckptkeeper.config, ckptkeeper.engine, ckptkeeper.render, ckptkeeper.watch"
    subprocess.run([python, "-c", f"import {modules}"], env=command_env(), check=True, capture_output=True)
    _warmed.add(python)


# ---- the options and header of a whole-command benchmark -------------------------------------------
def command_parser(
    module: str, doc: str | None, quick: str, reps: str, big: str | None = None
) -> argparse.ArgumentParser:
    """The options of a benchmark of whole commands: --quick, --reps, --workdir, --json (and --big)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=(doc or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    if big is not None:
        parser.add_argument("--big", action="store_true", help=big)
    parser.add_argument("--reps", type=int, help=reps)
    parser.add_argument("--workdir", type=Path, help="where the trees are built (default: the temp directory)")
    parser.add_argument("--json", type=Path, help="also write every raw figure to this file")
    return parser


def start_report(title: str, workdir: Path | None) -> Path:
    """Print the report's title and the machine; the directory to build trees in (made if missing)."""
    where = workdir or Path(tempfile.gettempdir())
    where.mkdir(parents=True, exist_ok=True)
    print(f"# {title}")
    print()
    print("Machine:")
    print("\n".join(machine_lines(where)))
    print()
    return where


# ---- the machine ---------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def filesystem_of(path: Path) -> str:
    """The mount (device and type) that holds `path`, from /proc/self/mounts."""
    best = ("", "?", "?")
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                device, mount, fstype, *_ = line.split()
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[0]):
                    best = (mount, device, fstype)
    except OSError:
        pass
    return f"{best[2]} ({best[1]} on {best[0]})"


def code_revision() -> str:
    """The project's git commit, and whether ckptkeeper/ has uncommitted changes (read-only git calls)."""
    project = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=project, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "ckptkeeper"],
            cwd=project,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" + uncommitted changes in ckptkeeper/" if dirty else "")


def machine_lines(workdir: Path) -> list[str]:
    mem_total = "?"
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                    break
    except OSError:
        pass
    return [
        f"- nproc: {os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})",
        f"- CPU model: {cpu_model()}",
        f"- memory: {mem_total}",
        f"- Python: {platform.python_version()} ({sys.executable})",
        f"- kernel: {platform.release()}",
        f"- watchdog: {package_version('watchdog')}, ckptkeeper: {package_version('ckptkeeper')}",
        f"- benchmark files on: {filesystem_of(workdir)}",
        f"- code: {code_revision()}",
    ]


def load_average() -> str:
    """Load average (1, 5, 15 min), and the share of the last minute some task waited for I/O (Linux PSI)."""
    text = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        with open("/proc/pressure/io", encoding="utf-8") as f:
            some = f.readline().split()
        text += f"; I/O pressure (some, avg60): {some[2].partition('=')[2]} %"
    except (OSError, IndexError):
        pass
    return text


# ---- statistics ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    p95: float
    minimum: float
    maximum: float

    def shifted(self, by: float) -> Summary:
        return Summary(self.n, self.median - by, self.p95 - by, self.minimum - by, self.maximum - by)

    def scaled(self, by: float) -> Summary:
        return Summary(self.n, self.median * by, self.p95 * by, self.minimum * by, self.maximum * by)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest value with at least `fraction` of the values at or below it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    return Summary(len(values), statistics.median(values), percentile(values, 0.95), min(values), max(values))


def fmt(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def fmt_summary(s: Summary, digits: int = 3) -> str:
    """`median [min, max]`."""
    return f"{fmt(s.median, digits)} [{fmt(s.minimum, digits)}, {fmt(s.maximum, digits)}]"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


# ---- /proc ---------------------------------------------------------------------------------------
def timed_process(argv: Sequence[str]) -> float:
    """Wall seconds of one process, as a user runs it (fork, exec, imports, work, exit), output discarded;
    a failure is an error (its stderr's tail in the message), never a figure. Run in `command_env()`: with
    Python's bytecode cache, as after `pip install`."""
    warm_bytecode()
    env = command_env()
    started = time.perf_counter()
    done = subprocess.run(
        list(argv), check=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{list(argv)[:4]} exited with {done.returncode}: {done.stderr.decode()[-500:]}")
    return elapsed


def timed_process_cpu(argv: Sequence[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one process as `timed_process` runs it; CPU is the user + system time of the process
    and of its own children (getrusage of the children waited for), which the load of other processes on a
    shared machine disturbs far less than the wall time."""
    import resource

    warm_bytecode()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = timed_process(argv)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def timed_first_line(argv: Sequence[str], stop_timeout: float = 15.0) -> tuple[float, float]:
    """(wall s, CPU s) of a long-running command (`ckptkeeper watch`) from its spawn to the first line it prints,
    on stdout or stderr (one pipe, read as it arrives): what a user waits for before it says anything. CPU is
    what every thread of the process had used when that line was read (/proc/PID/task/*/schedstat, ns), which
    unlike `timed_process_cpu` leaves out the interpreter's exit; on a loaded machine, where this process may
    read the line late, it also counts what the command did meanwhile. Then SIGTERM and wait, not counted; a command
    that exits before a line, prints none, or does not exit 0 once stopped is an error, never a figure."""
    warm_bytecode()
    started = time.perf_counter()
    proc = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=command_env()
    )
    assert proc.stdout is not None
    seen = b""
    while b"\n" not in seen:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        seen += chunk
    wall = time.perf_counter() - started
    cpu = _task_cpu_seconds(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=stop_timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    output = (seen + rest).decode("utf-8", "replace")
    if b"\n" not in seen or proc.returncode != 0:
        raise RuntimeError(f"{list(argv)[:4]} printed no line or exited with {proc.returncode}: {output[-500:]}")
    return wall, cpu


def _task_cpu_seconds(pid: int) -> float:
    """Time on a CPU of every thread of `pid` alive now (schedstat's first field, in ns); nan if it is gone."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return math.nan
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended
    return total / 1e9


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid` so far, in seconds (resolution 1/CLK_TCK)."""
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        text = f.read()
    fields = text.rpartition(")")[2].split()  # after "pid (comm)": state is field 3, utime 14, stime 15
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) and friends from /proc/<pid>/status, in KiB."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                found[key] = int(value.split()[0])
    return found


# ---- a `ckptkeeper watch` subprocess -------------------------------------------------------------
class WatchProcess:
    """`python -m ckptkeeper watch ...` as a real subprocess. A thread reads its stderr (the log) and
    stamps each line with time.monotonic() when it arrives."""

    def __init__(self, args: Sequence[str], cwd: Path | None = None) -> None:
        self.command = [sys.executable, "-m", "ckptkeeper", "watch", *args]
        warm_bytecode()
        env = {**command_env(), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            self.command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.started = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="watch-log-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append((time.monotonic(), line.rstrip("\n")))

    def snapshot(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.lines)

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for _, line in self.snapshot() if rx.search(line))

    def wait_for_line(self, pattern: str, timeout: float) -> tuple[float, str]:
        """The first log line matching `pattern` (its arrival time and text); RuntimeError on timeout or exit."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            lines = self.snapshot()
            for stamp, line in lines[seen:]:
                if rx.search(line):
                    return stamp, line
            seen = len(lines)
            if self.proc.poll() is not None:
                self._reader.join(1.0)
                if len(self.snapshot()) == seen:
                    raise RuntimeError(
                        f"watch exited with {self.proc.returncode} before logging /{pattern}/:\n" + self.log_tail()
                    )
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(f"no log line /{pattern}/ within {timeout:g} s:\n" + self.log_tail())
            time.sleep(0.02)

    def wait_quiet(self, quiet: float, timeout: float, cpu_below: float = 0.05) -> float:
        """Wait until no log line arrived for `quiet` seconds and the process used under `cpu_below` CPU
        seconds in the last of them. Returns when that happened (time.monotonic())."""
        deadline = time.monotonic() + timeout
        last_cpu = cpu_seconds(self.pid)
        last_cpu_at = time.monotonic()
        while True:
            time.sleep(0.1)
            now = time.monotonic()
            if self.proc.poll() is not None:
                raise RuntimeError(f"watch exited with {self.proc.returncode}:\n" + self.log_tail())
            lines = self.snapshot()
            last_line = lines[-1][0] if lines else self.started
            if now - last_cpu_at >= 1.0:
                cpu = cpu_seconds(self.pid)
                busy = cpu - last_cpu
                last_cpu, last_cpu_at = cpu, now
                if now - last_line >= quiet and busy < cpu_below:
                    return now
            if now > deadline:
                raise RuntimeError(f"watch did not go quiet within {timeout:g} s:\n" + self.log_tail())

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(line for _, line in self.snapshot()[-n:])

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait; SIGKILL only if it does not exit in time. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(2.0)
        return self.proc.returncode

    def __enter__(self) -> WatchProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def finish_report(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], raw: dict[str, Any]) -> None:
    """A report's table under its `## title`, its total time (raw["started"], a monotonic time), and its raw
    figures written to raw["json"] when given (with the machine's description from raw["workdir"])."""
    print(f"## {title}")
    print()
    print(markdown_table(headers, rows))
    print()
    print(f"Total benchmark time: {time.monotonic() - raw.pop('started'):.0f} s")
    json_path, workdir = raw.pop("json"), raw.pop("workdir")
    if json_path:
        json_path.write_text(json.dumps({**raw, "machine": machine_lines(workdir)}, indent=2) + "\n")
