"""`--metric NAME=SOURCE#POINTER` and `--await NAME[:TIMEOUT]`: parsed and checked, no I/O but one check that an
`lm-eval:` directory exists. What the sources read is in `metric_sources.py`.

POINTER is a JSON Pointer (RFC 6901): `/results/hellaswag/acc_norm,none` reaches lm-eval's keys, which hold
commas and dots that a dotted path could not.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ckptkeeper.units import DURATION_FORMS, parse_seconds

SourceKind = Literal["file", "lm-eval"]
SOURCE_KINDS: tuple[SourceKind, ...] = ("file", "lm-eval")
METRIC_FORM = "NAME=SOURCE#POINTER, e.g. hellaswag=lm-eval:./evals#/results/hellaswag/acc_norm,none"
AWAIT_FORM = f"NAME[:TIMEOUT], e.g. hellaswag:6h (TIMEOUT: {DURATION_FORMS}; default 24h)"
DEFAULT_AWAIT = 24 * 3600.0
MAX_AWAIT = 365 * 86400.0
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


class MetricSpecError(ValueError):
    """A `--metric` or `--await` that cannot be used; the message names what is wrong and the valid form."""


@dataclass(frozen=True)
class MetricSpec:
    """One named metric: where its value is read (`kind` and `location`: a path inside each checkpoint for
    `file`, the harness's output directory for `lm-eval`) and which value in that JSON (`pointer`)."""

    name: str
    kind: SourceKind
    location: str
    pointer: tuple[str, ...]

    @property
    def source(self) -> str:
        """The source as a person writes it: `lm-eval:/abs/evals#/results/x/acc,none`."""
        return f"{self.kind}:{self.location}#{format_pointer(self.pointer)}"


@dataclass(frozen=True)
class AwaitSpec:
    """`--await NAME[:TIMEOUT]`: a complete checkpoint without NAME is kept until it arrives or `timeout`
    seconds have passed since the checkpoint was written."""

    name: str
    timeout: float = DEFAULT_AWAIT

    def format(self) -> str:
        return f"{self.name}:{format_seconds(self.timeout)}"


def format_seconds(seconds: float) -> str:
    whole = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole and whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def parse_pointer(text: str) -> tuple[str, ...]:
    """RFC 6901: "" is the whole document; otherwise "/" then tokens split at "/", with `~1` for "/" and `~0`
    for "~" (any other `~` is malformed)."""
    if text == "":
        return ()
    if not text.startswith("/"):
        raise MetricSpecError(f"JSON pointer {text!r} must start with '/' (as /results/hellaswag/acc_norm,none)")
    tokens = text[1:].split("/")
    for token in tokens:
        if re.search(r"~(?![01])", token):
            raise MetricSpecError(f"JSON pointer {text!r}: '~' must be followed by 0 or 1 (~0 is '~', ~1 is '/')")
    return tuple(t.replace("~1", "/").replace("~0", "~") for t in tokens)


def format_pointer(tokens: tuple[str, ...]) -> str:
    return "".join("/" + t.replace("~", "~0").replace("/", "~1") for t in tokens)


def resolve(document: object, pointer: tuple[str, ...]) -> object:
    """The value the pointer reaches; KeyError naming the first token that is not there."""
    value = document
    for token in pointer:
        if isinstance(value, dict) and token in value:
            value = value[token]
        elif isinstance(value, list) and re.fullmatch(r"0|[1-9][0-9]{0,8}", token) and int(token) < len(value):
            value = value[int(token)]
        else:
            raise KeyError(token)
    return value


def as_number(value: object) -> float | None:
    """A finite number, or None: JSON true/false, strings, NaN, infinities and ints too large for a float are
    not values a rule can rank (the checkpoint lacks the metric)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def parse_metric(text: str, base: Path | None = None) -> MetricSpec:
    """`NAME=SOURCE#POINTER`. An `lm-eval:` directory is made absolute (from `base`, default the current
    directory) and must exist; a `file:` path is relative to each checkpoint and may not leave it."""
    name, eq, rest = text.partition("=")
    name = name.strip()
    if not eq or not name:
        raise MetricSpecError(f"{text!r} is not a metric definition: expected {METRIC_FORM}")
    _check_name(name)
    source, hash_, pointer_text = rest.partition("#")
    kind, colon, location = source.partition(":")
    if not hash_:
        raise MetricSpecError(f"{name}: no JSON pointer (after '#'): expected {METRIC_FORM}")
    if not colon or kind not in SOURCE_KINDS:
        known = ", ".join(f"{k}:" for k in SOURCE_KINDS)
        raise MetricSpecError(f"{name}: unknown source {source!r}: the sources are {known} (expected {METRIC_FORM})")
    pointer = parse_pointer(pointer_text)
    if not pointer:
        raise MetricSpecError(f"{name}: the JSON pointer is empty: name the value, as /results/TASK/METRIC,FILTER")
    if kind == "file":
        return MetricSpec(name, kind, _inside_checkpoint(name, location), pointer)
    return MetricSpec(name, kind, _existing_directory(name, location, base), pointer)


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise MetricSpecError(f"{name!r} is not a metric name (letters, digits, _ . -; not starting with a digit)")
    if name.startswith("eval_"):
        raise MetricSpecError(
            f"{name}: a defined metric may not start with eval_ (the Trainer's own metrics do; rules reach those "
            "without --metric)"
        )


def _inside_checkpoint(name: str, location: str) -> str:
    parts = location.split("/")
    if not location or location.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in location:
        raise MetricSpecError(
            f"{name}: file:{location} must be a path inside each checkpoint directory, such as "
            "file:eval_results.json (relative, without '..' or empty parts)"
        )
    return location


def _existing_directory(name: str, location: str, base: Path | None) -> str:
    if not location or "\0" in location:
        raise MetricSpecError(f"{name}: lm-eval: needs the directory given to lm_eval --output_path")
    path = Path(location).expanduser()
    absolute = os.path.abspath(path if path.is_absolute() or base is None else base / path)
    if not os.path.isdir(absolute):
        what = "is not a directory" if os.path.lexists(absolute) else "does not exist"
        raise MetricSpecError(f"{name}: lm-eval:{location}: {absolute} {what} (give lm_eval's --output_path)")
    return absolute


def parse_await(text: str, defined: dict[str, MetricSpec]) -> AwaitSpec:
    """`NAME[:TIMEOUT]`; NAME must be a defined metric (what else would an evaluation job bring later?)."""
    name, colon, timeout_text = text.strip().partition(":")
    if name not in defined:
        raise MetricSpecError(_undefined(name, defined, f"--await {text}"))
    if not colon:
        return AwaitSpec(name)
    seconds = parse_seconds(timeout_text)
    if seconds is None or seconds <= 0 or seconds > MAX_AWAIT:
        raise MetricSpecError(f"--await {text}: {timeout_text!r} is not a timeout: expected {AWAIT_FORM}")
    return AwaitSpec(name, seconds)


def _undefined(name: str, defined: dict[str, MetricSpec], what: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(defined), n=1)
    meant = f"; did you mean {close[0]}?" if close else ""
    names = ", ".join(defined) or "none: define one with --metric NAME=SOURCE#POINTER"
    return f"{what}: {name!r} is not a defined metric{meant} (defined: {names})"


def misspelt(name: str, defined: Collection[str]) -> str | None:
    """The defined metric that a rule's metric (not itself defined) most likely misspells, if any."""
    import difflib

    bare = name.removeprefix("eval_")
    if bare in defined:
        return None  # `eval_loss` beside a defined `loss`: the Trainer's own, as written (`loss` would be the other)
    close = difflib.get_close_matches(bare, list(defined), n=1, cutoff=0.85)
    return close[0] if close else None
