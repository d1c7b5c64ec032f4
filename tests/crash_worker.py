"""Crash-safety worker: runs the real engine so that tests/test_crash_safety.py can SIGKILL it mid-way.

Two ways to run it:

    python tests/crash_worker.py run '<job json>'
        One prune, in this process, to completion (exit 0) or failure (exit 1).

    python tests/crash_worker.py serve
        A fork server: it imports the engine once, then reads one command per line on stdin:
          {"job": {...}}   fork a child that runs the job; answers "PID <pid>"
          {"reap": <pid>}  wait for that child; answers "EXIT <pid> <returncode>" (-9 when SIGKILLed)
        A child is never reaped before the test asks, so its pid cannot be reused while the test may still
        signal it. EOF on stdin ends the server. Forking keeps each round to a few milliseconds instead of
        the ~0.5 s a fresh interpreter needs to import the engine.

A job is a JSON object: root, state (the state directory), keep (rules), archive (path or null),
protect_best (bool, default true), hold_after_lock (bool: take the lock, say LOCKED, then wait forever).

Markers written to stdout, one line each, unbuffered: "LOCKED <pid>", "APPLY <pid>" (the plan is made and
removals start now), "OUTCOME <pid> <run> <checkpoint> <action>", "DONE <pid> <seconds> <errors>",
"ERROR <pid> <message>".
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ckptkeeper.engine import Outcome, Policy, Totals, apply_plan, finish_leftovers, make_plan
from ckptkeeper.policy import Protections
from ckptkeeper.rules import parse_rules
from ckptkeeper.state import StateDir


def emit(line: str) -> None:
    os.write(1, (line + "\n").encode())


def policy_for(job: dict[str, Any]) -> Policy:
    archive = job.get("archive")
    return Policy(
        parse_rules(job["keep"]),
        Protections(trainer_best=job.get("protect_best", True)),
        archive_to=Path(archive) if archive else None,
    )


def prune(job: dict[str, Any], say: bool = False) -> Totals:
    """What `ckptkeeper prune` does: lock, plan, finish leftovers, remove, unlock."""
    pid = os.getpid()
    root = Path(job["root"])
    state = StateDir(Path(job["state"]))
    policy = policy_for(job)
    state.acquire_lock(root)
    try:
        if say:
            emit(f"LOCKED {pid}")
        if job.get("hold_after_lock"):
            while True:
                signal.pause()
        result = make_plan(root, policy, state.path)
        if result.refusals:
            raise RuntimeError("; ".join(r.refusal or "" for r in result.refusals))
        finish_leftovers(root, state, [root / p.run.path for p in result.runs])
        if say:
            emit(f"APPLY {pid}")

        def report(o: Outcome) -> None:
            if say:
                emit(f"OUTCOME {pid} {o.run} {o.checkpoint} {o.action}")

        started = time.perf_counter()
        totals = apply_plan(root, result.runs, policy, state, report)
        if say:
            emit(f"DONE {pid} {time.perf_counter() - started:.6f} {len(totals.errors)}")
        return totals
    finally:
        state.release_lock()


def run_job(job: dict[str, Any]) -> int:
    try:
        totals = prune(job, say=True)
    except Exception as e:
        emit(f"ERROR {os.getpid()} {type(e).__name__}: {e} {traceback.format_exc()!r}")
        return 1
    return 1 if totals.errors else 0


def serve() -> None:
    # Pay for the lazy imports once, here, not in every child.
    import numpy  # noqa: F401
    import safetensors  # noqa: F401

    for line in sys.stdin:
        command = json.loads(line)
        if "job" in command:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = run_job(command["job"])
                finally:
                    os._exit(code)
            emit(f"PID {pid}")
        elif "reap" in command:
            _, status = os.waitpid(command["reap"], 0)
            emit(f"EXIT {command['reap']} {os.waitstatus_to_exitcode(status)}")


def main(argv: list[str]) -> int:
    if argv[1:2] == ["serve"]:
        serve()
        return 0
    if argv[1:2] == ["run"] and len(argv) == 3:
        return run_job(json.loads(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
