"""`ckptkeeper watch`: the retention daemon.

Filesystem events are hints; the disk is the truth. Event handlers only record which run (or which new
directory) changed; one worker loop debounces them, rescans just that run through the same scan, plan and
act pipeline as `prune`, and re-checks settling checkpoints when their settle time is up. A full rescan
runs every `rescan_interval` seconds as a safety net, after an inotify queue overflow, and whenever the
watcher had to be restarted. Deleting the bytes of a removed checkpoint (after its atomic rename into the
trash) happens on a separate reaper thread, so a 100 GB delete never delays noticing the next checkpoint.
"""

from __future__ import annotations

import errno
import functools
import logging
import operator
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from ckptkeeper.actions import TrashEntry, finish_entry
from ckptkeeper.engine import Outcome, Policy, apply_plan, excluded_from_scan, finish_leftovers
from ckptkeeper.layout import Layout
from ckptkeeper.metrics import Metrics, MetricsServer, staleness_problem
from ckptkeeper.model import Checkpoint, Decision, Run, RunPlan
from ckptkeeper.paths import identity
from ckptkeeper.policy import plan_run
from ckptkeeper.render import human_bytes, location, mixed_runs_text, shown
from ckptkeeper.scan import ContentCache, checkpoint_step, find_run_dirs, never_descended, read_run, run_path
from ckptkeeper.state import LockHeld, StateDir

log = logging.getLogger("ckptkeeper")

DEBOUNCE_SECONDS = 0.05  # how long a burst of events may go on before the touched runs are rescanned
HEALTH_CHECK_SECONDS = 1.0
STANDBY_RETRY_SECONDS = 0.5  # how often a standby instance tries the root's lock
# Periodic rescans trust an unchanged checkpoint directory without walking its files (see ContentCache);
# every THOROUGH_EVERY-th one walks them all, so a file rewritten in place is noticed within that many.
THOROUGH_EVERY = 10
# What can change a decision: entries appearing, moving or going, and files finished (close after write).
# Not opens, reads or each write() of a large file: ckptkeeper's own reads would otherwise wake it, and
# a 10 GB optimizer.pt being written would send an event per chunk.
WATCHED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileMovedEvent,
    DirMovedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileClosedEvent,
]
# The poller does not look inside checkpoints: a change there shows as the checkpoint directory modified.
POLLED_EVENTS: list[type[FileSystemEvent]] = [*WATCHED_EVENTS, FileModifiedEvent, DirModifiedEvent]


@dataclass(frozen=True)
class WatchOptions:
    settle: float = 2.0
    rescan_interval: float = 60.0
    poll: float | None = None  # seconds between polls; None: inotify, falling back to polling
    dry_run: bool = False
    exit_when_done: bool = False
    grace: float = 10.0
    metrics_port: int | None = None  # serve /metrics and /healthz; 0 picks a free port
    metrics_host: str = "127.0.0.1"
    standby: bool = False  # wait for another instance's lock of the root instead of exiting 4


EXIT_REFUSED = 3  # as `prune`: a run's retention was refused (--exit-when-done)


@dataclass
class _Pending:
    """What the event handlers have asked the worker to look at since it last looked."""

    runs: set[Path] = field(default_factory=set)
    subtrees: set[Path] = field(default_factory=set)
    full: bool = False
    trusting: bool = False  # a periodic full rescan: unchanged checkpoint directories are not walked


class _Hints(FileSystemEventHandler):
    """Turns raw events into run directories to rescan. Never touches the disk, never deletes."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if raw:
                self.daemon.hint(Path(os.fsdecode(raw)))


class _OverflowAlarm(logging.Handler):
    """watchdog logs a warning when the kernel's inotify queue overflows; events were lost then.

    It also only logs (and otherwise swallows) a directory it could not watch once watching has started:
    the inotify watch limit reached by a directory created later. That leaves the directory, and every
    run below it, unwatched. `limit_reached` keeps the first such error for the daemon's worker loop, which
    then falls back to polling (`Daemon._check_observer`); this runs on watchdog's thread."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.on_overflow = on_overflow
        self.limit_reached: OSError | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if (error := _inotify_limit_error(record)) is not None:
            if self.limit_reached is None:
                self.limit_reached = error
        elif "overflow" in record.getMessage().lower():
            self.on_overflow()


def _inotify_limit_error(record: logging.LogRecord) -> OSError | None:
    """The inotify limit error (ENOSPC: watches, EMFILE: instances) a watchdog log record carries. watchdog
    passes the error itself (`logger.warning("Unable to watch %r: %s", path, error)`, or as exc_info when
    it cannot re-add the root's watch after an overflow): its errno is looked for, not the wording."""
    carried = list(record.args) if isinstance(record.args, tuple) else []
    if record.exc_info is not None:
        carried.append(record.exc_info[1])
    for item in carried:
        if isinstance(item, OSError) and item.errno in (errno.ENOSPC, errno.EMFILE):
            return item
    return None


class Reaper:
    """Deletes trash entries on its own thread. An entry it cannot delete (a file made immutable, a
    permission taken away) is journaled and logged once, kept aside, and tried again at every full rescan
    (`retry_stuck`). What it has not finished at shutdown stays in the trash, out of every run directory,
    and is finished on the next start."""

    def __init__(self, state: StateDir | None = None, on_drained: Callable[[], None] | None = None) -> None:
        self.state = state
        self.on_drained = on_drained  # called when the queue runs empty (--exit-when-done waits for that)
        self.queue: queue.Queue[TrashEntry | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="ckptkeeper-reaper", daemon=True)
        self._stuck_lock = threading.Lock()
        self.stuck: dict[Path, tuple[TrashEntry, str]] = {}  # trash entry -> itself, why it could not be deleted

    def start(self) -> None:
        self.thread.start()

    def dispose(self, trash_entry: TrashEntry) -> None:
        """Take over a trash entry (and its descriptor); called on the main thread."""
        self.queue.put(trash_entry)

    def retry_stuck(self) -> None:
        with self._stuck_lock:
            entries = [entry for entry, _ in self.stuck.values()]
        for entry in entries:
            self.dispose(entry)

    def _run(self) -> None:
        while (entry := self.queue.get()) is not None:
            try:
                self._delete(entry)
            finally:
                self.queue.task_done()
            if self.on_drained is not None and self.queue.unfinished_tasks == 0:
                self.on_drained()

    def _delete(self, entry: TrashEntry) -> None:
        problems: list[str] = []
        finished = finish_entry(entry, problems)
        with self._stuck_lock:
            held = self.stuck.pop(entry.shown, None)
            before = held[1] if held is not None else None
            if problems:
                self.stuck[entry.shown] = (entry, problems[0])
        if not problems:
            entry.close()
        if problems and before != problems[0]:
            log.error("could not finish deleting %s (retried at every full rescan)", problems[0])
            self._record({"action": "error", "entry": problems[0], "why": "could not finish a removal in the trash"})
        elif finished and before is not None:
            log.info("finished deleting %s on a retry", entry.shown)
            self._record({"action": "finish-trash", "entry": entry.name, "why": "deleted on a retry"})

    def _record(self, line: dict[str, str]) -> None:
        if self.state is not None:
            try:
                self.state.record(line)
            except OSError as e:
                log.error("cannot write the journal: %s", e.strerror or e)

    def stop(self, timeout: float) -> None:
        self.queue.put(None)
        self.thread.join(timeout)


class Daemon:
    def __init__(self, root: Path, policy: Policy, state_dir: Path, options: WatchOptions) -> None:
        self.root = root
        self.policy = policy
        self.state = StateDir(state_dir)
        self.options = options
        self.excluded_paths = excluded_from_scan(state_dir, policy.archive_to)
        self.excluded = [os.path.normpath(p) for p in self.excluded_paths]
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.pending = _Pending()
        self.observer: BaseObserver | None = None
        self.mode = "none"
        self.reaper = Reaper(self.state, on_drained=self.wake.set)
        self.decisions: dict[str, dict[str, str]] = {}  # run -> checkpoint -> the decision last logged
        self.refusals: dict[str, str] = {}
        self.recheck_at: dict[Path, float] = {}
        self.known_runs: set[Path] = set()
        self.quiet_runs: dict[Path, tuple[Checkpoint, ...]] = {}  # runs whose last pass had nothing to do
        self.finished_runs: set[str] = set()
        self._overflow = _OverflowAlarm(self.request_full_rescan)
        self.root_identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the root being watched
        self.metrics = Metrics()
        self.cache = ContentCache()
        self.announced: set[tuple[str, str]] = set()
        self.skew_announced: set[tuple[str, str]] = set()  # checkpoints whose future file times were logged
        self.crashed: dict[Path, str] = {}  # runs whose last reconcile raised, and what was logged
        self.waiting_note: str | None = None  # set while the root is awaited (read by the HTTP thread)
        self.mixed_runs_said: dict[str, tuple[str, ...]] = {}  # run -> the stale checkpoints last warned about
        self.standing_by = False
        self.failing: dict[tuple[str, str], str] = {}  # removals that failed, and the error last logged
        self.metrics_server: MetricsServer | None = None
        self.last_reconcile: float | None = None

    # ---- hints from event threads -------------------------------------------------------------
    def hint(self, path: Path) -> None:
        """Record which run a changed path belongs to. Called on watchdog's thread: cheap, no I/O."""
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return
        parts = rel.parts
        if any(parts[: len(x)] == x for x in self._excluded_below_root):
            return
        for index, part in enumerate(parts):
            if checkpoint_step(part) is not None:
                run_dir = self.root.joinpath(*parts[:index])
                if index <= self.policy.max_depth and not any(never_descended(p) for p in parts[:index]):
                    with self.lock:
                        self.pending.runs.add(run_dir)
                    self.wake.set()
                return
            if never_descended(part):
                return
        with self.lock:
            self.pending.subtrees.add(path)
            if path != self.root:
                self.pending.runs.add(path.parent)  # a deleted run directory: its parent sees it go
        self.wake.set()

    @functools.cached_property
    def _excluded_below_root(self) -> tuple[tuple[str, ...], ...]:
        """The excluded paths (state directory, archive) that lie inside the root, as their components below
        it. An event is ckptkeeper's own when its path's components start with one of these, never by string
        prefix: /x/ckpt is no prefix of /x/ckpt-live/run. Lexical and computed once: `hint` does no I/O."""
        root = Path(os.path.abspath(self.root))
        below = []
        for excluded in self.excluded_paths:
            try:
                parts = Path(os.path.abspath(excluded)).relative_to(root).parts
            except ValueError:
                continue  # outside the root: no event's path is below it
            if parts:
                below.append(parts)
        return tuple(below)

    def request_full_rescan(self) -> None:
        with self.lock:
            self.pending.full = True
        self.wake.set()

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if signum is not None:
            log.info("received %s: finishing the current step and stopping", signal.Signals(signum).name)
        self.stop_event.set()
        self.wake.set()

    # ---- the observer --------------------------------------------------------------------------
    def _start_observer(self) -> None:
        if self.options.poll is None:
            observer: BaseObserver | None = None
            try:
                observer = Observer()  # watchdog opens the inotify instance here: it can fail (EMFILE) already
                observer.schedule(_Hints(self), os.fspath(self.root), recursive=True, event_filter=WATCHED_EVENTS)
                observer.start()
                self.observer, self.mode = observer, "inotify"
                self.metrics.set_mode(self.mode)
                log.debug("watching %s with inotify", self.root)
                return
            except OSError as e:
                self._stop_observer(observer)
                if e.errno in (errno.ENOSPC, errno.EMFILE):
                    # watchdog adds every watch below the root before start() returns, and raises then.
                    self._give_up_inotify(e)
                else:
                    log.warning("cannot watch %s with inotify (%s); falling back to polling every 1 s", self.root, e)
        interval = self.options.poll or 1.0
        polling = PollingObserverVFS(os.lstat, _polling_listdir(self.root), polling_interval=interval)
        polling.schedule(_Hints(self), os.fspath(self.root), recursive=True, event_filter=POLLED_EVENTS)
        polling.start()
        self.observer, self.mode = polling, "polling"
        limit = self._overflow.limit_reached
        self.metrics.set_mode(self.mode, None if limit is None else f"polling: {_InotifyLimit.of(limit).short}")
        log.debug("watching %s by polling every %g s", self.root, interval)

    def _give_up_inotify(self, error: OSError) -> None:
        """inotify ran out of watches (or instances): say so once, loudly, and poll the whole root from now on.
        Never back to inotify in this process: the limit would be reached again, and the runs below the
        directories it could not watch would be blind again until the next full rescan."""
        if self._overflow.limit_reached is None:
            self._overflow.limit_reached = error
        limit = _InotifyLimit.of(error)
        self.options = WatchOptions(**{**self.options.__dict__, "poll": self.options.poll or 1.0})
        log.warning(
            "cannot watch every directory below %s with inotify: %s; falling back to polling the whole root every "
            "%g s for as long as this process runs. To use inotify, raise the limit (sysctl -w %s=%d, and in "
            "/etc/sysctl.d/ to keep it) and restart ckptkeeper",
            self.root,
            limit.text,
            self.options.poll,
            limit.sysctl,
            limit.suggested,
        )

    @staticmethod
    def _stop_observer(observer: BaseObserver | None) -> None:
        if observer is None:
            return
        try:
            observer.stop()
            if observer.is_alive():
                observer.join(timeout=2)
        except (RuntimeError, OSError):
            pass

    def observer_healthy(self) -> bool:
        observer = self.observer
        if observer is None or not observer.is_alive():
            return False
        return all(emitter.is_alive() for emitter in observer.emitters)

    def _check_observer(self) -> None:
        if not self.root.is_dir():
            self._wait_for_root(f"the root {self.root} is gone; waiting for it to come back")
            return
        real = os.path.realpath(self.root)
        if real != os.fspath(self.root):
            # A directory on the root's path was swapped for a link (on a shared volume, by anyone who can
            # rename it): the path now leads to someone else's files. Never follow; wait for it to lead back.
            self._wait_for_root(
                f"the root {self.root} now leads to {real} (a link on its path changed): not following it; "
                "waiting for it to lead back"
            )
            return
        if identity(self.root) != self.root_identity or self._lock_file_deleted():
            # Deleted and created again between two checks: the watcher still watches the deleted directory
            # and the lock is the deleted state directory's. Start over on the new one.
            log.warning("the root %s was deleted and created again; watching the new one", self.root)
            self._forget_root()
            self._watch_new_root()
            return
        if self._overflow.limit_reached is not None and self.mode == "inotify":
            # A directory created since start could not be watched: it, and every run below it, is blind.
            self._stop_observer(self.observer)
            self._give_up_inotify(self._overflow.limit_reached)
            self._start_observer()
            self.request_full_rescan()  # what was written meanwhile where inotify could not see
            return
        if not self.observer_healthy():
            log.warning("the %s file watcher stopped unexpectedly; restarting it (polling)", self.mode)
            self._stop_observer(self.observer)
            # A watcher that died once may die again: polling cannot run out of watches.
            self.options = WatchOptions(**{**self.options.__dict__, "poll": self.options.poll or 1.0})
            self._start_observer()
            self.request_full_rescan()

    def _lock_file_deleted(self) -> bool:
        """True when the root's lock this daemon holds was deleted with its root (or the state lock with its
        directory). Unlike the root's inode number (which a new directory may reuse once the old one is
        freed), a held lock's inode cannot be reused."""
        return self.state.lock_deleted()

    def _wait_for_root(self, why: str) -> None:
        log.warning("%s", why)
        self._forget_root()
        while not self.stop_event.is_set() and not self._root_is_back():
            self.stop_event.wait(0.2)
        if self.stop_event.is_set():
            return
        log.info("the root %s is back; watching it again", self.root)
        self._watch_new_root()

    def _root_is_back(self) -> bool:
        return self.root.is_dir() and os.path.realpath(self.root) == os.fspath(self.root)

    def _forget_root(self) -> None:
        self._stop_observer(self.observer)
        self.observer, self.mode = None, "none"
        self.metrics.set_mode(self.mode)
        self.decisions.clear()
        self.mixed_runs_said.clear()
        self.known_runs.clear()
        self.quiet_runs.clear()
        self.cache = ContentCache()

    def _watch_new_root(self) -> None:
        if not self.options.dry_run:
            self.state.close()  # the old root's locks and (if it lived there) its state directory
            Layout.checked(self.root, self.state.path, self.policy.archive_to)
            if not self._take_lock():  # another instance may have taken the new root first (--standby waits)
                return
        self.root_identity = identity(self.root)
        self._start_observer()
        self.request_full_rescan()

    # ---- reconciling ---------------------------------------------------------------------------
    def _log_decisions(self, plan: RunPlan) -> None:
        run = plan.run.path
        if plan.refusal:
            if self.refusals.get(run) != plan.refusal:
                log.error("run %s: refused, nothing is removed there: %s", shown(run), plan.refusal)
            self.refusals[run] = plan.refusal
        else:
            self.refusals.pop(run, None)
        self._warn_times_in_future(plan)
        self._warn_mixed_runs(plan)
        logged = self.decisions.setdefault(run, {})
        for d in plan.decisions:
            word = _decision_word(d)
            if logged.get(d.checkpoint.name) != word:
                logged[d.checkpoint.name] = word
                if d.kept:
                    level = logging.INFO if d.checkpoint.complete else logging.DEBUG
                    log.log(level, "%s %s: %s", location(run, d.checkpoint.name), word, shown(", ".join(d.reasons)))

    def _warn_mixed_runs(self, plan: RunPlan) -> None:
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

    def _warn_times_in_future(self, plan: RunPlan) -> None:
        """Say once per checkpoint that its file times lie in the future: it settles by what the daemon
        itself sees unchanged instead, and the clocks of the writer and this machine disagree."""
        for c in plan.run.checkpoints:
            key = (plan.run.path, c.name)
            if c.times_in_future and key not in self.skew_announced:
                self.skew_announced.add(key)
                log.warning(
                    "%s: its file times lie %.0f s in the future (the writer's clock is ahead of this machine's?); "
                    "it counts as settled once seen unchanged for %g s",
                    location(plan.run.path, c.name),
                    c.last_change - time.time(),
                    self.options.settle,
                )

    def _on_outcome(self, outcome: Outcome) -> None:
        if outcome.action == "delete":
            self.metrics.removed.labels(run=outcome.run).inc()
            self.metrics.bytes_freed.inc(outcome.bytes)
        elif outcome.action == "archive":
            self.metrics.archived.labels(run=outcome.run).inc()
            self.metrics.bytes_freed.inc(outcome.bytes)
        elif outcome.action == "error":
            self.metrics.errors.inc()
        where = location(outcome.run, outcome.checkpoint)
        key = (outcome.run, outcome.checkpoint)
        if outcome.action != "error" and self.failing.pop(key, None) is not None:
            log.info("%s: the removal that failed before went through", where)
        if outcome.action == "delete":
            log.info("%s deleted: freed %s", where, human_bytes(outcome.bytes))
        elif outcome.action == "archive":
            log.info("%s archived: %s, %s", where, outcome.detail, human_bytes(outcome.bytes))
        elif outcome.action.startswith("would-"):
            if (outcome.run, outcome.checkpoint) in self.announced:
                return  # a dry run sees the same checkpoint at every pass: say it once
            self.announced.add((outcome.run, outcome.checkpoint))
            log.info("%s %s (dry run)", where, outcome.action.replace("-", " "))
        elif outcome.action == "error":
            # Retried at every pass until it works, but said once (again only if the reason changes).
            if self.failing.get(key) != outcome.detail:
                log.error("%s could not be removed: %s (will retry at every rescan)", where, outcome.detail)
            else:
                log.debug("%s still cannot be removed: %s", where, outcome.detail)
            self.failing[key] = outcome.detail
        else:
            log.info("%s %s: %s", where, outcome.action, outcome.detail)

    def reconcile_run(self, run_dir: Path, now: float, trusting: bool = False) -> None:
        run = read_run(self.root, run_dir, now, self.options.settle, self.cache, trusting)
        self.recheck_at.pop(run_dir, None)
        if not run.checkpoints:
            self.known_runs.discard(run_dir)
            self.quiet_runs.pop(run_dir, None)
            self.metrics.checkpoints_seen.labels(run=run.path).set(0)
            self.metrics.checkpoints_kept.labels(run=run.path).set(0)
            return
        self.known_runs.add(run_dir)
        quiet = self.quiet_runs.pop(run_dir, None)
        if quiet is not None and len(quiet) == len(run.checkpoints) and all(map(operator.is_, quiet, run.checkpoints)):
            # The very same (trusted, unchanged) checkpoints as at the last pass, which had nothing to do:
            # the pure plan would be the same, so there is nothing to plan, log or remove.
            self.quiet_runs[run_dir] = quiet
            return
        plan = plan_run(run, self.policy.rules, self.policy.protections, self.policy.removal)
        self._log_decisions(plan)
        if not plan.refusal and plan.removed:
            apply_plan(
                self.root,
                [plan],
                self.policy,
                None if self.options.dry_run else self.state,
                self._on_outcome,
                dispose=self.reaper.dispose,
                stop=self.stop_event.is_set,
                root_identity=self.root_identity,
            )
            if not self.options.dry_run:
                # What was removed is gone now; read the run again so the decisions logged next are true.
                plan = plan_run(
                    read_run(self.root, run_dir, now, self.options.settle, self.cache),
                    self.policy.rules,
                    self.policy.protections,
                    self.policy.removal,
                )
        settling = [c.settles_at for c in run.checkpoints if c.settles_at is not None and c.settles_at > now]
        if settling:
            # Incomplete only because it changed recently: look again when its settle time is up, since
            # no further event may come. Other incomplete checkpoints wait for events (and full rescans).
            self.recheck_at[run_dir] = min(settling) + 0.02
        self.metrics.checkpoints_seen.labels(run=plan.run.path).set(len(plan.run.checkpoints))
        self.metrics.checkpoints_kept.labels(run=plan.run.path).set(len(plan.kept))
        names = {c.name for c in plan.run.checkpoints}
        logged = self.decisions.get(plan.run.path, {})
        for name in logged.keys() - names:
            del logged[name]
        for key in [k for k in self.failing if k[0] == plan.run.path and k[1] not in names]:
            del self.failing[key]
        live = _live_checkpoint(plan)
        pruned = self.options.dry_run or not plan.removed
        if (plan.refusal or not plan.removed) and not settling:
            self.quiet_runs[run_dir] = plan.run.checkpoints
        if live is not None and live.training_stopped and pruned and not settling and not _saving_after(plan.run, live):
            if plan.run.path not in self.finished_runs:
                self._say_finished(plan)
            self.finished_runs.add(plan.run.path)
        else:
            self.finished_runs.discard(plan.run.path)

    def _say_finished(self, plan: RunPlan) -> None:
        run = shown(plan.run.path)
        if plan.refusal:
            log.error("run %s: training finished, but its retention was refused: nothing is removed there", run)
        elif self.options.dry_run:
            log.info("run %s: training finished (dry run: nothing was removed)", run)
        else:
            log.info("run %s: training finished and its retention is applied", run)

    def _reconcile_safely(self, run_dir: Path, now: float, trusting: bool = False) -> None:
        """Reconcile one run; whatever goes wrong there (a bug, a file no check foresaw) is logged once and
        retried at the next pass, and never stops retention for the other runs."""
        try:
            self.reconcile_run(run_dir, now, trusting)
        except Exception as e:
            said = f"{type(e).__name__}: {e}"
            if self.crashed.get(run_dir) != said:
                log.exception(
                    "run %s could not be reconciled (%s); retried at the next pass", shown(str(run_dir)), said
                )
            self.crashed[run_dir] = said
            self.quiet_runs.pop(run_dir, None)
            self.finished_runs.discard(run_path(self.root, run_dir))
        else:
            self.crashed.pop(run_dir, None)

    def _run_dirs_below(self, top: Path) -> list[Path]:
        depth = len(top.relative_to(self.root).parts)
        if depth > self.policy.max_depth or not top.is_dir() or top.is_symlink():
            return []
        warnings: list[str] = []
        return find_run_dirs(top, self.policy.max_depth - depth, self.excluded_paths, warnings)

    def reconcile_all(self, trusting: bool = False, distrusted: Collection[Path] = ()) -> None:
        """Rescan every run; `trusting` as in ContentCache, except for the `distrusted` runs (events came)."""
        now = time.time()
        found = set(self._run_dirs_below(self.root)) if self.root.is_dir() else set()
        for gone in self.known_runs - found:
            self.known_runs.discard(gone)
            self.finished_runs.discard(run_path(self.root, gone))
        for run_dir in sorted(found):
            if self.stop_event.is_set():
                return
            self._reconcile_safely(run_dir, now, trusting and run_dir not in distrusted)

    def _take_pending(self) -> _Pending:
        with self.lock:
            taken, self.pending = self.pending, _Pending()
        return taken

    def _work(self, pending: _Pending) -> None:
        started = time.monotonic()
        scope = "all" if pending.full else "runs"
        self._reconcile_pending(pending)
        self.metrics.reconcile_seconds.labels(scope=scope).observe(time.monotonic() - started)
        if not self.stop_event.is_set():
            self.last_reconcile = time.time()
            self.metrics.last_reconcile.set(self.last_reconcile)

    def _reconcile_pending(self, pending: _Pending) -> None:
        if pending.full:
            self.reaper.retry_stuck()
            self.reconcile_all(pending.trusting, pending.runs)
            return
        now = time.time()
        targets = set(pending.runs)
        for top in pending.subtrees:
            if top.is_dir() and not top.is_symlink():
                targets.update(self._run_dirs_below(top))
        for run_dir in sorted(targets):
            if self.stop_event.is_set():
                return
            if run_dir.is_dir() or run_dir in self.known_runs:
                self._reconcile_safely(run_dir, now)

    def health(self) -> str | None:
        """None when healthy; else why not (for /healthz)."""
        if self.stop_event.is_set():
            return "stopping"
        if self.standing_by or self.waiting_note is not None:
            return None  # healthy: waiting is its job (/healthz says what for)
        if self.mode == "none" or not self.observer_healthy():
            return f"the file watcher is not running (mode {self.mode})"
        return staleness_problem(self.last_reconcile, 2 * self.options.rescan_interval + 30)

    def refused_runs(self) -> list[str]:
        known = {run_path(self.root, r) for r in self.known_runs}
        return sorted(run for run in self.refusals if run in known)

    def all_done(self) -> bool:
        """Every run finished and pruned, and nothing left to delete: a removal that keeps failing (in a run
        or in the trash) holds the exit until it goes through."""
        runs = {run_path(self.root, r) for r in self.known_runs}
        settled = self.reaper.queue.unfinished_tasks == 0 and not self.reaper.stuck and not self.failing
        return bool(runs) and runs <= self.finished_runs and settled

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        """Watch until stopped; the exit code: 0, or 3 when --exit-when-done ends with a run whose retention
        was refused. Raises LayoutError for paths that cannot be used together, LockHeld without --standby."""
        logging.getLogger("watchdog").addHandler(self._overflow)
        try:
            self._start_metrics_server()  # /healthz answers while the root is awaited or the lock is held
            if not self._wait_for_root_to_appear():
                return 0
            # From here on the root is its real path: a link on that path changed later is never followed.
            self.root = Layout.checked(self.root, self.state.path, self.policy.archive_to).root
            if not self._take_lock():
                return 0
            self.root_identity = identity(self.root)  # the root it holds the lock of, after any wait
            self._finish_leftovers()
            self.reaper.start()
            self._start_observer()
            log.info(
                "watching %s (%s; settle %g s; full rescan every %g s)%s",
                self.root,
                self.mode,
                self.options.settle,
                self.options.rescan_interval,
                " (dry run: nothing is removed)" if self.options.dry_run else "",
            )
            return self._loop()
        finally:
            logging.getLogger("watchdog").removeHandler(self._overflow)
            if self.metrics_server is not None:
                self.metrics_server.stop()
            self._stop_observer(self.observer)
            # Whatever the reaper has not deleted yet stays in the trash, outside every run directory.
            if self.reaper.thread.is_alive():
                self.reaper.stop(timeout=min(1.0, self.options.grace / 4))
            self.state.release_lock()

    def _wait_for_root_to_appear(self) -> bool:
        if self.root.is_dir():
            return True
        # A sidecar may start before the trainer creates its output directory: wait, never create it. It is
        # healthy meanwhile: a startup probe that failed would keep the trainer, which makes the root, from
        # ever starting.
        log.warning("the root %s does not exist yet; waiting for it to appear", self.root)
        self.waiting_note = f"waiting for the root {self.root} to appear"
        try:
            while not self.stop_event.is_set() and not self.root.is_dir():
                self.stop_event.wait(0.2)
        finally:
            self.waiting_note = None
        return not self.stop_event.is_set()

    def _start_metrics_server(self) -> None:
        if self.options.metrics_port is None:
            return
        self.metrics_server = MetricsServer(
            self.metrics, self.health, self.options.metrics_host, self.options.metrics_port, lambda: self.waiting_note
        )
        self.metrics_server.start()
        host, port = self.metrics_server.address
        log.info("serving metrics on http://%s:%d/metrics and health on /healthz", host, port)

    def _take_lock(self) -> bool:
        """Take the root's lock; with --standby, wait for it (False: stopped while waiting)."""
        if self.options.dry_run:  # a dry run writes nothing, not even the state directory
            return True
        try:
            self.state.acquire_lock(self.root)
            return True
        except LockHeld as e:
            if not self.options.standby:
                raise
            held_by = str(e)
        log.warning("standby: %s; waiting to take over when it stops (--standby)", held_by)
        self.standing_by = True
        self.metrics.set_standby(f"standby: {held_by}")
        try:
            while not self.stop_event.wait(STANDBY_RETRY_SECONDS):
                try:
                    self.state.acquire_lock(self.root)
                except LockHeld as e:
                    self.metrics.set_standby(f"standby: {e}")  # the holder may have changed
                    continue
                log.info("the other instance has stopped; taking over %s", self.root)
                return True
            return False
        finally:
            self.standing_by = False
            self.metrics.set_standby(None)

    def _finish_leftovers(self) -> None:
        if self.options.dry_run:
            return
        stuck: list[str] = []
        for name in finish_leftovers(self.root, self.state, self._run_dirs_below(self.root), stuck):
            log.info("finished removing %s, left in the trash by an interrupted run", name)
        for problem in stuck:
            log.error("could not finish removing %s; it stays in the trash", problem)

    def _loop(self) -> int:
        self._work(_Pending(full=True))
        next_full = time.monotonic() + self.options.rescan_interval
        periodic_rescans = 0
        next_health = time.monotonic() + HEALTH_CHECK_SECONDS
        while not self.stop_event.is_set():
            if self.options.exit_when_done and self.all_done():
                return self._exit_when_done()
            timeout = min(next_full, next_health) - time.monotonic()
            if self.recheck_at:
                timeout = min(timeout, min(self.recheck_at.values()) - time.time())
            if self.wake.wait(max(timeout, 0.0)):
                self.wake.clear()
                self.stop_event.wait(DEBOUNCE_SECONDS)  # let a burst of events finish
            if self.stop_event.is_set():
                break
            pending = self._take_pending()
            pending.runs.update(r for r, at in self.recheck_at.items() if at <= time.time())
            if time.monotonic() >= next_full:
                periodic_rescans += 1
                # A requested full rescan (inotify overflow, a new watcher) is never trusting.
                pending.trusting = not pending.full and periodic_rescans % THOROUGH_EVERY != 0
                pending.full = True
                next_full = time.monotonic() + self.options.rescan_interval
            if pending.full or pending.runs or pending.subtrees:
                self._work(pending)
            if time.monotonic() >= next_health:
                self._check_observer()
                next_health = time.monotonic() + HEALTH_CHECK_SECONDS
        log.info("stopped")
        return 0

    def _exit_when_done(self) -> int:
        refused = self.refused_runs()
        if refused:
            log.error(
                "every run has finished training, but retention was refused in %s; exiting with code %d "
                "(--exit-when-done)",
                ", ".join(shown(r) for r in refused),
                EXIT_REFUSED,
            )
            return EXIT_REFUSED
        if self.options.dry_run:
            log.info("every run has finished training (dry run: nothing was removed); exiting (--exit-when-done)")
        else:
            log.info("every run has finished training and is pruned; exiting (--exit-when-done)")
        return 0

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the daemon: the stop event is checked between files of a copy, between
        chunks of a large file, and before every action, so the current step ends within moments. If it has
        not ended when the grace period is nearly over (an fsync stuck on a dead NFS server), the process
        exits there: every step is an atomic rename or work under a temporary name, so stopping anywhere
        leaves no half-removed checkpoint, and the next start finishes or undoes it."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            first = not self.stop_event.is_set()
            self.request_stop(signum, frame)
            if first:
                timer = threading.Timer(self.options.grace * 0.9, self._grace_expired)
                timer.daemon = True
                timer.start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    @staticmethod
    def _grace_expired() -> None:
        log.warning("the stop's grace period is over: exiting now; the next start finishes what was cut short")
        logging.shutdown()
        os._exit(0)


def _polling_listdir(root: Path) -> Callable[[str | None], Iterator[os.DirEntry[str]]]:
    """What the poller lists: not hidden entries (the state directory, trash) and nothing inside a
    checkpoint. A checkpoint's own mtime and ctime, seen in its run's listing, change whenever an entry
    in it is created, removed or renamed, so its files need not be stat'ed at every poll (that was 90 % of
    the polling cost). A file rewritten in place inside a checkpoint is seen by the full rescans."""
    top = os.fspath(root)

    def listdir(path: str | None) -> Iterator[os.DirEntry[str]]:
        if path is None or (path != top and checkpoint_step(os.path.basename(path)) is not None):
            return iter(())
        with os.scandir(path) as it:
            return iter([e for e in it if not never_descended(e.name)])

    return listdir


@dataclass(frozen=True)
class _InotifyLimit:
    """The per-user inotify limit an error says was reached, named by the sysctl that sets it."""

    kind: str  # "watch" or "instance"
    sysctl: str  # the sysctl to raise: the one that binds
    text: str  # the limit and its value now, for the log
    suggested: int

    @property
    def short(self) -> str:
        return f"the inotify {self.kind} limit {self.sysctl} is reached"

    @classmethod
    def of(cls, error: OSError) -> _InotifyLimit:
        kind, system, namespace, floor = (
            ("instance", "fs.inotify.max_user_instances", "user.max_inotify_instances", 1024)
            if error.errno == errno.EMFILE
            else ("watch", "fs.inotify.max_user_watches", "user.max_inotify_watches", 524288)
        )
        system_value, namespace_value = _sysctl(system), _sysctl(namespace)
        text = f"the inotify {kind} limit is reached ({system} = {_shown_number(system_value)}, per user"
        binding, value = system, system_value
        # In a user namespace of its own (rootless containers) a lower limit of the namespace's may bind.
        if namespace_value is not None and (system_value is None or namespace_value < system_value):
            text += f"; this user namespace's {namespace} = {namespace_value}"
            binding, value = namespace, namespace_value
        return cls(kind, binding, text + ")", max(2 * (value or 0), floor))


def _sysctl(name: str) -> int | None:
    try:
        return int(Path("/proc/sys", *name.split(".")).read_text())
    except (OSError, ValueError):
        return None


def _shown_number(value: int | None) -> str:
    return "unknown" if value is None else str(value)


def _live_checkpoint(plan: RunPlan) -> Checkpoint | None:
    """The checkpoint the live run would resume from: the highest step, or in a directory that mixes runs the
    newest written one (a stale run's final checkpoint must not end the watch of the live one)."""
    if plan.mixed_runs is not None:
        return plan.mixed_runs.newest_written
    return max((c for c in plan.run.checkpoints if c.complete), key=lambda c: c.step, default=None)


def _saving_after(run: Run, live: Checkpoint) -> bool:
    """A checkpoint being written after `live` (a higher step, or changed later): training goes on."""
    return any(
        not c.complete and (c.step > live.step or c.last_change > live.last_change) for c in run.checkpoints
    )


def _decision_word(d: Decision) -> str:
    if d.kept:
        return "kept" if d.checkpoint.complete else "waiting"
    return str(d.action)
