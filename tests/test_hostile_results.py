"""Hostile results files for named metrics (`--metric`, issue #20), through the real CLI (`python -m ckptkeeper`).

Every case builds one simulated run (checkpoint-10 ... -40, complete) whose evaluation results are good for
checkpoints 10 (acc_norm 0.9), 30 (0.5) and 40 (0.6); checkpoint-20, the victim, gets the hostile input. The
results files are the real lm-eval format (a results file of tests/fixtures/lm-eval, its model path and
acc_norm set), for both sources:

- `file`: `--metric acc_norm=file:eval_results.json#/results/synth_likes/acc_norm,none`, the document in each
  checkpoint (as teams copy it there);
- `lm-eval`: `--metric acc_norm=lm-eval:ROOT/evals#...`, lm-eval's `--output_path` tree inside the root, each
  file recording the checkpoint by its absolute path.

The checkpoints' files are then dated 10 minutes ago in step order and the results now (`in_step_order`):
results older than their checkpoint would be taken for an earlier one's, and a file written last into
checkpoint-20 would make it the newest written (protected), which is not what these cases are about.

Rules `best:1:acc_norm,last:1`, `--no-protect-trainer-best`. For each case and source:
1. `plan --json --await acc_norm:1h` exits 0 without a traceback, and within a time bound (a FIFO must not
   block, a 200 MB file must not be read); the victim is kept (awaiting, or incomplete where the hostile file
   makes the checkpoint incomplete) and, where the input is unusable, lacks acc_norm; the others are decided
   by their good values;
2. `plan --json` without `--await`: an unusable input means the victim lacks the metric, so it is deleted
   (unless incomplete); a usable one (a path through a symlink or `..` that is the same checkpoint) ranks it;
3. `prune --await acc_norm:1h` exits 0 and removes exactly what the first plan deletes: never the victim.

Then `watch` with every hostile file at once, and the usage errors a bad `--metric` gives.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cliutil import ckptkeeper
from lmeval_fixture import ACC_NORM_POINTER, LMEVAL_FIXTURE
from watchutil import Watch

from ckptkeeper.simtrainer import SimConfig, simulate_run

KEEP = "best:1:acc_norm,last:1"
AWAIT = "acc_norm:1h"
GOOD = {10: 0.9, 30: 0.5, 40: 0.6}
VICTIM = 20
VICTIM_VALUE = 0.95  # where the victim's results are usable: it ranks best
PLAN_SECONDS = 30.0  # a plan that blocks on a FIFO or reads 200 MB is a failure
TEMPLATE = (
    LMEVAL_FIXTURE / "evals" / "__tmp__lmeval-out__run__checkpoint-80" / ("results_2026-12-05T23-12-47.398480.json")
)
PLACEHOLDER = '"__VALUE__"'

LACKS, HAS, INCOMPLETE = "lacks", "has", "incomplete"


# ---- the tree --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tree:
    tmp: Path
    root: Path
    run: Path
    evals: Path  # the lm-eval source (inside the root)
    source: str  # "file" | "lm-eval"

    def checkpoint(self, step: int, run: Path | None = None) -> Path:
        return (run or self.run) / f"checkpoint-{step}"

    def metric(self) -> str:
        where = "file:eval_results.json" if self.source == "file" else f"lm-eval:{self.evals}"
        return f"acc_norm={where}#{ACC_NORM_POINTER}"

    def victim_file(self) -> Path:
        """Where the victim's results go: inside it (file) or in the results tree (lm-eval)."""
        if self.source == "file":
            return self.checkpoint(VICTIM) / "eval_results.json"
        return self.evals / "victim" / "results_2026-12-06T10-00-00.000001.json"


def results_text(recorded: str, value: object) -> str:
    """A real lm-eval results document recording `recorded`, with acc_norm `value` (PLACEHOLDER: filled later
    with raw JSON text), evaluated now (after the checkpoints were written: see `in_step_order`)."""
    doc: dict[str, Any] = json.loads(TEMPLATE.read_text(encoding="utf-8"))
    doc["model_name"] = recorded
    doc["config"]["model_args"]["pretrained"] = recorded
    doc["date"] = time.time()
    doc["results"]["synth_likes"]["acc_norm,none"] = "__VALUE__" if value is PLACEHOLDER else value
    return json.dumps(doc, indent=2)


def with_raw_value(token: str) -> Callable[[Tree], str]:
    """A results document for the victim whose acc_norm is the raw JSON text `token`."""

    def text(tree: Tree) -> str:
        return results_text(os.fspath(tree.checkpoint(VICTIM)), PLACEHOLDER).replace(PLACEHOLDER, token)

    return text


def build(tmp: Path, source: str) -> Tree:
    root = tmp / "root"
    run = root / "run"
    simulate_run(run, SimConfig(steps_per_epoch=10, epochs=4))
    tree = Tree(tmp, root, run, root / "evals", source)
    tree.evals.mkdir()
    for step, value in GOOD.items():
        text = results_text(os.fspath(tree.checkpoint(step)), value)
        if source == "file":
            (tree.checkpoint(step) / "eval_results.json").write_text(text, encoding="utf-8")
        else:
            target = tree.evals / f"good-{step}" / "results_2026-12-06T09-00-00.000001.json"
            target.parent.mkdir()
            target.write_text(text, encoding="utf-8")
    return tree


# ---- hostile inputs ----------------------------------------------------------------------------------------
Place = Callable[[Tree, Path], None]  # write the hostile input at the path given


def content(make: Callable[[Tree], str | bytes]) -> Place:
    def place(tree: Tree, path: Path) -> None:
        data = make(tree)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return place


def fifo(tree: Tree, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)


def link_to(target: str) -> Place:
    def place(tree: Tree, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)

    return place


def sparse(size: int) -> Place:
    """A file of `size` bytes, a valid results document at its start and a hole after it."""

    def place(tree: Tree, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            f.write(results_text(os.fspath(tree.checkpoint(VICTIM)), VICTIM_VALUE).encode())
            f.truncate(size)

    return place


def garbage(tree: Tree) -> bytes:
    return random.Random(20).randbytes(4096)


def truncated(tree: Tree) -> str:
    text = results_text(os.fspath(tree.checkpoint(VICTIM)), VICTIM_VALUE)
    return text[: len(text) // 2]


def deep(tree: Tree) -> str:
    return "[" * 100_000 + "]" * 100_000


def wrapped_in_list(tree: Tree) -> str:
    return "[" + results_text(os.fspath(tree.checkpoint(VICTIM)), VICTIM_VALUE) + "]"


@dataclass(frozen=True)
class Case:
    name: str
    place: Place
    expect: dict[str, str]  # source -> LACKS | HAS | INCOMPLETE (a source not named: the case is not for it)
    warns: bool = False  # the plan says why it ignored the file (lm-eval: a path outside the root, ambiguous)
    setup: Callable[[Tree], None] | None = None  # more of the tree (another run)


BOTH_LACK = {"file": LACKS, "lm-eval": LACKS}
CASES = [
    Case("truncated JSON", content(truncated), BOTH_LACK),
    # an empty file in a checkpoint is a save in progress: the checkpoint is incomplete (SPEC "Complete" 4)
    Case("empty", content(lambda t: b""), {"file": INCOMPLETE, "lm-eval": LACKS}),
    Case("1e400", content(with_raw_value("1e400")), BOTH_LACK),
    Case("-1e400", content(with_raw_value("-1e400")), BOTH_LACK),
    Case("10**5000 as a JSON int", content(with_raw_value("1" + "0" * 5000)), BOTH_LACK),
    Case("NaN", content(with_raw_value("NaN")), BOTH_LACK),
    Case("Infinity", content(with_raw_value("Infinity")), BOTH_LACK),
    Case("-Infinity", content(with_raw_value("-Infinity")), BOTH_LACK),
    Case("a string number", content(with_raw_value('"0.95"')), BOTH_LACK),
    Case("true", content(with_raw_value("true")), BOTH_LACK),
    Case("100k levels of nesting", content(deep), BOTH_LACK),
    Case("100k levels of nesting in the value", content(with_raw_value("[" * 100_000 + "]" * 100_000)), BOTH_LACK),
    Case("top level a list holding the document", content(wrapped_in_list), BOTH_LACK),
    Case("top level null", content(lambda t: "null"), BOTH_LACK),
    Case("top level a number", content(lambda t: "0.95"), BOTH_LACK),
    Case("binary garbage", content(garbage), BOTH_LACK),
    # a FIFO is no regular file (not an empty one: the checkpoint stays complete); never opened for a blocking read
    Case("a FIFO", fifo, BOTH_LACK),
    Case("a symlink to /dev/zero", link_to("/dev/zero"), BOTH_LACK),
    Case("a sparse 200 MB file", sparse(200 << 20), BOTH_LACK),
]


# ---- lm-eval: the recorded model path ----------------------------------------------------------------------
def recorded_as(make_path: Callable[[Tree], str], value: object = VICTIM_VALUE) -> Place:
    """A good results file for the victim, except that it records the model path `make_path` gives."""

    def place(tree: Tree, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(results_text(make_path(tree), value), encoding="utf-8")

    return place


def outside_copy(tree: Tree) -> str:
    """A real checkpoint-20 outside the root, with the same trailing components as the victim."""
    outside = tree.tmp / "outside" / "run"
    simulate_run(outside, SimConfig(steps_per_epoch=10, epochs=2))
    return os.fspath(outside / f"checkpoint-{VICTIM}")


def through_symlink(tree: Tree) -> str:
    (tree.tmp / "link").symlink_to(tree.run)
    return os.fspath(tree.tmp / "link" / f"checkpoint-{VICTIM}")


def dotdot_same(tree: Tree) -> str:
    return f"{tree.checkpoint(10)}/../checkpoint-{VICTIM}"


def dotdot_through_symlink(tree: Tree) -> str:
    """run/away -> outside/deep/x: POSIX resolves run/away/../checkpoint-20 to outside/deep/checkpoint-20 (a
    real checkpoint outside the root); only a lexical `..` would make it the victim."""
    deep_dir = tree.tmp / "outside" / "deep"
    simulate_run(deep_dir, SimConfig(steps_per_epoch=10, epochs=2))
    (deep_dir / "x").mkdir()
    (tree.run / "away").symlink_to(deep_dir / "x")
    return f"{tree.run}/away/../checkpoint-{VICTIM}"


def dotdot_escape(tree: Tree) -> str:
    outside_copy(tree)
    return f"{tree.run}/../../outside/run/checkpoint-{VICTIM}"


def relative(path: str) -> Callable[[Tree], str]:
    return lambda tree: path


def twin_run(tree: Tree) -> None:
    """A second run below the root with a checkpoint-20 of its own."""
    simulate_run(tree.root / "twin", SimConfig(steps_per_epoch=10, epochs=2))


def not_a_string(tree: Tree) -> str:
    return results_text("__PATH__", VICTIM_VALUE).replace('"__PATH__"', "[20]")


PATH_CASES = [
    Case("model path outside the root", recorded_as(outside_copy), {"lm-eval": LACKS}, warns=True),
    Case("model path that does not exist", recorded_as(lambda t: "/nonexistent/run/checkpoint-20"), {"lm-eval": LACKS}),
    Case("model path through a symlink to the run", recorded_as(through_symlink), {"lm-eval": HAS}),
    Case("model path with .. (the same checkpoint)", recorded_as(dotdot_same), {"lm-eval": HAS}),
    Case("model path with .. after a symlink out", recorded_as(dotdot_through_symlink), {"lm-eval": LACKS}),
    Case("model path with .. out of the root", recorded_as(dotdot_escape), {"lm-eval": LACKS}, warns=True),
    Case("relative model path naming one checkpoint", recorded_as(relative("run/checkpoint-20")), {"lm-eval": HAS}),
    Case("relative model path, a dangling one", recorded_as(relative("nowhere/checkpoint-20")), {"lm-eval": LACKS}),
    Case(
        "relative model path naming two checkpoints",
        recorded_as(relative("checkpoint-20")),
        {"lm-eval": LACKS},
        warns=True,
        setup=twin_run,
    ),
    # the file source does not look at the model path: there the document is simply the victim's
    Case("model path not a string", content(not_a_string), {"file": HAS, "lm-eval": LACKS}),
    # file: the results file inside the checkpoint is a link (not followed)
    Case("results file a link to another checkpoint's", link_to("../checkpoint-10/eval_results.json"), {"file": LACKS}),
]


# ---- running the CLI ---------------------------------------------------------------------------------------
def rule_args(tree: Tree) -> list[str]:
    return ["--metric", tree.metric(), "--keep", KEEP, "--no-protect-trainer-best"]


def plan(tree: Tree, awaiting: bool) -> dict[str, Any]:
    args: list[str | Path] = ["plan", tree.root, *rule_args(tree), "--json"]
    started = time.monotonic()
    done = ckptkeeper(*args, *(["--await", AWAIT] if awaiting else []), timeout=2 * PLAN_SECONDS)
    took = time.monotonic() - started
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, f"plan exited {done.returncode}: {done.stderr[-2000:]}"
    assert took < PLAN_SECONDS, f"plan took {took:.1f} s"
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def decisions(doc: dict[str, Any], run: str = "run") -> dict[int, dict[str, Any]]:
    (found,) = [r for r in doc["runs"] if r["run"] == run]
    return {c["step"]: c for c in found["checkpoints"]}


def expected(kind: str, awaiting: bool) -> dict[int, str]:
    """step -> keep | delete in the run, by the good values and what the victim's input means."""
    if kind == HAS:
        return {10: "delete", VICTIM: "keep", 30: "delete", 40: "keep"}
    victim = "keep" if awaiting or kind == INCOMPLETE else "delete"
    return {10: "keep", VICTIM: victim, 30: "delete", 40: "keep"}


def check_plan(doc: dict[str, Any], kind: str, awaiting: bool) -> None:
    found = decisions(doc)
    assert {s: c["decision"] for s, c in found.items()} == expected(kind, awaiting), found
    for step, value in GOOD.items():
        assert found[step]["metrics"].get("acc_norm") == value, found[step]
    victim = found[VICTIM]
    if kind == HAS:
        assert victim["metrics"].get("acc_norm") == VICTIM_VALUE, victim
        return
    assert "acc_norm" not in victim["metrics"], victim
    assert victim["complete"] == (kind != INCOMPLETE), victim
    if kind == LACKS:  # the plan says why it lacks the metric
        assert victim["missing_metrics"].get("acc_norm"), victim
    if awaiting and kind == LACKS:
        assert "awaiting" in [r["kind"] for r in victim["reasons"]], victim


def check_prune(tree: Tree, awaited: dict[str, Any]) -> None:
    """prune --await removes exactly what the plan with --await deletes: never the victim."""
    args: list[str | Path] = ["prune", tree.root, *rule_args(tree)]
    done = ckptkeeper(*args, "--await", AWAIT, timeout=2 * PLAN_SECONDS)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, f"prune exited {done.returncode}: {done.stderr[-2000:]}"
    for run in awaited["runs"]:
        kept = {c["name"] for c in run["checkpoints"] if c["decision"] != "delete"}
        on_disk = {p.name for p in (tree.root / run["run"]).glob("checkpoint-*") if not p.is_symlink()}
        assert on_disk == kept, (run["run"], sorted(on_disk), sorted(kept))
    assert tree.checkpoint(VICTIM).is_dir()


def in_step_order(root: Path) -> None:
    """Give every entry of every checkpoint below `root` a time by its step (10 minutes ago + step seconds): the
    newest written is the highest step, as in a real run, whatever was written last here (the victim's file)."""
    base = time.time_ns() - 600 * 10**9
    for checkpoint in root.glob("*/checkpoint-*"):
        stamp = base + int(checkpoint.name.removeprefix("checkpoint-")) * 10**9
        for dirpath, dirs, files in os.walk(checkpoint, topdown=False):
            for name in [*files, *dirs]:
                os.utime(os.path.join(dirpath, name), ns=(stamp, stamp), follow_symlinks=False)
        os.utime(checkpoint, ns=(stamp, stamp))


def run_case(tmp_path: Path, case: Case, source: str) -> None:
    tree = build(tmp_path, source)
    if case.setup is not None:
        case.setup(tree)
    case.place(tree, tree.victim_file())
    in_step_order(tree.root)
    kind = case.expect[source]
    awaited = plan(tree, awaiting=True)
    check_plan(awaited, kind, awaiting=True)
    if case.warns:
        said = " ".join(awaited["warnings"])
        assert tree.victim_file().name in said, awaited["warnings"]
    check_plan(plan(tree, awaiting=False), kind, awaiting=False)
    check_prune(tree, awaited)


PARAMS = [
    pytest.param(case, source, id=f"{source}: {case.name}")
    for case in [*CASES, *PATH_CASES]
    for source in ("file", "lm-eval")
    if source in case.expect
]


@pytest.mark.parametrize(("case", "source"), PARAMS)
def test_a_hostile_results_file_never_crashes_and_never_costs_an_awaited_checkpoint(
    tmp_path: Path, case: Case, source: str
) -> None:
    run_case(tmp_path, case, source)


def test_the_two_checkpoints_a_relative_path_could_name_both_lack_the_metric(tmp_path: Path) -> None:
    tree = build(tmp_path, "lm-eval")
    twin_run(tree)
    recorded_as(relative("checkpoint-20"))(tree, tree.victim_file())
    in_step_order(tree.root)
    twin = decisions(plan(tree, awaiting=True), "twin")
    assert "acc_norm" not in twin[VICTIM]["metrics"], twin[VICTIM]
    assert "awaiting" in [r["kind"] for r in twin[VICTIM]["reasons"]], twin[VICTIM]


# ---- usage errors: nothing runs ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "metric",
    [
        pytest.param("acc_norm=file:../eval_results.json#/results/synth_likes/acc_norm,none", id="file: .. out"),
        pytest.param("acc_norm=file:/etc/passwd#/x", id="file: absolute"),
        pytest.param("acc_norm=lm-eval:/nonexistent/evals#/results/x", id="lm-eval: no such dir"),
        pytest.param("acc_norm=file:eval_results.json#results/x", id="pointer without /"),
        pytest.param("acc_norm=file:eval_results.json#/a~2b", id="pointer bad escape"),
        pytest.param("eval_acc=file:eval_results.json#/x", id="name eval_"),
        pytest.param("acc_norm=s3:bucket#/x", id="unknown source"),
    ],
)
def test_a_bad_metric_definition_is_a_usage_error(tmp_path: Path, metric: str) -> None:
    tree = build(tmp_path, "file")
    done = ckptkeeper("prune", tree.root, "--metric", metric, "--keep", KEEP, "--await", AWAIT)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "Error" in done.stderr, done.stderr
    assert sorted(p.name for p in tree.run.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (10, 20, 30, 40)]


# ---- the daemon: every hostile results file at once ----------------------------------------------------------
def test_watch_survives_every_hostile_results_file_and_keeps_the_awaited_checkpoint(tmp_path: Path) -> None:
    """`watch` with every hostile input of CASES at once in its lm-eval tree: it runs its passes, logs no error,
    removes checkpoint-30 (its good value ranks it out) and keeps the victim, awaiting."""
    tree = build(tmp_path, "lm-eval")
    for i, case in enumerate(CASES):
        case.place(tree, tree.evals / f"hostile-{i}" / "results_2026-12-06T10-00-00.000001.json")
    in_step_order(tree.root)
    log = tmp_path / "watch.log"
    args = [*rule_args(tree), "--await", AWAIT, "--settle", "0", "--rescan-interval", "1", "--log-format", "json"]
    watch = Watch(tree.root, args, log)
    try:
        watch.wait_log('"action": "delete"', timeout=PLAN_SECONDS)
        time.sleep(2.5)  # two more full rescans (--rescan-interval 1) over the same files
        assert watch.alive(), watch.describe()
        code, _ = watch.terminate()
    finally:
        watch.kill()
    assert code == 0, watch.describe()
    text = watch.log()
    assert "Traceback" not in text, text[-3000:]
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert not [e for e in entries if e.get("level") == "error"], text[-3000:]
    assert sorted(p.name for p in tree.run.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20", "checkpoint-40"]
