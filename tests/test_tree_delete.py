"""`actions.delete_entry`'s tree delete (`_TreeDelete`) on hostile trees, on a real filesystem.

A trash entry is deleted through descriptors: links are unlinked, never followed (one swapped in for a
directory mid-delete included); another filesystem mounted inside, before or during the delete, is never
emptied; read-only and unsearchable directories are opened up through their own descriptors (for a non-root
user: root ignores modes, so those run in a child process as `nobody`); a tree deeper than Python's recursion
limit and than the descriptors it may hold is deleted without a crash or a leaked descriptor; FIFOs, sockets
and names that are not UTF-8 go like any file. The delete is observed, not mocked: the only hook is the
`stop` callable the deleter asks between entries, used here to change the tree at that moment.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckptkeeper.actions import FD_WINDOW, Stopped, TrashEntry, delete_entry

NOBODY = 65534
OUTSIDE_FILES = {"keep.txt": b"outside, must stay\n", "sub/deeper.bin": b"\x00" * 100}


@pytest.fixture
def trash(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "trash"
    where.mkdir()
    yield where
    for top, dirs, _ in os.walk(where):  # a failed test may leave read-only directories behind
        for name in dirs:
            os.chmod(os.path.join(top, name), stat.S_IRWXU)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the trash that links in the trees point to: it must stay byte for byte."""
    where = tmp_path / "outside"
    for name, data in OUTSIDE_FILES.items():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_bytes(data)
    return where


def outside_intact(outside: Path) -> bool:
    found = {str(p.relative_to(outside)): p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    return found == OUTSIDE_FILES


def delete(trash: Path, name: str, stop: Callable[[], bool] | None = None) -> None:
    fd = os.open(trash, os.O_RDONLY | os.O_DIRECTORY)
    try:
        delete_entry(TrashEntry(fd, name, trash / name), stop)
    finally:
        os.close(fd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------------------------------- kinds of entry
def test_every_kind_of_entry_goes_and_nothing_a_link_points_to(trash: Path, outside: Path) -> None:
    entry = trash / "0123456789ab.checkpoint-5"
    (entry / "nested" / "more").mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"m" * 4096)
    (entry / "nested" / "more" / "zero_rank_0.pt").write_bytes(b"z" * 10)
    (entry / "link-to-dir").symlink_to(outside)
    (entry / "nested" / "link-to-file").symlink_to(outside / "keep.txt")
    (entry / "dangling").symlink_to(outside / "nothing-here")
    os.link(outside / "keep.txt", entry / "hard-link")
    os.mkfifo(entry / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:  # bound where the path is short, then moved in
        short = Path(tempfile.mkdtemp(prefix="ck-")) / "s"
        sock.bind(str(short))
        os.rename(short, entry / "nested" / "socket")
        short.parent.rmdir()
    odd = os.fsencode(entry) + b"/\xff\xfe-not-utf8"
    os.mkdir(odd)
    with open(odd + b"/\n-newline \xe2\x98\x83", "wb") as f:
        f.write(b"x")
    (entry / "-rf").write_bytes(b"a name like an option")
    (entry / "ünïcödé ✓").mkdir()

    delete(trash, entry.name)

    assert os.listdir(trash) == []
    assert outside_intact(outside)
    assert os.stat(outside / "keep.txt").st_nlink == 1


def test_an_entry_that_is_a_file_or_a_link_is_unlinked(trash: Path, outside: Path) -> None:
    (trash / "aaaaaaaaaaaa.checkpoint-1").write_bytes(b"f")
    (trash / "bbbbbbbbbbbb.checkpoint-2").symlink_to(outside)
    delete(trash, "aaaaaaaaaaaa.checkpoint-1")
    delete(trash, "bbbbbbbbbbbb.checkpoint-2")
    assert os.listdir(trash) == [] and outside_intact(outside)


def test_an_entry_already_gone_is_not_an_error(trash: Path) -> None:
    delete(trash, "cccccccccccc.checkpoint-3")


# ---------------------------------------------------------------------------------------------- deep trees
def test_a_tree_deeper_than_the_recursion_limit_and_the_descriptor_window(trash: Path) -> None:
    depth = 2500  # > sys.getrecursionlimit() (1000) and > FD_WINDOW; paths > PATH_MAX (4096) on the way down
    assert depth > 10 * FD_WINDOW
    entry = trash / "dddddddddddd.checkpoint-4"
    entry.mkdir()
    fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            os.close(os.open(f"file-{level}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
            os.mkdir("deeper", dir_fd=fd)
            next_fd = os.open("deeper", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    finally:
        os.close(fd)
    held = open_fds()

    delete(trash, entry.name)

    assert os.listdir(trash) == []
    assert open_fds() == held


# ---------------------------------------------------------------------------------------------- races
def test_a_directory_swapped_for_a_link_mid_delete_is_unlinked_not_followed(trash: Path, outside: Path) -> None:
    entry = trash / "eeeeeeeeeeee.checkpoint-5"
    (entry / "global_step5").mkdir(parents=True)
    (entry / "global_step5" / "shard.pt").write_bytes(b"s")
    (entry / "a-file-first").write_bytes(b"f")  # the deleter asks `stop` before it: the swap happens there
    moved_away = trash.parent / "moved-away"
    swaps: list[bool] = []

    def swap() -> bool:
        if not swaps:
            os.rename(entry / "global_step5", moved_away)
            (entry / "global_step5").symlink_to(outside, target_is_directory=True)
            swaps.append(True)
        return False

    delete(trash, entry.name, stop=swap)

    assert swaps and os.listdir(trash) == []
    assert outside_intact(outside)
    assert (moved_away / "shard.pt").read_bytes() == b"s"


def test_a_stop_leaves_the_rest_in_the_trash_and_a_second_delete_finishes_it(trash: Path) -> None:
    entry = trash / "ffffffffffff.checkpoint-6"
    for part in ("a", "b", "c"):
        (entry / part).mkdir(parents=True)
        for i in range(5):
            (entry / part / f"{i}.bin").write_bytes(b"x")
    asked: list[bool] = []

    def stop_after_a_few() -> bool:
        asked.append(True)
        return len(asked) > 4

    with pytest.raises(Stopped, match="finished on the next start"):
        delete(trash, entry.name, stop=stop_after_a_few)
    assert entry.is_dir()  # partly deleted, still in the trash
    delete(trash, entry.name)
    assert os.listdir(trash) == []


# ---------------------------------------------------------------------------------------------- mounts
def _mount(args: list[str]) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} failed: {done.stderr.strip()}")


def _umount(where: Path) -> None:
    if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_a_bind_mount_inside_is_refused_before_anything_is_deleted(trash: Path, outside: Path) -> None:
    entry = trash / "111111111111.checkpoint-7"
    (entry / "mnt").mkdir(parents=True)
    (entry / "optimizer.pt").write_bytes(b"o")
    _mount(["--bind", str(outside), str(entry / "mnt")])  # the same filesystem: only the mount table tells
    try:
        with pytest.raises(OSError, match="a filesystem is mounted inside it") as raised:
            delete(trash, entry.name)
        assert raised.value.errno == errno.EBUSY
        assert (entry / "optimizer.pt").exists() and outside_intact(outside)
    finally:
        _umount(entry / "mnt")
    delete(trash, entry.name)
    assert os.listdir(trash) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_a_filesystem_mounted_inside_mid_delete_is_not_descended_into(trash: Path) -> None:
    entry = trash / "222222222222.checkpoint-8"
    (entry / "zzz-mnt").mkdir(parents=True)
    (entry / "a-file-first").write_bytes(b"f")
    mounted: list[Path] = []

    def mount_now() -> bool:
        if not mounted:  # after delete_entry's look at the mount table, before the deleter enters zzz-mnt
            _mount(["-t", "tmpfs", "-o", "size=1m", "ckptkeeper-test", str(entry / "zzz-mnt")])
            (entry / "zzz-mnt" / "precious").write_bytes(b"p")
            mounted.append(entry / "zzz-mnt")
        return False

    try:
        with pytest.raises(OSError, match="another filesystem is mounted here") as raised:
            delete(trash, entry.name, stop=mount_now)
        assert raised.value.errno == errno.EXDEV and raised.value.filename == str(entry / "zzz-mnt")
        assert (entry / "zzz-mnt" / "precious").read_bytes() == b"p"
    finally:
        for where in mounted:
            _umount(where)
    delete(trash, entry.name)
    assert os.listdir(trash) == []


# ---------------------------------------------------------------------------------------------- permissions
def _read_only_tree(entry: Path) -> None:
    """Directories a non-root owner cannot delete from as they are: read-only, unsearchable, unreadable."""
    for sub in ("ro/inner", "closed/inner", "read-only-no-search"):
        (entry / sub).mkdir(parents=True)
        (entry / sub / "file.bin").write_bytes(b"x")
    (entry / "closed" / "file.bin").write_bytes(b"x")
    for sub, mode in (
        ("ro/inner", 0o500),
        ("ro", 0o500),
        ("closed/inner", 0),
        ("closed", 0),
        ("read-only-no-search", 0o400),
    ):
        os.chmod(entry / sub, mode)


def _delete_as(uid: int, trash: Path, name: str) -> str:
    """delete_entry in a child process running as `uid` (forked: the code is the test's); its error, or ''."""
    trash_fd = os.open(trash, os.O_RDONLY | os.O_DIRECTORY)  # opened here: `nobody` cannot reach tmp_path
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no return from here
        code = 0
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            delete_entry(TrashEntry(trash_fd, name, trash / name))
        except BaseException as e:
            os.write(write, repr(e).encode())
            code = 1
        os._exit(code)
    os.close(write)
    os.close(trash_fd)
    with os.fdopen(read, "rb") as f:
        said = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return said or ("" if os.waitstatus_to_exitcode(status) == 0 else f"exit status {status}")


def test_read_only_and_unsearchable_directories_are_deleted_for_their_owner(trash: Path) -> None:
    entry = trash / "333333333333.checkpoint-9"
    _read_only_tree(entry)
    if os.geteuid() != 0:
        delete(trash, entry.name)
    else:  # root ignores modes: the owner is `nobody`, in a child process
        for top, dirs, files in os.walk(trash):
            for name in [*dirs, *files]:
                os.lchown(os.path.join(top, name), NOBODY, NOBODY)
        os.chown(trash, NOBODY, NOBODY)
        assert _delete_as(NOBODY, trash, entry.name) == ""
    assert os.listdir(trash) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chattr +i needs root")
def test_a_file_that_cannot_go_is_an_error_naming_it_as_the_trash_shows_it(trash: Path) -> None:
    entry = trash / "444444444444.checkpoint-10"
    (entry / "inner").mkdir(parents=True)
    stuck = entry / "inner" / "optimizer.pt"
    stuck.write_bytes(b"o")
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(stuck)], check=False).returncode:
        pytest.skip("no immutable attribute here (chattr +i)")
    try:
        with pytest.raises(OSError) as raised:
            delete(trash, entry.name)
        assert (raised.value.errno, raised.value.filename) == (errno.EPERM, str(stuck))
        assert stuck.exists()
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=False)
    delete(trash, entry.name)
    assert os.listdir(trash) == []
