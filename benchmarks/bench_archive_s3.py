"""Benchmark archiving to an object store (issue #14): `ckptkeeper prune --archive-to s3://...` against s3fs's own
`put` of the same checkpoints, both to a local S3 server (moto's, in a process of its own).

    python -m benchmarks.bench_archive_s3 [--quick] [--reps N] [--workdir DIR] [--json FILE]

Both sides are whole processes, timed around subprocess.run (interpreter start-up and imports included):
`ckptkeeper prune ROOT --keep last:1 --no-protect-trainer-best --archive-to s3://bench/ours-<rep>` (upload with
hashing, each object verified, the manifest written last, then the local checkpoints removed through the trash),
and `python -c "s3fs.S3FileSystem().put(dirs, 's3://bench/put-<rep>/', recursive=True)"` of the same
checkpoints (s3fs's concurrent upload; nothing verified or removed). Each repetition copies the tree anew for
ckptkeeper (it removes what it archived) and alternates which side goes first. Shapes:

- trainer: 21 Trainer-like checkpoints of 12 small files each (as in bench_prune), 20 archived;
- small files: 5 checkpoints that also hold 200 small files each, 4 archived;
- large: 3 checkpoints whose optimizer.pt is 256 MiB (`--quick`: 16 MiB) of data, 2 archived.

Figures: median [min, max] seconds per side, and the ratio ckptkeeper / s3fs put of the medians with the
[min, max] of the per-repetition ratios (target: at most 1.2x). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.bench_prune import Shape, steps, template
from benchmarks.common import finish_report, fmt, fmt_summary, machine_lines, summarize, timed_process

TARGET_RATIO = 1.2
BUCKET = "bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
PUT = (
    "import sys, s3fs; fs = s3fs.S3FileSystem(); "
    "fs.put(sys.argv[2:], sys.argv[1], recursive=True)"  # every checkpoint directory, below the prefix
)


def shapes(quick: bool) -> list[Shape]:
    if quick:
        return [Shape("trainer", 4), Shape("small files", 2, small_files=20), Shape("large", 2, large_bytes=16 << 20)]
    return [Shape("trainer", 21), Shape("small files", 5, small_files=200), Shape("large", 3, large_bytes=256 << 20)]


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server in a child process with a bucket; yields the environment that points at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.05)
        make = f"import boto3; boto3.client('s3').create_bucket(Bucket='{BUCKET}')"
        subprocess.run([sys.executable, "-c", make], env=env, check=True)
        yield env
    finally:
        child.kill()
        child.wait()


def timed(argv: list[str], env: dict[str, str]) -> float:
    old = dict(os.environ)
    os.environ.update(env)
    try:
        return timed_process(argv)
    finally:
        os.environ.clear()
        os.environ.update(old)


def one_rep(run: Path, work: Path, rep: int, env: dict[str, str]) -> tuple[float, float]:
    """(ckptkeeper s, s3fs put s) for one copy of `run`, each to a prefix of its own."""
    tag = f"{work.name}-{rep}"
    ours = work / f"rep-{rep}" / "outputs" / "run"
    shutil.copytree(run, ours, symlinks=True)
    archived = [str(run / f"checkpoint-{s}") for s in steps(run)[:-1]]
    prune = [sys.executable, "-m", "ckptkeeper", "prune", str(ours.parent), "--keep", "last:1"]
    prune += ["--no-protect-trainer-best", "--archive-to", f"s3://{BUCKET}/ours-{tag}"]
    put = [sys.executable, "-c", PUT, f"s3://{BUCKET}/put-{tag}/run/", *archived]
    sides = [("ckptkeeper", prune), ("put", put)]
    took = {name: timed(argv, env) for name, argv in (sides if rep % 2 == 0 else sides[::-1])}
    if len(steps(ours)) != 1:
        raise RuntimeError(f"ckptkeeper left {steps(ours)}")
    shutil.rmtree(work / f"rep-{rep}")
    return took["ckptkeeper"], took["put"]


def measure(shape: Shape, reps: int, workdir: Path, env: dict[str, str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ckptkeeper-bench-s3-", dir=workdir) as tmp:
        run = template(shape, Path(tmp))
        size = sum(
            p.stat().st_size for s in steps(run)[:-1] for p in (run / f"checkpoint-{s}").rglob("*") if p.is_file()
        )
        results = [one_rep(run, Path(tmp), rep, env) for rep in range(reps)]
    ours, put = [o for o, _ in results], [p for _, p in results]
    return {"shape": shape.describe(), "bytes": size, "ckptkeeper_s": ours, "s3fs_put_s": put,
            "ratios": [o / p for o, p in results]}  # fmt: skip


def row(figures: dict[str, Any]) -> list[str]:
    ours, put, ratios = summarize(figures["ckptkeeper_s"]), summarize(figures["s3fs_put_s"]), figures["ratios"]
    ratio = ours.median / put.median
    verdict = "met" if ratio <= TARGET_RATIO else "**missed**"
    spread = f"[{fmt(min(ratios), 2)}, {fmt(max(ratios), 2)}]"
    rate = figures["bytes"] / ours.median / 1e6
    return [figures["shape"], f"{figures['bytes'] / 1e6:.1f}", fmt_summary(put), fmt_summary(ours), f"{rate:.0f}",
            f"**{ratio:.2f}x** {spread}", verdict]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_archive_s3", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 repetitions (the smoke run)")
    parser.add_argument("--reps", type=int, help="repetitions per shape (default 5; --quick: 3)")
    parser.add_argument("--workdir", type=Path, help="where the trees are built (default: the temp directory)")
    parser.add_argument("--json", type=Path, help="also write every raw figure to this file")
    opts = parser.parse_args(argv)
    reps = opts.reps or (3 if opts.quick else 5)
    workdir = opts.workdir or Path(tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print("# Archive to an object store: `ckptkeeper prune --archive-to s3://` against s3fs's `put`"
          + (" (--quick)" if opts.quick else ""))  # fmt: skip
    print()
    print("Machine:")
    print("\n".join(machine_lines(workdir)))
    print()
    with s3_server() as env:
        figures = [measure(shape, reps, workdir, env) for shape in shapes(opts.quick)]
    title = f"Archive every checkpoint but the newest ({reps} repetitions, alternating order, median [min, max])"
    headers = ["shape", "MB", "s3fs put, s", "ckptkeeper prune, s", "ckptkeeper MB/s", "ckptkeeper / put",
               f"target <= {TARGET_RATIO:g}x"]  # fmt: skip
    raw = {"quick": opts.quick, "reps": reps, "shapes": figures, "started": started, "json": opts.json}
    finish_report(title, headers, [row(f) for f in figures], {**raw, "workdir": workdir})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
