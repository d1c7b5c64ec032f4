"""`python tests/loopfs.py SOURCE MOUNTPOINT`: a FUSE passthrough of SOURCE, in the foreground.

A second mount of the same data through it gets a device and inodes of its own, as sshfs, gcsfuse, s3fs
or two NFS mounts with `nosharecache` do: no identity, and no line of the mount table, says that the two
are one. The tests use it to make such an alias for real (mfusepy, in the test extra; /dev/fuse; root).
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

import mfusepy as fuse


class Passthrough(fuse.Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(self, source: str) -> None:
        self.source = os.path.realpath(source)

    def _real(self, path: str) -> str:
        return self.source + path

    def access(self, path: str, mode: int) -> None:
        if not os.access(self._real(path), mode):
            raise fuse.FuseOSError(errno.EACCES)

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.lstat(self._real(path))
        keys = ("st_gid", "st_mode", "st_nlink", "st_size", "st_uid", "st_ino")
        return {k: getattr(st, k) for k in keys} | {
            "st_atime": st.st_atime_ns,
            "st_mtime": st.st_mtime_ns,
            "st_ctime": st.st_ctime_ns,
        }

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, Any], int]]:
        base = path.rstrip("/")
        return [(name, self.getattr(f"{base}/{name}"), 0) for name in os.listdir(self._real(path))]

    def readdir_with_offset(self, path: str, offset: int, fh: int) -> list[tuple[str, dict[str, Any], int]]:
        return self.readdir(path, fh)

    def readlink(self, path: str) -> str:
        return os.readlink(self._real(path))

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._real(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._real(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._real(path))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._real(old), self._real(new))

    def symlink(self, target: str, source: str) -> None:
        os.symlink(source, self._real(target))

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._real(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._real(path), uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        os.utime(self._real(path), ns=times) if times else os.utime(self._real(path))

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        os.truncate(self._real(path), length)

    def create(self, path: str, mode: int, fi: object = None) -> int:
        return os.open(self._real(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def open(self, path: str, flags: int) -> int:
        return os.open(self._real(path), flags)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return os.pwrite(fh, data, offset)

    def flush(self, path: str, fh: int) -> int:
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        os.fsync(fh)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        s = os.statvfs(self._real(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag")
        return {k: getattr(s, k) for k in (*keys, "f_frsize", "f_namemax")}


if __name__ == "__main__":
    fuse.FUSE(Passthrough(sys.argv[1]), sys.argv[2], foreground=True, allow_other=True, use_ino=True)
