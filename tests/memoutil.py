"""What the scan memo's and the read-ahead's tests share: one simulated run, settled past the window in which
a lstat signature cannot vouch for a look (so that a `prune` writes it down); and the page cache's residency
of a file, asked of the kernel (mincore), with a way to evict one (skipped where files cannot be evicted)."""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path

import pytest

from ckptkeeper.scan import TIMESTAMP_TICK
from ckptkeeper.simtrainer import SimConfig, simulate_run

CONFIG = SimConfig(steps_per_epoch=10, epochs=3, save_steps=5, eval_steps=5)  # checkpoints 5 .. 30


def settled() -> None:
    time.sleep(TIMESTAMP_TICK + 0.15)  # past the window in which a signature cannot vouch


def settled_outputs(tmp_path: Path) -> Path:
    """tmp_path/outputs holding the run `exp` of CONFIG, settled."""
    top = tmp_path / "outputs"
    simulate_run(top / "exp", CONFIG)
    settled()
    return top


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache now."""
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    with path.open("rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        start = ctypes.c_char.from_buffer(mapped)
        try:
            if _LIBC.mincore(ctypes.addressof(start), size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del start  # the mapping cannot close while a pointer into it exists
    return sum(v & 1 for v in vector)


def evict(*paths: Path) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if any(resident_pages(p) for p in paths):
        pytest.skip("this filesystem keeps its files in memory (tmpfs?): nothing to read ahead")
