"""`watch` with named metrics and `--await`: results files that arrive later are acted on within one rescan,
unchanged ones are not read again, and an await that lapses is acted on without any change on disk. The
real lm-evaluation-harness fixture; the daemon in-process (reads counted) and as a real process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ckptkeeper.config import load_settings
from ckptkeeper.metric_sources import LmEvalSource
from ckptkeeper.watch import Daemon, WatchOptions
from tests.lmeval_fixture import ACC_NORM_POINTER, LmEvalFixture, copy_lmeval_fixture
from tests.watchutil import steps, wait_until


def _daemon(lm: LmEvalFixture, awaiting: str) -> Daemon:
    settings = load_settings(
        None,
        {
            "keep": "best:1:acc_norm,last:1",
            "metrics": {"acc_norm": f"lm-eval:{lm.evals}#{ACC_NORM_POINTER}"},
            "await": [awaiting],
        },
        {},
    )
    options = WatchOptions(settle=0.0, metrics=settings.metric_specs())
    return Daemon(lm.run, settings.policy(), lm.root / "state", options)


def _source(daemon: Daemon) -> LmEvalSource:
    assert daemon.pipeline is not None and daemon.pipeline.metric_sources is not None
    [source] = daemon.pipeline.metric_sources.lm_evals
    return source


def test_a_results_file_that_arrives_later_is_acted_on_and_unchanged_ones_are_not_read_again(tmp_path: Path) -> None:
    lm = copy_lmeval_fixture(tmp_path / "lm")  # arrived just now (change times): a day's await holds 40 and 80
    aside = tmp_path / "aside"
    aside.mkdir()
    for step in (40, 80):
        shutil.move(lm.evals / f"__tmp__lmeval-out__run__checkpoint-{step}", aside)
    daemon = _daemon(lm, "acc_norm:1d")
    daemon.reconcile_all()
    assert steps(lm.run) == [40, 80, 240]  # 40 and 80 await their evaluation; 240 is best and newest
    source = _source(daemon)
    first = source.reads
    assert first == len(list(lm.evals.rglob("*.json")))
    assert daemon.metrics.awaiting.labels(run=".")._value.get() == 2

    daemon.reconcile_all()
    assert source.reads == first  # nothing changed: no results file is read again

    shutil.move(aside / "__tmp__lmeval-out__run__checkpoint-40", lm.evals)
    daemon.reconcile_all(trusting=True)  # a periodic rescan of an unchanged run directory
    assert steps(lm.run) == [80, 240]
    assert source.reads == first + 1  # only the new file


def test_an_await_that_lapses_is_acted_on_with_no_change_on_disk(tmp_path: Path) -> None:
    """The daemon as a real process: checkpoint-40 has no evaluation and arrived just now (the copy); after the
    3 s timeout it is judged without it (removed) and the log says once that its evaluation never arrived."""
    lm = copy_lmeval_fixture(tmp_path / "lm")
    shutil.rmtree(lm.evals / "__tmp__lmeval-out__run__checkpoint-40")
    command = [
        sys.executable, "-m", "ckptkeeper", "watch", str(lm.run), "--keep", "best:1:acc_norm,last:1",
        "--metric", f"acc_norm=lm-eval:{lm.evals}#{ACC_NORM_POINTER}", "--await", "acc_norm:3s",
        "--settle", "0", "--log-format", "json", "--state-dir", str(tmp_path / "state"),
    ]  # fmt: skip
    log = tmp_path / "log.jsonl"
    with open(log, "w") as out:
        daemon = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: steps(lm.run) == [40, 240], 20, lambda: f"{steps(lm.run)}\n{log.read_text()}")
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        kept = [e for e in lines if e.get("checkpoint") == "checkpoint-40" and e.get("action") == "kept"]
        assert kept and "awaiting acc_norm" in kept[0]["message"]
        wait_until(lambda: steps(lm.run) == [240], 20, lambda: f"{steps(lm.run)}\n{log.read_text()}")
    finally:
        daemon.terminate()
        daemon.wait(20)
    messages = [json.loads(line)["message"] for line in log.read_text().splitlines() if line.startswith("{")]
    never = [m for m in messages if "never arrived" in m]
    assert len(never) == 1 and "checkpoint-40" in never[0] and "no acc_norm within 3s" in never[0], messages
    deleted = [m for m in messages if "checkpoint-40" in m and "deleted" in m]
    assert deleted and "was awaiting acc_norm" in deleted[0], messages


def _watch(lm: LmEvalFixture, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "log.jsonl"
    command = [
        sys.executable, "-m", "ckptkeeper", "watch", str(lm.run), "--settle", "0", "--log-format", "json",
        "--state-dir", str(tmp_path / "state"), *extra,
    ]  # fmt: skip
    with open(log, "w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT), log


def test_exit_when_done_waits_for_what_is_awaited(tmp_path: Path) -> None:
    """A finished run whose checkpoints still await their evaluation is not done: --exit-when-done waits."""
    lm = copy_lmeval_fixture(tmp_path / "lm")
    shutil.rmtree(lm.evals / "__tmp__lmeval-out__run__checkpoint-40")
    metric = f"acc_norm=lm-eval:{lm.evals}#{ACC_NORM_POINTER}"
    args = ("--metric", metric, "--keep", "best:1:acc_norm,last:1", "--await", "acc_norm:1h", "--exit-when-done")
    final = json.loads((lm.run / "checkpoint-240" / "trainer_state.json").read_text())
    assert final["stateful_callbacks"]["TrainerControl"]["args"]["should_training_stop"]  # the run has finished
    daemon, log = _watch(lm, tmp_path, *args, "--rescan-interval", "1")
    try:
        wait_until(lambda: steps(lm.run) == [40, 240], 20, log.read_text)
        time.sleep(3)  # three rescans: still running, since checkpoint-40 awaits
        assert daemon.poll() is None, log.read_text()
    finally:
        daemon.terminate()
        daemon.wait(20)


def test_results_written_inside_the_root_are_acted_on_at_once(tmp_path: Path) -> None:
    """The eval job's --output_path inside the root: its new results file is an event the daemon acts on, not
    a run, and well before the next rescan (60 s here)."""
    lm = copy_lmeval_fixture(tmp_path / "lm")
    inside = lm.run / "evals"
    shutil.move(lm.evals, inside)
    aside = tmp_path / "aside"
    shutil.move(inside / "__tmp__lmeval-out__run__checkpoint-40", aside)
    metric = f"acc_norm=lm-eval:{inside}#{ACC_NORM_POINTER}"
    daemon, log = _watch(lm, tmp_path, "--metric", metric, "--keep", "best:1:acc_norm,last:1", "--await", "acc_norm:1d")
    try:
        wait_until(lambda: steps(lm.run) == [40, 240], 20, log.read_text)
        time.sleep(1)
        shutil.copytree(aside, inside / "__tmp__lmeval-out__run__checkpoint-40")
        started = time.monotonic()
        wait_until(lambda: steps(lm.run) == [240], 20, log.read_text)
        assert time.monotonic() - started < 10
    finally:
        daemon.terminate()
        daemon.wait(20)
    assert "evals" not in log.read_text().replace(str(inside), "")  # never taken for a run
