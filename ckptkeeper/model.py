"""Frozen values that flow through the pipeline: what a scan saw, and what the planner decided. No I/O."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

# One entry of a checkpoint's lstat signature: (path relative to the checkpoint, file type (S_IFMT), inode,
# size, mtime_ns, ctime_ns); "." is the checkpoint directory itself.
SignatureEntry = tuple[str, int, int, int, int, int]
Signature = tuple[SignatureEntry, ...]


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
    # An lstat signature of the directory and everything in it, as scanned (`scan.lstat_signature`): a removal
    # acts only if it is unchanged (a run resumed into an existing checkpoint rewrites its files in place, sizes
    # and all). `signature_vouches`: the newest change in it was older than the scan's look by more than the
    # filesystem's timestamp step, so no later change can leave the signature as it was (see the docstring).
    signature: Signature | None = field(default=None, compare=False, repr=False)
    signature_vouches: bool = field(default=False, compare=False)
    # The file times lie in the future (a writer's clock ahead of this machine's): they order nothing.
    times_in_future: bool = field(default=False, compare=False)
    # When it counts as settled if nothing changes (watch re-checks then); None if not waiting to settle.
    settles_at: float | None = field(default=None, compare=False)
    # (st_dev, st_ino) of the directory when scanned: a removal acts only on the very directory judged.
    identity: tuple[int, int] | None = field(default=None, compare=False)
    # What a weights-only keep would remove (`weights.split`): the resume state's top-level entries and their
    # bytes; whether loadable weights exist outside it; whether it is already marked weights-only.
    resume_state: tuple[str, ...] = ()
    resume_bytes: int = 0
    weights_outside: bool = True
    weights_only: bool = False
    # Named metrics (`--metric`): the file each value joined to `metrics` came from, and why each one that is
    # not there is missing (no results yet, not a number, unreadable).
    metric_origins: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    missing_metrics: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    # Named metrics whose results file was read but holds nothing at the pointer (a wrong pointer?)
    unreachable_metrics: frozenset[str] = field(default=frozenset(), compare=False)
    # Weights-only, but its directory's times are not yet those its marker recorded (a slim cut short after
    # its last move): the slim is finished by putting them back.
    times_to_restore: bool = False

    @property
    def trainer_best_step(self) -> int | None:
        return self.trainer_best_steps[0] if self.trainer_best_steps else None


def root_name(root: str | os.PathLike[str]) -> str:
    """The name a person gives the root's own run: the root directory's name (`/` for the filesystem root),
    unless the root holds an entry of that name (a nested run `outputs/outputs` would be shown alike): then
    `.`, the path the JSON gives it. `root` should be the real path (a symlink's name is not the run's)."""
    absolute = os.path.abspath(root)
    name = os.path.basename(absolute) or absolute
    return "." if name != absolute and os.path.lexists(os.path.join(absolute, name)) else name


@dataclass(frozen=True)
class Run:
    """A run directory: `path` is relative to the root, in POSIX form ("." for the root itself); `name` is
    how a person names it (`label`): the root's own run by the root directory's name."""

    path: str
    checkpoints: tuple[Checkpoint, ...]
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.path


class Action(StrEnum):
    KEEP = "keep"
    WEIGHTS_ONLY = "weights-only"  # kept, without its resume state (`--keep-weights`)
    DELETE = "delete"
    ARCHIVE = "archive"


class ReasonKind(StrEnum):
    """What gave a reason: each keep rule and protection has its own kind, and `render` words each kind."""

    LAST = "last"
    BEST = "best"
    EPOCH = "epoch"
    EVERY = "every"
    NEWEST = "newest"
    NEWEST_WRITTEN = "newest-written"
    NEWEST_WRITTEN_SKEWED = "newest-written-skewed"
    TRAINER_BEST = "trainer-best"
    INCOMPLETE = "incomplete"
    WEIGHTS_INSIDE = "weights-inside"  # kept whole: its weights exist only inside the resume state
    STAYS_WEIGHTS_ONLY = "stays-weights-only"  # kept whole by the plan, but already weights-only
    REFUSED = "refused"  # kept because retention is refused in this run
    HELD = "held"  # kept because retention is refused in another run of the root
    NO_RULE_KEEPS = "no-rule-keeps"  # the reason for a removal
    PRESSURE = "pressure"  # released under disk pressure (`--keep-under-pressure`): the reasons it had follow
    PINNED = "pinned"  # `ckptkeeper pin`: kept until unpinned or its lease lapses
    AWAITING = "awaiting"  # `--await NAME`: kept until the evaluation's metric arrives or its timeout passes


@dataclass(frozen=True)
class Reason:
    """Why a checkpoint is kept or removed, as data (restic's `KeepReason`); `render.reason_text` words it.

    `rule` names the keep rule as written (`last:5`, `best:1:eval_accuracy`) or the protection
    (`protected:newest`); None for a removal. `rank` is the checkpoint's place among those the rule keeps
    (1 is the newest for `last`, the best for `best`), `of` how many it keeps; `metric`/`value` the metric a
    `best` rule ranked by; `detail` anything else the wording needs (the epoch, why it is incomplete)."""

    kind: ReasonKind
    rule: str | None = None
    rank: int | None = None
    of: int | None = None
    metric: str | None = None
    value: float | None = None
    detail: str | None = None
    weights_only: bool = False  # given by a `--keep-weights` rule: it keeps the weights only
    released: bool = False  # a reason it was kept for until disk pressure released it (`was last 4/5`)
    # When it stops keeping the checkpoint (seconds since the epoch: a lease's expiry, an await's timeout), and
    # how long that was after the time the plan was made for; None when it does not end by itself.
    until: float | None = None
    left: float | None = None


@dataclass(frozen=True)
class Decision:
    checkpoint: Checkpoint
    action: Action
    reasons: tuple[Reason, ...]

    @property
    def kept(self) -> bool:
        """The checkpoint stays (whole, or weights only)."""
        return self.action in (Action.KEEP, Action.WEIGHTS_ONLY)

    @property
    def slims(self) -> bool:
        """Kept weights-only with resume state still to remove (a slim to do, or one to finish)."""
        c = self.checkpoint
        return self.action is Action.WEIGHTS_ONLY and (bool(c.resume_state) or c.times_to_restore)


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
class Pin:
    """A checkpoint pinned by `ckptkeeper pin` (kept whatever the rules say): `run` is the run's path relative to
    the root ("." for the root's own), `checkpoint` its directory's name. A lease (`--for`) has `expires_at`."""

    run: str
    checkpoint: str
    pinned_at: float
    note: str = ""
    expires_at: float | None = None

    def holds_at(self, now: float | None) -> bool:
        """Whether it still protects at `now`; with no time given, a lease is taken to hold (the safe side)."""
        return self.expires_at is None or now is None or now < self.expires_at


@dataclass(frozen=True)
class RunView:
    """What the keep rules and protections of one plan look at: the run, its complete checkpoints by step, and
    the complete checkpoints a resume may need (each with why), computed once per plan."""

    run: Run
    complete: tuple[Checkpoint, ...]
    resume_points: tuple[tuple[Checkpoint, Reason], ...] = ()
    mixed_runs: MixedRuns | None = None
    now: float | None = None  # the time the plan is made for (None: unknown; what lapses by time then holds)
    pins: Mapping[str, Pin] = field(default_factory=dict)  # this run's pins, by checkpoint name


@dataclass(frozen=True)
class Stale:
    """An incomplete checkpoint unchanged for longer than `--stale-after` (see `stale.py`): reported, never removed."""

    checkpoint: Checkpoint
    unchanged_for: float  # seconds since anything in it last changed
    resume_point: bool  # the run's highest step: a resume (get_last_checkpoint) would start from it


@dataclass(frozen=True)
class Overdue:
    """A complete checkpoint whose awaited metric (`--await`) did not arrive within its timeout: the rules now
    judge it without that metric. Said once."""

    checkpoint: Checkpoint
    metric: str
    timeout: float


@dataclass(frozen=True)
class RunPlan:
    """The planner's answer for one run. A refused run keeps everything and says why."""

    run: Run
    decisions: tuple[Decision, ...]
    refusal: str | None = None
    mixed_runs: MixedRuns | None = None  # a warning only: nothing is removed because of it
    # A checkpoint a resume would start from that is weights-only (the newer ones removed by someone): the
    # Trainer would resume with a fresh optimizer and say nothing. A warning only.
    weights_only_resume: Checkpoint | None = None
    stale: tuple[Stale, ...] = ()  # incomplete and unchanged for long (a crash's leftover?): a warning only
    overdue: tuple[Overdue, ...] = ()  # awaited evaluations that never arrived: judged without them

    @property
    def live(self) -> Checkpoint | None:
        """The checkpoint the live run would resume from: the highest complete step, or in a directory that mixes
        runs the newest written one (a stale run's final checkpoint is not the live run's)."""
        if self.mixed_runs is not None:
            return self.mixed_runs.newest_written
        return max((c for c in self.run.checkpoints if c.complete), key=lambda c: c.step, default=None)

    @property
    def kept(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.kept)

    @property
    def removed(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if not d.kept)

    @property
    def acted_on(self) -> tuple[Decision, ...]:
        """What the engine acts on, oldest first: every removal, and every weights-only keep still to slim."""
        return tuple(d for d in self.decisions if not d.kept or d.slims)


class OutcomeKind(StrEnum):
    """What became of one removal the plan asked for. The values are the journal's `action` words."""

    DELETED = "delete"
    ARCHIVED = "archive"
    WOULD_DELETE = "would-delete"  # a dry run
    WOULD_ARCHIVE = "would-archive"
    SLIMMED = "slim"  # made weights-only
    WOULD_SLIM = "would-slim"
    VANISHED = "vanished"  # removed by someone else first
    SKIPPED = "skipped"  # changed since the plan was made: left for the next pass
    STOPPED = "stopped"  # cut short by a stop; finished or undone at the next start
    ERROR = "error"

    @property
    def removed(self) -> bool:
        """The checkpoint left its run directory through ckptkeeper."""
        return self in (OutcomeKind.DELETED, OutcomeKind.ARCHIVED)

    @property
    def frees(self) -> bool:
        """Bytes left the run: removed whole, or its resume state removed."""
        return self.removed or self is OutcomeKind.SLIMMED

    @property
    def gone(self) -> bool:
        """The checkpoint is no longer in its run directory (removed, by ckptkeeper or someone else)."""
        return self.removed or self is OutcomeKind.VANISHED

    @classmethod
    def would(cls, action: Action) -> OutcomeKind:
        return {Action.ARCHIVE: cls.WOULD_ARCHIVE, Action.WEIGHTS_ONLY: cls.WOULD_SLIM}.get(action, cls.WOULD_DELETE)


MOVED_TO = "moved to "  # the detail of an archive on the same filesystem


@dataclass(frozen=True)
class Outcome:
    """What happened to one checkpoint the plan removes."""

    run: str
    checkpoint: str
    action: OutcomeKind
    bytes: int = 0
    detail: str = ""
    step: int | None = None
    reasons: tuple[Reason, ...] = ()  # why the plan removed (or slimmed) it: the decision's reasons

    @property
    def moved(self) -> bool:
        """Archived by one rename on the same filesystem: out of the run, but no space freed."""
        return self.action is OutcomeKind.ARCHIVED and self.detail.startswith(MOVED_TO)


@dataclass(frozen=True)
class RunResult:
    """One run after a pass of the pipeline: its plan, what became of each removal, and the run as it is on
    disk afterwards (the plan's checkpoints less those gone), so nobody scans again to find out."""

    plan: RunPlan
    outcomes: tuple[Outcome, ...]
    after: Run

    @property
    def unfinished(self) -> tuple[Decision, ...]:
        """What the plan asked for and did not happen (failed, skipped, stopped, dry run): removals whose
        checkpoint is still there, slims that did not go through."""
        present = {c.name for c in self.after.checkpoints}
        slimmed = {o.checkpoint for o in self.outcomes if o.action is OutcomeKind.SLIMMED}
        return tuple(
            d
            for d in self.plan.acted_on
            if (d.slims and d.checkpoint.name not in slimmed) or (not d.kept and d.checkpoint.name in present)
        )
