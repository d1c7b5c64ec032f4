"""The decision log: what the watch daemon tells its log about plans and outcomes, each thing once.

A daemon sees the same checkpoints at every pass; this remembers what it said already (each checkpoint's
decision, a refusal, a directory that mixes runs, future file times, a failing removal) and says only
what changed. Words come from `render`; nothing here acts.
"""

from __future__ import annotations

import logging
import time

from ckptkeeper.model import Action, Decision, Outcome, OutcomeKind, Reason, ReasonKind, RunPlan, RunResult
from ckptkeeper.render import (
    location,
    mixed_runs_text,
    past,
    reason_text,
    reasons_text,
    shown,
    weights_only_resume_text,
)
from ckptkeeper.units import human_bytes

log = logging.getLogger("ckptkeeper")


class DecisionLog:
    """Owned by the daemon's main loop: every method runs there."""

    def __init__(self, settle: float) -> None:
        self.settle = settle
        self.decisions: dict[str, dict[str, str]] = {}  # run -> checkpoint -> the decision last logged
        # run -> checkpoint -> the decision and reasons last said at INFO (kept checkpoints)
        self.announced: dict[str, dict[str, tuple[str, tuple[Reason, ...]]]] = {}
        self.refusals: dict[str, str] = {}  # run -> why its retention is refused (or held), as last logged
        self.mixed_runs_said: dict[str, tuple[str, ...]] = {}  # run -> the stale checkpoints last warned about
        self.skew_said: set[tuple[str, str]] = set()  # checkpoints whose future file times were logged
        self.dry_run_said: set[tuple[str, str]] = set()  # `would delete` lines of a dry run
        # run -> the weights-only resume point last warned of
        self.resume_said: dict[str, str | None] = {}
        self.failing: dict[tuple[str, str], str] = {}  # removals that failed, and the error last logged

    def forget_root(self) -> None:
        """The root was made anew: what was said of the old one's checkpoints says nothing of these."""
        self.decisions.clear()
        self.announced.clear()
        self.mixed_runs_said.clear()

    # ---- plans -------------------------------------------------------------------------------------------------
    def planned(self, plan: RunPlan) -> None:
        self._refusal(plan)
        self._times_in_future(plan)
        self._mixed_runs(plan)
        self._weights_only_resume(plan)
        logged = self.decisions.setdefault(plan.run.path, {})
        announced = self.announced.setdefault(plan.run.path, {})
        for d in plan.decisions:
            word, name = _decision_word(d), d.checkpoint.name
            if logged.get(name) == word:
                continue
            logged[name] = word
            where = location(plan.run.path, name)
            if not d.kept:
                continue
            if not d.checkpoint.complete:
                log.debug("%s %s: %s", where, word, reasons_text(d.reasons))
            elif announced.get(name) != (word, d.reasons):
                # Said once: not again after it was briefly settling (a slim, a file touched) and is the same.
                announced[name] = (word, d.reasons)
                log.info("%s %s: %s", where, word, reasons_text(d.reasons))

    def _refusal(self, plan: RunPlan) -> None:
        run = plan.run.path
        why = plan.refusal or _held(plan)
        if why is None:
            self.refusals.pop(run, None)
            return
        if self.refusals.get(run) != why:
            if plan.refusal:
                log.error("run %s: refused, nothing is removed there: %s", shown(run), plan.refusal)
            else:
                log.warning("run %s: nothing is removed there: %s", shown(run), why)
        self.refusals[run] = why

    def _weights_only_resume(self, plan: RunPlan) -> None:
        """Say once per run (again if it becomes another checkpoint) that its resume point is weights-only."""
        run = plan.run.path
        resume = plan.weights_only_resume
        name = resume.name if resume is not None else None
        if resume is not None and self.resume_said.get(run) != name:
            log.warning("run %s: %s", shown(run), weights_only_resume_text(resume))
        self.resume_said[run] = name

    def _mixed_runs(self, plan: RunPlan) -> None:
        """Say once per run that its directory mixes runs (again only if the stale checkpoints change), and
        once that it no longer does. A warning only: the planner already protects the newest written one."""
        said = self.mixed_runs_said
        run = plan.run.path
        if plan.mixed_runs is None:
            if said.pop(run, None) is not None:
                log.info("run %s: the directory no longer mixes runs", shown(run))
            return
        stale = tuple(c.name for c in plan.mixed_runs.stale)
        if said.get(run) != stale:
            said[run] = stale
            log.warning("run %s: %s", shown(run), mixed_runs_text(plan.mixed_runs))

    def _times_in_future(self, plan: RunPlan) -> None:
        """Say once per checkpoint that its file times lie in the future: it settles by what the daemon
        itself sees unchanged instead, and the clocks of the writer and this machine disagree."""
        for c in plan.run.checkpoints:
            key = (plan.run.path, c.name)
            if c.times_in_future and key not in self.skew_said:
                self.skew_said.add(key)
                log.warning(
                    "%s: its file times lie %.0f s in the future (the writer's clock is ahead of this machine's?); "
                    "it counts as settled once seen unchanged for %g s",
                    location(plan.run.path, c.name),
                    c.last_change - time.time(),
                    self.settle,
                )

    # ---- outcomes ----------------------------------------------------------------------------------------------
    def outcome(self, outcome: Outcome) -> None:
        where = location(outcome.run, outcome.checkpoint)
        key = (outcome.run, outcome.checkpoint)
        kind = outcome.action
        if kind is not OutcomeKind.ERROR and self.failing.pop(key, None) is not None:
            log.info("%s: the removal that failed before went through", where)
        if kind is OutcomeKind.DELETED:
            log.info("%s deleted: freed %s", where, human_bytes(outcome.bytes))
        elif kind is OutcomeKind.ARCHIVED:
            log.info("%s archived: %s, %s", where, outcome.detail, human_bytes(outcome.bytes))
        elif kind is OutcomeKind.SLIMMED:
            log.info("%s made weights only: %s, freed %s", where, outcome.detail, human_bytes(outcome.bytes))
        elif kind in (OutcomeKind.WOULD_DELETE, OutcomeKind.WOULD_ARCHIVE, OutcomeKind.WOULD_SLIM):
            if key not in self.dry_run_said:  # a dry run sees the same checkpoint at every pass: say it once
                self.dry_run_said.add(key)
                log.info("%s %s (dry run)", where, past(kind))
        elif kind is OutcomeKind.ERROR:
            self._failed(where, key, outcome.detail)
        else:
            log.info("%s %s: %s", where, kind, outcome.detail)

    def _failed(self, where: str, key: tuple[str, str], detail: str) -> None:
        """Retried at every pass until it works, but said once (again only if the reason changes)."""
        if self.failing.get(key) != detail:
            log.error("%s could not be removed: %s (will retry at every rescan)", where, detail)
        else:
            log.debug("%s still cannot be removed: %s", where, detail)
        self.failing[key] = detail

    def after(self, result: RunResult) -> None:
        """Forget what was said of checkpoints that are gone."""
        run = result.after.path
        names = {c.name for c in result.after.checkpoints}
        for said in (self.decisions.get(run, {}), self.announced.get(run, {})):
            for name in said.keys() - names:
                del said[name]
        for key in [k for k in self.failing if k[0] == run and k[1] not in names]:
            del self.failing[key]

    def finished(self, plan: RunPlan, dry_run: bool) -> None:
        run = shown(plan.run.path)
        if plan.refusal:
            log.error("run %s: training finished, but its retention was refused: nothing is removed there", run)
        elif _held(plan):
            log.error("run %s: training finished, but %s", run, _held(plan))
        elif dry_run:
            log.info("run %s: training finished (dry run: nothing was removed)", run)
        else:
            log.info("run %s: training finished and its retention is applied", run)


def _held(plan: RunPlan) -> str | None:
    """Why this run's removals are held (retention refused in another run of the root), if they are."""
    for d in plan.decisions:
        for reason in d.reasons:
            if reason.kind is ReasonKind.HELD:
                return reason_text(reason)
    return None


def _decision_word(d: Decision) -> str:
    if d.action is Action.WEIGHTS_ONLY:
        return "kept weights only"
    if d.kept:
        return "kept" if d.checkpoint.complete else "waiting"
    return str(d.action)
