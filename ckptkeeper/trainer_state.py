"""A tolerant reader for the Trainer's `trainer_state.json`.

Unknown keys are ignored; the keys ckptkeeper uses must have the Trainer's types, or the file is treated
as broken (the checkpoint then counts as incomplete, with the reason). The Trainer writes bare `NaN` and
`-Infinity`, which Python's json accepts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, ValidationError

TRAINER_STATE = "trainer_state.json"


class TrainerStateError(ValueError):
    """The file is not a usable trainer_state.json; the message is a short reason for a plan's table."""


class _TrainerStateFile(BaseModel):
    model_config = ConfigDict(extra="ignore")
    global_step: StrictInt | None = None
    epoch: StrictFloat | None = None  # strict float accepts a JSON integer, rejects strings and booleans
    log_history: list[dict[str, Any]] = []
    best_global_step: StrictInt | None = None
    best_model_checkpoint: str | None = None
    stateful_callbacks: dict[str, Any] = {}


@dataclass(frozen=True)
class TrainerState:
    global_step: int | None
    epoch: float | None
    best_step: int | None
    training_stopped: bool
    # log_history entries that hold at least one eval_* key, as (step, numeric values) pairs
    evals: tuple[tuple[int, Mapping[str, float]], ...]

    def metrics_at(self, step: int) -> dict[str, float]:
        """The union of the eval entries logged at exactly `step` (several eval sets give several)."""
        merged: dict[str, float] = {}
        for at, values in self.evals:
            if at == step:
                merged.update(values)
        return merged


def _best_step(state: _TrainerStateFile) -> int | None:
    if state.best_global_step is not None:
        return state.best_global_step
    if state.best_model_checkpoint:
        # The sidecar rarely sees the trainer's absolute path: match by the last component only
        # (a trainer on Windows writes backslashes).
        last = state.best_model_checkpoint.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
        prefix, _, digits = last.partition("-")
        # The Trainer's own name: ASCII digits, no leading zero (as scan.CHECKPOINT_NAME).
        if prefix == "checkpoint" and digits.isascii() and digits.isdigit() and (digits == "0" or digits[0] != "0"):
            return int(digits)
    return None


def _training_stopped(callbacks: dict[str, Any]) -> bool:
    """`stateful_callbacks.TrainerControl.args.should_training_stop`; anything else reads as False."""
    control = callbacks.get("TrainerControl")
    args = control.get("args") if isinstance(control, dict) else None
    return isinstance(args, dict) and args.get("should_training_stop") is True


def _numeric(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _evals(history: list[dict[str, Any]]) -> tuple[tuple[int, Mapping[str, float]], ...]:
    found = []
    for entry in history:
        step = entry.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            continue
        values = {k: v for k, raw in entry.items() if k.startswith("eval_") and (v := _numeric(raw)) is not None}
        if values:
            found.append((step, values))
    return tuple(found)


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


def parse_trainer_state(data: bytes) -> TrainerState:
    if not data.strip():
        raise TrainerStateError("trainer_state.json is empty")
    try:
        raw = json.loads(data)
    except UnicodeDecodeError:
        raise TrainerStateError("trainer_state.json is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise TrainerStateError(f"trainer_state.json is not valid JSON ({e.msg} at byte {e.pos})") from None
    except RecursionError:
        raise TrainerStateError("trainer_state.json is nested too deeply") from None
    if not isinstance(raw, dict):
        raise TrainerStateError(f"trainer_state.json holds a JSON {_json_type(raw)}, not an object")
    try:
        state = _TrainerStateFile.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise TrainerStateError(f"trainer_state.json: {where}: {first['msg'].lower()}") from None
    epoch = None if state.epoch is None else float(state.epoch)
    if epoch is not None and not math.isfinite(epoch):
        epoch = None
    return TrainerState(
        global_step=state.global_step,
        epoch=epoch,
        best_step=_best_step(state),
        training_stopped=_training_stopped(state.stateful_callbacks),
        evals=_evals(state.log_history),
    )
