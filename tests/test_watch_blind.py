"""`ckptkeeper watch` must not go blind (issue 10, defect 8), run as a real process on a real filesystem.

1. The inotify watch limit really reached. watchdog raises at start-up when it cannot watch every directory
   below the root, but once watching, it only logs a directory it cannot watch (created later) and goes on:
   that directory and every run below it are unwatched until the next full rescan. The daemon must say so
   once, naming the limit, poll the whole root from then on, and say so in /healthz and the mode metric.
   The limit is per user and machine-wide (fs.inotify.max_user_watches); lowering it would break every other
   inotify user of the machine meanwhile (root's too: it applies to every user). So the daemon runs in a user
   namespace of its own whose limit (user.max_inotify_watches, which the kernel checks beside the global
   one) is lowered: the kernel then refuses its watches with ENOSPC exactly as on a machine at its limit.
2. An archive or state directory whose path is a string prefix of the root (/x/ckpt beside /x/ckpt-live):
   every event below the root looked like ckptkeeper's own and was ignored.

--rescan-interval 600 everywhere: only events (or the poller) can explain what the daemon does in time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from watchutil import Watch, steps, wait_until

from ckptkeeper.simtrainer import SimConfig, simulate_run

SETTLE = ("--settle", "0.3")
NO_RESCAN = ("--rescan-interval", "600")
REACT = 10.0  # seconds: "within a few seconds", against a full rescan only every 600 s
# 8 steps, a checkpoint every 2 (2, 4, 6, 8), no eval and no Trainer best: `last:1` keeps checkpoint-8.
SMALL = SimConfig(steps_per_epoch=4, epochs=2, save_steps=2, eval_strategy="no", metric_for_best_model=None)
RUNS = 40
# Enough for the root and the state directory, not for 40 run directories below them.
WATCH_LIMIT = 20
SYSTEM_LIMIT = Path("/proc/sys/fs/inotify/max_user_watches")
NAMESPACE_LIMIT = Path("/proc/sys/user/max_inotify_watches")
# Runs the daemon in a new user namespace (root in it is the caller) with that namespace's watch limit lowered.
LIMITED = 'echo "$0" > /proc/sys/user/max_inotify_watches && exec "$@"'


@pytest.fixture
def logs(tmp_path: Path) -> Iterator[list[Watch]]:
    started: list[Watch] = []
    yield started
    for w in started:
        w.kill()


def start(started: list[Watch], tmp_path: Path, root: Path, *args: str, prefix: Sequence[str] = ()) -> Watch:
    w = Watch(root, args, tmp_path / f"watch-{len(started)}.log", prefix)
    started.append(w)
    return w


def watch_limit_prefix() -> list[str]:
    """The command prefix that runs the daemon with WATCH_LIMIT inotify watches, or skip (with why)."""
    if not (SYSTEM_LIMIT.exists() and NAMESPACE_LIMIT.exists()):
        pytest.skip("no inotify watch limits on this system (/proc/sys/fs/inotify, /proc/sys/user)")
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to give the daemon a user namespace with a lower watch limit")
    prefix = ["unshare", "--user", "--map-root-user", "sh", "-c", LIMITED, str(WATCH_LIMIT)]
    probe = subprocess.run([*prefix, "cat", str(NAMESPACE_LIMIT)], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a user namespace with a lower inotify watch limit: {probe.stderr.strip()}")
    assert probe.stdout.strip() == str(WATCH_LIMIT), probe
    return prefix


def metrics_base(w: Watch) -> str:
    log = w.wait_log("/metrics and health on /healthz")
    match = re.search(r"serving metrics on (http://127\.0\.0\.1:\d+)/metrics", log)
    assert match, w.describe()
    return match.group(1)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def mode_metric(base: str) -> dict[str, float]:
    found = re.findall(r'^ckptkeeper_observer_mode\{mode="(\w+)"\} (\S+)$', get(base + "/metrics")[1], re.MULTILINE)
    return {mode: float(value) for mode, value in found}


def inotify_watches(w: Watch) -> int:
    """How many inotify watches the daemon holds (the kernel's count, from /proc/PID/fdinfo)."""
    held = 0
    for fd in os.listdir(f"/proc/{w.pid}/fd"):
        try:
            if "inotify" in os.readlink(f"/proc/{w.pid}/fd/{fd}"):
                info = Path(f"/proc/{w.pid}/fdinfo/{fd}").read_text()
                held += sum(line.startswith("inotify wd:") for line in info.splitlines())
        except FileNotFoundError:
            continue  # closed meanwhile
    return held


def limit_warning(root: Path) -> str:
    """The start of the one warning the daemon logs, with the machine's limit as it is now."""
    return (
        f"cannot watch every directory below {root} with inotify: the inotify watch limit is reached "
        f"(fs.inotify.max_user_watches = {int(SYSTEM_LIMIT.read_text())}, per user; "
        f"this user namespace's user.max_inotify_watches = {WATCH_LIMIT}); falling back to polling the whole root"
    )


def assert_polling_for_good(w: Watch, base: str, root: Path) -> None:
    """Polling, said once, and so in /healthz and the mode metric; inotify closed for good."""
    healthz = get(base + "/healthz")
    assert healthz == (200, "ok (polling: the inotify watch limit user.max_inotify_watches is reached)\n"), healthz
    assert mode_metric(base) == {"inotify": 0.0, "polling": 1.0, "none": 0.0}, w.describe()
    # Not one inotify watch left. (An inotify instance may be: watchdog 7.1.1 leaks its file descriptor when an
    # observer is stopped before its reader thread first ran, as after a failed start.)
    assert inotify_watches(w) == 0, w.describe()
    assert w.log().count("cannot watch every directory below") == 1, w.describe()
    assert "raise the limit (sysctl -w user.max_inotify_watches=" in w.log(), w.describe()


def assert_no_failure_logged(w: Watch) -> None:
    text = w.log()
    assert "Traceback" not in text, w.describe()
    assert not [line for line in text.splitlines() if " ERROR " in line or " CRITICAL " in line], w.describe()


# ---- 1. the inotify watch limit ---------------------------------------------------------------------------------
def test_the_watch_limit_reached_at_start_is_said_and_the_root_is_polled(tmp_path: Path, logs: list[Watch]) -> None:
    prefix = watch_limit_prefix()
    root = tmp_path / "outputs"
    for i in range(RUNS):
        (root / f"run-{i:02d}").mkdir(parents=True)
    w = start(logs, tmp_path, root, "--keep", "last:1", *SETTLE, *NO_RESCAN, "--metrics-port", "0", prefix=prefix)
    base = metrics_base(w)
    w.wait_log(limit_warning(root))
    w.wait_log("(polling; settle 0.3 s; full rescan every 600 s)")
    wait_until(lambda: get(base + "/healthz")[0] == 200, REACT, w.describe)
    assert_polling_for_good(w, base, root)

    # None of the run directories could be watched (watchdog drops every watch when start-up fails).
    run = root / f"run-{RUNS - 1:02d}"
    simulate_run(run, SMALL)
    wait_until(lambda: steps(run) == [8], REACT, lambda: f"run-39 pruned to checkpoint-8: {w.describe()}")
    w.wait_log(f"{run.name}/checkpoint-2 deleted: freed ")
    assert_polling_for_good(w, base, root)
    assert_no_failure_logged(w)
    assert w.terminate()[0] == 0


def test_the_watch_limit_reached_by_directories_created_later_switches_to_polling(
    tmp_path: Path, logs: list[Watch]
) -> None:
    """watchdog logs "Unable to watch ..." with the ENOSPC error and goes on; the daemon finds the error
    in that record. If watchdog stopped passing it, this test fails: the daemon would stay on inotify."""
    prefix = watch_limit_prefix()
    root = tmp_path / "outputs"
    root.mkdir()
    w = start(logs, tmp_path, root, "--keep", "last:1", *SETTLE, *NO_RESCAN, "--metrics-port", "0", prefix=prefix)
    base = metrics_base(w)
    w.wait_log("(inotify; settle 0.3 s; full rescan every 600 s)")  # the root and state directory fit
    wait_until(lambda: get(base + "/healthz") == (200, "ok\n"), REACT, w.describe)
    assert mode_metric(base)["inotify"] == 1.0 and inotify_watches(w) >= 2, w.describe()

    for i in range(RUNS):
        (root / f"run-{i:02d}").mkdir()
    w.wait_log(limit_warning(root), timeout=REACT)
    wait_until(lambda: mode_metric(base).get("polling") == 1.0, REACT, w.describe)
    assert_polling_for_good(w, base, root)

    # Created last, when the namespace's 20 watches were long taken: inotify could not watch it.
    blind = root / f"run-{RUNS - 1:02d}"
    simulate_run(blind, SMALL)
    wait_until(lambda: steps(blind) == [8], REACT, lambda: f"{blind.name} pruned to checkpoint-8: {w.describe()}")

    # From now on the poller sees what happens anywhere below the root, a new nested run included.
    nested = root / f"run-{RUNS - 2:02d}" / "sweep" / "lr-1e-4"
    simulate_run(nested, SMALL)
    wait_until(lambda: steps(nested) == [8], REACT, lambda: f"the nested run pruned to checkpoint-8: {w.describe()}")
    assert_polling_for_good(w, base, root)
    assert_no_failure_logged(w)
    assert w.terminate()[0] == 0


# ---- 2. paths compared by component, not by string --------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--archive-to", "--state-dir"])
def test_a_directory_whose_path_is_a_string_prefix_of_the_root_does_not_hide_its_events(
    tmp_path: Path, logs: list[Watch], flag: str
) -> None:
    root = tmp_path / "ckpt-live"
    beside = tmp_path / "ckpt"  # "/x/ckpt" is a string prefix of "/x/ckpt-live/run/checkpoint-2"
    root.mkdir()
    beside.mkdir()
    w = start(logs, tmp_path, root, "--keep", "last:1", *SETTLE, *NO_RESCAN, flag, str(beside))
    w.wait_log("(inotify; settle 0.3 s; full rescan every 600 s)")
    run = root / "run"
    simulate_run(run, SMALL)  # after the first full pass: only its events can make the daemon look
    wait_until(lambda: steps(run) == [8], REACT, lambda: f"run pruned to checkpoint-8: {w.describe()}")
    if flag == "--archive-to":
        wait_until(lambda: steps(beside / "run") == [2, 4, 6], REACT, w.describe)
    else:
        assert (beside / "journal.jsonl").is_file(), w.describe()
    assert_no_failure_logged(w)
    assert w.terminate()[0] == 0
