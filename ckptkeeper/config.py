"""Settings: a config file (YAML or TOML) overlaid by the environment and command-line flags, validated (by
`config_model`'s pydantic model, imported only for what the quick path here does not take itself).

User config is read strictly (unknown keys are errors), unlike what trainers write. Relative paths in a
config file are taken from the current directory, like the same paths given as flags.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ckptkeeper.metric_specs import MetricSpecError
from ckptkeeper.pressure import parse_floor
from ckptkeeper.rules import RuleError, parse_rule
from ckptkeeper.settings import (
    MAX_GRACE,
    MAX_POLL,
    MAX_PORT,
    MAX_RESCAN_INTERVAL,
    MAX_STALE_AFTER,
    Settings,
    setting_keys,
)
from ckptkeeper.units import DURATION_FORMS, parse_seconds


class ConfigError(ValueError):
    """A bad config file or setting; the message has one line per problem."""


def _valid_rule(text: str) -> str:
    parse_rule(text)
    return text.strip()


def _no_nul(path: Path) -> Path:
    if "\0" in str(path):  # the OS rejects such a path with a ValueError, not an OSError
        raise ValueError("a path cannot contain a NUL character")
    return path


def _archive_target(value: object) -> object:
    """A URL (`s3://bucket/prefix`) stays text: a Path would fold its `//`. Anything else is a path."""
    if isinstance(value, str) and "://" in value:
        if "\0" in value:
            raise ValueError("a URL cannot contain a NUL character")
        return value
    return _no_nul(Path(value)) if isinstance(value, (str, os.PathLike)) else value


def _option_pairs(value: object) -> object:
    """`archive_options` may be given as KEY=VALUE texts (flags, the environment: comma-separated) or a mapping."""
    if isinstance(value, str):
        value = [p for p in (part.strip() for part in value.split(",")) if p]
    if isinstance(value, (list, tuple)):
        pairs = {}
        for item in value:
            key, sep, raw = str(item).partition("=")
            if not sep or not key.strip():
                raise ValueError(f"expected KEY=VALUE, got {item!r}")
            pairs[key.strip()] = _scalar(raw.strip())
        return pairs
    return value


def _valid_floor(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("expected a size such as 50G or a percentage such as 10%")
    text = str(value)
    parse_floor(text)
    return text.strip()


def _valid_duration(value: object) -> str:
    seconds = parse_seconds(value)
    if seconds is None or seconds <= 0 or seconds > MAX_STALE_AFTER:
        raise ValueError(f"expected a duration such as {DURATION_FORMS}, or seconds (more than 0, at most 365d)")
    return value.strip() if isinstance(value, str) else str(value)


def _comma_list(value: object) -> object:
    """`keep` may be written `best:1,last:5` as well as a list of rules."""
    if isinstance(value, str):
        return [p for p in (part.strip() for part in value.split(",")) if p] if value.strip() else []
    return value


class _NotQuick(Exception):
    """A value _quick_settings leaves to the model."""


def _quick_path(value: object) -> Path:
    if not isinstance(value, Path) or "\0" in str(value):
        raise _NotQuick
    return value


def _quick_rules(value: object) -> list[str]:
    texts = _comma_list(value)
    if type(texts) is not list or any(type(text) is not str for text in texts):
        raise _NotQuick
    return [_valid_rule(text) for text in texts]  # a RuleError is left to the model too


def _quick_archive(value: object) -> Path:
    """A local archive directory as the flag gives it (text); a URL, or anything else, is left to the model."""
    if isinstance(value, Path):
        return _quick_path(value)
    if type(value) is not str or "://" in value or "\0" in value:
        raise _NotQuick
    return Path(value)


def _quick_bool(value: object) -> bool:
    if type(value) is not bool:
        raise _NotQuick
    return value


def _quick_seconds(at_most: float) -> Callable[[object], object]:
    """A float of seconds in (0, at_most], the model's `Field(gt=0, le=at_most)` (NaN and inf are not)."""

    def check(value: object) -> float:
        if type(value) is not float or not 0 < value <= at_most:
            raise _NotQuick
        return value

    return check


def _quick_log_format(value: object) -> str:
    if type(value) is not str or value not in ("text", "json"):
        raise _NotQuick
    return value


def _quick_port(value: object) -> int:
    if type(value) is not int or not 0 <= value <= MAX_PORT:
        raise _NotQuick
    return value


def _quick_str(value: object) -> str:
    if type(value) is not str:
        raise _NotQuick
    return value


# What _quick_settings checks itself: the settings of a usual command line (ROOT, --keep, --state-dir,
# --archive-to a directory, --dry-run; and watch's --poll, --rescan-interval, --grace, --log-format,
# --metrics-port, --metrics-host), each only in the form the model takes unchanged but for what its own
# validator does.
_QUICK: dict[str, Callable[[object], object]] = {
    "root": _quick_path,
    "state_dir": _quick_path,
    "keep": _quick_rules,
    "keep_weights": _quick_rules,
    "archive_to": _quick_archive,
    "dry_run": _quick_bool,
    "protect_trainer_best": _quick_bool,
    "exit_when_done": _quick_bool,
    "standby": _quick_bool,
    "poll": _quick_seconds(MAX_POLL),
    "rescan_interval": _quick_seconds(MAX_RESCAN_INTERVAL),
    "grace": _quick_seconds(MAX_GRACE),
    "log_format": _quick_log_format,
    "metrics_port": _quick_port,
    "metrics_host": _quick_str,
}


def _quick_settings(values: Mapping[str, object]) -> Settings | None:
    """The Settings that the model's validation of `values` gives, made without pydantic; None
    where `values` holds a setting not in _QUICK, a value of another form, or a bad one: the model then
    validates them, and says what is wrong. tests/test_config_quick.py checks this against the model."""
    quick: dict[str, Any] = {}
    for key, value in values.items():
        check = _QUICK.get(key)
        if check is None:
            return None
        try:
            quick[key] = check(value)
        except (_NotQuick, ValueError):
            return None
    return Settings(**quick)


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        name = part if part.isprintable() else repr(part)  # a key with a line break stays on one line
        out += f".{name}" if out else name
    return out


Where = Callable[[tuple[int | str, ...]], str]  # what a setting is called where its value came from


def _validated(values: Mapping[str, object], where: Where, whole: str) -> Settings:
    """The Settings `values` give, by the model; a ConfigError naming each wrong setting (`where`)."""
    from pydantic import ValidationError

    from ckptkeeper.config_model import messages, validate

    try:
        return validate(values)
    except ValidationError as e:
        raise ConfigError(messages(e, where, whole)) from None


def in_file(name: str) -> Where:
    """A key of the config file `name`: `bad.yaml: keep[1]`."""
    return lambda loc: f"{name}: {_location(loc)}"


def in_environment(loc: tuple[int | str, ...]) -> str:
    """The variable that gave the setting: `CKPTKEEPER_KEEP[1]`."""
    rest = _location(loc[1:])
    return env_var(str(loc[0])) + (rest if rest.startswith("[") else f".{rest}" if rest else "")


def as_flag(loc: tuple[int | str, ...]) -> str:
    """The flag that gave the setting (`max_depth` is `--max-depth`; `root`, the ROOT argument). A flag's
    value is one whole (a repeated --keep is merged), so the rest of the location does not name a part of it."""
    return flag_name(str(loc[0]))


# Settings whose flag is not `--` + the setting's name (a repeated flag of one item each, a keyword)
_FLAGS = {
    "root": "ROOT",
    "metrics": "--metric",
    "await": "--await",
    "await_": "--await",
    "archive_options": "--archive-option",
}


def flag_name(setting: str) -> str:
    if setting in _FLAGS:
        return _FLAGS[setting]
    flag = "--" + setting.replace("_", "-")  # a key with a line break (given in code) stays on one line
    return flag if flag.isprintable() else flag.encode("unicode_escape", "backslashreplace").decode("ascii")


# A config file is a few hundred bytes; reading stops here (`--config /dev/zero` would never end).
MAX_CONFIG_BYTES = 1 << 20


def _read_text(path: Path) -> str:
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"larger than {MAX_CONFIG_BYTES >> 20} MiB, which is not a config file")
    # As Path.read_text: universal newlines.
    return raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


_TOML_TWICE = ": that key (or a table of that name) is already set above; give each key once"


def read_config_file(path: Path) -> dict[str, Any]:
    name = path.name
    try:
        text = _read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such config file: {path}") from None
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, too large, a NUL in the path
        raise ConfigError(f"{name}: cannot read the config file: {e}") from None
    data = _parse_toml(name, text) if path.suffix == ".toml" else _parse_yaml(name, text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: a config file holds a mapping of settings, not a {type(data).__name__}")
    return data


def _parse_toml(name: str, text: str) -> Any:
    import tomllib  # only for a TOML config file: not at every start

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib refuses a key given twice, but says only where: say what it means
        hint = _TOML_TWICE if str(e).startswith("Cannot overwrite a value") else ""
        raise ConfigError(f"{name}: invalid TOML: {e}{hint}") from None
    except RecursionError:
        raise ConfigError(f"{name}: invalid TOML: nested too deeply") from None
    except ValueError as e:  # an integer of more digits than int() converts
        raise ConfigError(f"{name}: invalid TOML: {_one_line(e)}") from None


def _parse_yaml(name: str, text: str) -> Any:
    from ckptkeeper.yaml_config import YamlProblem, load_yaml  # PyYAML only for a YAML file: it slows every start

    try:
        return load_yaml(text)
    except YamlProblem as e:
        raise ConfigError(f"{name}: invalid YAML{e}") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _scalar(raw: str) -> object:
    """An environment value as a YAML scalar (`3`, `2.5`, `true`); the text itself where it is not one."""
    import yaml

    try:
        return yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, RecursionError):  # then the text itself is validated
        return raw


ENV_PREFIX = "CKPTKEEPER_"
CONFIG_ENV = "CKPTKEEPER_CONFIG"
# Settings whose environment value is taken as text; the others are read as a YAML scalar (3, 2.5, true).
_TEXT_SETTINGS = {
    "root",
    "keep",
    "keep_weights",
    "keep_under_pressure",
    "min_free",
    "archive_to",
    "archive_options",
    "state_dir",
    "log_format",
    "metrics_host",
    "await",
}


def env_var(setting: str) -> str:
    return ENV_PREFIX + setting.upper()


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings from `CKPTKEEPER_*` variables (an empty variable counts as unset). A misspelt variable
    is an error rather than a silently ignored setting."""
    known = {env_var(key): key for key in setting_keys()}
    values: dict[str, Any] = {}
    problems = []
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV or raw == "":
            continue
        name = known.get(var)
        if name is None:
            problems.append(f"{var}: not a ckptkeeper setting (known: {', '.join(sorted(known))}, {CONFIG_ENV})")
            continue
        if name in _TEXT_SETTINGS:
            values[name] = raw
            continue
        values[name] = _scalar(raw)
    if problems:
        raise ConfigError("\n".join(problems))
    if not values:  # the defaults: nothing to check
        return values
    _validated(values, in_environment, "environment")
    return values


def _settings_of_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Click's parameters as settings: --await is the parameter `await_` (a Python keyword), a tuple of the times
    it was given (none: not given); the setting is `await`, as a config file and the environment name it."""
    settings = dict(flags)
    if "await_" in settings:
        settings["await"] = list(settings.pop("await_") or ()) or None
    return settings


def load_settings(config: Path | None, flags: dict[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the config file (`config`, or $CKPTKEEPER_CONFIG), then `CKPTKEEPER_*` variables, then
    every flag that was given (not None): flags over environment over config file."""
    environ = os.environ if environ is None else environ
    if config is None and environ.get(CONFIG_ENV):
        config = Path(environ[CONFIG_ENV])
    from_file = read_config_file(config) if config else {}
    if config:
        _validated(from_file, in_file(config.name), f"{config.name}: settings")
    from_env = read_environment(environ)
    given = {k: v for k, v in _settings_of_flags(flags).items() if v is not None}

    def where(loc: tuple[int | str, ...]) -> str:
        """Each setting named as it was given: the flag, the variable, or the file's key."""
        field = str(loc[0])
        if field in given:
            return as_flag(loc)
        return in_environment(loc) if field in from_env else in_file(config.name if config else "")(loc)

    settings = None if from_file or from_env else _quick_settings(given)
    if settings is None:  # (the file and the environment passed alone: what is wrong is a flag's value, as a rule)
        settings = _validated({**from_file, **from_env, **given}, where, "command line")
    # Checked on the merged settings: the floor may come from one place and the pressure rules from another.
    if settings.keep_under_pressure and settings.min_free is None:
        key = "keep_under_pressure"
        source = where((key,)) if key in given or key in from_env else config.name if config else ""
        raise ConfigError(f"{source}: {PRESSURE_NEEDS_A_FLOOR}")
    _check_named_metrics(settings, lambda key: where((key,)))
    return settings


def _check_named_metrics(settings: Settings, where: Callable[[str], str]) -> None:
    """Between settings: each `--await` names a defined metric. (A rule that misspells one is refused when
    planned, where the run's own metrics are known.)"""
    try:
        settings.await_specs()
    except MetricSpecError as e:
        raise ConfigError(f"{where('await')}: {str(e).partition(': ')[2] or e}") from None


PRESSURE_NEEDS_A_FLOOR = (
    "keep_under_pressure (--keep-under-pressure) needs min_free (--min-free): the floor that says when the disk "
    "is under pressure"
)


def parse_archive_options(values: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`--archive-option KEY=VALUE` texts as fsspec storage options (values read as YAML scalars)."""
    try:
        parsed = _option_pairs(list(values))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    assert isinstance(parsed, dict)
    return parsed


__all__ = ["ConfigError", "RuleError", "Settings", "load_settings"]
