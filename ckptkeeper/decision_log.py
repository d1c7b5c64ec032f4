"""The decision log: what the watch daemon tells its log about plans and outcomes, each thing once.

A daemon sees the same checkpoints at every pass; this remembers what it said already (each checkpoint's
decision, a refusal, a directory that mixes runs, future file times, a failing removal) and says only
what changed. Words come from `render`; nothing here acts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ckptkeeper.evaluation_log import EvaluationLog
from ckptkeeper.logs import event
from ckptkeeper.model import Action, Decision, Outcome, OutcomeKind, Reason, ReasonKind, RunPlan, RunResult, Stale
from ckptkeeper.render import (
    location,
    mixed_runs_text,
    past,
    reason_text,
    reason_texts,
    reasons_text,
    run_name,
    shown,
    stale_text,
    weights_only_resume_text,
)
from ckptkeeper.units import human_bytes

log = logging.getLogger("ckptkeeper")

# Reasons every newest checkpoint has, or that come and go for the whole run at once (a refusal is logged per
# run): a checkpoint gaining or losing one of these is not news of that checkpoint.
_PASSING = {
    ReasonKind.NEWEST,
    ReasonKind.NEWEST_WRITTEN,
    ReasonKind.NEWEST_WRITTEN_SKEWED,
    ReasonKind.REFUSED,
    ReasonKind.HELD,
}
Identity = tuple[ReasonKind, str | None, str | None, bool]


def _identity(r: Reason) -> Identity:
    """A reason regardless of its rank: `last 2/5` and `last 3/5` are the same reason to keep a checkpoint."""
    return (r.kind, r.rule, r.detail if r.kind is ReasonKind.EPOCH else None, r.weights_only)


def _identities(reasons: tuple[Reason, ...]) -> frozenset[Identity]:
    return frozenset(_identity(r) for r in reasons if r.kind not in _PASSING)


def kept_text(reasons: tuple[Reason, ...]) -> str:
    """The reasons of a kept checkpoint, with what every newest checkpoint has said as one word:
    `newest, epoch 3` rather than `last 1/5, epoch 3, protected: newest`."""
    if not any(r.kind is ReasonKind.NEWEST for r in reasons):
        return reasons_text(reasons)
    rest = [r for r in reasons if r.kind is not ReasonKind.NEWEST and not (r.kind is ReasonKind.LAST and r.rank == 1)]
    return shown(", ".join(["newest", *reason_texts(rest)]))


@dataclass(frozen=True)
class Said:
    """What the log last said of a kept, complete checkpoint: its decision word and reasons."""

    word: str
    reasons: tuple[Reason, ...]
    step: int


class DecisionLog:
    """Owned by the daemon's main loop: every method runs there. `root` names the root's own run."""

    def __init__(self, settle: float, root: str = ".") -> None:
        self.settle = settle
        self.root = root
        self.decisions: dict[str, dict[str, str]] = {}  # run -> checkpoint -> the decision last logged
        self.said: dict[str, dict[str, Said]] = {}  # run -> checkpoint -> what was said of it, kept
        self.leaving: set[tuple[str, str]] = set()  # kept once, now planned for removal (not gone yet)
        self.refusals: dict[str, str] = {}  # run -> why its retention is refused (or held), as last logged
        self.mixed_runs_said: dict[str, tuple[str, ...]] = {}  # run -> the stale checkpoints last warned about
        self.skew_said: set[tuple[str, str]] = set()  # checkpoints whose future file times were logged
        self.dry_run_said: set[tuple[str, str]] = set()  # `would delete` lines of a dry run
        self.stale_said: set[tuple[str, str, float]] = set()  # stale incomplete checkpoints, by their last change
        # run -> the weights-only resume point last warned of
        self.resume_said: dict[str, str | None] = {}
        self.failing: dict[tuple[str, str], str] = {}  # removals that failed, and the error last logged
        self.evaluations = EvaluationLog(self._where)  # what evaluation jobs' results bring (`--metric`, `--await`)

    def forget_root(self) -> None:
        """The root was made anew: what was said of the old one's checkpoints says nothing of these."""
        self.decisions.clear()
        self.said.clear()
        self.leaving.clear()
        self.mixed_runs_said.clear()

    def _where(self, run: str, checkpoint: str) -> str:
        return location(run, checkpoint, self.root)

    def _run(self, run: str) -> str:
        return run_name(run, self.root)

    # ---- plans -------------------------------------------------------------------------------------------------
    def planned(self, plan: RunPlan) -> None:
        self.evaluations.overdue(plan)
        self._refusal(plan)
        self._times_in_future(plan)
        self._mixed_runs(plan)
        self._weights_only_resume(plan)
        logged = self.decisions.setdefault(plan.run.path, {})
        for d in plan.decisions:
            word = _decision_word(d)
            key = (plan.run.path, d.checkpoint.name)
            if not d.kept:
                logged[d.checkpoint.name] = word
                self.leaving.add(key)
                continue  # the outcome's line says it, with its reasons
            self.leaving.discard(key)
            if not d.checkpoint.complete:
                if logged.get(d.checkpoint.name) != word:
                    log.debug("%s %s: %s", self._where(plan.run.path, d.checkpoint.name), word, reasons_text(d.reasons))
            else:
                self._kept(plan.run.path, d, word)
            logged[d.checkpoint.name] = word

    def _kept(self, run: str, d: Decision, word: str) -> None:
        """A complete checkpoint kept: said once when first seen, again only when it gains or loses a reason
        (the best moved on), never for a new rank or for losing what every newest checkpoint has."""
        said = self.said.setdefault(run, {})
        name, before = d.checkpoint.name, said.get(d.checkpoint.name)
        if d.slims and before is not None:
            return  # being made weights only: its outcome's line says so, and what it was kept for until now
        said[name] = Said(word, d.reasons, d.checkpoint.step)
        where = self._where(run, name)
        fields = event(word.replace(" ", "-"), run, name, d.checkpoint.step, reasons=d.reasons)
        if before is None:
            log.info("%s %s: %s", where, word, kept_text(d.reasons), extra=fields)
            return
        if before.word == word and _identities(before.reasons) == _identities(d.reasons):
            return
        lost = [r for r in before.reasons if r.kind not in _PASSING and _identity(r) not in _identities(d.reasons)]
        gained = [r for r in d.reasons if r.kind not in _PASSING and _identity(r) not in _identities(before.reasons)]
        changes = ([f"no longer {reasons_text(tuple(lost))}"] if lost else []) + (
            [f"now {reasons_text(tuple(gained))}"] if gained else []
        )
        change = f" ({'; '.join(changes)})" if changes else ""
        log.info("%s still %s: %s%s", where, word, kept_text(d.reasons), change, extra=fields)

    def _refusal(self, plan: RunPlan) -> None:
        run = plan.run.path
        why = plan.refusal or _held(plan)
        if why is None:
            self.refusals.pop(run, None)
            return
        if self.refusals.get(run) != why:
            if plan.refusal:
                log.error("run %s: refused, nothing is removed there: %s", self._run(run), shown(plan.refusal))
            else:
                log.warning("run %s: nothing is removed there: %s", self._run(run), shown(why))
        self.refusals[run] = why

    def _weights_only_resume(self, plan: RunPlan) -> None:
        """Say once per run (again if it becomes another checkpoint) that its resume point is weights-only."""
        run = plan.run.path
        resume = plan.weights_only_resume
        name = resume.name if resume is not None else None
        if resume is not None and self.resume_said.get(run) != name:
            log.warning("run %s: %s", self._run(run), weights_only_resume_text(resume))
        self.resume_said[run] = name

    def _mixed_runs(self, plan: RunPlan) -> None:
        """Say once per run that its directory mixes runs (again only if the stale checkpoints change), and
        once that it no longer does. A warning only: the planner already protects the newest written one."""
        said = self.mixed_runs_said
        run = plan.run.path
        if plan.mixed_runs is None:
            if said.pop(run, None) is not None:
                log.info("run %s: the directory no longer mixes runs", self._run(run))
            return
        stale = tuple(c.name for c in plan.mixed_runs.stale)
        if said.get(run) != stale:
            said[run] = stale
            log.warning("run %s: %s", self._run(run), mixed_runs_text(plan.mixed_runs))

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
                    self._where(plan.run.path, c.name),
                    c.last_change - time.time(),
                    self.settle,
                )

    def stale(self, run: str, stale: Sequence[Stale]) -> None:
        """Say once of each incomplete checkpoint that it has been unchanged for longer than --stale-after
        (again if it changes and goes stale anew)."""
        for s in stale:
            key = (run, s.checkpoint.name, s.checkpoint.last_change)
            if key not in self.stale_said:
                self.stale_said.add(key)
                fields = event("stale-incomplete", run, s.checkpoint.name, s.checkpoint.step)
                log.warning("run %s: %s", self._run(run), stale_text(s), extra=fields)
        names = {s.checkpoint.name for s in stale}
        self.stale_said = {k for k in self.stale_said if k[0] != run or k[1] in names}

    # ---- outcomes ----------------------------------------------------------------------------------------------
    def outcome(self, outcome: Outcome) -> None:
        where = self._where(outcome.run, outcome.checkpoint)
        key = (outcome.run, outcome.checkpoint)
        kind = outcome.action
        fields = event(str(kind), outcome.run, outcome.checkpoint, outcome.step, outcome.bytes, outcome.reasons)
        if kind is not OutcomeKind.ERROR and self.failing.pop(key, None) is not None:
            log.info("%s: the removal that failed before went through", where)
        why = self._why(outcome)
        if kind is OutcomeKind.DELETED:
            log.info("%s deleted: freed %s (%s)", where, human_bytes(outcome.bytes), why, extra=fields)
        elif kind is OutcomeKind.ARCHIVED:
            size = human_bytes(outcome.bytes) if outcome.moved else f"freed {human_bytes(outcome.bytes)}"
            log.info("%s archived: %s, %s (%s)", where, shown(outcome.detail), size, why, extra=fields)
        elif kind is OutcomeKind.SLIMMED:
            freed = human_bytes(outcome.bytes)
            log.info("%s made weights only: %s, freed %s (%s)", where, shown(outcome.detail), freed, why, extra=fields)
            self.said.setdefault(outcome.run, {})[outcome.checkpoint] = Said(
                SLIMMED_WORD, outcome.reasons, outcome.step or 0
            )
        elif kind in (OutcomeKind.WOULD_DELETE, OutcomeKind.WOULD_ARCHIVE, OutcomeKind.WOULD_SLIM):
            if key not in self.dry_run_said:  # a dry run sees the same checkpoint at every pass: say it once
                self.dry_run_said.add(key)
                log.info("%s %s (dry run; %s)", where, past(kind), why, extra=fields)
        elif kind is OutcomeKind.ERROR:
            self._failed(where, key, outcome.detail, fields)
        elif kind is OutcomeKind.STOPPED:  # the daemon's one `stopped` line comes last
            log.info("%s: cut short by the stop (%s)", where, shown(outcome.detail), extra=fields)
        else:
            log.info("%s %s: %s", where, kind, shown(outcome.detail), extra=fields)

    def _why(self, outcome: Outcome) -> str:
        """Why it went: the plan's reasons, and what kept it until now (`no rule keeps it; was last 5/5`).
        A release under disk pressure says what it was kept for already."""
        why = reasons_text(outcome.reasons) or "no reason recorded"
        said = self.said.get(outcome.run, {}).get(outcome.checkpoint)
        was = "" if said is None else kept_text(said.reasons)
        if not was or was == why or any(r.released for r in outcome.reasons):
            return why  # a release under pressure says already what it was kept for
        return f"{why}; was {was}"

    def _failed(self, where: str, key: tuple[str, str], detail: str, fields: dict[str, object]) -> None:
        """Retried at every pass until it works, but said once (again only if the reason changes)."""
        if self.failing.get(key) != detail:
            store_down = detail.startswith("cannot archive to ") and "://" in detail.split(": ", 1)[0]
            when = "the store is tried again at a growing interval" if store_down else "will retry at every rescan"
            log.error("%s could not be removed: %s (%s)", where, shown(detail), when, extra=fields)
        else:
            log.debug("%s still cannot be removed: %s", where, shown(detail))
        self.failing[key] = detail

    def after(self, result: RunResult) -> None:
        """Say which checkpoints someone else removed; forget what was said of checkpoints that are gone."""
        run = result.after.path
        names = {c.name for c in result.after.checkpoints}
        ours = {o.checkpoint for o in result.outcomes}
        self._vanished(run, names | ours)
        for said in (self.decisions.get(run, {}), self.said.get(run, {})):
            for name in said.keys() - names:
                del said[name]
        for key in [k for k in self.failing if k[0] == run and k[1] not in names]:
            del self.failing[key]
        self.leaving -= {(run, name) for name in ours - names}

    def run_gone(self, run: str) -> None:
        """The run has no checkpoint left (its directory removed or emptied by someone else)."""
        self._vanished(run, set())
        self.decisions.pop(run, None)
        self.said.pop(run, None)

    def _vanished(self, run: str, present: set[str]) -> None:
        for name, said in sorted(self.said.get(run, {}).items()):
            if name in present:
                continue
            fields = event(str(OutcomeKind.VANISHED), run, name, said.step, reasons=said.reasons)
            if (run, name) in self.leaving:  # no longer kept: "was" would claim what it is not
                log.info("%s vanished: removed by something else first", self._where(run, name), extra=fields)
            else:
                log.info(
                    "%s vanished: removed by something else (was %s)", self._where(run, name),
                    kept_text(said.reasons), extra=fields,
                )  # fmt: skip
            self.leaving.discard((run, name))

    def finished(self, plan: RunPlan, dry_run: bool) -> None:
        run = self._run(plan.run.path)
        fields = event("finished", plan.run.path)
        if plan.refusal:
            log.error("run %s: training finished, but its retention was refused: nothing is removed there", run)
        elif _held(plan):
            log.error("run %s: training finished, but %s", run, _held(plan))
        elif dry_run:
            log.info("run %s: training finished (dry run: nothing was removed)", run, extra=fields)
        else:
            log.info("run %s: training finished and its retention is applied", run, extra=fields)


def _held(plan: RunPlan) -> str | None:
    """Why this run's removals are held (retention refused in another run of the root), if they are."""
    for d in plan.decisions:
        for reason in d.reasons:
            if reason.kind is ReasonKind.HELD:
                return reason_text(reason)
    return None


SLIMMED_WORD = "kept weights only"


def _decision_word(d: Decision) -> str:
    if d.action is Action.WEIGHTS_ONLY:
        return SLIMMED_WORD
    if d.kept:
        return "kept" if d.checkpoint.complete else "waiting"
    return str(d.action)
