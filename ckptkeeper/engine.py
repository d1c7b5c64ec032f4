"""One pass of the pipeline: scan the disk, plan each run, carry out the removals, journal them.

`plan` and `prune` call it once; the watch daemon calls it for each run an event touches.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ckptkeeper.actions import (
    RUN_TRASH_NAME,
    ActionError,
    Changed,
    Dispose,
    StopCheck,
    Stopped,
    Vanished,
    archive_checkpoint,
    delete_checkpoint,
    empty_trash,
    open_run_dir,
)
from ckptkeeper.layout import default_state_dir
from ckptkeeper.model import Action, Checkpoint, Decision, RunPlan
from ckptkeeper.paths import fd_path
from ckptkeeper.policy import Protections, plan_run
from ckptkeeper.rules import AnyRule, format_rules
from ckptkeeper.scan import DEFAULT_MAX_DEPTH, read_checkpoint, scan_root
from ckptkeeper.state import StateDir


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
    action: str  # delete, archive, would-delete, would-archive, vanished, skipped, stopped, error
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
    finished = empty_trash(state.trash_fd, stuck=problems, shown=state.trash)
    for run_dir in run_dirs:
        finished += _finish_local_trash(root, run_dir, problems)
    lines = [{"action": "finish-trash", "entry": name, "why": "left by an interrupted removal"} for name in finished]
    lines += [{"action": "error", "entry": p, "why": "could not finish a removal left in the trash"} for p in problems]
    for line in lines:
        try:
            state.record(line)
        except OSError as e:
            problems.append(f"{state.journal_path}: cannot write the journal: {e.strerror or e}")
            break
    if stuck is not None:
        stuck.extend(problems)
    return finished


def _finish_local_trash(root: Path, run_dir: Path, problems: list[str]) -> list[str]:
    """Empty the run-local trash of `run_dir` (reached without following links), and remove it if empty."""
    try:
        run_fd = open_run_dir(root, run_dir / RUN_TRASH_NAME)
    except ActionError:
        return []
    try:
        try:
            local_fd = os.open(
                RUN_TRASH_NAME, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=run_fd
            )
        except OSError:
            return []
        try:
            finished = empty_trash(local_fd, stuck=problems, shown=run_dir / RUN_TRASH_NAME)
        finally:
            os.close(local_fd)
        with contextlib.suppress(OSError):
            os.rmdir(RUN_TRASH_NAME, dir_fd=run_fd)
        return finished
    finally:
        os.close(run_fd)


def _carry_out(
    root: Path,
    run: str,
    decision: Decision,
    policy: Policy,
    state: StateDir,
    dispose: Dispose | None,
    stop: StopCheck | None = None,
    root_identity: tuple[int, int] | None = None,
) -> Outcome:
    c = decision.checkpoint
    path = root / run / c.name if run != "." else root / c.name
    # The plan was made from an earlier look at the disk; act only on what is still the same, looked at
    # through the run directory reached without following links (the same way the removal reaches it).
    try:
        run_fd = open_run_dir(root, path, "remove", root_identity)
    except Vanished:
        return Outcome(run, c.name, "vanished", 0, "removed by someone else before ckptkeeper got to it")
    except ActionError as e:
        return Outcome(run, c.name, "error", 0, str(e))
    try:
        now_seen = read_checkpoint(Path(fd_path(run_fd, path.parent)) / c.name, c.step)
    finally:
        os.close(run_fd)
    if now_seen.incomplete_reason == "vanished while reading":
        return Outcome(run, c.name, "vanished", 0, "removed by someone else before ckptkeeper got to it")
    if not now_seen.complete or now_seen.size_bytes != c.size_bytes or not _same_directory(c, now_seen):
        return Outcome(run, c.name, "skipped", 0, "changed since the plan was made; left for the next pass")
    entry = {
        "run": run,
        "checkpoint": c.name,
        "step": c.step,
        "bytes": c.size_bytes,
        "why": f"{'; '.join(decision.reasons)} (keep {format_rules(policy.rules)})",
    }
    # Written before acting, so a crash mid-removal still leaves a record of what was being done and why;
    # where the journal cannot be written, nothing is done.
    try:
        state.record({"action": f"start-{decision.action}", **entry})
    except OSError as e:
        return Outcome(run, c.name, "error", 0, f"cannot write the journal {state.journal_path}: {e.strerror or e}")
    outcome = _act(root, run, path, decision, (policy, state, dispose, stop), now_seen.identity, root_identity)
    try:
        state.record(
            {"action": outcome.action, **entry, "bytes": outcome.bytes}
            | ({"detail": outcome.detail} if outcome.detail else {})
        )
    except OSError as e:
        unrecorded = f"not journaled: cannot write {state.journal_path}: {e.strerror or e}"
        detail = f"{outcome.detail}; {unrecorded}" if outcome.detail else unrecorded
        return Outcome(run, c.name, outcome.action, outcome.bytes, detail)
    return outcome


def _same_directory(planned: Checkpoint, now_seen: Checkpoint) -> bool:
    """The very directory judged, with the very files: same identity, and no entry added, removed, renamed
    or written since (every entry's inode, size, mtime and ctime)."""
    same_identity = planned.identity is None or planned.identity == now_seen.identity
    return same_identity and (planned.fingerprint is None or planned.fingerprint == now_seen.fingerprint)


def _act(
    root: Path,
    run: str,
    path: Path,
    decision: Decision,
    means: tuple[Policy, StateDir, Dispose | None, StopCheck | None],
    identity: tuple[int, int] | None,
    root_identity: tuple[int, int] | None,
) -> Outcome:
    """Carry out one removal with `means` (policy, state, dispose, stop); every failure is an Outcome."""
    policy, state, dispose, stop = means
    c = decision.checkpoint
    try:
        if decision.action is Action.ARCHIVE:
            assert policy.archive_to is not None
            target = policy.archive_to / run / c.name if run != "." else policy.archive_to / c.name
            done = archive_checkpoint(
                root, path, target, state, dispose, identity, stop, policy.archive_to, root_identity
            )
            return Outcome(run, c.name, "archive", c.size_bytes, f"{done} to {target}")
        delete_checkpoint(root, path, state, dispose, identity, root_identity)
        return Outcome(run, c.name, "delete", c.size_bytes)
    except Vanished:
        return Outcome(run, c.name, "vanished", 0, "removed by someone else while ckptkeeper worked")
    except Changed as e:
        return Outcome(run, c.name, "skipped", 0, str(e))
    except Stopped as e:
        return Outcome(run, c.name, "stopped", 0, str(e))
    except ActionError as e:
        return Outcome(run, c.name, "error", 0, str(e))
    except OSError as e:  # not foreseen by the action: still one checkpoint's failure, never the pass's
        return Outcome(run, c.name, "error", 0, f"cannot {decision.action} {path}: {e}")


def apply_plan(
    root: Path,
    plans: Sequence[RunPlan],
    policy: Policy,
    state: StateDir | None,
    on_outcome: Callable[[Outcome], None] = lambda _: None,
    dispose: Dispose | None = None,
    stop: StopCheck | None = None,
    root_identity: tuple[int, int] | None = None,
) -> Totals:
    """Carry out every removal in `plans` (oldest first per run). With `state=None`, a dry run.
    `dispose` takes over deleting trash entries (the daemon's reaper thread); by default it is inline.
    `stop` is asked before every action and during a copy: once it says so, no new action starts.
    `root_identity`: the root's (device, inode) when the plan was made; a root that is another directory now
    (a link on its path changed) is never acted in."""
    totals = Totals()
    for plan in plans:
        if plan.refusal:
            continue
        for decision in plan.removed:
            if stop is not None and stop():
                return totals
            c = decision.checkpoint
            if state is None:
                outcome = Outcome(plan.run.path, c.name, f"would-{decision.action}", c.size_bytes)
            else:
                outcome = _carry_out(root, plan.run.path, decision, policy, state, dispose, stop, root_identity)
            totals.outcomes.append(outcome)
            on_outcome(outcome)
    return totals


__all__ = [
    "Outcome",
    "PlanResult",
    "Policy",
    "Totals",
    "apply_plan",
    "default_state_dir",
    "excluded_from_scan",
    "finish_leftovers",
    "make_plan",
]
