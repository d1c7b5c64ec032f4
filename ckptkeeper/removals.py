"""The ways a checkpoint leaves its run: deleted, archived to a directory or an object store, or slimmed to
its weights. Each is crash-safe and goes through the trash (`actions`, `slimming`); the engine picks one per
decision (`Pipeline._removal`), re-checks, journals, and turns their errors into outcomes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ckptkeeper.actions import (
    ActionError,
    Dispose,
    StopCheck,
    Stopped,
    archive_checkpoint,
    archive_to_store,
    delete_checkpoint,
)
from ckptkeeper.model import MOVED_TO, Checkpoint, OutcomeKind
from ckptkeeper.paths import Identity
from ckptkeeper.scan import checkpoint_step
from ckptkeeper.slimming import slim_checkpoint
from ckptkeeper.state import StateDir

if TYPE_CHECKING:  # imported when an object store is used
    from ckptkeeper.destination import Backoff, ObjectStore


class Removal(Protocol):
    """One way to remove a checkpoint from its run: crash-safe and through the trash. It raises the
    `actions` errors (Vanished, Changed, Stopped, ActionError); the engine turns them into outcomes."""

    @property
    def done(self) -> OutcomeKind:
        """The outcome of a removal that went through."""
        ...

    @property
    def verb(self) -> str:
        """The journal's word for it (`start-<verb>`)."""
        ...

    def remove(self, run: str, checkpoint: Path, expected: Identity | None) -> str:
        """Carry it out; returns the detail for the outcome (empty for none)."""
        ...

    def freed(self, c: Checkpoint) -> int:
        """The bytes it takes out of the run."""
        ...


class ProgressSink(Protocol):
    """Told the bytes sent as an upload goes (from upload threads), closed at its end."""

    def __call__(self, sent: int) -> None: ...

    def close(self) -> None: ...


ProgressFactory = Callable[[str, Path], ProgressSink]  # (run, checkpoint directory) -> its sink


@dataclass(frozen=True)
class _Through:
    """What every removal goes through: the root (reached as `root_identity`), the state directory whose trash takes
    the checkpoint, and who deletes trash entries (`dispose`; None: inline)."""

    root: Path
    state: StateDir
    dispose: Dispose | None
    root_identity: Identity | None


@dataclass(frozen=True)
class Deletion(_Through):
    done: OutcomeKind = OutcomeKind.DELETED
    verb: str = "delete"

    def remove(self, run: str, checkpoint: Path, expected: Identity | None) -> str:
        delete_checkpoint(self.root, checkpoint, self.state, self.dispose, expected, self.root_identity)
        return ""

    def freed(self, c: Checkpoint) -> int:
        return c.size_bytes


@dataclass(frozen=True)
class Archival(_Through):
    """Into `<archive>/<run path>/checkpoint-N` (the root's own run directly below the archive)."""

    archive_to: Path
    stop: StopCheck | None
    done: OutcomeKind = OutcomeKind.ARCHIVED
    verb: str = "archive"

    def freed(self, c: Checkpoint) -> int:
        return c.size_bytes

    def remove(self, run: str, checkpoint: Path, expected: Identity | None) -> str:
        target = self.archive_to / run / checkpoint.name if run != "." else self.archive_to / checkpoint.name
        how = archive_checkpoint(
            self.root, checkpoint, target, self.state, self.dispose, expected, self.stop, self.archive_to,
            self.root_identity,
        )  # fmt: skip
        return f"{MOVED_TO}{target}" if how == "renamed" else f"{how} to {target}"


@dataclass(frozen=True)
class StoreArchival(_Through):
    """Into an object store (`--archive-to s3://...`): upload, verify, manifest last (destination.archive), then
    the source goes through the trash (actions.archive_to_store). A store that failed as a whole is tried again
    only once its backoff has passed (`Pipeline._held_back`)."""

    store: ObjectStore
    backoff: Backoff
    stop: StopCheck | None
    progress: ProgressFactory | None = None
    done: OutcomeKind = OutcomeKind.ARCHIVED
    verb: str = "archive"

    def freed(self, c: Checkpoint) -> int:
        return c.size_bytes

    def remove(self, run: str, checkpoint: Path, expected: Identity | None) -> str:
        from ckptkeeper.destination import DestinationDown, DestinationError, StopRequested, archive

        shown = self.store.shown(run, checkpoint.name)
        step = checkpoint_step(checkpoint.name) or 0
        progress = self.progress(run, checkpoint) if self.progress is not None else None

        def upload(source: str) -> tuple[dict[str, int], str]:
            manifest, how = archive(self.store, source, run, checkpoint.name, step, self.stop, progress)
            return {f.path: f.size for f in manifest.files}, how

        try:
            how = archive_to_store(
                self.root, checkpoint, upload, self.state, self.dispose, expected, self.root_identity
            )
        except StopRequested:
            raise Stopped("the upload was not complete; the checkpoint stays whole") from None
        except DestinationDown as e:
            self.backoff.failed(time.monotonic(), f"cannot archive to {self.store.url}: {e}")
            raise ActionError(self.backoff.reason) from None
        except DestinationError as e:
            raise ActionError(f"cannot archive {checkpoint} to {shown}: {e}") from None
        finally:
            if progress is not None:
                progress.close()
        self.backoff.succeeded()
        return f"{how} to {shown}"


@dataclass(frozen=True)
class Slimming(_Through):
    """Keep the weights, remove the resume state (`--keep-weights`): see `slimming.py`."""

    resume_state: tuple[str, ...]
    done: OutcomeKind = OutcomeKind.SLIMMED
    verb: str = "slim"

    def remove(self, run: str, checkpoint: Path, expected: Identity | None) -> str:
        slim_checkpoint(
            self.root, checkpoint, self.resume_state, self.state, self.dispose, expected, self.root_identity
        )
        if not self.resume_state:
            return "its directory's times put back (a slim cut short)"
        return f"removed {', '.join(self.resume_state)}"

    def freed(self, c: Checkpoint) -> int:
        return c.resume_bytes
