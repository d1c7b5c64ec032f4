"""What the daemon tells of its own health, without prometheus_client: how it watches the root (`WatchMode`),
what /healthz says (`HealthSnapshot`, `health_problem`), and its Metrics, made when first asked for
(`LateMetrics`), so that importing prometheus_client (`ckptkeeper.metrics`) waits until after the first line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ckptkeeper.metrics import Metrics


class WatchMode(StrEnum):
    """How the daemon watches the root now (the `mode` label of ckptkeeper_observer_mode)."""

    INOTIFY = "inotify"
    POLLING = "polling"
    NONE = "none"


OBSERVER_MODES = tuple(WatchMode)


@dataclass(frozen=True)
class HealthSnapshot:
    """What /healthz reports, as the main loop last published it (the HTTP thread reads only this)."""

    waiting: str | None = None  # healthily waiting: for the root to appear, or (standby) for the lock
    mode: WatchMode = WatchMode.NONE
    watcher_alive: bool = False
    last_reconcile: float | None = None


def health_problem(snap: HealthSnapshot, stopping: bool, rescan_interval: float) -> str | None:
    """None when healthy; else why not (/healthz's 503)."""
    if stopping:
        return "stopping"
    if snap.waiting is not None:
        return None  # healthy: waiting is its job (/healthz says what for)
    if snap.mode is WatchMode.NONE or not snap.watcher_alive:
        return f"the file watcher is not running (mode {snap.mode})"
    return staleness_problem(snap.last_reconcile, 2 * rescan_interval + 30)


class LateMetrics:
    """The Metrics of a daemon, made when first asked for (`get`): the daemon asks at its first pass, after its
    first line, unless it serves them from the start. How it watches (`set_mode`, from the observer supervisor)
    may be told before: they are made with it. Owned by the daemon's main loop."""

    def __init__(self) -> None:
        self.made: Metrics | None = None
        self.mode: tuple[WatchMode, str | None] = (WatchMode.NONE, None)

    def get(self) -> Metrics:
        if self.made is None:
            from ckptkeeper.metrics import Metrics

            self.made = Metrics()
            self.made.set_mode(*self.mode)
        return self.made

    def set_mode(self, mode: WatchMode, note: str | None = None) -> None:
        self.mode = (mode, note)
        if self.made is not None:
            self.made.set_mode(mode, note)


def staleness_problem(last_success: float | None, max_age: float, now: float | None = None) -> str | None:
    """Why the daemon is not healthy by its reconciles (None when the last finished within `max_age` s)."""
    if last_success is None:
        return "no reconcile has finished yet"
    age = (time.time() if now is None else now) - last_success
    if age > max_age:
        return f"the last successful reconcile was {age:.0f} s ago (more than {max_age:.0f} s)"
    return None
