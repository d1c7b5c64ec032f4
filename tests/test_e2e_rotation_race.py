"""End to end: ckptkeeper races the real Hugging Face Trainer's own `save_total_limit` rotation.

Two real Trainers (`tests/e2e/train_hf.py`: transformers 5.24 on the CPU, offline) save and evaluate at every
step for 30 steps with `save_total_limit=3` and `metric_for_best_model="eval_loss"`: right after each
`trainer_state.json` the Trainer's own rotation `shutil.rmtree`s its oldest unprotected checkpoint. Beside them:

- `watched/`: a real `ckptkeeper watch watched --keep best:1,last:2 --settle 0.2` process. The Trainer's steps
  sleep a random 0.02-0.3 s, about the daemon's settle time plus its reaction, so the daemon's removal of a
  checkpoint (0.2 s after the newest settles) keeps landing near the Trainer's rotation of the same one at the
  next save; its reads are woken by the very events of the Trainer's writes and rmtrees. In the same loop the
  test plans that root read-only (scan and plan need no lock) and tries `ckptkeeper prune` there through the
  CLI now and then, which must exit 4: the daemon holds the root's lock.
- `pruned/`: this test process holds the root's lock and runs scan, plan and act through the engine
  (`Pipeline.survey` / `Pipeline.act`, settle 0 as `prune` has) in a tight loop. Both ckptkeeper and the Trainer want
  the same old checkpoint gone the moment the newest `trainer_state.json` is written, so scans read
  checkpoints the Trainer is deleting, plans name checkpoints the Trainer removes before they are acted on,
  and renames hit directories that are already gone or half emptied.

What the test counts (printed as "races tried"): checkpoints that vanished between listing and reading, reads
of a half-deleted checkpoint (judged incomplete, or, with settle 0, judged complete because the files already
unlinked include every `*.safetensors` while trainer_state.json is still there), planned removals found gone
or changed at the re-check, renames of an already-removed directory (FileNotFoundError handled), renames of
a directory the Trainer's rmtree was emptying, and refused `prune` runs (lock held). The counts vary from
run to run (they are races); the test requires at least one overlap in all.

What it asserts, from the runs' own records (log_history and what a TrainerCallback saw on disk after every
save), never from ckptkeeper's planner:

- both trainings finish normally (exit 0, no traceback) and load their best model at the end, with one
  exception that is transformers' own bug, not ckptkeeper's: its rotation lists `checkpoint-*` and then stats
  each without handling FileNotFoundError, so a removal landing in those microseconds crashes the training
  (pinned by test_the_real_rotation_crashes_if_a_checkpoint_goes_mid_listing). The settle-0 loop on `pruned/`
  acts the moment a save completes, right when the Trainer lists, and hit it in about 1 run of 6 here. Such a
  crash is accepted only when it is exactly that (the traceback, and a checkpoint ckptkeeper's journal shows
  it removed); it is printed as a figure, and everything else is still checked on what was saved;
- the daemon logged no error, warning or traceback, is alive at the end, and exits 0 on SIGTERM;
- ckptkeeper never removed a checkpoint its rules keep at the end (the best by eval_loss and the last 2), nor
  the Trainer's current best (no later save names a removed checkpoint as best), nor one of the 2 newest
  complete checkpoints at the moment it removed it (bounded by the save records' times);
- each final set on disk is exactly the best and the last 2, complete and untouched since it was saved;
  the journals hold only start/outcome pairs; no trash, temp or stray entries are left;
- at least one overlap really happened (the figures show how many of each).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from click.testing import CliRunner
from e2eutil import (
    TRAIN_SCRIPT,
    checkpoints_on_disk,
    file_listing,
    json_lines,
    require_training_stack,
    stop,
    tail,
    wait_for,
)

from ckptkeeper.actions import RUN_TRASH_NAME, TrashEntry, finish_entry
from ckptkeeper.cli import EXIT_LOCKED, main
from ckptkeeper.engine import PassResult, Pipeline
from ckptkeeper.model import Outcome
from ckptkeeper.pins import PINS_LOCK_NAME, REMOVING_NAME
from ckptkeeper.policy import Policy
from ckptkeeper.rules import parse_rules
from ckptkeeper.scan import ScanOptions
from ckptkeeper.scan_memo import MEMO_NAME
from ckptkeeper.state import ROOT_LOCK_NAME, STATE_DIR_NAME

pytestmark = pytest.mark.e2e

KEEP = "best:1,last:2"
SETTLE = 0.2
STEPS = 30  # one save and one eval per step
LIMIT = 3  # the Trainer's save_total_limit
# Seconds each optimizer step sleeps, drawn at random per step (see train_hf.py --step-sleep-max).
WATCHED_SLEEP = ("0.02", "0.3")  # saves ~0.2-0.35 s apart: around the daemon's settle + reaction time
PRUNED_SLEEP = ("0", "0.06")
TRAIN_SECONDS = 150.0  # a bound for the failure message; ~25 s here, most of it importing torch
DAEMON_SECONDS = 30.0
CLI_SECONDS = 0.5  # how often the loop tries `ckptkeeper prune` on the watched root (it must exit 4)
FULL_CHECKPOINT = {
    "config.json",
    "model.safetensors",
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
}
DECISION = re.compile(r"(?:\./)?checkpoint-(\d+) (kept|waiting|delete|archive): (.*)")
OUTCOME = re.compile(r"(?:\./)?checkpoint-(\d+) (deleted|vanished|skipped)\b(.*)")


# ---- helpers ---------------------------------------------------------------------------------------


def journal_time(entry: dict[str, Any]) -> float:
    # Written with millisecond precision, truncated: the moment itself is up to 1 ms later.
    return dt.datetime.fromisoformat(entry["time"]).timestamp() + 0.001


def train_command(out: Path, summary: Path, sleep: tuple[str, str]) -> list[str]:
    return [
        sys.executable, os.fspath(TRAIN_SCRIPT), os.fspath(out), "--summary", os.fspath(summary),
        "--max-steps", str(STEPS), "--save-steps", "1", "--save-total-limit", str(LIMIT),
        "--step-sleep", sleep[0], "--step-sleep-max", sleep[1],
    ]  # fmt: skip


class Observer:
    """Counts the overlaps one loop of scans, plans and removals met on one root."""

    def __init__(self, counts: Counter[str], prefix: str) -> None:
        self.counts = counts
        self.prefix = prefix
        self.seen_complete: dict[int, int] = {}  # step -> its size when first seen complete
        self.reasons: Counter[str] = Counter()

    def scanned(self, result: PassResult) -> None:
        self.counts[f"{self.prefix}: scans"] += 1
        for plan in result.plan.runs:
            for c in plan.run.checkpoints:
                if c.complete:
                    whole = self.seen_complete.setdefault(c.step, c.size_bytes)
                    if c.size_bytes < whole:
                        # Files already unlinked, trainer_state.json not yet: with no settle time the SPEC's
                        # checks pass (no *.safetensors left to be invalid).
                        self.counts[f"{self.prefix}: judged complete while half deleted"] += 1
                elif c.step in self.seen_complete:
                    # It was whole and complete at an earlier scan: someone is removing it right now.
                    reason = c.incomplete_reason or ""
                    if reason == "vanished while reading":
                        self.counts[f"{self.prefix}: listed, then gone before it was read"] += 1
                    else:
                        self.counts[f"{self.prefix}: read while half deleted"] += 1
                        self.reasons[re.sub(r"[\d.]+ s ago", "N s ago", reason)] += 1


@dataclass(frozen=True)
class RaceFiles:
    """The two roots, and where the daemon and each training write their records."""

    tmp: Path
    watched: Path
    pruned: Path
    daemon_log: Path
    summaries: dict[str, Path]
    stderr_of: dict[str, Path]

    @classmethod
    def under(cls, tmp_path: Path) -> RaceFiles:
        return cls(
            tmp=tmp_path,
            watched=tmp_path / "watched",
            pruned=tmp_path / "pruned",
            daemon_log=tmp_path / "daemon.log",
            summaries={"watched": tmp_path / "watched.summary.json", "pruned": tmp_path / "pruned.summary.json"},
            stderr_of={"watched": tmp_path / "watched.train.stderr", "pruned": tmp_path / "pruned.train.stderr"},
        )

    @property
    def roots(self) -> dict[str, Path]:
        return {"watched": self.watched, "pruned": self.pruned}

    def context(self) -> str:
        return (
            f"--- daemon log (tail)\n{tail(self.daemon_log)}\n"
            + "".join(f"--- {n} trainer stderr (tail)\n{tail(p, 15)}\n" for n, p in self.stderr_of.items())
            + f"--- on disk: watched {sorted(os.listdir(self.watched))}, pruned {sorted(os.listdir(self.pruned))}"
        )


class PruneLoop:
    """The test's own prune on `pruned/`: scan, plan and act through the engine (settle 0, as `prune` has),
    holding the root's lock, counting what each removal met."""

    def __init__(self, pruned: Path, counts: Counter[str]) -> None:
        self.root = pruned
        self.counts = counts
        self.observer = Observer(counts, "pruned (engine in-process)")
        self.policy = Policy(parse_rules(KEEP))
        # The default scan options: settle 0, as `prune` has.
        self.pipeline = Pipeline.checked(pruned, self.policy, state_dir=pruned / STATE_DIR_NAME, dispose=self.dispose)
        self.outcomes: list[Outcome] = []
        self.stuck: list[str] = []

    def on_outcome(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        what = {
            "delete": "removed by ckptkeeper",
            "skipped": "re-check found it changed (half deleted), left alone",
            "error": "ERROR",
        }.get(outcome.action, outcome.action)
        if outcome.action == "vanished":
            what = (
                "planned, gone at the re-check"
                if "before ckptkeeper got to it" in outcome.detail
                else "rename of an already-removed dir (FileNotFoundError handled)"
            )
        self.counts[f"{self.observer.prefix}: {what}"] += 1

    def dispose(self, trash_entry: TrashEntry) -> None:
        # What the daemon's reaper does, plus a look at what the rename took: fewer files than a saved
        # checkpoint means the Trainer's rmtree was emptying it at that moment (it goes on through its fd).
        if set(os.listdir(trash_entry.shown)) != FULL_CHECKPOINT:
            self.counts[f"{self.observer.prefix}: renamed while the Trainer's rmtree was emptying it"] += 1
        finish_entry(trash_entry, self.stuck)
        trash_entry.close()

    def prune_pass(self) -> None:
        result = self.pipeline.survey(now=time.time())
        self.observer.scanned(result)
        self.pipeline.act(result.plan, self.on_outcome)


class WatchedProbe:
    """Beside the daemon on `watched/`: a read-only plan (scan and plan need no lock) at every turn of the
    loop, and every CLI_SECONDS a `ckptkeeper prune` through the CLI, which must exit 4 (the lock is held)."""

    def __init__(self, watched: Path, counts: Counter[str]) -> None:
        self.root = watched
        self.observer = Observer(counts, "watched (plan beside the daemon)")
        self.policy = Policy(parse_rules(KEEP))
        self.pipeline = Pipeline.checked(watched, self.policy, ScanOptions(settle=SETTLE), watched / STATE_DIR_NAME)
        self.runner = CliRunner()
        self.cli_exits: Counter[int] = Counter()
        self.next_cli = time.monotonic()

    def probe(self, context: Callable[[], str]) -> None:
        self.observer.scanned(self.pipeline.survey(now=time.time()))
        if time.monotonic() >= self.next_cli:
            self.next_cli = time.monotonic() + CLI_SECONDS
            result = self.runner.invoke(main, ["prune", os.fspath(self.root), "--keep", KEEP])
            self.cli_exits[result.exit_code] += 1
            assert result.exit_code == EXIT_LOCKED, (result.exit_code, result.output, context())


def start_daemon(files: RaceFiles, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with files.daemon_log.open("wb") as dlog:
        return subprocess.Popen(
            [sys.executable, "-m", "ckptkeeper", "watch", os.fspath(files.watched), "--keep", KEEP,
             "--settle", str(SETTLE), "--log-format", "json", "-v"],
            stdout=subprocess.DEVNULL, stderr=dlog, stdin=subprocess.DEVNULL, cwd=files.tmp, env=env,
        )  # fmt: skip


def start_trainers(files: RaceFiles, env: dict[str, str], trainers: dict[str, subprocess.Popen[bytes]]) -> None:
    """Start both trainings, each into `trainers` as soon as it runs (so that a failure stops those started)."""
    for name, out, sleep in (("watched", files.watched, WATCHED_SLEEP), ("pruned", files.pruned, PRUNED_SLEEP)):
        with files.stderr_of[name].open("wb") as terr:
            trainers[name] = subprocess.Popen(
                train_command(out, files.summaries[name], sleep),
                stdout=subprocess.DEVNULL, stderr=terr, stdin=subprocess.DEVNULL, cwd=files.tmp, env=env,
            )  # fmt: skip


def wait_until_watching(files: RaceFiles, daemon: subprocess.Popen[bytes]) -> None:
    def daemon_ready() -> bool:
        assert daemon.poll() is None, f"the daemon exited early ({daemon.returncode})\n{files.context()}"
        return any(str(e.get("message", "")).startswith("watching ") for e in json_lines(files.daemon_log))

    wait_for(daemon_ready, DAEMON_SECONDS, "the daemon did not start watching", files.context)


def wait_for_first_save(files: RaceFiles, trainers: dict[str, subprocess.Popen[bytes]]) -> None:
    wait_for(
        lambda: (
            bool(checkpoints_on_disk(files.watched) or checkpoints_on_disk(files.pruned))
            or any(p.poll() is not None for p in trainers.values())
        ),
        TRAIN_SECONDS,
        "no checkpoint was saved",
        files.context,
    )


def race(
    files: RaceFiles,
    daemon: subprocess.Popen[bytes],
    trainers: dict[str, subprocess.Popen[bytes]],
    pruner: PruneLoop,
    prober: WatchedProbe,
) -> None:
    """The race: prune `pruned/` and probe `watched/` in a loop until both trainings are over."""
    deadline = time.monotonic() + TRAIN_SECONDS
    while any(p.poll() is None for p in trainers.values()):
        if time.monotonic() > deadline:
            pytest.fail(f"training did not finish within {TRAIN_SECONDS:g} s\n{files.context()}", pytrace=False)
        assert daemon.poll() is None, f"the daemon died during training ({daemon.returncode})\n{files.context()}"
        if trainers["pruned"].poll() is None:
            pruner.prune_pass()
        prober.probe(files.context)


def read_trainings(
    files: RaceFiles, trainers: dict[str, subprocess.Popen[bytes]]
) -> tuple[dict[str, dict[str, Any]], dict[str, str | None], dict[str, set[int]]]:
    """Each training's summary, the checkpoint it crashed on (transformers' listing race) if it did, and the
    final set its root must hold."""
    expected: dict[str, set[int]] = {}
    summary: dict[str, dict[str, Any]] = {}
    crashed: dict[str, str | None] = {}
    for name in trainers:
        summary[name] = json.loads(files.summaries[name].read_text(encoding="utf-8"))
        crashed[name] = listing_crash(summary[name])
        expected[name] = final_set(summary[name], crashed[name] is not None)
    return summary, crashed, expected


def wait_until_caught_up(files: RaceFiles, expected: set[int]) -> None:
    trash = files.watched / STATE_DIR_NAME / "trash"
    wait_for(
        lambda: checkpoints_on_disk(files.watched) == expected and not os.listdir(trash),
        DAEMON_SECONDS,
        f"the daemon did not bring the watched root to {sorted(expected)} with an empty trash",
        files.context,
    )


def stop_daemon_cleanly(files: RaceFiles, daemon: subprocess.Popen[bytes]) -> None:
    """The daemon is still alive, and stops cleanly on SIGTERM."""
    assert daemon.poll() is None, f"the daemon is not alive at the end ({daemon.returncode})\n{files.context()}"
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=DAEMON_SECONDS) == 0, f"the daemon exited {daemon.returncode}\n{files.context()}"


def tally_figures(
    counts: Counter[str],
    entries: list[dict[str, Any]],
    cli_exits: Counter[int],
    journals: dict[str, list[dict[str, Any]]],
    crashed: dict[str, str | None],
) -> None:
    """Add to `counts` what the daemon's log, the CLI's exits and the journals show."""
    count_daemon_races(entries, counts)
    counts["watched (plan beside the daemon): `ckptkeeper prune` refused, lock held (exit 4)"] = cli_exits[EXIT_LOCKED]
    for name, journal in journals.items():
        counts[f"{name}: removals journaled"] = sum(e.get("action") == "delete" for e in journal)
        counts[f"{name}: the Trainer crashed in its own listing (the transformers race)"] = int(bool(crashed[name]))


def print_figures(counts: Counter[str], timings: dict[str, float], on_pruned: Observer, on_watched: Observer) -> None:
    at = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    print(f"\nraces tried (real Trainer rotation, save_total_limit={LIMIT}, {STEPS} saves per root; {at}):")
    print("| where: what | count |\n|---|---:|")
    for key in sorted(counts):
        print(f"| {key} | {counts[key]} |")
    if on_pruned.reasons or on_watched.reasons:
        print(f"half-deleted reads, by reason: {dict(on_pruned.reasons + on_watched.reasons)}")


def check_trainings(
    files: RaceFiles,
    trainers: dict[str, subprocess.Popen[bytes]],
    summary: dict[str, dict[str, Any]],
    crashed: dict[str, str | None],
    journals: dict[str, list[dict[str, Any]]],
) -> None:
    """Both trainings finished and loaded their best model (or crashed of transformers' own race, no other)."""
    for name, proc in trainers.items():
        stderr_text = files.stderr_of[name].read_text(encoding="utf-8", errors="replace")
        if crash := crashed[name]:
            # The one way the training may end early here: transformers' own race (see the test below), hit by
            # a removal of ckptkeeper's landing between the rotation's glob and its stat. Nothing else.
            assert proc.returncode != 0, summary[name]["error"]
            removed_then = [e for e in journals[name] if e.get("action") == "delete" and e["checkpoint"] == crash]
            assert removed_then, f"{name}: the Trainer crashed on {crash}, which ckptkeeper did not remove"
            continue
        assert proc.returncode == 0, f"the {name} training failed ({proc.returncode})\n{files.context()}"
        assert "Traceback" not in stderr_text and "FileNotFoundError" not in stderr_text, tail(files.stderr_of[name])
        s = summary[name]
        assert s["ok"] and s["error"] is None, s["error"]
        assert s["global_step"] == STEPS, s["global_step"]
        assert s["best_model_loaded"], f"{name}: the Trainer did not load its best model: {s['load_best']}"


# ---- the test --------------------------------------------------------------------------------------
def test_ckptkeeper_races_the_real_trainers_own_rotation(tmp_path: Path) -> None:
    require_training_stack()
    started = time.monotonic()
    files = RaceFiles.under(tmp_path)
    files.watched.mkdir()
    files.pruned.mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": os.fspath(tmp_path / "hf-home"),
        "PYTHONUNBUFFERED": "1",
    }
    daemon = start_daemon(files, env)
    trainers: dict[str, subprocess.Popen[bytes]] = {}
    counts: Counter[str] = Counter()
    pruner = PruneLoop(files.pruned, counts)
    prober = WatchedProbe(files.watched, counts)
    timings: dict[str, float] = {}
    try:
        pruner.pipeline.acquire()
        start_trainers(files, env, trainers)
        # The daemon is up in a second or two; the trainers take several seconds to import torch.
        wait_until_watching(files, daemon)
        timings["daemon watching"] = time.monotonic() - started
        wait_for_first_save(files, trainers)
        timings["first save"] = time.monotonic() - started
        race(files, daemon, trainers, pruner, prober)
        timings["training over"] = time.monotonic() - started
        pruner.prune_pass()  # the last save's rotation is over: one more pass settles the pruned root
        pruner.pipeline.release()

        # ---- the daemon catches up, is still alive, and stops cleanly on SIGTERM ----------------------
        summary, crashed, expected = read_trainings(files, trainers)
        wait_until_caught_up(files, expected["watched"])
        timings["daemon caught up"] = time.monotonic() - started
        stop_daemon_cleanly(files, daemon)
    finally:
        for proc in trainers.values():
            stop(proc)
        stop(daemon)
        pruner.pipeline.release()

    # ---- the figures (printed first, so that a failure below still shows them) ---------------------------
    entries = json_lines(files.daemon_log)
    journals = {name: json_lines(root / STATE_DIR_NAME / "journal.jsonl") for name, root in files.roots.items()}
    tally_figures(counts, entries, prober.cli_exits, journals, crashed)
    print_figures(counts, timings, pruner.observer, prober.observer)

    # ---- the daemon's log: no error, no warning, no traceback ------------------------------------------
    bad = [e for e in entries if e.get("level") not in ("debug", "info") or "exception" in e or "unparsed" in e]
    assert not bad, f"the daemon logged failures or warnings: {bad}"

    # ---- both trainings finished and loaded their best model -------------------------------------------
    check_trainings(files, trainers, summary, crashed, journals)

    # ---- ckptkeeper removed nothing its rules keep; the final sets are right and clean -----------------
    for name, root in files.roots.items():
        check_root(name, root, summary[name], expected[name])
    assert not pruner.stuck, f"trash entries that could not be deleted: {pruner.stuck}"
    assert not [o for o in pruner.outcomes if o.action == "error"], pruner.outcomes
    overlaps = sum(
        n for k, n in counts.items() if not k.endswith(("scans", "removed by ckptkeeper", "journaled", "(exit 4)"))
    )
    assert overlaps > 0, f"no race with the Trainer's rotation was observed: {dict(counts)}"


def listing_crash(summary: dict[str, Any]) -> str | None:
    """The checkpoint name, if the training died of transformers' own listing race: sort_checkpoints stats a
    checkpoint its glob listed, which someone removed in between (FileNotFoundError from os.path.getmtime)."""
    error = summary.get("error") or {}
    trace = str(error.get("traceback", ""))
    if error.get("type") != "FileNotFoundError" or "in sort_checkpoints" not in trace or "getmtime" not in trace:
        return None
    missing = re.search(r"No such file or directory: '([^']+)'", str(error.get("message")))
    assert missing, error
    return Path(missing.group(1)).name


def final_set(summary: dict[str, Any], crashed: bool) -> set[int]:
    """The best by eval_loss (lowest; on a tie the lower step) and the last 2 saves, from the run's records.
    A training that crashed in its rotation wrote that save's checkpoint whole but never recorded it."""
    last = summary["global_step"]
    assert crashed or last == STEPS, summary["error"]
    recorded = sorted(r["global_step"] for r in summary["saves"])
    assert recorded == list(range(1, last if crashed else last + 1)), recorded
    steps = list(range(1, last + 1))
    loss = {e["step"]: e["eval_loss"] for e in summary["log_history"] if "eval_loss" in e}
    assert set(loss) == set(steps) and not any(math.isnan(v) for v in loss.values()), loss
    best = min(steps, key=lambda s: (loss[s], s))
    assert best == summary["best_global_step"], (best, summary["best_global_step"])
    return {best, *steps[-2:]}


def count_daemon_races(entries: list[dict[str, Any]], counts: Counter[str]) -> None:
    """What the daemon's own (debug) log shows: a checkpoint it had judged kept and complete that it then
    saw incomplete is one it read while the Trainer removed it; and its outcomes."""
    where = "watched (ckptkeeper watch)"
    word: dict[int, str] = {}
    for entry in entries:
        message = str(entry.get("message", ""))
        if m := DECISION.fullmatch(message):
            step, now, why = int(m.group(1)), m.group(2), m.group(3)
            if word.get(step) == "kept" and now == "waiting":
                gone = "vanished while reading" in why
                counts[f"{where}: {'listed, then gone before it was read' if gone else 'read while half deleted'}"] += 1
            word[step] = now
        elif m := OUTCOME.fullmatch(message):
            what = {"deleted": "removed by ckptkeeper", "skipped": "re-check found it changed, left alone"}.get(
                m.group(2), ""
            )
            if m.group(2) == "vanished":
                what = (
                    "planned, gone at the re-check"
                    if "before ckptkeeper got to it" in m.group(3)
                    else "rename of an already-removed dir (FileNotFoundError handled)"
                )
            counts[f"{where}: {what}"] += 1


def check_root(name: str, root: Path, summary: dict[str, Any], expected: set[int]) -> None:
    saves = summary["saves"]
    by_step = {r["global_step"]: r for r in saves}
    for record in saves:
        assert set(record["files"]) == FULL_CHECKPOINT, record["files"]
        best = record["best_global_step"]
        assert f"checkpoint-{best}" in record["checkpoints_on_disk"], f"{name}: the Trainer's best was gone: {record}"

    # The final set: exactly the best and the last 2, complete, untouched since saved; nothing else around.
    on_disk = checkpoints_on_disk(root)
    assert on_disk == expected, f"{name}: on disk {sorted(on_disk)}, expected {sorted(expected)}"
    listed = set(os.listdir(root)) - {ROOT_LOCK_NAME}  # the root's lock, where a prune or the daemon took it
    assert listed == {STATE_DIR_NAME, *(f"checkpoint-{s}" for s in expected)}, sorted(listed)
    for step in expected & set(by_step):  # a save the crash cut short before its record is not compared
        checkpoint = root / f"checkpoint-{step}"
        assert file_listing(checkpoint) == by_step[step]["files"], (
            f"{name}: {checkpoint.name} changed after it was saved"
        )
        assert checkpoint.stat().st_mtime_ns == by_step[step]["dir_mtime_ns"], (
            f"{name}: {checkpoint.name} mtime changed"
        )
    state_dir = root / STATE_DIR_NAME
    assert not os.listdir(state_dir / "trash"), f"{name}: the trash still holds {os.listdir(state_dir / 'trash')}"
    own = {"journal.jsonl", "lock", "trash", "reserve", "CKPTKEEPER_STATE_DIR", PINS_LOCK_NAME, REMOVING_NAME}
    own.add(MEMO_NAME)  # the watch daemon's scan memo
    assert set(os.listdir(state_dir)) <= own, os.listdir(state_dir)
    assert not (root / RUN_TRASH_NAME).exists()

    # The journal: a start line and one outcome per attempt, nothing else.
    journal = json_lines(state_dir / "journal.jsonl")
    assert {e.get("action") for e in journal} <= {"start-delete", "delete", "vanished", "skipped"}, journal
    open_attempts: dict[str, int] = {}
    for e in journal:
        key = e["checkpoint"]
        if e["action"] == "start-delete":
            assert key not in open_attempts, f"{name}: two starts without an outcome for {key}: {journal}"
            open_attempts[key] = 1
        elif e["action"] in ("delete", "vanished"):
            assert open_attempts.pop(key, None) == 1, f"{name}: an outcome without a start for {key}: {journal}"
    assert not open_attempts, f"{name}: starts without an outcome: {open_attempts}"

    # Every removal by ckptkeeper was one its rules allowed when it happened, judged from the saves' times.
    for e in [e for e in journal if e["action"] == "delete"]:
        step, when = int(e["step"]), journal_time(e)
        assert step not in expected, f"{name}: ckptkeeper removed checkpoint-{step}, which its rules keep at the end"
        later = [r for r in saves if r["t"] > when]
        # Saves are sequential: at the removal, no checkpoint newer than the first save recorded after it existed.
        newest_possible = later[0]["global_step"] if later else summary["global_step"]
        assert step <= newest_possible - 2, f"{name}: checkpoint-{step} was one of the 2 newest when removed: {e}"
        named_best = [r["global_step"] for r in later if r["best_global_step"] == step]
        assert not named_best, f"{name}: removed checkpoint-{step}, the Trainer's best still at saves {named_best}"


def test_the_real_rotation_crashes_if_a_checkpoint_goes_mid_listing(tmp_path: Path) -> None:
    """An upstream hazard that no pruner beside the Trainer can rule out, pinned so the docs stay true:
    transformers 5.24's sort_checkpoints lists `checkpoint-*` and then calls os.path.getmtime on each without
    handling FileNotFoundError, so a checkpoint removed in between (by anyone: ckptkeeper, a user's rm, another
    job) crashes the training at that save. The window is microseconds, right after trainer_state.json; the
    race above never hit it. Deterministic here: a profile hook renames a checkpoint away, as ckptkeeper's
    removal does, when the first getmtime is called."""
    require_training_stack()
    from transformers import __version__
    from transformers.trainer_utils import rotate_checkpoints

    assert __version__ == "5.24.0", __version__
    out, trash = tmp_path / "out", tmp_path / "trash"
    trash.mkdir()
    now = time.time()
    for i, step in enumerate((10, 20, 30, 40)):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        os.utime(out / f"checkpoint-{step}", (now - 40 + 10 * i, now - 40 + 10 * i))  # a slow run: by mtime

    def remove_after_listing(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code.co_name == "getmtime":
            sys.setprofile(None)
            os.rename(out / "checkpoint-30", trash / "0123456789ab.checkpoint-30")

    sys.setprofile(remove_after_listing)
    try:
        with pytest.raises(FileNotFoundError, match="checkpoint-30"):
            rotate_checkpoints(os.fspath(out), save_total_limit=2, best_model_checkpoint=None, use_mtime=True)
    finally:
        sys.setprofile(None)
