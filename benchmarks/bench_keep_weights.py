"""Disk kept by `--keep-weights`: milestones kept whole against milestones kept as weights only.

    python -m benchmarks.bench_keep_weights [--quick] [--reps N] [--json FILE] [--workdir DIR] [--keep-files]

One run written by the simulated Trainer (ckptkeeper.simtrainer) with an Adam-like optimizer state:
`optimizer.pt` is twice `model.safetensors` (Adam keeps two float32 moments per float32 weight). Full mode:
10 epochs of 20 steps, a save and an eval every 10 steps (20 checkpoints), an 8 MiB model and a 16 MiB
optimizer state per checkpoint; --quick: 3 epochs of 10 steps, a save every 5 (6 checkpoints), 256 KiB and
512 KiB. Each repetition copies it (`cp -a`, real blocks, times kept) to two identical roots and runs the real
`ckptkeeper prune` command on each, as a user runs it (the console script beside sys.executable, or
`python -m ckptkeeper`; a new process, stdout and stderr captured):

- whole:        `ckptkeeper prune ROOT --keep last:2 --keep epoch:all`
- weights only: `ckptkeeper prune ROOT --keep last:2 --keep-weights epoch:all`

Disk: a du-like walk of each root (no links followed, each inode once), st_blocks * 512 ("disk") and
st_size ("apparent"), before and after. The milestones are the checkpoints the weights-only side marked
weights-only (`_ckptkeeper-weights-only.json`); their disk on that side is compared with the same
checkpoints on the whole side (expected: about a third), and the whole run's disk after each prune.
Time: each prune's wall time (time.perf_counter() around subprocess.run), `os.sync()` before each, the
order of the two sides rotating with the repetition; the ratio weights-only / whole of each repetition
(paired). Checks after each weights-only prune: each weight file (`*.safetensors`) of a milestone is the
same inode with the same size and SHA-256 as before, and the milestone directory's mtime is unchanged.
Figures: median [min, max] over the repetitions. Nothing is asserted about timings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.bench_startup import console_script
from benchmarks.common import filesystem_of, fmt, fmt_summary, load_average, machine_lines, markdown_table, summarize
from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.weights import MARKER

MiB = 1 << 20
RUN = "run"
SIDES = {
    "whole": ["--keep", "last:2", "--keep", "epoch:all"],
    "weights only": ["--keep", "last:2", "--keep-weights", "epoch:all"],
}


def sim_config(quick: bool) -> SimConfig:
    """Adam-like: optimizer.pt = 2 x the float32 weights (two moments per weight)."""
    floats = 64 * 1024 if quick else 2 * MiB  # 256 KiB / 8 MiB of float32 weights
    if quick:
        return SimConfig(
            steps_per_epoch=10, epochs=3, save_steps=5, eval_steps=5, model_floats=floats, optimizer_bytes=8 * floats
        )
    return SimConfig(
        steps_per_epoch=20, epochs=10, save_steps=10, eval_steps=10, model_floats=floats, optimizer_bytes=8 * floats
    )


# ---- du ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Usage:
    disk: int  # st_blocks * 512, as du
    apparent: int  # st_size, as du --apparent-size
    files: int

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.disk + other.disk, self.apparent + other.apparent, self.files + other.files)


def du(top: Path) -> Usage:
    """Every entry below `top` (directories included, as du), links not followed, each inode once."""
    seen: set[tuple[int, int]] = set()
    disk = apparent = files = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames, ""]:
            st = os.lstat(os.path.join(dirpath, name)) if name else os.lstat(dirpath)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            disk += st.st_blocks * 512
            apparent += st.st_size
            files += 0 if os.path.isdir(os.path.join(dirpath, name)) else 1
    return Usage(disk, apparent, files)


def checkpoints_of(run: Path) -> list[Path]:
    found = [p for p in run.iterdir() if p.name.startswith("checkpoint-") and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- one repetition -----------------------------------------------------------------------------------------
@dataclass
class Figures:
    seconds: dict[str, list[float]] = field(default_factory=lambda: {side: [] for side in SIDES})
    before: dict[str, Usage] = field(default_factory=dict)  # side -> the root before its prune
    after: dict[str, Usage] = field(default_factory=dict)  # side -> the root after its prune
    kept: dict[str, list[str]] = field(default_factory=dict)  # side -> checkpoint names left
    milestones: list[str] = field(default_factory=list)  # made weights only
    milestone_usage: dict[str, Usage] = field(default_factory=dict)  # side -> those checkpoints
    summaries: dict[str, str] = field(default_factory=dict)  # side -> the prune's "Done: ..." line
    weights_checked: int = 0  # weight files found the same inode, size and SHA-256
    times_checked: int = 0  # milestone directories whose mtime was unchanged

    def ratios(self) -> list[float]:
        return [w / h for w, h in zip(self.seconds["weights only"], self.seconds["whole"], strict=True)]


def prune_command(root: Path, side: str) -> list[str]:
    script = console_script()
    start = [str(script)] if script is not None else [sys.executable, "-m", "ckptkeeper"]
    return [*start, "prune", str(root), *SIDES[side]]


def run_prune(root: Path, side: str) -> tuple[float, str]:
    """The prune as a user runs it: its wall time, and the last line it printed."""
    os.sync()  # the copies' writeback is billed to no one
    started = time.perf_counter()
    done = subprocess.run(
        prune_command(root, side), check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"prune ({side}) exited with {done.returncode}:\n{done.stdout}{done.stderr}")
    return elapsed, done.stdout.strip().splitlines()[-1]


def weight_files(checkpoint: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (inode, size, directory mtime ns) for every weight file of a checkpoint."""
    mtime = checkpoint.lstat().st_mtime_ns
    return {p.name: (p.lstat().st_ino, p.lstat().st_size, mtime) for p in checkpoint.glob("*.safetensors")}


def check_milestones(run: Path, before: dict[str, dict[str, tuple[int, int, int]]], hashes: dict[str, str]) -> int:
    """Every weight file of each weights-only checkpoint: the same inode, size and bytes; the directory's
    mtime unchanged. Returns the number of weight files checked."""
    checked = 0
    for checkpoint in checkpoints_of(run):
        if not (checkpoint / MARKER).exists():
            continue
        now = weight_files(checkpoint)
        if now != before[checkpoint.name]:
            raise RuntimeError(f"{checkpoint}: weights or directory times changed: {before[checkpoint.name]} -> {now}")
        for name in now:
            if sha256(checkpoint / name) != hashes[f"{checkpoint.name}/{name}"]:
                raise RuntimeError(f"{checkpoint / name}: its bytes changed")
            checked += 1
    return checked


def repetition(template: Path, work: Path, rep: int, figures: Figures, hashes: dict[str, str]) -> None:
    roots: dict[str, Path] = {}
    for side in SIDES:  # both copies first
        root = work / f"{side.replace(' ', '-')}-{rep}"
        root.mkdir()
        subprocess.run(["cp", "-a", "--", str(template), str(root / RUN)], check=True)
        roots[side] = root
    before = {c.name: weight_files(c) for c in checkpoints_of(roots["weights only"] / RUN)}
    order = list(SIDES)[rep % 2 :] + list(SIDES)[: rep % 2]
    usage_before = {side: du(roots[side]) for side in SIDES}
    for side in order:
        seconds, summary = run_prune(roots[side], side)
        figures.seconds[side].append(seconds)
        figures.summaries[side] = summary
    weights_run = roots["weights only"] / RUN
    figures.weights_checked += check_milestones(weights_run, before, hashes)
    milestones = [c.name for c in checkpoints_of(weights_run) if (c / MARKER).exists()]
    figures.times_checked += len(milestones)
    if rep == 0:  # the disk figures are the same every repetition (same tree, same rules)
        figures.before = usage_before
        figures.after = {side: du(roots[side]) for side in SIDES}
        figures.kept = {side: [c.name for c in checkpoints_of(roots[side] / RUN)] for side in SIDES}
        figures.milestones = milestones
        figures.milestone_usage = {
            side: sum((du(roots[side] / RUN / name) for name in milestones), Usage(0, 0, 0)) for side in SIDES
        }
    for root in roots.values():
        shutil.rmtree(root)


# ---- report -------------------------------------------------------------------------------------------------
def mib(n: int) -> str:
    return f"{n / MiB:,.2f}"


def disk_table(f: Figures) -> str:
    whole, slim = f.after["whole"], f.after["weights only"]
    per_whole = f.milestone_usage["whole"].disk / max(1, len(f.milestones))
    per_slim = f.milestone_usage["weights only"].disk / max(1, len(f.milestones))
    rows = [
        ["the run before pruning", mib(f.before["whole"].disk), mib(f.before["weights only"].disk), "1"],
        [
            f"the {len(f.milestones)} milestones made weights only",
            mib(f.milestone_usage["whole"].disk),
            mib(f.milestone_usage["weights only"].disk),
            f"**{fmt(f.milestone_usage['weights only'].disk / f.milestone_usage['whole'].disk)}**",
        ],
        ["one milestone", mib(int(per_whole)), mib(int(per_slim)), fmt(per_slim / per_whole)],
        ["the whole run after pruning", mib(whole.disk), mib(slim.disk), f"**{fmt(slim.disk / whole.disk)}**"],
        [
            "the whole run, apparent size (st_size)",
            mib(whole.apparent),
            mib(slim.apparent),
            fmt(slim.apparent / whole.apparent),
        ],
    ]
    return markdown_table(["disk (du, MiB)", "whole (`--keep epoch:all`)", "weights only", "ratio"], rows)


def time_table(f: Figures) -> str:
    rows = [[side, fmt_summary(summarize(f.seconds[side]))] for side in SIDES]
    rows.append(["weights only / whole, paired", f"**{fmt_summary(summarize(f.ratios()))}**"])
    return markdown_table(["`ckptkeeper prune` (whole process)", "wall s, median [min, max]"], rows)


def print_header(quick: bool, work: Path, config: SimConfig, template: Path, built: float) -> None:
    usage = du(template)
    count = len(checkpoints_of(template))
    first = checkpoints_of(template)[0]
    model, optimizer = (first / "model.safetensors").stat().st_size, (first / "optimizer.pt").stat().st_size
    print("# Keep weights only benchmark" + (" (--quick)" if quick else ""))
    print()
    print("Machine:")
    print("\n".join(machine_lines(work)))
    print()
    print(
        f"The run: {count} checkpoints ({config.epochs} epochs of {config.steps_per_epoch} steps, a save every "
        f"{config.save_steps}), {mib(usage.disk)} MiB on disk; each checkpoint: model.safetensors "
        f"{mib(model)} MiB, optimizer.pt {mib(optimizer)} MiB ({optimizer / model:.2f}x), and the Trainer's "
        f"small files; written in {built:.1f} s."
    )
    print()
    sys.stdout.flush()


def print_results(f: Figures, reps: int) -> None:
    print("## Disk kept: `--keep last:2 --keep epoch:all` against `--keep last:2 --keep-weights epoch:all`")
    print()
    print(disk_table(f))
    print()
    for side, flags in SIDES.items():
        print(f"- {side}: `{' '.join(['ckptkeeper', 'prune', 'ROOT', *flags])}` kept {', '.join(f.kept[side])}")
        print(f"  and printed: {f.summaries[side]}")
    print(f"- made weights only: {', '.join(f.milestones)}")
    print()
    print(f"## Time of the two prunes ({reps} repetitions, each on a fresh copy)")
    print()
    print(time_table(f))
    print()
    print(f"- command: `{' '.join(prune_command(Path('ROOT'), 'weights only'))}`")
    print(
        f"- checks, over all repetitions: {f.weights_checked} weight files of weights-only checkpoints were the "
        f"same inode, size and SHA-256 after the prune as before; {f.times_checked} weights-only directories "
        "kept their mtime"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_keep_weights", description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 6-checkpoint run of 0.8 MiB checkpoints, 3 repetitions")
    parser.add_argument("--workdir", type=Path, help="where to build the trees (default: a new temp dir)")
    parser.add_argument("--json", type=Path, help="also write every raw figure to this file")
    parser.add_argument("--reps", type=int, help="repetitions (default 15; --quick: 3)")
    parser.add_argument("--keep-files", action="store_true", help="leave the work directory (the template) behind")
    return parser.parse_args(argv)


def raw_figures(f: Figures, opts: argparse.Namespace, reps: int, work: Path, config: SimConfig) -> dict[str, Any]:
    return {
        "quick": opts.quick,
        "reps": reps,
        "machine": machine_lines(work),
        "config": {k: v for k, v in asdict(config).items() if k != "nan_eval_steps"},
        "commands": {side: prune_command(Path("ROOT"), side) for side in SIDES},
        "seconds": f.seconds,
        "ratios_weights_only_over_whole": f.ratios(),
        "median_ratio": statistics.median(f.ratios()),
        "before": {side: asdict(u) for side, u in f.before.items()},
        "after": {side: asdict(u) for side, u in f.after.items()},
        "kept": f.kept,
        "milestones": f.milestones,
        "milestone_usage": {side: asdict(u) for side, u in f.milestone_usage.items()},
        "summaries": f.summaries,
        "weights_checked": f.weights_checked,
        "times_checked": f.times_checked,
    }


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    reps = opts.reps or (3 if opts.quick else 15)
    config = sim_config(opts.quick)
    work = Path(tempfile.mkdtemp(prefix="ckptkeeper-bench-keep-weights-", dir=opts.workdir))
    started = time.monotonic()
    load_start = load_average()
    try:
        template = work / "template" / RUN
        simulate_run(template, config)
        hashes = {f"{c.name}/{p.name}": sha256(p) for c in checkpoints_of(template) for p in c.glob("*.safetensors")}
        print_header(opts.quick, work, config, template, time.monotonic() - started)
        figures = Figures()
        for rep in range(reps):
            repetition(template, work, rep, figures, hashes)
        print_results(figures, reps)
        print(f"- trees on {filesystem_of(work)}")
        print()
        print(f"Total benchmark time: {time.monotonic() - started:.0f} s")
        print(f"Load average (1, 5, 15 min) at the start: {load_start}; at the end: {load_average()}")
        if opts.json:
            opts.json.write_text(json.dumps(raw_figures(figures, opts, reps, work, config), indent=2) + "\n")
    finally:
        if opts.keep_files:
            print(f"(files kept in {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
