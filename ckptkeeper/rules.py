"""Keep rules: small values with one method each, and the `--keep` parser and printer.

A rule looks only at complete checkpoints and answers which of them it keeps and why. Adding a rule means
adding a class here and a branch in `_parse_one`; the planner never changes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from ckptkeeper.model import Checkpoint

Direction = Literal["min", "max"]

VALID_FORMS = (
    "last:N, best:N[:METRIC[:min|max]], epoch:all, epoch:N, every:K (N and K positive integers), separated by commas"
)
_METRIC_NAME = re.compile(r"[A-Za-z0-9_./-]+")
_POSITIVE = re.compile(r"[1-9][0-9]*")


class RuleError(ValueError):
    """A `--keep` value that is not a list of valid rules; the message names the bad rule."""


class Rule(Protocol):
    def keeps(self, candidates: Sequence[Checkpoint]) -> dict[int, str]:
        """Map the step of every candidate this rule keeps to the reason, given complete checkpoints."""
        ...

    def describe(self) -> str: ...


def format_metric(value: float) -> str:
    if math.isnan(value) or math.isinf(value) or value == 0:
        return str(value).lower()
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.4g}"


@dataclass(frozen=True)
class Last:
    count: int

    def keeps(self, candidates: Sequence[Checkpoint]) -> dict[int, str]:
        newest_first = sorted(candidates, key=lambda c: c.step, reverse=True)[: self.count]
        return {c.step: f"last {rank}/{self.count}" for rank, c in enumerate(newest_first, start=1)}

    def describe(self) -> str:
        return f"the last {self.count}"


def default_direction(metric: str) -> Direction:
    """The Trainer's rule: a metric whose name ends in `loss` is better when lower."""
    return "min" if metric.endswith("loss") else "max"


def normalize_metric(name: str) -> str:
    return name if name.startswith("eval_") else f"eval_{name}"


@dataclass(frozen=True)
class Best:
    count: int
    metric: str = "eval_loss"
    direction: Direction = "min"

    def rank_key(self, checkpoint: Checkpoint) -> tuple[bool, float, int]:
        value = checkpoint.metrics[self.metric]
        if math.isnan(value):
            return (True, 0.0, checkpoint.step)  # NaN ranks worst
        signed = value if self.direction == "min" else -value
        return (False, signed, checkpoint.step)  # on a tie the lower step wins, as in the Trainer

    def keeps(self, candidates: Sequence[Checkpoint]) -> dict[int, str]:
        scored = sorted((c for c in candidates if self.metric in c.metrics), key=self.rank_key)
        return {
            c.step: f"best {self.metric}={format_metric(c.metrics[self.metric])} ({rank}/{self.count})"
            for rank, c in enumerate(scored[: self.count], start=1)
        }

    def describe(self) -> str:
        word = "lowest" if self.direction == "min" else "highest"
        return f"the best {self.count} by {self.metric} ({word})"


def epoch_bucket(epoch: float) -> int:
    """`0.38 -> 1`, `1.0 -> 1`, `1.15 -> 2`, `0.9995 -> 1`, `3.0000000000000004 -> 3`."""
    return math.ceil(round(epoch, 6))


@dataclass(frozen=True)
class Epoch:
    count: int | None = None  # None: every epoch

    def keeps(self, candidates: Sequence[Checkpoint]) -> dict[int, str]:
        newest_in_bucket: dict[int, Checkpoint] = {}
        for c in candidates:
            if c.epoch is None or not math.isfinite(c.epoch):
                continue
            bucket = epoch_bucket(c.epoch)
            held = newest_in_bucket.get(bucket)
            if held is None or c.step > held.step:
                newest_in_bucket[bucket] = c
        buckets = sorted(newest_in_bucket, reverse=True)
        if self.count is not None:
            buckets = buckets[: self.count]
        return {newest_in_bucket[b].step: f"epoch {b}" for b in buckets}

    def describe(self) -> str:
        if self.count is None:
            return "one per epoch"
        return f"one per epoch for the last {self.count} epochs"


@dataclass(frozen=True)
class Every:
    interval: int

    def keeps(self, candidates: Sequence[Checkpoint]) -> dict[int, str]:
        return {c.step: f"every {self.interval}" for c in candidates if c.step % self.interval == 0}

    def describe(self) -> str:
        return f"every step that is a multiple of {self.interval}"


AnyRule = Last | Best | Epoch | Every


def _count(text: str, rule: str) -> int:
    if not _POSITIVE.fullmatch(text):
        raise RuleError(f"invalid rule {rule!r}: {text!r} is not a positive integer. Valid forms: {VALID_FORMS}.")
    try:
        return int(text)
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits(), 4300 by default)
        raise RuleError(f"invalid rule {rule!r}: {text!r} is too large. Valid forms: {VALID_FORMS}.") from None


def _parse_one(text: str) -> AnyRule:
    kind, _, rest = text.partition(":")
    parts = rest.split(":") if rest else []
    if kind == "last" and len(parts) == 1:
        return Last(_count(parts[0], text))
    if kind == "every" and len(parts) == 1:
        return Every(_count(parts[0], text))
    if kind == "epoch" and len(parts) == 1:
        return Epoch(None) if parts[0] == "all" else Epoch(_count(parts[0], text))
    if kind == "best" and 1 <= len(parts) <= 3:
        count = _count(parts[0], text)
        metric = "eval_loss"
        if len(parts) >= 2:
            if not _METRIC_NAME.fullmatch(parts[1]):
                raise RuleError(
                    f"invalid rule {text!r}: {parts[1]!r} is not a metric name. Valid forms: {VALID_FORMS}."
                )
            metric = normalize_metric(parts[1])
        direction = default_direction(metric)
        if len(parts) == 3:
            if parts[2] not in ("min", "max"):
                raise RuleError(
                    f"invalid rule {text!r}: direction must be min or max, not {parts[2]!r}. "
                    f"Valid forms: {VALID_FORMS}."
                )
            direction = "min" if parts[2] == "min" else "max"
        return Best(count, metric, direction)
    if kind in ("last", "every", "epoch", "best"):
        raise RuleError(f"invalid rule {text!r}: wrong number of parts for {kind!r}. Valid forms: {VALID_FORMS}.")
    raise RuleError(f"invalid rule {text!r}: unknown rule {kind!r}. Valid forms: {VALID_FORMS}.")


def parse_rule(text: str) -> AnyRule:
    return _parse_one(text.strip())


def parse_rules(text: str) -> tuple[AnyRule, ...]:
    """Parse a `--keep` value such as `best:1,last:5,epoch:all`. An empty value gives no rules."""
    pieces = [p.strip() for p in text.split(",")]
    if all(p == "" for p in pieces):
        return ()
    if any(p == "" for p in pieces):
        raise RuleError(f"invalid rules {text!r}: an empty rule between commas. Valid forms: {VALID_FORMS}.")
    return tuple(_parse_one(p) for p in pieces)


def format_rule(rule: AnyRule) -> str:
    match rule:
        case Last(count):
            return f"last:{count}"
        case Every(interval):
            return f"every:{interval}"
        case Epoch(count):
            return "epoch:all" if count is None else f"epoch:{count}"
        case Best(count, metric, direction):
            if metric == "eval_loss" and direction == default_direction(metric):
                return f"best:{count}"
            if direction == default_direction(metric):
                return f"best:{count}:{metric}"
            return f"best:{count}:{metric}:{direction}"


def format_rules(rules: Sequence[AnyRule]) -> str:
    return ",".join(format_rule(r) for r in rules)
