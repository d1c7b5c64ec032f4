"""Find run directories below a root and read their checkpoints from disk. Reads only; never writes.

Symlinks are never followed: a `checkpoint-N` that is a link is not a checkpoint, a linked directory is
not descended into, and sizes count a link as the link itself.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ckptkeeper import weights
from ckptkeeper.integrity import INDEX_SUFFIX, index_problem, open_safetensors_problem
from ckptkeeper.metric_specs import MetricSpec
from ckptkeeper.model import Checkpoint, Run, Signature, root_name
from ckptkeeper.paths import fd_path, kernel_sets_ctimes
from ckptkeeper.readahead import Readahead
from ckptkeeper.regular import NotRegular, open_regular
from ckptkeeper.trainer_state import TRAINER_STATE, TrainerStateError, parse_trainer_state

# ASCII digits only, no leading zero: `checkpoint-7` is the Trainer's name for step 7, and two directories
# can never claim the same step (`checkpoint-007` is left alone, like any other non-checkpoint).
CHECKPOINT_NAME = re.compile(r"checkpoint-(0|[1-9][0-9]*)")
INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"
TEMP_PREFIX = ".tmp"  # the safetensors writer's in-flight file
DEFAULT_MAX_DEPTH = 4
VANISHED_WHILE_READING = "vanished while reading"  # the incomplete reason of a checkpoint gone mid-read


@dataclass(frozen=True)
class ScanOptions:
    """How runs and checkpoints are found: how deep below the root, and how long a checkpoint must have
    been unchanged to count as complete (`--settle`)."""

    max_depth: int = DEFAULT_MAX_DEPTH
    settle: float = 0.0
    stale_after: float = 3600.0  # an incomplete checkpoint unchanged this long is reported (`stale.py`)
    metrics: tuple[MetricSpec, ...] = ()  # named metrics read from evaluation jobs' files (`--metric`)


# Names ckptkeeper gives what it creates among a user's runs (the state directory, a run-local trash, the
# root's lock). Underscore, not a dot: the Trainer's push_to_hub uploads output_dir ignoring only `_*` and
# `checkpoint-*`, so nothing of ckptkeeper's goes to the Hub (a `.ckptkeeper` did).
OWN_PREFIX = "_ckptkeeper"
# A Trainer's file grows ~150 bytes per logged step: a million steps logged one by one is 150 MB.
MAX_TRAINER_STATE_BYTES = 512 << 20


@functools.lru_cache(maxsize=1 << 16)  # the same names recur in every run and at every rescan
def checkpoint_step(name: str) -> int | None:
    m = CHECKPOINT_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def never_descended(name: str) -> bool:
    """Hidden entries and ckptkeeper's own are never scanned, watched or polled as runs."""
    return name.startswith((".", OWN_PREFIX))


def is_checkpoint_entry(entry: os.DirEntry[str]) -> bool:
    return checkpoint_step(entry.name) is not None and entry.is_dir(follow_symlinks=False)


@dataclass
class ScanResult:
    runs: list[Run] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def run_path(root: Path, directory: Path) -> str:
    rel = directory.relative_to(root).as_posix()
    return rel or "."


def find_run_dirs(root: Path, max_depth: int, excluded: Iterable[Path], warnings: list[str]) -> list[Path]:
    """Directories at depth <= max_depth below `root` (root is depth 0) that hold a checkpoint directly.

    Hidden directories, symlinks, checkpoint directories themselves and `excluded` paths (the state
    directory, an archive inside the root) are never descended into.
    """
    # Compared as real paths: a relative root, or a root reached through a symlink, still matches.
    skip = {os.path.realpath(p) for p in excluded}
    found: list[Path] = []
    pending: list[tuple[Path, int]] = [(root, 0)]
    while pending:
        directory, depth = pending.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as error:
            warnings.append(f"cannot list {directory}: {error.strerror or error}")
            continue
        if any(is_checkpoint_entry(entry) for entry in entries):
            found.append(directory)
        if depth >= max_depth:
            continue
        pending.extend(
            (Path(entry.path), depth + 1)
            for entry in entries
            if not never_descended(entry.name)
            and checkpoint_step(entry.name) is None
            and entry.is_dir(follow_symlinks=False)
            and os.path.realpath(entry.path) not in skip
        )
    return sorted(found)


def walk_files(
    directory: Path, top: os.stat_result | None = None, dir_fd: int | None = None
) -> tuple[list[tuple[str, os.stat_result]], list[str]]:
    """(path relative to `directory`, lstat) of the directory (`top`, where it is known) and of everything below
    it, links not followed; and the names directly inside it. With `dir_fd` (the directory, open), its own
    entries are listed and lstat'ed through it (fstatat, no path looked up again per entry)."""
    walked = [(".", top if top is not None else directory.lstat())]
    names: list[str] = []
    base = os.fspath(directory)
    pending: list[tuple[str | int, str]] = [(base if dir_fd is None else dir_fd, "")]
    while pending:
        current, prefix = pending.pop()
        with os.scandir(current) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                walked.append((prefix + e.name, st))
                if not prefix:
                    names.append(e.name)
                if stat.S_ISDIR(st.st_mode):
                    pending.append((os.path.join(base, prefix + e.name), prefix + e.name + "/"))
    return walked, names


DirKey = tuple[int, int, int, int]  # the checkpoint directory's own inode, mtime, ctime (ns) and link count


def _dir_key(st: os.stat_result) -> DirKey:
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink)


# How far a kernel's file times may lag its clock: they are taken from a clock read once per tick (1-10 ms;
# 0.1 s leaves room for a coarser one). A change within this of a look may get the very times the look saw.
TIMESTAMP_TICK = 0.1


def signature_of(walked: list[tuple[str, os.stat_result]]) -> Signature:
    """The lstat signature of one walk of a checkpoint: every entry's path, type, inode, size, mtime and ctime."""
    return tuple(
        sorted(
            (rel, stat.S_IFMT(st.st_mode), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for rel, st in walked
        )
    )


def lstat_signature(directory: Path) -> tuple[tuple[int, int], Signature]:
    """(device, inode) of `directory` and its lstat signature now: the directory and every entry below it,
    subdirectories such as DeepSpeed's `global_step*/` included, no link followed. FileNotFoundError when
    it, or a directory inside it, vanished meanwhile.

    Why an unchanged signature means unchanged contents (what lets a removal compare signatures instead of
    reading the checkpoint again): every change to a file's bytes (write, truncate), to its metadata
    (chmod, chown, a hard link made or removed) or to a directory's entries (an entry made, removed or
    renamed in or out) sets the inode's ctime to the kernel's clock, and no system call lets a writer set
    ctime (utime sets atime and mtime only, and itself moves ctime). A file replaced by another (the
    safetensors writer renames its temporary file into place) has another inode; an entry made or removed
    changes the list of paths. So the same paths with the same types, inodes, sizes, mtimes and ctimes are
    the same bytes, with one exception: a change made within the same tick of the file-time clock as the
    look that took the signature may be given the very times that look saw (on a filesystem with 1 s
    timestamps, within the same second). And it holds only where the kernel sets ctime: on FUSE (sshfs reports
    ctime = mtime) or FAT (one field for both, which utime sets) a writer can put a rewritten file's times back.
    `Checkpoint.signature_vouches` is set only where the newest change was older than the look by more than the
    timestamp step and TIMESTAMP_TICK, and every entry is on a filesystem of KERNEL_CTIME_FILESYSTEMS; elsewhere
    (a checkpoint written a moment before, file times in the future, sshfs) the caller reads the checkpoint
    again in full."""
    walked, _ = walk_files(directory)
    top = walked[0][1]
    return (top.st_dev, top.st_ino), signature_of(walked)


@dataclass(frozen=True)
class Contents:
    """What reading a checkpoint's files found: everything but the settle check, which depends on the clock."""

    problems: tuple[str, ...]
    epoch: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    best_steps: tuple[int, ...] = ()
    stopped: bool = False
    marker: weights.Marker | None = None  # a weights-only marker of ckptkeeper's, as read
    # Complete, and nothing failed to be read: what was found depends on the files alone, not on the reader (a
    # permission, an I/O error), so a memo may keep it (`scan_memo`).
    memorable: bool = False


class ContentsMemo(Protocol):
    """What a checkpoint's files said at an earlier command, by the lstat signature of its entries (`scan_memo`)."""

    def contents(self, run_dir: str, name: str, signature: Signature) -> Contents | None: ...

    def saw(self, run_dir: str, name: str, signature: Signature, contents: Contents) -> None: ...

    def holds(self, run_dir: str, name: str) -> bool: ...


@dataclass(frozen=True)
class _Seen:
    """One look at a checkpoint: its directory's key, every entry's lstat, and what its files said."""

    dir_key: DirKey
    signature: Signature
    contents: Contents
    # Complete and settled when seen: its Checkpoint, reused as it is while the directory is unchanged.
    trusted: Checkpoint | None
    # When this signature was first seen (the caller's clock): settling by observation when file times
    # cannot be trusted (they lie in the future).
    first_seen: float = 0.0
    # These entries replaced different ones seen at an earlier look: the checkpoint was seen changing, so it
    # settles no sooner than `settle` after `first_seen`, whatever its file times say (a writer's clock behind).
    seen_changing: bool = False
    # The signature could vouch for the contents when seen (`Checkpoint.signature_vouches`): a memo may keep them.
    vouches: bool = False


class ContentCache:
    """Remembers what a checkpoint's files said, keyed by the lstat of every entry (inode, size, mtime and
    ctime in ns). Any write, rename or chmod changes ctime, so an unchanged signature means unchanged
    files: a rescan of a quiet tree then opens nothing (and makes no inotify events).

    A `trusting` read goes further for a checkpoint that was complete and settled at its last look: if the
    directory itself is unchanged (no entry added, removed or renamed), it is not walked at all. A file
    rewritten in place inside it is then missed, which is why only the watch daemon's periodic rescans
    trust, and every read caused by a file event, and every tenth rescan, is a full one."""

    def __init__(self) -> None:
        self._runs: dict[str, dict[str, _Seen]] = {}  # run directory -> checkpoint name -> last look
        self.changes = 0  # counts every look that saw other entries (or could vouch where it could not), and every loss

    def get(self, run_dir: str, name: str) -> _Seen | None:
        return self._runs.get(run_dir, {}).get(name)

    def put(self, run_dir: str, name: str, seen: _Seen) -> None:
        held = self._runs.setdefault(run_dir, {})
        before = held.get(name)
        if before is None or (before.signature, before.vouches) != (seen.signature, seen.vouches):
            self.changes += 1
        held[name] = seen

    def forget_missing(self, run_dir: Path, present: set[str]) -> None:
        held = self._runs.get(os.fspath(run_dir), {})
        for name in held.keys() - present:
            del held[name]
            self.changes += 1

    def vouched(self) -> Iterator[tuple[str, str, Signature, Contents]]:
        """Every look whose signature vouched for its contents: what a memo may keep."""
        for run_dir, held in self._runs.items():
            for name, seen in held.items():
                if seen.vouches:
                    yield run_dir, name, seen.signature, seen.contents

    def __len__(self) -> int:
        return sum(len(held) for held in self._runs.values())


def _safetensors_problem(directory: Path, names: list[str], dir_fd: int | None = None) -> str | None:
    valid: set[str] = set()
    for name in sorted(n for n in names if n.endswith(".safetensors")):
        try:
            fd = open_regular(name if dir_fd is not None else directory / name, dir_fd)
        except (FileNotFoundError, NotRegular):
            continue  # only regular files are opened: a link may point outside the root
        except OSError as e:
            return f"{name}: invalid safetensors (I/O error: {e.strerror or e})"
        problem = open_safetensors_problem(fd, name)
        if problem:
            return problem
        valid.add(name)
    for name in sorted(n for n in names if n.endswith(INDEX_SUFFIX)):
        problem = index_problem(directory, directory / name, valid)
        if problem:
            return problem
    return None


def _read_trainer_state(path: Path, dir_fd: int | None = None) -> bytes:
    """The file's bytes: a regular file (a link, FIFO or device is never opened through), at most
    MAX_TRAINER_STATE_BYTES (a bigger one, even sparse, would be read into memory whole). With `dir_fd`, the
    file of that name in the directory open as `dir_fd`."""
    try:
        fd = open_regular(path.name if dir_fd is not None else path, dir_fd)
    except NotRegular:
        raise TrainerStateError(f"{TRAINER_STATE} is not a regular file") from None
    try:
        st = os.fstat(fd)
        if st.st_size > MAX_TRAINER_STATE_BYTES:
            raise TrainerStateError(
                f"{TRAINER_STATE} is larger than {MAX_TRAINER_STATE_BYTES >> 20} MiB ({st.st_size} bytes)"
            )
        return _read_up_to(fd, st.st_size, MAX_TRAINER_STATE_BYTES + 1)
    finally:
        os.close(fd)


def _read_up_to(fd: int, expected: int, limit: int) -> bytes:
    """At most `limit` bytes of `fd` to its end, read in one call for a file of the `expected` size (asking
    for `limit` bytes at once would allocate all of them: half a gigabyte per trainer_state.json)."""
    chunks: list[bytes] = []
    total, want = 0, min(expected + 1, limit)
    while total < limit and (chunk := os.read(fd, min(want, limit - total))):
        chunks.append(chunk)
        total += len(chunk)
        want = 1 << 20
    return b"".join(chunks)


def _read_contents(
    directory: Path, step: int, names: list[str], name: str | None = None, dir_fd: int | None = None
) -> Contents:
    """What the files of the checkpoint directory `directory` (named `name`, by default its own name) say; with
    `dir_fd`, the same directory open, through which its files are opened."""
    problems: list[str] = []
    if INCOMPLETE_MARKER in names:
        problems.append(f"{INCOMPLETE_MARKER} present (save in progress)")
    temps = sorted(n for n in names if n.startswith(TEMP_PREFIX))
    if temps:
        problems.append(f"temporary file {temps[0]} present (write in progress)")

    epoch = None
    metrics: dict[str, float] = {}
    best_steps: tuple[int, ...] = ()
    stopped = False
    state_path = directory / TRAINER_STATE
    if TRAINER_STATE not in names:
        problems.append(f"no {TRAINER_STATE}")
    else:
        try:
            state = parse_trainer_state(_read_trainer_state(state_path, dir_fd))
        except TrainerStateError as e:
            problems.append(str(e))
        except FileNotFoundError:  # removed since the listing, e.g. by the Trainer's own rotation
            problems.append(f"no {TRAINER_STATE}")
        except OSError as e:
            problems.append(f"cannot read {TRAINER_STATE}: {e.strerror or e}")
        else:
            epoch, best_steps, stopped = state.epoch, state.best_steps, state.training_stopped
            metrics = state.metrics_at(step)
            if state.global_step is not None and state.global_step != step:
                # Read exactly however long (up to 4300 digits): a reason line does not show thousands of them.
                said = state.global_step if abs(state.global_step) < 10**64 else "of over 64 digits"
                problems.append(f"global_step {said} in {TRAINER_STATE} does not match {name or directory.name}")
    if not problems:
        problem = _safetensors_problem(directory, names, dir_fd)
        if problem:
            problems.append(problem)
    marker, marker_read = _read_marker(directory, names)
    memorable = not problems and marker_read
    return Contents(tuple(problems), epoch, metrics, best_steps, stopped, marker, memorable)


def _read_marker(directory: Path, names: list[str]) -> tuple[weights.Marker | None, bool]:
    """The weights-only marker, read as trainer_state.json is (no link followed, never blocking on a FIFO,
    a regular file only); None when there is none of ckptkeeper's. And False where it could not be read."""
    if weights.MARKER not in names:
        return None, True
    try:
        fd = open_regular(directory / weights.MARKER)
    except NotRegular:
        return None, True
    except OSError:
        return None, False
    try:
        return weights.read_marker(os.read(fd, 1 << 16)), True
    except OSError:
        return None, False
    finally:
        os.close(fd)


# File times up to this far ahead of the clock are a writer's clock a little ahead (or this clock's step):
# settled by file times still. Further ahead, they say nothing, and settling goes by what is observed.
FUTURE_TOLERANCE = 1.0


def timestamp_granularity(stats: Iterable[os.stat_result]) -> float:
    """The coarsest step the file times of these entries may have, judged from the times themselves, entry by
    entry (a checkpoint may span filesystems: a tmpfs mounted inside one on ext3): 0 where every entry has a
    fraction of a second (nanosecond timestamps), else 1 s for the entries whose times are all whole seconds
    (ext4 with 128-byte inodes, ext3, some NFS and Lustre setups), 2 s where those are all even too (FAT). A
    time that is whole by chance costs a second of waiting, never an early settle."""
    whole = [
        (st.st_mtime_ns, st.st_ctime_ns)
        for st in stats
        if st.st_mtime_ns % 1_000_000_000 == 0 and st.st_ctime_ns % 1_000_000_000 == 0
    ]
    if not whole:
        return 0.0
    return 2.0 if all(m % 2_000_000_000 == 0 and c % 2_000_000_000 == 0 for m, c in whole) else 1.0


def _settle_check(
    stats: list[os.stat_result],
    newest_change: float,
    now: float | None,
    settle: float,
    first_seen: float | None,
    in_future: bool,
    seen_changing: bool = False,
) -> tuple[str | None, float | None]:
    """Why the checkpoint has not settled yet and when it would, or (None, None).

    A file time says a change happened at or after it, within the filesystem's granularity: a time
    rounded down to the second may be up to a second older than the change. A time in the future says
    nothing (a writer whose clock is ahead): then what this process itself saw unchanged counts, from
    the first look at these exact entries (`first_seen`); a one-shot command has only its one look. And a
    checkpoint this process saw change (`seen_changing`) has changed at `first_seen` at the latest, whatever
    its file times say (a writer whose clock is behind)."""
    if now is None or settle <= 0:
        return None, None
    granularity = timestamp_granularity(stats)
    if in_future:
        since = now if first_seen is None else first_seen
        settles_at = since + settle + granularity
        if now >= settles_at:
            return None, None
        ahead = newest_change - now
        return (
            f"file times {ahead:.0f} s in the future (a clock ahead?): waiting until seen unchanged for "
            f"{settle + granularity:g} s",
            settles_at,
        )
    settles_at = newest_change + settle + granularity
    coarse = f" + {granularity:g} s timestamp granularity" if granularity else ""
    if seen_changing and first_seen is not None and first_seen + settle + granularity > settles_at:
        settles_at = first_seen + settle + granularity
        if now < settles_at:
            return f"seen changing {max(now - first_seen, 0):.1f} s ago (settle {settle:g} s{coarse})", settles_at
    if now >= settles_at:
        return None, None
    return f"changed {max(now - newest_change, 0):.1f} s ago (settle {settle:g} s{coarse})", settles_at


def read_checkpoint(
    directory: Path,
    step: int,
    now: float | None = None,
    settle: float = 0.0,
    cache: ContentCache | None = None,
    evaluations: frozenset[str] = frozenset(),
    memo: ContentsMemo | None = None,
) -> Checkpoint:
    """Judge one checkpoint directory. `now` and `settle` apply the watch's "unchanged for" check; with a
    `cache`, files whose lstat has not changed since the last look are not read again; with a `memo`, the
    same across commands (what it is told holds only signatures that vouch). `evaluations`: files an
    evaluation job puts in a checkpoint (`--metric file:PATH`), which are no write of the training run."""
    opened = _open_checkpoint(directory, step, now, cache, memo)
    if isinstance(opened, Checkpoint):
        return opened
    return _finish(opened, opened.look.contents, now, settle, cache, evaluations, memo)


@dataclass(frozen=True)
class _Open:
    """A checkpoint directory open as `dir_fd` (reached as `here`) and walked: what its files said is known from
    an earlier look (`look.contents`) or still to be read through `dir_fd` (None). `_finish` closes `dir_fd`."""

    name: str
    step: int
    run_dir: str
    dir_fd: int
    here: Path
    names: list[str]
    look: _Look


def _open_checkpoint(
    directory: Path, step: int, now: float | None, cache: ContentCache | None, memo: ContentsMemo | None
) -> _Open | Checkpoint:
    """Open and walk one checkpoint directory (a Checkpoint where it cannot be: gone, unreadable)."""
    name = directory.name
    run_dir = os.fspath(directory.parent)
    held = cache.get(run_dir, name) if cache is not None else None
    looked_at = time.time()
    try:
        # Walked and read through one descriptor: the signature and the contents are of the very same directory,
        # even if its path leads elsewhere in between (a run directory renamed away and back).
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return Checkpoint(name, step, complete=False, incomplete_reason=VANISHED_WHILE_READING)
    except OSError as e:
        return Checkpoint(name, step, complete=False, incomplete_reason=f"cannot read: {e.strerror or e}")
    try:
        here = Path(fd_path(dir_fd, directory))
        walked, names = walk_files(here, os.fstat(dir_fd), dir_fd)
        remembered = memo if held is None else None  # only for a first look: the cache knows better after it
        look = _look_at(name, walked, held, now, looked_at, (run_dir, remembered))
    except FileNotFoundError:
        os.close(dir_fd)
        return Checkpoint(name, step, complete=False, incomplete_reason=VANISHED_WHILE_READING)
    except OSError as e:
        os.close(dir_fd)
        return Checkpoint(name, step, complete=False, incomplete_reason=f"cannot read: {e.strerror or e}")
    except BaseException:
        os.close(dir_fd)
        raise
    return _Open(name, step, run_dir, dir_fd, here, names, look)


def _finish(
    opened: _Open,
    contents: Contents | None,
    now: float | None,
    settle: float,
    cache: ContentCache | None,
    evaluations: frozenset[str],
    memo: ContentsMemo | None,
) -> Checkpoint:
    """The Checkpoint of an open checkpoint directory, given what its files said (read here when None); closes it."""
    name, step, run_dir, look = opened.name, opened.step, opened.run_dir, opened.look
    try:
        if contents is None:
            contents = _read_contents(opened.here, step, opened.names, name, opened.dir_fd)
    except FileNotFoundError:
        return Checkpoint(name, step, complete=False, incomplete_reason=VANISHED_WHILE_READING)
    except OSError as e:
        return Checkpoint(name, step, complete=False, incomplete_reason=f"cannot read: {e.strerror or e}")
    finally:
        os.close(opened.dir_fd)
    checkpoint = _judge(name, step, look, contents, now, settle, evaluations)
    if memo is not None and checkpoint.signature_vouches and contents.memorable:
        memo.saw(run_dir, name, look.signature, contents)
    if cache is not None:
        trusted = checkpoint if checkpoint.complete else None
        seen_at = look.first_seen if look.first_seen is not None else 0.0
        seen = _Seen(
            _dir_key(look.walked[0][1]), look.signature, contents, trusted, seen_at, look.seen_changing,
            checkpoint.signature_vouches and contents.memorable,
        )  # fmt: skip
        cache.put(run_dir, name, seen)
    return checkpoint


@dataclass(frozen=True)
class _Look:
    """One walk of a checkpoint directory: every entry's lstat, and what its files said (from the last look
    when the signature is unchanged)."""

    walked: list[tuple[str, os.stat_result]]
    signature: Signature
    contents: Contents | None  # None: to be read (a first look at these entries)
    first_seen: float | None  # when these exact entries were first seen (the caller's clock)
    seen_changing: bool  # they replaced different ones seen at an earlier look
    looked_at: float  # time.time() just before the walk


def _look_at(
    name: str,
    walked: list[tuple[str, os.stat_result]],
    held: _Seen | None,
    now: float | None,
    looked_at: float,
    memo: tuple[str, ContentsMemo | None] = ("", None),
) -> _Look:
    """The look at these entries; its contents are those the last look (`held`) or an earlier command (`memo`:
    the run directory and what it was told) saw for exactly these entries, else None: the files are to be read."""
    signature = signature_of(walked)
    if held is not None and held.signature == signature:
        return _Look(walked, signature, held.contents, held.first_seen, held.seen_changing, looked_at)
    run_dir, remembered = memo
    contents = remembered.contents(run_dir, name, signature) if remembered is not None else None
    return _Look(walked, signature, contents, now, held is not None, looked_at)


def _judge(
    name: str, step: int, look: _Look, contents: Contents, now: float | None, settle: float, evaluations: frozenset[str]
) -> Checkpoint:
    """The Checkpoint of one look, given what its files said: their problems, or else whether it has settled."""
    walked = look.walked
    stats = [st for _, st in walked]
    newest_change = max(max(st.st_mtime, st.st_ctime) for st in stats)
    in_future = now is not None and newest_change > now + FUTURE_TOLERANCE
    settle_problem, settles_at = _settle_check(
        stats, newest_change, now, settle, look.first_seen, in_future, look.seen_changing
    )
    files = [st for st in stats[1:] if not stat.S_ISDIR(st.st_mode)]
    # (ckptkeeper's own marker file is no save in progress, even empty: a kill while it was written)
    empty = sorted(
        rel for rel, st in walked[1:] if stat.S_ISREG(st.st_mode) and st.st_size == 0 and rel not in _OWN_FILES
    )
    # With several ranks, each writes its own rng_state_<rank>.pth with no barrier before rank 0 writes
    # trainer_state.json: an empty file is a save still in progress, whatever the rest says.
    content_problems = list(contents.problems) or ([f"{empty[0]} is empty (a save in progress?)"] if empty else [])
    problems = [*content_problems, *([settle_problem] if settle_problem else [])]
    parts = _parts(walked)
    return Checkpoint(
        name=name,
        step=step,
        complete=not problems,
        incomplete_reason="; ".join(problems) or None,
        epoch=contents.epoch,
        metrics=dict(contents.metrics),
        size_bytes=sum(st.st_size for st in files),
        trainer_best_steps=contents.best_steps,
        training_stopped=contents.stopped,
        last_change=newest_change,
        written_at=_written_at(walked, evaluations),
        state_written_at=next((st.st_mtime for rel, st in walked if rel == TRAINER_STATE), None),
        signature=look.signature,
        signature_vouches=_vouches(stats, newest_change, look.looked_at),
        times_in_future=in_future,
        settles_at=settles_at if settle_problem and not content_problems else None,
        identity=(stats[0].st_dev, stats[0].st_ino),
        resume_state=parts.resume_state,
        resume_bytes=weights.resume_bytes(parts, _regular_sizes(walked)),
        weights_outside=parts.weights_outside,
        weights_only=parts.marked,
        times_to_restore=contents.marker is not None and not contents.marker.complete,
    )


_OWN_FILES = (weights.MARKER, weights.MARKER_TEMP)


def _vouches(stats: list[os.stat_result], newest_change: float, looked_at: float) -> bool:
    """The signature taken at `looked_at` would show any later change (see `lstat_signature`): the change is
    older than the timestamp step, and every entry is on a filesystem whose kernel sets ctime from this machine's
    clock (not FUSE, whose ctime is what the server says, or FAT, where utime sets it too)."""
    if newest_change >= looked_at - timestamp_granularity(stats) - TIMESTAMP_TICK:
        return False
    return kernel_sets_ctimes({st.st_dev for st in stats})


def _written_at(walked: list[tuple[str, os.stat_result]], evaluations: frozenset[str] = frozenset()) -> float:
    """When the writer last wrote a file here: ckptkeeper's own marker (written when it slims a checkpoint,
    perhaps long after) does not count, or a slimmed milestone would look like the newest written; nor does an
    evaluation's results file copied in later (`--metric file:PATH`), or the checkpoint an evaluation job
    finished last would look like the resume point of a directory that mixes runs."""
    skipped = {*_OWN_FILES, *evaluations}
    times = [st.st_mtime for rel, st in walked[1:] if not stat.S_ISDIR(st.st_mode) and rel not in skipped]
    return max(times, default=walked[0][1].st_mtime)


def _regular_sizes(walked: list[tuple[str, os.stat_result]]) -> list[tuple[str, int]]:
    return [(rel, st.st_size) for rel, st in walked[1:] if stat.S_ISREG(st.st_mode)]


def _parts(walked: list[tuple[str, os.stat_result]]) -> weights.Parts:
    top = [(rel, st) for rel, st in walked[1:] if "/" not in rel]
    marker_is_file = any(rel == weights.MARKER and stat.S_ISREG(st.st_mode) for rel, st in top)
    dirs = (rel for rel, st in top if stat.S_ISDIR(st.st_mode))
    return weights.split((rel for rel, _ in top), dirs, marker_is_file)


def read_run(
    root: Path,
    directory: Path,
    now: float | None = None,
    settle: float = 0.0,
    cache: ContentCache | None = None,
    trusting: bool = False,
    evaluations: frozenset[str] = frozenset(),
    memo: ContentsMemo | None = None,
) -> Run:
    checkpoints = []
    try:
        with os.scandir(directory) as it:
            entries = [(e, step) for e in it if (step := checkpoint_step(e.name)) is not None]
    except (FileNotFoundError, NotADirectoryError):
        entries = []
    entries = [(e, step) for e, step in entries if e.is_dir(follow_symlinks=False)]
    run_dir = os.fspath(directory)
    if cache is not None:
        cache.forget_missing(directory, {e.name for e, _ in entries})
    ahead = _readahead(run_dir, [e for e, _ in entries], cache, memo)
    for index, (e, step) in enumerate(entries):
        if ahead is not None:
            ahead.reading(index)
        held = cache.get(run_dir, e.name) if cache is not None and trusting else None
        if held is not None and held.trusted is not None:
            try:
                if _dir_key(e.stat(follow_symlinks=False)) == held.dir_key:
                    checkpoints.append(held.trusted)  # the fast path of a daemon's periodic rescan
                    continue
            except OSError:
                pass  # gone or unreadable: read_checkpoint says which
        # Not trusted (or changed): every entry's lstat, and the files read again only if one differs.
        checkpoints.append(read_checkpoint(Path(e.path), step, now, settle, cache, evaluations, memo))
    checkpoints.sort(key=lambda c: c.step)
    path = run_path(root, directory)
    return Run(path, tuple(checkpoints), root_name(root) if path == "." else path)


def _readahead(
    run_dir: str, entries: list[os.DirEntry[str]], cache: ContentCache | None, memo: ContentsMemo | None
) -> Readahead | None:
    """Read-ahead hints for a one-shot command's scan (a daemon's cache knows most checkpoints, and its own
    observer would see the opens), for the checkpoints the memo does not know."""
    if cache is not None or len(entries) < 2:
        return None
    return Readahead([None if memo is not None and memo.holds(run_dir, e.name) else e.path for e in entries])


def scan_root(
    root: Path,
    max_depth: int = DEFAULT_MAX_DEPTH,
    excluded: Iterable[Path] = (),
    now: float | None = None,
    settle: float = 0.0,
) -> ScanResult:
    result = ScanResult()
    for directory in find_run_dirs(root, max_depth, excluded, result.warnings):
        result.runs.append(read_run(root, directory, now, settle))
    return result
