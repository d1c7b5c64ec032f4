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
def mounted(target: Path, *options: str) -> Iterator[Path]:
    """`mount OPTIONS... TARGET` (root), undone at the end; the test is skipped where it cannot mount."""
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"mount {' '.join(options)} failed: {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def bind_mount(source: Path, target: Path) -> contextlib.AbstractContextManager[Path]:
    """`mount --bind SOURCE TARGET` (root), undone at the end; the test is skipped where it cannot mount."""
    return mounted(target, "--bind", str(source))


def per_removal(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Journal lines with each removal's own lines together, at the place of its start line: a `start-*` line
    opens a removal of its (run, checkpoint), its later lines join it; lines of no checkpoint stay where they
    are. `prune` deletes a trash entry while it renames the next checkpoint, so another removal's start line
    may come between a start and its outcome: so read, the journal is start, outcome, start, outcome... in plan
    order, as when removals ran one after another (`history` pairs lines the same way)."""
    slots: list[list[dict[str, Any]]] = []
    removal: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for line in lines:
        key = (str(line.get("run")), str(line.get("checkpoint")))
        if "checkpoint" in line and key in removal and not str(line.get("action", "")).startswith("start-"):
            removal[key].append(line)
            continue
        slots.append([line])
        if "checkpoint" in line:
            removal[key] = slots[-1]
    return [line for slot in slots for line in slot]
