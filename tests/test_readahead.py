"""Read-ahead hints (issue #12, a first `plan` with the page cache dropped): a one-shot scan asks the kernel to
read the files of the next checkpoints while it parses this one; it never hints what a memo already knows (a
`plan` after a `prune` reads nothing), never follows a link or opens what is not a regular file, and the plan
is the same with or without hints. Page-cache residency is asked of the kernel (mincore) on a real disk
filesystem; where the files cannot be evicted (a tmpfs), the tests that need it are skipped."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from memoutil import settled_outputs

from ckptkeeper.cli import main
from ckptkeeper.readahead import HINTED, Readahead, hint_checkpoint

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_hinted: list[str] = []


def _count_hints(event: str, args: tuple[object, ...]) -> None:
    if event == "open" and args and sys._getframe(1).f_code is hint_checkpoint.__code__:
        _hinted.append(str(args[0]))


sys.addaudithook(_count_hints)


def resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache now."""
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    with path.open("rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        start = ctypes.c_char.from_buffer(mapped)
        try:
            if _LIBC.mincore(ctypes.addressof(start), size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del start  # the mapping cannot close while a pointer into it exists
    return sum(v & 1 for v in vector)


def evict(*paths: Path) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if any(resident_pages(p) for p in paths):
        pytest.skip("this filesystem keeps its files in memory (tmpfs?): nothing to read ahead")


def wait_resident(path: Path, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (pages := resident_pages(path)) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    return pages


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    top = tmp_path / "checkpoint-10"
    top.mkdir()
    (top / "trainer_state.json").write_bytes(json.dumps({"global_step": 10, "pad": "x" * (1 << 18)}).encode())
    (top / "model.safetensors").write_bytes(os.urandom(1 << 20))
    return top


def test_a_hint_brings_the_state_and_the_weights_header_into_the_page_cache(checkpoint: Path) -> None:
    state, weights = checkpoint / "trainer_state.json", checkpoint / "model.safetensors"
    evict(state, weights)
    Readahead([str(checkpoint)]).reading(0)
    assert wait_resident(state) == -(-state.stat().st_size // mmap.PAGESIZE)  # the whole file
    assert wait_resident(weights) > 0  # its head: the header is read from there


def test_hints_run_depth_ahead_and_skip_what_will_not_be_read(tmp_path: Path) -> None:
    directories = [tmp_path / f"checkpoint-{i}" for i in range(6)]
    for d in directories:
        d.mkdir()
        (d / "trainer_state.json").write_text("{}")
    ahead = Readahead([None if i == 3 else str(d) for i, d in enumerate(directories)], depth=2)
    _hinted.clear()
    ahead.reading(0)
    assert _hinted == [str(directories[0] / "trainer_state.json"), str(directories[1] / "trainer_state.json")]
    ahead.reading(1)
    ahead.reading(1)  # asked again: hinted once
    ahead.reading(3)
    assert [Path(p).parent.name for p in _hinted] == ["checkpoint-0", "checkpoint-1", "checkpoint-2", "checkpoint-4"]
    ahead.reading(5)
    assert len(_hinted) == 5


def test_a_hint_follows_no_link_and_opens_no_fifo(checkpoint: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_bytes(b"{}" + b" " * (1 << 18))
    state = checkpoint / "trainer_state.json"
    state.unlink()
    state.symlink_to(outside)
    weights = checkpoint / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    evict(outside)
    _hinted.clear()
    hint_checkpoint(str(checkpoint))  # a FIFO opened for reading would be a reader a writer could then meet
    assert _hinted == []
    time.sleep(0.2)
    assert resident_pages(outside) == 0


def test_a_hint_of_a_vanished_or_unreadable_checkpoint_is_no_error(tmp_path: Path) -> None:
    hint_checkpoint(str(tmp_path / "checkpoint-404"))
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").mkdir()  # a directory of that name
    hint_checkpoint(str(tmp_path / "checkpoint-5"))


def plan(root: Path, *extra: str) -> dict[str, object]:
    result = CliRunner().invoke(main, ["plan", str(root), "--keep", "last:100", "--json", *extra])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return settled_outputs(tmp_path)


def states(root: Path) -> list[Path]:
    return sorted(root.glob("exp/checkpoint-*/trainer_state.json"))


def test_a_first_plan_hints_every_checkpoint_it_reads(root: Path) -> None:
    _hinted.clear()
    plan(root)
    weights = [p.parent / HINTED[1][0] for p in states(root)]
    assert all(w.is_file() for w in weights)
    assert sorted(_hinted) == sorted(str(p) for p in [*states(root), *weights])


def test_a_plan_after_a_prune_hints_and_reads_nothing(root: Path) -> None:
    result = CliRunner().invoke(main, ["prune", str(root), "--keep", "last:100"])
    assert result.exit_code == 0, result.output
    evict(*states(root))
    _hinted.clear()
    plan(root)
    assert _hinted == []
    time.sleep(0.2)
    assert [resident_pages(p) for p in states(root)] == [0] * len(states(root))
    (root.parent / "elsewhere").mkdir()
    plan(root, "--state-dir", str(root.parent / "elsewhere"))  # no memo there: every file is read
    assert all(resident_pages(p) for p in states(root))
