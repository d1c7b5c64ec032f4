"""End to end with a real lm-evaluation-harness: a real Trainer saves checkpoints, an eval job runs the real
`lm_eval` CLI on each one, and `ckptkeeper watch --metric ... --await ...` prunes beside both, by the harness's
numbers.

Three kinds of real processes, as a team runs them:
- `tests/e2e/train_lm.py` (transformers' Trainer, a tiny GPT-2 on the CPU, offline) saves checkpoint-40, -80,
  -120 and -160 within about a second, and notes each finished save in saves.jsonl;
- the eval job, a loop in this test: for each save noted, in order, one `lm_eval --model hf --model_args
  pretrained=<absolute checkpoint path> --tasks synth_ppl --output_path ROOT/evals` process (about 10 s each
  here, so the evaluations lag the training by up to 40 s); the results tree is inside the watched root;
- `ckptkeeper watch ROOT --metric word_perplexity=lm-eval:ROOT/evals#/results/synth_ppl/word_perplexity,none
  --keep best:2:word_perplexity:min,last:1 --await word_perplexity:2h --settle 0.5 --rescan-interval 3
  --log-format json` (a new results file is acted on within one rescan interval: SPEC).

The harness's perplexity does not follow the training (the best checkpoints by it are early ones), so only
ranking by the harness's own numbers keeps the right ones. Without `--await` the daemon would remove a
checkpoint that is neither the newest nor yet ranked before the eval job reaches it. Checked from the
processes' own records, never from ckptkeeper's planner:

- every checkpoint was evaluated: each `lm_eval` found its checkpoint and exited 0 with a results file;
- no checkpoint was removed before its evaluation had finished: each removal in the daemon's JSON log comes
  after the harness wrote that checkpoint's results file (its mtime; its `date` is when the evaluation began),
  and the daemon logged every checkpoint as awaiting first. (A checkpoint may go before a later one is
  evaluated: checkpoint-120 goes once its perplexity ranks it out, while the newest is still being evaluated.
  What `--await` promises, and what is checked, is that none goes before its own evaluation.)
- at the end the checkpoints on disk are the best 2 by the harness's own word_perplexity (read from its results
  files, the newest per checkpoint) and the newest; `plan --json` gives `best` reasons to exactly those 2, shows
  their values and the results files they came from, and sees one run (`evals/` is not scanned as runs).

Needs the e2e extra and lm-eval (`pip install '.[test,e2e]'`); like the other end-to-end tests it fails when
they are missing, never skips. It takes about a minute: one harness process per checkpoint.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2eutil import checkpoints_on_disk, json_lines, require_training_stack, stop, tail, wait_for

pytestmark = pytest.mark.e2e

TRAIN_SCRIPT = Path(__file__).parent / "e2e" / "train_lm.py"
METRIC = "word_perplexity"
TASK = "synth_ppl"
POINTER = f"/results/{TASK}/{METRIC},none"
BEST_N = 2
STEPS = [40, 80, 120, 160]
SETTLE = 0.5
DAEMON_READY_SECONDS = 30.0
EVAL_SECONDS = 240.0  # one harness run: ~10 s here
JOB_SECONDS = 600.0  # training and every evaluation
DAEMON_ACTS_SECONDS = 30.0  # after the last results file: the daemon sees it and removes


@dataclass(frozen=True)
class Layout:
    """Where one test run's processes write."""

    tmp: Path
    root: Path  # watched by ckptkeeper
    run: Path  # the Trainer's output_dir, ROOT/run
    evals: Path  # lm_eval --output_path, ROOT/evals (inside the root)
    tasks: Path  # the harness task (--include_path)
    saves: Path  # one line per finished save, from the training script
    daemon_log: Path
    train_log: Path

    @classmethod
    def under(cls, tmp: Path) -> Layout:
        root = tmp / "out"
        return cls(
            tmp, root, root / "run", root / "evals", tmp / "tasks", tmp / "saves.jsonl",
            tmp / "daemon.log", tmp / "train.log",
        )  # fmt: skip

    def context(self) -> str:
        on_disk = sorted(checkpoints_on_disk(self.run)) if self.run.is_dir() else None
        return (
            f"--- daemon log (tail)\n{tail(self.daemon_log)}\n--- training (tail)\n{tail(self.train_log, 15)}\n"
            f"--- saves\n{tail(self.saves)}\n--- checkpoints on disk: {on_disk}"
        )


@dataclass(frozen=True)
class Evaluation:
    """One run of the eval job's `lm_eval` on one checkpoint."""

    step: int
    checkpoint: Path
    present: bool  # the checkpoint was there when the eval job came to it
    returncode: int | None
    seconds: float
    log: Path


def require_lm_eval() -> None:
    require_training_stack()
    if importlib.util.find_spec("lm_eval") is None:
        pytest.fail(
            f"this test needs lm-eval in {sys.executable} (pip install 'lm-eval==0.4.13'); it is never skipped",
            pytrace=False,
        )


def environment(layout: Layout) -> dict[str, str]:
    """Offline and hermetic: the model is a local directory, the task data a local JSON file."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": os.fspath(layout.tmp / "hf-home"),
        "XDG_CACHE_HOME": os.fspath(layout.tmp / "cache"), "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
    }  # fmt: skip


def retention_args(layout: Layout) -> list[str]:
    """The metric, the rules and the await, as `watch` and `plan` take them."""
    return [
        "--metric", f"{METRIC}=lm-eval:{layout.evals}#{POINTER}",
        "--keep", f"best:{BEST_N}:{METRIC}:min,last:1", "--await", f"{METRIC}:2h",
    ]  # fmt: skip


def daemon_argv(layout: Layout) -> list[str]:
    return [
        sys.executable, "-m", "ckptkeeper", "watch", os.fspath(layout.root), *retention_args(layout),
        "--settle", str(SETTLE), "--rescan-interval", "3", "--log-format", "json",
    ]  # fmt: skip


def lm_eval_argv(checkpoint: Path, layout: Layout) -> list[str]:
    exe = Path(sys.executable).with_name("lm_eval")
    return [
        *([os.fspath(exe)] if exe.exists() else [sys.executable, "-m", "lm_eval"]),
        "--model", "hf", "--model_args", f"pretrained={checkpoint},dtype=float32", "--tasks", TASK,
        "--include_path", os.fspath(layout.tasks), "--batch_size", "16", "--device", "cpu",
        "--output_path", os.fspath(layout.evals),
    ]  # fmt: skip


# ---- the processes ---------------------------------------------------------------------------------
def start_daemon(layout: Layout, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with layout.daemon_log.open("wb") as log:
        daemon = subprocess.Popen(
            daemon_argv(layout), stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=layout.tmp, env=env
        )

    def ready() -> bool:
        assert daemon.poll() is None, f"the daemon exited early ({daemon.returncode})\n{layout.context()}"
        return any(str(e.get("message", "")).startswith("watching ") for e in json_lines(layout.daemon_log))

    wait_for(ready, DAEMON_READY_SECONDS, "the daemon did not start watching", layout.context)
    return daemon


def start_trainer(layout: Layout, env: dict[str, str]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, os.fspath(TRAIN_SCRIPT), os.fspath(layout.run), "--tasks", os.fspath(layout.tasks)]
    argv += ["--saves", os.fspath(layout.saves), "--max-steps", str(STEPS[-1]), "--save-steps", str(STEPS[0])]
    with layout.train_log.open("wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=layout.tmp, env=env)


def evaluate(step: int, checkpoint: Path, layout: Layout, env: dict[str, str]) -> Evaluation:
    """The eval job's work on one checkpoint: `lm_eval` as its own process, if the checkpoint is still there."""
    log = layout.tmp / f"lm_eval-{step}.log"
    if not checkpoint.is_dir():
        return Evaluation(step, checkpoint, False, None, 0.0, log)
    started = time.monotonic()
    with log.open("wb") as out:
        done = subprocess.run(
            lm_eval_argv(checkpoint, layout), stdout=out, stderr=out, stdin=subprocess.DEVNULL,
            cwd=layout.tmp, env=env, timeout=EVAL_SECONDS, check=False,
        )  # fmt: skip
    return Evaluation(step, checkpoint, True, done.returncode, time.monotonic() - started, log)


def eval_job(layout: Layout, trainer: subprocess.Popen[bytes], env: dict[str, str]) -> list[Evaluation]:
    """As teams run one: evaluate each checkpoint the training script says it saved, in order, until training
    has ended and every save is evaluated."""
    done: list[Evaluation] = []
    deadline = time.monotonic() + JOB_SECONDS
    while time.monotonic() < deadline:
        finished = trainer.poll() is not None
        saves = json_lines(layout.saves)
        pending = [s for s in saves if s["step"] not in {e.step for e in done}]
        if not pending and finished:
            return done
        done.extend(evaluate(save["step"], Path(save["checkpoint"]), layout, env) for save in pending)
        if not pending:
            time.sleep(0.2)
    pytest.fail(f"the eval job did not finish within {JOB_SECONDS:g} s\n{layout.context()}", pytrace=False)


# ---- the harness's own numbers -----------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    """The newest results file the harness wrote for one checkpoint."""

    file: Path
    value: float
    date: float  # time.time() when its evaluation started, as the harness records it
    written: float  # its mtime: the harness writes it once, at the end of the evaluation


def harness_results(layout: Layout) -> dict[int, Result]:
    """step -> the newest (by `date`) results file recording that checkpoint, found by content."""
    newest: dict[int, tuple[float, Result]] = {}
    for path in layout.evals.rglob("*.json"):
        doc = json.loads(path.read_text(encoding="utf-8"))
        recorded = Path(doc["config"]["model_args"]["pretrained"])
        assert recorded.parent == layout.run.resolve(), f"{path} records {recorded}"
        step = int(recorded.name.removeprefix("checkpoint-"))
        result = Result(path, float(doc["results"][TASK][f"{METRIC},none"]), doc["date"], path.stat().st_mtime)
        if step not in newest or doc["date"] > newest[step][0]:
            newest[step] = (doc["date"], result)
    return {step: result for step, (_, result) in newest.items()}


def best_by_harness(results: dict[int, Result]) -> list[int]:
    """The BEST_N lowest word_perplexity (lower is better); on a tie the lower step, as the `best` rule does."""
    ranked = sorted(results, key=lambda s: (math.isnan(results[s].value), results[s].value, s))
    return sorted(ranked[:BEST_N])


# ---- checks ------------------------------------------------------------------------------------------
def check_every_checkpoint_evaluated(layout: Layout, evaluations: list[Evaluation]) -> dict[int, Result]:
    assert [e.step for e in evaluations] == STEPS, f"the training saved {[e.step for e in evaluations]}"
    for e in evaluations:
        assert e.present, f"checkpoint-{e.step} was gone before the eval job reached it\n{layout.context()}"
        assert e.returncode == 0, f"lm_eval on checkpoint-{e.step} exited {e.returncode}:\n{tail(e.log)}"
    results = harness_results(layout)
    assert sorted(results) == STEPS, f"results files for {sorted(results)}\n{layout.context()}"
    return results


def deletions(layout: Layout) -> dict[int, float]:
    """step -> when the daemon logged its removal (time.time() scale)."""
    removed: dict[int, float] = {}
    for entry in json_lines(layout.daemon_log):
        if entry.get("action") == "delete":
            removed[int(entry["step"])] = dt.datetime.fromisoformat(entry["time"]).timestamp()
    return removed


def check_no_removal_before_its_evaluation(layout: Layout, results: dict[int, Result]) -> dict[int, float]:
    """Each removal the daemon logged came after the harness wrote that checkpoint's results file (the log's
    time is cut to milliseconds). `date` + `total_evaluation_time_seconds` is no bound: the harness starts
    that clock before `date`, when it loads the model."""
    removed = deletions(layout)
    for step, when in removed.items():
        result = results[step]
        assert result.date < result.written, result
        assert when + 0.001 >= result.written, (
            f"checkpoint-{step} was removed at {when:.3f}, {result.written - when:.3f} s before the harness wrote "
            f"its results ({result.file.name}; the evaluation started at {result.date:.3f})\n{layout.context()}"
        )
    return removed


def check_each_awaited(layout: Layout) -> None:
    """The daemon kept each checkpoint as awaiting its evaluation at first: the evaluations lagged the saves."""
    entries = json_lines(layout.daemon_log)
    awaited = {e.get("step") for e in entries if any(r["kind"] == "awaiting" for r in e.get("reasons") or [])}
    assert awaited >= set(STEPS), f"logged as awaiting: {sorted(s for s in awaited if s)}\n{layout.context()}"


def final_plan(layout: Layout) -> dict[str, Any]:
    argv = [sys.executable, "-m", "ckptkeeper", "plan", os.fspath(layout.root), *retention_args(layout), "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    plan: dict[str, Any] = json.loads(done.stdout)
    return plan


def check_plan_by_harness(layout: Layout, results: dict[int, Result], best: list[int]) -> None:
    """`plan --json` after the daemon is done: one run, `best` reasons on exactly the best by the harness, each
    with the harness's value and the results file it came from; nothing more to remove."""
    plan = final_plan(layout)
    assert [run["run"] for run in plan["runs"]] == ["run"], plan["runs"]  # evals/ is not a run
    checkpoints = plan["runs"][0]["checkpoints"]
    assert all(c["decision"] == "keep" for c in checkpoints), checkpoints
    by_best = sorted(c["step"] for c in checkpoints if any(r["kind"] == "best" for r in c["reasons"]))
    assert by_best == best, f"best by ckptkeeper {by_best}, by the harness {best}: {checkpoints}"
    for c in checkpoints:
        assert c["metrics"][METRIC] == pytest.approx(results[c["step"]].value, rel=1e-12), c
        assert Path(c["metric_sources"][METRIC]).name == results[c["step"]].file.name, c


# ---- the test --------------------------------------------------------------------------------------
def test_watch_keeps_the_best_by_a_real_lm_eval_and_removes_nothing_unevaluated(tmp_path: Path) -> None:
    require_lm_eval()
    layout = Layout.under(tmp_path)
    layout.evals.mkdir(parents=True)  # a --metric source must exist when the daemon starts
    env = environment(layout)
    daemon = start_daemon(layout, env)
    trainer: subprocess.Popen[bytes] | None = None
    try:
        trainer = start_trainer(layout, env)
        evaluations = eval_job(layout, trainer, env)
        assert trainer.wait(timeout=60) == 0, f"the training script failed\n{layout.context()}"
        results = check_every_checkpoint_evaluated(layout, evaluations)
        best = best_by_harness(results)
        assert best != STEPS[-BEST_N:], f"the best by the harness are the newest ({results}): the test shows nothing"
        expected = {*best, STEPS[-1]}
        wait_for(
            lambda: checkpoints_on_disk(layout.run) == expected,
            DAEMON_ACTS_SECONDS,
            f"the checkpoints on disk did not become the best {BEST_N} by the harness {best} and the newest",
            layout.context,
        )
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, layout.context()
    finally:
        if trainer is not None:
            stop(trainer)
        stop(daemon)
    assert sorted(check_no_removal_before_its_evaluation(layout, results)) == sorted(set(STEPS) - expected)
    errors = [e for e in json_lines(layout.daemon_log) if e.get("level") == "error" or "unparsed" in e]
    assert not errors, f"the daemon logged errors: {errors}"
    check_each_awaited(layout)
    check_plan_by_harness(layout, results, best)
