"""Run every benchmark in turn: `python -m benchmarks [--quick] [--out DIR] [--only NAME ...]`.

Each benchmark prints its own markdown report; the runner adds a header, times each one, and with
`--out DIR` keeps every report (`NAME.md`) and its raw figures (`NAME.json`). `--quick` is the smoke
run CI does: small trees, few repetitions, every code path exercised; its figures are not the ones to
publish. Nothing is asserted about timings; the exit code is 1 only if a benchmark failed to run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import IO

# In the order of the table.
BENCHMARKS = {
    "reconcile": "benchmarks.bench_reconcile",  # 1. full reconcile, cold and warm
    "watch": "benchmarks.bench_watch",  # 2. reaction time and 5. idle cost
    "actions": "benchmarks.bench_actions",  # 3. delete and 4. archive
    "trainer_block": "benchmarks.bench_trainer_block",  # 6. training loop blocked by retention
    "startup": "benchmarks.bench_startup",  # 7. start-up: --help, --version, plan/prune/watch of one checkpoint
    "prune": "benchmarks.bench_prune",  # issue #12: prune against rm -rf, whole commands
    "metrics": "benchmarks.bench_metrics",  # issue #20: plan and a watch pass with lm-eval results, against none
    "plan": "benchmarks.bench_plan",  # issue #12: plan against a json.load loop, whole commands, warm and cold
    "archive": "benchmarks.bench_archive",  # issue #12: prune --archive-to a tmpfs against cp -a && sync -f && rm -rf
    "archive_s3": "benchmarks.bench_archive_s3",  # issue #14: archive to S3 against s3fs's put
}


class _Tee(io.TextIOBase):
    def __init__(self, *streams: IO[str]) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the smoke run: small sizes, few repetitions")
    parser.add_argument("--out", type=Path, help="keep each report (NAME.md) and raw figures (NAME.json) here")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run these only")
    parser.add_argument("--workdir", type=Path, help="where the benchmarks build their trees")
    opts = parser.parse_args(argv)

    out = opts.out or Path(tempfile.mkdtemp(prefix="ckptkeeper-bench-out-"))
    out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    took: dict[str, float] = {}
    for name in opts.only or list(BENCHMARKS):
        args = ["--json", str(out / f"{name}.json")]
        if opts.quick:
            args.append("--quick")
        if opts.workdir and name != "startup":  # start-up builds no tree
            args += ["--workdir", str(opts.workdir)]
        print(f"\n<!-- python -m {BENCHMARKS[name]} {' '.join(args)} -->\n", flush=True)
        started = time.monotonic()
        report = io.StringIO()
        try:
            with contextlib.redirect_stdout(_Tee(sys.stdout, report)):
                code = importlib.import_module(BENCHMARKS[name]).main(args)
        except Exception:
            traceback.print_exc()
            code = 1
        took[name] = time.monotonic() - started
        (out / f"{name}.md").write_text(report.getvalue())
        if code != 0:
            failed.append(name)
    print("\n## Benchmarks run\n")
    for name, seconds in took.items():
        print(f"- {name}: {'FAILED' if name in failed else 'ok'}, {seconds:.0f} s")
    print(f"- reports and raw figures in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
