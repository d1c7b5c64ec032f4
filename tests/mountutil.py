"""A size-limited tmpfs of a test's own, for as long as the test needs it (root only: it skips elsewhere)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def own_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's form: "2m", "4g") mounted at `where`, made here, for the block."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "ckptkeeper-test", str(where)], check=False)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
