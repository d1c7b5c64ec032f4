"""The validator of settings (pydantic): every value from a config file, the environment, or a flag in a form
`config._quick_settings` does not take itself. Imported only then: pydantic costs about 50 ms of a start.

`SettingsModel` has exactly the fields and defaults of `settings.Settings`, each with its validator; what it
validates becomes a Settings (`validate`). tests/test_config_quick.py holds the two together."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
)

from ckptkeeper.config import (
    _archive_target,
    _comma_list,
    _no_nul,
    _option_pairs,
    _valid_duration,
    _valid_floor,
    _valid_rule,
)
from ckptkeeper.metric_specs import parse_metric
from ckptkeeper.scan import DEFAULT_MAX_DEPTH
from ckptkeeper.settings import MAX_GRACE, MAX_POLL, MAX_PORT, MAX_RESCAN_INTERVAL, Settings

RuleText = Annotated[str, AfterValidator(_valid_rule)]
PathSetting = Annotated[Path, AfterValidator(_no_nul)]
ArchiveSetting = Annotated[Path | str, BeforeValidator(_archive_target)]
FloorText = Annotated[object, AfterValidator(_valid_floor)]
DurationText = Annotated[object, AfterValidator(_valid_duration)]


def _not_a_bool(value: object) -> object:
    """A lax float takes true for 1.0 (`poll: yes` would poll every second): seconds are a number."""
    if isinstance(value, bool):
        raise ValueError("expected a number of seconds, not true or false")
    return value


Seconds = Annotated[float, BeforeValidator(_not_a_bool)]


class SettingsModel(BaseModel):
    """Settings' fields, each with what a valid value is; `await` (a Python keyword) is the field `await_`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: PathSetting | None = None
    keep: list[RuleText] = Field(default_factory=list)
    keep_weights: list[RuleText] = Field(default_factory=list)
    min_free: FloorText | None = None
    keep_under_pressure: list[RuleText] = Field(default_factory=list)
    archive_to: ArchiveSetting | None = None
    archive_options: Annotated[dict[str, Any], BeforeValidator(_option_pairs)] = Field(default_factory=dict)
    state_dir: PathSetting | None = None
    max_depth: StrictInt = Field(DEFAULT_MAX_DEPTH, ge=0, le=64)
    protect_trainer_best: StrictBool = True
    metrics: dict[str, str] = Field(default_factory=dict)
    await_: list[str] = Field(default_factory=list, alias="await")
    settle: Seconds | None = Field(None, ge=0, le=3600)
    stale_after: DurationText = "1h"
    dry_run: StrictBool = False
    rescan_interval: Seconds = Field(60.0, gt=0, le=MAX_RESCAN_INTERVAL)
    poll: Seconds | None = Field(None, gt=0, le=MAX_POLL)
    exit_when_done: StrictBool = False
    standby: StrictBool = False
    grace: Seconds = Field(10.0, gt=0, le=MAX_GRACE)
    log_format: Literal["text", "json"] = "text"
    metrics_port: StrictInt | None = Field(None, ge=0, le=MAX_PORT)
    metrics_host: str = "127.0.0.1"

    @field_validator("metrics")
    @classmethod
    def _valid_metrics(cls, value: dict[str, str]) -> dict[str, str]:
        for name, source in value.items():
            parse_metric(f"{name}={source}")
        return value

    @field_validator("await_", mode="before")
    @classmethod
    def _split_awaits(cls, value: object) -> object:
        if isinstance(value, str):
            return [p for p in (part.strip() for part in value.split(",")) if p]
        return value

    @field_validator("keep", "keep_weights", "keep_under_pressure", mode="before")
    @classmethod
    def _split_comma_list(cls, value: object) -> object:
        return _comma_list(value)


def validate(values: Mapping[str, object]) -> Settings:
    """The Settings `values` give; ValidationError where one is wrong."""
    model = SettingsModel.model_validate(values)
    return Settings(**{name: getattr(model, name) for name in SettingsModel.model_fields})


Where = Callable[[tuple[int | str, ...]], str]  # what a setting is called where its value came from


def messages(error: ValidationError, where: Where, whole: str) -> str:
    """One line per problem, each led by the name of the setting as it was given (`where`); `whole` leads a
    problem between settings."""
    lines = []
    for e in error.errors():
        loc = tuple(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{where(loc) if loc else whole}: {msg}")
    return "\n".join(dict.fromkeys(lines))
