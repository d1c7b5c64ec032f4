"""The scan memo: what each checkpoint's files said at the last `prune`, kept in the state directory, so that a
later `plan` or `prune` of an unchanged checkpoint reads no file of it (its `trainer_state.json` is most of a
scan's time; issue #12). Owned by the thread that runs the pipeline.

It is git's index idea, with the re-check's argument (`scan.lstat_signature`): an entry holds the contents read
at one look (`scan.Contents`: the problems found, epoch, metrics, the Trainer's best steps, the weights-only
marker) under a digest of the lstat signature of every entry of the checkpoint then (path, type, inode, size,
mtime_ns, ctime_ns). Any change to a file, a rename or a chmod sets ctime to the kernel's clock, and nothing lets a
writer set it back, so the same signature now means the same files; a signature that could not vouch for that
(a change within a timestamp step of the look: `Checkpoint.signature_vouches`) is never written down. The
judgement that depends on the clock (settling, staleness) is made afresh at every look.

What it never does: decide anything on its own. A memo that is missing, unreadable, too big, not JSON, of
another version of ckptkeeper, or an entry of the wrong shape, is ignored, and the files are read. It is written
by `prune` after its pass and by `watch` after each full pass that saw a change (from its content cache), under
the root's lock, through the state directory's descriptor, replaced whole, and never where the disk is nearly
full; never by `plan`, which writes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from ckptkeeper import __version__, integrity, scan, trainer_state, weights
from ckptkeeper.model import Signature
from ckptkeeper.regular import open_regular
from ckptkeeper.scan import ContentCache, Contents
from ckptkeeper.state import OWNER_MARK

MEMO_NAME = "scan-memo.json"
MEMO_TEMP = "scan-memo.json.part"
MAX_MEMO_BYTES = 256 << 20
MIN_ROOM_BYTES = 64 << 20  # never written where less is free than this and ten times its size
MIN_ROOM_FACTOR = 10
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def code_version() -> str:
    """What judged the contents: ckptkeeper's version and the files of the modules that read a checkpoint (a
    memo of other code, or of the same version edited in place, is not used)."""
    parts = [__version__]
    for module in (scan, trainer_state, integrity, weights):
        try:
            st = os.stat(module.__file__ or "")
        except OSError:
            return ""  # not known: no memo is used
        parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return " ".join(parts)


def digest(signature: Signature) -> str:
    return hashlib.blake2b(repr(signature).encode("utf-8", "surrogateescape"), digest_size=20).hexdigest()


class ScanMemo:
    """The memo of one state directory: read once, looked up per checkpoint, written back by `prune` (or the
    daemon's `Reconciler`). Owned by the thread that runs the pipeline."""

    def __init__(self, state_dir: Path, entries: dict[str, Any] | None = None, recording: bool = True) -> None:
        self.state_dir = state_dir
        self._old: dict[str, Any] = entries or {}
        self._new: dict[str, list[Any]] = {}
        self.recording = recording  # `saw` writes down (not for `plan`, which never saves)
        self.used = 0  # checkpoints whose files were not read (for tests and benchmarks)

    @classmethod
    def load(cls, state_dir: Path, recording: bool = True) -> ScanMemo:
        """The memo as the state directory holds it; empty where there is none that can be used."""
        raw = _read(state_dir)
        try:
            data = json.loads(raw) if raw else None
        except (ValueError, RecursionError):
            data = None
        code = code_version()
        if not code or not isinstance(data, dict) or data.get("code") != code:
            return cls(state_dir, recording=recording)
        entries = data.get("entries")
        return cls(state_dir, entries if isinstance(entries, dict) else None, recording)

    def contents(self, run_dir: str, name: str, signature: Signature) -> Contents | None:
        held = self._old.get(_key(run_dir, name))
        if not isinstance(held, list) or len(held) != 2 or held[0] != digest(signature):
            return None
        contents = _decode(held[1])
        if contents is not None:
            self.used += 1
        return contents

    def holds(self, run_dir: str, name: str) -> bool:
        """Something is written down for this checkpoint (whether it still holds is `contents`' to say)."""
        return _key(run_dir, name) in self._old

    def saw(self, run_dir: str, name: str, signature: Signature, contents: Contents) -> None:
        if self.recording:
            self._new[_key(run_dir, name)] = [digest(signature), _encode(contents)]

    def take(self, cache: ContentCache) -> None:
        """What the watch daemon's cache holds replaces what this memo was told (the daemon saves it so)."""
        self._new = {_key(run_dir, name): [digest(sig), _encode(c)] for run_dir, name, sig, c in cache.vouched()}

    def save(self, state_dir_fd: int) -> bool:
        """Replace the memo with what this pass saw (entries of checkpoints gone since are dropped). False when
        it could not be written (a full disk, say): the next command reads the files, nothing more."""
        data = json.dumps({"code": code_version(), "entries": self._new}, separators=(",", ":")).encode()
        try:
            room = os.statvfs(state_dir_fd)
            if room.f_bavail * room.f_frsize < MIN_ROOM_FACTOR * len(data) + MIN_ROOM_BYTES:
                return False  # a disk this full needs its space for the training run, not for a cache

            fd = os.open(MEMO_TEMP, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=state_dir_fd)  # fmt: skip
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(MEMO_TEMP, MEMO_NAME, src_dir_fd=state_dir_fd, dst_dir_fd=state_dir_fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(MEMO_TEMP, dir_fd=state_dir_fd)
            return False
        return True


def _key(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, name)


def _read(state_dir: Path) -> bytes:
    """The memo file's bytes, read without following a link, from a state directory of ckptkeeper's only; b""
    for anything else."""
    try:
        dir_fd = os.open(state_dir, _DIR_FLAGS)
    except OSError:
        return b""
    try:
        os.stat(OWNER_MARK, dir_fd=dir_fd, follow_symlinks=False)
        fd = open_regular(MEMO_NAME, dir_fd)
    except OSError:
        return b""
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if st.st_size > MAX_MEMO_BYTES:
            return b""
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return b""  # written, or writable, by someone else: what it says about checkpoints is theirs
        return os.pread(fd, st.st_size + 1, 0)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _encode(c: Contents) -> dict[str, Any]:
    marker = None
    if c.marker is not None:
        marker = {"times_ns": list(c.marker.times_ns), "complete": c.marker.complete, "removed": list(c.marker.removed)}
    return {
        "problems": list(c.problems),
        "epoch": c.epoch,
        "metrics": c.metrics,
        "best_steps": list(c.best_steps),
        "stopped": c.stopped,
        "marker": marker,
    }


def _strings(value: object) -> tuple[str, ...] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def _decode(raw: object) -> Contents | None:
    """The Contents an entry holds, or None when it is not exactly of the shape `_encode` writes."""
    if not isinstance(raw, dict) or raw.keys() != {"problems", "epoch", "metrics", "best_steps", "stopped", "marker"}:
        return None
    problems, epoch, metrics = _strings(raw["problems"]), raw["epoch"], raw["metrics"]
    best_steps, stopped = raw["best_steps"], raw["stopped"]
    if problems is None or not (epoch is None or _finite(epoch)) or not isinstance(stopped, bool):
        return None
    if not isinstance(metrics, dict) or not all(isinstance(k, str) and _finite(v) for k, v in metrics.items()):
        return None
    if not isinstance(best_steps, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in best_steps):
        return None
    well_formed, marker = _decode_marker(raw["marker"])
    if not well_formed:
        return None
    return Contents(problems, epoch, dict(metrics), tuple(best_steps), stopped, marker, memorable=True)


def _finite(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too big for a float
        return False


def _decode_marker(raw: object) -> tuple[bool, weights.Marker | None]:
    """Whether the entry's marker is well formed, and the marker (None when there was none)."""
    if raw is None:
        return True, None
    if not isinstance(raw, dict) or raw.keys() != {"times_ns", "complete", "removed"}:
        return False, None
    times, removed = raw["times_ns"], _strings(raw["removed"])
    if not (isinstance(times, list) and len(times) == 2 and all(isinstance(t, int) for t in times)):
        return False, None
    if removed is None or not isinstance(raw["complete"], bool):
        return False, None
    return True, weights.Marker((times[0], times[1]), raw["complete"], removed)
