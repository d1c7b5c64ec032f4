"""Disk pressure (`--min-free`, `--keep-under-pressure`): pure, like the planner it extends.

Given the root's plan, what each filesystem holding a run has free, and the time, it says per filesystem
whether it is **under pressure**: free space, after the removals the plan already makes, below the floor
plus the next save of every run on it that is still training. With pressure rules it then **releases**, one
at a time and as few as needed, checkpoints that `--keep` keeps but the pressure rules (and the
protections) do not, in this order (documented in the README):

1. what only a `--keep-weights` rule keeps (a weights-only milestone), oldest first;
2. milestones kept by `epoch` or `every` rules, oldest first;
3. checkpoints kept by `last` rules, oldest first;
4. checkpoints kept by `best` rules, the worst ranked first.

A checkpoint kept by several rules counts in the latest of these tiers. Where a `--keep-weights` rule keeps a
released checkpoint that is still whole, it is first only slimmed to its weights (the resume state is most of
its bytes); only if every such step is not enough are the slimmed ones removed, in the same order. A release
that frees nothing on that filesystem (an archive on the same filesystem) is never made. Protections, a
refusal anywhere in the root, and a trash still being emptied (its space is not free yet) release nothing.

Nothing here touches the disk or the clock: the figures and `now` are inputs (`engine` measures them).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal

from ckptkeeper.model import Action, Checkpoint, Decision, Reason, ReasonKind, RunPlan
from ckptkeeper.rules import AnyRule
from ckptkeeper.units import human_bytes

# A run is still training (its next save is counted) unless its newest checkpoint says training stopped, or
# was written longer ago than this many of its save intervals (the median of its last gaps), and at least
# MIN_IDLE_SECONDS ago; with fewer than two checkpoints (no interval yet), longer ago than UNKNOWN_IDLE_SECONDS.
IDLE_INTERVALS = 3
MIN_IDLE_SECONDS = 600.0
UNKNOWN_IDLE_SECONDS = 3600.0
GAPS_CONSIDERED = 5

_SIZE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[A-Za-z]*)")
_PERCENT = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s*%")
_UNITS = {
    "": 1,
    "B": 1,
    **{f"{p}": 1000**i for i, p in enumerate("KMGTP", 1)},
    **{f"{p}B": 1000**i for i, p in enumerate("KMGTP", 1)},
    **{f"{p}i": 1024**i for i, p in enumerate("KMGTP", 1)},
    **{f"{p}iB": 1024**i for i, p in enumerate("KMGTP", 1)},
}
SIZE_FORMS = "a size such as 50G, 500M, 1.5T or 40Gi (G = 10^9 bytes, Gi = 2^30), or a percentage such as 10%"


REFUSED = "retention is refused in this root, so nothing is released"
NO_FIGURES = "the filesystem reports no size or free space (statvfs), so pressure cannot be judged; nothing is released"
FREEING = "removals are still being deleted from the trash; measured again once they are"


MAX_FLOOR = 10**18 + 1  # one exabyte: no filesystem a run writes to is larger


class FloorError(ValueError):
    """A `--min-free` value that is neither a size nor a percentage; the message says the valid forms."""


@dataclass(frozen=True)
class Floor:
    """`--min-free`: bytes that must stay free on each filesystem holding a run; or a percentage of its size."""

    text: str
    size: int | None = None
    percent: float | None = None

    def bytes_of(self, total: int) -> int:
        if self.size is not None:
            return self.size
        return int(total * (self.percent or 0.0) / 100)


def parse_floor(text: str) -> Floor:
    value = text.strip()
    percent = _PERCENT.fullmatch(value)
    if percent:
        number = float(percent["number"])
        if not 0 < number < 100:
            raise FloorError(f"invalid --min-free {text!r}: a percentage lies between 0% and 100%")
        return Floor(value, percent=number)
    size = _SIZE.fullmatch(value)
    unit = "" if size is None else size["unit"].upper().replace("I", "i")
    if size is None or unit not in _UNITS:
        raise FloorError(f"invalid --min-free {text!r}: expected {SIZE_FORMS}")
    amount = int(Decimal(size["number"]) * _UNITS[unit])  # exact: 1.001K is 1001 bytes
    if amount <= 0:
        raise FloorError(f"invalid --min-free {text!r}: the floor must be more than 0 bytes")
    if amount >= MAX_FLOOR:
        raise FloorError(f"invalid --min-free {text[:40]!r}: larger than any filesystem (at most 1000P, 10^18 bytes)")
    return Floor(value, size=amount)


@dataclass(frozen=True)
class PressurePolicy:
    """The floor, and the rules that still keep checkpoints under pressure (none: pressure is only reported)."""

    floor: Floor
    rules: tuple[AnyRule, ...] = ()

    @property
    def releases(self) -> bool:
        return bool(self.rules)


@dataclass(frozen=True)
class Disk:
    """One filesystem holding runs, as measured (`statvfs`: what an unprivileged writer may use)."""

    device: int
    free: int  # f_bavail * f_frsize
    total: int  # f_blocks * f_frsize
    where: str  # a directory on it, for messages and metric labels


@dataclass(frozen=True)
class Release:
    """One checkpoint released under pressure, and the bytes that frees on its filesystem."""

    run: str
    checkpoint: str
    action: Action
    frees: int


@dataclass(frozen=True)
class DiskPressure:
    """The verdict for one filesystem in one plan."""

    disk: Disk
    floor: int
    next_save: int  # the next saves of the runs on it still training
    training: tuple[str, ...]  # those runs
    planned: int  # what the plan's own removals free on it
    released: tuple[Release, ...] = ()
    acts: bool = False  # pressure rules are given: pressure releases checkpoints, not only reports
    deferred: str | None = None  # why nothing was released although it could be
    unseen: int = 0  # freed by earlier passes and not yet shown as free (watch: a trash being emptied, btrfs)
    incoming: int = 0  # what archives from runs on other filesystems bring here (--archive-to on this one)
    archive_blocked: int = 0  # releasable, but archived on this same filesystem, which frees nothing
    room_blocked: int = 0  # releasable, but archiving it would take the archive's filesystem below its own floor

    @property
    def needed(self) -> int:
        return self.floor + self.next_save

    @property
    def available(self) -> int:
        """Free once the plan's own removals (and archives arriving here) are done, before any release."""
        return self.disk.free + self.planned + self.unseen - self.incoming

    @property
    def under(self) -> bool:
        return self.disk.total > 0 and self.available < self.needed

    @property
    def released_bytes(self) -> int:
        return sum(r.frees for r in self.released)

    @property
    def met(self) -> bool:
        """Free space after the plan and its releases meets the floor plus the next saves."""
        return self.available + self.released_bytes >= self.needed

    @property
    def unmet(self) -> bool:
        """Under pressure, and releasing all the pressure rules allow does not meet the floor."""
        return self.under and self.acts and self.deferred is None and not self.met

    @property
    def shortfall(self) -> int:
        return max(0, self.needed - self.available - self.released_bytes)


def figures_text(p: DiskPressure) -> str:
    """`12.0 GB free < 50.0 GB floor + 8.1 GB next save` (free counts the plan's own removals, not releases)."""
    sign = "<" if p.under else ">="
    return f"{human_bytes(p.available)} free {sign} {human_bytes(p.floor)} floor + {human_bytes(p.next_save)} next save"


# ---- the estimate ---------------------------------------------------------------------------------------------
def _written(c: Checkpoint) -> float | None:
    return c.state_written_at if c.state_written_at is not None else c.written_at


def save_interval(plan: RunPlan) -> float | None:
    """The median of the last gaps between the complete checkpoints' write times, by step."""
    by_step = sorted((c for c in plan.run.checkpoints if c.complete), key=lambda c: c.step)
    times = [t for c in by_step if (t := _written(c)) is not None]
    gaps = sorted([b - a for a, b in itertools.pairwise(times) if b > a][-GAPS_CONSIDERED:])
    if not gaps:
        return None
    # The median, without `statistics` (random, fractions and decimal with it: ~5 ms at every start)
    middle = len(gaps) // 2
    return gaps[middle] if len(gaps) % 2 else (gaps[middle - 1] + gaps[middle]) / 2


def still_training(plan: RunPlan, now: float) -> bool:
    """Whether a next save of this run is to be expected (see IDLE_INTERVALS)."""
    live = plan.live
    if live is None:
        return False
    if live.training_stopped:
        return False
    written = _written(live)
    if written is None or live.times_in_future:
        return True
    interval = save_interval(plan)
    idle = UNKNOWN_IDLE_SECONDS if interval is None else max(IDLE_INTERVALS * interval, MIN_IDLE_SECONDS)
    # A save under way (changed within that time) is training, however long ago the last one finished.
    saving = any(now - c.last_change <= idle for c in _under_way(plan, live))
    return saving or now - written <= idle


def _under_way(plan: RunPlan, live: Checkpoint) -> list[Checkpoint]:
    """Incomplete checkpoints of a higher step than the live one: a save under way (not an older run's leftover
    in a reused directory)."""
    stale = {c.name for c in plan.mixed_runs.stale} if plan.mixed_runs else set()
    return [c for c in plan.run.checkpoints if not c.complete and c.step > live.step and c.name not in stale]


def next_save(plan: RunPlan) -> int:
    """About the size of the run's next save: its newest complete checkpoint, less what a save under way (an
    incomplete checkpoint of a higher step, not one an earlier run left in a reused directory) has written."""
    live = plan.live
    if live is None:
        return 0
    return max(0, live.size_bytes - sum(c.size_bytes for c in _under_way(plan, live)))


def frees(d: Decision, archive_elsewhere: bool) -> int:
    """The bytes this decision takes off the run's filesystem."""
    c = d.checkpoint
    if d.action is Action.DELETE:
        return c.size_bytes
    if d.action is Action.ARCHIVE:
        return c.size_bytes if archive_elsewhere else 0
    return c.resume_bytes if d.slims else 0


# ---- the release ---------------------------------------------------------------------------------------------
RELEASABLE = {ReasonKind.LAST, ReasonKind.BEST, ReasonKind.EPOCH, ReasonKind.EVERY}
WHOLE_ONLY = {ReasonKind.WEIGHTS_INSIDE, ReasonKind.STAYS_WEIGHTS_ONLY}  # they qualify a keep, keep nothing
_TIER = {ReasonKind.EPOCH: 1, ReasonKind.EVERY: 1, ReasonKind.LAST: 2, ReasonKind.BEST: 3}


@dataclass(frozen=True)
class _Candidate:
    run_index: int
    decision: Decision
    tier: int
    worst_rank: int
    written: float
    slim_first: bool  # whole, and a --keep-weights rule keeps it: slimmed before anything is removed

    @property
    def order(self) -> tuple[int, int, float, int, int]:
        c = self.decision.checkpoint
        return (self.tier, -self.worst_rank if self.tier == 3 else 0, self.written, c.step, self.run_index)


def _tier(reasons: Sequence[Reason]) -> int:
    return max((0 if r.weights_only else _TIER[r.kind] for r in reasons if r.kind in RELEASABLE), default=-1)


def _releasable(d: Decision, still_kept: Mapping[int, object]) -> bool:
    """Kept only by keep rules (no protection, refusal or hold) and not by a pressure rule or protection."""
    if not d.kept or d.checkpoint.step in still_kept or not d.checkpoint.complete:
        return False
    return any(r.kind in RELEASABLE for r in d.reasons) and all(r.kind in RELEASABLE | WHOLE_ONLY for r in d.reasons)


def _candidates(
    plans: Sequence[RunPlan],
    indexes: Sequence[int],
    still_kept: Sequence[Mapping[int, object]],
    weights: Sequence[Mapping[int, object]],
) -> list[_Candidate]:
    found = []
    seen: set[tuple[int, int]] = set()
    for i in indexes:
        for d in plans[i].decisions:
            if not _releasable(d, still_kept[i]) or not count_once(d.checkpoint, seen):
                continue
            c = d.checkpoint
            ranks = [r.rank or 0 for r in d.reasons if r.kind is ReasonKind.BEST]
            slim_first = d.action is Action.KEEP and c.step in weights[i] and bool(c.resume_state) and c.weights_outside
            found.append(_Candidate(i, d, _tier(d.reasons), max(ranks, default=0), _written(c) or 0.0, slim_first))
    return sorted(found, key=lambda k: k.order)


def count_once(c: Checkpoint, seen: set[tuple[int, int]]) -> bool:
    """False for a checkpoint already counted: one run directory reached by two paths (a bind mount below the
    root) shows the same checkpoints twice, and they free their bytes once."""
    if c.identity is None:
        return True
    if c.identity in seen:
        return False
    seen.add(c.identity)
    return True


def released_reasons(pressure_reason: Reason, was: Sequence[Reason]) -> tuple[Reason, ...]:
    kept_reasons = [r for r in was if r.kind in RELEASABLE]
    return (pressure_reason, *(replace(r, released=True) for r in kept_reasons))


@dataclass(frozen=True)
class Space:
    """What the engine measured for a plan: the filesystems holding runs, and the time."""

    disks: Mapping[int, Disk]  # device -> its figures
    run_devices: Mapping[str, int]  # run path -> the device of its directory
    archive_device: int | None = None  # where --archive-to lies
    now: float = 0.0
    freeing: bool = False  # a trash is still being emptied: its space is not free yet, so release nothing yet
    unseen: Mapping[int, int] = field(default_factory=dict)  # device -> freed earlier, not yet shown as free


@dataclass(frozen=True)
class PressureInputs:
    """Everything `apply` needs besides the plans; the policy module derives it (`policy.plan_root`)."""

    policy: PressurePolicy
    space: Space
    still_kept: Sequence[Mapping[int, object]]  # per run plan: steps the pressure rules or protections keep
    weights_kept: Sequence[Mapping[int, object]]  # per run plan: steps a --keep-weights rule keeps
    removal: Action
    refused: bool  # retention is refused somewhere in the root: nothing is released


def apply(plans: Sequence[RunPlan], inputs: PressureInputs) -> tuple[tuple[RunPlan, ...], tuple[DiskPressure, ...]]:
    """The plans with what pressure releases, and the verdict for each filesystem. The archive's filesystem, if
    it holds runs, is judged last: what the others archive there counts against it."""
    plans = list(plans)
    verdicts = []
    incoming = 0
    archive = inputs.space.archive_device
    room = _archive_room(plans, inputs)
    for device, disk in sorted(inputs.space.disks.items(), key=lambda item: (item[0] == archive, item[0])):
        indexes = _on(plans, inputs, device)
        verdict, plans = _one_disk(plans, indexes, disk, inputs, incoming if device == archive else 0, room)
        verdicts.append(verdict)
        if archive is not None and device != archive:
            incoming += _archived_bytes(plans, indexes)
    return tuple(plans), tuple(verdicts)


def _on(plans: Sequence[RunPlan], inputs: PressureInputs, device: int) -> list[int]:
    return [i for i, p in enumerate(plans) if inputs.space.run_devices.get(p.run.path) == device]


@dataclass
class _Room:
    """What the archive's filesystem (when it holds runs too) can take before it falls below its own floor."""

    left: int


def _archive_room(plans: Sequence[RunPlan], inputs: PressureInputs) -> _Room | None:
    archive = inputs.space.archive_device
    disk = inputs.space.disks.get(archive) if archive is not None else None
    if disk is None or disk.total <= 0:
        return None
    planned_in = sum(_archived_bytes(plans, _on(plans, inputs, d)) for d in inputs.space.disks if d != archive)
    here, _ = _one_disk(list(plans), _on(plans, inputs, disk.device), disk, inputs, planned_in, None, judge=False)
    return _Room(max(0, here.available - here.needed))


def _archived_bytes(plans: Sequence[RunPlan], indexes: Sequence[int]) -> int:
    seen: set[tuple[int, int]] = set()
    return sum(
        d.checkpoint.size_bytes
        for i in indexes
        for d in plans[i].decisions
        if d.action is Action.ARCHIVE and count_once(d.checkpoint, seen)
    )


def _training(plans: Sequence[RunPlan], indexes: Sequence[int], now: float) -> list[int]:
    """The runs still training, each run directory once (one reached by two paths saves once)."""
    seen: set[tuple[int, int]] = set()
    found = []
    for i in indexes:
        live = plans[i].live
        if still_training(plans[i], now) and (live is None or count_once(live, seen)):
            found.append(i)
    return found


def _planned(plans: Sequence[RunPlan], indexes: Sequence[int], elsewhere: bool) -> int:
    seen: set[tuple[int, int]] = set()
    return sum(frees(d, elsewhere) for i in indexes for d in plans[i].decisions if count_once(d.checkpoint, seen))


def _one_disk(
    plans: list[RunPlan],
    indexes: Sequence[int],
    disk: Disk,
    inputs: PressureInputs,
    incoming: int,
    room: _Room | None,
    judge: bool = True,
) -> tuple[DiskPressure, list[RunPlan]]:
    archive_device = inputs.space.archive_device
    elsewhere = archive_device is not None and archive_device != disk.device
    training = _training(plans, indexes, inputs.space.now)
    verdict = DiskPressure(
        disk,
        inputs.policy.floor.bytes_of(disk.total),
        sum(next_save(plans[i]) for i in training),
        tuple(plans[i].run.path for i in training),
        _planned(plans, indexes, elsewhere),
        acts=inputs.policy.releases,
        unseen=inputs.space.unseen.get(disk.device, 0),
        incoming=incoming,
    )
    if disk.total <= 0:  # some FUSE and network filesystems report no size: their free space means nothing
        return replace(verdict, deferred=NO_FIGURES), plans
    if not judge or not verdict.under:
        return verdict, plans
    if inputs.space.freeing:  # the figures are stale until the trash is empty: neither release nor alarm yet
        return replace(verdict, deferred=FREEING), plans
    if not inputs.policy.releases:
        return verdict, plans
    if inputs.refused:
        return replace(verdict, deferred=REFUSED), plans
    return _release(plans, indexes, verdict, inputs, elsewhere, room if elsewhere else None)


def _release(
    plans: list[RunPlan],
    indexes: Sequence[int],
    verdict: DiskPressure,
    inputs: PressureInputs,
    elsewhere: bool,
    room: _Room | None,
) -> tuple[DiskPressure, list[RunPlan]]:
    candidates = _candidates(plans, indexes, inputs.still_kept, inputs.weights_kept)
    steps = [(k, Action.WEIGHTS_ONLY if k.slim_first else inputs.removal) for k in candidates]
    steps += [(k, inputs.removal) for k in candidates if k.slim_first]  # the slimmed ones, if still not enough
    chosen: dict[tuple[int, str], tuple[_Candidate, Decision]] = {}
    gains: dict[tuple[int, str], int] = {}  # what each chosen release frees, beyond what the plan did
    blocked = no_room = 0
    for k, action in steps:
        if verdict.available + sum(gains.values()) >= verdict.needed:
            break
        was = k.decision
        key = (k.run_index, was.checkpoint.name)
        after = Decision(was.checkpoint, action, ())
        if frees(after, elsewhere) <= frees(chosen[key][1] if key in chosen else was, elsewhere):
            blocked += action is Action.ARCHIVE  # an archive on this same filesystem frees nothing here
            continue
        if room is not None and action is Action.ARCHIVE:
            if was.checkpoint.size_bytes > room.left:
                no_room += 1  # it would fill the archive's filesystem, where runs save too
                continue
            room.left -= was.checkpoint.size_bytes
        chosen[key] = (k, after)
        gains[key] = frees(after, elsewhere) - frees(was, elsewhere)
    total = sum(gains.values())
    for key in reversed(list(chosen)):  # a release made needless by a later, larger one is undone
        if verdict.available + total - gains[key] >= verdict.needed:
            total -= gains.pop(key)
            del chosen[key]
    released = _releases(plans, chosen, elsewhere)
    verdict = replace(verdict, released=released, archive_blocked=blocked, room_blocked=no_room)
    reason = Reason(ReasonKind.PRESSURE, "pressure", detail=figures_text(verdict))
    for (i, name), (_, after) in chosen.items():
        plans[i] = _with_release(plans[i], name, after, reason)
    return verdict, plans


Chosen = Mapping[tuple[int, str], tuple[_Candidate, Decision]]


def _releases(plans: Sequence[RunPlan], chosen: Chosen, elsewhere: bool) -> tuple[Release, ...]:
    return tuple(
        Release(plans[i].run.path, name, after.action, frees(after, elsewhere) - frees(k.decision, elsewhere))
        for (i, name), (k, after) in chosen.items()
    )


def _with_release(plan: RunPlan, name: str, after: Decision, reason: Reason) -> RunPlan:
    decisions = tuple(
        replace(after, reasons=released_reasons(reason, d.reasons)) if d.checkpoint.name == name else d
        for d in plan.decisions
    )
    return replace(plan, decisions=decisions)
