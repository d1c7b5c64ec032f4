"""Issue #15, the operator's view, through the real command (a process, as a person runs it): removal lines
that say why, counts in the singular, an archive on the same filesystem that says it frees nothing, the root's
own run named by its directory, stale incomplete checkpoints reported, `prune --json`, and colour on a
terminal only. The daemon's log lines are in tests/test_operator_view_watch.py."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from cliutil import ckptkeeper
from watchutil import steps, wait_until

from ckptkeeper.simtrainer import SimConfig, simulate_run

# The README's two runs (its "Commands" section): 8 checkpoints in exp1, 4 in sweep/lr-1e-4.
README_EXP1 = SimConfig(model_floats=100000)
README_SWEEP = SimConfig(steps_per_epoch=20, epochs=2, eval_steps=20, model_floats=100000)
README_KEEP = "best:1,last:2,epoch:all"
# checkpoints 10, 20, 30 (13.4, 13.9, 14.5 kB); the eval loss turns up, so checkpoint-10 is the Trainer's best
THREE = SimConfig(steps_per_epoch=10, epochs=3, overfit_after=0.5)
# checkpoints 10, 20, 30 with no Trainer best: `last:1` removes two
NO_BEST = SimConfig(steps_per_epoch=10, epochs=3, metric_for_best_model=None)
ONE = SimConfig(steps_per_epoch=10, epochs=1)  # checkpoint-10 alone
ANSI = re.compile(r"\x1b\[[0-9;]*m")
PAINTED = re.compile(r"\x1b\[[0-9;]*m[^\x1b]*\x1b\[0m")
GREEN, RED, YELLOW, CYAN, RESET = "\x1b[32m", "\x1b[31m", "\x1b[33m", "\x1b[36m", "\x1b[0m"
RESUME = " A resume starts from the highest step, complete or not (get_last_checkpoint), and would fail here;"
NEVER = " move it aside or remove it yourself (ckptkeeper never removes an incomplete checkpoint)"
STALE_40 = f"checkpoint-40 is incomplete (no trainer_state.json) and unchanged for Ns: left by a crash?{RESUME}{NEVER}"


def cli(
    *args: str | Path, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m ckptkeeper ARGS...` with variables added to the environment (cliutil.ckptkeeper has none)."""
    return subprocess.run(
        [sys.executable, "-m", "ckptkeeper", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        check=False,
    )


def ok(done: subprocess.CompletedProcess[str], code: int = 0) -> str:
    assert done.returncode == code, f"exit {done.returncode}, expected {code}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def simulate(tmp_path: Path, run: str, config: SimConfig) -> Path:
    """A simulated run at tmp_path/RUN, written by its relative path as the README's recipes do: the Trainer's
    best_model_checkpoint (in trainer_state.json) then has the same length whatever tmp_path is, and so have
    the sizes printed."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(tmp_path):
        simulate_run(Path(run), config)
    return tmp_path / run


def readme_root(tmp_path: Path) -> Path:
    simulate(tmp_path, "outputs/exp1", README_EXP1)
    simulate(tmp_path, "outputs/sweep/lr-1e-4", README_SWEEP)
    return tmp_path / "outputs"


def policy_line(keep: str, what: str = "delete the rest") -> str:
    return f"Policy: {keep}; always keep the newest, incomplete ones, the Trainer's best; {what}"


README_POLICY = policy_line(
    "keep the best 1 by eval_loss (lowest), the last 2, one per epoch (best:1,last:2,epoch:all)"
)
LAST_1 = policy_line("keep the last 1 (last:1)")


# ---- 1. removal lines carry their reasons ---------------------------------------------------------------------
def test_prune_and_its_dry_run_say_why_each_checkpoint_goes(tmp_path: Path) -> None:
    root = readme_root(tmp_path)
    removed = [
        ("exp1/checkpoint-10", "405.5 kB"),
        ("exp1/checkpoint-30", "406.6 kB"),
        ("exp1/checkpoint-40", "407.2 kB"),
        ("exp1/checkpoint-60", "408.4 kB"),
        ("sweep/lr-1e-4/checkpoint-10", "405.1 kB"),
    ]
    head = [README_POLICY, f"Root: {root}"]
    dry = ok(ckptkeeper("prune", root, "--keep", README_KEEP, "--dry-run"))
    assert dry.splitlines() == [
        *head,
        *(f"would delete  {where}  {size}  no rule keeps it" for where, size in removed),
        "Dry run: would remove 5 checkpoints and free 2.0 MB; nothing was changed. Kept 7.",
    ]
    done = ok(ckptkeeper("prune", root, "--keep", README_KEEP))
    assert done.splitlines() == [
        *head,
        *(f"deleted       {where}  {size}  no rule keeps it" for where, size in removed),
        "Done: removed 5 checkpoints, freed 2.0 MB. Kept 7.",
    ]
    assert steps(root / "exp1") == [20, 50, 70, 78] and steps(root / "sweep" / "lr-1e-4") == [20, 30, 40]


def test_a_checkpoint_made_weights_only_says_which_rule_and_what_was_removed(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate(tmp_path, "outputs/exp1", THREE)
    args = ("prune", root, "--keep", "last:1", "--keep-weights", "epoch:all")
    policy = policy_line("keep the last 1 (last:1); keep the weights only of one per epoch (epoch:all)")
    assert ok(ckptkeeper(*args, "--dry-run")).splitlines() == [
        policy,
        f"Root: {root}",
        "would slim    exp1/checkpoint-20  3.3 kB  epoch 2 (weights only)",
        "Dry run: would remove 0 checkpoints, make 1 weights only and free 3.3 kB; nothing was changed. Kept 3.",
    ]
    assert ok(ckptkeeper(*args)).splitlines() == [
        policy,
        f"Root: {root}",
        "weights only  exp1/checkpoint-20  3.3 kB  epoch 2 (weights only)  "
        "(removed optimizer.pt, rng_state.pth, scheduler.pt)",
        "Done: removed 0 checkpoints, made 1 weights only, freed 3.3 kB. Kept 3.",
    ]


# ---- 2. one checkpoint, one run -------------------------------------------------------------------------------
def test_counts_of_one_are_in_the_singular(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate(tmp_path, "outputs/exp1", THREE)
    simulate(tmp_path, "outputs/solo", ONE)
    plan = ok(ckptkeeper("plan", root, "--keep", "last:1")).splitlines()
    assert "run exp1  (3 checkpoints)" in plan and "run solo  (1 checkpoint)" in plan, plan
    assert plan[-1] == "Summary: 4 checkpoints in 2 runs: keep 3 (41.3 kB), remove 1 (13.9 kB to free)"
    assert ok(ckptkeeper("prune", root, "--keep", "last:1", "-n")).splitlines()[-1] == (
        "Dry run: would remove 1 checkpoint and free 13.9 kB; nothing was changed. Kept 3."
    )
    assert ok(ckptkeeper("prune", root, "--keep", "last:1")).splitlines()[-2:] == [
        "deleted       exp1/checkpoint-20  13.9 kB  no rule keeps it",
        "Done: removed 1 checkpoint, freed 13.9 kB. Kept 3.",
    ]
    solo = ok(ckptkeeper("plan", root / "solo", "--keep", "last:1")).splitlines()
    assert solo[3] == "run solo  (1 checkpoint)"
    assert solo[-1] == "Summary: 1 checkpoint in 1 run: keep 1 (13.4 kB), remove 0 (0 B to free)"
    history = ok(ckptkeeper("history", root)).splitlines()
    assert history[-2:] == [
        "  exp1: 1 checkpoint removed; 13.9 kB freed",
        "  all (1 run): 1 checkpoint removed; 13.9 kB freed",
    ]


# ---- 3. an archive on the same filesystem moves, on another frees ----------------------------------------------
SAME_FS = "to the archive on the same filesystem, which frees no space"


def test_an_archive_on_the_same_filesystem_says_moved_and_frees_nothing(tmp_path: Path) -> None:
    root, archive = tmp_path / "outputs", tmp_path / "archive"
    simulate(tmp_path, "outputs/exp1", NO_BEST)
    args = ("prune", root, "--keep", "last:1", "--archive-to", archive)
    head = [policy_line("keep the last 1 (last:1)", f"archive to {archive} the rest"), f"Root: {root}"]
    assert ok(ckptkeeper(*args, "--dry-run")).splitlines() == [
        *head,
        "would archive exp1/checkpoint-10  13.4 kB  no rule keeps it",
        "would archive exp1/checkpoint-20  13.9 kB  no rule keeps it",
        f"Dry run: would remove 2 checkpoints; would move 2 checkpoints (27.3 kB) {SAME_FS}; nothing was changed. "
        "Kept 1.",
    ]
    assert ok(ckptkeeper(*args)).splitlines() == [
        *head,
        f"archived      exp1/checkpoint-10  13.4 kB  no rule keeps it  (moved to {archive}/exp1/checkpoint-10)",
        f"archived      exp1/checkpoint-20  13.9 kB  no rule keeps it  (moved to {archive}/exp1/checkpoint-20)",
        f"Done: removed 2 checkpoints; moved 2 checkpoints (27.3 kB) {SAME_FS}. Kept 1.",
    ]
    assert steps(archive / "exp1") == [10, 20] and steps(root / "exp1") == [30]
    history = ok(ckptkeeper("history", root))
    rows = [re.split(r" {2,}", line.strip()) for line in history.splitlines() if "exp1  checkpoint-" in line]
    assert [(r[2], r[4]) for r in rows] == [("checkpoint-10", "-"), ("checkpoint-20", "-")], history
    assert history.splitlines()[-1] == "  all (1 run): 2 checkpoints removed (0 deleted, 2 archived); 0 B freed"
    as_json = json.loads(ok(ckptkeeper("history", root, "--json")))
    assert [e["bytes_freed"] for e in as_json["events"]] == [0, 0] and as_json["total"]["bytes_freed"] == 0


def test_an_archive_on_another_filesystem_says_copied_and_freed(tmp_path: Path, mount: Callable[..., Path]) -> None:
    root, archive = tmp_path / "outputs", mount("tmpfs", "archive-fs", "size=64m") / "archive"
    simulate(tmp_path, "outputs/exp1", NO_BEST)
    args = ("prune", root, "--keep", "last:1", "--archive-to", archive)
    head = [policy_line("keep the last 1 (last:1)", f"archive to {archive} the rest"), f"Root: {root}"]
    assert ok(ckptkeeper(*args, "-n")).splitlines()[-1] == (
        "Dry run: would remove 2 checkpoints and free 27.3 kB; nothing was changed. Kept 1."
    )
    assert ok(ckptkeeper(*args)).splitlines() == [
        *head,
        f"archived      exp1/checkpoint-10  13.4 kB  no rule keeps it  (copied to {archive}/exp1/checkpoint-10)",
        f"archived      exp1/checkpoint-20  13.9 kB  no rule keeps it  (copied to {archive}/exp1/checkpoint-20)",
        "Done: removed 2 checkpoints, freed 27.3 kB. Kept 1.",
    ]
    history = ok(ckptkeeper("history", root))
    assert history.splitlines()[-1] == "  all (1 run): 2 checkpoints removed (0 deleted, 2 archived); 27.3 kB freed"


# ---- 4. the root's own run is named by the root directory's name ---------------------------------------------
def test_a_root_that_is_itself_a_run_is_named_by_its_directory(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate(tmp_path, "outputs", THREE)
    plan = ok(ckptkeeper("plan", root, "--keep", "last:1")).splitlines()
    assert plan[3] == "run outputs  (3 checkpoints)", plan
    assert ok(cli("plan", ".", "--keep", "last:1", cwd=root)).splitlines()[3] == "run outputs  (3 checkpoints)"
    assert [r["run"] for r in json.loads(ok(ckptkeeper("plan", root, "--keep", "last:1", "--json")))["runs"]] == ["."]
    assert ok(ckptkeeper("prune", root, "--keep", "last:1", "-n")).splitlines()[2] == (
        "would delete  outputs/checkpoint-20  13.9 kB  no rule keeps it"
    )
    pruned = json.loads(ok(ckptkeeper("prune", root, "--keep", "last:1", "--json")))
    assert [(a["run"], a["checkpoint"]) for a in pruned["actions"]] == [(".", "checkpoint-20")]
    for run in ("outputs", "."):
        history = ok(ckptkeeper("history", root, "--run", run)).splitlines()
        row = re.split(r" {2,}", next(line for line in history if "checkpoint-20" in line).strip())
        assert row[1:5] == ["outputs", "checkpoint-20", "deleted", "13.9 kB"], history
        assert history[-2:] == [
            "  outputs: 1 checkpoint removed; 13.9 kB freed",
            "  all (1 run): 1 checkpoint removed; 13.9 kB freed",
        ]
    assert "Nothing happened in that time." in ok(ckptkeeper("history", root, "--run", "exp1"))
    events = json.loads(ok(ckptkeeper("history", root, "--run", "outputs", "--json")))["events"]
    assert [(e["run"], e["checkpoint"]) for e in events] == [(".", "checkpoint-20")]


# ---- 5. stale incomplete checkpoints ---------------------------------------------------------------------------
def incomplete(run: Path, step: int, file: str = "model.safetensors.tmp") -> Path:
    """A checkpoint a crash left half-written: its directory and one file, nothing else."""
    checkpoint = run / f"checkpoint-{step}"
    checkpoint.mkdir()
    (checkpoint / file).write_bytes(b"x" * 100)
    return checkpoint


def wait_unchanged(path: Path, seconds: float) -> None:
    """Until nothing in `path` changed for `seconds` (the later of mtime and ctime: ctime cannot be set back)."""

    def last_change() -> float:
        found = [path, *path.rglob("*")]
        return max(max(p.lstat().st_mtime, p.lstat().st_ctime) for p in found)

    wait_until(lambda: time.time() - last_change() > seconds, seconds + 10, f"{path} to be {seconds} s old")


def durations_hidden(text: str) -> str:
    return re.sub(r"unchanged for \d+s", "unchanged for Ns", text)


def test_plan_reports_a_stale_incomplete_checkpoint_under_its_run(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate(tmp_path, "outputs", THREE)
    checkpoint = incomplete(root, 40)  # (checkpoint-30 is 14.4 kB here: the Trainer's best is outputs/checkpoint-10)
    assert "warning" not in ok(ckptkeeper("plan", root, "--keep", "last:1"))  # the default, 1h: not stale
    assert "warning" not in ok(ckptkeeper("plan", root, "--keep", "last:1", "--stale-after", "30s"))
    wait_unchanged(checkpoint, 1.2)
    assert "warning" not in ok(ckptkeeper("plan", root, "--keep", "last:1"))
    plan = durations_hidden(ok(ckptkeeper("plan", root, "--keep", "last:1", "--stale-after", "1s"))).splitlines()
    table = plan[plan.index("run outputs  (4 checkpoints)") + 1 :]
    assert table[:6] == [
        "  CHECKPOINT     STEP  EPOCH     SIZE  DECISION  REASONS",
        "  checkpoint-10    10   1.00  13.4 kB  keep      protected: trainer best",
        "  checkpoint-20    20   2.00  13.9 kB  delete    no rule keeps it",
        "  checkpoint-30    30   3.00  14.4 kB  keep      last 1/1, protected: newest",
        "  checkpoint-40    40      -    100 B  keep      incomplete: no trainer_state.json",
        f"  warning: {STALE_40}",
    ]
    as_json = json.loads(ok(ckptkeeper("plan", root, "--keep", "last:1", "--stale-after", "1s", "--json")))
    [stale] = as_json["runs"][0]["stale_incomplete"]
    assert stale["unchanged_seconds"] > 1.0
    assert {k: v for k, v in stale.items() if k != "unchanged_seconds"} | {"text": durations_hidden(stale["text"])} == {
        "name": "checkpoint-40",
        "step": 40,
        "incomplete_reason": "no trainer_state.json",
        "resume_point": True,
        "text": STALE_40,
    }
    assert [durations_hidden(w) for w in as_json["warnings"]] == [f"run outputs: {STALE_40}"]


def test_a_stale_checkpoint_below_the_highest_step_is_not_called_the_resume_point(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate(tmp_path, "outputs/exp1", THREE)
    wait_unchanged(incomplete(root / "exp1", 15, "model.safetensors"), 1.2)
    as_json = json.loads(ok(ckptkeeper("plan", root, "--keep", "last:1", "--stale-after", "1s", "--json")))
    [stale] = as_json["runs"][0]["stale_incomplete"]
    assert stale["resume_point"] is False and stale["name"] == "checkpoint-15"
    assert durations_hidden(stale["text"]) == (
        f"checkpoint-15 is incomplete (no trainer_state.json) and unchanged for Ns: left by a crash? M{NEVER[2:]}"
    )


def test_prune_warns_of_a_stale_checkpoint_on_stderr_and_never_removes_it(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate(tmp_path, "outputs", THREE)
    wait_unchanged(incomplete(root, 40), 1.2)
    done = ckptkeeper("prune", root, "--keep", "last:1", "--stale-after", "1s")
    assert ok(done).splitlines()[2:] == [
        "deleted       outputs/checkpoint-20  13.9 kB  no rule keeps it",
        "Done: removed 1 checkpoint, freed 13.9 kB. Kept 3.",
    ]
    assert durations_hidden(done.stderr).splitlines() == [f"warning: run outputs: {STALE_40}"]
    assert steps(root) == [10, 30, 40] and (root / "checkpoint-40" / "model.safetensors.tmp").exists()
    again = json.loads(ok(ckptkeeper("prune", root, "--keep", "last:1", "--stale-after", "1s", "--json")))
    assert [durations_hidden(w) for w in again["warnings"]] == [f"run outputs: {STALE_40}"]
    assert again["actions"] == [] and steps(root) == [10, 30, 40]


@pytest.mark.parametrize("how", ["config file", "environment"])
def test_stale_after_comes_from_the_config_file_or_the_environment(tmp_path: Path, how: str) -> None:
    root = tmp_path / "outputs"
    simulate(tmp_path, "outputs", THREE)
    wait_unchanged(incomplete(root, 40), 1.2)
    config = tmp_path / "ckptkeeper.yaml"
    config.write_text("stale_after: 1s\n")
    given = ("--config", config) if how == "config file" else ()
    env = {"CKPTKEEPER_STALE_AFTER": "1s"} if how == "environment" else {}
    plan = ok(cli("plan", root, "--keep", "last:1", *given, env=env))
    assert f"  warning: {STALE_40}" in durations_hidden(plan).splitlines(), plan
    # the flag wins over both
    assert "warning" not in ok(cli("plan", root, "--keep", "last:1", "--stale-after", "2h", *given, env=env))


@pytest.mark.parametrize("value", ["4x", "0", "-1s"])
@pytest.mark.parametrize("command", ["plan", "prune", "watch"])
def test_a_bad_stale_after_is_a_usage_error_naming_the_option(tmp_path: Path, command: str, value: str) -> None:
    root = tmp_path / "outputs"
    simulate(tmp_path, "outputs", ONE)
    done = ckptkeeper(command, root, "--keep", "last:1", f"--stale-after={value}")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Invalid value for '--stale-after'" in done.stderr and f"'{value}' is not a duration" in done.stderr
    assert steps(root) == [10] and not (root / "_ckptkeeper").exists()


# ---- 6. prune --json -----------------------------------------------------------------------------------------
SUMMARY_KEYS = {
    "removed", "deleted", "archived", "made_weights_only", "would_remove", "would_make_weights_only", "failed",
    "not_done", "bytes_freed", "bytes_moved", "kept",
}  # fmt: skip
PRUNE_KEYS = {
    "root", "dry_run", "keep", "keep_weights", "archive_to", "refused", "leftovers", "warnings", "disk_pressure",
    "actions", "summary",
}  # fmt: skip
QUARTER = SimConfig(steps_per_epoch=10, epochs=2, save_steps=5, eval_steps=5)  # checkpoints 5, 10, 15, 20


def plan_reasons(root: Path, *flags: str) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(run, checkpoint) -> its reasons in `plan --json`."""
    plan = json.loads(ok(ckptkeeper("plan", root, *flags, "--json")))
    return {(r["run"], c["name"]): c["reasons"] for r in plan["runs"] for c in r["checkpoints"]}


def test_prune_json_is_one_document_with_each_action_and_the_summary(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate(tmp_path, "outputs/exp1", QUARTER)
    flags = ("--keep", "last:1", "--keep-weights", "epoch:all")
    reasons = plan_reasons(root, *flags)
    dry = json.loads(ok(ckptkeeper("prune", root, *flags, "--dry-run", "--json")))
    assert [(a["checkpoint"], a["action"], a["bytes_freed"]) for a in dry["actions"]] == [
        ("checkpoint-5", "would-delete", 0),
        ("checkpoint-10", "would-slim", 0),
        ("checkpoint-15", "would-delete", 0),
    ]
    assert dry["dry_run"] is True and dry["summary"] == dict.fromkeys(SUMMARY_KEYS, 0) | {
        "would_remove": 2,
        "would_make_weights_only": 1,
        "kept": 2,
    }
    done = ckptkeeper("prune", root, *flags, "--json")
    report = json.loads(ok(done))
    assert done.stderr == ""
    assert set(report) == PRUNE_KEYS
    assert {k: report[k] for k in PRUNE_KEYS - {"actions", "summary"}} == {
        "root": str(root), "dry_run": False, "keep": "last:1", "keep_weights": "epoch:all", "archive_to": None,
        "refused": [], "leftovers": {"finished": [], "stuck": []}, "warnings": [], "disk_pressure": [],
    }  # fmt: skip
    actions = report["actions"]
    assert [(a["run"], a["checkpoint"], a["step"], a["action"]) for a in actions] == [
        ("exp1", "checkpoint-5", 5, "delete"),
        ("exp1", "checkpoint-10", 10, "slim"),
        ("exp1", "checkpoint-15", 15, "delete"),
    ]
    for a in actions:
        assert a["reasons"] == reasons[a["run"], a["checkpoint"]], a
        assert a["bytes_freed"] == a["bytes"] > 0
    assert [a["detail"] for a in actions] == [None, "removed optimizer.pt, rng_state.pth, scheduler.pt", None]
    freed = sum(a["bytes"] for a in actions)
    assert report["summary"] == dict.fromkeys(SUMMARY_KEYS, 0) | {
        "removed": 2, "deleted": 2, "made_weights_only": 1, "bytes_freed": freed, "kept": 2,
    }  # fmt: skip
    assert steps(root / "exp1") == [10, 20]


def test_prune_json_of_a_same_filesystem_archive_counts_bytes_moved_not_freed(tmp_path: Path) -> None:
    root, archive = tmp_path / "outputs", tmp_path / "archive"
    simulate(tmp_path, "outputs/exp1", NO_BEST)
    report = json.loads(ok(ckptkeeper("prune", root, "--keep", "last:1", "--archive-to", archive, "--json")))
    assert report["archive_to"] == str(archive)
    actions = report["actions"]
    assert [(a["checkpoint"], a["action"], a["bytes_freed"], a["detail"]) for a in actions] == [
        (f"checkpoint-{s}", "archive", 0, f"moved to {archive}/exp1/checkpoint-{s}") for s in (10, 20)
    ]
    moved = sum(a["bytes"] for a in actions)
    assert moved > 0
    assert report["summary"] == dict.fromkeys(SUMMARY_KEYS, 0) | {
        "removed": 2, "archived": 2, "bytes_moved": moved, "kept": 1,
    }  # fmt: skip


def test_prune_json_of_a_refusal_exits_3_and_removes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate(tmp_path, "outputs/exp1", QUARTER)
    done = ckptkeeper("prune", root, "--keep", "best:1:acuracy,last:1", "--json")
    report = json.loads(ok(done, 3))
    plan = json.loads(ok(ckptkeeper("plan", root, "--keep", "best:1:acuracy,last:1", "--json"), 3))
    [why] = [r["refusal"] for r in plan["runs"]]
    assert why.startswith("rule 'best:1:eval_acuracy': ")
    assert report["refused"] == [{"run": "exp1", "refusal": why}]
    assert report["actions"] == [] and report["summary"] == dict.fromkeys(SUMMARY_KEYS, 0) | {"kept": 4}
    assert "nothing was removed" in done.stderr.lower() and done.stderr.startswith("Error: refused")
    assert steps(root / "exp1") == [5, 10, 15, 20]


# ---- 7. colour on a terminal only -----------------------------------------------------------------------------
def on_terminal(args: tuple[str | Path, ...], env: Mapping[str, str]) -> str:
    """Run the command with its stdout on a pseudo-terminal (no \\r added to newlines); what it printed."""
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST  # output as written: no \n -> \r\n
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    environ = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")} | dict(env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptkeeper", *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=environ,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal's last writer
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return b"".join(chunks).decode()


TERM = {"TERM": "xterm-256color"}
WEIGHTS_FLAGS: tuple[str | Path, ...] = ("--keep", "last:1", "--keep-weights", "epoch:all")
# the DECISION column, checkpoints 5, 10, 15, 20: with --keep-weights epoch:all, and with --archive-to
DECISIONS = {
    False: ["delete", "keep (weights only)", "delete", "keep"],
    True: ["archive", "archive", "archive", "keep"],
}


def colour_root(tmp_path: Path, name: str) -> Path:
    root = tmp_path / name / "outputs"
    simulate(tmp_path / name, "outputs/exp1", QUARTER)  # keep 20, weights only 10, delete or archive 5 and 15
    return root


def test_plan_colours_its_decisions_on_a_terminal_and_stays_aligned(tmp_path: Path) -> None:
    root = colour_root(tmp_path, "r")
    archive: tuple[str | Path, ...] = ("--keep", "last:1", "--archive-to", tmp_path / "archive")
    cases: list[tuple[tuple[str | Path, ...], int, dict[str, str]]] = [
        (WEIGHTS_FLAGS, 19, {"keep": GREEN, "keep (weights only)": CYAN, "delete": RED}),
        (archive, 8, {"keep": GREEN, "archive": YELLOW}),
    ]
    for flags, width, colours in cases:
        plan = on_terminal(("plan", root, *flags), TERM)
        piped = ok(ckptkeeper("plan", root, *flags))
        assert "\x1b" not in piped and ANSI.sub("", plan) == piped
        cells = [PAINTED.search(line) for line in plan.splitlines() if line.startswith("  checkpoint-")]
        painted = {decision: f"{code}{decision:<{width}}{RESET}" for decision, code in colours.items()}
        assert [c.group() if c else None for c in cells] == [painted[d] for d in DECISIONS[flags is archive]], plan


def test_prune_colours_its_verbs_on_a_terminal_and_stays_aligned(tmp_path: Path) -> None:
    tty_root, piped_root = colour_root(tmp_path, "tty"), colour_root(tmp_path, "piped")
    prune = on_terminal(("prune", tty_root, *WEIGHTS_FLAGS), TERM).splitlines()
    piped = ok(ckptkeeper("prune", piped_root, *WEIGHTS_FLAGS)).splitlines()
    assert [ANSI.sub("", line) for line in prune] == [line.replace(str(piped_root), str(tty_root)) for line in piped]
    assert [line.split(" exp1/")[0] for line in prune if " exp1/" in line] == [
        f"{RED}deleted      {RESET}",
        f"{CYAN}weights only {RESET}",
        f"{RED}deleted      {RESET}",
    ]
    archived = on_terminal(
        ("prune", colour_root(tmp_path, "a"), "--keep", "last:1", "--archive-to", tmp_path / "x"), TERM
    )
    verbs = [line.split(" exp1/")[0] for line in archived.splitlines() if " exp1/" in line]
    assert verbs == [f"{YELLOW}archived     {RESET}"] * 3, archived


@pytest.mark.parametrize("env", [{"NO_COLOR": "1", "TERM": "xterm"}, {"TERM": "dumb"}])
def test_no_colour_with_no_color_or_a_dumb_terminal(tmp_path: Path, env: dict[str, str]) -> None:
    root = colour_root(tmp_path, "r")
    plan = on_terminal(("plan", root, *WEIGHTS_FLAGS), env)
    assert "\x1b" not in plan and plan == ok(ckptkeeper("plan", root, *WEIGHTS_FLAGS))
    prune = on_terminal(("prune", root, *WEIGHTS_FLAGS), env)
    assert "\x1b" not in prune and "deleted       exp1/checkpoint-5" in prune
