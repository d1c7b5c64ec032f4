"""One pass of the pipeline: scan the disk, plan each run, carry out the removals, journal them.

`plan` and `prune` call it once; the watch daemon calls it for each run an event touches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ckptkeeper.actions import (
    RUN_TRASH_NAME,
    ActionError,
    Dispose,
    Vanished,
    archive_checkpoint,
    delete_checkpoint,
    empty_trash,
)
from ckptkeeper.model import Action, Decision, RunPlan
from ckptkeeper.policy import Protections, plan_run
from ckptkeeper.rules import AnyRule, format_rules
from ckptkeeper.scan import DEFAULT_MAX_DEPTH, read_checkpoint, scan_root
from ckptkeeper.state import STATE_DIR_NAME, StateDir


@dataclass(frozen=True)
class Policy:
    rules: tuple[AnyRule, ...]
    protections: Protections = field(default_factory=Protections)
    archive_to: Path | None = None
    max_depth: int = DEFAULT_MAX_DEPTH
    settle: float = 0.0

    @property
    def removal(self) -> Action:
        return Action.ARCHIVE if self.archive_to else Action.DELETE


def default_state_dir(root: Path) -> Path:
    return root / STATE_DIR_NAME


def excluded_from_scan(state_dir: Path, archive_to: Path | None) -> list[Path]:
    return [state_dir] + ([archive_to] if archive_to else [])


@dataclass
class PlanResult:
    runs: list[RunPlan]
    warnings: list[str]

    @property
    def refusals(self) -> list[RunPlan]:
        return [r for r in self.runs if r.refusal]


def make_plan(root: Path, policy: Policy, state_dir: Path, now: float | None = None) -> PlanResult:
    scanned = scan_root(root, policy.max_depth, excluded_from_scan(state_dir, policy.archive_to), now, policy.settle)
    plans = [plan_run(run, policy.rules, policy.protections, policy.removal) for run in scanned.runs]
    return PlanResult(plans, scanned.warnings)


@dataclass(frozen=True)
class Outcome:
    """What happened to one checkpoint the plan removes."""

    run: str
    checkpoint: str
    action: str  # delete, archive, would-delete, would-archive, vanished, skipped, error
    bytes: int = 0
    detail: str = ""


@dataclass
class Totals:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def removed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.action in ("delete", "archive")]

    @property
    def errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.action == "error"]

    @property
    def bytes_freed(self) -> int:
        return sum(o.bytes for o in self.removed)


def finish_leftovers(
    root: Path, state: StateDir, run_dirs: Sequence[Path] = (), stuck: list[str] | None = None
) -> list[str]:
    """Complete removals an earlier, interrupted instance left in the trash. Entries that cannot be
    removed are described in `stuck` (and journaled) and tried again on the next start."""
    problems: list[str] = []
    finished = empty_trash(state.trash, stuck=problems)
    for run_dir in run_dirs:
        local = run_dir / RUN_TRASH_NAME
        if local.is_dir() and not local.is_symlink():
            finished += empty_trash(local, stuck=problems)
            with contextlib.suppress(OSError):
                local.rmdir()
    for name in finished:
        state.record({"action": "finish-trash", "entry": name, "why": "left by an interrupted removal"})
    for problem in problems:
        state.record({"action": "error", "entry": problem, "why": "could not finish a removal left in the trash"})
    if stuck is not None:
        stuck.extend(problems)
    return finished


def _carry_out(
    root: Path, run: str, decision: Decision, policy: Policy, state: StateDir, dispose: Dispose | None
) -> Outcome:
    c = decision.checkpoint
    path = root / run / c.name if run != "." else root / c.name
    # The plan was made from an earlier look at the disk; act only on what is still the same.
    now_seen = read_checkpoint(path, c.step)
    if now_seen.incomplete_reason == "vanished while reading":
        return Outcome(run, c.name, "vanished", 0, "removed by someone else before ckptkeeper got to it")
    if not now_seen.complete or now_seen.size_bytes != c.size_bytes:
        return Outcome(run, c.name, "skipped", 0, "changed since the plan was made; left for the next pass")
    entry = {
        "run": run,
        "checkpoint": c.name,
        "step": c.step,
        "bytes": c.size_bytes,
        "why": f"{'; '.join(decision.reasons)} (keep {format_rules(policy.rules)})",
    }
    # Written before acting, so a crash mid-removal still leaves a record of what was being done and why.
    state.record({"action": f"start-{decision.action}", **entry})
    try:
        if decision.action is Action.ARCHIVE:
            assert policy.archive_to is not None
            target = policy.archive_to / run / c.name if run != "." else policy.archive_to / c.name
            how = archive_checkpoint(root, path, target, state, dispose)
            outcome = Outcome(run, c.name, "archive", c.size_bytes, f"{how} to {target}")
        else:
            delete_checkpoint(root, path, state, dispose)
            outcome = Outcome(run, c.name, "delete", c.size_bytes)
    except Vanished:
        outcome = Outcome(run, c.name, "vanished", 0, "removed by someone else while ckptkeeper worked")
    except ActionError as e:
        outcome = Outcome(run, c.name, "error", 0, str(e))
    state.record(
        {"action": outcome.action, **entry, "bytes": outcome.bytes}
        | ({"detail": outcome.detail} if outcome.detail else {})
    )
    return outcome


def apply_plan(
    root: Path,
    plans: Sequence[RunPlan],
    policy: Policy,
    state: StateDir | None,
    on_outcome: Callable[[Outcome], None] = lambda _: None,
    dispose: Dispose | None = None,
) -> Totals:
    """Carry out every removal in `plans` (oldest first per run). With `state=None`, a dry run.
    `dispose` takes over deleting trash entries (the daemon's reaper thread); by default it is inline."""
    totals = Totals()
    for plan in plans:
        if plan.refusal:
            continue
        for decision in plan.removed:
            c = decision.checkpoint
            if state is None:
                outcome = Outcome(plan.run.path, c.name, f"would-{decision.action}", c.size_bytes)
            else:
                outcome = _carry_out(root, plan.run.path, decision, policy, state, dispose)
            totals.outcomes.append(outcome)
            on_outcome(outcome)
    return totals
