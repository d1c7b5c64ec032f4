"""Removing checkpoints: the only module that deletes or moves anything.

Every removal starts with one atomic rename of the whole checkpoint out of its run directory, so a crash
at any moment leaves the checkpoint either whole under its name or gone from it; what reached the trash is
finished on the next start.

Nothing is done by path name after it was checked: the run directory is reached from the root one
component at a time without following links (`O_DIRECTORY | O_NOFOLLOW`), the checkpoint is checked and
renamed relative to that descriptor (`dir_fd`), and the directory that arrives in the trash is compared
by identity (device, inode) with the one that was checked. A run directory swapped for a symlink, or a
checkpoint swapped for another directory, between the check and the act is never what gets removed.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import functools
import os
import re
import shutil
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ckptkeeper.integrity import safetensors_problem
from ckptkeeper.paths import (
    MOUNT_TABLE,
    Relation,
    checkpoint_component,
    fd_path,
    kernel_holds_data,
    place_of,
    place_of_fd,
    read_mounts,
    real_path_at,
    relation,
)
from ckptkeeper.regular import open_regular
from ckptkeeper.scan import checkpoint_step
from ckptkeeper.state import TRASH_ENTRY, StateDir

RUN_TRASH_NAME = "_ckptkeeper-trash"  # used only when the state directory is on another filesystem
ARCHIVE_TEMP_PREFIX = ".ckptkeeper-tmp-"
FSYNC_THREADS = 32  # concurrent fsyncs when an archive copy is made durable (see _fsync_tree)
# Made and removed at once; one a kill left is cleared at the next archive there. `_ckptkeeper`: were the
# archive an output directory after all, the Trainer's push_to_hub would leave it out.
PROBE_PREFIX = "_ckptkeeper-probe."
PROBE_NAME = re.compile(re.escape(PROBE_PREFIX) + "[0-9a-f]{32}")
# A file is copied in chunks of this size, each read back from the copy and compared where that checks something
# (_TreeCopy); a stop is honoured between them.
COMPARE_CHUNK = 8 << 20
SLOW_FSYNC = 0.002  # s: an fsync slower than this leaves the rest of a copy's fsyncs to threads (see _TreeCopy)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_BACK = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
Identity = tuple[int, int]
StopCheck = Callable[[], bool]


class ActionError(RuntimeError):
    """An action could not be carried out; the checkpoint is still whole under its name, except when removing
    it failed inside the trash: then it has left its name and is finished on the next start."""


class Vanished(ActionError):
    """The checkpoint disappeared before ckptkeeper touched it (e.g. the Trainer's own rotation)."""


class Changed(ActionError):
    """Another directory has the checkpoint's name now than the one judged; it is left for the next pass."""


class Stopped(ActionError):
    """A stop was asked for during the action; the checkpoint is whole under its name (a partial copy is gone)."""


@dataclass
class TrashEntry:
    """A checkpoint renamed into a trash, to be deleted there. Owns `dir_fd` (the trash, open): whoever
    finishes the entry closes it."""

    dir_fd: int
    name: str
    shown: Path  # for messages and the journal

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.dir_fd)


Dispose = Callable[[TrashEntry], None]


# ---------------------------------------------------------------------------------------------- reaching it
def _split_below(root: Path, checkpoint: Path, verb: str) -> list[str]:
    head, name = os.path.split(os.path.abspath(checkpoint))  # absolute already: no working directory read
    parts = [*_below(os.path.abspath(root), head), name]
    if not name or parts[0] == os.pardir:
        raise ActionError(f"refusing to {verb} {checkpoint}: it is outside the root {root}")
    return parts


@functools.lru_cache(maxsize=64)
def _below(root: str, directory: str) -> tuple[str, ...]:
    """The components of the absolute `directory` below the absolute `root` (`..` first when it is not below);
    the same strings for every checkpoint of a run, so made once per run directory."""
    below = os.path.relpath(directory, root)  # absolute paths: no working directory involved
    return () if below == os.curdir else tuple(below.split(os.sep))


def _past(verb: str) -> str:
    return {"remove": "removed", "archive": "archived", "slim": "slimmed"}.get(verb, f"{verb}d")


def _link_problem(root: Path, checkpoint: Path) -> str:
    try:  # only for the message: the link may already be gone again (realpath itself races with it)
        real_root, real = os.path.realpath(root), os.path.realpath(checkpoint)
    except OSError:
        return "its path goes through a symlink"
    if os.path.commonpath([real_root, real]) != real_root:
        return f"its path goes through a symlink: it resolves to {real}, outside the root {real_root}"
    return "its path goes through a symlink"


def open_run_dir(root: Path, checkpoint: Path, verb: str = "remove", root_identity: Identity | None = None) -> int:
    """The directory that holds `checkpoint`, opened from the root one component at a time without following
    a link. Raises Vanished when a component is gone, ActionError when one is a link or not a directory."""
    parts = _split_below(root, checkpoint, verb)
    past = _past(verb)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Vanished(f"{checkpoint} vanished before it was {past} (its root is gone)") from None
    except OSError as e:
        raise ActionError(f"cannot open the root {root}: {e.strerror or e}") from None
    st = os.fstat(fd)
    if root_identity is not None and (st.st_dev, st.st_ino) != root_identity:
        os.close(fd)
        raise ActionError(
            f"refusing to {verb} {checkpoint}: the root {root} is no longer the directory it was "
            "(a link or a mount on its path changed?)"
        )
    for part in parts[:-1]:
        try:
            next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            os.close(fd)
            raise Vanished(f"{checkpoint} vanished before it was {past}") from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ActionError(f"refusing to {verb} {checkpoint}: {_link_problem(root, checkpoint)}") from None
            raise ActionError(f"cannot open {part} on the way to {checkpoint}: {e.strerror or e}") from None
        os.close(fd)
        fd = next_fd
    return fd


def _guard_at(run_fd: int, checkpoint: Path, expected: Identity | None, verb: str = "remove") -> os.stat_result:
    """The checkpoint's lstat, when it may be removed; else ActionError (Vanished, Changed). The last check
    before any removal. It refuses when:
    - the name is not `checkpoint-<digits>` (not a checkpoint: never counted, moved or deleted);
    - the entry is a symlink, or not a directory (links are never followed, files never removed);
    - it is not the directory that was judged (`expected`, its device and inode when scanned);
    - a filesystem is mounted somewhere inside it (deleting would empty that filesystem too).
    What a rule, a protection or an unfinished write needs is settled by the planner and re-checked by the
    caller just before this; this guard is about what the entry is, not about what it holds."""
    name = checkpoint.name
    if checkpoint_step(name) is None:
        raise ActionError(f"refusing to {verb} {checkpoint}: {name} is not named checkpoint-<step>")
    try:
        st = os.stat(name, dir_fd=run_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise Vanished(f"{checkpoint} vanished before it was {_past(verb)}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ActionError(f"refusing to {verb} {checkpoint}: it is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise ActionError(f"refusing to {verb} {checkpoint}: it is not a directory")
    if expected is not None and (st.st_dev, st.st_ino) != expected:
        raise Changed(f"{checkpoint} is another directory than the one judged; left for the next pass")
    mounts = mount_points_below(real_path_at(run_fd, name, checkpoint.parent), real=True)
    if mounts:
        raise ActionError(f"refusing to {verb} {checkpoint}: a filesystem is mounted inside it, at {mounts[0]}")
    return st


def removal_guard(root: Path, checkpoint: Path) -> str | None:
    """Why `checkpoint` must not be removed, or None (see _guard_at; also: its path must not go through a
    link below the root)."""
    try:
        run_fd = open_run_dir(root, checkpoint)
    except Vanished:
        return "it no longer exists"
    except ActionError as e:
        return str(e).removeprefix(f"refusing to remove {checkpoint}: ")
    try:
        _guard_at(run_fd, checkpoint, None)
    except Vanished:
        return "it no longer exists"
    except ActionError as e:
        return str(e).removeprefix(f"refusing to remove {checkpoint}: ")
    finally:
        os.close(run_fd)
    return None


def mount_points_below(directory: Path | str, real: bool = False) -> list[str]:
    """Mount points strictly inside `directory` (`real`: given as its real path already), bind mounts of the
    same filesystem included (their st_dev is the parent's, so only the kernel's mount table tells). Empty
    where there is no mount table. The table is read again whenever it changed (`paths.MountTable`), so a
    mount made a moment ago is seen."""
    top = (os.fspath(directory) if real else os.path.realpath(directory)).rstrip("/") + "/"
    return sorted(p for p in MOUNT_TABLE.points() if p.startswith(top))


# ---------------------------------------------------------------------------------------------- the trash
def _trash_name(name: str) -> str:
    # The leading token keeps a trash entry from ever matching checkpoint-<digits>. 48 bits from the kernel, as
    # uuid4's first 12 hex digits were: not `random`, whose next names can be told from earlier ones (or repeat in
    # a process restored from a snapshot), which would let a name be taken in advance.
    return f"{os.urandom(6).hex()}.{name}"


def _into_trash(run_fd: int, checkpoint: Path, checked: os.stat_result, state: StateDir) -> TrashEntry:
    """Rename the checked checkpoint into the state's trash (or, across filesystems, a trash beside it)."""
    name, tname = checkpoint.name, _trash_name(checkpoint.name)
    try:
        trash_fd = os.dup(state.trash_fd)
    except OSError as e:
        raise ActionError(f"cannot use the state directory {state.path}: {e.strerror or e}") from None
    entry = TrashEntry(trash_fd, tname, state.trash / tname)
    try:
        os.rename(name, tname, src_dir_fd=run_fd, dst_dir_fd=trash_fd)
    except FileNotFoundError:
        entry.close()
        raise _not_found(run_fd, checkpoint, state.trash) from None
    except OSError as e:
        entry.close()
        if e.errno != errno.EXDEV:
            raise ActionError(f"cannot move {checkpoint} to the trash: {e.strerror}") from None
        entry = _into_local_trash(run_fd, checkpoint, tname)
    _check_arrived(entry, run_fd, checkpoint, checked)
    return entry


def _not_found(run_fd: int, checkpoint: Path, trash: Path) -> ActionError:
    """Why a rename into the trash found nothing: the checkpoint is gone (Vanished), or, where it is still
    there, the trash was deleted since it was opened (the checkpoint stays whole, left for the next pass)."""
    try:
        os.stat(checkpoint.name, dir_fd=run_fd, follow_symlinks=False)
    except FileNotFoundError:
        return Vanished(f"{checkpoint} vanished before it was removed")
    except OSError:
        pass
    return ActionError(f"cannot move {checkpoint} to the trash: {trash} was deleted while it was used")


def _into_local_trash(run_fd: int, checkpoint: Path, tname: str) -> TrashEntry:
    # The state directory is on another filesystem: a trash beside the checkpoint keeps the rename atomic.
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(RUN_TRASH_NAME, 0o755, dir_fd=run_fd)
        local_fd = os.open(RUN_TRASH_NAME, _DIR_FLAGS, dir_fd=run_fd)
    except OSError as e:
        raise ActionError(f"cannot move {checkpoint} to the trash: {e.strerror or e}") from None
    entry = TrashEntry(local_fd, tname, checkpoint.parent / RUN_TRASH_NAME / tname)
    try:
        os.rename(checkpoint.name, tname, src_dir_fd=run_fd, dst_dir_fd=local_fd)
    except FileNotFoundError:
        entry.close()
        raise _not_found(run_fd, checkpoint, checkpoint.parent / RUN_TRASH_NAME) from None
    except OSError as e:
        entry.close()
        raise ActionError(f"cannot move {checkpoint} to the trash: {e.strerror}") from None
    return entry


def _check_arrived(entry: TrashEntry, run_fd: int, checkpoint: Path, checked: os.stat_result) -> None:
    """What reached the trash is the directory that was checked; else it goes back (under a name that is not
    a checkpoint's if its own is taken again) and nothing is deleted."""
    st = os.stat(entry.name, dir_fd=entry.dir_fd, follow_symlinks=False)
    if (st.st_dev, st.st_ino) == (checked.st_dev, checked.st_ino):
        return
    back = _put_back(entry, run_fd, checkpoint, "swapped")
    raise Changed(f"{checkpoint} was replaced by another directory while it was being removed; put back as {back}")


def _put_back(entry: TrashEntry, run_fd: int, checkpoint: Path, tag: str) -> str:
    """Rename a trash entry back into its run directory: under its own name, or, if something took that name
    meanwhile (never renamed over), under `<name>.<tag>-<random>`, which is not a checkpoint's. Returns the name."""
    back = checkpoint.name
    if _exists_at(run_fd, back):
        back = f"{checkpoint.name}.{tag}-{os.urandom(4).hex()}"
    os.rename(entry.name, back, src_dir_fd=entry.dir_fd, dst_dir_fd=run_fd)
    entry.close()
    return back


def rename_to_trash(checkpoint: Path, state: StateDir, root: Path | None = None) -> Path:
    """Move the whole checkpoint out of its run directory in one atomic rename; return where it went."""
    root = checkpoint.parent if root is None else root
    run_fd = open_run_dir(root, checkpoint)
    try:
        entry = _into_trash(run_fd, checkpoint, _guard_at(run_fd, checkpoint, None), state)
    finally:
        os.close(run_fd)
    entry.close()
    return entry.shown


def _rmtree(path: str) -> None:
    def make_writable_and_retry(func: object, failed: str, exc: BaseException) -> None:
        if isinstance(exc, FileNotFoundError):
            return  # someone else removed it first: the goal is reached
        if not isinstance(exc, PermissionError):
            raise exc
        # A read-only directory inside the trash entry: make it and its parent writable, then retry.
        os.chmod(os.path.dirname(failed), stat.S_IRWXU)
        if os.path.isdir(failed) and not os.path.islink(failed):
            os.chmod(failed, stat.S_IRWXU)
            shutil.rmtree(failed)
        else:
            os.unlink(failed)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable_and_retry)
    else:
        shutil.rmtree(path, onerror=lambda func, failed, info: make_writable_and_retry(func, failed, info[1]))


# ---------------------------------------------------------------------------------------------- tree delete
FD_WINDOW = 64  # directory descriptors a tree delete holds open at once, however deep the tree (see _TreeDelete)
_DENIED = (errno.EACCES, errno.EPERM)


class _Level:
    """One directory of a tree being deleted: open as `fd` (-1 while closed to bound the descriptors held),
    its (device, inode), the subdirectories still to go into, and its name in its parent."""

    __slots__ = ("fd", "ident", "name", "shown", "subdirs")

    def __init__(self, fd: int, ident: Identity, name: str, shown: str, subdirs: list[str]) -> None:
        self.fd, self.ident, self.name, self.shown, self.subdirs = fd, ident, name, shown, subdirs


class _TreeDelete:
    """`rm -rf` of one directory through descriptors, as `rm` does it: no recursion (a tree 10,000 levels deep
    is fine), no stat per file (`scandir`'s d_type says what is a directory), one `unlink(name, dir_fd)` per
    file and one `rmdir(name, dir_fd)` per directory. Owned by the thread that calls `run`.

    Safety: a subdirectory is entered only by `openat(O_DIRECTORY | O_NOFOLLOW)` relative to its parent's
    descriptor, so a link put in a directory's place is unlinked, never followed; its `fstat` must show the
    tree's device, so another filesystem mounted inside (a mount point is checked before, by the caller; this
    catches one made since) is never emptied. At most FD_WINDOW descriptors are held: deeper, an ancestor's
    is closed and opened again through `..` on the way back up, and used only if it is still the very
    directory (device, inode) it was. A directory that denies a removal (read-only for a non-root user) is
    made writable through its own descriptor and the removal tried again. An entry already gone was removed
    by someone else: the goal is reached. Other errors are raised naming the entry as `shown` names the top."""

    def __init__(self, top_fd: int, name: str, shown: str, device: int, stop: StopCheck | None = None) -> None:
        self.top_fd, self.name, self.shown, self.device, self.stop = top_fd, name, shown, device, stop
        self.stack: list[_Level] = []

    def run(self) -> None:
        sys.audit("ckptkeeper.delete_tree", self.name, self.top_fd)  # as shutil.rmtree's (path, dir_fd)
        try:
            level = self._enter(self.top_fd, self.name, self.shown)
            if level is None:
                return
            self.stack.append(level)
            while self.stack:
                self._step()
        finally:
            for level in self.stack:
                if level.fd >= 0:
                    os.close(level.fd)

    def _step(self) -> None:
        level = self.stack[-1]
        self._check_stop(level.shown)
        if level.subdirs:
            name = level.subdirs.pop()
            child = self._enter(level.fd, name, os.path.join(level.shown, name))
            if child is not None:
                self.stack.append(child)
                self._bound_descriptors()
            return
        self.stack.pop()
        try:
            parent_fd = self._parent_fd(level)
        finally:
            os.close(level.fd)
            level.fd = -1
        self._remove(parent_fd, level.name, os.rmdir, level.shown)

    def _enter(self, parent_fd: int, name: str, shown: str) -> _Level | None:
        """Open the directory `name` (not following a link), unlink its files, and return it with its
        subdirectories to go; None when it is no longer a directory there (then it was unlinked) or gone."""
        fd = self._open(parent_fd, name, shown)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            if st.st_dev != self.device:
                raise OSError(errno.EXDEV, "another filesystem is mounted here; not deleted", shown)
            subdirs = []
            with os.scandir(fd) as entries:
                found = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
            stop = self.stop
            for entry_name, is_dir in found:
                if is_dir:
                    subdirs.append(entry_name)
                    continue
                if stop is not None and stop():
                    self._check_stop(shown)
                try:  # the usual case without a call or a path made per file; anything else as `_remove` does it
                    os.unlink(entry_name, dir_fd=fd)
                except FileNotFoundError:
                    pass
                except OSError:
                    self._remove(fd, entry_name, os.unlink, os.path.join(shown, entry_name))
        except BaseException:
            os.close(fd)
            raise
        return _Level(fd, (st.st_dev, st.st_ino), name, shown, subdirs)

    def _open(self, parent_fd: int, name: str, shown: str) -> int | None:
        for attempt in (1, 2):
            try:
                return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            except FileNotFoundError:
                return None
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):  # a link or a file put in its place: not followed
                    self._remove(parent_fd, name, os.unlink, shown)
                    return None
                if e.errno not in _DENIED or attempt == 2:
                    raise OSError(e.errno, e.strerror, shown) from None
                self._make_writable(parent_fd)  # a directory without search permission: the lookup fails
                _make_searchable(parent_fd, name)
        return None  # not reached

    def _check_stop(self, shown: str) -> None:
        if self.stop is not None and self.stop():
            raise Stopped(f"stopped while deleting {shown}; it is finished on the next start")

    def _remove(self, dir_fd: int, name: str, remove: Callable[..., None], shown: str) -> None:
        """`remove(name, dir_fd=dir_fd)`; where the directory denies it, once more after making it writable."""
        for attempt in (1, 2):
            try:
                remove(name, dir_fd=dir_fd)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno not in _DENIED or attempt == 2:
                    raise OSError(e.errno, e.strerror, shown) from None
                self._make_writable(dir_fd)

    def _make_writable(self, fd: int) -> None:
        """A directory of the tree, given to its owner in full through its own descriptor (the trash, which
        holds the top, is ckptkeeper's and left as it is)."""
        if fd != self.top_fd:
            os.fchmod(fd, stat.S_IRWXU)

    def _bound_descriptors(self) -> None:
        if len(self.stack) > FD_WINDOW:
            far = self.stack[-FD_WINDOW - 1]
            if far.fd >= 0:
                os.close(far.fd)
                far.fd = -1

    def _parent_fd(self, level: _Level) -> int:
        """The descriptor of `level`'s parent (the trash's for the top), opened again through `..` if it was
        closed, and then only if it is still the directory it was."""
        if not self.stack:
            return self.top_fd
        parent = self.stack[-1]
        if parent.fd < 0:
            fd = os.open("..", _DIR_FLAGS, dir_fd=level.fd)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != parent.ident:
                os.close(fd)
                raise OSError(errno.ESTALE, "moved while it was being deleted", parent.shown)
            parent.fd = fd
        return parent.fd


def _make_searchable(parent_fd: int, name: str) -> None:
    """Give the directory `name` (not a link: O_PATH | O_NOFOLLOW) to its owner in full, so that it can be
    opened and emptied. chmod through /proc/self/fd acts on the very inode held, never on a path walked again."""
    fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    try:
        os.chmod(f"/proc/self/fd/{fd}", stat.S_IRWXU)
    finally:
        os.close(fd)


def finish_entry(entry: TrashEntry, stuck: list[str] | None = None) -> bool:
    """Delete one trash entry; True when it is gone. One that cannot be deleted is described in `stuck`."""
    try:
        delete_entry(entry)
    except OSError as e:
        if stuck is not None:
            stuck.append(f"{entry.shown}: {e.strerror or e}")
        return False
    return True


def delete_entry(entry: TrashEntry, stop: StopCheck | None = None) -> None:
    """Delete one trash entry, through the trash's descriptor (`_TreeDelete`); an OSError names the paths as
    `entry.shown` does. `stop` is asked between entries: once it says so, Stopped is raised and what is left
    stays in the trash (finished on the next start)."""
    try:
        st = os.stat(entry.name, dir_fd=entry.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.name, dir_fd=entry.dir_fd)
        return
    mounts = mount_points_below(real_path_at(entry.dir_fd, entry.name, entry.shown.parent), real=True)
    if mounts:  # mounted after the guard looked: never empty another filesystem
        raise OSError(errno.EBUSY, f"a filesystem is mounted inside it, at {mounts[0]}")
    _TreeDelete(entry.dir_fd, entry.name, str(entry.shown), st.st_dev, stop).run()


def empty_trash(
    trash: Path | int, only: str | None = None, stuck: list[str] | None = None, shown: Path | None = None
) -> list[str]:
    """Finish removing entries of a trash directory (a path, opened without following a link, or a
    descriptor); all, or the one named `only`. Return the names finished. Only entries named as ckptkeeper
    names them are deleted; anything else is left alone and described in `stuck`, as is an entry that cannot
    be removed (tried again later)."""
    if isinstance(trash, int):
        fd, shown = os.dup(trash), shown or Path(os.readlink(f"/proc/self/fd/{trash}"))
    else:
        try:
            fd, shown = os.open(trash, _DIR_FLAGS), shown or trash
        except FileNotFoundError:
            return []
        except OSError as e:
            if stuck is not None:
                stuck.append(f"{trash}: not a directory of its own (a symbolic link?): {e.strerror or e}")
            return []
    finished = []
    try:
        entries = [only] if only is not None else sorted(os.listdir(fd))
        for name in entries:
            if not TRASH_ENTRY.fullmatch(name):
                if stuck is not None:
                    stuck.append(f"{shown / name}: not a trash entry of ckptkeeper's; left alone")
                continue
            if finish_entry(TrashEntry(fd, name, shown / name), stuck):
                finished.append(name)
    finally:
        os.close(fd)
    return finished


# ---------------------------------------------------------------------------------------------- delete
def _dispose_or_finish(entry: TrashEntry, checkpoint: Path, dispose: Dispose | None) -> None:
    if dispose is not None:
        dispose(entry)
        return
    try:
        delete_entry(entry)
    except OSError as e:
        raise ActionError(trash_failure(checkpoint, entry, e)) from None
    finally:
        entry.close()


def trash_failure(checkpoint: Path, entry: TrashEntry, error: object) -> str:
    """What went wrong when a checkpoint reached the trash but its entry could not be deleted there."""
    return (
        f"{checkpoint} was moved to the trash ({entry.shown}) but could not be removed there: {error}; "
        "it is finished on the next start"
    )


def delete_checkpoint(
    root: Path,
    checkpoint: Path,
    state: StateDir,
    dispose: Dispose | None = None,
    expected: Identity | None = None,
    root_identity: Identity | None = None,
) -> None:
    """Rename the checkpoint into the trash, then delete it there, or hand the trash entry to `dispose`
    (the daemon's reaper thread) so that deleting many gigabytes does not hold up the caller. `expected`:
    the checkpoint directory's (device, inode) when it was judged; `root_identity`: the root's."""
    run_fd = open_run_dir(root, checkpoint, "remove", root_identity)
    try:
        entry = _into_trash(run_fd, checkpoint, _guard_at(run_fd, checkpoint, expected), state)
    finally:
        os.close(run_fd)
    _dispose_or_finish(entry, checkpoint, dispose)


# ---------------------------------------------------------------------------------------------- archive
def _listing(top: Path | str) -> dict[str, tuple[str, int]]:
    """Relative path -> (kind, size) for everything below `top`, links not followed. A directory that cannot
    be listed is skipped, as os.walk does (its entries are then missing and the lists differ). Walked through
    a descriptor of `top`: each entry is looked at relative to its directory's descriptor."""
    found: dict[str, tuple[str, int]] = {}
    try:
        top_fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return found
    try:
        pending = [""]
        while pending:
            prefix = pending.pop()
            try:
                dir_fd = os.open(prefix, _DIR_FLAGS, dir_fd=top_fd) if prefix else os.dup(top_fd)
            except OSError:
                continue
            try:
                with os.scandir(dir_fd) as it:
                    entries = list(it)
                for entry in entries:
                    rel = prefix + entry.name
                    if entry.is_dir(follow_symlinks=False):
                        found[rel] = ("dir", 0)
                        pending.append(rel + os.sep)
                    else:
                        kind = "link" if entry.is_symlink() else "file"
                        found[rel] = (kind, entry.stat(follow_symlinks=False).st_size)
            except OSError:
                continue
            finally:
                os.close(dir_fd)
    finally:
        os.close(top_fd)
    return found


def verify_copy(source: Path | str, copy: Path | str) -> str | None:
    """None when `copy` has the same files, kinds and sizes as `source` and valid safetensors headers."""
    want, have = _listing(source), _listing(copy)
    if want.keys() != have.keys():
        missing = sorted(want.keys() - have.keys())
        extra = sorted(have.keys() - want.keys())
        return f"file list differs (missing {missing[:3]}, extra {extra[:3]})"
    for rel, (kind, size) in want.items():
        if have[rel] != (kind, size):
            return f"{rel}: {have[rel][0]} of {have[rel][1]} bytes, expected {kind} of {size} bytes"
        if kind == "file" and rel.endswith(".safetensors"):
            problem = safetensors_problem(Path(copy) / rel)
            if problem:
                return problem
    return None


def _content_mismatch(source: Path | str, copy: Path | str) -> str | None:
    """None when every file of `copy` has the bytes of its twin in `source` and every link the same target.
    Same names and sizes are not enough to remove the source: an earlier run into the same output_dir
    leaves an archived checkpoint-N of exactly the same layout and other weights."""
    source, copy = Path(source), Path(copy)
    for rel, (kind, _) in _listing(source).items():
        if kind == "file" and not filecmp.cmp(source / rel, copy / rel, shallow=False):
            return f"{rel}: same size, different content"
        if kind == "link" and os.readlink(source / rel) != os.readlink(copy / rel):
            return f"{rel}: links to {os.readlink(copy / rel)}, expected {os.readlink(source / rel)}"
    return None


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(top: Path | str) -> None:
    """fsync every file (links excepted) and directory of the tree, `top` included; the first error raises."""
    paths: list[str] = []
    for dirpath, _, filenames in os.walk(top):
        paths.extend(full for n in filenames if not os.path.islink(full := os.path.join(dirpath, n)))
        paths.append(dirpath)
    _fsync_all(paths, FSYNC_THREADS)


def _fsync_all(paths: list[str], threads: int = 1) -> None:
    """fsync each path, on up to `threads` threads; the first error raises.

    The fsyncs run concurrently: on a journaling filesystem each one waits for a journal commit, and issued
    one after another a checkpoint of 3,000 small files waits for 3,000 commits (~10 s on a loop-mounted
    ext4 in benchmarks/bench_actions.py); issued together, the journal commits them in batches (~1 s)."""
    workers = min(threads, len(paths))
    if workers <= 1:
        for path in paths:
            _fsync_path(path)
        return
    # One share of the paths per thread, not one task per path: on a filesystem where fsync costs nothing
    # (tmpfs), handing 3,000 tasks to a pool costs more than the fsyncs.
    from concurrent.futures import ThreadPoolExecutor  # only for an archive copy: not at every start

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckptkeeper-fsync") as pool:
        for _ in pool.map(_fsync_all, [paths[i::workers] for i in range(workers)]):
            pass


def _clear_archive_temps(parent_fd: int, name: str, shown: Path) -> None:
    prefix = f"{ARCHIVE_TEMP_PREFIX}{name}."
    for leftover in os.listdir(parent_fd):
        if leftover.startswith(prefix):
            st = os.stat(leftover, dir_fd=parent_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                _rmtree(os.path.join(fd_path(parent_fd, shown), leftover))


def _open_target_parent(archive_root: Path | None, target: Path) -> int:
    """ARCHIVE/<run> (the target's parent), made where missing and opened one component at a time below the
    archive's root without following a link: a link below the archive could lead back into the runs."""
    if archive_root is None:
        top, parts = target.parent, []
    else:
        top = archive_root
        parts = os.path.relpath(os.path.abspath(target.parent), os.path.abspath(archive_root)).split(os.sep)
        parts = [p for p in parts if p != os.curdir]
        if parts and parts[0] == os.pardir:
            raise ActionError(f"the archive target {target} is not below the archive {archive_root}")
    try:
        top.mkdir(parents=True, exist_ok=True)
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ActionError(f"cannot create the archive directory {top}: {e.strerror or e}") from None
    for part in parts:
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError as e:
            linked = e.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(fd, part)
            os.close(fd)
            if linked:
                raise ActionError(f"the archive path {target.parent} goes through a symlink") from None
            raise ActionError(f"cannot create the archive directory {target.parent}: {e.strerror or e}") from None
        os.close(fd)
        fd = next_fd
    return fd


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _target_problem(parent_fd: int, root: Path) -> str | None:
    """Why the archive directory open as `parent_fd` must not receive a checkpoint: it is the root or inside
    it (by identity: a link, a second mount of the same volume, a bind mount below the archive)."""
    mounts = read_mounts()
    place = place_of_fd(parent_fd, mounts)
    if place is None:
        return "where the archive directory is cannot be told (was it removed?)"
    found = relation(place, place_of(root, mounts))
    if found in (Relation.SAME, Relation.INSIDE):
        return f"{'/'.join(('', *place.real))} {found.value} the root {root}"
    inside = checkpoint_component(place)
    if inside is not None:
        return f"{'/'.join(('', *place.real))} is inside a checkpoint ({inside})"
    return None


def archive_checkpoint(
    root: Path,
    checkpoint: Path,
    target: Path,
    state: StateDir,
    dispose: Dispose | None = None,
    expected: Identity | None = None,
    stop: StopCheck | None = None,
    archive_root: Path | None = None,
    root_identity: Identity | None = None,
) -> str:
    """Move `checkpoint` to `target`; returns "renamed" (same filesystem), "copied" or "already archived".

    Another filesystem: copy under a temporary name beside the target, fsync, verify, rename into place,
    and only then remove the source like a delete. A crash leaves the source whole; the temporary copy
    is cleared the next time this checkpoint is archived. `stop` is asked between files and between chunks
    of a large file; when it says so the copy is removed and Stopped raised."""
    run_fd = open_run_dir(root, checkpoint, "archive", root_identity)
    try:
        checked = _guard_at(run_fd, checkpoint, expected, "archive")
        parent_fd = _open_target_parent(archive_root, target)
        try:
            problem = _target_problem(parent_fd, root) or _same_directory_problem(parent_fd, run_fd)
            if problem:
                raise ActionError(f"refusing to archive {checkpoint} to {target}: {problem}")
            how = _archive_at(run_fd, checkpoint, checked, parent_fd, target, stop)
            if how == "renamed":
                return how
            # The copy is in place and durable; the source goes like a delete, if it is still the one copied,
            # and only if the copy is still there once the source has left its name.
            again = _guard_at(run_fd, checkpoint, (checked.st_dev, checked.st_ino))
            entry = _into_trash(run_fd, checkpoint, again, state)
            _check_copy_stayed(entry, run_fd, parent_fd, checkpoint, target)
        finally:
            os.close(parent_fd)
    finally:
        os.close(run_fd)
    _dispose_or_finish(entry, checkpoint, dispose)
    return how


def _same_directory_problem(parent_fd: int, run_fd: int) -> str | None:
    """Whether ARCHIVE/<run> is the run directory itself, whatever the identities say: two mounts of one
    volume by FUSE or NFS (separate superblocks) give one directory two devices and inodes. A probe file
    made in one, looked up by a name never used before in the other, tells."""
    _clear_stale_probes(parent_fd)
    probe = f"{PROBE_PREFIX}{os.urandom(16).hex()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=parent_fd))
    except OSError as e:
        return f"cannot write in the archive directory: {e.strerror or e}"
    try:
        os.stat(probe, dir_fd=run_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe, dir_fd=parent_fd)
    return "the archive directory is the run directory itself (the same volume mounted twice)"


def _clear_stale_probes(parent_fd: int) -> None:
    """Remove probe files a killed instance left in ARCHIVE/<run> (one instance per root, so none is live)."""
    for name in os.listdir(parent_fd):
        if PROBE_NAME.fullmatch(name):
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
                    os.unlink(name, dir_fd=parent_fd)


def _exists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _check_copy_stayed(entry: TrashEntry, run_fd: int, parent_fd: int, checkpoint: Path, target: Path) -> None:
    """After the source left its name: the archived copy must still be there, whole. If it went with the
    source (it was the source, seen through an alias no identity revealed), the source goes back."""
    trashed = os.path.join(fd_path(entry.dir_fd, entry.shown.parent), entry.name)
    try:
        copy_fd = os.open(target.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    except OSError:
        stayed = False
    else:
        try:
            stayed = _listing(fd_path(copy_fd, target)) == _listing(trashed)
        finally:
            os.close(copy_fd)
    if stayed:
        return
    _put_back(entry, run_fd, checkpoint, "ckptkeeper-returned")
    raise ActionError(
        f"refusing to archive {checkpoint}: the archived copy {target} went away when the checkpoint left its "
        "name (the archive is the checkpoint itself, reached another way); it is back under its name"
    )


def _archive_at(
    run_fd: int, checkpoint: Path, checked: os.stat_result, parent_fd: int, target: Path, stop: StopCheck | None
) -> str:
    source = os.path.join(fd_path(run_fd, checkpoint.parent), checkpoint.name)
    parent = fd_path(parent_fd, target.parent)
    try:
        existing = os.stat(target.name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        _check_existing_copy(source, os.path.join(parent, target.name), existing, checked, checkpoint, target)
        return "already archived"
    try:
        os.rename(checkpoint.name, target.name, src_dir_fd=run_fd, dst_dir_fd=parent_fd)
    except FileNotFoundError:
        raise Vanished(f"{checkpoint} vanished before it was archived") from None
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise ActionError(f"cannot archive {checkpoint} to {target}: {e.strerror}") from None
    else:
        moved = os.stat(target.name, dir_fd=parent_fd, follow_symlinks=False)
        if (moved.st_dev, moved.st_ino) != (checked.st_dev, checked.st_ino):  # swapped in between: undo
            os.rename(target.name, checkpoint.name, src_dir_fd=parent_fd, dst_dir_fd=run_fd)
            raise Changed(f"{checkpoint} was replaced by another directory while it was being archived")
        return "renamed"
    _clear_archive_temps(parent_fd, target.name, target.parent)
    temp = f"{ARCHIVE_TEMP_PREFIX}{target.name}.{os.urandom(6).hex()}"
    _copy_verified(run_fd, checkpoint, checked, parent_fd, temp, target, stop)
    if os.path.lexists(os.path.join(parent, target.name)):
        _rmtree_quietly(os.path.join(parent, temp))
        raise ActionError(f"{target} appeared while {checkpoint} was copied there; left for the next pass")
    os.rename(temp, target.name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    os.fsync(parent_fd)  # the copy's name is durable before the source goes
    return "copied"


def _check_existing_copy(
    source: str, copy: str, existing: os.stat_result, checked: os.stat_result, checkpoint: Path, target: Path
) -> None:
    """An earlier archive finished its copy but was stopped before removing the source: the copy must be
    another directory with the same bytes, made durable, before the source goes."""
    if (existing.st_dev, existing.st_ino) == (checked.st_dev, checked.st_ino):
        raise ActionError(
            f"refusing to archive {checkpoint}: the archive target {target} is the checkpoint itself "
            "(the archive reaches back into the root)"
        )
    if not stat.S_ISDIR(existing.st_mode):
        raise ActionError(f"{target} already exists and is not a directory")
    mismatch = verify_copy(source, copy) or _content_mismatch(source, copy)
    if mismatch:
        raise ActionError(f"{target} already exists and differs from {checkpoint}: {mismatch}")
    try:  # the copy, and its name, are durable before the source goes (it may come from a crashed run)
        _fsync_tree(copy)
        _fsync_path(os.path.dirname(copy))
    except OSError as e:
        raise ActionError(f"cannot make the archived copy {target} durable: {e}") from None


def _copy_verified(
    run_fd: int,
    checkpoint: Path,
    checked: os.stat_result,
    parent_fd: int,
    temp: str,
    target: Path,
    stop: StopCheck | None,
) -> None:
    """Copy the checkpoint to `temp` in ARCHIVE/<run>, compared and made durable (_TreeCopy), then verified
    against the source as it is now (verify_copy); on any failure the copy is removed and nothing else done."""
    source = os.path.join(fd_path(run_fd, checkpoint.parent), checkpoint.name)
    copy = os.path.join(fd_path(parent_fd, target.parent), temp)
    try:
        _copy_tree(run_fd, checkpoint, checked, parent_fd, temp, stop)
        mismatch = verify_copy(source, copy)
        if mismatch:
            raise ActionError(f"the copy of {checkpoint} in {target.parent} does not match: {mismatch}")
    except _CopyFailed as e:
        _rmtree_quietly(copy)
        if not os.path.lexists(source):
            raise Vanished(f"{checkpoint} vanished while it was archived") from None
        raise ActionError(f"cannot archive {checkpoint} to {target}: {e.rel}: {e.error.strerror or e.error}") from None
    except _Differs as e:
        _rmtree_quietly(copy)
        raise ActionError(f"the copy of {checkpoint} in {target.parent} does not match: {e}") from None
    except FileNotFoundError as e:
        _rmtree_quietly(copy)
        if not os.path.lexists(source):
            raise Vanished(f"{checkpoint} vanished while it was archived") from None
        raise ActionError(f"cannot archive {checkpoint}: {e}") from None
    except OSError as e:
        _rmtree_quietly(copy)
        raise ActionError(f"cannot archive {checkpoint} to {target}: {e}") from None
    except BaseException:  # ActionError (Stopped, a mismatch), or an interrupt: never leave a partial copy
        _rmtree_quietly(copy)
        raise


class _CopyFailed(Exception):
    """One entry could not be copied (`rel`, relative to the checkpoint): the copy stops there, with one error
    line for the checkpoint (on a full disk, not one per file)."""

    def __init__(self, rel: str, error: OSError) -> None:
        super().__init__(f"{rel}: {error}")
        self.rel = rel
        self.error = error


class _Differs(Exception):
    """What was read back from the copy is not what the source holds."""


def _copy_tree(
    run_fd: int, checkpoint: Path, checked: os.stat_result, parent_fd: int, temp: str, stop: StopCheck | None
) -> None:
    """Copy `checkpoint`, of the run open as `run_fd`, to a new directory `temp` in `parent_fd`, through
    directory descriptors, links never followed (_TreeCopy); every file and directory is fsynced before this
    returns. The source must still be the directory that was checked (`checked`), else Changed."""
    sys.audit("ckptkeeper.copy_tree", checkpoint.name, run_fd, temp, parent_fd)  # shutil.copytree's, by fds
    try:
        src_fd = os.open(checkpoint.name, _DIR_FLAGS, dir_fd=run_fd)
    except FileNotFoundError:
        raise Vanished(f"{checkpoint} vanished before it was archived") from None
    try:
        st = os.fstat(src_fd)
        if (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino):
            raise Changed(f"{checkpoint} was replaced by another directory while it was being archived")
        os.mkdir(temp, 0o700, dir_fd=parent_fd)
        dst_fd = os.open(temp, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            copier = _TreeCopy(stop)
            copier.contents(src_fd, dst_fd, "")
            copier.finish_directory(dst_fd, st, "")
            _fsync_all([os.path.join(fd_path(dst_fd, temp), rel) for rel in copier.deferred], threads=FSYNC_THREADS)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


class _TreeCopy:
    """Copies a directory's contents through directory descriptors (`openat`, no path walked again, links never
    followed), one file after the other on this thread, and checks each as it goes: every chunk of a file is
    written, then read back from the copy and compared with the bytes read from the source; every link is read
    back and compared with the source's target. A FIFO, device or socket is refused. Modes, times and extended
    attributes are copied as `cp -a` (and shutil.copytree) do.

    The read-back is skipped in a directory whose filesystem this kernel serves from its own page cache
    (`paths.kernel_holds_data`: ext4, xfs, tmpfs, ...): there it would return the very pages the write filled
    and compare a buffer with itself. A FUSE filesystem, NFS, SMB or one not known is read back.

    Each file and directory is fsynced through the descriptor that made it. Where an fsync takes more than
    `slow_fsync` seconds (a disk's journal commit: done one after another, 3,000 files wait for 3,000 commits),
    the rest are left in `deferred` for _fsync_all's threads, whose concurrent fsyncs the journal commits in
    batches. `stop` is asked before every entry and between chunks of a file."""

    def __init__(self, stop: StopCheck | None, slow_fsync: float = SLOW_FSYNC) -> None:
        self.stop = stop
        self.slow_fsync = slow_fsync
        self.deferred: list[str] = []  # relative paths to fsync once the copy is made
        self.slow = False
        self.reads_back_on: dict[int, bool] = {}  # st_dev -> whether a copy there is read back

    def reads_back(self, dst_fd: int) -> bool:
        device = os.fstat(dst_fd).st_dev
        if device not in self.reads_back_on:
            self.reads_back_on[device] = not kernel_holds_data(device)
        return self.reads_back_on[device]

    def contents(self, src_fd: int, dst_fd: int, prefix: str) -> None:
        with os.scandir(src_fd) as it:
            entries = list(it)
        read_back = self.reads_back(dst_fd)
        for entry in entries:
            if self.stop is not None and self.stop():
                raise Stopped("the copy was not complete; the checkpoint stays whole")
            rel = prefix + entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    self.directory(src_fd, dst_fd, entry.name, rel)
                elif entry.is_symlink():
                    self.link(src_fd, dst_fd, entry.name, rel)
                else:
                    self.file(src_fd, dst_fd, entry.name, rel, read_back)
            except OSError as e:
                raise _CopyFailed(rel, e) from e

    def directory(self, src_fd: int, dst_fd: int, name: str, rel: str) -> None:
        sub_src = os.open(name, _DIR_FLAGS, dir_fd=src_fd)
        try:
            os.mkdir(name, 0o700, dir_fd=dst_fd)
            sub_dst = os.open(name, _DIR_FLAGS, dir_fd=dst_fd)
            try:
                self.contents(sub_src, sub_dst, rel + os.sep)
                self.finish_directory(sub_dst, os.fstat(sub_src), rel)
            finally:
                os.close(sub_dst)
        finally:
            os.close(sub_src)

    def finish_directory(self, dst_fd: int, st: os.stat_result, rel: str) -> None:
        """Once its entries are made: the source directory's mode and times (`st`), then its fsync."""
        os.chmod(dst_fd, stat.S_IMODE(st.st_mode))
        os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.fsync(dst_fd, rel)

    def link(self, src_fd: int, dst_fd: int, name: str, rel: str) -> None:
        st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        to = os.readlink(name, dir_fd=src_fd)
        os.symlink(to, name, dir_fd=dst_fd)
        if os.readlink(name, dir_fd=dst_fd) != to:
            raise _Differs(f"{rel}: the copied link does not lead to {to!r}")
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_fd, follow_symlinks=False)

    def file(self, src_fd: int, dst_fd: int, name: str, rel: str, read_back: bool) -> None:
        src = open_regular(name, src_fd)  # a FIFO or device swapped in since the listing is never opened
        try:
            st = os.fstat(src)
            dst = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dst_fd)
            try:
                reader = (lambda: os.open(name, _READ_BACK, dir_fd=dst_fd)) if read_back else None
                self.data(src, dst, st.st_size, rel, reader)
                _copy_xattrs(src, dst)
                os.chmod(dst, stat.S_IMODE(st.st_mode))
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
                self.fsync(dst, rel)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def data(self, src: int, dst: int, size: int, rel: str, reader: Callable[[], int] | None) -> None:
        """Copy the bytes in chunks to the end of the file (`size` only sizes the first read), each chunk read
        back from the copy through `dst` and compared with the source's, unless `reader` is None. Where `dst`
        cannot read (a FUSE filesystem that opened the new file write-only), through a descriptor from
        `reader`."""
        offset, want = 0, min(COMPARE_CHUNK, size + 1)
        while chunk := os.read(src, want):
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst, view) :]
            if reader is not None and _read_back(dst, len(chunk), offset, reader) != chunk:
                raise _Differs(f"{rel}: the bytes read back from the copy at offset {offset} are not the source's")
            offset += len(chunk)
            if len(chunk) < want:  # the end (a short read that was not would show as a size in verify_copy)
                return
            want = COMPARE_CHUNK
            if self.stop is not None and self.stop():
                raise Stopped("the copy was not complete; the checkpoint stays whole")

    def fsync(self, fd: int, rel: str) -> None:
        if self.slow:
            self.deferred.append(rel)
            return
        started = time.monotonic()
        os.fsync(fd)
        self.slow = time.monotonic() - started > self.slow_fsync


def _read_back(fd: int, size: int, offset: int, reader: Callable[[], int]) -> bytes:
    try:
        return os.pread(fd, size, offset)
    except OSError as e:
        if e.errno != errno.EBADF:
            raise
    fd = reader()
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _copy_xattrs(src: int, dst: int) -> None:
    """Extended attributes, as shutil.copystat copies them (those the target cannot take are left out)."""
    try:
        names = os.listxattr(src)
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.ENODATA, errno.EINVAL):
            raise
        return
    for name in names:
        try:
            os.setxattr(dst, name, os.getxattr(src, name))
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.ENODATA, errno.EINVAL, errno.EACCES):
                raise


def _rmtree_quietly(path: str | Path) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- object stores
def archive_to_store(
    root: Path,
    checkpoint: Path,
    upload: Callable[[str], tuple[dict[str, int], str]],
    state: StateDir,
    dispose: Dispose | None = None,
    expected: Identity | None = None,
    root_identity: Identity | None = None,
) -> str:
    """Archive `checkpoint` to an object store, then remove it like a delete. `upload(source)` uploads, verifies
    and commits the manifest (destination.archive) and returns the manifest's files (relative path -> size) and
    how ("uploaded", "already archived"); it raises on any failure, and then nothing here is touched. The source
    goes only once the manifest is committed, only if it is still the directory that was uploaded (same identity,
    same file list and sizes once it has left its name), else it is put back."""
    run_fd = open_run_dir(root, checkpoint, "archive", root_identity)
    try:
        checked = _guard_at(run_fd, checkpoint, expected, "archive")
        source = os.path.join(fd_path(run_fd, checkpoint.parent), checkpoint.name)
        before = _file_times(source)
        archived, how = upload(source)
        if _file_times(source) != before:  # written to while it was uploaded: what the store holds may be stale
            raise Changed(f"{checkpoint} changed while it was uploaded; it stays, left for the next pass")
        again = _guard_at(run_fd, checkpoint, (checked.st_dev, checked.st_ino))
        entry = _into_trash(run_fd, checkpoint, again, state)
        _check_uploaded(entry, run_fd, checkpoint, archived)
    finally:
        os.close(run_fd)
    _dispose_or_finish(entry, checkpoint, dispose)
    return how


def _file_times(top: str) -> dict[str, tuple[int, int, int]]:
    """Relative path -> (inode, size, mtime_ns) of every entry below `top`, links not followed."""
    found: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            found[os.path.relpath(os.path.join(dirpath, name), top)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return found


def _check_uploaded(entry: TrashEntry, run_fd: int, checkpoint: Path, archived: dict[str, int]) -> None:
    """What left the run's name holds the files the manifest lists, with their sizes; else it goes back."""
    trashed = os.path.join(fd_path(entry.dir_fd, entry.shown.parent), entry.name)
    files = {rel.replace(os.sep, "/"): size for rel, (kind, size) in _listing(trashed).items() if kind == "file"}
    if files == archived:
        return
    back = _put_back(entry, run_fd, checkpoint, "ckptkeeper-returned")
    raise Changed(f"{checkpoint} changed while it was uploaded; it is back as {back}, left for the next pass")
