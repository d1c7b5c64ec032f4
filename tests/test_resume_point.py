"""A reused output directory must never cost the live run its resume point (issue 18, SPEC "Protections" 1).

A second run started in the `output_dir` of an earlier, longer one writes `checkpoint-10`, `-20` beside the
stale `checkpoint-1000`; a run resumed from an earlier checkpoint rewrites lower steps than its crashed
predecessor reached. The highest step is then not the live run's resume point: the most recently written
complete checkpoint is protected too, and the plan, `--json` and `watch`'s log say the directory mixes runs.

First the pure planner on Checkpoint values (times given), then the real CLI on real directories whose file
times are set with os.utime, then the real daemon beside a simulated Trainer that keeps saving.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from watchutil import TrainerThread, Watch, journal, steps, wait_until

from ckptkeeper.model import Action, Checkpoint, MixedRuns, Run, RunPlan
from ckptkeeper.policy import Protections, plan_run
from ckptkeeper.render import reason_texts
from ckptkeeper.rules import parse_rules
from ckptkeeper.simtrainer import SimConfig, SimulatedTrainer, simulate_run

T = 1_800_000_000.0  # some moment; the planner never reads the clock, so any will do
MINUTE, DAY = 60.0, 86_400.0
WARNING_TAIL = (
    "the Trainer resumes from the highest step (get_last_checkpoint), so move or remove the stale checkpoints"
)


def ck(
    step: int,
    written_at: float | None,
    *,
    incomplete: str | None = None,
    future: bool = False,
    best: tuple[int, ...] = (),
) -> Checkpoint:
    return Checkpoint(
        name=f"checkpoint-{step}",
        step=step,
        complete=incomplete is None,
        incomplete_reason=incomplete,
        size_bytes=1000,
        trainer_best_steps=best,
        written_at=written_at,
        times_in_future=future,
    )


def plan(keep: str, *checkpoints: Checkpoint, trainer_best: bool = True) -> RunPlan:
    return plan_run(Run(".", checkpoints), parse_rules(keep), Protections(trainer_best), Action.DELETE)


def table(p: RunPlan) -> dict[int, tuple[str, ...]]:
    """step -> the reasons it is kept, or ("delete",)."""
    return {d.checkpoint.step: tuple(reason_texts(d.reasons)) if d.kept else ("delete",) for d in p.decisions}


def mixed(p: RunPlan) -> tuple[int, int, list[int]] | None:
    m = p.mixed_runs
    return None if m is None else (m.newest_written.step, m.highest_step.step, [c.step for c in m.stale])


# ---- the pure planner ---------------------------------------------------------------------------------------
def test_the_issues_case_keeps_the_live_runs_newest_written_checkpoint() -> None:
    p = plan("last:1", ck(10, T - 2 * MINUTE), ck(20, T - MINUTE), ck(1000, T - 3 * DAY))
    assert table(p) == {
        10: ("delete",),
        20: ("protected: newest written",),
        1000: ("last 1/1", "protected: newest"),  # last:N is by step: the rule itself keeps its meaning
    }
    assert p.mixed_runs == MixedRuns(p.run.checkpoints[1], p.run.checkpoints[2], (p.run.checkpoints[2],))
    assert p.refusal is None


def test_a_stale_run_of_several_beside_a_new_run_of_several() -> None:
    old = [ck(s, T - 3 * DAY + s) for s in (800, 900, 1000)]
    crashed = ck(1010, T - 3 * DAY + 1010, incomplete="no trainer_state.json")  # the old run died mid-save
    new = [ck(s, T - 10 * MINUTE + s) for s in (10, 20, 30)]
    saving = ck(40, T, incomplete="model.safetensors: header does not cover the file")  # being written now
    p = plan("last:2", *old, crashed, *new, saving)
    assert table(p) == {
        10: ("delete",),
        20: ("delete",),
        30: ("protected: newest written",),
        40: ("incomplete: model.safetensors: header does not cover the file",),
        800: ("delete",),
        900: ("last 2/2",),
        1000: ("last 1/2", "protected: newest"),
        1010: ("incomplete: no trainer_state.json",),
    }
    # Stale: higher steps than the newest written, written before it; not the save in progress (written after).
    assert mixed(p) == (30, 1000, [800, 900, 1000, 1010])


def test_a_run_resumed_from_an_earlier_checkpoint_that_rewrote_a_higher_one() -> None:
    # Crashed after checkpoint-50; resumed from checkpoint-30; checkpoint-40 rewritten since.
    first = [ck(s, T - 1 * DAY + s) for s in (10, 20, 30, 50)]
    rewritten = ck(40, T)
    p = plan("last:1", *first, rewritten)
    assert table(p) == {
        10: ("delete",),
        20: ("delete",),
        30: ("delete",),
        40: ("protected: newest written",),
        50: ("last 1/1", "protected: newest"),
    }
    assert mixed(p) == (40, 50, [50])


def test_the_trainer_best_named_by_the_newest_written_checkpoint_is_protected_too() -> None:
    # The live run's load_best_model_at_end needs its own best (named in its newest state), not the stale run's.
    p = plan("last:1", ck(10, T - 2 * MINUTE), ck(20, T - MINUTE, best=(10,)), ck(1000, T - DAY, best=(900,)))
    assert table(p)[10] == ("protected: trainer best",)
    assert table(plan("last:1", *p.run.checkpoints, trainer_best=False))[10] == ("delete",)


def test_equal_times_are_no_disagreement() -> None:
    # Coarse (whole-second) timestamps give equal times: the orders do not disagree, only the highest is kept.
    p = plan("last:1", ck(10, T - 5), ck(20, T), ck(1000, T))
    assert table(p) == {10: ("delete",), 20: ("delete",), 1000: ("last 1/1", "protected: newest")}
    assert p.mixed_runs is None
    # Equal times among the candidates: the higher step of them is the newest written.
    p = plan("last:1", ck(10, T), ck(20, T), ck(1000, T - DAY))
    assert table(p)[20] == ("protected: newest written",)
    assert table(p)[10] == ("delete",)
    assert mixed(p) == (20, 1000, [1000])


def test_a_single_run_written_in_step_order_is_unchanged() -> None:
    p = plan("last:2", *(ck(s, T + s) for s in (10, 20, 30, 40)))
    assert table(p) == {10: ("delete",), 20: ("delete",), 30: ("last 2/2",), 40: ("last 1/2", "protected: newest")}
    assert p.mixed_runs is None


def test_unknown_times_take_no_part() -> None:
    # The highest step's time unknown: nothing to compare with (Checkpoint values built without times).
    p = plan("last:1", ck(10, T), ck(20, T + 1), ck(1000, None))
    assert table(p) == {10: ("delete",), 20: ("delete",), 1000: ("last 1/1", "protected: newest")}
    assert p.mixed_runs is None
    # Another's time unknown: it is never the newest written, the others still are compared.
    p = plan("last:1", ck(10, T), ck(20, None), ck(1000, T - DAY))
    assert table(p) == {10: ("protected: newest written",), 20: ("delete",), 1000: ("last 1/1", "protected: newest")}
    assert mixed(p) == (10, 1000, [1000])  # 20's time is unknown: not named stale either
    # No time known at all: as before this protection grew.
    assert plan("last:1", ck(10, None), ck(20, None)).mixed_runs is None


def test_incomplete_checkpoints_are_never_the_newest_written() -> None:
    p = plan("last:1", ck(10, T - DAY), ck(20, T, incomplete="no trainer_state.json"), ck(30, T - DAY + 1))
    assert table(p) == {
        10: ("delete",),
        20: ("incomplete: no trainer_state.json",),
        30: ("last 1/1", "protected: newest"),
    }
    assert p.mixed_runs is None


def test_the_highest_steps_times_in_the_future_keep_the_newest_written_of_the_others_too() -> None:
    # checkpoint-1000's file times lie ahead of this clock (its writer's clock was ahead): they order nothing,
    # so it cannot be told whether 20 came later. When in doubt, keep both; but no claim that runs are mixed.
    p = plan("last:1", ck(10, T - 2 * MINUTE), ck(20, T - MINUTE), ck(1000, T + DAY, future=True))
    assert table(p) == {
        10: ("delete",),
        20: ("protected: newest written (clock skew)",),
        1000: ("last 1/1", "protected: newest"),
    }
    assert p.mixed_runs is None


def test_other_checkpoints_times_in_the_future_are_kept_besides_the_highest_step() -> None:
    # The live run's writer has a clock ahead: its checkpoints cannot be compared with the stale one's either.
    p = plan("last:1", ck(10, T + MINUTE, future=True), ck(20, T + 2 * MINUTE, future=True), ck(1000, T - DAY))
    assert table(p) == {
        10: ("delete",),
        20: ("protected: newest written (clock skew)",),
        1000: ("last 1/1", "protected: newest"),
    }
    assert p.mixed_runs is None
    # Times from one clock ahead are compared with each other: the highest step written first, by that clock.
    p = plan(
        "last:1",
        ck(10, T + 2 * MINUTE, future=True),
        ck(20, T + 3 * MINUTE, future=True),
        ck(1000, T + MINUTE, future=True),
    )
    assert table(p)[20] == ("protected: newest written",)
    assert mixed(p) == (20, 1000, [1000])
    # A stray checkpoint with future times does not hide the live run's newest written one (this clock's times).
    p = plan("last:1", ck(7, T + DAY, future=True), ck(10, T - 2 * MINUTE), ck(20, T - MINUTE), ck(1000, T - DAY))
    assert table(p) == {
        7: ("protected: newest written (clock skew)",),
        10: ("delete",),
        20: ("protected: newest written",),
        1000: ("last 1/1", "protected: newest"),
    }
    assert mixed(p) == (20, 1000, [1000])


def test_a_refused_run_still_says_it_mixes_runs() -> None:
    p = plan("", ck(10, T), ck(1000, T - DAY))
    assert p.refusal is not None
    assert {d.action for d in p.decisions} == {Action.KEEP}
    assert mixed(p) == (10, 1000, [1000])


def test_the_plan_does_not_depend_on_the_order_the_checkpoints_come_in() -> None:
    cps = [ck(10, T - 3), ck(20, T), ck(30, T - 1), ck(500, T - DAY, incomplete="x"), ck(1000, T - DAY)]
    first = plan("last:2,every:500", *cps)
    again = plan("last:2,every:500", *reversed(cps))
    assert table(first) == table(again)
    assert mixed(first) == mixed(again) == (20, 1000, [30, 500, 1000])  # 30 was written before 20 too


# ---- the real CLI on real directories ---------------------------------------------------------------------------
NEW_RUN = SimConfig(steps_per_epoch=10, epochs=2, save_steps=10, eval_strategy="no", metric_for_best_model=None)


def set_times(checkpoint: Path, when: float) -> None:
    """Give every file and directory of a checkpoint this mtime (what the scan reads as `written_at`)."""
    for dirpath, _dirs, files in os.walk(checkpoint):
        for name in files:
            os.utime(Path(dirpath, name), (when, when))
    for dirpath, _dirs, _files in os.walk(checkpoint, topdown=False):
        os.utime(dirpath, (when, when))


def stale_checkpoint(into: Path, step: int, scratch: Path, when: float) -> Path:
    """A finished old run's `checkpoint-<step>` (its final save), moved into `into`, written `when`."""
    simulate_run(
        scratch,
        SimConfig(
            steps_per_epoch=step,
            epochs=1,
            save_steps=step,
            logging_steps=step,
            eval_strategy="no",
            metric_for_best_model=None,
        ),
    )
    into.mkdir(parents=True, exist_ok=True)
    target = into / f"checkpoint-{step}"
    os.rename(scratch / f"checkpoint-{step}", target)
    shutil.rmtree(scratch)
    set_times(target, when)
    return target


def ckptkeeper(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptkeeper", *map(str, args)], capture_output=True, text=True, check=False, timeout=120
    )


@pytest.fixture
def reused(tmp_path: Path) -> Path:
    """The issue's directory: checkpoint-1000 written three days ago, checkpoint-10 and -20 minutes ago."""
    root = tmp_path / "outputs"
    now = time.time()
    stale_checkpoint(root, 1000, tmp_path / "old-run", now - 3 * DAY)
    simulate_run(root, NEW_RUN)
    set_times(root / "checkpoint-10", now - 5 * MINUTE)
    set_times(root / "checkpoint-20", now - 2 * MINUTE)
    return root


def test_plan_on_the_issues_directory(reused: Path) -> None:
    done = ckptkeeper("plan", reused, "--keep", "last:1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "Policy: keep the last 1 (last:1); always keep the newest, incomplete ones, the Trainer's best; "
        "delete the rest",
        f"Root: {reused}",
        "",
        "run outputs  (3 checkpoints)",
        "  CHECKPOINT       STEP  EPOCH     SIZE  DECISION  REASONS",
        "  checkpoint-10      10   1.00  13.1 kB  delete    no rule keeps it",
        "  checkpoint-20      20   2.00  13.4 kB  keep      protected: newest written",
        "  checkpoint-1000  1000   1.00  13.0 kB  keep      last 1/1, protected: newest",
        "  warning: this directory mixes runs: checkpoint-20 was written after checkpoint-1000 "
        f"(stale: checkpoint-1000); {WARNING_TAIL}",
        "",
        "Summary: 3 checkpoints in 1 run: keep 2 (26.4 kB), remove 1 (13.1 kB to free)",
    ]


def test_plan_json_on_the_issues_directory(reused: Path) -> None:
    done = ckptkeeper("plan", reused, "--keep", "last:1", "--json")
    assert done.returncode == 0, done.stderr
    [run] = json.loads(done.stdout)["runs"]
    assert run["mixed_runs"] == {
        "newest_written": "checkpoint-20",
        "highest_step": "checkpoint-1000",
        "stale": ["checkpoint-1000"],
    }
    assert {c["name"]: (c["decision"], [r["text"] for r in c["reasons"]]) for c in run["checkpoints"]} == {
        "checkpoint-10": ("delete", ["no rule keeps it"]),
        "checkpoint-20": ("keep", ["protected: newest written"]),
        "checkpoint-1000": ("keep", ["last 1/1", "protected: newest"]),
    }


def test_plan_json_says_null_when_the_run_does_not_mix_runs(tmp_path: Path) -> None:
    simulate_run(tmp_path / "outputs", NEW_RUN)
    done = ckptkeeper("plan", tmp_path / "outputs", "--keep", "last:1", "--json")
    assert done.returncode == 0, done.stderr
    assert [run["mixed_runs"] for run in json.loads(done.stdout)["runs"]] == [None]
    assert "mixes runs" not in ckptkeeper("plan", tmp_path / "outputs", "--keep", "last:1").stdout


def test_prune_on_the_issues_directory_keeps_the_resume_point_and_the_stale_one(reused: Path) -> None:
    done = ckptkeeper("prune", reused, "--keep", "last:1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert steps(reused) == [20, 1000]
    assert [e["checkpoint"] for e in journal(reused / "_ckptkeeper") if e["action"] == "delete"] == ["checkpoint-10"]
    # The plan of what is left still warns, and still removes nothing: the warning never removes anything.
    again = ckptkeeper("plan", reused, "--keep", "last:1")
    assert "  warning: this directory mixes runs: checkpoint-20 was written after checkpoint-1000" in again.stdout
    assert "remove 0 " in again.stdout


def test_a_stale_run_of_several_beside_a_new_run_of_several_through_plan_and_prune(tmp_path: Path) -> None:
    root = tmp_path / "outputs" / "exp"
    now = time.time()
    for step in (600, 800, 1000):
        stale_checkpoint(root, step, tmp_path / f"old-{step}", now - 3 * DAY + step)
    simulate_run(
        root, SimConfig(steps_per_epoch=10, epochs=3, save_steps=10, eval_strategy="no", metric_for_best_model=None)
    )
    for step in (10, 20, 30):
        set_times(root / f"checkpoint-{step}", now - 10 * MINUTE + step)

    done = ckptkeeper("plan", root.parent, "--keep", "last:2", "--json")
    assert done.returncode == 0, done.stderr
    [run] = json.loads(done.stdout)["runs"]
    assert run["run"] == "exp"
    assert run["mixed_runs"] == {
        "newest_written": "checkpoint-30",
        "highest_step": "checkpoint-1000",
        "stale": ["checkpoint-600", "checkpoint-800", "checkpoint-1000"],
    }
    text = ckptkeeper("plan", root.parent, "--keep", "last:2").stdout
    assert (
        "  warning: this directory mixes runs: checkpoint-30 was written after checkpoint-1000 (stale: "
        f"checkpoint-600, checkpoint-800, checkpoint-1000); {WARNING_TAIL}"
    ) in text.splitlines()

    done = ckptkeeper("prune", root.parent, "--keep", "last:2")
    assert done.returncode == 0, done.stdout + done.stderr
    # last:2 is by step (800, 1000); the new run keeps its resume point, 30, beside them.
    assert steps(root) == [30, 800, 1000]


def test_a_resumed_run_that_rewrote_a_higher_checkpoint_through_plan_and_prune(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    crashed = SimConfig(steps_per_epoch=50, epochs=1, save_steps=10, eval_strategy="no", metric_for_best_model=None)
    simulate_run(root, crashed)  # checkpoint-10 ... -50; then the job died
    now = time.time()
    for step in (10, 20, 30, 40, 50):
        set_times(root / f"checkpoint-{step}", now - DAY + step)
    # Resumed from checkpoint-30: the Trainer saves step 40 again, into the existing directory, file by file.
    again = SimulatedTrainer(tmp_path / "resumed", crashed)
    again.output_dir.mkdir()
    fresh = again.save(40, final=False)
    for f in sorted(fresh.iterdir()):
        shutil.copyfile(f, root / "checkpoint-40" / f.name)

    done = ckptkeeper("plan", root, "--keep", "last:1", "--json")
    assert done.returncode == 0, done.stderr
    [run] = json.loads(done.stdout)["runs"]
    assert run["mixed_runs"] == {
        "newest_written": "checkpoint-40",
        "highest_step": "checkpoint-50",
        "stale": ["checkpoint-50"],
    }
    assert {c["step"]: [r["text"] for r in c["reasons"]] for c in run["checkpoints"] if c["decision"] == "keep"} == {
        40: ["protected: newest written"],
        50: ["last 1/1", "protected: newest"],
    }
    done = ckptkeeper("prune", root, "--keep", "last:1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert steps(root) == [40, 50]


# ---- the real daemon beside a run that keeps saving ---------------------------------------------------------------
@pytest.fixture
def watch_process(tmp_path: Path) -> Iterator[list[Watch]]:
    started: list[Watch] = []
    yield started
    for w in started:
        w.kill()


def test_watch_never_removes_the_live_runs_newest_written_checkpoint(
    tmp_path: Path, watch_process: list[Watch]
) -> None:
    root = tmp_path / "outputs"
    stale_checkpoint(root, 1000, tmp_path / "old-run", time.time() - 3 * DAY)
    w = Watch(root, ["--keep", "last:1", "--settle", "0.3"], tmp_path / "watch.log")
    watch_process.append(w)
    w.wait_log("outputs/checkpoint-1000 kept: newest")

    # A new run in the same directory saves checkpoint-10, 20, ..., 60, one every ~0.8 s (longer than the settle
    # time, so a daemon that removed a settled checkpoint of the live run would leave it none for a while).
    live = SimConfig(steps_per_epoch=30, epochs=2, save_steps=10, eval_strategy="no", metric_for_best_model=None)
    trainer = TrainerThread(root, live, pace=0.08)
    trainer.start()
    looks, violations = 0, []
    while trainer.is_alive():
        finished = len(trainer.saves)  # saves finished before this look at the directory
        present = set(steps(root))
        # The live run's newest written checkpoint during the look: the last save finished before it, or one that
        # finished while it went on (the earlier one may be gone then, rightly). Nothing before the first save.
        newest = {step for step, _ in trainer.saves[finished - 1 :]} if finished else set()
        if newest and not newest & present:
            violations.append(f"none of checkpoint {sorted(newest)} on disk: {sorted(present)}")
        looks += 1
        time.sleep(0.002)
    assert [step for step, _ in trainer.finish()] == [10, 20, 30, 40, 50, 60]
    assert looks > 200, looks
    assert not violations, f"{violations[:5]}\n{w.describe()}"

    wait_until(lambda: steps(root) == [60, 1000], 15, w.describe)

    def deleted() -> list[str]:  # journaled once the reaper has deleted the bytes, after the rename out of the run
        return sorted(e["checkpoint"] for e in journal(root / "_ckptkeeper") if e["action"] == "delete")

    wait_until(lambda: deleted() == [f"checkpoint-{s}" for s in (10, 20, 30, 40, 50)], 15, lambda: f"{deleted()}")
    w.wait_log("checkpoint-60 kept: protected: newest written")
    warnings = [line for line in w.lines() if "mixes runs" in line]
    assert len(warnings) == 1, w.describe()  # once per run, not at every pass
    assert re.fullmatch(
        r"\S+ \S+ WARNING run outputs: this directory mixes runs: checkpoint-\d+ was written after checkpoint-1000 "
        rf"\(stale: checkpoint-1000\); {re.escape(WARNING_TAIL)}",
        warnings[0],
    ), warnings[0]

    # The user moves the stale checkpoint away, as the warning says: the daemon says so, once.
    os.rename(root / "checkpoint-1000", tmp_path / "checkpoint-1000")
    w.wait_log("run outputs: the directory no longer mixes runs")
    assert steps(root) == [60]
    assert len([line for line in w.lines() if "mixes runs" in line]) == 2, w.describe()
    assert " ERROR " not in w.log() and "Traceback" not in w.log(), w.describe()
    code, _took = w.terminate()
    assert code == 0, w.describe()
