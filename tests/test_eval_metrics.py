"""Named metrics from evaluation jobs (`--metric`) and `--await`, on the real lm-evaluation-harness fixture
(tests/fixtures/lm-eval: the real Trainer's checkpoints and the real harness's results files), through the
real CLI; SPEC "Metrics from evaluation jobs" and "Awaiting an evaluation"."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from ckptkeeper.metric_specs import MetricSpecError, format_pointer, parse_metric, parse_pointer, resolve
from tests.cliutil import ckptkeeper, plan_json
from tests.lmeval_fixture import ACC_NORM, ACC_NORM_POINTER, WORD_PERPLEXITY_POINTER, LmEvalFixture, copy_lmeval_fixture

STEPS = [40, 80, 120, 160, 200, 240]


@pytest.fixture
def lm(tmp_path: Path) -> LmEvalFixture:
    return copy_lmeval_fixture(tmp_path / "lm")


def acc_norm(fixture: LmEvalFixture) -> str:
    return f"acc_norm=lm-eval:{fixture.evals}#{ACC_NORM_POINTER}"


def by_step(data: dict[str, Any]) -> dict[int, dict[str, Any]]:
    [run] = data["runs"]
    return {c["step"]: c for c in run["checkpoints"]}


def kinds(c: dict[str, Any]) -> list[str]:
    return [r["kind"] for r in c["reasons"]]


# ---- JSON Pointer (RFC 6901) -----------------------------------------------------------------------------


RFC_DOC = {"foo": ["bar", "baz"], "": 0, "a/b": 1, "c%d": 2, "e^f": 3, "g|h": 4, "i\\j": 5, 'k"l': 6, " ": 7, "m~n": 8}


@pytest.mark.parametrize(
    ("pointer", "value"),
    [
        ("/foo", ["bar", "baz"]),
        ("/foo/0", "bar"),
        ("/", 0),
        ("/a~1b", 1),
        ("/c%d", 2),
        ("/e^f", 3),
        ("/g|h", 4),
        ("/i\\j", 5),
        ('/k"l', 6),
        ("/ ", 7),
        ("/m~0n", 8),
    ],
)
def test_the_rfc_6901_examples_resolve(pointer: str, value: object) -> None:
    tokens = parse_pointer(pointer)
    assert resolve(RFC_DOC, tokens) == value
    assert format_pointer(tokens) == pointer


@pytest.mark.parametrize("pointer", ["/foo/2", "/foo/01", "/foo/-", "/nope", "/foo/0/x"])
def test_a_pointer_to_nothing_is_a_key_error(pointer: str) -> None:
    with pytest.raises(KeyError):
        resolve(RFC_DOC, parse_pointer(pointer))


def test_lm_evals_commas_and_dots_are_plain_characters_in_a_token() -> None:
    assert parse_pointer("/results/hellaswag/acc_norm,none") == ("results", "hellaswag", "acc_norm,none")
    assert parse_pointer("/results/mmlu_high.school/acc,none")[1] == "mmlu_high.school"


# ---- definitions: usage errors that name what is wrong ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("eval_acc=file:r.json#/acc", "may not start with eval_"),
        ("acc=s3:bucket/r.json#/acc", "unknown source 's3:bucket/r.json': the sources are file:, lm-eval:"),
        ("acc=file:r.json", "no JSON pointer"),
        ("acc=file:r.json#results/acc", "must start with '/'"),
        ("acc=file:r.json#/a~2b", "'~' must be followed by 0 or 1"),
        ("acc=file:r.json#", "the JSON pointer is empty"),
        ("acc=file:/etc/r.json#/acc", "must be a path inside each checkpoint directory"),
        ("acc=file:../r.json#/acc", "must be a path inside each checkpoint directory"),
        ("acc=lm-eval:/no/such/dir#/acc", "/no/such/dir does not exist"),
        ("=file:r.json#/acc", "is not a metric definition"),
        ("acc", "is not a metric definition"),
        ("1acc=file:r.json#/acc", "is not a metric name"),
    ],
)
def test_a_bad_definition_is_a_usage_error_naming_the_problem(tmp_path: Path, text: str, said: str) -> None:
    with pytest.raises(MetricSpecError, match=None) as e:
        parse_metric(text)
    assert said in str(e.value)
    (tmp_path / "checkpoint-1").mkdir()
    result = ckptkeeper("plan", tmp_path, "--keep", "last:1", "--metric", text)
    assert result.returncode == 2, result.stdout
    assert "--metric" in result.stderr and said in result.stderr


def test_a_misspelt_rule_metric_suggests_the_defined_one(lm: LmEvalFixture) -> None:
    """Refused when planned, where the run's own metrics are known (a Trainer's `eval_x` is no typo of `x`)."""
    result = ckptkeeper("plan", lm.run, "--metric", acc_norm(lm), "--keep", "best:1:acc_nrom,last:1")
    assert result.returncode == 3
    assert "did you mean acc_norm?" in result.stderr


def test_a_misspelt_rule_metric_is_refused_before_any_trainer_eval(tmp_path: Path) -> None:
    """No Trainer metric to tell the typo by: a near miss of a defined name is refused all the same."""
    from ckptkeeper.simtrainer import SimConfig, simulate_run

    simulate_run(tmp_path / "run", SimConfig(eval_strategy="no", metric_for_best_model=None))
    (tmp_path / "evals").mkdir()
    metric = f"hellaswag=lm-eval:{tmp_path / 'evals'}#/results/hellaswag/acc_norm,none"
    result = ckptkeeper("prune", tmp_path / "run", "--metric", metric, "--keep", "best:1:helaswag,last:1")
    assert result.returncode == 3, result.stderr
    assert "did you mean hellaswag?" in result.stderr
    assert len(list((tmp_path / "run").glob("checkpoint-*"))) > 1  # nothing removed


def test_an_await_of_an_undefined_metric_is_a_usage_error(lm: LmEvalFixture) -> None:
    result = ckptkeeper("plan", lm.run, "--metric", acc_norm(lm), "--keep", "last:1", "--await", "acc_nrom:2h")
    assert result.returncode == 2
    assert "--await" in result.stderr and "did you mean acc_norm?" in result.stderr


def test_an_await_with_a_bad_timeout_is_a_usage_error(lm: LmEvalFixture) -> None:
    result = ckptkeeper("plan", lm.run, "--metric", acc_norm(lm), "--keep", "last:1", "--await", "acc_norm:soon")
    assert result.returncode == 2
    assert "'soon' is not a timeout" in result.stderr


# ---- lm-eval: values, ties, the newest wins --------------------------------------------------------------


def test_lm_eval_values_are_the_harness_own_numbers(lm: LmEvalFixture) -> None:
    data = plan_json(lm.run, "--metric", acc_norm(lm), "--keep", "best:1:acc_norm,last:1")
    assert data["metrics_defined"] == {"acc_norm": f"lm-eval:{lm.evals}#{ACC_NORM_POINTER}"}
    steps = by_step(data)
    assert {s: c["metrics"]["acc_norm"] for s, c in steps.items()} == ACC_NORM
    for c in steps.values():
        assert os.path.basename(c["metric_sources"]["acc_norm"]).startswith("results_")
        assert "eval_loss" in c["metrics"]  # the Trainer's own metrics are still there
    assert steps[240]["decision"] == "keep" and "best" in kinds(steps[240])
    assert {s for s, c in steps.items() if c["decision"] == "delete"} == {40, 80, 120, 160, 200}


def test_the_newest_of_three_evaluations_wins(lm: LmEvalFixture) -> None:
    """checkpoint-240 was evaluated twice with the same command, then once by a relative path: the newest file
    (by `date`) is the source."""
    tied = [
        *(lm.evals / "__tmp__lmeval-out__run__checkpoint-240").glob("results_*"),
        *(lm.evals / "checkpoint-240").glob("results_*"),
    ]
    assert len(tied) == 3
    newest = max(tied, key=lambda p: json.loads(p.read_text())["date"])
    steps = by_step(plan_json(lm.run, "--metric", acc_norm(lm), "--keep", "last:1"))
    assert steps[240]["metric_sources"]["acc_norm"] == str(newest)


def test_a_newer_evaluation_with_another_value_replaces_the_older(lm: LmEvalFixture) -> None:
    old = next((lm.evals / "__tmp__lmeval-out__run__checkpoint-40").glob("results_*.json"))
    doc = json.loads(old.read_text())
    doc["date"] += 3600
    doc["results"]["synth_likes"]["acc_norm,none"] = 0.99
    (old.parent / "results_2026-12-06T00-12-29.462769.json").write_text(json.dumps(doc))
    steps = by_step(plan_json(lm.run, "--metric", acc_norm(lm), "--keep", "best:1:acc_norm,last:1"))
    assert steps[40]["metrics"]["acc_norm"] == 0.99
    assert "best" in kinds(steps[40]) and steps[240]["decision"] == "keep"


def test_a_lower_is_better_metric_keeps_another_checkpoint(lm: LmEvalFixture) -> None:
    ppl = f"word_perplexity=lm-eval:{lm.evals}#{WORD_PERPLEXITY_POINTER}"
    steps = by_step(plan_json(lm.run, "--metric", ppl, "--keep", "best:1:word_perplexity:min,last:1"))
    assert "best" in kinds(steps[40])  # 103.05: the lowest, though the Trainer's eval_loss calls 240 best
    assert steps[40]["decision"] == "keep"


def test_results_of_a_path_through_a_symlink_or_dotdot_are_the_same_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "link"
    fixture_dir = tmp_path / "lm"
    link.symlink_to(fixture_dir)
    fixture = copy_lmeval_fixture(fixture_dir, recorded_as=f"{tmp_path}/elsewhere/../elsewhere/link")
    steps = by_step(plan_json(fixture.run, "--metric", acc_norm(fixture), "--keep", "last:1"))
    assert {s: c["metrics"].get("acc_norm") for s, c in steps.items()} == ACC_NORM


def test_results_of_a_checkpoint_outside_the_root_are_ignored_with_a_warning(tmp_path: Path) -> None:
    other = copy_lmeval_fixture(tmp_path / "other")
    mine = copy_lmeval_fixture(tmp_path / "mine")
    data = plan_json(mine.run, "--metric", acc_norm(other), "--keep", "last:1")
    # Only the relative-path evaluation (checkpoint-240, which names one checkpoint below this root) ties.
    assert {s: c["metrics"].get("acc_norm") for s, c in by_step(data).items()} == {
        **dict.fromkeys(STEPS[:-1]),
        240: ACC_NORM[240],
    }
    assert any("which is outside the root" in w and "ignored" in w for w in data["warnings"])


def test_a_relative_path_that_names_two_checkpoints_ties_to_none(lm: LmEvalFixture) -> None:
    """`pretrained=checkpoint-240` (the harness's cwd is not recorded) names one checkpoint below `run`; below
    a root of two runs with a checkpoint-240 each it names two, and ties to neither."""
    root = lm.root / "outputs"
    root.mkdir()
    shutil.move(lm.run, root / "a")
    shutil.copytree(root / "a", root / "b", symlinks=True)
    data = plan_json(root, "--metric", f"acc_norm=lm-eval:{lm.evals}#{ACC_NORM_POINTER}", "--keep", "last:1")
    assert any("names 2 checkpoints (a/checkpoint-240, b/checkpoint-240)" in w for w in data["warnings"])


def test_an_lm_eval_directory_inside_the_root_is_not_scanned_as_runs(lm: LmEvalFixture) -> None:
    """evals/checkpoint-240/ (the relative-path run's directory) looks like a run holding a checkpoint."""
    shutil.move(lm.evals, lm.run / "evals")
    metric = f"acc_norm=lm-eval:{lm.run / 'evals'}#{ACC_NORM_POINTER}"
    data = plan_json(lm.run, "--metric", metric, "--keep", "last:1")
    assert [r["run"] for r in data["runs"]] == ["."]


def test_an_unfinished_results_file_counts_for_nothing(lm: LmEvalFixture) -> None:
    """The harness writes in place: a reader can see it empty or cut short. It is not an evaluation yet."""
    [newest] = (lm.evals / "__tmp__lmeval-out__run__checkpoint-200").glob("results_*.json")
    text = newest.read_text()
    newest.write_text(text[: len(text) // 2])
    steps = by_step(plan_json(lm.run, "--metric", acc_norm(lm), "--keep", "best:1:acc_norm,last:1"))
    assert "acc_norm" not in steps[200]["metrics"]
    assert "not evaluated yet" in steps[200]["missing_metrics"]["acc_norm"]


# ---- file: -----------------------------------------------------------------------------------------------


def test_a_file_source_reads_the_copy_beside_the_weights(lm: LmEvalFixture) -> None:
    metric = "acc=file:eval_results.json#/results/synth_likes/acc,none"
    steps = by_step(plan_json(lm.run, "--metric", metric, "--keep", "best:1:acc,last:1"))
    assert {s for s, c in steps.items() if "acc" in c["metrics"]} == {80, 240}
    assert steps[80]["metric_sources"] == {"acc": "eval_results.json"}
    assert steps[40]["missing_metrics"] == {"acc": "no eval_results.json in the checkpoint"}


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ('{"results": {"synth_likes": {"acc,none": "N/A"}}}', "is not a finite number"),
        ('{"results": {"synth_likes": {"acc,none": 1e400}}}', "is not a finite number"),
        ('{"results": {"synth_likes": {"acc,none": NaN}}}', "is not a finite number"),
        ('{"results": {"synth_likes": {"acc,none": true}}}', "is not a finite number"),
        ('{"results": {}}', "has no /results/synth_likes/acc,none"),
        ('{"results": ', "is not valid JSON"),
        (" \n", "is not valid JSON"),  # an empty file makes the checkpoint incomplete (a save in progress)
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"results": {"synth_likes": {"acc,none": ' + "9" * 5000 + "}}}", "is not valid JSON"),
    ],
)
def test_a_file_that_says_no_number_means_the_metric_is_missing(lm: LmEvalFixture, content: str, why: str) -> None:
    target = lm.run / "checkpoint-80" / "eval_results.json"
    target.write_text(content)
    metric = "acc=file:eval_results.json#/results/synth_likes/acc,none"
    steps = by_step(plan_json(lm.run, "--metric", metric, "--keep", "best:1:acc,last:1", "--await", "acc"))
    assert "acc" not in steps[80]["metrics"]
    assert why in steps[80]["missing_metrics"]["acc"]
    assert steps[80]["decision"] == "keep"  # and awaited: it is not judged without it before the timeout


def test_a_file_source_never_follows_a_symlink(lm: LmEvalFixture, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text('{"results": {"synth_likes": {"acc,none": 0.5}}}')
    target = lm.run / "checkpoint-40" / "eval_results.json"
    target.symlink_to(outside)
    metric = "acc=file:eval_results.json#/results/synth_likes/acc,none"
    steps = by_step(plan_json(lm.run, "--metric", metric, "--keep", "last:1"))
    assert "acc" not in steps[40]["metrics"]
    assert "symlink" in steps[40]["missing_metrics"]["acc"]


# ---- await -----------------------------------------------------------------------------------------------


def test_await_keeps_what_is_not_evaluated_yet_and_says_how_long(lm: LmEvalFixture) -> None:
    """The copy's change times are now: the checkpoints arrived a moment ago, whatever their modification times
    say (as after `cp -a`)."""
    for d in (lm.evals / "__tmp__lmeval-out__run__checkpoint-40", lm.evals / "__tmp__lmeval-out__run__checkpoint-80"):
        shutil.rmtree(d)
    now = time.time()
    args = ("--metric", acc_norm(lm), "--keep", "best:1:acc_norm,last:1", "--await", "acc_norm:6h")
    steps = by_step(plan_json(lm.run, *args))
    for step in (40, 80):
        [reason] = [r for r in steps[step]["reasons"] if r["kind"] == "awaiting"]
        assert reason["rule"] == "await:acc_norm"
        assert 6 * 3600 - 60 < reason["until"] - now <= 6 * 3600
        assert reason["text"] == "awaiting acc_norm (5h59m left)"
        assert steps[step]["decision"] == "keep"
    assert {s for s, c in steps.items() if c["decision"] == "delete"} == {120, 160, 200}
    text = ckptkeeper("plan", lm.run, *args).stdout
    assert "awaiting acc_norm (5h59m left)" in text


def test_after_its_timeout_a_checkpoint_is_judged_without_the_metric(lm: LmEvalFixture) -> None:
    shutil.rmtree(lm.evals / "__tmp__lmeval-out__run__checkpoint-40")
    time.sleep(1.1)  # the copy's change times are its arrival: a second ago at least
    args = ("--metric", acc_norm(lm), "--keep", "best:1:acc_norm,last:1", "--await", "acc_norm:1s")
    steps = by_step(plan_json(lm.run, *args))
    assert steps[40]["decision"] == "delete"
    text = ckptkeeper("plan", lm.run, *args).stdout
    assert "acc_norm never arrived within 1s for checkpoint-40: judged without it" in text


def test_a_best_rule_on_a_defined_metric_no_checkpoint_has_yet_is_not_refused(lm: LmEvalFixture) -> None:
    shutil.rmtree(lm.evals)
    lm.evals.mkdir()
    result = ckptkeeper("plan", lm.run, "--metric", acc_norm(lm), "--keep", "best:1:acc_norm,last:1", "--json")
    assert result.returncode == 0, result.stderr
    steps = by_step(json.loads(result.stdout))
    assert [s for s, c in steps.items() if "best" in kinds(c)] == []


def test_prune_with_await_removes_only_what_was_evaluated(lm: LmEvalFixture) -> None:
    shutil.rmtree(lm.evals / "__tmp__lmeval-out__run__checkpoint-120")
    args = ("--metric", acc_norm(lm), "--keep", "best:1:acc_norm,last:1", "--await", "acc_norm:1d")
    result = ckptkeeper("prune", lm.run, *args)
    assert result.returncode == 0, result.stderr
    left = sorted(int(p.name.split("-")[1]) for p in lm.run.glob("checkpoint-*"))
    assert left == [120, 240]


def test_results_older_than_their_checkpoint_are_not_used_and_said(lm: LmEvalFixture) -> None:
    """A run started again in the same output_dir: checkpoint-80 is written anew after its old evaluation."""
    state = lm.run / "checkpoint-80" / "trainer_state.json"
    state.write_bytes(state.read_bytes())  # written now: every evaluation of checkpoint-80 started before
    data = plan_json(lm.run, "--metric", acc_norm(lm), "--keep", "best:1:acc_norm,last:1", "--await", "acc_norm")
    steps = by_step(data)
    assert "acc_norm" not in steps[80]["metrics"]
    assert "older than it" in steps[80]["missing_metrics"]["acc_norm"]
    assert steps[80]["decision"] == "keep" and "awaiting" in kinds(steps[80])
    assert any("checkpoint-80 started before the checkpoint was written" in w for w in data["warnings"])


def test_a_results_file_copied_into_an_older_checkpoint_does_not_make_it_the_newest_written(tmp_path: Path) -> None:
    """The `file:` pattern (an eval job copies its results beside the weights, later): that copy is no write of
    the training run, so the older checkpoint is not taken for the resume point of a directory that mixes runs."""
    from ckptkeeper.simtrainer import SimConfig, simulate_run

    run = tmp_path / "run"
    simulate_run(run, SimConfig(steps_per_epoch=10, epochs=4))
    time.sleep(0.05)
    (run / "checkpoint-20" / "eval_results.json").write_text('{"results": {"t": {"acc,none": 0.5}}}')
    metric = "acc=file:eval_results.json#/results/t/acc,none"
    data = plan_json(run, "--metric", metric, "--keep", "best:1:acc,last:1")
    assert data["warnings"] == [] and data["runs"][0]["mixed_runs"] is None
    assert kinds(by_step(data)[20]) == ["best"]
    without = plan_json(run, "--keep", "last:1")  # without --metric, the contract's measure: the newest file
    assert without["runs"][0]["mixed_runs"] is not None
