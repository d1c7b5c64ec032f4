"""Stale incomplete checkpoints: what a crash left half-written. Pure: the time is an input.

The Trainer's `get_last_checkpoint` resumes from the highest-numbered `checkpoint-N`, complete or not, so
a checkpoint a crash left incomplete makes the next resume fail. ckptkeeper never removes an incomplete
checkpoint (it may be being written); one unchanged for longer than `--stale-after` is reported instead,
for a person to look at."""

from __future__ import annotations

from ckptkeeper.model import Run, Stale

DEFAULT_STALE_AFTER = 3600.0


def stale_checkpoints(run: Run, now: float, after: float) -> tuple[Stale, ...]:
    """The incomplete checkpoints of `run` unchanged for longer than `after` seconds at `now`."""
    highest = max((c.step for c in run.checkpoints), default=None)
    return tuple(
        Stale(c, now - c.last_change, c.step == highest)
        for c in run.checkpoints
        if not c.complete and c.last_change > 0 and now - c.last_change > after
    )
