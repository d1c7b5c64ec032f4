"""`ckptkeeper history` through the real command (a process, as a user runs it): the journal in human form.

Each test makes a real journal: `prune` of runs written by the simulated Trainer, or lines appended as a crash
would leave them (a start with no outcome, a last line cut short)."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cliutil import ckptkeeper

from ckptkeeper.simtrainer import SimConfig, simulate_run

CONFIG = SimConfig(model_floats=100_000, optimizer_bytes=800_000)
RULES = "(keep last:2; keep weights epoch:all)"


def pruned(root: Path, *runs: str) -> Path:
    for seed, run in enumerate(runs):
        simulate_run(root / run, SimConfig(model_floats=100_000, optimizer_bytes=800_000, seed=seed))
    done = ckptkeeper("prune", root, "--keep", "last:2", "--keep-weights", "epoch:all")
    assert done.returncode == 0, done.stderr
    return root / "_ckptkeeper" / "journal.jsonl"


def journal_lines(journal: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in journal.read_text().splitlines()]


def rows(stdout: str) -> list[list[str]]:
    """The table's rows (after the header), split on runs of two or more spaces."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("WHEN"))
    table = lines[start + 1 : lines.index("", start)]
    return [re.split(r" {2,}", line.strip()) for line in table]


def test_history_lists_each_action_with_its_reasons_and_the_totals(tmp_path: Path) -> None:
    journal = pruned(tmp_path / "outputs", "exp1", "exp2")
    done = ckptkeeper("history", tmp_path / "outputs")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"History of {tmp_path / 'outputs'} (journal {journal})"
    outcomes = [e for e in journal_lines(journal) if e["action"] in ("delete", "slim")]
    expected = [
        [
            dt.datetime.fromisoformat(str(e["time"])).astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            str(e["run"]),
            str(e["checkpoint"]),
            "deleted" if e["action"] == "delete" else "made weights only",
            _human(int(str(e["bytes"]))),
            f"no rule keeps it {RULES}" if e["action"] == "delete" else f"epoch {_epoch(e)} (weights only) {RULES}",
        ]
        for e in outcomes
    ]
    assert rows(done.stdout) == expected
    assert [r[3] for r in expected].count("deleted") == 8 and len(expected) == 12
    per_run = {run: sum(int(str(e["bytes"])) for e in outcomes if e["run"] == run) for run in ("exp1", "exp2")}
    assert done.stdout.splitlines()[-3:] == [
        f"  exp1: 4 checkpoints removed, 2 made weights only; {_human(per_run['exp1'])} freed",
        f"  exp2: 4 checkpoints removed, 2 made weights only; {_human(per_run['exp2'])} freed",
        f"  all (2 runs): 8 checkpoints removed, 4 made weights only; {_human(sum(per_run.values()))} freed",
    ]


def _human(n: int) -> str:
    from ckptkeeper.units import human_bytes

    return human_bytes(n)


def _epoch(entry: dict[str, object]) -> int:
    return {"checkpoint-20": 1, "checkpoint-50": 2}[str(entry["checkpoint"])]


def test_a_crash_mid_removal_and_a_line_cut_short_are_reported_not_fatal(tmp_path: Path) -> None:
    journal = pruned(tmp_path / "outputs", "exp1")
    start = {"time": "2026-12-06T08:00:00.000+00:00", "action": "start-delete", "run": "exp1"}
    start |= {"checkpoint": "checkpoint-70", "step": 70, "bytes": 5, "why": "no rule keeps it (keep last:1)"}
    with journal.open("a") as f:
        f.write(json.dumps(start) + "\n")
        f.write('{"time": "2026-12-06T08:00:01.000+00:00", "action": "dele')  # a kill mid-write
    done = ckptkeeper("history", tmp_path / "outputs", "--run", "exp1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1] == "(1 line of the journal could not be read and was passed over)"
    interrupted = [r for r in rows(done.stdout) if r[2] == "checkpoint-70"]
    assert interrupted == [
        [
            dt.datetime(2026, 12, 6, 8, tzinfo=dt.UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            "exp1",
            "checkpoint-70",
            "interrupted (finished or undone at the next start)",
            "-",
            "no rule keeps it (keep last:1)",
        ]
    ]


def test_run_and_since_select_and_json_carries_the_same(tmp_path: Path) -> None:
    journal = pruned(tmp_path / "outputs", "exp1", "exp2")
    old = {"time": "2020-01-01T00:00:00.000+00:00", "action": "delete", "run": "exp1", "checkpoint": "checkpoint-1"}
    old |= {"step": 1, "bytes": 1000, "why": "no rule keeps it (keep last:2)"}
    with journal.open("a") as f:
        f.write(json.dumps(old) + "\n")
    everything = json.loads(ckptkeeper("history", tmp_path / "outputs", "--json").stdout)
    assert len(everything["events"]) == 13 and everything["events"][0]["checkpoint"] == "checkpoint-1"
    recent = json.loads(ckptkeeper("history", tmp_path / "outputs", "--since", "2h", "--json").stdout)
    assert len(recent["events"]) == 12
    exp2 = json.loads(
        ckptkeeper("history", tmp_path / "outputs", "--run", "exp2", "--since", "2021-01-01", "--json").stdout
    )
    assert {e["run"] for e in exp2["events"]} == {"exp2"} and len(exp2["events"]) == 6
    assert set(exp2) == {"root", "journal", "unreadable_lines", "events", "totals", "total"}
    assert set(exp2["events"][0]) == {"time", "run", "checkpoint", "action", "bytes_freed", "why", "detail"}
    assert exp2["total"] == exp2["totals"]["exp2"]
    assert (exp2["total"]["removed"], exp2["total"]["made_weights_only"]) == (4, 2)
    assert exp2["total"]["bytes_freed"] == sum(e["bytes_freed"] for e in exp2["events"])
    none = ckptkeeper("history", tmp_path / "outputs", "--run", "nope")
    assert none.returncode == 0 and none.stdout.splitlines()[-1] == "Nothing happened in that time."


def test_it_reads_a_read_only_root(tmp_path: Path, mount: Callable[..., Path]) -> None:
    fs = mount("tmpfs", "ro", "size=32m")
    pruned(fs / "outputs", "exp1")
    remounted = subprocess.run(["mount", "-o", "remount,ro", str(fs)], capture_output=True, text=True, check=False)
    if remounted.returncode != 0:
        pytest.skip(f"cannot remount read-only: {remounted.stderr}")
    done = ckptkeeper("history", fs / "outputs")
    assert done.returncode == 0, done.stderr
    assert len(rows(done.stdout)) == 6
    assert done.stdout.splitlines()[-1].startswith("  all (1 run): 4 checkpoints removed, 2 made weights only; ")


def test_errors_a_person_can_act_on(tmp_path: Path) -> None:
    assert (
        ckptkeeper("history", tmp_path / "missing").stderr == f"Error: root {tmp_path / 'missing'} is not a directory\n"
    )
    (tmp_path / "fresh").mkdir()
    fresh = ckptkeeper("history", tmp_path / "fresh")
    journal = tmp_path / "fresh" / "_ckptkeeper" / "journal.jsonl"
    assert (fresh.returncode, fresh.stdout) == (
        0,
        f"History of {tmp_path / 'fresh'}: nothing yet (no journal at {journal}; "
        "pass --state-dir if it is elsewhere).\n",
    )
    bad = ckptkeeper("history", tmp_path / "fresh", "--since", "yesterday")
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[-1] == (
        "Error: Invalid value for '--since': 'yesterday': expected a duration (90s, 15m, 2h, 1h30m, 3d) or a date or "
        "time (2026-12-01, 2026-12-01T08:00)"
    )
