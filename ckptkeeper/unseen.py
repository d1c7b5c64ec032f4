"""Space the watch daemon freed that the filesystem does not show as free yet.

A removal is a rename into the trash, then a delete on the reaper's thread; and even after the delete, btrfs
shows the space at its next commit, and a file someone still holds open frees nothing until it is closed.
A daemon that judged disk pressure by `statvfs` alone would see the same shortfall again at the next pass and
release the next checkpoint, and the next. So the daemon keeps, per filesystem, what "free + the bytes of the
runs on it" was when it last freed something: while the two together fall short of that, the difference (at
most what was freed, and for at most `PATIENCE` seconds) counts as free space still to come.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from ckptkeeper.model import Run
from ckptkeeper.pressure import Space, count_once
from ckptkeeper.render import shown
from ckptkeeper.units import human_bytes

log = logging.getLogger("ckptkeeper")

PATIENCE = 300.0  # seconds after which space freed and still not shown is given up on (judged by statvfs)


@dataclass
class _Owed:
    total: int  # free + the bytes of the runs on it, once everything still owed shows (what others write aside)
    parts: list[tuple[int, float]]  # (bytes freed, when to give up on them), oldest first


class UnseenFrees:
    """Owned by the daemon's main loop: every method runs there."""

    def __init__(self) -> None:
        self.records: dict[int, _Owed] = {}
        self._last: tuple[Space, dict[int, int], dict[int, int]] | None = None  # the last adjusted measurement

    def adjust(self, space: Space, runs: Sequence[Run], now: float) -> Space:
        """The measured space, with what earlier passes freed and the filesystem does not show yet: at most what
        was freed in the last PATIENCE seconds (each freeing keeps its own deadline)."""
        held = held_bytes(space, runs)
        unseen: dict[int, int] = {}
        for device, record in list(self.records.items()):
            disk = space.disks.get(device)
            if disk is None:
                continue  # not measured in this pass: kept, its parts still expire in time
            deficit = record.total - (disk.free + held.get(device, 0))
            _expire(record, deficit, now, disk.where)
            deficit = record.total - (disk.free + held.get(device, 0))
            owed = sum(b for b, _ in record.parts)
            if deficit <= 0 or owed <= 0:
                del self.records[device]
            else:
                unseen[device] = min(deficit, owed)
        self._last = (space, held, unseen)
        return replace(space, unseen=unseen)

    def archive_frees(self, run: str) -> bool:
        """Whether archiving a checkpoint of `run` takes its bytes off the run's filesystem (not a rename there)."""
        if self._last is None:
            return True
        space = self._last[0]
        device = space.run_devices.get(run)
        return space.archive_device is None or device is None or device != space.archive_device

    def freed(self, by_run: Mapping[str, int], now: float) -> None:
        """After a pass: what its removals took off each run's filesystem (bytes), to be seen free from now on."""
        if self._last is None:
            return
        space, held, unseen = self._last
        by_device: dict[int, int] = {}
        for run, freed in by_run.items():
            device = space.run_devices.get(run)
            if device is not None and freed > 0:
                by_device[device] = by_device.get(device, 0) + freed
        for device, freed in by_device.items():
            # Measured before this pass acted: its removals were still in `held`; what is owed from before is not.
            still = unseen.get(device, 0)
            record = self.records.get(device)
            parts = _shrink(record.parts if record is not None else [], still)
            total = space.disks[device].free + held.get(device, 0) + still
            self.records[device] = _Owed(total, [*parts, (freed, now + PATIENCE)])


def _expire(record: _Owed, deficit: int, now: float, where: str) -> None:
    """Give up on what was freed more than PATIENCE seconds ago and still does not show (said once)."""
    expired = sum(b for b, deadline in record.parts if deadline < now)
    if not expired:
        return
    record.parts = [(b, deadline) for b, deadline in record.parts if deadline >= now]
    record.total -= expired
    if deficit > 0:
        log.warning(
            "disk %s: %s freed more than %.0f s ago still does not show as free (a file held open? a filesystem "
            "that frees space later?); judging by what it reports again",
            shown(where),
            human_bytes(min(deficit, expired)),
            PATIENCE,
        )


def _shrink(parts: list[tuple[int, float]], keep: int) -> list[tuple[int, float]]:
    """The parts, less what has shown since (taken from the oldest first), so that they add up to `keep`."""
    drop = sum(b for b, _ in parts) - keep
    kept = []
    for b, deadline in parts:
        if drop >= b:
            drop -= b
            continue
        kept.append((b - max(drop, 0), deadline))
        drop = 0
    return kept


def held_bytes(space: Space, runs: Sequence[Run]) -> dict[int, int]:
    """Per filesystem: the bytes of every checkpoint of the runs on it (each directory once)."""
    held: dict[int, int] = {}
    seen: set[tuple[int, int]] = set()
    for run in runs:
        device = space.run_devices.get(run.path)
        if device is None:
            continue
        for c in run.checkpoints:
            if count_once(c, seen):
                held[device] = held.get(device, 0) + c.size_bytes
    return held
