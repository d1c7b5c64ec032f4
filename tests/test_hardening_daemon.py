"""Issue #10, defects 4, 12 and 14, through the real `ckptkeeper watch` process: a stop honours --grace
during a long archive copy and starts nothing new; --standby takes over from a holder that stops or dies
and says so on /healthz; --exit-when-done never reports success for a run whose retention was refused.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mountutil import own_tmpfs
from watchutil import Watch, steps, wait_until

from ckptkeeper.actions import ARCHIVE_TEMP_PREFIX
from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.state import JOURNAL_NAME, STATE_DIR_NAME

SMALL = SimConfig(steps_per_epoch=10, epochs=2, save_steps=5, eval_steps=5)  # checkpoints 5, 10, 15, 20
BIG_FILE = 768 << 20


@pytest.fixture
def archive_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of its own, large enough for a few big checkpoints: another filesystem than the runs."""
    with own_tmpfs(tmp_path / "archive-fs", "4g") as mount:
        yield mount


def _big_checkpoints(run: Path) -> None:
    simulate_run(run, SMALL)
    for step in (5, 10, 15):
        with open(run / f"checkpoint-{step}" / "optimizer.pt", "r+b") as f:  # a large optimizer state
            f.truncate(BIG_FILE)
            f.seek(BIG_FILE - 1)
            f.write(b"\1")


def _journal(state_dir: Path) -> list[dict[str, object]]:
    path = state_dir / JOURNAL_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_stop_during_a_long_archive_copy_honours_the_grace_and_starts_nothing_new(
    tmp_path: Path, archive_fs: Path
) -> None:
    root = tmp_path / "outputs"
    _big_checkpoints(root / "run")
    sizes = {c.name: os.path.getsize(c / "optimizer.pt") for c in (root / "run").glob("checkpoint-*")}
    archive = archive_fs / "archive"
    watch = Watch(
        root, ["--keep", "last:1", "--archive-to", str(archive), "--settle", "0", "--grace", "2"], tmp_path / "w.log"
    )
    try:
        wait_until(
            lambda: (
                any(p.name.startswith(ARCHIVE_TEMP_PREFIX) for p in (archive / "run").glob("*"))
                if (archive / "run").is_dir()
                else False
            ),
            30,
            watch.describe,
        )
        code, took = watch.terminate()
    finally:
        watch.kill()
    assert code == 0, watch.describe()
    assert took < 2.0, f"the stop took {took:.2f} s, more than --grace 2: {watch.describe()}"
    # The copy cut short is gone (never left under its final name), the source of every checkpoint is whole,
    # and no archive began after the one under way when the signal came.
    assert not [p for p in (archive / "run").iterdir() if p.name.startswith(ARCHIVE_TEMP_PREFIX)]
    starts = [e for e in _journal(root / STATE_DIR_NAME) if e["action"] == "start-archive"]
    assert len(starts) == 1, starts
    for name, size in sizes.items():
        if (root / "run" / name).exists():
            assert os.path.getsize(root / "run" / name / "optimizer.pt") == size
        else:
            assert os.path.getsize(archive / "run" / name / "optimizer.pt") == size
    assert "received SIGTERM" in watch.log() and watch.log().rstrip().endswith("stopped"), watch.describe()
    # The next start archives the rest.
    again = Watch(root, ["--keep", "last:1", "--archive-to", str(archive), "--settle", "0"], tmp_path / "w2.log")
    try:
        wait_until(lambda: steps(root / "run") == [20], 60, again.describe)
        assert sorted(p.name for p in (archive / "run").iterdir()) == ["checkpoint-10", "checkpoint-15", "checkpoint-5"]
    finally:
        again.terminate()


# ---------------------------------------------------------------------------------------------- 14. exit when done
def test_exit_when_done_exits_3_and_never_says_applied_when_a_run_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "typo", SMALL)
    simulate_run(root / "fine", SMALL)
    watch = Watch(
        root,
        ["--keep", "best:1:acuracy", "--exit-when-done", "--settle", "0"],
        tmp_path / "w.log",
    )
    assert watch.wait_exit(30) == 3, watch.describe()
    log = watch.log()
    assert "retention is applied" not in log, log
    assert "run typo: training finished, but its retention was refused: nothing is removed there" in log
    assert "every run has finished training, but retention was refused in fine, typo; exiting with code 3" in log
    assert steps(root / "typo") == steps(root / "fine") == [5, 10, 15, 20]


def test_exit_when_done_in_a_dry_run_says_nothing_was_removed(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "run", SMALL)
    watch = Watch(root, ["--keep", "last:1", "--exit-when-done", "--dry-run", "--settle", "0"], tmp_path / "w.log")
    assert watch.wait_exit(30) == 0, watch.describe()
    log = watch.log()
    assert "retention is applied" not in log and "is pruned" not in log, log
    assert "run run: training finished (dry run: nothing was removed)" in log
    assert "every run has finished training (dry run: nothing was removed); exiting (--exit-when-done)" in log
    assert steps(root / "run") == [5, 10, 15, 20]


# ---------------------------------------------------------------------------------------------- 12. standby
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_standby_sidecars_wait_and_one_takes_over_when_the_holder_stops(tmp_path: Path, how: str) -> None:
    """One sidecar per node over one shared volume: the first holds the root's lock, the others wait
    (healthy, /healthz 200 `standby`), and one takes over within seconds when the holder stops or dies."""
    root = tmp_path / "outputs"
    simulate_run(root / "run", SMALL)
    holder = Watch(root, ["--keep", "last:4", "--settle", "0"], tmp_path / "holder.log")
    holder.wait_log("watching ")
    ports = [_free_port(), _free_port()]
    standbys = [
        Watch(
            root,
            ["--keep", "last:1", "--settle", "0", "--standby", "--metrics-port", str(port)],
            tmp_path / f"standby{i}.log",
        )
        for i, port in enumerate(ports)
    ]
    try:
        for standby, port in zip(standbys, ports, strict=True):
            standby.wait_log("standby: another ckptkeeper")
            status, body = wait_until(lambda p=port: (r := _healthz(p))[0] and r, 10, "/healthz")
            assert (status, body.startswith("standby: another ckptkeeper")) == (200, True), body
        assert steps(root / "run") == [5, 10, 15, 20]
        stopped_at = time.monotonic()
        if how == "SIGKILL":
            holder.kill()
        else:
            assert holder.terminate()[0] == 0
        took_over = wait_until(
            lambda: [s for s in standbys if "taking over" in s.log()],
            10,
            lambda: "\n".join(s.describe() for s in standbys),
        )
        assert len(took_over) == 1 and time.monotonic() - stopped_at < 5
        wait_until(lambda: steps(root / "run") == [20], 15, took_over[0].describe)
        waiting = next(s for s in standbys if s is not took_over[0])
        assert waiting.alive() and "taking over" not in waiting.log()
    finally:
        holder.kill()
        for standby in standbys:
            standby.kill()


def test_without_standby_a_second_watch_exits_4(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "run", SMALL)
    holder = Watch(root, ["--keep", "last:4"], tmp_path / "holder.log")
    try:
        holder.wait_log("watching ")
        second = Watch(root, ["--keep", "last:1"], tmp_path / "second.log")
        assert second.wait_exit(15) == 4, second.describe()
    finally:
        holder.terminate()
