"""Which entries of a checkpoint are resume state and which are the weights (SPEC "Weights-only keep").

Pure: names in, answers out. The resume state is what only a resume needs: the optimizer, scheduler and
scaler states, the RNG states, DeepSpeed's `global_step*/` and `latest` (only when the whole model's weights
exist outside them) and FSDP's `optimizer_*/`. Everything else stays: the weights, the config, the tokenizer,
`trainer_state.json` (its metrics drive every later plan), `training_args.bin`, and any file not known.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# The marker a weights-only checkpoint carries: written (atomically) before any resume state goes, so at every
# instant a checkpoint is whole or marked. Underscore first, like everything ckptkeeper names.
MARKER = "_ckptkeeper-weights-only.json"
MARKER_TEMP = MARKER + ".part"
MARKER_BY = "ckptkeeper"

_RESUME_FILES = re.compile(r"optimizer\.[A-Za-z0-9]+|scheduler\.pt|scaler\.pt|rng_state(_[0-9]+)?\.pth")
_RESUME_DIRS = re.compile(r"optimizer_[0-9]+")  # FSDP's sharded optimizer state
_DEEPSPEED = re.compile(r"global_step[0-9]+")
# The whole model's weights. Under DeepSpeed they are what makes its engine state (which holds the model too
# under ZeRO-3 without gathered weights) removable: an adapter alone is not enough there, since the Trainer
# may save a PEFT adapter with no tensors in it beside a `global_step*/` that holds the only real weights.
_MODEL_WEIGHTS = re.compile(
    r"model(-[0-9]+-of-[0-9]+)?\.safetensors|pytorch_model(-[0-9]+-of-[0-9]+)?\.bin|pytorch_model_fsdp_[0-9]+"
)
_ADAPTER_WEIGHTS = re.compile(r"adapter_model\.(safetensors|bin)")
_TIME_LIMIT = 1 << 62  # ns: any directory time a marker records is below this (year 2116)


@dataclass(frozen=True)
class Parts:
    """A checkpoint's top-level entries, sorted into what a weights-only keep removes and what it keeps."""

    resume_state: tuple[str, ...]  # the top-level entries that go (names, sorted)
    weights_outside: bool  # loadable weights exist outside the resume state
    marked: bool  # it carries the weights-only marker (a regular file)


def split(top_level: Iterable[str], directories: Iterable[str] = (), marker_is_file: bool = True) -> Parts:
    """Sort a checkpoint's top-level entry names; `directories` names those that are directories."""
    names = sorted(set(top_level))
    dirs = set(directories)
    engine_state = [n for n in names if _DEEPSPEED.fullmatch(n) and n in dirs]
    model = any(_MODEL_WEIGHTS.fullmatch(n) for n in names)
    adapter = any(_ADAPTER_WEIGHTS.fullmatch(n) and n not in dirs for n in names)
    resume = [n for n in names if (_RESUME_FILES.fullmatch(n) and n not in dirs) or _is_resume_dir(n, dirs)]
    marked = MARKER in names and MARKER not in dirs and marker_is_file
    if engine_state and model:
        resume += engine_state
    # `latest` names the engine state to load: it goes with it, and also once the engine state is gone from a
    # marked checkpoint (a slim cut short after moving `global_step*/`), so the slim can be finished.
    if model and (engine_state or marked) and "latest" in names and "latest" not in dirs:
        resume.append("latest")
    weights_outside = model or (adapter and not engine_state)
    return Parts(tuple(sorted(resume)), weights_outside, marked)


def _is_resume_dir(name: str, dirs: set[str]) -> bool:
    return name in dirs and _RESUME_DIRS.fullmatch(name) is not None


@dataclass(frozen=True)
class Marker:
    """What a weights-only marker of ckptkeeper's says: the directory's times before the slim, and whether
    the slim finished (a marker without `complete`, from before it existed, counts as finished)."""

    times_ns: tuple[int, int]
    complete: bool
    removed: tuple[str, ...] = ()  # the resume state it says was removed


def read_marker(raw: bytes) -> Marker | None:
    """The marker, if it is one of ckptkeeper's with sane times; None for anything else."""
    try:
        record = json.loads(raw)
        atime, mtime = record["directory_times_ns"]
        if record.get("by") != MARKER_BY:
            return None
        times = (int(atime), int(mtime))
        removed = tuple(str(name) for name in record.get("resume_state_removed", ()))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not all(0 <= t < _TIME_LIMIT for t in times):
        return None
    return Marker(times, record.get("complete", True) is not False, removed)


def marker_text(resume_state: Sequence[str], times_ns: tuple[int, int], complete: bool) -> bytes:
    record = {
        "weights_only": True,
        "by": MARKER_BY,
        "complete": complete,
        "resume_state_removed": list(resume_state),
        "directory_times_ns": list(times_ns),
        "note": "This checkpoint keeps its weights only: its optimizer, scheduler and RNG states were removed, "
        "so it cannot resume training (the Trainer would silently start a fresh optimizer).",
    }
    return (json.dumps(record, indent=2) + "\n").encode()


def resume_bytes(parts: Parts, sizes: Sequence[tuple[str, int]]) -> int:
    """The bytes of the resume state, given (relative path, size) of every regular file in the checkpoint."""
    top = set(parts.resume_state)
    return sum(size for rel, size in sizes if rel.split("/", 1)[0] in top)
