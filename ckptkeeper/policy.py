"""The planner: a pure function from one run's checkpoints and the rules to one decision per checkpoint.

It never touches the disk or the clock, so the same directory always gives the same plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ckptkeeper.model import Action, Checkpoint, Decision, MixedRuns, Run, RunPlan
from ckptkeeper.rules import AnyRule, Best, format_rule

NO_RULE = "no keep rule given: refusing to remove anything (pass --keep, e.g. --keep last:5)"
NEWEST = "protected: newest"
NEWEST_WRITTEN = "protected: newest written"
NEWEST_WRITTEN_SKEWED = "protected: newest written (clock skew)"


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


def _time(c: Checkpoint, by_state: bool) -> float | None:
    return c.state_written_at if by_state else c.written_at


def _stale(run: Run, written: Checkpoint, written_time: float, by_state: bool, future: bool) -> tuple[Checkpoint, ...]:
    """The checkpoints (complete or not) with a higher step than `written`, written before it. One with no
    trainer_state.json yet (a save in progress) is timed by its newest file."""
    found = []
    for c in sorted(run.checkpoints, key=lambda c: c.step):
        time = _time(c, by_state)
        time = c.written_at if time is None else time
        if c.step > written.step and time is not None and c.times_in_future is future and time < written_time:
            found.append(c)
    return tuple(found)


def _newest_written(checkpoints: Sequence[Checkpoint], by_state: bool) -> Checkpoint | None:
    """The one written last (on a tie of times, the higher step); None if no time is known."""
    timed = [c for c in checkpoints if _time(c, by_state) is not None]
    return max(timed, key=lambda c: (_time(c, by_state) or 0.0, c.step), default=None)


def resume_points(run: Run) -> tuple[list[tuple[Checkpoint, str]], MixedRuns | None]:
    """The complete checkpoints a resume of this run may need, each with its reason, and whether the
    directory mixes runs.

    The highest step is what the Trainer resumes from. But an `output_dir` may be reused (a stale
    `checkpoint-1000` beside a new run's `checkpoint-10`, `-20`), or a run resumed from an earlier checkpoint
    rewrites lower steps than its crashed predecessor reached: then the live run's resume point is the
    checkpoint written last, not the highest step. So the newest written one is protected too, when it was
    written strictly after the highest step: a tie (coarse timestamps) is no disagreement. "Written" is
    measured two ways, and the newest by either is kept: by `trainer_state.json`'s time (the Trainer writes
    it last and nothing else rewrites it, so an evaluation job that drops a results file into an older
    checkpoint does not make that one look newest), and by the newest file in the checkpoint (the contract's
    measure). The mixed-runs warning goes by the first measure that tells. A checkpoint whose time is unknown
    takes no part; if the highest step's is unknown, nothing is compared by that measure.

    File times in the future (`times_in_future`: a writer's clock ahead of this machine's) can be compared
    with each other but not with times from this machine's clock: each group's newest written is compared
    with the highest step only if that lies in the same group, and is otherwise kept as well (when in doubt,
    keep both), without a mixed-runs warning, since nothing is known to disagree.
    """
    complete = [c for c in run.checkpoints if c.complete]
    if not complete:
        return [], None
    highest = max(complete, key=lambda c: c.step)
    points = [(highest, NEWEST)]
    mixed = None
    for by_state in (True, False):
        found, found_mixed = _written_points(run, complete, highest, by_state)
        points += [(c, why) for c, why in found if all(c.step != p.step for p, _ in points)]
        mixed = mixed or found_mixed
    return points, mixed


def _written_points(
    run: Run, complete: list[Checkpoint], highest: Checkpoint, by_state: bool
) -> tuple[list[tuple[Checkpoint, str]], MixedRuns | None]:
    highest_time = _time(highest, by_state)
    if highest_time is None:
        return [], None
    points: list[tuple[Checkpoint, str]] = []
    mixed = None
    for future in (False, True):
        written = _newest_written([c for c in complete if c.times_in_future is future], by_state)
        written_time = None if written is None else _time(written, by_state)
        if written is None or written.step == highest.step or written_time is None:
            continue
        if highest.times_in_future is not future:
            points.append((written, NEWEST_WRITTEN_SKEWED))
        elif written_time > highest_time:
            points.append((written, NEWEST_WRITTEN))
            stale = _stale(run, written, written_time, by_state, future)
            mixed = MixedRuns(written, highest, stale)
    return points, mixed


def _protections(run: Run, protect: Protections) -> tuple[dict[int, list[str]], MixedRuns | None]:
    reasons: dict[int, list[str]] = {}
    for c in run.checkpoints:
        if not c.complete:
            reasons.setdefault(c.step, []).append(f"incomplete: {c.incomplete_reason or 'unknown'}")
    points, mixed = resume_points(run)
    for c, why in points:
        reasons.setdefault(c.step, []).append(why)
    if protect.trainer_best:
        # What each resume point's trainer_state.json calls best: a mixed directory's live run finds its own
        # best (load_best_model_at_end) in the newest written checkpoint's state, not the stale one's.
        present = {c.step for c in run.checkpoints}
        for best_step in dict.fromkeys(s for c, _ in points for s in c.trainer_best_steps):
            if best_step in present:
                reasons.setdefault(best_step, []).append("protected: trainer best")
    return reasons, mixed


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
    protected, mixed = _protections(run, protections)
    for step, why_protected in protected.items():
        reasons.setdefault(step, []).extend(why_protected)

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
    return RunPlan(run, tuple(decisions), refused, mixed)
