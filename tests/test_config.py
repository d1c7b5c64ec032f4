"""Settings from a YAML or TOML file (`--config`), overlaid by flags, and every way a config can be wrong.

A config problem is exit code 2 with one line per problem, each starting with the file's name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptkeeper.cli import main
from ckptkeeper.config import ConfigError, load_settings
from ckptkeeper.rules import parse_rules
from ckptkeeper.settings import Settings, setting_keys

VALID_FORMS = (
    "last:N, best:N[:METRIC[:min|max]], epoch:all, epoch:N, every:K (N and K positive integers), separated by commas"
)
NO_RULE = "Error: refused: no keep rule given: refusing to remove anything (pass --keep, e.g. --keep last:5)\n"
KEYS = (
    "root",
    "keep",
    "keep_weights",
    "min_free",
    "keep_under_pressure",
    "archive_to",
    "archive_options",
    "state_dir",
    "max_depth",
    "protect_trainer_best",
    "metrics",
    "await",
    "settle",
    "stale_after",
    "dry_run",
    "rescan_interval",
    "poll",
    "exit_when_done",
    "standby",
    "grace",
    "log_format",
    "metrics_port",
    "metrics_host",
)


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def checkpoints(run: Path) -> set[int]:
    return {int(p.name.removeprefix("checkpoint-")) for p in run.iterdir() if p.name.startswith("checkpoint-")}


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)  # strings and numbers are written alike in TOML and JSON


def write_config(path: Path, values: dict[str, object]) -> Path:
    if path.suffix == ".toml":
        path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()), encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path


# --- every setting, from YAML and TOML ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["config.yaml", "config.yml", "config.toml"])
@pytest.mark.parametrize("keep", [["best:1", "last:5", "epoch:all"], "best:1, last:5,epoch:all"])
def test_a_config_file_holds_every_setting(tmp_path: Path, name: str, keep: list[str] | str) -> None:
    values: dict[str, object] = {
        "root": str(tmp_path / "outputs"),
        "keep": keep,
        "keep_weights": "epoch:all",
        "min_free": "10%",
        "keep_under_pressure": "best:1,last:2",
        "archive_to": str(tmp_path / "archive"),
        "archive_options": {"anon": True, "endpoint_url": "http://127.0.0.1:9000"},
        "state_dir": str(tmp_path / "state"),
        "max_depth": 2,
        "protect_trainer_best": False,
        "metrics": {"mmlu": "file:eval_results.json#/results/mmlu/acc,none"},
        "await": ["mmlu:2h"],
        "settle": 0.5,
        "stale_after": "1h30m",
        "dry_run": True,
        "rescan_interval": 30,
        "poll": 2.5,
        "exit_when_done": True,
        "standby": True,
        "grace": 4,
        "log_format": "json",
        "metrics_port": 9100,
        "metrics_host": "0.0.0.0",
    }
    assert set(values) == set(KEYS) == set(setting_keys())
    loaded = load_settings(write_config(tmp_path / name, values), {})
    assert loaded == Settings(
        root=tmp_path / "outputs",
        keep=["best:1", "last:5", "epoch:all"],
        keep_weights=["epoch:all"],
        min_free="10%",
        keep_under_pressure=["best:1", "last:2"],
        archive_to=tmp_path / "archive",
        archive_options={"anon": True, "endpoint_url": "http://127.0.0.1:9000"},
        state_dir=tmp_path / "state",
        max_depth=2,
        protect_trainer_best=False,
        metrics={"mmlu": "file:eval_results.json#/results/mmlu/acc,none"},
        await_=["mmlu:2h"],
        settle=0.5,
        stale_after="1h30m",
        dry_run=True,
        rescan_interval=30.0,
        poll=2.5,
        exit_when_done=True,
        standby=True,
        grace=4.0,
        log_format="json",
        metrics_port=9100,
        metrics_host="0.0.0.0",
    )
    assert loaded.rules_text() == "best:1,last:5,epoch:all"
    # A settle from the file wins over every command's default.
    assert loaded.scan_options().settle == loaded.scan_options(default_settle=2.0).settle == 0.5
    assert loaded.scan_options().stale_after == 5400.0


def test_no_config_and_no_flags_gives_the_defaults() -> None:
    assert load_settings(None, {}) == Settings()
    defaults = Settings()
    assert (defaults.max_depth, defaults.protect_trainer_best, defaults.settle, defaults.keep) == (4, True, None, [])
    assert (
        defaults.rescan_interval,
        defaults.poll,
        defaults.exit_when_done,
        defaults.grace,
        defaults.log_format,
    ) == (60.0, None, False, 10.0, "text")
    # An unset settle is the command's default: 0 for plan and prune, 2 s for watch.
    assert defaults.scan_options().settle == 0.0
    assert defaults.scan_options(default_settle=2.0).settle == 2.0


@pytest.mark.parametrize("settle", [0, 0.0, 7.5])
def test_a_settle_that_is_set_wins_over_the_command_default_even_zero(settle: float) -> None:
    loaded = load_settings(None, {"settle": settle})
    assert loaded.settle == settle
    assert loaded.scan_options().settle == settle
    assert loaded.scan_options(default_settle=2.0).settle == settle


def test_flags_override_file_values_and_unset_flags_do_not(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", {"keep": "last:1", "max_depth": 0, "protect_trainer_best": False})
    flags: dict[str, Any] = {"keep": "last:3", "max_depth": None, "protect_trainer_best": True, "settle": None}
    loaded = load_settings(config, flags)
    assert (loaded.keep, loaded.max_depth, loaded.protect_trainer_best, loaded.settle) == (["last:3"], 0, True, None)
    assert loaded.scan_options().settle == 0.0


def test_watch_flags_override_file_values_and_unset_flags_do_not(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config.yaml",
        {"keep": "last:1", "rescan_interval": 5, "poll": 3, "exit_when_done": True, "log_format": "json"},
    )
    flags: dict[str, Any] = {
        "rescan_interval": 120.0,
        "poll": None,
        "exit_when_done": None,
        "grace": 1.5,
        "log_format": None,
    }
    loaded = load_settings(config, flags)
    assert (loaded.rescan_interval, loaded.poll, loaded.exit_when_done, loaded.grace, loaded.log_format) == (
        120.0,
        3.0,
        True,
        1.5,
        "json",
    )


def test_every_setting_in_a_file_takes_effect(hf_run: Callable[[str], Path], tmp_path: Path) -> None:
    run = hf_run("B")  # checkpoints 26 52 78 104; the Trainer calls 52 best
    root = run.parent
    deep = root / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (run.parent / "B").rename(deep / "B")  # the run is now 4 levels below the root
    archive, state = tmp_path / "archive", tmp_path / "state"
    config = write_config(
        tmp_path / "config.toml",
        {
            "root": str(root),
            "keep": "last:1",
            "archive_to": str(archive),
            "state_dir": str(state),
            "max_depth": 4,
            "protect_trainer_best": False,
            "settle": 0,
        },
    )
    result = cli("prune", "--config", config)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[:2] == [
        f"Policy: keep the last 1 (last:1); always keep the newest, incomplete ones; archive to {archive} the rest",
        f"Root: {root}",
    ]
    assert checkpoints(deep / "B") == {104}  # 52, the Trainer's best, is not protected
    assert checkpoints(archive / "a" / "b" / "c" / "B") == {26, 52, 78}
    journal = [json.loads(line) for line in (state / "journal.jsonl").read_text().splitlines()]
    assert [(e["action"], e["checkpoint"]) for e in journal] == [
        (action, f"checkpoint-{s}") for s in (26, 52, 78) for action in ("start-archive", "archive")
    ]
    assert not (root / "_ckptkeeper").exists()


def test_max_depth_and_settle_from_a_file(hf_run: Callable[[str], Path], tmp_path: Path) -> None:
    root = hf_run("B").parent
    shallow = write_config(tmp_path / "shallow.yaml", {"keep": ["last:1"], "max_depth": 0})
    result = cli("plan", root, "--config", shallow)
    assert result.exit_code == 0, result.output
    assert f"No checkpoint-N directories found below {root} (searched 0 levels deep)." in result.output
    settle = write_config(tmp_path / "settle.yaml", {"keep": ["last:1"], "settle": 3600})
    result = cli("prune", root, "--config", settle)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "Done: removed 0 checkpoints, freed 0 B. Kept 4."
    assert checkpoints(root / "B") == {26, 52, 78, 104}


def test_flags_override_the_file_on_the_command_line(hf_run: Callable[[str], Path], tmp_path: Path) -> None:
    root = hf_run("B").parent
    other = tmp_path / "other"
    other.mkdir()
    config = write_config(
        tmp_path / "config.yaml",
        {
            "root": str(other),
            "keep": ["last:1"],
            "archive_to": str(tmp_path / "archive-from-file"),
            "state_dir": str(tmp_path / "state-from-file"),
            "max_depth": 0,
            "protect_trainer_best": False,
            "settle": 3600,
        },
    )
    result = cli(
        "prune",
        root,
        "--config",
        config,
        "--keep",
        "last:2",
        "--archive-to",
        tmp_path / "archive",
        "--state-dir",
        tmp_path / "state",
        "--max-depth",
        "1",
        "--protect-trainer-best",
        "--settle",
        "0",
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[:2] == [
        "Policy: keep the last 2 (last:2); always keep the newest, incomplete ones, the Trainer's best; "
        f"archive to {tmp_path / 'archive'} the rest",
        f"Root: {root}",
    ]
    assert checkpoints(root / "B") == {52, 78, 104}
    assert checkpoints(tmp_path / "archive" / "B") == {26}
    assert (tmp_path / "state" / "journal.jsonl").exists()
    assert not (tmp_path / "state-from-file").exists()
    assert not (tmp_path / "archive-from-file").exists()


def test_relative_paths_in_a_file_are_taken_from_the_current_directory(
    hf_run: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf_run("D2")
    (tmp_path / "configs").mkdir()
    config = write_config(tmp_path / "configs" / "c.yaml", {"root": "outputs", "keep": "last:1"})
    monkeypatch.chdir(tmp_path)
    result = cli("plan", "--config", config)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1] == f"Root: {tmp_path / 'outputs'}"


# --- problems in a config file -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus: 1\n", "config.yaml: bogus: Extra inputs are not permitted"),
        (
            "keep: [last:1, bestt:1]\n",
            f"config.yaml: keep[1]: invalid rule 'bestt:1': unknown rule 'bestt'. Valid forms: {VALID_FORMS}.",
        ),
        (
            "keep: last:1,best:0\n",
            f"config.yaml: keep[1]: invalid rule 'best:0': '0' is not a positive integer. Valid forms: {VALID_FORMS}.",
        ),
        (
            "max_depth: deep\n",
            "config.yaml: max_depth: Input should be a valid integer",
        ),
        ("max_depth: -1\n", "config.yaml: max_depth: Input should be greater than or equal to 0"),
        (
            "max_depth: 2.5\n",
            "config.yaml: max_depth: Input should be a valid integer",
        ),
        ("settle: -1\n", "config.yaml: settle: Input should be greater than or equal to 0"),
        ("rescan_interval: 0\n", "config.yaml: rescan_interval: Input should be greater than 0"),
        ("rescan_interval: -5\n", "config.yaml: rescan_interval: Input should be greater than 0"),
        ("rescan_interval: 86401\n", "config.yaml: rescan_interval: Input should be less than or equal to 86400"),
        ("rescan_interval: .inf\n", "config.yaml: rescan_interval: Input should be less than or equal to 86400"),
        ("rescan_interval: null\n", "config.yaml: rescan_interval: Input should be a valid number"),
        (
            "rescan_interval: often\n",
            "config.yaml: rescan_interval: Input should be a valid number, unable to parse string as a number",
        ),
        ("poll: 0\n", "config.yaml: poll: Input should be greater than 0"),
        ("poll: -0.5\n", "config.yaml: poll: Input should be greater than 0"),
        ("poll: 3601\n", "config.yaml: poll: Input should be less than or equal to 3600"),
        ("poll: slow\n", "config.yaml: poll: Input should be a valid number, unable to parse string as a number"),
        ("grace: 0\n", "config.yaml: grace: Input should be greater than 0"),
        ("log_format: xml\n", "config.yaml: log_format: Input should be 'text' or 'json'"),
        ("log_format: JSON\n", "config.yaml: log_format: Input should be 'text' or 'json'"),
        ("log_format: 1\n", "config.yaml: log_format: Input should be 'text' or 'json'"),
        ("exit_when_done: 'true'\n", "config.yaml: exit_when_done: Input should be a valid boolean"),
        ("exit_when_done: 1\n", "config.yaml: exit_when_done: Input should be a valid boolean"),
        ("exit_when_done: maybe\n", "config.yaml: exit_when_done: Input should be a valid boolean"),
        (
            "protect_trainer_best: maybe\n",
            "config.yaml: protect_trainer_best: Input should be a valid boolean",
        ),
        ("keep: 5\n", "config.yaml: keep: Input should be a valid list"),
        ("keep: [null]\n", "config.yaml: keep[0]: Input should be a valid string"),
        ('root: "a\\0b"\n', "config.yaml: root: a path cannot contain a NUL character"),
        ('archive_to: "a\\0b"\n', "config.yaml: archive_to: a path cannot contain a NUL character"),
        ('state_dir: "a\\0b"\n', "config.yaml: state_dir: a path cannot contain a NUL character"),
        ('"bo\\ngus": 1\n', "config.yaml: 'bo\\ngus': Extra inputs are not permitted"),
        ("- last:1\n- best:1\n", "config.yaml: a config file holds a mapping of settings, not a list"),
        ("a: b: c\n", "config.yaml: invalid YAML at line 1, column 5: mapping values are not allowed here"),
        (
            "root: x\nkeep: [last:1\n",
            "config.yaml: invalid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>'",
        ),
        (
            "root: x\nkeep: \x07\n",
            "config.yaml: invalid YAML at line 2, column 7: unacceptable character #x0007: "
            "special characters are not allowed",
        ),
    ],
)
def test_a_bad_config_is_exit_2_with_one_line_naming_the_file(
    outputs_root: Path, tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(config, {})
    assert str(caught.value) == message
    result = cli("prune", outputs_root, "--config", config, "--keep", "last:1")
    assert result.exit_code == 2
    assert result.output == f"Error: {message}\n"
    assert checkpoints(outputs_root / "D2") == {50, 52}


@pytest.fixture
def outputs_root(hf_run: Callable[[str], Path]) -> Path:
    return hf_run("D2").parent


def test_several_problems_give_one_line_each(tmp_path: Path) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text("bogus: 1\nmax_depth: deep\nkeep: [last:1, best:0]\nsettle: -2\n", encoding="utf-8")
    result = cli("plan", tmp_path, "--config", config)
    assert result.exit_code == 2
    assert sorted(result.output.splitlines()) == sorted(
        [
            "Error: sweep.yaml: keep[1]: invalid rule 'best:0': '0' is not a positive integer. "
            f"Valid forms: {VALID_FORMS}.",
            "sweep.yaml: max_depth: Input should be a valid integer",
            "sweep.yaml: settle: Input should be greater than or equal to 0",
            "sweep.yaml: bogus: Extra inputs are not permitted",
        ]
    )


def test_a_bad_value_in_a_file_is_reported_even_when_a_flag_overrides_it(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", {"max_depth": "deep", "keep": "last:1"})
    result = cli("plan", tmp_path, "--config", config, "--max-depth", "2")
    assert result.exit_code == 2
    assert result.output == ("Error: config.yaml: max_depth: Input should be a valid integer\n")


def test_a_bad_flag_value_is_reported_with_the_flag(tmp_path: Path) -> None:
    result = cli("plan", tmp_path, "--keep", "last:1", "--max-depth", "-1")
    assert result.exit_code == 2
    assert result.output == "Error: --max-depth: Input should be greater than or equal to 0\n"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--rescan-interval", "0", "--rescan-interval: Input should be greater than 0"),
        ("--poll", "0", "--poll: Input should be greater than 0"),
        ("--poll", "-1", "--poll: Input should be greater than 0"),
        ("--grace", "0", "--grace: Input should be greater than 0"),
    ],
)
def test_a_bad_watch_flag_is_exit_2_before_watching(tmp_path: Path, flag: str, value: str, message: str) -> None:
    result = cli("watch", tmp_path, "--keep", "last:1", flag, value)
    assert result.exit_code == 2, result.output
    assert result.output == f"Error: {message}\n"
    assert list(tmp_path.iterdir()) == []  # no state directory, lock or journal was made


def test_a_bad_watch_setting_in_a_file_is_exit_2_naming_the_file(tmp_path: Path) -> None:
    config = write_config(tmp_path / "watch.yaml", {"keep": "last:1", "log_format": "xml", "exit_when_done": "yes"})
    result = cli("watch", tmp_path, "--config", config)
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        "Error: watch.yaml: exit_when_done: Input should be a valid boolean",
        "watch.yaml: log_format: Input should be 'text' or 'json'",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["watch.yaml"]


@pytest.mark.parametrize(
    ("text", "line_and_column"),
    [("root = 'x'\nkeep = = 1\n", "(at line 2, column 8)"), ("keep = 'a'\nkeep = 'b'\n", "(at line 2, column")],
)
def test_invalid_toml_is_exit_2_naming_the_file(tmp_path: Path, text: str, line_and_column: str) -> None:
    config = tmp_path / "sweep.toml"
    config.write_text(text, encoding="utf-8")
    result = cli("plan", tmp_path, "--config", config)
    assert result.exit_code == 2
    [line] = result.output.splitlines()
    assert line.startswith("Error: sweep.toml: invalid TOML: ")
    assert line_and_column in line


def test_a_toml_type_error_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "sweep.toml"
    config.write_text("max_depth = 'deep'\nprotect_trainer_best = 'maybe'\n", encoding="utf-8")
    result = cli("plan", tmp_path, "--config", config)
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "Error: sweep.toml: max_depth: Input should be a valid integer",
        "sweep.toml: protect_trainer_best: Input should be a valid boolean",
    ]


@pytest.mark.parametrize("text", ["", "# nothing set yet\n", "---\n"])
@pytest.mark.parametrize("name", ["config.yaml", "config.toml"])
def test_an_empty_config_sets_nothing_so_no_rule_is_refused(
    outputs_root: Path, tmp_path: Path, text: str, name: str
) -> None:
    if name.endswith(".toml") and text == "---\n":
        text = ""
    config = tmp_path / name
    config.write_text(text, encoding="utf-8")
    assert load_settings(config, {}) == Settings()
    result = cli("prune", outputs_root, "--config", config)
    assert result.exit_code == 3
    assert result.output == NO_RULE
    assert checkpoints(outputs_root / "D2") == {50, 52}


def test_a_missing_config_file_is_exit_2(outputs_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = cli("prune", outputs_root, "--config", missing, "--keep", "last:1")
    assert result.exit_code == 2
    assert result.output == f"Error: nope.yaml: no such config file: {missing}\n"
    assert checkpoints(outputs_root / "D2") == {50, 52}


def test_a_config_that_is_a_directory_or_not_utf8_is_exit_2(outputs_root: Path, tmp_path: Path) -> None:
    result = cli("plan", outputs_root, "--config", tmp_path, "--keep", "last:1")
    assert result.exit_code == 2
    assert result.output.splitlines()[-1].startswith("Error: Invalid value for '--config' / '-c': File ")
    binary = tmp_path / "config.yaml"
    binary.write_bytes(b"keep: \xff\xfe\n")
    result = cli("plan", outputs_root, "--config", binary)
    assert result.exit_code == 2
    [line] = result.output.splitlines()
    assert line.startswith("Error: config.yaml: cannot read the config file: 'utf-8' codec can't decode byte 0xff")


def test_a_null_byte_path_in_a_config_never_reaches_the_filesystem(outputs_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f'root: "{outputs_root}"\nkeep: last:1\narchive_to: "x\\0y"\n', encoding="utf-8")
    result = cli("prune", "--config", config)
    assert result.exit_code == 2
    assert result.output == "Error: config.yaml: archive_to: a path cannot contain a NUL character\n"


# --- fuzz: load_settings returns Settings or raises ConfigError, nothing else ------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["last:1", "best:2:accuracy", "epoch:all", "every:0", "best:1,last:2", "", ",", "a\0b"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
FLAGS = "flags"
setting_dicts = st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), values, max_size=6)


def check_outcome(load: Callable[[], Settings], source: str) -> None:
    """`source`: the file's name, or FLAGS (each line then names its flag, or ROOT)."""
    try:
        loaded = load()
    except ConfigError as e:
        message = str(e)
        assert message, "an empty error message"
        for line in message.splitlines():
            heads = ("--", "ROOT: ", "command line: ") if source == FLAGS else (f"{source}: ",)
            assert line.startswith(heads), repr(message)
            assert line.strip() != f"{source}:", repr(message)
        assert message.count("\n") == len(message.splitlines()) - 1, repr(message)  # no stray \r, \x85, ...
        return
    # A Settings that loads gives a policy that works.
    assert 0 <= loaded.max_depth <= 64
    assert loaded.settle is None or (math.isfinite(loaded.settle) and 0 <= loaded.settle <= 3600)
    assert math.isfinite(loaded.rescan_interval) and 0 < loaded.rescan_interval <= 86400
    assert loaded.poll is None or (math.isfinite(loaded.poll) and 0 < loaded.poll <= 3600)
    assert math.isfinite(loaded.grace) and 0 < loaded.grace <= 3600
    assert loaded.log_format in {"text", "json"}
    assert type(loaded.exit_when_done) is bool
    policy = loaded.policy()
    assert loaded.scan_options().settle == (0.0 if loaded.settle is None else loaded.settle)
    assert loaded.scan_options(default_settle=2.0).settle == (2.0 if loaded.settle is None else loaded.settle)
    assert len(policy.rules) == len(loaded.keep)
    assert parse_rules(loaded.rules_text()) == policy.rules
    for path in (loaded.root, loaded.archive_to, loaded.state_dir):
        assert path is None or "\0" not in str(path)


fuzz = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@fuzz
@given(flags=setting_dicts)
def test_fuzz_flags_dicts(flags: dict[str, Any]) -> None:
    check_outcome(lambda: load_settings(None, flags), FLAGS)


@fuzz
@given(data=setting_dicts)
def test_fuzz_yaml_files_from_dicts(tmp_path: Path, data: dict[str, Any]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    check_outcome(lambda: load_settings(config, {}), "config.yaml")


yaml_lines = st.lists(
    st.tuples(
        st.sampled_from([*KEYS, "bogus", "- x", "  -", "? [a]"]),
        st.sampled_from(
            [
                "",
                " 1",
                " -1",
                " deep",
                " [last:1, best:0]",
                " last:1,epoch:all",
                " 'x",
                " {",
                " *a",
                " &a 3",
                " !!set {a}",
            ]
        )
        | st.text(max_size=8).map(lambda t: " " + t),
    ).map(lambda kv: f"{kv[0]}:{kv[1]}"),
    max_size=6,
).map("\n".join)
texts = st.one_of(st.text(max_size=60), yaml_lines)


@fuzz
@given(text=texts)
def test_fuzz_yaml_texts(tmp_path: Path, text: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    check_outcome(lambda: load_settings(config, {}), "config.yaml")


@fuzz
@given(text=st.one_of(st.text(max_size=60), yaml_lines.map(lambda t: t.replace(":", " ="))))
def test_fuzz_toml_texts(tmp_path: Path, text: str) -> None:
    config = tmp_path / "config.toml"
    config.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    check_outcome(lambda: load_settings(config, {}), "config.toml")


@fuzz
@given(raw=st.binary(max_size=40))
def test_fuzz_bytes(tmp_path: Path, raw: bytes) -> None:
    config = tmp_path / "config.yaml"
    config.write_bytes(raw)
    check_outcome(lambda: load_settings(config, {}), "config.yaml")


# --- the shipped examples -----------------------------------------------------------------------------------

SHIPPED = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.*") if p.name != "docker-compose.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_and_gives_a_policy(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run where a user runs it: in a directory that holds what the config names (an eval job's `evals/`)."""
    (tmp_path / "evals").mkdir()
    monkeypatch.chdir(tmp_path)
    settings = load_settings(path, {}, environ={})
    assert settings.policy().rules, path


def test_the_disk_pressure_example_sets_a_floor_and_pressure_rules() -> None:
    policy = load_settings(Path(__file__).parent.parent / "configs" / "disk-pressure.yaml", {}, environ={}).policy()
    assert policy.pressure is not None
    assert policy.pressure.floor.size == 50_000_000_000
    assert [r.format() for r in policy.pressure.rules] == ["best:1", "last:2"]
