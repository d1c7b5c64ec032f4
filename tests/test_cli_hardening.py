"""Hardening of the command line (issue #10 defects 13 and 15, issue #18's repeated config key).

`demo --dir DIR` removes nothing it did not create; a repeated `--keep` adds rules instead of replacing
them; a config file that gives a key twice is an error naming the key. Everything runs through the real
CLI (click's CliRunner on `ckptkeeper.cli.main`, or the installed program) on real directories.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ckptkeeper.cli import main

VALID_FORMS = (
    "last:N, best:N[:METRIC[:min|max]], epoch:all, epoch:N, every:K (N and K positive integers), separated by commas"
)
DEMO_REFUSED = ", and the demo never removes what it did not create: choose a --dir whose outputs is absent or empty"

WHEN_DONE = ("--exit-when-done", "--settle", "0")

Snapshot = dict[str, tuple[str, int, int, str]]


def cli(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    # The outer environment's CKPTKEEPER_* settings must not leak into what a test checks.
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CKPTKEEPER_")}
    return CliRunner().invoke(main, [str(a) for a in args], env={**clean, **(env or {})}, prog_name="ckptkeeper")


def snapshot(top: Path) -> Snapshot:
    """Every path below `top` -> (kind, size, mtime_ns, link target), links not followed."""
    found: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode) else "file"
            target = os.readlink(full) if kind == "link" else ""
            found[os.path.relpath(full, top)] = (kind, 0 if kind == "dir" else st.st_size, st.st_mtime_ns, target)
    return found


def checkpoints(run: Path) -> set[int]:
    return {int(p.name.removeprefix("checkpoint-")) for p in run.iterdir() if p.name.startswith("checkpoint-")}


def usage_error(result: Result, command: str, message: str) -> None:
    """Exit 2 with click's usage lines and exactly `message` as the error, on stderr."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"Usage: ckptkeeper {command} [OPTIONS]" + (" [ROOT]" if command != "demo" else ""),
        f"Try 'ckptkeeper {command} --help' for help.",
        "",
        f"Error: {message}",
    ]


# --- demo --dir: never removes what it did not create (issue #10, defect 13) -----------------------------------


def _run_a_inside(hf_run: Callable[[str], Path], place: Path) -> None:
    """A copy of the real run A at `place`/A (hf_run writes it at tmp_path/outputs/A)."""
    run = hf_run("A")
    place.mkdir(parents=True, exist_ok=True)
    run.rename(place / "A")


def _outputs_holding_a_run(tmp: Path, hf_run: Callable[[str], Path]) -> tuple[Path, str]:
    _run_a_inside(hf_run, tmp / "project" / "outputs")
    return tmp / "project", "is not empty"


def _outputs_holding_a_hidden_file(tmp: Path, hf_run: Callable[[str], Path]) -> tuple[Path, str]:
    (tmp / "project" / "outputs").mkdir(parents=True)
    (tmp / "project" / "outputs" / ".gitkeep").write_bytes(b"")
    return tmp / "project", "is not empty"


def _outputs_a_file(tmp: Path, hf_run: Callable[[str], Path]) -> tuple[Path, str]:
    (tmp / "project").mkdir()
    (tmp / "project" / "outputs").write_text("my notes\n")
    return tmp / "project", "exists and is not a directory"


def _outputs_a_link_to_a_run(tmp: Path, hf_run: Callable[[str], Path]) -> tuple[Path, str]:
    _run_a_inside(hf_run, tmp / "elsewhere")
    (tmp / "project").mkdir()
    (tmp / "project" / "outputs").symlink_to(tmp / "elsewhere")
    return tmp / "project", "is a symbolic link"


def _outputs_a_link_to_an_empty_directory(tmp: Path, hf_run: Callable[[str], Path]) -> tuple[Path, str]:
    (tmp / "elsewhere").mkdir()
    (tmp / "project").mkdir()
    (tmp / "project" / "outputs").symlink_to(tmp / "elsewhere")
    return tmp / "project", "is a symbolic link"


def _outputs_a_dangling_link(tmp: Path, hf_run: Callable[[str], Path]) -> tuple[Path, str]:
    (tmp / "project").mkdir()
    (tmp / "project" / "outputs").symlink_to(tmp / "nowhere")
    return tmp / "project", "is a symbolic link"


@pytest.mark.parametrize(
    "make",
    [
        _outputs_holding_a_run,
        _outputs_holding_a_hidden_file,
        _outputs_a_file,
        _outputs_a_link_to_a_run,
        _outputs_a_link_to_an_empty_directory,
        _outputs_a_dangling_link,
    ],
)
def test_demo_refuses_a_dir_whose_outputs_is_not_absent_or_empty_and_changes_nothing(
    tmp_path: Path, hf_run: Callable[[str], Path], make: Callable[[Path, Callable[[str], Path]], tuple[Path, str]]
) -> None:
    tmp = tmp_path / "t"
    tmp.mkdir()
    directory, why = make(tmp, hf_run)
    before = snapshot(tmp)
    result = cli("demo", "--dir", directory, "--pace", "0")
    usage_error(result, "demo", f"Invalid value for '--dir': {directory / 'outputs'} {why}{DEMO_REFUSED}")
    assert snapshot(tmp) == before


def test_demo_refuses_a_real_project_run_as_a_process(tmp_path: Path, hf_run: Callable[[str], Path]) -> None:
    """The reported case: `demo --dir .` in a project whose outputs/ holds a real run; the exit code reaches
    the shell and the run is intact, byte for byte."""
    hf_run("A")
    before = snapshot(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "ckptkeeper", "demo", "--dir", ".", "--pace", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines()[-1] == f"Error: Invalid value for '--dir': outputs is not empty{DEMO_REFUSED}"
    assert snapshot(tmp_path) == before
    assert checkpoints(tmp_path / "outputs" / "A") == {10, 20, 30, 40, 50, 60, 70, 78}


def test_demo_writes_into_an_empty_outputs_and_leaves_the_rest_of_dir_alone(tmp_path: Path) -> None:
    (tmp_path / "outputs").mkdir()
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / "other-run").mkdir()
    (tmp_path / "other-run" / "checkpoint-5").mkdir()
    result = cli("demo", "--dir", tmp_path, "--keep", "last:2", "--pace", "0.005")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in (tmp_path / "other-run").iterdir()) == ["checkpoint-5"]
    # last:2 keeps 110 and 120; the Trainer's best (checkpoint-30 in the simulated run) is protected too.
    assert checkpoints(tmp_path / "outputs") == {30, 110, 120}


def test_a_second_demo_in_the_same_dir_is_refused_and_the_first_run_stays(tmp_path: Path) -> None:
    first = cli("demo", "--dir", tmp_path, "--keep", "last:2", "--pace", "0.005")
    assert first.exit_code == 0, first.output
    before = snapshot(tmp_path)
    again = cli("demo", "--dir", tmp_path, "--pace", "0")
    usage_error(again, "demo", f"Invalid value for '--dir': {tmp_path / 'outputs'} is not empty{DEMO_REFUSED}")
    assert snapshot(tmp_path) == before


def test_demo_without_dir_removes_only_the_temporary_directory_it_made(tmp_path: Path) -> None:
    """The clean-up at the end removes the demo's own mkdtemp directory and nothing else in the temp dir,
    not even a directory named like a demo's."""
    tmp = tmp_path / "tmp"
    (tmp / "ckptkeeper-demo-mine" / "outputs" / "checkpoint-10").mkdir(parents=True)
    (tmp / "ckptkeeper-demo-mine" / "outputs" / "checkpoint-10" / "model.safetensors").write_bytes(b"x" * 10)
    (tmp / "unrelated.txt").write_text("keep me\n")
    before = snapshot(tmp)
    done = subprocess.run(
        [sys.executable, "-m", "ckptkeeper", "demo", "--pace", "0.005"],
        env={**os.environ, "TMPDIR": str(tmp)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    where = re.fullmatch(r"\$ ckptkeeper watch (.+) --keep best:1,last:5 --keep-weights epoch:all --settle 1", first)
    assert where is not None, first
    made = Path(where.group(1)).parent
    assert made.parent == tmp and made.name.startswith("ckptkeeper-demo-")
    assert done.stdout.splitlines()[-1] == "(The demo directory was removed; pass --dir DIR to keep it.)"
    assert snapshot(tmp) == before


# --- a repeated --keep merges (issue #10, defect 15) ------------------------------------------------------------


@pytest.fixture
def outputs_a(hf_run: Callable[[str], Path]) -> Path:
    """A root `outputs/` holding a copy of the real run A (steps 10..70 and 78, eval every 10)."""
    return hf_run("A").parent


@pytest.mark.parametrize(
    ("repeated", "joined"),
    [
        (["--keep", "last:2", "--keep", "best:1"], "last:2,best:1"),
        (["-k", "best:1", "--keep", "last:2", "-k", "epoch:all"], "best:1,last:2,epoch:all"),
        (["--keep", "best:1,last:2", "-k", "every:20"], "best:1,last:2,every:20"),
        (["--keep", "last:2", "--keep", "last:2"], "last:2,last:2"),  # a rule twice is harmless
    ],
)
def test_a_repeated_keep_plans_exactly_as_the_rules_joined_by_commas(
    outputs_a: Path, repeated: list[str], joined: str
) -> None:
    merged = cli("plan", outputs_a, *repeated, "--json")
    together = cli("plan", outputs_a, "--keep", joined, "--json")
    assert merged.exit_code == together.exit_code == 0, merged.output
    assert merged.stdout == together.stdout
    assert json.loads(merged.stdout)["keep"] == joined
    text = cli("plan", outputs_a, *repeated)
    assert text.exit_code == 0, text.output
    assert text.stdout == cli("plan", outputs_a, "--keep", joined).stdout


def test_prune_with_a_repeated_keep_removes_only_what_no_rule_keeps(outputs_a: Path) -> None:
    result = cli("prune", outputs_a, "--keep", "best:1", "--keep", "last:2", "--keep", "epoch:all")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        "Policy: keep the best 1 by eval_loss (lowest), the last 2, one per epoch (best:1,last:2,epoch:all); "
        "always keep the newest, incomplete ones, the Trainer's best; delete the rest"
    )
    # last:2 keeps 70 (and 78); epoch:all keeps 20 and 50: what `--keep best:1,last:2,epoch:all` keeps.
    assert checkpoints(outputs_a / "A") == {20, 50, 70, 78}


def test_watch_with_a_repeated_keep_applies_every_rule(outputs_a: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptkeeper",
            "watch",
            str(outputs_a),
            "-k",
            "last:2",
            "--keep",
            "epoch:all",
            *WHEN_DONE,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("CKPTKEEPER_")},
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r" INFO +A/checkpoint-70 kept: last 2/2$", done.stderr, flags=re.MULTILINE), done.stderr
    assert checkpoints(outputs_a / "A") == {20, 50, 70, 78}


def test_demo_with_a_repeated_keep_applies_every_rule(tmp_path: Path) -> None:
    result = cli("demo", "--dir", tmp_path, "-k", "last:2", "--keep", "every:40", "--pace", "0.005")
    assert result.exit_code == 0, result.output
    root = tmp_path / "outputs"
    assert result.stdout.splitlines()[0] == f"$ ckptkeeper watch {root} --keep last:2,every:40 --settle 1"
    # last:2: 110, 120; every:40: 40, 80, 120; the Trainer's best (30) is protected.
    assert checkpoints(root) == {30, 40, 80, 110, 120}


@pytest.mark.parametrize(
    ("rules", "bad", "why"),
    [
        (["last:2", "bestt:1"], "bestt:1", "unknown rule 'bestt'"),
        (["lastt:2", "best:1"], "lastt:2", "unknown rule 'lastt'"),  # the later flag used to hide the bad one
        (["best:1", "last:0", "epoch:all"], "last:0", "'0' is not a positive integer"),
    ],
)
def test_each_repeated_keep_is_checked_and_a_bad_one_is_a_usage_error(
    outputs_a: Path, rules: list[str], bad: str, why: str
) -> None:
    before = snapshot(outputs_a)
    flags = [part for rule in rules for part in ("--keep", rule)]
    result = cli("prune", outputs_a, *flags)
    message = f"Invalid value for '--keep' / '-k': invalid rule '{bad}': {why}. Valid forms: {VALID_FORMS}."
    usage_error(result, "prune", message)
    assert snapshot(outputs_a) == before


def test_an_empty_keep_among_others_adds_no_rule_and_alone_gives_none(outputs_a: Path) -> None:
    merged = cli("plan", outputs_a, "--keep", "last:2", "--keep", "", "--json")
    assert merged.exit_code == 0, merged.output
    assert json.loads(merged.stdout)["keep"] == "last:2"
    alone = cli("prune", outputs_a, "--keep", "", "--keep", " ")
    assert alone.exit_code == 3
    assert alone.stderr == (
        "Error: refused: no keep rule given: refusing to remove anything (pass --keep, e.g. --keep last:5)\n"
    )


def test_repeated_keep_flags_replace_the_environment_and_config_file_keep_as_a_whole(
    outputs_a: Path, tmp_path: Path
) -> None:
    config = tmp_path / "retention.yaml"
    config.write_text("keep: [epoch:all]\n")
    env = {"CKPTKEEPER_KEEP": "every:30"}
    from_flags = cli("plan", outputs_a, "--config", config, "-k", "last:2", "-k", "best:1", "--json", env=env)
    assert from_flags.exit_code == 0, from_flags.output
    assert json.loads(from_flags.stdout)["keep"] == "last:2,best:1"
    from_env = cli("plan", outputs_a, "--config", config, "--json", env=env)
    assert json.loads(from_env.stdout)["keep"] == "every:30"
    from_file = cli("plan", outputs_a, "--config", config, "--json")
    assert json.loads(from_file.stdout)["keep"] == "epoch:all"


def test_the_keep_help_says_it_repeats_and_what_it_overrides() -> None:
    result = cli("prune", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert (
        "-k, --keep RULES Keep rules, comma-separated: last:N, best:N[:METRIC[:min|max]], epoch:all|N, every:K. "
        "Repeat --keep to add rules (merged as if joined by commas). Given, they replace the `keep` of "
        "CKPTKEEPER_KEEP and of --config as a whole (flags over environment over config file)."
    ) in text


# --- a config file that gives a key twice (issue #18) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "keep: [best:1, last:5]\nmax_depth: 2\nkeep: [epoch:all]\n",
            "at line 3, column 1: the key 'keep' is given twice (first at line 1); merge them into one",
        ),
        (
            'keep: last:5\n"keep": best:1\n',
            "at line 2, column 1: the key 'keep' is given twice (first at line 1); merge them into one",
        ),
        (
            "keep:\n  - last:5\nsettle: 1\nsettle: 2\n",
            "at line 4, column 1: the key 'settle' is given twice (first at line 3); merge them into one",
        ),
        # nested mappings too, block and flow, though no setting holds one: the repeat is what is reported
        (
            "keep: [last:1]\nroot:\n  path: a\n  other: b\n  path: c\n",
            "at line 5, column 3: the key 'path' is given twice (first at line 3); merge them into one",
        ),
        (
            "keep: [last:1, {best: 1, best: 2}]\n",
            "at line 1, column 26: the key 'best' is given twice (first at line 1); merge them into one",
        ),
        (
            "base: &b {keep: [last:1]}\n<<: *b\n<<: *b\n",
            "at line 3, column 1: the key '<<' is given twice (first at line 2); merge them into one",
        ),
    ],
)
def test_a_yaml_config_that_gives_a_key_twice_is_a_config_error_naming_it(
    outputs_a: Path, tmp_path: Path, text: str, problem: str
) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(text)
    before = snapshot(outputs_a)
    result = cli("prune", outputs_a, "--config", config)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr == f"Error: cfg.yaml: invalid YAML {problem}\n"
    assert snapshot(outputs_a) == before


def test_a_yaml_merge_key_may_be_overridden_once(outputs_a: Path, tmp_path: Path) -> None:
    """`<<` gives defaults that a key of the mapping itself overrides: that is YAML, not a repeat."""
    config = tmp_path / "cfg.yaml"
    config.write_text("<<: {keep: [last:1], max_depth: 1}\nkeep: [last:2]\n")
    result = cli("plan", outputs_a, "--config", config, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["keep"] == "last:2"


def test_a_toml_config_that_gives_a_key_twice_is_a_config_error_saying_so(outputs_a: Path, tmp_path: Path) -> None:
    config = tmp_path / "sweep.toml"
    config.write_text("keep = ['best:1', 'last:5']\nmax_depth = 2\nkeep = ['epoch:all']\n")
    before = snapshot(outputs_a)
    result = cli("prune", outputs_a, "--config", config)
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        "Error: sweep.toml: invalid TOML: Cannot overwrite a value (at line 3, column 21): "
        "that key (or a table of that name) is already set above; give each key once\n"
    )
    assert snapshot(outputs_a) == before
