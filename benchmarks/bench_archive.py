"""Benchmark `ckptkeeper prune --archive-to` another filesystem as a user runs it, against
`cp -a && sync -f && rm -rf` of the same checkpoints (issue #12, target 5), both whole commands.

    python -m benchmarks.bench_archive [--quick] [--big] [--reps N] [--workdir DIR] [--json FILE]

The run: checkpoints of the simulated Trainer that also hold many small files (a `shards/` directory of
1,000 files of ~12 bytes; `--big`: 3,000, the shape of bench_actions' "many small files"), on the
benchmark's disk; the archive: a tmpfs mounted for the benchmark (root only). 5 checkpoints (`--quick`: 3);
every one but the newest is archived. Each repetition makes two fresh copies of the run and times, in
alternating order, each as one new process:

- `ckptkeeper prune ROOT --keep last:1 --no-protect-trainer-best --archive-to TMPFS/ours` (copy under a
  temporary name, fsync, verify, rename into place, then the source through the trash);
- `sh -c 'cp -a CKPT... TMPFS/theirs/run/ && sync -f TMPFS/theirs/run && rm -rf CKPT...'`.

Figures: median [min, max] s per side, the per-repetition ratio prune / baseline. Target: at most 1.3x.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_actions import tmpfs_mount
from benchmarks.bench_prune import Shape, copy_of, steps, template
from benchmarks.common import (
    command_parser,
    fmt,
    fmt_summary,
    load_average,
    markdown_table,
    start_report,
    summarize,
    timed_process_cpu,
)

TARGET_RATIO = 1.3
BASELINE = 'dst="$1"; shift; cp -a "$@" "$dst/" && sync -f "$dst" && rm -rf "$@"'


def shape(quick: bool, big: bool) -> Shape:
    return Shape("small files", 3 if quick else 5, small_files=3000 if big else (200 if quick else 1000))


def one_rep(run: Path, work: Path, archive: Path, prune_first: bool) -> tuple[tuple[float, float], tuple[float, float]]:
    """((prune wall s, CPU s), (baseline wall s, CPU s)) over two fresh copies of `run`, archiving to two
    directories of `archive`."""
    ours, theirs = copy_of(run, work / "prune"), copy_of(run, work / "cp")
    doomed = [str(theirs / f"checkpoint-{s}") for s in steps(theirs)[:-1]]
    (archive / "theirs" / "run").mkdir(parents=True)
    os.sync()
    prune = [sys.executable, "-m", "ckptkeeper", "prune", str(ours.parent), "--keep", "last:1"]
    prune += ["--no-protect-trainer-best", "--archive-to", str(archive / "ours")]
    baseline = ["sh", "-c", BASELINE, "sh", str(archive / "theirs" / "run"), *doomed]
    sides = [("prune", prune), ("baseline", baseline)]
    took = {name: timed_process_cpu(argv) for name, argv in (sides if prune_first else sides[::-1])}
    archived = {side: sorted(p.name for p in (archive / side / "run").iterdir()) for side in ("ours", "theirs")}
    if steps(ours) != steps(theirs) or len(steps(ours)) != 1 or archived["ours"] != archived["theirs"]:
        raise RuntimeError(f"the two sides differ: left {steps(ours)} / {steps(theirs)}, archived {archived}")
    for top in (work / "prune", work / "cp", archive / "ours", archive / "theirs"):
        shutil.rmtree(top)
    return took["prune"], took["baseline"]


def measure(quick: bool, big: bool, reps: int, workdir: Path) -> dict[str, Any]:
    the_shape = shape(quick, big)
    with tempfile.TemporaryDirectory(prefix="ckptkeeper-bench-archive-", dir=workdir) as tmp:
        run = template(the_shape, Path(tmp))
        files = sum(len(f) for _, _, f in os.walk(run))
        with tmpfs_mount(Path(tmp) / "archive", 4 << 30) as problem:
            if problem:
                return {"shape": the_shape.describe(), "problem": problem}
            results = [one_rep(run, Path(tmp) / "rep", Path(tmp) / "archive", rep % 2 == 0) for rep in range(reps)]
    return {
        "shape": the_shape.describe(),
        "files": files,
        "prune_s": [p for (p, _), _ in results],
        "baseline_s": [b for _, (b, _) in results],
        "ratios": [p / b for (p, _), (b, _) in results],
        "prune_cpu_s": [c for (_, c), _ in results],
        "baseline_cpu_s": [c for _, (_, c) in results],
    }


def row(figures: dict[str, Any]) -> list[str]:
    if "problem" in figures:
        return [figures["shape"], "not measured", figures["problem"], "", "", ""]
    prune, base, ratios = summarize(figures["prune_s"]), summarize(figures["baseline_s"]), summarize(figures["ratios"])
    verdict = "met" if ratios.median <= TARGET_RATIO else "**missed**"
    return [
        f"{figures['shape']} ({figures['files']:,} files in the run)",
        fmt_summary(base),
        fmt_summary(prune),
        f"**{fmt(ratios.median, 2)}x** [{fmt(ratios.minimum, 2)}, {fmt(ratios.maximum, 2)}]",
        f"<= {TARGET_RATIO:g}x: {verdict}",
        f"{fmt(summarize(figures['baseline_cpu_s']).median)} / {fmt(summarize(figures['prune_cpu_s']).median)}",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return command_parser(
        "benchmarks.bench_archive",
        __doc__,
        quick="3 checkpoints of 200 small files, 3 repetitions",
        reps="repetitions (default 7; --quick: 3)",
        big="3,000 small files per checkpoint (bench_actions' shape)",
    ).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    reps = opts.reps or (3 if opts.quick else 7)
    started, load_start = time.monotonic(), load_average()
    title = "`ckptkeeper prune --archive-to` a tmpfs against `cp -a && sync -f && rm -rf`, whole commands"
    workdir = start_report(title, opts.workdir)
    figures = measure(opts.quick, opts.big, reps, workdir)
    print(f"## Archive every checkpoint but the newest to a tmpfs ({reps} repetitions, alternating order)")
    print()
    headers = ["shape", "cp -a && sync -f && rm -rf, s", "ckptkeeper prune --archive-to, s", "ratio", "target"]
    headers.append("CPU s, baseline / prune")
    print(markdown_table(headers, [row(figures)]))
    print()
    print(f"- load average (1, 5, 15 min) at the start: {load_start}; at the end: {load_average()}")
    print(f"- total benchmark time: {time.monotonic() - started:.0f} s")
    if opts.json:
        opts.json.write_text(json.dumps({"quick": opts.quick, "reps": reps, **figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
