"""Keep rules: small values that parse, print and apply themselves, and the `--keep` parser and printer.

A rule looks only at complete checkpoints and answers which of them it keeps and why (a `Reason`, worded
by `render`). Adding a rule means adding a class here and an entry in `RULE_KINDS`; the planner never
changes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, Self

from ckptkeeper.model import Checkpoint, Reason, ReasonKind, RunView

Direction = Literal["min", "max"]

VALID_FORMS = (
    "last:N, best:N[:METRIC[:min|max]], epoch:all, epoch:N, every:K (N and K positive integers), separated by commas"
)
_METRIC_NAME = re.compile(r"[A-Za-z0-9_./-]+")
_POSITIVE = re.compile(r"[1-9][0-9]*")


class RuleError(ValueError):
    """A `--keep` value that is not a list of valid rules; the message names the bad rule."""


class KeepRule:
    """A keep rule: a small frozen value that knows how to parse, print and apply itself.

    `keeps` looks only at complete checkpoints and answers which of them it keeps and why. A new rule is one
    subclass with a `keyword` and the three methods, added to `RULE_KINDS`; nothing else changes."""

    keyword: ClassVar[str]
    arity: ClassVar[tuple[int, int]] = (1, 1)  # how many `:`-separated parts may follow the keyword

    @classmethod
    def parse(cls, parts: list[str], text: str) -> Self:
        raise NotImplementedError

    def format(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def keeps(self, candidates: Sequence[Checkpoint]) -> dict[int, Reason]:
        """Map the step of every candidate this rule keeps to the reason, given complete checkpoints."""
        raise NotImplementedError

    def keeps_in(self, view: RunView) -> dict[int, list[Reason]]:
        """As a member of the planner's union (`policy.AnyOf`): a rule sees only the complete checkpoints."""
        return {step: [reason] for step, reason in self.keeps(view.complete).items()}

    @property
    def metric(self) -> str | None:
        """The metric this rule ranks by, if any: the planner refuses a run that has evals but not this one."""
        return None


Rule = KeepRule


def format_metric(value: float) -> str:
    if math.isnan(value) or math.isinf(value) or value == 0:
        return str(value).lower()
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.4g}"


@dataclass(frozen=True)
class Last(KeepRule):
    keyword: ClassVar[str] = "last"
    count: int

    @classmethod
    def parse(cls, parts: list[str], text: str) -> Self:
        return cls(_count(parts[0], text))

    def format(self) -> str:
        return f"last:{self.count}"

    def keeps(self, candidates: Sequence[Checkpoint]) -> dict[int, Reason]:
        newest_first = sorted(candidates, key=lambda c: c.step, reverse=True)[: self.count]
        rule = self.format()
        return {c.step: Reason(ReasonKind.LAST, rule, rank, self.count) for rank, c in enumerate(newest_first, start=1)}

    def describe(self) -> str:
        return f"the last {self.count}"


def default_direction(metric: str) -> Direction:
    """The Trainer's rule: a metric whose name ends in `loss` is better when lower."""
    return "min" if metric.endswith("loss") else "max"


def normalize_metric(name: str) -> str:
    return name if name.startswith("eval_") else f"eval_{name}"


@dataclass(frozen=True)
class Best(KeepRule):
    keyword: ClassVar[str] = "best"
    arity: ClassVar[tuple[int, int]] = (1, 3)
    count: int
    metric: str = "eval_loss"  # overrides the base's read-only `metric`
    direction: Direction = "min"

    @classmethod
    def parse(cls, parts: list[str], text: str) -> Self:
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
        return cls(count, metric, direction)

    def format(self) -> str:
        if self.metric == "eval_loss" and self.direction == default_direction(self.metric):
            return f"best:{self.count}"
        if self.direction == default_direction(self.metric):
            return f"best:{self.count}:{self.metric}"
        return f"best:{self.count}:{self.metric}:{self.direction}"

    def rank_key(self, checkpoint: Checkpoint) -> tuple[bool, float, int]:
        value = checkpoint.metrics[self.metric]
        if math.isnan(value):
            return (True, 0.0, checkpoint.step)  # NaN ranks worst
        signed = value if self.direction == "min" else -value
        return (False, signed, checkpoint.step)  # on a tie the lower step wins, as in the Trainer

    def keeps(self, candidates: Sequence[Checkpoint]) -> dict[int, Reason]:
        scored = sorted((c for c in candidates if self.metric in c.metrics), key=self.rank_key)
        rule = self.format()
        return {
            c.step: Reason(ReasonKind.BEST, rule, rank, self.count, self.metric, c.metrics[self.metric])
            for rank, c in enumerate(scored[: self.count], start=1)
        }

    def describe(self) -> str:
        word = "lowest" if self.direction == "min" else "highest"
        return f"the best {self.count} by {self.metric} ({word})"


def epoch_bucket(epoch: float) -> int:
    """`0.38 -> 1`, `1.0 -> 1`, `1.15 -> 2`, `0.9995 -> 1`, `3.0000000000000004 -> 3`."""
    return math.ceil(round(epoch, 6))


@dataclass(frozen=True)
class Epoch(KeepRule):
    keyword: ClassVar[str] = "epoch"
    count: int | None = None  # None: every epoch

    @classmethod
    def parse(cls, parts: list[str], text: str) -> Self:
        return cls(None) if parts[0] == "all" else cls(_count(parts[0], text))

    def format(self) -> str:
        return "epoch:all" if self.count is None else f"epoch:{self.count}"

    def keeps(self, candidates: Sequence[Checkpoint]) -> dict[int, Reason]:
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
        rule = self.format()
        return {
            newest_in_bucket[b].step: Reason(ReasonKind.EPOCH, rule, rank, self.count, detail=str(b))
            for rank, b in enumerate(buckets, start=1)
        }

    def describe(self) -> str:
        if self.count is None:
            return "one per epoch"
        return f"one per epoch for the last {self.count} epochs"


@dataclass(frozen=True)
class Every(KeepRule):
    keyword: ClassVar[str] = "every"
    interval: int

    @classmethod
    def parse(cls, parts: list[str], text: str) -> Self:
        return cls(_count(parts[0], text))

    def format(self) -> str:
        return f"every:{self.interval}"

    def keeps(self, candidates: Sequence[Checkpoint]) -> dict[int, Reason]:
        rule = self.format()
        return {
            c.step: Reason(ReasonKind.EVERY, rule, detail=str(self.interval))
            for c in candidates
            if c.step % self.interval == 0
        }

    def describe(self) -> str:
        return f"every step that is a multiple of {self.interval}"


AnyRule = KeepRule
# The parser table: a rule's keyword -> its class. Adding a rule is adding its class here.
RULE_KINDS: dict[str, type[KeepRule]] = {kind.keyword: kind for kind in (Last, Best, Epoch, Every)}


def _count(text: str, rule: str) -> int:
    if not _POSITIVE.fullmatch(text):
        raise RuleError(f"invalid rule {rule!r}: {text!r} is not a positive integer. Valid forms: {VALID_FORMS}.")
    try:
        return int(text)
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits(), 4300 by default)
        raise RuleError(f"invalid rule {rule!r}: {text!r} is too large. Valid forms: {VALID_FORMS}.") from None


def _parse_one(text: str) -> AnyRule:
    keyword, _, rest = text.partition(":")
    parts = rest.split(":") if rest else []
    kind = RULE_KINDS.get(keyword)
    if kind is None:
        raise RuleError(f"invalid rule {text!r}: unknown rule {keyword!r}. Valid forms: {VALID_FORMS}.")
    fewest, most = kind.arity
    if not fewest <= len(parts) <= most:
        raise RuleError(f"invalid rule {text!r}: wrong number of parts for {keyword!r}. Valid forms: {VALID_FORMS}.")
    return kind.parse(parts, text)


def parse_rule(text: str) -> AnyRule:
    return _parse_one(text.strip())


def parse_rules(text: str, defined: Collection[str] = ()) -> tuple[AnyRule, ...]:
    """Parse a `--keep` value such as `best:1,last:5,epoch:all`. An empty value gives no rules. `defined`: the
    names of metrics defined by `--metric`, which a `best` rule takes as they are (no `eval_` prefix)."""
    pieces = [p.strip() for p in text.split(",")]
    if all(p == "" for p in pieces):
        return ()
    if any(p == "" for p in pieces):
        raise RuleError(f"invalid rules {text!r}: an empty rule between commas. Valid forms: {VALID_FORMS}.")
    return tuple(_named(_parse_one(p), p, defined) for p in pieces)


def _named(rule: AnyRule, text: str, defined: Collection[str]) -> AnyRule:
    parts = text.split(":")
    if not isinstance(rule, Best) or len(parts) < 3 or parts[2] not in defined:
        return rule
    direction: Direction = (
        "min" if parts[3:] == ["min"] else "max" if parts[3:] == ["max"] else default_direction(parts[2])
    )
    return Best(rule.count, parts[2], direction)


def format_rule(rule: AnyRule) -> str:
    return rule.format()


def format_rules(rules: Sequence[AnyRule]) -> str:
    return ",".join(format_rule(r) for r in rules)
