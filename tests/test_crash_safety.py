"""Crash-safety campaign: SIGKILL a real prune, or the real `ckptkeeper watch` daemon, at random moments,
restart it, and check that no data was lost.

A fork server (tests/crash_worker.py serve) runs each job in a child process on a root holding two simulated
Trainer runs with multi-megabyte, multi-file checkpoints (hard-linked from one template per module, so a
round costs no data copy). Modes:

- prune: the real engine (Pipeline: lock, finish_leftovers, survey, act with its locked StateDir): delete; delete
  with the state directory on another filesystem (trash beside the run); archive on the same filesystem
  (a rename); archive to another filesystem (copy under a temporary name, verify, rename, remove);
- daemon: the `ckptkeeper watch` command itself (click entry point, settings, Daemon, inotify observer, reaper
  thread), forked from the server, doing its initial reconcile of a root with removals to do: delete; delete
  with the state directory on another filesystem; archive to another filesystem. After the kill it is started
  again with --exit-when-done and must reconcile the root to the same end state on its own;
- object store (`--archive-to s3://...`, moto's S3 server in a child process, tests/s3util.py): prune and daemon, as
  above; a checkpoint counts as archived when its manifest lists exactly its files, sizes and SHA-256 and every
  object is there with its size (in a tenth of the rounds every object is also read back and hashed); objects
  without a manifest are an unfinished upload (never counted); after the restart no multipart upload is left
  unfinished. Half the rounds of the other modes for prune, a quarter for the daemon (100 and 50 by default);
- slim (`--keep last:1 --keep-weights every:4`, test_sigkill_while_slimming_...): the real engine on two runs whose
  checkpoints carry multi-file resume state beside their weights (optimizer.pt, scheduler.pt, rng_state.pth and 64
  rng_state_<rank>.pth; DeepSpeed's global_stepN/ and `latest`, or FSDP's optimizer_0/ beside the weights'
  pytorch_model_fsdp_0/), each kept whole, made weights-only or removed; the state directory is in the root in even
  rounds and on another filesystem in odd ones (the run-local trash). Each first kill targets one slim: 40% at a
  random moment as below, the rest by watching that checkpoint and killing when its slim reaches a point drawn at
  random (the marker's temporary file or the marker appears, or one of its resume entries leaves); a quarter of the
  restarts are killed too, half of those inside a slim. Its checks are its own (see the section at the end): after
  every kill each checkpoint is whole, or marked weights-only with every other file the very same (inode and bytes)
  and each resume entry whole or gone, or (a removal) gone; after the final run each weights-only checkpoint has no
  resume state left, its marker, and its directory's mtime from before; the journal has a start-slim line before any
  slim. Its figures count the kills that landed mid-slim, by the state they left.

The child says APPLY when its removals start and OUTCOME after each (the daemon: its "watching" and
"deleted" log lines); the test picks one removal at random, waits for the ones before it, sleeps a random
0..1.2x the time one removal takes (calibrated, then tracked round by round), then SIGKILLs the child. In a
quarter of the rounds the restart is SIGKILLed too, at a random moment of its whole run (taking the stale
lock, finishing the first kill's leftovers, removing). Then:

- the crash state is checked: every directory under a `checkpoint-N` name (in the root and in the archive)
  is byte-identical to the manifest taken before the round (no checkpoint, no archive half-present under
  its final name), the kept ones are all there, no removed one is lost (in archive mode it is whole at the
  source or whole at the target), no trash entry has a checkpoint name, and every checkpoint already gone
  has its start-* line in the journal;
- the job is restarted (prune: in this process, lock, finish_leftovers, the same plan; daemon: a new
  `ckptkeeper watch --exit-when-done`, which must exit 0 with no error logged) and run to completion: exactly
  the kept checkpoints remain, whole; the removed ones are gone (archive: whole at
  `<archive>/<run path>/checkpoint-N`); the trash is empty; no `.ckptkeeper-tmp-` is left;
- the journal accounts for every removal: each has a start-delete / start-archive line (written before
  acting, so it survives any kill) before any outcome line of its own, at most one outcome, and no line
  names a checkpoint the plan keeps.

Rounds per mode (the slim mode included): 200 by default; CKPTKEEPER_CRASH_ROUNDS=N or `pytest --crash-rounds N`
(which wins) change it. Set the CKPTKEEPER_CRASH_* variables only when running this file alone: `ckptkeeper`
refuses unknown CKPTKEEPER_* variables, so the command-line tests of the rest of the suite fail with one set
(this file's daemon children drop them); `--crash-rounds` has no such effect.
CKPTKEEPER_CRASH_SEED fixes the delays; the figures of each mode are printed (pytest -s shows them) and, with
CKPTKEEPER_CRASH_REPORT=<file>, appended to that file as JSON lines.
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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from s3util import Bucket, S3Server, environment, new_bucket, start_process

from ckptkeeper.actions import ARCHIVE_TEMP_PREFIX, RUN_TRASH_NAME
from ckptkeeper.destination import CLAIM_SUFFIX, MANIFEST_SUFFIX
from ckptkeeper.engine import Pipeline
from ckptkeeper.model import Action
from ckptkeeper.scan import checkpoint_step
from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.state import LockHeld, StateDir
from ckptkeeper.weights import MARKER, MARKER_TEMP

WORKER = Path(__file__).with_name("crash_worker.py")
DEFAULT_ROUNDS = 200
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
READ_BACK_SHARE = 0.1  # of the object-store rounds, this share reads every archived object back and hashes it
DEADLINE = 60.0  # seconds any single step of the worker may take before the test gives up

Key = tuple[str, str]  # (run path below the root or the archive, checkpoint name)
Manifest = dict[str, tuple[str, int, str]]  # relative path -> (kind, size, sha256 or link target)
Identity = tuple[int, int]  # (device, inode)


def campaign_rounds(config: pytest.Config) -> int:
    """--crash-rounds N (tests/conftest.py), else $CKPTKEEPER_CRASH_ROUNDS, else DEFAULT_ROUNDS."""
    given = config.getoption("--crash-rounds", default=None)
    return int(given if given is not None else os.environ.get("CKPTKEEPER_CRASH_ROUNDS", DEFAULT_ROUNDS))


def _load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crash_worker", WORKER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["crash_worker"] = module
    spec.loader.exec_module(module)
    return module


crash_worker = _load_worker()


# ---------------------------------------------------------------------------------------------- disk views
class Digests:
    """sha256 of files, with the template's own files known in advance.

    A round's files are hard links to the template's: a file that is one of the template's inodes, with the
    template's size and mtime, holds the template's bytes (nothing in ckptkeeper writes into a file in
    place, and the template is hashed again in full after the campaign, so a write that kept size and mtime
    would still be caught). The template holds a link to each of those inodes all along, so their numbers
    cannot be reused by another file. Every other file (archive copies, anything unexpected) is hashed."""

    def __init__(self) -> None:
        self.known: dict[tuple[int, int], tuple[int, int, str]] = {}

    def learn(self, top: Path) -> None:
        for dirpath, _, filenames in os.walk(top):
            for name in filenames:
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                if not os.path.islink(full):
                    self.known[(st.st_dev, st.st_ino)] = (st.st_size, st.st_mtime_ns, self.hash(full))

    @staticmethod
    def hash(path: str) -> str:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    def of(self, path: str, st: os.stat_result) -> str:
        known = self.known.get((st.st_dev, st.st_ino))
        if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
            return known[2]
        return self.hash(path)


def tree_manifest(top: Path, digests: Digests | None = None, inodes: dict[str, Identity] | None = None) -> Manifest:
    """Every entry below `top`; `inodes`, if given, is filled with each file's (device, inode)."""
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
                digest = digests.of(full, st) if digests else Digests.hash(full)
                found[rel] = ("file", st.st_size, digest)
                if inodes is not None:
                    inodes[rel] = (st.st_dev, st.st_ino)
    return found


def checkpoint_dirs(top: Path | None) -> dict[Key, Path]:
    """Every directory named checkpoint-N anywhere below `top`, hidden ones included, links not followed."""
    found: dict[Key, Path] = {}
    if top is None or not top.exists():
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
    for run in (*RUNS, *SLIM_RUNS):
        local = layout.root / run / RUN_TRASH_NAME
        if local.is_dir():
            entries += list(local.iterdir())
    return entries


# ---------------------------------------------------------------------------------------------- filesystems
@pytest.fixture(scope="module")
def work_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the template and every round live: a private tmpfs when this process may mount one, else the temp
    directory. A SIGKILL leaves the page cache intact, so what a kill can leave behind does not depend on the
    filesystem; but round after round of linking and unlinking hundreds of files is at the mercy of other
    jobs' disk I/O (on the shared 2-core machine, benchmarks writing gigabytes made each unlink and
    therefore each round 10-50x slower). A tmpfs keeps the campaign's duration and kill timing steady."""
    directory = tmp_path_factory.mktemp("crash-work")
    mounted = os.geteuid() == 0 and (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512m", "ckptkeeper-crash", str(directory)],
            check=False,
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        yield directory
    finally:
        if mounted and subprocess.run(["umount", str(directory)], check=False, capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(directory)], check=False)


@pytest.fixture(scope="module")
def other_fs(tmpfs: Path, work_fs: Path) -> Iterator[Path]:
    """A writable directory on another filesystem (a tmpfs, see conftest) than the rounds' own."""
    directory = Path(tempfile.mkdtemp(prefix="ckptkeeper-crash-", dir=tmpfs))
    assert directory.stat().st_dev != work_fs.stat().st_dev
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
        self.live: set[int] = set()  # children started and not reaped yet
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
        pid = int(self.expect("PID")[1])
        self.live.add(pid)
        return pid

    def reap(self, pid: int) -> int:
        self.send({"reap": pid})
        code = int(self.expect("EXIT", pid)[2])
        self.live.discard(pid)
        self.pending = [line for line in self.pending if line.split(" ")[1:2] != [str(pid)]]
        return code

    def kill(self, pid: int) -> int:
        os.kill(pid, signal.SIGKILL)  # a child not reaped yet: this pid is still ours
        return self.reap(pid)

    def close(self) -> None:
        """Ends the server, after killing any child a failed test left running (a daemon never stops alone)."""
        self.pending = [line for line in self.pending if not line.startswith("ERROR ")]
        for pid in sorted(self.live) if self.proc.poll() is None else []:  # unreaped: the pids are still ours
            try:
                self.kill(pid)
            except AssertionError:
                break  # the server itself is gone; closing its stdin below is all that is left
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own server process, by its handle
            self.proc.wait()


@pytest.fixture(scope="module")
def campaign_s3() -> Iterator[S3Server]:
    """moto's S3 server in a child process, for the object-store modes."""
    pytest.importorskip("s3fs")
    s3 = start_process()
    try:
        yield s3
    finally:
        s3.stop()


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
    archive: str | None  # None, "same-fs", "other-fs" or "s3" (moto's S3 server, tests/s3util.py)
    state_on_other_fs: bool = False
    daemon: bool = False  # `ckptkeeper watch` (initial reconcile) instead of a prune
    keep: str = KEEP
    keep_weights: str = ""  # `--keep-weights`: none but in the slim mode


MODES = [
    Mode("delete", None),
    Mode("delete, state dir on another filesystem", None, state_on_other_fs=True),
    Mode("archive, same filesystem", "same-fs"),
    Mode("archive, another filesystem", "other-fs"),
    Mode("daemon reconcile (ckptkeeper watch), delete", None, daemon=True),
    Mode(
        "daemon reconcile (ckptkeeper watch), delete, state dir on another filesystem",
        None,
        state_on_other_fs=True,
        daemon=True,
    ),
    Mode("daemon reconcile (ckptkeeper watch), archive to another filesystem", "other-fs", daemon=True),
    Mode("archive to an object store (S3)", "s3"),
    Mode("daemon reconcile (ckptkeeper watch), archive to an object store (S3)", "s3", daemon=True),
]


@dataclass
class Layout:
    root: Path
    state: StateDir
    archive: Path | None
    log: Path  # the daemon's log lines (JSON), outside the root
    scratch: list[Path]
    store: StoreView | None = None  # the object store archive (mode "s3"), instead of `archive`

    @property
    def archives(self) -> bool:
        return self.archive is not None or self.store is not None

    def job(self, mode: Mode, **extra: Any) -> dict[str, Any]:
        return {
            "kind": "watch" if mode.daemon else "prune",
            "root": str(self.root),
            "state": str(self.state.path),
            "archive": self.store.url if self.store else str(self.archive) if self.archive else None,
            "env": self.store.env if self.store else {},
            "keep": mode.keep,
            "keep_weights": mode.keep_weights,
            "log": str(self.log),
            **extra,
        }

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else "(no log)"

    def clear(self) -> None:
        for path in self.scratch:
            shutil.rmtree(path, ignore_errors=True)


def new_layout(mode: Mode, work: Path, template: Path, other: Path | None, bucket: Bucket | None = None) -> Layout:
    tag = uuid.uuid4().hex[:8]
    base = work / tag
    root = base / "root"
    # Hard links: the round's files are the template's files (so the template's manifest is this round's),
    # and setting a round up costs no data copy. Removal renames and unlinks them like any other file.
    shutil.copytree(template, root, copy_function=os.link)
    scratch = [base]
    state_path = root / "_ckptkeeper"
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
    read_back = random.random() < READ_BACK_SHARE
    store = StoreView(bucket, f"round-{tag}", read_back) if mode.archive == "s3" and bucket is not None else None
    return Layout(root, StateDir(state_path), archive, base / "watch.log", scratch, store)


class StoreView:
    """One round's archive in the object store: `s3://<bucket>/<prefix>`, read with boto3 (not with ckptkeeper's
    own code). A checkpoint is archived when its manifest is there, lists exactly the template's files with their
    sizes and SHA-256, and every object it lists is there with its size; objects without a manifest are an
    unfinished upload (never counted, never a problem)."""

    def __init__(self, bucket: Bucket, prefix: str, read_back: bool = True) -> None:
        self.bucket, self.prefix = bucket, prefix
        self.read_back = read_back  # the final check reads every object back and hashes it (slow: some rounds)
        self.url = f"s3://{bucket.name}/{prefix}"
        self.env = environment(bucket.server.endpoint)

    def _split(self) -> tuple[dict[Key, bytes], dict[Key, dict[str, int]]]:
        """(manifests by checkpoint, objects by checkpoint: relative path -> size)."""
        client, head = self.bucket.server.client(), self.prefix + "/"
        manifests: dict[Key, bytes] = {}
        objects: dict[Key, dict[str, int]] = {}
        for key, size in self.bucket.listing(head).items():
            rel = key[len(head) :]
            if rel.endswith(CLAIM_SUFFIX):
                continue  # an upload's claim, left by the kill: taken over by the next attempt from this source
            if rel.endswith(MANIFEST_SUFFIX):
                run, _, name = rel.removesuffix(MANIFEST_SUFFIX).rpartition("/")
                manifests[(run or ".", name)] = client.get_object(Bucket=self.bucket.name, Key=key)["Body"].read()
                continue
            parts = rel.split("/")
            at = next(i for i, p in enumerate(parts) if checkpoint_step(p) is not None)
            objects.setdefault(("/".join(parts[:at]) or ".", parts[at]), {})["/".join(parts[at + 1 :])] = size
        return manifests, objects

    def look(self, expected: Expected) -> tuple[dict[Key, Path], set[Key]]:
        manifests, objects = self._split()
        whole = {k for k, data in manifests.items() if self._matches(k, data, objects.get(k, {}), expected) is None}
        return {k: Path(f"{self.url}/{k[0]}/{k[1]}") for k in manifests}, whole

    def _matches(self, key: Key, data: bytes, objects: dict[str, int], expected: Expected) -> str | None:
        want = expected.manifests.get(key)
        if want is None:
            return "not a checkpoint of the template"
        document = json.loads(data)
        files = {f["path"]: ("file", f["size"], f["sha256"]) for f in document["files"]}
        dirs = dict.fromkeys(document["dirs"], ("dir", 0, ""))
        links = {x["path"]: ("link", len(x["target"]), x["target"]) for x in document["links"]}
        if {**files, **dirs, **links} != want:
            return "its manifest differs from the checkpoint"
        if {rel: size for rel, (_, size, _) in files.items()} != objects:
            return "its objects differ from its manifest"
        return None

    def begun(self) -> set[Key]:
        """Checkpoints with objects (or a multipart upload) in the store."""
        return set(self._split()[1]) | {self._key(k) for k in self.unfinished()}

    def _key(self, object_key: str) -> Key:
        parts = object_key[len(self.prefix) + 1 :].split("/")
        at = next(i for i, p in enumerate(parts) if checkpoint_step(p) is not None)
        return ("/".join(parts[:at]) or ".", parts[at])

    def unfinished(self) -> list[str]:
        return [k for k in self.bucket.uploads() if k.startswith(self.prefix + "/")]

    def content_problems(self, expected: Expected) -> list[str]:
        """Every object of every archived checkpoint, read back and hashed (after the restart only: slow)."""
        problems = []
        for key in sorted(self.look(expected)[1]):
            for rel, (kind, _, digest) in expected.manifests[key].items():
                if kind == "file":
                    path = "/".join(p for p in (self.prefix, key[0], key[1], rel) if p != ".")
                    if hashlib.sha256(self.bucket.get(path)).hexdigest() != digest:
                        problems.append(f"{self.url}/{key[0]}/{key[1]}/{rel}: other bytes than the checkpoint's")
        return problems


# ---------------------------------------------------------------------------------------------- invariants
@dataclass
class Expected:
    manifests: dict[Key, Manifest]
    kept: set[Key]
    removed: set[Key]
    digests: Digests


@pytest.fixture(scope="module")
def template(work_fs: Path) -> Iterator[tuple[Path, Expected]]:
    """The two runs, and their manifest and plan recorded before any round. Each checkpoint also gets a
    DeepSpeed-like `global_stepN/` of many small shard files, so that removing one takes long enough for
    kills to land inside it. Checked again after the campaign, hashing every byte: no round may have
    changed it."""
    root = work_fs / "template"
    rng = random.Random(0)
    for run, config in RUNS.items():
        for step in simulate_run(root / run, config):
            shards = root / run / f"checkpoint-{step}" / f"global_step{step}"
            shards.mkdir()
            for rank in range(SHARD_FILES):
                (shards / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(rng.randbytes(8192))
    manifests = {key: tree_manifest(path) for key, path in checkpoint_dirs(root).items()}
    digests = Digests()
    digests.learn(root)
    pipeline = Pipeline.checked(root, crash_worker.policy_for({"keep": KEEP}), state_dir=root / "_ckptkeeper")
    surveyed = pipeline.survey(None)
    plan = surveyed.plan
    assert not plan.refusals and not surveyed.warnings
    assert all(d.checkpoint.complete for p in plan.runs for d in p.decisions)
    kept = {(p.run.path, d.checkpoint.name) for p in plan.runs for d in p.kept}
    removed = {(p.run.path, d.checkpoint.name) for p in plan.runs for d in p.removed}
    assert kept | removed == set(manifests) and len(removed) >= 4 and len(kept) >= 4
    # --exit-when-done needs the newest checkpoint of every run to be the Trainer's last one.
    assert all(max(p.run.checkpoints, key=lambda c: c.step).training_stopped for p in plan.runs)
    yield root, Expected(manifests, kept, removed, digests)
    assert {key: tree_manifest(path) for key, path in checkpoint_dirs(root).items()} == manifests


@dataclass
class Seen:
    """The checkpoints on disk at one moment, and which of them are whole (byte-identical to the template)."""

    root: dict[Key, Path]
    archive: dict[Key, Path]
    whole_root: set[Key]
    whole_archive: set[Key]


def look(layout: Layout, expected: Expected) -> Seen:
    def whole(found: dict[Key, Path]) -> set[Key]:
        return {
            key
            for key, path in found.items()
            if key in expected.manifests and tree_manifest(path, expected.digests) == expected.manifests[key]
        }

    in_root = checkpoint_dirs(layout.root)
    if layout.store is not None:
        in_store, whole_in_store = layout.store.look(expected)
        return Seen(in_root, in_store, whole(in_root), whole_in_store)
    in_archive = checkpoint_dirs(layout.archive)
    return Seen(in_root, in_archive, whole(in_root), whole(in_archive))


@dataclass
class Problems:
    """What a check found, by kind: data lost, a checkpoint half-present under its name, anything else."""

    lost: list[str] = field(default_factory=list)
    half_present: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    def all(self) -> list[str]:
        return self.lost + self.half_present + self.other

    def add(self, other: Problems) -> None:
        self.lost += other.lost
        self.half_present += other.half_present
        self.other += other.other


def common_problems(when: str, seen: Seen, layout: Layout, expected: Expected) -> Problems:
    found = Problems()
    for where, dirs, whole in (("root", seen.root, seen.whole_root), ("archive", seen.archive, seen.whole_archive)):
        for key, path in sorted(dirs.items()):
            if key not in expected.manifests:
                found.other.append(f"{when}, {where}: unexpected checkpoint directory {path}")
            elif key not in whole:
                found.half_present.append(f"{when}, {where}: {path} is under a checkpoint name but not whole")
    found.lost += [
        f"{when}: kept checkpoint {k} is not whole in the root" for k in sorted(expected.kept - seen.whole_root)
    ]
    if layout.archives:
        lost = expected.removed - seen.whole_root - seen.whole_archive
        found.lost += [
            f"{when}: archived checkpoint {k} is whole neither at the source nor the target" for k in sorted(lost)
        ]
    if set(seen.archive) - expected.removed:
        found.other.append(
            f"{when}: archived checkpoints the plan keeps: {sorted(set(seen.archive) - expected.removed)}"
        )
    return found


def crash_state_problems(seen: Seen, layout: Layout, expected: Expected) -> Problems:
    """What a SIGKILL at any moment must leave: whole checkpoints under their names, nothing lost."""
    found = common_problems("after the kill", seen, layout, expected)
    found.other += [f"trash entry {e} has a checkpoint name" for e in trash_entries(layout) if checkpoint_step(e.name)]
    return found


def final_state_problems(seen: Seen, layout: Layout, expected: Expected) -> Problems:
    """After the restart ran the same prune (or reconcile) to completion."""
    found = common_problems("after the restart", seen, layout, expected)
    if set(seen.root) != expected.kept:
        found.other.append(f"after the restart the root holds {sorted(seen.root)}, expected {sorted(expected.kept)}")
    if layout.archive:
        if set(seen.archive) != expected.removed:
            found.other.append(f"the archive holds {sorted(seen.archive)}, expected {sorted(expected.removed)}")
        found.other += [f"archive temp left: {p}" for p in entries_named(layout.archive, ARCHIVE_TEMP_PREFIX)]
    if layout.store is not None:
        if set(seen.archive) != expected.removed:
            found.other.append(f"the store holds {sorted(seen.archive)}, expected {sorted(expected.removed)}")
        if layout.store.read_back:
            found.half_present += layout.store.content_problems(expected)
        found.other += [f"a multipart upload was left unfinished: {k}" for k in layout.store.unfinished()]
    found.other += [f"trash not empty after the restart: {e}" for e in trash_entries(layout)]
    return found


def classify(status: int, seen: Seen, layout: Layout, expected: Expected) -> str:
    """Where in the prune the kill landed, judged from what it left on disk."""
    if status != -signal.SIGKILL:
        return "finished before the kill"
    return interrupted_step(seen, layout, expected) or removals_done(seen, expected)


def interrupted_step(seen: Seen, layout: Layout, expected: Expected) -> str | None:
    """The step of a removal the kill interrupted, judged from what it left half done; None if none."""
    if trash_entries(layout):
        return "mid-removal: renamed to the trash, not yet removed"
    if layout.archive and entries_named(layout.archive, ARCHIVE_TEMP_PREFIX):
        return "mid-removal: archive copy under its temporary name"
    if layout.store is not None and layout.store.begun() - set(seen.archive):
        return "mid-removal: upload begun, no manifest yet"
    if expected.removed & set(seen.root) & set(seen.archive):
        return "mid-removal: archived copy in place (a manifest in the store), source not yet removed"
    return None


def removals_done(seen: Seen, expected: Expected) -> str:
    """Between removals: how many of them the kill let finish."""
    gone = expected.removed - set(seen.root)
    if not gone:
        return "before the first removal"
    if gone == expected.removed:
        return "after the last removal"
    return "between two removals"


@dataclass
class JournalGaps:
    no_start: int = 0  # removals with no start-* line of their own: must stay 0
    wrong_start: int = 0  # a start-* line of the other kind, or an outcome line before any start-*: must stay 0
    gone_without_start: int = 0  # at the kill: a checkpoint gone from the root with no start-* line: must stay 0
    names_kept: int = 0  # a removal line for a checkpoint the plan keeps: must stay 0
    duplicate_outcome: int = 0  # two outcome lines for one checkpoint: must stay 0
    no_outcome: int = 0  # killed between the start-* line and the outcome line
    # Of those, finished by the restart as a finish-trash entry. A finish-trash line names the trash entry
    # (`<random>.checkpoint-N`), not the run, so it is matched by checkpoint name: approximate when two runs
    # both have a checkpoint-N. The rest were killed after the removal ended, before its outcome line.
    no_outcome_finish_trash: int = 0

    @property
    def mismatches(self) -> int:
        return self.no_start + self.wrong_start + self.gone_without_start + self.names_kept + self.duplicate_outcome


def gone_without_start(seen: Seen, layout: Layout, expected: Expected) -> int:
    """At the kill: checkpoints that left the root although the journal has no intent line for them."""
    entries = layout.state.read_journal()
    started = {(e.get("run"), e.get("checkpoint")) for e in entries if str(e.get("action", "")).startswith("start-")}
    return len((expected.removed - set(seen.root)) - started)


def journal_gaps(layout: Layout, expected: Expected) -> JournalGaps:
    """How the journal accounts for each removal: an intent line (start-delete / start-archive) is written
    before acting, so a kill can cost a removal its outcome line but never leave it unrecorded."""
    entries = layout.state.read_journal()
    start = "start-archive" if layout.archives else "start-delete"
    outcome = "archive" if layout.archives else "delete"
    gaps = JournalGaps()
    finished = Counter(e["entry"].split(".", 1)[1] for e in entries if e.get("action") == "finish-trash")
    gaps.names_kept = sum((e.get("run"), e.get("checkpoint")) in expected.kept for e in entries)
    for key in sorted(expected.removed):
        own = [e["action"] for e in entries if (e.get("run"), e.get("checkpoint")) == key]
        if not any(a.startswith("start-") for a in own):
            gaps.no_start += 1
        if any(a.startswith("start-") and a != start for a in own) or (own and not own[0].startswith("start-")):
            gaps.wrong_start += 1
        gaps.duplicate_outcome += own.count(outcome) > 1
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
    data_lost: int = 0  # a kept checkpoint (or an archived one, at neither end) not whole: must stay 0
    half_present: int = 0  # a directory under a checkpoint name (root or archive) that is not whole: must stay 0
    violations: int = 0  # every invariant failure, the two above included: must stay 0
    journal_mismatches: int = 0  # the sum of the must-stay-0 journal figures below
    journal_no_start: int = 0
    journal_wrong_start: int = 0
    journal_gone_without_start: int = 0
    journal_names_kept: int = 0
    journal_duplicate_outcome: int = 0
    journal_no_outcome: int = 0  # fine: killed between the intent line and the outcome line
    journal_no_outcome_finish_trash: int = 0
    restarts_killed: int = 0  # rounds whose restart was SIGKILLed too (see SECOND_KILL_SHARE)
    calibrated_apply_ms: float = 0.0  # one job's removals (from APPLY to its last outcome), median of 3
    calibrated_job_ms: float = 0.0  # one whole job, start-up included
    seconds: float = 0.0

    @property
    def mid_removal(self) -> int:
        return sum(n for where, n in self.where.items() if where.startswith("mid-removal"))

    def count(self, found: Problems) -> None:
        self.data_lost += len(found.lost)
        self.half_present += len(found.half_present)
        self.violations += len(found.all())

    def count_journal(self, gaps: JournalGaps) -> None:
        self.journal_mismatches += gaps.mismatches
        self.journal_no_start += gaps.no_start
        self.journal_wrong_start += gaps.wrong_start
        self.journal_gone_without_start += gaps.gone_without_start
        self.journal_names_kept += gaps.names_kept
        self.journal_duplicate_outcome += gaps.duplicate_outcome
        self.journal_no_outcome += gaps.no_outcome
        self.journal_no_outcome_finish_trash += gaps.no_outcome_finish_trash

    def report(self) -> str:
        where = ", ".join(f"{n} {w}" for w, n in sorted(self.where.items()))
        return (
            f"crash campaign [{self.mode}] seed={self.seed}: {self.rounds} rounds in {self.seconds:.0f} s, "
            f"{self.kills_landed} kills landed ({self.mid_removal} mid-removal; {self.restarts_killed} restarts "
            f"killed too), data lost: {self.data_lost}, "
            f"half-present: {self.half_present}, invariant violations: {self.violations}; journal mismatches: "
            f"{self.journal_mismatches} ({self.journal_no_start} removals without a start line, "
            f"{self.journal_wrong_start} with a wrong or late one, {self.journal_gone_without_start} gone at the "
            f"kill without one, {self.journal_names_kept} lines naming a kept checkpoint, "
            f"{self.journal_duplicate_outcome} duplicate outcomes); {self.journal_no_outcome} removals without "
            f"their outcome line ({self.journal_no_outcome_finish_trash} of them finished as finish-trash); "
            f"apply ~{self.calibrated_apply_ms:.1f} ms; where: {where}"
        )

    def as_json(self) -> dict[str, Any]:
        return {**self.__dict__, "where": dict(self.where), "mid_removal": self.mid_removal}


def record_figures(figures: Figures | SlimFigures) -> None:
    print(figures.report())
    target = os.environ.get("CKPTKEEPER_CRASH_REPORT")
    if target:
        with open(target, "a") as f:
            f.write(json.dumps(figures.as_json()) + "\n")


def run_to_completion(mode: Mode, layout: Layout, server: Server) -> tuple[float, list[str]]:
    """Start the job on `layout` and let it finish: (seconds from APPLY to its last removal, problems).
    The daemon runs with --exit-when-done: it exits once its reconcile is done and its reaper is idle."""
    pid = server.start(layout.job(mode, exit_when_done=True))
    try:
        done = server.expect("DONE", pid)
    except AssertionError as e:
        server.kill(pid)
        return 0.0, [f"{e}; log:\n{layout.log_text()}"]
    code = server.reap(pid)
    if (code, done[3]) != (0, "0"):
        return 0.0, [f"exit code {code}, {done[3]} errors; log:\n{layout.log_text()}"]
    return float(done[2]), []


def restart(mode: Mode, layout: Layout, server: Server) -> list[str]:
    """The next start: take the (stale) lock, finish the trash, run the same prune (or reconcile) to the end."""
    if mode.daemon:
        return run_to_completion(mode, layout, server)[1]
    totals = crash_worker.prune(layout.job(mode))
    return [f"the restarted prune failed: {o.detail}" for o in totals.errors]


class Timing:
    """How long one removal takes, kept current from the rounds themselves: the machine's load changes during
    a campaign (CI neighbours, other tests), and aiming with a stale figure lets many jobs finish first."""

    def __init__(self, per_removal: float, whole_job: float) -> None:
        self.samples: deque[float] = deque([per_removal], maxlen=15)
        self.whole_job = whole_job  # seconds from asking for a job to its end, start-up and leftovers included

    @property
    def per_removal(self) -> float:
        return statistics.median(self.samples)

    def observe(self, seconds: float, removals: int) -> None:
        if removals:
            self.samples.append(seconds / removals)


def calibrate(
    mode: Mode, server: Server, source: Path, expected: Expected, work: Path, other: Path | None, bucket: Bucket | None
) -> Timing:
    """Jobs run to completion, timed; each must leave exactly the final state."""
    applies, wholes = [], []
    for _ in range(3):
        layout = new_layout(mode, work, source, other, bucket)
        began = time.monotonic()
        seconds, failed = run_to_completion(mode, layout, server)
        wholes.append(time.monotonic() - began)
        assert failed == [], failed
        applies.append(seconds)
        assert final_state_problems(look(layout, expected), layout, expected).all() == []
        layout.clear()
    return Timing(sorted(applies)[1] / len(expected.removed), sorted(wholes)[1])


SECOND_KILL_SHARE = 0.25  # of the rounds, this share also kills the restart, at a random moment of its run


def one_round(
    mode: Mode, server: Server, layout: Layout, expected: Expected, timing: Timing, rng: random.Random, f: Figures
) -> Problems:
    pid = server.start(layout.job(mode))
    # Aim at one removal chosen at random: wait until the ones before it are done, then a random moment
    # within the time one removal takes.
    server.expect("APPLY", pid)
    applied, before = time.monotonic(), rng.randrange(len(expected.removed))
    for _ in range(before):
        server.expect("OUTCOME", pid)
    timing.observe(time.monotonic() - applied, before)
    time.sleep(rng.uniform(0, 1.2 * timing.per_removal))
    status = server.kill(pid)
    f.rounds += 1
    f.kills_landed += status == -signal.SIGKILL

    seen = look(layout, expected)
    f.where[classify(status, seen, layout, expected)] += 1
    found = crash_state_problems(seen, layout, expected)
    missing_intent = gone_without_start(seen, layout, expected)
    if rng.random() < SECOND_KILL_SHARE:
        # The next start is killed too, anywhere in its run: while it takes the stale lock, finishes the
        # leftovers of the first kill (an entry half deleted in the trash, a temporary archive copy) or
        # carries on with the removals. Whatever it leaves must pass the same checks.
        pid = server.start(layout.job(mode))
        time.sleep(rng.uniform(0, timing.whole_job))
        f.restarts_killed += server.kill(pid) == -signal.SIGKILL
        seen = look(layout, expected)
        found.add(crash_state_problems(seen, layout, expected))
        missing_intent += gone_without_start(seen, layout, expected)
    found.other += restart(mode, layout, server)
    found.add(final_state_problems(look(layout, expected), layout, expected))
    f.count(found)
    gaps = journal_gaps(layout, expected)
    gaps.gone_without_start = missing_intent
    f.count_journal(gaps)
    if gaps.mismatches:
        found.other.append(f"journal: {gaps}")
    return found


@pytest.mark.parametrize(
    "mode", MODES, ids=lambda m: m.name.replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
)
def test_sigkill_at_random_moments_loses_nothing(
    mode: Mode, server: Server, template: tuple[Path, Expected], work_fs: Path, request: pytest.FixtureRequest
) -> None:
    source, expected = template
    work = Path(tempfile.mkdtemp(prefix="rounds-", dir=work_fs))
    rounds = campaign_rounds(request.config)
    assert rounds >= 1, "--crash-rounds / CKPTKEEPER_CRASH_ROUNDS must be at least 1"
    other = request.getfixturevalue("other_fs") if mode.archive == "other-fs" or mode.state_on_other_fs else None
    bucket = None
    if mode.archive == "s3":  # moto's server in a process of its own: not sharing this one's GIL with the restarts
        bucket = new_bucket(request.getfixturevalue("campaign_s3"), request.getfixturevalue("monkeypatch"))
    if bucket is not None:
        # A round is ~3 s against moto (an upload is ~10x a local copy): 100 rounds of prune and 50 of the daemon
        # by default (~4 min and ~3 min), to keep CI's time in bounds.
        rounds = max(1, rounds // (4 if mode.daemon else 2))
    rng = random.Random(f"{SEED}-{mode.name}")
    figures = Figures(mode.name, SEED)
    problems: list[str] = []
    began = time.monotonic()

    timing = calibrate(mode, server, source, expected, work, other, bucket)
    figures.calibrated_apply_ms = timing.per_removal * len(expected.removed) * 1000
    figures.calibrated_job_ms = timing.whole_job * 1000
    for _ in range(rounds):
        layout = new_layout(mode, work, source, other, bucket)
        found = one_round(mode, server, layout, expected, timing, rng, figures)
        problems += [f"round {figures.rounds} (seed {SEED}): {p}" for p in found.all()]
        layout.clear()

    figures.seconds = time.monotonic() - began
    record_figures(figures)
    assert problems == [], "\n".join(problems[:20])
    assert figures.rounds == rounds
    assert (figures.data_lost, figures.half_present, figures.violations, figures.journal_mismatches) == (0, 0, 0, 0)
    # The campaign must actually interrupt the job, not just watch it finish, and (where a removal is more
    # than one rename) interrupt some removals halfway.
    assert figures.kills_landed >= rounds // 2, figures.report()
    if mode.archive != "same-fs" and rounds >= 10:
        assert figures.mid_removal >= 1, figures.report()


def test_kill_while_holding_the_lock_then_next_run_succeeds(
    server: Server, template: tuple[Path, Expected], work_fs: Path
) -> None:
    source, expected = template
    layout = new_layout(MODES[0], Path(tempfile.mkdtemp(prefix="lock-", dir=work_fs)), source, None)
    pid = server.start({**layout.job(MODES[0]), "hold_after_lock": True})
    server.expect("LOCKED", pid)

    # While it holds the lock, another instance is turned away with the holder's pid.
    contender = StateDir(layout.state.path)
    with pytest.raises(LockHeld, match=rf"pid {pid}\b"):
        contender.acquire_lock(layout.root)
    contender.close()

    assert server.kill(pid) == -signal.SIGKILL
    # The lock file still names the dead holder: the lock is stale, not released.
    assert f"pid {pid} " in (layout.state.path / "lock").read_text()

    # A fresh process takes the stale lock and prunes to completion.
    second = subprocess.run(
        [sys.executable, str(WORKER), "run", json.dumps(layout.job(MODES[0]))],
        check=False,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    second_pid = second.stdout.split()[1]
    assert f"DONE {second_pid} " in second.stdout
    assert final_state_problems(look(layout, expected), layout, expected).all() == []
    journal = layout.state.read_journal()
    for action in ("start-delete", "delete"):
        assert {(e["run"], e["checkpoint"]) for e in journal if e["action"] == action} == expected.removed
    assert {e["action"] for e in journal} == {"start-delete", "delete"}
    layout.clear()


def test_daemon_log_stays_json_lines_when_the_trash_is_beside_the_run(tmp_path: Path, tmpfs: Path) -> None:
    """Found by the daemon mode with the state directory on another filesystem. rename_to_trash creates
    `<run>/_ckptkeeper-trash` and renames the checkpoint into it at once; watchdog's inotify emitter handles
    the new directory's IN_CREATE by walking it and adding a watch to every directory found, the moved
    checkpoint included, which is watched already (an inotify watch follows the inode): watchdog then calls
    warnings.warn, which Python prints to stderr as two plain-text lines in the middle of the JSON log.
    It happens at most around the first removal of each run (a race with the emitter thread), so the root
    holds many runs with one removal each."""
    root = tmp_path / "outputs"
    for index in range(12):
        config = SimConfig(steps_per_epoch=4, epochs=1, save_steps=2, eval_steps=2, seed=index)
        for step in simulate_run(root / f"run{index}", config):
            (root / f"run{index}" / f"checkpoint-{step}" / f"global_step{step}").mkdir()
    state = Path(tempfile.mkdtemp(prefix="ckptkeeper-state-", dir=tmpfs))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CKPTKEEPER_")}
    flags = ["--keep", "last:1", "--state-dir", str(state), "--settle", "0", "--log-format", "json", "--exit-when-done"]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ckptkeeper", "watch", str(root), *flags],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
            env=environment,
        )
    finally:
        shutil.rmtree(state, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in root.glob("run*/checkpoint-*")) == ["checkpoint-4"] * 12
    not_json = []
    for line in done.stderr.splitlines():
        try:
            json.loads(line)
        except ValueError:
            not_json.append(line)
    assert not_json == [], "\n".join(not_json[:4])


# ---------------------------------------------------------------------------------------------- the slimming mode
# `--keep last:1 --keep-weights every:4` (with the Trainer's best protected, whole): every 4th checkpoint is made
# weights-only, the newest and the best stay whole, the rest are removed.
SLIM_KEEP, SLIM_KEEP_WEIGHTS = "last:1", "every:4"
SLIM_RANKS = 64  # rng_state_<rank>.pth in each checkpoint: many resume entries, moved one rename at a time
SLIM_RUNS = {
    # run path below the root -> the simulated Trainer run written there, and the engine whose files it gets
    "ds": (
        SimConfig(steps_per_epoch=16, epochs=1, save_steps=2, eval_steps=2, shards=2, optimizer_bytes=1 << 20),
        "ds",
    ),
    "fsdp/lr-3e-5": (
        SimConfig(steps_per_epoch=14, epochs=1, save_steps=2, eval_steps=2, optimizer_bytes=1 << 20, seed=7),
        "fsdp",
    ),
}
SLIM_MODES = (
    Mode("slim", None, keep=SLIM_KEEP, keep_weights=SLIM_KEEP_WEIGHTS),
    Mode("slim, state dir on another filesystem", None, True, keep=SLIM_KEEP, keep_weights=SLIM_KEEP_WEIGHTS),
)
RANDOM_MOMENT = "at a random moment"
# Of the first kills, this share is aimed at a random moment (as in the other modes); the rest watch the target
# checkpoint and kill at a point of its slim drawn at random (see aim_inside_slim).
RANDOM_AIM_SHARE = 0.4
TEMP_MARKER_SHARE = 0.15  # of the aimed kills: as soon as the marker's temporary file appears


def write_engine_files(checkpoint: Path, step: int, engine: str, rng: random.Random) -> set[str]:
    """What DeepSpeed or FSDP adds to a Trainer checkpoint; returns the checkpoint's resume-state entries (the
    issue's list, written out here, not asked of ckptkeeper)."""
    resume = {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
    for rank in range(SLIM_RANKS):
        (checkpoint / f"rng_state_{rank}.pth").write_bytes(rng.randbytes(64))
        resume.add(f"rng_state_{rank}.pth")
    if engine == "ds":
        # ZeRO's engine state beside gathered 16-bit weights (the model*.safetensors): the engine state goes.
        shards = checkpoint / f"global_step{step}"
        shards.mkdir()
        for rank in range(16):
            (shards / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(rng.randbytes(4096))
        (checkpoint / "latest").write_text(f"global_step{step}")
        (checkpoint / "zero_to_fp32.py").write_text("# DeepSpeed's conversion script: not known, so it stays\n")
        return resume | {f"global_step{step}", "latest"}
    # FSDP's sharded state: the optimizer's optimizer_0/ goes, the weights' pytorch_model_fsdp_0/ stays.
    for name in ("optimizer_0", "pytorch_model_fsdp_0"):
        (checkpoint / name).mkdir()
        for rank in range(8):
            (checkpoint / name / f"__{rank}_0.distcp").write_bytes(rng.randbytes(4096))
    (checkpoint / "tokenizer.json").write_text('{"version": "1.0"}\n')
    return resume | {"optimizer_0"}


@dataclass
class SlimExpected:
    manifests: dict[Key, Manifest]
    inodes: dict[Key, dict[str, Identity]]  # each file's, in the template: every round's files are links to them
    resume: dict[Key, tuple[str, ...]]  # the top-level resume-state entries, sorted (the order they are moved in)
    whole: set[Key]  # kept whole: the newest, the Trainer's best
    slimmed: set[Key]  # kept weights-only
    removed: set[Key]
    order: tuple[tuple[Key, str], ...]  # what a prune acts on, in its order: (checkpoint, "slim" or "delete")
    digests: Digests


@pytest.fixture(scope="module")
def slim_template(work_fs: Path) -> Iterator[tuple[Path, SlimExpected]]:
    """The two runs of the slimming mode, their manifests (with inodes) and the plan, recorded before any round;
    checked again after the campaign, hashing every byte."""
    root = work_fs / "slim-template"
    rng = random.Random(1)
    resume: dict[Key, tuple[str, ...]] = {}
    for run, (config, engine) in SLIM_RUNS.items():
        for step in simulate_run(root / run, config):
            names = write_engine_files(root / run / f"checkpoint-{step}", step, engine, rng)
            resume[(run, f"checkpoint-{step}")] = tuple(sorted(names))
    manifests: dict[Key, Manifest] = {}
    inodes: dict[Key, dict[str, Identity]] = {}
    for key, path in checkpoint_dirs(root).items():
        inodes[key] = {}
        manifests[key] = tree_manifest(path, inodes=inodes[key])
    digests = Digests()
    digests.learn(root)
    policy = crash_worker.policy_for({"keep": SLIM_KEEP, "keep_weights": SLIM_KEEP_WEIGHTS})
    surveyed = Pipeline.checked(root, policy, state_dir=root / "_ckptkeeper").survey(None)
    plan = surveyed.plan
    assert not plan.refusals and not surveyed.warnings
    decisions = {(p.run.path, d.checkpoint.name): d for p in plan.runs for d in p.decisions}
    assert set(decisions) == set(manifests) == set(resume)
    # ckptkeeper sorts the entries as the issue does, and sees the weights outside the resume state.
    assert {key: d.checkpoint.resume_state for key, d in decisions.items()} == resume
    assert all(d.checkpoint.complete and d.checkpoint.weights_outside for d in decisions.values())
    whole = {key for key, d in decisions.items() if d.action is Action.KEEP}
    slimmed = {key for key, d in decisions.items() if d.action is Action.WEIGHTS_ONLY}
    removed = {key for key, d in decisions.items() if not d.kept}
    order = tuple(
        ((p.run.path, d.checkpoint.name), "slim" if d.slims else "delete") for p in plan.runs for d in p.acted_on
    )
    assert len(slimmed) >= 5 and len(removed) >= 4 and len(whole) >= 2
    assert sorted(key for key, _ in order) == sorted(slimmed | removed)
    yield root, SlimExpected(manifests, inodes, resume, whole, slimmed, removed, order, digests)
    assert {key: tree_manifest(path) for key, path in checkpoint_dirs(root).items()} == manifests


@dataclass
class SlimProblems:
    unmarked_partial: list[str] = field(default_factory=list)  # resume state gone without the marker
    weights_changed: list[str] = field(default_factory=list)  # a file that is not resume state missing or not the same
    lost: list[str] = field(default_factory=list)  # a checkpoint the plan keeps gone
    other: list[str] = field(default_factory=list)

    def all(self) -> list[str]:
        return self.unmarked_partial + self.weights_changed + self.lost + self.other

    def add(self, other: SlimProblems) -> None:
        self.unmarked_partial += other.unmarked_partial
        self.weights_changed += other.weights_changed
        self.lost += other.lost
        self.other += other.other


# What a check finds a checkpoint to be (see slim_state).
GONE, WHOLE, WHOLE_TEMP = "gone", "whole", "whole, temporary marker left"
MARKED_UNMOVED, MARKED_PARTLY, WEIGHTS_ONLY, UNMARKED_PARTIAL = (
    "marked, nothing moved",
    "marked, resume state partly moved",
    "weights only",
    "resume state gone without the marker",
)


def dir_times(layout: Layout) -> dict[Key, int]:
    """Each checkpoint directory's mtime (ns) as the round starts."""
    return {key: path.lstat().st_mtime_ns for key, path in checkpoint_dirs(layout.root).items()}


def _under(rel: str, name: str) -> bool:
    return rel == name or rel.startswith(name + "/")


def slim_state(
    key: Key, path: Path | None, expected: SlimExpected, mtime_ns: int, final: bool
) -> tuple[str, SlimProblems]:
    """What one checkpoint is now, and what is wrong with it. At any moment: whole (every entry as it was, at
    most a kill's temporary marker beside them); or marked weights-only, every entry that is not resume state
    the same file with the same bytes, each resume entry whole or gone; or gone, if the plan removes it.
    After the final run: whole (kept whole) or weights only (no resume state left), with the mtime from before."""
    found = SlimProblems()
    if path is None:
        if key not in expected.removed:
            found.lost.append(f"{key[0]}/{key[1]} is gone, but the plan keeps it")
        return GONE, found
    if final and key in expected.removed:
        found.other.append(f"{path} is still there after the final run, but the plan removes it")
    inodes: dict[str, Identity] = {}
    now = tree_manifest(path, expected.digests, inodes)
    moved = _compare_entries(path, now, inodes, key, expected, found)
    marked = MARKER in now
    allowed = {MARKER} if marked else {MARKER_TEMP} if key in expected.slimmed and not final else set()
    found.other += [f"{path}/{rel} is new" for rel in sorted(set(now) - set(expected.manifests[key]) - allowed)]
    if not marked:
        if moved:
            lost = ", ".join(moved[:3]) + (", ..." if len(moved) > 3 else "")
            found.unmarked_partial.append(
                f"{path} lost {len(moved)} of its {len(expected.resume[key])} resume entries ({lost}) and carries "
                "no weights-only marker"
            )
        state = UNMARKED_PARTIAL if moved else WHOLE_TEMP if MARKER_TEMP in now else WHOLE
    else:
        if key not in expected.slimmed:
            found.other.append(f"{path} is marked weights-only, but the plan keeps it whole or removes it")
        found.other += _marker_problems(path / MARKER)
        state = (
            MARKED_UNMOVED if not moved else WEIGHTS_ONLY if len(moved) == len(expected.resume[key]) else MARKED_PARTLY
        )
    if final and state != (WHOLE if key in expected.whole else WEIGHTS_ONLY):
        found.other.append(f"after the final run {path} is {state}")
    if (final or key in expected.whole) and path.lstat().st_mtime_ns != mtime_ns:
        found.other.append(f"{path}'s mtime is {path.lstat().st_mtime_ns}, it was {mtime_ns}")
    return state, found


def _compare_entries(
    path: Path, now: Manifest, inodes: dict[str, Identity], key: Key, expected: SlimExpected, found: SlimProblems
) -> list[str]:
    """Every entry that is not resume state must be there, the same file (inode) with the same bytes; each resume
    entry whole (all of it as it was) or gone. Returns the resume entries gone."""
    was, was_inodes, resume = expected.manifests[key], expected.inodes[key], expected.resume[key]
    for rel, entry in sorted(was.items()):
        same = (now.get(rel), inodes.get(rel)) == (entry, was_inodes.get(rel))
        if not same and not any(_under(rel, name) for name in resume):
            found.weights_changed.append(f"{path}/{rel} is {'missing' if rel not in now else 'not the same file'}")
    moved = []
    for name in resume:
        here = {rel: (e, inodes.get(rel)) for rel, e in now.items() if _under(rel, name)}
        if not here:
            moved.append(name)
        elif here != {rel: (e, was_inodes.get(rel)) for rel, e in was.items() if _under(rel, name)}:
            found.other.append(f"{path}/{name} (resume state) is neither whole nor gone")
    return moved


def _marker_problems(marker: Path) -> list[str]:
    """The marker is renamed into place whole: it is always a complete JSON object."""
    try:
        record = json.loads(marker.read_bytes())
    except (OSError, ValueError) as e:
        return [f"{marker} is not readable JSON: {e}"]
    return [] if isinstance(record, dict) else [f"{marker} is not a JSON object"]


def slim_look(
    layout: Layout, expected: SlimExpected, times: dict[Key, int], final: bool = False
) -> tuple[dict[Key, str], SlimProblems]:
    """Every checkpoint's state (slim_state), and the problems found, the trash's included."""
    found = SlimProblems()
    dirs = checkpoint_dirs(layout.root)
    found.other += [
        f"unexpected checkpoint directory {p}" for k, p in sorted(dirs.items()) if k not in expected.manifests
    ]
    states = {}
    for key in sorted(expected.manifests):
        states[key], problems = slim_state(key, dirs.get(key), expected, times[key], final)
        found.add(problems)
    entries = trash_entries(layout)
    found.other += [f"trash entry {e} has a checkpoint name" for e in entries if checkpoint_step(e.name)]
    if final:
        found.other += [f"trash not empty after the final run: {e}" for e in entries]
    return states, found


def slim_where(
    status: int,
    expected: SlimExpected,
    states: dict[Key, str],
    trash: set[Path],
    before: tuple[dict[Key, str], set[Path]] | None = None,
) -> str:
    """Where a kill landed, judged from what it left: a checkpoint caught mid-slim, a trash entry (a slim's holds
    resume entries, a removal's the checkpoint itself), or how many actions were done. `before`: the states and
    trash entries a first kill left (when judging a killed restart): only what changed since counts."""
    if status != -signal.SIGKILL:
        return "finished before the kill"
    old_states, old_trash = before if before is not None else ({}, set())
    changed = {state for key, state in states.items() if old_states.get(key) != state}
    for state in (MARKED_PARTLY, MARKED_UNMOVED, WHOLE_TEMP):
        if state in changed:
            return f"mid-slim: {state}"
    new_trash = trash - old_trash
    if any((entry / "trainer_state.json").exists() for entry in new_trash):
        return "mid-removal: renamed to the trash, not yet removed"
    if new_trash:
        return "mid-slim: resume state in the trash, not yet deleted"
    done = sum(states[key] in (GONE, WEIGHTS_ONLY) for key, _ in expected.order)
    if done == 0:
        return "before the first action"
    return "after the last action" if done == len(expected.order) else "between actions"


def slim_gone_without_start(states: dict[Key, str], layout: Layout, expected: SlimExpected) -> int:
    """At a kill: checkpoints already touched (gone, marked, a temporary marker) without their intent line."""
    entries = layout.state.read_journal()
    started = {(e.get("run"), e.get("checkpoint"), e.get("action")) for e in entries}
    missing = 0
    for key, action in expected.order:
        if states[key] != WHOLE and (*key, f"start-{action}") not in started:
            missing += 1
    return missing


def slim_journal_gaps(layout: Layout, expected: SlimExpected) -> JournalGaps:
    """Each slim and removal has its start line (start-slim / start-delete) before any other line of its own, at
    most one outcome line, and no line of another kind; no line names a checkpoint kept whole. A slim cut short
    is started again by the next pass (a second start-slim line); one finished but for its outcome line is not."""
    entries = layout.state.read_journal()
    gaps = JournalGaps()
    gaps.names_kept = sum((e.get("run"), e.get("checkpoint")) in expected.whole for e in entries)
    for key, action in expected.order:
        own = [e.get("action") for e in entries if (e.get("run"), e.get("checkpoint")) == key]
        start = f"start-{action}"
        gaps.no_start += start not in own
        gaps.wrong_start += bool(own) and (own[0] != start or any(a not in (start, action) for a in own))
        gaps.duplicate_outcome += own.count(action) > 1
        gaps.no_outcome += action not in own
    return gaps


@dataclass
class SlimFigures:
    mode: str
    seed: int
    rounds: int = 0
    rounds_state_elsewhere: int = 0  # with the state directory on another filesystem (the run-local trash)
    kills_landed: int = 0
    where: Counter[str] = field(default_factory=Counter)
    aims: Counter[str] = field(default_factory=Counter)  # how each first kill was aimed
    restarts_killed: int = 0
    restart_where: Counter[str] = field(default_factory=Counter)  # judged by what changed since the first kill
    unmarked_partial: int = 0  # a checkpoint that lost resume state without the marker: must stay 0
    weights_changed: int = 0  # a file other than resume state missing, or not the same file and bytes: must stay 0
    lost: int = 0  # a kept checkpoint gone: must stay 0
    violations: int = 0  # every invariant failure, the three above included: must stay 0
    journal_mismatches: int = 0  # must stay 0
    journal_no_outcome: int = 0  # fine: killed between a start line and its outcome line
    calibrated_apply_ms: float = 0.0
    calibrated_job_ms: float = 0.0
    seconds: float = 0.0

    @property
    def mid_slim(self) -> int:
        return sum(n for where, n in self.where.items() if where.startswith("mid-slim"))

    @property
    def restarts_mid_slim(self) -> int:
        return sum(n for where, n in self.restart_where.items() if where.startswith("mid-slim"))

    def count(self, found: SlimProblems) -> None:
        self.unmarked_partial += len(found.unmarked_partial)
        self.weights_changed += len(found.weights_changed)
        self.lost += len(found.lost)
        self.violations += len(found.all())

    def report(self) -> str:
        def listed(counter: Counter[str]) -> str:
            return ", ".join(f"{n} {w}" for w, n in sorted(counter.items()))

        return (
            f"crash campaign [{self.mode}] seed={self.seed}: {self.rounds} rounds in {self.seconds:.0f} s "
            f"({self.rounds_state_elsewhere} with the state dir on another filesystem), {self.kills_landed} kills "
            f"landed ({self.mid_slim} mid-slim, {self.where[f'mid-slim: {MARKED_PARTLY}']} of them with the resume "
            f"state partly moved; {self.restarts_killed} restarts killed too, {self.restarts_mid_slim} of them "
            f"mid-slim), unmarked partial checkpoints: {self.unmarked_partial}, weights changed: "
            f"{self.weights_changed}, kept checkpoints lost: {self.lost}, invariant violations: {self.violations}; "
            f"journal mismatches: {self.journal_mismatches}; {self.journal_no_outcome} actions without their outcome "
            f"line; apply ~{self.calibrated_apply_ms:.1f} ms; aims: {listed(self.aims)}; where: {listed(self.where)}; "
            f"restarts killed: {listed(self.restart_where)}"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "where": dict(self.where),
            "aims": dict(self.aims),
            "restart_where": dict(self.restart_where),
            "mid_slim": self.mid_slim,
        }


def aim_inside_slim(path: Path, present: Sequence[str], marked: bool, rng: random.Random, patience: float) -> str:
    """Watch the checkpoint at `path` and return (for the caller to kill at once) when its slim reaches a point
    drawn at random: its marker's temporary file appears, its marker appears, or one of the first half of its
    resume entries still `present` leaves (they are moved in name order; a kill lands a few to a few dozen
    renames later). Gives up after `patience` seconds."""
    marker, temp = str(path / MARKER), str(path / MARKER_TEMP)
    draw = rng.random()
    if not marked and draw < TEMP_MARKER_SHARE:
        aim = "at the temporary marker"

        def ready() -> bool:
            return os.path.lexists(temp) or os.path.lexists(marker)

    elif not marked and (draw < 2 * TEMP_MARKER_SHARE or not present):
        aim = "at the marker"

        def ready() -> bool:
            return os.path.lexists(marker)

    elif not present:
        return "nothing left to aim at"
    else:
        aim = "inside the renames"
        leaving = str(path / present[rng.randrange((len(present) + 1) // 2)])

        def ready() -> bool:
            return not os.path.lexists(leaving)

    deadline = time.monotonic() + patience
    while not ready():
        if time.monotonic() > deadline:
            return f"{aim} (gave up waiting)"
    return aim


def slim_round(
    mode: Mode,
    server: Server,
    layout: Layout,
    expected: SlimExpected,
    timing: Timing,
    rng: random.Random,
    f: SlimFigures,
) -> SlimProblems:
    times = dir_times(layout)
    patience = max(1.0, 4 * timing.whole_job)
    pid = server.start(layout.job(mode))
    server.expect("APPLY", pid)
    # The first kill targets one slim of the plan, chosen at random: at a random moment within the time one
    # action takes once the actions before it are done, or at a random point of the slim itself.
    target = rng.choice([i for i, (_, action) in enumerate(expected.order) if action == "slim"])
    (run, name), _ = expected.order[target]
    if rng.random() < RANDOM_AIM_SHARE:
        applied = time.monotonic()
        for _ in range(target):
            server.expect("OUTCOME", pid)
        timing.observe(time.monotonic() - applied, target)
        time.sleep(rng.uniform(0, 1.2 * timing.per_removal))
        aim = RANDOM_MOMENT
    else:
        aim = aim_inside_slim(layout.root / run / name, expected.resume[(run, name)], False, rng, patience)
    status = server.kill(pid)
    f.rounds += 1
    f.kills_landed += status == -signal.SIGKILL
    f.aims[aim] += 1

    states, found = slim_look(layout, expected, times)
    trash = set(trash_entries(layout))
    f.where[slim_where(status, expected, states, trash)] += 1
    missing_intent = slim_gone_without_start(states, layout, expected)
    if rng.random() < SECOND_KILL_SHARE:
        # The restart is killed too: at a random moment of its run, or inside a slim it finishes or starts.
        pid = server.start(layout.job(mode))
        unfinished = sorted(key for key in expected.slimmed if states[key] not in (WEIGHTS_ONLY, GONE))
        if unfinished and rng.random() < 0.5:
            key = rng.choice(unfinished)
            path = layout.root / key[0] / key[1]
            present = [n for n in expected.resume[key] if os.path.lexists(path / n)]
            aim_inside_slim(path, present, states[key] in (MARKED_UNMOVED, MARKED_PARTLY), rng, patience)
        else:
            time.sleep(rng.uniform(0, timing.whole_job))
        status = server.kill(pid)
        f.restarts_killed += status == -signal.SIGKILL
        before = (states, trash)
        states, more = slim_look(layout, expected, times)
        found.add(more)
        f.restart_where[slim_where(status, expected, states, set(trash_entries(layout)), before)] += 1
        missing_intent += slim_gone_without_start(states, layout, expected)
    found.other += restart(mode, layout, server)
    found.add(slim_look(layout, expected, times, final=True)[1])
    f.count(found)
    gaps = slim_journal_gaps(layout, expected)
    gaps.gone_without_start = missing_intent
    f.journal_mismatches += gaps.mismatches
    f.journal_no_outcome += gaps.no_outcome
    if gaps.mismatches:
        found.other.append(f"journal: {gaps}")
    return found


def calibrate_slim(server: Server, source: Path, expected: SlimExpected, work: Path, other: Path) -> Timing:
    """Prunes run to completion, timed, in both layouts; each must leave exactly the final state."""
    applies, wholes = [], []
    for mode in (*SLIM_MODES, SLIM_MODES[0]):
        layout = new_layout(mode, work, source, other)
        times = dir_times(layout)
        began = time.monotonic()
        seconds, failed = run_to_completion(mode, layout, server)
        wholes.append(time.monotonic() - began)
        assert failed == [], failed
        applies.append(seconds)
        assert slim_look(layout, expected, times, final=True)[1].all() == []
        layout.clear()
    return Timing(sorted(applies)[1] / len(expected.order), sorted(wholes)[1])


def test_sigkill_while_slimming_keeps_the_weights_and_never_leaves_an_unmarked_partial_checkpoint(
    server: Server,
    slim_template: tuple[Path, SlimExpected],
    work_fs: Path,
    other_fs: Path,
    request: pytest.FixtureRequest,
) -> None:
    source, expected = slim_template
    work = Path(tempfile.mkdtemp(prefix="slim-rounds-", dir=work_fs))
    rounds = campaign_rounds(request.config)
    assert rounds >= 1, "--crash-rounds / CKPTKEEPER_CRASH_ROUNDS must be at least 1"
    rng = random.Random(f"{SEED}-slim")
    figures = SlimFigures(f"slim: --keep {SLIM_KEEP} --keep-weights {SLIM_KEEP_WEIGHTS}", SEED)
    problems: list[str] = []
    began = time.monotonic()

    timing = calibrate_slim(server, source, expected, work, other_fs)
    figures.calibrated_apply_ms = timing.per_removal * len(expected.order) * 1000
    figures.calibrated_job_ms = timing.whole_job * 1000
    for index in range(rounds):
        mode = SLIM_MODES[index % 2]
        figures.rounds_state_elsewhere += mode.state_on_other_fs
        layout = new_layout(mode, work, source, other_fs)
        found = slim_round(mode, server, layout, expected, timing, rng, figures)
        problems += [f"round {figures.rounds} [{mode.name}] (seed {SEED}): {p}" for p in found.all()]
        layout.clear()

    figures.seconds = time.monotonic() - began
    record_figures(figures)
    assert problems == [], "\n".join(problems[:20])
    assert figures.rounds == rounds
    assert (figures.unmarked_partial, figures.weights_changed, figures.lost) == (0, 0, 0)
    assert (figures.violations, figures.journal_mismatches) == (0, 0)
    # The campaign must interrupt the prune, and catch slims halfway: marked with part of the resume state moved.
    assert figures.kills_landed >= rounds // 2, figures.report()
    if rounds >= 10:
        assert figures.mid_slim >= rounds // 10, figures.report()
        assert figures.where[f"mid-slim: {MARKED_PARTLY}"] >= 1, figures.report()
