"""Finding runs and judging checkpoints on real directories: completeness per SPEC, names, symlinks, hidden and
excluded directories, nesting and the depth limit, sizes, and the settle time."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from ckptkeeper.integrity import encode_safetensors
from ckptkeeper.scan import (
    DEFAULT_MAX_DEPTH,
    ScanResult,
    checkpoint_step,
    find_run_dirs,
    read_checkpoint,
    read_run,
    scan_root,
)

HF = Path(__file__).parent / "fixtures" / "hf"
A10 = HF / "A" / "checkpoint-10"
A10_SIZE = 35104  # the seven files of A/checkpoint-10 (see test_fixtures_hf)


def writable_copy(source: Path, target: Path) -> Path:
    """Copy a real checkpoint; the fixtures are read-only in git, a Trainer's output is not."""
    shutil.copytree(source, target)
    os.chmod(target, 0o755)
    for p in target.iterdir():
        os.chmod(p, 0o644)
    return target


def real_checkpoint(run: Path, name: str = "checkpoint-10") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    return writable_copy(A10, run / name)


def small_checkpoint(run: Path, step: int, name: str | None = None, epoch: float = 1.0) -> Path:
    """A minimal complete checkpoint: trainer_state.json and a valid model.safetensors."""
    directory = run / (name or f"checkpoint-{step}")
    directory.mkdir(parents=True)
    model = encode_safetensors({"w": ("float32", [4], bytes(16))}, {"format": "pt"})
    (directory / "model.safetensors").write_bytes(model)
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": epoch}))
    return directory


def runs_of(root: Path, **kwargs: Any) -> list[str]:
    result = scan_root(root, **kwargs)
    assert result.warnings == []
    return [r.path for r in result.runs]


def scan_with_deadline(root: Path, seconds: float = 20.0) -> ScanResult:
    """scan_root in a thread; fail (instead of hanging the suite) when it does not return in time."""
    out: list[ScanResult] = []
    worker = threading.Thread(target=lambda: out.append(scan_root(root)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "scan_root did not return: it is following a symlink loop"
    return out[0]


# --- completeness ------------------------------------------------------------------------------------


def test_a_real_checkpoint_is_complete(tmp_path: Path) -> None:
    c = read_checkpoint(real_checkpoint(tmp_path), 10)
    assert (c.name, c.step, c.complete, c.incomplete_reason) == ("checkpoint-10", 10, True, None)
    assert c.size_bytes == A10_SIZE
    assert c.epoch == 0.38461538461538464
    assert c.metrics["eval_loss"] == 0.6639836430549622
    assert c.trainer_best_step == 10
    assert c.training_stopped is False


def test_missing_trainer_state(tmp_path: Path) -> None:
    directory = real_checkpoint(tmp_path)
    (directory / "trainer_state.json").unlink()
    c = read_checkpoint(directory, 10)
    assert (c.complete, c.incomplete_reason) == (False, "no trainer_state.json")
    assert c.size_bytes == A10_SIZE - 1428
    assert c.metrics == {}
    assert c.epoch is None


def test_a_temp_file_of_the_safetensors_writer(tmp_path: Path) -> None:
    directory = real_checkpoint(tmp_path)
    (directory / ".tmpAbC123").write_bytes(b"\0" * 100)
    c = read_checkpoint(directory, 10)
    assert (c.complete, c.incomplete_reason) == (False, "temporary file .tmpAbC123 present (write in progress)")


def test_the_trainers_incomplete_marker(tmp_path: Path) -> None:
    directory = real_checkpoint(tmp_path)
    (directory / "checkpoint-is-incomplete.txt").write_text("")
    c = read_checkpoint(directory, 10)
    assert (c.complete, c.incomplete_reason) == (
        False,
        "checkpoint-is-incomplete.txt present (save in progress)",
    )


def test_a_save_just_begun_lists_every_problem(tmp_path: Path) -> None:
    # As the Trainer leaves it a moment after mkdir: the marker, the model in flight, no trainer_state.json.
    directory = tmp_path / "checkpoint-30"
    directory.mkdir()
    (directory / "checkpoint-is-incomplete.txt").write_text("")
    (directory / "config.json").write_text("{}")
    (directory / ".tmpQ1w2E3").write_bytes(b"partial")
    c = read_checkpoint(directory, 30)
    assert c.incomplete_reason == (
        "checkpoint-is-incomplete.txt present (save in progress); "
        "temporary file .tmpQ1w2E3 present (write in progress); "
        "no trainer_state.json"
    )


def test_a_global_step_that_does_not_match_the_name(tmp_path: Path) -> None:
    directory = real_checkpoint(tmp_path, "checkpoint-20")  # holds A/checkpoint-10's files
    c = read_checkpoint(directory, 20)
    assert (c.complete, c.incomplete_reason) == (
        False,
        "global_step 10 in trainer_state.json does not match checkpoint-20",
    )


def test_no_global_step_is_fine(tmp_path: Path) -> None:
    directory = small_checkpoint(tmp_path, 10)
    (directory / "trainer_state.json").write_text('{"epoch": 0.5}')
    c = read_checkpoint(directory, 10)
    assert (c.complete, c.epoch) == (True, 0.5)


def test_a_broken_safetensors_file(tmp_path: Path) -> None:
    directory = real_checkpoint(tmp_path)
    model = directory / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-100])
    c = read_checkpoint(directory, 10)
    assert (c.complete, c.incomplete_reason) == (
        False,
        "model.safetensors: invalid safetensors (incomplete metadata, file not fully covered)",
    )


def test_every_safetensors_file_is_checked(tmp_path: Path) -> None:
    directory = real_checkpoint(tmp_path)
    (directory / "adapter_model.safetensors").write_bytes(b"12345")
    c = read_checkpoint(directory, 10)
    assert c.incomplete_reason == "adapter_model.safetensors: invalid safetensors (header too small)"


def test_no_safetensors_at_all_is_fine(tmp_path: Path) -> None:
    # FSDP sharded state: pytorch_model_fsdp_0/ and optimizer_0/, no safetensors file.
    directory = real_checkpoint(tmp_path)
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model_fsdp_0").mkdir()
    (directory / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"x" * 10)
    c = read_checkpoint(directory, 10)
    assert (c.complete, c.incomplete_reason) == (True, None)
    assert c.size_bytes == A10_SIZE - 32016 + 10


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "trainer_state.json is empty"),
        (b"\n", "trainer_state.json is empty"),
        (b'{\n  "best_global_step": 10,\n  "best_met', None),
        (b"[]", "trainer_state.json holds a JSON array, not an object"),
    ],
    ids=["empty", "blank", "cut-short", "array"],
)
def test_an_unusable_trainer_state(tmp_path: Path, content: bytes, expected: str | None) -> None:
    directory = real_checkpoint(tmp_path)
    (directory / "trainer_state.json").write_bytes(content)
    c = read_checkpoint(directory, 10)
    assert c.complete is False
    assert c.incomplete_reason is not None
    if expected is None:
        assert c.incomplete_reason.startswith("trainer_state.json is not valid JSON (")
    else:
        assert c.incomplete_reason == expected


def test_a_trainer_state_that_is_not_a_regular_file(tmp_path: Path) -> None:
    directory = real_checkpoint(tmp_path / "run")
    state = directory / "trainer_state.json"
    os.rename(state, tmp_path / "elsewhere.json")
    os.symlink(tmp_path / "elsewhere.json", state)
    assert read_checkpoint(directory, 10).incomplete_reason == "trainer_state.json is not a regular file"
    state.unlink()
    state.mkdir()
    assert read_checkpoint(directory, 10).incomplete_reason == "trainer_state.json is not a regular file"


def test_a_checkpoint_that_does_not_exist(tmp_path: Path) -> None:
    c = read_checkpoint(tmp_path / "checkpoint-10", 10)
    assert (c.complete, c.incomplete_reason) == (False, "vanished while reading")


def test_a_checkpoint_removed_while_it_is_read_is_incomplete_not_a_crash(tmp_path: Path) -> None:
    """The Trainer's own save_total_limit rotation can rmtree a checkpoint while ckptkeeper reads it.

    Deterministic: a profile hook removes the directory right after read_checkpoint has listed it."""
    directory = real_checkpoint(tmp_path)

    def remove_after_listing(frame: FrameType, event: str, arg: object) -> None:
        if event == "return" and frame.f_code.co_name == "walk_files":
            sys.setprofile(None)
            shutil.rmtree(directory)

    sys.setprofile(remove_after_listing)
    try:
        c = read_checkpoint(directory, 10)
    finally:
        sys.setprofile(None)
    assert not directory.exists()
    assert (c.complete, c.incomplete_reason) == (False, "no trainer_state.json")


def test_incomplete_checkpoints_are_listed_with_their_reason(tmp_path: Path) -> None:
    real_checkpoint(tmp_path, "checkpoint-10")
    broken = small_checkpoint(tmp_path, 20)
    (broken / "trainer_state.json").unlink()
    run = read_run(tmp_path, tmp_path)
    assert [(c.step, c.complete, c.incomplete_reason) for c in run.checkpoints] == [
        (10, True, None),
        (20, False, "no trainer_state.json"),
    ]


# --- settle time -------------------------------------------------------------------------------------


def newest_ctime(directory: Path) -> float:
    times = [directory.lstat().st_ctime]
    for dirpath, dirnames, filenames in os.walk(directory):
        times += [os.lstat(os.path.join(dirpath, n)).st_ctime for n in dirnames + filenames]
    return max(times)


def set_mtimes(directory: Path, when: float) -> None:
    for dirpath, dirnames, filenames in os.walk(directory, topdown=False):
        for n in filenames + dirnames:
            os.utime(os.path.join(dirpath, n), (when, when), follow_symlinks=False)
    os.utime(directory, (when, when))


SETTLING = re.compile(r"changed \d+\.\d s ago \(settle 60 s\)")


def test_a_checkpoint_written_just_now_has_not_settled(tmp_path: Path) -> None:
    directory = small_checkpoint(tmp_path, 10)
    c = read_checkpoint(directory, 10, now=newest_ctime(directory) + 0.5, settle=2.0)
    assert (c.complete, c.incomplete_reason) == (False, "changed 0.5 s ago (settle 2 s)")


def test_a_checkpoint_written_just_now_has_not_settled_by_the_clock(tmp_path: Path) -> None:
    directory = small_checkpoint(tmp_path, 10)
    c = read_checkpoint(directory, 10, now=time.time(), settle=60.0)
    assert c.complete is False
    assert c.incomplete_reason is not None
    assert SETTLING.fullmatch(c.incomplete_reason), c.incomplete_reason


def test_an_old_checkpoint_has_settled(tmp_path: Path) -> None:
    directory = small_checkpoint(tmp_path, 10)
    set_mtimes(directory, time.time() - 3600)
    # Nothing has changed (mtime or ctime) for 10 s at `now`.
    c = read_checkpoint(directory, 10, now=newest_ctime(directory) + 10, settle=2.0)
    assert (c.complete, c.incomplete_reason) == (True, None)


def test_settle_is_measured_from_the_newest_mtime(tmp_path: Path) -> None:
    directory = small_checkpoint(tmp_path, 10)
    base = newest_ctime(directory) + 100  # later than every ctime: only the mtime below decides
    set_mtimes(directory, base - 3600)
    os.utime(directory / "model.safetensors", (base, base))
    c = read_checkpoint(directory, 10, now=base + 1.5, settle=2.0)
    assert (c.complete, c.incomplete_reason) == (False, "changed 1.5 s ago (settle 2 s)")
    c = read_checkpoint(directory, 10, now=base + 2.5, settle=2.0)
    assert (c.complete, c.incomplete_reason) == (True, None)


def test_settle_counts_the_directory_and_files_in_subdirectories(tmp_path: Path) -> None:
    directory = small_checkpoint(tmp_path, 10)
    (directory / "global_step10").mkdir()
    (directory / "global_step10" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    base = newest_ctime(directory) + 100
    set_mtimes(directory, base - 3600)
    os.utime(directory / "global_step10" / "mp_rank_00_model_states.pt", (base, base))
    assert read_checkpoint(directory, 10, now=base + 1, settle=2.0).incomplete_reason == (
        "changed 1.0 s ago (settle 2 s)"
    )
    set_mtimes(directory, base - 3600)
    os.utime(directory, (base, base))
    assert read_checkpoint(directory, 10, now=base + 1, settle=2.0).incomplete_reason == (
        "changed 1.0 s ago (settle 2 s)"
    )


def test_a_file_copied_in_with_an_old_mtime_has_not_settled(tmp_path: Path) -> None:
    # cp -p / rsync -a keep the source's old mtime; the ctime still says the file just arrived.
    directory = small_checkpoint(tmp_path, 10)
    set_mtimes(directory, time.time() - 3600)
    c = read_checkpoint(directory, 10, now=time.time(), settle=60.0)
    assert c.complete is False


def test_without_now_or_settle_there_is_no_settle_check(tmp_path: Path) -> None:
    directory = small_checkpoint(tmp_path, 10)
    assert read_checkpoint(directory, 10).complete is True
    assert read_checkpoint(directory, 10, now=time.time(), settle=0.0).complete is True


def test_scan_root_passes_now_and_settle_on(tmp_path: Path) -> None:
    small_checkpoint(tmp_path / "run", 10)
    [run] = scan_root(tmp_path, now=time.time(), settle=60.0).runs
    assert run.checkpoints[0].complete is False
    [run] = scan_root(tmp_path, now=newest_ctime(tmp_path / "run") + 61, settle=60.0).runs
    assert run.checkpoints[0].complete is True


# --- names -------------------------------------------------------------------------------------------

NOT_CHECKPOINTS = [
    "checkpoint-abc",
    "tmp-checkpoint-10",
    "checkpoint-10.bak",
    "CHECKPOINT-10",
    "Checkpoint-10",
    "checkpoint-007",
    "checkpoint-00",
    "checkpoint--5",
    "checkpoint-+5",
    "checkpoint-1e3",
    "checkpoint-1_000",
    "checkpoint-\u0661\u0662",  # Arabic-Indic digits
    "checkpoint-\uff11\uff12",  # fullwidth digits
    "checkpoint-10 ",
    " checkpoint-10",
    "checkpoint-10\n",
    "checkpoint-",
    "checkpoint",
    "checkpoint_10",
    "checkpoint-10-old",
    "last-checkpoint",
]


@pytest.mark.parametrize("name", NOT_CHECKPOINTS)
def test_names_that_are_not_checkpoints(name: str) -> None:
    assert checkpoint_step(name) is None


@pytest.mark.parametrize(
    ("name", "step"),
    [("checkpoint-0", 0), ("checkpoint-7", 7), ("checkpoint-10", 10), ("checkpoint-" + "9" * 40, int("9" * 40))],
)
def test_names_that_are_checkpoints(name: str, step: int) -> None:
    assert checkpoint_step(name) == step


def test_only_real_checkpoint_directories_are_counted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    real_checkpoint(run, "checkpoint-10")
    for name in NOT_CHECKPOINTS:
        real_checkpoint(run, name)
    (run / "checkpoint-5").write_text("a file, not a directory")
    (run / "checkpoint-6").symlink_to(run / "checkpoint-10")
    big = 123456789012345678901234567890
    small_checkpoint(run, big)
    small_checkpoint(run, 0)
    scanned = read_run(tmp_path, run)
    assert scanned.path == "run"
    assert [(c.name, c.step, c.complete) for c in scanned.checkpoints] == [
        ("checkpoint-0", 0, True),
        ("checkpoint-10", 10, True),
        (f"checkpoint-{big}", big, True),
    ]


def test_checkpoints_are_ordered_by_step_not_by_name_or_mtime(tmp_path: Path) -> None:
    for step, age in ((100, 0), (9, 10), (10, 20), (1000, 30)):
        directory = small_checkpoint(tmp_path, step)
        os.utime(directory, (time.time() - age, time.time() - age))
    assert [c.step for c in read_run(tmp_path, tmp_path).checkpoints] == [9, 10, 100, 1000]


def test_a_checkpoint_symlink_to_a_directory_outside_the_root_is_not_followed(tmp_path: Path) -> None:
    outside = real_checkpoint(tmp_path / "outside", "checkpoint-20")
    root = tmp_path / "root"
    real_checkpoint(root / "run", "checkpoint-10")
    (root / "run" / "checkpoint-20").symlink_to(outside)
    (root / "linkonly").mkdir()
    (root / "linkonly" / "checkpoint-30").symlink_to(outside)
    result = scan_root(root)
    assert [r.path for r in result.runs] == ["run"]  # a directory holding only a link is no run
    assert [c.name for c in result.runs[0].checkpoints] == ["checkpoint-10"]


# --- finding runs ------------------------------------------------------------------------------------


def test_the_root_itself_can_be_the_run(tmp_path: Path) -> None:
    small_checkpoint(tmp_path, 10)
    assert runs_of(tmp_path) == ["."]


def test_nested_runs_are_found(tmp_path: Path) -> None:
    small_checkpoint(tmp_path, 5)
    small_checkpoint(tmp_path / "outputs" / "exp1", 10)
    small_checkpoint(tmp_path / "outputs" / "sweep" / "lr-1e-4", 10)
    small_checkpoint(tmp_path / "outputs" / "sweep" / "lr-3e-4", 20)
    small_checkpoint(tmp_path / "outputs" / "exp1" / "eval-run", 1)  # a run inside a run's directory
    (tmp_path / "outputs" / "empty" / "deeper").mkdir(parents=True)
    assert runs_of(tmp_path) == [
        ".",
        "outputs/exp1",
        "outputs/exp1/eval-run",
        "outputs/sweep/lr-1e-4",
        "outputs/sweep/lr-3e-4",
    ]


def test_checkpoint_directories_are_not_descended(tmp_path: Path) -> None:
    directory = small_checkpoint(tmp_path / "run", 10)
    small_checkpoint(directory / "inner", 3)
    assert runs_of(tmp_path) == ["run"]


def test_the_depth_limit(tmp_path: Path) -> None:
    assert DEFAULT_MAX_DEPTH == 4
    small_checkpoint(tmp_path / "d1" / "d2" / "d3" / "d4", 1)  # run at depth 4
    small_checkpoint(tmp_path / "e1" / "e2" / "e3" / "e4" / "e5", 1)  # run at depth 5
    assert runs_of(tmp_path) == ["d1/d2/d3/d4"]
    assert runs_of(tmp_path, max_depth=5) == ["d1/d2/d3/d4", "e1/e2/e3/e4/e5"]
    assert runs_of(tmp_path, max_depth=3) == []
    small_checkpoint(tmp_path, 2)
    assert runs_of(tmp_path, max_depth=0) == ["."]


def test_hidden_directories_are_not_descended(tmp_path: Path) -> None:
    small_checkpoint(tmp_path / "visible", 1)
    small_checkpoint(tmp_path / ".hidden", 1)
    small_checkpoint(tmp_path / ".hidden" / "run", 1)
    small_checkpoint(tmp_path / ".git" / "run", 1)
    small_checkpoint(tmp_path / "visible" / ".cache" / "run", 1)
    assert runs_of(tmp_path) == ["visible"]


def test_the_state_directory_is_not_descended(tmp_path: Path) -> None:
    small_checkpoint(tmp_path / "run", 1)
    small_checkpoint(tmp_path / "_ckptkeeper", 1)
    small_checkpoint(tmp_path / "_ckptkeeper" / "trash", 2)
    small_checkpoint(tmp_path / "_ckptkeeper" / "trash" / "abc.checkpoint-3" / "x", 3)
    assert runs_of(tmp_path) == ["run"]
    assert runs_of(tmp_path, excluded=[tmp_path / "_ckptkeeper"]) == ["run"]


def test_excluded_directories_are_not_descended(tmp_path: Path) -> None:
    small_checkpoint(tmp_path / "run", 1)
    small_checkpoint(tmp_path / "state", 1)
    small_checkpoint(tmp_path / "archive" / "run", 1)
    assert runs_of(tmp_path) == ["archive/run", "run", "state"]
    assert runs_of(tmp_path, excluded=[tmp_path / "state", tmp_path / "archive"]) == ["run"]
    assert runs_of(tmp_path, excluded=[tmp_path / "archive" / "."]) == ["run", "state"]


def test_excluded_directories_match_from_a_relative_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small_checkpoint(tmp_path / "root" / "run", 1)
    small_checkpoint(tmp_path / "root" / "archive" / "run", 1)
    monkeypatch.chdir(tmp_path)
    assert runs_of(Path("root"), excluded=[tmp_path / "root" / "archive"]) == ["run"]
    assert runs_of(tmp_path / "root", excluded=[Path("root/archive")]) == ["run"]


def test_excluded_directories_match_through_a_symlinked_root(tmp_path: Path) -> None:
    small_checkpoint(tmp_path / "real" / "run", 1)
    small_checkpoint(tmp_path / "real" / "archive" / "run", 1)
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    assert runs_of(tmp_path / "alias", excluded=[tmp_path / "real" / "archive"]) == ["run"]


def test_a_symlinked_run_directory_is_not_descended(tmp_path: Path) -> None:
    root = tmp_path / "root"
    small_checkpoint(root / "runs" / "exp1", 10)
    small_checkpoint(tmp_path / "outside" / "exp9", 10)
    (root / "alias").symlink_to(root / "runs" / "exp1")
    (root / "external").symlink_to(tmp_path / "outside")
    (root / "external-run").symlink_to(tmp_path / "outside" / "exp9")
    assert runs_of(root) == ["runs/exp1"]


def test_a_loop_of_symlinks_does_not_hang(tmp_path: Path) -> None:
    root = tmp_path / "root"
    directory = small_checkpoint(root / "run", 10)
    (root / "run" / "loop").symlink_to("..")
    (root / "up").symlink_to(root)
    (root / "a").symlink_to(root / "b")
    (root / "b").symlink_to(root / "a")
    (directory / "self").symlink_to(".")
    (directory / "parent").symlink_to("..")
    result = scan_with_deadline(root)
    assert [r.path for r in result.runs] == ["run"]
    [c] = result.runs[0].checkpoints
    assert c.complete is True
    files = sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and not p.is_symlink())
    assert c.size_bytes == files + len(".") + len("..")


def test_find_run_dirs_reports_a_directory_it_cannot_list(tmp_path: Path) -> None:
    warnings: list[str] = []
    assert find_run_dirs(tmp_path / "missing", 4, [], warnings) == []
    assert len(warnings) == 1
    assert warnings[0].startswith(f"cannot list {tmp_path / 'missing'}: ")


# --- sizes -------------------------------------------------------------------------------------------


def test_sizes_count_files_and_links_not_directories_and_not_link_targets(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    big = outside / "huge.bin"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB, sparse: only its size is large
    root = tmp_path / "root"
    directory = small_checkpoint(root / "run", 10)
    before = sum(p.stat().st_size for p in directory.iterdir())
    (directory / "a.bin").write_bytes(b"a" * 100)
    (directory / "sub").mkdir()
    (directory / "sub" / "b.bin").write_bytes(b"b" * 50)
    (directory / "sub" / "empty").mkdir()
    (directory / "alias.bin").symlink_to("a.bin")
    (directory / "big.bin").symlink_to(big)
    (directory / "dangling.bin").symlink_to(tmp_path / "nothing-here")
    [run] = scan_root(root).runs
    [c] = run.checkpoints
    assert (c.complete, c.incomplete_reason) == (True, None)
    links = len("a.bin") + len(str(big)) + len(str(tmp_path / "nothing-here"))
    assert c.size_bytes == before + 100 + 50 + links
    assert c.size_bytes < 1 << 20


def test_a_safetensors_symlink_out_of_the_root_is_not_opened(tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"not a safetensors file")
    directory = small_checkpoint(tmp_path / "root" / "run", 10)
    (directory / "extra.safetensors").symlink_to(outside)
    [c] = scan_root(tmp_path / "root").runs[0].checkpoints
    assert (c.complete, c.incomplete_reason) == (True, None)


def test_a_content_cache_skips_reading_unchanged_checkpoints_and_notices_any_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptkeeper.scan import ContentCache, read_run
    from ckptkeeper.simtrainer import SimConfig, simulate_run

    run_dir = tmp_path / "run"
    simulate_run(run_dir, SimConfig(steps_per_epoch=10, epochs=1, save_steps=5, eval_steps=5))
    parsed = _counting_parser(monkeypatch)
    cache = ContentCache()
    first = read_run(tmp_path, run_dir, cache=cache)
    assert len(parsed) == 2 and len(cache) == 2
    again = read_run(tmp_path, run_dir, cache=cache)
    assert again == first and len(parsed) == 2  # nothing read again

    # Any change to a file (here: trainer_state.json cut short) is seen on the next look.
    state = run_dir / "checkpoint-10" / "trainer_state.json"
    state.write_bytes(state.read_bytes()[:100])
    changed = read_run(tmp_path, run_dir, cache=cache)
    assert len(parsed) == 3
    assert [c.complete for c in changed.checkpoints] == [True, False]
    # A checkpoint that is gone is forgotten.
    shutil.rmtree(run_dir / "checkpoint-5")
    read_run(tmp_path, run_dir, cache=cache)
    assert len(cache) == 1


def _counting_parser(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from ckptkeeper import scan as scan_module

    parsed: list[int] = []
    real_parse = scan_module.parse_trainer_state

    def counting_parse(data: bytes) -> object:
        parsed.append(len(data))
        return real_parse(data)

    monkeypatch.setattr(scan_module, "parse_trainer_state", counting_parse)
    return parsed


def _walks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from ckptkeeper import scan as scan_module

    walked: list[str] = []
    real_walk = scan_module.walk_files

    def counting_walk(directory: Path, top: os.stat_result | None = None, dir_fd: int | None = None) -> object:
        walked.append(Path(os.path.realpath(directory)).name)  # walked through /proc/self/fd/N
        return real_walk(directory, top, dir_fd)

    monkeypatch.setattr(scan_module, "walk_files", counting_walk)
    return walked


def test_a_trusting_read_skips_walking_an_unchanged_settled_complete_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptkeeper.scan import ContentCache, read_run

    run_dir = tmp_path / "run"
    small_checkpoint(run_dir, 5)
    small_checkpoint(run_dir, 10)
    now = newest_ctime(run_dir / "checkpoint-10") + 10
    cache = ContentCache()
    first = read_run(tmp_path, run_dir, now, settle=2.0, cache=cache)
    walked = _walks(monkeypatch)
    assert read_run(tmp_path, run_dir, now, settle=2.0, cache=cache, trusting=True) == first
    assert walked == []

    # A file rewritten in place leaves the directory unchanged: a trusting read misses it (by design), a
    # normal read sees it.
    state = run_dir / "checkpoint-10" / "trainer_state.json"
    state.write_bytes(state.read_bytes()[:10])
    assert read_run(tmp_path, run_dir, now, settle=2.0, cache=cache, trusting=True) == first
    later = newest_ctime(run_dir / "checkpoint-10") + 10
    seen = read_run(tmp_path, run_dir, later, settle=2.0, cache=cache)
    assert [c.complete for c in seen.checkpoints] == [True, False]
    assert sorted(walked) == ["checkpoint-10", "checkpoint-5"]

    # A file added, removed or renamed changes the directory: walked even when trusting.
    walked.clear()
    (run_dir / "checkpoint-5" / "extra.bin").write_bytes(b"x")
    read_run(tmp_path, run_dir, later + 10, settle=2.0, cache=cache, trusting=True)
    assert sorted(walked) == ["checkpoint-10", "checkpoint-5"]


def test_a_trusting_read_never_trusts_an_incomplete_or_unsettled_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptkeeper.scan import ContentCache, read_run

    run_dir = tmp_path / "run"
    small_checkpoint(run_dir, 5)
    broken = small_checkpoint(run_dir, 10)
    (broken / "model.safetensors").write_bytes(b"cut")
    fresh = newest_ctime(run_dir / "checkpoint-5")
    cache = ContentCache()
    read_run(tmp_path, run_dir, fresh + 0.5, settle=2.0, cache=cache)  # both incomplete: one settling
    walked = _walks(monkeypatch)
    parsed = _counting_parser(monkeypatch)
    again = read_run(tmp_path, run_dir, fresh + 5, settle=2.0, cache=cache, trusting=True)
    assert sorted(walked) == ["checkpoint-10", "checkpoint-5"]  # both looked at again
    assert parsed == []  # but their unchanged files are not parsed again
    assert [c.complete for c in again.checkpoints] == [True, False]
