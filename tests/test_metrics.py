"""Prometheus metrics and /healthz of the watch daemon (ckptkeeper/metrics.py): the Daemon runs on a thread
of the test process with a real observer on a real directory and a real HTTP server on a free port; the
values served are compared with what the daemon did (the disk and its journal). Also the CLI's
`watch --metrics-port` as a real process."""

from __future__ import annotations

import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import test_watch_inprocess as inprocess
from prometheus_client.parser import text_string_to_metric_families
from watchutil import TrainerThread, Watch, journal, planned, steps, wait_until

from ckptkeeper.health import staleness_problem
from ckptkeeper.metrics import Metrics, MetricsServer
from ckptkeeper.policy import Policy
from ckptkeeper.rules import parse_rules
from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.watch import Daemon, WatchOptions

# The fixtures of the in-process watch tests: every thread a test starts must have ended after it.
no_thread_leaks = inprocess.no_thread_leaks
daemon_log = inprocess.daemon_log
run_daemon = inprocess.run_daemon
Collect = inprocess.Collect
DaemonThread = inprocess.DaemonThread

# Checkpoints 3, 6, ..., 24 with an eval at each save; eval loss rises after half the run, so the
# Trainer's best checkpoint is an early one that `last:2` alone would not keep.
EVALUATED = SimConfig(steps_per_epoch=8, epochs=3, save_steps=3, eval_steps=3, overfit_after=0.4, seed=3)
SMALL = inprocess.SMALL
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(url: str) -> tuple[int, str, str]:
    """(status, body, content type) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode(), str(response.headers["Content-Type"])
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), str(e.headers["Content-Type"])


def samples(text: str) -> Samples:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return found


def metrics_daemon(root: Path, keep: str, **options: float | str) -> Daemon:
    settings: dict[str, float | str] = {"settle": 0.3, "rescan_interval": 3600.0, "metrics_port": 0, **options}
    return Daemon(root, Policy(parse_rules(keep)), root / "_ckptkeeper", WatchOptions(**settings))  # type: ignore[arg-type]


def url(daemon: Daemon, path: str) -> str:
    wait_until(lambda: daemon.metrics_server is not None, 10, "the metrics server to start")
    assert daemon.metrics_server is not None
    host, port = daemon.metrics_server.address
    return f"http://{host}:{port}{path}"


def scrape(daemon: Daemon) -> Samples:
    status, body, content_type = get(url(daemon, "/metrics"))
    assert status == 200
    assert content_type.startswith("text/plain; version="), content_type
    return samples(body)


def test_metrics_match_what_the_daemon_did(
    tmp_path: Path, run_daemon: Callable[[Daemon], DaemonThread], daemon_log: Collect
) -> None:
    keep = "last:2"
    reference = tmp_path / "reference"
    all_steps = simulate_run(reference, EVALUATED)
    # What the planner keeps of the finished run: the last 2 and the Trainer's best (protected).
    expected_kept, expected_removed = planned(reference, keep)
    assert len(expected_kept) == 3 and expected_removed, (expected_kept, expected_removed)

    root = tmp_path / "outputs"
    root.mkdir()
    daemon = metrics_daemon(root, keep)
    handle = run_daemon(daemon)
    wait_until(lambda: daemon.last_reconcile is not None, 10, "the first reconcile")
    before = scrape(daemon)
    assert before[("ckptkeeper_observer_mode", (("mode", "inotify"),))] == 1
    assert before[("ckptkeeper_bytes_freed_total", ())] == 0
    assert before[("ckptkeeper_errors_total", ())] == 0

    trainer = TrainerThread(root / "run", EVALUATED, pace=0.005)
    trainer.start()
    assert [s for s, _ in trainer.finish(60)] == all_steps
    run = root / "run"
    wait_until(lambda: steps(run) == sorted(expected_kept), 15, lambda: f"{expected_kept}: {daemon_log.messages()}")
    removed = len(all_steps) - len(expected_kept)
    run_label = (("run", "run"),)

    def settled() -> Samples | None:
        found = scrape(daemon)
        # The counters move during a pass, the gauges at its end: wait for both.
        done = found.get(("ckptkeeper_checkpoints_removed_total", run_label)) == removed
        return found if done and found.get(("ckptkeeper_checkpoints_seen", run_label)) == len(expected_kept) else None

    found = wait_until(settled, 10, lambda: f"removed_total {removed}: {scrape(daemon)}")
    deleted = [e for e in journal(root / "_ckptkeeper") if e["action"] == "delete"]
    assert sorted(e["step"] for e in deleted) == sorted(expected_removed)
    assert found[("ckptkeeper_checkpoints_seen", run_label)] == len(expected_kept)
    assert found[("ckptkeeper_checkpoints_kept", run_label)] == len(expected_kept)
    assert found.get(("ckptkeeper_checkpoints_archived_total", run_label), 0) == 0  # no child before an archive
    assert found[("ckptkeeper_bytes_freed_total", ())] == sum(e["bytes"] for e in deleted) > 0
    assert found[("ckptkeeper_errors_total", ())] == 0
    assert found[("ckptkeeper_observer_mode", (("mode", "inotify"),))] == 1
    assert found[("ckptkeeper_observer_mode", (("mode", "polling"),))] == 0
    assert found[("ckptkeeper_observer_mode", (("mode", "none"),))] == 0
    last = found[("ckptkeeper_last_reconcile_timestamp_seconds", ())]
    assert last == pytest.approx(daemon.last_reconcile)
    assert time.time() - 10 < last <= time.time()
    full = found[("ckptkeeper_reconcile_duration_seconds_count", (("scope", "all"),))]
    per_run = found[("ckptkeeper_reconcile_duration_seconds_count", (("scope", "runs"),))]
    assert full >= 1 and per_run >= 1
    assert found[("ckptkeeper_reconcile_duration_seconds_sum", (("scope", "runs"),))] > 0
    status, body, _ = get(url(daemon, "/healthz"))
    assert (status, body) == (200, "ok\n")
    assert handle.stop() == 0


def test_healthz_is_503_while_the_observer_is_dead_then_ok_with_polling(
    tmp_path: Path, run_daemon: Callable[[Daemon], DaemonThread], daemon_log: Collect
) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "run", SMALL)
    daemon = metrics_daemon(root, "last:1")
    handle = run_daemon(daemon)
    healthz = url(daemon, "/healthz")
    wait_until(lambda: get(healthz)[:2] == (200, "ok\n"), 10, lambda: f"/healthz ok: {get(healthz)}")
    first = handle.track()
    assert first is not None

    def dead() -> tuple[int, str, str] | None:
        answer = get(healthz)
        return answer if answer[0] == 503 else None

    # The main loop reports a dead watcher at one health check (every second) and replaces it at the next, so
    # /healthz answers 503 for about a second: the answer is kept from the very request that saw it. Its body
    # names the mode the daemon was in (the published snapshot's): still inotify, not yet replaced.
    first.stop()
    status, body, content_type = wait_until(dead, 10, lambda: f"/healthz 503: {get(healthz)}")
    assert (status, body) == (503, "the file watcher is not running (mode inotify)\n")
    assert content_type.startswith("text/plain")
    wait_until(lambda: get(healthz)[:2] == (200, "ok\n"), 10, lambda: f"/healthz ok again: {get(healthz)}")
    assert daemon.mode == "polling"
    handle.track()
    found = scrape(daemon)
    assert found[("ckptkeeper_observer_mode", (("mode", "polling"),))] == 1
    assert found[("ckptkeeper_observer_mode", (("mode", "inotify"),))] == 0
    assert daemon_log.has("the inotify file watcher stopped unexpectedly; restarting it (polling)")
    assert handle.stop() == 0


def test_server_binds_localhost_by_default_and_404s_unknown_paths(
    tmp_path: Path, run_daemon: Callable[[Daemon], DaemonThread]
) -> None:
    root = tmp_path / "outputs"
    root.mkdir()
    assert WatchOptions().metrics_host == "127.0.0.1"
    daemon = Daemon(root, Policy(parse_rules("last:1")), root / "_ckptkeeper", WatchOptions(metrics_port=0))
    handle = run_daemon(daemon)
    base = url(daemon, "")
    assert daemon.metrics_server is not None
    host, port = daemon.metrics_server.address
    assert host == "127.0.0.1" and port > 0
    status, body, _ = get(base + "/nope")
    assert (status, body) == (404, "not found: try /metrics or /healthz\n")
    status, body, _ = get(base + "/metrics?name[]=x")  # a query string does not change the path
    assert status == 200 and "ckptkeeper_observer_mode" in body
    assert handle.stop() == 0
    with pytest.raises(OSError):  # the server is closed with the daemon
        urllib.request.urlopen(base + "/healthz", timeout=2)


def test_no_metrics_server_without_a_port(tmp_path: Path, run_daemon: Callable[[Daemon], DaemonThread]) -> None:
    root = tmp_path / "outputs"
    root.mkdir()
    daemon = Daemon(root, Policy(parse_rules("last:1")), root / "_ckptkeeper", WatchOptions(settle=0.3))
    handle = run_daemon(daemon)
    wait_until(lambda: daemon.last_reconcile is not None, 10, "the first reconcile")
    assert daemon.metrics_server is None
    assert handle.stop() == 0


@pytest.mark.parametrize(("poll", "mode"), [(None, "inotify"), (0.5, "polling")])
def test_metrics_made_at_the_first_pass_hold_how_the_daemon_watches(
    tmp_path: Path, run_daemon: Callable[[Daemon], DaemonThread], poll: float | None, mode: str
) -> None:
    """Without a server the metrics are made at the first pass, after the watcher started and the first line was
    said (prometheus_client is not imported before it): they hold the mode set before they were made, and the
    pass's figures."""
    root = tmp_path / "outputs"
    simulate_run(root / "run", SMALL)
    daemon = Daemon(root, Policy(parse_rules("last:1")), root / "_ckptkeeper", WatchOptions(settle=0.0, poll=poll))
    handle = run_daemon(daemon)
    wait_until(lambda: daemon.last_reconcile is not None, 10, "the first reconcile")
    found = samples(daemon.metrics.render().decode())
    assert found[("ckptkeeper_observer_mode", (("mode", mode),))] == 1
    assert found[("ckptkeeper_observer_mode", (("mode", "none"),))] == 0
    on_disk = len(list((root / "run").glob("checkpoint-*")))
    assert found[("ckptkeeper_checkpoints_seen", (("run", "run"),))] == on_disk == 1
    assert handle.stop() == 0


def test_metrics_server_on_its_own(no_thread_leaks: None) -> None:
    metrics = Metrics()
    reason: list[str | None] = ["disk on fire"]
    server = MetricsServer(metrics, lambda: reason[0], "127.0.0.1", 0)
    server.start()
    try:
        base = "http://{}:{}".format(*server.address)
        assert get(base + "/healthz")[:2] == (503, "disk on fire\n")
        reason[0] = None
        assert get(base + "/healthz")[:2] == (200, "ok\n")
        found = samples(get(base + "/metrics")[1])
        assert found[("ckptkeeper_observer_mode", (("mode", "none"),))] == 1
        metrics.set_mode("polling")
        metrics.removed.labels(run="a/b").inc()
        found = samples(get(base + "/metrics")[1])
        assert found[("ckptkeeper_observer_mode", (("mode", "polling"),))] == 1
        assert found[("ckptkeeper_observer_mode", (("mode", "none"),))] == 0
        assert found[("ckptkeeper_checkpoints_removed_total", (("run", "a/b"),))] == 1
        # Each Metrics has its own registry: a second one starts from zero.
        assert (
            samples(Metrics().render().decode()).get(("ckptkeeper_checkpoints_removed_total", (("run", "a/b"),)))
            is None
        )
    finally:
        server.stop()
    assert not server.thread.is_alive()
    assert threading.current_thread() is threading.main_thread()


@pytest.mark.parametrize(
    ("last", "max_age", "now", "expected"),
    [
        (None, 150.0, 1000.0, "no reconcile has finished yet"),
        (1000.0, 150.0, 1000.0, None),
        (900.0, 150.0, 1000.0, None),
        (850.0, 150.0, 1000.0, None),  # exactly max_age old: still fine
        (849.0, 150.0, 1000.0, "the last successful reconcile was 151 s ago (more than 150 s)"),
        (0.0, 150.0, 10000.0, "the last successful reconcile was 10000 s ago (more than 150 s)"),
    ],
)
def test_staleness_problem(last: float | None, max_age: float, now: float, expected: str | None) -> None:
    assert staleness_problem(last, max_age, now) == expected


def test_staleness_problem_defaults_to_the_current_time() -> None:
    assert staleness_problem(time.time() - 1, 150) is None
    problem = staleness_problem(time.time() - 3600, 150)
    assert problem is not None and problem.startswith("the last successful reconcile was 3600 s ago")


def test_cli_watch_serves_metrics(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "run", SMALL)
    shutil.rmtree(root / "run" / "checkpoint-2")
    watch = Watch(
        root, ["--keep", "last:1", "--settle", "0.3", "--metrics-port", "0"], tmp_path / "watch.log", cwd=tmp_path
    )
    try:
        log = watch.wait_log("serving metrics on http://127.0.0.1:")
        match = re.search(r"serving metrics on http://127\.0\.0\.1:(\d+)/metrics and health on /healthz", log)
        assert match, log
        base = f"http://127.0.0.1:{match.group(1)}"
        wait_until(lambda: steps(root / "run") == [8], 15, watch.describe)

        def scraped() -> Samples | None:
            found = samples(get(base + "/metrics")[1])
            done = found.get(("ckptkeeper_checkpoints_removed_total", (("run", "run"),))) == 2
            return found if done and found.get(("ckptkeeper_checkpoints_seen", (("run", "run"),))) == 1 else None

        found = wait_until(scraped, 10, lambda: get(base + "/metrics")[1])
        assert found[("ckptkeeper_checkpoints_kept", (("run", "run"),))] == 1
        assert found[("ckptkeeper_observer_mode", (("mode", "inotify"),))] == 1
        assert get(base + "/healthz")[:2] == (200, "ok\n")
        code, took = watch.terminate()
        assert code == 0, watch.describe()
        assert took < 10
    finally:
        watch.kill()
