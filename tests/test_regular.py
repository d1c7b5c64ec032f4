"""regular.open_regular: a regular file opened for reading, and nothing else ever opened (a link is not followed;
a FIFO, device or socket is not opened at all: opening one releases a FIFO's writer, or may make a device act).
Used by every read of a file a user or a trainer may have put in a checkpoint or a state directory."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ckptkeeper.regular import NotRegular, open_regular


def read_all(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def test_a_regular_file_is_opened_for_reading_by_name_or_in_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f.json").write_bytes(b"{}")
    assert read_all(open_regular(tmp_path / "f.json")) == b"{}"
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = open_regular("f.json", dir_fd)
        assert os.fstat(fd).st_ino == (tmp_path / "f.json").stat().st_ino
        assert os.get_inheritable(fd) is False
        assert read_all(fd) == b"{}"
    finally:
        os.close(dir_fd)


def test_a_link_is_not_followed_even_to_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "target").write_text("secret")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(NotRegular) as caught:
        open_regular(tmp_path / "link")
    assert caught.value.kind == "a symbolic link" and stat.S_ISLNK(caught.value.mode)
    assert isinstance(caught.value, OSError)


def test_what_is_not_a_regular_file_says_what_it_is(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    kinds = {"dir": "a directory", "sock": "a socket"}
    if os.geteuid() == 0:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
        kinds["null"] = "a character device"
    try:
        for name, kind in kinds.items():
            with pytest.raises(NotRegular, match=kind):
                open_regular(tmp_path / name)
    finally:
        server.close()


def test_a_fifo_is_never_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "trainer_state.json"
    os.mkfifo(fifo)
    released = threading.Event()

    def writer() -> None:
        os.close(os.open(fifo, os.O_WRONLY))  # blocks until a reader opens the FIFO
        released.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    with pytest.raises(NotRegular, match="a FIFO"):
        open_regular(fifo)
    assert not released.wait(0.3), "the FIFO was opened: its writer was released"
    os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # release it ourselves
    thread.join(5)
    assert released.is_set()  # the writer was waiting: the check above could fail


def test_a_missing_file_is_the_opens_own_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "missing")


NO_PROC = r"""
import os, sys
from ckptkeeper.regular import NotRegular, open_regular

directory, swap_to = sys.argv[1], sys.argv[2]
assert not os.path.exists("/proc/self"), "/proc is still mounted"
dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
print("read:", os.read(open_regular("state.json", dir_fd), 100).decode())
try:
    open_regular("fifo", dir_fd)
except NotRegular as e:
    print("fifo:", e.kind)


def swap(event, args):  # between the O_PATH open and the open again, another file takes the name
    if event == "open" and args[0] == "state.json" and args[2] & os.O_NONBLOCK:
        os.rename(swap_to, "state.json", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


sys.addaudithook(swap)
try:
    open_regular("state.json", dir_fd)
except FileNotFoundError as e:
    print("swapped:", e.strerror)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to unmount /proc in a mount namespace of its own")
def test_without_proc_the_name_is_opened_again_and_must_be_the_same_inode(tmp_path: Path) -> None:
    """Where /proc is not mounted (a minimal container), the file is opened by name again; a FIFO is still
    refused before any open, and a file that took the name in between is refused (never read)."""
    (tmp_path / "state.json").write_text('{"global_step": 5}')
    (tmp_path / "other.json").write_text('{"global_step": 999}')
    os.mkfifo(tmp_path / "fifo")
    script = f"umount -l /proc && exec {sys.executable} -c '{NO_PROC}' {tmp_path} other.json"
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        timeout=30,
        check=False,
    )
    if done.returncode != 0 and "unshare" in done.stderr:
        pytest.skip(f"cannot make a mount namespace here: {done.stderr.strip()}")
    assert done.stdout.splitlines() == [
        'read: {"global_step": 5}',
        "fifo: a FIFO",
        "swapped: replaced while it was opened",
    ], done.stderr
    assert (tmp_path / "state.json").read_text() == '{"global_step": 999}'  # the swap happened
