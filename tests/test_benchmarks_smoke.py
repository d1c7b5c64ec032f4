"""The benchmarks' smoke run (`python -m benchmarks --quick`), as CI does it: every benchmark runs end to
end on small trees and writes its report and raw figures. Timings are not asserted (they are figures for
docs/PERFORMANCE.md, measured on a quiet machine); that each part ran and reported is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# name -> a heading its report must contain
REPORTS = {
    "reconcile": "## Full reconcile",
    "watch": "## Idle cost",
    "actions": "",
    "trainer_block": "",
    "startup": "",
    "prune": "## Remove every checkpoint but the newest",
    "metrics": "## `plan ROOT --json` with and without `--metric`",
    "plan": "## Plan a whole root",
    "archive": "## Archive every checkpoint but the newest",
    "archive_s3": "## Archive every checkpoint but the newest",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("bench-out")
    work = tmp_path_factory.mktemp("bench-work")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--workdir", str(work)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    return done, out


def test_the_quick_run_of_every_benchmark_succeeds(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, _ = quick_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for name in REPORTS:
        assert f"- {name}: ok," in done.stdout, done.stdout[-2000:]


@pytest.mark.parametrize("name", list(REPORTS))
def test_each_benchmark_writes_a_report_with_its_table_and_raw_figures(
    name: str, quick_run: tuple[subprocess.CompletedProcess[str], Path]
) -> None:
    _, out = quick_run
    report = (out / f"{name}.md").read_text()
    assert "| " in report and "---" in report  # a markdown table
    assert REPORTS[name] in report
    assert "Machine" in report or "machine" in report
    figures = json.loads((out / f"{name}.json").read_text())
    assert figures


def test_the_startup_benchmark_times_watch_to_its_first_line(
    quick_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """`watch` never exits by itself: its rows are timed to its first log line, then it is stopped (else the run
    would hang, or fail on its exit code)."""
    _, out = quick_run
    figures = json.loads((out / "startup.json").read_text())
    report = (out / "startup.md").read_text()
    assert len(figures["to_first_line"]) == 2  # the default observer, and --poll
    for label in figures["to_first_line"]:
        assert "watch" in figures["commands"][label]
        assert len(figures["seconds"][label]) == figures["reps"]
        assert all(0 < s < 30 for s in figures["seconds"][label] + figures["cpu_seconds"][label])
        assert f"| {label} | " in report and label in figures["work"]


def test_the_benchmarks_leave_no_tree_behind(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, _ = quick_run
    work = Path(done.args[done.args.index("--workdir") + 1])
    assert list(work.iterdir()) == []


# Benchmarks run on their own (not by `python -m benchmarks`): name -> (module, a heading its report must contain)
ALONE = {
    "keep_weights": ("benchmarks.bench_keep_weights", "## Disk kept"),
    "pressure": ("benchmarks.bench_pressure", "# Disk pressure benchmark"),
}


@pytest.mark.parametrize("name", list(ALONE))
def test_a_benchmark_run_alone_reports_its_table_and_raw_figures_and_leaves_no_tree(name: str, tmp_path: Path) -> None:
    module, heading = ALONE[name]
    work = tmp_path / "work"
    work.mkdir()
    figures_file = tmp_path / f"{name}.json"
    done = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--json", str(figures_file), "--workdir", str(work)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert heading in done.stdout and "| " in done.stdout and "---" in done.stdout
    assert "Machine" in done.stdout
    assert json.loads(figures_file.read_text())
    assert list(work.iterdir()) == []
