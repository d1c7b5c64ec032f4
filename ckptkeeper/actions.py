"""Removing checkpoints: the only module that deletes or moves anything.

Every removal starts with one atomic rename of the whole checkpoint out of its run directory, so a crash
at any moment leaves the checkpoint either whole under its name or gone from it; what reached the trash is
finished on the next start.
"""

from __future__ import annotations

import errno
import filecmp
import os
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ckptkeeper.integrity import safetensors_problem
from ckptkeeper.scan import checkpoint_step
from ckptkeeper.state import StateDir

RUN_TRASH_NAME = "_ckptkeeper-trash"  # used only when the state directory is on another filesystem
ARCHIVE_TEMP_PREFIX = ".ckptkeeper-tmp-"
FSYNC_THREADS = 32  # concurrent fsyncs when an archive copy is made durable (see _fsync_tree)


class ActionError(RuntimeError):
    """An action could not be carried out; the checkpoint is still whole under its name, except when removing
    it failed inside the trash: then it has left its name and is finished on the next start."""


class Vanished(ActionError):
    """The checkpoint disappeared before ckptkeeper touched it (e.g. the Trainer's own rotation)."""


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def removal_guard(root: Path, checkpoint: Path) -> str | None:
    """Why `checkpoint` must not be removed, or None. This is the last check before any removal.

    It refuses when:
    - the name is not `checkpoint-<digits>` (not a checkpoint: never counted, moved or deleted);
    - the path is a symlink, or not a directory (links are never followed, files never removed);
    - the resolved path leaves the root (nothing outside the root is ever touched);
    - its parent, resolved, is not where the path says (a symlinked run directory or root component);
    - a filesystem is mounted somewhere inside it (deleting would empty that filesystem too).
    What a rule, a protection or an unfinished write needs is settled by the planner and re-checked by
    the caller just before this; this guard is about what a path is, not about what it holds.
    """
    if checkpoint_step(checkpoint.name) is None:
        return f"{checkpoint.name} is not named checkpoint-<step>"
    try:
        st = checkpoint.lstat()
    except FileNotFoundError:
        return "it no longer exists"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    real_root = root.resolve()
    real = checkpoint.resolve()
    if not _within(real, real_root) or real == real_root:
        return f"it resolves to {real}, outside the root {real_root}"
    # Resolving the parent would follow a symlinked run directory too; compare with the path as written.
    below_root = os.path.relpath(os.path.abspath(checkpoint), os.path.abspath(root))
    if below_root == os.pardir or below_root.startswith(os.pardir + os.sep) or real != real_root / below_root:
        return "its path goes through a symlink"
    mounts = mount_points_below(real)
    if mounts:
        return f"a filesystem is mounted inside it, at {mounts[0]}"
    return None


def _unescape_mount_path(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash in paths as octal escapes (\040).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_points_below(directory: Path) -> list[str]:
    """Mount points strictly inside `directory`, bind mounts of the same filesystem included (their st_dev
    is the parent's, so only the kernel's mount table tells). Empty where there is no /proc."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            table = f.read()
    except OSError:
        return []
    top = os.path.realpath(directory) + os.sep
    found = []
    for line in table.splitlines():
        fields = line.split(" ")
        if len(fields) > 4 and (point := _unescape_mount_path(fields[4])).startswith(top):
            found.append(point)
    return sorted(found)


def _trash_name(checkpoint: Path) -> str:
    # The leading token keeps a trash entry from ever matching checkpoint-<digits>.
    return f"{uuid.uuid4().hex[:12]}.{checkpoint.name}"


def rename_to_trash(checkpoint: Path, state: StateDir) -> Path:
    """Move the whole checkpoint out of its run directory in one atomic rename; return where it went."""
    state.create()
    target = state.trash / _trash_name(checkpoint)
    try:
        os.rename(checkpoint, target)
        return target
    except FileNotFoundError:
        raise Vanished(f"{checkpoint} vanished before it was removed") from None
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise ActionError(f"cannot move {checkpoint} to the trash: {e.strerror}") from None
    # The state directory is on another filesystem: a trash beside the checkpoint keeps the rename atomic.
    local = checkpoint.parent / RUN_TRASH_NAME
    target = local / _trash_name(checkpoint)
    try:
        local.mkdir(exist_ok=True)
        os.rename(checkpoint, target)
    except FileNotFoundError:
        raise Vanished(f"{checkpoint} vanished before it was removed") from None
    except OSError as e:
        raise ActionError(f"cannot move {checkpoint} to the trash: {e.strerror}") from None
    return target


def _rmtree(path: Path) -> None:
    def make_writable_and_retry(func: object, failed: str, exc: BaseException) -> None:
        if isinstance(exc, FileNotFoundError):
            return  # someone else removed it first: the goal is reached
        if not isinstance(exc, PermissionError):
            raise exc
        # A read-only directory inside the trash entry: make it and its parent writable, then retry.
        os.chmod(os.path.dirname(failed), stat.S_IRWXU)
        if os.path.isdir(failed) and not os.path.islink(failed):
            os.chmod(failed, stat.S_IRWXU)
            shutil.rmtree(failed)
        else:
            os.unlink(failed)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable_and_retry)
    else:
        shutil.rmtree(path, onerror=lambda func, failed, info: make_writable_and_retry(func, failed, info[1]))


def empty_trash(trash: Path, only: str | None = None, stuck: list[str] | None = None) -> list[str]:
    """Finish removing entries of a trash directory (all, or the one named `only`); return the names
    finished. An entry that cannot be removed is skipped, described in `stuck`, and tried again later."""
    finished = []
    try:
        entries = [only] if only is not None else sorted(os.listdir(trash))
    except FileNotFoundError:
        return []
    for name in entries:
        entry = trash / name
        mounts = mount_points_below(entry) if entry.is_dir() and not entry.is_symlink() else []
        if mounts:  # mounted after the guard looked: never empty another filesystem
            if stuck is not None:
                stuck.append(f"{entry}: a filesystem is mounted inside it, at {mounts[0]}")
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                _rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
        except OSError as e:
            if stuck is not None:
                stuck.append(f"{entry}: {e.strerror or e}")
            continue
        finished.append(name)
    return finished


Dispose = Callable[[Path], None]


def delete_checkpoint(root: Path, checkpoint: Path, state: StateDir, dispose: Dispose | None = None) -> None:
    """Rename the checkpoint into the trash, then delete it there, or hand the trash entry to `dispose`
    (the daemon's reaper thread) so that deleting many gigabytes does not hold up the caller."""
    problem = removal_guard(root, checkpoint)
    if problem == "it no longer exists":
        raise Vanished(f"{checkpoint} vanished before it was removed")
    if problem:
        raise ActionError(f"refusing to remove {checkpoint}: {problem}")
    trashed = rename_to_trash(checkpoint, state)
    if dispose is not None:
        dispose(trashed)
        return
    try:
        _rmtree(trashed)
    except OSError as e:
        raise ActionError(
            f"{checkpoint} was moved to the trash ({trashed}) but could not be removed there: {e}; "
            "it is finished on the next start"
        ) from None


def _listing(top: Path) -> dict[str, tuple[str, int]]:
    """Relative path -> (kind, size) for everything below `top`, links not followed. A directory that cannot
    be listed is skipped, as os.walk does (its entries are then missing and the lists differ)."""
    found: dict[str, tuple[str, int]] = {}
    pending = [("", os.fspath(top))]
    while pending:
        prefix, directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                found[rel] = ("dir", 0)
                pending.append((rel + os.sep, entry.path))
            else:
                kind = "link" if entry.is_symlink() else "file"
                found[rel] = (kind, entry.stat(follow_symlinks=False).st_size)
    return found


def verify_copy(source: Path, copy: Path) -> str | None:
    """None when `copy` has the same files, kinds and sizes as `source` and valid safetensors headers."""
    want, have = _listing(source), _listing(copy)
    if want.keys() != have.keys():
        missing = sorted(want.keys() - have.keys())
        extra = sorted(have.keys() - want.keys())
        return f"file list differs (missing {missing[:3]}, extra {extra[:3]})"
    for rel, (kind, size) in want.items():
        if have[rel] != (kind, size):
            return f"{rel}: {have[rel][0]} of {have[rel][1]} bytes, expected {kind} of {size} bytes"
        if kind == "file" and rel.endswith(".safetensors"):
            problem = safetensors_problem(copy / rel)
            if problem:
                return problem
    return None


def _content_mismatch(source: Path, copy: Path) -> str | None:
    """None when every file of `copy` has the bytes of its twin in `source` and every link the same target.
    Same names and sizes are not enough to remove the source: an earlier run into the same output_dir
    leaves an archived checkpoint-N of exactly the same layout and other weights."""
    for rel, (kind, _) in _listing(source).items():
        if kind == "file" and not filecmp.cmp(source / rel, copy / rel, shallow=False):
            return f"{rel}: same size, different content"
        if kind == "link" and os.readlink(source / rel) != os.readlink(copy / rel):
            return f"{rel}: links to {os.readlink(copy / rel)}, expected {os.readlink(source / rel)}"
    return None


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(top: Path) -> None:
    """fsync every file (links excepted) and directory of the tree, `top` included; the first error raises.

    The fsyncs run concurrently: on a journaling filesystem each one waits for a journal commit, and issued
    one after another a checkpoint of 3,000 small files waits for 3,000 commits (~10 s on a loop-mounted
    ext4 in benchmarks/bench_actions.py); issued together, the journal commits them in batches (~1 s)."""
    paths: list[str] = []
    for dirpath, _, filenames in os.walk(top):
        paths.extend(full for n in filenames if not os.path.islink(full := os.path.join(dirpath, n)))
        paths.append(dirpath)
    workers = min(FSYNC_THREADS, len(paths))
    if workers <= 1:
        _fsync_all(paths)
        return
    # One share of the paths per thread, not one task per path: on a filesystem where fsync costs nothing
    # (tmpfs), handing 3,000 tasks to a pool costs more than the fsyncs.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckptkeeper-fsync") as pool:
        for _ in pool.map(_fsync_all, [paths[i::workers] for i in range(workers)]):
            pass


def _fsync_all(paths: list[str]) -> None:
    for path in paths:
        _fsync_path(path)


def _clear_archive_temps(parent: Path, name: str) -> None:
    for leftover in parent.glob(f"{ARCHIVE_TEMP_PREFIX}{name}.*"):
        if leftover.is_dir() and not leftover.is_symlink():
            _rmtree(leftover)


def archive_checkpoint(
    root: Path, checkpoint: Path, target: Path, state: StateDir, dispose: Dispose | None = None
) -> str:
    """Move `checkpoint` to `target`; returns "renamed" (same filesystem) or "copied".

    Another filesystem: copy under a temporary name beside the target, fsync, verify, rename into place,
    and only then remove the source like a delete. A crash leaves the source whole; the temporary copy
    is cleared the next time this checkpoint is archived.
    """
    problem = removal_guard(root, checkpoint)
    if problem == "it no longer exists":
        raise Vanished(f"{checkpoint} vanished before it was archived")
    if problem:
        raise ActionError(f"refusing to archive {checkpoint}: {problem}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ActionError(f"cannot create the archive directory {target.parent}: {e.strerror or e}") from None
    if os.path.lexists(target):
        # An earlier archive finished its copy but was stopped before removing the source.
        mismatch = verify_copy(checkpoint, target) or _content_mismatch(checkpoint, target)
        if mismatch:
            raise ActionError(f"{target} already exists and differs from {checkpoint}: {mismatch}")
        try:  # the copy, and its name, are durable before the source goes (it may come from a crashed run)
            _fsync_tree(target)
            _fsync_path(target.parent)
        except OSError as e:
            raise ActionError(f"cannot make the archived copy {target} durable: {e}") from None
        delete_checkpoint(root, checkpoint, state, dispose)
        return "already archived"
    try:
        os.rename(checkpoint, target)
        return "renamed"
    except FileNotFoundError:
        raise Vanished(f"{checkpoint} vanished before it was archived") from None
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise ActionError(f"cannot archive {checkpoint} to {target}: {e.strerror}") from None

    _clear_archive_temps(target.parent, target.name)
    temp = target.parent / f"{ARCHIVE_TEMP_PREFIX}{target.name}.{uuid.uuid4().hex[:12]}"
    try:
        shutil.copytree(checkpoint, temp, symlinks=True, copy_function=_copy_file)
        _fsync_tree(temp)
        mismatch = verify_copy(checkpoint, temp)
        if mismatch:
            raise ActionError(f"the copy of {checkpoint} in {temp} does not match: {mismatch}")
        os.rename(temp, target)
        _fsync_path(target.parent)  # the copy's name is durable before the source goes
    except _CopyFailed as e:
        _rmtree_quietly(temp)
        if not checkpoint.exists():
            raise Vanished(f"{checkpoint} vanished while it was archived") from None
        name = os.path.relpath(e.source, checkpoint)
        raise ActionError(f"cannot archive {checkpoint} to {target}: {name}: {e.error.strerror or e.error}") from None
    except FileNotFoundError as e:
        _rmtree_quietly(temp)
        if not checkpoint.exists():
            raise Vanished(f"{checkpoint} vanished while it was archived") from None
        raise ActionError(f"cannot archive {checkpoint}: {e}") from None
    except shutil.Error as e:
        # copytree's list of (source, copy, message), one per directory it could not create or stamp.
        _rmtree_quietly(temp)
        failed = e.args[0] if e.args and isinstance(e.args[0], list) and e.args[0] else [("", "", str(e))]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise ActionError(f"cannot archive {checkpoint} to {target}: {failed[0][2]}{more}") from None
    except OSError as e:
        _rmtree_quietly(temp)
        raise ActionError(f"cannot archive {checkpoint} to {target}: {e}") from None
    except ActionError:
        _rmtree_quietly(temp)
        raise
    delete_checkpoint(root, checkpoint, state, dispose)
    return "copied"


class _CopyFailed(Exception):
    """One file could not be copied. Not an OSError on purpose: shutil.copytree collects each OSError and goes
    on with every other file (on a full disk: writing them all, for one error line per file); this stops it."""

    def __init__(self, source: str, error: OSError) -> None:
        super().__init__(f"{source}: {error}")
        self.source = source
        self.error = error


def _copy_file(source: str, copy: str) -> object:
    try:
        return shutil.copy2(source, copy)
    except OSError as e:
        raise _CopyFailed(source, e) from e


def _rmtree_quietly(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
