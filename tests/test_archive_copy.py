"""The copy of an archive to another filesystem (`actions._TreeCopy`, issue #12): every chunk of every file is
read back from the copy and compared with the source's bytes, every link's target read back; every file and
directory of the copy is fsynced before the copy is renamed into place, also where fsyncs are slow (then the
rest run on threads). Real filesystems: FUSE passthroughs (tests/loopfs.py) that store a write other than it
was given, or write down each fsync and rename; nothing of ckptkeeper is mocked."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuseutil import fuse_mounted

from ckptkeeper.actions import ARCHIVE_TEMP_PREFIX, ActionError, _TreeCopy, archive_checkpoint
from ckptkeeper.integrity import encode_safetensors
from ckptkeeper.paths import kernel_holds_data
from ckptkeeper.state import StateDir

TESTS = Path(__file__).parent

FS = '''
import os, sys, time
sys.path.insert(0, sys.argv[4])
import mfusepy as fuse
from loopfs import Passthrough

class Links(Passthrough):
    """loopfs, but a link's times are set on the link, not on what it leads to (utimensat AT_SYMLINK_NOFOLLOW)."""

    def utimens(self, path, times=None):
        os.utime(self._real(path), ns=times, follow_symlinks=False)

class Corrupting(Links):
    """Stores every write to a file named optimizer.pt with its first byte flipped (a bad NAS, a buggy network
    filesystem). Mounted with direct_io, as such filesystems often are: a read gets what was stored."""

    def write(self, path, data, offset, fh):
        if path.endswith("/optimizer.pt") and data:
            data = bytes([data[0] ^ 0xFF]) + bytes(data[1:])
        return super().write(path, data, offset, fh)

class Recording(Links):
    """Writes one line per fsync (of a file or a directory) and per rename to the log, each fsync taking
    DELAY seconds (a disk's journal commit)."""

    def __init__(self, source, log, delay):
        super().__init__(source)
        self.log, self.delay = log, delay

    def _note(self, *what):
        with open(self.log, "a") as f:
            f.write("\\t".join(what) + "\\n")

    def fsync(self, path, datasync, fh):
        time.sleep(self.delay)
        self._note("fsync", path)
        return super().fsync(path, datasync, fh)

    def fsyncdir(self, path, datasync, fh):
        time.sleep(self.delay)
        self._note("fsync", path)
        return 0

    def rename(self, old, new):
        self._note("rename", old, new)
        return super().rename(old, new)

kind, options = sys.argv[3], {"attr_timeout": 0, "entry_timeout": 0}
if kind == "corrupting":
    ops, options["direct_io"] = Corrupting(sys.argv[1]), True
else:
    ops = Recording(sys.argv[1], sys.argv[5], float(sys.argv[6]))
fuse.FUSE(ops, sys.argv[2], foreground=True, allow_other=True, use_ino=True, **options)
'''


@contextlib.contextmanager
def fuse_mount(tmp_path: Path, kind: str, *extra: str) -> Iterator[Path]:
    """A FUSE passthrough of a fresh directory, as `kind` says (FS), mounted for the test."""
    script, source, mount_point = tmp_path / "fs.py", tmp_path / "store", tmp_path / "mnt"
    script.write_text(FS)
    source.mkdir()
    with fuse_mounted(mount_point, script, str(source), str(mount_point), kind, str(TESTS), *extra):
        yield mount_point


def checkpoint(run: Path, step: int, files: int = 30) -> Path:
    """A checkpoint with a valid safetensors file, a 3 MiB optimizer.pt, many small files in a subdirectory,
    an empty directory and two links (one dangling)."""
    directory = run / f"checkpoint-{step}"
    (directory / "shards").mkdir(parents=True)
    (directory / "empty").mkdir()
    data = os.urandom(4 * 64)
    (directory / "model.safetensors").write_bytes(encode_safetensors({"w": ("float32", [64], data)}, {"format": "pt"}))
    (directory / "optimizer.pt").write_bytes(os.urandom(3 << 20))
    for i in range(files):
        (directory / "shards" / f"part-{i:03d}.json").write_text(f'{{"part": {i}}}\n')
    (directory / "latest").symlink_to("shards/part-000.json")
    (directory / "gone").symlink_to("../nowhere")
    return directory


def manifest(top: Path) -> dict[str, tuple[str, str]]:
    """Relative path -> (kind, SHA-256 or link target) of everything below `top`, links not followed."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(top))
            if full.is_symlink():
                found[rel] = ("link", os.readlink(full))
            elif full.is_dir():
                found[rel] = ("dir", "")
            else:
                found[rel] = ("file", hashlib.sha256(full.read_bytes()).hexdigest())
    return found


def test_a_copy_whose_bytes_read_back_differ_fails_and_the_source_stays_whole(tmp_path: Path) -> None:
    root = tmp_path / "root"
    source = checkpoint(root / "run", 5)
    before = manifest(source)
    state = StateDir(root / "_ckptkeeper")
    with fuse_mount(tmp_path, "corrupting") as mnt:
        target = mnt / "archive" / "run" / "checkpoint-5"

        with pytest.raises(ActionError, match=r"does not match: optimizer\.pt: the bytes read back from the copy"):
            archive_checkpoint(root, source, target, state)

        assert sorted(os.listdir(target.parent)) == []  # the bad copy removed, never under the final name
    assert manifest(source) == before
    assert not state.trash.exists() or not any(state.trash.iterdir())


@pytest.mark.parametrize("delay", [0.0, 0.005], ids=["fast-fsync", "slow-fsync"])
def test_every_file_and_directory_of_the_copy_is_fsynced_before_it_is_renamed_into_place(
    tmp_path: Path, delay: float
) -> None:
    """0 s: each fsync through the descriptor that made the file; 5 ms (more than SLOW_FSYNC): after the first,
    the rest are left to _fsync_all's threads."""
    root = tmp_path / "root"
    source = checkpoint(root / "run", 5)
    before = manifest(source)
    log = tmp_path / "ops.log"
    log.touch()
    with fuse_mount(tmp_path, "recording", str(log), str(delay)) as mnt:
        target = mnt / "archive" / "run" / "checkpoint-5"

        assert archive_checkpoint(root, source, target, StateDir(root / "_ckptkeeper")) == "copied"

        assert manifest(target) == before
        ops = [line.split("\t") for line in log.read_text().splitlines()]
    [into_place] = [i for i, op in enumerate(ops) if op[0] == "rename" and op[2] == "/archive/run/checkpoint-5"]
    temp = ops[into_place][1]
    assert temp.startswith(f"/archive/run/{ARCHIVE_TEMP_PREFIX}checkpoint-5.")
    fsynced = {op[1] for op in ops[:into_place] if op[0] == "fsync"}
    links = {rel for rel, (kind, _) in before.items() if kind == "link"}
    expected = {temp} | {f"{temp}/{rel}" for rel in before if rel not in links}
    assert expected - fsynced == set()
    assert not source.exists()


def test_a_copy_is_read_back_only_where_a_process_or_a_server_answers_the_reads(tmp_path: Path, tmpfs: Path) -> None:
    """On a filesystem this kernel serves from its page cache the read-back would compare a buffer with itself,
    so it is skipped there; through FUSE (and anything not known) it is kept. The copy is whole either way."""
    copier = _TreeCopy(None)
    source = checkpoint(tmp_path / "run", 5, files=3)
    log = tmp_path / "ops.log"
    log.touch()
    with fuse_mount(tmp_path, "recording", str(log), "0") as mnt:
        for where in (Path(tempfile.mkdtemp(dir=tmpfs)), mnt / "copy-5"):
            where.mkdir(exist_ok=True)
            src_fd, dst_fd = os.open(source, os.O_RDONLY), os.open(where, os.O_RDONLY)
            try:
                copier.contents(src_fd, dst_fd, "")
            finally:
                os.close(src_fd)
                os.close(dst_fd)
            assert manifest(where) == manifest(source)
            shutil.rmtree(where)
        assert copier.reads_back_on == {tmpfs.stat().st_dev: False, mnt.stat().st_dev: True}
    assert kernel_holds_data(tmpfs.stat().st_dev)
    assert not kernel_holds_data(os.makedev(4095, 4095))  # a device the mount table does not know
