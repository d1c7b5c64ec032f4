"""Disk pressure (`--min-free`, `--keep-under-pressure`, issue #19), the pure part: `parse_floor`, and the planner
(`policy.plan_root` with `Policy.pressure` and hand-made `Space` figures). No disk, no clock: every figure and `now`
is an input, so each case states its numbers and the exact outcome.

The CLI over a real size-limited tmpfs is tests/test_cli_pressure.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import pytest

from ckptkeeper.model import Action, Checkpoint, Decision, Reason, ReasonKind, Run
from ckptkeeper.policy import Policy, Protections, RootPlan, plan_root
from ckptkeeper.pressure import Disk, DiskPressure, FloorError, PressurePolicy, Space, parse_floor
from ckptkeeper.render import decision_text, pressure_json, pressure_line, reason_texts
from ckptkeeper.rules import parse_rules

T0 = 1_700_000_000.0
SIZE = 1000  # every checkpoint's bytes unless a case says otherwise
FREE = 10_000  # the filesystem's free bytes unless a case says otherwise
FS, OTHER_FS = 1, 2
NOW = T0 + 100  # LINE's newest was written 50 s before: it is still training


# --- building the inputs -----------------------------------------------------------------------------------------


def ck(
    step: int,
    *,
    size: int = SIZE,
    at: float | None = None,
    touched: float | None = None,
    epoch: float | None = None,
    loss: float | None = None,
    complete: bool = True,
    best: Sequence[int] = (),
    stopped: bool = False,
    resume: int = 0,
    future: bool = False,
) -> Checkpoint:
    """A checkpoint whose trainer_state.json was written `at` (default T0 + step); `touched`: its newest file's time
    when another file changed later; `resume`: bytes of resume state (optimizer.pt) beside loadable weights."""
    written = T0 + step if at is None else at
    return Checkpoint(
        name=f"checkpoint-{step}",
        step=step,
        complete=complete,
        incomplete_reason=None if complete else "checkpoint-is-incomplete.txt present",
        epoch=epoch,
        metrics={} if loss is None else {"eval_loss": loss},
        size_bytes=size,
        trainer_best_steps=tuple(best),
        training_stopped=stopped,
        written_at=written if touched is None else touched,
        state_written_at=written if complete else None,
        times_in_future=future,
        resume_state=("optimizer.pt",) if resume else (),
        resume_bytes=resume,
    )


def run(path: str, *checkpoints: Checkpoint) -> Run:
    return Run(path, checkpoints)


LINE = run("run", *(ck(s) for s in (10, 20, 30, 40, 50)))  # one save every 10 s; 50 is the newest


def policy(
    keep: str,
    floor: int | str,
    under: str = "",
    *,
    weights: str = "",
    removal: Action = Action.DELETE,
    trainer_best: bool = True,
) -> Policy:
    return Policy(
        parse_rules(keep),
        Protections(trainer_best),
        removal,
        parse_rules(weights),
        PressurePolicy(parse_floor(str(floor)), parse_rules(under)),
    )


def space(
    free: int = FREE,
    runs: Sequence[str] = ("run",),
    *,
    total: int = 10**9,
    now: float = NOW,
    archive: int | None = None,
    freeing: bool = False,
) -> Space:
    return Space({FS: Disk(FS, free, total, "/fs1")}, dict.fromkeys(runs, FS), archive, now, freeing)


def verdict(plan: RootPlan) -> DiskPressure:
    [one] = plan.pressure
    return one


def released(plan: RootPlan) -> list[str]:
    """`run/checkpoint` of each release, in the order they were made."""
    return [f"{r.run}/{r.checkpoint}" for r in verdict(plan).released]


def actions(plan: RootPlan) -> dict[str, Action]:
    return {f"{p.run.path}/{d.checkpoint.step}": d.action for p in plan.runs for d in p.decisions}


def decision(plan: RootPlan, where: str) -> Decision:
    path, step = where.split("/")
    [found] = [d for p in plan.runs if p.run.path == path for d in p.decisions if d.checkpoint.step == int(step)]
    return found


def without_pressure(runs: Sequence[Run], p: Policy, refused: Sequence[str] = ()) -> RootPlan:
    return plan_root(runs, Policy(p.rules, p.protections, p.removal, p.weight_rules), refused)


def floor_for(shortfall: int, next_save: int = SIZE, planned: int = 0, free: int = FREE) -> int:
    """The floor that leaves the filesystem `shortfall` bytes short of floor + next save (0: exactly enough)."""
    return free + planned + shortfall - next_save


# --- parse_floor -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1", 1),
        ("123", 123),
        ("123B", 123),
        ("1K", 1000),
        ("1KB", 1000),
        ("1Ki", 1024),
        ("1KiB", 1024),
        ("500M", 500 * 10**6),
        ("500MB", 500 * 10**6),
        ("3Mi", 3 * 2**20),
        ("3MiB", 3 * 2**20),
        ("50G", 50 * 10**9),
        ("50GB", 50 * 10**9),
        ("40Gi", 40 * 2**30),
        ("40GiB", 40 * 2**30),
        ("2T", 2 * 10**12),
        ("2Ti", 2 * 2**40),
        ("1.5T", 1_500_000_000_000),
        ("1P", 10**15),
        ("1PiB", 2**50),
        ("0.5K", 500),
        ("2.5G", 2_500_000_000),
        ("50g", 50 * 10**9),
        ("40gib", 40 * 2**30),
        ("50 G", 50 * 10**9),
    ],
)
def test_a_size_floor_is_decimal_unless_binary(text: str, size: int) -> None:
    floor = parse_floor(f"  {text} ")
    assert (floor.size, floor.percent, floor.text) == (size, None, text)
    assert floor.bytes_of(10**18) == floor.bytes_of(1) == size  # a size does not depend on the filesystem


@pytest.mark.parametrize(
    ("text", "percent", "of_total"), [("10%", 10.0, 100), ("12.5%", 12.5, 125), ("99.9%", 99.9, 999)]
)
def test_a_percentage_floor_is_a_share_of_the_filesystem(text: str, percent: float, of_total: int) -> None:
    floor = parse_floor(text)
    assert (floor.size, floor.percent, floor.text) == (None, percent, text)
    assert floor.bytes_of(1000) == of_total
    assert floor.bytes_of(16 * 2**20) == int(16 * 2**20 * percent / 100)


FORMS = "expected a size such as 50G, 500M, 1.5T or 40Gi (G = 10^9 bytes, Gi = 2^30), or a percentage such as 10%"
PERCENT = "a percentage lies between 0% and 100%"
ZERO = "the floor must be more than 0 bytes"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", FORMS),
        (" ", FORMS),
        ("0", ZERO),
        ("0G", ZERO),
        ("0.0001", ZERO),
        ("-1G", FORMS),
        ("50X", FORMS),
        ("100%", PERCENT),
        ("0%", PERCENT),
        ("150%", PERCENT),
        ("-5%", FORMS),
        ("G", FORMS),
        ("%", FORMS),
        ("1e3", FORMS),
        ("1.5.5G", FORMS),
        ("inf", FORMS),
        ("nan", FORMS),
        ("5 GB B", FORMS),
    ],
)
def test_a_bad_floor_is_refused_naming_it(text: str, problem: str) -> None:
    with pytest.raises(FloorError) as caught:
        parse_floor(text)
    assert str(caught.value) == f"invalid --min-free {text!r}: {problem}"


def test_a_decimal_fraction_of_a_unit_is_exact_bytes() -> None:
    """1.001K is 1001 bytes; float arithmetic (1.001 * 1000 = 1000.9999999999999) must not make it 1000."""
    assert [parse_floor(t).size for t in ("1.001K", "1.005M", "4.1G", "0.29K")] == [1001, 1_005_000, 4_100_000_000, 290]


# --- the estimate: next save, still training ---------------------------------------------------------------------


def estimate(r: Run, now: float = NOW) -> tuple[int, tuple[str, ...]]:
    """(next save, runs still training) of the run alone on a filesystem."""
    v = verdict(plan_root([r], policy("last:1", 1), space=space(10**9, (r.path,), now=now)))
    return v.next_save, v.training


def test_next_save_is_the_size_of_the_newest_complete_checkpoint() -> None:
    sizes = run("run", ck(10, size=100), ck(20, size=200), ck(25, size=50, complete=False), ck(30, size=300))
    assert estimate(sizes) == (300, ("run",))  # an incomplete one of a lower step is no save under way


@pytest.mark.parametrize(("under_way", "expected"), [(120, 180), (300, 0), (5000, 0)])
def test_a_save_under_way_has_written_part_of_the_next_save(under_way: int, expected: int) -> None:
    r = run("run", ck(10, size=100), ck(20, size=300), ck(30, size=under_way, complete=False))
    assert estimate(r) == (expected, ("run",))


def mixed_dir(*extra: Checkpoint) -> Run:
    """checkpoint-900 of an earlier run, then a new run's 10 and 20 written after it (an output_dir reused)."""
    return run("run", ck(900, size=9000, at=T0 + 1), ck(10, size=100), ck(20, size=200), *extra)


def test_in_a_directory_mixing_runs_the_next_save_is_the_newest_written() -> None:
    plan = plan_root([mixed_dir()], policy("last:1", 1), space=space(10**9))
    assert plan.runs[0].mixed_runs is not None
    assert (verdict(plan).next_save, verdict(plan).training) == (200, ("run",))
    assert estimate(mixed_dir(ck(30, size=50, complete=False))) == (150, ("run",))  # the new run's save under way


def test_a_stale_incomplete_checkpoint_of_the_earlier_run_is_no_save_under_way() -> None:
    """checkpoint-910, cut short by the earlier run's crash, was written before the live run's newest (it is among
    `mixed_runs.stale`): the live run's next save is still the whole 200 bytes, not 200 - 150."""
    r = mixed_dir(ck(910, size=150, at=T0 + 2, complete=False))
    plan = plan_root([r], policy("last:1", 1), space=space(10**9))
    mixed = plan.runs[0].mixed_runs
    assert mixed is not None and [c.step for c in mixed.stale] == [900, 910]
    assert estimate(r) == (200, ("run",))


def steps_at(times: Sequence[float], *, stopped: bool = False, future: bool = False) -> Run:
    """Checkpoints 10, 20, ... whose trainer_state.json was written at T0 + each time; the newest says whether
    training stopped and whether its times lie in the future."""
    *older, newest = [ck(10 * (i + 1), at=T0 + t) for i, t in enumerate(times)]
    return run("run", *older, ck(newest.step, at=T0 + times[-1], stopped=stopped, future=future))


# gaps [9000 x 6, 100, 100, 300, 5000, 5000]: the median of the last five is 300 (the mean 2100, the median of all 5000)
MEDIAN_TIMES = [sum([0, *[9000] * 6, 100, 100, 300, 5000, 5000][: i + 1]) for i in range(12)]


@pytest.mark.parametrize(
    ("r", "age", "training"),
    [
        pytest.param(steps_at([10, 20, 30], stopped=True), 1, False, id="newest-says-training-stopped"),
        pytest.param(run("run", ck(10, stopped=True), ck(20), ck(30)), 1, True, id="an-older-one-stopped"),
        pytest.param(steps_at([10, 20, 30]), 600, True, id="at-least-600s:in"),
        pytest.param(steps_at([10, 20, 30]), 601, False, id="at-least-600s:out"),
        pytest.param(steps_at([0, 400, 800]), 1200, True, id="3-intervals:in"),
        pytest.param(steps_at([0, 400, 800]), 1201, False, id="3-intervals:out"),
        pytest.param(steps_at(MEDIAN_TIMES), 900, True, id="median-of-the-last-5-gaps:in"),
        pytest.param(steps_at(MEDIAN_TIMES), 901, False, id="median-of-the-last-5-gaps:out"),
        pytest.param(steps_at([0]), 3600, True, id="one-checkpoint-3600s:in"),
        pytest.param(steps_at([0]), 3601, False, id="one-checkpoint-3600s:out"),
        pytest.param(steps_at([0]), -3600, True, id="written-in-the-future"),
        pytest.param(steps_at([0, 10], future=True), 10**6, True, id="times-in-future-never-idle"),
        pytest.param(run("run", ck(10), ck(20), ck(30, touched=T0 + 5000)), 601, False, id="by-trainer-state-time"),
        pytest.param(run("run", ck(10, complete=False)), 1, False, id="no-complete-checkpoint"),
    ],
)
def test_still_training(r: Run, age: float, training: bool) -> None:
    """A run's next save counts while its newest complete checkpoint is at most max(3 x the median of its last 5
    save intervals, 600 s) old (3600 s with no interval yet), unless it says training stopped."""
    newest = max((c for c in r.checkpoints if c.complete), key=lambda c: c.step, default=None)
    written = T0 if newest is None or newest.state_written_at is None else newest.state_written_at
    next_save, runs = estimate(r, now=written + age)
    assert (next_save, runs) == ((SIZE, ("run",)) if training else (0, ()))


# --- when the disk is under pressure -----------------------------------------------------------------------------


def test_free_space_equal_to_floor_plus_next_save_is_no_pressure() -> None:
    p = policy("last:2", floor_for(0, planned=3 * SIZE), "last:1")  # last:2 removes 10, 20, 30: 3000 bytes
    plan = plan_root([LINE], p, space=space())
    v = verdict(plan)
    assert (v.available, v.needed, v.planned, v.next_save, v.under, v.met, v.released) == (
        13_000, 13_000, 3000, SIZE, False, True, ()
    )  # fmt: skip
    assert plan.runs == without_pressure([LINE], p).runs
    one_more = plan_root([LINE], policy("last:2", floor_for(1, planned=3 * SIZE), "last:1"), space=space())
    assert (verdict(one_more).under, released(one_more), verdict(one_more).met) == (True, ["run/checkpoint-40"], True)


def test_without_pressure_rules_pressure_is_only_reported() -> None:
    p = policy("last:2", 50_000)
    plan = plan_root([LINE], p, space=space())
    v = verdict(plan)
    assert (v.under, v.acts, v.released, v.deferred, v.met, v.shortfall) == (True, False, (), None, False, 38_000)
    assert plan.runs == without_pressure([LINE], p).runs
    assert pressure_line(v) == (
        "disk /fs1: 13.0 kB free < 50.0 kB floor + 1.0 kB next save: UNDER PRESSURE "
        "(reported only: --keep-under-pressure releases checkpoints)"
    )


# --- what is released, in which order, and how much --------------------------------------------------------------

# 10..100; keep best:2,last:3,every:30,epoch:all whole and every:10 weights-only; 100 (newest) is protected.
#  step  epoch  loss  written  kept by                         tier
#    10   0.25  0.60   +300    every:10 (weights only)          0
#    20   0.50  0.61   +200    every:10 (weights only)          0
#    30   0.75  0.20    +50    every:30, best 2/2               3 (rank 2)
#    40   1.00  0.62   +250    epoch 1                          1
#    50   1.25  0.63   +400    every:10 (weights only)          0
#    60   1.50  0.64   +150    every:30                         1
#    70   1.75  0.65   +100    every:10 (weights only)          0
#    80   2.00  0.10    +30    best 1/2, last 3/3, epoch 2      3 (rank 1)
#    90   2.25  0.66    +60    last 2/3, every:30               2
#   100   2.50  0.67  +1000    newest, last 1/3, epoch 3        protected
TIERS = run(
    "run",
    *(
        ck(step, epoch=step / 40, loss=loss, at=T0 + at)
        for step, loss, at in [
            (10, 0.60, 300), (20, 0.61, 200), (30, 0.20, 50), (40, 0.62, 250), (50, 0.63, 400),
            (60, 0.64, 150), (70, 0.65, 100), (80, 0.10, 30), (90, 0.66, 60), (100, 0.67, 1000),
        ]
    ),
)  # fmt: skip
TIERS_ORDER = [70, 20, 10, 50, 60, 40, 90, 30, 80]  # tier 0 then 1 then 2 by age, then best by worst rank
TIERS_POLICY = ("best:2,last:3,every:30,epoch:all", "last:1")


@pytest.mark.parametrize("n", range(11))
def test_releases_follow_the_tiers_and_are_as_few_as_needed(n: int) -> None:
    """A shortfall of exactly n checkpoints' bytes releases exactly the first n in the documented order."""
    keep, under = TIERS_POLICY
    p = policy(keep, floor_for(n * SIZE), under, weights="every:10")
    plan = plan_root([TIERS], p, space=space(now=T0 + 1001))
    before = actions(without_pressure([TIERS], p))
    assert before == {
        f"run/{s}": Action.WEIGHTS_ONLY if s in (10, 20, 50, 70) else Action.KEEP for s in range(10, 101, 10)
    }
    expected = [f"run/{s}" for s in TIERS_ORDER[:n]]
    assert released(plan) == [f"run/checkpoint-{s}" for s in TIERS_ORDER[:n]]
    assert actions(plan) == {**before, **dict.fromkeys(expected, Action.DELETE)}
    assert verdict(plan).met is (n < 10)
    assert verdict(plan).under is (n > 0)
    assert decision(plan, "run/100").reasons == decision(without_pressure([TIERS], p), "run/100").reasons


def test_a_released_checkpoint_says_disk_pressure_then_the_reasons_it_had() -> None:
    plan = plan_root(
        [LINE], policy("last:5", "10500", "last:1"), space=space()
    )  # 10000 free < 10500 + 1000: 1500 short
    figures = "10.0 kB free < 10.5 kB floor + 1.0 kB next save"
    assert released(plan) == ["run/checkpoint-10", "run/checkpoint-20"]
    assert decision(plan, "run/20") == Decision(
        LINE.checkpoints[1],
        Action.DELETE,
        (
            Reason(ReasonKind.PRESSURE, "pressure", detail=figures),
            Reason(ReasonKind.LAST, "last:5", 4, 5, released=True),
        ),
    )
    assert reason_texts(decision(plan, "run/10").reasons) == [f"disk pressure: {figures}", "was last 5/5"]
    assert reason_texts(decision(plan, "run/20").reasons) == [f"disk pressure: {figures}", "was last 4/5"]
    assert reason_texts(decision(plan, "run/30").reasons) == ["last 3/5"]
    v = verdict(plan)
    assert pressure_line(v) == f"disk /fs1: {figures}: UNDER PRESSURE; releasing 2 checkpoints frees 2.0 kB"
    assert pressure_json(v)["released"] == [
        {"run": "run", "checkpoint": f"checkpoint-{s}", "action": "delete", "frees_bytes": SIZE} for s in (10, 20)
    ]
    assert (pressure_json(v)["released_bytes"], pressure_json(v)["floor_met"], pressure_json(v)["shortfall_bytes"]) == (
        2000, True, 0
    )  # fmt: skip


def test_a_weights_only_milestone_is_released_and_says_so() -> None:
    keep, under = TIERS_POLICY
    plan = plan_root([TIERS], policy(keep, floor_for(1), under, weights="every:10"), space=space(now=T0 + 1001))
    assert released(plan) == ["run/checkpoint-70"]
    assert reason_texts(decision(plan, "run/70").reasons) == [
        "disk pressure: 10.0 kB free < 9.0 kB floor + 1.0 kB next save",
        "was every 10 (weights only)",
    ]


# --- what is never released --------------------------------------------------------------------------------------

# checkpoint-100 of an earlier run (written first), then 10, 20, 30 of the live run, whose newest (30) says the
# Trainer's best is 10; 40 is a save under way. Protected: 100 (highest step), 30 (newest written), 10 (Trainer's
# best), 40 (incomplete). Only 20 may be released.
PROTECTED = run("run", ck(100, at=T0 + 5), ck(10), ck(20), ck(30, best=(10,)), ck(40, size=400, complete=False))


@pytest.mark.parametrize(("trainer_best", "expected"), [(True, [20]), (False, [10, 20])])
def test_protected_checkpoints_are_never_released_even_when_the_floor_cannot_be_met(
    trainer_best: bool, expected: list[int]
) -> None:
    p = policy("last:10", "1P", "last:1", trainer_best=trainer_best)
    plan = plan_root([PROTECTED], p, space=space())
    assert plan.runs[0].mixed_runs is not None
    assert released(plan) == [f"run/checkpoint-{s}" for s in expected]
    v = verdict(plan)
    assert (v.under, v.met, v.next_save, v.released_bytes) == (True, False, SIZE - 400, len(expected) * SIZE)
    assert v.shortfall == 10**15 + 600 - FREE - v.released_bytes
    before = without_pressure([PROTECTED], p)
    for step in {10, 30, 40, 100} - set(expected):
        assert decision(plan, f"run/{step}") == decision(before, f"run/{step}")
        assert decision(plan, f"run/{step}").action is Action.KEEP
    assert pressure_line(v).endswith(
        f"CANNOT MEET THE FLOOR: releasing all the pressure rules allow ({len(expected)} checkpoint"
        f"{'s' if len(expected) > 1 else ''}) frees {len(expected)}.0 kB, still 1000.0 TB short; "
        "protected checkpoints are never removed"
    )


def test_what_the_pressure_rules_keep_is_never_released() -> None:
    losses = run("run", *(ck(s, loss=loss) for s, loss in [(10, 0.5), (20, 0.1), (30, 0.4), (40, 0.3), (50, 0.45)]))
    plan = plan_root([losses], policy("last:5", "1P", "best:1"), space=space())
    assert released(plan) == ["run/checkpoint-10", "run/checkpoint-30", "run/checkpoint-40"]
    assert decision(plan, "run/20").action is Action.KEEP
    assert verdict(plan).met is False


# --- when nothing is released although the disk is under pressure ------------------------------------------------


def test_a_refusal_in_another_run_of_the_root_defers_every_release() -> None:
    a = run("a", *LINE.checkpoints)  # no eval: not refused itself, but held
    b = run("b", ck(10, loss=0.5), ck(20, loss=0.4))
    p = policy("last:5,best:1:acuracy", "1P", "last:1")
    plan = plan_root([a, b], p, space=space(runs=("a", "b")))
    assert [r.run.path for r in plan.refusals] == ["b"]
    v = verdict(plan)
    assert (v.under, v.released, v.deferred) == (True, (), "retention is refused in this root, so nothing is released")
    assert plan.runs == without_pressure([a, b], p).runs
    assert pressure_line(v).endswith(
        "UNDER PRESSURE; nothing released: retention is refused in this root, so nothing is released"
    )


def test_a_run_known_refused_elsewhere_defers_every_release() -> None:
    p = policy("last:2", "1P", "last:1")
    plan = plan_root([LINE], p, ("elsewhere",), space=space())
    assert (verdict(plan).released, verdict(plan).deferred) == (
        (),
        "retention is refused in this root, so nothing is released",
    )
    assert plan.runs == without_pressure([LINE], p, ("elsewhere",)).runs
    assert set(actions(plan).values()) == {Action.KEEP}


def test_a_typo_in_a_pressure_rule_metric_refuses_like_one_in_keep() -> None:
    losses = run("run", ck(10, loss=0.5), ck(20, loss=0.4), ck(30, loss=0.3))
    plan = plan_root([losses], policy("last:1", "1P", "best:1:acuracy"), space=space())
    assert plan.runs[0].refusal == (
        "rule 'best:1:eval_acuracy': no checkpoint has eval_acuracy (the run's metrics: eval_loss)"
    )
    assert set(actions(plan).values()) == {Action.KEEP}
    assert (verdict(plan).released, verdict(plan).deferred) == (
        (),
        "retention is refused in this root, so nothing is released",
    )


def test_while_the_trash_is_being_emptied_nothing_is_released() -> None:
    p = policy("last:2", "1P", "last:1")
    plan = plan_root([LINE], p, space=space(freeing=True))
    v = verdict(plan)
    assert (v.under, v.released) == (True, ())
    assert v.deferred == "removals are still being deleted from the trash; measured again once they are"
    assert plan.runs == without_pressure([LINE], p).runs


def test_a_filesystem_that_reports_no_size_is_not_judged() -> None:
    """Some FUSE and network filesystems report 0 blocks: their free space means nothing, so nothing is released."""
    p = policy("last:2", "1P", "last:1")
    plan = plan_root([LINE], p, space=space(free=0, total=0))
    v = verdict(plan)
    assert (v.under, v.released) == (False, ())
    assert (
        v.deferred
        == "the filesystem reports no size or free space (statvfs), so pressure cannot be judged; nothing is released"
    )
    assert pressure_line(v) == f"disk /fs1: {v.deferred}"
    assert plan.runs == without_pressure([LINE], p).runs


# --- archives ----------------------------------------------------------------------------------------------------


def test_an_archive_on_the_same_filesystem_frees_nothing_so_nothing_is_released() -> None:
    p = policy("last:3", "1P", "last:1", removal=Action.ARCHIVE)
    plan = plan_root([LINE], p, space=space(archive=FS))
    v = verdict(plan)
    assert (v.planned, v.available, v.under, v.released, v.met) == (0, FREE, True, (), False)
    assert plan.runs == without_pressure([LINE], p).runs  # 10 and 20 archived as planned, nothing more


def test_an_archive_on_another_filesystem_archives_what_is_released() -> None:
    p = policy("last:3", floor_for(1500, planned=2 * SIZE), "last:1", removal=Action.ARCHIVE)
    plan = plan_root([LINE], p, space=space(archive=OTHER_FS))
    v = verdict(plan)
    assert (v.planned, released(plan), v.met) == (2000, ["run/checkpoint-30", "run/checkpoint-40"], True)
    assert [r.action for r in v.released] == [Action.ARCHIVE, Action.ARCHIVE]
    assert actions(plan) == {"run/10": Action.ARCHIVE, "run/20": Action.ARCHIVE, "run/30": Action.ARCHIVE,
                             "run/40": Action.ARCHIVE, "run/50": Action.KEEP}  # fmt: skip


# --- --keep-weights: slim first ----------------------------------------------------------------------------------

SLIM = run("run", *(ck(s, resume=700) for s in (10, 20, 30, 40, 50)))  # every one: 300 weights + 700 resume state
W, D, K = Action.WEIGHTS_ONLY, Action.DELETE, Action.KEEP


@pytest.mark.parametrize(
    ("shortfall", "expected", "met"),
    [
        (1000, [D, K, K, K], True),  # 10 (not kept by every:20) removed: 1000
        (1001, [D, W, K, K], True),  # + 20 slimmed: 1700
        # + 30 removed (2700), and then the slim of 20 is undone: 10 and 30 removed (2000) are enough alone
        (1701, [D, K, D, K], True),
        (2701, [D, W, D, W], True),  # + 40 slimmed: 3400
        (3401, [D, D, D, W], True),  # + the slimmed 20 removed: 3700
        (3701, [D, D, D, D], True),  # + the slimmed 40 removed: 4000
        (4001, [D, D, D, D], False),
    ],
)
def test_a_checkpoint_kept_weights_only_is_slimmed_before_anything_slimmed_is_removed(
    shortfall: int, expected: list[Action], met: bool
) -> None:
    plan = plan_root([SLIM], policy("last:5", floor_for(shortfall), "last:1", weights="every:20"), space=space())
    assert [actions(plan)[f"run/{s}"] for s in (10, 20, 30, 40, 50)] == [*expected, K]
    v = verdict(plan)
    assert v.met is met
    assert {r.checkpoint: (r.action, r.frees) for r in v.released} == {
        f"checkpoint-{s}": (a, 700 if a is W else SIZE)
        for s, a in zip((10, 20, 30, 40), expected, strict=True)
        if a is not K
    }
    for s, a in zip((10, 20, 30, 40), expected, strict=True):
        if a is W:
            d = decision(plan, f"run/{s}")
            assert (decision_text(d), reason_texts(d.reasons)[1:]) == (
                "keep (weights only)",
                [f"was last {6 - s // 10}/5"],
            )


def test_a_planned_weights_only_checkpoint_is_released_for_the_bytes_it_still_holds() -> None:
    r = run("run", *(ck(s, resume=700) for s in (10, 20, 30)))
    plan = plan_root([r], policy("last:1", floor_for(1, planned=1400), "last:1", weights="every:10"), space=space())
    v = verdict(plan)
    assert (v.planned, v.available) == (1400, FREE + 1400)  # 10 and 20 were to lose their resume state anyway
    assert [(x.checkpoint, x.action, x.frees) for x in v.released] == [("checkpoint-10", Action.DELETE, 300)]
    assert reason_texts(decision(plan, "run/10").reasons)[1:] == ["was every 10 (weights only)"]


def test_with_an_archive_on_the_same_filesystem_only_slimming_frees_space() -> None:
    p = policy("last:5", "1P", "last:1", weights="every:20", removal=Action.ARCHIVE)
    plan = plan_root([SLIM], p, space=space(archive=FS))
    assert [(x.checkpoint, x.action, x.frees) for x in verdict(plan).released] == [
        ("checkpoint-20", Action.WEIGHTS_ONLY, 700),
        ("checkpoint-40", Action.WEIGHTS_ONLY, 700),
    ]
    assert [actions(plan)[f"run/{s}"] for s in (10, 20, 30, 40, 50)] == [K, W, K, W, K]


# --- several runs, several filesystems ---------------------------------------------------------------------------

SHARED = [
    run("a", ck(10, at=T0 + 100), ck(20, at=T0 + 300), ck(30, at=T0 + 500)),
    run("b", ck(10, at=T0 + 200), ck(20, at=T0 + 400), ck(30, at=T0 + 600)),
]


@pytest.mark.parametrize(
    ("shortfall", "expected"),
    [
        (1, ["a/10"]),
        (1001, ["a/10", "b/10"]),
        (2001, ["a/10", "b/10", "a/20"]),
        (4001, ["a/10", "b/10", "a/20", "b/20"]),
    ],
)
def test_runs_on_one_filesystem_share_one_budget_oldest_first(shortfall: int, expected: list[str]) -> None:
    p = policy("last:3", floor_for(shortfall, next_save=2 * SIZE), "last:1")
    plan = plan_root(SHARED, p, space=space(runs=("a", "b"), now=T0 + 700))
    v = verdict(plan)
    assert (v.next_save, v.training) == (2 * SIZE, ("a", "b"))
    assert released(plan) == [f"{x.split('/')[0]}/checkpoint-{x.split('/')[1]}" for x in expected]
    assert v.met is (shortfall < 4000)


def test_runs_on_two_filesystems_are_judged_separately() -> None:
    a = run("a", ck(10, at=T0 + 100), ck(20, at=T0 + 300), ck(30, at=T0 + 500))
    b = run("b", ck(10, at=T0 + 50), ck(20, at=T0 + 150), ck(30, at=T0 + 250))  # older: first, were it one budget
    disks = {FS: Disk(FS, 10_000, 105_000, "/fs1"), OTHER_FS: Disk(OTHER_FS, 2 * 10**6, 10**7, "/fs2")}
    sp = Space(disks, {"a": FS, "b": OTHER_FS}, None, T0 + 700)
    p = policy("last:3", "10%", "last:1")
    plan = plan_root([a, b], p, space=sp)
    one, two = plan.pressure
    assert (one.disk.where, one.floor, one.next_save, one.training, one.under) == ("/fs1", 10_500, SIZE, ("a",), True)
    assert [(x.run, x.checkpoint) for x in one.released] == [("a", "checkpoint-10"), ("a", "checkpoint-20")]
    assert (two.disk.where, two.floor, two.next_save, two.training, two.under) == ("/fs2", 10**6, SIZE, ("b",), False)
    assert two.released == ()
    assert plan.runs[1] == without_pressure([a, b], p).runs[1]
    assert pressure_line(two) == "disk /fs2: 2.0 MB free >= 1.0 MB floor + 1.0 kB next save: no pressure"


def test_a_run_not_measured_is_neither_judged_nor_released() -> None:
    plan = plan_root([LINE, run("b", *LINE.checkpoints)], policy("last:5", "1P", "last:1"), space=space(runs=("run",)))
    assert all(f.startswith("run/") for f in released(plan))
    assert {d.action for d in plan.runs[1].decisions} == {Action.KEEP}


# --- the planner is pure -----------------------------------------------------------------------------------------


def test_the_planner_reads_neither_the_clock_nor_the_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_: object) -> None:
        raise AssertionError("the planner must not read the clock or the disk")

    p = policy("last:5", "10500", "last:1", weights="every:20")
    runs = [SLIM, run("tiers", *TIERS.checkpoints)]  # tiers: not measured (no figures), planned all the same
    with monkeypatch.context() as m:
        for module, name in [(time, "time"), (time, "monotonic"), (os, "statvfs"), (os, "fstatvfs"), (os, "stat")]:
            m.setattr(module, name, forbidden)
        first = plan_root(runs, p, space=space())
        second = plan_root(runs, p, space=space())
    assert first == second
    assert released(first) == ["run/checkpoint-10", "run/checkpoint-20"]  # SLIM's 10 removed, then 20 slimmed
    assert [actions(first)[f"run/{s}"] for s in (10, 20, 30)] == [Action.DELETE, Action.WEIGHTS_ONLY, Action.KEEP]


def test_now_changes_the_plan_only_through_still_training() -> None:
    """LINE's newest was written at T0 + 50 (saves every 10 s: idle after 600 s). With its next save the disk is
    500 bytes short, without it not."""
    p = policy("last:5", 9500, "last:1")
    plans = [plan_root([LINE], p, space=space(now=T0 + 50 + age)) for age in (0, 50, 599, 600)]
    assert all(plan == plans[0] for plan in plans)
    assert released(plans[0]) == ["run/checkpoint-10"]
    idle = plan_root([LINE], p, space=space(now=T0 + 651))
    assert (verdict(idle).training, verdict(idle).next_save, verdict(idle).under, released(idle)) == ((), 0, False, [])
    stopped = run("run", *LINE.checkpoints[:-1], ck(50, stopped=True))
    as_if_stopped = plan_root([stopped], p, space=space())
    assert verdict(idle) == verdict(as_if_stopped)
    assert [(d.action, d.reasons) for d in idle.runs[0].decisions] == [
        (d.action, d.reasons) for d in as_if_stopped.runs[0].decisions
    ]


# --- what the watch daemon freed and the filesystem does not show yet (unseen.UnseenFrees) ------------------------


def test_space_freed_and_not_yet_shown_counts_as_free_until_it_shows() -> None:
    """The daemon freed 2 checkpoints (2000 B): at its next pass the runs hold 2000 B less but the filesystem
    shows no more free (btrfs before its commit; a file still held open; a trash still being emptied). Counted
    as free still to come, the shortfall does not release a third; once it shows, nothing is owed any more."""
    from ckptkeeper.unseen import PATIENCE, UnseenFrees

    unseen = UnseenFrees()
    before = run("run", *(ck(s) for s in (10, 20, 30, 40, 50)))
    after = run("run", *(ck(s) for s in (30, 40, 50)))
    first = unseen.adjust(space(free=5000), [before], NOW)
    assert first.unseen == {}
    unseen.freed({"run": 2000}, NOW)
    # nothing shows yet: all 2000 B are still to come
    assert unseen.adjust(space(free=5000), [after], NOW + 1).unseen == {FS: 2000}
    # the trainer wrote 700 B into a new checkpoint meanwhile and 1500 B showed: 500 B still to come
    grown = run("run", *(ck(s) for s in (30, 40, 50)), ck(60, size=700, complete=False))
    assert unseen.adjust(space(free=5000 + 1500 - 700), [grown], NOW + 2).unseen == {FS: 500}
    # all of it shows: nothing owed, and the record is gone
    assert unseen.adjust(space(free=7000), [after], NOW + 3).unseen == {}
    assert unseen.records == {}
    # freed again, never shown, given up after PATIENCE seconds (judged by statvfs again)
    unseen.adjust(space(free=7000), [after], NOW + 4)
    unseen.freed({"run": 1000}, NOW + 4)
    assert unseen.adjust(space(free=7000), [run("run", *(ck(s) for s in (40, 50)))], NOW + 5).unseen == {FS: 1000}
    assert unseen.adjust(space(free=7000), [run("run", *(ck(s) for s in (40, 50)))], NOW + 5 + PATIENCE).unseen == {}


def test_what_others_write_is_never_counted_as_more_than_was_freed() -> None:
    """Another process fills the filesystem after a release: the deficit is larger than what was freed, and
    only what was freed (at most) counts as still to come."""
    from ckptkeeper.unseen import UnseenFrees

    unseen = UnseenFrees()
    unseen.adjust(space(free=5000), [LINE], NOW)
    unseen.freed({"run": 1000}, NOW)
    smaller = run("run", *(ck(s) for s in (20, 30, 40, 50)))
    assert unseen.adjust(space(free=1000), [smaller], NOW + 1).unseen == {FS: 1000}


def test_unseen_space_enters_the_verdict_as_free() -> None:
    p = policy("last:5", 5500, "last:1")  # needs 5500 + 1000 (the next save): 7000 with the unseen 2000 B
    assert verdict(plan_root([LINE], p, space=space(free=5000))).under
    shown = Space({FS: Disk(FS, 5000, 10**9, "/fs1")}, {"run": FS}, None, NOW, False, {FS: 2000})
    v = verdict(plan_root([LINE], p, space=shown))
    assert (v.available, v.under, v.released) == (7000, False, ())
    assert pressure_json(v)["unseen_free_bytes"] == 2000
