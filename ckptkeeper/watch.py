"""`ckptkeeper watch`: the retention daemon.

Filesystem events are hints; the disk is the truth. The pieces, each with one owner:

    watchdog threads --Hints--> Inbox (pending runs, its lock, the wake-up: the only shared object)
    main loop (Daemon.run): Inbox -> Reconciler: RunTracker -> engine.Pipeline (scan, plan, act, journal)
                            -> RunResult -> DecisionLog ; ObserverSupervisor (mode, fallback, root identity)
    reaper thread: trash entries -> bytes gone        HTTP thread: reads the HealthSnapshot the loop publishes
    stop: one event, checked between files of a copy and before every action

The main loop debounces events, rescans just the touched runs through the same pipeline as `prune`, and
re-checks settling checkpoints when their settle time is up. A full rescan runs every `rescan_interval`
seconds as a safety net, after an inotify queue overflow, and whenever the watcher had to be replaced.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from ckptkeeper.decision_log import DecisionLog
from ckptkeeper.engine import Pipeline, require_rules
from ckptkeeper.health import HealthSnapshot, LateMetrics, WatchMode, health_problem
from ckptkeeper.inbox import Inbox, Pending
from ckptkeeper.layout import Layout, default_state_dir
from ckptkeeper.metric_specs import MetricSpec
from ckptkeeper.model import root_name
from ckptkeeper.observers import ObserverSupervisor, RootChange
from ckptkeeper.pins import PinsReader
from ckptkeeper.policy import Policy
from ckptkeeper.progress import WATCH_INTERVAL, UploadProgress
from ckptkeeper.reaper import Reaper
from ckptkeeper.reconcile import Reconciler
from ckptkeeper.render import shown
from ckptkeeper.scan import DEFAULT_MAX_DEPTH, ScanOptions
from ckptkeeper.stale import DEFAULT_STALE_AFTER
from ckptkeeper.state import LockHeld
from ckptkeeper.tracker import RunTracker
from ckptkeeper.units import count

if TYPE_CHECKING:
    from ckptkeeper.metrics import Metrics, MetricsServer

log = logging.getLogger("ckptkeeper")

DEBOUNCE_SECONDS = 0.05  # how long a burst of events may go on before the touched runs are rescanned
HEALTH_CHECK_SECONDS = 1.0
STANDBY_RETRY_SECONDS = 0.5  # how often a standby instance tries the root's lock
# Periodic rescans trust an unchanged checkpoint directory without walking its files (see ContentCache);
# every THOROUGH_EVERY-th one walks them all, so a file rewritten in place is noticed within that many.
THOROUGH_EVERY = 10
EXIT_REFUSED = 3  # as `prune`: a run's retention was refused (--exit-when-done)


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
    max_depth: int = DEFAULT_MAX_DEPTH
    stale_after: float = DEFAULT_STALE_AFTER
    metrics: tuple[MetricSpec, ...] = ()  # `--metric`: named metrics from evaluation jobs

    @property
    def scan(self) -> ScanOptions:
        return ScanOptions(self.max_depth, self.settle, self.stale_after, self.metrics)


class Daemon:
    """The retention daemon of one root.

    Threads: the thread that calls `run` (the main loop) owns this object and every piece of it, except
    `inbox` (shared with watchdog's threads and the signal handler), `stop_event` (set from any thread),
    `reaper` (its own thread) and `snapshot` (replaced whole by the main loop, read by the HTTP thread)."""

    def __init__(
        self,
        root: Path,
        policy: Policy,
        state_dir: Path | None,
        options: WatchOptions,
        archive_to: Path | str | None = None,
        archive_options: tuple[tuple[str, Any], ...] = (),
    ) -> None:
        require_rules(policy)
        self.policy = policy
        self.options = options
        self.archive_to = archive_to
        self.archive_options = archive_options
        self.root = Path(os.path.abspath(root))
        self.state_dir = Path(os.path.abspath(state_dir or default_state_dir(self.root)))
        self.stop_event = threading.Event()
        # The metrics and the reconciler are made at the first pass, after the first line ("watching ..."):
        # prometheus_client's import (http.server, email, ssl) and the scan memo's load are not waited for.
        self._metrics = LateMetrics()
        self.reaper = Reaper(on_drained=self._wake)
        self.tracker = RunTracker()
        self.decision_log = DecisionLog(options.settle, root_name(self.root))  # named again once resolved
        self.inbox = Inbox(self.root, options.max_depth)
        self.supervisor = ObserverSupervisor(self.root, self.inbox, options.poll)
        self.pipeline: Pipeline | None = None
        self.snapshot = HealthSnapshot()
        self.metrics_server: MetricsServer | None = None
        self._dead_watcher_seen = False
        self._pins: object = None  # the pins as last seen (`PinsReader.holding`)
        self._pins_reader: PinsReader | None = None
        self._final_line = threading.Lock()  # taken by whoever says the last `stopped` line (any thread)
        if self.root.is_dir():  # checked now, so a bad combination fails at once; else once the root appears
            self._build_pipeline()

    def _wake(self) -> None:
        self.inbox.wake()

    # ---- views for tests, the demo and the HTTP thread ---------------------------------------------------------
    @property
    def mode(self) -> WatchMode:
        return self.supervisor.mode

    @property
    def observer(self) -> object:
        return self.supervisor.observer

    @property
    def metrics(self) -> Metrics:
        """Made at the first pass, after the first line (or at the start when served): `LateMetrics`."""
        return self._metrics.get()

    @property
    def last_reconcile(self) -> float | None:
        return self.snapshot.last_reconcile

    def health(self) -> str | None:
        """None when healthy; else why not (for /healthz). Reads only the published snapshot."""
        return health_problem(self.snapshot, self.stop_event.is_set(), self.options.rescan_interval)

    def _publish(self, snapshot: HealthSnapshot) -> None:
        """Replace the snapshot whole: the HTTP thread reads either the old one or the new one."""
        self.snapshot = snapshot

    def request_full_rescan(self) -> None:
        self.inbox.request_full_rescan()

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if signum is not None:
            log.info("received %s: finishing the current step and stopping", signal.Signals(signum).name)
        self.stop_event.set()
        self.inbox.wake()

    # ---- the pipeline -------------------------------------------------------------------------------------------
    def _build_pipeline(self) -> Pipeline:
        """Check the paths (LayoutError) and make the pipeline; from here on the root is its real path: a link
        on that path changed later is never followed."""
        layout = Layout.checked(self.root, self.state_dir, self.archive_to, self.archive_options)
        self.root = layout.root
        self.decision_log.root = root_name(self.root)  # as plan and prune name it: by the real path
        self.pipeline = Pipeline(
            layout,
            self.policy,
            self.options.scan,
            dry_run=self.options.dry_run,
            dispose=self.reaper.dispose,
            stop=self.stop_event.is_set,
        )
        self.pipeline.check_destination()
        self.pipeline.progress = self._upload_progress
        self.reaper.state = self.pipeline.state
        sources = self.pipeline.metric_sources.directories if self.pipeline.metric_sources is not None else []
        self.inbox = Inbox(self.root, self.options.max_depth, self.pipeline.excluded, sources)
        self.supervisor = ObserverSupervisor(self.root, self.inbox, self.options.poll)
        self.supervisor.on_mode = self._metrics.set_mode  # kept for the metrics until they are made
        self.reaper.on_drained = self._wake
        return self.pipeline

    def _upload_progress(self, run: str, checkpoint: Path) -> UploadProgress:
        """Logged every WATCH_INTERVAL seconds while a checkpoint goes to an object store; counted in the metrics."""
        from ckptkeeper.destination import tree_size

        where = f"{shown(run)}/{checkpoint.name}" if run != "." else checkpoint.name  # as the decision log says
        total = tree_size(str(checkpoint))
        return UploadProgress(
            f"{where} uploading", total, log.info, WATCH_INTERVAL, on_bytes=self.metrics.store.uploaded.inc
        )

    def _pipe(self) -> Pipeline:
        return self.pipeline if self.pipeline is not None else self._build_pipeline()

    # ---- reconciling (the Reconciler's) ------------------------------------------------------------------------
    def reconcile_all(self, trusting: bool = False, distrusted: Collection[Path] = ()) -> None:
        self._reconciler().reconcile_all(trusting, distrusted)

    @functools.cached_property
    def reconciler(self) -> Reconciler:
        """Made at the first pass, after the daemon's first line: with it the metrics and the scan memo it loads."""
        return Reconciler(self._pipe(), self.tracker, self.decision_log, self.metrics, self.reaper, self.stop_event)

    def _reconciler(self) -> Reconciler:
        self._pipe()
        return self.reconciler

    def _work(self, pending: Pending) -> None:
        started = time.monotonic()
        self._reconciler().reconcile(pending)
        self.metrics.reconcile_seconds.labels(scope="all" if pending.full else "runs").observe(
            time.monotonic() - started
        )
        if not self.stop_event.is_set():
            finished_at = time.time()
            self._publish(replace(self.snapshot, last_reconcile=finished_at))
            self.metrics.last_reconcile.set(finished_at)

    # ---- the lifecycle ---------------------------------------------------------------------------------------------
    def run(self) -> int:
        """Watch until stopped; the exit code: 0, or 3 when --exit-when-done ends with a run whose retention
        was refused. Raises LayoutError for paths that cannot be used together, LockHeld without --standby."""
        try:
            self._start_metrics_server()  # /healthz answers while the root is awaited or the lock is held
            if not self._wait_for_root_to_appear():
                return 0
            self._pipe()  # the paths were checked when the root was there at the start; else now
            self.supervisor.install()
            if not self._take_lock():
                return 0
            self._finish_leftovers()
            self.reaper.start()
            self._start_watching()
            pressure = self.policy.pressure
            log.info(
                "watching %s (%s; settle %g s; full rescan every %g s)%s%s",
                self.root,
                self.supervisor.mode,
                self.options.settle,
                self.options.rescan_interval,
                f"; keeping {pressure.floor.text} free plus the next saves" if pressure else "",
                " (dry run: nothing is removed)" if self.options.dry_run else "",
            )
            return self._loop()
        finally:
            self._shut_down()
            if self.stop_event.is_set():
                self._say_stopped()

    def _say_stopped(self, grace_over: bool = False) -> None:
        """The one last line of a stop, said by whichever comes first: the main loop done, or the grace timer."""
        if not self._final_line.acquire(blocking=False):
            return
        if grace_over:
            log.warning(
                "stopped: the grace period (%g s) is over, exiting now; the next start finishes what was cut short",
                self.options.grace,
            )
            return
        left = self.reaper.left()
        log.info("stopped%s", f"; {count(left, 'trash entry')} left for the next start to delete" if left else "")

    def _shut_down(self) -> None:
        self.supervisor.uninstall()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.supervisor.stop()
        # Whatever the reaper has not deleted yet stays in the trash, outside every run directory.
        if self.reaper.thread.is_alive():
            self.reaper.stop(timeout=min(1.0, self.options.grace / 4))
        if self.pipeline is not None:
            self.pipeline.release()

    def _start_watching(self) -> None:
        self.supervisor.start()
        self._publish(
            replace(self.snapshot, waiting=None, mode=self.supervisor.mode, watcher_alive=self.supervisor.alive())
        )

    def _wait_for_root_to_appear(self) -> bool:
        if self.root.is_dir():
            return True
        # A sidecar may start before the trainer creates its output directory: wait, never create it. It is
        # healthy meanwhile: a startup probe that failed would keep the trainer, which makes the root, from
        # ever starting.
        log.warning("the root %s does not exist yet; waiting for it to appear", self.root)
        self._publish(replace(self.snapshot, waiting=f"waiting for the root {self.root} to appear"))
        while not self.stop_event.is_set() and not self.root.is_dir():
            self.stop_event.wait(0.2)
        self._publish(replace(self.snapshot, waiting=None))
        return not self.stop_event.is_set()

    def _start_metrics_server(self) -> None:
        if self.options.metrics_port is None:
            return
        from ckptkeeper.metrics import MetricsServer

        self.metrics_server = MetricsServer(
            self.metrics, self.health, self.options.metrics_host, self.options.metrics_port, self._waiting_note
        )
        self.metrics_server.start()
        host, port = self.metrics_server.address
        log.info("serving metrics on http://%s:%d/metrics and health on /healthz", host, port)

    def _waiting_note(self) -> str | None:
        waiting = self.snapshot.waiting
        return None if waiting is None or waiting.startswith("standby") else waiting

    def _take_lock(self) -> bool:
        """Take the root's lock; with --standby, wait for it (False: stopped while waiting)."""
        pipeline = self._pipe()
        try:
            pipeline.acquire()
            return True
        except LockHeld as e:
            if not self.options.standby:
                raise
            held_by = str(e)
        log.warning("standby: %s; waiting to take over when it stops (--standby)", held_by)
        self._standing_by(f"standby: {held_by}")
        try:
            while not self.stop_event.wait(STANDBY_RETRY_SECONDS):
                try:
                    pipeline.acquire()
                except LockHeld as e:
                    self._standing_by(f"standby: {e}")  # the holder may have changed
                    continue
                log.info("the other instance has stopped; taking over %s", self.root)
                return True
            return False
        finally:
            self._standing_by(None)

    def _standing_by(self, note: str | None) -> None:
        self.metrics.set_standby(note)
        self._publish(replace(self.snapshot, waiting=note))

    def _finish_leftovers(self) -> None:
        pipeline = self._pipe()
        leftovers = pipeline.finish_leftovers(pipeline.find_runs())
        for name in leftovers.finished:
            log.info("finished removing %s, left in the trash by an interrupted run", name)
        for problem in leftovers.stuck:
            log.error("could not finish removing %s; it stays in the trash", problem)

    # ---- the loop --------------------------------------------------------------------------------------------------
    def _loop(self) -> int:
        self._pins_changed()  # the pins the first pass plans with: a change from here on is planned again
        self._work(Pending(full=True))
        next_full = time.monotonic() + self.options.rescan_interval
        periodic_rescans = 0
        next_health = time.monotonic() + HEALTH_CHECK_SECONDS
        while not self.stop_event.is_set():
            if self.options.exit_when_done and self.reconciler.all_done():
                return self._exit_when_done()
            timeout = min(next_full, next_health) - time.monotonic()
            recheck = self.tracker.next_recheck()
            if recheck is not None:
                timeout = min(timeout, recheck - time.time())
            if self.inbox.wait(timeout):
                self.stop_event.wait(DEBOUNCE_SECONDS)  # let a burst of events finish
            if self.stop_event.is_set():
                break
            pending = self.inbox.take()
            pending.runs.update(self.tracker.due(time.time()))
            if self._pins_changed():
                pending.runs.update(self.tracker.known_runs)
            if self.reconciler.pressure_waits and not self.reaper.busy() and not pending and self.tracker.known_runs:
                # The reaper is done: judge the disk pressure left waiting. One run is enough (with --min-free a
                # pass takes in every known run), and not a full rescan, which would retry a stuck trash entry,
                # keep the reaper busy, and come back here.
                pending.runs.add(min(self.tracker.known_runs))
            if time.monotonic() >= next_full:
                periodic_rescans += 1
                # A requested full rescan (inotify overflow, a new watcher) is never trusting.
                pending.trusting = not pending.full and periodic_rescans % THOROUGH_EVERY != 0
                pending.full = True
                next_full = time.monotonic() + self.options.rescan_interval
            if pending:
                self._work(pending)
            if time.monotonic() >= next_health:
                self._check_health()
                next_health = time.monotonic() + HEALTH_CHECK_SECONDS
        return 0

    def _pins_changed(self) -> bool:
        """A pin taken or dropped, or a lease lapsed, since the last look (no file of a run changes then): the runs
        are planned again, none of them left quiet. A new pin is honoured before that anyway: the engine reads the
        pins again before every removal."""
        pipeline = self._pipe()
        if self._pins_reader is None or self._pins_reader.state_dir != pipeline.layout.state_dir:
            self._pins_reader = PinsReader(pipeline.layout.state_dir)
        seen = self._pins_reader.holding(time.time())
        changed = self._pins is not None and seen != self._pins
        self._pins = seen
        if changed:
            self.tracker.quiet_runs.clear()
        return changed

    def _check_health(self) -> None:
        """Once a second: the root still the one watched, and a watcher that sees everything. A dead watcher is
        reported (/healthz 503) at one check and replaced by polling at the next."""
        change = self.supervisor.root_change(self._pipe().state.lock_deleted())
        if change is not None:
            self._root_changed(*change)
            return
        alive = self.supervisor.alive()
        if not alive and not self._dead_watcher_seen:
            self._dead_watcher_seen = True
        else:
            self._dead_watcher_seen = False
            self.supervisor.keep_watching()
        self._publish(replace(self.snapshot, mode=self.supervisor.mode, watcher_alive=self.supervisor.alive()))

    def _root_changed(self, change: RootChange, why: str) -> None:
        log.warning("%s", why)
        self._forget_root()
        if change is not RootChange.RECREATED:
            while not self.stop_event.is_set() and not self.supervisor.root_is_back():
                self.stop_event.wait(0.2)
            if self.stop_event.is_set():
                return
            log.info("the root %s is back; watching it again", self.root)
        self._watch_new_root()

    def _forget_root(self) -> None:
        self.supervisor.stop()
        self._publish(replace(self.snapshot, mode=WatchMode.NONE, watcher_alive=False))
        self.decision_log.forget_root()
        self.tracker.forget_root()

    def _watch_new_root(self) -> None:
        pipeline = self._pipe()
        if not self.options.dry_run:
            pipeline.recheck_layout()  # the old root's locks and (if it lived there) its state directory go
            if not self._take_lock():  # another instance may have taken the new root first (--standby waits)
                return
        else:
            pipeline.acquire()  # a dry run takes no lock: only the root's identity
        self._start_watching()
        self.inbox.request_full_rescan()

    def _exit_when_done(self) -> int:
        refused = self.reconciler.refused_runs()
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

    def _grace_expired(self) -> None:
        """The grace timer's thread: the stop took too long (an fsync stuck on a dead NFS server)."""
        self._say_stopped(grace_over=True)
        logging.shutdown()
        os._exit(0)
