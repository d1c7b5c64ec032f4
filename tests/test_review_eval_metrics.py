"""Adversarial review of named metrics from evaluation jobs and `--await` (#20; SPEC "Metrics from evaluation
jobs", "Awaiting an evaluation"). Each test here is a finding: it failed on the code as reviewed (main at
e9ddc11) and passes since the fix. The real lm-evaluation-harness fixture
(tests/fixtures/lm-eval), the real CLI as a process, and the real daemon in-process (its `reconcile_all`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ckptkeeper.config import load_settings
from ckptkeeper.watch import Daemon, WatchOptions
from tests.cliutil import bind_mount, ckptkeeper, plan_json
from tests.lmeval_fixture import ACC_NORM_POINTER, WORD_PERPLEXITY_POINTER, LmEvalFixture, copy_lmeval_fixture
from tests.watchutil import steps

DAY = 86400.0


@pytest.fixture
def lm(tmp_path: Path) -> LmEvalFixture:
    return copy_lmeval_fixture(tmp_path / "lm")


def acc_norm(evals: Path) -> str:
    return f"acc_norm=lm-eval:{evals}#{ACC_NORM_POINTER}"


def ppl(evals: Path) -> str:
    return f"ppl=lm-eval:{evals}#{WORD_PERPLEXITY_POINTER}"


def by_step(data: dict[str, Any], run: str = ".") -> dict[int, dict[str, Any]]:
    [found] = [r for r in data["runs"] if r["run"] == run]
    return {c["step"]: c for c in found["checkpoints"]}


def kinds(c: dict[str, Any]) -> list[str]:
    return [r["kind"] for r in c["reasons"]]


def set_times(top: Path, when: float) -> None:
    for path in [top, *top.rglob("*")]:
        os.utime(path, (when, when), follow_symlinks=False)


def a_results_doc(lm: LmEvalFixture, model_path: str, acc_norm_value: float, date: float) -> dict[str, Any]:
    """A real results file of the fixture (checkpoint-80's), as if the harness had evaluated `model_path`."""
    [real] = (lm.evals / "__tmp__lmeval-out__run__checkpoint-80").glob("results_*.json")
    doc: dict[str, Any] = json.loads(real.read_text())
    doc["model_name"] = model_path
    doc["config"]["model_args"]["pretrained"] = model_path
    doc["results"]["synth_likes"]["acc_norm,none"] = acc_norm_value
    doc["date"] = date
    return doc


def write_results(evals: Path, doc: dict[str, Any], name: str) -> Path:
    target = evals / name / "results_2026-12-06T10-00-00.000001.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(doc))
    return target


def a_daemon(root: Path, state: Path, keep: str, metrics: dict[str, str], awaits: list[str]) -> Daemon:
    """The real daemon, in-process (its passes run by `reconcile_all`), as `watch` builds it."""
    settings = load_settings(None, {"keep": keep, "metrics": metrics, "await": awaits}, {})
    options = WatchOptions(settle=0.0, metrics=settings.metric_specs())
    return Daemon(root, settings.policy(), state, options)


# ---- 1. data loss ----------------------------------------------------------------------------------------


def test_a_checkpoint_recreated_after_its_evaluation_is_awaited_not_judged_by_the_old_one(
    lm: LmEvalFixture, tmp_path: Path
) -> None:
    """Training restarted from scratch in the same output_dir (the old checkpoints wiped, the eval results
    kept): checkpoint-40 and -80 are new directories under old names, written after every results file. Their
    evaluations have not run; --await must hold them. As reviewed, the old checkpoint-40's acc_norm (0.33) is
    joined to the new one, which is then deleted as not the best."""
    for step in (120, 160, 200, 240):
        shutil.rmtree(lm.run / f"checkpoint-{step}")
    now = time.time()
    for step, when in ((40, now - 60), (80, now)):
        old = lm.run / f"checkpoint-{step}"
        aside = tmp_path / f"old-{step}"
        old.rename(aside)
        shutil.copytree(aside, old)  # a new directory (new inode) under the old name
        shutil.rmtree(aside)
        set_times(old, when)
    dates = [json.loads(p.read_text())["date"] for p in lm.results_files()]
    assert max(dates) < now - 3600  # every evaluation started long before these checkpoints were written
    args = ("--metric", acc_norm(lm.evals), "--keep", "best:1:acc_norm,last:1", "--await", "acc_norm:1d")
    checkpoints = by_step(plan_json(lm.run, *args))
    assert checkpoints[40]["decision"] == "keep", checkpoints[40]
    assert "awaiting" in kinds(checkpoints[40])
    assert "acc_norm" not in checkpoints[40]["metrics"]


def test_the_daemons_first_pass_does_not_tie_an_ambiguous_relative_path(lm: LmEvalFixture, tmp_path: Path) -> None:
    """Two runs, each with a checkpoint-80; a results file of `pretrained=checkpoint-80` (relative: the eval
    job's cwd is unknown) names both. `plan` ignores it with a warning and holds both (awaiting). The daemon's
    first pass ties it to run a (scanned first), judges a/checkpoint-80 by it, and deletes it unevaluated."""
    root = tmp_path / "outputs"
    root.mkdir()
    shutil.copytree(lm.run, root / "a", symlinks=True)
    shutil.copytree(lm.run, root / "b", symlinks=True)
    set_times(root, time.time())  # written just now: an await of a day holds what is not evaluated
    evals = tmp_path / "evals"
    date = time.time()
    write_results(evals, a_results_doc(lm, "checkpoint-80", 0.1, date), "checkpoint-80")
    for run in ("a", "b"):
        write_results(evals, a_results_doc(lm, f"{root}/{run}/checkpoint-120", 0.9, date), f"{run}-120")
    keep, metrics, awaits = "best:1:acc_norm,last:1", {"acc_norm": f"lm-eval:{evals}#{ACC_NORM_POINTER}"}, ["acc_norm"]
    data = plan_json(root, "--metric", acc_norm(evals), "--keep", keep, "--await", "acc_norm")
    assert any("names 2 checkpoints" in w for w in data["warnings"])  # the CLI: ambiguous, ignored
    assert all("awaiting" in kinds(by_step(data, run)[80]) for run in ("a", "b"))
    a_daemon(root, tmp_path / "state", keep, metrics, awaits).reconcile_all()
    assert steps(root / "b") == [40, 80, 120, 160, 200, 240]
    assert 80 in steps(root / "a"), "a/checkpoint-80 deleted by a value that was never its own"


def test_an_evaluation_directory_that_vanishes_does_not_remove_the_best_checkpoint(
    lm: LmEvalFixture, tmp_path: Path
) -> None:
    set_times(lm.run, time.time() - 2 * DAY)  # every await long lapsed: judged by the values alone
    metrics = {"ppl": f"lm-eval:{lm.evals}#{WORD_PERPLEXITY_POINTER}"}
    daemon = a_daemon(lm.run, tmp_path / "state", "best:1:ppl:min,last:1", metrics, ["ppl:1h"])
    daemon.reconcile_all()
    assert steps(lm.run) == [40, 240]  # 40: the lowest word_perplexity (103.05); 240: the last
    lm.evals.rename(tmp_path / "evals-archived")  # or an NFS mount that went away, or a typo'd `mv`
    daemon.reconcile_all()
    assert steps(lm.run) == [40, 240], "the best checkpoint by ppl was deleted when its source went away"


def test_a_pointer_that_no_evaluation_holds_is_refused_not_followed(lm: LmEvalFixture) -> None:
    """Every checkpoint was evaluated; the pointer misses the filter suffix every lm-eval key has. A misspelt
    Trainer metric is refused ('did you mean'); a misspelt pointer must not be followed into deletions."""
    set_times(lm.run, time.time() - 2 * DAY)
    typo = f"ppl=lm-eval:{lm.evals}#/results/synth_ppl/word_perplexity"
    result = ckptkeeper("prune", lm.run, "--metric", typo, "--keep", "best:1:ppl:min,last:1", "--await", "ppl:1h")
    assert 40 in steps(lm.run), result.stdout + result.stderr  # the lowest word_perplexity (103.05)


def test_a_relative_path_naming_the_root_run_itself_is_tied(lm: LmEvalFixture, tmp_path: Path) -> None:
    """Every evaluation by the relative path `run/checkpoint-N` (cwd: the directory holding run/). With the
    root one level up it ties; with the root being `run` itself, as the README's examples use it, it did not."""
    set_times(lm.run, time.time() - 2 * DAY)
    evals = tmp_path / "evals"
    write_results(evals, a_results_doc(lm, "run/checkpoint-160", 0.99, time.time()), "run__checkpoint-160")
    args = ("--metric", acc_norm(evals), "--keep", "best:1:acc_norm,last:1", "--await", "acc_norm:6h")
    assert by_step(plan_json(lm.root, *args), "run")[160]["metrics"].get("acc_norm") == 0.99  # root above: tied
    result = ckptkeeper("prune", lm.run, *args)
    assert 160 in steps(lm.run), result.stdout + result.stderr


def test_a_path_through_a_bind_mount_of_the_root_is_the_same_checkpoint(tmp_path: Path) -> None:
    """The eval job saw the volume at another mount point (a bind mount of the same directory on this host).
    By identity every results file is of a checkpoint below the root."""
    other = tmp_path / "mnt" / "same-volume"
    fixture = copy_lmeval_fixture(tmp_path / "lm", recorded_as=other)
    with bind_mount(fixture.root, other):
        st, st_other = (fixture.run / "checkpoint-40").stat(), (other / "run" / "checkpoint-40").stat()
        assert (st.st_dev, st.st_ino) == (st_other.st_dev, st_other.st_ino)
        data = plan_json(fixture.run, "--metric", ppl(fixture.evals), "--keep", "best:1:ppl:min,last:1")
    assert not [w for w in data["warnings"] if "outside the root" in w], data["warnings"]
    checkpoints = by_step(data)
    assert "ppl" in checkpoints[40]["metrics"] and checkpoints[40]["decision"] == "keep"


def test_a_checkpoint_copied_in_with_its_old_times_is_awaited_from_its_arrival(lm: LmEvalFixture) -> None:
    shutil.rmtree(lm.evals / "__tmp__lmeval-out__run__checkpoint-120")
    moved = lm.root / "scratch-checkpoint-120"
    (lm.run / "checkpoint-120").rename(moved)
    set_times(moved, time.time() - 2 * DAY)  # written two days ago on the node's scratch
    shutil.copytree(moved, lm.run / "checkpoint-120")  # `cp -a`: arrives now, with those times
    args = ("--metric", acc_norm(lm.evals), "--keep", "best:1:acc_norm,last:1", "--await", "acc_norm:6h")
    checkpoints = by_step(plan_json(lm.run, *args))
    assert checkpoints[120]["decision"] == "keep", checkpoints[120]["reasons"]


# ---- 2. crashes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["\u0000", "\ud800"], ids=["nul", "lone-surrogate"])
def test_a_recorded_model_path_no_filesystem_can_hold_does_not_crash_plan(
    lm: LmEvalFixture, tmp_path: Path, bad: str
) -> None:
    evals = tmp_path / "evals"
    write_results(evals, a_results_doc(lm, f"{lm.run}/checkpoint-80{bad}", 0.5, time.time()), "hostile")
    result = ckptkeeper("plan", lm.run, "--metric", acc_norm(evals), "--keep", "best:1:acc_norm,last:1")
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 0, result.stderr[-2000:]


def test_plan_does_not_open_a_fifo_in_a_checkpoint(lm: LmEvalFixture) -> None:
    fifo = lm.run / "checkpoint-40" / "eval_results.json"
    (lm.run / "checkpoint-80" / "eval_results.json").unlink()
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    writer = subprocess.Popen([sys.executable, "-c", f"import os; os.open({str(fifo)!r}, os.O_WRONLY)"])
    try:
        result = ckptkeeper("plan", lm.run, "--metric", "acc=file:eval_results.json#/results/x", "--keep", "last:1")
        assert result.returncode == 0, result.stderr
        with contextlib.suppress(subprocess.TimeoutExpired):
            writer.wait(1.0)
        assert writer.returncode is None, "plan opened the FIFO: the writer blocked on it got through"
    finally:
        writer.kill()
        writer.wait()


# ---- 3. wrong results ------------------------------------------------------------------------------------


def test_a_rule_on_the_trainers_eval_x_beside_a_defined_x_is_not_a_typo(lm: LmEvalFixture) -> None:
    loss = f"loss=lm-eval:{lm.evals}#/results/synth_ppl/bits_per_byte,none"
    result = ckptkeeper("plan", lm.run, "--metric", loss, "--keep", "best:1:eval_loss,best:1:loss:min,last:1")
    assert result.returncode == 0, result.stderr


def test_a_delta_evaluation_is_not_joined_to_its_base(lm: LmEvalFixture, tmp_path: Path) -> None:
    evals = tmp_path / "evals"
    doc = a_results_doc(lm, f"{lm.run}/checkpoint-40", 0.99, time.time())
    doc["config"]["model_args"]["delta"] = doc["model_name"] = f"{lm.run}/checkpoint-240"
    write_results(evals, doc, "delta")
    checkpoints = by_step(plan_json(lm.run, "--metric", acc_norm(evals), "--keep", "last:1"))
    assert checkpoints[40]["metrics"].get("acc_norm") != 0.99


def test_results_deeper_than_the_walk_are_found_or_warned_of(lm: LmEvalFixture, tmp_path: Path) -> None:
    """An --output_path per job below a shared tree: DIR/team/project/2026-12-06/job-17/<model dir>/results."""
    evals = tmp_path / "evals"
    deep = evals / "team" / "project" / "2026-12-06" / "job-17"
    doc = a_results_doc(lm, f"{lm.run}/checkpoint-80", 0.5, time.time())
    write_results(deep, doc, "__tmp__lm__run__checkpoint-80")
    data = plan_json(lm.run, "--metric", acc_norm(evals), "--keep", "last:1")
    found = by_step(data)[80]["metrics"].get("acc_norm") == 0.5
    assert found or any("deep" in w or "depth" in w for w in data["warnings"]), data["warnings"]


# ---- 4. clear errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["plan", "prune"])
def test_a_model_path_cannot_forge_a_line_of_output(lm: LmEvalFixture, tmp_path: Path, command: str) -> None:
    evals = tmp_path / "evals"
    forged = "deleted       run/checkpoint-240  (forged)"
    write_results(evals, a_results_doc(lm, f"/elsewhere\n{forged}", 0.5, time.time()), "hostile")
    dry = ["--dry-run"] if command == "prune" else []
    result = ckptkeeper(command, lm.run, "--metric", acc_norm(evals), "--keep", "last:1", *dry)
    lines = (result.stdout + result.stderr).splitlines()
    assert any("/elsewhere" in line for line in lines)  # the warning is there
    assert not [line for line in lines if line.startswith(forged)], lines


@pytest.mark.parametrize(("line", "key"), [("await: acc_nrom", "await")])
def test_a_config_file_error_on_a_named_metric_names_its_key(
    lm: LmEvalFixture, tmp_path: Path, line: str, key: str
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f'metrics: {{acc_norm: "lm-eval:{lm.evals}#{ACC_NORM_POINTER}"}}\n{line}\n')
    result = ckptkeeper("plan", lm.run, "--config", config, "--keep-weights", "last:1")
    assert result.returncode == 2, result.stderr
    assert f"c.yaml: {key}" in result.stderr, result.stderr
