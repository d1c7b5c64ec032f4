"""Slimming a checkpoint to its weights (`--keep-weights`): the one time ckptkeeper writes inside a kept one.

Crash-safe by order, like every removal: first the marker (`weights.MARKER`, written in a new trash entry on
the checkpoint's filesystem and renamed in, so the directory changes only as the marker that records its
times appears), then each resume-state entry renamed into that trash entry (atomic, one at a time), then the
directory's own times put back, then the marker's `complete` made true in place (one write of the same
length: the directory's mtime stays). At every instant the checkpoint is whole, or marked weights-only; a
slim cut short by a kill leaves the marker (not complete), and the next pass (which plans it weights-only
again) moves what is left and puts the times back. The weight files are never opened for writing, copied
or moved: the same inodes, the same bytes. The marker records the directory's times as they were, so even a
slim finished late restores them (the Trainer's own rotation orders checkpoints by directory mtime).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ckptkeeper.actions import (
    RUN_TRASH_NAME,
    ActionError,
    Changed,
    Dispose,
    TrashEntry,
    Vanished,
    _dispose_or_finish,
    _guard_at,
    _trash_name,
    open_run_dir,
)
from ckptkeeper.regular import open_regular
from ckptkeeper.state import StateDir
from ckptkeeper.weights import MARKER, MARKER_TEMP, Marker, marker_text, read_marker

Identity = tuple[int, int]
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def slim_checkpoint(
    root: Path,
    checkpoint: Path,
    resume_state: Sequence[str],
    state: StateDir,
    dispose: Dispose | None = None,
    expected: Identity | None = None,
    root_identity: Identity | None = None,
) -> None:
    """Make `checkpoint` weights-only: mark it, move `resume_state` (its top-level entries) to the trash, and
    put the directory's times back. Raises the `actions` errors (Vanished, Changed, ActionError). With no
    resume state left (a slim cut short after its last move), only the times are put back."""
    run_fd = open_run_dir(root, checkpoint, "slim", root_identity)
    entry = None
    try:
        checked = _guard_at(run_fd, checkpoint, expected, "slim")
        checkpoint_fd = _open_checkpoint(run_fd, checkpoint, checked)
        try:
            marker = _read_marker(checkpoint_fd)
            if marker is None:
                # The marker is written in a trash entry on the checkpoint's filesystem and renamed in: the
                # directory changes (its mtime) only as the marker recording its times appears.
                times = _times(checkpoint_fd)
                marker = Marker(times, False, tuple(resume_state))
                text = marker_text(resume_state, times, complete=False)
                entry = _in_trash(run_fd, checkpoint, state, lambda e: _place_marker(e, checkpoint_fd, text))
            if resume_state and entry is None:
                entry = _in_trash(run_fd, checkpoint, state, lambda e: _rename_each(checkpoint_fd, e, resume_state))
            elif resume_state and entry is not None:
                _rename_each(checkpoint_fd, entry, resume_state)  # the marker's entry: on this filesystem
            with contextlib.suppress(OSError):
                os.unlink(MARKER_TEMP, dir_fd=checkpoint_fd)  # left inside by an earlier version's kill
            os.utime(checkpoint_fd, ns=marker.times_ns)
            _complete_marker(checkpoint_fd, checkpoint)
        finally:
            os.close(checkpoint_fd)
    except OSError as e:
        raise ActionError(f"cannot slim {checkpoint}: {e.strerror or e}") from None
    finally:
        os.close(run_fd)
    if entry is not None:
        _dispose_or_finish(entry, checkpoint, dispose)


def _times(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_atime_ns, st.st_mtime_ns


def _open_checkpoint(run_fd: int, checkpoint: Path, checked: os.stat_result) -> int:
    try:
        fd = os.open(checkpoint.name, _DIR_FLAGS, dir_fd=run_fd)
    except FileNotFoundError:
        raise Vanished(f"{checkpoint} vanished before it was slimmed") from None
    except OSError as e:
        raise ActionError(f"cannot open {checkpoint}: {e.strerror or e}") from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino):
        os.close(fd)
        raise Changed(f"{checkpoint} is another directory than the one judged; left for the next pass")
    return fd


def _read_marker(fd: int) -> Marker | None:
    try:
        marker = open_regular(MARKER, fd)
    except OSError:  # none, or not a regular file (NotRegular)
        return None
    try:
        return read_marker(os.read(marker, 1 << 16))
    except OSError:
        return None
    finally:
        os.close(marker)


def _place_marker(entry: TrashEntry, checkpoint_fd: int, text: bytes) -> None:
    """Write the marker under a temporary name in `entry`, then rename it into the checkpoint (EXDEV when the
    entry is on another filesystem: the caller then tries a trash beside the run)."""
    entry_fd = os.open(entry.name, _DIR_FLAGS, dir_fd=entry.dir_fd)
    try:
        out = os.open(MARKER_TEMP, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=entry_fd)
        try:
            os.write(out, text)
            os.fsync(out)
        finally:
            os.close(out)
        try:
            os.rename(MARKER_TEMP, MARKER, src_dir_fd=entry_fd, dst_dir_fd=checkpoint_fd)
        except OSError:
            os.unlink(MARKER_TEMP, dir_fd=entry_fd)
            raise
        os.fsync(checkpoint_fd)
    finally:
        os.close(entry_fd)


COMPLETE_FALSE, COMPLETE_TRUE = b'"complete": false', b'"complete": true '  # the same length


def _complete_marker(fd: int, checkpoint: Path) -> None:
    """Say in the marker that the slim finished, rewriting it in place at the same length (no truncation, one
    write): the directory's mtime, just put back, stays, and a kill leaves the old text or the new one."""
    try:
        marker = os.open(MARKER, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    except OSError as e:
        raise ActionError(f"cannot finish the marker of {checkpoint}: {e.strerror or e}") from None
    try:
        raw = os.read(marker, 1 << 16)
        if COMPLETE_FALSE in raw:
            os.pwrite(marker, raw.replace(COMPLETE_FALSE, COMPLETE_TRUE, 1), 0)
            os.fsync(marker)
    finally:
        os.close(marker)


def _in_trash(run_fd: int, checkpoint: Path, state: StateDir, step: Callable[[TrashEntry], None]) -> TrashEntry:
    """A new trash entry on the checkpoint's filesystem, after `step` moved something into or out of it: the
    state's trash, or (across filesystems, EXDEV) the run-local one, exactly as a delete would."""
    entry = _new_entry(os.dup(state.trash_fd), checkpoint, state.trash)
    try:
        step(entry)
        return entry
    except OSError as e:
        _close_empty(entry)
        if e.errno != errno.EXDEV:
            raise ActionError(f"cannot move the resume state of {checkpoint} to the trash: {e.strerror}") from None
    entry = _new_entry(_local_trash(run_fd, checkpoint), checkpoint, checkpoint.parent / RUN_TRASH_NAME)
    try:
        step(entry)
    except OSError as e:
        _close_empty(entry)
        raise ActionError(f"cannot move the resume state of {checkpoint}: {e.strerror}") from None
    return entry


def _new_entry(trash_fd: int, checkpoint: Path, shown: Path) -> TrashEntry:
    name = _trash_name(checkpoint.name)
    try:
        os.mkdir(name, 0o700, dir_fd=trash_fd)
    except OSError as e:
        os.close(trash_fd)
        raise ActionError(f"cannot make a trash entry for {checkpoint}: {e.strerror or e}") from None
    return TrashEntry(trash_fd, name, shown / name)


def _local_trash(run_fd: int, checkpoint: Path) -> int:
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(RUN_TRASH_NAME, 0o755, dir_fd=run_fd)
        return os.open(RUN_TRASH_NAME, _DIR_FLAGS, dir_fd=run_fd)
    except OSError as e:
        raise ActionError(f"cannot move the resume state of {checkpoint} to the trash: {e.strerror or e}") from None


def _rename_each(checkpoint_fd: int, entry: TrashEntry, names: Sequence[str]) -> None:
    entry_fd = os.open(entry.name, _DIR_FLAGS, dir_fd=entry.dir_fd)
    try:
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # moved by a slim that a kill cut short
                os.rename(name, name, src_dir_fd=checkpoint_fd, dst_dir_fd=entry_fd)
    finally:
        os.close(entry_fd)


def _close_empty(entry: TrashEntry) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(entry.name, dir_fd=entry.dir_fd)
    entry.close()
