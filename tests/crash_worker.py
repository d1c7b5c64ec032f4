"""Crash-safety worker: runs the real engine, or the real `ckptkeeper watch`, so that tests/test_crash_safety.py
can SIGKILL it mid-way.

Two ways to run it:

    python tests/crash_worker.py run '<job json>'
        One job, in this process, to completion (exit 0) or failure (exit 1).

    python tests/crash_worker.py serve
        A fork server: it imports the engine, the command line and the daemon once, then reads one command
        per line on stdin:
          {"job": {...}}   fork a child that runs the job; answers "PID <pid>"
          {"reap": <pid>}  wait for that child; answers "EXIT <pid> <returncode>" (-9 when SIGKILLed)
        A child is never reaped before the test asks, so its pid cannot be reused while the test may still
        signal it. EOF on stdin ends the server. Forking keeps each round to a few milliseconds instead of
        the ~0.5-1 s a fresh interpreter needs to import the engine (or the daemon, watchdog and pydantic).

A job is a JSON object: root, state (the state directory), keep (rules), keep_weights (rules, default none:
what they alone keep is made weights-only), archive (path, object store URL or null), env (variables set in the
child first: the AWS endpoint and credentials of an object store), protect_best (bool, default true), and
- kind "prune" (default): what `ckptkeeper prune` does, through the engine's Pipeline (lock, plan, finish
  leftovers, act); hold_after_lock (bool: take the lock, say LOCKED, then wait forever);
- kind "watch": the `ckptkeeper watch` command itself (click entry point, settings, the Daemon with its
  inotify observer and reaper thread), with --settle 0 (a round's hard links are seconds old: their ctime
  is fresh), --log-format json and, with exit_when_done, --exit-when-done; its log lines go to `log` (a file)
  and are turned into the markers below. CKPTKEEPER_* variables of the test run are not passed on: they
  are not ckptkeeper settings, and `watch` refuses unknown ones.

Markers written to stdout, one line each, unbuffered: "LOCKED <pid>", "APPLY <pid>" (the plan is made and
removals start now; watch: the daemon logged "watching", its initial reconcile starts now),
"OUTCOME <pid> <run> <checkpoint> <action>" (the journal's word: delete, archive, slim, error...),
"DONE <pid> <seconds from APPLY to the last outcome> <errors>" (watch: when it exits with --exit-when-done;
errors = log lines at level error), "ERROR <pid> <message>".
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ckptkeeper.engine import PassResult, Pipeline, finish_leftovers
from ckptkeeper.model import Action, Outcome
from ckptkeeper.policy import Policy, Protections
from ckptkeeper.rules import parse_rules


def emit(line: str) -> None:
    os.write(1, (line + "\n").encode())


def policy_for(job: dict[str, Any]) -> Policy:
    return Policy(
        parse_rules(job["keep"]),
        Protections(trainer_best=job.get("protect_best", True)),
        Action.ARCHIVE if job.get("archive") else Action.DELETE,
        weight_rules=parse_rules(job.get("keep_weights") or ""),
    )


def pipeline_for(job: dict[str, Any]) -> Pipeline:
    archive = job.get("archive")
    target = archive if archive and "://" in archive else Path(archive) if archive else None  # a URL: object store
    return Pipeline.checked(Path(job["root"]), policy_for(job), state_dir=Path(job["state"]), archive_to=target)


def prune(job: dict[str, Any], say: bool = False) -> PassResult:
    """What `ckptkeeper prune` does: lock, plan, finish leftovers, remove, unlock."""
    pid = os.getpid()
    pipeline = pipeline_for(job)
    root, state = pipeline.root, pipeline.state
    pipeline.acquire()
    try:
        if say:
            emit(f"LOCKED {pid}")
        if job.get("hold_after_lock"):
            while True:
                signal.pause()
        result = pipeline.survey(None)
        if result.plan.refusals:
            raise RuntimeError("; ".join(r.refusal or "" for r in result.plan.refusals))
        finish_leftovers(root, state, [root / p.run.path for p in result.plan.runs])
        if say:
            emit(f"APPLY {pid}")

        def report(o: Outcome) -> None:
            if say:
                emit(f"OUTCOME {pid} {o.run} {o.checkpoint} {o.action}")

        started = time.perf_counter()
        totals = PassResult(result.plan, pipeline.act(result.plan, report))
        if say:
            emit(f"DONE {pid} {time.perf_counter() - started:.6f} {len(totals.errors)}")
        return totals
    finally:
        state.close()  # the lock and the state directory's descriptors, as `Pipeline.prune` lets go of them


# ---------------------------------------------------------------------------------------------- ckptkeeper watch
def watch_args(job: dict[str, Any]) -> list[str]:
    args = ["watch", job["root"], "--keep", job["keep"], "--state-dir", job["state"]]
    if job.get("keep_weights"):
        args += ["--keep-weights", job["keep_weights"]]
    args += ["--settle", "0", "--rescan-interval", "3600", "--log-format", "json"]
    if job.get("archive"):
        args += ["--archive-to", job["archive"]]
    if not job.get("protect_best", True):
        args.append("--no-protect-trainer-best")
    if job.get("exit_when_done"):
        args.append("--exit-when-done")
    return args


class DaemonLog(io.TextIOBase):
    """Stands in for the daemon's stderr: keeps every log line in a file and turns the lines that mark
    the steps of a reconcile into markers (the messages of ckptkeeper/watch.py)."""

    def __init__(self, path: str) -> None:
        self.pid = os.getpid()
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as this child
        self.buffer = ""
        self.applied_at: float | None = None
        self.last_outcome: float | None = None
        self.error_lines = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.file.write(text)
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        try:
            entry = json.loads(line)
            message, level = str(entry["message"]), str(entry["level"])
        except (ValueError, KeyError, TypeError):
            return  # not a log line (a traceback's continuation is in the file)
        if level in ("error", "critical"):
            self.error_lines += 1
        if message.startswith("watching ") and self.applied_at is None:
            self.applied_at = time.perf_counter()
            emit(f"APPLY {self.pid}")
            return
        for marker, action in (
            (" deleted: freed ", "delete"),
            (" archived: ", "archive"),
            (" made weights only: ", "slim"),
            (" could not be removed: ", "error"),
        ):
            where, found, _ = message.partition(marker)
            if found:
                run, _, checkpoint = where.rpartition("/")
                self.last_outcome = time.perf_counter()
                emit(f"OUTCOME {self.pid} {run or '.'} {checkpoint} {action}")
                return
        if message.startswith("every run has finished training and is pruned"):
            started = self.applied_at if self.applied_at is not None else time.perf_counter()
            ended = self.last_outcome if self.last_outcome is not None else started
            emit(f"DONE {self.pid} {ended - started:.6f} {self.error_lines}")


def watch(job: dict[str, Any]) -> int:
    """`ckptkeeper watch ...` as the console script runs it; returns its exit code."""
    from ckptkeeper import cli

    for var in [v for v in os.environ if v.startswith("CKPTKEEPER_")]:
        del os.environ[var]
    log = DaemonLog(job["log"])
    sys.stderr = log
    try:
        cli.main(watch_args(job), prog_name="ckptkeeper")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        log.flush()
    return 0


def run_job(job: dict[str, Any]) -> int:
    os.environ.update(job.get("env", {}))  # an object store's endpoint and credentials (the AWS variables)
    try:
        if job.get("kind", "prune") == "watch":
            return watch(job)
        totals = prune(job, say=True)
    except Exception as e:
        emit(f"ERROR {os.getpid()} {type(e).__name__}: {e} {traceback.format_exc()!r}")
        return 1
    return 1 if totals.errors else 0


def serve() -> None:
    # Pay for the imports once, here, not in every child: the lazy ones of the engine, and everything
    # `ckptkeeper watch` imports when it runs (the daemon, watchdog, pydantic settings, prometheus).
    import numpy  # noqa: F401
    import safetensors  # noqa: F401

    import ckptkeeper.cli
    import ckptkeeper.config
    import ckptkeeper.logs
    import ckptkeeper.watch  # noqa: F401

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
