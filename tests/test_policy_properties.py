"""Properties of the planner over generated runs and rule sets (SPEC "Rules", "Protections", "Refusals",
"Every decision is explained"): a partition of the input, independent of input order, protections always
hold, rules only ever add to what is kept, planning again after applying removes nothing more, and the
planner is pure (no disk, no clock, same answer twice)."""

from __future__ import annotations

import copy
import itertools
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptkeeper.model import Action, Checkpoint, Reason, Run, RunPlan
from ckptkeeper.policy import Protections, plan_run, refusal
from ckptkeeper.render import reason_text, reason_texts
from ckptkeeper.rules import AnyRule, Best, Epoch, Every, Last, epoch_bucket

FAST = settings(max_examples=60, deadline=None)

METRICS = ["eval_loss", "eval_accuracy", "eval_a_loss", "eval_b_f1"]
# A small pool, so that ties are common; NaN and the infinities the Trainer can write among them.
values = st.sampled_from([0.25, 0.5, 0.5000001, 1.0, 2.5, -1.0, 0.0, math.nan, math.inf, -math.inf])
epochs = st.one_of(
    st.none(),
    st.floats(min_value=0, max_value=6),
    st.sampled_from([0.9995, 1.0, 2.0, 3.0000000000000004, 2.9999995, math.nan]),
)
reasons = st.sampled_from(["no trainer_state.json", "checkpoint-is-incomplete.txt present", "in-flight .tmp file"])


# One checkpoint: step, complete, why not, epoch, metrics, size, which checkpoint the Trainer calls best
# (indexes into the run's steps; past the end means a step that is not there).
rows = st.tuples(
    st.integers(min_value=0, max_value=400),
    st.booleans() | st.just(True),  # mostly complete
    reasons,
    epochs,
    st.just({})  # no eval at this step
    | st.fixed_dictionaries(
        {"eval_loss": values},
        optional={"eval_accuracy": values, "eval_a_loss": values, "eval_b_f1": values, "loss": values},
    ),
    st.integers(min_value=0, max_value=10**9),
    # best_global_step and best_model_checkpoint: none, one, or two that differ
    st.none() | st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=2, unique=True),
)


@st.composite
def runs(draw: st.DrawFn) -> Run:
    length = draw(st.integers(min_value=1, max_value=12))  # left to itself, hypothesis prefers tiny runs
    drawn = draw(st.lists(rows, unique_by=lambda r: r[0], min_size=length, max_size=length))
    steps = [r[0] for r in drawn]
    checkpoints = tuple(
        Checkpoint(
            name=f"checkpoint-{step}",
            step=step,
            complete=complete,
            incomplete_reason=None if complete else why,
            epoch=epoch,
            metrics=metrics,
            size_bytes=size,
            trainer_best_steps=() if best is None else tuple(steps[b] if b < len(steps) else 999 for b in best),
        )
        for step, complete, why, epoch, metrics, size, best in drawn
    )
    return Run(draw(st.sampled_from([".", "exp1", "sweep/lr-1e-4"])), checkpoints)


counts = st.integers(min_value=1, max_value=5)
rules = st.one_of(
    st.builds(Last, counts),
    st.builds(Every, st.integers(min_value=1, max_value=60) | st.sampled_from([7, 25, 50, 100])),
    st.builds(Epoch, st.none() | counts),
    # now and then a metric no checkpoint has: a refusal
    st.builds(Best, counts, st.sampled_from([*METRICS, *METRICS, "eval_missing"]), st.sampled_from(["min", "max"])),
)
rule_sets = st.lists(rules, min_size=1, max_size=3)
protections = st.builds(Protections, st.booleans())
removals = st.sampled_from([Action.DELETE, Action.ARCHIVE])


def kept_steps(plan: RunPlan) -> set[int]:
    return {d.checkpoint.step for d in plan.kept}


def newest_complete(run: Run) -> Checkpoint | None:
    complete = [c for c in run.checkpoints if c.complete]
    return max(complete, key=lambda c: c.step) if complete else None


@FAST
@given(runs(), st.lists(rules, max_size=4), protections, removals)
def test_decisions_partition_the_input(
    run: Run, rule_list: list[AnyRule], protect: Protections, removal: Action
) -> None:
    plan = plan_run(run, rule_list, protect, removal)
    assert sorted((d.checkpoint for d in plan.decisions), key=lambda c: c.step) == sorted(
        run.checkpoints, key=lambda c: c.step
    )
    assert len(plan.kept) + len(plan.removed) == len(run.checkpoints)
    assert [d.checkpoint.step for d in plan.decisions] == sorted(c.step for c in run.checkpoints)
    for d in plan.decisions:
        assert d.reasons
        assert d.action in (Action.KEEP, removal)
        if not d.kept:
            assert tuple(reason_texts(d.reasons)) == ("no rule keeps it",)
    assert (plan.refusal is not None) == (refusal(run, rule_list) is not None)
    if plan.refusal:
        assert plan.removed == ()


@FAST
@given(runs(), rule_sets, protections, st.randoms(use_true_random=False))
def test_the_order_of_the_input_does_not_matter(
    run: Run, rule_list: list[AnyRule], protect: Protections, rnd: Any
) -> None:
    shuffled = list(run.checkpoints)
    rnd.shuffle(shuffled)
    a = plan_run(run, rule_list, protect)
    b = plan_run(Run(run.path, tuple(shuffled)), rule_list, protect)
    assert a.decisions == b.decisions
    assert a.refusal == b.refusal


@FAST
@given(runs(), st.lists(rules, max_size=4), protections, removals)
def test_incomplete_newest_complete_and_trainer_best_are_never_removed(
    run: Run, rule_list: list[AnyRule], protect: Protections, removal: Action
) -> None:
    plan = plan_run(run, rule_list, protect, removal)
    kept = kept_steps(plan)
    by_step = {d.checkpoint.step: d for d in plan.decisions}
    for c in run.checkpoints:
        if not c.complete:
            assert c.step in kept
            assert f"incomplete: {c.incomplete_reason}" in reason_texts(by_step[c.step].reasons)
    newest = newest_complete(run)
    if newest is None:
        return
    assert "protected: newest" in reason_texts(by_step[newest.step].reasons)
    for best in newest.trainer_best_steps if protect.trainer_best else ():
        if best in by_step:
            assert best in kept
            assert "protected: trainer best" in reason_texts(by_step[best].reasons)
    if not protect.trainer_best:
        assert not any("protected: trainer best" in reason_texts(d.reasons) for d in plan.decisions)


@FAST
@given(runs(), rule_sets, rules, st.integers(min_value=0, max_value=4), protections)
def test_adding_a_rule_never_removes_more(
    run: Run, rule_list: list[AnyRule], extra: AnyRule, where: int, protect: Protections
) -> None:
    more = [*rule_list[:where], extra, *rule_list[where:]]
    before = plan_run(run, rule_list, protect)
    after = plan_run(run, more, protect)
    assert kept_steps(before) <= kept_steps(after)


@FAST
@given(runs(), rule_sets, protections, removals)
def test_planning_again_after_applying_removes_nothing_more(
    run: Run, rule_list: list[AnyRule], protect: Protections, removal: Action
) -> None:
    first = plan_run(run, rule_list, protect, removal)
    survivors = Run(run.path, tuple(d.checkpoint for d in first.kept))
    second = plan_run(survivors, rule_list, protect, removal)
    assert second.removed == ()
    if first.refusal is None:
        # and every survivor is kept for the very same reasons (ranks included)
        assert second.refusal is None
        assert second.decisions == first.kept


# --- each rule against the SPEC's definition, on its own ---------------------------------------------------


def better(rule: Best, a: Checkpoint, b: Checkpoint) -> bool:
    """Whether a ranks strictly before b under the SPEC: NaN worst, then by value, a tie to the lower step."""
    va, vb = a.metrics[rule.metric], b.metrics[rule.metric]
    if math.isnan(va) or math.isnan(vb):
        return (not math.isnan(va)) or (math.isnan(vb) and a.step < b.step)
    if va != vb:
        return va < vb if rule.direction == "min" else va > vb
    return a.step < b.step


def check_rule(rule: AnyRule, complete: Sequence[Checkpoint], kept_by: dict[int, Reason]) -> None:
    keeps = {step: reason_text(why) for step, why in kept_by.items()}
    steps = {c.step for c in complete}
    assert set(keeps) <= steps
    match rule:
        case Last(count):
            newest = sorted(steps, reverse=True)[:count]
            assert keeps == {s: f"last {i}/{count}" for i, s in enumerate(newest, start=1)}
        case Every(interval):
            assert set(keeps) == {s for s in steps if s % interval == 0}
            assert set(keeps.values()) <= {f"every {interval}"}
        case Epoch(count):
            dated = [c for c in complete if c.epoch is not None and math.isfinite(c.epoch)]
            buckets = sorted({epoch_bucket(c.epoch) for c in dated if c.epoch is not None}, reverse=True)
            chosen = buckets if count is None else buckets[:count]
            expected = {}
            for b in chosen:
                top = max(c.step for c in dated if c.epoch is not None and epoch_bucket(c.epoch) == b)
                expected[top] = f"epoch {b}"
            assert keeps == expected
        case Best(count, metric):
            scored = [c for c in complete if metric in c.metrics]
            chosen = [c for c in scored if c.step in keeps]
            assert len(chosen) == min(count, len(scored))
            for k in chosen:
                assert keeps[k.step].startswith(f"best {metric}=")
                for other in scored:
                    if other.step not in keeps:
                        assert better(rule, k, other), (k, other)
            ranks = sorted(chosen, key=lambda c: int(keeps[c.step].rsplit("(", 1)[1].split("/")[0]))
            assert all(better(rule, a, b) for a, b in itertools.pairwise(ranks))
            assert all(keeps[c.step].endswith(f"/{count})") for c in chosen)


@FAST
@given(runs(), rules)
def test_each_rule_keeps_what_the_spec_says(run: Run, rule: AnyRule) -> None:
    complete = sorted((c for c in run.checkpoints if c.complete), key=lambda c: c.step)
    check_rule(rule, complete, rule.keeps(complete))
    # and through the planner, with no protection in the way, nothing else is kept among complete ones
    plan = plan_run(run, [rule], Protections(trainer_best=False))
    if plan.refusal is None:
        newest = newest_complete(run)
        expected = set(rule.keeps(complete)) | {c.step for c in run.checkpoints if not c.complete}
        expected |= {newest.step} if newest else set()
        assert kept_steps(plan) == expected


@st.composite
def scored_runs(draw: st.DrawFn) -> Run:
    """Runs where most checkpoints have eval_x from a tiny pool of values: ties, NaN and infinities abound."""
    steps = draw(st.lists(st.integers(min_value=0, max_value=100), unique=True, min_size=2, max_size=8))
    pool = st.sampled_from([0.5, 0.5, 1.0, -2.0, math.nan, math.inf, -math.inf])
    checkpoints = tuple(
        Checkpoint(f"checkpoint-{s}", s, True, metrics=draw(st.just({}) | pool.map(lambda v: {"eval_x": v})))
        for s in steps
    )
    return Run(".", checkpoints)


@settings(max_examples=150, deadline=None)
@given(scored_runs(), st.integers(min_value=1, max_value=4), st.sampled_from(["min", "max"]))
def test_best_ranks_nan_worst_and_ties_to_the_lower_step(run: Run, count: int, direction: Any) -> None:
    rule = Best(count, "eval_x", direction)
    check_rule(rule, run.checkpoints, rule.keeps(run.checkpoints))


# --- purity ---------------------------------------------------------------------------------------------------

_FILE_EVENTS = ("open", "os.", "shutil.", "subprocess.", "socket.", "glob.", "pathlib.")
_watch: list[list[str]] = []


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _watch and event.startswith(_FILE_EVENTS):
        _watch[-1].append(event)


_hook_installed: list[bool] = []


@contextmanager
def no_disk_no_clock() -> Iterator[list[str]]:
    """Record every audited file/process/network event, and make the clock and os.stat raise, while active."""
    if not _hook_installed:
        sys.addaudithook(_audit)  # cannot be removed; it records nothing unless _watch is non-empty
        _hook_installed.append(True)

    def forbidden(*args: object, **kwargs: object) -> Any:
        raise AssertionError("the planner read the disk or the clock")

    seen: list[str] = []
    targets: list[tuple[Any, str]] = [
        (time, "time"),
        (time, "time_ns"),
        (time, "monotonic"),
        (time, "monotonic_ns"),
        (time, "perf_counter"),
        (time, "localtime"),
        (time, "gmtime"),
    ]
    with pytest.MonkeyPatch.context() as mp:
        for module, name in [*targets, (os, "stat"), (os, "lstat"), (os, "scandir"), (os, "listdir")]:
            mp.setattr(module, name, forbidden)
        _watch.append(seen)
        try:
            yield seen
        finally:
            _watch.pop()


def test_the_guard_does_see_disk_and_clock(tmp_path: Path) -> None:
    """The purity check below can fail: reading a file or the clock under it is caught."""
    (tmp_path / "f").write_text("x")
    with no_disk_no_clock() as seen:
        (tmp_path / "f").open().close()
    assert "open" in seen
    with no_disk_no_clock(), pytest.raises(AssertionError, match="read the disk or the clock"):
        time.time()


@FAST
@given(runs(), st.lists(rules, max_size=4), protections, removals)
def test_plan_run_is_pure(run: Run, rule_list: list[AnyRule], protect: Protections, removal: Action) -> None:
    snapshot = copy.deepcopy(run)
    with no_disk_no_clock() as seen:
        first = plan_run(run, rule_list, protect, removal)
        second = plan_run(run, list(rule_list), protect, removal)
        why = refusal(run, rule_list)
    assert seen == []
    assert first == second
    assert why == first.refusal
    assert run == snapshot  # the input is not changed
