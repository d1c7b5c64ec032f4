"""The observer supervisor: which watchdog observer watches the root, and falling back to polling.

inotify is used where it works; polling where it cannot (`--poll`, inotify unavailable, its watch or
instance limit reached, an observer that died). The supervisor also notices when the root itself is gone,
leads somewhere else, or was made again, and says so to the daemon, which decides what to do.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from functools import partial
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, EventQueue, ObservedWatch
from watchdog.observers.polling import PollingEmitter

from ckptkeeper.health import WatchMode
from ckptkeeper.inbox import Hints, Inbox
from ckptkeeper.paths import identity
from ckptkeeper.scan import checkpoint_step, never_descended

log = logging.getLogger("ckptkeeper")

# What can change a decision: entries appearing, moving or going, and files finished (close after write).
# Not opens, reads or each write() of a large file: ckptkeeper's own reads would otherwise wake it, and
# a 10 GB optimizer.pt being written would send an event per chunk.
WATCHED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileMovedEvent,
    DirMovedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileClosedEvent,
]
# The poller does not look inside checkpoints: a change there shows as the checkpoint directory modified.
POLLED_EVENTS: list[type[FileSystemEvent]] = [*WATCHED_EVENTS, FileModifiedEvent, DirModifiedEvent]


class _OverflowAlarm(logging.Handler):
    """watchdog logs a warning when the kernel's inotify queue overflows; events were lost then.

    It also only logs (and otherwise swallows) a directory it could not watch once watching has started:
    the inotify watch limit reached by a directory created later. That leaves the directory, and every
    run below it, unwatched. `limit_reached` keeps the first such error for the daemon's worker loop, which
    then falls back to polling (`ObserverSupervisor.keep_watching`); this runs on watchdog's thread."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.on_overflow = on_overflow
        self.limit_reached: OSError | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if (error := _inotify_limit_error(record)) is not None:
            if self.limit_reached is None:
                self.limit_reached = error
        elif "overflow" in record.getMessage().lower():
            self.on_overflow()


def _inotify_limit_error(record: logging.LogRecord) -> OSError | None:
    """The inotify limit error (ENOSPC: watches, EMFILE: instances) a watchdog log record carries. watchdog
    passes the error itself (`logger.warning("Unable to watch %r: %s", path, error)`, or as exc_info when
    it cannot re-add the root's watch after an overflow): its errno is looked for, not the wording."""
    carried = list(record.args) if isinstance(record.args, tuple) else []
    if record.exc_info is not None:
        carried.append(record.exc_info[1])
    for item in carried:
        if isinstance(item, OSError) and item.errno in (errno.ENOSPC, errno.EMFILE):
            return item
    return None


class RootChange(Enum):
    GONE = "gone"
    LEADS_ELSEWHERE = "leads elsewhere"
    RECREATED = "recreated"


class ObserverSupervisor:
    """The watchdog observer of one root, its mode, the fallback to polling, and the root's identity.

    Owned by the daemon's main loop: every method runs there. `mode` and `alive()` are also read by the
    main loop's health snapshot (never by the HTTP thread). The overflow alarm it installs runs on watchdog's
    thread and only sets a flag or asks the inbox for a full rescan."""

    def __init__(self, root: Path, inbox: Inbox, poll: float | None) -> None:
        self.root = root
        self.inbox = inbox
        self.poll = poll  # seconds between polls; None: inotify (falling back to polling every 1 s)
        self.observer: BaseObserver | None = None
        self.mode = WatchMode.NONE
        self.root_identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the root being watched
        self.alarm = _OverflowAlarm(inbox.request_full_rescan)
        self.on_mode: Callable[[WatchMode, str | None], None] = lambda mode, note: None  # for the metrics

    def install(self) -> None:
        logging.getLogger("watchdog").addHandler(self.alarm)

    def uninstall(self) -> None:
        logging.getLogger("watchdog").removeHandler(self.alarm)

    def start(self) -> None:
        """Watch the root as it is now (its identity is remembered): inotify if it can, else polling."""
        self.root_identity = identity(self.root)
        if self.poll is None and self._start_inotify():
            return
        interval = self.poll or 1.0
        listdir = _polling_listdir(self.root)
        emitter = partial(_QuickPollingEmitter, stat=_polled_lstat, listdir=listdir)
        polling = BaseObserver(emitter, timeout=interval)  # type: ignore[arg-type]  # as PollingObserverVFS
        polling.schedule(Hints(self.inbox), os.fspath(self.root), recursive=True, event_filter=POLLED_EVENTS)
        polling.start()
        self._set_mode(polling, WatchMode.POLLING)
        limit = self.alarm.limit_reached
        self.on_mode(self.mode, None if limit is None else f"polling: {_InotifyLimit.of(limit).short}")
        log.debug("watching %s by polling every %g s", self.root, interval)

    def _start_inotify(self) -> bool:
        observer: BaseObserver | None = None
        try:
            observer = Observer()  # watchdog opens the inotify instance here: it can fail (EMFILE) already
            observer.schedule(Hints(self.inbox), os.fspath(self.root), recursive=True, event_filter=WATCHED_EVENTS)
            observer.start()
        except OSError as e:
            stop_observer(observer)
            if e.errno in (errno.ENOSPC, errno.EMFILE):
                self._give_up_inotify(e)  # watchdog adds every watch below the root before start() returns
            else:
                log.warning("cannot watch %s with inotify (%s); falling back to polling every 1 s", self.root, e)
            return False
        self._set_mode(observer, WatchMode.INOTIFY)
        self.on_mode(self.mode, None)
        log.debug("watching %s with inotify", self.root)
        return True

    def _set_mode(self, observer: BaseObserver | None, mode: WatchMode) -> None:
        self.observer, self.mode = observer, mode

    def stop(self) -> None:
        stop_observer(self.observer)
        self._set_mode(None, WatchMode.NONE)
        self.on_mode(self.mode, None)

    def alive(self) -> bool:
        observer = self.observer
        if observer is None or not observer.is_alive():
            return False
        return all(emitter.is_alive() for emitter in observer.emitters)

    def _give_up_inotify(self, error: OSError) -> None:
        """inotify ran out of watches (or instances): say so once, loudly, and poll the whole root from now on.
        Never back to inotify in this process: the limit would be reached again, and the runs below the
        directories it could not watch would be blind again until the next full rescan."""
        if self.alarm.limit_reached is None:
            self.alarm.limit_reached = error
        limit = _InotifyLimit.of(error)
        self.poll = self.poll or 1.0
        log.warning(
            "cannot watch every directory below %s with inotify: %s; falling back to polling the whole root every "
            "%g s for as long as this process runs. To use inotify, raise the limit (sysctl -w %s=%d, and in "
            "/etc/sysctl.d/ to keep it) and restart ckptkeeper",
            self.root,
            limit.text,
            self.poll,
            limit.sysctl,
            limit.suggested,
        )

    def root_change(self, lock_deleted: bool) -> tuple[RootChange, str] | None:
        """What happened to the root since watching started, if anything, and how to say it."""
        if not self.root.is_dir():
            return RootChange.GONE, f"the root {self.root} is gone; waiting for it to come back"
        real = os.path.realpath(self.root)
        if real != os.fspath(self.root):
            # A directory on the root's path was swapped for a link (on a shared volume, by anyone who can
            # rename it): the path now leads to someone else's files. Never follow; wait for it to lead back.
            return RootChange.LEADS_ELSEWHERE, (
                f"the root {self.root} now leads to {real} (a link on its path changed): not following it; "
                "waiting for it to lead back"
            )
        if identity(self.root) != self.root_identity or lock_deleted:
            # Deleted and created again between two checks: the watcher still watches the deleted directory.
            # (A held lock deleted with it shows this even where a new directory reused the inode number.)
            return RootChange.RECREATED, f"the root {self.root} was deleted and created again; watching the new one"
        return None

    def root_is_back(self) -> bool:
        return self.root.is_dir() and os.path.realpath(self.root) == os.fspath(self.root)

    def keep_watching(self) -> None:
        """Replace a watcher that cannot see everything (inotify's limit reached since start) or that died, by
        polling, and ask for a full rescan of what was written meanwhile where it could not see."""
        if self.alarm.limit_reached is not None and self.mode is WatchMode.INOTIFY:
            stop_observer(self.observer)
            self._give_up_inotify(self.alarm.limit_reached)
        elif not self.alive():
            log.warning("the %s file watcher stopped unexpectedly; restarting it (polling)", self.mode)
            stop_observer(self.observer)
            self.poll = self.poll or 1.0  # a watcher that died once may die again: polling cannot run out
        else:
            return
        self.start()
        self.inbox.request_full_rescan()


def stop_observer(observer: BaseObserver | None) -> None:
    if observer is None:
        return
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=2)
    except (RuntimeError, OSError):
        pass


def _polling_listdir(root: Path) -> Callable[[str | None], Iterator[os.DirEntry[str]]]:
    """What the poller lists: not hidden entries (the state directory, trash) and nothing inside a
    checkpoint. A checkpoint's own mtime and ctime, seen in its run's listing, change whenever an entry
    in it is created, removed or renamed, so its files need not be stat'ed at every poll (that was 90 % of
    the polling cost). A file rewritten in place inside a checkpoint is seen by the full rescans."""
    top = os.fspath(root)

    def listdir(path: str | None) -> Iterator[os.DirEntry[str]]:
        if path is None or (path != top and checkpoint_step(os.path.basename(path)) is not None):
            return iter(())
        with os.scandir(path) as it:
            return iter([e for e in it if not never_descended(e.name)])

    return listdir


class _PolledStat:
    """What watchdog's poller compares of an entry between two polls (device, inode, type, mtime, size), and
    a birth time of 0. Given no birth time, watchdog (7.1) asks statx(2) for one, per entry and per poll,
    through ctypes: 40 % of the poller's CPU over 5,000 checkpoints. It uses it only to tell an inode number
    reused at the same path; for ckptkeeper an event is a hint naming a run, and such a replacement also
    changes the run directory's own mtime (an entry removed and one made), which the poller sees."""

    __slots__ = ("st_dev", "st_ino", "st_mode", "st_mtime", "st_size")
    st_birthtime_ns = 0

    def __init__(self, st: os.stat_result) -> None:
        self.st_dev, self.st_ino, self.st_mode = st.st_dev, st.st_ino, st.st_mode
        self.st_mtime, self.st_size = st.st_mtime, st.st_size


def _polled_lstat(path: str) -> os.stat_result:
    return _PolledStat(os.lstat(path))  # type: ignore[return-value]  # duck-typed as watchdog reads it


Keys = dict[str, tuple[int, int, int, int, int]]


class _QuickPollingEmitter(PollingEmitter):
    """watchdog's poller, which first asks whether anything changed at all.

    At each poll it walks what the poller watches (the same listdir, no link followed) into a plain map of
    path -> (inode, device, mode, mtime_ns, size): every field watchdog's snapshot diff compares, mtime more
    finely. Only when that map differs from the one of the last compared walk does it take watchdog's own
    snapshot and diff it with the previous one, queueing the very events watchdog would. An idle tree then
    costs one lstat per entry and one comparison of two maps in C, not watchdog's per-entry Python (its
    snapshot and diff: 0.044 CPU s per poll over 5,000 checkpoints, against about 0.015).

    Nothing is missed that watchdog would see: each walk of keys comes before the snapshot it is compared
    for, so a change made after a walk differs from that walk's map at a later poll, and then a snapshot
    taken after the change is diffed with one taken before it. Any error in the walk of keys leaves the poll
    to watchdog's own code, which handles it (a root gone, a filesystem that fails for a while)."""

    def __init__(
        self,
        event_queue: EventQueue,
        watch: ObservedWatch,
        *,
        listdir: Callable[[str | None], Iterator[os.DirEntry[str]]],
        **kwargs: object,
    ) -> None:
        super().__init__(event_queue, watch, listdir=listdir, **kwargs)  # type: ignore[arg-type]
        self._listdir = listdir
        self._keys: Keys | None = None

    def on_thread_start(self) -> None:
        self._keys = self._take_keys()
        super().on_thread_start()

    def queue_events(self, timeout: float) -> None:
        if self.stopped_event.wait(timeout):
            return
        keys = self._take_keys()
        if keys is not None and keys == self._keys:
            return
        self._keys = keys
        super().queue_events(0)  # watchdog's snapshot and diff, taken after the walk of keys

    def _take_keys(self) -> Keys | None:
        """The map of the watched tree now; None when it cannot be walked cleanly (watchdog's code decides)."""
        try:
            return _tree_keys(self.watch.path, self._listdir)
        except OSError:
            return None


def _tree_keys(top: str, listdir: Callable[[str | None], Iterator[os.DirEntry[str]]]) -> Keys:
    st = os.lstat(top)
    keys: Keys = {top: (st.st_ino, st.st_dev, st.st_mode, st.st_mtime_ns, st.st_size)}
    pending = [top]
    while pending:
        for entry in listdir(pending.pop()):
            st = entry.stat(follow_symlinks=False)
            keys[entry.path] = (st.st_ino, st.st_dev, st.st_mode, st.st_mtime_ns, st.st_size)
            if stat.S_ISDIR(st.st_mode):
                pending.append(entry.path)
    return keys


@dataclass(frozen=True)
class _InotifyLimit:
    """The per-user inotify limit an error says was reached, named by the sysctl that sets it."""

    kind: str  # "watch" or "instance"
    sysctl: str  # the sysctl to raise: the one that binds
    text: str  # the limit and its value now, for the log
    suggested: int

    @property
    def short(self) -> str:
        return f"the inotify {self.kind} limit {self.sysctl} is reached"

    @classmethod
    def of(cls, error: OSError) -> _InotifyLimit:
        kind, system, namespace, floor = (
            ("instance", "fs.inotify.max_user_instances", "user.max_inotify_instances", 1024)
            if error.errno == errno.EMFILE
            else ("watch", "fs.inotify.max_user_watches", "user.max_inotify_watches", 524288)
        )
        system_value, namespace_value = _sysctl(system), _sysctl(namespace)
        text = f"the inotify {kind} limit is reached ({system} = {_shown_number(system_value)}, per user"
        binding, value = system, system_value
        # In a user namespace of its own (rootless containers) a lower limit of the namespace's may bind.
        if namespace_value is not None and (system_value is None or namespace_value < system_value):
            text += f"; this user namespace's {namespace} = {namespace_value}"
            binding, value = namespace, namespace_value
        return cls(kind, binding, text + ")", max(2 * (value or 0), floor))


def _sysctl(name: str) -> int | None:
    try:
        return int(Path("/proc/sys", *name.split(".")).read_text())
    except (OSError, ValueError):
        return None


def _shown_number(value: int | None) -> str:
    return "unknown" if value is None else str(value)
