"""Issue #15, the operator's view, in the log of `ckptkeeper watch` as a real process (tests/watchutil.py): one
line per new checkpoint and per change of its reasons (never a new rank), removals with what kept them until
then, checkpoints removed by someone else, stale incomplete checkpoints said once and counted in a gauge, the
fields of `--log-format json`, and one `stopped` line last. The one-shot commands are in
tests/test_operator_view.py."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchutil import StartWatch, TrainerThread, Watch, journal, wait_until

from ckptkeeper.simtrainer import SaveEvent, SimConfig, simulate_run
from ckptkeeper.units import human_bytes

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", re.MULTILINE)
# The demo's run (ckptkeeper/demo.py): 6 epochs of 20 steps, eval and save every 10; the eval loss turns up
# after 35 % of training, so the best moves on three times and then stays at checkpoint-30.
DEMO = SimConfig(
    steps_per_epoch=20, epochs=6, save_steps=10, eval_steps=10, optimizer_bytes=200_000, seed=7, overfit_after=0.35
)
THREE = SimConfig(steps_per_epoch=10, epochs=3, overfit_after=0.5)  # 10, 20, 30; the Trainer's best is 10
QUARTER = SimConfig(steps_per_epoch=10, epochs=2, save_steps=5, eval_steps=5)  # 5, 10, 15, 20; best is 20
RESCAN = ("--rescan-interval", "0.5")
STALE = (
    "checkpoint-{step} is incomplete (no trainer_state.json) and unchanged for Ns: left by a crash? A resume starts "
    "from the highest step, complete or not (get_last_checkpoint), and would fail here; move it aside or remove it "
    "yourself (ckptkeeper never removes an incomplete checkpoint)"
)
SLIMMED = "removed optimizer.pt, rng_state.pth, scheduler.pt"


def messages(w: Watch) -> list[str]:
    """The log's lines without their time: `INFO    outputs/checkpoint-10 kept: ...`; durations as `Ns`."""
    return re.sub(r"unchanged for \d+s", "unchanged for Ns", STAMP.sub("", w.log())).splitlines()


def incomplete(run: Path, step: int) -> None:
    """What a crash leaves: the checkpoint's directory and the safetensors writer's temporary file."""
    (run / f"checkpoint-{step}").mkdir()
    (run / f"checkpoint-{step}" / "model.safetensors.tmp").write_bytes(b"x" * 100)


def freed(root: Path) -> dict[str, str]:
    """checkpoint -> the bytes its removal (or slim) freed, as the log words them (from the journal)."""
    return {str(e["checkpoint"]): human_bytes(int(e["bytes"])) for e in journal(root / "_ckptkeeper")}


# ---- a live run: one line per new checkpoint, per lost reason, per removal -------------------------------------
def demo_lines(root: Path, size: dict[str, str]) -> list[str]:
    """What the log says of the demo's run, in order (sizes from the journal)."""

    def kept(step: int, also: str = "") -> str:
        return f"INFO    outputs/checkpoint-{step} kept: newest{also}"

    def gone(step: int) -> str:
        amount = size[f"checkpoint-{step}"]
        return f"INFO    outputs/checkpoint-{step} deleted: freed {amount} (no rule keeps it; was last 5/5)"

    def slim(step: int, epoch: int) -> str:
        return (
            f"INFO    outputs/checkpoint-{step} made weights only: {SLIMMED}, freed {size[f'checkpoint-{step}']} "
            f"(epoch {epoch} (weights only); was last 5/5)"
        )

    def no_longer_best(step: int, loss: str) -> str:
        return (
            f"INFO    outputs/checkpoint-{step} still kept: last 2/5 (no longer {best(loss)}, protected: trainer best)"
        )

    def best(loss: str) -> str:
        return f"best eval_loss={loss} (1/1)"

    return [
        f"INFO    watching {root} (inotify; settle 0.3 s; full rescan every 60 s)",
        kept(10, f", {best('0.6737')}, protected: trainer best"),
        no_longer_best(10, "0.6737"),
        kept(20, f", {best('0.6446')}, protected: trainer best"),
        no_longer_best(20, "0.6446"),
        kept(30, f", {best('0.5884')}, protected: trainer best"),
        *(kept(step) for step in (40, 50, 60)),
        gone(10),
        kept(70),
        slim(20, 1),
        f"INFO    outputs/checkpoint-30 still kept: {best('0.5884')}, protected: trainer best (no longer last 5/5)",
        kept(80),
        kept(90),
        slim(40, 2),
        kept(100),
        gone(50),
        kept(110),
        slim(60, 3),
        kept(120),
        gone(70),
        "INFO    run outputs: training finished and its retention is applied",
        "INFO    received SIGTERM: finishing the current step and stopping",
        "INFO    stopped",
    ]


def test_the_log_of_a_live_run_says_each_change_once_and_stops_with_one_line(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    root.mkdir()
    w = watch(root, "--keep", "best:1,last:5", "--keep-weights", "epoch:all", "--settle", "0.3")
    w.wait_log("watching ")

    def seen(event: SaveEvent) -> None:  # the next save only once the daemon has said this one is kept
        w.wait_log(f"outputs/checkpoint-{event.step} kept: ")

    trainer = TrainerThread(root, DEMO, on_save=seen)
    trainer.start()
    trainer.finish(60)
    w.wait_log("run outputs: training finished")
    assert w.terminate()[0] == 0
    lines = messages(w)
    assert lines == demo_lines(root, freed(root)), w.describe()
    assert [line for line in lines if "stopped" in line] == ["INFO    stopped"]
    assert not [line for line in lines if "last 1/5" in line or "protected: newest" in line]


# ---- stale incomplete checkpoints, a checkpoint removed by someone else ------------------------------------------
def metric_value(url: str, sample: str) -> float | None:
    """The value of one sample (`name{labels}`) on the daemon's /metrics, None when absent."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def wait_passes(url: str, passes: int) -> None:
    """Until the daemon has made `passes` more full reconciles (`--rescan-interval`)."""
    sample = 'ckptkeeper_reconcile_duration_seconds_count{scope="all"}'
    start = metric_value(url, sample) or 0.0
    wait_until(lambda: (metric_value(url, sample) or 0.0) >= start + passes, 15, f"{passes} more reconciles")


def test_a_stale_checkpoint_is_said_once_and_counted_and_a_vanished_one_is_said_once(
    tmp_path: Path, watch: StartWatch
) -> None:
    root = tmp_path / "outputs"
    simulate_run(root, THREE)
    w = watch(root, "--keep", "last:3", "--settle", "0", "--stale-after", "1s", *RESCAN, "--metrics-port", "0")
    found = re.search(r"serving metrics on (http://127\.0\.0\.1:\d+/metrics)", w.wait_log("serving metrics on"))
    assert found, w.describe()
    url, gauge = found.group(1), 'ckptkeeper_stale_incomplete_checkpoints{run="."}'
    w.wait_log("training finished")  # (checkpoint-30 says so: said again once checkpoint-40 is gone)
    incomplete(root, 40)  # a crash of the next save: stale after a second unchanged
    w.wait_log("checkpoint-40 is incomplete")
    assert metric_value(url, gauge) == 1.0
    wait_passes(url, 3)
    shutil.rmtree(root / "checkpoint-20")  # kept (last 2/3): someone else removes it
    w.wait_log("vanished")
    wait_passes(url, 3)
    shutil.rmtree(root / "checkpoint-40")  # the person did as told
    wait_until(lambda: metric_value(url, gauge) == 0.0, 15, "the gauge back to 0")
    w.wait_log("training finished", count=2)
    assert w.terminate()[0] == 0
    assert messages(w)[1:] == [
        f"INFO    watching {root} (inotify; settle 0 s; full rescan every 0.5 s)",
        "INFO    outputs/checkpoint-10 kept: last 3/3, protected: trainer best",
        "INFO    outputs/checkpoint-20 kept: last 2/3",
        "INFO    outputs/checkpoint-30 kept: newest",
        "INFO    run outputs: training finished and its retention is applied",
        f"WARNING run outputs: {STALE.format(step=40)}",
        "INFO    outputs/checkpoint-20 vanished: removed by something else (was last 2/3)",
        "INFO    run outputs: training finished and its retention is applied",
        "INFO    received SIGTERM: finishing the current step and stopping",
        "INFO    stopped",
    ], w.describe()


# ---- --log-format json -----------------------------------------------------------------------------------------
def reason(kind: str, rule: str | None, rank: int | None, text: str) -> dict[str, Any]:
    return {"kind": kind, "rule": rule, "rank": rank, "released": False, "until": None, "text": text}


def by_action(records: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("action") == action]


def test_json_log_lines_carry_the_checkpoint_the_action_and_the_reasons(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "exp1", QUARTER)  # last:2 keeps 15, 20; epoch:all 10 as weights only; 5 goes
    incomplete(root / "exp1", 25)
    flags = ("--keep", "last:2", "--keep-weights", "epoch:all", "--settle", "0", "--stale-after", "1s", *RESCAN)
    w = watch(root, *flags, "--log-format", "json")
    w.wait_log('"stale-incomplete"')
    shutil.rmtree(root / "exp1" / "checkpoint-15")
    w.wait_log('"vanished"')
    assert w.terminate()[0] == 0
    records: list[dict[str, Any]] = [json.loads(line) for line in w.lines()]
    base = {"time", "level", "logger", "message"}
    fields = base | {"run", "checkpoint", "step", "action", "bytes", "reasons"}
    assert all(set(r) in (base, fields) for r in records), records
    size = {e["checkpoint"]: e["bytes"] for e in journal(root / "_ckptkeeper")}

    def one(action: str, checkpoint: str) -> dict[str, Any]:
        [record] = [r for r in by_action(records, action) if r["checkpoint"] == checkpoint]
        assert record["run"] == "exp1" and record["level"] in ("info", "warning"), record
        return {k: record[k] for k in ("step", "bytes", "reasons")}

    last_2 = reason("last", "last:2", 2, "last 2/2")
    assert one("kept", "checkpoint-15") == {"step": 15, "bytes": None, "reasons": [last_2]}
    assert one("kept", "checkpoint-20") == {
        "step": 20,
        "bytes": None,
        "reasons": [
            reason("last", "last:2", 1, "last 1/2"),
            reason("newest", "protected:newest", None, "protected: newest"),
            reason("trainer-best", "protected:trainer-best", None, "protected: trainer best"),
        ],
    }
    deleted = {
        "step": 5,
        "bytes": size["checkpoint-5"],
        "reasons": [reason("no-rule-keeps", None, None, "no rule keeps it")],
    }
    assert one("delete", "checkpoint-5") == deleted
    epoch_1 = reason("epoch", "epoch:all", 2, "epoch 1 (weights only)")
    assert one("slim", "checkpoint-10") == {"step": 10, "bytes": size["checkpoint-10"], "reasons": [epoch_1]}
    assert one("stale-incomplete", "checkpoint-25") == {"step": 25, "bytes": None, "reasons": []}
    [stale] = by_action(records, "stale-incomplete")
    assert stale["level"] == "warning" and stale["message"].startswith("run exp1: checkpoint-25 is incomplete")
    assert records[-1] == {k: records[-1][k] for k in base} and records[-1]["message"] == "stopped"
    vanished = one("vanished", "checkpoint-15")
    assert vanished["bytes"] is None and vanished["reasons"] == [last_2]
    assert vanished["step"] == 15  # known from its name, as in every other line of a checkpoint


# ---- a stop cut short -----------------------------------------------------------------------------------------------
BIG = 512 << 20


def test_a_stop_during_an_archive_copy_says_stopped_once_and_last(
    tmp_path: Path, watch: StartWatch, mount: Callable[..., Path]
) -> None:
    root = tmp_path / "outputs"
    simulate_run(root, SimConfig(steps_per_epoch=10, epochs=2, save_steps=10, eval_steps=10))  # 10 and 20
    with open(root / "checkpoint-10" / "optimizer.pt", "r+b") as f:  # a large, sparse optimizer state
        f.truncate(BIG)
        f.seek(BIG - 1)
        f.write(b"\1")
    archive = mount("tmpfs", "archive-fs", "size=768m") / "archive"
    w = watch(root, "--keep", "last:1", "--archive-to", str(archive), "--settle", "0")
    wait_until(lambda: archive.is_dir() and any(archive.rglob(".*")), 30, w.describe)  # the copy is under way
    assert w.terminate()[0] == 0
    lines = messages(w)
    cut = [line for line in lines if "checkpoint-10: cut short by the stop" in line]
    assert len(cut) == 1, w.describe()  # the copy was interrupted: the checkpoint stays whole
    assert (root / "checkpoint-10" / "optimizer.pt").stat().st_size == BIG
    assert lines[-1] == "INFO    stopped", w.describe()
    assert [line for line in lines if "stopped" in line] == ["INFO    stopped"], w.describe()
