"""Crash-safety campaign: SIGKILL a real prune at random moments, restart, and check that no data was lost.

A fork server (tests/crash_worker.py serve) runs each prune in a child process: the real engine (make_plan,
finish_leftovers, apply_plan with a locked StateDir) on a root holding two simulated Trainer runs with
multi-megabyte, multi-file checkpoints (hard-linked from one template per session, so a round costs no data
copy). The child says APPLY when its removals start and OUTCOME after each; the test picks one removal at
random, waits for the ones before it, sleeps a random 0..1.2x the measured time of one removal, then
SIGKILLs the child. Then:

- the crash state is checked: every directory under a `checkpoint-N` name (in the root and in the archive)
  is byte-identical to the manifest taken before the round, the kept ones are all there, no removed one is
  lost (in archive mode it is whole at the source or whole at the target), no trash entry has a
  checkpoint name;
- the prune is restarted in this process (lock, finish_leftovers, the same plan) and run to completion:
  exactly the kept checkpoints remain, whole; the removed ones are gone (archive: whole at
  `<archive>/<run path>/checkpoint-N`); the trash is empty; no `.ckptkeeper-tmp-` is left;
- the journal accounts for every removal: each has a start-delete / start-archive line (written before
  acting, so it survives any kill) before any outcome line of its own.

Rounds per mode: 25, or CKPTKEEPER_CRASH_ROUNDS. CKPTKEEPER_CRASH_SEED fixes the delays; the figures of each
mode are printed (run pytest with -s to see them) and, with CKPTKEEPER_CRASH_REPORT=<file>, appended to that
file as JSON lines.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ckptkeeper.actions import ARCHIVE_TEMP_PREFIX, RUN_TRASH_NAME
from ckptkeeper.engine import make_plan
from ckptkeeper.scan import checkpoint_step
from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.state import LockHeld, StateDir

WORKER = Path(__file__).with_name("crash_worker.py")
ROUNDS = int(os.environ.get("CKPTKEEPER_CRASH_ROUNDS", "25"))
SEED = int(os.environ.get("CKPTKEEPER_CRASH_SEED", str(random.SystemRandom().randrange(1 << 30))))
KEEP = "last:2,best:1"
RUNS = {
    # run path below the root -> the simulated Trainer run written there (5 + 4 checkpoints, 9-10 files each)
    "exp1": SimConfig(steps_per_epoch=10, epochs=1, save_steps=2, eval_steps=2, shards=4, optimizer_bytes=3 << 20),
    "sweep/lr-1e-4": SimConfig(
        steps_per_epoch=8, epochs=1, save_steps=2, eval_steps=2, shards=3, optimizer_bytes=3 << 20, seed=7
    ),
}
SHARD_FILES = 48
DEADLINE = 60.0  # seconds any single step of the worker may take before the test gives up

Key = tuple[str, str]  # (run path below the root or the archive, checkpoint name)
Manifest = dict[str, tuple[str, int, str]]  # relative path -> (kind, size, sha256 or link target)


def _load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crash_worker", WORKER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["crash_worker"] = module
    spec.loader.exec_module(module)
    return module


crash_worker = _load_worker()


# ---------------------------------------------------------------------------------------------- disk views
def tree_manifest(top: Path) -> Manifest:
    found: Manifest = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, top)
            st = os.lstat(full)
            if os.path.islink(full):
                found[rel] = ("link", st.st_size, os.readlink(full))
            elif os.path.isdir(full):
                found[rel] = ("dir", 0, "")
            else:
                with open(full, "rb") as f:
                    found[rel] = ("file", st.st_size, hashlib.file_digest(f, "sha256").hexdigest())
    return found


def checkpoint_dirs(top: Path) -> dict[Key, Path]:
    """Every directory named checkpoint-N anywhere below `top`, hidden ones included, links not followed."""
    found: dict[Key, Path] = {}
    if not top.exists():
        return found
    for dirpath, dirnames, _ in os.walk(top):
        for name in list(dirnames):
            full = Path(dirpath, name)
            if checkpoint_step(name) is not None and not full.is_symlink():
                found[(Path(dirpath).relative_to(top).as_posix(), name)] = full
                dirnames.remove(name)  # a checkpoint holds no checkpoints
    return found


def entries_named(top: Path, prefix: str) -> list[Path]:
    found = []
    if top.exists():
        for dirpath, dirnames, filenames in os.walk(top):
            found += [Path(dirpath, n) for n in dirnames + filenames if n.startswith(prefix)]
    return found


def trash_entries(layout: Layout) -> list[Path]:
    entries = list(layout.state.trash.iterdir()) if layout.state.trash.is_dir() else []
    for run in RUNS:
        local = layout.root / run / RUN_TRASH_NAME
        if local.is_dir():
            entries += list(local.iterdir())
    return entries


# ---------------------------------------------------------------------------------------------- other filesystem
@pytest.fixture(scope="module")
def other_fs(tmpfs: Path) -> Iterator[Path]:
    """A writable directory on a different filesystem (a tmpfs, see conftest) from tmp_path."""
    directory = Path(tempfile.mkdtemp(prefix="ckptkeeper-crash-", dir=tmpfs))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the fork server
class Server:
    """tests/crash_worker.py serve, and the lines it writes."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.pending: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put("EOF")

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()

    def expect(self, marker: str, pid: int | None = None) -> list[str]:
        """The fields of the first unconsumed line `marker [pid] ...`, waiting for it if need be.

        Lines are kept until consumed: a child may say LOCKED or APPLY before the server says its PID.
        Fails on an ERROR line, when the server ends, or at the deadline."""
        deadline = time.monotonic() + DEADLINE
        while True:
            for i, line in enumerate(self.pending):
                fields = line.split(" ")
                if fields[0] == "ERROR":
                    raise AssertionError(f"crash worker failed: {line}")
                if fields[0] == marker and (pid is None or fields[1] == str(pid)):
                    del self.pending[i]
                    return fields
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {marker} from the crash worker within {DEADLINE} s")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line == "EOF":
                raise AssertionError(f"the crash worker server ended while waiting for {marker}")
            self.pending.append(line)

    def start(self, job: dict[str, Any]) -> int:
        self.send({"job": job})
        return int(self.expect("PID")[1])

    def reap(self, pid: int) -> int:
        self.send({"reap": pid})
        code = int(self.expect("EXIT", pid)[2])
        self.pending = [line for line in self.pending if line.split(" ")[1:2] != [str(pid)]]
        return code

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own server process, by its handle
            self.proc.wait()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    try:
        yield s
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------- one round's layout
@dataclass(frozen=True)
class Mode:
    name: str
    archive: str | None  # None, "same-fs" or "other-fs"
    state_on_other_fs: bool = False


MODES = [
    Mode("delete", None),
    Mode("delete, state dir on another filesystem", None, state_on_other_fs=True),
    Mode("archive, same filesystem", "same-fs"),
    Mode("archive, another filesystem", "other-fs"),
]


@dataclass
class Layout:
    root: Path
    state: StateDir
    archive: Path | None
    scratch: list[Path]

    def job(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "state": str(self.state.path),
            "archive": str(self.archive) if self.archive else None,
            "keep": KEEP,
        }

    def clear(self) -> None:
        for path in self.scratch:
            shutil.rmtree(path, ignore_errors=True)


def new_layout(mode: Mode, work: Path, template: Path, other: Path | None) -> Layout:
    tag = uuid.uuid4().hex[:8]
    base = work / tag
    root = base / "root"
    # Hard links: the round's files are the template's files (so the template's manifest is this round's),
    # and setting a round up costs no data copy. Removal renames and unlinks them like any other file.
    shutil.copytree(template, root, copy_function=os.link)
    scratch = [base]
    state_path = root / ".ckptkeeper"
    if mode.state_on_other_fs:
        assert other is not None
        state_path = other / f"state-{tag}"
        scratch.append(state_path)
    archive = None
    if mode.archive == "same-fs":
        archive = base / "archive"
    elif mode.archive == "other-fs":
        assert other is not None
        archive = other / f"archive-{tag}"
        scratch.append(archive)
    return Layout(root, StateDir(state_path), archive, scratch)


# ---------------------------------------------------------------------------------------------- invariants
@dataclass
class Expected:
    manifests: dict[Key, Manifest]
    kept: set[Key]
    removed: set[Key]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Expected]]:
    """The two runs, and their manifest and plan recorded before any round. Each checkpoint also gets a
    DeepSpeed-like `global_stepN/` of many small shard files, so that removing one takes long enough for
    kills to land inside it. Checked again after the campaign: no round may have changed it."""
    root = tmp_path_factory.mktemp("template")
    rng = random.Random(0)
    for run, config in RUNS.items():
        for step in simulate_run(root / run, config):
            shards = root / run / f"checkpoint-{step}" / f"global_step{step}"
            shards.mkdir()
            for rank in range(SHARD_FILES):
                (shards / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(rng.randbytes(8192))
    manifests = {key: tree_manifest(path) for key, path in checkpoint_dirs(root).items()}
    plan = make_plan(root, crash_worker.policy_for({"keep": KEEP}), root / ".ckptkeeper")
    assert not plan.refusals and not plan.warnings
    assert all(d.checkpoint.complete for p in plan.runs for d in p.decisions)
    kept = {(p.run.path, d.checkpoint.name) for p in plan.runs for d in p.kept}
    removed = {(p.run.path, d.checkpoint.name) for p in plan.runs for d in p.removed}
    assert kept | removed == set(manifests) and len(removed) >= 4 and len(kept) >= 4
    yield root, Expected(manifests, kept, removed)
    assert {key: tree_manifest(path) for key, path in checkpoint_dirs(root).items()} == manifests


def whole_or_report(where: str, found: dict[Key, Path], expected: Expected, problems: list[str]) -> None:
    for key, path in sorted(found.items()):
        if key not in expected.manifests:
            problems.append(f"{where}: unexpected checkpoint directory {path}")
        elif tree_manifest(path) != expected.manifests[key]:
            problems.append(f"{where}: {path} is under a checkpoint name but not whole")


def crash_state_problems(layout: Layout, expected: Expected) -> list[str]:
    """What a SIGKILL at any moment must leave: whole checkpoints under their names, nothing lost."""
    problems: list[str] = []
    in_root = checkpoint_dirs(layout.root)
    whole_or_report("after the kill, root", in_root, expected, problems)
    in_archive = checkpoint_dirs(layout.archive) if layout.archive else {}
    whole_or_report("after the kill, archive", in_archive, expected, problems)
    if set(in_archive) - expected.removed:
        problems.append(f"after the kill: archived checkpoints the plan keeps: {set(in_archive) - expected.removed}")
    problems += [f"after the kill: kept checkpoint {k} missing from the root" for k in expected.kept - set(in_root)]
    if layout.archive:
        lost = expected.removed - set(in_root) - set(in_archive)
        problems += [f"after the kill: archived checkpoint {k} is neither at the source nor the target" for k in lost]
    problems += [f"trash entry {e} has a checkpoint name" for e in trash_entries(layout) if checkpoint_step(e.name)]
    return problems


def final_state_problems(layout: Layout, expected: Expected) -> list[str]:
    """After the restart ran the same prune to completion."""
    problems: list[str] = []
    in_root = checkpoint_dirs(layout.root)
    whole_or_report("after the restart, root", in_root, expected, problems)
    if set(in_root) != expected.kept:
        problems.append(f"after the restart the root holds {sorted(in_root)}, expected {sorted(expected.kept)}")
    if layout.archive:
        in_archive = checkpoint_dirs(layout.archive)
        whole_or_report("after the restart, archive", in_archive, expected, problems)
        if set(in_archive) != expected.removed:
            problems.append(f"the archive holds {sorted(in_archive)}, expected {sorted(expected.removed)}")
        problems += [f"archive temp left: {p}" for p in entries_named(layout.archive, ARCHIVE_TEMP_PREFIX)]
    problems += [f"trash not empty after the restart: {e}" for e in trash_entries(layout)]
    return problems


def classify(status: int, layout: Layout, expected: Expected) -> str:
    """Where in the prune the kill landed, judged from what it left on disk."""
    if status != -signal.SIGKILL:
        return "finished before the kill"
    in_root = checkpoint_dirs(layout.root)
    in_archive = checkpoint_dirs(layout.archive) if layout.archive else {}
    gone = expected.removed - set(in_root)
    if trash_entries(layout):
        return "mid-removal: renamed to the trash, not yet removed"
    if layout.archive and entries_named(layout.archive, ARCHIVE_TEMP_PREFIX):
        return "mid-removal: archive copy under its temporary name"
    if expected.removed & set(in_root) & set(in_archive):
        return "mid-removal: archived copy in place, source not yet removed"
    if not gone:
        return "before the first removal"
    if gone == expected.removed:
        return "after the last removal"
    return "between two removals"


@dataclass
class JournalGaps:
    no_start: int = 0  # removals with no start-* line of their own: must stay 0
    wrong_start: int = 0  # a start-* line of the other kind, or an outcome line before any start-*: must stay 0
    no_outcome: int = 0  # killed between the start-* line and the outcome line
    no_outcome_finish_trash: int = 0  # of those, finished by the restart as a finish-trash entry


def journal_gaps(layout: Layout, expected: Expected) -> JournalGaps:
    """How the journal accounts for each removal: an intent line (start-delete / start-archive) is written
    before acting, so a kill can cost a removal its outcome line but never leave it unrecorded."""
    entries = layout.state.read_journal()
    start = "start-archive" if layout.archive else "start-delete"
    outcome = "archive" if layout.archive else "delete"
    gaps = JournalGaps()
    finished = Counter(e["entry"].split(".", 1)[1] for e in entries if e.get("action") == "finish-trash")
    for key in sorted(expected.removed):
        own = [e["action"] for e in entries if (e.get("run"), e.get("checkpoint")) == key]
        if not any(a.startswith("start-") for a in own):
            gaps.no_start += 1
        if any(a.startswith("start-") and a != start for a in own) or (own and not own[0].startswith("start-")):
            gaps.wrong_start += 1
        if outcome not in own:
            gaps.no_outcome += 1
            if finished[key[1]] > 0:
                finished[key[1]] -= 1
                gaps.no_outcome_finish_trash += 1
    return gaps


# ---------------------------------------------------------------------------------------------- the campaign
@dataclass
class Figures:
    mode: str
    seed: int
    rounds: int = 0
    kills_landed: int = 0
    where: Counter[str] = field(default_factory=Counter)
    violations: int = 0  # checkpoints half-present under their name, lost, or left over: must stay 0
    journal_no_start: int = 0  # removals with no start-* line in the journal: must stay 0
    journal_wrong_start: int = 0  # must stay 0
    journal_no_outcome: int = 0
    journal_no_outcome_finish_trash: int = 0
    calibrated_apply_ms: float = 0.0

    @property
    def mid_removal(self) -> int:
        return sum(n for where, n in self.where.items() if where.startswith("mid-removal"))

    def report(self) -> str:
        where = ", ".join(f"{n} {w}" for w, n in sorted(self.where.items()))
        return (
            f"crash campaign [{self.mode}] seed={self.seed}: {self.rounds} rounds, {self.kills_landed} kills landed "
            f"({self.mid_removal} mid-removal), data lost / invariant violations: {self.violations}; "
            f"journal: {self.journal_no_start} removals without a start line, "
            f"{self.journal_wrong_start} with a wrong or late one, "
            f"{self.journal_no_outcome} without their outcome line "
            f"({self.journal_no_outcome_finish_trash} of them finished as finish-trash); "
            f"apply ~{self.calibrated_apply_ms:.1f} ms; where: {where}"
        )


def record_figures(figures: Figures) -> None:
    print(figures.report())
    target = os.environ.get("CKPTKEEPER_CRASH_REPORT")
    if target:
        line = {**figures.__dict__, "where": dict(figures.where), "mid_removal": figures.mid_removal}
        with open(target, "a") as f:
            f.write(json.dumps(line) + "\n")


def restart(layout: Layout) -> None:
    """The next start: take the (stale) lock, finish the trash, run the same prune to completion."""
    totals = crash_worker.prune(layout.job())
    assert totals.errors == [], [o.detail for o in totals.errors]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name.replace(" ", "-").replace(",", ""))
def test_sigkill_at_random_moments_loses_nothing(
    mode: Mode, server: Server, template: tuple[Path, Expected], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source, expected = template
    other = request.getfixturevalue("other_fs") if mode.archive == "other-fs" or mode.state_on_other_fs else None
    rng = random.Random(f"{SEED}-{mode.name}")
    figures = Figures(mode.name, SEED)
    problems: list[str] = []

    # Calibration: prunes to completion, timed; each must leave exactly the final state.
    durations = []
    for _ in range(3):
        layout = new_layout(mode, tmp_path, source, other)
        pid = server.start(layout.job())
        done = server.expect("DONE", pid)
        assert server.reap(pid) == 0
        assert done[3] == "0", "a calibration prune reported errors"
        durations.append(float(done[2]))
        assert final_state_problems(layout, expected) == []
        layout.clear()
    per_removal = sorted(durations)[1] / len(expected.removed)
    figures.calibrated_apply_ms = sorted(durations)[1] * 1000

    for _ in range(ROUNDS):
        layout = new_layout(mode, tmp_path, source, other)
        pid = server.start(layout.job())
        # Aim at one removal chosen at random: wait until the ones before it are done, then a random moment
        # within the time one removal takes.
        server.expect("APPLY", pid)
        for _ in range(rng.randrange(len(expected.removed))):
            server.expect("OUTCOME", pid)
        time.sleep(rng.uniform(0, 1.2 * per_removal))
        os.kill(pid, signal.SIGKILL)  # the child is not reaped yet, so this pid is still ours
        status = server.reap(pid)
        figures.rounds += 1
        figures.kills_landed += status == -signal.SIGKILL
        figures.where[classify(status, layout, expected)] += 1

        round_problems = crash_state_problems(layout, expected)
        restart(layout)
        round_problems += final_state_problems(layout, expected)
        figures.violations += len(round_problems)
        gaps = journal_gaps(layout, expected)
        figures.journal_no_start += gaps.no_start
        figures.journal_wrong_start += gaps.wrong_start
        figures.journal_no_outcome += gaps.no_outcome
        figures.journal_no_outcome_finish_trash += gaps.no_outcome_finish_trash
        problems += [f"round {figures.rounds}: {p}" for p in round_problems]
        layout.clear()

    record_figures(figures)
    assert problems == []
    assert figures.rounds == ROUNDS
    # Every removal, interrupted or not, has its intent in the journal, of the right kind and first.
    assert (figures.journal_no_start, figures.journal_wrong_start) == (0, 0), figures.report()
    # The campaign must actually interrupt prunes, not just watch them finish, and (where a removal is more
    # than one rename) interrupt some removals halfway.
    assert figures.kills_landed >= ROUNDS // 2, figures.report()
    if mode.archive != "same-fs" and ROUNDS >= 10:
        assert figures.mid_removal >= 1, figures.report()


def test_kill_while_holding_the_lock_then_next_run_succeeds(
    server: Server, template: tuple[Path, Expected], tmp_path: Path
) -> None:
    source, expected = template
    layout = new_layout(MODES[0], tmp_path, source, None)
    pid = server.start({**layout.job(), "hold_after_lock": True})
    server.expect("LOCKED", pid)

    # While it holds the lock, another instance is turned away with the holder's pid.
    contender = StateDir(layout.state.path)
    with pytest.raises(LockHeld, match=rf"pid {pid}\b"):
        contender.acquire_lock(layout.root)

    os.kill(pid, signal.SIGKILL)
    assert server.reap(pid) == -signal.SIGKILL
    # The lock file still names the dead holder: the lock is stale, not released.
    assert f"pid {pid} " in (layout.state.path / "lock").read_text()

    # A fresh process takes the stale lock and prunes to completion.
    second = subprocess.run(
        [sys.executable, str(WORKER), "run", json.dumps(layout.job())],
        check=False,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    second_pid = second.stdout.split()[1]
    assert f"DONE {second_pid} " in second.stdout
    assert final_state_problems(layout, expected) == []
    journal = layout.state.read_journal()
    for action in ("start-delete", "delete"):
        assert {(e["run"], e["checkpoint"]) for e in journal if e["action"] == action} == expected.removed
    assert {e["action"] for e in journal} == {"start-delete", "delete"}
    layout.clear()
