"""Read-ahead hints (issue #12, a first `plan` with the page cache dropped): a one-shot scan asks the kernel to
read the files of the next checkpoints while it parses this one; it never hints what a memo already knows (a
`plan` after a `prune` reads nothing), never follows a link or opens what is not a regular file, and the plan
is the same with or without hints. Page-cache residency is asked of the kernel (mincore) on a real disk
filesystem; where the files cannot be evicted (a tmpfs), the tests that need it are skipped."""

from __future__ import annotations

import json
import mmap
import os
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from memoutil import evict, resident_pages, settled_outputs

from ckptkeeper.cli import main
from ckptkeeper.readahead import Readahead, hint_checkpoint

_hinted: list[str] = []  # the checkpoint directories the hints opened (each file then through it)


def _count_hints(event: str, args: tuple[object, ...]) -> None:
    if event == "open" and args and sys._getframe(1).f_code is hint_checkpoint.__code__:
        _hinted.append(str(args[0]))


sys.addaudithook(_count_hints)


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
    assert [str(directories[0]), str(directories[1])] == _hinted
    ahead.reading(1)
    ahead.reading(1)  # asked again: hinted once
    ahead.reading(3)
    assert [Path(p).name for p in _hinted] == ["checkpoint-0", "checkpoint-1", "checkpoint-2", "checkpoint-4"]
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
    hint_checkpoint(str(checkpoint))  # (a FIFO is never opened: tests/test_review_session9.py)
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
    assert sorted(_hinted) == sorted(str(p.parent) for p in states(root))


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
