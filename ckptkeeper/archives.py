"""`ckptkeeper archive ls URL` and `ckptkeeper archive restore URL/RUN/checkpoint-N DIR`: what an object store
archive holds, and bringing one checkpoint back, verified against its manifest.

A checkpoint in the store is complete when its manifest is there (destination.py writes it last); objects
without one are an upload that was cut short, listed as incomplete and never restored. A restore writes under a
temporary name beside the target, checks every file's size and SHA-256 against the manifest while it downloads,
makes it durable, and only then renames it to `DIR/checkpoint-N` (never over an existing one).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from ckptkeeper.destination import (
    MANIFEST_SUFFIX,
    READ_CHUNK,
    DestinationError,
    Entry,
    Manifest,
    ObjectStore,
    describe,
    iter_chunks,
)
from ckptkeeper.scan import checkpoint_step
from ckptkeeper.units import human_bytes

RESTORE_TEMP_PREFIX = ".ckptkeeper-tmp-"


def list_archive(store: ObjectStore, warn: Callable[[str], None] | None = None) -> list[Entry]:
    """Every checkpoint below the store's URL: complete (a manifest) or not (objects only), by run and step. A
    manifest that cannot be read is told to `warn` and its checkpoint listed as incomplete."""
    try:
        found: dict[str, dict[str, Any]] = store.fs.find(store.base, detail=True)
    except FileNotFoundError:
        store.ensure_bucket()  # a bucket that does not exist says so; an empty prefix lists nothing
        return []
    except Exception as e:
        raise describe(e) from None
    head = store.base + "/"
    complete: dict[tuple[str, str], Entry] = {}
    partial: dict[tuple[str, str], Entry] = {}
    for key, info in found.items():
        rel = key.removeprefix(head)
        if _is_manifest(rel):
            entry = _complete_entry(store, key, rel, warn)
            if entry is not None:
                complete[(entry.run, entry.checkpoint)] = entry
            continue
        where = _checkpoint_of(rel)
        if where is not None:
            run, name = where
            entry = partial.setdefault((run, name), Entry(run, name, checkpoint_step(name) or 0, 0, 0.0, False))
            entry.size += int(info.get("size") or 0)
            entry.when = max(entry.when, _timestamp(info))
    merged = {**partial, **complete}
    return sorted(merged.values(), key=lambda e: (e.run, e.step))


def _is_manifest(rel: str) -> bool:
    """A key is a manifest when it is `RUN/checkpoint-N` + the suffix and not inside another checkpoint (a file of
    a checkpoint may be named like a manifest)."""
    if not rel.endswith(MANIFEST_SUFFIX):
        return False
    stem = rel.removesuffix(MANIFEST_SUFFIX)
    return checkpoint_step(stem.rpartition("/")[2]) is not None and _checkpoint_of(stem) is None


def _complete_entry(store: ObjectStore, key: str, rel: str, warn: Callable[[str], None] | None) -> Entry | None:
    """The entry of the checkpoint whose manifest is `key`; None (and a warning) when it cannot be read."""
    stem = rel.removesuffix(MANIFEST_SUFFIX)
    try:
        manifest = store.read_manifest(key.removesuffix(MANIFEST_SUFFIX))
    except DestinationError as e:
        if warn is not None:
            warn(f"{stem}: skipped, its manifest cannot be read ({e}); listed as incomplete")
        return None
    except Exception as e:
        raise describe(e) from None
    if manifest is None:  # gone since the listing
        return None
    name = stem.rpartition("/")[2]
    return Entry(_run_of(stem), name, manifest.step, manifest.size, manifest.archived_at, True)


def _run_of(rel: str) -> str:
    run, _, _ = rel.rpartition("/")
    return run or "."


def _checkpoint_of(rel: str) -> tuple[str, str] | None:
    parts = rel.split("/")
    for i, part in enumerate(parts[:-1]):
        if checkpoint_step(part) is not None:
            return "/".join(parts[:i]) or ".", part
    return None


def _timestamp(info: dict[str, Any]) -> float:
    when = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if isinstance(when, dt.datetime):
        return when.timestamp()
    return float(when) if isinstance(when, (int, float)) else 0.0


def archive_table(url: str, entries: list[Entry]) -> str:
    if not entries:
        return f"No archived checkpoints in {url}."
    rows = [("RUN", "CHECKPOINT", "STEP", "SIZE", "WHEN", "STATE")]
    for e in entries:
        when = dt.datetime.fromtimestamp(e.when, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if e.when else "-"
        state = "complete" if e.complete else "incomplete (no manifest: an upload cut short)"
        rows.append((e.run, e.checkpoint, str(e.step), human_bytes(e.size), when, state))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5] for r in rows]
    complete = sum(e.complete for e in entries)
    lines.append(f"{complete} complete, {len(entries) - complete} incomplete, in {url}")
    return "\n".join(line.rstrip() for line in lines)


# ---------------------------------------------------------------------------------------------- restore
def restore(source_url: str, options: dict[str, Any], directory: Path) -> tuple[Path, Manifest]:
    """Bring `URL/RUN/checkpoint-N` back as `directory/checkpoint-N`, every file checked against the manifest."""
    name = source_url.rstrip("/").rpartition("/")[2]
    if checkpoint_step(name) is None:
        raise DestinationError(f"{source_url}: expected URL/RUN/checkpoint-N (the last part names no checkpoint)")
    store = ObjectStore(source_url.rstrip("/"), options)
    try:
        manifest = store.read_manifest(store.base)
    except DestinationError:
        raise
    except Exception as e:
        raise describe(e) from None
    if manifest is None:
        raise DestinationError(f"{source_url} has no manifest: it is not a complete archive (an upload cut short?)")
    target = directory / name
    if os.path.lexists(target):
        raise DestinationError(f"{target} already exists: restore into another directory, or move it away first")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _local_error(e, directory) from None
    _check_paths(manifest)
    _restore_into(store, manifest, directory, name)
    return target, manifest


def _restore_into(store: ObjectStore, manifest: Manifest, directory: Path, name: str) -> None:
    """Download into a temporary directory beside the target, make it durable, rename it to `directory/name`."""
    target = directory / name
    temp = directory / f"{RESTORE_TEMP_PREFIX}{name}.{uuid.uuid4().hex[:12]}"
    try:
        _download(store, manifest, temp)
        _fsync_tree(temp)
        # Never over anything, not even an empty directory made meanwhile (os.rename would replace that one).
        # Checked, then renamed: without renameat2(RENAME_NOREPLACE) one made in between is still replaced.
        if os.path.lexists(target):
            raise DestinationError(f"{target} appeared during the restore: move it away and restore again")
        os.rename(temp, target)
    except BaseException as e:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _local_error(e, temp) from None
        raise
    try:
        _fsync(directory)
    except OSError as e:
        raise _local_error(e, directory) from None


def _local_error(error: OSError, fallback: Path) -> DestinationError:
    """A failure on the local side, in one line naming the path."""
    where = error.filename if isinstance(error.filename, (str, bytes)) else fallback
    return DestinationError(f"cannot write {os.fsdecode(where)}: {error.strerror or error}")


def _safe(rel: str) -> str:
    """A relative path of the manifest, refused if it could reach outside the checkpoint."""
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise DestinationError(f"the manifest names a path outside the checkpoint: {rel!r}")
    return str(path)


def _check_paths(manifest: Manifest) -> None:
    """Refuse a manifest whose files and links are not distinct leaves: the same path twice, a file or link that
    is also a directory, or one inside another file or link (written through a link, it could land anywhere)."""
    leaves = [_safe(f.path) for f in manifest.files] + [_safe(rel) for rel, _ in manifest.links]
    dirs = {_safe(d) for d in manifest.dirs}
    parents = {str(p) for rel in [*leaves, *dirs] for p in PurePosixPath(rel).parents if str(p) != "."}
    seen: set[str] = set()
    for rel in leaves:
        if rel in seen or rel in dirs:
            raise DestinationError(f"the manifest names {rel!r} more than once (as a file, link or directory)")
        if rel in parents:
            raise DestinationError(f"the manifest names {rel!r} as a file or link and as a directory holding others")
        seen.add(rel)


def _download(store: ObjectStore, manifest: Manifest, temp: Path) -> None:
    temp.mkdir()
    for d in manifest.dirs:
        (temp / _safe(d)).mkdir(parents=True, exist_ok=True)
    for f in manifest.files:
        rel = _safe(f.path)
        (temp / rel).parent.mkdir(parents=True, exist_ok=True)
        _fetch(store, f"{store.base}/{f.path}", temp / rel, f.size, f.sha256, f.path)
    for rel, link_target in manifest.links:
        os.symlink(link_target, temp / _safe(rel))


def _fetch(store: ObjectStore, key: str, local: Path, size: int, sha256: str, shown: str) -> None:
    digest, got = hashlib.sha256(), 0
    try:
        with store.fs.open(key, "rb", block_size=READ_CHUNK) as remote, open(local, "xb") as out:
            for chunk in iter_chunks(remote, READ_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                got += len(chunk)
    except FileNotFoundError:
        raise DestinationError(f"{shown} is listed in the manifest but missing in the store") from None
    except OSError as e:
        if e.filename is not None and str(e.filename).startswith(str(local.parent)):
            raise DestinationError(f"cannot write {local}: {e.strerror or e}") from None
        raise describe(e) from None
    if got != size:
        raise DestinationError(f"{shown} in the store differs from its manifest ({got} bytes, {size} expected)")
    if digest.hexdigest() != sha256:
        raise DestinationError(f"{shown} in the store differs from its manifest (other bytes: its SHA-256 differs)")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(top: Path) -> None:
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            full = Path(dirpath) / name
            if not full.is_symlink():
                _fsync(full)
        _fsync(Path(dirpath))


def restored_text(target: Path, manifest: Manifest, source: str) -> str:
    count = len(manifest.files)
    size = human_bytes(manifest.size)
    return f"Restored {source} to {target}: {count} files, {size}, each checked against the manifest."


__all__ = ["archive_table", "list_archive", "restore", "restored_text"]
