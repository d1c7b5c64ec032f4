"""Prometheus metrics and a health endpoint for the daemon (`watch --metrics-port`).

`/metrics` serves the Prometheus text format; `/healthz` answers 200 while the file watcher is alive and
the last successful reconcile is recent (its body says when the daemon polls because the inotify limit was
reached), and 503 with the reason otherwise. Each daemon has its own registry, so several can live in one
process (tests, the demo).

This module imports prometheus_client and http.server (which import urllib.request, email and ssl: about
25 ms), so the daemon imports it only when it makes its metrics: at its first pass, after its first log line,
unless it serves them from the start (`health.LateMetrics`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ckptkeeper.health import OBSERVER_MODES, WatchMode
from ckptkeeper.model import Outcome, OutcomeKind
from ckptkeeper.pressure import DiskPressure
from ckptkeeper.render import pressure_line


class DiskGauges:
    """The disk-pressure figures per filesystem (`--min-free`), and what pressure released. Set by the main
    loop; `note` is replaced whole, and read by the HTTP thread for /healthz."""

    def __init__(self, r: CollectorRegistry) -> None:
        by_fs = ["filesystem"]
        self.free = Gauge(
            "ckptkeeper_disk_free_bytes", "Free bytes for an unprivileged writer (--min-free)", by_fs, registry=r
        )
        self.floor = Gauge("ckptkeeper_disk_floor_bytes", "The --min-free floor, in bytes", by_fs, registry=r)
        self.next_save = Gauge(
            "ckptkeeper_disk_next_save_bytes", "The next saves of the runs still training there", by_fs, registry=r
        )
        self.pressure = Gauge(
            "ckptkeeper_disk_pressure", "1 while free space is below the floor plus the next saves", by_fs, registry=r
        )
        self.floor_unmet = Gauge(
            "ckptkeeper_disk_floor_unmet",
            "1 while releasing all that --keep-under-pressure allows cannot meet the floor",
            by_fs,
            registry=r,
        )
        self.released = Counter(
            "ckptkeeper_checkpoints_released", "Checkpoints released under disk pressure, per run", ["run"], registry=r
        )
        self.note: str | None = None  # /healthz says it (still 200) while a filesystem is under pressure
        self.shown: set[str] = set()  # the filesystems that have series now
        self.lines: dict[str, str] = {}  # filesystem -> its /healthz line, while under pressure

    def set(self, verdicts: Sequence[DiskPressure], unchanged: Sequence[str] = ()) -> None:
        """The figures of this pass; `unchanged`: filesystems judged later (their series stay as last set); the
        series of filesystems no longer holding a run (or named otherwise) go."""
        names = {p.disk.where for p in verdicts} | set(unchanged)
        for gone in self.shown - names:
            for gauge in (self.free, self.floor, self.next_save, self.pressure, self.floor_unmet):
                gauge.remove(gone)
            self.lines.pop(gone, None)
        self.shown = names
        for p in verdicts:
            where = p.disk.where
            self.free.labels(filesystem=where).set(p.disk.free)
            self.floor.labels(filesystem=where).set(p.floor)
            self.next_save.labels(filesystem=where).set(p.next_save)
            self.pressure.labels(filesystem=where).set(1 if p.under else 0)
            self.floor_unmet.labels(filesystem=where).set(1 if p.unmet else 0)
            if p.under:
                self.lines[where] = f"pressure: {pressure_line(p)}"
            else:
                self.lines.pop(where, None)
        self.note = "\n".join(self.lines[name] for name in sorted(self.lines)) if self.lines else None


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.checkpoints_seen = Gauge(
            "ckptkeeper_checkpoints_seen", "Checkpoint directories on disk, per run", ["run"], registry=r
        )
        self.checkpoints_kept = Gauge(
            "ckptkeeper_checkpoints_kept", "Checkpoints the rules and protections keep, per run", ["run"], registry=r
        )
        self.stale_incomplete = Gauge(
            "ckptkeeper_stale_incomplete_checkpoints",
            "Incomplete checkpoints unchanged for longer than --stale-after (left by a crash?), per run",
            ["run"],
            registry=r,
        )
        self.removed = Counter("ckptkeeper_checkpoints_removed", "Checkpoints deleted, per run", ["run"], registry=r)
        self.archived = Counter("ckptkeeper_checkpoints_archived", "Checkpoints archived, per run", ["run"], registry=r)
        self.bytes_freed = Counter(
            "ckptkeeper_bytes_freed",
            "Bytes removed from the runs by deletes, archives and weights-only slims",
            registry=r,
        )
        self.slimmed = Counter(
            "ckptkeeper_checkpoints_slimmed",
            "Checkpoints made weights-only (--keep-weights), per run",
            ["run"],
            registry=r,
        )
        self.errors = Counter("ckptkeeper_errors", "Removals that failed (retried on later passes)", registry=r)
        self.store = StoreGauges(r)
        self.reconcile_seconds = _reconcile_histogram(r)
        self.last_reconcile = Gauge(
            "ckptkeeper_last_reconcile_timestamp_seconds", "When the last reconcile succeeded (unix time)", registry=r
        )
        self.observer_mode = Gauge(
            "ckptkeeper_observer_mode", "1 for the way the daemon watches the root now", ["mode"], registry=r
        )
        self.mode_note: str | None = None
        self.standby = Gauge(
            "ckptkeeper_standby", "1 while this instance waits for another's lock of the root (--standby)", registry=r
        )
        self.standby_note: str | None = None  # /healthz says it (200) while standing by
        self.disk = DiskGauges(r)
        self.set_mode(WatchMode.NONE)

    def set_standby(self, note: str | None) -> None:
        self.standby.set(0 if note is None else 1)
        self.standby_note = note

    def set_mode(self, mode: WatchMode, note: str | None = None) -> None:
        """`note`: why the daemon watches this way, when it is a fallback it must tell (/healthz says it)."""
        for m in OBSERVER_MODES:
            self.observer_mode.labels(mode=m).set(1 if m == mode else 0)
        self.mode_note = note

    def set_run(self, run: str, seen: int, kept: int) -> None:
        self.checkpoints_seen.labels(run=run).set(seen)
        self.checkpoints_kept.labels(run=run).set(kept)

    @functools.cached_property
    def awaiting(self) -> Gauge:
        return Gauge(
            "ckptkeeper_awaiting_checkpoints",
            "Complete checkpoints kept until an awaited evaluation (--await) arrives, per run",
            ["run"],
            registry=self.registry,
        )

    @functools.cached_property
    def pinned(self) -> Gauge:
        return Gauge(
            "ckptkeeper_pinned_checkpoints",
            "Checkpoints a pin keeps now (`ckptkeeper pin`), per run",
            ["run"],
            registry=self.registry,
        )

    def set_awaiting(self, run: str, awaiting: int) -> None:
        self.awaiting.labels(run=run).set(awaiting)

    def set_pinned(self, run: str, pinned: int) -> None:
        self.pinned.labels(run=run).set(pinned)

    def set_stale(self, run: str, stale: int) -> None:
        self.stale_incomplete.labels(run=run).set(stale)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))

    def count(self, outcome: Outcome) -> None:
        """An outcome of an action: removals, archives, slims and errors, and the bytes freed."""
        if outcome.action is OutcomeKind.DELETED:
            self.removed.labels(run=outcome.run).inc()
        elif outcome.action is OutcomeKind.ARCHIVED:
            self.archived.labels(run=outcome.run).inc()
        elif outcome.action is OutcomeKind.ERROR:
            self.errors.inc()
        elif outcome.action is OutcomeKind.SLIMMED:
            self.slimmed.labels(run=outcome.run).inc()
        if outcome.action.frees:
            self.bytes_freed.inc(outcome.bytes)


def _reconcile_histogram(r: CollectorRegistry) -> Histogram:
    return Histogram(
        "ckptkeeper_reconcile_duration_seconds",
        "Time to rescan, plan and act on one run or the whole root",
        ["scope"],
        buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60),
        registry=r,
    )


class StoreGauges:
    """An object store archive (--archive-to URL): bytes sent, failures of the store, time to its next try."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.uploaded = Counter(
            "ckptkeeper_archive_uploaded_bytes", "Bytes sent to an object store archive (--archive-to URL)", registry=r
        )
        self.failures = Counter(
            "ckptkeeper_archive_store_failures",
            "Archives to the object store that failed because the store did (unreachable, credentials, no bucket)",
            registry=r,
        )
        self.retry_in = Gauge(
            "ckptkeeper_archive_store_retry_seconds",
            "Seconds until the failing object store is tried again (0 when it works)",
            registry=r,
        )
        self._failures_seen = 0

    def set(self, failures: int, retry_in: float) -> None:
        """The store's backoff as the pipeline has it: its failures so far, and the time to the next try."""
        if failures > self._failures_seen:
            self.failures.inc(failures - self._failures_seen)
            self._failures_seen = failures
        self.retry_in.set(retry_in)


HealthCheck = Callable[[], str | None]  # None when healthy, else the reason


class MetricsServer:
    """A small HTTP server on its own thread: GET /metrics and GET /healthz."""

    def __init__(
        self,
        metrics: Metrics,
        health: HealthCheck,
        host: str,
        port: int,
        waiting: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.metrics = metrics
        self.health = health
        self.waiting = waiting  # what the daemon waits for, while it healthily waits (a root to appear)
        self.server = _http_server(self, host, port)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="ckptkeeper-metrics", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=2)


def _http_server(outer: MetricsServer, host: str, port: int) -> ThreadingHTTPServer:
    """The server of `outer`'s /metrics and /healthz, bound to host:port (not yet serving)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, outer.metrics.render(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                problem = outer.health()
                note = outer.metrics.mode_note
                waiting = outer.waiting()
                ok = outer.metrics.standby_note or waiting or ("ok" if note is None else f"ok ({note})")
                pressure = outer.metrics.disk.note
                ok = ok if pressure is None else f"{ok}\n{pressure}"
                body = (problem or ok).encode() + b"\n"
                self._send(503 if problem else 200, body, "text/plain; charset=utf-8")
            else:
                self._send(404, b"not found: try /metrics or /healthz\n", "text/plain; charset=utf-8")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes and probes every few seconds would drown the daemon's own log

    return ThreadingHTTPServer((host, port), Handler)
