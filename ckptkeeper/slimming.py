"""Slimming a checkpoint to its weights (`--keep-weights`): the one time ckptkeeper writes inside a kept one.

Crash-safe by order, like every removal: first the marker (`weights.MARKER`, written under a temporary name
and renamed into place), then each resume-state entry renamed into a trash entry (atomic, one at a time),
then the directory's own times put back. At every instant the checkpoint is whole, or marked weights-only;
a slim cut short by a kill leaves the marker, and the next pass (which plans it weights-only again) moves
what is left. The weight files are never opened for writing, copied or moved: the same inodes, the same
bytes. The marker records the directory's times as they were, so even a finished-late slim restores them
(the Trainer's own rotation orders checkpoints by directory mtime).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
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
            marker = _mark(checkpoint_fd, checkpoint, resume_state)
            if resume_state:
                entry = _move_out(run_fd, checkpoint_fd, checkpoint, resume_state, state)
            os.utime(checkpoint_fd, ns=marker.times_ns)
            _complete_marker(checkpoint_fd, checkpoint, marker)
        finally:
            os.close(checkpoint_fd)
    finally:
        os.close(run_fd)
    if entry is not None:
        _dispose_or_finish(entry, checkpoint, dispose)


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


def _mark(fd: int, checkpoint: Path, resume_state: Sequence[str]) -> Marker:
    """Write the marker (not yet complete), unless there is one of ckptkeeper's (a slim being finished); the
    directory's (atime, mtime) in ns as they were before the first slim began. Anything else named like the
    marker (not ckptkeeper's, unreadable, a link) is replaced by the rename, or the slim fails, moving nothing."""
    earlier = _read_marker(fd)
    if earlier is not None:
        return Marker(earlier.times_ns, False, tuple(sorted({*earlier.removed, *resume_state})))
    st = os.fstat(fd)
    times = (st.st_atime_ns, st.st_mtime_ns)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(MARKER_TEMP, dir_fd=fd)  # a kill's leftover
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        out = os.open(MARKER_TEMP, flags, 0o644, dir_fd=fd)
        try:
            os.write(out, marker_text(resume_state, times, complete=False))
            os.fsync(out)
        finally:
            os.close(out)
        os.rename(MARKER_TEMP, MARKER, src_dir_fd=fd, dst_dir_fd=fd)
        os.fsync(fd)
    except OSError as e:
        raise ActionError(f"cannot mark {checkpoint} weights-only: {e.strerror or e}") from None
    return Marker(times, False, tuple(resume_state))


def _read_marker(fd: int) -> Marker | None:
    try:
        marker = os.open(MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
    except OSError:
        return None
    try:
        return read_marker(os.read(marker, 1 << 16)) if stat.S_ISREG(os.fstat(marker).st_mode) else None
    except OSError:
        return None
    finally:
        os.close(marker)


def _complete_marker(fd: int, checkpoint: Path, marker: Marker) -> None:
    """Say in the marker that the slim finished: rewritten in place, which leaves the directory's mtime (just
    put back) alone. A kill before this only means the times are put back again at the next pass."""
    try:
        out = os.open(MARKER, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        try:
            os.write(out, marker_text(marker.removed, marker.times_ns, complete=True))
            os.fsync(out)
        finally:
            os.close(out)
    except OSError as e:
        raise ActionError(f"cannot finish the marker of {checkpoint}: {e.strerror or e}") from None


def _move_out(
    run_fd: int, checkpoint_fd: int, checkpoint: Path, resume_state: Sequence[str], state: StateDir
) -> TrashEntry:
    """Move each resume-state entry into one new trash entry: the state's trash, or (across filesystems) the
    run-local one, exactly as a delete would."""
    entry = _new_entry(os.dup(state.trash_fd), checkpoint, state.trash)
    try:
        _rename_each(checkpoint_fd, entry, resume_state, checkpoint)
    except OSError as e:
        if e.errno != errno.EXDEV:
            _close_empty(entry)
            raise ActionError(f"cannot move the resume state of {checkpoint} to the trash: {e.strerror}") from None
        _close_empty(entry)
        entry = _new_entry(_local_trash(run_fd, checkpoint), checkpoint, checkpoint.parent / RUN_TRASH_NAME)
        try:
            _rename_each(checkpoint_fd, entry, resume_state, checkpoint)
        except OSError as again:
            entry.close()
            raise ActionError(f"cannot move the resume state of {checkpoint}: {again.strerror}") from None
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


def _rename_each(checkpoint_fd: int, entry: TrashEntry, names: Sequence[str], checkpoint: Path) -> None:
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
