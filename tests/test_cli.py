"""The command line: what plan, prune and demo print, what they change on disk, and their exit codes.

Most tests drive the click group in-process with CliRunner on real directories (copies of the real Trainer
runs, or simulated runs); a few run the installed console script and `python -m ckptkeeper` as processes.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cliutil import per_removal

from ckptkeeper import __version__
from ckptkeeper.cli import main
from ckptkeeper.render import human_bytes
from ckptkeeper.simtrainer import SimConfig

PROJECT = Path(__file__).resolve().parent.parent
README = PROJECT / "README.md"
FIXTURE_A = PROJECT / "tests" / "fixtures" / "hf" / "A"

VALID_FORMS = (
    "last:N, best:N[:METRIC[:min|max]], epoch:all, epoch:N, every:K (N and K positive integers), separated by commas"
)
NO_RULE = "Error: refused: no keep rule given: refusing to remove anything (pass --keep, e.g. --keep last:5)"
HEADER_LOSS = "  CHECKPOINT     STEP  EPOCH  eval_loss     SIZE  DECISION  REASONS"
POLICY_A = (
    "Policy: keep the best 1 by eval_loss (lowest), the last 2, one per epoch (best:1,last:2,epoch:all); "
    "always keep the newest, incomplete ones, the Trainer's best; delete the rest"
)
# What `--keep best:1,last:2,epoch:all` decides for the real run A (eval and save every 10 steps, 3 epochs).
TABLE_A = [
    "run A  (8 checkpoints)",
    HEADER_LOSS,
    "  checkpoint-10    10   0.38     0.6640  35.1 kB  delete    no rule keeps it",
    "  checkpoint-20    20   0.77     0.6649  35.7 kB  keep      epoch 1",
    "  checkpoint-30    30   1.15     0.6657  36.3 kB  delete    no rule keeps it",
    "  checkpoint-40    40   1.54     0.6657  36.9 kB  delete    no rule keeps it",
    "  checkpoint-50    50   1.92     0.6587  37.6 kB  keep      epoch 2",
    "  checkpoint-60    60   2.31     0.5725  38.2 kB  delete    no rule keeps it",
    "  checkpoint-70    70   2.69     0.4194  38.8 kB  keep      last 2/2",
    "  checkpoint-78    78   3.00     0.3849  39.2 kB  keep      best eval_loss=0.3849 (1/1), last 1/2, epoch 3, "
    "protected: newest, protected: trainer best",
]
SUMMARY_A = "Summary: 8 checkpoints in 1 run: keep 4 (151.2 kB), remove 4 (146.5 kB to free)"
REMOVED_A = {10: "35.1 kB", 30: "36.3 kB", 40: "36.9 kB", 60: "38.2 kB"}
KEPT_A = {20, 50, 70, 78}
KEEP_A = "best:1,last:2,epoch:all"

Snapshot = dict[str, tuple[str, int, int]]


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(top: Path, skip: Sequence[str] = ()) -> Snapshot:
    """Every path below `top` (and `top` itself) -> (kind, size, mtime_ns), links not followed."""
    found: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if os.path.relpath(os.path.join(dirpath, d), top) not in skip)
        for name in [".", *dirnames, *filenames]:
            full = os.path.normpath(os.path.join(dirpath, name))
            st = os.lstat(full)
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode) else "file"
            found[os.path.relpath(full, top)] = (kind, 0 if kind == "dir" else st.st_size, st.st_mtime_ns)
    return found


def files_and_bytes(top: Path) -> dict[str, bytes]:
    return {p.relative_to(top).as_posix(): p.read_bytes() for p in sorted(top.rglob("*")) if p.is_file()}


def checkpoints(run: Path) -> set[int]:
    return {int(p.name.removeprefix("checkpoint-")) for p in run.iterdir() if p.name.startswith("checkpoint-")}


def lines(result: Result) -> list[str]:
    return result.output.splitlines()


def decision(row: str) -> str:
    """The DECISION cell of a plan table row (the word after the SIZE cell)."""
    found = re.search(r" (?:B|kB|MB|GB|TB)  (\S+)", row)
    assert found is not None, row
    return found.group(1)


def console_script() -> str:
    beside = Path(sys.executable).parent / "ckptkeeper"
    if beside.exists():
        return str(beside)
    found = shutil.which("ckptkeeper")
    if found is None:
        pytest.fail("the ckptkeeper console script is not installed: pip install -e .")
    return found


@pytest.fixture
def outputs_a(hf_run: Callable[[str], Path]) -> Path:
    """A root `outputs/` holding a copy of the real run A; returns the root."""
    return hf_run("A").parent


# --- the installed program ---------------------------------------------------------------------------------


def test_python_m_version_runs_as_a_process() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ckptkeeper", "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ckptkeeper, version {__version__}"


def test_console_script_help_lists_commands_and_exit_codes() -> None:
    done = subprocess.run([console_script(), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: ckptkeeper [OPTIONS] COMMAND [ARGS]...")
    commands = re.findall(r"^  (\w+)  ", done.stdout, flags=re.MULTILINE)
    assert commands[:7] == ["archive", "demo", "history", "pin", "pins", "plan", "prune"]
    assert "Exit codes: 0 done; 1 a failure while acting (prune: or a --min-free floor it cannot meet); 2 usage" in (
        " ".join(done.stdout.split())
    )


def test_console_script_exit_codes_reach_the_shell(outputs_a: Path) -> None:
    before = snapshot(outputs_a)
    refused = subprocess.run(
        [console_script(), "prune", str(outputs_a)], capture_output=True, text=True, timeout=60, check=False
    )
    assert (refused.returncode, refused.stderr.strip()) == (3, NO_RULE)
    usage = subprocess.run(
        [console_script(), "prune", str(outputs_a), "--keep", "last:0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert usage.returncode == 2
    assert usage.stderr.splitlines()[-1].startswith("Error: Invalid value for '--keep' / '-k': invalid rule 'last:0'")
    assert snapshot(outputs_a) == before
    done = subprocess.run(
        [console_script(), "prune", str(outputs_a), "--keep", KEEP_A],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert checkpoints(outputs_a / "A") == KEPT_A


# --- plan --------------------------------------------------------------------------------------------------


def test_plan_on_a_real_run_prints_policy_table_and_summary(outputs_a: Path) -> None:
    result = cli("plan", outputs_a, "--keep", KEEP_A)
    assert result.exit_code == 0, result.output
    assert lines(result) == [POLICY_A, f"Root: {outputs_a}", "", *TABLE_A, "", SUMMARY_A]


def test_plan_of_a_run_directory_itself_names_the_run_by_its_directory(outputs_a: Path) -> None:
    result = cli("plan", outputs_a / "A", "--keep", KEEP_A)
    assert result.exit_code == 0, result.output
    assert lines(result)[3] == "run A  (8 checkpoints)"  # not `.`: the root's own run by the root's name
    assert lines(result)[4:-2] == TABLE_A[1:]


def test_plan_shows_one_table_per_run_with_the_metric_columns_the_rules_use(hf_run: Callable[[str], Path]) -> None:
    hf_run("A")
    root = hf_run("B").parent
    result = cli("plan", root, "--keep", "best:2:accuracy,last:1")
    assert result.exit_code == 0, result.output
    out = lines(result)
    assert out[0] == (
        "Policy: keep the best 2 by eval_accuracy (highest), the last 1 (best:2:eval_accuracy,last:1); "
        "always keep the newest, incomplete ones, the Trainer's best; delete the rest"
    )
    assert [line for line in out if line.startswith("run ")] == ["run A  (8 checkpoints)", "run B  (4 checkpoints)"]
    assert out[out.index("run B  (4 checkpoints)") :] == [
        "run B  (4 checkpoints)",
        "  CHECKPOINT      STEP  EPOCH  eval_accuracy     SIZE  DECISION  REASONS",
        "  checkpoint-26     26   1.00         0.6406  35.6 kB  delete    no rule keeps it",
        "  checkpoint-52     52   2.00         0.9219  36.8 kB  keep      best eval_accuracy=0.9219 (1/2), "
        "protected: trainer best",
        "  checkpoint-78     78   3.00         0.9219  37.9 kB  keep      best eval_accuracy=0.9219 (2/2)",
        "  checkpoint-104   104   4.00         0.9219  39.1 kB  keep      last 1/1, protected: newest",
        "",
        "Summary: 12 checkpoints in 2 runs: keep 5 (191.6 kB), remove 7 (255.4 kB to free)",
    ]


def test_plan_on_a_simulated_run_with_a_nan_metric(sim_run: Callable[..., Path]) -> None:
    run = sim_run("run", SimConfig(nan_eval_steps=frozenset({20})))
    root = run.parent
    result = cli("plan", root, "--keep", "best:2,last:1")
    assert result.exit_code == 0, result.output
    out = lines(result)
    assert out[:5] == [
        "Policy: keep the best 2 by eval_loss (lowest), the last 1 (best:2,last:1); "
        "always keep the newest, incomplete ones, the Trainer's best; delete the rest",
        f"Root: {root}",
        "",
        "run run  (8 checkpoints)",
        HEADER_LOSS,
    ]
    rows = out[5:13]
    assert [row.split()[0] for row in rows] == [f"checkpoint-{s}" for s in (10, 20, 30, 40, 50, 60, 70, 78)]
    assert rows[1].split()[:4] == ["checkpoint-20", "20", "0.77", "nan"]  # NaN is shown, never best
    assert "best eval_loss" not in rows[1]
    assert rows[-1].endswith("last 1/1, protected: newest, protected: trainer best")
    # The summary adds up the sizes on disk.
    kept = {int(r.split()[1]) for r in rows if decision(r) == "keep"}
    size = {s: sum(p.stat().st_size for p in (run / f"checkpoint-{s}").rglob("*")) for s in checkpoints(run)}
    kept_bytes = sum(v for s, v in size.items() if s in kept)
    freed = sum(v for s, v in size.items() if s not in kept)
    assert out[13:] == [
        "",
        f"Summary: 8 checkpoints in 1 run: keep {len(kept)} ({human_bytes(kept_bytes)}), "
        f"remove {8 - len(kept)} ({human_bytes(freed)} to free)",
    ]


def _strict_json(text: str) -> object:
    def reject(token: str) -> object:
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=reject)


def test_plan_json_is_strict_json_with_the_documented_keys(sim_run: Callable[..., Path]) -> None:
    run = sim_run("run", SimConfig(nan_eval_steps=frozenset({20})))
    result = cli("plan", run.parent, "--keep", "best:2,last:1", "--json")
    assert result.exit_code == 0, result.output
    data = _strict_json(result.stdout)
    assert isinstance(data, dict)
    assert set(data) == {
        "root", "keep", "keep_weights", "archive_to", "min_free", "keep_under_pressure", "metrics_defined",
        "await", "warnings", "runs", "disk_pressure", "summary",
    }  # fmt: skip
    assert (data["root"], data["keep"], data["archive_to"], data["warnings"]) == (
        str(run.parent),
        "best:2,last:1",
        None,
        [],
    )
    [entry] = data["runs"]
    assert set(entry) == {"run", "refusal", "stale_incomplete", "mixed_runs", "checkpoints"}
    assert (entry["run"], entry["refusal"], entry["mixed_runs"]) == ("run", None, None)
    names = {
        "name", "step", "epoch", "complete", "incomplete_reason", "metrics", "metric_sources", "missing_metrics",
        "size_bytes", "decision", "reasons",
    }  # fmt: skip
    for c in entry["checkpoints"]:
        assert set(c) == names
        assert c["complete"] is True and c["incomplete_reason"] is None
        assert c["decision"] in ("keep", "delete")
        assert c["reasons"]
        assert c["size_bytes"] == sum(p.stat().st_size for p in (run / c["name"]).rglob("*"))
    by_step = {c["step"]: c for c in entry["checkpoints"]}
    assert sorted(by_step) == [10, 20, 30, 40, 50, 60, 70, 78]
    assert by_step[20]["metrics"]["eval_loss"] == "nan"  # a string: bare NaN is not JSON
    assert isinstance(by_step[30]["metrics"]["eval_loss"], float)
    finite = sorted((c["metrics"]["eval_loss"], step) for step, c in by_step.items() if step != 20)
    for rank, (loss, step) in enumerate(finite[:2], start=1):
        assert f"best eval_loss={loss:.4f} ({rank}/2)" in [r["text"] for r in by_step[step]["reasons"]]
    assert [r["text"] for r in by_step[78]["reasons"]][-3:] == [
        "last 1/1",
        "protected: newest",
        "protected: trainer best",
    ]
    assert by_step[78]["epoch"] == 3.0
    kept = [c for c in entry["checkpoints"] if c["decision"] == "keep"]
    removed = [c for c in entry["checkpoints"] if c["decision"] != "keep"]
    assert data["summary"] == {
        "checkpoints": 8,
        "kept": len(kept),
        "weights_only": 0,
        "removed": len(removed),
        "refused": False,
        "bytes_kept": sum(c["size_bytes"] for c in kept),
        "bytes_to_free": sum(c["size_bytes"] for c in removed),
    }
    # The JSON and the text view agree on every decision.
    text = cli("plan", run.parent, "--keep", "best:2,last:1").output.splitlines()
    text_decisions = {int(r.split()[1]): decision(r) for r in text if r.startswith("  checkpoint-")}
    assert text_decisions == {s: c["decision"] for s, c in by_step.items()}


def test_plan_json_with_archive_and_a_refusal_is_still_json_on_stdout(outputs_a: Path, tmp_path: Path) -> None:
    result = cli("plan", outputs_a, "--keep", "best:1:acuracy", "--json", "--archive-to", tmp_path / "arch")
    assert result.exit_code == 3
    data = _strict_json(result.stdout)
    assert isinstance(data, dict)
    assert data["archive_to"] == str(tmp_path / "arch")
    assert data["runs"][0]["refusal"].startswith(
        "rule 'best:1:eval_acuracy': no checkpoint has eval_acuracy; did you mean eval_accuracy?"
    )
    assert {c["decision"] for c in data["runs"][0]["checkpoints"]} == {"keep"}
    assert data["summary"]["refused"] is True
    assert data["summary"]["removed"] == 0
    assert data["summary"]["bytes_to_free"] == 0
    assert result.stderr.startswith("Error: refused in run 'A'; nothing would be removed: rule 'best:1:eval_acuracy'")


def test_plan_changes_nothing_on_disk(outputs_a: Path, sim_run: Callable[..., Path]) -> None:
    sim_run("sweep/lr-1e-4")
    before = snapshot(outputs_a)
    for extra in ([], ["--json"], ["--archive-to", str(outputs_a.parent / "arch")]):
        result = cli("plan", outputs_a, "--keep", "last:1", *extra)
        assert result.exit_code == 0, result.output
    assert snapshot(outputs_a) == before
    assert not (outputs_a / "_ckptkeeper").exists()
    assert not (outputs_a.parent / "arch").exists()


def test_plan_shows_a_truncated_trainer_state_as_incomplete_and_prune_keeps_it(outputs_a: Path) -> None:
    state = outputs_a / "A" / "checkpoint-30" / "trainer_state.json"
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])  # the Trainer writes this file in place: a reader can see it cut
    result = cli("plan", outputs_a, "--keep", "last:1")
    assert result.exit_code == 0, result.output
    [row] = [line for line in lines(result) if line.startswith("  checkpoint-30 ")]
    assert re.fullmatch(
        r"  checkpoint-30    30      -  35\.0 kB  keep      incomplete: trainer_state\.json is not valid JSON "
        r"\(.+ at byte \d+\)",
        row,
    ), row
    kept_before = snapshot(outputs_a / "A" / "checkpoint-30")
    pruned = cli("prune", outputs_a, "--keep", "last:1")
    assert pruned.exit_code == 0, pruned.output
    assert checkpoints(outputs_a / "A") == {30, 78}
    assert snapshot(outputs_a / "A" / "checkpoint-30") == kept_before


def test_settle_keeps_a_checkpoint_changed_moments_ago(sim_run: Callable[..., Path]) -> None:
    run = sim_run("run")
    result = cli("plan", run.parent, "--keep", "last:1", "--settle", "3600")
    assert result.exit_code == 0, result.output
    rows = [line for line in lines(result) if line.startswith("  checkpoint-")]
    assert len(rows) == 8
    assert all(re.search(r"  keep      incomplete: changed \d+\.\d s ago \(settle 3600 s\)$", r) for r in rows), rows
    pruned = cli("prune", run.parent, "--keep", "last:1", "--settle", "3600")
    assert pruned.exit_code == 0, pruned.output
    assert lines(pruned)[-1] == "Done: removed 0 checkpoints, freed 0 B. Kept 8."
    assert len(checkpoints(run)) == 8


@pytest.mark.parametrize("command", ["plan", "prune"])
def test_a_directory_without_checkpoints_is_not_an_error(tmp_path: Path, command: str) -> None:
    root = tmp_path / "empty"
    (root / "exp1" / "checkpoint-abc").mkdir(parents=True)
    (root / "exp1" / "checkpoint-10.bak").mkdir()
    (root / "exp1" / "checkpoint-20").write_text("a file, not a checkpoint")
    result = cli(command, root, "--keep", "last:1")
    assert result.exit_code == 0, result.output
    assert f"No checkpoint-N directories found below {root} (searched 4 levels deep)." in lines(result)
    assert sorted(p.name for p in (root / "exp1").iterdir()) == ["checkpoint-10.bak", "checkpoint-20", "checkpoint-abc"]


# --- prune -------------------------------------------------------------------------------------------------


def test_prune_prints_each_action_and_the_totals(outputs_a: Path) -> None:
    kept_before = {s: snapshot(outputs_a / "A" / f"checkpoint-{s}") for s in KEPT_A}
    result = cli("prune", outputs_a, "--keep", KEEP_A)
    assert result.exit_code == 0, result.output
    assert lines(result) == [
        POLICY_A,
        f"Root: {outputs_a}",
        *(f"deleted       A/checkpoint-{s}  {size}  no rule keeps it" for s, size in REMOVED_A.items()),
        "Done: removed 4 checkpoints, freed 146.5 kB. Kept 4.",
    ]
    assert checkpoints(outputs_a / "A") == KEPT_A
    assert {s: snapshot(outputs_a / "A" / f"checkpoint-{s}") for s in KEPT_A} == kept_before  # mtimes untouched
    assert os.listdir(outputs_a / "_ckptkeeper" / "trash") == []
    journal = per_removal(
        [json.loads(line) for line in (outputs_a / "_ckptkeeper" / "journal.jsonl").read_text().splitlines()]
    )
    # Each removal is journaled twice: its intent before acting, then its outcome.
    assert [(e["action"], e["run"], e["checkpoint"], e["bytes"] > 0) for e in journal] == [
        (action, "A", f"checkpoint-{s}", True) for s in REMOVED_A for action in ("start-delete", "delete")
    ]
    assert all(e["why"] == f"no rule keeps it (keep {KEEP_A})" for e in journal)
    assert all(start["bytes"] == done["bytes"] for start, done in zip(journal[::2], journal[1::2], strict=True))


def test_prune_twice_removes_nothing_the_second_time(outputs_a: Path) -> None:
    assert cli("prune", outputs_a, "--keep", KEEP_A).exit_code == 0
    before = snapshot(outputs_a / "A")
    again = cli("prune", outputs_a, "--keep", KEEP_A)
    assert again.exit_code == 0, again.output
    assert lines(again) == [POLICY_A, f"Root: {outputs_a}", "Done: removed 0 checkpoints, freed 0 B. Kept 4."]
    assert snapshot(outputs_a / "A") == before


def test_prune_dry_run_prints_would_delete_and_changes_nothing(outputs_a: Path) -> None:
    before = snapshot(outputs_a)
    result = cli("prune", outputs_a, "--keep", KEEP_A, "--dry-run")
    assert result.exit_code == 0, result.output
    assert lines(result) == [
        POLICY_A,
        f"Root: {outputs_a}",
        *(f"would delete  A/checkpoint-{s}  {size}  no rule keeps it" for s, size in REMOVED_A.items()),
        "Dry run: would remove 4 checkpoints and free 146.5 kB; nothing was changed. Kept 4.",
    ]
    assert snapshot(outputs_a) == before
    assert not (outputs_a / "_ckptkeeper").exists()


def test_prune_archive_keeps_the_run_path_below_the_archive(outputs_a: Path, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    result = cli("prune", outputs_a, "--keep", KEEP_A, "--archive-to", archive)
    assert result.exit_code == 0, result.output
    assert lines(result) == [
        POLICY_A.replace("delete the rest", f"archive to {archive} the rest"),
        f"Root: {outputs_a}",
        *(
            f"archived      A/checkpoint-{s}  {size}  no rule keeps it  (moved to {archive}/A/checkpoint-{s})"
            for s, size in REMOVED_A.items()
        ),
        "Done: removed 4 checkpoints; moved 4 checkpoints (146.5 kB) to the archive on the same filesystem, which "
        "frees no space. Kept 4.",
    ]
    assert checkpoints(outputs_a / "A") == KEPT_A
    assert sorted(p.name for p in archive.iterdir()) == ["A"]
    assert checkpoints(archive / "A") == set(REMOVED_A)
    for s in REMOVED_A:
        name = f"checkpoint-{s}"
        assert files_and_bytes(archive / "A" / name) == files_and_bytes(FIXTURE_A / name)


def test_prune_archive_of_a_root_that_is_the_run_itself(outputs_a: Path, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    result = cli("prune", outputs_a / "A", "--keep", KEEP_A, "--archive-to", archive)
    assert result.exit_code == 0, result.output
    assert (
        lines(result)[2]
        == f"archived      A/checkpoint-10  35.1 kB  no rule keeps it  (moved to {archive}/checkpoint-10)"
    )
    assert checkpoints(archive) == set(REMOVED_A)


@pytest.mark.parametrize("archive_arg", ["absolute", "relative"])
def test_an_archive_inside_the_root_is_refused(
    outputs_a: Path, monkeypatch: pytest.MonkeyPatch, archive_arg: str
) -> None:
    # SPEC: an archive directory inside the root is never scanned as runs "or the setting is refused".
    # ckptkeeper refuses it: a later pass without --archive-to would otherwise prune the archive.
    monkeypatch.chdir(outputs_a.parent)
    archive = outputs_a / "archive" if archive_arg == "absolute" else Path("outputs/archive")
    before = snapshot(outputs_a)
    for command in ("plan", "prune"):
        result = cli(command, "outputs", "--keep", "last:2", "--archive-to", archive)
        assert result.exit_code == 2, result.output
        assert result.output == (
            f"Error: --archive-to {archive} is inside the root {outputs_a}: choose a directory outside it, "
            "or ckptkeeper would later see the archive as runs and prune it\n"
        )
    assert snapshot(outputs_a) == before


@pytest.mark.parametrize("where", ["root", "parent", "link to root"])
def test_an_archive_that_is_or_contains_the_root_is_a_usage_error(outputs_a: Path, tmp_path: Path, where: str) -> None:
    archive = {"root": outputs_a, "parent": tmp_path, "link to root": tmp_path / "link"}[where]
    if where == "link to root":
        archive.symlink_to(outputs_a, target_is_directory=True)
    before = snapshot(outputs_a)
    for command in ("plan", "prune"):
        result = cli(command, outputs_a, "--keep", "last:1", "--archive-to", archive)
        assert result.exit_code == 2, result.output
        if where == "parent":
            message = f"--archive-to {archive} contains the root {outputs_a}: choose a directory apart from it"
        else:  # the root itself, or the root reached through a link: named both ways
            message = (
                f"--archive-to {archive} is the root {outputs_a} (the same directory, reached another way: a link "
                "or a second mount): archiving there would delete each checkpoint it claims to keep"
            )
        assert result.output == f"Error: {message}\n"
    assert snapshot(outputs_a) == before


def test_an_archive_below_a_file_is_a_usage_error(outputs_a: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    before = snapshot(outputs_a)
    result = cli("prune", outputs_a, "--keep", "last:1", "--archive-to", blocker / "sub")
    assert result.exit_code == 2, result.output
    assert result.output == f"Error: --archive-to {blocker / 'sub'}: {blocker} is not a directory\n"
    assert snapshot(outputs_a) == before


def test_an_archive_run_directory_that_cannot_be_made_is_a_failure_not_a_crash(outputs_a: Path, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "A").write_text("in the way")
    before = snapshot(outputs_a / "A")
    result = cli("prune", outputs_a, "--keep", KEEP_A, "--archive-to", archive)
    assert not isinstance(result.exception, OSError), result.exception
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines()[2:] == [
        *(
            f"FAILED        A/checkpoint-{s}  (cannot create the archive directory {archive}/A: Not a directory)"
            for s in REMOVED_A
        ),
        "Done: removed 0 checkpoints, freed 0 B; 4 failed (see above). Kept 4.",
    ]
    assert result.stderr == "Error: 4 checkpoints could not be removed (see the FAILED lines above)\n"
    assert checkpoints(outputs_a / "A") == {10, 20, 30, 40, 50, 60, 70, 78}
    assert snapshot(outputs_a / "A") == before
    assert (archive / "A").read_text() == "in the way"


# --- exit codes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keep", "problem"),
    [
        ("bestt:1", "invalid rule 'bestt:1': unknown rule 'bestt'."),
        ("best:0", "invalid rule 'best:0': '0' is not a positive integer."),
        ("last:x", "invalid rule 'last:x': 'x' is not a positive integer."),
        ("epoch:", "invalid rule 'epoch:': wrong number of parts for 'epoch'."),
        ("best:1:loss:up", "invalid rule 'best:1:loss:up': direction must be min or max, not 'up'."),
        ("best:1,lastt:5", "invalid rule 'lastt:5': unknown rule 'lastt'."),
        ("last:1,,best:1", "invalid rules 'last:1,,best:1': an empty rule between commas."),
    ],
)
def test_a_bad_rule_is_a_usage_error_naming_the_rule(outputs_a: Path, keep: str, problem: str) -> None:
    before = snapshot(outputs_a)
    for command in ("plan", "prune"):
        result = cli(command, outputs_a, "--keep", keep)
        assert result.exit_code == 2, result.output
        assert lines(result)[-1] == f"Error: Invalid value for '--keep' / '-k': {problem} Valid forms: {VALID_FORMS}."
    assert snapshot(outputs_a) == before


@pytest.mark.parametrize("command", ["plan", "prune"])
def test_no_rule_is_refused(outputs_a: Path, command: str) -> None:
    before = snapshot(outputs_a)
    result = cli(command, outputs_a)
    assert result.exit_code == 3
    assert result.output == NO_RULE + "\n"
    assert snapshot(outputs_a) == before


def test_a_typo_in_a_metric_is_refused_and_nothing_is_removed_in_any_run(hf_run: Callable[[str], Path]) -> None:
    hf_run("A")
    hf_run("B")
    root = hf_run("D2").parent  # D2 has no eval at all: not refused itself, but must not be pruned either
    runs = ("A", "B", "D2")
    before = {run: snapshot(root / run) for run in runs}
    metrics = "eval_accuracy, eval_loss, eval_runtime, eval_samples_per_second, eval_steps_per_second"
    refusal = (
        f"rule 'best:1:eval_acuracy': no checkpoint has eval_acuracy; did you mean eval_accuracy? "
        f"(the run's metrics: {metrics})"
    )
    each_run = "".join(f"  {run}: {refusal}\n" for run in ("A", "B"))

    pruned = cli("prune", root, "--keep", "best:1:acuracy,last:1")
    assert pruned.exit_code == 3
    assert pruned.stderr == f"Error: refused in 2 runs; nothing was removed:\n{each_run}"
    assert {run: snapshot(root / run) for run in runs} == before

    planned = cli("plan", root, "--keep", "best:1:acuracy,last:1")
    assert planned.exit_code == 3
    assert planned.stderr == f"Error: refused in 2 runs; nothing would be removed:\n{each_run}"
    out = planned.stdout.splitlines()
    assert [line for line in out if line.startswith("  REFUSED: ")] == [f"  REFUSED: {refusal}"] * 2
    assert out[-1] == "Summary: 14 checkpoints in 3 runs: refused in 2 runs (see REFUSED above), so nothing is removed"
    assert {run: snapshot(root / run) for run in runs} == before


def test_a_best_rule_on_a_run_without_eval_is_not_refused(hf_run: Callable[[str], Path]) -> None:
    root = hf_run("D2").parent
    result = cli("prune", root, "--keep", "best:1:acuracy,last:1")
    assert result.exit_code == 0, result.output
    assert checkpoints(root / "D2") == {52}


def test_root_problems_are_usage_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = cli("prune", missing, "--keep", "last:1")
    assert (result.exit_code, result.output) == (2, f"Error: root {missing} does not exist\n")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = cli("plan", a_file, "--keep", "last:1")
    assert (result.exit_code, result.output) == (2, f"Error: root {a_file} is not a directory\n")
    result = cli("plan", "--keep", "last:1")
    assert result.exit_code == 2
    assert lines(result)[-1] == (
        "Error: missing ROOT: the directory that holds your runs (or CKPTKEEPER_ROOT, or `root:` in --config)"
    )
    assert not missing.exists()


def test_an_unknown_option_is_a_usage_error(outputs_a: Path) -> None:
    result = cli("prune", outputs_a, "--keep", "last:1", "--max-depht", "2")
    assert result.exit_code == 2
    assert lines(result)[-1] == "Error: No such option '--max-depht'. Did you mean '--max-depth'?"


HOLD_LOCK = """
import sys
from pathlib import Path
from ckptkeeper.state import StateDir
state = StateDir(Path(sys.argv[1]))
state.acquire_lock(Path(sys.argv[2]))
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin
"""


def _wait_for_line(proc: subprocess.Popen[str], deadline: float) -> str:
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            return proc.stdout.readline().strip()
        if proc.poll() is not None:
            break
    pytest.fail(f"the lock holder did not start (exit {proc.poll()})")


def test_a_second_instance_on_the_same_root_exits_4(outputs_a: Path) -> None:
    state_dir = outputs_a / "_ckptkeeper"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(state_dir), str(outputs_a)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert _wait_for_line(holder, time.monotonic() + 30) == "locked"
        before = snapshot(outputs_a, skip=["_ckptkeeper"])
        result = cli("prune", outputs_a, "--keep", KEEP_A)
        assert result.exit_code == 4
        assert result.stderr == (
            f"Error: another ckptkeeper (pid {holder.pid} on {socket.gethostname()}) is already working on "
            f"{outputs_a}; only one instance may run per root (lock: {outputs_a / '_ckptkeeper.lock'})\n"
        )
        assert snapshot(outputs_a, skip=["_ckptkeeper"]) == before
        assert cli("prune", outputs_a, "--keep", KEEP_A, "--dry-run").exit_code == 0  # a dry run takes no lock
        assert cli("plan", outputs_a, "--keep", KEEP_A).exit_code == 0
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    result = cli("prune", outputs_a, "--keep", KEEP_A)  # the holder is gone: its lock went with it
    assert result.exit_code == 0, result.output
    assert checkpoints(outputs_a / "A") == KEPT_A


def test_an_archive_copy_that_differs_is_a_failure_and_the_checkpoint_stays_whole(
    outputs_a: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    (archive / "A" / "checkpoint-10").mkdir(parents=True)
    (archive / "A" / "checkpoint-10" / "notes.txt").write_text("someone else's")
    source = outputs_a / "A" / "checkpoint-10"
    before = snapshot(source)
    result = cli("prune", outputs_a, "--keep", KEEP_A, "--archive-to", archive)
    assert result.exit_code == 1, result.output
    out = result.stdout.splitlines()
    assert out[2].startswith(
        f"FAILED        A/checkpoint-10  ({archive}/A/checkpoint-10 already exists and differs from {source}: "
    )
    assert out[3:6] == [
        f"archived      A/checkpoint-{s}  {size}  no rule keeps it  (moved to {archive}/A/checkpoint-{s})"
        for s, size in list(REMOVED_A.items())[1:]
    ]
    assert out[6] == (
        "Done: removed 3 checkpoints; moved 3 checkpoints (111.4 kB) to the archive on the same filesystem, which "
        "frees no space; 1 failed (see above). Kept 4."
    )
    assert result.stderr == "Error: 1 checkpoint could not be removed (see the FAILED lines above)\n"
    assert snapshot(source) == before
    assert (archive / "A" / "checkpoint-10" / "notes.txt").read_text() == "someone else's"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; the archive test covers exit 1")
def test_a_read_only_run_directory_is_a_failure(outputs_a: Path) -> None:
    run = outputs_a / "A"
    run.chmod(0o555)
    try:
        result = cli("prune", outputs_a, "--keep", KEEP_A)
    finally:
        run.chmod(0o755)
    assert result.exit_code == 1, result.output
    assert [line.split()[0] for line in result.stdout.splitlines()[2:6]] == ["FAILED"] * 4
    assert checkpoints(run) == KEPT_A | set(REMOVED_A)


def _chattr(flag: str, path: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", flag, str(path)], check=False, capture_output=True).returncode == 0


def test_a_trash_entry_that_cannot_be_finished_is_a_warning_and_the_prune_goes_on(outputs_a: Path) -> None:
    trash = outputs_a / "_ckptkeeper" / "trash"
    trash.mkdir(parents=True)
    left = trash / "aaaaaaaaaaaa.checkpoint-1"  # left by an interrupted removal
    left.mkdir()
    (left / "optimizer.pt").write_bytes(b"x" * 64)
    if os.geteuid() != 0 or not _chattr("+i", left / "optimizer.pt"):
        pytest.skip("needs root and a filesystem with the immutable attribute (chattr +i)")
    try:
        result = cli("prune", outputs_a, "--keep", KEEP_A)
        assert result.exit_code == 0, result.output
        assert result.stderr == (
            f"warning: could not finish removing {left}: Operation not permitted; it stays in the trash\n"
        )
        assert result.stdout.splitlines()[2:] == [
            *(f"deleted       A/checkpoint-{s}  {size}  no rule keeps it" for s, size in REMOVED_A.items()),
            "Done: removed 4 checkpoints, freed 146.5 kB. Kept 4.",
        ]
        assert checkpoints(outputs_a / "A") == KEPT_A
        assert os.listdir(trash) == [left.name]
        journal = per_removal(
            [json.loads(line) for line in (outputs_a / "_ckptkeeper" / "journal.jsonl").read_text().splitlines()]
        )
        assert {k: journal[0][k] for k in ("action", "entry", "why")} == {
            "action": "error",
            "entry": f"{left}: Operation not permitted",
            "why": "could not finish a removal left in the trash",
        }
        assert [e["action"] for e in journal[1:]] == ["start-delete", "delete"] * 4
    finally:
        _chattr("-i", left / "optimizer.pt")
    # Once it can be removed, the next prune finishes it.
    again = cli("prune", outputs_a, "--keep", KEEP_A)
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[2] == f"finished removing {left.name}, left in the trash by an interrupted run"
    assert os.listdir(trash) == []


def test_state_dir_option_moves_lock_and_journal(outputs_a: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = cli("prune", outputs_a, "--keep", KEEP_A, "--state-dir", state)
    assert result.exit_code == 0, result.output
    assert not (outputs_a / "_ckptkeeper").exists()
    # An intent line before each of the 4 removals, then its outcome line.
    journal = per_removal([json.loads(line) for line in (state / "journal.jsonl").read_text().splitlines()])
    assert [(e["action"], e["checkpoint"]) for e in journal] == [
        (action, f"checkpoint-{s}") for s in REMOVED_A for action in ("start-delete", "delete")
    ]


# --- demo --------------------------------------------------------------------------------------------------


def test_demo_watches_a_simulated_run_live_and_cleans_up() -> None:
    result = cli("demo", "--pace", "0.005")
    assert result.exit_code == 0, result.output
    out = lines(result)
    where = re.fullmatch(r"\$ ckptkeeper watch (.+) --keep best:1,last:5 --keep-weights epoch:all --settle 1", out[0])
    assert where is not None, out[0]
    root = Path(where.group(1))
    assert any(re.fullmatch(rf".* INFO +watching {re.escape(str(root))} \(inotify; settle 1 s;.*", x) for x in out)
    deleted = [x for x in out if re.fullmatch(r".* INFO +outputs/checkpoint-\d+ deleted: freed .*", x)]
    assert len(deleted) == 3  # the run the demo simulates: 10, 50 and 70 go (see the README)
    slimmed = [x for x in out if re.fullmatch(r".* INFO +outputs/checkpoint-(20|40|60) made weights only: .*", x)]
    assert len(slimmed) == 3  # the milestones of epochs 1 to 3 (the later ones are among the last 5)
    assert any(x.endswith("exiting (--exit-when-done)") for x in out)
    assert f"Training finished. Left in {root}, and why:" in out
    assert f"$ ckptkeeper plan {root} --keep best:1,last:5 --keep-weights epoch:all" in out
    assert any(x.startswith("  CHECKPOINT ") for x in out)
    assert "Summary: 9 checkpoints in 1 run: keep 9 (1.3 MB), remove 0 (0 B to free)" in out
    assert out[-1] == "(The demo directory was removed; pass --dir DIR to keep it.)"
    assert not root.parent.exists()


def test_demo_dir_keeps_what_is_left(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    result = cli("demo", "--dir", directory, "--keep", "last:2", "--pace", "0.005")
    assert result.exit_code == 0, result.output
    out = lines(result)
    assert "(The demo directory was removed; pass --dir DIR to keep it.)" not in out
    root = directory / "outputs"
    left = out[out.index(f"Training finished. Left in {root}, and why:") :]
    listed = {x.split()[0] for x in left if x.startswith("  checkpoint-")}
    on_disk = {p.name for p in root.iterdir() if p.name.startswith("checkpoint-")}
    # last:2 keeps 110 and 120; the Trainer's best (checkpoint-30 in this simulated run) is protected too.
    assert listed == on_disk == {"checkpoint-30", "checkpoint-110", "checkpoint-120"}
    deleted = [m.group(1) for x in out if (m := re.fullmatch(r".* outputs/(checkpoint-\d+) deleted: freed .*", x))]
    assert sorted(deleted) == sorted(f"checkpoint-{s}" for s in range(10, 101, 10) if s != 30)
    assert (root / "_ckptkeeper" / "journal.jsonl").exists()
    # A second demo in the same directory is refused: it would have to remove the first one's run
    # (tests/test_cli_hardening.py checks the message and that nothing changes).
    assert cli("demo", "--dir", directory, "--keep", "last:2", "--pace", "0.005").exit_code == 2
    assert {p.name for p in root.iterdir() if p.name.startswith("checkpoint-")} == on_disk


def test_demo_with_a_bad_rule_is_a_usage_error(tmp_path: Path) -> None:
    result = cli("demo", "--dir", tmp_path / "demo", "--keep", "lastt:2")
    assert result.exit_code == 2
    assert "invalid rule 'lastt:2'" in lines(result)[-1]
    assert not (tmp_path / "demo").exists()


# --- documentation -----------------------------------------------------------------------------------------


@pytest.mark.skipif(not README.exists(), reason="README.md is not written yet")
def test_every_command_is_documented() -> None:
    from ckptkeeper import cli as cli_module

    text = README.read_text(encoding="utf-8")
    for name in sorted(main.commands):
        assert f"ckptkeeper {name}" in text, f"README.md never shows `ckptkeeper {name}`"
    codes = sorted(v for k, v in vars(cli_module).items() if k.startswith("EXIT_") and isinstance(v, int))
    assert codes == [0, 1, 2, 3, 4]
    section = text.partition("## Exit codes")[2].partition("\n## ")[0]
    assert section, "README.md has no '## Exit codes' section"
    for code in codes:
        assert re.search(rf"^\|\s*{code}\s*\|", section, flags=re.MULTILINE), f"exit code {code} is not documented"
