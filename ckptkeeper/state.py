"""ckptkeeper's state directory (default `<root>/_ckptkeeper/`): the lock, the journal and the trash."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

STATE_DIR_NAME = "_ckptkeeper"
LOCK_NAME = "lock"
JOURNAL_NAME = "journal.jsonl"
TRASH_NAME = "trash"


class LockHeld(RuntimeError):
    """Another ckptkeeper holds the root's lock."""


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.trash = path / TRASH_NAME
        self.journal_path = path / JOURNAL_NAME
        self._journal_lock = threading.Lock()  # the daemon's reaper thread records too
        self._lock_fd: int | None = None

    def create(self) -> None:
        self.trash.mkdir(parents=True, exist_ok=True)
        # Everything in the trash gets deleted: through a link it could be anybody's directory.
        for path in (self.path, self.trash):
            if path.is_symlink() or not path.is_dir():
                raise OSError(
                    errno.ENOTDIR, "not a directory of its own (a symbolic link?); refusing to use it", str(path)
                )

    def acquire_lock(self, root: Path) -> None:
        """Take the per-root lock. flock is released by the kernel when a process dies, so a lock left
        by a killed instance never blocks the next one."""
        self.create()
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise LockHeld(
                f"another ckptkeeper ({holder}) is already working on {root}; "
                f"only one instance may run per root (lock: {self.path / LOCK_NAME})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def record(self, entry: dict[str, Any]) -> None:
        """Append one action to the journal (JSON lines), with the time it happened."""
        line = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"), **entry}
        with self._journal_lock:
            self._append(line)

    def _append(self, line: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.journal_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # A crash may have cut the last line short: start on a fresh line, or this entry is lost with it.
            size = os.fstat(fd).st_size
            cut_short = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
            os.write(fd, (("\n" if cut_short else "") + json.dumps(line, sort_keys=False) + "\n").encode())
        finally:
            os.close(fd)

    def read_journal(self) -> list[dict[str, Any]]:
        if not self.journal_path.exists():
            return []
        entries = []
        for line in self.journal_path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
        return entries
