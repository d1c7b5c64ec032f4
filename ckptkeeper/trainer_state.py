"""A tolerant reader for the Trainer's `trainer_state.json`.

Unknown keys are ignored; the keys ckptkeeper uses must have the Trainer's types, or the file is treated
as broken (the checkpoint then counts as incomplete, with the reason). The Trainer writes bare `NaN` and
`-Infinity`, which Python's json accepts.

Numbers are read as the Trainer's own json.loads reads them, and no number in the file raises anything but
TrainerStateError:
- an integer of over 4300 digits (Python's default limit for converting text to an integer), anywhere in
  the file, makes the file unusable: the Trainer's json.loads cannot load it either;
- a float literal beyond the float range (`1e999`) is Infinity, in every JSON reader;
- a metric value that no float can hold (an integer beyond about 1.8e308, as a 401-digit one) is not a
  metric: the key is ignored, as a string is, and the checkpoint lacks that metric (the file is not broken);
- an epoch that no float can hold reads as no epoch, as NaN and Infinity do;
- global_step, best_global_step and log_history steps are exact integers, however long: a global_step that
  is not the directory's step makes the checkpoint incomplete, and a best step that is no checkpoint's
  protects nothing.
"""

from __future__ import annotations

import codecs
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic_core import from_json

TRAINER_STATE = "trainer_state.json"
NAME_MAX = 255  # the longest file name of Linux filesystems, in bytes
# The most digits of an integer read: pydantic-core's parser's limit whatever the interpreter's, and the
# interpreter's default (sys.get_int_max_str_digits()), so the Trainer's json.loads reads no longer one.
MAX_INT_DIGITS = 4300


class TrainerStateError(ValueError):
    """The file is not a usable trainer_state.json; the message is a short reason for a plan's table."""


def _int_or_null(value: object) -> bool:
    return value is None or type(value) is int  # a boolean is not an integer (True == 1)


def _number_or_null(value: object) -> bool:
    return value is None or type(value) is int or type(value) is float


def _text_or_null(value: object) -> bool:
    return value is None or type(value) is str


# The keys ckptkeeper reads, each with the JSON types it accepts and what the message says otherwise, in the
# order they are checked (the first problem found is the reason given). The messages are pydantic's strict
# ones, which this reader used until it was written by hand (tests/test_trainer_state_oracle.py holds that
# model and checks this reader against it). A missing key is as null: no step, no epoch, no history.
_KEY_TYPES: tuple[tuple[str, Callable[[object], bool], str], ...] = (
    ("global_step", _int_or_null, "integer"),
    ("epoch", _number_or_null, "number"),
    ("log_history", lambda value: type(value) is list, "list"),
    ("best_global_step", _int_or_null, "integer"),
    ("best_model_checkpoint", _text_or_null, "string"),
    ("stateful_callbacks", lambda value: type(value) is dict, "dictionary"),
)


def _key_problem(raw: dict[str, Any]) -> str | None:
    for key, accepts, kind in _KEY_TYPES:
        if key in raw and not accepts(raw[key]):
            return f"trainer_state.json: {key}: input should be a valid {kind}"
    return None


@dataclass(frozen=True)
class TrainerState:
    global_step: int | None
    epoch: float | None
    best_steps: tuple[int, ...]
    training_stopped: bool
    # The raw log_history entries (each a dict). Only the entries at a checkpoint's own step are ever
    # needed, so they are picked out on demand, not converted up front (that was most of the parse time).
    log_history: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    @property
    def best_step(self) -> int | None:
        return self.best_steps[0] if self.best_steps else None

    def metrics_at(self, step: int) -> dict[str, float]:
        """The union of the eval entries logged at exactly `step` (several eval sets give several). The entries
        are found by list.index over their steps (a loop in C: a Trainer's file holds hundreds of entries and
        only a few are at one step), each then checked to be an int (a bool is not a step: True == 1). The steps
        are taken by a list comprehension: `map(operator.methodcaller("get", "step"), ...)` took about twice as
        long (a call of the method through the caller object per entry)."""
        merged: dict[str, float] = {}
        steps = [entry.get("step") for entry in self.log_history]
        found = -1
        while True:
            try:
                found = steps.index(step, found + 1)
            except ValueError:
                return merged
            if type(steps[found]) is int:
                merged.update(_eval_values(self.log_history[found]))

    @property
    def evals(self) -> tuple[tuple[int, dict[str, float]], ...]:
        """Every entry with at least one numeric eval_* value, as (step, values) in log order."""
        found = []
        for entry in self.log_history:
            at = entry.get("step")
            if type(at) is int and (values := _eval_values(entry)):
                found.append((at, values))
        return tuple(found)


def _best_steps(best_global_step: int | None, best_model_checkpoint: str | None) -> tuple[int, ...]:
    """best_global_step, and the step best_model_checkpoint names if another: with evals between saves
    the first may have no checkpoint while the second is what load_best_model_at_end loads."""
    steps = [] if best_global_step is None else [best_global_step]
    named = _named_step(best_model_checkpoint)
    if named is not None and named not in steps:
        steps.append(named)
    return tuple(steps)


def _named_step(best_model_checkpoint: str | None) -> int | None:
    if best_model_checkpoint:
        # The sidecar rarely sees the trainer's absolute path: match by the last component only
        # (a trainer on Windows writes backslashes).
        last = best_model_checkpoint.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
        prefix, _, digits = last.partition("-")
        # The Trainer's own name: ASCII digits, no leading zero (as scan.CHECKPOINT_NAME). No file name is
        # longer than NAME_MAX, so a longer one names no checkpoint (and int() of 4301 digits raises).
        if (
            prefix == "checkpoint"
            and len(last) <= NAME_MAX
            and digits.isascii()
            and digits.isdigit()
            and (digits == "0" or digits[0] != "0")
        ):
            return int(digits)
    return None


def _training_stopped(callbacks: dict[str, Any]) -> bool:
    """`stateful_callbacks.TrainerControl.args.should_training_stop`; anything else reads as False."""
    control = callbacks.get("TrainerControl")
    args = control.get("args") if isinstance(control, dict) else None
    return isinstance(args, dict) and args.get("should_training_stop") is True


def _as_float(value: int | float) -> float | None:
    """The number as a float; None for an integer beyond the float range (float() raises OverflowError)."""
    try:
        return float(value)
    except OverflowError:
        return None


def _numeric(value: object) -> float | None:
    """A metric's value, or None when it is not one: not a number (a string, a boolean, null, a container), or
    an integer no float can hold (beyond about 1.8e308). The key is then ignored: the checkpoint lacks that
    metric, the file is not broken. NaN, Infinity and `1e999` (which every JSON reader makes Infinity) are
    values: NaN ranks worst, the infinities as the numbers they are."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return _as_float(value)


def _eval_values(entry: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, raw in entry.items() if k.startswith("eval_") and (v := _numeric(raw)) is not None}


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages (`null`, not Python's `NoneType`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _history_problem(history: list[Any]) -> str | None:
    if set(map(type, history)) <= {dict}:  # every entry a plain dict, found by a loop in C (the usual case)
        return None
    for index, entry in enumerate(history):
        if not isinstance(entry, dict):
            return f"trainer_state.json: log_history.{index}: input should be a valid dictionary"
    return None


def _too_long(limit: int) -> TrainerStateError:
    return TrainerStateError(f"{TRAINER_STATE} holds a number too long to read (over {limit} digits)")


def _parse_int(digits: str) -> int:
    """The json module's integer conversion with pydantic-core's limit, so both parsers read the same files:
    an integer of over MAX_INT_DIGITS digits is refused even with the interpreter's limit off (it would
    convert in quadratic time: a 512 MiB file of digits would hold the daemon for hours). A lower limit set
    for the interpreter (PYTHONINTMAXSTRDIGITS) refuses shorter ones, also as TrainerStateError, never as
    int()'s bare ValueError."""
    if len(digits) - digits.startswith("-") > MAX_INT_DIGITS:
        raise _too_long(MAX_INT_DIGITS)
    try:
        return int(digits)
    except ValueError:
        raise _too_long(sys.get_int_max_str_digits()) from None


def _load_json(data: bytes) -> object:
    """Parse with pydantic-core's JSON parser (about 3x faster than the json module on a Trainer's file);
    anything it refuses (a lone surrogate, nesting deeper than its limit, bad bytes, an integer of over 4300
    digits, a float literal of over 4300 digits before its point) goes through the json module, whose
    behaviour and messages are the reference. Only what the Trainer itself can load counts: it reads the file
    as UTF-8 text with json.loads, so a byte order mark or UTF-16 is not resumable, nor is an integer of over
    4300 digits (json.loads raises a ValueError for it).

    What both parsers agree on: `1e999` and `-1e999` are infinities, `1e-999` is 0.0, `-0` is the integer 0
    and `-0.0` the float -0.0, and NaN/Infinity/-Infinity are floats. Only the json module accepts a lone
    surrogate escape (the string keeps it) and nesting deeper than pydantic-core's limit (up to the
    interpreter's recursion limit: deeper is "nested too deeply")."""
    try:
        return from_json(data)
    except ValueError:
        pass
    if data.startswith(codecs.BOM_UTF8):
        raise TrainerStateError("trainer_state.json starts with a byte order mark, which the Trainer cannot read")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TrainerStateError("trainer_state.json is not UTF-8 text") from None
    try:
        return json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        at_byte = len(text[: e.pos].encode("utf-8", "surrogatepass"))
        raise TrainerStateError(f"trainer_state.json is not valid JSON ({e.msg} at byte {at_byte})") from None
    except RecursionError:
        raise TrainerStateError("trainer_state.json is nested too deeply") from None


def parse_trainer_state(data: bytes) -> TrainerState:
    if not data.strip():
        raise TrainerStateError("trainer_state.json is empty")
    raw = _load_json(data)
    if not isinstance(raw, dict):
        raise TrainerStateError(f"trainer_state.json holds a JSON {_json_type(raw)}, not an object")
    problem = _key_problem(raw) or _history_problem(raw.get("log_history", []))
    if problem:
        raise TrainerStateError(problem)
    return TrainerState(
        global_step=raw.get("global_step"),
        epoch=_epoch(raw.get("epoch")),
        best_steps=_best_steps(raw.get("best_global_step"), raw.get("best_model_checkpoint")),
        training_stopped=_training_stopped(raw.get("stateful_callbacks", {})),
        log_history=tuple(raw.get("log_history", ())),
    )


def _epoch(value: int | float | None) -> float | None:
    """The epoch as a float; None for none, NaN, the infinities, and an integer beyond the float range."""
    epoch = None if value is None else _as_float(value)
    return epoch if epoch is not None and math.isfinite(epoch) else None
