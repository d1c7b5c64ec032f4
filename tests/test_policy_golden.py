"""The planner over one fixed run, through a table of policies, compared with golden files (as restic's
policy tests do), with invariants checked on every case; plus the refusals of SPEC "Refusals".

Golden files: tests/golden/<case>.txt. The leading `#` lines are a hand-written note on what the case shows
(kept when regenerating); the rest is the rendered plan, compared exactly. Regenerate with
`CKPTKEEPER_UPDATE_GOLDEN=1 python -m pytest tests/test_policy_golden.py`, then check every diff by hand.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from ckptkeeper.model import Action, Checkpoint, Run, RunPlan
from ckptkeeper.policy import NO_RULE, Protections, plan_run, refusal
from ckptkeeper.render import reason_texts
from ckptkeeper.rules import Best, Last, parse_rules

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("CKPTKEEPER_UPDATE_GOLDEN") == "1"
NAN = math.nan


def ckpt(
    step: int,
    epoch: float | None,
    metrics: Mapping[str, float] | None = None,
    *,
    incomplete: str | None = None,
    trainer_best: int | None = None,
) -> Checkpoint:
    return Checkpoint(
        name=f"checkpoint-{step}",
        step=step,
        complete=incomplete is None,
        incomplete_reason=incomplete,
        epoch=epoch,
        metrics=dict(metrics or {}),
        size_bytes=step * 1000,
        trainer_best_steps=() if trainer_best is None else (trainer_best,),
    )


# One run. Epoch buckets (ceil(round(epoch, 6))) in the last column.
#  step  epoch               state        eval_loss  eval_accuracy  eval_a_loss  eval_b_loss  trainer best  bucket
#    10  0.38                complete     -          -              -            -            -             1
#    20  0.76                complete     0.90       0.60           0.95         -            -             1
#    26  0.9995              complete     0.80       0.65           -            -            -             1
#    40  1.15                complete     -          -              -            -            -             2
#    50  -                   incomplete   -          -              -            -            -             -
#    60  2.0                 complete     0.70       NaN            0.60         0.90         -             2
#    80  2.6                 complete     0.70 (tie) 0.72           -            -            -             3
#    90  3.0000000000000004  complete     NaN        0.72 (tie)     0.55         -            -             3
#   100  3.4                 complete     0.75       0.70           -            0.80         20 (stale)    4
#   110  3.9                 incomplete   0.10       0.99           -            -            60            4
#   120  4.3                 complete     0.72       0.71           0.55 (tie)   0.85         60            5
#   130  4.7                 incomplete   -          -              -            -            110           5
# 120 is the newest complete checkpoint, so the Trainer's best is 60 (its trainer_best_step); 130 (incomplete)
# and 100 (older) carry other values that must be ignored.
CHECKPOINTS = (
    ckpt(10, 0.38),
    ckpt(20, 0.76, {"eval_loss": 0.90, "eval_accuracy": 0.60, "eval_a_loss": 0.95}),
    ckpt(26, 0.9995, {"eval_loss": 0.80, "eval_accuracy": 0.65}),
    ckpt(40, 1.15),
    ckpt(50, None, incomplete="no trainer_state.json"),
    ckpt(60, 2.0, {"eval_loss": 0.70, "eval_accuracy": NAN, "eval_a_loss": 0.60, "eval_b_loss": 0.90}),
    ckpt(80, 2.6, {"eval_loss": 0.70, "eval_accuracy": 0.72}),
    ckpt(90, 3.0000000000000004, {"eval_loss": NAN, "eval_accuracy": 0.72, "eval_a_loss": 0.55}),
    ckpt(100, 3.4, {"eval_loss": 0.75, "eval_accuracy": 0.70, "eval_b_loss": 0.80}, trainer_best=20),
    ckpt(
        110,
        3.9,
        {"eval_loss": 0.10, "eval_accuracy": 0.99},
        incomplete="model.safetensors: header does not cover the file",
        trainer_best=60,
    ),
    ckpt(
        120,
        4.3,
        {"eval_loss": 0.72, "eval_accuracy": 0.71, "eval_a_loss": 0.55, "eval_b_loss": 0.85},
        trainer_best=60,
    ),
    ckpt(130, 4.7, incomplete="checkpoint-is-incomplete.txt present", trainer_best=110),
)
# Stored out of step order, as a directory listing may give them: the planner must not care.
RUN = Run(".", tuple(sorted(CHECKPOINTS, key=lambda c: str(c.step))))


@dataclass(frozen=True)
class Case:
    name: str
    rules: str
    protect_trainer_best: bool = True
    removal: Action = Action.DELETE


CASES = [
    Case("last-3", "last:3"),
    Case("last-3-no-trainer-best", "last:3", protect_trainer_best=False),
    Case("last-3-archive", "last:3", removal=Action.ARCHIVE),
    Case("last-20-more-than-there-are", "last:20"),
    Case("best-1", "best:1"),
    Case("best-2-accuracy", "best:2:accuracy"),
    Case("best-3-eval_loss-max", "best:3:eval_loss:max"),
    Case("best-6-nan-ranks-worst", "best:6"),
    Case("best-per-eval-set", "best:1:a_loss,best:1:eval_b_loss"),
    Case("epoch-all", "epoch:all"),
    Case("epoch-2", "epoch:2"),
    Case("every-20", "every:20"),
    Case("best-1-last-5-epoch-all", "best:1,last:5,epoch:all"),
    Case("best-1-last-5-epoch-all-no-trainer-best-archive", "best:1,last:5,epoch:all", False, Action.ARCHIVE),
    Case("refused-metric-typo", "last:2,best:1:acuracy"),
    Case("refused-no-rule", ""),
]


def plan_case(case: Case) -> RunPlan:
    return plan_run(RUN, parse_rules(case.rules), Protections(trainer_best=case.protect_trainer_best), case.removal)


def render(case: Case, plan: RunPlan) -> str:
    lines = [
        f"policy: {case.rules or '(no rules)'}",
        f"protect trainer best: {'yes' if case.protect_trainer_best else 'no'}",
        f"removal: {case.removal.value}",
        f"refusal: {plan.refusal or 'none'}",
    ]
    width = max(len(d.checkpoint.name) for d in plan.decisions)
    lines += [
        f"{d.checkpoint.name:<{width}}  {d.action.value:<7}  {'; '.join(reason_texts(d.reasons))}"
        for d in plan.decisions
    ]
    lines.append(f"kept {len(plan.kept)}, removed {len(plan.removed)}")
    return "\n".join(lines) + "\n"


def check_invariants(run: Run, plan: RunPlan, protections: Protections, removal: Action) -> None:
    assert plan.run == run
    assert len(plan.kept) + len(plan.removed) == len(run.checkpoints)
    assert sorted(d.checkpoint.step for d in plan.decisions) == sorted(c.step for c in run.checkpoints)
    assert [d.checkpoint.step for d in plan.decisions] == sorted(c.step for c in run.checkpoints)
    for d in plan.decisions:
        assert d.reasons, d
        assert all(r.strip() for r in reason_texts(d.reasons)), d
        assert d.action in (Action.KEEP, removal), d
    kept = {d.checkpoint.step for d in plan.kept}
    assert {c.step for c in run.checkpoints if not c.complete} <= kept
    complete = [c for c in run.checkpoints if c.complete]
    if complete:
        newest = max(complete, key=lambda c: c.step)
        assert newest.step in kept
        newest_decision = next(d for d in plan.decisions if d.checkpoint.step == newest.step)
        assert "protected: newest" in reason_texts(newest_decision.reasons)
        for best in newest.trainer_best_steps if protections.trainer_best else ():
            if best in {c.step for c in run.checkpoints}:
                assert best in kept
    if plan.refusal:
        assert plan.removed == ()


def split_golden(text: str) -> tuple[list[str], str]:
    lines = text.splitlines(keepends=True)
    head = 0
    while head < len(lines) and lines[head].startswith("#"):
        head += 1
    return lines[:head], "".join(lines[head:])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden(case: Case) -> None:
    plan = plan_case(case)
    check_invariants(RUN, plan, Protections(case.protect_trainer_best), case.removal)
    rendered = render(case, plan)
    path = GOLDEN / f"{case.name}.txt"
    if UPDATE:
        note = split_golden(path.read_text())[0] if path.exists() else []
        GOLDEN.mkdir(exist_ok=True)
        path.write_text("".join(note or ["# TODO: say what this case shows, after checking it by hand\n"]) + rendered)
    note, body = split_golden(path.read_text())
    assert note, f"{path.name}: starts with a note on what the case shows"
    assert not any("TODO" in line for line in note), f"{path.name}: check the new golden by hand and describe it"
    assert body == rendered


def test_every_golden_file_belongs_to_a_case() -> None:
    assert sorted(p.name for p in GOLDEN.iterdir()) == sorted(f"{c.name}.txt" for c in CASES)


def test_the_plan_does_not_depend_on_the_order_of_the_checkpoints() -> None:
    for case in CASES:
        reordered = Run(RUN.path, tuple(reversed(RUN.checkpoints)))
        protections = Protections(case.protect_trainer_best)
        again = plan_run(reordered, parse_rules(case.rules), protections, case.removal)
        assert again.decisions == plan_case(case).decisions
        assert again.refusal == plan_case(case).refusal


# --- refusals -------------------------------------------------------------------------------------------------


def test_no_rules_is_refused_and_nothing_is_removed() -> None:
    assert refusal(RUN, ()) == NO_RULE
    assert NO_RULE == "no keep rule given: refusing to remove anything (pass --keep, e.g. --keep last:5)"
    plan = plan_run(RUN, ())
    assert plan.refusal == NO_RULE
    assert plan.removed == ()
    assert len(plan.kept) == len(RUN.checkpoints)


def test_best_rule_on_a_missing_metric_is_refused_naming_the_metrics_that_exist() -> None:
    rules = parse_rules("last:2,best:1:acuracy")
    expected = (
        "rule 'best:1:eval_acuracy': no checkpoint has eval_acuracy; did you mean eval_accuracy? "
        "(the run's metrics: eval_a_loss, eval_accuracy, eval_b_loss, eval_loss)"
    )
    assert refusal(RUN, rules) == expected
    plan = plan_run(RUN, rules, removal=Action.ARCHIVE)
    assert plan.refusal == expected
    assert plan.removed == ()
    # the rules that do apply still say why they keep what they keep; the rest says why it stays
    by_step = {d.checkpoint.step: d for d in plan.decisions}
    assert tuple(reason_texts(by_step[100].reasons)) == ("last 2/2",)
    assert tuple(reason_texts(by_step[10].reasons)) == ("refused: nothing is removed in this run",)


def test_a_refusal_without_a_close_metric_suggests_none() -> None:
    """The run is named where the refusal is shown (its table, its log line, its line of the error)."""
    run = Run("sweep/lr-1e-4", RUN.checkpoints)
    assert refusal(run, (Best(1, "eval_f1", "max"),)) == (
        "rule 'best:1:eval_f1': no checkpoint has eval_f1 "
        "(the run's metrics: eval_a_loss, eval_accuracy, eval_b_loss, eval_loss)"
    )


def test_a_run_without_any_eval_is_not_refused_and_best_keeps_nothing_there() -> None:
    run = Run(
        "no-eval",
        (
            ckpt(100, 0.5),
            ckpt(200, 1.0),
            ckpt(300, 1.5, {"loss": 0.4, "learning_rate": 1e-5, "grad_norm": 0.3}),  # training logs only
            ckpt(400, 2.0),
            ckpt(500, None, incomplete="no trainer_state.json"),
        ),
    )
    rules = parse_rules("best:2")
    assert refusal(run, rules) is None
    plan = plan_run(run, rules)
    check_invariants(run, plan, Protections(), Action.DELETE)
    assert plan.refusal is None
    assert [(d.checkpoint.step, d.action, tuple(reason_texts(d.reasons))) for d in plan.decisions] == [
        (100, Action.DELETE, ("no rule keeps it",)),
        (200, Action.DELETE, ("no rule keeps it",)),
        (300, Action.DELETE, ("no rule keeps it",)),
        (400, Action.KEEP, ("protected: newest",)),
        (500, Action.KEEP, ("incomplete: no trainer_state.json",)),
    ]
    # with another rule alongside, that rule alone decides
    plan = plan_run(run, (*rules, Last(2)))
    assert [d.checkpoint.step for d in plan.kept] == [300, 400, 500]


def test_a_metric_that_only_an_incomplete_checkpoint_has_is_not_a_typo() -> None:
    """The metric exists in the run (in an incomplete checkpoint), so the rule is not refused; it keeps
    nothing because incomplete checkpoints are never counted by a rule."""
    run = Run(
        ".",
        (
            ckpt(10, 1.0, {"eval_loss": 0.5}),
            ckpt(20, 2.0, {"eval_loss": 0.4}),
            ckpt(30, 3.0, {"eval_loss": 0.3, "eval_f1": 0.9}, incomplete="checkpoint-is-incomplete.txt present"),
        ),
    )
    rules = parse_rules("best:1:f1")
    assert refusal(run, rules) is None
    plan = plan_run(run, rules)
    assert [(d.checkpoint.step, d.action) for d in plan.decisions] == [
        (10, Action.DELETE),
        (20, Action.KEEP),
        (30, Action.KEEP),
    ]


def test_only_a_run_with_no_checkpoint_at_all_plans_nothing() -> None:
    plan = plan_run(Run(".", ()), parse_rules("last:1"))
    assert plan.decisions == ()
    assert plan.refusal is None


def test_keep_is_not_a_removal_action() -> None:
    with pytest.raises(ValueError, match="removal must be delete or archive"):
        plan_run(RUN, parse_rules("last:1"), removal=Action.KEEP)
