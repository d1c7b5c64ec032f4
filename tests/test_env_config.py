"""`CKPTKEEPER_*` environment variables (config.read_environment / load_settings(config, flags, environ)):
each setting, its type, the precedence flags > environment > config file, `CKPTKEEPER_CONFIG`, and the exact
error for a bad or misspelt variable, through load_settings and through the CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ckptkeeper.cli import main
from ckptkeeper.config import ConfigError, env_var, load_settings, read_environment
from ckptkeeper.settings import Settings, setting_keys
from ckptkeeper.simtrainer import SimConfig, simulate_run

RULE_FORMS = (
    "Valid forms: last:N, best:N[:METRIC[:min|max]], epoch:all, epoch:N, every:K (N and K positive integers), "
    "separated by commas."
)

# variable -> (raw text, the setting's value it must become)
ONE_PER_SETTING: dict[str, tuple[str, Any]] = {
    "CKPTKEEPER_ROOT": ("/outputs/runs", Path("/outputs/runs")),
    "CKPTKEEPER_KEEP": ("best:1, last:5,epoch:all", ["best:1", "last:5", "epoch:all"]),
    "CKPTKEEPER_KEEP_WEIGHTS": ("epoch:all,every:100", ["epoch:all", "every:100"]),
    "CKPTKEEPER_MIN_FREE": ("50G", "50G"),
    "CKPTKEEPER_KEEP_UNDER_PRESSURE": ("best:1, last:2", ["best:1", "last:2"]),
    "CKPTKEEPER_ARCHIVE_TO": ("/archive", Path("/archive")),
    "CKPTKEEPER_ARCHIVE_OPTIONS": (
        "anon=true, endpoint_url=http://minio:9000",
        {"anon": True, "endpoint_url": "http://minio:9000"},
    ),
    "CKPTKEEPER_STATE_DIR": ("/var/lib/ckptkeeper", Path("/var/lib/ckptkeeper")),
    "CKPTKEEPER_MAX_DEPTH": ("7", 7),
    "CKPTKEEPER_PROTECT_TRAINER_BEST": ("false", False),
    "CKPTKEEPER_METRICS": (
        "{mmlu: 'file:eval_results.json#/results/mmlu/acc'}",
        {"mmlu": "file:eval_results.json#/results/mmlu/acc"},
    ),
    "CKPTKEEPER_AWAIT": ("mmlu:2h, mmlu", ["mmlu:2h", "mmlu"]),
    "CKPTKEEPER_SETTLE": ("2.5", 2.5),
    "CKPTKEEPER_STALE_AFTER": ("2h", "2h"),
    "CKPTKEEPER_DRY_RUN": ("true", True),
    "CKPTKEEPER_RESCAN_INTERVAL": ("30", 30.0),
    "CKPTKEEPER_POLL": ("0.5", 0.5),
    "CKPTKEEPER_EXIT_WHEN_DONE": ("true", True),
    "CKPTKEEPER_STANDBY": ("true", True),
    "CKPTKEEPER_GRACE": ("25", 25.0),
    "CKPTKEEPER_LOG_FORMAT": ("json", "json"),
    "CKPTKEEPER_METRICS_PORT": ("9100", 9100),
    "CKPTKEEPER_METRICS_HOST": ("0.0.0.0", "0.0.0.0"),
}


def test_every_setting_has_a_variable_in_the_table() -> None:
    assert set(ONE_PER_SETTING) == {env_var(key) for key in setting_keys()}


@pytest.mark.parametrize(("var", "raw", "expected"), [(v, *t) for v, t in ONE_PER_SETTING.items()])
def test_each_variable_sets_its_setting(var: str, raw: str, expected: Any) -> None:
    name = var.removeprefix("CKPTKEEPER_").lower()
    name = "await_" if name == "await" else name  # a Python keyword: the field's name differs
    default = getattr(Settings(), name)
    assert default != expected  # the variable must change something
    # Pressure rules need a floor, an await a defined metric (alone they are errors): the other variables set here.
    needed = {
        "CKPTKEEPER_KEEP_UNDER_PRESSURE": {"CKPTKEEPER_MIN_FREE": "10%"},
        "CKPTKEEPER_AWAIT": {"CKPTKEEPER_METRICS": "{mmlu: 'file:r.json#/acc'}"},
    }.get(var, {})
    settings = load_settings(None, {}, {var: raw, **needed})
    value = getattr(settings, name)
    assert value == expected
    assert type(value) is type(expected)
    skip = {name, *(v.removeprefix("CKPTKEEPER_").lower() for v in needed)}
    others = {k: v for k, v in dataclasses.asdict(settings).items() if k not in skip}
    assert others == {k: v for k, v in dataclasses.asdict(Settings()).items() if k not in skip}


def test_pressure_rules_without_a_floor_are_an_error_that_names_both_variables() -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(None, {}, {"CKPTKEEPER_KEEP_UNDER_PRESSURE": "last:1"})
    assert "keep_under_pressure (--keep-under-pressure) needs min_free (--min-free)" in str(e.value)


@pytest.mark.parametrize(
    ("raw", "expected"), [("true", True), ("false", False), ("True", True), ("no", False), ("on", True)]
)
def test_booleans_are_yaml_scalars(raw: str, expected: bool) -> None:
    assert load_settings(None, {}, {"CKPTKEEPER_DRY_RUN": raw}).dry_run is expected


@pytest.mark.parametrize("var", sorted(ONE_PER_SETTING))
def test_an_empty_variable_is_unset(var: str) -> None:
    assert load_settings(None, {}, {var: ""}) == Settings()
    assert read_environment({var: ""}) == {}


def test_text_settings_stay_text() -> None:
    """Paths, rules, the log format and the host are not read as YAML: `null`, `123`, `true` stay text."""
    settings = load_settings(
        None, {}, {"CKPTKEEPER_ROOT": "123", "CKPTKEEPER_METRICS_HOST": "null", "CKPTKEEPER_STATE_DIR": "true"}
    )
    assert settings.root == Path("123")
    assert settings.metrics_host == "null"
    assert settings.state_dir == Path("true")


def test_other_variables_are_ignored() -> None:
    environ = {"HOME": "/root", "CKPTKEEPERX": "1", "ckptkeeper_keep": "bogus", "XCKPTKEEPER_KEEP": "bogus"}
    assert load_settings(None, {}, environ) == Settings()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_precedence_flags_over_environment_over_config_file(tmp_path: Path) -> None:
    config = write(tmp_path / "ck.yaml", "keep: [last:9]\nmax_depth: 1\nsettle: 3\ngrace: 7\n")
    environ = {"CKPTKEEPER_KEEP": "last:5", "CKPTKEEPER_MAX_DEPTH": "2"}
    flags: dict[str, Any] = {"keep": "last:1", "max_depth": None, "settle": None}
    settings = load_settings(config, flags, environ)
    assert settings.keep == ["last:1"]  # flag over environment over file
    assert settings.max_depth == 2  # environment over file (the flag was not given)
    assert settings.settle == 3.0  # file only
    assert settings.grace == 7.0
    assert load_settings(config, {}, environ).keep == ["last:5"]
    assert load_settings(config, {}, {}).keep == ["last:9"]


def test_ckptkeeper_config_names_the_config_file(tmp_path: Path) -> None:
    config = write(tmp_path / "ck.toml", 'keep = "best:1,last:2"\nmax_depth = 3\n')
    settings = load_settings(None, {}, {"CKPTKEEPER_CONFIG": str(config), "CKPTKEEPER_MAX_DEPTH": "5"})
    assert settings.keep == ["best:1", "last:2"]
    assert settings.max_depth == 5  # the environment still overrides the file it names
    other = write(tmp_path / "other.yaml", "keep: last:7\n")
    assert load_settings(other, {}, {"CKPTKEEPER_CONFIG": str(config)}).keep == ["last:7"]  # --config wins
    assert load_settings(None, {}, {"CKPTKEEPER_CONFIG": ""}) == Settings()


def test_ckptkeeper_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(None, {}, {"CKPTKEEPER_CONFIG": str(tmp_path / "nope.yaml")})
    assert str(e.value) == f"nope.yaml: no such config file: {tmp_path / 'nope.yaml'}"


BAD_VALUES = [
    ("CKPTKEEPER_MAX_DEPTH", "deep", "CKPTKEEPER_MAX_DEPTH: Input should be a valid integer"),
    ("CKPTKEEPER_MAX_DEPTH", "2.5", "CKPTKEEPER_MAX_DEPTH: Input should be a valid integer"),
    ("CKPTKEEPER_MAX_DEPTH", "-1", "CKPTKEEPER_MAX_DEPTH: Input should be greater than or equal to 0"),
    ("CKPTKEEPER_MAX_DEPTH", "65", "CKPTKEEPER_MAX_DEPTH: Input should be less than or equal to 64"),
    ("CKPTKEEPER_SETTLE", "-1", "CKPTKEEPER_SETTLE: Input should be greater than or equal to 0"),
    (
        "CKPTKEEPER_SETTLE",
        "soon",
        "CKPTKEEPER_SETTLE: Input should be a valid number, unable to parse string as a number",
    ),
    ("CKPTKEEPER_GRACE", "0", "CKPTKEEPER_GRACE: Input should be greater than 0"),
    (
        "CKPTKEEPER_STALE_AFTER",
        "soon",
        "CKPTKEEPER_STALE_AFTER: expected a duration such as 90s, 15m, 2h, 1h30m, 3d, or seconds (more "
        "than 0, at most 365d)",
    ),
    ("CKPTKEEPER_POLL", "0", "CKPTKEEPER_POLL: Input should be greater than 0"),
    ("CKPTKEEPER_RESCAN_INTERVAL", "-5", "CKPTKEEPER_RESCAN_INTERVAL: Input should be greater than 0"),
    ("CKPTKEEPER_DRY_RUN", "maybe", "CKPTKEEPER_DRY_RUN: Input should be a valid boolean"),
    ("CKPTKEEPER_DRY_RUN", "1", "CKPTKEEPER_DRY_RUN: Input should be a valid boolean"),
    ("CKPTKEEPER_EXIT_WHEN_DONE", "2", "CKPTKEEPER_EXIT_WHEN_DONE: Input should be a valid boolean"),
    ("CKPTKEEPER_PROTECT_TRAINER_BEST", "nope", "CKPTKEEPER_PROTECT_TRAINER_BEST: Input should be a valid boolean"),
    (
        "CKPTKEEPER_KEEP",
        "last:2,bogus:1",
        f"CKPTKEEPER_KEEP[1]: invalid rule 'bogus:1': unknown rule 'bogus'. {RULE_FORMS}",
    ),
    ("CKPTKEEPER_LOG_FORMAT", "xml", "CKPTKEEPER_LOG_FORMAT: Input should be 'text' or 'json'"),
    ("CKPTKEEPER_METRICS_PORT", "70000", "CKPTKEEPER_METRICS_PORT: Input should be less than or equal to 65535"),
    ("CKPTKEEPER_METRICS_PORT", "-1", "CKPTKEEPER_METRICS_PORT: Input should be greater than or equal to 0"),
    ("CKPTKEEPER_METRICS_PORT", "http", "CKPTKEEPER_METRICS_PORT: Input should be a valid integer"),
    ("CKPTKEEPER_ROOT", "/a\0b", "CKPTKEEPER_ROOT: a path cannot contain a NUL character"),
]


@pytest.mark.parametrize(("var", "raw", "message"), BAD_VALUES)
def test_a_bad_value_fails_with_the_variables_name(var: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(None, {}, {var: raw})
    assert str(e.value) == message


def test_a_bad_environment_value_fails_even_when_a_flag_overrides_it() -> None:
    """The environment is checked on its own, so a broken variable is never silently hidden."""
    with pytest.raises(ConfigError, match=r"^CKPTKEEPER_MAX_DEPTH: Input should be a valid integer$"):
        load_settings(None, {"max_depth": 2}, {"CKPTKEEPER_MAX_DEPTH": "deep"})


def test_every_bad_variable_is_reported() -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(None, {}, {"CKPTKEEPER_GRACE": "0", "CKPTKEEPER_MAX_DEPTH": "x"})
    assert str(e.value).splitlines() == [
        "CKPTKEEPER_MAX_DEPTH: Input should be a valid integer",  # in the order of the settings
        "CKPTKEEPER_GRACE: Input should be greater than 0",
    ]


KNOWN = (
    "known: CKPTKEEPER_ARCHIVE_OPTIONS, CKPTKEEPER_ARCHIVE_TO, CKPTKEEPER_AWAIT, CKPTKEEPER_DRY_RUN, "
    "CKPTKEEPER_EXIT_WHEN_DONE, CKPTKEEPER_GRACE, "
    "CKPTKEEPER_KEEP, CKPTKEEPER_KEEP_UNDER_PRESSURE, CKPTKEEPER_KEEP_WEIGHTS, CKPTKEEPER_LOG_FORMAT, "
    "CKPTKEEPER_MAX_DEPTH, CKPTKEEPER_METRICS, CKPTKEEPER_METRICS_HOST, CKPTKEEPER_METRICS_PORT, "
    "CKPTKEEPER_MIN_FREE, CKPTKEEPER_POLL, "
    "CKPTKEEPER_PROTECT_TRAINER_BEST, CKPTKEEPER_RESCAN_INTERVAL, "
    "CKPTKEEPER_ROOT, CKPTKEEPER_SETTLE, CKPTKEEPER_STALE_AFTER, CKPTKEEPER_STANDBY, CKPTKEEPER_STATE_DIR, "
    "CKPTKEEPER_CONFIG"
)


@pytest.mark.parametrize("var", ["CKPTKEEPER_KEPP", "CKPTKEEPER_METRIC", "CKPTKEEPER_keep", "CKPTKEEPER_"])
def test_a_misspelt_variable_fails(var: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(None, {}, {var: "last:1", "CKPTKEEPER_KEEP": "last:2"})
    assert str(e.value) == f"{var}: not a ckptkeeper setting ({KNOWN})"


def test_a_misspelt_variable_that_is_empty_is_ignored() -> None:
    assert load_settings(None, {}, {"CKPTKEEPER_KEPP": ""}) == Settings()


# ---- through the CLI -------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    root = tmp_path / "outputs"
    simulate_run(root / "run", SimConfig(steps_per_epoch=4, epochs=1, save_steps=2, eval_strategy="no"))
    return root


@pytest.mark.parametrize("command", ["watch", "plan", "prune"])
@pytest.mark.parametrize(
    ("var", "raw", "message"),
    [
        ("CKPTKEEPER_MAX_DEPTH", "deep", "CKPTKEEPER_MAX_DEPTH: Input should be a valid integer"),
        ("CKPTKEEPER_KEEP", "last:2,bogus:1", "CKPTKEEPER_KEEP[1]: invalid rule 'bogus:1': unknown rule 'bogus'."),
        ("CKPTKEEPER_METRICS_PORT", "70000", "CKPTKEEPER_METRICS_PORT: Input should be less than or equal to 65535"),
        ("CKPTKEEPER_KEPP", "last:1", "CKPTKEEPER_KEPP: not a ckptkeeper setting"),
    ],
)
def test_cli_exits_2_with_the_message(run_dir: Path, command: str, var: str, raw: str, message: str) -> None:
    result = CliRunner().invoke(main, [command, str(run_dir), "--keep", "last:1"], env={var: raw})
    assert result.exit_code == 2, result.output
    assert f"Error: {message}" in result.output
    assert sorted(p.name for p in (run_dir / "run").iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_cli_takes_root_and_rules_from_the_environment(run_dir: Path) -> None:
    env = {"CKPTKEEPER_ROOT": str(run_dir), "CKPTKEEPER_KEEP": "last:1"}
    result = CliRunner().invoke(main, ["plan"], env=env)
    assert result.exit_code == 0, result.output
    assert "checkpoint-2" in result.output and "checkpoint-4" in result.output
    result = CliRunner().invoke(main, ["prune"], env=env)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (run_dir / "run").iterdir()) == ["checkpoint-4"]


def test_cli_flag_overrides_the_environment(run_dir: Path) -> None:
    env = {"CKPTKEEPER_ROOT": str(run_dir), "CKPTKEEPER_KEEP": "last:1", "CKPTKEEPER_DRY_RUN": "true"}
    result = CliRunner().invoke(main, ["prune", "--keep", "last:2"], env=env)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (run_dir / "run").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    result = CliRunner().invoke(main, ["prune"], env=env)  # dry run from the environment: nothing removed
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (run_dir / "run").iterdir()) == ["checkpoint-2", "checkpoint-4"]
