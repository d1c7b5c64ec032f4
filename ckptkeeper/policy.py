"""The planner: a pure function from one run's checkpoints and the rules to one decision per checkpoint.

It never touches the disk or the clock, so the same directory always gives the same plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ckptkeeper.model import Action, Decision, Run, RunPlan
from ckptkeeper.rules import AnyRule, Best, format_rule

NO_RULE = "no keep rule given: refusing to remove anything (pass --keep, e.g. --keep last:5)"


@dataclass(frozen=True)
class Protections:
    trainer_best: bool = True


def refusal(run: Run, rules: Sequence[AnyRule]) -> str | None:
    """Why this run must not be pruned at all, or None.

    A `best` rule whose metric no checkpoint has, in a run that does have eval metrics, is almost always
    a typo (`best:1:acuracy`); followed literally it would keep nothing and let everything else go.
    """
    if not rules:
        return NO_RULE
    present = sorted({name for c in run.checkpoints for name in c.metrics if name.startswith("eval_")})
    if not present:
        return None  # no eval yet: a best rule simply keeps nothing here yet
    for rule in rules:
        if isinstance(rule, Best) and rule.metric not in present:
            return (
                f"rule {format_rule(rule)!r}: no checkpoint of run {run.path!r} has {rule.metric}; "
                f"the metrics it has are {', '.join(present)}"
            )
    return None


def _protections(run: Run, protect: Protections) -> dict[int, list[str]]:
    reasons: dict[int, list[str]] = {}
    complete = [c for c in run.checkpoints if c.complete]
    for c in run.checkpoints:
        if not c.complete:
            reasons.setdefault(c.step, []).append(f"incomplete: {c.incomplete_reason or 'unknown'}")
    if complete:
        newest = max(complete, key=lambda c: c.step)
        reasons.setdefault(newest.step, []).append("protected: newest")
        present = {c.step for c in run.checkpoints}
        for best_step in newest.trainer_best_steps if protect.trainer_best else ():
            if best_step in present:
                reasons.setdefault(best_step, []).append("protected: trainer best")
    return reasons


def plan_run(
    run: Run,
    rules: Sequence[AnyRule],
    protections: Protections = Protections(),
    removal: Action = Action.DELETE,
) -> RunPlan:
    if removal is Action.KEEP:
        raise ValueError("removal must be delete or archive")
    complete = sorted((c for c in run.checkpoints if c.complete), key=lambda c: c.step)
    reasons: dict[int, list[str]] = {}
    for rule in rules:
        for step, reason in rule.keeps(complete).items():
            reasons.setdefault(step, []).append(reason)
    for step, protected in _protections(run, protections).items():
        reasons.setdefault(step, []).extend(protected)

    refused = refusal(run, rules)
    decisions = []
    for c in sorted(run.checkpoints, key=lambda c: c.step):
        why = reasons.get(c.step)
        if why:
            decisions.append(Decision(c, Action.KEEP, tuple(why)))
        elif refused:
            decisions.append(Decision(c, Action.KEEP, ("refused: nothing is removed in this run",)))
        else:
            decisions.append(Decision(c, removal, ("no rule keeps it",)))
    return RunPlan(run, tuple(decisions), refused)
