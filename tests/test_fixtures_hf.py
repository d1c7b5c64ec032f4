"""The real Trainer runs in tests/fixtures/hf, planned and pruned with several rule sets.

Every expected kept set below is written out by hand from the fixture's own numbers (the `log_history` in
../shared/fixtures/observations/<RUN>.summary.json and each checkpoint's trainer_state.json), never computed
by the code under test. The numbers each case rests on are in the comment above the run's table.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from ckptkeeper.engine import PassResult, Pipeline
from ckptkeeper.policy import Policy, Protections, RootPlan
from ckptkeeper.render import reason_texts
from ckptkeeper.rules import parse_rules
from ckptkeeper.scan import read_run, scan_root

HF = Path(__file__).parent / "fixtures" / "hf"
RUNS = ("A", "B", "C", "D2", "E", "G")

# (run, --keep, protect trainer best, kept steps)
CASES: list[tuple[str, str, bool, list[int]]] = [
    # A: checkpoints 10..70, 78, each with an eval at its own step.
    #   eval_loss 10 .66398, 20 .66494, 30 .66574, 40 .66570, 50 .65872, 60 .57254, 70 .41938, 78 .38490
    #   eval_accuracy .640625 at 10..50, .65625 at 60, .921875 at 70 and 78
    #   epoch buckets: 1 = {10, 20}, 2 = {30, 40, 50}, 3 = {60, 70, 78}; newest 78; trainer best (in 78) = 78
    ("A", "best:1,last:2,epoch:all", True, [20, 50, 70, 78]),  # best 78; last 70,78; epochs 20,50,78
    ("A", "last:1", True, [78]),
    ("A", "best:2:accuracy", True, [70, 78]),  # .921875 tie at 70 and 78
    ("A", "best:1:accuracy:min", True, [10, 78]),  # .640625 tie at 10..50: the lowest step wins
    ("A", "every:20", True, [20, 40, 60, 78]),
    ("A", "epoch:2", True, [50, 78]),  # buckets 3 and 2
    ("A", "best:3", True, [60, 70, 78]),
    ("A", "best:1", False, [78]),
    # B: checkpoints 26, 52, 78, 104 at epochs 1.0, 2.0, 3.0, 4.0.
    #   eval_loss 26 .66614, 52 .44456, 78 .26731, 104 .26858; eval_accuracy .640625, then .921875 x3
    #   newest 104; trainer best (in 104) = 52 (by accuracy: the first of the .921875 tie)
    ("B", "best:1,last:2,epoch:all", True, [26, 52, 78, 104]),
    ("B", "last:1", True, [52, 104]),
    ("B", "last:1", False, [104]),
    ("B", "best:2:accuracy", True, [52, 78, 104]),  # tie at 52, 78, 104: lowest steps 52, 78
    ("B", "best:1:accuracy", False, [52, 104]),
    ("B", "every:20", True, [52, 104]),  # no step is a multiple of 20
    ("B", "every:52", False, [52, 104]),
    ("B", "epoch:2", True, [52, 78, 104]),  # buckets 4 and 3, plus the trainer best
    ("B", "epoch:2", False, [78, 104]),
    ("B", "best:1", True, [52, 78, 104]),  # lowest eval_loss is 78
    ("B", "best:1", False, [78, 104]),
    # C: checkpoints 7..49 (every 7), 52; evals at 10, 20, 30, 40, 50, 52: only checkpoint-52 has an eval at
    #   its own step (eval_loss .66395). Epoch buckets: 1 = {7, 14, 21}, 2 = {28, .., 52}. No trainer best.
    ("C", "best:1,last:2,epoch:all", True, [21, 49, 52]),
    ("C", "last:1", True, [52]),
    ("C", "best:2:accuracy", True, [52]),  # only 52 has a metric
    ("C", "every:14", True, [14, 28, 42, 52]),
    ("C", "every:20", True, [52]),
    ("C", "epoch:2", True, [21, 52]),
    ("C", "best:1", False, [52]),
    # D2: checkpoints 50 (epoch 1.923), 52 (epoch 2.0): both in bucket 2; no eval at all, no trainer best.
    ("D2", "best:1,last:2,epoch:all", True, [50, 52]),
    ("D2", "best:1", True, [52]),  # the best rule keeps nothing yet; no refusal
    ("D2", "best:2:accuracy", True, [52]),
    ("D2", "last:1", True, [52]),
    ("D2", "every:25", True, [50, 52]),
    ("D2", "every:20", True, [52]),
    ("D2", "epoch:2", True, [52]),
    ("D2", "best:1", False, [52]),
    # E: checkpoints 10..50, 52; eval_loss 10 .663248, 20 .665547, 30 .665628, 40 .664939, 50 .663998,
    #   52 .663949; eval_accuracy .640625 everywhere. Buckets: 1 = {10, 20}, 2 = {30, 40, 50, 52}.
    #   newest 52; trainer best (in 52) = 10
    ("E", "best:1,last:2,epoch:all", True, [10, 20, 50, 52]),
    ("E", "last:1", True, [10, 52]),
    ("E", "last:1", False, [52]),
    ("E", "last:2", False, [50, 52]),
    ("E", "best:2:accuracy", True, [10, 20, 52]),  # all tie: the lowest steps 10, 20
    ("E", "best:3", False, [10, 50, 52]),  # 10 .663248 < 52 .663949 < 50 .663998
    ("E", "every:20", True, [10, 20, 40, 52]),
    ("E", "every:20", False, [20, 40, 52]),
    ("E", "epoch:2", True, [10, 20, 52]),
    ("E", "epoch:2", False, [20, 52]),
    ("E", "best:1", False, [10, 52]),
    # G: checkpoints 9, 18, 27 at epochs 1.0, 2.0, 3.0; eval_loss .66209, .65893, .64256; accuracy all
    #   .640625; trainer best (in 27) = 27
    ("G", "best:1,last:2,epoch:all", True, [9, 18, 27]),
    ("G", "last:1", True, [27]),
    ("G", "best:2:accuracy", True, [9, 18, 27]),
    ("G", "best:1:accuracy", False, [9, 27]),
    ("G", "every:20", True, [27]),
    ("G", "every:9", True, [9, 18, 27]),
    ("G", "epoch:2", True, [18, 27]),
    ("G", "epoch:1", True, [27]),
    ("G", "best:1", False, [27]),
]

ALL_STEPS = {
    "A": [10, 20, 30, 40, 50, 60, 70, 78],
    "B": [26, 52, 78, 104],
    "C": [7, 14, 21, 28, 35, 42, 49, 52],
    "D2": [50, 52],
    "E": [10, 20, 30, 40, 50, 52],
    "G": [9, 18, 27],
}

EVAL_KEYS = {"eval_loss", "eval_accuracy", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}

# run -> step -> (epoch, eval_loss or None, eval_accuracy or None, trainer best step, training stopped)
READ: dict[str, dict[int, tuple[float, float | None, float | None, int | None, bool]]] = {
    "A": {
        10: (0.38461538461538464, 0.6639836430549622, 0.640625, 10, False),
        20: (0.7692307692307693, 0.6649385094642639, 0.640625, 10, False),
        30: (1.1538461538461537, 0.6657435894012451, 0.640625, 10, False),
        40: (1.5384615384615383, 0.6656995415687561, 0.640625, 10, False),
        50: (1.9230769230769231, 0.6587188839912415, 0.640625, 50, False),
        60: (2.3076923076923075, 0.5725363492965698, 0.65625, 60, False),
        70: (2.6923076923076925, 0.419383704662323, 0.921875, 70, False),
        78: (3.0, 0.38489747047424316, 0.921875, 78, True),
    },
    "B": {
        26: (1.0, 0.666143000125885, 0.640625, 26, False),
        52: (2.0, 0.44456279277801514, 0.921875, 52, False),
        78: (3.0, 0.26731353998184204, 0.921875, 52, False),
        104: (4.0, 0.26857566833496094, 0.921875, 52, True),
    },
    "C": {
        7: (0.2692307692307692, None, None, None, False),
        14: (0.5384615384615384, None, None, None, False),
        21: (0.8076923076923077, None, None, None, False),
        28: (1.0769230769230769, None, None, None, False),
        35: (1.3461538461538463, None, None, None, False),
        42: (1.6153846153846154, None, None, None, False),
        49: (1.8846153846153846, None, None, None, False),
        52: (2.0, 0.6639488935470581, 0.640625, None, True),
    },
    "D2": {
        50: (1.9230769230769231, None, None, None, False),
        52: (2.0, None, None, None, True),
    },
    "E": {
        10: (0.38461538461538464, 0.6632475852966309, 0.640625, 10, False),
        20: (0.7692307692307693, 0.6655470728874207, 0.640625, 10, False),
        30: (1.1538461538461537, 0.6656280755996704, 0.640625, 10, False),
        40: (1.5384615384615383, 0.6649393439292908, 0.640625, 10, False),
        50: (1.9230769230769231, 0.6639977693557739, 0.640625, 10, False),
        52: (2.0, 0.6639488935470581, 0.640625, 10, True),
    },
    "G": {
        9: (1.0, 0.6620942950248718, 0.640625, 9, False),
        18: (2.0, 0.6589283347129822, 0.640625, 18, False),
        27: (3.0, 0.6425624489784241, 0.640625, 27, True),
    },
}

Snapshot = dict[str, tuple[str, int, int, str]]


def restore_manifest(run_dir: Path, run: str) -> None:
    """Give the copy the modes and mtimes the Trainer's files had (git keeps neither): see MANIFEST.json."""
    manifest = json.loads((HF / run / "MANIFEST.json").read_text())
    for entry in manifest["dirs"]:
        os.chmod(run_dir / entry["path"], int(entry["mode"], 8))
    for entry in manifest["files"]:
        path = run_dir / entry["path"]
        os.chmod(path, int(entry["mode"], 8))
        os.utime(path, ns=(entry["mtime_ns"], entry["mtime_ns"]))
    for entry in manifest["dirs"]:
        os.utime(run_dir / entry["path"], ns=(entry["mtime_ns"], entry["mtime_ns"]))


def snapshot(top: Path) -> Snapshot:
    """Relative path -> (kind, size, mtime_ns, sha256 of the content) for everything below `top`, links not
    followed."""
    found: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            st = full.lstat()
            if stat.S_ISDIR(st.st_mode):
                found[full.relative_to(top).as_posix()] = ("dir", 0, st.st_mtime_ns, "")
            elif stat.S_ISLNK(st.st_mode):
                found[full.relative_to(top).as_posix()] = ("link", st.st_size, st.st_mtime_ns, os.readlink(full))
            else:
                digest = hashlib.sha256(full.read_bytes()).hexdigest()
                found[full.relative_to(top).as_posix()] = ("file", st.st_size, st.st_mtime_ns, digest)
    return found


def checkpoint_names(steps: list[int]) -> set[str]:
    return {f"checkpoint-{s}" for s in steps}


@pytest.fixture
def real_run(hf_run: Callable[[str], Path]) -> Callable[[str], Path]:
    def make(name: str) -> Path:
        path = hf_run(name)
        restore_manifest(path, name)
        return path

    return make


def make_plan(root: Path, policy: Policy, state_dir: Path) -> PassResult:
    """Scan and plan the root, as `plan` does (no lock, nothing written)."""
    return Pipeline.checked(root, policy, state_dir=state_dir).survey(None)


def apply_plan(pipeline: Pipeline, plan: RootPlan) -> PassResult:
    """Carry out the plan's removals, journaled. Like the old `engine.apply_plan`, without taking the root's
    lock: its `_ckptkeeper.lock` would be one more entry in the root, whose listing these tests compare."""
    return PassResult(plan, pipeline.act(plan))


def case_id(case: tuple[str, str, bool, list[int]]) -> str:
    run, keep, protect, _ = case
    return f"{run}-{keep}" + ("" if protect else "-no-protect-trainer-best")


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_plan_keeps_the_hand_worked_set_and_changes_nothing(
    case: tuple[str, str, bool, list[int]], real_run: Callable[[str], Path], tmp_path: Path
) -> None:
    run, keep, protect, expected = case
    root = real_run(run)
    state_dir = tmp_path / "state"
    before = snapshot(root)
    policy = Policy(parse_rules(keep), Protections(trainer_best=protect))

    result = make_plan(root, policy, state_dir)

    assert list(result.warnings) == []
    assert [p.run.path for p in result.plan.runs] == ["."]
    plan = result.plan.runs[0]
    assert plan.refusal is None
    assert [d.checkpoint.step for d in plan.decisions] == ALL_STEPS[run]
    assert all(d.checkpoint.complete for d in plan.decisions)
    assert [d.checkpoint.step for d in plan.kept] == expected
    assert [d.checkpoint.step for d in plan.removed] == [s for s in ALL_STEPS[run] if s not in expected]
    assert all(tuple(reason_texts(d.reasons)) == ("no rule keeps it",) for d in plan.removed)
    assert snapshot(root) == before
    assert not state_dir.exists()


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_prune_leaves_exactly_the_kept_set_untouched(
    case: tuple[str, str, bool, list[int]], real_run: Callable[[str], Path], tmp_path: Path
) -> None:
    run, keep, protect, expected = case
    root = real_run(run)
    pipeline = Pipeline.checked(
        root, Policy(parse_rules(keep), Protections(trainer_best=protect)), state_dir=tmp_path / "state"
    )
    state = pipeline.state
    before = snapshot(root)

    plans = pipeline.survey(None).plan
    totals = apply_plan(pipeline, plans)

    kept = checkpoint_names(expected)
    removed = checkpoint_names(ALL_STEPS[run]) - kept
    assert set(os.listdir(root)) == kept
    # Kept checkpoints: same files, same bytes, same file and directory mtimes.
    assert snapshot(root) == {rel: v for rel, v in before.items() if rel.split("/")[0] in kept}
    for name in kept:
        for rel, (kind, _, _, digest) in before.items():
            if rel.startswith(f"{name}/") and kind == "file":
                assert hashlib.sha256((HF / run / rel).read_bytes()).hexdigest() == digest
    assert totals.errors == []
    assert sorted(o.checkpoint for o in totals.removed) == sorted(removed)
    assert all(o.action == "delete" for o in totals.removed)
    removed_bytes = sum(
        size for rel, (kind, size, _, _) in before.items() if rel.split("/")[0] in removed and kind != "dir"
    )
    assert sum(o.bytes for o in totals.removed) == removed_bytes
    journal = state.read_journal()
    assert sorted(e["checkpoint"] for e in journal if e["action"] == "delete") == sorted(removed)
    assert not state.trash.exists() or list(state.trash.iterdir()) == []


@pytest.mark.parametrize("run", RUNS)
def test_every_fixture_checkpoint_is_read_as_the_trainer_wrote_it(run: str) -> None:
    # Read straight from tests/fixtures/hf: reading never writes.
    scanned = read_run(HF / run, HF / run)
    assert scanned.path == "."
    assert [c.step for c in scanned.checkpoints] == ALL_STEPS[run]
    for c in scanned.checkpoints:
        epoch, loss, accuracy, best, stopped = READ[run][c.step]
        assert c.name == f"checkpoint-{c.step}"
        assert c.complete, c.incomplete_reason
        assert c.incomplete_reason is None
        assert c.epoch == epoch
        assert type(c.epoch) is float
        if loss is None:
            assert dict(c.metrics) == {}
        else:
            assert set(c.metrics) == EVAL_KEYS
            assert c.metrics["eval_loss"] == loss
            assert c.metrics["eval_accuracy"] == accuracy
        assert c.trainer_best_step == best
        assert c.training_stopped is stopped


def test_sizes_count_the_files_of_a_checkpoint() -> None:
    scanned = {r: {c.step: c.size_bytes for c in read_run(HF / r, HF / r).checkpoints} for r in ("A", "E")}
    # A/checkpoint-10: config.json 732 + model.safetensors 32016 + optimizer.pt 231 + rng_state.pth 232
    #   + scheduler.pt 230 + trainer_state.json 1428 + training_args.bin 235
    assert scanned["A"][10] == 35104
    # E/checkpoint-10 (save_only_model): config.json 732 + model.safetensors 32016 + trainer_state.json 1431
    #   + training_args.bin 235
    assert scanned["E"][10] == 34414


def test_reasons_on_run_a_name_every_rule_and_protection(real_run: Callable[[str], Path], tmp_path: Path) -> None:
    root = real_run("A")
    policy = Policy(parse_rules("best:1,last:2,epoch:all"))
    plan = make_plan(root, policy, tmp_path / "state").plan.runs[0]
    reasons = {d.checkpoint.step: tuple(reason_texts(d.reasons)) for d in plan.decisions}
    assert reasons[78] == (
        "best eval_loss=0.3849 (1/1)",
        "last 1/2",
        "epoch 3",
        "protected: newest",
        "protected: trainer best",
    )
    assert reasons[70] == ("last 2/2",)
    assert reasons[50] == ("epoch 2",)
    assert reasons[20] == ("epoch 1",)


def test_trainer_best_of_b_is_52_by_accuracy(real_run: Callable[[str], Path], tmp_path: Path) -> None:
    root = real_run("B")
    plan = make_plan(root, Policy(parse_rules("last:1")), tmp_path / "state").plan.runs[0]
    reasons = {d.checkpoint.step: tuple(reason_texts(d.reasons)) for d in plan.kept}
    assert reasons == {52: ("protected: trainer best",), 104: ("last 1/1", "protected: newest")}


def test_trainer_best_of_e_is_checkpoint_10(real_run: Callable[[str], Path], tmp_path: Path) -> None:
    root = real_run("E")
    plan = make_plan(root, Policy(parse_rules("last:1")), tmp_path / "state").plan.runs[0]
    reasons = {d.checkpoint.step: tuple(reason_texts(d.reasons)) for d in plan.kept}
    assert reasons == {10: ("protected: trainer best",), 52: ("last 1/1", "protected: newest")}


def test_a_misspelt_metric_on_a_run_with_evals_is_refused_and_nothing_moves(
    real_run: Callable[[str], Path], tmp_path: Path
) -> None:
    root = real_run("A")
    pipeline = Pipeline.checked(root, Policy(parse_rules("best:1:acuracy")), state_dir=tmp_path / "state")
    before = snapshot(root)
    root_plan = pipeline.survey(None).plan
    plans = root_plan.runs
    assert plans[0].refusal == (
        "rule 'best:1:eval_acuracy': no checkpoint has eval_acuracy; did you mean eval_accuracy? (the run's "
        "metrics: eval_accuracy, eval_loss, eval_runtime, eval_samples_per_second, eval_steps_per_second)"
    )
    assert plans[0].removed == ()
    totals = apply_plan(pipeline, root_plan)
    assert totals.outcomes == []
    assert snapshot(root) == before


def test_c_refuses_a_metric_that_only_its_last_checkpoint_could_have(
    real_run: Callable[[str], Path], tmp_path: Path
) -> None:
    # Only checkpoint-52 has metrics at its own step; they still count as "the run has eval metrics".
    root = real_run("C")
    plan = make_plan(root, Policy(parse_rules("best:1:f1")), tmp_path / "state").plan.runs[0]
    assert plan.refusal is not None
    assert "has eval_f1" in plan.refusal
    assert plan.removed == ()


def test_d2_without_any_eval_is_not_refused_for_a_misspelt_metric(
    real_run: Callable[[str], Path], tmp_path: Path
) -> None:
    root = real_run("D2")
    plan = make_plan(root, Policy(parse_rules("best:1:acuracy")), tmp_path / "state").plan.runs[0]
    assert plan.refusal is None
    assert [d.checkpoint.step for d in plan.kept] == [52]


def test_all_six_runs_under_one_root_are_judged_each_on_its_own(
    real_run: Callable[[str], Path], tmp_path: Path
) -> None:
    for run in RUNS:
        real_run(run)
    root = tmp_path / "outputs"
    pipeline = Pipeline.checked(root, Policy(parse_rules("best:1,last:2,epoch:all")), state_dir=root / "_ckptkeeper")
    state = pipeline.state
    result = pipeline.survey(None)
    assert [p.run.path for p in result.plan.runs] == list(RUNS)
    apply_plan(pipeline, result.plan)
    # The same hand-worked sets as in CASES for "best:1,last:2,epoch:all".
    expected = {
        "A": [20, 50, 70, 78],
        "B": [26, 52, 78, 104],
        "C": [21, 49, 52],
        "D2": [50, 52],
        "E": [10, 20, 50, 52],
        "G": [9, 18, 27],
    }
    for run, steps in expected.items():
        assert set(os.listdir(root / run)) == checkpoint_names(steps)
    assert [r.path for r in scan_root(root, excluded=[state.path]).runs] == list(RUNS)
