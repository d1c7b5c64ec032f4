"""The pipeline: lock, leftovers, scan, plan, act, journal, release, for `prune` and each pass of `watch`.

`Pipeline` is the one place where these steps are put together. `prune` runs them once over every run
(`Pipeline.prune`); the watch daemon runs `scan`, `plan` and `act` for the runs an event touched, and
gets back a `RunResult` per run (the plan, what became of each removal, the run as it is on disk after),
so it never scans or plans again to find out. `plan` surveys without the lock (`Pipeline.survey`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ckptkeeper import pins
from ckptkeeper.actions import (
    RUN_TRASH_NAME,
    ActionError,
    Changed,
    Dispose,
    StopCheck,
    Stopped,
    TrashEntry,
    Vanished,
    empty_trash,
    open_run_dir,
    trash_failure,
)
from ckptkeeper.layout import Layout, LayoutError, default_state_dir
from ckptkeeper.metric_sources import MetricSources
from ckptkeeper.model import (
    Action,
    Checkpoint,
    Decision,
    Outcome,
    OutcomeKind,
    Pin,
    Run,
    RunPlan,
    RunResult,
    Stale,
)
from ckptkeeper.paths import identity
from ckptkeeper.policy import NO_RULE, PlanInputs, Policy, RootPlan, plan_root
from ckptkeeper.pressure import Disk, Space
from ckptkeeper.reaper import ARCHIVE_DELETER_THREADS, DELETER_THREADS, Deleters, Deleting
from ckptkeeper.recheck import recheck
from ckptkeeper.removals import Archival, Deletion, ProgressFactory, Removal, Slimming, StoreArchival
from ckptkeeper.render import journal_reasons
from ckptkeeper.rules import format_rules
from ckptkeeper.scan import (
    ContentCache,
    ContentsMemo,
    ScanOptions,
    find_run_dirs,
    read_run,
    run_path,
)
from ckptkeeper.stale import stale_checkpoints
from ckptkeeper.state import StateDir

if TYPE_CHECKING:  # imported when an object store is used: plan and prune of local paths start without it
    from ckptkeeper.destination import Backoff, ObjectStore
    from ckptkeeper.scan_memo import ScanMemo

Identity = tuple[int, int]
OnOutcome = Callable[[Outcome], None]


class RetentionRefused(Exception):
    """Retention cannot start at all (no keep rule given); the message says why."""


class NotSupported(ValueError):
    """Settings that cannot be used together (yet); the message says which."""


def require_rules(policy: Policy) -> None:
    """Retention starts only with a rule: `--keep` or `--keep-weights` (SPEC "Refusals")."""
    if not policy.rules and not policy.weight_rules:
        raise RetentionRefused(NO_RULE)


class StateDirUnusable(Exception):
    """The state directory cannot be made or written (a read-only root); the message says which and why."""


class PinsUnreadable(StateDirUnusable):
    """The pins file cannot be read: nothing is removed while it cannot (a pin in it would be lost)."""


PINS_UNREADABLE = "nothing is removed until it can be read (fix it, or remove it to drop every pin)"


def pinned_since_plan(pin: Pin) -> str:
    """The detail of a removal a pin stopped: pinned after the plan was made."""
    note = f": {json.dumps(pin.note, ensure_ascii=False)}" if pin.note else ""
    return f"pinned since the plan was made{note}; kept"


@dataclass(frozen=True)
class Leftovers:
    """What an earlier, interrupted instance left in the trash: finished now, or stuck (retried next start)."""

    finished: tuple[str, ...] = ()
    stuck: tuple[str, ...] = ()


@dataclass(frozen=True)
class PassResult:
    """One whole pass over a root (`prune`, `plan`)."""

    plan: RootPlan
    results: tuple[RunResult, ...] = ()
    warnings: tuple[str, ...] = ()
    leftovers: Leftovers = Leftovers()

    @property
    def outcomes(self) -> list[Outcome]:
        return [o for r in self.results for o in r.outcomes]

    @property
    def removed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.action.removed]

    @property
    def errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.action is OutcomeKind.ERROR]


class PruneReport(Protocol):
    """What a `prune` tells its user as it goes (`render.TextPruneReport` prints it)."""

    def leftovers(self, leftovers: Leftovers) -> None: ...

    def planned(self, plan: RootPlan, warnings: Sequence[str]) -> None: ...

    def outcome(self, outcome: Outcome) -> None: ...


DEFAULT_SCAN = ScanOptions()
KEEP_WEIGHTS_AND_ARCHIVE = (
    "--keep-weights cannot be combined with --archive-to yet: the resume state would be deleted, not archived"
)


class Pipeline:
    """Retention of one root. Owned by one thread: the CLI command's, or the watch daemon's main loop.

    `dry_run`: nothing is written (no lock, no journal, no trash); removals become `would-*` outcomes.
    `dispose` takes over deleting trash entries (the daemon's reaper thread); by default it is inline.
    `stop` is asked before every action and during a copy: once it says so, no new action starts."""

    def __init__(
        self,
        layout: Layout,
        policy: Policy,
        scan: ScanOptions = DEFAULT_SCAN,
        *,
        dry_run: bool = False,
        dispose: Dispose | None = None,
        stop: StopCheck | None = None,
    ) -> None:
        require_rules(policy)
        if policy.weight_rules and layout.archive is not None:
            raise NotSupported(KEEP_WEIGHTS_AND_ARCHIVE)
        if (policy.removal is Action.ARCHIVE) != (layout.archive is not None):
            raise ValueError("a policy that archives needs an archive in the layout, and only then")
        self.layout = layout
        self.policy = policy
        self.scan_options = scan
        self.dry_run = dry_run
        self.dispose = dispose
        self.stop = stop
        self.state = StateDir(layout.state_dir)
        self.metric_sources = MetricSources(scan.metrics, layout.root) if scan.metrics else None
        self.store: ObjectStore | None = None
        self.backoff: Backoff | None = None
        if layout.archive_url:
            from ckptkeeper.destination import Backoff, ObjectStore

            self.store, self.backoff = ObjectStore(layout.archive_url, dict(layout.archive_options)), Backoff()
        self.progress: ProgressFactory | None = None  # told how each upload to an object store goes
        # The root's (device, inode) when its lock was taken: a root that is another directory now (a link on
        # its path changed) is never acted in. Until then, the root as found now.
        self.root_identity: Identity | None = None
        self._rules_for: Policy | None = None  # the policy `_rules` was written for
        self._rules = ""

    @classmethod
    def checked(
        cls,
        root: Path,
        policy: Policy,
        scan: ScanOptions = DEFAULT_SCAN,
        state_dir: Path | None = None,
        archive_to: Path | str | None = None,
        *,
        dry_run: bool = False,
        dispose: Dispose | None = None,
        stop: StopCheck | None = None,
        archive_options: tuple[tuple[str, Any], ...] = (),
    ) -> Pipeline:
        """The pipeline for these paths, once every rule between them holds (LayoutError otherwise)."""
        if not root.exists():
            raise LayoutError(f"root {root} does not exist")
        if not root.is_dir():
            raise LayoutError(f"root {root} is not a directory")
        require_rules(policy)  # before the layout's checks, as the commands always said it
        layout = Layout.checked(root, state_dir, archive_to, archive_options)
        return cls(layout, policy, scan, dry_run=dry_run, dispose=dispose, stop=stop)

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def excluded(self) -> list[Path]:
        """ckptkeeper's own directories, never scanned as runs."""
        own = [self.layout.state_dir, *([self.layout.archive_dir] if self.layout.archive_dir else [])]
        return own + (self.metric_sources.directories if self.metric_sources is not None else [])

    # ---- lock and leftovers -----------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the root's lock (LockHeld if another instance has it; OSError if the state directory cannot
        be used). A dry run takes none: it writes nothing, not even the state directory."""
        if not self.dry_run:
            self.state.acquire_lock(self.root)
        self.root_identity = identity(self.root)

    def release(self) -> None:
        self.state.release_lock()

    def recheck_layout(self) -> None:
        """The root was deleted and made again: check the paths anew, and let go of the old root's lock."""
        self.state.close()
        layout = self.layout
        self.layout = Layout.checked(self.root, layout.state_dir, layout.archive, layout.archive_options)

    def finish_leftovers(self, run_dirs: Sequence[Path]) -> Leftovers:
        """Complete removals an earlier, interrupted instance left in the trash (journaled)."""
        if self.dry_run:
            return Leftovers()
        stuck: list[str] = []
        finished = finish_leftovers(self.root, self.state, run_dirs, stuck)
        return Leftovers(tuple(finished), tuple(stuck))

    # ---- scan, plan, act ---------------------------------------------------------------------------------
    def find_runs(self, top: Path | None = None, warnings: list[str] | None = None) -> list[Path]:
        """The run directories below `top` (default: the root), not below ckptkeeper's own directories."""
        top = self.root if top is None else top
        depth = len(top.relative_to(self.root).parts)
        if depth > self.scan_options.max_depth or not top.is_dir() or top.is_symlink():
            return []
        found = warnings if warnings is not None else []
        return find_run_dirs(top, self.scan_options.max_depth - depth, self.excluded, found)

    def scan(
        self,
        run_dirs: Sequence[Path],
        now: float | None,
        cache: ContentCache | None = None,
        trusting: bool = False,
        refresh_metrics: bool = True,
        memo: ContentsMemo | None = None,
    ) -> list[Run]:
        """Read each run directory (`now` makes --settle apply; `cache`/`trusting` as in ContentCache), with the
        named metrics joined, from their sources as they are now (or, without `refresh_metrics`, as they were at
        the caller's last `refresh_metric_sources`: the daemon looks once per pass, then scans run by run)."""
        settle = self.scan_options.settle
        evaluations = frozenset(m.location for m in self.scan_options.metrics if m.kind == "file")
        runs = [read_run(self.root, d, now, settle, cache, trusting, evaluations, memo) for d in run_dirs]
        if self.metric_sources is None:
            return runs
        dirs = {run.path: os.fspath(d) for run, d in zip(runs, run_dirs, strict=True)}
        if refresh_metrics:
            self.metric_sources.refresh(dirs)
        return self.metric_sources.attach(runs, dirs)

    def refresh_metric_sources(self, run_dirs: Sequence[Path] = ()) -> None:
        """Look at the metric sources once for a pass over the runs in `run_dirs` (every run of the root)."""
        if self.metric_sources is not None:
            self.metric_sources.refresh({run_path(self.root, d): os.fspath(d) for d in run_dirs})

    def forget_run(self, run: str) -> None:
        """A run that is gone (the daemon forgets it)."""
        if self.metric_sources is not None:
            self.metric_sources.forget(run)

    def metric_warnings(self) -> list[str]:
        """What the last scan could not tie to a checkpoint (results files of paths outside the root...)."""
        return list(self.metric_sources.warnings) if self.metric_sources is not None else []

    def plan(
        self,
        runs: Sequence[Run],
        refused_elsewhere: Collection[str] = (),
        space: Space | None = None,
        now: float | None = None,
    ) -> RootPlan:
        """Plan the runs together; with --min-free, on their filesystems' figures (`space`: as the caller measured
        and adjusted them; by default measured now). With `now`, each run's stale incomplete checkpoints are
        reported in its plan."""
        space = space if space is not None else self.measure(runs)
        planned = plan_root(runs, self.policy, refused_elsewhere, space, PlanInputs(now, self.pins()))
        if now is None:
            return planned
        return replace(planned, runs=tuple(replace(p, stale=self.stale(p.run, now)) for p in planned.runs))

    def pins(self) -> tuple[Pin, ...]:
        """The root's pins, as the state directory holds them now, one per checkpoint (read without a lock: the
        engine reads them again under the pins lock before each removal). PinsUnreadable when they cannot be
        read: nothing is removed then, since a pin in them would be lost."""
        try:
            return pins.effective(pins.read_pins(self.layout.state_dir))
        except pins.PinsError as e:
            raise PinsUnreadable(f"{e}; {PINS_UNREADABLE}") from None

    def stale(self, run: Run, now: float) -> tuple[Stale, ...]:
        """The run's incomplete checkpoints unchanged for longer than --stale-after (and than --settle: one
        still settling is not stale, however short --stale-after is)."""
        return stale_checkpoints(run, now, max(self.scan_options.stale_after, self.scan_options.settle))

    def measure(self, runs: Sequence[Run], freeing: bool = False) -> Space | None:
        """The free space of each filesystem holding one of these runs (None without --min-free). A run
        directory is reached as a removal reaches it, without following links; one that cannot be reached
        has no figures (and nothing of it is released)."""
        if self.policy.pressure is None:
            return None
        disks: dict[int, Disk] = {}
        devices: dict[str, int] = {}
        for run in sorted(runs, key=lambda r: r.path):  # a filesystem is named by the first run path on it
            run_dir = self.root / run.path if run.path != "." else self.root
            measured = _measure(self.root, run_dir, self.root_identity)
            if measured is None:
                continue
            devices[run.path] = measured.device
            disks.setdefault(measured.device, measured)
        return Space(disks, devices, self._archive_device(), time.time(), freeing)

    def archive_moves(self) -> bool:
        """--archive-to lies on the root's filesystem: archiving is one rename there and frees no space."""
        device = self._archive_device()
        return device is not None and self.root_identity is not None and device == self.root_identity[0]

    def _archive_device(self) -> int | None:
        """The device --archive-to lies on (its nearest existing directory: it may not be made yet)."""
        where = self.layout.archive_dir
        while where is not None:
            found = identity(where)
            if found is not None:
                return found[0]
            where = None if where.parent == where else where.parent
        return None

    def act(self, plan: RootPlan, on_outcome: OnOutcome = lambda _: None) -> tuple[RunResult, ...]:
        """Carry out every removal of the plan (oldest first per run), journaled; one result per run.

        Without a `dispose` of its own (prune, not the daemon), each trash entry goes to `Deleters`: a few
        threads delete it while this one re-checks and renames the next checkpoints. Each outcome is still
        told in plan order, once its trash entry is deleted, and a trash entry that could not be deleted is
        an error as it was when deleted inline. All are deleted (or given up on) before this returns; an
        exception (Ctrl-C) stops the deleters between two files, what is left staying in the trash."""
        if self.dispose is not None or self.dry_run:
            return self._act(plan, on_outcome)
        threads = ARCHIVE_DELETER_THREADS if self.layout.archive_dir is not None else DELETER_THREADS
        deleters = Deleters(threads)
        interrupted = True
        try:
            results = self._act(plan, on_outcome, deleters)
            interrupted = False
        finally:
            deleters.close(stop=interrupted)
        return results

    def _act(self, plan: RootPlan, on_outcome: OnOutcome, deleters: Deleters | None = None) -> tuple[RunResult, ...]:
        told = _InOrder(len(plan.runs), on_outcome, self._settled)
        for index, run_plan in enumerate(plan.runs):
            for decision in run_plan.acted_on:
                if self.stop is not None and self.stop():
                    break
                handoff = _Handoff(deleters) if deleters is not None else None
                path = self._path(run_plan.run.path, decision.checkpoint.name)
                with self.state.one_removal():
                    outcome = self._carry_out(run_plan.run.path, path, decision, handoff)
                    outcome = replace(outcome, step=decision.checkpoint.step, reasons=decision.reasons)
                    told.add(_Pending(index, outcome, path, handoff))
        told.flush(block=True)
        return tuple(_result(run_plan, told.outcomes[i]) for i, run_plan in enumerate(plan.runs))

    def _settled(self, pending: _Pending) -> Outcome:
        """The outcome of a removal once its trash entry (if the deleters had it) is deleted, journaled only now:
        the outcome line says what happened, as when the entry is deleted inline (`delete` once it is gone, an
        `error` where it could not be deleted there). Only the order of lines changes: another removal's start
        line may come between a start and its outcome (`history` pairs them by run and checkpoint)."""
        handoff = pending.handoff
        if handoff is None or handoff.deleting is None:
            return pending.outcome
        outcome, error = pending.outcome, handoff.deleting.wait()
        if error is not None:
            detail = trash_failure(pending.path, handoff.deleting.entry, error)
            outcome = replace(outcome, action=OutcomeKind.ERROR, bytes=0, detail=detail)
        return self._journaled(outcome, handoff.line)

    def _path(self, run: str, name: str) -> Path:
        return self.root / run / name if run != "." else self.root / name

    # ---- whole commands -----------------------------------------------------------------------------------
    def survey(self, now: float | None) -> PassResult:
        """Scan and plan the whole root, without the lock: what `plan` shows."""
        warnings: list[str] = []
        runs = self.scan(self.find_runs(warnings=warnings), now, memo=self.load_memo(recording=False))
        warnings += self.metric_warnings()
        return PassResult(self.plan(runs, now=now), warnings=tuple(warnings))

    def load_memo(self, recording: bool = True) -> ScanMemo:
        """What the last `prune` or `watch` read of each checkpoint (`scan_memo`); `recording`: to be saved."""
        from ckptkeeper.scan_memo import ScanMemo

        return ScanMemo.load(self.layout.state_dir, recording)

    def prune(self, now: float | None, report: PruneReport) -> PassResult:
        """One whole pass over the root under its lock: what `prune` does."""
        try:
            self.acquire()
        except OSError as e:
            # e.g. a read-only root: the lock (and later the journal and trash) cannot be written there
            raise StateDirUnusable(f"cannot use the state directory {self.layout.state_dir}: {_why(e)}") from None
        try:
            warnings: list[str] = []
            run_dirs = self.find_runs(warnings=warnings)
            leftovers = self.finish_leftovers(run_dirs)
            report.leftovers(leftovers)
            memo = self.load_memo()
            plan = self.plan(self.scan(run_dirs, now, memo=memo), now=now)
            warnings += self.metric_warnings()
            report.planned(plan, warnings)
            results = self.act(plan, report.outcome)
            if not self.dry_run:
                memo.save(self.state.dir_fd)
            return PassResult(plan, results, tuple(warnings), leftovers)
        finally:
            self.state.close()  # the lock, and the state directory's descriptors: a pass of its own

    # ---- one removal ---------------------------------------------------------------------------------------
    def _removal(self, action: Action, c: Checkpoint, handoff: _Handoff | None = None) -> Removal:
        dispose = handoff.dispose if handoff is not None else self.dispose
        through = (self.root, self.state, dispose, self.root_identity)  # `removals._Through`'s fields, in order
        if action is Action.WEIGHTS_ONLY:
            return Slimming(*through, resume_state=c.resume_state)
        if action is Action.ARCHIVE and self.store is not None and self.backoff is not None:
            return StoreArchival(
                *through, store=self.store, backoff=self.backoff, stop=self.stop, progress=self.progress
            )
        if action is Action.ARCHIVE:
            assert self.layout.archive_dir is not None
            return Archival(*through, archive_to=self.layout.archive_dir, stop=self.stop)
        return Deletion(*through)

    def _carry_out(self, run: str, path: Path, decision: Decision, handoff: _Handoff | None) -> Outcome:
        """One removal, re-checked, pin-guarded and journaled. With a `handoff` (prune's deleters), its trash entry
        is handed to them and the outcome's journal line waits in the handoff until the entry is deleted."""
        c = decision.checkpoint
        removal = self._removal(decision.action, c, handoff)
        if self.dry_run:
            return Outcome(run, c.name, OutcomeKind.would(decision.action), removal.freed(c))
        checked = self._held_back(run, c, decision.action) or recheck(self.root, self.root_identity, run, path, c)
        if isinstance(checked, Outcome):
            return checked
        entry = {
            "run": run,
            "checkpoint": c.name,
            "step": c.step,
            "bytes": removal.freed(c),
            "why": f"{journal_reasons(decision.reasons)} ({self._rules_text()})",
        }
        # A pin taken since the plan keeps it; else the removal is marked under way (`pins.guarded_removal`) before
        # it starts, so a `pin` of it from now on fails instead of succeeding on a checkpoint about to go.
        try:
            with pins.guarded_removal(self.state.dir_fd, self.state.path, run, c.name) as pin:
                if pin is not None:
                    return Outcome(run, c.name, OutcomeKind.SKIPPED, 0, pinned_since_plan(pin))
                # Written before acting, so a crash mid-removal still leaves a record of what was being done and
                # why; where the journal cannot be written, nothing is done.
                try:
                    self.state.record({"action": f"start-{removal.verb}", **entry})
                except OSError as e:
                    why = f"cannot write the journal {self._journal()}: {_why(e)}"
                    return Outcome(run, c.name, OutcomeKind.ERROR, 0, why)
                outcome = self._remove(run, path, decision, removal, checked)
        except pins.PinsError as e:
            return Outcome(run, c.name, OutcomeKind.ERROR, 0, f"{e}; {PINS_UNREADABLE}")
        return self._journaled_now_or_later(outcome, entry, handoff)

    def _journaled_now_or_later(self, outcome: Outcome, entry: dict[str, object], handoff: _Handoff | None) -> Outcome:
        if handoff is not None and handoff.deleting is not None:
            handoff.line = entry  # journaled once its trash entry is deleted (`_settled`)
            return outcome
        return self._journaled(outcome, entry)

    def _held_back(self, run: str, c: Checkpoint, action: Action) -> Outcome | None:
        """An archive to an object store that failed as a whole waits for its backoff: the same error as the
        last attempt (so the daemon says it once), no journal line, nothing sent."""
        if action is not Action.ARCHIVE or self.backoff is None or not self.backoff.left(time.monotonic()):
            return None
        return Outcome(run, c.name, OutcomeKind.ERROR, 0, self.backoff.reason)

    def check_destination(self) -> None:
        """An object store archive has its fsspec backend installed (LayoutError naming the package otherwise);
        nothing is sent to the store."""
        if self.store is None:
            return
        from ckptkeeper.destination import DestinationError

        try:
            self.store.check()
        except DestinationError as e:
            raise LayoutError(f"--archive-to {e}") from None

    def _remove(self, run: str, path: Path, decision: Decision, removal: Removal, expected: Identity | None) -> Outcome:
        """Carry out one removal; every failure is an Outcome, never an exception."""
        c = decision.checkpoint
        try:
            detail = removal.remove(run, path, expected)
            return Outcome(run, c.name, removal.done, removal.freed(c), detail)
        except Vanished:
            return Outcome(run, c.name, OutcomeKind.VANISHED, 0, "removed by someone else while ckptkeeper worked")
        except Changed as e:
            return Outcome(run, c.name, OutcomeKind.SKIPPED, 0, str(e))
        except Stopped as e:
            return Outcome(run, c.name, OutcomeKind.STOPPED, 0, str(e))
        except ActionError as e:
            return Outcome(run, c.name, OutcomeKind.ERROR, 0, str(e))
        except OSError as e:  # not foreseen by the action: still one checkpoint's failure, never the pass's
            return Outcome(run, c.name, OutcomeKind.ERROR, 0, f"cannot {removal.verb} {path}: {e}")

    def _journaled(self, outcome: Outcome, entry: dict[str, object]) -> Outcome:
        line = {"action": str(outcome.action), **entry, "bytes": outcome.bytes}
        try:
            self.state.record(line | ({"detail": outcome.detail} if outcome.detail else {}))
        except OSError as e:
            unrecorded = f"not journaled: cannot write {self._journal()}: {_why(e)}"
            detail = f"{outcome.detail}; {unrecorded}" if outcome.detail else unrecorded
            return replace(outcome, detail=detail)
        return outcome

    def _rules_text(self) -> str:
        """The rules as the journal gives them, made once per policy (the same for every removal of a pass)."""
        policy = self.policy
        if self._rules_for is not policy:
            self._rules_for, self._rules = policy, self._format_rules(policy)
        return self._rules

    @staticmethod
    def _format_rules(policy: Policy) -> str:
        text = f"keep {format_rules(policy.rules)}"
        if policy.weight_rules:
            text += f"; keep weights {format_rules(policy.weight_rules)}"
        if policy.pressure is not None and policy.pressure.releases:
            text += f"; under pressure keep {format_rules(policy.pressure.rules)}"
        return text

    def _journal(self) -> Path:
        return self.state.journal_path


def _measure(root: Path, run_dir: Path, root_identity: Identity | None) -> Disk | None:
    """The filesystem of a run directory reached without following links; None if it cannot be reached. A
    statfs that fails (a FUSE or network filesystem in trouble) gives no figures: nothing is released there."""
    try:
        fd = open_run_dir(root, run_dir / "-", "measure", root_identity)
    except ActionError:
        return None
    try:
        device = os.fstat(fd).st_dev
        try:
            vfs = os.fstatvfs(fd)
        except OSError:
            return Disk(device, 0, 0, str(run_dir))
        return Disk(device, vfs.f_bavail * vfs.f_frsize, vfs.f_blocks * vfs.f_frsize, str(run_dir))
    finally:
        os.close(fd)


def _why(e: OSError) -> str:
    return str(e.strerror or e)


@dataclass
class _Handoff:
    """One removal's trash entry handed to prune's deleters (this is its `dispose`), and the journal line of its
    outcome, written once the entry is deleted. Made per removal by the thread that runs `act`, which alone
    reads and writes it (the deleters see only the entry)."""

    deleters: Deleters
    deleting: Deleting | None = None  # set when the removal disposed of its trash entry
    line: dict[str, object] = field(default_factory=dict)

    def dispose(self, entry: TrashEntry) -> None:
        self.deleting = self.deleters.submit(entry)


@dataclass(frozen=True)
class _Pending:
    """An outcome to tell in plan order: at once, or once its trash entry (with the deleters) is deleted."""

    run_index: int
    outcome: Outcome
    path: Path
    handoff: _Handoff | None

    @property
    def ready(self) -> bool:
        deleting = self.handoff.deleting if self.handoff is not None else None
        return deleting is None or deleting.done.is_set()


class _InOrder:
    """Outcomes told (`tell`) in plan order, each once `settle` can say it without waiting on a deletion still
    under way (`flush(block=True)`: waiting for them all). Owned by the thread that acts."""

    def __init__(self, runs: int, tell: OnOutcome, settle: Callable[[_Pending], Outcome]) -> None:
        self.outcomes: list[list[Outcome]] = [[] for _ in range(runs)]
        self.waiting: deque[_Pending] = deque()
        self.tell, self.settle = tell, settle

    def add(self, pending: _Pending) -> None:
        self.waiting.append(pending)
        self.flush(block=False)

    def flush(self, block: bool) -> None:
        while self.waiting and (block or self.waiting[0].ready):
            pending = self.waiting.popleft()
            outcome = self.settle(pending)
            self.outcomes[pending.run_index].append(outcome)
            self.tell(outcome)


def _result(plan: RunPlan, outcomes: Sequence[Outcome]) -> RunResult:
    gone = {o.checkpoint for o in outcomes if o.action.gone}
    after = replace(plan.run, checkpoints=tuple(c for c in plan.run.checkpoints if c.name not in gone))
    return RunResult(plan, tuple(outcomes), after)


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
            problems.append(f"{state.journal_path}: cannot write the journal: {_why(e)}")
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


__all__ = [
    "Leftovers",
    "NotSupported",
    "PassResult",
    "PinsUnreadable",
    "Pipeline",
    "PruneReport",
    "RetentionRefused",
    "StateDirUnusable",
    "default_state_dir",
    "finish_leftovers",
]
