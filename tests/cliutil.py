"""Helpers for tests that run ckptkeeper as a user does: the command as a process, and bind mounts."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def ckptkeeper(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m ckptkeeper ARGS...` as a process, no stdin, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "ckptkeeper", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def plan_json(*args: str | Path) -> dict[str, Any]:
    """`ckptkeeper plan ARGS... --json`, which must succeed, as the document it prints."""
    result = ckptkeeper("plan", *args, "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


@contextlib.contextmanager
def bind_mount(source: Path, target: Path) -> Iterator[Path]:
    """`mount --bind SOURCE TARGET` (root), undone at the end; the test is skipped where it cannot mount."""
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"mount --bind failed: {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)
