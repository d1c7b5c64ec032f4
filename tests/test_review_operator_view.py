"""Adversarial review of issue #15, the operator's view (`git diff e3dd93c HEAD -- ckptkeeper/`), through the
real command and real daemon processes. Tests that demonstrate a bug fail on purpose, asserting what should
happen; the others pin behaviour that held under attack."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import termios
import time
import urllib.request
from pathlib import Path

import pytest
from cliutil import ckptkeeper
from watchutil import StartWatch, Watch, steps

from ckptkeeper.simtrainer import SimConfig, simulate_run

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) +")
THREE = SimConfig(steps_per_epoch=10, epochs=3, metric_for_best_model=None)  # 10, 20, 30; no Trainer best
NO_EVAL = SimConfig(steps_per_epoch=10, epochs=3, eval_strategy="no", metric_for_best_model=None)
RESCAN = ("--rescan-interval", "0.3")
# A run directory named to forge a line of the log: a line break, a time stamp, a `stopped` line, a colour code.
FORGED = "exp\n1999-01-01 00:00:00 INFO    stopped\x1b[31m"
FAKE_STAMP = "1999-01-01 00:00:00"


def ok(done: subprocess.CompletedProcess[str], code: int = 0) -> str:
    assert done.returncode == code, f"exit {done.returncode}, expected {code}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def messages(w: Watch) -> list[str]:
    """The log's lines without time stamp and level."""
    return [STAMP.sub("", line) for line in w.lines()]


def assert_every_line_is_a_record(w: Watch) -> None:
    """Each line of the text log starts with its own time stamp and level, and holds no escape character."""
    forged = [line for line in w.lines() if not STAMP.match(line) or line.startswith(FAKE_STAMP)]
    assert not forged, f"lines not written by the logger (forged by a name): {forged}\n{w.describe()}"
    assert "\x1b" not in w.log(), f"a raw escape sequence reached the log file:\n{w.describe()}"


def nested_same_name(tmp_path: Path) -> Path:
    """/…/outputs, itself a run (10, 20, 30), holding a run of its own named `outputs` (10, 20, 30)."""
    root = tmp_path / "outputs"
    simulate_run(root, THREE)
    simulate_run(root / "outputs", THREE)
    return root


# ---- 1. the root's run and a nested run named like the root ------------------------------------------------------
def test_plan_and_prune_tell_the_roots_run_from_a_nested_run_of_the_same_name(tmp_path: Path) -> None:
    root = nested_same_name(tmp_path)
    plan = ok(ckptkeeper("plan", root, "--keep", "last:1"))
    headers = [line for line in plan.splitlines() if line.startswith("run ")]
    assert len(set(headers)) == 2, f"two runs, one name: {headers}\n{plan}"
    prune = ok(ckptkeeper("prune", root, "--keep", "last:1"))
    where = [line.split()[1] for line in prune.splitlines() if line.startswith("deleted")]
    assert len(where) == 4
    # root/checkpoint-10 and root/outputs/checkpoint-10 must not both read `outputs/checkpoint-10`
    assert len(set(where)) == 4, f"different checkpoints named alike: {where}\n{prune}"


def test_history_run_named_like_the_root_selects_one_run(tmp_path: Path) -> None:
    root = nested_same_name(tmp_path)
    ok(ckptkeeper("prune", root, "--keep", "last:1"))
    events = json.loads(ok(ckptkeeper("history", root, "--run", "outputs", "--json")))["events"]
    assert {e["run"] for e in events} in ({"."}, {"outputs"}), f"--run outputs selected two runs: {events}"


def test_the_watch_log_tells_the_roots_run_from_a_nested_run_of_the_same_name(
    tmp_path: Path, watch: StartWatch
) -> None:
    root = nested_same_name(tmp_path)
    w = watch(root, "--keep", "last:1", "--settle", "0", *RESCAN)
    w.wait_log("training finished", count=2)
    assert w.terminate()[0] == 0
    deleted = [m.split()[0] for m in messages(w) if " deleted: " in m]
    assert len(deleted) == 4 and len(set(deleted)) == 4, f"different checkpoints named alike: {deleted}"


# ---- 2. names that try to forge a log line -----------------------------------------------------------------------
def test_an_archive_line_of_a_run_named_with_a_line_break_forges_no_log_line(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / FORGED, THREE)
    w = watch(root, "--keep", "last:1", "--settle", "0", "--archive-to", str(tmp_path / "archive"), *RESCAN)
    w.wait_log("training finished")
    assert w.terminate()[0] == 0
    assert steps(root / FORGED) == [30]
    assert_every_line_is_a_record(w)


def test_prune_archive_line_of_a_run_named_with_a_line_break_stays_one_line(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / FORGED, THREE)
    out = ok(ckptkeeper("prune", root, "--keep", "last:1", "--archive-to", tmp_path / "archive"))
    assert "\x1b" not in out
    archived = [line for line in out.splitlines() if line.startswith("archived")]
    assert len(archived) == 2 and all("checkpoint-" in line for line in archived), out


def metric_with_a_line_break(run: Path) -> None:
    """Every checkpoint's trainer_state.json gains an eval metric whose name holds a forged log line."""
    for state in sorted(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: len(str(p))):
        data = json.loads(state.read_text(encoding="utf-8"))
        data["log_history"].append({f"eval_loss\n{FAKE_STAMP} INFO    stopped": 1.0, "step": data["global_step"]})
        state.write_text(json.dumps(data), encoding="utf-8")


def test_a_refusal_naming_a_metric_with_a_line_break_forges_no_log_line(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "exp1", NO_EVAL)
    metric_with_a_line_break(root / "exp1")
    w = watch(root, "--keep", "best:1:eval_los,last:1", "--settle", "0", *RESCAN)
    w.wait_log("refused")
    assert w.terminate()[0] == 0
    assert steps(root / "exp1") == [10, 20, 30]  # refused: nothing removed
    assert_every_line_is_a_record(w)


def test_plan_refusal_naming_a_metric_with_a_line_break_fakes_no_row(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "exp1", NO_EVAL)
    metric_with_a_line_break(root / "exp1")
    done = ckptkeeper("plan", root, "--keep", "best:1:eval_los,last:1")
    assert done.returncode == 3, done.stderr
    assert not [line for line in done.stdout.splitlines() if line.startswith(FAKE_STAMP)], done.stdout
    assert not [line for line in done.stderr.splitlines() if line.startswith(FAKE_STAMP)], done.stderr


def test_json_log_stays_one_object_per_line_for_a_forged_run_name(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / FORGED, THREE)
    flags = ("--keep", "last:1", "--settle", "0", "--archive-to", str(tmp_path / "archive"), "--log-format", "json")
    w = watch(root, *flags, *RESCAN)
    w.wait_log("training finished")
    assert w.terminate()[0] == 0
    records = [json.loads(line) for line in w.lines()]
    assert {r["run"] for r in records if "run" in r} == {FORGED}
    assert [r["message"] for r in records if r["message"].startswith("stopped")] == ["stopped"]
    assert records[-1]["message"] == "stopped"


# ---- 3. the one `stopped` line -----------------------------------------------------------------------------------
def stop_lines(w: Watch) -> list[str]:
    return [m for m in messages(w) if m.startswith("stopped")]


def test_sigterm_while_waiting_for_the_root_says_stopped_once_and_last(tmp_path: Path, watch: StartWatch) -> None:
    w = watch(tmp_path / "not-yet", "--keep", "last:1")
    w.wait_log("does not exist yet")
    assert w.terminate()[0] == 0
    assert stop_lines(w) == ["stopped"] and messages(w)[-1] == "stopped", w.describe()


def test_sigterm_in_standby_says_stopped_once_and_last(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    simulate_run(root, THREE)
    first = watch(root, "--keep", "last:3", "--settle", "0")
    first.wait_log("watching ")
    second = watch(root, "--keep", "last:3", "--settle", "0", "--standby")
    second.wait_log("standby: ")
    assert second.terminate()[0] == 0
    assert stop_lines(second) == ["stopped"] and messages(second)[-1] == "stopped", second.describe()
    assert first.alive()
    first.proc.send_signal(signal.SIGINT)
    assert first.wait_exit() == 0
    assert stop_lines(first) == ["stopped"] and messages(first)[-1] == "stopped", first.describe()


def test_two_sigterms_in_a_row_say_stopped_once_and_last(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    simulate_run(root, THREE)
    w = watch(root, "--keep", "last:3", "--settle", "0")
    w.wait_log("training finished")
    w.proc.send_signal(signal.SIGTERM)
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait_exit() == 0
    assert stop_lines(w) == ["stopped"] and messages(w)[-1] == "stopped", w.describe()


# ---- 4. stale incomplete checkpoints -----------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["inf", "nan", "1e400", "-0", "0", "366d", "-1s", "infinity", "true"])
def test_stale_after_out_of_range_is_refused_by_name(tmp_path: Path, value: str) -> None:
    root = tmp_path / "outputs"
    simulate_run(root, THREE)
    done = ckptkeeper("plan", root, "--keep", "last:1", "--stale-after", value)
    assert done.returncode == 2 and "--stale-after" in done.stderr, done.stderr


@pytest.mark.parametrize("value", ["1s", "365d", "8760h", "0.5"])
def test_stale_after_at_its_limits_is_taken(tmp_path: Path, value: str) -> None:
    root = tmp_path / "outputs"
    simulate_run(root, THREE)
    ok(ckptkeeper("plan", root, "--keep", "last:1", "--stale-after", value))


def half_written(run: Path, step: int, when: float | None = None) -> Path:
    checkpoint = run / f"checkpoint-{step}"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors.tmp").write_bytes(b"x" * 100)
    if when is not None:
        for p in (checkpoint / "model.safetensors.tmp", checkpoint):
            os.utime(p, (when, when))
    return checkpoint


def test_an_incomplete_checkpoint_with_file_times_in_the_future_is_not_stale(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate_run(root, THREE)
    half_written(root, 40, time.time() + 86400)
    time.sleep(1.1)  # (its ctime is now: the later of mtime and ctime is a day ahead)
    plan = json.loads(ok(ckptkeeper("plan", root, "--keep", "last:1", "--stale-after", "1s", "--json")))
    assert plan["runs"][0]["stale_incomplete"] == []
    ok(ckptkeeper("prune", root, "--keep", "last:1", "--stale-after", "1s"))
    assert steps(root) == [30, 40]


def metric_value(url: str, sample: str) -> float | None:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def test_the_stale_gauge_drops_when_its_whole_run_directory_is_removed(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "exp1", THREE)
    simulate_run(root / "exp2", THREE)  # the root stays a root of runs
    half_written(root / "exp1", 40, time.time() - 60)
    w = watch(root, "--keep", "last:3", "--settle", "0", "--stale-after", "1s", *RESCAN, "--metrics-port", "0")
    found = re.search(r"serving metrics on (http://127\.0\.0\.1:\d+/metrics)", w.wait_log("serving metrics on"))
    assert found, w.describe()
    url, gauge = found.group(1), 'ckptkeeper_stale_incomplete_checkpoints{run="exp1"}'
    w.wait_log("checkpoint-40 is incomplete")
    assert metric_value(url, gauge) == 1.0
    shutil.rmtree(root / "exp1")  # the person removes the crashed run altogether
    w.wait_log("vanished", count=3)
    time.sleep(1.5)  # several full rescans
    assert metric_value(url, gauge) in (None, 0.0), "an alert on the gauge would fire for a run that is gone"


# ---- 5. what the log says of kept and vanished checkpoints -------------------------------------------------------
def add_eval(checkpoint: Path, **values: float) -> None:
    state = checkpoint / "trainer_state.json"
    data = json.loads(state.read_text(encoding="utf-8"))
    data["log_history"].append({**values, "step": data["global_step"], "epoch": data["epoch"]})
    state.write_text(json.dumps(data), encoding="utf-8")


def test_a_refusal_coming_and_going_is_said_per_run_not_as_lost_reasons_per_checkpoint(
    tmp_path: Path, watch: StartWatch
) -> None:
    root = tmp_path / "outputs"
    simulate_run(root, NO_EVAL)  # no eval yet: `best:1:eval_acc` keeps nothing, refuses nothing
    w = watch(root, "--keep", "best:1:eval_acc,last:3", "--settle", "0", *RESCAN)
    w.wait_log("training finished")
    add_eval(root / "checkpoint-30", eval_loss=0.5)  # an eval, without the rule's metric: refused
    w.wait_log("refused, nothing is removed there")
    time.sleep(1.0)  # three full rescans of the refused run
    add_eval(root / "checkpoint-30", eval_acc=0.9)  # the metric is there now: the refusal is lifted
    w.wait_log("now best eval_acc")
    time.sleep(1.0)
    assert w.terminate()[0] == 0
    assert steps(root) == [10, 20, 30]
    noise = [m for m in messages(w) if "no longer" in m or "(now last" in m]
    # the refusal is one line for the run (_PASSING); `no longer last 3/3` reads as if the rules had changed
    assert not noise, w.describe()


def test_a_whole_run_removed_by_someone_says_each_kept_checkpoint_vanished_once(
    tmp_path: Path, watch: StartWatch
) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "exp1", THREE)
    simulate_run(root / "exp2", THREE)
    w = watch(root, "--keep", "last:2", "--settle", "0", *RESCAN)
    w.wait_log("training finished", count=2)
    shutil.rmtree(root / "exp1")
    w.wait_log("vanished", count=2)
    time.sleep(1.0)  # three full rescans: nothing more to say
    assert w.terminate()[0] == 0
    vanished = [m for m in messages(w) if "vanished" in m]
    assert vanished == [
        "exp1/checkpoint-20 vanished: removed by something else (was last 2/2)",
        "exp1/checkpoint-30 vanished: removed by something else (was newest)",
    ], w.describe()


def test_a_dry_run_and_its_own_removals_never_say_vanished(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "dry", THREE)
    simulate_run(root / "arch", THREE)
    dry = watch(root / "dry", "--keep", "last:1", "--settle", "0", "--dry-run", *RESCAN)
    dry.wait_log("training finished")
    arch = watch(root / "arch", "--keep", "last:2", "--archive-to", str(tmp_path / "a"), "--settle", "0", *RESCAN)
    arch.wait_log("training finished")
    time.sleep(1.0)
    for w in (dry, arch):
        assert w.terminate()[0] == 0
        assert not [m for m in messages(w) if "vanished" in m], w.describe()
    assert steps(root / "dry") == [10, 20, 30] and steps(root / "arch") == [20, 30]


def test_after_a_restart_a_removal_claims_no_reason_from_before(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    simulate_run(root, THREE)
    first = watch(root, "--keep", "last:3", "--settle", "0")
    first.wait_log("training finished")
    assert first.terminate()[0] == 0
    second = watch(root, "--keep", "last:1", "--settle", "0")
    second.wait_log("training finished")
    assert second.terminate()[0] == 0
    deleted = [m for m in messages(second) if " deleted: " in m]
    assert len(deleted) == 2 and not [m for m in deleted if "was " in m], second.describe()


def test_a_complete_checkpoint_still_settling_is_not_called_left_by_a_crash(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate_run(root, THREE)  # complete, written a moment ago: incomplete only until --settle has passed
    time.sleep(1.2)
    plan = ok(ckptkeeper("plan", root, "--keep", "last:1", "--settle", "60", "--stale-after", "1s"))
    assert "settle 60 s" in plan
    # the advice `move it aside or remove it yourself` for the newest, whole checkpoint invites deleting it
    assert "left by a crash" not in plan, plan


# ---- 6. prune --json, colour ---------------------------------------------------------------------------------------
def test_prune_json_is_one_document_on_stdout_with_warnings_and_a_refusal(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / FORGED, NO_EVAL)  # no eval: not refused
    half_written(root / FORGED, 40, time.time() - 60)  # a stale warning
    simulate_run(root / "typo", SimConfig(steps_per_epoch=10, epochs=2))
    time.sleep(1.1)  # (its ctime cannot be set back)
    done = ckptkeeper("prune", root, "--keep", "best:1:eval_los,last:1", "--stale-after", "1s", "--json")
    assert done.returncode == 3, done.stderr
    document = json.loads(done.stdout)  # the whole of stdout, nothing before or after
    assert [r["run"] for r in document["refused"]] == ["typo"]
    assert "did you mean eval_loss?" in done.stderr and document["actions"] == []
    assert any("checkpoint-40 is incomplete" in w for w in document["warnings"]), document["warnings"]
    assert steps(root / FORGED) == [10, 20, 30, 40]


def on_terminal(args: tuple[str | Path, ...], env: dict[str, str]) -> str:
    """The command's stdout on a pseudo-terminal."""
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    environ = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")} | env
    command = [sys.executable, "-m", "ckptkeeper", *map(str, args)]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, env=environ)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    proc.communicate(timeout=60)
    return b"".join(chunks).decode()


def test_no_color_empty_is_unset_as_no_color_org_says_and_a_forged_name_paints_nothing(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / FORGED, THREE)
    flags = ("plan", root, "--keep", "last:1")
    painted = on_terminal(flags, {"TERM": "xterm", "NO_COLOR": ""})  # (README: "NO_COLOR set to anything")
    assert "\x1b[31mdelete" in painted
    plain = on_terminal(flags, {"TERM": "xterm", "NO_COLOR": "0"})
    assert "\x1b" not in plain and "exp\\n1999" in plain  # the name's escape shown as text, never sent
    assert "\x1b[31m" not in painted.replace("\x1b[31mdelete", "")


# ---- 7. a root reached through a link ----------------------------------------------------------------------------
def test_history_run_finds_the_roots_run_by_the_name_prune_gave_it(tmp_path: Path) -> None:
    simulate_run(tmp_path / "run-2026-12-06", THREE)
    root = tmp_path / "latest"
    root.symlink_to("run-2026-12-06")  # a `latest` link to the newest run, as many launch scripts make
    prune = ok(ckptkeeper("prune", root, "--keep", "last:1"))
    [name] = {line.split()[1].split("/")[0] for line in prune.splitlines() if line.startswith("deleted")}
    history = ok(ckptkeeper("history", root, "--run", name))
    assert "Nothing happened" not in history, (
        f"prune said `{name}/checkpoint-10 deleted`; history --run {name}:\n{history}"
    )


def test_the_watch_log_names_the_roots_run_as_prune_does(tmp_path: Path, watch: StartWatch) -> None:
    simulate_run(tmp_path / "run-2026-12-06", THREE)
    root = tmp_path / "latest"
    root.symlink_to("run-2026-12-06")
    plan = ok(ckptkeeper("plan", root, "--keep", "last:1"))
    [header] = [line for line in plan.splitlines() if line.startswith("run ")]
    w = watch(root, "--keep", "last:1", "--settle", "0")
    w.wait_log("training finished")
    assert w.terminate()[0] == 0
    [finished] = [m for m in messages(w) if "training finished" in m]
    assert finished.startswith(header.split("  ")[0] + ":"), f"plan: {header!r}; watch: {finished!r}"


def test_a_checkpoint_no_longer_kept_that_vanishes_does_not_claim_it_was_kept(
    tmp_path: Path, watch: StartWatch
) -> None:
    simulate_run(tmp_path / "made", SimConfig(steps_per_epoch=10, epochs=4, metric_for_best_model=None))
    root = tmp_path / "outputs"
    root.mkdir()
    for step in (10, 20, 30):
        (tmp_path / "made" / f"checkpoint-{step}").rename(root / f"checkpoint-{step}")
    w = watch(root, "--keep", "last:2", "--settle", "0", "--dry-run", *RESCAN)
    w.wait_log("checkpoint-20 kept: last 2/2")
    (tmp_path / "made" / "checkpoint-40").rename(root / "tmp-checkpoint-40")  # the Trainer's save, then its rename
    (root / "tmp-checkpoint-40").rename(root / "checkpoint-40")
    w.wait_log("checkpoint-20 would delete (dry run; no rule keeps it; was last 2/2)")
    shutil.rmtree(root / "checkpoint-20")  # the Trainer's save_total_limit rotation
    w.wait_log("checkpoint-20 vanished")
    assert w.terminate()[0] == 0
    [vanished] = [m for m in messages(w) if "vanished" in m]
    # the log last said it would be deleted: `was last 2/2` says it was kept until it vanished
    assert "was last 2/2" not in vanished, w.describe()
