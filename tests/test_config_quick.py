"""The quick path of load_settings (config._quick_settings: the usual command line checked without building
pydantic) against the model itself: for every value it takes it must give exactly the Settings that
config_model.validate gives, and every value the model refuses it must leave to the model (which then says
what is wrong, as before). And the model and the Settings dataclass have the same fields and defaults."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from pydantic import ValidationError

from ckptkeeper.config import _QUICK, ConfigError, _quick_settings, load_settings
from ckptkeeper.config_model import SettingsModel, validate
from ckptkeeper.settings import Settings, setting_keys

PATHS: list[object] = [
    Path("outputs"), Path("/tmp/runs"), Path("."), Path(""), Path("a\0b"), Path("run\nx"), Path("/"),
    "outputs", b"outputs", PurePosixPath("outputs"), None, 3, True, [Path("x")],
]  # fmt: skip
RULES: list[object] = [
    "last:1", "best:1,last:5", " last:1 , best:2 ", "", " ", ",", "last:1,,", "last:0", "last:x", "bogus",
    "best:3:accuracy", "epoch:all", "every:100", ["last:1", "best:1"], [" last:1 "], ["last:1,best:1"], [],
    ["bogus"], [3], ("last:1",), None, 1, True, {"last": 1}, "last:1\0", "last:99999999999999999999999",
]  # fmt: skip
BOOLS: list[object] = [True, False, None, 0, 1, "true", "yes", 1.0, []]
ARCHIVES: list[object] = [
    "/mnt/archive", "archive", "", " ", "run\nx", "a\0b", "s3://bucket/prefix", "s3://a\0b", "file:///x", "x://",
    Path("/mnt/archive"), Path("a\0b"), None, 3, b"x", ["x"],
]  # fmt: skip
SECONDS: list[object] = [
    5.0, 0.5, 1e-9, 60.0, 3600.0, 3600.5, 86400.0, 86400.5, 0.0, -0.0, -1.0, float("nan"), float("inf"), 5, 0,
    True, "5", "5.0", None, [],
]  # fmt: skip
LOG_FORMATS: list[object] = ["text", "json", "JSON", "Text", " json", "yaml", "", None, 1, b"json", ["json"]]
PORTS: list[object] = [0, 1, 9100, 65535, 65536, -1, True, False, 9100.0, "9100", None, 2**70]
HOSTS: list[object] = ["127.0.0.1", "0.0.0.0", "::1", "localhost", "", " x ", "a\0b", None, 1, b"host", ["x"]]
VALUES: dict[str, list[object]] = {
    "root": PATHS, "state_dir": PATHS, "keep": RULES, "keep_weights": RULES, "archive_to": ARCHIVES,
    "dry_run": BOOLS, "protect_trainer_best": BOOLS, "exit_when_done": BOOLS, "standby": BOOLS,
    "poll": SECONDS, "rescan_interval": SECONDS, "grace": SECONDS,
    "log_format": LOG_FORMATS, "metrics_port": PORTS, "metrics_host": HOSTS,
}  # fmt: skip


def model(values: dict[str, Any]) -> Settings | None:
    try:
        return validate(values)
    except ValidationError:
        return None


def assert_same(values: dict[str, Any]) -> bool:
    """The quick path gives the model's Settings, or leaves `values` to the model; True if it took them."""
    quick, expected = _quick_settings(values), model(values)
    if quick is None:
        return False
    assert expected is not None, values  # the quick path took what the model refuses
    assert quick == expected, values
    for field in dataclasses.fields(Settings):
        assert type(getattr(quick, field.name)) is type(getattr(expected, field.name)), (field.name, values)
    return True


def test_the_quick_settings_are_the_ones_the_table_covers() -> None:
    assert set(VALUES) == set(_QUICK)


@pytest.mark.parametrize("key", sorted(VALUES))
def test_each_value_alone(key: str) -> None:
    taken = [assert_same({key: value}) for value in VALUES[key]]
    assert any(taken) and not all(taken)  # both kinds are among them


def test_pairs_of_settings() -> None:
    for first, second in itertools.combinations(sorted(VALUES), 2):
        for a, b in itertools.product(VALUES[first], VALUES[second]):
            assert_same({first: a, second: b})


def test_nothing_given_is_the_defaults() -> None:
    assert _quick_settings({}) == validate({}) == Settings()


def test_the_model_has_the_fields_and_defaults_of_settings() -> None:
    fields = dataclasses.fields(Settings)
    assert list(SettingsModel.model_fields) == [f.name for f in fields]
    assert [info.alias or name for name, info in SettingsModel.model_fields.items()] == list(setting_keys())
    for f in fields:
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert SettingsModel.model_fields[f.name].get_default(call_default_factory=True) == default, f.name


@pytest.mark.parametrize(
    "values",
    [{"settle": 1.0}, {"max_depth": 3}, {"await": ["x"]}, {"metrics": {}}, {"min_free": "10%"}, {"unknown": 1}],
)
def test_other_settings_are_left_to_the_model(values: dict[str, Any]) -> None:
    assert _quick_settings({"root": Path("x"), **values}) is None


def test_a_refused_flag_is_reported_as_the_model_says() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"root": Path("a\0b"), "keep": "last:1"}, {})
    assert str(caught.value) == "ROOT: a path cannot contain a NUL character"
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"root": Path("x"), "dry_run": "yes"}, {})
    assert str(caught.value) == "--dry-run: Input should be a valid boolean"


def test_the_environment_and_a_config_file_still_go_through_the_model(tmp_path: Path) -> None:
    environ = {"CKPTKEEPER_KEEP": "last:2"}
    assert load_settings(None, {"root": Path("x"), "keep": "last:1"}, environ).keep == ["last:1"]
    config = tmp_path / "c.yaml"
    config.write_text("keep: best:1\nmax_depth: 2\n")
    settings = load_settings(config, {"root": Path("x")}, {})
    assert (settings.keep, settings.max_depth) == (["best:1"], 2)


def test_a_config_key_is_the_setting_as_documented_not_the_field_behind_it(tmp_path: Path) -> None:
    """`await` is the setting; `await_` (the Python field behind it) is no key a user may write."""
    config = tmp_path / "c.yaml"
    config.write_text("metrics: {mmlu: 'file:r.json#/acc'}\nawait_: [mmlu]\n")
    with pytest.raises(ConfigError, match="await_: Extra inputs are not permitted"):
        load_settings(config, {}, {})
    config.write_text("metrics: {mmlu: 'file:r.json#/acc'}\nawait: [mmlu]\n")
    assert load_settings(config, {}, {}).await_ == ["mmlu"]
