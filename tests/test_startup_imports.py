"""A guard on start-up time (issue #12: a command that does work starts within 0.15 s of `python -c pass`):
what `plan`, `prune` and `--help` import, and what `watch` has imported when it says its first line, in a new
process. Deterministic where a timing is not: each module
named here cost milliseconds at every start when something imported it by accident (benchmarks/bench_startup
measures the time itself)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ckptkeeper.simtrainer import SimConfig

# Run the command in-process, as the console script does, then list every module imported.
PROBE = """
import json, sys
from ckptkeeper.cli import entry
sys.argv = ["ckptkeeper", *json.loads(sys.argv[1])]
try:
    entry()
except SystemExit as e:
    code = e.code
else:
    code = 0
sys.stdout.flush()
sys.stderr.write("\\n" + json.dumps({"code": code, "modules": sorted(sys.modules)}) + "\\n")
"""

# Never imported by plan or prune of local paths without a config file:
NOT_FOR_WORK = {
    # pydantic (about 50 ms to import) validates only what config._quick_settings leaves to config_model; its
    # validator's build looks up plugins through importlib.metadata (about 20 ms with the email package).
    # pydantic_core's JSON parser is used, not pydantic.
    "pydantic",
    "ckptkeeper.config_model",
    "importlib.metadata",
    "email",
    # the YAML and TOML parsers: only for a config file or an environment value
    "yaml",
    "tomllib",
    # the daemon, the object store, pins' leases, history, the demo, progress bars, the simulated trainer
    "watchdog",
    "fsspec",
    "ckptkeeper.watch",
    "ckptkeeper.observers",
    "ckptkeeper.destination",
    "ckptkeeper.archives",
    "ckptkeeper.pinning",
    "ckptkeeper.history",
    "ckptkeeper.decision_log",
    "ckptkeeper.demo",
    "ckptkeeper.progress",
    "ckptkeeper.simtrainer",
    "concurrent.futures",
    "safetensors",
}
# --help and --version import none of those, and not pydantic nor the engine either.
NOT_FOR_HELP = NOT_FOR_WORK | {"pydantic", "pydantic_core", "ckptkeeper.config", "ckptkeeper.engine"}

# `watch` runs until stopped: run it in-process as the console script does, and list every module imported when
# its first line reaches stderr (what a user sees first, `watching ROOT (inotify; ...)`); the process ends there.
FIRST_LINE_PROBE = """
import json, os, sys

class FirstLine:
    def __init__(self, stream):
        self.stream = stream
    def write(self, text):
        self.stream.write(text)
        if "\\n" in text:
            self.stream.write("\\n" + json.dumps({"modules": sorted(sys.modules)}) + "\\n")
            self.stream.flush()
            os._exit(0)
        return len(text)
    def flush(self):
        self.stream.flush()
    def isatty(self):
        return False

sys.stderr = FirstLine(sys.stderr)
from ckptkeeper.cli import entry
sys.argv = ["ckptkeeper", *json.loads(sys.argv[1])]
entry()
"""
# Not imported by `watch` before its first line unless it serves metrics (--metrics-port): prometheus_client,
# with the HTTP server, URL, e-mail and TLS modules it imports (the metrics are made at the first pass), and
# what plan and prune do not import either, but for the daemon's own modules and watchdog.
NOT_BEFORE_WATCHING = (
    NOT_FOR_WORK
    - {"watchdog", "ckptkeeper.watch", "ckptkeeper.observers", "ckptkeeper.decision_log", "ckptkeeper.progress"}
) | {"prometheus_client", "http.server", "socketserver", "urllib.request", "ssl", "wsgiref"}


def among(modules: set[str], packages: set[str]) -> set[str]:
    """The modules that are one of `packages` or inside one."""
    return {m for m in modules if m in packages or m.startswith(tuple(p + "." for p in packages))}


def imported(*args: str | Path) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([str(a) for a in args])],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["code"] == 0, done.stdout + done.stderr
    modules = set(report["modules"])
    assert "ckptkeeper.cli" in modules
    return modules


def imported_at_first_line(*args: str | Path) -> tuple[str, set[str]]:
    """`ckptkeeper watch ARGS` in a new process: its first line, and the modules imported when it was said."""
    done = subprocess.run(
        [sys.executable, "-c", FIRST_LINE_PROBE, json.dumps(["watch", *(str(a) for a in args)])],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    lines = [line for line in done.stderr.splitlines() if line]
    assert done.returncode == 0 and len(lines) == 2, done.stdout + done.stderr
    modules = set(json.loads(lines[1])["modules"])
    assert "ckptkeeper.watch" in modules
    return lines[0], modules


@pytest.fixture
def root(sim_run: Callable[..., Path]) -> Path:
    run = sim_run("run", SimConfig(steps_per_epoch=10, epochs=2))
    return run.parent


@pytest.mark.parametrize(
    "args",
    [
        ["plan", "{root}", "--keep", "last:1"],
        ["plan", "{root}", "--keep", "best:1,last:2", "--json"],
        ["prune", "{root}", "--keep", "last:1"],
        ["prune", "{root}", "--keep", "last:1", "--dry-run"],
    ],
    ids=["plan", "plan-json", "prune", "prune-dry-run"],
)
def test_plan_and_prune_import_only_what_they_need(root: Path, args: list[str]) -> None:
    modules = imported(*(a.format(root=root) for a in args))
    assert {"ckptkeeper.engine", "ckptkeeper.config", "ckptkeeper.trainer_state"} <= modules  # it did work
    assert among(modules, NOT_FOR_WORK) == set()


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["plan", "--help"], ["prune", "--help"]])
def test_help_and_version_import_no_engine(args: list[str]) -> None:
    assert among(imported(*args), NOT_FOR_HELP) == set()


def test_a_flag_the_quick_path_leaves_to_the_model_still_works(root: Path) -> None:
    """--max-depth is validated by pydantic's model (imported on demand): the guard above is not vacuous."""
    modules = imported("plan", root, "--keep", "last:1", "--max-depth", "3")
    assert {"pydantic", "ckptkeeper.config_model", "pydantic.plugin._loader"} <= modules


@pytest.mark.parametrize(
    "args",
    [[], ["--poll", "1"], ["--log-format", "json"], ["--dry-run"], ["--metrics-host", "::1", "--grace", "5"]],
    ids=["inotify", "poll", "json-log", "dry-run", "watch-flags"],
)
def test_watch_says_its_first_line_before_importing_what_it_does_not_need_yet(root: Path, args: list[str]) -> None:
    line, modules = imported_at_first_line(root, "--keep", "last:1", *args)
    assert "watching" in line
    assert {"ckptkeeper.engine", "ckptkeeper.config", "watchdog.observers"} <= modules  # it did its work
    assert among(modules, NOT_BEFORE_WATCHING) == set()


def test_watch_serving_metrics_has_imported_them_by_its_first_line(root: Path) -> None:
    """With --metrics-port the first line says where they are served: the guard above sees such imports."""
    line, modules = imported_at_first_line(root, "--keep", "last:1", "--metrics-port", "0")
    assert "serving metrics on http://127.0.0.1:" in line
    assert {"prometheus_client", "http.server"} <= modules
