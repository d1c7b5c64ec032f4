"""Pinning a checkpoint from outside ckptkeeper's own process: `ckptkeeper pin`/`unpin`/`pins`, and the
`ckptkeeper.lease` context manager for evaluation scripts.

Where a pin goes: the checkpoint named (a real directory `checkpoint-N`, never a link), the root whose run holds
it (found by identity, never by string), and that root's state directory: `--state-dir` (or
`CKPTKEEPER_STATE_DIR`), else the default of `--root` (or `CKPTKEEPER_ROOT`), else the nearest state directory
of ckptkeeper's (`_ckptkeeper`) above the checkpoint. The store and the race with removals are in `pins.py`.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ckptkeeper import pins
from ckptkeeper.actions import ActionError, open_run_dir
from ckptkeeper.layout import Layout, default_state_dir
from ckptkeeper.model import Pin
from ckptkeeper.paths import identity
from ckptkeeper.scan import DEFAULT_MAX_DEPTH, checkpoint_step, find_run_dirs, never_descended, run_path
from ckptkeeper.state import LOCK_NAME, OWNER_MARK, ROOT_LOCK_NAME, STATE_DIR_NAME, StateDir, ownership_problem
from ckptkeeper.units import DURATION_FORMS, parse_duration

Identity = tuple[int, int]
HOW_TO_NAME = (
    "name the root with --root ROOT (its state directory is ROOT/_ckptkeeper) or the state directory with "
    "--state-dir DIR (or CKPTKEEPER_ROOT, CKPTKEEPER_STATE_DIR)"
)


class PinProblem(ValueError):
    """What was named cannot be pinned (not a checkpoint, no root or state directory found): a usage error."""


class PinRefused(RuntimeError):
    """The checkpoint cannot be pinned now: a removal of it is under way, or it is gone. Nothing was pinned."""


@dataclass(frozen=True)
class Target:
    """A checkpoint to pin: its root (a real path), the state directory, its run (relative to the root, "." for
    the root's own) and name, and its identity when it was found (None: not there, for `unpin`)."""

    root: Path
    state_dir: Path
    run: str
    checkpoint: str
    identity: Identity | None

    @property
    def path(self) -> Path:
        return self.root / self.checkpoint if self.run == "." else self.root / self.run / self.checkpoint

    @property
    def shown(self) -> str:
        return f"{self.root.name if self.run == '.' else self.run}/{self.checkpoint}"


def parse_lease(value: str | float | None) -> float | None:
    """Seconds of a lease (`90s`, `15m`, `2h`, `1d`, `1h30m`, or a number of seconds); None for no lease."""
    if value is None:
        return None
    seconds = float(value) if isinstance(value, (int, float)) else parse_duration(value)
    if seconds is None or not 0 < seconds <= 3650 * 86400:
        raise PinProblem(f"{value!r} is not a duration: expected one such as {DURATION_FORMS} (more than 0)")
    return seconds


# ---------------------------------------------------------------------------------------------- finding it
def nearest_state_dir(start: Path) -> Path | None:
    """The nearest `_ckptkeeper` above `start` (itself included) that ckptkeeper made."""
    for directory in (start, *start.parents):
        candidate = directory / STATE_DIR_NAME
        try:
            if not stat.S_ISDIR(os.lstat(candidate).st_mode):
                continue
            names = os.listdir(candidate)
        except OSError:
            continue
        if names and ownership_problem(candidate) is None and (OWNER_MARK in names or "journal.jsonl" in names):
            return candidate
    return None


def find_target(
    checkpoint: Path, root: Path | None = None, state_dir: Path | None = None, must_exist: bool = True
) -> Target:
    """The checkpoint named, with its root and state directory; PinProblem when it is not a checkpoint of a run
    below a root, or no state directory is found."""
    named = Path(os.path.abspath(checkpoint))
    if checkpoint_step(named.name) is None:
        raise PinProblem(f"{checkpoint} is not a checkpoint: its name is not checkpoint-<step>")
    found = _identity_of(named, checkpoint, must_exist)
    parent = Path(os.path.realpath(named.parent))
    root, state_dir = _root_and_state(parent, root, state_dir, checkpoint)
    if not root.is_dir():
        raise PinProblem(f"root {root} is not a directory")
    layout = Layout.checked(root, state_dir)  # LayoutError: a state directory inside a checkpoint, not ours...
    run = _run_of(layout.root, parent, named.name, found, layout.state_dir)
    if run is None:
        raise PinProblem(f"{checkpoint} is not a checkpoint of a run below the root {layout.root}")
    return Target(layout.root, layout.state_dir, run, named.name, found)


def _identity_of(named: Path, given: Path, must_exist: bool) -> Identity | None:
    try:
        st = os.lstat(named)
    except FileNotFoundError:
        if must_exist:
            raise PinProblem(f"{given} does not exist") from None
        return None
    except OSError as e:
        raise PinProblem(f"cannot look at {given}: {e.strerror or e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise PinProblem(f"{given} is a symbolic link, not a checkpoint: name the checkpoint's own directory")
    if not stat.S_ISDIR(st.st_mode):
        raise PinProblem(f"{given} is not a directory, so not a checkpoint")
    return (st.st_dev, st.st_ino)


def _root_and_state(parent: Path, root: Path | None, state_dir: Path | None, given: Path) -> tuple[Path, Path]:
    if state_dir is not None and root is None:
        root = _root_of_state(state_dir, given)
    if root is not None:
        return root, state_dir if state_dir is not None else default_state_dir(Path(os.path.realpath(root)))
    nearest = nearest_state_dir(parent)
    if nearest is None:
        raise PinProblem(f"no ckptkeeper state directory found above {given}: {HOW_TO_NAME}")
    return nearest.parent, nearest


def _root_of_state(state_dir: Path, given: Path) -> Path:
    """The root of a state directory named alone: the one its pins file records, else its parent when it is a
    default one (`ROOT/_ckptkeeper`)."""
    recorded = pins.read_file(state_dir).root
    if recorded is not None:
        return Path(recorded)
    if state_dir.name == STATE_DIR_NAME:
        return Path(os.path.abspath(state_dir)).parent
    raise PinProblem(f"which root does --state-dir {state_dir} serve? It holds no pins yet: {HOW_TO_NAME}")


def _run_of(root: Path, parent: Path, name: str, found: Identity | None, state_dir: Path) -> str | None:
    """The run (relative to `root`) whose checkpoint `name` is the one found: where its real path says, checked
    by identity; else any run below the root holding it (a bind mount, another path to the same directory)."""
    below = os.path.relpath(parent, root)
    if below != os.pardir and not below.startswith(os.pardir + os.sep):
        run = Path(below).as_posix()
        if _is_run_path(run) and (found is None or present(root, run, name) == found):
            return run
    if found is None:
        return None
    for run_dir in find_run_dirs(root, DEFAULT_MAX_DEPTH, [state_dir], []):
        if identity_at(run_dir / name) == found:
            return run_path(root, run_dir)
    return None


def _is_run_path(run: str) -> bool:
    parts = [] if run == "." else run.split("/")
    return all(not never_descended(p) and checkpoint_step(p) is None for p in parts)


def identity_at(path: Path) -> Identity | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def present(root: Path, run: str, name: str) -> Identity | None:
    """The identity of the checkpoint directory `run/name`, reached from the root without following a link."""
    path = root / name if run == "." else root / run / name
    try:
        run_fd = open_run_dir(root, path, "pin")
    except ActionError:
        return None
    try:
        st = os.stat(name, dir_fd=run_fd, follow_symlinks=False)
    except OSError:
        return None
    finally:
        os.close(run_fd)
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


# ---------------------------------------------------------------------------------------------- pinning
@contextlib.contextmanager
def _state(target: Target) -> Iterator[int]:
    state = StateDir(target.state_dir)
    try:
        state.create()
    except OSError as e:
        raise pins.PinsError(f"cannot use the state directory {target.state_dir}: {e.strerror or e}") from None
    try:
        yield state.dir_fd
    finally:
        state.close()


def pin(target: Target, note: str = "", seconds: float | None = None) -> pins.StoredPin:
    """Pin the checkpoint, durably; PinRefused when a removal of it is under way or it is gone."""
    now = time.time()
    stored = pins.StoredPin(
        pins.new_id(), Pin(target.run, target.checkpoint, now, note, None if seconds is None else now + seconds)
    )

    _check_instance_uses(target)
    with _state(target) as dir_fd:

        def edit(current: pins.PinsFile) -> pins.PinsFile:
            _check_same_root(current, target)
            _check_not_removing(dir_fd, target)
            if target.identity is None or present(target.root, target.run, target.checkpoint) != target.identity:
                raise PinRefused(f"cannot pin {target.path}: it is gone (removed?); nothing was pinned")
            return replace(current, root=str(target.root), pins=(*current.pins, stored))

        pins.change(dir_fd, target.state_dir, edit)
    return stored


def _live_holder(text: str) -> str | None:
    """`pid N on HOST` from a lock file's first line, when that process is alive on this host."""
    found = re.match(r"pid (\d+) on (\S+?)(,|$)", text)
    if found is None or found.group(2) != socket.gethostname():
        return None
    try:
        os.kill(int(found.group(1)), 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass  # alive, another user's
    return f"pid {found.group(1)} on {found.group(2)}"


def _first_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(300).decode(errors="replace").split("\n", 1)[0]
    except OSError:
        return ""


def _check_instance_uses(target: Target) -> None:
    """A ckptkeeper running on the root with another state directory, or on a root above it (whose runs hold
    this checkpoint too), would never see this pin: refuse it. Read from the lock files' "held by" lines (a
    killed holder's line names a dead process, and is ignored)."""
    holder = _live_holder(_first_line(target.root / ROOT_LOCK_NAME))
    if holder is not None and not _first_line(target.state_dir / LOCK_NAME).startswith(f"{holder},"):
        raise PinProblem(
            f"a ckptkeeper ({holder}) is working on {target.root} with another state directory than "
            f"{target.state_dir}: it would not see this pin; name its state directory with --state-dir"
        )
    for above in target.root.parents:
        holder = _live_holder(_first_line(above / ROOT_LOCK_NAME))
        if holder is not None:
            raise PinProblem(
                f"a ckptkeeper ({holder}) is working on {above}, above the root {target.root}: it would not see "
                f"this pin; pin with --root {above}"
            )


def _check_not_removing(dir_fd: int, target: Target) -> None:
    busy = pins.removal_under_way(dir_fd)
    if busy is None or (busy and (busy.get("run"), busy.get("checkpoint")) != (target.run, target.checkpoint)):
        return
    raise PinRefused(
        f"cannot pin {target.path}: ckptkeeper is removing it right now (pid {busy.get('pid', '?')}); "
        "nothing was pinned"
    )


def _check_same_root(current: pins.PinsFile, target: Target) -> None:
    if current.root is not None and identity(current.root) not in (None, identity(target.root)):
        raise PinProblem(
            f"the state directory {target.state_dir} holds the pins of another root, {current.root}: name the state "
            f"directory of {target.root} with --state-dir"
        )


def unpin(target: Target, pin_id: str | None = None) -> int:
    """Remove the checkpoint's pins (only the one with `pin_id`, given one); how many were removed."""
    removed = 0

    def edit(current: pins.PinsFile) -> pins.PinsFile:
        nonlocal removed
        kept = tuple(s for s in current.pins if not _matches(s, target, pin_id))
        removed = len(current.pins) - len(kept)
        return replace(current, pins=kept)

    if not (target.state_dir / pins.PINS_NAME).exists():
        return 0
    with _state(target) as dir_fd:
        pins.change(dir_fd, target.state_dir, edit)
    return removed


def _matches(stored: pins.StoredPin, target: Target, pin_id: str | None) -> bool:
    same = (stored.pin.run, stored.pin.checkpoint) == (target.run, target.checkpoint)
    return same and (pin_id is None or stored.id == pin_id)


# ---------------------------------------------------------------------------------------------- Python
def _from_env(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


@contextlib.contextmanager
def lease(
    checkpoint: str | os.PathLike[str],
    for_: str | float | None = "2h",
    note: str = "",
    *,
    root: str | os.PathLike[str] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
) -> Iterator[Pin]:
    """Pin `checkpoint` for the block, as a lease of `for_` (`2h`, seconds; None: no lease), and let go of that
    pin at the end, also on an exception. A lease that outlives a killed script lapses by itself.

        with ckptkeeper.lease("outputs/run/checkpoint-240", for_="2h", note="eval"):
            evaluate("outputs/run/checkpoint-240")

    Raises PinRefused when a removal of it is under way (or it is gone), PinProblem when it is not a checkpoint
    of a run below a root with a state directory (`root`, `state_dir`, CKPTKEEPER_ROOT, CKPTKEEPER_STATE_DIR, or
    the nearest `_ckptkeeper` above it), PinsError when the pins file cannot be read or written. The pin is
    durable before the block starts."""
    seconds = parse_lease(for_)
    root_path = Path(root) if root is not None else _from_env("CKPTKEEPER_ROOT")
    state_path = Path(state_dir) if state_dir is not None else _from_env("CKPTKEEPER_STATE_DIR")
    target = find_target(Path(checkpoint), root_path, state_path)
    stored = pin(target, note, seconds)
    try:
        yield stored.pin
    finally:
        unpin(target, stored.id)


__all__ = ["PinProblem", "PinRefused", "Target", "find_target", "lease", "pin", "unpin"]
