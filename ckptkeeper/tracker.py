"""The run tracker: what the watch daemon remembers about each run between passes.

The content cache (so a periodic rescan does not walk unchanged checkpoints), the runs whose last pass had
nothing to do (so they are not planned again while unchanged), when a settling checkpoint is due for a
second look, which runs are refused (the refusal holds the whole root), and which have finished training.
"""

from __future__ import annotations

import operator
from pathlib import Path

from ckptkeeper.model import Checkpoint, ReasonKind, Run, RunPlan, RunResult
from ckptkeeper.scan import ContentCache

SETTLE_MARGIN = 0.02  # look again this long after a checkpoint's settle time is up


class RunTracker:
    """Owned by the daemon's main loop: every method runs there. Run directories are absolute paths; runs
    are named as the plans name them (relative to the root)."""

    def __init__(self) -> None:
        self.cache = ContentCache()
        self.known_runs: set[Path] = set()
        self.quiet_runs: dict[Path, tuple[Checkpoint, ...]] = {}  # runs whose last pass had nothing to do
        self.recheck_at: dict[Path, float] = {}  # run -> when a settling checkpoint of it is due
        self.refused: dict[str, str] = {}  # run -> why its retention is refused
        self.finished_runs: set[str] = set()
        self.crashed: dict[Path, str] = {}  # runs whose last reconcile raised, and what was logged
        # Runs whose removals a refusal elsewhere held at their last pass: planned again the moment the set of
        # refused runs changes (`take_replan`), never left quiet, and never "pruned".
        self.held: dict[str, Path] = {}
        self._replan: set[Path] = set()

    def forget_root(self) -> None:
        """The root was made anew: nothing known of the old one's runs holds for the new one's."""
        self.known_runs.clear()
        self.quiet_runs.clear()
        self.recheck_at.clear()
        self.refused.clear()
        self.finished_runs.clear()
        self.crashed.clear()
        self.held.clear()
        self._replan.clear()
        self.cache = ContentCache()

    def forget(self, run_dir: Path, run: str) -> None:
        """The run directory is gone, or holds no checkpoint any more."""
        self.known_runs.discard(run_dir)
        self.quiet_runs.pop(run_dir, None)
        self.finished_runs.discard(run)
        self.held.pop(run, None)
        if self.refused.pop(run, None) is not None:
            self._refusals_changed()

    def due(self, now: float) -> list[Path]:
        return [run_dir for run_dir, at in self.recheck_at.items() if at <= now]

    def next_recheck(self) -> float | None:
        return min(self.recheck_at.values(), default=None)

    def unchanged(self, run_dir: Path, run: Run) -> bool:
        """The very same (trusted, unchanged) checkpoints as at its last pass, which had nothing to do: the pure
        plan would be the same, so there is nothing to plan, log or remove."""
        quiet = self.quiet_runs.get(run_dir)
        return (
            quiet is not None and len(quiet) == len(run.checkpoints) and all(map(operator.is_, quiet, run.checkpoints))
        )

    def refused_elsewhere(self, run: str) -> set[str]:
        return {other for other in self.refused if other != run}

    def record(self, run_dir: Path, result: RunResult, now: float, dry_run: bool) -> bool:
        """Remember a run after a pass; True when it has just finished training (and is pruned)."""
        plan = result.plan
        self.known_runs.add(run_dir)
        self.recheck_at.pop(run_dir, None)
        self.quiet_runs.pop(run_dir, None)
        self._note_refusal(plan)
        settling = [c.settles_at for c in plan.run.checkpoints if c.settles_at is not None and c.settles_at > now]
        if settling:
            # Incomplete only because it changed recently: look again when its settle time is up, since no
            # further event may come. Other incomplete checkpoints wait for events (and full rescans).
            self.recheck_at[run_dir] = min(settling) + SETTLE_MARGIN
        lapsing = [r.until for d in plan.decisions for r in d.reasons if r.until is not None and r.until > now]
        if lapsing:
            # Kept by what lapses with time (an await's timeout, a pin's lease): plan again then, since no event
            # may come; meanwhile the run is not quiet, so each pass plans it with the time of that pass.
            due = min(lapsing) + SETTLE_MARGIN
            self.recheck_at[run_dir] = min(self.recheck_at.get(run_dir, due), due)
        held = _held(plan)
        if held:
            self.held[plan.run.path] = run_dir
        else:
            self.held.pop(plan.run.path, None)
        if not settling and not lapsing and not held and not result.unfinished:
            self.quiet_runs[run_dir] = result.after.checkpoints
        pruned = dry_run or not result.unfinished
        live = plan.live
        done = live is not None and live.training_stopped and not saving_after(result.after, live)
        if done and pruned and not settling and not lapsing:  # an await still to come is not done
            newly = plan.run.path not in self.finished_runs
            self.finished_runs.add(plan.run.path)
            return newly
        self.finished_runs.discard(plan.run.path)
        return False

    def _note_refusal(self, plan: RunPlan) -> None:
        before = set(self.refused)
        if plan.refusal:
            self.refused[plan.run.path] = plan.refusal
        else:
            self.refused.pop(plan.run.path, None)
        if set(self.refused) != before:
            self._refusals_changed()

    def _refusals_changed(self) -> None:
        """A refusal holds every run of the root: plans made under the old set of refused runs are stale. The
        runs kept quiet are planned at their next look; the held ones at once, and are not finished meanwhile
        (a run held until now has not been pruned)."""
        self.quiet_runs.clear()
        for run, run_dir in self.held.items():
            self._replan.add(run_dir)
            self.finished_runs.discard(run)

    def take_replan(self) -> list[Path]:
        """The held runs to plan again now, since the refusals changed."""
        runs, self._replan = sorted(self._replan), set()
        return runs

    def crashed_once(self, run_dir: Path, run: str, said: str) -> bool:
        """A reconcile of this run raised `said`; True if that is news (to be logged)."""
        news = self.crashed.get(run_dir) != said
        self.crashed[run_dir] = said
        self.quiet_runs.pop(run_dir, None)
        self.finished_runs.discard(run)
        return news

    def refused_runs(self, runs: set[str]) -> list[str]:
        """The refused runs among `runs`."""
        return sorted(run for run in self.refused if run in runs)


def _held(plan: RunPlan) -> bool:
    return any(r.kind is ReasonKind.HELD for d in plan.decisions for r in d.reasons)


def saving_after(run: Run, live: Checkpoint) -> bool:
    """A checkpoint being written after `live` (a higher step, or changed later): training goes on."""
    return any(not c.complete and (c.step > live.step or c.last_change > live.last_change) for c in run.checkpoints)
