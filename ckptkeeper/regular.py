"""Open a regular file for reading without ever opening anything else.

Checking an entry's type and then opening it by name leaves a moment in which another entry can take the name.
Opening with O_NONBLOCK and checking the descriptor after does not help either: the open itself has already
happened, and opening a FIFO releases a writer waiting on it, opening a device may do something (a tape
rewinds, a modem hangs up). So the name is first opened with O_PATH (which opens nothing: no read, no side
effect of the file's kind) without following a link; only if that descriptor is a regular file is the very
same inode opened for reading, through /proc/self/fd. Where there is no /proc, the name is opened again (as
before, O_NONBLOCK, no link followed) and must still be the same inode."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_FLAGS = os.O_RDONLY | os.O_CLOEXEC
_KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


class NotRegular(OSError):
    """The entry is not a regular file; `kind` says what it is (a symbolic link is never followed)."""

    def __init__(self, name: str | Path, mode: int) -> None:
        self.mode = mode
        self.kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        super().__init__(errno.EINVAL, f"{self.kind}, not a regular file", os.fspath(name))


def open_regular(name: str | Path, dir_fd: int | None = None) -> int:
    """A descriptor of the regular file `name` (in the directory open as `dir_fd`), open for reading; NotRegular
    where the entry is anything else, the open's own OSError where there is none or it cannot be read."""
    held = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(held)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(name, st.st_mode)
        try:
            return os.open(f"/proc/self/fd/{held}", _FLAGS)
        except FileNotFoundError:  # no /proc mounted here
            return _open_again(name, dir_fd, st)
    finally:
        os.close(held)


def _open_again(name: str | Path, dir_fd: int | None, seen: os.stat_result) -> int:
    fd = os.open(name, _FLAGS | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino):
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(name, st.st_mode)
        raise FileNotFoundError(errno.ENOENT, "replaced while it was opened", os.fspath(name))
    return fd
