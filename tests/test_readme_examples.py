"""Every example in the README is what ckptkeeper prints: each block of commands (or of log lines) is run
again, as a user would, in the scenario its `<!-- example: NAME -->` comment names, and compared with the
README's text (see tests/readme_examples.py for how). A block that shows a command or a log without a tag
fails the test, so no example goes unchecked.

`README_EXAMPLES_OUT=DIR pytest tests/test_readme_examples.py` also writes what each block prints now to
DIR/<line>.txt, to update the README from.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from lmeval_fixture import copy_lmeval_fixture
from readme_examples import Block, Command, blocks, mismatch, readme
from s3util import S3Server, environment, start_threaded
from watchutil import TrainerThread, Watch

from ckptkeeper.simtrainer import SaveEvent, SimConfig, simulate_run

PROJECT = Path(__file__).resolve().parent.parent
README = readme(PROJECT)
BLOCKS, UNTAGGED = blocks(README)
Mount = Callable[..., Path]


@dataclass
class Sandbox:
    """Where one block's commands run (its `cwd`), and how its paths are shown in the README."""

    cwd: Path
    shown: list[tuple[str, str]] = field(default_factory=list)  # (actual, as shown), applied in order
    inputs: list[tuple[str, str]] = field(default_factory=list)  # (as written, actual) in command lines
    env: dict[str, str] = field(default_factory=dict)
    # runs a `watch` command (or, for a block of log lines, the watch that made them): returns its log
    watch: Callable[[Sandbox, list[str]], str] | None = None

    def show(self, text: str) -> str:
        for actual, shown in self.shown:
            text = text.replace(actual, shown)
        return text

    def command(self, line: str) -> tuple[list[str], dict[str, str]]:
        for written, actual in self.inputs:
            line = line.replace(written, actual)
        words = shlex.split(line)
        env = dict(self.env)
        while "=" in words[0] and words[0].split("=", 1)[0].isupper():
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        assert words[0] == "ckptkeeper", f"not a ckptkeeper command: {line}"
        return [sys.executable, "-m", "ckptkeeper", *words[1:]], env


def run(sandbox: Sandbox, argv: list[str], env: dict[str, str], timeout: float = 120) -> str:
    """The command's stdout and stderr as a terminal shows them (one stream, in order)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CKPTKEEPER_")}
    done = subprocess.run(
        argv,
        cwd=sandbox.cwd,
        env=environ | {"PYTHONUNBUFFERED": "1"} | env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.stdout


# ---- scenarios ------------------------------------------------------------------------------------------------
def shown_as_data(cwd: Path) -> Sandbox:
    """Runs under ./outputs, shown as /data/outputs; /mnt/archive is cwd/mnt/archive."""
    return Sandbox(
        cwd,
        shown=[(str(cwd / "mnt"), "/mnt"), (str(cwd), "/data")],
        inputs=[(" /mnt/", f" {cwd / 'mnt'}/")],
    )


def two_runs(cwd: Path, mount: Mount) -> Sandbox:
    simulate_run(cwd / "outputs/exp1", SimConfig(model_floats=100000))
    sweep = SimConfig(steps_per_epoch=20, epochs=2, eval_steps=20, model_floats=100000)
    simulate_run(cwd / "outputs/sweep/lr-1e-4", sweep)
    mount("tmpfs", "sandbox/mnt", "size=64m")  # the archive on another filesystem: a verified copy
    return shown_as_data(cwd)


def refusal_scope(cwd: Path, mount: Mount) -> Sandbox:
    simulate_run(cwd / "outputs/exp1", SimConfig(steps_per_epoch=10, epochs=3))
    no_eval = SimConfig(steps_per_epoch=10, epochs=3, eval_strategy="no", metric_for_best_model=None)
    simulate_run(cwd / "outputs/exp2", no_eval)
    return shown_as_data(cwd)


def refusal_three_runs(cwd: Path, mount: Mount) -> Sandbox:
    sandbox = refusal_scope(cwd, mount)
    simulate_run(cwd / "outputs/exp3", SimConfig(steps_per_epoch=10, epochs=3))
    return sandbox


KEEP_WEIGHTS_RUN = SimConfig(model_floats=100000, optimizer_bytes=800000, overfit_after=0.5)


def keep_weights(cwd: Path, mount: Mount) -> Sandbox:
    simulate_run(cwd / "outputs/exp1", KEEP_WEIGHTS_RUN)
    return shown_as_data(cwd)


def keep_weights_history(cwd: Path, mount: Mount) -> Sandbox:
    simulate_run(cwd / "outputs/exp1", KEEP_WEIGHTS_RUN)
    simulate_run(cwd / "outputs/exp2", KEEP_WEIGHTS_RUN)
    sandbox = shown_as_data(cwd)
    run(sandbox, *sandbox.command("ckptkeeper prune ./outputs --keep last:2 --keep-weights epoch:all"))
    return sandbox


def mixed_runs(cwd: Path, mount: Mount) -> Sandbox:
    """A reused output_dir: an old run's checkpoint-1000, written three days ago, beside a new run's 10 and 20."""
    old = cwd / "old"
    untracked = SimConfig(steps_per_epoch=1000, epochs=1, save_steps=1000, eval_steps=1000, metric_for_best_model=None)
    simulate_run(old, untracked)
    simulate_run(cwd / "outputs", SimConfig(steps_per_epoch=10, epochs=2, metric_for_best_model=None))
    (old / "checkpoint-1000").rename(cwd / "outputs/checkpoint-1000")
    back = time.time() - 3 * 86400
    for path in [cwd / "outputs/checkpoint-1000", *(cwd / "outputs/checkpoint-1000").rglob("*")]:
        os.utime(path, (back, back), follow_symlinks=False)
    shutil.rmtree(old)
    return shown_as_data(cwd)


def pressure(cwd: Path, mount: Mount) -> Sandbox:
    disk = mount("tmpfs", "sandbox/fs", "size=16m")
    run_config = SimConfig(steps_per_epoch=20, epochs=6, model_floats=100000, optimizer_bytes=800000, overfit_after=0.6)
    simulate_run(disk / "outputs/exp1", run_config)
    for checkpoint in (disk / "outputs/exp1").glob("checkpoint-*"):
        if int(checkpoint.name.removeprefix("checkpoint-")) > 90:
            shutil.rmtree(checkpoint)
    return Sandbox(disk, shown=[(str(disk), "/data")])


def stale(cwd: Path, mount: Mount) -> Sandbox:
    """A crash left checkpoint-40 without its trainer_state.json. File times cannot be set back past their
    change time, so the README's default threshold (1h) is 2 s here, set in the environment."""
    run_dir = cwd / "outputs/exp1"
    simulate_run(run_dir, SimConfig(steps_per_epoch=10, epochs=3))
    shutil.copytree(run_dir / "checkpoint-30", run_dir / "checkpoint-40", ignore=shutil.ignore_patterns("trainer_*"))
    time.sleep(2.5)
    sandbox = shown_as_data(cwd)
    sandbox.env["CKPTKEEPER_STALE_AFTER"] = "2s"
    return sandbox


def eval_metrics(cwd: Path, mount: Mount) -> Sandbox:
    """The real lm-evaluation-harness fixture in cwd (run/, evals/), its file times as the real run left them,
    except checkpoint-240: written just now, not evaluated yet. The copies of results files in checkpoint-80
    and -240 go: they record the sandbox's path, whose length would change the sizes shown."""
    lm = copy_lmeval_fixture(cwd)
    for name in ("__tmp__lmeval-out__run__checkpoint-240", "checkpoint-240"):
        shutil.rmtree(lm.evals / name)
    for step in (80, 240):
        (lm.run / f"checkpoint-{step}" / "eval_results.json").unlink()
    now = time.time()
    for path in (lm.run / "checkpoint-240").iterdir():
        os.utime(path, (now, now))
    return shown_as_data(cwd)


def pins(cwd: Path, mount: Mount) -> Sandbox:
    simulate_run(cwd / "outputs/exp1", SimConfig(steps_per_epoch=10, epochs=3))
    return shown_as_data(cwd)


def bad_config(cwd: Path, mount: Mount) -> Sandbox:
    (cwd / "bad.yaml").write_text("keep: [best:1, lastt:5]\nmax_depth: -1\n")
    return shown_as_data(cwd)


def nothing(cwd: Path, mount: Mount) -> Sandbox:
    return shown_as_data(cwd)


def demo(cwd: Path, mount: Mount) -> Sandbox:
    return Sandbox(cwd)


# ---- scenarios with a watch ------------------------------------------------------------------------------------
def watched_trainer(run_dir: Path, config: SimConfig, args: list[str], sandbox: Sandbox, step_line: str) -> str:
    """`ckptkeeper watch ARGS` beside a simulated Trainer writing `run_dir`, one save at a time: the Trainer
    waits after each save until the watch has logged `step_line` for it (so the log does not depend on how
    fast this machine is), then the watch is stopped."""
    log_path = sandbox.cwd.parent / f"watch-{time.monotonic_ns()}.log"
    watch = Watch(Path(args[0]), args[1:], log_path, cwd=sandbox.cwd)
    try:
        watch.wait_log("watching ", timeout=30)

        def saved(event: SaveEvent) -> None:
            watch.wait_log(step_line.format(step=event.step), timeout=30)

        trainer = TrainerThread(run_dir, config, on_save=saved)
        trainer.start()
        trainer.finish(timeout=120)
        time.sleep(1.5)  # what the last save lets go (a removal) is logged
        watch.proc.send_signal(signal.SIGINT)  # Ctrl-C
        watch.wait_exit(timeout=15)
        return watch.log()
    finally:
        watch.kill()


def watch_live(cwd: Path, mount: Mount) -> Sandbox:
    def drive(sandbox: Sandbox, args: list[str]) -> str:
        return watched_trainer(cwd / "outputs/exp1", SimConfig(), args, sandbox, "checkpoint-{step} kept")

    sandbox = shown_as_data(cwd)
    sandbox.watch = drive
    (cwd / "outputs").mkdir()
    return sandbox


def keep_weights_watch(cwd: Path, mount: Mount) -> Sandbox:
    def drive(sandbox: Sandbox, args: list[str]) -> str:
        args = [str(cwd / "outputs"), "--keep", "last:2", "--keep-weights", "epoch:all", "--settle", "0.2"]
        return watched_trainer(cwd / "outputs/exp1", KEEP_WEIGHTS_RUN, args, sandbox, "checkpoint-{step} kept")

    sandbox = shown_as_data(cwd)
    sandbox.watch = drive
    (cwd / "outputs").mkdir()
    return sandbox


def pressure_watch(cwd: Path, mount: Mount) -> Sandbox:
    """A run writing 804 kB checkpoints onto a 6 MiB filesystem: each save needs a release."""
    disk = mount("tmpfs", "sandbox/fs", "size=6m")
    config = SimConfig(steps_per_epoch=20, epochs=6, model_floats=100000, optimizer_bytes=400000)
    rules = ["--keep", "best:1,last:3,epoch:all", "--min-free", "2M", "--keep-under-pressure", "best:1,last:2"]

    def drive(sandbox: Sandbox, args: list[str]) -> str:
        args = [str(disk / "outputs"), *rules, "--settle", "0.2"]
        return watched_trainer(disk / "outputs/exp1", config, args, sandbox, "checkpoint-{step} kept")

    (disk / "outputs").mkdir()
    return Sandbox(disk, shown=[(str(disk), "/data")], watch=drive)


def standby(cwd: Path, mount: Mount) -> Sandbox:
    """Two sidecars on one shared volume (/outputs): the second waits for the first's lock."""
    root = cwd / "outputs"
    simulate_run(root, SimConfig(steps_per_epoch=10, epochs=1))

    def drive(sandbox: Sandbox, args: list[str]) -> str:
        first = Watch(root, ["--keep", "last:2"], cwd / "first.log", cwd=cwd)
        second: Watch | None = None
        try:
            first.wait_log("watching ", timeout=30)
            second = Watch(root, ["--keep", "last:2", "--standby"], cwd / "second.log", cwd=cwd)
            second.wait_log("waiting to take over", timeout=30)
            first.proc.send_signal(signal.SIGTERM)
            second.wait_log("taking over", timeout=30)
            second.proc.send_signal(signal.SIGTERM)
            second.wait_exit(timeout=15)
            sandbox.shown.insert(0, (f"pid {first.pid} on {socket.gethostname()}", "pid 7 on train-0"))
            return second.log()
        finally:
            first.kill()
            if second is not None:
                second.kill()

    return Sandbox(cwd, shown=[(str(root), "/outputs")], watch=drive)


S3_SERVERS: list[S3Server] = []  # moto's S3 servers the s3 scenario started, stopped at the end of the module


@pytest.fixture(scope="module", autouse=True)
def _stop_s3_servers() -> Iterator[None]:
    yield
    while S3_SERVERS:
        S3_SERVERS.pop().stop()


def s3_archive(cwd: Path, mount: Mount) -> Sandbox:
    """One run (checkpoint-10, 20, 30) and an empty bucket `my-bucket` on moto's S3 server; the AWS variables
    (endpoint, credentials) point at it, as they would at any S3-compatible store."""
    pytest.importorskip("s3fs")
    server = start_threaded()
    S3_SERVERS.append(server)
    server.client().create_bucket(Bucket="my-bucket")
    simulate_run(cwd / "outputs/exp1", SimConfig(steps_per_epoch=10, epochs=3, model_floats=100000))
    return Sandbox(cwd, shown=[(str(cwd), "/data")], env=environment(server.endpoint))


SCENARIOS: dict[str, Callable[[Path, Mount], Sandbox]] = {
    "s3-archive": s3_archive,
    "pressure-watch": pressure_watch,
    "standby": standby,
    "two-runs": two_runs,
    "refusal-scope": refusal_scope,
    "refusal-three-runs": refusal_three_runs,
    "keep-weights": keep_weights,
    "keep-weights-watch": keep_weights_watch,
    "keep-weights-history": keep_weights_history,
    "mixed-runs": mixed_runs,
    "pressure": pressure,
    "bad-config": bad_config,
    "eval-metrics": eval_metrics,
    "stale": stale,
    "pins": pins,
    "nothing": nothing,
    "demo": demo,
    "watch-live": watch_live,
}


# ---- the tests -------------------------------------------------------------------------------------------------
def test_every_example_block_names_its_scenario() -> None:
    assert not UNTAGGED, (
        "README.md blocks that show a command or a log but no `<!-- example: NAME -->` above them (so nothing "
        f"checks them), at lines {UNTAGGED}"
    )
    unknown = [b.where for b in BLOCKS if b.name not in SCENARIOS]
    assert not unknown, f"examples naming no scenario of this test: {unknown}"
    assert len(BLOCKS) >= 15, "the README lost its examples?"


@pytest.fixture
def sandbox_dir(tmp_path: Path) -> Iterator[Path]:
    cwd = tmp_path / "sandbox"
    cwd.mkdir()
    yield cwd


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b.start}-{b.name}" for b in BLOCKS])
def test_the_readme_example_is_what_ckptkeeper_prints(block: Block, sandbox_dir: Path, mount: Mount) -> None:
    sandbox = SCENARIOS[block.name](sandbox_dir, mount)
    printed: list[str] = []
    problems: list[str] = []
    if block.log:  # a block of log lines: what the scenario's watch logs
        assert sandbox.watch is not None, f"{block.where}: a log block needs a scenario with a watch"
        text = sandbox.show(sandbox.watch(sandbox, []))
        printed.append(text)
        problems.append(_problem(block.log, text, excerpt=True, what="its log"))
    for command in block.commands:
        text = sandbox.show(_run_command(sandbox, command))
        printed.append(f"$ {command.line}\n{text}")
        excerpt = "log" in block.flags or (command.line.split()[1:2] == ["watch"] and "single" not in block.flags)
        problems.append(_problem(command.expected, text, excerpt, f"`{command.line}`"))
    _save(block, printed)
    found = [p for p in problems if p]
    assert not found, f"{block.where} shows something else than ckptkeeper prints now:\n" + "\n\n".join(found)


def _run_command(sandbox: Sandbox, command: Command) -> str:
    argv, env = sandbox.command(command.line)
    if argv[3] == "watch" and sandbox.watch is not None:
        return sandbox.watch(sandbox, argv[4:])
    return run(sandbox, argv, env)


def _problem(expected: tuple[str, ...], text: str, excerpt: bool, what: str) -> str:
    problem = mismatch(expected, text.splitlines(), excerpt)
    return "" if problem is None else f"{what}:\n{problem}"


def _save(block: Block, printed: list[str]) -> None:
    out = os.environ.get("README_EXAMPLES_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{block.start:04d}-{block.name}.txt").write_text("\n".join(printed))


def test_blocks_are_found_and_matched_as_documented() -> None:
    """The matcher itself: `...` lines and excerpts; a changed line fails."""
    text = "$ ckptkeeper plan x\na\n...\nd\n"
    [block], untagged = blocks(f"<!-- example: nothing -->\n```\n{text}```\n\n```\n$ ckptkeeper prune x\n```\n")
    assert untagged == [9]
    [command] = block.commands
    assert mismatch(command.expected, ["a", "b", "c", "d"], excerpt=False) is None
    assert mismatch(command.expected, ["a", "d"], excerpt=False) is None
    assert mismatch(command.expected, ["a", "b", "D"], excerpt=False) is not None
    assert mismatch(["x", "y"], ["x", "z", "y"], excerpt=True) is None
    assert mismatch(["y", "x"], ["x", "z", "y"], excerpt=True) is not None
    assert mismatch(["2026-01-01 00:00:00 INFO a"], ["2031-05-06 07:08:09 INFO a"], excerpt=False) is None
