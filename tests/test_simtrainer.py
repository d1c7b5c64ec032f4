"""The simulated Trainer writes what the real one wrote: the same file names, the same steps, the same write
order (trainer_state.json last), valid safetensors, the same epochs, and the Trainer's rotation.

The expectations come from the real runs in tests/fixtures/hf and their observation logs (quoted below)."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from ckptkeeper.integrity import safetensors_problem
from ckptkeeper.policy import plan_run
from ckptkeeper.render import reason_texts
from ckptkeeper.rules import parse_rules
from ckptkeeper.scan import checkpoint_step, read_checkpoint, scan_root
from ckptkeeper.simtrainer import (
    SaveEvent,
    SimConfig,
    SimulatedTrainer,
    rotate_checkpoints,
    simulate_run,
    sort_checkpoints,
)

HF = Path(__file__).parent / "fixtures" / "hf"

# Configurations equivalent to the real runs (26 optimizer steps per epoch in every HF run but G, where
# gradient_accumulation_steps=3 gives 9).
RUN_A = SimConfig(steps_per_epoch=26, epochs=3, save_steps=10, eval_steps=10)
RUN_B = SimConfig(
    steps_per_epoch=26,
    epochs=4,
    save_strategy="epoch",
    eval_strategy="epoch",
    metric_for_best_model="accuracy",
    greater_is_better=True,
)
RUN_C = SimConfig(steps_per_epoch=26, epochs=2, save_steps=7, eval_steps=10, metric_for_best_model=None)
RUN_D2 = SimConfig(
    steps_per_epoch=26, epochs=2, save_steps=10, eval_strategy="no", metric_for_best_model=None, save_total_limit=2
)
RUN_E = SimConfig(steps_per_epoch=26, epochs=2, save_steps=10, eval_steps=10, save_only_model=True)
RUN_G = SimConfig(steps_per_epoch=9, epochs=3, save_strategy="epoch", eval_strategy="epoch", logging_steps=2)


def fixture_steps(run: str) -> list[int]:
    steps = (checkpoint_step(p.name) for p in (HF / run).iterdir())
    return sorted(s for s in steps if s is not None)


def state_of(checkpoint: Path) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((checkpoint / "trainer_state.json").read_text())
    return loaded


def on_disk_steps(run: Path) -> list[int]:
    steps = (checkpoint_step(p.name) for p in run.iterdir())
    return sorted(s for s in steps if s is not None)


# --- write order, observed through Python's audit hooks (no patching of the code under test) ----------

_RECORDING: list[list[tuple[str, str, str]]] = []


def _audit(event: str, args: tuple[object, ...]) -> None:
    if not _RECORDING:
        return
    if event in ("open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree"):
        first = os.fspath(args[0]) if isinstance(args[0], str | os.PathLike) else ""
        second = ""
        if event == "os.rename":
            second = os.fspath(args[1]) if isinstance(args[1], str | os.PathLike) else ""
        elif event == "open":
            mode = args[1] if isinstance(args[1], str) else ""
            if not any(c in mode for c in "wax+"):
                return  # reads are not writes
        _RECORDING[-1].append((event, str(first), str(second)))


_HOOKED: list[bool] = []


def record_writes(output_dir: Path, config: SimConfig) -> list[str]:
    """Train and return the writes below `output_dir`, as 'mkdir X', 'create X', 'rename X -> Y'
    (paths relative to output_dir, the safetensors writer's random `.tmpXXXXXX` name as `.tmp*`)."""
    if not _HOOKED:
        sys.addaudithook(_audit)  # cannot be removed again; idle unless a recording is active
        _HOOKED.append(True)
    _RECORDING.append([])
    try:
        SimulatedTrainer(output_dir, config).train()
    finally:
        events = _RECORDING.pop()

    def rel(path: str) -> str:
        name = os.path.relpath(path, output_dir)
        head, _, tail = name.rpartition("/")
        if tail.startswith(".tmp"):
            assert len(tail) == len(".tmp") + 6, tail  # like the real `.tmplp1Hx4`
            tail = ".tmp*"
        return f"{head}/{tail}" if head else tail

    out = []
    for event, first, second in events:
        # rmtree's own unlinks are relative to a directory descriptor: only absolute paths below output_dir
        if not os.path.isabs(first) or first == str(output_dir):
            continue
        if os.path.commonpath([first, output_dir]) != str(output_dir):
            continue
        if event == "os.mkdir":
            out.append(f"mkdir {rel(first)}")
        elif event == "open":
            out.append(f"create {rel(first)}")
        elif event == "os.rename":
            out.append(f"rename {rel(first)} -> {rel(second)}")
        else:
            out.append(f"{event} {rel(first)}")
    return out


def test_write_order_matches_the_real_trainer(tmp_path: Path) -> None:
    # A.inotify.log, checkpoint-10: CREATE,ISDIR checkpoint-10; CREATE config.json; CREATE .tmplp1Hx4;
    # MOVED_FROM .tmplp1Hx4 / MOVED_TO model.safetensors; CREATE training_args.bin; CREATE optimizer.pt;
    # CREATE scheduler.pt; CREATE rng_state.pth; CREATE trainer_state.json
    writes = record_writes(tmp_path / "out", SimConfig(steps_per_epoch=10, epochs=1, save_steps=10, eval_steps=10))
    assert writes == [
        "mkdir checkpoint-10",
        "create checkpoint-10/config.json",
        "create checkpoint-10/.tmp*",
        "rename checkpoint-10/.tmp* -> checkpoint-10/model.safetensors",
        "create checkpoint-10/training_args.bin",
        "create checkpoint-10/optimizer.pt",
        "create checkpoint-10/scheduler.pt",
        "create checkpoint-10/rng_state.pth",
        "create checkpoint-10/trainer_state.json",
    ]


def test_write_order_with_save_only_model_matches_the_real_trainer(tmp_path: Path) -> None:
    # E.inotify.log, checkpoint-20: CREATE,ISDIR; CREATE config.json; CREATE .tmp..; MOVED_TO model.safetensors;
    # CREATE training_args.bin; CREATE trainer_state.json
    config = SimConfig(steps_per_epoch=10, epochs=1, save_steps=10, eval_steps=10, save_only_model=True)
    assert record_writes(tmp_path / "out", config) == [
        "mkdir checkpoint-10",
        "create checkpoint-10/config.json",
        "create checkpoint-10/.tmp*",
        "rename checkpoint-10/.tmp* -> checkpoint-10/model.safetensors",
        "create checkpoint-10/training_args.bin",
        "create checkpoint-10/trainer_state.json",
    ]


def test_rotation_deletes_after_trainer_state_is_written(tmp_path: Path) -> None:
    config = SimConfig(
        steps_per_epoch=3, epochs=1, save_steps=1, eval_strategy="no", metric_for_best_model=None, save_total_limit=1
    )
    writes = record_writes(tmp_path / "out", config)
    # The Trainer's own rotation runs right after trainer_state.json, before the next save begins.
    for step in (2, 3):
        state = writes.index(f"create checkpoint-{step}/trainer_state.json")
        assert writes[state + 1] == f"shutil.rmtree checkpoint-{step - 1}"
    assert writes.count("shutil.rmtree checkpoint-1") == 1
    assert "shutil.rmtree checkpoint-3" not in writes


def test_trainer_state_is_the_newest_file_of_every_checkpoint(tmp_path: Path) -> None:
    simulate_run(tmp_path / "run", RUN_A)
    for checkpoint in (tmp_path / "run").iterdir():
        mtimes = {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}
        newest = mtimes.pop("trainer_state.json")
        assert all(m <= newest for m in mtimes.values()), (checkpoint.name, mtimes, newest)


# --- file names --------------------------------------------------------------------------------------


def test_the_same_file_names_as_the_real_trainer(tmp_path: Path) -> None:
    simulate_run(tmp_path / "run", RUN_A)
    real = sorted(os.listdir(HF / "A" / "checkpoint-10"))
    assert real == [
        "config.json",
        "model.safetensors",
        "optimizer.pt",
        "rng_state.pth",
        "scheduler.pt",
        "trainer_state.json",
        "training_args.bin",
    ]
    for checkpoint in (tmp_path / "run").iterdir():
        assert sorted(os.listdir(checkpoint)) == real, checkpoint.name


def test_the_same_file_names_as_the_real_trainer_with_save_only_model(tmp_path: Path) -> None:
    simulate_run(tmp_path / "run", RUN_E)
    real = sorted(os.listdir(HF / "E" / "checkpoint-10"))
    assert real == ["config.json", "model.safetensors", "trainer_state.json", "training_args.bin"]
    for checkpoint in (tmp_path / "run").iterdir():
        assert sorted(os.listdir(checkpoint)) == real, checkpoint.name


def test_trainer_state_has_the_real_trainers_keys(tmp_path: Path) -> None:
    simulate_run(tmp_path / "run", RUN_A)
    real = state_of(HF / "A" / "checkpoint-10")
    sim = state_of(tmp_path / "run" / "checkpoint-10")
    assert sorted(sim) == sorted(real)
    assert sim["stateful_callbacks"] == real["stateful_callbacks"]
    real_history = real["log_history"]
    sim_history = sim["log_history"]
    assert isinstance(real_history, list)
    assert isinstance(sim_history, list)
    assert [sorted(e) for e in sim_history] == [sorted(e) for e in real_history]
    assert [e["step"] for e in sim_history] == [e["step"] for e in real_history] == [5, 10, 10]


def test_sharded_model_files(tmp_path: Path) -> None:
    simulate_run(tmp_path / "run", SimConfig(steps_per_epoch=4, epochs=1, save_steps=4, eval_steps=4, shards=3))
    checkpoint = tmp_path / "run" / "checkpoint-4"
    names = sorted(os.listdir(checkpoint))
    assert [n for n in names if "safetensors" in n] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [n for n in names if n.endswith(".safetensors")]
    assert read_checkpoint(checkpoint, 4).complete is True


# --- steps -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("run", "config", "steps"),
    [
        ("A", RUN_A, [10, 20, 30, 40, 50, 60, 70, 78]),
        ("B", RUN_B, [26, 52, 78, 104]),
        ("C", RUN_C, [7, 14, 21, 28, 35, 42, 49, 52]),
        ("E", RUN_E, [10, 20, 30, 40, 50, 52]),
        ("G", RUN_G, [9, 18, 27]),
    ],
)
def test_checkpoints_at_the_real_runs_steps(tmp_path: Path, run: str, config: SimConfig, steps: list[int]) -> None:
    assert fixture_steps(run) == steps
    assert simulate_run(tmp_path / "run", config) == steps
    assert on_disk_steps(tmp_path / "run") == steps


@pytest.mark.parametrize(("run", "config"), [("A", RUN_A), ("C", RUN_C), ("G", RUN_G), ("B", RUN_B)])
def test_evals_at_the_real_runs_steps(tmp_path: Path, run: str, config: SimConfig) -> None:
    simulate_run(tmp_path / "run", config)
    last = max(fixture_steps(run))

    def eval_steps(checkpoint: Path) -> list[int]:
        history = state_of(checkpoint)["log_history"]
        assert isinstance(history, list)
        return [e["step"] for e in history if any(k.startswith("eval_") for k in e)]

    assert eval_steps(tmp_path / "run" / f"checkpoint-{last}") == eval_steps(HF / run / f"checkpoint-{last}")


def test_only_the_last_checkpoint_of_run_c_has_an_eval_at_its_own_step(tmp_path: Path) -> None:
    simulate_run(tmp_path / "run", RUN_C)
    [run] = scan_root(tmp_path / "run").runs
    assert [c.step for c in run.checkpoints if c.metrics] == [52]


def test_epochs_are_the_real_trainers_floats(tmp_path: Path) -> None:
    simulate_run(tmp_path / "run", RUN_A)
    for step in fixture_steps("A"):
        real = state_of(HF / "A" / f"checkpoint-{step}")["epoch"]
        sim = state_of(tmp_path / "run" / f"checkpoint-{step}")["epoch"]
        assert type(sim) is float
        assert sim == real, step
    # ... and in the log history: every (step, epoch) of training logs and evals, as the real run logged them.
    real_history = state_of(HF / "A" / "checkpoint-78")["log_history"]
    sim_history = state_of(tmp_path / "run" / "checkpoint-78")["log_history"]
    assert isinstance(real_history, list)
    assert isinstance(sim_history, list)
    assert [(e["step"], e["epoch"]) for e in sim_history] == [(e["step"], e["epoch"]) for e in real_history]


@pytest.mark.parametrize(("config", "ends"), [(RUN_G, [9, 18, 27]), (RUN_B, [26, 52, 78, 104])])
def test_epoch_ends_are_written_as_whole_floats(tmp_path: Path, config: SimConfig, ends: list[int]) -> None:
    simulate_run(tmp_path / "run", config)
    for number, step in enumerate(ends, start=1):
        text = (tmp_path / "run" / f"checkpoint-{step}" / "trainer_state.json").read_text()
        assert f'"epoch": {number}.0,' in text
        assert f'"global_step": {step},' in text


def test_should_training_stop_only_in_the_final_checkpoint(tmp_path: Path) -> None:
    simulate_run(tmp_path / "run", RUN_A)
    stops = {}
    for step in on_disk_steps(tmp_path / "run"):
        callbacks = state_of(tmp_path / "run" / f"checkpoint-{step}")["stateful_callbacks"]
        assert isinstance(callbacks, dict)
        stops[step] = callbacks["TrainerControl"]["args"]["should_training_stop"]
    assert stops == {10: False, 20: False, 30: False, 40: False, 50: False, 60: False, 70: False, 78: True}


# --- models ------------------------------------------------------------------------------------------


def test_every_model_file_is_valid_safetensors(tmp_path: Path) -> None:
    simulate_run(tmp_path / "run", RUN_A)
    for step in on_disk_steps(tmp_path / "run"):
        model = tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors"
        assert safetensors_problem(model) is None
        tensors = load_file(model)
        assert tensors["layer0.step"].tolist() == [step]
        assert tensors["layer0.weight"].shape == (2000,)
        assert model.stat().st_size > 8000


# --- the Trainer's best and its rotation --------------------------------------------------------------


def test_best_in_trainer_state_follows_the_metric(tmp_path: Path) -> None:
    simulate_run(tmp_path / "run", RUN_A)
    [run] = scan_root(tmp_path / "run").runs
    seen: dict[int, float] = {}
    for c in run.checkpoints:
        seen[c.step] = c.metrics["eval_loss"]
        best = min(seen, key=lambda s: (seen[s], s))
        assert c.trainer_best_step == best, c.step
        state = state_of(tmp_path / "run" / c.name)
        assert state["best_metric"] == seen[best]
        assert state["best_model_checkpoint"] == str(tmp_path / "run" / f"checkpoint-{best}")


def test_no_metric_for_best_means_no_best(tmp_path: Path) -> None:
    simulate_run(tmp_path / "run", RUN_C)
    state = state_of(tmp_path / "run" / "checkpoint-52")
    assert (state["best_global_step"], state["best_metric"], state["best_model_checkpoint"]) == (None, None, None)


def test_rotation_as_in_run_d2(tmp_path: Path) -> None:
    listings: list[list[int]] = []

    def on_save(event: SaveEvent) -> None:
        steps = (checkpoint_step(n) for n in event.on_disk)
        listings.append(sorted(s for s in steps if s is not None))

    SimulatedTrainer(tmp_path / "run", RUN_D2).train(on_save=on_save)
    # D2.saves.jsonl, checkpoints_on_disk after each save:
    assert listings == [[10], [10, 20], [20, 30], [30, 40], [40, 50], [50, 52]]
    assert fixture_steps("D2") == [50, 52]


def test_rotation_spares_the_trainers_best(tmp_path: Path) -> None:
    # Lower accuracy is "better" here, so the best is an early checkpoint that rotation must spare.
    config = SimConfig(
        steps_per_epoch=26,
        epochs=3,
        save_steps=10,
        eval_steps=10,
        metric_for_best_model="accuracy",
        greater_is_better=False,
        save_total_limit=2,
    )
    history: list[tuple[int, int, list[int]]] = []

    def on_save(event: SaveEvent) -> None:
        best = state_of(event.path)["best_global_step"]
        assert isinstance(best, int)
        steps = (checkpoint_step(n) for n in event.on_disk)
        history.append((event.step, best, sorted(s for s in steps if s is not None)))

    SimulatedTrainer(tmp_path / "run", config).train(on_save=on_save)
    assert [h[0] for h in history] == [10, 20, 30, 40, 50, 60, 70, 78]
    for step, best, on_disk in history:
        assert best in on_disk
        assert step in on_disk
        assert len(on_disk) == (1 if step == 10 else 2)
        if best != step:
            assert on_disk == [best, step]
    final_best = history[-1][1]
    assert final_best < 78
    assert on_disk_steps(tmp_path / "run") == [final_best, 78]


def test_rotation_orders_by_mtime_as_the_real_trainer(tmp_path: Path) -> None:
    """transformers 5.24 rotates by directory mtime (Trainer._save_checkpoint calls rotate_checkpoints with
    use_mtime=True), so a checkpoint whose directory changed since it was saved counts as newer than its step
    says. Here checkpoint-10 changed after checkpoint-20 was saved: at save 30 the rotation removes
    checkpoint-20, not checkpoint-10. (Why a retention tool must never write inside a checkpoint directory.)"""
    config = SimConfig(
        steps_per_epoch=30, epochs=1, save_steps=10, eval_strategy="no", metric_for_best_model=None, save_total_limit=2
    )

    def on_save(event: SaveEvent) -> None:
        if event.step == 20:  # as in a slow run: saved 10 s ago, then checkpoint-10 changed 5 s ago
            now = time.time()
            os.utime(tmp_path / "run" / "checkpoint-20", (now - 10, now - 10))
            os.utime(tmp_path / "run" / "checkpoint-10", (now - 5, now - 5))

    SimulatedTrainer(tmp_path / "run", config).train(on_save=on_save)
    assert on_disk_steps(tmp_path / "run") == [10, 30]


def test_rotation_falls_back_to_step_order_when_mtimes_span_under_a_second(tmp_path: Path) -> None:
    """The same disorder within less than 1 s: the real Trainer distrusts the mtimes ("mtime may not be
    reliable on this filesystem, falling back to numerical ordering") and removes by step."""
    config = SimConfig(
        steps_per_epoch=30, epochs=1, save_steps=10, eval_strategy="no", metric_for_best_model=None, save_total_limit=2
    )

    def on_save(event: SaveEvent) -> None:
        if event.step == 20:
            now = time.time()
            os.utime(tmp_path / "run" / "checkpoint-20", (now - 0.3, now - 0.3))
            os.utime(tmp_path / "run" / "checkpoint-10", (now - 0.15, now - 0.15))

    SimulatedTrainer(tmp_path / "run", config).train(on_save=on_save)
    assert on_disk_steps(tmp_path / "run") == [20, 30]


def test_save_total_limit_1_leaves_only_the_best_at_the_end(tmp_path: Path) -> None:
    """Fact 10 (Trainer._finalize_training): with save_total_limit=1 the rotation keeps the best and the newest
    during training, and the end of training deletes every checkpoint except the best, the newest too; if
    someone removed the best, that step crashes with FileNotFoundError (os.path.samefile)."""
    config = SimConfig(
        steps_per_epoch=26, epochs=3, save_steps=10, eval_steps=10, overfit_after=0.3, save_total_limit=1
    )
    during: list[list[int]] = []

    def on_save(event: SaveEvent) -> None:
        steps = (checkpoint_step(n) for n in event.on_disk)
        during.append(sorted(s for s in steps if s is not None))

    SimulatedTrainer(tmp_path / "run", config).train(on_save=on_save)
    [best] = on_disk_steps(tmp_path / "run")
    assert best < 78 and during[-1] == [best, 78], during

    def remove_the_best(event: SaveEvent) -> None:
        if event.step == 78:
            shutil.rmtree(tmp_path / "crash" / f"checkpoint-{best}")

    with pytest.raises(FileNotFoundError):
        SimulatedTrainer(tmp_path / "crash", config).train(on_save=remove_the_best)


def _layout(run: Path, mtimes: dict[str, float]) -> None:
    run.mkdir(parents=True)
    for name, when in mtimes.items():
        (run / name).mkdir()
        (run / name / "trainer_state.json").write_text("{}")
        os.utime(run / name, (when, when))


def test_rotation_treats_foreign_names_as_the_real_trainer_does(tmp_path: Path) -> None:
    """The real rotation matches `checkpoint-*`: by step, `checkpoint-1.bak` counts as step 1 (its regex matches
    a prefix) and is removed first, while `checkpoint-abc` is left; by mtime both are candidates. Files never
    are. ckptkeeper never touches such names, but the Trainer's own rotation does (checked against
    transformers in test_rotation_matches_transformers)."""
    now = time.time()
    names = ["checkpoint-abc", "checkpoint-1.bak", "checkpoint-10", "checkpoint-20", "checkpoint-30"]
    fast = tmp_path / "fast"  # every mtime within 1 s: step order
    _layout(fast, {n: now - 0.5 + 0.1 * i for i, n in enumerate(names)})
    (fast / "checkpoint-0").write_text("a file")
    rotate_checkpoints(fast, 2, None)
    assert sorted(os.listdir(fast)) == ["checkpoint-0", "checkpoint-20", "checkpoint-30", "checkpoint-abc"]
    slow = tmp_path / "slow"  # 10 s apart: mtime order, the foreign names are the oldest
    _layout(slow, {n: now - 50 + 10 * i for i, n in enumerate(names)})
    rotate_checkpoints(slow, 2, None)
    assert sorted(os.listdir(slow)) == ["checkpoint-20", "checkpoint-30"]


def test_rotation_spares_the_newest_by_mtime_and_a_best_even_if_it_is_gone(tmp_path: Path) -> None:
    now = time.time()
    touched = tmp_path / "touched"  # checkpoint-10 changed last: the Trainer takes it for its newest
    _layout(touched, {"checkpoint-10": now - 1, "checkpoint-20": now - 20, "checkpoint-30": now - 10})
    rotate_checkpoints(touched, 1, None)
    assert os.listdir(touched) == ["checkpoint-10"]
    gone = tmp_path / "gone"  # best_model_checkpoint names a removed directory: still 2 are kept
    _layout(gone, {"checkpoint-10": now - 30, "checkpoint-20": now - 20, "checkpoint-30": now - 10})
    rotate_checkpoints(gone, 1, str(gone / "checkpoint-5"))
    assert sorted(os.listdir(gone)) == ["checkpoint-20", "checkpoint-30"]
    tie = tmp_path / "tie"  # equal mtimes: path order, so checkpoint-10 sorts before checkpoint-9
    _layout(tie, {"checkpoint-9": now - 5, "checkpoint-10": now - 5, "checkpoint-30": now})
    rotate_checkpoints(tie, 2, None)
    assert sorted(os.listdir(tie)) == ["checkpoint-30", "checkpoint-9"]


def _random_layout(rng: random.Random) -> tuple[dict[str, float | None], int, str | None]:
    """A run directory to rotate: checkpoint names (some foreign, a file, a link to a directory outside), their
    mtimes (within 1 s, spread, or tied), a limit and a best_model_checkpoint (none, present or gone)."""
    now = time.time()
    steps = rng.sample(range(1, 60), rng.randint(1, 6))
    names = [f"checkpoint-{s}" for s in steps]
    names += rng.sample(["checkpoint-abc", "checkpoint-7.bak", "checkpoint-007", "checkpoint-", "tmp-checkpoint-3"], 2)
    spread = rng.choice([0.9, 30.0])
    entries: dict[str, float | None] = {n: now - rng.uniform(0, spread) for n in names}
    if rng.random() < 0.3 and len(names) > 1:  # a tie
        entries[names[1]] = entries[names[0]]
    if rng.random() < 0.3:
        entries["checkpoint-2"] = None  # a file
    if rng.random() < 0.3:
        entries["checkpoint-99"] = -1.0  # a symlink to a directory outside the run
    best = rng.choice([None, None, *names[:3], "checkpoint-77"])
    return entries, rng.randint(1, 4), best


def _build(run: Path, outside: Path, entries: dict[str, float | None]) -> None:
    run.mkdir(parents=True)
    for name, when in entries.items():
        if when is None:
            (run / name).write_text("not a directory")
        elif when < 0:
            outside.mkdir(parents=True)
            os.utime(outside, (time.time() - 3, time.time() - 3))
            os.symlink(outside, run / name)
        else:
            (run / name).mkdir()
            (run / name / "trainer_state.json").write_text("{}")
            os.utime(run / name, (when, when))


@pytest.mark.e2e
def test_rotation_matches_transformers(tmp_path: Path) -> None:
    """Differential: the same layouts rotated by the real transformers function (as Trainer._save_checkpoint
    calls it) and by the simulator's leave the same entries, and both order them the same way."""
    from transformers import __version__
    from transformers.trainer_utils import rotate_checkpoints as real_rotate
    from transformers.trainer_utils import sort_checkpoints as real_sort

    assert __version__ == "5.24.0", f"the simulator mirrors transformers 5.24.0, this is {__version__}"
    rng = random.Random(20240524)
    for case in range(150):
        entries, limit, best = _random_layout(rng)
        runs = {}
        for who in ("real", "sim"):
            runs[who] = tmp_path / f"{case}-{who}" / "out"
            _build(runs[who], tmp_path / f"{case}-{who}" / "outside", entries)
        described = f"case {case}: {entries}, limit {limit}, best {best}"
        for use_mtime in (True, False):
            real_order = [os.path.basename(p) for p in real_sort(str(runs["real"]), use_mtime=use_mtime)]
            sim_order = [os.path.basename(p) for p in sort_checkpoints(runs["sim"], use_mtime=use_mtime)]
            assert sim_order == real_order, described
        real_best = None if best is None else str(runs["real"] / best)
        sim_best = None if best is None else str(runs["sim"] / best)
        real_rotate(str(runs["real"]), save_total_limit=limit, best_model_checkpoint=real_best, use_mtime=True)
        rotate_checkpoints(runs["sim"], limit, sim_best)
        assert sorted(os.listdir(runs["sim"])) == sorted(os.listdir(runs["real"])), described


def test_best_model_checkpoint_follows_the_best_only_to_a_saved_checkpoint(tmp_path: Path) -> None:
    """Trainer._save_checkpoint sets best_model_checkpoint to checkpoint-<best_global_step> only when that
    directory exists. Evaluating every 5 steps and saving every 10 (allowed with load_best_model_at_end), a best
    found at step 15 has no checkpoint: best_global_step says 15 while best_model_checkpoint, which the
    rotation spares and load_best_model_at_end loads, still names the older checkpoint."""
    config = SimConfig(steps_per_epoch=26, epochs=3, save_steps=10, eval_steps=5, seed=3)
    simulate_run(tmp_path / "run", config)
    previous = None
    lagging = []
    for step in on_disk_steps(tmp_path / "run"):
        state = state_of(tmp_path / "run" / f"checkpoint-{step}")
        best = state["best_global_step"]
        assert isinstance(best, int)
        if (tmp_path / "run" / f"checkpoint-{best}").is_dir():
            assert state["best_model_checkpoint"] == str(tmp_path / "run" / f"checkpoint-{best}"), step
        else:
            assert state["best_model_checkpoint"] == previous, step
            lagging.append((step, best, previous))
        previous = state["best_model_checkpoint"]
    assert lagging, "this seed no longer has a best between two saves; pick another"


def test_trainer_best_protection_keeps_what_load_best_model_at_end_loads(tmp_path: Path) -> None:
    """SPEC, protection 3: keep the checkpoint the Trainer calls best "so that load_best_model_at_end still
    finds it". transformers 5.24 loads state.best_model_checkpoint, which (see the test above) stays on an older
    saved checkpoint when the best eval falls between two saves. Seed 1: the final trainer_state.json says
    best_global_step 75 (never saved) and best_model_checkpoint .../checkpoint-70; with `--keep last:1`
    ckptkeeper removes checkpoint-70, and the Trainer's final load of its best model then fails with a warning
    ("Could not locate the best model"). The same layout from a real run: eval every 5, save every 10."""
    simulate_run(tmp_path / "run", SimConfig(steps_per_epoch=26, epochs=3, save_steps=10, eval_steps=5, seed=1))
    final = state_of(tmp_path / "run" / "checkpoint-78")
    assert (final["best_global_step"], final["best_model_checkpoint"]) == (75, str(tmp_path / "run" / "checkpoint-70"))
    [run] = scan_root(tmp_path / "run").runs
    plan = plan_run(run, parse_rules("last:1"))
    kept = {d.checkpoint.step: reason_texts(d.reasons) for d in plan.kept}
    assert 70 in kept, f"checkpoint-70 (best_model_checkpoint) is removed; kept: {kept}"
    assert "protected: trainer best" in kept[70]


# --- every checkpoint it writes is complete ----------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        RUN_A,
        RUN_B,
        RUN_C,
        RUN_D2,
        RUN_E,
        RUN_G,
        SimConfig(steps_per_epoch=6, epochs=1, save_steps=2, eval_steps=2, shards=3),
        SimConfig(steps_per_epoch=6, epochs=1, save_steps=2, eval_steps=2, eval_sets=("a", "b")),
        SimConfig(steps_per_epoch=6, epochs=1, save_steps=2, eval_steps=2, nan_eval_steps=frozenset({2, 4})),
    ],
    ids=["A", "B", "C", "D2", "E", "G", "shards", "eval-sets", "nan"],
)
def test_every_checkpoint_is_complete_by_scan(tmp_path: Path, config: SimConfig) -> None:
    saved: list[int] = []

    def on_save(event: SaveEvent) -> None:
        # Complete the moment the Trainer's save returns (trainer_state.json is written last).
        c = read_checkpoint(event.path, event.step)
        assert (c.complete, c.incomplete_reason) == (True, None), event.step
        saved.append(event.step)

    SimulatedTrainer(tmp_path / "run", config).train(on_save=on_save)
    result = scan_root(tmp_path / "run")
    assert result.warnings == []
    [run] = result.runs
    assert [c.step for c in run.checkpoints] == on_disk_steps(tmp_path / "run")
    assert set(on_disk_steps(tmp_path / "run")) <= set(saved)
    for c in run.checkpoints:
        assert (c.complete, c.incomplete_reason) == (True, None), c.name
        assert c.epoch is not None
        assert math.ceil(round(c.epoch, 6)) == math.ceil(c.step / config.steps_per_epoch)
        assert abs(c.epoch - c.step / config.steps_per_epoch) < 1e-12
    assert run.checkpoints[-1].training_stopped is True
    assert not any(c.training_stopped for c in run.checkpoints[:-1])


def test_several_eval_sets_are_one_checkpoints_metrics(tmp_path: Path) -> None:
    simulate_run(
        tmp_path / "run", SimConfig(steps_per_epoch=4, epochs=1, save_steps=4, eval_steps=4, eval_sets=("a", "b"))
    )
    c = read_checkpoint(tmp_path / "run" / "checkpoint-4", 4)
    assert {"eval_a_loss", "eval_b_loss", "eval_a_accuracy", "eval_b_accuracy"} <= set(c.metrics)


def test_a_nan_metric_is_written_as_bare_nan_and_read(tmp_path: Path) -> None:
    simulate_run(
        tmp_path / "run",
        SimConfig(steps_per_epoch=4, epochs=1, save_steps=2, eval_steps=2, nan_eval_steps=frozenset({2})),
    )
    text = (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text()
    assert '"eval_loss": NaN' in text
    c = read_checkpoint(tmp_path / "run" / "checkpoint-2", 2)
    assert c.complete is True
    assert c.metrics["eval_loss"] != c.metrics["eval_loss"]  # NaN
    # A NaN never becomes the Trainer's best.
    assert read_checkpoint(tmp_path / "run" / "checkpoint-4", 4).trainer_best_step == 4


@pytest.mark.parametrize(("greater", "written"), [(None, "Infinity"), (True, "-Infinity")])
def test_a_best_never_set_is_written_as_infinity(tmp_path: Path, greater: bool | None, written: str) -> None:
    """Trainer._determine_best_metric starts the best at inf (-inf when greater is better) at the first eval; a
    NaN never beats it, so after only NaN evals trainer_state.json says `"best_metric": Infinity` (fact 8)."""
    config = SimConfig(
        steps_per_epoch=4,
        epochs=1,
        save_steps=2,
        eval_steps=2,
        nan_eval_steps=frozenset({2}),
        greater_is_better=greater,
    )
    simulate_run(tmp_path / "run", config)
    text = (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text()
    assert f'"best_metric": {written},' in text
    assert '"best_global_step": null,' in text
    assert '"best_model_checkpoint": null,' in text
    c = read_checkpoint(tmp_path / "run" / "checkpoint-2", 2)
    assert (c.complete, c.trainer_best_step) == (True, None)


def test_metrics_are_deterministic_per_seed(tmp_path: Path) -> None:
    def losses(name: str, seed: int) -> list[float]:
        simulate_run(tmp_path / name, SimConfig(steps_per_epoch=10, epochs=2, save_steps=5, eval_steps=5, seed=seed))
        [run] = scan_root(tmp_path / name).runs
        return [c.metrics["eval_loss"] for c in run.checkpoints]

    seven = losses("one", 7)
    assert losses("two", 7) == seven
    assert losses("three", 8) != seven


def test_a_reader_can_catch_trainer_state_cut_short(tmp_path: Path) -> None:
    """With state_write_pause the simulator stops halfway through trainer_state.json, as a slow disk would:
    a reader then sees the other files whole and trainer_state.json cut short, and judges it incomplete."""
    run = tmp_path / "run"
    state = run / "checkpoint-2" / "trainer_state.json"
    seen: list[str | None] = []

    def read_while_writing() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if state.exists() and state.stat().st_size > 0:
                seen.append(read_checkpoint(state.parent, 2).incomplete_reason)
                return
            time.sleep(0.001)

    reader = threading.Thread(target=read_while_writing)
    reader.start()
    SimulatedTrainer(run, SimConfig(steps_per_epoch=2, epochs=1, save_steps=2, eval_steps=2)).train(
        state_write_pause=1.0
    )
    reader.join(30)
    assert len(seen) == 1
    assert seen[0] is not None
    assert seen[0].startswith("trainer_state.json is not valid JSON ("), seen[0]
    assert read_checkpoint(state.parent, 2).complete is True
