"""Archive destinations that are object stores (`--archive-to s3://bucket/prefix`), through fsspec.

Object stores cannot rename, so an archive is committed by a manifest, not a rename:
1. every file of the checkpoint is uploaded to `<prefix>/<run path>/checkpoint-N/<relative path>` (the root's own
   run directly under the prefix, as in a local archive), hashed while it is read (SHA-256, and the MD5s S3 makes
   its ETag of), in parts of bounded size (a 20 GiB file is never held in memory);
2. each object is verified: its size, and the store's ETag against the MD5s of what was sent (where the ETag is not
   an MD5, as with SSE-KMS, the object is read back and hashed);
3. the manifest `<prefix>/<run path>/checkpoint-N.ckptkeeper-manifest.json` (files, sizes, SHA-256) is written
   LAST, and read back.
An archived checkpoint is one whose manifest exists and matches the checkpoint; objects without a manifest are an
unfinished upload, resumed (an object whose size and ETag match the local file is not sent again) and never a
reason to remove anything. An existing manifest is never overwritten. This module never removes a local file:
`actions.archive_to_store` calls it and then removes the source through the trash.

fsspec and its backends are imported only when a store is first used: `plan` and `prune` without an object
store archive start without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from ckptkeeper.urls import URL_FORM

MANIFEST_SUFFIX = ".ckptkeeper-manifest.json"
MANIFEST_FORMAT = "ckptkeeper-archive/1"
# Beside the manifest while an upload is under way: which checkpoint is being sent there. Made only where none is
# (If-None-Match), so two instances never send to the same keys at once (the second keeps its checkpoint).
CLAIM_SUFFIX = ".ckptkeeper-upload.json"
MIN_PART = 8 << 20  # S3's smallest part is 5 MiB; 8 MiB parts keep memory low and requests few
MAX_PARTS = 9000  # S3 allows 10,000 parts: larger files get larger parts
FILES_IN_FLIGHT = 4  # files uploaded at once
PARTS_IN_FLIGHT = 4  # parts of one file sent at once (S3): memory <= 4 x 4 parts, plus the one being read per file
READ_CHUNK = 8 << 20
BUCKET_CHECKED_FOR = 300.0  # seconds a bucket found is not looked up again
PACKAGES = {
    "s3": "s3fs (pip install 'ckptkeeper[s3]')",
    "s3a": "s3fs (pip install 'ckptkeeper[s3]')",
    "gs": "gcsfs (pip install gcsfs)",
    "gcs": "gcsfs (pip install gcsfs)",
    "az": "adlfs (pip install adlfs)",
    "abfs": "adlfs (pip install adlfs)",
    "abfss": "adlfs (pip install adlfs)",
}
Progress = Callable[[int], None]  # bytes sent since the last call
StopCheck = Callable[[], bool]


class DestinationError(RuntimeError):
    """The store cannot be used, or an archive there is not what it must be; the message says why, briefly."""


class DestinationDown(DestinationError):
    """The store itself failed (unreachable, credentials, no bucket): not this checkpoint's fault. Archives
    there are retried at a growing interval."""


class StopRequested(DestinationError):
    """A stop was asked for between parts; nothing was committed."""


# ---------------------------------------------------------------------------------------------- errors
# What the store's client raises, by the exception's class name or a code in its text -> a short message; each
# is the store's failure as a whole (DestinationDown), not one checkpoint's.
_DOWN: tuple[tuple[tuple[str, ...], str], ...] = (
    (("NoCredentialsError", "Unable to locate credentials"),
     "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a role"),
    (("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "PermissionError"),
     "access denied: check the credentials"),
    (("NoSuchBucket",), "the bucket does not exist"),
    (("EndpointConnectionError", "ClientConnectorError", "ServerDisconnectedError", "ConnectionError",
      "ConnectTimeoutError", "ReadTimeoutError", "TimeoutError", "Connection refused", "ClientOSError"),
     "cannot reach the store"),
)  # fmt: skip


def describe(error: BaseException) -> DestinationError:
    """A short message for what the store or its client raised; DestinationDown when the store itself failed."""
    if isinstance(error, DestinationError):
        return error
    names = {t.__name__ for t in type(error).__mro__}
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    for marks, message in _DOWN:
        if any(m in names or m in text for m in marks):
            return DestinationDown(f"{message} ({_endpoint_text(text)})" if "reach" in message else message)
    return DestinationError(text)


def _endpoint_text(text: str) -> str:
    """The server a connection error names (scheme, host and port only), or the start of the text."""
    found = re.search(r"(https?://[^/\s\"']+)", text)
    return found.group(1) if found else text[:120]


# ---------------------------------------------------------------------------------------------- the manifest
@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, "/"-separated
    size: int
    sha256: str
    # The ETag the store gave the object when it was sent and verified: an object that no longer has it was
    # written over since (another writer at this prefix), and the archive no longer holds these bytes.
    etag: str = field(default="", compare=False)


@dataclass(frozen=True)
class Manifest:
    run: str
    checkpoint: str
    step: int
    files: tuple[FileEntry, ...]
    dirs: tuple[str, ...] = ()
    links: tuple[tuple[str, str], ...] = ()
    archived_at: float = 0.0
    source: str = ""

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        document = {
            "format": MANIFEST_FORMAT,
            "run": self.run,
            "checkpoint": self.checkpoint,
            "step": self.step,
            "archived_at": self.archived_at,
            "source": self.source,
            "bytes": self.size,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256, "etag": f.etag} for f in self.files],
            "dirs": list(self.dirs),
            "links": [{"path": p, "target": t} for p, t in self.links],
        }
        return json.dumps(document, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            d = json.loads(data)
            if d.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {d.get('format')!r}")
            files = tuple(
                FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"]), str(f.get("etag") or ""))
                for f in d["files"]
            )
            links = tuple((str(x["path"]), str(x["target"])) for x in d.get("links", []))
            return cls(
                str(d["run"]), str(d["checkpoint"]), int(d["step"]), files, tuple(map(str, d.get("dirs", []))),
                links, float(d.get("archived_at", 0.0)), str(d.get("source", "")),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DestinationError(f"not a manifest of ckptkeeper's: {e}") from None

    def same_content(self, other: Manifest) -> str | None:
        """None when both describe the same files with the same bytes; else the first difference."""
        mine, theirs = {f.path: f for f in self.files}, {f.path: f for f in other.files}
        if mine.keys() != theirs.keys():
            missing, extra = sorted(mine.keys() - theirs.keys()), sorted(theirs.keys() - mine.keys())
            return f"file list differs (missing {missing[:3]}, extra {extra[:3]})"
        for path, entry in mine.items():
            if theirs[path] != entry:
                return f"{path}: different size or content"
        if set(self.links) != set(other.links):
            return "symbolic links differ"
        return None


@dataclass(frozen=True)
class LocalFile:
    path: str
    full: str
    size: int


def local_tree(top: str) -> tuple[list[LocalFile], list[str], list[tuple[str, str]]]:
    """Files, directories and links below `top` (links are recorded, never followed)."""
    files: list[LocalFile] = []
    dirs: list[str] = []
    links: list[tuple[str, str]] = []
    pending = [("", top)]
    while pending:
        prefix, directory = pending.pop()
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            rel = prefix + entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                links.append((rel, os.readlink(entry.path)))
            elif stat.S_ISDIR(st.st_mode):
                dirs.append(rel)
                pending.append((rel + "/", entry.path))
            elif stat.S_ISREG(st.st_mode):
                files.append(LocalFile(rel, entry.path, st.st_size))
            else:
                raise DestinationError(f"{rel} is not a regular file, directory or link")
    return sorted(files, key=lambda f: f.path), sorted(dirs), sorted(links)


def tree_size(top: str) -> int:
    """The bytes of the regular files below `top` (0 if it cannot be read: progress only)."""
    try:
        return sum(f.size for f in local_tree(top)[0])
    except (OSError, DestinationError):
        return 0


def part_size(size: int) -> int:
    """Parts of at least MIN_PART, large enough that a file needs at most MAX_PARTS; whole MiB."""
    needed = -(-size // MAX_PARTS)
    return max(MIN_PART, -(-needed // (1 << 20)) << 20)


def s3_etag(md5s: list[bytes], single: bytes | None) -> str:
    """The ETag S3 gives an object sent as these parts (or in one PUT: `single`, the MD5 of the whole)."""
    if single is not None:
        return single.hex()
    return f"{hashlib.md5(b''.join(md5s)).hexdigest()}-{len(md5s)}"


def hash_local(full: str, size: int) -> tuple[str, str]:
    """(SHA-256, the S3 ETag an upload in our parts gets) of a local file, read in chunks."""
    sha, whole = hashlib.sha256(), hashlib.md5()
    md5s: list[bytes] = []
    psize = part_size(size)
    with open(full, "rb") as f:
        while chunk := f.read(psize):
            sha.update(chunk)
            whole.update(chunk)
            md5s.append(hashlib.md5(chunk).digest())
    single = whole.digest() if size < psize else None
    return sha.hexdigest(), s3_etag(md5s, single)


# ---------------------------------------------------------------------------------------------- the store
@dataclass
class Entry:
    """One checkpoint in a destination, as `archive ls` shows it."""

    run: str
    checkpoint: str
    step: int
    size: int
    when: float
    complete: bool


@dataclass
class ObjectStore:
    """One `--archive-to URL` and its storage options. The filesystem is made at first use."""

    url: str
    options: dict[str, Any] = field(default_factory=dict)
    _fs: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _bucket_seen_until: float = 0.0

    @property
    def protocol(self) -> str:
        match = URL_FORM.match(self.url)
        assert match is not None
        return match.group(1)

    def check(self) -> None:
        """The protocol's fsspec backend is installed (nothing is sent to the store); else DestinationError."""
        self._filesystem_class()

    def _filesystem_class(self) -> Any:
        try:
            fsspec = importlib.import_module("fsspec")
        except ImportError:
            raise DestinationError(f"{self.url}: needs {self._package()}") from None
        try:
            return fsspec.get_filesystem_class(self.protocol)
        except ImportError:
            raise DestinationError(f"{self.url}: needs {self._package()}") from None
        except ValueError:
            raise DestinationError(f"{self.url}: fsspec knows no protocol {self.protocol!r}") from None

    def _package(self) -> str:
        return PACKAGES.get(self.protocol, f"the fsspec package for {self.protocol}:// (and fsspec itself)")

    @property
    def fs(self) -> Any:
        with self._lock:
            if self._fs is None:
                cls = self._filesystem_class()
                try:
                    self._fs = cls(**{"skip_instance_cache": True, **self.options})
                except (TypeError, ValueError) as e:
                    raise DestinationError(f"{self.url}: bad --archive-option: {e}") from None
            return self._fs

    @property
    def base(self) -> str:
        stripped: str = type(self.fs)._strip_protocol(self.url)
        return stripped.rstrip("/")

    def where(self, run: str, name: str) -> str:
        """The checkpoint's prefix in the store: `<base>/<run>/<name>` (the root's run: `<base>/<name>`)."""
        return f"{self.base}/{name}" if run == "." else f"{self.base}/{run}/{name}"

    def shown(self, run: str, name: str) -> str:
        """The same, as a URL for messages."""
        return f"{self.url.rstrip('/')}/{name}" if run == "." else f"{self.url.rstrip('/')}/{run}/{name}"

    # ---- reading -----------------------------------------------------------------------------------------------
    def read_manifest(self, where: str) -> Manifest | None:
        """The manifest of the checkpoint stored at `where`, or None when there is none (an unfinished upload)."""
        fs = self.fs
        try:
            data = fs.cat_file(where + MANIFEST_SUFFIX)
        except FileNotFoundError:
            return None
        return Manifest.from_json(data)

    def objects(self, where: str) -> dict[str, dict[str, Any]]:
        """Relative path -> the store's details, for every object below `where/`."""
        fs = self.fs
        fs.invalidate_cache(where)
        try:
            found: dict[str, dict[str, Any]] = fs.find(where, detail=True)
        except FileNotFoundError:
            return {}
        prefix = where.rstrip("/") + "/"
        return {k[len(prefix) :]: v for k, v in found.items() if k.startswith(prefix)}

    def ensure_bucket(self) -> None:
        """The bucket exists and the credentials are good: one request before anything is sent, once per
        BUCKET_CHECKED_FOR seconds (a bucket that goes away later fails the uploads themselves)."""
        if time.monotonic() < self._bucket_seen_until:
            return
        bucket = self.base.split("/", 1)[0]
        try:
            if hasattr(self.fs, "call_s3"):  # S3: HEAD the bucket (listing it could mean many pages)
                self.fs.call_s3("head_bucket", Bucket=bucket)
            elif not self.fs.exists(bucket):
                raise FileNotFoundError(bucket)
        except FileNotFoundError:
            raise DestinationDown(f"the bucket {bucket!r} does not exist") from None
        self._bucket_seen_until = time.monotonic() + BUCKET_CHECKED_FOR

    def exists(self, key: str) -> bool:
        """Whether the object `key` exists: one HEAD on S3 (fsspec's exists also lists, for a directory)."""
        if hasattr(self.fs, "call_s3"):
            bucket, path, _ = self.fs.split_path(key)
            try:
                self.fs.call_s3("head_object", Bucket=bucket, Key=path)
            except FileNotFoundError:
                return False
            return True
        return bool(self.fs.exists(key))

    def abort_unfinished(self, where: str) -> int:
        """Abort multipart uploads a killed instance left below `where` (S3 only); how many."""
        fs = self.fs
        if not hasattr(fs, "call_s3"):
            return 0
        bucket, _, key = where.partition("/")
        found = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key + "/")
        uploads = found.get("Uploads", [])
        for upload in uploads:
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        return len(uploads)


# ---------------------------------------------------------------------------------------------- archiving
def archive(
    store: ObjectStore, source: str, run: str, name: str, step: int, stop: StopCheck | None, progress: Progress | None
) -> tuple[Manifest, str]:
    """Upload the checkpoint at `source`, verify every object, write the manifest last. Returns the manifest and
    "uploaded" or "already archived" (a manifest was there and matches the checkpoint). Raises DestinationError
    (DestinationDown when the store itself failed, StopRequested on a stop); never removes a local file."""
    try:
        return _archive(store, source, run, name, step, stop, progress)
    except DestinationError:
        raise
    except OSError as e:
        if e.filename is not None and str(e.filename).startswith(source):
            raise DestinationError(f"cannot read {os.path.relpath(e.filename, source)}: {e.strerror or e}") from None
        raise describe(e) from None
    except Exception as e:  # the store's client raised: a short message, never a traceback
        raise describe(e) from None


def _archive(
    store: ObjectStore, source: str, run: str, name: str, step: int, stop: StopCheck | None, progress: Progress | None
) -> tuple[Manifest, str]:
    where, shown = store.where(run, name), store.shown(run, name)
    files, dirs, links = local_tree(source)
    existing = store.read_manifest(where)
    if existing is not None:
        return _check_existing(store, where, shown, existing, files, links), "already archived"
    store.ensure_bucket()
    _check_keys(store, where, shown, files)
    with _claimed(store, where, shown, source):
        store.abort_unfinished(where)
        present = store.objects(where)
        entries = _upload_all(store, where, files, present, stop, progress)
        manifest = Manifest(run, name, step, entries, tuple(dirs), tuple(links), time.time(), source)
        _commit(store, where, shown, manifest)
    return manifest, "uploaded"


@contextlib.contextmanager
def _claimed(store: ObjectStore, where: str, shown: str, source: str) -> Iterator[None]:
    """Claim the checkpoint's keys for this upload (S3: an object made only if none is there). A claim of the same
    checkpoint directory (device and inode) is its own earlier attempt (killed): taken over. Any other is another
    instance sending a checkpoint of the same path to this prefix: refused, the checkpoint kept. Let go at the
    end, whatever happened (a kill leaves it: the next attempt on this checkpoint takes it over)."""
    fs = store.fs
    if not hasattr(fs, "call_s3"):
        yield  # no conditional write: other stores get no claim (one root per prefix, as documented)
        return
    key = where + CLAIM_SUFFIX
    st = os.stat(source)
    me = f"{st.st_dev}:{st.st_ino}"
    mine = json.dumps({"checkpoint": me, "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()})
    try:
        fs.pipe_file(key, mine.encode(), mode="create")
    except FileExistsError:
        fs.invalidate_cache(key)
        try:
            held = json.loads(fs.cat_file(key))
        except (ValueError, FileNotFoundError):
            held = {}
        if not isinstance(held, dict) or held.get("checkpoint") != me:
            who = f"host {held.get('host')}, pid {held.get('pid')}" if isinstance(held, dict) else "unknown"
            raise DestinationError(
                f"{shown}: another ckptkeeper ({who}) is sending a checkpoint of this path to the store; the "
                f"checkpoint is kept (one root per prefix; remove {key.rsplit('/', 1)[-1]} if it is gone)"
            ) from None
        fs.pipe_file(key, mine.encode())
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            fs.rm_file(key)


def _check_keys(store: ObjectStore, where: str, shown: str, files: list[LocalFile]) -> None:
    """Each file has an object key of its own, as written: s3fs reads `?versionId=` in a key as a version, so
    `notes?versionId=1` would be stored as `notes`, over another file."""
    split = getattr(store.fs, "split_path", None)
    if split is None:
        return
    seen: dict[str, str] = {}
    for f in files:
        intended = f"{where}/{f.path}"
        bucket, key, version = split(intended)
        stored = f"{bucket}/{key}"
        if version or stored != intended or stored in seen:
            raise DestinationError(
                f"{shown}: {f.path!r} cannot be stored under its own name in this store (it would be {stored!r}); "
                "the checkpoint is kept"
            )
        seen[stored] = f.path


def _check_existing(
    store: ObjectStore, where: str, shown: str, existing: Manifest, files: list[LocalFile], links: list[tuple[str, str]]
) -> Manifest:
    """A complete archive is there already (a crash after its manifest, or an earlier run of the same name): it
    counts only if it holds exactly this checkpoint's bytes, and its objects are all still there."""
    local = Manifest(existing.run, existing.checkpoint, existing.step, _hashed(files), links=tuple(links))
    problem = existing.same_content(local) or _objects_problem(store, where, existing)
    if problem:
        raise DestinationError(f"{shown} is archived already and differs from the checkpoint: {problem}; both kept")
    return existing


def _hashed(files: list[LocalFile]) -> tuple[FileEntry, ...]:
    return tuple(FileEntry(f.path, f.size, hash_local(f.full, f.size)[0]) for f in files)


def _objects_problem(store: ObjectStore, where: str, manifest: Manifest) -> str | None:
    """Why the objects below `where` are not the bytes `manifest` lists, or None. Each object must have the size
    and the ETag it was given when it was sent; where no ETag can tell (none recorded, or none given), the
    object is read back and its SHA-256 compared."""
    present = store.objects(where)
    for f in manifest.files:
        info = present.get(f.path)
        if info is None or int(info.get("size", -1)) != f.size:
            return f"{f.path} is missing in the store or has another size"
        if f.etag and _etag(info):
            if _etag(info) != f.etag:
                return f"{f.path} was written over in the store since it was archived (another writer at this prefix?)"
        elif _read_back(store, f"{where}/{f.path}") != f.sha256:
            return f"{f.path} in the store holds other bytes than the manifest says"
    return None


def _read_back(store: ObjectStore, key: str) -> str:
    digest = hashlib.sha256()
    with store.fs.open(key, "rb", block_size=READ_CHUNK) as remote:
        for chunk in iter_chunks(remote, READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _commit(store: ObjectStore, where: str, shown: str, manifest: Manifest) -> None:
    """Write the manifest (never over another one), then read it back."""
    fs = store.fs
    if store.exists(where + MANIFEST_SUFFIX):
        raise DestinationError(f"{shown}: another manifest appeared during the upload; left for the next pass")
    data = manifest.to_json()
    try:  # S3: written only if no manifest is there (If-None-Match), so of two writers one commits
        fs.pipe_file(where + MANIFEST_SUFFIX, data, **({"mode": "create"} if hasattr(fs, "call_s3") else {}))
    except Exception as e:  # s3fs says FileExistsError ("pre-conditions ... did not hold")
        if isinstance(e, FileExistsError) or "PreconditionFailed" in f"{type(e).__name__} {e!r}":
            raise DestinationError(
                f"{shown}: another manifest appeared during the upload; left for the next pass"
            ) from None
        raise
    fs.invalidate_cache(where + MANIFEST_SUFFIX)
    if fs.cat_file(where + MANIFEST_SUFFIX) != data:
        raise DestinationError(f"{shown}: the manifest read back differs from the one written")
    # Every object still the one sent: a writer at the same keys (another instance archiving a checkpoint of the
    # same path) could have written over one since it was verified. Then the source stays.
    problem = _objects_problem(store, where, manifest)
    if problem:
        raise DestinationError(f"{shown}: {problem}; the checkpoint is kept")


def _upload_all(
    store: ObjectStore,
    where: str,
    files: list[LocalFile],
    present: dict[str, dict[str, Any]],
    stop: StopCheck | None,
    progress: Progress | None,
) -> tuple[FileEntry, ...]:
    """Upload the files, FILES_IN_FLIGHT at a time; the first failure cancels the others (their multipart
    uploads are aborted) and is raised."""
    cancel = threading.Event()

    def halted() -> bool:
        return cancel.is_set() or (stop is not None and stop())

    def one(f: LocalFile) -> FileEntry:
        return _upload_one(store, f"{where}/{f.path}", f, present.get(f.path), halted, progress)

    with ThreadPoolExecutor(max_workers=FILES_IN_FLIGHT, thread_name_prefix="ckptkeeper-upload") as pool:
        futures: list[Future[FileEntry]] = [pool.submit(one, f) for f in sorted(files, key=lambda f: -f.size)]
        _done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        if pending:
            cancel.set()
            wait(pending)
    errors = [e for fut in futures if (e := fut.exception()) is not None]
    if errors:
        first = next((e for e in errors if not isinstance(e, StopRequested)), errors[0])
        raise first
    return tuple(sorted((fut.result() for fut in futures), key=lambda e: e.path))


def _etag(info: dict[str, Any] | None) -> str | None:
    value = (info or {}).get("ETag") or (info or {}).get("etag")
    return str(value).strip('"') if value else None


def _upload_one(
    store: ObjectStore,
    key: str,
    f: LocalFile,
    present: dict[str, Any] | None,
    halted: StopCheck,
    progress: Progress | None,
) -> FileEntry:
    if present is not None and int(present.get("size", -1)) == f.size and _etag(present):
        sha, etag = hash_local(f.full, f.size)
        if etag == _etag(present):  # sent whole by an upload cut short before its manifest: resumed
            if progress is not None:
                progress(f.size)
            return FileEntry(f.path, f.size, sha, etag)
    if f.size < part_size(f.size):  # one request; S3 answers with the ETag of what it received
        sha, etag, answered = _send_small(store, key, f, halted, progress)
        if answered == etag:
            return FileEntry(f.path, f.size, sha, etag)
    elif hasattr(store.fs, "call_s3"):  # S3: parts sent concurrently, PARTS_IN_FLIGHT at most
        sha, etag, answered = _send_parts(store, key, f, halted, progress)
        if answered == etag:
            return FileEntry(f.path, f.size, sha, etag)
    else:
        sha, etag = _send(store, key, f, halted, progress)
    stored = _verify(store, key, f, sha, etag)
    return FileEntry(f.path, f.size, sha, stored)


class _Parts:
    """One S3 multipart upload: parts read in order and hashed here, sent by a small pool, PARTS_IN_FLIGHT at a time
    (so memory holds at most that many parts, plus the one being read)."""

    def __init__(self, store: ObjectStore, key: str, progress: Progress | None) -> None:
        self.fs = store.fs
        self.bucket, self.key, _ = self.fs.split_path(key)
        self.progress = progress
        self.slots = threading.Semaphore(PARTS_IN_FLIGHT)
        self.upload_id: str = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)["UploadId"]

    def put(self, number: int, data: bytes) -> dict[str, Any]:
        try:
            out = self.fs.call_s3(
                "upload_part", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=data
            )
        finally:
            self.slots.release()
        if self.progress is not None:
            self.progress(len(data))
        return {"PartNumber": number, "ETag": out["ETag"]}

    def wait_slot(self, halted: StopCheck) -> None:
        while not self.slots.acquire(timeout=0.2):
            if halted():
                raise StopRequested("stopped between parts; nothing was committed")

    def complete(self, parts: list[dict[str, Any]]) -> str | None:
        done = self.fs.call_s3(
            "complete_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
            MultipartUpload={"Parts": parts},
        )  # fmt: skip
        return _etag(done)

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # a dead store keeps it: aborted at the next attempt (abort_unfinished)
            self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)


def _send_parts(
    store: ObjectStore, key: str, f: LocalFile, halted: StopCheck, progress: Progress | None
) -> tuple[str, str, str | None]:
    """Upload one file in parts of part_size(size): (SHA-256, the ETag S3 should give, the ETag it answered)."""
    psize, sha, md5s, sent = part_size(f.size), hashlib.sha256(), [], 0
    upload = _Parts(store, key, progress)
    futures: list[Future[dict[str, Any]]] = []
    try:
        with (
            ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="ckptkeeper-part") as pool,
            open(f.full, "rb") as src,
        ):
            while True:
                upload.wait_slot(halted)
                chunk = src.read(psize)
                failed = next((e for fu in futures if fu.done() and (e := fu.exception()) is not None), None)
                if not chunk or failed is not None or halted():
                    upload.slots.release()
                    if failed is not None:
                        raise failed
                    if chunk:
                        raise StopRequested("stopped between parts; nothing was committed")
                    break
                sha.update(chunk)
                md5s.append(hashlib.md5(chunk).digest())
                sent += len(chunk)
                futures.append(pool.submit(upload.put, len(futures) + 1, chunk))
            parts = [fu.result() for fu in futures]
        if sent != f.size:
            raise DestinationError(f"{f.path} changed while it was uploaded ({sent} bytes read, {f.size} expected)")
        answered = upload.complete(parts)
    except BaseException:
        upload.abort()
        raise
    return sha.hexdigest(), s3_etag(md5s, None), answered


def _send_small(
    store: ObjectStore, key: str, f: LocalFile, halted: StopCheck, progress: Progress | None
) -> tuple[str, str, str | None]:
    """A file smaller than one part, in one PUT: (SHA-256, its MD5, the ETag the store answered or None)."""
    if halted():
        raise StopRequested("stopped between files; nothing was committed")
    with open(f.full, "rb") as src:
        data = src.read(f.size + 1)
    if len(data) != f.size:
        raise DestinationError(f"{f.path} changed while it was uploaded ({len(data)} bytes read, {f.size} expected)")
    answer = store.fs.pipe_file(key, data)
    if progress is not None:
        progress(f.size)
    answered = _etag(answer) if isinstance(answer, dict) else None
    return hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest(), answered


def _send(store: ObjectStore, key: str, f: LocalFile, halted: StopCheck, progress: Progress | None) -> tuple[str, str]:
    """Upload one file in parts of part_size(size), one in flight; returns (SHA-256, the ETag S3 should give)."""
    psize = part_size(f.size)
    sha, whole = hashlib.sha256(), hashlib.md5()
    md5s: list[bytes] = []
    sent = 0
    remote = store.fs.open(key, "wb", block_size=psize)
    try:
        with open(f.full, "rb") as src:
            while chunk := src.read(psize):
                if halted():
                    raise StopRequested("stopped between parts; nothing was committed")
                sha.update(chunk)
                whole.update(chunk)
                md5s.append(hashlib.md5(chunk).digest())
                remote.write(chunk)
                sent += len(chunk)
                if progress is not None:
                    progress(len(chunk))
        if sent != f.size:
            raise DestinationError(f"{f.path} changed while it was uploaded ({sent} bytes read, {f.size} expected)")
    except BaseException:
        _abandon(remote)
        raise
    remote.close()
    return sha.hexdigest(), s3_etag(md5s, whole.digest() if f.size < psize else None)


def _abandon(remote: Any) -> None:
    """Abort the multipart upload (nothing half-sent stays behind; one a dead store keeps is aborted at the next
    attempt), and never let the file object commit what it holds when it is garbage-collected (fsspec's
    __del__ closes, and closing uploads and completes)."""
    with contextlib.suppress(Exception):
        remote.discard()
    remote.buffer = None
    remote.closed = True


def _verify(store: ObjectStore, key: str, f: LocalFile, sha: str, etag: str) -> str:
    """The object has the file's size, and the MD5s sent (the ETag); where the ETag is no MD5 of ours (SSE-KMS,
    another store), the object is read back and its SHA-256 compared. Returns the ETag the store gives it."""
    fs = store.fs
    fs.invalidate_cache(key)
    info = fs.info(key)
    if int(info.get("size", -1)) != f.size:
        raise DestinationError(f"{f.path}: the store holds {info.get('size')} bytes, {f.size} were sent")
    stored = _etag(info) or ""
    if stored == etag:
        return stored
    if _read_back(store, key) != sha:
        raise DestinationError(f"{f.path}: the object read back differs from the file sent")
    return stored


def iter_chunks(f: Any, size: int) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk


# ---------------------------------------------------------------------------------------------- a failing store
@dataclass
class Backoff:
    """A store that failed as a whole (DestinationDown) is tried again after a growing interval, not at every
    pass: FIRST_WAIT, doubled at each failure, at most MAX_WAIT; reset by a success."""

    first_wait: float = 5.0
    max_wait: float = 900.0
    wait: float = 0.0
    until: float = 0.0
    reason: str = ""
    failures: int = 0

    def left(self, now: float) -> float:
        return max(0.0, self.until - now) if self.reason else 0.0

    def failed(self, now: float, reason: str) -> None:
        self.wait = self.first_wait if not self.wait else min(self.wait * 2, self.max_wait)
        self.until = now + self.wait
        self.reason = reason
        self.failures += 1

    def succeeded(self) -> None:
        self.wait, self.until, self.reason = 0.0, 0.0, ""
