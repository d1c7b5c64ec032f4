"""The re-check just before a removal: is the checkpoint still the very one the plan judged?

The plan was made from an earlier look at the disk. Before a checkpoint is removed, `recheck` looks again
through the run directory reached without following links (as the removal reaches it) and compares what it
sees with what the scan took: an lstat signature of the directory and its entries where that signature can
vouch for the contents (`scan.lstat_signature`), else a full read.
"""

from __future__ import annotations

import os
from pathlib import Path

from ckptkeeper.actions import ActionError, Vanished, open_run_dir
from ckptkeeper.model import Checkpoint, Outcome, OutcomeKind, Signature
from ckptkeeper.paths import Identity, fd_path
from ckptkeeper.scan import VANISHED_WHILE_READING, read_checkpoint, signature_of, walk_files

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
VANISHED_BEFORE = "removed by someone else before ckptkeeper got to it"
CHANGED = "changed since the plan was made; left for the next pass"


def recheck(
    root: Path, root_identity: Identity | None, run: str, path: Path, planned: Checkpoint
) -> Identity | Outcome | None:
    """The checkpoint directory's identity now, if it is still the very one judged, with the very entries
    and contents; else the outcome. The plan was made from an earlier look at the disk; this one goes
    through the run directory reached without following links (the same way the removal reaches it).
    It compares a fresh lstat signature with the one the scan took (`scan.lstat_signature` says why an
    unchanged one means unchanged contents); where that signature cannot vouch for it (written a moment
    before the scan), it reads the checkpoint again in full."""
    try:
        run_fd = open_run_dir(root, path, "remove", root_identity)
    except Vanished:
        return Outcome(run, planned.name, OutcomeKind.VANISHED, 0, VANISHED_BEFORE)
    except ActionError as e:
        return Outcome(run, planned.name, OutcomeKind.ERROR, 0, str(e))
    try:
        if planned.signature is not None and planned.signature_vouches:
            return _compare_signature(run, run_fd, path, planned)
        return _read_again(run, Path(fd_path(run_fd, path.parent)) / planned.name, planned)
    finally:
        os.close(run_fd)


def _compare_signature(run: str, run_fd: int, path: Path, planned: Checkpoint) -> Identity | Outcome:
    """The re-check by signature: the checkpoint in the run directory open as `run_fd` has the identity and lstat
    signature the scan saw (no entry added, removed, renamed, replaced or written since)."""
    try:
        now_identity, now_signature = _signature_at(run_fd, path)
    except FileNotFoundError:
        return Outcome(run, planned.name, OutcomeKind.VANISHED, 0, VANISHED_BEFORE)
    except OSError:
        return Outcome(run, planned.name, OutcomeKind.SKIPPED, 0, CHANGED)
    if now_identity != planned.identity or now_signature != planned.signature:
        return Outcome(run, planned.name, OutcomeKind.SKIPPED, 0, CHANGED)
    return now_identity


def _signature_at(run_fd: int, path: Path) -> tuple[Identity, Signature]:
    """`scan.lstat_signature` of the checkpoint `path.name` in the run directory open as `run_fd`, taken through
    descriptors: the checkpoint opened without following a link (a link or a file in its place is an OSError, a
    checkpoint gone FileNotFoundError), its own entry by `fstat` and its entries by `fstatat` relative to it, which
    spares the kernel a walk of /proc/self/fd/N/... for every entry: the scan's own walk (`scan.walk_files`), so
    the same entries as lstat sees them, and the same signature."""
    fd = os.open(path.name, _DIR_FLAGS, dir_fd=run_fd)
    try:
        top = os.fstat(fd)
        walked, _ = walk_files(Path(fd_path(fd, path)), top, fd)
    finally:
        os.close(fd)
    return (top.st_dev, top.st_ino), signature_of(walked)


def _read_again(run: str, where: Path, planned: Checkpoint) -> Identity | Outcome | None:
    """The re-check by a full read: still complete, the same size, identity and signature."""
    now_seen = read_checkpoint(where, planned.step)
    if now_seen.incomplete_reason == VANISHED_WHILE_READING:
        return Outcome(run, planned.name, OutcomeKind.VANISHED, 0, VANISHED_BEFORE)
    if not now_seen.complete or now_seen.size_bytes != planned.size_bytes or not _same(planned, now_seen):
        return Outcome(run, planned.name, OutcomeKind.SKIPPED, 0, CHANGED)
    return now_seen.identity


def _same(planned: Checkpoint, now_seen: Checkpoint) -> bool:
    """The very directory judged, with the very files: same identity, and no entry added, removed, renamed
    or written since (every entry's type, inode, size, mtime and ctime)."""
    same_identity = planned.identity is None or planned.identity == now_seen.identity
    return same_identity and (planned.signature is None or planned.signature == now_seen.signature)
