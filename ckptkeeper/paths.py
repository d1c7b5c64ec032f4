"""Where a user's paths really are, compared by identity, never by the strings the user typed.

Two paths can name one directory in ways a string never shows: a symlink, `..`, the same volume mounted
twice (`-v /data/outputs:/outputs -v /data/outputs:/archive`), a bind mount of a subdirectory. Each path
is placed by (device, inode) of itself and of its ancestors, and by the kernel's mount table: the
filesystem (major:minor) and the path inside that filesystem (the mount's own root joined with the rest),
which is the same for every mount of one directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

MOUNTINFO = "/proc/self/mountinfo"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(0|[1-9][0-9]*)")

Identity = tuple[int, int]


class Relation(Enum):
    SAME = "is"
    INSIDE = "is inside"
    CONTAINS = "contains"


# Filesystems whose kernel code sets every inode's ctime from this machine's clock at each change, and offers no
# way to set it back (the argument of `scan.lstat_signature`). Not FUSE (sshfs reports ctime = mtime), FAT and
# exFAT (utime sets both), NFS and SMB (the server's clock), nor anything unknown.
KERNEL_CTIME_FILESYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "zfs", "overlay", "jfs", "bcachefs", "ramfs"}
)
# Filesystems whose reads and writes this kernel serves itself, through its page cache, from local storage or
# memory: a byte read back just after it was written is the page that write filled, so reading a copy back
# checks nothing there (`actions._TreeCopy`). Not FUSE (a process answers), NFS or SMB (a server does), nor
# overlay (its upper layer may be any of these).
KERNEL_DATA_FILESYSTEMS = (KERNEL_CTIME_FILESYSTEMS - {"overlay"}) | {"vfat", "msdos", "exfat", "ntfs3"}


@dataclass(frozen=True)
class Mount:
    device: str  # major:minor of the filesystem
    root: tuple[str, ...]  # the directory of that filesystem mounted here
    point: tuple[str, ...]  # where it is mounted
    fstype: str = ""  # as the mount table names it: ext4, tmpfs, fuse.sshfs, ...


@dataclass(frozen=True)
class Place:
    """A directory (or where one would be created) as the kernel sees it."""

    real: tuple[str, ...]  # components of its real path (symlinks resolved)
    device: str | None  # the filesystem, from the mount table; None without one
    inside_fs: tuple[str, ...]  # its path inside that filesystem
    identity: Identity | None  # (st_dev, st_ino); None where it does not exist (yet)
    ancestors: tuple[Identity, ...]  # the identities of every existing ancestor of its real path


def _unescape(field: str) -> str:
    # The mount table writes space, tab, newline and backslash in paths as octal escapes (\040).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _parts(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


def _parse_mounts(table: str) -> list[Mount]:
    mounts = []
    for line in table.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            # After the optional fields, a lone "-", then the filesystem type (proc(5)).
            separator = fields.index("-", 6) if "-" in fields[6:] else len(fields)
            fstype = fields[separator + 1] if separator + 1 < len(fields) else ""
            mounts.append(Mount(fields[2], _parts(_unescape(fields[3])), _parts(_unescape(fields[4])), fstype))
    return mounts


class MountTable:
    """The kernel's mount table, read again only when it has changed since the last read.

    The table is held open; the kernel marks an open /proc/<pid>/mountinfo readable with POLLPRI | POLLERR
    once any mount or unmount changes the process's mount namespace after the last poll (proc(5): "this file
    can be monitored for changes"), so a zero-timeout poll before each use tells whether the copy read before
    may still be used. A change during a read is seen by the next poll, never lost: the poll compares the
    namespace's event count with the one it saw last. Where the table cannot be held open or polled, it is
    read anew at every use, as before. Thread-safe (the daemon's reaper thread asks too)."""

    def __init__(self, path: str = MOUNTINFO) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._poll: select.poll | None = None
        self._mounts: list[Mount] = []
        self._types: dict[str, frozenset[str]] = {}  # device (major:minor) -> the types it is mounted with
        self._points: tuple[str, ...] = ()  # every mount point as a path, in the table's order
        self.reads = 0  # how many times the table was read (for tests and benchmarks)

    def mounts(self) -> list[Mount]:
        """Every mount, in the table's order (a later one at the same point hides an earlier one)."""
        with self._lock:
            self._refresh()
            return list(self._mounts)

    def points(self) -> tuple[str, ...]:
        """Every mount point as an absolute path, in the table's order; made once per read of the table (a removal
        asks twice per checkpoint, through `actions.mount_points_below`)."""
        with self._lock:
            self._refresh()
            return self._points

    def types_of(self, device: str) -> frozenset[str]:
        """The filesystem types the device (major:minor) is mounted with (of every mount of it); none where it
        is not in the table. One poll, no copy of the table: asked for every checkpoint a scan judges."""
        with self._lock:
            self._refresh()
            return self._types.get(device, frozenset())

    def _refresh(self) -> None:
        if self._fd is not None and not self._changed():
            return
        self._close()
        self._mounts = self._read()
        types: dict[str, set[str]] = {}
        for mount in self._mounts:
            types.setdefault(mount.device, set()).add(mount.fstype)
        self._types = {device: frozenset(found) for device, found in types.items()}
        self._points = tuple("/" + "/".join(mount.point) for mount in self._mounts)

    def _changed(self) -> bool:
        assert self._poll is not None
        try:
            events = self._poll.poll(0)
        except OSError:
            return True
        return any(bits & (select.POLLPRI | select.POLLERR | select.POLLNVAL) for _, bits in events)

    def _read(self) -> list[Mount]:
        """Open the table, start watching it, read it; [] where there is none (the fd stays closed then)."""
        self.reads += 1
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return []
        try:
            poller = select.poll()
            poller.register(fd, select.POLLPRI | select.POLLERR)
            poller.poll(0)  # what changed before this open is in what is read below
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
        except OSError:
            os.close(fd)
            return []
        self._fd, self._poll = fd, poller
        return _parse_mounts(b"".join(chunks).decode("utf-8", errors="surrogateescape"))

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._poll = None, None

    def forget_in_child(self) -> None:
        """After fork: the table held is the parent's /proc/<pid>/mountinfo; the child reads its own."""
        self._lock = threading.Lock()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._poll = None, None


MOUNT_TABLE = MountTable()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=MOUNT_TABLE.forget_in_child)


def kernel_sets_ctimes(devices: set[int]) -> bool:
    """Every one of these filesystems (st_dev) is of KERNEL_CTIME_FILESYSTEMS (`mounted_as`)."""
    return mounted_as(devices, KERNEL_CTIME_FILESYSTEMS)


def kernel_holds_data(device: int) -> bool:
    """This filesystem (st_dev) is of KERNEL_DATA_FILESYSTEMS (`mounted_as`)."""
    return mounted_as({device}, KERNEL_DATA_FILESYSTEMS)


def mounted_as(devices: set[int], fstypes: frozenset[str]) -> bool:
    """Every one of these filesystems (st_dev) is mounted here with a type of `fstypes` (of a device mounted
    more than once, every mount). One not in the mount table (a btrfs subvolume's own device) does not count
    as one."""
    for device in devices:
        types = MOUNT_TABLE.types_of(f"{os.major(device)}:{os.minor(device)}")
        if not types or not types <= fstypes:
            return False
    return True


def read_mounts() -> list[Mount]:
    """Every mount, in the table's order (a later one at the same point hides an earlier one); read again
    only when it changed (`MountTable`)."""
    return MOUNT_TABLE.mounts()


def _mount_of(real: tuple[str, ...], mounts: list[Mount]) -> Mount | None:
    best: Mount | None = None
    for mount in mounts:
        if real[: len(mount.point)] == mount.point and (best is None or len(mount.point) >= len(best.point)):
            best = mount
    return best


def identity(path: Path | str) -> Identity | None:
    """(st_dev, st_ino) of what `path` leads to, following links as the kernel does; None if it cannot."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def place_of(path: Path | str, mounts: list[Mount] | None = None) -> Place:
    """Place `path`, following what the kernel follows. A path that does not exist yet is placed where it
    would be created: below its nearest existing ancestor."""
    mounts = read_mounts() if mounts is None else mounts
    real = _parts(os.path.realpath(path))
    own = identity("/" + "/".join(real))
    ancestors = []
    for depth in range(len(real) - 1, -1, -1):
        found = identity("/" + "/".join(real[:depth]))
        if found is not None and found != own and found not in ancestors:
            ancestors.append(found)
    mount = _mount_of(real, mounts)
    if mount is None:
        return Place(real, None, real, own, tuple(ancestors))
    return Place(real, mount.device, mount.root + real[len(mount.point) :], own, tuple(ancestors))


def relation(a: Place, b: Place) -> Relation | None:
    """How `a` stands to `b`: the same directory, inside it, containing it, or apart."""
    if a.identity is not None and a.identity == b.identity:
        return Relation.SAME
    found = _relation_in_filesystem(a, b)
    return found if found is not None else _relation_by_ancestors(a, b)


def _relation_in_filesystem(a: Place, b: Place) -> Relation | None:
    """`relation` by the mount table: the paths of `a` and `b` inside one filesystem."""
    if a.device is None or a.device != b.device:
        return None
    if a.inside_fs == b.inside_fs:
        return Relation.SAME
    if a.inside_fs[: len(b.inside_fs)] == b.inside_fs:
        return Relation.INSIDE
    if b.inside_fs[: len(a.inside_fs)] == a.inside_fs:
        return Relation.CONTAINS
    return None


def _relation_by_ancestors(a: Place, b: Place) -> Relation | None:
    """`relation` without a mount table (or across it): an ancestor's identity."""
    if b.identity is not None and b.identity in a.ancestors:
        return Relation.INSIDE
    if a.identity is not None and a.identity in b.ancestors:
        return Relation.CONTAINS
    return None


def checkpoint_component(place: Place) -> str | None:
    """The first component named like a checkpoint (`checkpoint-<step>`) of the place's real path or of its
    path inside its filesystem (a bind mount of a checkpoint has a name of its own), if any."""
    return next((p for p in (*place.real, *place.inside_fs) if _CHECKPOINT_NAME.fullmatch(p)), None)


def fd_path(fd: int, fallback: Path | str) -> str:
    """A path that reaches the directory open as `fd` without walking any name again (Linux's
    /proc/self/fd), or `fallback` where the system has none."""
    magic = f"/proc/self/fd/{fd}"
    return magic if os.path.isdir(magic) else os.fspath(fallback)


def real_path_at(dir_fd: int, name: str, fallback: Path | str) -> str:
    """The real path of `name` in the directory open as `dir_fd`, as the kernel names that directory now
    (one readlink of /proc/self/fd, where os.path.realpath would lstat every component); `name` itself is
    not followed. Where the kernel cannot say (no /proc, a directory since removed), the real path of
    `fallback`/`name`."""
    try:
        where = os.readlink(f"/proc/self/fd/{dir_fd}")
    except OSError:
        where = ""
    if not where.startswith("/") or where.endswith(" (deleted)"):
        return os.path.join(os.path.realpath(fallback), name)
    return os.path.join(where, name)


def place_of_fd(fd: int, mounts: list[Mount] | None = None) -> Place | None:
    """Place the directory open as `fd` (where the kernel says it is now); None where it cannot tell."""
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    if not where.startswith("/") or where.endswith(" (deleted)"):
        return None
    return place_of(where, mounts)
