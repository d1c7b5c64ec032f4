"""What the watch daemon says of disk pressure: a line when it begins, when it ends, once (loudly) when the
floor cannot be met, and one per checkpoint released; and the figures as metrics and on /healthz."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import StrEnum
from typing import TYPE_CHECKING

from ckptkeeper.model import RunPlan
from ckptkeeper.pressure import FREEING, NO_FIGURES, DiskPressure
from ckptkeeper.render import location, pressure_line, reasons_text, shown

if TYPE_CHECKING:
    from ckptkeeper.metrics import Metrics

log = logging.getLogger("ckptkeeper")


class State(StrEnum):
    CLEAR = "clear"
    UNDER = "under"
    UNMET = "unmet"  # under pressure, and releasing all the pressure rules allow cannot meet the floor


def _state(p: DiskPressure) -> State:
    if not p.under:
        return State.CLEAR
    return State.UNMET if p.unmet else State.UNDER


class PressureLog:
    """Owned by the daemon's main loop: every method runs there."""

    def __init__(self, metrics: Metrics, root: str = ".") -> None:
        self.metrics = metrics
        self.root = root  # names the root's own run
        self.states: dict[int, State] = {}  # filesystem (its device) -> what was last said of it
        self.released: set[tuple[str, str]] = set()  # checkpoints whose release was logged
        self.no_figures: set[int] = set()  # filesystems (devices) that report no size, said once

    def planned(self, verdicts: Sequence[DiskPressure], plans: Sequence[RunPlan]) -> None:
        # While the reaper still deletes earlier removals the figures are stale: they are judged at the next pass.
        measured = [p for p in verdicts if p.deferred != FREEING]
        for p in measured:
            self._verdict(p)
        self.metrics.disk.set(measured, [p.disk.where for p in verdicts if p.deferred == FREEING])
        self._releases(measured, plans)

    def _verdict(self, p: DiskPressure) -> None:
        if p.deferred == NO_FIGURES and p.disk.device not in self.no_figures:
            self.no_figures.add(p.disk.device)
            log.warning("disk %s: %s (--min-free)", shown(p.disk.where), NO_FIGURES)
        device, now = p.disk.device, _state(p)
        before = self.states.get(device, State.CLEAR)
        self.states[device] = now
        if now is before:
            return
        if now is State.CLEAR:
            log.info("disk pressure is over: %s", pressure_line(p))
        elif now is State.UNMET:
            log.error("disk pressure: %s", pressure_line(p))
        elif before is State.CLEAR:
            log.warning("disk pressure begins: %s", pressure_line(p))
        else:
            log.warning("disk pressure: the floor can be met again: %s", pressure_line(p))

    def _releases(self, verdicts: Sequence[DiskPressure], plans: Sequence[RunPlan]) -> None:
        released = {(r.run, r.checkpoint) for p in verdicts for r in p.released}
        for plan in plans:
            for d in plan.decisions:
                key = (plan.run.path, d.checkpoint.name)
                if key in released and key not in self.released:
                    log.warning("%s released (%s): %s", location(*key, self.root), d.action, reasons_text(d.reasons))
        self.released = released
