"""Disk pressure (`--min-free`, `--keep-under-pressure`, issue #19) through the real CLI: `plan` and `prune` on a
simulated run written into a 16 MiB tmpfs mounted for each test (root), so nothing else changes its free space and
every figure the CLI prints can be computed here, independently, from `os.statvfs` and the files' sizes.

The run: 7 checkpoints of about 1 MB (10 .. 70; the final save, which says training stopped, is removed, so the run
is still training and its next save, the size of checkpoint-70, counts). Its eval loss turns up after step 23, so
the Trainer's best is checkpoint-20. With `--keep last:4`: 10 and 30 are removed, 20 is protected (Trainer's best),
40, 50, 60 are kept by last:4 only, 70 is protected (newest). Under pressure with `--keep-under-pressure last:1`,
40, 50, 60 may be released, in that order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ckptkeeper.cli import main
from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.units import human_bytes as hb

MIB16 = 16 * 2**20
SIM = SimConfig(optimizer_bytes=1_000_000, overfit_after=0.3)
KEEP = "last:4"
REMOVED = (10, 30)  # what last:4 removes
RELEASABLE = (40, 50, 60)  # kept by last:4 only, in the order pressure releases them
POLICY = (
    "Policy: keep the last 4 (last:4); always keep the newest, incomplete ones, the Trainer's best; delete the rest; "
    "keep {floor} free on each filesystem, plus the next save of each run still training"
)
UNDER = ": under disk pressure keep only last:1 and the protected"
REPORTED = " (disk pressure is reported, nothing more is removed for it)"
NEEDS_FLOOR = (
    "keep_under_pressure (--keep-under-pressure) needs min_free (--min-free): the floor that says when the disk is "
    "under pressure"
)
RULE_FORMS = (
    "last:N, best:N[:METRIC[:min|max]], epoch:all, epoch:N, every:K (N and K positive integers), separated by commas"
)
FORMS = "expected a size such as 50G, 500M, 1.5T or 40Gi (G = 10^9 bytes, Gi = 2^30), or a percentage such as 10%"


def cli(*args: str | Path | int, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def lines(text: str) -> list[str]:
    return text.splitlines()


def mount_tmpfs(where: Path, size: str = "16m") -> Callable[[], None]:
    """Mount a tmpfs of `size` at `where` (made if missing); returns the unmount. Skips where it cannot mount."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "ckptkeeper-cli-pressure", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed: {done.stderr.strip()}")

    def unmount() -> None:
        if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)

    return unmount


@pytest.fixture
def outputs(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/outputs, a 16 MiB tmpfs of its own (where `sim_run` writes)."""
    unmount = mount_tmpfs(tmp_path / "outputs")
    try:
        yield tmp_path / "outputs"
    finally:
        unmount()


@pytest.fixture
def run(outputs: Path, sim_run: Callable[..., Path]) -> Path:
    made = sim_run("run", SIM)
    assert made.parent == outputs
    shutil.rmtree(made / "checkpoint-78")  # the final save (should_training_stop): without it, still training
    return made


# --- the figures, computed here ----------------------------------------------------------------------------------


def free_bytes(path: Path) -> int:
    vfs = os.statvfs(path)
    return vfs.f_bavail * vfs.f_frsize


def size(run_dir: Path, step: int) -> int:
    return sum(p.stat().st_size for p in (run_dir / f"checkpoint-{step}").rglob("*") if p.is_file())


def steps(run_dir: Path) -> set[int]:
    return {int(p.name.removeprefix("checkpoint-")) for p in run_dir.iterdir() if p.name.startswith("checkpoint-")}


class Figures:
    """What the CLI should say about the run's filesystem for a floor of `floor` bytes (and what it releases)."""

    def __init__(self, run_dir: Path, floor: int, released: int = 0) -> None:
        self.run_dir = run_dir
        self.free = free_bytes(run_dir)
        self.planned = sum(size(run_dir, s) for s in REMOVED)
        self.available = self.free + self.planned
        self.next_save = size(run_dir, 70)
        self.floor = floor
        self.released = RELEASABLE[:released]
        self.released_bytes = sum(size(run_dir, s) for s in self.released)

    @property
    def under(self) -> bool:
        return self.available < self.floor + self.next_save

    @property
    def text(self) -> str:
        sign = "<" if self.under else ">="
        return f"{hb(self.available)} free {sign} {hb(self.floor)} floor + {hb(self.next_save)} next save"

    def line(self, tail: str) -> str:
        return f"disk {self.run_dir}: {self.text}: {tail}"

    def releasing(self) -> str:
        n = len(self.released)
        return self.line(f"UNDER PRESSURE; releasing {n} checkpoint{'s' * (n != 1)} frees {hb(self.released_bytes)}")

    def cannot_meet(self, archive_blocked: int = 0) -> str:
        short = self.floor + self.next_save - self.available - self.released_bytes
        blocked = (
            f"; {archive_blocked} more checkpoints could be released, but --archive-to is on this same filesystem, "
            "where archiving frees nothing"
            if archive_blocked
            else ""
        )
        return self.line(
            f"UNDER PRESSURE; CANNOT MEET THE FLOOR: releasing all the pressure rules allow ({len(self.released)} "
            f"checkpoints) frees {hb(self.released_bytes)}, still {hb(short)} short{blocked}; protected checkpoints "
            "are never removed"
        )


def floor_releasing(run_dir: Path, n: int) -> int:
    """A floor (bytes) under which exactly the first n releasable checkpoints must go (0: exactly no pressure)."""
    f = Figures(run_dir, 0)
    short = sum(size(run_dir, s) for s in RELEASABLE[: n - 1]) + size(run_dir, RELEASABLE[n - 1]) // 2 if n else 0
    return f.available - f.next_save + short


def rows(output: str) -> dict[int, str]:
    """The plan table's rows by step."""
    return {int(r.split()[1]): r for r in lines(output) if r.startswith("  checkpoint-")}


def decisions(output: str) -> dict[int, str]:
    """The DECISION cell of each row (the word after the SIZE cell), by step."""
    found = {step: re.search(r" (?:B|kB|MB|GB|TB)  (\S+)", row) for step, row in rows(output).items()}
    return {step: m.group(1) for step, m in found.items() if m is not None}


# --- plan --------------------------------------------------------------------------------------------------------


def test_plan_at_exactly_floor_plus_next_save_is_no_pressure_and_one_byte_more_releases_one(run: Path) -> None:
    floor = floor_releasing(run, 0)
    result = cli("plan", run.parent, "--keep", KEEP, "--min-free", floor, "--keep-under-pressure", "last:1")
    assert result.exit_code == 0, result.output
    f = Figures(run, floor)
    assert f.available == f.floor + f.next_save  # the boundary itself: not under pressure
    plain = cli("plan", run.parent, "--keep", KEEP)
    assert lines(result.output) == [
        POLICY.format(floor=floor) + UNDER,
        *lines(plain.output)[1:-1],
        f.line("no pressure"),
        "",
        lines(plain.output)[-1],
    ]
    one_more = cli("plan", run.parent, "--keep", KEEP, "--min-free", floor + 1, "--keep-under-pressure", "last:1")
    assert one_more.exit_code == 0, one_more.output
    assert Figures(run, floor + 1, released=1).releasing() in lines(one_more.output)
    assert decisions(one_more.output) == {**decisions(plain.output), 40: "delete"}


def test_plan_releases_as_few_as_needed_and_says_why(run: Path) -> None:
    floor = floor_releasing(run, 2)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    result = cli("plan", run.parent, "--keep", KEEP, "--min-free", floor, "--keep-under-pressure", "last:1")
    assert result.exit_code == 0, result.output
    f = Figures(run, floor, released=2)
    pressure = f"disk pressure: {f.text}"
    assert rows(result.output) == {
        10: "  checkpoint-10    10   0.38  1.0 MB  delete    no rule keeps it",
        20: "  checkpoint-20    20   0.77  1.0 MB  keep      protected: trainer best",
        30: "  checkpoint-30    30   1.15  1.0 MB  delete    no rule keeps it",
        40: f"  checkpoint-40    40   1.54  1.0 MB  delete    {pressure}, was last 4/4",
        50: f"  checkpoint-50    50   1.92  1.0 MB  delete    {pressure}, was last 3/4",
        60: "  checkpoint-60    60   2.31  1.0 MB  keep      last 2/4",
        70: "  checkpoint-70    70   2.69  1.0 MB  keep      last 1/4, protected: newest",
    }
    removed = f.planned + f.released_bytes
    kept = sum(size(run, s) for s in (20, 60, 70))
    assert lines(result.output)[-4:] == [
        "",
        f.releasing(),
        "",
        f"Summary: 7 checkpoints in 1 run: keep 3 ({hb(kept)}), remove 4 ({hb(removed)} to free)",
    ]
    assert result.stderr == ""
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # a plan changes nothing
    assert not (run.parent / "_ckptkeeper").exists()


def test_plan_json_gives_the_figures_and_the_releases(run: Path) -> None:
    floor = floor_releasing(run, 2)
    result = cli(
        "plan", run.parent, "--keep", KEEP, "--min-free", f"{floor}B", "--keep-under-pressure", "last:1", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["min_free"], data["keep_under_pressure"], data["keep"]) == (f"{floor}B", "last:1", KEEP)
    f = Figures(run, floor, released=2)
    assert data["disk_pressure"] == [
        {
            "filesystem": str(run),
            "device": os.stat(run).st_dev,
            "free_bytes": f.free,
            "size_bytes": MIB16,
            "planned_free_bytes": f.planned,
            "incoming_archive_bytes": 0,
            "unseen_free_bytes": 0,
            "floor_bytes": floor,
            "next_save_bytes": f.next_save,
            "training_runs": ["run"],
            "under_pressure": True,
            "released": [
                {"run": "run", "checkpoint": f"checkpoint-{s}", "action": "delete", "frees_bytes": size(run, s)}
                for s in (40, 50)
            ],
            "released_bytes": f.released_bytes,
            "archive_blocked": 0,
            "archive_room_blocked": 0,
            "floor_met": True,
            "shortfall_bytes": 0,
            "deferred": None,
            "text": f.releasing(),
        }
    ]
    by_step = {c["step"]: c for c in data["runs"][0]["checkpoints"]}
    assert [(r["kind"], r["rule"], r["rank"], r["released"], r["text"]) for r in by_step[50]["reasons"]] == [
        ("pressure", "pressure", None, False, f"disk pressure: {f.text}"),
        ("last", "last:4", 3, True, "was last 3/4"),
    ]
    assert [c["decision"] for c in data["runs"][0]["checkpoints"]] == [
        "delete",
        "keep",
        "delete",
        "delete",
        "delete",
        "keep",
        "keep",
    ]
    assert data["summary"]["removed"] == 4


def test_plan_json_without_a_floor_has_no_pressure_keys_set(run: Path) -> None:
    data = json.loads(cli("plan", run.parent, "--keep", KEEP, "--json").stdout)
    assert (data["min_free"], data["keep_under_pressure"], data["disk_pressure"]) == (None, "", [])


def test_a_refusal_in_the_pressure_rules_defers_and_removes_nothing(run: Path) -> None:
    floor = floor_releasing(run, 2)
    result = cli("plan", run.parent, "--keep", KEEP, "--min-free", floor, "--keep-under-pressure", "best:1:acuracy")
    assert result.exit_code == 3, result.output
    f = Figures(run, floor)
    f.available = f.free  # nothing is removed at all: not even what last:4 would
    deferred = "UNDER PRESSURE; nothing released: retention is refused in this root, so nothing is released"
    assert f.line(deferred) in lines(result.stdout)
    assert set(decisions(result.stdout).values()) == {"keep"}
    assert result.stderr.startswith(
        "Error: refused in run 'run'; nothing would be removed: "
        "rule 'best:1:eval_acuracy': no checkpoint has eval_acuracy"
    )
    pruned = cli("prune", run.parent, "--keep", KEEP, "--min-free", floor, "--keep-under-pressure", "best:1:acuracy")
    assert pruned.exit_code == 3, pruned.output
    assert steps(run) == {10, 20, 30, 40, 50, 60, 70}


# --- prune -------------------------------------------------------------------------------------------------------


def prune(run_dir: Path, floor: int | str, *extra: str | Path, rules: str = "last:1") -> Result:
    """`prune` with the state directory off the tmpfs (its reserve file would change the figures prune measures)."""
    state = run_dir.parent.parent / "state"
    under = ("--keep-under-pressure", rules) if rules else ()
    return cli("prune", run_dir.parent, "--keep", KEEP, "--min-free", floor, *under, "--state-dir", state, *extra)


def journal_whys(run_dir: Path) -> dict[str, str]:
    journal = run_dir.parent.parent / "state" / "journal.jsonl"
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    return {e["checkpoint"]: e["why"] for e in entries if not e["action"].startswith("start-")}


def test_prune_removes_exactly_what_is_released_and_journals_why(run: Path) -> None:
    floor = floor_releasing(run, 2)
    f = Figures(run, floor, released=2)
    sizes = {s: size(run, s) for s in (10, 30, 40, 50)}
    result = prune(run, floor)
    assert result.exit_code == 0, result.output
    pressure = f"disk pressure: {f.text}"
    why = {
        10: "no rule keeps it",
        30: "no rule keeps it",
        40: f"{pressure}, was last 4/4",
        50: f"{pressure}, was last 3/4",
    }
    assert lines(result.stdout) == [
        POLICY.format(floor=floor) + UNDER,
        f"Root: {run.parent}",
        f.releasing(),
        f"released run/checkpoint-40 (delete): {pressure}, was last 4/4",
        f"released run/checkpoint-50 (delete): {pressure}, was last 3/4",
        *(f"deleted       run/checkpoint-{s}  {hb(n)}  {why[s]}" for s, n in sizes.items()),
        f"Done: removed 4 checkpoints, freed {hb(sum(sizes.values()))}. Kept 3.",
    ]
    assert result.stderr == ""
    assert steps(run) == {20, 60, 70}
    assert free_bytes(run) >= floor + f.next_save  # the promise, on the real disk
    tail = "(keep last:4; under pressure keep last:1)"
    assert journal_whys(run) == {
        "checkpoint-10": f"no rule keeps it {tail}",
        "checkpoint-30": f"no rule keeps it {tail}",
        "checkpoint-40": f"{pressure}; was last 4/4 {tail}",
        "checkpoint-50": f"{pressure}; was last 3/4 {tail}",
    }


def test_prune_that_cannot_meet_the_floor_says_so_on_stderr_and_keeps_the_protected(run: Path) -> None:
    f = Figures(run, int(MIB16 * 0.99), released=3)
    result = prune(run, "99%")
    assert result.exit_code == 1, result.output  # a trainer's low-disk hook must know that saving may still fail
    assert lines(result.stderr) == [
        f.cannot_meet(),
        f"Error: the --min-free floor cannot be met on {run} (see the disk line above)",
    ]
    assert f.cannot_meet() not in result.stdout
    assert [line for line in lines(result.stdout) if line.startswith("released ")] == [
        f"released run/checkpoint-{s} (delete): disk pressure: {f.text}, was last {r}/4"
        for s, r in ((40, 4), (50, 3), (60, 2))
    ]
    assert steps(run) == {20, 70}  # the Trainer's best and the newest


def test_prune_without_pressure_rules_only_reports(run: Path) -> None:
    f = Figures(run, int(MIB16 * 0.99))
    result = prune(run, "99%", rules="")
    assert result.exit_code == 0, result.output
    assert lines(result.stdout)[0] == POLICY.format(floor="99%") + REPORTED
    assert lines(result.stderr) == [
        f.line("UNDER PRESSURE (reported only: --keep-under-pressure releases checkpoints)")
    ]
    assert steps(run) == {20, 40, 50, 60, 70}


def test_prune_dry_run_says_what_it_would_release_and_changes_nothing(run: Path) -> None:
    floor = floor_releasing(run, 1)
    result = prune(run, floor, "--dry-run")
    assert result.exit_code == 0, result.output
    f = Figures(run, floor, released=1)
    assert f.releasing() in lines(result.stdout)
    assert f"released run/checkpoint-40 (delete): disk pressure: {f.text}, was last 4/4" in lines(result.stdout)
    assert [line.split()[2] for line in lines(result.stdout) if line.startswith("would delete")] == [
        f"run/checkpoint-{s}" for s in (10, 30, 40)
    ]
    assert steps(run) == {10, 20, 30, 40, 50, 60, 70}


def test_released_checkpoints_are_archived_to_another_filesystem(run: Path, tmp_path: Path) -> None:
    archive = tmp_path / "archive"  # on tmp_path's filesystem, not the tmpfs
    floor = floor_releasing(run, 2)
    f = Figures(run, floor, released=2)
    result = prune(run, floor, "--archive-to", archive)
    assert result.exit_code == 0, result.output
    assert f.releasing() in lines(result.stdout)
    assert f"released run/checkpoint-50 (archive): disk pressure: {f.text}, was last 3/4" in lines(result.stdout)
    assert steps(run) == {20, 60, 70}
    assert steps(archive / "run") == {10, 30, 40, 50}


def test_an_archive_on_the_same_filesystem_releases_nothing(run: Path) -> None:
    """Root: the run directory itself, so that an archive beside it is outside the root and on the same tmpfs."""
    floor = floor_releasing(run, 1)
    result = cli(
        "plan",
        run,
        "--keep",
        KEEP,
        "--min-free",
        floor,
        "--keep-under-pressure",
        "last:1",
        "--archive-to",
        run.parent / "archive",
    )
    assert result.exit_code == 0, result.output
    f = Figures(run, floor)
    f.available = f.free  # archiving 10 and 30 frees nothing on this filesystem
    # "... (0 checkpoints) frees 0 B, ...; 3 more checkpoints could be released, but --archive-to is ..."
    assert f.cannot_meet(archive_blocked=3) in lines(result.stdout)
    assert decisions(result.stdout) == {
        10: "archive",
        20: "keep",
        30: "archive",
        40: "keep",
        50: "keep",
        60: "keep",
        70: "keep",
    }


# --- two filesystems ---------------------------------------------------------------------------------------------


def test_runs_on_two_filesystems_are_measured_and_judged_separately(tmp_path: Path) -> None:
    """root/a and root/b are two tmpfs mounts, one run each; a 6 MB file fills a up. Only a is under pressure."""
    root = tmp_path / "root"
    unmounts = []
    try:
        for name in ("a", "b"):
            unmounts.append(mount_tmpfs(root / name))
            simulate_run(root / name / "run", SIM)
            shutil.rmtree(root / name / "run" / "checkpoint-78")
        (root / "a" / "filler").write_bytes(b"\0" * 6_000_000)
        floor = floor_releasing(root / "b" / "run", 0) - 2_000_000  # b: 2 MB to spare; a: 4 MB short
        result = cli("plan", root, "--keep", KEEP, "--min-free", floor, "--keep-under-pressure", "last:1")
        assert result.exit_code == 0, result.output
        a, b = Figures(root / "a" / "run", floor, released=3), Figures(root / "b" / "run", floor)
        by_device = sorted(
            [(os.stat(root / "a").st_dev, a.cannot_meet()), (os.stat(root / "b").st_dev, b.line("no pressure"))]
        )
        assert [line for line in lines(result.stdout) if line.startswith("disk ")] == [text for _, text in by_device]
        table_b = lines(result.stdout).index("run b/run  (7 checkpoints)")
        assert [line.split()[0] for line in lines(result.stdout)[table_b:] if "disk pressure: " in line] == []
        assert sum("disk pressure: " in line for line in lines(result.stdout)) == 3  # a's 40, 50, 60
    finally:
        for unmount in reversed(unmounts):
            unmount()


# --- usage errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("50X", FORMS),
        ("", FORMS),
        ("-1G", FORMS),
        ("1e3", FORMS),
        ("G", FORMS),
        ("0", "the floor must be more than 0 bytes"),
        ("100%", "a percentage lies between 0% and 100%"),
        ("0%", "a percentage lies between 0% and 100%"),
    ],
)
@pytest.mark.parametrize("command", ["plan", "prune"])
def test_a_bad_min_free_is_a_usage_error(run: Path, command: str, value: str, problem: str) -> None:
    result = cli(command, run.parent, "--keep", KEEP, "--min-free", value, "--keep-under-pressure", "last:1")
    assert result.exit_code == 2, result.output
    assert lines(result.output)[-1] == f"Error: Invalid value for '--min-free': {value!r}: {problem}"
    assert steps(run) == {10, 20, 30, 40, 50, 60, 70}
    assert not (run.parent / "_ckptkeeper").exists()


def test_bad_pressure_rules_are_a_usage_error(run: Path) -> None:
    for command in ("plan", "prune"):
        result = cli(command, run.parent, "--keep", KEEP, "--min-free", "1G", "--keep-under-pressure", "lastt:1")
        assert result.exit_code == 2, result.output
        assert lines(result.output)[-1] == (
            "Error: Invalid value for '--keep-under-pressure': invalid rule 'lastt:1': unknown rule 'lastt'. "
            f"Valid forms: {RULE_FORMS}."
        )
    assert steps(run) == {10, 20, 30, 40, 50, 60, 70}


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("command", ["plan", "prune"])
@pytest.mark.parametrize("where", ["flag", "config file", "environment"])
def test_pressure_rules_without_a_floor_are_a_usage_error(run: Path, tmp_path: Path, command: str, where: str) -> None:
    args: list[str | Path | int] = [command, run.parent, "--keep", KEEP]
    env = {}
    if where == "flag":
        args += ["--keep-under-pressure", "last:1"]
    elif where == "config file":
        args += ["--config", write_config(tmp_path / "config.yaml", "keep_under_pressure: [last:1]\n")]
    else:
        env["CKPTKEEPER_KEEP_UNDER_PRESSURE"] = "last:1"
    result = cli(*args, env=env)
    assert result.exit_code == 2, result.output
    source = {
        "flag": "--keep-under-pressure",
        "config file": "config.yaml",
        "environment": "CKPTKEEPER_KEEP_UNDER_PRESSURE",
    }[where]
    [message] = lines(result.output)
    assert message.startswith(f"Error: {source}: ")
    assert message.endswith(NEEDS_FLOOR)
    assert steps(run) == {10, 20, 30, 40, 50, 60, 70}


def test_a_bad_min_free_in_a_config_file_or_the_environment_is_a_usage_error(run: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", "min_free: 50X\n")
    result = cli("prune", run.parent, "--keep", KEEP, "--config", config)
    assert (result.exit_code, result.output) == (
        2,
        f"Error: config.yaml: min_free: invalid --min-free '50X': {FORMS}\n",
    )
    result = cli("prune", run.parent, "--keep", KEEP, env={"CKPTKEEPER_MIN_FREE": "100%"})
    assert (result.exit_code, result.output) == (
        2,
        "Error: CKPTKEEPER_MIN_FREE: invalid --min-free '100%': a percentage lies between 0% and 100%\n",
    )
    assert steps(run) == {10, 20, 30, 40, 50, 60, 70}


# --- config file and environment ---------------------------------------------------------------------------------


def test_a_config_file_sets_the_floor_and_the_pressure_rules(run: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", "keep: [last:4]\nmin_free: 10%\nkeep_under_pressure: [last:1]\n")
    result = cli("plan", run.parent, "--config", config, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["min_free"], data["keep_under_pressure"]) == ("10%", "last:1")
    f = Figures(run, int(MIB16 * 0.10))
    [disk] = data["disk_pressure"]
    assert (disk["floor_bytes"], disk["under_pressure"], disk["released"]) == (1_677_721, False, [])
    assert disk["text"] == f.line("no pressure")
    text = cli("plan", run.parent, "--config", config)
    assert lines(text.output)[0] == POLICY.format(floor="10%") + UNDER
    floor = floor_releasing(run, 2)  # a YAML integer, and the rules written as one string
    f = Figures(run, floor, released=2)
    sized = write_config(tmp_path / "sized.yaml", f"keep: last:4\nmin_free: {floor}\nkeep_under_pressure: last:1\n")
    pruned = cli("prune", run.parent, "--config", sized, "--state-dir", tmp_path / "state")
    assert pruned.exit_code == 0, pruned.output
    assert lines(pruned.stdout)[2:5] == [
        f.releasing(),
        f"released run/checkpoint-40 (delete): disk pressure: {f.text}, was last 4/4",
        f"released run/checkpoint-50 (delete): disk pressure: {f.text}, was last 3/4",
    ]
    assert steps(run) == {20, 60, 70}


def test_environment_variables_set_the_floor_and_the_pressure_rules_and_flags_win(run: Path) -> None:
    floor = floor_releasing(run, 2)
    env = {"CKPTKEEPER_MIN_FREE": str(floor), "CKPTKEEPER_KEEP_UNDER_PRESSURE": "last:1"}
    data = json.loads(cli("plan", run.parent, "--keep", KEEP, "--json", env=env).stdout)
    assert (data["min_free"], data["keep_under_pressure"]) == (str(floor), "last:1")
    assert [r["checkpoint"] for r in data["disk_pressure"][0]["released"]] == ["checkpoint-40", "checkpoint-50"]
    by_flag = json.loads(
        cli("plan", run.parent, "--keep", KEEP, "--json", "--min-free", floor_releasing(run, 1), env=env).stdout
    )
    assert [r["checkpoint"] for r in by_flag["disk_pressure"][0]["released"]] == ["checkpoint-40"]
    percent = json.loads(cli("plan", run.parent, "--keep", KEEP, "--json", env={"CKPTKEEPER_MIN_FREE": "10%"}).stdout)
    assert (percent["min_free"], percent["disk_pressure"][0]["floor_bytes"]) == ("10%", 1_677_721)


@pytest.mark.parametrize(
    ("rules_from", "floor_from"),
    [
        ("flag", "environment"),
        ("flag", "config file"),
        ("config file", "flag"),
        ("environment", "flag"),
        ("config file", "environment"),
    ],
)
def test_the_floor_and_the_pressure_rules_may_come_from_different_places(
    run: Path, tmp_path: Path, rules_from: str, floor_from: str
) -> None:
    """Settings are layered (flags over environment over config file): the rules need a floor from any layer."""
    floor = floor_releasing(run, 2)
    args: list[str | Path | int] = ["plan", run.parent, "--keep", KEEP, "--json"]
    env: dict[str, str] = {}
    config: list[str] = []
    for setting, value, source in [("keep_under_pressure", "last:1", rules_from), ("min_free", str(floor), floor_from)]:
        if source == "flag":
            args += [f"--{setting.replace('_', '-')}", value]
        elif source == "environment":
            env[f"CKPTKEEPER_{setting.upper()}"] = value
        else:
            config.append(f"{setting}: '{value}'\n")
    if config:
        args += ["--config", write_config(tmp_path / "config.yaml", "".join(config))]
    result = cli(*args, env=env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["checkpoint"] for r in data["disk_pressure"][0]["released"]] == ["checkpoint-40", "checkpoint-50"]
