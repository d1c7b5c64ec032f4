"""A second process that reads checkpoints' files for a one-shot scan (issue #12: a first-look `plan` of a large
root, where parsing every `trainer_state.json` is most of the time and the machine has another core).

`Helper.start` forks the scanning process (after its imports, so the child starts at once) when nothing else runs
in it (no other thread: a fork copies only the thread that calls it). The scan keeps doing everything but reading
files: it opens and walks each checkpoint directory (its lstat signature), and either reads the files itself or
passes the open directory (the descriptor itself, SCM_RIGHTS over a socket pair) to the helper with the names its
walk found. The helper runs the very function the scan would (`scan._read_contents`) through that descriptor, so
it reads the same directory the walk saw, after the walk, as the scan itself would; it answers with what the files
said (`scan.Contents`), and the scan judges the checkpoint as it always does. The helper writes nothing, holds no
state between checkpoints, and never decides anything.

Whatever goes wrong on the helper's side is read in the scanning process instead, as if there were no helper: an
error while reading (the scan meets it again itself and reports it as it always did), an answer too long for one
message, a helper that died (EOF on the socket). A checkpoint is therefore judged from what `_read_contents`
returned for it, in one process or the other, and from nothing else.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Generic, NoReturn, TypeVar

from ckptkeeper.scan import Contents, _read_contents

MAX_MESSAGE = 1 << 16  # a request or an answer longer than this is not sent: the scan reads that checkpoint itself
IN_FLIGHT = 2  # checkpoints handed to the helper and not answered yet, at most
_PROC_FD = "/proc/self/fd"

Job = TypeVar("Job")


class Helper(Generic[Job]):
    """The scanning process's end of one helper. Each job is handed over with an open directory descriptor, which
    stays the caller's: the caller closes it once the job is answered (`answers`) or given up (`close`)."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self._pid = pid
        self._sock = sock
        self._waiting: dict[int, Job] = {}
        self._next = 0
        self._gone = False
        self._reaped = False

    @classmethod
    def start(cls) -> Helper[Job] | None:
        """A new helper, or None where there cannot be one (another thread runs, no /proc, no fork)."""
        if threading.active_count() != 1 or not os.path.isdir(_PROC_FD) or not hasattr(os, "fork"):
            return None
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError:
            return None
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return None
        if pid == 0:
            ours.close()  # or the helper would hold both ends, and never see the scan's end close
            _serve(theirs)
        theirs.close()
        return cls(pid, ours)

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def give(self, job: Job, dir_fd: int, step: int, names: list[str], name: str) -> bool:
        """Hand the helper the checkpoint directory open as `dir_fd`; False where it takes nothing now (busy, gone,
        a request too long): the caller reads it itself."""
        if self._gone or len(self._waiting) >= IN_FLIGHT:
            return False
        request = pickle.dumps((self._next, step, names, name), pickle.HIGHEST_PROTOCOL)
        if len(request) > MAX_MESSAGE:
            return False
        try:
            socket.send_fds(self._sock, [request], [dir_fd])
        except OSError:
            self._gone = True
            return False
        self._waiting[self._next] = job
        self._next += 1
        return True

    def answers(self, block: bool = False) -> Iterator[tuple[Job, Contents | None]]:
        """Each job answered by now (with `block`, waiting for one at least while any is out): its contents, or None
        where the caller is to read them itself (the helper could not, or is gone)."""
        while self._waiting:
            flags = 0 if block else socket.MSG_DONTWAIT
            try:
                reply = self._sock.recv(MAX_MESSAGE + 1, flags)
                number, contents = pickle.loads(reply) if reply else (None, None)
            except BlockingIOError:
                return
            except Exception:  # an answer that cannot be read: as if the helper had gone
                number = None
            if number not in self._waiting:  # EOF: gone, and what it had not answered is read by the caller
                self._gone = True
                yield from ((job, None) for job in self._take_all())
                return
            yield self._waiting.pop(number), contents if isinstance(contents, Contents) else None
            block = False

    def _take_all(self) -> list[Job]:
        jobs = list(self._waiting.values())
        self._waiting.clear()
        return jobs

    def close(self) -> list[Job]:
        """Stop the helper (it holds nothing worth waiting for) and reap it, once (its pid is free after that); the
        jobs it never answered."""
        self._sock.close()
        self._gone = True
        if not self._reaped:
            self._reaped = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):  # reaped elsewhere (SIGCHLD ignored)
                os.waitpid(self._pid, 0)
        return self._take_all()


def _serve(sock: socket.socket) -> NoReturn:
    """The helper: answer each request until the socket closes, then exit without running anything of the parent's
    (no atexit handler, no flush of a buffer it inherited)."""
    code = 1
    try:
        gc.disable()  # what it reads makes no cycles; a collection would touch (and copy) every page of the parent's
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, signal.SIG_DFL)  # the parent's handlers are the parent's business
        while True:
            request, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
            if not request:
                break
            number, step, names, name = pickle.loads(request)
            contents = _read(fds[0], step, names, name) if len(fds) == 1 else None
            answer = pickle.dumps((number, contents), pickle.HIGHEST_PROTOCOL)
            if len(answer) > MAX_MESSAGE:
                answer = pickle.dumps((number, None))
            sock.send(answer)
        code = 0
    finally:
        os._exit(code)


def _read(dir_fd: int, step: int, names: list[str], name: str) -> Contents | None:
    """What `scan._read_contents` says of the directory open as `dir_fd`; None where it raised (the scanning process
    then reads it itself, and meets the error itself)."""
    try:
        return _read_contents(Path(f"{_PROC_FD}/{dir_fd}"), step, names, name, dir_fd)
    except Exception:
        return None
    finally:
        os.close(dir_fd)
