"""Errors a person can act on, through the command: a refusal names each refused run on its own line and the
metric meant; a bad value names the flag, variable or file key it was given as; a missing ROOT names every way
to give it; --help and the example configs hold no internal words; shell completion works as the README says.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from ckptkeeper.cli import main
from ckptkeeper.config import flag_name
from ckptkeeper.policy import closest_metric
from ckptkeeper.settings import Settings
from ckptkeeper.simtrainer import SimConfig, simulate_run

PROJECT = Path(__file__).resolve().parent.parent
README = PROJECT / "README.md"
CONFIGS = PROJECT / "configs"

METRICS = "eval_accuracy, eval_loss, eval_runtime, eval_samples_per_second, eval_steps_per_second"
WITH_EVAL = SimConfig(steps_per_epoch=10, epochs=3)
WITHOUT_EVAL = SimConfig(steps_per_epoch=10, epochs=3, eval_strategy="no", metric_for_best_model=None)


def cli(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def readme_root(tmp_path: Path, *more: str) -> Path:
    """The root of the README's refusal example (exp1 with evals, exp2 without), and `more` runs like exp1."""
    root = tmp_path / "outputs"
    simulate_run(root / "exp1", WITH_EVAL)
    simulate_run(root / "exp2", WITHOUT_EVAL)
    for name in more:
        simulate_run(root / name, WITH_EVAL)
    return root


def listing(root: Path) -> list[str]:
    """Every path of the runs below `root` (not ckptkeeper's own state directory and lock)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.relative_to(root).parts[0].startswith("exp"))


# --- a refusal: each refused run on its own line, with the metric meant


@pytest.mark.parametrize(
    ("command", "nothing"), [("plan", "nothing would be removed"), ("prune", "nothing was removed")]
)
def test_a_refusal_in_one_run_is_one_line_naming_the_run(tmp_path: Path, command: str, nothing: str) -> None:
    root = readme_root(tmp_path)
    before = listing(root)
    result = cli(command, root, "--keep", "best:1:acuracy,last:1")
    assert result.exit_code == 3, result.output
    assert result.stderr == (
        f"Error: refused in run 'exp1'; {nothing}: rule 'best:1:eval_acuracy': no checkpoint has eval_acuracy; "
        f"did you mean eval_accuracy? (the run's metrics: {METRICS})\n"
    )
    assert listing(root) == before


@pytest.mark.parametrize(
    ("command", "nothing"), [("plan", "nothing would be removed"), ("prune", "nothing was removed")]
)
def test_a_refusal_in_several_runs_lists_each_run_on_its_own_line(tmp_path: Path, command: str, nothing: str) -> None:
    root = readme_root(tmp_path, "exp3")
    before = listing(root)
    result = cli(command, root, "--keep", "best:1:los,last:1")
    assert result.exit_code == 3, result.output
    why = f"rule 'best:1:eval_los': no checkpoint has eval_los; did you mean eval_loss? (the run's metrics: {METRICS})"
    assert result.stderr == f"Error: refused in 2 runs; {nothing}:\n  exp1: {why}\n  exp3: {why}\n"
    assert listing(root) == before


def test_the_plan_table_and_json_give_each_run_the_same_refusal(tmp_path: Path) -> None:
    root = readme_root(tmp_path, "exp3")
    why = f"rule 'best:1:eval_los': no checkpoint has eval_los; did you mean eval_loss? (the run's metrics: {METRICS})"
    text = cli("plan", root, "--keep", "best:1:los,last:1")
    assert [line for line in text.stdout.splitlines() if line.startswith("  REFUSED: ")] == [f"  REFUSED: {why}"] * 2
    data = json.loads(cli("plan", root, "--keep", "best:1:los,last:1", "--json").stdout)
    assert {run["run"]: run["refusal"] for run in data["runs"]} == {"exp1": why, "exp2": None, "exp3": why}


def test_the_readme_refusal_examples_are_what_the_commands_print(tmp_path: Path) -> None:
    """Made as the README's HTML comments say: the error lines shown there are the ones printed now."""
    text = README.read_text(encoding="utf-8")
    root = readme_root(tmp_path)
    for command in ("plan", "prune"):
        stderr = cli(command, root, "--keep", "best:1:acuracy,last:1").stderr
        assert stderr.splitlines()[0] in text.splitlines(), stderr
    simulate_run(root / "exp3", WITH_EVAL)
    stderr = cli("prune", root, "--keep", "best:1:los,last:1").stderr
    start = text.index("$ ckptkeeper prune ./outputs --keep best:1:los,last:1\n...\n")
    shown = text[start:].split("\n```", 1)[0].split("...\n", 1)[1]
    assert shown + "\n" == stderr


@pytest.mark.parametrize(
    ("rule", "meant"),
    [
        ("best:1:acuracy", "eval_accuracy"),  # the prefix is the rule's: compared without it
        ("best:1:eval_acuracy", "eval_accuracy"),
        ("best:1:eval_los", "eval_loss"),
        ("best:1:los", "eval_loss"),
        ("best:1:accurracy:max", "eval_accuracy"),
        ("best:1:Accuracy", "eval_accuracy"),
        ("best:1:f1", None),  # nothing close: no suggestion (eval_f1 is not eval_loss for their shared prefix)
        ("best:1:bleu", None),
    ],
)
def test_the_refusal_suggests_the_closest_metric_only_when_one_is_close(tmp_path: Path, rule: str, meant: str) -> None:
    root = tmp_path / "outputs"
    simulate_run(root / "exp1", WITH_EVAL)
    result = cli("plan", root, "--keep", rule, "--json")
    assert result.exit_code == 3, result.output
    [refusal] = [run["refusal"] for run in json.loads(result.stdout)["runs"]]
    assert refusal.endswith(f" (the run's metrics: {METRICS})")
    if meant is None:
        assert "did you mean" not in refusal
    else:
        assert f"; did you mean {meant}? (" in refusal


def test_closest_metric_compares_without_the_eval_prefix() -> None:
    present = ["eval_accuracy", "eval_loss", "eval_runtime"]
    assert closest_metric("eval_acuracy", present) == "eval_accuracy"
    assert closest_metric("eval_los", present) == "eval_loss"
    assert closest_metric("eval_f1", present) is None
    assert closest_metric("eval_loss", []) is None


# --- a bad value names the flag, the variable, or the file and key it came from

BAD_FLAGS = [
    ("watch", "--poll", "0", "Input should be greater than 0"),
    ("watch", "--poll", "-1", "Input should be greater than 0"),
    ("watch", "--poll", "3601", "Input should be less than or equal to 3600"),
    ("watch", "--rescan-interval", "0", "Input should be greater than 0"),
    ("watch", "--grace", "0", "Input should be greater than 0"),
    ("watch", "--metrics-port", "70000", "Input should be less than or equal to 65535"),
    ("watch", "--metrics-port", "-1", "Input should be greater than or equal to 0"),
    ("watch", "--max-depth", "-1", "Input should be greater than or equal to 0"),
    ("watch", "--settle", "-1", "Input should be greater than or equal to 0"),
    ("plan", "--max-depth", "-1", "Input should be greater than or equal to 0"),
    ("plan", "--max-depth", "65", "Input should be less than or equal to 64"),
    ("plan", "--settle", "-1", "Input should be greater than or equal to 0"),
    ("prune", "--settle", "3601", "Input should be less than or equal to 3600"),
]


@pytest.mark.parametrize(("command", "flag", "value", "problem"), BAD_FLAGS)
def test_a_bad_flag_value_names_the_flag(tmp_path: Path, command: str, flag: str, value: str, problem: str) -> None:
    result = cli(command, tmp_path, "--keep", "last:1", flag, value)
    assert (result.exit_code, result.output) == (2, f"Error: {flag}: {problem}\n")
    assert list(tmp_path.iterdir()) == []  # nothing was made: no state directory, lock or journal


def test_a_bad_value_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    result = cli("watch", tmp_path, "--keep", "last:1", env={"CKPTKEEPER_POLL": "0"})
    assert (result.exit_code, result.output) == (2, "Error: CKPTKEEPER_POLL: Input should be greater than 0\n")
    result = cli("plan", tmp_path, "--keep", "last:1", env={"CKPTKEEPER_METRICS_PORT": "70000"})
    assert result.output == "Error: CKPTKEEPER_METRICS_PORT: Input should be less than or equal to 65535\n"


def test_a_bad_value_from_a_config_file_names_the_file_and_the_key(tmp_path: Path) -> None:
    config = tmp_path / "watch.yaml"
    config.write_text("keep: [last:1]\npoll: 0\nrescan_interval: 0\n", encoding="utf-8")
    result = cli("watch", tmp_path, "--config", config)
    assert (result.exit_code, result.output) == (
        2,
        "Error: watch.yaml: rescan_interval: Input should be greater than 0\n"
        "watch.yaml: poll: Input should be greater than 0\n",
    )


def test_a_bad_flag_over_a_good_variable_names_the_flag(tmp_path: Path) -> None:
    result = cli("watch", tmp_path, "--keep", "last:1", "--poll", "0", env={"CKPTKEEPER_POLL": "5"})
    assert (result.exit_code, result.output) == (2, "Error: --poll: Input should be greater than 0\n")


def test_pressure_rules_without_a_floor_name_the_flag(tmp_path: Path) -> None:
    result = cli("plan", tmp_path, "--keep", "last:1", "--keep-under-pressure", "last:2")
    assert result.exit_code == 2
    assert result.output.startswith("Error: --keep-under-pressure: keep_under_pressure (--keep-under-pressure) needs")


def test_every_setting_is_named_by_a_flag_the_commands_have() -> None:
    """The flag an error names (config.flag_name) is one a command takes, for every setting."""
    options = {opt for command in main.commands.values() for p in command.params for opt in p.opts}
    fields = [f.name for f in dataclasses.fields(Settings)]
    assert {name: flag_name(name) in options for name in fields if name != "root"} == {
        name: True for name in fields if name != "root"
    }
    assert flag_name("root") == "ROOT"


# --- a missing ROOT names every way to give it

MISSING_ROOT = "Error: missing ROOT: the directory that holds your runs (or CKPTKEEPER_ROOT, or `root:` in {})"


@pytest.mark.parametrize(
    ("command", "config"),
    [
        ("plan", "--config"),
        ("prune", "--config"),
        ("watch", "--config"),
        ("history", "the $CKPTKEEPER_CONFIG file"),
    ],
)
def test_a_missing_root_names_the_variable_and_the_config_key(tmp_path: Path, command: str, config: str) -> None:
    args = [command] if command == "history" else [command, "--keep", "last:1"]
    result = cli(*args)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == MISSING_ROOT.format(config)


def test_the_root_from_ckptkeeper_root_is_used_by_plan_and_history(tmp_path: Path) -> None:
    root = readme_root(tmp_path)
    planned = cli("plan", "--keep", "last:1", env={"CKPTKEEPER_ROOT": str(root)})
    assert planned.exit_code == 0, planned.output
    assert f"Root: {root}" in planned.stdout
    history = cli("history", env={"CKPTKEEPER_ROOT": str(root)})
    assert history.exit_code == 0, history.output
    assert history.stdout.startswith(f"History of {root}: nothing yet")


# --- no internal words where a user reads

INTERNAL = re.compile(r"\bSPEC\b|\bmission\b|\bissue\s*#|(?<![\w&])#\d+\b|\bTODO\b|\bFIXME\b|\bXXX\b", re.IGNORECASE)
CASE_SENSITIVE = {"spec"}  # Kubernetes manifests say `spec:`; only the project's own SPEC is internal


def internal_words(text: str) -> list[str]:
    found = [m.group(0) for m in INTERNAL.finditer(text)]
    return [word for word in found if not (word.lower() in CASE_SENSITIVE and word != word.upper())]


def all_commands() -> list[tuple[str, ...]]:
    assert isinstance(main, click.Group)
    return [(), *((name,) for name in sorted(main.commands))]


def test_the_internal_word_check_finds_what_it_looks_for() -> None:
    words = "the SPEC's checks, the mission's policy, issue #15, see #11, TODO, FIXME, XXX"
    assert internal_words(words) == ["SPEC", "mission", "issue #", "#11", "TODO", "FIXME", "XXX"]
    assert internal_words("spec:\n  template:\n    spec: # (kubernetes)\ncolor: '#fff'") == []


@pytest.mark.parametrize("command", all_commands(), ids=lambda c: " ".join(c) or "ckptkeeper")
def test_no_internal_words_in_help(command: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"], prog_name="ckptkeeper")
    assert result.exit_code == 0, result.output
    assert internal_words(result.output) == [], result.output


def test_no_internal_words_in_the_example_configs() -> None:
    files = sorted(p for p in CONFIGS.rglob("*") if p.is_file())
    assert len(files) >= 5
    found = {str(p.relative_to(PROJECT)): internal_words(p.read_text(encoding="utf-8")) for p in files}
    assert {name: words for name, words in found.items() if words} == {}


# --- shell completion, from the installed console script as a shell runs it


def console_script() -> str:
    beside = Path(sys.executable).parent / "ckptkeeper"
    found = str(beside) if beside.exists() else shutil.which("ckptkeeper")
    if found is None:
        pytest.fail("the ckptkeeper console script is not installed: pip install -e .")
    return found


def complete(instruction: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CKPTKEEPER_", "_CKPTKEEPER_", "COMP_"))}
    return subprocess.run(
        [console_script()],
        env={**clean, "_CKPTKEEPER_COMPLETE": instruction, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("shell", "marks"),
    [
        ("bash", ("_ckptkeeper_completion()", "complete -o nosort -F _ckptkeeper_completion ckptkeeper")),
        ("zsh", ("#compdef ckptkeeper", "compdef _ckptkeeper_completion ckptkeeper")),
        ("fish", ("function _ckptkeeper_completion", "complete --no-files --command ckptkeeper")),
    ],
)
def test_the_console_script_prints_a_completion_script(shell: str, marks: tuple[str, ...]) -> None:
    result = complete(f"{shell}_source")
    assert result.returncode == 0, result.stderr
    for mark in marks:
        assert mark in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("words", "offered"),
    [
        ("ckptkeeper pl", ["plan"]),
        ("ckptkeeper plan --ke", ["--keep", "--keep-weights", "--keep-under-pressure"]),
        ("ckptkeeper watch --po", ["--poll"]),
    ],
)
def test_completion_offers_commands_and_options(words: str, offered: list[str]) -> None:
    result = complete("bash_complete", COMP_WORDS=words, COMP_CWORD=str(len(words.split()) - 1))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"plain,{word}" for word in offered]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
def test_bash_completes_with_the_readme_line() -> None:
    """The README's ~/.bashrc line, then a <Tab> after `ckptkeeper plan --ke`, as bash runs it."""
    line = 'eval "$(_CKPTKEEPER_COMPLETE=bash_source ckptkeeper)"'
    tab = "COMP_WORDS=(ckptkeeper plan --ke); COMP_CWORD=2; _ckptkeeper_completion ckptkeeper"
    script = f'{line}\n{tab}\nprintf "%s\\n" "${{COMPREPLY[@]}}"'
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CKPTKEEPER_", "_CKPTKEEPER_", "COMP_"))}
    path = f"{Path(console_script()).parent}{os.pathsep}{clean.get('PATH', '')}"
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        env={**clean, "PATH": path},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["--keep", "--keep-weights", "--keep-under-pressure"]


def test_the_readme_documents_completion_for_bash_zsh_and_fish() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("### Shell completion\n", 1)[1].split("\n## ", 1)[0]
    for line in (
        "# bash: in ~/.bashrc",
        'eval "$(_CKPTKEEPER_COMPLETE=bash_source ckptkeeper)"',
        "# zsh: in ~/.zshrc, after compinit",
        'eval "$(_CKPTKEEPER_COMPLETE=zsh_source ckptkeeper)"',
        "# fish: in ~/.config/fish/completions/ckptkeeper.fish",
        "_CKPTKEEPER_COMPLETE=fish_source ckptkeeper | source",
    ):
        assert line in section.splitlines(), line
