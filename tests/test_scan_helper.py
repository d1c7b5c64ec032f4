"""The helper process of a one-shot scan (`ckptkeeper.scan_helper`): a scan that hands checkpoints to it judges every
checkpoint exactly as a scan that reads every file itself, whatever the checkpoints hold, whatever happens to the
helper, and leaves no process or descriptor behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptkeeper import scan, scan_helper
from ckptkeeper.integrity import encode_safetensors
from ckptkeeper.model import Run
from ckptkeeper.scan import find_run_dirs, read_run

MODEL = encode_safetensors({"w": ("float32", [4], bytes(16))}, {"format": "pt"})


def state(step: int, **extra: object) -> dict[str, object]:
    history = [{"step": s, "loss": 0.5, "epoch": s / 100} for s in range(1, step + 1)]
    history.append({"step": step, "eval_loss": 1.0 / step, "eval_acc": 0.5})
    return {"global_step": step, "epoch": step / 100, "log_history": history, **extra}


def checkpoint(run: Path, step: int, doc: object = None, model: bytes = MODEL) -> Path:
    directory = run / f"checkpoint-{step}"
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(model)
    (directory / "trainer_state.json").write_text(json.dumps(state(step) if doc is None else doc))
    return directory


def varied_run(run: Path) -> None:
    """Complete checkpoints among every kind of trouble the scan reports, more than scan.HELPER_MIN in all."""
    for step in range(10, 210, 10):
        checkpoint(run, step)
    (checkpoint(run, 5) / "trainer_state.json").write_bytes(b'{"global_step": 5, "log_history": [')  # cut short
    checkpoint(run, 15, state(16))  # global_step of another
    checkpoint(run, 25, model=MODEL[:-3])  # weights cut short
    (checkpoint(run, 35) / "trainer_state.json").unlink()
    fifo = checkpoint(run, 45) / "trainer_state.json"
    fifo.unlink()
    os.mkfifo(fifo)  # never opened
    linked = checkpoint(run, 55) / "model.safetensors"
    linked.unlink()
    linked.symlink_to(run / "checkpoint-10" / "model.safetensors")  # a link is not checked, nor followed
    (checkpoint(run, 65) / "rng_state_1.pth").write_bytes(b"")  # an empty file: a save in progress
    (checkpoint(run, 75) / ".tmpXYZ.safetensors").write_bytes(b"x")
    (checkpoint(run, 85) / "checkpoint-is-incomplete.txt").write_text("")
    (checkpoint(run, 95) / "trainer_state.json").write_bytes(b"[1, 2]")
    wide = {f"eval_m{i:05d}": float(i) for i in range(6000)}
    # an answer longer than one message: read by the scan itself
    checkpoint(run, 105, {"global_step": 105, "log_history": [{"step": 105, **wide}]})
    many = checkpoint(run, 115)
    for i in range(2500):  # a request longer than one message (the names): read by the scan itself
        (many / f"shard-{i:05d}-of-a-very-long-name.bin").write_bytes(b"w")
    unreadable = checkpoint(run, 125) / "model.safetensors"
    unreadable.chmod(0)  # read as root, it is still read


def read_all(root: Path, now: float) -> list[Run]:
    return [read_run(root, d, now) for d in find_run_dirs(root, 4, (), [])]


def written_a_while_ago() -> float:
    """Wait until what was just written is older than the timestamp tick (so whether a signature vouches does
    not depend on when it is read); a `now` a minute later."""
    time.sleep(2 * scan.TIMESTAMP_TICK)
    return time.time() + 60


def every_field(runs: list[Run]) -> str:
    """The runs with every field of every checkpoint, those `==` leaves out included (the file times, the
    signature...), and NaN equal to NaN."""
    return repr([(run, [checkpoint.signature for checkpoint in run.checkpoints]) for run in runs])


def read_alone(root: Path, now: float, monkeypatch: pytest.MonkeyPatch) -> list[Run]:
    with monkeypatch.context() as m:
        m.setattr(scan, "HELPER_MIN", 1 << 30)
        return read_all(root, now)


@pytest.fixture
def parsed_here(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The trainer_state.json files this process parses (the helper's count is its own)."""
    seen: list[int] = []
    real = scan.__dict__["parse_trainer_state"]

    def counting(data: bytes) -> object:
        seen.append(len(data))
        return real(data)

    monkeypatch.setattr(scan, "parse_trainer_state", counting)
    yield seen


def test_a_scan_with_a_helper_judges_every_checkpoint_as_a_scan_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parsed_here: list[int]
) -> None:
    root = tmp_path / "root"
    varied_run(root / "run")
    for step in range(10, 60, 10):
        checkpoint(root / "other", step)  # fewer than HELPER_MIN: no helper here
    now = written_a_while_ago()
    shared = read_all(root, now)
    helped = len(parsed_here)
    alone = read_alone(root, now, monkeypatch)
    assert every_field(shared) == every_field(alone)
    assert helped < len(parsed_here) - helped  # the helper parsed some of them
    reasons = {c.name: c.incomplete_reason for run in alone for c in run.checkpoints}
    assert sum(reason is None for reason in reasons.values()) > 20
    assert "not valid JSON" in (reasons["checkpoint-5"] or "")
    assert "global_step 16" in (reasons["checkpoint-15"] or "")
    assert "not a regular file" in (reasons["checkpoint-45"] or "")
    assert reasons["checkpoint-55"] is None
    metrics = {c.name: c.metrics for run in alone for c in run.checkpoints}
    assert len(metrics["checkpoint-105"]) == 6000


def test_a_helper_that_dies_costs_nothing_but_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parsed_here: list[int]
) -> None:
    """A helper killed mid-scan (here: it exits at its fourth checkpoint, as the OOM killer would end it): what it
    had not answered is read by the scan itself."""
    root = tmp_path / "root"
    varied_run(root / "run")
    now = written_a_while_ago()
    alone = read_alone(root, now, monkeypatch)
    parsed_here.clear()
    real = scan_helper.__dict__["_read_contents"]
    calls: list[int] = []

    def dying(*args: object) -> object:
        calls.append(1)  # in the helper's own memory: it counts its own calls
        if len(calls) == 4:
            os._exit(9)
        return real(*args)

    monkeypatch.setattr(scan_helper, "_read_contents", dying)
    assert every_field(read_all(root, now)) == every_field(alone)
    total = len([p for p in (root / "run").glob("checkpoint-*/trainer_state.json") if p.is_file()])
    assert total - 3 <= len(parsed_here) <= total  # at most three answered, then everything read here


def children() -> set[str]:
    return {pid for task in Path("/proc/self/task").iterdir() for pid in (task / "children").read_text().split()}


def test_no_process_and_no_descriptor_outlives_the_scan(tmp_path: Path, parsed_here: list[int]) -> None:
    root = tmp_path / "root"
    for step in range(1, 41):
        checkpoint(root / "run", step)
    before = (children(), sorted(os.listdir("/proc/self/fd")))
    [run] = read_all(root, time.time() + 60)
    assert len(run.checkpoints) == 40 and all(c.complete for c in run.checkpoints)
    assert len(parsed_here) < 40  # there was a helper
    assert (children(), sorted(os.listdir("/proc/self/fd"))) == before


def test_there_is_no_helper_while_another_thread_runs(tmp_path: Path, parsed_here: list[int]) -> None:
    """A fork copies only the calling thread: a helper forked beside another thread could inherit a lock held."""
    root = tmp_path / "root"
    for step in range(1, 41):
        checkpoint(root / "run", step)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert scan_helper.Helper.start() is None
        read_all(root, time.time() + 60)
    finally:
        stop.set()
        other.join()
    assert len(parsed_here) == 40


ORPHAN = """
import os
from ckptkeeper.scan_helper import Helper
helper = Helper.start()
assert helper is not None
print(helper.pid, flush=True)
os._exit(0)  # as a scan killed mid-way: no close(), no reaping
"""


def test_a_helper_outlives_no_scan_killed_mid_way() -> None:
    """The scanning process dies without stopping its helper (SIGKILL, the OOM killer): the helper sees its socket
    close and exits, instead of waiting forever as an orphan (holding the scan's stdout and its locks open)."""
    out = subprocess.run([sys.executable, "-c", ORPHAN], capture_output=True, text=True, check=True, timeout=30)
    stat = Path(f"/proc/{int(out.stdout)}/stat")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = stat.read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return  # exited and reaped
        if state in ("Z", "X"):
            return  # exited; its new parent has not reaped it yet
        time.sleep(0.05)
    raise AssertionError(f"the orphaned helper is still running: {stat.read_text()}")


def test_every_case_of_the_hostile_corpus_is_judged_the_same_with_a_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each case's tree read with a helper for every run directory (HELPER_MIN 1) and without one."""
    from tests.test_hostile_corpus import CASES

    built = []
    for number, case in enumerate(CASES):
        place = tmp_path / str(number)
        (place / "outside").mkdir(parents=True)
        try:
            case.build(place / "root")
        except (Exception, pytest.skip.Exception):  # a case that needs what this machine lacks (root, mknod)
            continue
        built.append((place, case))
    now, compared = written_a_while_ago(), 0
    for place, case in built:
        alone = read_alone(place / "root", now, monkeypatch)
        with monkeypatch.context() as m:
            m.setattr(scan, "HELPER_MIN", 1)
            assert every_field(read_all(place / "root", now)) == every_field(alone), case.name
        compared += sum(len(run.checkpoints) for run in alone)
    assert compared > 100
