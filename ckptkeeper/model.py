"""Frozen values that flow through the pipeline: what a scan saw, and what the planner decided. No I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(frozen=True)
class Checkpoint:
    """One `checkpoint-<step>` directory of a run, as read from disk at one moment."""

    name: str
    step: int
    complete: bool
    incomplete_reason: str | None = None
    epoch: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict, hash=False)
    size_bytes: int = 0
    # What the Trainer itself calls best, as this checkpoint's trainer_state.json says: the steps of
    # best_global_step and of best_model_checkpoint (they differ when the best eval fell between two saves).
    trainer_best_steps: tuple[int, ...] = ()
    # `should_training_stop` of the TrainerControl saved with this checkpoint: true only in the final one.
    training_stopped: bool = False
    # The newest mtime/ctime of anything in the directory (seconds since the epoch), as scanned.
    last_change: float = field(default=0.0, compare=False)
    # The newest modification time of the files inside (seconds since the epoch): when it was last written.
    # None where unknown (values built in tests). Compared only to find the newest written checkpoint.
    written_at: float | None = field(default=None, compare=False)
    # The modification time of its trainer_state.json (written last by the Trainer, rewritten by nothing
    # else); None where it has none or unknown.
    state_written_at: float | None = field(default=None, compare=False)
    # An lstat signature of the directory and everything in it, as scanned: a removal acts only if it is
    # unchanged (a run resumed into an existing checkpoint rewrites its files in place, sizes and all).
    fingerprint: int | None = field(default=None, compare=False)
    # The file times lie in the future (a writer's clock ahead of this machine's): they order nothing.
    times_in_future: bool = field(default=False, compare=False)
    # When it counts as settled if nothing changes (watch re-checks then); None if not waiting to settle.
    settles_at: float | None = field(default=None, compare=False)
    # (st_dev, st_ino) of the directory when scanned: a removal acts only on the very directory judged.
    identity: tuple[int, int] | None = field(default=None, compare=False)

    @property
    def trainer_best_step(self) -> int | None:
        return self.trainer_best_steps[0] if self.trainer_best_steps else None


@dataclass(frozen=True)
class Run:
    """A run directory: `path` is relative to the root, in POSIX form ("." for the root itself)."""

    path: str
    checkpoints: tuple[Checkpoint, ...]


class Action(StrEnum):
    KEEP = "keep"
    DELETE = "delete"
    ARCHIVE = "archive"


@dataclass(frozen=True)
class Decision:
    checkpoint: Checkpoint
    action: Action
    reasons: tuple[str, ...]

    @property
    def kept(self) -> bool:
        return self.action is Action.KEEP


@dataclass(frozen=True)
class MixedRuns:
    """A run directory holding checkpoints of more than one training run (an `output_dir` reused, or a run
    resumed from an earlier checkpoint that rewrote lower steps): `newest_written` was written after
    `highest_step`, so the Trainer's `get_last_checkpoint` (by step) would resume from a stale checkpoint.
    `stale`: every checkpoint (complete or not) with a higher step than `newest_written`, written before it."""

    newest_written: Checkpoint
    highest_step: Checkpoint
    stale: tuple[Checkpoint, ...]


@dataclass(frozen=True)
class RunPlan:
    """The planner's answer for one run. A refused run keeps everything and says why."""

    run: Run
    decisions: tuple[Decision, ...]
    refusal: str | None = None
    mixed_runs: MixedRuns | None = None  # a warning only: nothing is removed because of it

    @property
    def kept(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.kept)

    @property
    def removed(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if not d.kept)
