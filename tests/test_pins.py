"""Pins and leases (SPEC "Pins and leases"): `ckptkeeper pin`, `unpin`, `pins`, the planner's `protected: pinned`,
leases that lapse at their time, the pins file kept in the state directory (never in the checkpoint), an
unreadable pins file that removes nothing, `ckptkeeper.lease` for Python, and a running `watch` that honours a new
pin, an unpin and a lapsed lease with no restart. The race of `pin` with removals is in test_pins_race.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import ckptkeeper
from ckptkeeper.cli import main
from ckptkeeper.engine import Pipeline
from ckptkeeper.layout import default_state_dir
from ckptkeeper.model import Action, Pin
from ckptkeeper.pinning import PinRefused
from ckptkeeper.pins import PinsError, PinsReader
from ckptkeeper.policy import PlanInputs, Policy, plan_root
from ckptkeeper.render import outcome_line
from ckptkeeper.rules import parse_rules
from ckptkeeper.scan import read_run
from ckptkeeper.simtrainer import SimConfig, simulate_run
from tests.cliutil import ckptkeeper as run_ckptkeeper
from tests.watchutil import StartWatch, journal, steps, wait_until

CONFIG = SimConfig(steps_per_epoch=10, epochs=3)


def cli(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """outputs/exp1 with checkpoint-10, -20, -30 (the newest, the Trainer's best); no state directory yet."""
    top = tmp_path / "outputs"
    simulate_run(top / "exp1", CONFIG)
    return top


def ckpt(root: Path, step: int, run: str = "exp1") -> Path:
    return root / run / f"checkpoint-{step}"


# ---------------------------------------------------------------------------------------------- the commands
def test_a_pinned_checkpoint_is_kept_with_its_note_and_the_time_left(root: Path) -> None:
    pinned = cli("pin", "--root", root, "--for", "2h", "--note", "figure 3", ckpt(root, 10))
    assert pinned.exit_code == 0, pinned.output
    assert re.fullmatch(r'pinned exp1/checkpoint-10 for 2h \(until \S+ \S+\): "figure 3"\n', pinned.output)
    plan = cli("plan", root, "--keep", "last:1")
    assert re.search(r'checkpoint-10 .* keep +protected: pinned "figure 3" \(1h59m left\)\n', plan.output)
    as_json = json.loads(cli("plan", root, "--keep", "last:1", "--json").output)
    [decision] = [d for d in as_json["runs"][0]["checkpoints"] if d["name"] == "checkpoint-10"]
    [reason] = decision["reasons"]
    assert reason["kind"] == "pinned" and reason["until"] > time.time() + 7100
    pruned = cli("prune", root, "--keep", "last:1")
    assert pruned.exit_code == 0, pruned.output
    assert steps(root / "exp1") == [10, 30]


def test_unpin_lets_the_rules_judge_it_again_and_is_idempotent(root: Path) -> None:
    assert cli("pin", "--root", root, ckpt(root, 10)).output == "pinned exp1/checkpoint-10 until unpinned\n"
    assert cli("unpin", "--root", root, ckpt(root, 10)).output == "unpinned exp1/checkpoint-10\n"
    again = cli("unpin", "--root", root, ckpt(root, 10))
    assert (again.exit_code, again.output) == (0, "exp1/checkpoint-10 was not pinned; nothing to do\n")
    cli("prune", root, "--keep", "last:1")
    assert steps(root / "exp1") == [30]


def test_pins_lists_each_pin_with_its_lease_and_whether_it_is_still_there(root: Path) -> None:
    cli("pin", "--root", root, "--note", "eval", "--for", "1d", ckpt(root, 10))
    cli("pin", "--root", root, ckpt(root, 20))
    shutil.rmtree(ckpt(root, 20))  # removed by someone else: the pin stays, shown as gone
    text = cli("pins", root)
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert lines[0] == f"Pins of {root} (in {root / '_ckptkeeper'})"
    assert lines[1].split() == ["RUN", "CHECKPOINT", "PINNED", "LEASE", "PRESENT", "NOTE"]
    assert re.fullmatch(r"  exp1  checkpoint-10  \S+ \S+ +until \S+ \S+ \(23h59m left\) +yes +eval", lines[2])
    assert re.fullmatch(r"  exp1  checkpoint-20  \S+ \S+ +until unpinned +gone", lines[3])
    found = json.loads(cli("pins", root, "--json").output)["pins"]
    assert [(p["checkpoint"], p["note"], p["lapsed"], p["present"]) for p in found] == [
        ("checkpoint-10", "eval", False, True),
        ("checkpoint-20", "", False, False),
    ]
    assert found[0]["left_seconds"] > 86000 and found[1]["expires_at"] is None


def test_a_lease_lapses_at_its_time_and_is_shown_lapsed(root: Path) -> None:
    assert cli("pin", "--root", root, "--for", "1s", ckpt(root, 10)).exit_code == 0
    assert "protected: pinned" in cli("plan", root, "--keep", "last:1").output
    time.sleep(1.1)
    assert re.search(r"checkpoint-10 .* delete +no rule keeps it", cli("plan", root, "--keep", "last:1").output)
    assert "lapsed at " in cli("pins", root).output
    assert json.loads(cli("pins", root, "--json").output)["pins"][0]["lapsed"] is True


def test_the_planner_keeps_a_pinned_checkpoint_until_its_lease_lapses_at_the_plan_s_time(root: Path) -> None:
    run = read_run(root, root / "exp1", None, 0.0)
    policy = Policy(parse_rules("last:1"))
    lease = Pin("exp1", "checkpoint-10", pinned_at=1000.0, note="eval", expires_at=2000.0)
    forever = Pin("exp1", "checkpoint-20", pinned_at=1000.0)
    other_run = Pin("exp2", "checkpoint-10", pinned_at=1000.0)

    def actions(now: float | None) -> dict[str, Action]:
        plan = plan_root([run], policy, inputs=PlanInputs(now, (lease, forever, other_run)))
        return {d.checkpoint.name: d.action for d in plan.runs[0].decisions}

    keep, delete = Action.KEEP, Action.DELETE
    assert actions(1999.0) == {"checkpoint-10": keep, "checkpoint-20": keep, "checkpoint-30": keep}
    assert actions(2000.0) == {"checkpoint-10": delete, "checkpoint-20": keep, "checkpoint-30": keep}
    assert actions(None)["checkpoint-10"] is keep  # no time given: a lease holds (the safe side)


def test_a_removal_planned_before_a_pin_is_skipped_and_says_so(root: Path) -> None:
    pipeline = Pipeline.checked(root, Policy(parse_rules("last:1")))
    pipeline.acquire()
    try:
        plan = pipeline.plan(pipeline.scan(pipeline.find_runs(), None))
        assert [d.checkpoint.name for d in plan.runs[0].acted_on] == ["checkpoint-10", "checkpoint-20"]
        assert cli("pin", "--root", root, "--note", "eval", ckpt(root, 10)).exit_code == 0  # after the plan
        [result] = pipeline.act(plan)
    finally:
        pipeline.release()
    lines = [outcome_line(o, "outputs") for o in result.outcomes]
    assert lines[0] == 'skipped       exp1/checkpoint-10  (pinned since the plan was made: "eval"; kept)'
    assert lines[1].startswith("deleted       exp1/checkpoint-20")
    assert steps(root / "exp1") == [10, 30]
    started = [e["checkpoint"] for e in journal(root / "_ckptkeeper") if e["action"].startswith("start-")]
    assert started == ["checkpoint-20"]


def test_pins_live_in_the_state_directory_and_never_touch_the_checkpoint(root: Path) -> None:
    target = ckpt(root, 10)
    before = (sorted(os.listdir(target)), os.stat(target).st_mtime_ns, os.stat(target).st_ctime_ns)
    assert cli("pin", "--root", root, target).exit_code == 0
    assert cli("unpin", "--root", root, target).exit_code == 0
    assert (sorted(os.listdir(target)), os.stat(target).st_mtime_ns, os.stat(target).st_ctime_ns) == before
    stored = json.loads((root / "_ckptkeeper" / "pins.json").read_text())
    assert stored["root"] == str(root) and stored["pins"] == []
    assert all(name.startswith("_ckptkeeper") for name in os.listdir(root) if name != "exp1")  # not uploaded


# ---------------------------------------------------------------------------------------------- where a pin goes
def test_without_a_root_the_nearest_ckptkeeper_state_directory_above_is_used(tmp_path: Path) -> None:
    top = tmp_path / "outputs"
    simulate_run(top / "sweep" / "lr-1e-4", CONFIG)
    assert cli("prune", top, "--keep", "last:3").exit_code == 0  # makes outputs/_ckptkeeper
    pinned = cli("pin", ckpt(top, 10, "sweep/lr-1e-4"))
    assert pinned.output == "pinned sweep/lr-1e-4/checkpoint-10 until unpinned\n"
    [stored] = json.loads((top / "_ckptkeeper" / "pins.json").read_text())["pins"]
    assert (stored["run"], stored["checkpoint"]) == ("sweep/lr-1e-4", "checkpoint-10")


def test_with_no_state_directory_found_pin_says_how_to_name_one(root: Path, tmp_path: Path) -> None:
    (tmp_path / "_ckptkeeper").mkdir()
    (tmp_path / "_ckptkeeper" / "notes.txt").write_text("a directory of someone else's")  # not ckptkeeper's
    result = cli("pin", ckpt(root, 10), env={"CKPTKEEPER_ROOT": "", "CKPTKEEPER_STATE_DIR": ""})
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: no ckptkeeper state directory found above {ckpt(root, 10)}: name the root with --root ROOT (its "
        "state directory is ROOT/_ckptkeeper) or the state directory with --state-dir DIR (or CKPTKEEPER_ROOT, "
        "CKPTKEEPER_STATE_DIR)\n"
    )


def test_the_environment_names_the_root(root: Path) -> None:
    result = cli("pin", ckpt(root, 20), env={"CKPTKEEPER_ROOT": str(root)})
    assert result.output == "pinned exp1/checkpoint-20 until unpinned\n"
    assert "checkpoint-20" in (root / "_ckptkeeper" / "pins.json").read_text()


def test_the_root_s_own_run_is_named_by_the_root(tmp_path: Path) -> None:
    top = tmp_path / "output_dir"
    simulate_run(top, CONFIG)  # a root that is itself a Trainer output_dir
    assert cli("pin", "--root", top, top / "checkpoint-10").output == "pinned output_dir/checkpoint-10 until unpinned\n"
    [stored] = json.loads((top / "_ckptkeeper" / "pins.json").read_text())["pins"]
    assert (stored["run"], stored["checkpoint"]) == (".", "checkpoint-10")
    assert cli("prune", top, "--keep", "last:1").exit_code == 0
    assert steps(top) == [10, 30]
    assert re.search(r"  output_dir  checkpoint-10 .* yes", cli("pins", top).output)


def test_a_checkpoint_reached_through_a_link_is_found_by_identity(root: Path, tmp_path: Path) -> None:
    (tmp_path / "alias").symlink_to(root)
    result = cli("pin", "--root", root, tmp_path / "alias" / "exp1" / "checkpoint-10")
    assert result.output == "pinned exp1/checkpoint-10 until unpinned\n"


def test_a_checkpoint_reached_through_a_bind_mount_is_found_by_identity(
    root: Path, tmp_path: Path, mount: Callable[..., Path]
) -> None:
    from tests.cliutil import bind_mount

    with bind_mount(root, tmp_path / "elsewhere") as other:
        result = cli("pin", "--root", root, other / "exp1" / "checkpoint-10")
    assert result.output == "pinned exp1/checkpoint-10 until unpinned\n", result.output


@pytest.mark.parametrize(
    ("make", "named", "message"),
    [
        (lambda r: None, "exp1/checkpoint-99", "does not exist"),
        (lambda r: (r / "exp1" / "checkpoint-ab").mkdir(), "exp1/checkpoint-ab", "is not a checkpoint: its name"),
        (
            lambda r: (r / "exp1" / "checkpoint-40").symlink_to(r / "exp1" / "checkpoint-10"),
            "exp1/checkpoint-40",
            "is a symbolic link, not a checkpoint: name the checkpoint's own directory",
        ),
        (lambda r: (r / "exp1" / "checkpoint-50").write_text("x"), "exp1/checkpoint-50", "is not a directory"),
        (
            lambda r: simulate_run(r.parent / "other", CONFIG),
            "../other/checkpoint-10",
            "is not a checkpoint of a run below the root",
        ),
        (
            lambda r: simulate_run(r / ".hidden", CONFIG),
            ".hidden/checkpoint-10",
            "is not a checkpoint of a run below the root",
        ),
    ],
)
def test_what_is_not_a_checkpoint_of_a_run_below_the_root_is_a_usage_error(
    root: Path, make: Callable[[Path], object], named: str, message: str
) -> None:
    make(root)
    result = cli("pin", "--root", root, root / named)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and message in result.stderr, result.stderr
    assert not (root / "_ckptkeeper" / "pins.json").exists()


def test_a_bad_lease_names_the_flag(root: Path) -> None:
    result = cli("pin", "--root", root, "--for", "2 hours", ckpt(root, 10))
    assert result.exit_code == 2
    assert "Invalid value for '--for': '2 hours' is not a duration: expected one such as 90s, 15m" in result.stderr


def test_a_state_directory_holding_another_root_s_pins_is_refused(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    simulate_run(other / "exp1", CONFIG)
    state = tmp_path / "state"
    assert cli("pin", "--root", root, "--state-dir", state, ckpt(root, 10)).exit_code == 0
    result = cli("pin", "--root", other, "--state-dir", state, ckpt(other, 10))
    assert result.exit_code == 2
    assert f"holds the pins of another root, {root}" in result.stderr
    # named alone, the state directory serves the root its pins were taken for
    assert cli("pin", "--state-dir", state, ckpt(root, 20)).output == "pinned exp1/checkpoint-20 until unpinned\n"


# ---------------------------------------------------------------------------------------------- an unreadable pins file
@pytest.mark.parametrize("content", [b'{"format": 1, "pins": [{"run": "exp1", "checkp', b"[]", b"\xff\xfe"])
def test_an_unreadable_pins_file_removes_nothing_and_says_why(root: Path, content: bytes) -> None:
    assert cli("pin", "--root", root, ckpt(root, 10)).exit_code == 0
    (root / "_ckptkeeper" / "pins.json").write_bytes(content)
    for command in ("plan", "prune"):
        result = cli(command, root, "--keep", "last:1")
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith(f"Error: the pins file {root / '_ckptkeeper' / 'pins.json'} ")
        assert result.stderr.endswith(
            "nothing is removed until it can be read (fix it, or remove it to drop every pin)\n"
        )
    assert steps(root / "exp1") == [10, 20, 30]
    for args in (("pin", "--root", root, ckpt(root, 20)), ("pins", root)):
        result = cli(*args)
        assert result.exit_code == 1 and "the pins file" in result.stderr, result.output
    assert (root / "_ckptkeeper" / "pins.json").read_bytes() == content  # never overwritten


# ---------------------------------------------------------------------------------------------- Python
def test_a_lease_pins_for_the_block_and_lets_go_of_its_own_pin_only(root: Path) -> None:
    state = root / "_ckptkeeper"
    with ckptkeeper.lease(ckpt(root, 10), for_="1h", note="eval", root=root) as pin:
        assert (pin.run, pin.checkpoint, pin.note) == ("exp1", "checkpoint-10", "eval")
        assert pin.expires_at is not None and 3590 < pin.expires_at - time.time() <= 3600
        with ckptkeeper.lease(ckpt(root, 10), for_=None, root=root):
            pass
        assert "checkpoint-10" in (state / "pins.json").read_text()  # the outer lease still holds
        assert cli("prune", root, "--keep", "last:1").exit_code == 0
        assert steps(root / "exp1") == [10, 30]
    with pytest.raises(RuntimeError, match="boom"), ckptkeeper.lease(ckpt(root, 10), root=root):
        raise RuntimeError("boom")
    assert json.loads((state / "pins.json").read_text())["pins"] == []


def test_a_lease_fails_while_a_removal_of_the_checkpoint_is_under_way(root: Path) -> None:
    state = root / "_ckptkeeper"
    cli("pin", "--root", root, ckpt(root, 30))  # makes the state directory
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys; from pathlib import Path; from ckptkeeper import pins\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
            "with pins.guarded_removal(fd, Path(sys.argv[1]), 'exp1', 'checkpoint-10') as pin:\n"
            "    print('HELD', pin, flush=True); sys.stdin.readline()\n",
            str(state),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "HELD None\n"
        refused = r"ckptkeeper is removing it right now \(pid \d+\); nothing was pinned"
        with pytest.raises(PinRefused, match=refused), ckptkeeper.lease(ckpt(root, 10), root=root):
            pass
        result = run_ckptkeeper("pin", "--root", root, ckpt(root, 10))
        assert result.returncode == 1 and "is removing it right now" in result.stderr
        assert run_ckptkeeper("pin", "--root", root, ckpt(root, 20)).returncode == 0  # another checkpoint: fine
    finally:
        holder.communicate("\n", timeout=10)
    with ckptkeeper.lease(ckpt(root, 10), root=root):  # the removal is over (here: never made)
        pass


def test_import_ckptkeeper_stays_light() -> None:
    code = "import sys, ckptkeeper; assert 'ckptkeeper.pinning' not in sys.modules; print(ckptkeeper.lease.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout) == (0, "lease\n"), done.stderr


# ---------------------------------------------------------------------------------------------- a running watch
def move_in(source: Path, run_dir: Path) -> None:
    """A checkpoint appearing whole at once: copied beside the run, then renamed into it."""
    staging = run_dir / f".staging-{source.name}"
    shutil.copytree(source, staging)
    os.rename(staging, run_dir / source.name)


def gauge(port: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
    return "\n".join(line for line in text.splitlines() if line.startswith("ckptkeeper_pinned_checkpoints{"))


def test_a_running_watch_honours_a_pin_an_unpin_and_a_lapsed_lease_with_no_restart(
    tmp_path: Path, watch: StartWatch
) -> None:
    made = tmp_path / "made"
    simulate_run(made, CONFIG)
    root = tmp_path / "outputs"
    (root / "exp1").mkdir(parents=True)
    move_in(made / "checkpoint-10", root / "exp1")
    daemon = watch(root, "--keep", "last:1", "--settle", "0.2", "--metrics-port", "0")
    port = re.findall(r"http://127\.0\.0\.1:(\d+)/metrics", daemon.wait_log("serving metrics on"))[0]
    daemon.wait_log("exp1/checkpoint-10 kept")
    assert run_ckptkeeper("pin", "--root", root, "--note", "eval", ckpt(root, 10)).returncode == 0
    move_in(made / "checkpoint-20", root / "exp1")
    daemon.wait_log("exp1/checkpoint-20 kept")
    assert steps(root / "exp1") == [10, 20]
    wait_until(lambda: gauge(port) == 'ckptkeeper_pinned_checkpoints{run="exp1"} 1.0', 10, "the pinned gauge")
    assert run_ckptkeeper("unpin", "--root", root, ckpt(root, 10)).returncode == 0  # no file of the run changes
    daemon.wait_log("exp1/checkpoint-10 deleted")
    assert run_ckptkeeper("pin", "--root", root, "--for", "3s", ckpt(root, 20)).returncode == 0
    pinned_at = time.time()
    move_in(made / "checkpoint-30", root / "exp1")
    daemon.wait_log("exp1/checkpoint-30 kept")
    assert steps(root / "exp1") == [20, 30]
    daemon.wait_log("exp1/checkpoint-20 deleted", timeout=15)  # when the lease lapsed, with no disk change
    assert time.time() >= pinned_at + 2.9
    wait_until(lambda: gauge(port) == 'ckptkeeper_pinned_checkpoints{run="exp1"} 0.0', 10, "the gauge back to 0")
    assert daemon.alive() and "Traceback" not in daemon.log()


def test_watch_removes_nothing_while_the_pins_file_is_unreadable_and_says_so_once(
    root: Path, watch: StartWatch
) -> None:
    assert cli("pin", "--root", root, ckpt(root, 10)).exit_code == 0
    (root / "_ckptkeeper" / "pins.json").write_text("{not json")
    daemon = watch(root, "--keep", "last:1", "--settle", "0", "--rescan-interval", "0.3")
    daemon.wait_log("watching ")
    log = daemon.wait_log("nothing is removed until it can be read")
    time.sleep(1.0)  # several rescans
    assert steps(root / "exp1") == [10, 20, 30]
    assert daemon.log().count("nothing is removed until it can be read") == 1 and "Traceback" not in log
    (root / "_ckptkeeper" / "pins.json").unlink()  # every pin dropped: the rules apply again
    daemon.wait_log("exp1/checkpoint-20 deleted")
    assert steps(root / "exp1") == [30]


def test_a_pin_a_running_watch_with_another_state_directory_would_not_see_is_refused(
    root: Path, tmp_path: Path, watch: StartWatch
) -> None:
    daemon = watch(root, "--keep", "last:3", "--state-dir", tmp_path / "elsewhere")
    daemon.wait_log("watching ")
    result = run_ckptkeeper("pin", "--root", root, ckpt(root, 10))
    assert result.returncode == 2
    assert result.stderr == (
        f"Error: a ckptkeeper (pid {daemon.pid} on {os.uname().nodename}) is working on {root} with another state "
        f"directory than {root / '_ckptkeeper'}: it would not see this pin; name its state directory with "
        "--state-dir\n"
    )
    same = run_ckptkeeper("pin", "--root", root, "--state-dir", tmp_path / "elsewhere", ckpt(root, 10))
    assert same.returncode == 0, same.stderr


def test_a_pin_under_a_root_below_the_one_a_running_watch_holds_is_refused(root: Path, watch: StartWatch) -> None:
    daemon = watch(root, "--keep", "last:3")
    daemon.wait_log("watching ")
    inner = root / "exp1"
    result = run_ckptkeeper("pin", "--root", inner, inner / "checkpoint-10")  # a root of its own: wrong store
    assert result.returncode == 2
    assert result.stderr == (
        f"Error: a ckptkeeper (pid {daemon.pid} on {os.uname().nodename}) is working on {root}, above the root "
        f"{inner}: it would not see this pin; pin with --root {root}\n"
    )
    assert run_ckptkeeper("pin", inner / "checkpoint-10").returncode == 0  # the nearest state directory: root's


# ---------------------------------------------------------------------------------------------- the daemon's look
_OPENED: list[str] = []


def _count_pins_opens(event: str, args: tuple[object, ...]) -> None:
    if event == "open" and args and str(args[0]).endswith("pins.json"):
        _OPENED.append(str(args[0]))


sys.addaudithook(_count_pins_opens)


def _aged(path: Path) -> None:
    """Wait until the file's ctime is past the reader's `RECENT` window (ctime cannot be set back)."""
    time.sleep(max(0.0, path.lstat().st_ctime + PinsReader.RECENT + 0.05 - time.time()))


def test_the_daemon_s_pins_reader_reads_the_file_again_only_when_it_changed(root: Path) -> None:
    state_dir = default_state_dir(root)
    reader = PinsReader(state_dir)
    assert reader.pins(time.time()) == ()
    assert cli("pin", "--root", root, ckpt(root, 10), "--note", "first").exit_code == 0
    pins_file = state_dir / "pins.json"
    _aged(pins_file)
    _OPENED.clear()
    assert [p.note for p in reader.pins(time.time())] == ["first"]
    assert [p.note for p in reader.pins(time.time())] == ["first"]
    assert [p.note for p in reader.pins(time.time())] == ["first"]
    assert len(_OPENED) == 1, _OPENED  # read once, then recognised by its lstat
    assert cli("pin", "--root", root, ckpt(root, 20), "--note", "second").exit_code == 0
    assert sorted(p.note for p in reader.pins(time.time())) == ["first", "second"]
    assert cli("unpin", "--root", root, ckpt(root, 10)).exit_code == 0
    assert [p.note for p in reader.pins(time.time())] == ["second"]


def test_the_pins_reader_reads_a_file_changed_within_its_window_at_every_look(root: Path) -> None:
    """A write in place within the same tick of the file-time clock may leave the key as it was (not reproducible on
    demand): so a file changed less than `RECENT` ago is never recognised by its key; it is read at every look."""
    state_dir = default_state_dir(root)
    assert cli("pin", "--root", root, ckpt(root, 10), "--note", "old").exit_code == 0
    reader = PinsReader(state_dir)
    _OPENED.clear()
    for _ in range(3):
        assert [p.note for p in reader.pins(time.time())] == ["old"]
    assert (state_dir / "pins.json").lstat().st_ctime > time.time() - PinsReader.RECENT, "too slow to test"
    assert len(_OPENED) == 3, _OPENED


def test_an_unreadable_pins_file_is_an_error_at_every_look_not_a_memory(root: Path) -> None:
    state_dir = default_state_dir(root)
    assert cli("pin", "--root", root, ckpt(root, 10)).exit_code == 0
    reader = PinsReader(state_dir)
    assert len(reader.pins(time.time())) == 1
    pins_file = state_dir / "pins.json"
    pins_file.unlink()
    pins_file.write_text("{not json")
    for _ in range(2):
        with pytest.raises(PinsError):
            reader.pins(time.time())
