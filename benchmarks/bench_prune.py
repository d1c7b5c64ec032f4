"""Benchmark `ckptkeeper prune` as a user runs it, against `rm -rf` of the same checkpoints (issue #12).

    python -m benchmarks.bench_prune [--quick] [--big] [--reps N] [--workdir DIR] [--json FILE]

Both sides remove every checkpoint but the newest of one run, each as one new process, timed around
subprocess.run (start-up, imports, scan, checks, journal and lock included for ckptkeeper):
`ckptkeeper prune ROOT --keep last:1 --no-protect-trainer-best` and `rm -rf` of the same directories. Each
repetition builds two identical copies of the tree (one per side) from a template made once, syncs, then
times the two in alternating order. Page cache warm (the trees were just written). Shapes:

- trainer: 200 Trainer-like checkpoints of 12 files each (the simulated Trainer's 7 and 5 tokenizer files);
- small files: 40 checkpoints that also hold 1,000 small files each;
- large: 4 checkpoints whose optimizer.pt is 1 GiB (`--big`; by default 256 MiB, `--quick` 16 MiB) of
  written data (each copy writes it again: the time to build the trees grows with it).

`--quick` shrinks every shape (the smoke run). Figures: median [min, max] seconds per side, and the ratio
prune / rm -rf of the medians with the [min, max] of the per-repetition ratios (target: at most 1.0x).
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import finish_report, fmt, fmt_summary, machine_lines, summarize, timed_process
from ckptkeeper.simtrainer import SimConfig, simulate_run

TARGET_RATIO = 1.0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "merges.txt")


@dataclass(frozen=True)
class Shape:
    name: str
    checkpoints: int
    small_files: int = 0  # extra small files in each checkpoint
    large_bytes: int = 0  # optimizer.pt made this large

    def describe(self) -> str:
        extra = f", {self.small_files} more small files each" if self.small_files else ""
        if self.large_bytes:
            extra += f", optimizer.pt of {self.large_bytes >> 20} MiB"
        return f"{self.name}: {self.checkpoints} checkpoints{extra}"


def shapes(quick: bool, big: bool) -> list[Shape]:
    if quick:
        return [Shape("trainer", 20), Shape("small files", 4, small_files=100), Shape("large", 3, large_bytes=16 << 20)]
    large = (1 << 30) if big else (256 << 20)
    return [Shape("trainer", 200), Shape("small files", 40, small_files=1000), Shape("large", 4, large_bytes=large)]


def template(shape: Shape, where: Path) -> Path:
    """One run of the shape, written once: the simulated Trainer's checkpoints, made to the shape."""
    run = where / f"template-{shape.name.replace(' ', '-')}" / "run"
    config = SimConfig(steps_per_epoch=10 * shape.checkpoints, epochs=1, save_steps=10, eval_steps=10)
    simulate_run(run, config)
    for step in steps(run):  # in step order: the newest written stays the highest step, as in a real run
        checkpoint = run / f"checkpoint-{step}"
        for name in TOKENIZER_FILES:
            (checkpoint / name).write_text('{"model": "bench"}\n')
        if shape.small_files:
            (checkpoint / "shards").mkdir()
            for i in range(shape.small_files):
                (checkpoint / "shards" / f"part-{i:05d}.json").write_text(f'{{"part": {i}}}\n')
        allocate(checkpoint / "optimizer.pt", shape.large_bytes)
    return run


def allocate(path: Path, size: int) -> None:
    """`path` made `size` bytes of written data (its mtime kept): freeing written blocks is what rm pays for,
    which preallocated (unwritten) extents would not show."""
    if not size:
        return
    times = os.stat(path).st_mtime_ns
    chunk = bytes(8 << 20)
    with open(path, "wb") as f:
        f.writelines(chunk for _ in range(size // len(chunk)))
        f.write(bytes(size % len(chunk)))
    os.utime(path, ns=(times, times))


def copy_of(run: Path, to: Path) -> Path:
    """A copy of the template, file times kept (the newest written is still the highest step)."""
    target = to / "outputs" / "run"
    shutil.copytree(run, target, symlinks=True)
    return target


def steps(run: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("checkpoint-")) for p in run.glob("checkpoint-*"))


def one_rep(run: Path, work: Path, prune_first: bool) -> tuple[float, float]:
    """(prune s, rm -rf s) over two fresh copies of `run`."""
    ours, theirs = copy_of(run, work / "prune"), copy_of(run, work / "rm")
    doomed = [str(theirs / f"checkpoint-{s}") for s in steps(theirs)[:-1]]
    os.sync()
    prune = [sys.executable, "-m", "ckptkeeper", "prune", str(ours.parent), "--keep", "last:1"]
    prune.append("--no-protect-trainer-best")
    sides = [("prune", prune), ("rm", ["rm", "-rf", "--", *doomed])]
    took = {name: timed_process(argv) for name, argv in (sides if prune_first else sides[::-1])}
    if steps(ours) != steps(theirs) or len(steps(ours)) != 1:
        raise RuntimeError(f"the two sides left {steps(ours)} and {steps(theirs)}")
    shutil.rmtree(work / "prune")
    shutil.rmtree(work / "rm")
    return took["prune"], took["rm"]


def measure(shape: Shape, reps: int, workdir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ckptkeeper-bench-prune-", dir=workdir) as tmp:
        run = template(shape, Path(tmp))
        results = [one_rep(run, Path(tmp) / "rep", prune_first=rep % 2 == 0) for rep in range(reps)]
    prune = [p for p, _ in results]
    rm = [r for _, r in results]
    return {"shape": shape.describe(), "prune_s": prune, "rm_rf_s": rm, "ratios": [p / r for p, r in results]}


def row(figures: dict[str, Any]) -> list[str]:
    prune, rm, ratios = summarize(figures["prune_s"]), summarize(figures["rm_rf_s"]), figures["ratios"]
    ratio = prune.median / rm.median
    verdict = "met" if ratio <= TARGET_RATIO else "**missed**"
    spread = f"[{fmt(min(ratios), 2)}, {fmt(max(ratios), 2)}]"
    return [figures["shape"], fmt_summary(rm), fmt_summary(prune), f"**{ratio:.2f}x** {spread}", verdict]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_prune", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 repetitions (the smoke run)")
    parser.add_argument("--big", action="store_true", help="the large shape with 1 GiB files, as the issue says")
    parser.add_argument("--reps", type=int, help="repetitions per shape (default 7; --quick: 3)")
    parser.add_argument("--workdir", type=Path, help="where the trees are built (default: the temp directory)")
    parser.add_argument("--json", type=Path, help="also write every raw figure to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    reps = opts.reps or (3 if opts.quick else 7)
    workdir = opts.workdir or Path(tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print("# `ckptkeeper prune` against `rm -rf`, whole commands" + (" (--quick)" if opts.quick else ""))
    print()
    print("Machine:")
    print("\n".join(machine_lines(workdir)))
    print()
    figures = [measure(shape, reps, workdir) for shape in shapes(opts.quick, opts.big)]
    title = f"Remove every checkpoint but the newest ({reps} repetitions, alternating order, median [min, max])"
    headers = ["shape", "rm -rf, s", "ckptkeeper prune, s", "prune / rm -rf", f"target <= {TARGET_RATIO:g}x"]
    raw = {"quick": opts.quick, "reps": reps, "shapes": figures, "started": started, "json": opts.json}
    finish_report(title, headers, [row(f) for f in figures], {**raw, "workdir": workdir})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
