"""The pin store (`ckptkeeper pin`, `unpin`, `pins`, `ckptkeeper.lease`): which checkpoints are pinned, kept in
the state directory (never in the checkpoint: its mtime and the Hub upload must not change).

Files, all in the state directory and all reached through its descriptor (never following a link):

- `pins.json`: the pins, replaced whole (written as `pins.json.part`, fsynced, renamed, the directory fsynced).
- `pins.lock`: flock'd (exclusive) by whoever changes the pins or starts a removal; held for milliseconds.
- `removing`: flock'd (exclusive) by the engine for the whole of one removal (delete, archive, slim), and naming
  it. A killed engine's flock dies with it, so a marker left behind is recognisably stale.

The race this closes: `pin` (under `pins.lock`) sees the checkpoint present and no live `removing` naming it,
writes the pin and exits 0; the engine, before every removal (under `pins.lock`), reads the pins again, skips a
pinned checkpoint, and otherwise takes `removing` before letting go of `pins.lock`. Either the engine read the
pins after the pin was written (and skips), or it holds `removing` before `pin` looks (and `pin` fails), or the
removal is over (and the checkpoint is gone, so `pin` fails).

An unreadable pins file (not JSON, not ours, too big, a link) is a `PinsError`: nothing is removed while it
lasts (the plan fails, and each removal is refused), since a pin in it may be lost. A missing one means no pins.
Owned by the caller's thread; nothing here is shared between threads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ckptkeeper.model import Pin
from ckptkeeper.regular import NotRegular, open_regular

PINS_NAME = "pins.json"
PINS_TEMP = "pins.json.part"
PINS_LOCK_NAME = "pins.lock"
REMOVING_NAME = "removing"
MAX_PINS_BYTES = 16 << 20
KEEP_LAPSED = 86400.0  # a lapsed lease is shown as lapsed for a day, then dropped at the next change
FORMAT = 1
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PinsError(Exception):
    """The pins file cannot be read or written; the message says which and why. Nothing is removed meanwhile."""


@dataclass(frozen=True)
class StoredPin:
    """One pin as stored: a Pin and the id of whoever took it (a lease lets go of its own pin only)."""

    id: str
    pin: Pin


@dataclass(frozen=True)
class PinsFile:
    """The pins file's content: the root its runs are relative to (as `pin` found it), and the pins."""

    root: str | None = None
    pins: tuple[StoredPin, ...] = ()


# ---------------------------------------------------------------------------------------------------- reading
def _parse(data: bytes, shown: str) -> PinsFile:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise PinsError(f"the pins file {shown} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("pins"), list):
        raise PinsError(f"the pins file {shown} is not one ckptkeeper wrote (no format {FORMAT} and list of pins)")
    root = doc.get("root")
    return PinsFile(root if isinstance(root, str) else None, tuple(_entry(e, shown) for e in doc["pins"]))


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _entry(entry: object, shown: str) -> StoredPin:
    bad = PinsError(f"the pins file {shown} holds a pin ckptkeeper cannot read: {json.dumps(entry)[:200]}")
    if not isinstance(entry, dict):
        raise bad
    run, name, pid, note = entry.get("run"), entry.get("checkpoint"), entry.get("id"), entry.get("note", "")
    pinned_at, expires = _number(entry.get("pinned_at")), entry.get("expires_at")
    if not all(isinstance(v, str) for v in (run, name, pid, note)) or pinned_at is None:
        raise bad
    if expires is not None and _number(expires) is None:
        raise bad
    assert isinstance(run, str) and isinstance(name, str) and isinstance(pid, str) and isinstance(note, str)
    return StoredPin(pid, Pin(run, name, pinned_at, note, _number(expires)))


def _read_at(dir_fd: int, shown: Path) -> PinsFile:
    """The pins file in the directory open as `dir_fd` (empty when there is none); PinsError when unreadable."""
    where = str(shown / PINS_NAME)
    try:
        fd = open_regular(PINS_NAME, dir_fd)
    except FileNotFoundError:
        return PinsFile()
    except NotRegular as e:
        raise PinsError(f"cannot read the pins file {where}: it is {e.kind}, not a regular file") from None
    except OSError as e:
        raise PinsError(f"cannot read the pins file {where}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if st.st_size > MAX_PINS_BYTES:
            raise PinsError(f"cannot read the pins file {where}: {st.st_size} bytes, more than a pins file holds")
        data = os.pread(fd, MAX_PINS_BYTES + 1, 0)
    except OSError as e:
        raise PinsError(f"cannot read the pins file {where}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    return _parse(data, where)


def read_file(state_dir: Path) -> PinsFile:
    """The pins file of `state_dir`, read without a lock (a plan, `pins`); empty when there is no state directory
    or no pins file. PinsError when it cannot be read."""
    try:
        dir_fd = os.open(state_dir, _DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return PinsFile()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return PinsFile()  # not a state directory ckptkeeper uses (Layout refuses it)
        raise PinsError(f"cannot read the state directory {state_dir}: {e.strerror or e}") from None
    try:
        return _read_at(dir_fd, state_dir)
    finally:
        os.close(dir_fd)


class PinsReader:
    """The pins of one state directory, read again only when the pins file's lstat changed (the daemon looks every
    second; reading and parsing the file each time was its idle path's largest cost). Owned by the daemon's main
    thread.

    The key is what every change to the file moves: `pin` and `unpin` replace it (another inode), and a write in
    place sets its mtime and ctime. A file changed within a second of the read is not trusted to keep its key
    (a second write in the same tick of the file-time clock would keep it too), so it is read again next time.
    Only this change detector goes by name; the read itself is `read_file`'s, through descriptors."""

    RECENT = 1.0  # s: a file changed this recently is read again at every look

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._key: tuple[int, ...] | None = None
        self._pins: tuple[Pin, ...] = ()

    def pins(self, now: float) -> tuple[Pin, ...]:
        """The pins, lapsed leases included; PinsError when the file cannot be read."""
        key = self._lstat_key(now)
        if key is not None and key == self._key:
            return self._pins
        self._key = None
        pins = read_pins(self.state_dir)
        self._key, self._pins = key, pins
        return pins

    def holding(self, now: float) -> object:
        """What of the pins a plan depends on at `now`: the pins that hold then (or why they cannot be read). When
        it changes (a pin taken or dropped, a lease lapsed), the daemon plans every run again."""
        try:
            return frozenset(p for p in self.pins(now) if p.holds_at(now))
        except PinsError as e:
            return str(e)

    def _lstat_key(self, now: float) -> tuple[int, ...] | None:
        try:
            st = os.lstat(self.state_dir / PINS_NAME)
        except FileNotFoundError:
            return (0,)  # no pins file: no pins; one that appears has a key of its own
        except OSError:
            return None  # read it every time; read_file says what is wrong
        if now - st.st_ctime < self.RECENT or now - st.st_mtime < self.RECENT:
            return None
        return (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_pins(state_dir: Path) -> tuple[Pin, ...]:
    """The pins held in `state_dir` (lapsed leases included: the planner judges them at its time)."""
    return tuple(stored.pin for stored in read_file(state_dir).pins)


def effective(pins: Sequence[Pin]) -> tuple[Pin, ...]:
    """One pin per checkpoint, for the planner: of several, one that never lapses, else the lease that lapses
    last."""
    best: dict[tuple[str, str], Pin] = {}
    for pin in pins:
        key = (pin.run, pin.checkpoint)
        other = best.get(key)
        if other is None or _outlasts(pin, other):
            best[key] = pin
    return tuple(best.values())


def _outlasts(a: Pin, b: Pin) -> bool:
    if a.expires_at is None or b.expires_at is None:
        return a.expires_at is None and b.expires_at is not None
    return a.expires_at > b.expires_at


def holding(pins: Sequence[Pin], run: str, checkpoint: str, now: float) -> Pin | None:
    """The pin that keeps this checkpoint at `now`, if any."""
    found = [p for p in pins if p.run == run and p.checkpoint == checkpoint and p.holds_at(now)]
    return effective(found)[0] if found else None


def next_lapse(pins: Sequence[Pin], now: float) -> float | None:
    """When the next lease that holds at `now` lapses."""
    return min((p.expires_at for p in pins if p.expires_at is not None and p.expires_at > now), default=None)


# ---------------------------------------------------------------------------------------------------- writing
def _encode(pins_file: PinsFile) -> bytes:
    entries = [
        {
            "id": s.id,
            "run": s.pin.run,
            "checkpoint": s.pin.checkpoint,
            "pinned_at": s.pin.pinned_at,
            "note": s.pin.note,
            "expires_at": s.pin.expires_at,
        }
        for s in pins_file.pins
    ]
    return (json.dumps({"format": FORMAT, "root": pins_file.root, "pins": entries}, indent=1) + "\n").encode()


def _write_at(dir_fd: int, pins_file: PinsFile, shown: Path) -> None:
    """Replace the pins file durably: a temporary file, fsynced, renamed over it, the directory fsynced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(PINS_TEMP, dir_fd=dir_fd)
        fd = os.open(PINS_TEMP, flags, 0o644, dir_fd=dir_fd)
        try:
            os.write(fd, _encode(pins_file))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(PINS_TEMP, PINS_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(PINS_TEMP, dir_fd=dir_fd)
        raise PinsError(f"cannot write the pins file {shown / PINS_NAME}: {e.strerror or e}") from None


LOCK_WAIT = 10.0  # seconds; the lock is held for milliseconds, so longer means a holder stopped (SIGSTOP, a hung fs)


@contextlib.contextmanager
def locked(dir_fd: int, shown: Path, wait: float = LOCK_WAIT) -> Iterator[None]:
    """The pins lock of the state directory open as `dir_fd`, held for the block; PinsError when another process
    holds it for longer than `wait` seconds (nothing is removed or pinned then)."""
    try:
        fd = os.open(PINS_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    except OSError as e:
        raise PinsError(f"cannot open the pins lock {shown / PINS_LOCK_NAME}: {e.strerror or e}") from None
    try:
        _take(fd, shown, wait)
        yield
    finally:
        os.close(fd)  # closing the descriptor lets go of the flock


def _take(fd: int, shown: Path, wait: float) -> None:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise PinsError(
                    f"the pins lock {shown / PINS_LOCK_NAME} has been held by another process for over {wait:g} s"
                ) from None
            time.sleep(0.002)


def removal_under_way(dir_fd: int) -> dict[str, Any] | None:
    """The removal a live engine is carrying out (`run`, `checkpoint`, `pid`), if any; a marker left by a killed
    one (its flock died with it) is none. Call it under the pins lock."""
    try:
        fd = open_regular(REMOVING_NAME, dir_fd)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            data = os.pread(fd, 4096, 0)
            with contextlib.suppress(ValueError):
                found = json.loads(data.decode("utf-8", "replace"))
                if isinstance(found, dict):
                    return found
            return {}  # a removal under way, its marker not readable: say so for any checkpoint
        return None
    finally:
        os.close(fd)


def new_id() -> str:
    import secrets  # pin and lease only: prune and watch start without it (and hmac, base64)

    return secrets.token_hex(6)


def change(dir_fd: int, shown: Path, edit: Any) -> PinsFile:
    """Under the pins lock: read the pins file, `edit(PinsFile) -> PinsFile`, write it back (leases lapsed more
    than a day ago dropped). Returns what was written."""
    with locked(dir_fd, shown):
        current = _read_at(dir_fd, shown)
        updated: PinsFile = edit(current)
        now = time.time()
        fresh = tuple(s for s in updated.pins if s.pin.expires_at is None or s.pin.expires_at > now - KEEP_LAPSED)
        updated = replace(updated, pins=fresh)
        if updated != current:
            _write_at(dir_fd, updated, shown)
        return updated


# ------------------------------------------------------------------------------------------ the engine's side
@contextlib.contextmanager
def guarded_removal(dir_fd: int, shown: Path, run: str, checkpoint: str) -> Iterator[Pin | None]:
    """Around one removal: under the pins lock, the pin that now keeps the checkpoint (yielded: do not remove
    it); else the `removing` marker is taken (flock'd, naming it) before the pins lock is let go, and held until
    the block ends. PinsError when the pins cannot be read (then nothing is removed)."""
    # Emptied as it is opened: no live engine holds it (one instance per state directory, and this one let go
    # of it at the end of its last removal), and what a killed one left in it is not to be read as this one's.
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        marker = os.open(REMOVING_NAME, flags, 0o644, dir_fd=dir_fd)
    except OSError as e:
        raise PinsError(f"cannot open {shown / REMOVING_NAME}: {e.strerror or e}") from None
    taken = False
    try:
        with locked(dir_fd, shown):
            pin = holding([s.pin for s in _read_at(dir_fd, shown).pins], run, checkpoint, time.time())
            if pin is None:
                fcntl.flock(marker, fcntl.LOCK_EX)
                taken = True
                say = {"run": run, "checkpoint": checkpoint, "pid": os.getpid(), "since": time.time()}
                with contextlib.suppress(OSError):  # the flock is the marker; its words are for messages
                    os.pwrite(marker, json.dumps(say).encode(), 0)
        yield pin
    finally:
        if taken:
            with contextlib.suppress(OSError):
                os.ftruncate(marker, 0)
        os.close(marker)  # lets go of the flock
