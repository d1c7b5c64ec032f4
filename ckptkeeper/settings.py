"""Settings: what plan, prune and watch were asked to do, once validated (`config` reads and checks them).

A plain frozen dataclass, so that the usual command line (ROOT, --keep, --state-dir) makes one without
importing pydantic (about 50 ms of every start: issue #12); `config_model.SettingsModel` is the validator of
everything else, with the same fields and defaults (tests/test_config_quick.py holds the two together)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ckptkeeper.metric_specs import AwaitSpec, MetricSpec, parse_await, parse_metric
from ckptkeeper.model import Action
from ckptkeeper.policy import Policy, Protections
from ckptkeeper.pressure import PressurePolicy, parse_floor
from ckptkeeper.rules import parse_rules
from ckptkeeper.scan import DEFAULT_MAX_DEPTH, ScanOptions
from ckptkeeper.stale import DEFAULT_STALE_AFTER
from ckptkeeper.units import parse_seconds

MAX_STALE_AFTER = 365 * 86400
# The bounds of watch's settings (seconds; a TCP port), checked by the model and by config's quick path.
MAX_RESCAN_INTERVAL = 86400.0
MAX_POLL = 3600.0
MAX_GRACE = 3600.0
MAX_PORT = 65535
# The setting's name where it is not the field's: `await` is a Python keyword.
ALIASES = {"await_": "await"}


@dataclass(frozen=True)
class Settings:
    """Every setting of plan, prune and watch; each key is also a flag (`max_depth` is `--max-depth`)."""

    root: Path | None = None
    keep: list[str] = field(default_factory=list)
    keep_weights: list[str] = field(default_factory=list)  # what these alone keep is kept weights-only
    min_free: str | None = None  # free space to keep on each filesystem holding a run
    keep_under_pressure: list[str] = field(default_factory=list)  # what still stays below that floor
    archive_to: Path | str | None = None  # a directory, or an object store URL (s3://bucket/prefix)
    archive_options: dict[str, Any] = field(default_factory=dict)
    state_dir: Path | None = None
    max_depth: int = DEFAULT_MAX_DEPTH
    protect_trainer_best: bool = True
    # Named metrics from evaluation jobs: NAME -> SOURCE#POINTER (`--metric NAME=SOURCE#POINTER`)
    metrics: dict[str, str] = field(default_factory=dict)
    # `--await NAME[:TIMEOUT]`: keep a complete checkpoint until its NAME arrives (or TIMEOUT passes)
    await_: list[str] = field(default_factory=list)
    # None: the command's default (0 for plan and prune, 2 s for watch)
    settle: float | None = None
    stale_after: str = "1h"  # an incomplete checkpoint unchanged this long is reported as stale
    dry_run: bool = False
    # watch only
    rescan_interval: float = 60.0
    poll: float | None = None
    exit_when_done: bool = False
    standby: bool = False
    grace: float = 10.0
    log_format: Literal["text", "json"] = "text"
    metrics_port: int | None = None  # None: no metrics server; 0: any free port
    metrics_host: str = "127.0.0.1"

    def metric_specs(self) -> tuple[MetricSpec, ...]:
        return tuple(parse_metric(f"{name}={source}") for name, source in self.metrics.items())

    def await_specs(self) -> tuple[AwaitSpec, ...]:
        defined = {spec.name: spec for spec in self.metric_specs()}
        return tuple(parse_await(text, defined) for text in self.await_)

    def archive_option_pairs(self) -> tuple[tuple[str, Any], ...]:
        return tuple(sorted(self.archive_options.items()))

    def archive(self) -> tuple[Path | str | None, tuple[tuple[str, Any], ...]]:
        """Where removed checkpoints go (a path, a URL or None) and the object store's options."""
        return self.archive_to, self.archive_option_pairs()

    def rules_text(self) -> str:
        return ",".join(self.keep)

    def policy(self) -> Policy:
        pressure = None
        if self.min_free is not None:
            pressure = PressurePolicy(parse_floor(str(self.min_free)), parse_rules(",".join(self.keep_under_pressure)))
        defined = frozenset(self.metrics)
        if pressure is not None:
            pressure = PressurePolicy(pressure.floor, parse_rules(",".join(self.keep_under_pressure), defined))
        return Policy(
            rules=parse_rules(self.rules_text(), defined),
            protections=Protections(trainer_best=self.protect_trainer_best, awaits=self.await_specs()),
            weight_rules=parse_rules(",".join(self.keep_weights), defined),
            removal=Action.ARCHIVE if self.archive_to else Action.DELETE,
            pressure=pressure,
            defined_metrics=defined,
        )

    def scan_options(self, default_settle: float = 0.0) -> ScanOptions:
        settle = default_settle if self.settle is None else self.settle
        stale_after = parse_seconds(self.stale_after) or DEFAULT_STALE_AFTER
        return ScanOptions(self.max_depth, settle, stale_after, self.metric_specs())


def setting_keys() -> tuple[str, ...]:
    """Every setting as a user writes it (a config file's key, `CKPTKEEPER_` + it upper-cased)."""
    return tuple(ALIASES.get(f.name, f.name) for f in fields(Settings))
