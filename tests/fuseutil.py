"""A FUSE filesystem of a test's own (a script built on loopfs.Passthrough), run in a process of its own and
mounted for the test; skipped where FUSE cannot be used (no mfusepy or libfuse, not root, no /dev/fuse)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def fuse_mounted(mount_point: Path, script: Path, *args: str) -> Iterator[Path]:
    """`python SCRIPT ARGS...` (which mounts itself on `mount_point`), until it is mounted; unmounted after."""
    try:
        import mfusepy  # type: ignore[import-untyped]  # noqa: F401  (the test extra; it loads libfuse)
    except (ImportError, OSError) as e:
        pytest.skip(f"needs mfusepy and libfuse: {e}")
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    mount_point.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(script), *args])
    try:
        deadline = time.monotonic() + 15
        while not os.path.ismount(mount_point) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not os.path.ismount(mount_point):
            pytest.skip("cannot mount FUSE")
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        proc.kill()
        proc.wait()
