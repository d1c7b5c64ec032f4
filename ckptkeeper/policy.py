"""The planner: a pure function from one run's checkpoints and the policy to one decision per checkpoint.

It never touches the disk or the clock, so the same directory always gives the same plan. The keep rules
(`rules.py`) and the protections here are members of one union (`AnyOf`, Orbax's `AnyPreservationPolicy`):
a checkpoint is kept when any member keeps it, with the reasons of every member that does. A protection
is a member that no rule can override; adding one is adding a class here and listing it in `Protections`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from ckptkeeper import pressure
from ckptkeeper.metric_specs import AwaitSpec, misspelt
from ckptkeeper.model import (
    Action,
    Checkpoint,
    Decision,
    MixedRuns,
    Overdue,
    Pin,
    Reason,
    ReasonKind,
    Run,
    RunPlan,
    RunView,
)
from ckptkeeper.pressure import DiskPressure, PressurePolicy, Space
from ckptkeeper.rules import AnyRule, format_rule

NO_RULE = "no keep rule given: refusing to remove anything (pass --keep, e.g. --keep last:5)"
NEWEST = Reason(ReasonKind.NEWEST, "protected:newest")
NEWEST_WRITTEN = Reason(ReasonKind.NEWEST_WRITTEN, "protected:newest-written")
NEWEST_WRITTEN_SKEWED = Reason(ReasonKind.NEWEST_WRITTEN_SKEWED, "protected:newest-written")
TRAINER_BEST = Reason(ReasonKind.TRAINER_BEST, "protected:trainer-best")
REFUSED = Reason(ReasonKind.REFUSED, "refused")
NO_RULE_KEEPS = Reason(ReasonKind.NO_RULE_KEEPS)
WEIGHTS_INSIDE = Reason(ReasonKind.WEIGHTS_INSIDE, "keep-weights")
STAYS_WEIGHTS_ONLY = Reason(ReasonKind.STAYS_WEIGHTS_ONLY)


class Keeper(Protocol):
    """A member of the union: a keep rule or a protection."""

    def keeps_in(self, view: RunView) -> Mapping[int, Sequence[Reason]]: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class ResumePoints:
    """The checkpoints a resume of the run may need: the highest step, and the newest written when a
    directory mixes runs (`resume_points`)."""

    def keeps_in(self, view: RunView) -> dict[int, list[Reason]]:
        return {c.step: [why] for c, why in view.resume_points}

    def describe(self) -> str:
        return "the newest"


@dataclass(frozen=True)
class Incomplete:
    """Every checkpoint that is not complete: it may be being written (SPEC "Complete checkpoint")."""

    def keeps_in(self, view: RunView) -> dict[int, list[Reason]]:
        return {
            c.step: [Reason(ReasonKind.INCOMPLETE, "protected:incomplete", detail=c.incomplete_reason or "unknown")]
            for c in view.run.checkpoints
            if not c.complete
        }

    def describe(self) -> str:
        return "incomplete ones"


@dataclass(frozen=True)
class TrainerBest:
    """What each resume point's trainer_state.json calls best: a mixed directory's live run finds its own best
    (load_best_model_at_end) in the newest written checkpoint's state, not the stale one's."""

    def keeps_in(self, view: RunView) -> dict[int, list[Reason]]:
        present = {c.step for c in view.run.checkpoints}
        steps = dict.fromkeys(s for c, _ in view.resume_points for s in c.trainer_best_steps)
        return {step: [TRAINER_BEST] for step in steps if step in present}

    def describe(self) -> str:
        return "the Trainer's best"


@dataclass(frozen=True)
class Pinned:
    """Every checkpoint pinned by `ckptkeeper pin`, until it is unpinned or its lease lapses at the plan's time."""

    def keeps_in(self, view: RunView) -> dict[int, list[Reason]]:
        present = {c.name: c.step for c in view.run.checkpoints}
        return {
            present[name]: [pinned_reason(pin, view.now)]
            for name, pin in view.pins.items()
            if name in present and pin.holds_at(view.now)
        }

    def describe(self) -> str:
        return ""  # not in the policy line: a pin is said where it is, by its checkpoint's reason


def pinned_reason(pin: Pin, now: float | None) -> Reason:
    left = None if pin.expires_at is None or now is None else pin.expires_at - now
    return Reason(ReasonKind.PINNED, "protected:pinned", detail=pin.note or None, until=pin.expires_at, left=left)


@dataclass(frozen=True)
class Awaiting:
    """`--await NAME[:TIMEOUT]`: a complete checkpoint without NAME is kept until NAME arrives, or until TIMEOUT
    has passed, at the plan's time, since it arrived (`arrived`). With no time given, or no write time known,
    it is kept (the safe side)."""

    spec: AwaitSpec

    def until(self, c: Checkpoint) -> float | None:
        arrived = arrived_at(c)
        return None if arrived is None else arrived + self.spec.timeout

    def keeps_in(self, view: RunView) -> dict[int, list[Reason]]:
        kept = {}
        rule, name = f"await:{self.spec.name}", self.spec.name
        for c in view.complete:
            until = self.until(c)
            if name in c.metrics or not (until is None or view.now is None or view.now < until):
                continue
            left = None if until is None or view.now is None else until - view.now
            kept[c.step] = [Reason(ReasonKind.AWAITING, rule, metric=name, until=until, left=left)]
        return kept

    def overdue(self, view: RunView) -> list[Overdue]:
        """The complete checkpoints whose evaluation did not arrive in time: judged without it now."""
        now = view.now
        if now is None:
            return []
        return [
            Overdue(c, self.spec.name, self.spec.timeout)
            for c in view.complete
            if self.spec.name not in c.metrics and (until := self.until(c)) is not None and now >= until
        ]

    def describe(self) -> str:
        return f"those awaiting {self.spec.name} (up to {self.spec.format().partition(':')[2]})"


def arrived_at(c: Checkpoint) -> float | None:
    """When a checkpoint arrived where it is: the newest modification time of its files (the contract's "became
    complete"), or its newest change time where that is later: a checkpoint copied in by `cp -a` or `rsync -a`
    keeps the old modification times, and would otherwise be overdue the moment it arrives."""
    if c.written_at is None:
        return None
    return max(c.written_at, c.last_change)


@dataclass(frozen=True)
class Protections:
    """Which protections apply. The newest, the incomplete and the pinned always do; the Trainer's best unless
    turned off; an evaluation's result where awaited (`--await`)."""

    trainer_best: bool = True
    awaits: tuple[AwaitSpec, ...] = ()

    @property
    def members(self) -> tuple[Keeper, ...]:
        always: tuple[Keeper, ...] = (ResumePoints(), Incomplete(), Pinned())
        best: tuple[Keeper, ...] = (TrainerBest(),) if self.trainer_best else ()
        return (*always, *best, *(Awaiting(spec) for spec in self.awaits))


@dataclass(frozen=True)
class AnyOf:
    """The union of keep rules and protections (Orbax's `AnyPreservationPolicy`): a checkpoint is kept when
    any member keeps it, with the reasons of every member that does, in the members' order."""

    members: tuple[Keeper, ...]

    def reasons(self, view: RunView) -> dict[int, list[Reason]]:
        found: dict[int, list[Reason]] = {}
        for member in self.members:
            for step, why in member.keeps_in(view).items():
                found.setdefault(step, []).extend(why)
        return found


@dataclass(frozen=True)
class Policy:
    """What to keep: the keep rules, the protections, and whether the rest is deleted or archived. Plain data;
    how runs are found (`scan.ScanOptions`) and where an archive goes (`layout.Layout`) live apart."""

    rules: tuple[AnyRule, ...]
    protections: Protections = field(default_factory=Protections)
    removal: Action = Action.DELETE
    weight_rules: tuple[AnyRule, ...] = ()  # `--keep-weights`: what they alone keep is kept weights-only
    pressure: PressurePolicy | None = None  # `--min-free` and `--keep-under-pressure`
    defined_metrics: frozenset[str] = frozenset()  # `--metric` names: a rule on one is no typo when none has it

    @property
    def every_rule(self) -> tuple[AnyRule, ...]:
        return (*self.rules, *self.weight_rules, *(self.pressure.rules if self.pressure else ()))

    def plan(self, run: Run, inputs: PlanInputs | None = None) -> RunPlan:
        return plan_run(
            run,
            self.rules,
            self.protections,
            self.removal,
            self.weight_rules,
            self.every_rule,
            inputs,
            self.defined_metrics,
        )

    def metrics(self) -> list[str]:
        """The metrics the rules rank by, then those awaited, each once, in the rules' order."""
        ranked = [r.metric for r in self.every_rule if r.metric is not None]
        return list(dict.fromkeys([*ranked, *(a.name for a in self.protections.awaits)]))


def refusal(
    run: Run, rules: Sequence[AnyRule], defined: Collection[str] = (), awaited: Collection[str] = ()
) -> str | None:
    """Why this run must not be pruned at all, or None.

    A `best` rule whose metric no checkpoint has, in a run that does have eval metrics, is almost always
    a typo (`best:1:acuracy`); followed literally it would keep nothing and let everything else go. A metric
    defined by `--metric` is no typo though none has it yet: its evaluation job has not run. But a rule's
    metric that misses a defined name by a letter is one, Trainer metrics or not (`best:1:helaswag`); and a
    defined metric whose results files were read and hold nothing at its pointer, in every checkpoint that
    has any, is a wrong pointer (`#/results/x/acc` for lm-eval's `acc,none`): awaited, it would never arrive.
    """
    if not rules:
        return NO_RULE
    wrong = _wrong_pointer(run, [*(r.metric for r in rules if r.metric in defined), *awaited])
    if wrong:
        return wrong
    present = sorted({name for c in run.checkpoints for name in c.metrics if name.startswith("eval_")})
    for rule in rules:
        metric = rule.metric
        if metric is None or metric in present or metric in defined:
            continue
        if present:
            close = closest_metric(metric, [*present, *defined])
            meant = f"; did you mean {close}?" if close else ""
            # The run is named where this is shown: its plan's table, its log line, its line of the error.
            metrics = ", ".join(present)
            return f"rule {format_rule(rule)!r}: no checkpoint has {metric}{meant} (the run's metrics: {metrics})"
        close = misspelt(metric, defined)  # no eval yet: a best rule keeps nothing here yet, unless a typo
        if close:
            names = ", ".join(defined)
            return f"rule {format_rule(rule)!r}: no checkpoint has {metric}; did you mean {close}? (defined: {names})"
    return None


def _wrong_pointer(run: Run, names: Sequence[str | None]) -> str | None:
    for name in dict.fromkeys(n for n in names if n is not None):
        if any(name in c.metrics for c in run.checkpoints):
            continue
        read = [c for c in run.checkpoints if name in c.unreachable_metrics]
        if read:
            why = read[-1].missing_metrics.get(name, "")
            return f"metric {name}: no results file tied to this run holds its value ({why}): check the JSON pointer"
    return None


def closest_metric(name: str, present: Sequence[str]) -> str | None:
    """The metric of `present` that `name` most likely misspells, if one is close. Compared without the
    `eval_` prefix, which every eval metric shares: `acuracy` finds eval_accuracy, `eval_los` eval_loss,
    and `f1` does not find eval_loss for their common prefix."""
    import difflib  # only for a rule that names a missing metric: not at every start

    bare = {metric.removeprefix("eval_"): metric for metric in present}
    close = difflib.get_close_matches(name.removeprefix("eval_"), list(bare), n=1)
    return bare[close[0]] if close else None


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


def resume_points(run: Run) -> tuple[list[tuple[Checkpoint, Reason]], MixedRuns | None]:
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
) -> tuple[list[tuple[Checkpoint, Reason]], MixedRuns | None]:
    highest_time = _time(highest, by_state)
    if highest_time is None:
        return [], None
    points: list[tuple[Checkpoint, Reason]] = []
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


@dataclass(frozen=True)
class PlanInputs:
    """What the planner is given besides the checkpoints, since it never looks anything up itself: the time the
    plan is made for (None: unknown, and what would lapse by time holds) and the root's pins."""

    now: float | None = None
    pins: Sequence[Pin] = ()

    def pins_of(self, run: str) -> dict[str, Pin]:
        return {pin.checkpoint: pin for pin in self.pins if pin.run == run}


def view_of(run: Run, inputs: PlanInputs | None = None) -> RunView:
    complete = tuple(sorted((c for c in run.checkpoints if c.complete), key=lambda c: c.step))
    points, mixed = resume_points(run)
    if inputs is None:
        return RunView(run, complete, tuple(points), mixed)
    return RunView(run, complete, tuple(points), mixed, inputs.now, inputs.pins_of(run.path))


def plan_run(
    run: Run,
    rules: Sequence[AnyRule],
    protections: Protections = Protections(),
    removal: Action = Action.DELETE,
    weight_rules: Sequence[AnyRule] = (),
    checked_rules: Sequence[AnyRule] | None = None,
    inputs: PlanInputs | None = None,
    defined_metrics: Collection[str] = (),
) -> RunPlan:
    """Each checkpoint: kept whole by a keep rule or a protection; else, in a refused run, kept; else kept
    weights-only by a `--keep-weights` rule; else removed. `checked_rules`: every rule a typo in a metric name
    refuses the run for (default: the keep and keep-weights rules)."""
    if removal not in (Action.DELETE, Action.ARCHIVE):
        raise ValueError("removal must be delete or archive")
    view = view_of(run, inputs)
    whole = AnyOf((*rules, *protections.members)).reasons(view)
    weights = AnyOf(tuple(weight_rules)).reasons(view)
    checked = (*rules, *weight_rules) if checked_rules is None else checked_rules
    refused = refusal(run, checked, defined_metrics, [a.name for a in protections.awaits])
    decisions = []
    for c in sorted(run.checkpoints, key=lambda c: c.step):
        if c.step in whole:
            decisions.append(_whole(c, whole[c.step]))
        elif refused:
            decisions.append(_whole(c, [REFUSED]))
        elif c.step in weights:
            decisions.append(_weights_only(c, weights[c.step]))
        else:
            decisions.append(Decision(c, removal, (NO_RULE_KEEPS,)))
    resume = next((c for c, _ in view.resume_points if c.weights_only), None)
    overdue = tuple(o for spec in protections.awaits for o in Awaiting(spec).overdue(view))
    return RunPlan(run, tuple(decisions), refused, view.mixed_runs, resume, overdue=overdue)


def _whole(c: Checkpoint, why: list[Reason]) -> Decision:
    """Kept whole; one already weights-only (and complete: an incomplete one is only waiting) says it stays so."""
    stays = c.weights_only and c.complete
    return Decision(c, Action.KEEP, (*why, STAYS_WEIGHTS_ONLY) if stays else tuple(why))


def _weights_only(c: Checkpoint, why: list[Reason]) -> Decision:
    """What a `--keep-weights` rule alone keeps: weights only, unless the weights exist only inside the resume
    state (DeepSpeed ZeRO-3 without gathered weights), which is then kept whole, saying so."""
    marked = tuple(replace(r, weights_only=True) for r in why)
    if not c.weights_outside and not c.weights_only:
        return Decision(c, Action.KEEP, (*marked, WEIGHTS_INSIDE))
    return Decision(c, Action.WEIGHTS_ONLY, marked)


@dataclass(frozen=True)
class RootPlan:
    """The plans of the runs of one root, after the refusal scope is applied."""

    runs: tuple[RunPlan, ...]
    refused_runs: tuple[str, ...]  # every run whose retention is refused, among these or known elsewhere
    pressure: tuple[DiskPressure, ...] = ()  # per filesystem, when --min-free is set and space was measured

    @property
    def refusals(self) -> tuple[RunPlan, ...]:
        return tuple(p for p in self.runs if p.refusal)


def plan_root(
    runs: Sequence[Run],
    policy: Policy,
    refused_elsewhere: Collection[str] = (),
    space: Space | None = None,
    inputs: PlanInputs | None = None,
) -> RootPlan:
    """Plan every run, then apply the refusal scope: **a refusal holds the whole root**. While any run's
    retention is refused (here, or in `refused_elsewhere`: runs of the same root the caller knows to be
    refused, as the watch daemon does between passes), no checkpoint of any run is removed, and each one
    that would have been says so (`held`). A refusal is almost always a typo in a rule that every run shares
    (`best:1:acuracy`), and a run with no eval yet cannot show it: better to remove nothing than to prune
    those runs by the rest of a mistaken policy. `plan`, `prune` and `watch` all plan through here.

    With `--min-free` and the filesystems' figures (`space`), disk pressure is judged last (`pressure.py`)."""
    plans = [policy.plan(run, inputs) for run in runs]
    refused = tuple(dict.fromkeys([*(p.run.path for p in plans if p.refusal), *sorted(refused_elsewhere)]))
    if refused:
        first = next((p.run.label for p in plans if p.run.path == refused[0]), None)
        plans = [p if p.refusal else hold(p, refused, first) for p in plans]
    if policy.pressure is None or space is None:
        return RootPlan(tuple(plans), refused)
    views = [view_of(run, inputs) for run in runs]
    never = AnyOf((*policy.pressure.rules, *policy.protections.members))  # never released
    figures = pressure.PressureInputs(
        policy.pressure,
        space,
        still_kept=[never.reasons(view) for view in views],
        weights_kept=[AnyOf(policy.weight_rules).reasons(view) for view in views],
        removal=policy.removal,
        refused=bool(refused),
    )
    released, verdicts = pressure.apply(plans, figures)
    return RootPlan(released, refused, verdicts)


def hold(plan: RunPlan, refused_runs: Sequence[str], first: str | None = None) -> RunPlan:
    """The plan with every removal turned into a keep, because retention is refused in `refused_runs` (the
    first named `first`, as a person names it)."""
    held = Reason(ReasonKind.HELD, "refused", of=len(refused_runs), detail=first or refused_runs[0])
    decisions = tuple(d if d.action is Action.KEEP else _whole(d.checkpoint, [held]) for d in plan.decisions)
    return replace(plan, decisions=decisions)
