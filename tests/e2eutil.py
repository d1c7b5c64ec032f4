"""Helpers shared by the end-to-end tests that run a real Hugging Face Trainer beside ckptkeeper."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

TRAIN_SCRIPT = Path(__file__).parent / "e2e" / "train_hf.py"
TRAINING_STACK = ("torch", "transformers", "accelerate")
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def require_training_stack() -> None:
    missing = [name for name in TRAINING_STACK if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(
            f"the end-to-end tests need {', '.join(missing)} in {sys.executable}: `.ci/run` must install the "
            "e2e extra (pip install '.[test,e2e]': torch==2.13.0, transformers==5.24.0, accelerate). "
            "They are never skipped.",
            pytrace=False,
        )


def wait_for(condition: Callable[[], bool], seconds: float, what: str, context: Callable[[], str]) -> None:
    """Poll `condition` until it holds; fail with `what` and the context after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {seconds:g} s\n{context()}", pytrace=False)
        time.sleep(0.02)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End a process this test started, if it is still running."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path.name} was not written)"
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def json_lines(path: Path) -> list[dict[str, Any]]:
    """A JSON-lines file (a daemon log, a journal); a line that is not JSON is kept as {"unparsed": line}."""
    if not path.exists():
        return []
    entries: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            try:
                entries.append(json.loads(line))
            except ValueError:
                entries.append({"unparsed": line})
    return entries


def checkpoints_on_disk(run_dir: Path) -> set[int]:
    return {int(m.group(1)) for e in os.listdir(run_dir) if (m := CHECKPOINT.fullmatch(e)) and (run_dir / e).is_dir()}


def file_listing(checkpoint: Path) -> dict[str, list[int]]:
    """Every file below `checkpoint` -> [size, mtime_ns], as the training script records it after a save."""
    listing: dict[str, list[int]] = {}
    for dirpath, _dirs, files in os.walk(checkpoint):
        for name in files:
            path = Path(dirpath) / name
            st = path.lstat()
            listing[str(path.relative_to(checkpoint))] = [st.st_size, st.st_mtime_ns]
    return listing
