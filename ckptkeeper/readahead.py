"""Read-ahead hints for a first look at many checkpoints (issue #12, `plan` with the page cache dropped).

A one-shot scan reads each checkpoint's `trainer_state.json` and the head of its safetensors file, then parses
them: one file after the other, the disk idles while the CPU parses and the CPU idles while the disk reads.
`Readahead` asks the kernel (`posix_fadvise(WILLNEED)`) to start reading those files a few checkpoints ahead
of the one being read, so both work at once. A hint only: nothing read here is used (the scan still reads
every file itself, as before), only a regular file is opened (`regular.open_regular`: never a FIFO or device,
never through a link, the checkpoint directory included), and any error is ignored. Owned by the thread that
runs one scan of one run directory."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ckptkeeper.regular import open_regular
from ckptkeeper.trainer_state import TRAINER_STATE

DEPTH = 8  # checkpoints hinted ahead of the one being read (benchmarks/bench_plan.py: 8 and 32 did as well)
# (file name, bytes from its start to hint; 0: the whole file). Sharded weights are not hinted: their names
# are only known after a listing, which is the scan's.
HINTED = ((TRAINER_STATE, 0), ("model.safetensors", 1 << 16))
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def hint_checkpoint(directory: str) -> None:
    """Ask the kernel to read ahead the files of the checkpoint directory a first look reads."""
    try:
        dir_fd = os.open(directory, _DIR_FLAGS)  # a checkpoint swapped for a link since the listing: not followed
    except OSError:
        return
    try:
        for name, length in HINTED:
            _hint_file(dir_fd, name, length)
    finally:
        os.close(dir_fd)


def _hint_file(dir_fd: int, name: str, length: int) -> None:
    try:
        fd = open_regular(name, dir_fd)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, length, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


class Readahead:
    """Hints `directories` (in the order they will be read; None where one will not be read: a memo knows it)
    `DEPTH` ahead of the one being read."""

    def __init__(self, directories: Sequence[str | None], depth: int = DEPTH) -> None:
        self._directories = directories
        self._depth = depth
        self._hinted = 0  # directories[:_hinted] have been hinted

    def reading(self, index: int) -> None:
        """directories[index] is about to be read: hint it (if not yet) and the next `DEPTH - 1`."""
        until = min(index + self._depth, len(self._directories))
        while self._hinted < until:
            directory = self._directories[self._hinted]
            if directory is not None:
                hint_checkpoint(directory)
            self._hinted += 1
