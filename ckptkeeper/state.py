"""ckptkeeper's state directory (default `<root>/_ckptkeeper/`): the lock, the journal and the trash; and the
root's own lock (`<root>/_ckptkeeper.lock`), which holds one instance per root whatever its state directory.

The state directory is ckptkeeper's own: it deletes whatever lands in its trash, so it uses only a
directory it made (marked by OWNER_MARK), a new or empty one (which it marks), or one of an earlier
version's (nothing but its lock, journal and trash in it). Once made, it is used through a descriptor
opened without following links, so a directory swapped in under its name is never emptied.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import re
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_DIR_NAME = "_ckptkeeper"
LOCK_NAME = "lock"
JOURNAL_NAME = "journal.jsonl"
TRASH_NAME = "trash"
OWNER_MARK = "CKPTKEEPER_STATE_DIR"
RESERVE_NAME = "reserve"  # room for the journal on a full disk (see StateDir.record)
RESERVE_BYTES = 256 << 10
ROOT_LOCK_NAME = "_ckptkeeper.lock"
_LEGACY_NAMES = {LOCK_NAME, JOURNAL_NAME, TRASH_NAME}  # what ckptkeeper 0.1 put in a state directory
# What ckptkeeper names a trash entry (a random token, then the checkpoint's name); nothing else in a trash
# is ever deleted.
TRASH_ENTRY = re.compile(r"[0-9a-f]{12}\.checkpoint-(0|[1-9][0-9]*)")
_OWNER_TEXT = (
    b"This directory is ckptkeeper's state directory: its lock, its journal of actions, and the trash where\n"
    b"removed checkpoints are deleted. ckptkeeper deletes whatever is in trash/. Do not keep anything here.\n"
)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def ownership_problem(path: Path) -> str | None:
    """Why `path` cannot be used as a state directory, or None (absent, empty, or made by ckptkeeper).
    Reads only."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    return _kind_problem(st.st_mode) or _contents_problem(path)


def _kind_problem(mode: int) -> str | None:
    """Why an entry of this mode cannot be a state directory (it is not a directory of its own), or None."""
    if stat.S_ISLNK(mode):
        return "is a symbolic link, not a directory of its own (ckptkeeper empties the trash it holds)"
    if not stat.S_ISDIR(mode):
        return "is not a directory"
    return None


def _contents_problem(path: Path) -> str | None:
    """Why the directory `path` cannot be used as a state directory for what it holds, or None."""
    try:
        names = set(os.listdir(path))
    except OSError as e:
        return f"cannot be listed: {e.strerror or e}"
    if TRASH_NAME in names and not stat.S_ISDIR(os.lstat(path / TRASH_NAME).st_mode):
        return f"holds a {TRASH_NAME} that is not a directory of its own (a symbolic link?): it would be emptied"
    if not names or OWNER_MARK in names or _made_by_legacy_version(path, names):
        return None
    shown = ", ".join(sorted(names)[:4]) + (", ..." if len(names) > 4 else "")
    return (
        f"exists and was not made by ckptkeeper (it holds {shown}): ckptkeeper deletes what is in a state "
        "directory's trash/, so it uses only a new or empty directory, or one it made"
    )


def _made_by_legacy_version(path: Path, names: set[str]) -> bool:
    """True when the directory `path` holding `names` was made by ckptkeeper 0.1, before the mark: nothing in
    it but its own lock, journal and trash."""
    trash_ours = TRASH_NAME not in names or _only_trash_entries(path / TRASH_NAME, allow_empty=True)
    return names <= _LEGACY_NAMES and trash_ours and bool(names & {LOCK_NAME, JOURNAL_NAME} or TRASH_NAME in names)


class LockHeld(RuntimeError):
    """Another ckptkeeper holds the root's lock."""


def _only_trash_entries(trash: Path, allow_empty: bool = False) -> bool:
    """True when `trash` holds only what ckptkeeper names its trash entries (and something, unless
    `allow_empty`)."""
    try:
        names = os.listdir(trash)
    except OSError:
        return False
    return (allow_empty or bool(names)) and all(TRASH_ENTRY.fullmatch(n) for n in names)


def _still_linked(fd: int) -> bool:
    try:
        return os.fstat(fd).st_nlink > 0
    except OSError:
        return False


def _say_holder(fd: int, holder: bytes) -> None:
    """Write who holds a lock into its file, for the next one's message. Best effort: the flock is the lock,
    and on a full disk (the very case ckptkeeper is for) this line must not stop it from starting."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder, 0)


def _holder(root: Path) -> str:
    try:
        with open(root / ROOT_LOCK_NAME, "rb") as f:
            return f.read(200).decode(errors="replace").strip() or "unknown process"
    except OSError:
        return "unknown process"


def _held_message(root: Path, holder: str, where: Path | None = None) -> str:
    return (
        f"another ckptkeeper ({holder}) is already working on {root}; "
        f"only one instance may run per root (lock: {where or root / ROOT_LOCK_NAME})"
    )


def _write_new(dir_fd: int, name: str, data: bytes) -> None:
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    except FileExistsError:
        return
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@dataclass
class _Spared:
    """Within one removal (`StateDir.one_removal`): the checks already passed once, not made again."""

    linked: bool = False  # the state directory and its trash are still linked
    reserve: bool = False  # the reserve file is there


class StateDir:
    """The state directory. Owned by the thread that runs the pipeline; `record`, `dir_fd` and `trash_fd` may be
    called from any thread (the daemon's reaper journals too): they, `create` and `close` hold `_journal_lock`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.trash = path / TRASH_NAME
        self.journal_path = path / JOURNAL_NAME
        # The daemon's reaper thread records too; reentrant: record -> dir_fd -> create -> the journal's close.
        self._journal_lock = threading.RLock()
        self._lock_fd: int | None = None
        self._root_lock_fds: list[int] = []
        self._retired: list[int] = []  # a deleted directory's descriptors, closed by `close` (`_retire_directory`)
        self._fd: int | None = None  # the state directory itself, opened without following links
        self._trash_fd: int | None = None
        # The journal, held open between lines (opened again when its name leads to another file): its
        # (device, inode), and its size after this process's last whole line (-1: unknown).
        self._journal_fd: int | None = None
        self._journal_id: tuple[int, int] = (0, 0)
        self._journal_end = -1
        self._spared: _Spared | None = None  # inside `one_removal` only

    def create(self) -> None:
        """Make (or claim) the state directory and its trash, and hold both open. Refuses a directory that is
        not ckptkeeper's, and a link in the place of either. Under the journal's lock: the daemon's reaper
        journals from its own thread, and either thread may find the directory deleted and make it anew."""
        with self._journal_lock:
            self._create()

    def _create(self) -> None:
        if self._fd is not None and self._trash_fd is not None:
            spared = self._spared
            if spared is not None and spared.linked:
                return
            if _still_linked(self._fd) and _still_linked(self._trash_fd):
                if spared is not None:
                    spared.linked = True
                return
            # Deleted (with its root, say) since it was opened: made anew below. The root's lock stays held
            # (another instance must not start on this root meanwhile); the state lock is taken again in the
            # new directory (`_lock_again`).
            self._retire_directory()
        problem = ownership_problem(self.path)
        if problem:
            raise OSError(errno.EEXIST, f"{problem}; refusing to use it", str(self.path))
        self.path.mkdir(parents=True, exist_ok=True)
        fd = self._open_dir(self.path)
        try:
            self._claim(fd)
        except OSError as e:
            os.close(fd)
            if e.filename is not None and not os.path.isabs(os.fsdecode(e.filename)):
                raise OSError(e.errno, e.strerror, str(self.path / os.fsdecode(e.filename))) from None
            raise
        except BaseException:
            os.close(fd)
            raise
        self._lock_again()

    def _claim(self, fd: int) -> None:
        """Mark the directory open as `fd` as ckptkeeper's, make its trash, and hold both open."""
        names = set(os.listdir(fd))
        if names and OWNER_MARK not in names and not (names <= _LEGACY_NAMES):
            # Filled between the check and the open: not a directory this process may take.
            raise OSError(errno.EEXIST, "not a directory of ckptkeeper's; refusing to use it", str(self.path))
        if OWNER_MARK not in names:
            _write_new(fd, OWNER_MARK, _OWNER_TEXT)
        with contextlib.suppress(FileExistsError):
            os.mkdir(TRASH_NAME, 0o755, dir_fd=fd)
        self._trash_fd = self._open_dir(self.trash, dir_fd=fd, name=TRASH_NAME)
        self._fd = fd
        self._keep_reserve()

    def _lock_again(self) -> None:
        """Where this process held the lock of a state directory deleted since, take the lock of the directory
        made in its place. Where another root's instance took it first: LockHeld, and the directory is let go
        (the next use tries again)."""
        if self._lock_fd is None or os.fstat(self._lock_fd).st_nlink > 0:
            return
        try:
            fd = self._lock_state()
        except BaseException:
            self._close_directory()
            raise
        holder = os.pread(self._lock_fd, 300, 0)
        os.close(self._lock_fd)
        self._lock_fd = fd
        _say_holder(fd, holder)

    @staticmethod
    def _open_dir(path: Path, dir_fd: int | None = None, name: str | None = None) -> int:
        try:
            return os.open(name if name is not None else path, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise OSError(
                    errno.ENOTDIR, "not a directory of its own (a symbolic link?); refusing to use it", str(path)
                ) from None
            raise

    @contextlib.contextmanager
    def one_removal(self) -> Iterator[None]:
        """Around one removal (its pins guard, journal lines and rename, milliseconds): the directories are checked
        to be still linked, and the reserve to be there, at their first use in the block rather than at every
        one (four uses and two journal lines per removal; each check is system calls). Owned by the thread that
        acts; a check of another thread's within the block is spared too, as it would be a moment later."""
        self._spared = _Spared()
        try:
            yield
        finally:
            self._spared = None

    @property
    def trash_fd(self) -> int:
        """The trash, open (made first where it is not); valid until `close`, even if another thread finds the
        directory deleted meanwhile (`_retire_directory`)."""
        with self._journal_lock:
            self._create()
            assert self._trash_fd is not None
            return self._trash_fd

    @property
    def dir_fd(self) -> int:
        """The state directory, open, as `trash_fd`."""
        with self._journal_lock:
            self._create()
            assert self._fd is not None
            return self._fd

    def acquire_lock(self, root: Path) -> None:
        """Take the root's own lock, so that one instance runs per root however the root is reached and
        wherever its state lives; then the state directory's, so that two roots never share one trash at
        once. The root's lock is a flock on the root directory itself (local filesystems) and on
        `ROOT/_ckptkeeper.lock` (which NFS clients share across nodes; skipped on a root this process cannot
        write, where the directory's lock holds). flock is released by the kernel when a process dies, so a
        lock left by a killed instance never blocks the next one."""
        self.create()
        held: list[int] = []
        try:
            held += self._lock_root(root)
            held.append(self._lock_state())
        except BaseException:
            for fd in held:
                os.close(fd)
            raise
        # The host's name as gethostname(2) gives it (socket.gethostname: uname's nodename), without importing
        # socket (and selectors, array) at every start of prune.
        me = f"pid {os.getpid()} on {os.uname().nodename}"
        for fd in held[1:-1]:  # the root's lock file (not the root directory)
            _say_holder(fd, f"{me}\n".encode())
        _say_holder(held[-1], f"{me}, for {root}\n".encode())
        self._root_lock_fds, self._lock_fd = held[:-1], held[-1]

    def _lock_state(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(LOCK_NAME, flags, 0o644, dir_fd=self._fd)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path / LOCK_NAME)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise LockHeld(
                f"another ckptkeeper ({holder}) is using the state directory {self.path}; a state directory "
                f"serves one root at a time (lock: {self.path / LOCK_NAME})"
            ) from None
        except OSError:
            os.close(fd)
            raise
        return fd

    def _lock_root(self, root: Path) -> list[int]:
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(dir_fd)
            raise LockHeld(_held_message(root, _holder(root))) from None
        except OSError:  # a filesystem that cannot lock a directory (NFS): the file below stands alone
            pass
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            file_fd = os.open(ROOT_LOCK_NAME, flags, 0o644, dir_fd=dir_fd)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return [dir_fd]  # nothing can be written in this root, by this instance or another
            os.close(dir_fd)
            raise
        try:
            return [dir_fd, self._take(file_fd, root, root / ROOT_LOCK_NAME)]
        except BaseException:
            os.close(dir_fd)
            raise

    @staticmethod
    def _take(fd: int, root: Path, where: Path) -> int:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise LockHeld(_held_message(root, holder, where)) from None
        except OSError:
            os.close(fd)
            raise
        return fd

    def lock_deleted(self) -> bool:
        """True when the root's lock file was deleted with its root (or the state lock with its directory):
        a held lock's inode cannot be reused, unlike a directory's inode number."""
        for fd in (*self._root_lock_fds, self._lock_fd):
            with contextlib.suppress(OSError):
                if fd is not None and os.fstat(fd).st_nlink == 0:
                    return True
        return False

    def release_lock(self) -> None:
        self._close_journal()
        for fd in (*self._root_lock_fds, self._lock_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    if stat.S_ISREG(os.fstat(fd).st_mode):
                        os.ftruncate(fd, 0)
                os.close(fd)  # closing the descriptor releases the flock
        self._lock_fd, self._root_lock_fds = None, []

    def close(self) -> None:
        """Release the locks and the directory descriptors (a deleted directory's, retired, too)."""
        with self._journal_lock:
            self._spared = None
            self.release_lock()
            self._close_directory()
            retired, self._retired = self._retired, []
            for fd in retired:
                os.close(fd)

    def _retire_directory(self) -> None:
        """Let go of a deleted directory's descriptors without closing them until `close`: another thread may
        still hold one of their numbers, which a descriptor opened meanwhile would otherwise take (it would then
        act on whatever that is). Held open, they lead to the deleted directory, where nothing can be made."""
        self._close_journal()
        self._retired += [fd for fd in (self._trash_fd, self._fd) if fd is not None]
        self._fd = self._trash_fd = None

    def _close_directory(self) -> None:
        self._close_journal()
        for fd in (self._trash_fd, self._fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._trash_fd = None

    def record(self, entry: dict[str, Any]) -> None:
        """Append one action to the journal (JSON lines), with the time it happened.

        Every removal is journaled before it starts, so a full disk would forbid the very removals that free
        it: the state directory keeps a reserve file, given up when the journal meets ENOSPC (the write is
        tried again) and made anew once there is room."""
        line = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"), **entry}
        with self._journal_lock:
            dir_fd = self.dir_fd
            try:
                self._append(dir_fd, line)
            except OSError as e:
                if e.errno != errno.ENOSPC or not self._give_up_reserve(dir_fd):
                    raise
                self._append(dir_fd, line)
            self._keep_reserve(dir_fd)

    def _give_up_reserve(self, dir_fd: int) -> bool:
        spared = self._spared  # read once: the thread that owns the removal may end it meanwhile
        if spared is not None:
            spared.reserve = False
        try:
            os.unlink(RESERVE_NAME, dir_fd=dir_fd)
        except OSError:
            return False
        return True

    def _keep_reserve(self, dir_fd: int | None = None) -> None:
        """Make the reserve where it is missing; where there is no room for it, try again at the next line."""
        spared = self._spared
        if spared is not None and spared.reserve:
            return
        dir_fd = self.dir_fd if dir_fd is None else dir_fd
        try:
            os.stat(RESERVE_NAME, dir_fd=dir_fd, follow_symlinks=False)
            if spared is not None:
                spared.reserve = True
            return
        except FileNotFoundError:
            pass
        except OSError:
            return
        try:
            fd = os.open(
                RESERVE_NAME,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dir_fd,
            )
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(RESERVE_NAME, dir_fd=dir_fd)
        finally:
            os.close(fd)

    def _append(self, dir_fd: int, line: dict[str, Any]) -> None:
        """Write one line at the journal's end. The journal is held open between lines, and opened again
        whenever its name leads to another file than the one held (rotated, removed, replaced: as if it were
        opened for every line, which it was before, without the open and close)."""
        fd, size = self._journal_file(dir_fd)
        # A crash may have cut the last line short: start on a fresh line, or this entry is lost with it. The
        # last byte is known to be a newline when the file ends where this process's last whole line did.
        cut_short = size > 0 and size != self._journal_end and os.pread(fd, 1, size - 1) != b"\n"
        data = (("\n" if cut_short else "") + json.dumps(line, sort_keys=False) + "\n").encode()
        self._journal_end = -1
        written = os.write(fd, data)
        if written != len(data):
            # A full disk takes what fits in the journal's last block and reports no error: the line is not
            # written, so the part is cut off again (this process alone writes the journal: it holds the state
            # lock) and the write fails as ENOSPC (`record` then gives up the reserve and writes it whole).
            # Where the part cannot be cut off, the next line starts on a line of its own (`cut_short`).
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.journal_path))
        self._journal_end = size + written

    def _journal_file(self, dir_fd: int) -> tuple[int, int]:
        """The journal, open for appending, and its size now (one lstat of its name when it is held)."""
        try:
            st: os.stat_result | None = os.stat(JOURNAL_NAME, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if self._journal_fd is not None and st is not None and (st.st_dev, st.st_ino) == self._journal_id:
            return self._journal_fd, st.st_size
        self._close_journal_fd()
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(JOURNAL_NAME, flags, 0o644, dir_fd=dir_fd)
        st = os.fstat(fd)
        self._journal_fd, self._journal_id, self._journal_end = fd, (st.st_dev, st.st_ino), -1
        return fd, st.st_size

    def _close_journal(self) -> None:
        with self._journal_lock:
            self._close_journal_fd()

    def _close_journal_fd(self) -> None:
        if self._journal_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._journal_fd)
        self._journal_fd, self._journal_end = None, -1

    def read_journal(self) -> list[dict[str, Any]]:
        if not self.journal_path.exists():
            return []
        entries = []
        for line in self.journal_path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
        return entries
