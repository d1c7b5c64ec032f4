"""The scan memo (issue #12): `prune` writes down what each checkpoint's files said, under a digest of its lstat
signature, and a later `plan` or `prune` of an unchanged checkpoint reads none of its files. Every change the
signature sees (a file rewritten in place with its mtime put back, a file replaced, a chmod, an entry added) is
read afresh; a checkpoint written a moment before the look is never written down; a memo that is damaged,
planted through a link, of other code or in a directory that is not ckptkeeper's is ignored; `plan` writes
nothing. Real files, the real CLI in this process (the opens counted by an audit hook)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from memoutil import CONFIG, settled, settled_outputs

from ckptkeeper.cli import main
from ckptkeeper.policy import Policy
from ckptkeeper.readahead import _hint_file
from ckptkeeper.rules import parse_rules
from ckptkeeper.scan_memo import MEMO_NAME, MEMO_TEMP
from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.state import STATE_DIR_NAME
from ckptkeeper.watch import Daemon, WatchOptions
from tests.watchutil import wait_until

KEEP_ALL = ("--keep", "last:100")
_OPENED: list[str] = []


def _count_state_opens(event: str, args: tuple[object, ...]) -> None:
    """Opens that read a trainer_state.json (not readahead's hints, which read nothing: test_readahead.py)."""
    reads = event == "open" and args and str(args[0]).endswith("trainer_state.json")
    if reads and sys._getframe(2).f_code is not _hint_file.__code__:
        _OPENED.append(str(args[0]))


sys.addaudithook(_count_state_opens)


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def plan_json(root: Path) -> tuple[dict[str, object], int]:
    """The plan as JSON, and how many trainer_state.json files it opened."""
    _OPENED.clear()
    result = cli("plan", root, *KEEP_ALL, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output), len(_OPENED)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return settled_outputs(tmp_path)


def memo_path(root: Path) -> Path:
    return root / STATE_DIR_NAME / MEMO_NAME


def pruned(root: Path) -> None:
    result = cli("prune", root, *KEEP_ALL)
    assert result.exit_code == 0, result.output


def test_after_a_prune_plan_reads_no_unchanged_checkpoint_and_plans_the_same(root: Path) -> None:
    fresh, opened = plan_json(root)
    assert opened == 6 and not memo_path(root).exists()  # plan writes nothing
    pruned(root)
    remembered, opened = plan_json(root)
    assert opened == 0
    assert remembered == fresh
    memo_path(root).unlink()
    assert plan_json(root) == (fresh, 6)


def test_a_file_rewritten_in_place_with_its_size_and_mtime_kept_is_read_again(root: Path) -> None:
    pruned(root)
    state = root / "exp" / "checkpoint-15" / "trainer_state.json"
    before = state.stat()
    text = state.read_bytes()
    state.write_bytes(text[: len(text) // 2].ljust(len(text), b" "))  # truncated JSON, padded to its size
    os.utime(state, ns=(before.st_atime_ns, before.st_mtime_ns))
    plan, opened = plan_json(root)
    assert opened == 1
    [decision] = [d for d in plan["runs"][0]["checkpoints"] if d["name"] == "checkpoint-15"]  # type: ignore[index]
    assert decision["complete"] is False, decision


@pytest.mark.parametrize("change", ["replace", "chmod", "add", "remove"])
def test_every_change_the_signature_sees_is_read_again(root: Path, change: str) -> None:
    pruned(root)
    checkpoint = root / "exp" / "checkpoint-20"
    target = checkpoint / "trainer_state.json"
    if change == "replace":
        shutil.copy2(target, checkpoint / "copy")
        os.replace(checkpoint / "copy", target)
    elif change == "chmod":
        target.chmod(0o600)
    elif change == "add":
        (checkpoint / "extra.txt").write_text("x")
    else:
        (checkpoint / "training_args.bin").unlink()
    assert plan_json(root)[1] == 1


def test_a_checkpoint_written_a_moment_before_the_look_is_not_written_down(root: Path) -> None:
    simulate_run(root / "late", SimConfig(steps_per_epoch=5, epochs=1, save_steps=5, eval_steps=5))
    pruned(root)  # at once: the new checkpoint's signature cannot vouch for it yet
    held = json.loads(memo_path(root).read_bytes())["entries"]
    assert not [k for k in held if os.sep + "late" + os.sep in k]
    assert len(held) == 6
    assert plan_json(root)[1] == 1


@pytest.mark.parametrize(
    "damage",
    [b"", b"{not json", b"[]", b'{"code": "other", "entries": {}}', b"\x00" * 100, b'{"code": 1}'],
    ids=["empty", "truncated", "list", "other code", "binary", "no entries"],
)
def test_a_damaged_memo_is_ignored_and_the_files_read(root: Path, damage: bytes) -> None:
    pruned(root)
    fresh = plan_json(root)[0]
    memo_path(root).write_bytes(damage)
    assert plan_json(root) == (fresh, 6)


def test_entries_of_the_wrong_shape_are_ignored_one_by_one(root: Path) -> None:
    pruned(root)
    fresh = plan_json(root)[0]
    memo = json.loads(memo_path(root).read_bytes())
    keys = sorted(memo["entries"])
    bad = [
        ["x", memo["entries"][keys[1]][1]],  # another signature's digest
        [memo["entries"][keys[2]][0], {"problems": "no"}],
        [memo["entries"][keys[3]][0], {**memo["entries"][keys[3]][1], "metrics": {"eval_loss": "0.1"}}],
        [memo["entries"][keys[4]][0], {**memo["entries"][keys[4]][1], "marker": {"times_ns": [1]}}],
        "not a list",
    ]
    for key, entry in zip(keys[1:], bad, strict=True):
        memo["entries"][key] = entry
    memo_path(root).write_text(json.dumps(memo))
    assert plan_json(root) == (fresh, 5)


def test_a_planted_memo_that_calls_a_broken_checkpoint_complete_is_not_believed(root: Path) -> None:
    """The digest is of the signature as it is now: a memo written before a checkpoint broke cannot vouch for
    it, whatever it says."""
    pruned(root)
    (root / "exp" / "checkpoint-25" / "model.safetensors").write_bytes(b"\x00" * 7)
    plan, opened = plan_json(root)
    [decision] = [d for d in plan["runs"][0]["checkpoints"] if d["name"] == "checkpoint-25"]  # type: ignore[index]
    assert opened == 1 and decision["complete"] is False


def test_a_memo_reached_through_a_link_is_ignored(root: Path, tmp_path: Path) -> None:
    """(A memo in a directory that is not ckptkeeper's is never reached: plan refuses such a state directory.)"""
    pruned(root)
    fresh = plan_json(root)[0]
    elsewhere = tmp_path / "planted.json"
    memo_path(root).rename(elsewhere)
    memo_path(root).symlink_to(elsewhere)
    assert plan_json(root) == (fresh, 6)


def test_a_memo_that_cannot_be_written_costs_prune_nothing(root: Path) -> None:
    pruned(root)
    memo_path(root).unlink()
    (root / STATE_DIR_NAME / MEMO_TEMP).mkdir()  # the temporary name taken: the write fails
    result = cli("prune", root, "--keep", "last:2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (root / "exp").iterdir()) == ["checkpoint-25", "checkpoint-30"]
    assert not memo_path(root).exists()


def test_prune_drops_the_entries_of_checkpoints_it_no_longer_sees(root: Path) -> None:
    pruned(root)
    pruned_again = cli("prune", root, "--keep", "last:2")
    assert pruned_again.exit_code == 0, pruned_again.output
    pruned(root)
    held = json.loads(memo_path(root).read_bytes())["entries"]
    assert sorted(Path(k).name for k in held) == ["checkpoint-25", "checkpoint-30"]


# ---------------------------------------------------------------------------------------------- the watch daemon
class Watching:
    """A real Daemon on a thread of this process (its opens seen by the audit hook), until `stop`."""

    def __init__(self, root: Path, dry_run: bool = False) -> None:
        options = WatchOptions(settle=0.0, rescan_interval=3600.0, dry_run=dry_run)
        self.daemon = Daemon(root, Policy(parse_rules("last:100")), root / STATE_DIR_NAME, options)
        self.thread = threading.Thread(target=self.daemon.run, name="test-daemon")
        self.thread.start()
        wait_until(lambda: self.daemon.last_reconcile is not None, 20, "the first pass")

    def stop(self) -> None:
        self.daemon.request_stop()
        self.thread.join(20)
        assert not self.thread.is_alive()


def test_watch_writes_the_memo_after_its_first_pass_and_a_restart_reads_no_unchanged_checkpoint(root: Path) -> None:
    first = Watching(root)
    first.stop()
    assert len(json.loads(memo_path(root).read_bytes())["entries"]) == 6
    broken = root / "exp" / "checkpoint-10" / "trainer_state.json"
    broken.write_bytes(broken.read_bytes()[:100])  # changed while no daemon ran
    _OPENED.clear()
    second = Watching(root)
    try:
        assert len(_OPENED) == 1, _OPENED  # the broken one, read through its directory's descriptor (below)
    finally:
        second.stop()
    plan, opened = plan_json(root)
    [decision] = [d for d in plan["runs"][0]["checkpoints"] if d["name"] == "checkpoint-10"]  # type: ignore[index]
    assert decision["complete"] is False and opened == 1  # written down by no one: never vouched for


def test_watch_dry_run_writes_no_memo(root: Path) -> None:
    Watching(root, dry_run=True).stop()
    assert not (root / STATE_DIR_NAME).exists()


def test_on_a_nearly_full_filesystem_the_memo_is_not_written(mount: Callable[..., Path]) -> None:
    """A really full tmpfs: a cache must not take the last megabytes a training run needs to save."""
    small = mount("tmpfs", "small", "size=80m")
    simulate_run(small / "exp", CONFIG)
    settled()
    pruned(small)
    assert memo_path(small).exists()  # 80 MiB, nearly all free: room enough
    filler = small / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (40 << 20))
    pruned(small)
    assert not (small / STATE_DIR_NAME / MEMO_TEMP).exists()
    held = json.loads(memo_path(small).read_bytes())
    filler.unlink()
    (small / "exp" / "checkpoint-5").rename(small / "elsewhere")
    with open(filler, "wb") as f:
        f.write(b"\0" * (40 << 20))
    pruned(small)  # not written: the memo still holds the checkpoint that has gone since
    assert json.loads(memo_path(small).read_bytes()) == held
