"""The reconciler: one pass of the watch daemon over the runs its inbox names.

For each run: scan it (`Pipeline.scan`, trusting the run tracker's cache on periodic passes), skip it if
nothing changed since a pass that had nothing to do, plan it (with the refusals the tracker knows of other
runs: a refusal holds the whole root), act, and hand the `RunResult` to the run tracker and the decision
log. Nothing is scanned or planned twice.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ckptkeeper.decision_log import DecisionLog
from ckptkeeper.engine import PinsUnreadable, Pipeline
from ckptkeeper.inbox import Pending
from ckptkeeper.model import Outcome, OutcomeKind, ReasonKind, Run, RunPlan, root_name
from ckptkeeper.policy import RootPlan
from ckptkeeper.pressure import FREEING
from ckptkeeper.pressure_log import PressureLog
from ckptkeeper.reaper import Reaper
from ckptkeeper.render import shown
from ckptkeeper.scan import run_path
from ckptkeeper.tracker import RunTracker

if TYPE_CHECKING:
    from ckptkeeper.metrics import Metrics
from ckptkeeper.unseen import UnseenFrees

log = logging.getLogger("ckptkeeper")
T = TypeVar("T")


class Reconciler:
    """Owned by the daemon's main loop: every method runs there."""

    def __init__(
        self,
        pipeline: Pipeline,
        tracker: RunTracker,
        decision_log: DecisionLog,
        metrics: Metrics,
        reaper: Reaper,
        stop_event: threading.Event,
    ) -> None:
        self.pipeline = pipeline
        self.tracker = tracker
        self.decision_log = decision_log
        self.metrics = metrics
        self.reaper = reaper
        self.stop_event = stop_event
        self.pressure_log = PressureLog(metrics, root_name(pipeline.root))
        # Pressure was left unjudged because the reaper was still deleting: judge it once the reaper is done.
        self.pressure_waits = False
        self.unseen = UnseenFrees()
        self._freed: dict[str, int] = {}  # run -> bytes this pass's removals took out of it
        # What the last prune or watch read of each checkpoint: the first look at an unchanged one reads no file.
        self.memo = pipeline.load_memo(recording=False)  # saved from the cache (`take`), not look by look
        self._memo_saved: tuple[int, int] = (0, -1)  # the cache (its id) and its `changes` when last saved

    @property
    def root(self) -> Path:
        return self.pipeline.root

    def reconcile(self, pending: Pending) -> None:
        if pending.full:
            self.reaper.retry_stuck()
            self.reconcile_all(pending.trusting, pending.runs)
            self.save_memo()
            return
        if pending.metrics:  # new results may change any run's plan: all of them, trusting unchanged checkpoints
            self.reconcile_all(trusting=True, distrusted=pending.runs)
            return
        targets = set(pending.runs)
        for top in pending.subtrees:
            if top.is_dir() and not top.is_symlink():
                targets.update(self.pipeline.find_runs(top))
        present = [d for d in sorted(targets) if d.is_dir() or d in self.tracker.known_runs]
        self.reconcile_runs(present, time.time())

    def save_memo(self) -> None:
        """Write the memo for the next start (and for `plan`) after a full pass, when anything changed."""
        cache = self.tracker.cache
        if self.pipeline.dry_run or (id(cache), cache.changes) == self._memo_saved:
            return
        self.memo.take(cache)
        with contextlib.suppress(OSError):  # the state directory gone: the next pass makes it again
            if self.memo.save(self.pipeline.state.dir_fd):
                self._memo_saved = (id(cache), cache.changes)

    def reconcile_all(self, trusting: bool = False, distrusted: Collection[Path] = ()) -> None:
        """Rescan every run; `trusting` as in ContentCache, except for the `distrusted` runs (events came)."""
        found = set(self.pipeline.find_runs()) if self.root.is_dir() else set()
        for gone in self.tracker.known_runs - found:
            self.tracker.forget(gone, run_path(self.root, gone))
            self.pipeline.forget_run(run_path(self.root, gone))
            self.decision_log.run_gone(run_path(self.root, gone))
        trusted = set() if not trusting else found - set(distrusted)
        self.reconcile_runs(sorted(found), time.time(), trusted)

    def reconcile_runs(self, run_dirs: Sequence[Path], now: float, trusted: Collection[Path] = ()) -> None:
        """One pass over these runs: scan them all, plan those that changed together (so a refusal found in
        one holds the others in this very pass), then act run by run. Whatever goes wrong in one run (a bug,
        a file no check foresaw) is logged once and retried at the next pass, and never stops the others.

        With --min-free, every known run takes part in every pass (the others scanned trusting the cache):
        pressure is judged over whole filesystems, and only from runs as they are now."""
        others = self._pressure_runs(run_dirs)
        # Once per pass: every run of it is joined from the same look, judged against every run of the root.
        self.pipeline.refresh_metric_sources(sorted({*run_dirs, *self.tracker.known_runs}))
        scanned: list[tuple[Path, Run, bool]] = []
        for run_dir in [*run_dirs, *others]:
            if self.stop_event.is_set():
                return
            trusting = run_dir in trusted or run_dir in others
            found = self._safely(run_dir, functools.partial(self._scan, run_dir, now, trusting))
            if found is not None and (found[1] or self.pipeline.policy.pressure is not None):
                scanned.append((run_dir, *found))
        planned = self._safely(self.root, functools.partial(self._plan, scanned, now))
        if planned is None:
            return  # logged once; the next pass tries again
        self.tracker.crashed.pop(self.root, None)
        self._freed.clear()
        for (run_dir, _, changed), run_plan in zip(scanned, planned.runs, strict=True):
            if self.stop_event.is_set():
                return
            if not changed and not run_plan.acted_on:
                continue  # planned for the pressure figures only: nothing to say or do here
            if self._safely(run_dir, functools.partial(self._act, run_dir, run_plan, planned, now)):
                self.tracker.crashed.pop(run_dir, None)
        self.unseen.freed(self._freed, now)
        again = self.tracker.take_replan()
        if again and not self.stop_event.is_set():
            self.reconcile_runs(again, now)  # the refusals changed: the runs they held are planned anew

    def _pressure_runs(self, run_dirs: Sequence[Path]) -> list[Path]:
        """The known runs a pass over `run_dirs` must take in as well, to judge disk pressure (--min-free)."""
        if self.pipeline.policy.pressure is None:
            return []
        return sorted(self.tracker.known_runs - set(run_dirs))

    def _plan(self, scanned: Sequence[tuple[Path, Run, bool]], now: float) -> RootPlan:
        runs = [run for _, run, _ in scanned]
        # What the reaper has not deleted yet is not free yet: pressure releases nothing until it has; and what
        # earlier passes freed that the filesystem does not show yet counts as free (`unseen`).
        space = self.pipeline.measure(runs, freeing=self.reaper.busy())
        space = None if space is None else self.unseen.adjust(space, runs, now)
        planned = self.pipeline.plan(runs, self._refused_outside(runs), space=space, now=now)
        self.decision_log.evaluations.warnings(self.pipeline.metric_warnings())
        if self.pipeline.policy.pressure is not None:
            self.pressure_log.planned(planned.pressure, planned.runs)
            self.pressure_waits = any(p.deferred == FREEING for p in planned.pressure)
        return planned

    def _refused_outside(self, runs: Sequence[Run]) -> set[str]:
        these = {run.path for run in runs}
        return {run for run in self.tracker.refused if run not in these}

    def _scan(self, run_dir: Path, now: float, trusting: bool) -> tuple[Run, bool] | None:
        """The run as on disk now, and whether it changed since a pass that had nothing to do; None when it
        has no checkpoint left (the run is forgotten)."""
        [run] = self.pipeline.scan([run_dir], now, self.tracker.cache, trusting, refresh_metrics=False, memo=self.memo)
        stale = self.pipeline.stale(run, now)
        self.decision_log.stale(run.path, stale)
        self.metrics.set_stale(run.path, len(stale))
        if not run.checkpoints:
            self.tracker.forget(run_dir, run.path)
            self.pipeline.forget_run(run.path)
            self.decision_log.run_gone(run.path)
            self.tracker.recheck_at.pop(run_dir, None)
            self.metrics.set_run(run.path, seen=0, kept=0)
            self.metrics.set_pinned(run.path, 0)
            return None
        return run, not self.tracker.unchanged(run_dir, run)

    def _act(self, run_dir: Path, plan: RunPlan, root_plan: RootPlan, now: float) -> bool:
        self.decision_log.planned(plan)
        [result] = self.pipeline.act(RootPlan((plan,), root_plan.refused_runs), self._on_outcome)
        self.decision_log.after(result)
        self.metrics.set_run(plan.run.path, seen=len(result.after.checkpoints), kept=len(plan.kept))
        awaiting = sum(1 for d in plan.decisions if any(r.kind is ReasonKind.AWAITING for r in d.reasons))
        self.metrics.set_awaiting(plan.run.path, awaiting)
        pinned = sum(any(r.kind is ReasonKind.PINNED for r in d.reasons) for d in plan.kept)
        self.metrics.set_pinned(plan.run.path, pinned)
        if self.tracker.record(run_dir, result, now, self.pipeline.dry_run):
            self.decision_log.finished(plan, self.pipeline.dry_run)
        return True

    def _safely(self, run_dir: Path, step: Callable[[], T]) -> T | None:
        try:
            return step()
        except PinsUnreadable as e:  # said once, without a traceback; nothing is removed until it can be read
            if self.tracker.crashed_once(run_dir, run_path(self.root, run_dir), str(e)):
                log.error("%s", e)
            return None
        except Exception as e:
            said = f"{type(e).__name__}: {e}"
            if self.tracker.crashed_once(run_dir, run_path(self.root, run_dir), said):
                log.exception(
                    "run %s could not be reconciled (%s); retried at the next pass", shown(str(run_dir)), said
                )
            return None

    def _on_outcome(self, outcome: Outcome) -> None:
        self.metrics.count(outcome)
        backoff = self.pipeline.backoff
        if backoff is not None:
            self.metrics.store.set(backoff.failures, backoff.left(time.monotonic()))
        if outcome.action.frees and (
            outcome.action is not OutcomeKind.ARCHIVED or self.unseen.archive_frees(outcome.run)
        ):
            self._freed[outcome.run] = self._freed.get(outcome.run, 0) + outcome.bytes
        if outcome.action.frees and (outcome.run, outcome.checkpoint) in self.pressure_log.released:
            self.metrics.disk.released.labels(run=outcome.run).inc()
        self.decision_log.outcome(outcome)

    def refused_runs(self) -> list[str]:
        return self.tracker.refused_runs({run_path(self.root, r) for r in self.tracker.known_runs})

    def all_done(self) -> bool:
        """Every run finished and pruned, and nothing left to delete: a removal that keeps failing (in a run
        or in the trash) holds the exit until it goes through."""
        runs = {run_path(self.root, r) for r in self.tracker.known_runs}
        settled = self.reaper.queue.unfinished_tasks == 0 and not self.reaper.stuck and not self.decision_log.failing
        return bool(runs) and runs <= self.tracker.finished_runs and settled
