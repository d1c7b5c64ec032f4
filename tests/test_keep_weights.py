"""Weights-only keep (`--keep-weights`, issue #13, SPEC "Weights-only keep"): the planner's semantics through a
golden table, which top-level entries are resume state, and the slim itself, all through real files, with the
real CLI wherever output is concerned.

The golden table is written inline (GOLDEN below), not as files under tests/golden/: that directory belongs to
tests/test_policy_golden.py, which requires every file there to be one of its own cases. Each case is planned by
the library over a run scanned from disk, compared exactly, checked for the invariants, and `plan --json` through
the CLI must give the same decisions and reasons.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cliutil import ckptkeeper, per_removal

from ckptkeeper.actions import RUN_TRASH_NAME, TrashEntry, delete_entry
from ckptkeeper.cli import main
from ckptkeeper.integrity import encode_safetensors
from ckptkeeper.model import Action, RunPlan
from ckptkeeper.policy import Policy, Protections
from ckptkeeper.render import decision_text, human_bytes, reason_texts, reasons_text
from ckptkeeper.rules import format_rules, parse_rules
from ckptkeeper.scan import INCOMPLETE_MARKER, read_checkpoint, read_run
from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.slimming import slim_checkpoint
from ckptkeeper.state import StateDir
from ckptkeeper.weights import MARKER, MARKER_TEMP, Parts, split

SIM_RESUME = ("optimizer.pt", "rng_state.pth", "scheduler.pt")  # what the simulated Trainer writes
SIM_REMOVED = "removed optimizer.pt, rng_state.pth, scheduler.pt"
MODEL = encode_safetensors({"w": ("float32", [4], bytes(range(16)))}, {"format": "pt"})
HF_RESUME = {
    "optimizer.pt": b"o" * 3000,
    "scheduler.pt": b"s" * 100,
    "rng_state.pth": b"r" * 300,
    "scaler.pt": b"c" * 50,
}


# --- building checkpoints by hand ------------------------------------------------------------------------------


def trainer_state(step: int, epoch: float, loss: float | None, best: int | None, metric: str = "eval_loss") -> bytes:
    history: list[dict[str, Any]] = [
        {"epoch": epoch, "grad_norm": 1.0, "learning_rate": 5e-5, "loss": 0.9, "step": step}
    ]
    if loss is not None:
        history.append({"epoch": epoch, metric: loss, "eval_runtime": 0.1, "step": step})
    doc = {
        "best_global_step": best,
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": epoch,
        "global_step": step,
        "log_history": history,
        "max_steps": 1000,
        "num_train_epochs": 10,
        "save_steps": 10,
        "stateful_callbacks": {
            "TrainerControl": {"args": {"should_training_stop": False, "should_save": True}, "attributes": {}}
        },
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def make_checkpoint(
    run: Path,
    step: int,
    epoch: float,
    loss: float | None = None,
    *,
    best: int | None = None,
    entries: Mapping[str, bytes] = HF_RESUME,
    weights: bool = True,
    marker: bool = False,
    incomplete: bool = False,
    metric: str = "eval_loss",
) -> Path:
    """A checkpoint as the Trainer writes it: config, weights (unless not), `entries` (a path with a `/` makes
    the directories on the way), training_args.bin, and trainer_state.json last. `marker`: already made weights
    only by ckptkeeper (its marker, as ckptkeeper writes it)."""
    directory = run / f"checkpoint-{step}"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "tiny"}\n')
    if weights:
        (directory / "model.safetensors").write_bytes(MODEL)
    for rel, data in entries.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
    (directory / "training_args.bin").write_bytes(b"\x80\x04args")
    if incomplete:
        (directory / INCOMPLETE_MARKER).write_text("saving\n")
    (directory / "trainer_state.json").write_bytes(trainer_state(step, epoch, loss, best, metric))
    if marker:  # as a finished slim leaves it: the marker records the directory's times, which are put back
        st = directory.stat()
        record = {"weights_only": True, "by": "ckptkeeper", "resume_state_removed": ["optimizer.pt"]}
        (directory / MARKER).write_text(json.dumps({**record, "directory_times_ns": [st.st_atime_ns, st.st_mtime_ns]}))
        os.utime(directory, ns=(st.st_atime_ns, st.st_mtime_ns))
    return directory


ZERO3 = {  # DeepSpeed ZeRO-3 without gathered 16-bit weights: the model exists only inside global_step<N>/
    "global_step40/zero_pp_rank_0_mp_rank_00_model_states.pt": b"m" * 700,
    "global_step40/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": b"z" * 1400,
    "latest": b"global_step40",
    "zero_to_fp32.py": b"# script\n",
    "rng_state.pth": b"r" * 300,
    "scheduler.pt": b"s" * 100,
}
DEEPSPEED = {  # DeepSpeed with the weights gathered outside its engine state
    "global_step80/mp_rank_00_model_states.pt": b"m" * 700,
    "global_step80/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"z" * 1400,
    "latest": b"global_step80",
    "zero_to_fp32.py": b"# script\n",
    "rng_state.pth": b"r" * 300,
    "scheduler.pt": b"s" * 100,
}
MULTI_RANK = {
    "optimizer.pt": b"o" * 3000,
    "scheduler.pt": b"s" * 100,
    "rng_state_0.pth": b"r" * 300,
    "rng_state_1.pth": b"r" * 300,
}


def build_golden_run(run: Path) -> None:
    """One run, written in step order. Epoch buckets (ceil(epoch)) in the last column; the Trainer's best is 20
    (best_global_step of the newest complete checkpoint, 90).
     step  epoch  eval_loss  what                                                        bucket
       10   0.5   0.90       HF: optimizer.pt, scheduler.pt, rng_state.pth, scaler.pt    1
       20   1.0   0.30       HF; the Trainer's best                                       1
       30   1.5   0.80       multi-rank: rng_state_0.pth, rng_state_1.pth                 2
       40   2.0   0.60       DeepSpeed ZeRO-3: weights only inside global_step40/         2
       50   2.5   0.70       already weights-only (marker, no resume state)               3
       60   3.0   0.40       save_only_model (no resume state at all)                     3
       70   3.5   -          incomplete (checkpoint-is-incomplete.txt)                    4
       80   4.0   0.50       DeepSpeed with the weights outside (model.safetensors)       4
       90   4.5   0.55       HF; the newest complete                                      5
    """
    make_checkpoint(run, 10, 0.5, 0.90, best=None)
    make_checkpoint(run, 20, 1.0, 0.30, best=20)
    make_checkpoint(run, 30, 1.5, 0.80, best=20, entries=MULTI_RANK)
    make_checkpoint(run, 40, 2.0, 0.60, best=20, entries=ZERO3, weights=False)
    make_checkpoint(run, 50, 2.5, 0.70, best=20, entries={}, marker=True)
    make_checkpoint(run, 60, 3.0, 0.40, best=20, entries={})
    make_checkpoint(run, 70, 3.5, None, best=20, incomplete=True)
    make_checkpoint(run, 80, 4.0, 0.50, best=20, entries=DEEPSPEED)
    make_checkpoint(run, 90, 4.5, 0.55, best=20)


@dataclass(frozen=True)
class Case:
    name: str
    keep: str
    keep_weights: str
    protect_trainer_best: bool = True

    def flags(self) -> list[str]:
        flags = ["--keep", self.keep] if self.keep else []
        flags += ["--keep-weights", self.keep_weights]
        return flags if self.protect_trainer_best else [*flags, "--no-protect-trainer-best"]

    def policy(self) -> Policy:
        return Policy(
            parse_rules(self.keep),
            Protections(self.protect_trainer_best),
            Action.DELETE,
            parse_rules(self.keep_weights),
        )


ZERO3_WHOLE = "kept whole: its weights exist only inside the resume state"
CANNOT = "weights only, cannot be made whole again"
CASES = [
    Case("last-2-weights-epoch-all", "last:2", "epoch:all"),
    Case("epoch-all-weights-last-4", "epoch:all", "last:4"),
    Case("last-5-weights-every-20", "last:5", "every:20"),
    Case("only-weights-epoch-all-best-2", "", "epoch:all,best:2"),
    Case("best-1-weights-best-3", "best:1", "best:3"),
    Case("last-1-weights-epoch-all-no-trainer-best", "last:1", "epoch:all", protect_trainer_best=False),
    Case("refused-metric-typo-in-keep-weights", "last:2", "best:1:acuracy"),
]
# Checked by hand. The slim line lists the resume state a weights-only decision would remove, and its bytes.
GOLDEN = {
    # --keep and --keep-weights apart: 80 and 90 whole (last 2); 20 would be the epoch-1 weights-only keep but is
    # the Trainer's best, so whole; 40 is ZeRO-3, kept whole saying why; 60 is weights-only with nothing to slim;
    # 50 (already weights-only) is removed like any other; 70 (incomplete) is untouched.
    "last-2-weights-epoch-all": """\
checkpoint-10  delete               no rule keeps it
checkpoint-20  keep                 protected: trainer best
checkpoint-30  delete               no rule keeps it
checkpoint-40  keep                 epoch 2 (weights only), kept whole: its weights exist only inside the resume state
checkpoint-50  delete               no rule keeps it
checkpoint-60  keep (weights only)  epoch 3 (weights only)
checkpoint-70  keep                 incomplete: checkpoint-is-incomplete.txt present (save in progress)
checkpoint-80  keep                 last 2/2
checkpoint-90  keep                 last 1/2, protected: newest
""",
    # Overlapping: last:4 (50, 60, 80, 90) against epoch:all (20, 40, 60, 80, 90): only 50 is kept by
    # --keep-weights alone, and it is weights-only already (nothing to slim).
    "epoch-all-weights-last-4": """\
checkpoint-10  delete               no rule keeps it
checkpoint-20  keep                 epoch 1, protected: trainer best
checkpoint-30  delete               no rule keeps it
checkpoint-40  keep                 epoch 2
checkpoint-50  keep (weights only)  last 4/4 (weights only)
checkpoint-60  keep                 epoch 3
checkpoint-70  keep                 incomplete: checkpoint-is-incomplete.txt present (save in progress)
checkpoint-80  keep                 epoch 4
checkpoint-90  keep                 epoch 5, protected: newest
""",
    # Overlapping wholly: every:20 keeps nothing last:5 does not; 50 (weights-only) kept whole says so.
    "last-5-weights-every-20": """\
checkpoint-10  delete               no rule keeps it
checkpoint-20  keep                 protected: trainer best
checkpoint-30  delete               no rule keeps it
checkpoint-40  keep                 last 5/5
checkpoint-50  keep                 last 4/5, weights only, cannot be made whole again
checkpoint-60  keep                 last 3/5
checkpoint-70  keep                 incomplete: checkpoint-is-incomplete.txt present (save in progress)
checkpoint-80  keep                 last 2/5
checkpoint-90  keep                 last 1/5, protected: newest
""",
    # --keep-weights alone is a policy (not refused): the protections stay whole; 80 (DeepSpeed with weights
    # outside) loses global_step80/ and latest with its other resume state.
    "only-weights-epoch-all-best-2": """\
checkpoint-10  delete               no rule keeps it
checkpoint-20  keep                 protected: trainer best
checkpoint-30  delete               no rule keeps it
checkpoint-40  keep                 epoch 2 (weights only), kept whole: its weights exist only inside the resume state
checkpoint-50  delete               no rule keeps it
checkpoint-60  keep (weights only)  epoch 3 (weights only), best eval_loss=0.4000 (2/2) (weights only)
checkpoint-70  keep                 incomplete: checkpoint-is-incomplete.txt present (save in progress)
checkpoint-80  keep (weights only)  epoch 4 (weights only)
               slims global_step80, latest, rng_state.pth, scheduler.pt (2513 B)
checkpoint-90  keep                 protected: newest
""",
    "best-1-weights-best-3": """\
checkpoint-10  delete               no rule keeps it
checkpoint-20  keep                 best eval_loss=0.3000 (1/1), protected: trainer best
checkpoint-30  delete               no rule keeps it
checkpoint-40  delete               no rule keeps it
checkpoint-50  delete               no rule keeps it
checkpoint-60  keep (weights only)  best eval_loss=0.4000 (2/3) (weights only)
checkpoint-70  keep                 incomplete: checkpoint-is-incomplete.txt present (save in progress)
checkpoint-80  keep (weights only)  best eval_loss=0.5000 (3/3) (weights only)
               slims global_step80, latest, rng_state.pth, scheduler.pt (2513 B)
checkpoint-90  keep                 protected: newest
""",
    # Without the Trainer's best protected, the epoch-1 keep of 20 is weights-only; 30 (multi-rank) is not kept.
    "last-1-weights-epoch-all-no-trainer-best": """\
checkpoint-10  delete               no rule keeps it
checkpoint-20  keep (weights only)  epoch 1 (weights only)
               slims optimizer.pt, rng_state.pth, scaler.pt, scheduler.pt (3450 B)
checkpoint-30  delete               no rule keeps it
checkpoint-40  keep                 epoch 2 (weights only), kept whole: its weights exist only inside the resume state
checkpoint-50  delete               no rule keeps it
checkpoint-60  keep (weights only)  epoch 3 (weights only)
checkpoint-70  keep                 incomplete: checkpoint-is-incomplete.txt present (save in progress)
checkpoint-80  keep (weights only)  epoch 4 (weights only)
               slims global_step80, latest, rng_state.pth, scheduler.pt (2513 B)
checkpoint-90  keep                 last 1/1, protected: newest
""",
    # A misspelt metric in --keep-weights refuses the run: everything kept whole, nothing slimmed. (50 does not say
    # it is weights only here: see test_a_weights_only_checkpoint_in_a_refused_run_says_so.)
    "refused-metric-typo-in-keep-weights": """\
refusal: rule 'best:1:eval_acuracy': no checkpoint has eval_acuracy (the run's metrics: eval_loss, eval_runtime)
checkpoint-10  keep                 refused: nothing is removed in this run
checkpoint-20  keep                 protected: trainer best
checkpoint-30  keep                 refused: nothing is removed in this run
checkpoint-40  keep                 refused: nothing is removed in this run
checkpoint-50  keep                 refused: nothing is removed in this run, weights only, cannot be made whole again
checkpoint-60  keep                 refused: nothing is removed in this run
checkpoint-70  keep                 incomplete: checkpoint-is-incomplete.txt present (save in progress)
checkpoint-80  keep                 last 2/2
checkpoint-90  keep                 last 1/2, protected: newest
""",
}


def render(plan: RunPlan) -> str:
    lines = [f"refusal: {plan.refusal}"] if plan.refusal else []
    for d in plan.decisions:
        lines.append(f"{d.checkpoint.name}  {decision_text(d):<19}  {reasons_text(d.reasons)}")
        if d.slims:
            c = d.checkpoint
            lines.append(f"{'':15}slims {', '.join(c.resume_state)} ({c.resume_bytes} B)")
    return "\n".join(lines) + "\n"


def check_invariants(plan: RunPlan, case: Case) -> None:
    by_step = {d.checkpoint.step: d for d in plan.decisions}
    newest = max(d.checkpoint.step for d in plan.decisions if d.checkpoint.complete)
    assert by_step[newest].action is Action.KEEP  # whole: the Trainer would resume from it
    if case.protect_trainer_best:
        assert by_step[20].action is Action.KEEP
    for d in plan.decisions:
        c = d.checkpoint
        if not c.complete:
            assert d.action is Action.KEEP and not d.slims
        if d.action is Action.WEIGHTS_ONLY:
            assert plan.refusal is None
            assert c.weights_outside or c.weights_only
            assert all(r.weights_only for r in d.reasons)
        if d.slims:
            # resume state to remove, or (a slim cut short after its last move) the directory's times to put back
            assert (c.resume_state and c.resume_bytes > 0) or c.times_to_restore
        if CANNOT in reason_texts(d.reasons):
            assert c.weights_only and d.action is Action.KEEP
    if plan.refusal:
        assert all(d.action is Action.KEEP for d in plan.decisions)


@pytest.fixture
def golden_root(tmp_path: Path) -> Path:
    build_golden_run(tmp_path / "outputs" / "run")
    return tmp_path / "outputs"


def cli(*args: str | Path, env: Mapping[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def plan_json(root: Path, *flags: str) -> tuple[int, dict[str, Any]]:
    result = cli("plan", root, "--json", *flags)
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return result.exit_code, data


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden(case: Case, golden_root: Path) -> None:
    run = read_run(golden_root, golden_root / "run")
    plan = case.policy().plan(run)
    check_invariants(plan, case)
    assert render(plan) == GOLDEN[case.name]
    # The CLI says the same, decision for decision, reason for reason.
    code, data = plan_json(golden_root, *case.flags())
    assert code == (3 if plan.refusal else 0)
    assert data["keep_weights"] == format_rules(parse_rules(case.keep_weights))
    [entry] = data["runs"]
    assert entry["refusal"] == plan.refusal
    assert [(c["name"], c["decision"], [r["text"] for r in c["reasons"]]) for c in entry["checkpoints"]] == [
        (d.checkpoint.name, str(d.action), reason_texts(d.reasons)) for d in plan.decisions
    ]


def test_every_golden_entry_belongs_to_a_case() -> None:
    assert sorted(GOLDEN) == sorted(c.name for c in CASES)


def test_a_weights_only_checkpoint_in_a_refused_run_says_so(golden_root: Path) -> None:
    code, data = plan_json(golden_root, "--keep", "last:2", "--keep-weights", "best:1:acuracy")
    assert code == 3
    c50 = next(c for c in data["runs"][0]["checkpoints"] if c["name"] == "checkpoint-50")
    assert CANNOT in [r["text"] for r in c50["reasons"]]


def test_a_refusal_in_one_run_holds_the_weights_only_keeps_of_the_others(tmp_path: Path) -> None:
    """--keep-weights best:1:accuracy: run b has no eval_accuracy (refused), so run a is held: nothing slimmed."""
    root = tmp_path / "outputs"
    for step, epoch in ((10, 1.0), (20, 2.0), (30, 3.0)):
        make_checkpoint(root / "a", step, epoch, 0.5 - step / 100, metric="eval_accuracy")
    for step, epoch in ((10, 1.0), (20, 2.0), (30, 3.0)):
        make_checkpoint(root / "b", step, epoch, 0.5)
    flags = ("--keep", "last:1", "--keep-weights", "best:1:accuracy,epoch:all")
    code, data = plan_json(root, *flags)
    assert code == 3
    runs = {r["run"]: r for r in data["runs"]}
    assert runs["a"]["refusal"] is None
    assert runs["b"]["refusal"].startswith("rule 'best:1:eval_accuracy': no checkpoint has eval_accuracy")
    assert [(c["name"], c["decision"], [r["text"] for r in c["reasons"]]) for c in runs["a"]["checkpoints"]] == [
        ("checkpoint-10", "keep", ["held: retention is refused in run 'b'"]),
        ("checkpoint-20", "keep", ["held: retention is refused in run 'b'"]),
        ("checkpoint-30", "keep", ["last 1/1", "protected: newest"]),
    ]
    assert data["summary"]["weights_only"] == 0 and data["summary"]["bytes_to_free"] == 0
    before = tree(root)
    result = cli("prune", root, *flags)
    assert result.exit_code == 3, result.output
    assert tree(root, skip="_ckptkeeper") == before
    assert not list(root.rglob(MARKER))


# --- which entries are resume state ---------------------------------------------------------------------------

TOKENIZER = {
    "tokenizer.json": b"{}",
    "tokenizer_config.json": b"{}",
    "special_tokens_map.json": b"{}",
    "vocab.txt": b"a\nb\n",
    "preprocessor_config.json": b"{}",
    "generation_config.json": b"{}",
}


@dataclass(frozen=True)
class Layout:
    name: str
    entries: Mapping[str, bytes]
    weights: bool  # model.safetensors beside them
    resume: tuple[str, ...]  # the top-level entries that are resume state
    weights_outside: bool = True


LAYOUTS = [
    Layout(
        "hf",
        {**HF_RESUME, **TOKENIZER, "notes.txt": b"mine"},
        True,
        ("optimizer.pt", "rng_state.pth", "scaler.pt", "scheduler.pt"),
    ),
    Layout(
        "multi-rank rng states",
        {**MULTI_RANK, "rng_state_2.pth": b"r" * 9, "rng_state_13.pth": b"r" * 9},
        True,
        ("optimizer.pt", "rng_state_0.pth", "rng_state_1.pth", "rng_state_13.pth", "rng_state_2.pth", "scheduler.pt"),
    ),
    Layout(
        "accelerate optimizer.bin",
        {"optimizer.bin": b"o" * 90, "scheduler.pt": b"s"},
        True,
        ("optimizer.bin", "scheduler.pt"),
    ),
    Layout(
        "deepspeed, weights outside",
        {k.replace("80", "10"): v for k, v in DEEPSPEED.items()},
        True,
        ("global_step10", "latest", "rng_state.pth", "scheduler.pt"),
    ),
    Layout(
        "deepspeed zero-3, weights inside",
        {k.replace("40", "10"): v for k, v in ZERO3.items()},
        False,
        ("rng_state.pth", "scheduler.pt"),
        weights_outside=False,
    ),
    Layout(
        "fsdp sharded",
        {
            "optimizer_0/__0_0.distcp": b"o" * 500,
            "optimizer_0/.metadata": b"m",
            "pytorch_model_fsdp_0/__0_0.distcp": b"w" * 400,
            "pytorch_model_fsdp_0/.metadata": b"m",
            "rng_state_0.pth": b"r" * 30,
            "scheduler.pt": b"s",
        },
        False,
        ("optimizer_0", "rng_state_0.pth", "scheduler.pt"),
    ),
    Layout(
        "peft adapter",
        {"adapter_model.safetensors": MODEL, "adapter_config.json": b"{}", **HF_RESUME},
        False,
        ("optimizer.pt", "rng_state.pth", "scaler.pt", "scheduler.pt"),
    ),
    Layout(
        "look-alikes stay",
        {
            "optimizer_0": b"a file, not FSDP's directory",
            "global_step10": b"a file, not DeepSpeed's directory",
            "latest/x": b"a directory, not DeepSpeed's file",
            "rng_state.pth.bak": b"x",
            "optimizer.pt.tmp-copy": b"x",
            "my_optimizer.pt": b"x",
            "scheduler.pt.old": b"x",
            "rng_state_a.pth": b"x",
            "optimizer.pt": b"o",
        },
        True,
        ("optimizer.pt",),
    ),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=[x.name for x in LAYOUTS])
def test_resume_state_of_each_layout_on_disk(tmp_path: Path, layout: Layout) -> None:
    directory = make_checkpoint(tmp_path / "run", 10, 1.0, 0.5, entries=layout.entries, weights=layout.weights)
    c = read_checkpoint(directory, 10)
    assert c.complete, c.incomplete_reason
    assert c.resume_state == layout.resume
    assert c.weights_outside is layout.weights_outside
    assert c.weights_only is False
    # every regular file below the resume state's own (what deleting it frees; no directory's own size)
    below = list(directory.rglob("*"))
    files = [p for p in below if p.is_file() and not p.is_symlink()]
    assert c.resume_bytes == sum(p.lstat().st_size for p in files if p.relative_to(directory).parts[0] in layout.resume)


def test_split_by_names() -> None:
    assert split(["model.safetensors", "optimizer.pt", MARKER]) == Parts(("optimizer.pt",), True, True)
    # a directory named like a resume file stays; DeepSpeed's state goes only with weights outside
    assert split(["optimizer.pt", "global_step5", "latest"], ["optimizer.pt", "global_step5"]) == Parts(
        (), False, False
    )
    assert split(["pytorch_model_fsdp_0", "global_step5", "latest"], ["pytorch_model_fsdp_0", "global_step5"]) == (
        Parts(("global_step5", "latest"), True, False)
    )
    # A slim cut short after moving global_step5/ (sorted first) leaves `latest`: still resume state once marked,
    # so the next pass finishes the slim (found by the SIGKILL campaign's DeepSpeed-like layout, about 1 round
    # in 200); unmarked, a `latest` with no engine state beside it is not DeepSpeed's, and stays.
    assert split(["model.safetensors", "latest", MARKER]) == Parts(("latest",), True, True)
    assert split(["model.safetensors", "latest"]) == Parts((), True, False)
    assert split(["latest", MARKER]) == Parts((), False, True)
    for weights in (
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "pytorch_model.bin",
        "pytorch_model-00001-of-00003.bin",
        "adapter_model.safetensors",
        "adapter_model.bin",
    ):
        assert split([weights]).weights_outside, weights
    for not_weights in ("model.safetensors.index.json", "config.json", "training_args.bin", "optimizer.pt"):
        assert not split([not_weights]).weights_outside, not_weights


# --- the slim, through `prune` ---------------------------------------------------------------------------------

Stamp = tuple[int, bytes]


def stamps(directory: Path) -> dict[str, Stamp]:
    """Every file below `directory` -> (inode, bytes)."""
    return {
        p.relative_to(directory).as_posix(): (p.stat().st_ino, p.read_bytes())
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def tree(top: Path, skip: str | None = None) -> dict[str, tuple[int, int, int]]:
    """Every path below `top` -> (inode, size, mtime_ns), links not followed; `skip`: top-level names that start
    so (the state directory and the root's lock file)."""
    found = {}
    for p in sorted(top.rglob("*")):
        rel = p.relative_to(top)
        if skip is not None and rel.parts[0].startswith(skip):
            continue
        st = p.lstat()
        found[rel.as_posix()] = (st.st_ino, 0 if p.is_dir() else st.st_size, st.st_mtime_ns)
    return found


def journal(root: Path) -> list[dict[str, Any]]:
    path = root / "_ckptkeeper" / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def sim_root(tmp_path: Path, config: SimConfig | None = None) -> Path:
    """A finished simulated run at <tmp>/outputs/run (checkpoints 10, 20, ..., 70, 78; epochs end at 26, 52, 78)."""
    simulate_run(tmp_path / "outputs" / "run", config or SimConfig())
    return tmp_path / "outputs"


KEEP = ("--keep", "last:2", "--keep-weights", "epoch:all")  # on a sim run: 20 and 50 weights only


def test_prune_slims_keeping_every_weight_file_and_the_directory_mtime(tmp_path: Path) -> None:
    root = sim_root(tmp_path)
    run = root / "run"
    slimmed = [run / "checkpoint-20", run / "checkpoint-50"]
    whole = [run / "checkpoint-70", run / "checkpoint-78"]
    before = {p.name: stamps(p) for p in slimmed + whole}
    times = {p.name: (p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in slimmed}
    resume_bytes = {p.name: sum((p / n).stat().st_size for n in SIM_RESUME) for p in slimmed}
    whole_trees = {p.name: tree(p) for p in whole}

    result = cli("prune", root, *KEEP)

    assert result.exit_code == 0, result.output
    for p in slimmed:
        after = stamps(p)
        kept = {rel: v for rel, v in before[p.name].items() if rel not in SIM_RESUME}
        assert set(kept) == {"config.json", "model.safetensors", "trainer_state.json", "training_args.bin"}
        assert {rel: v for rel, v in after.items() if rel != MARKER} == kept  # same inodes, same bytes
        assert not any((p / n).exists() for n in SIM_RESUME)
        assert p.stat().st_mtime_ns == times[p.name][1]
        marker = json.loads((p / MARKER).read_text())
        assert marker["weights_only"] is True and marker["by"] == "ckptkeeper"
        assert marker["resume_state_removed"] == list(SIM_RESUME)
        assert marker["directory_times_ns"][1] == times[p.name][1]
        assert "cannot resume training" in marker["note"]
        assert not (p / MARKER_TEMP).exists()
    assert {p.name: tree(p) for p in whole} == whole_trees  # the whole ones are not touched at all
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-20", "checkpoint-50", "checkpoint-70", "checkpoint-78"]
    out = result.output.splitlines()
    epochs = {"checkpoint-20": "epoch 1 (weights only)", "checkpoint-50": "epoch 2 (weights only)"}
    for p in slimmed:
        line = f"weights only  run/{p.name}  {human_bytes(resume_bytes[p.name])}  {epochs[p.name]}  ({SIM_REMOVED})"
        assert line in out
    assert any(
        x.startswith("Done: removed 4 checkpoints, made 2 weights only, freed ") and x.endswith(" Kept 4.") for x in out
    )
    slims = [
        (e["action"], e["checkpoint"], e["bytes"], e.get("detail"))
        for e in per_removal(journal(root))
        if "slim" in e["action"]
    ]
    assert slims == [
        ("start-slim", "checkpoint-20", resume_bytes["checkpoint-20"], None),
        ("slim", "checkpoint-20", resume_bytes["checkpoint-20"], SIM_REMOVED),
        ("start-slim", "checkpoint-50", resume_bytes["checkpoint-50"], None),
        ("slim", "checkpoint-50", resume_bytes["checkpoint-50"], SIM_REMOVED),
    ]
    assert all("keep weights epoch:all" in e["why"] for e in journal(root))
    # the state trash holds nothing left over
    assert not any((root / "_ckptkeeper" / "trash").iterdir())


def test_slimming_again_is_a_no_op_and_the_plan_shows_weights_only(tmp_path: Path) -> None:
    root = sim_root(tmp_path)
    assert cli("prune", root, *KEEP).exit_code == 0
    before, entries = tree(root, skip="_ckptkeeper"), journal(root)

    again = cli("prune", root, *KEEP)

    assert again.exit_code == 0, again.output
    assert again.output.splitlines()[-1] == "Done: removed 0 checkpoints, freed 0 B. Kept 4."
    assert tree(root, skip="_ckptkeeper") == before
    assert journal(root) == entries
    code, data = plan_json(root, *KEEP)
    assert code == 0
    decisions = {c["name"]: (c["decision"], [r["text"] for r in c["reasons"]]) for c in data["runs"][0]["checkpoints"]}
    assert decisions == {
        "checkpoint-20": ("weights-only", ["epoch 1 (weights only)"]),
        "checkpoint-50": ("weights-only", ["epoch 2 (weights only)"]),
        "checkpoint-70": ("keep", ["last 2/2"]),
        "checkpoint-78": ("keep", ["last 1/2", "protected: newest", "protected: trainer best"]),
    }  # the marker, written last, does not make 20 or 50 the newest written; kept whole, 78 shows no weights reason
    assert data["summary"]["weights_only"] == 2 and data["summary"]["bytes_to_free"] == 0
    # A rule change that keeps them whole: reported, never an error.
    result = cli("plan", root, "--keep", "last:2,epoch:all")
    assert result.exit_code == 0
    assert "epoch 1, weights only, cannot be made whole again" in result.output
    assert "epoch 2, weights only, cannot be made whole again" in result.output


def write_marker(checkpoint: Path, removed: list[str], times: tuple[int, int]) -> None:
    """The marker exactly as a slim cut short would have left it."""
    record = {
        "weights_only": True,
        "by": "ckptkeeper",
        "complete": False,  # written so when the slim begins; made true in place when it finishes
        "resume_state_removed": removed,
        "directory_times_ns": list(times),
        "note": "This checkpoint keeps its weights only.",
    }
    (checkpoint / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def test_a_slim_cut_short_is_finished_by_the_next_prune_and_the_recorded_mtime_restored(tmp_path: Path) -> None:
    root = sim_root(tmp_path)
    checkpoint = root / "run" / "checkpoint-20"
    st = checkpoint.stat()
    recorded = (st.st_atime_ns, st.st_mtime_ns - 7_000_000_000)  # the times the first slim saw
    write_marker(checkpoint, list(SIM_RESUME), recorded)
    (checkpoint / "optimizer.pt").unlink()  # the first one was moved out, then the kill
    left = sum((checkpoint / n).stat().st_size for n in ("rng_state.pth", "scheduler.pt"))
    marker_inode = (checkpoint / MARKER).stat().st_ino
    weights_before = {rel: v for rel, v in stamps(checkpoint).items() if rel not in (*SIM_RESUME, MARKER)}
    assert checkpoint.stat().st_mtime_ns != recorded[1]
    code, data = plan_json(root, *KEEP)
    c20 = next(c for c in data["runs"][0]["checkpoints"] if c["name"] == "checkpoint-20")
    assert (code, c20["decision"]) == (0, "weights-only")

    result = cli("prune", root, *KEEP)

    assert result.exit_code == 0, result.output
    assert (
        f"weights only  run/checkpoint-20  {human_bytes(left)}  epoch 1 (weights only)  (removed rng_state.pth, "
        "scheduler.pt)" in result.output
    )
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        MARKER,
        "config.json",
        "model.safetensors",
        "trainer_state.json",
        "training_args.bin",
    ]
    assert {rel: v for rel, v in stamps(checkpoint).items() if rel != MARKER} == weights_before
    # The same marker, finished in place: the times it recorded and everything the two slims removed.
    marker = json.loads((checkpoint / MARKER).read_text())
    assert (checkpoint / MARKER).stat().st_ino == marker_inode
    assert (marker["complete"], marker["directory_times_ns"]) == (True, list(recorded))
    assert marker["resume_state_removed"] == sorted(SIM_RESUME)
    assert checkpoint.stat().st_mtime_ns == recorded[1]
    finished = [e for e in journal(root) if e["checkpoint"] == "checkpoint-20"]
    assert [(e["action"], e["bytes"]) for e in finished] == [("start-slim", left), ("slim", left)]
    assert finished[1]["detail"] == "removed rng_state.pth, scheduler.pt"


def test_a_slim_cut_short_after_its_last_move_still_gets_its_mtime_back(tmp_path: Path) -> None:
    """The marker is written, every resume entry moved out, then the kill lands before the directory's times
    are put back. The marker records them; the next pass must restore them (the Trainer's own rotation orders
    checkpoints by directory mtime)."""
    root = sim_root(tmp_path)
    checkpoint = root / "run" / "checkpoint-20"
    st = checkpoint.stat()
    write_marker(checkpoint, list(SIM_RESUME), (st.st_atime_ns, st.st_mtime_ns))
    for name in SIM_RESUME:
        (checkpoint / name).unlink()
    assert checkpoint.stat().st_mtime_ns != st.st_mtime_ns

    assert cli("prune", root, *KEEP).exit_code == 0

    assert checkpoint.stat().st_mtime_ns == st.st_mtime_ns


def test_a_slim_cut_short_while_writing_the_marker_is_finished(tmp_path: Path) -> None:
    root = sim_root(tmp_path)
    checkpoint = root / "run" / "checkpoint-20"
    (checkpoint / MARKER_TEMP).write_bytes(b"")  # created, not yet written: then the kill

    assert cli("prune", root, *KEEP).exit_code == 0

    assert (checkpoint / MARKER).exists() and not (checkpoint / MARKER_TEMP).exists()
    assert not any((checkpoint / n).exists() for n in SIM_RESUME)
    assert (root / "run" / "checkpoint-10").exists() is False  # epoch 1 is kept by 20, not by 10


@pytest.fixture
def other_fs(tmpfs: Path) -> Iterator[Path]:
    """A fresh directory on another filesystem than tmp_path (conftest's tmpfs: skipped where none)."""
    directory = Path(tempfile.mkdtemp(prefix="ckptkeeper-test-", dir=tmpfs))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_state_directory_on_another_filesystem_slims_through_the_run_local_trash(
    tmp_path: Path, other_fs: Path
) -> None:
    root = sim_root(tmp_path)
    run = root / "run"
    state = StateDir(other_fs / "state")
    checkpoint = run / "checkpoint-20"
    before = stamps(checkpoint)
    mtime = checkpoint.stat().st_mtime_ns
    seen: list[tuple[Path, dict[str, Stamp]]] = []

    def dispose(entry: TrashEntry) -> None:
        seen.append((entry.shown, stamps(entry.shown)))
        try:
            delete_entry(entry)
        finally:
            entry.close()

    slim_checkpoint(root, checkpoint, SIM_RESUME, state, dispose)

    [(entry, moved)] = seen
    assert entry.parent == run / RUN_TRASH_NAME  # EXDEV: not the state's trash
    assert moved == {n: before[n] for n in SIM_RESUME}  # the very files, renamed
    assert not any(state.trash.iterdir())
    assert {rel: v for rel, v in stamps(checkpoint).items() if rel != MARKER} == {
        rel: v for rel, v in before.items() if rel not in SIM_RESUME
    }
    assert checkpoint.stat().st_mtime_ns == mtime
    state.close()

    # and through the CLI
    result = cli("prune", root, *KEEP, "--state-dir", other_fs / "state2")
    assert result.exit_code == 0, result.output
    assert "weights only  run/checkpoint-50  " in result.output
    assert not any((run / "checkpoint-50" / n).exists() for n in SIM_RESUME)
    assert (run / "checkpoint-50" / MARKER).exists()
    assert not any(p.is_file() for p in (run / RUN_TRASH_NAME).rglob("*"))


def test_a_dry_run_changes_nothing_and_says_would_slim(tmp_path: Path) -> None:
    root = sim_root(tmp_path)
    before = tree(root)
    resume = sum((root / "run" / "checkpoint-20" / n).stat().st_size for n in SIM_RESUME)

    result = cli("prune", root, *KEEP, "--dry-run")

    assert result.exit_code == 0, result.output
    assert tree(root, skip="_ckptkeeper") == before
    assert not (root / "_ckptkeeper" / "journal.jsonl").exists()
    out = result.output.splitlines()
    assert f"would slim    run/checkpoint-20  {human_bytes(resume)}  epoch 1 (weights only)" in out
    assert f"would slim    run/checkpoint-50  {human_bytes(resume)}  epoch 2 (weights only)" in out
    assert any(x.startswith("Dry run: would remove 4 checkpoints, make 2 weights only and free ") for x in out)


@pytest.mark.parametrize("command", ["plan", "prune", "watch"])
def test_keep_weights_with_archive_to_is_refused(tmp_path: Path, command: str) -> None:
    root = sim_root(tmp_path)
    before = tree(root)
    archive = tmp_path / "archive"
    extra = ["--exit-when-done"] if command == "watch" else []

    done = ckptkeeper(command, root, *KEEP, "--archive-to", archive, *extra, timeout=60)

    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "Error: --keep-weights cannot be combined with --archive-to yet: the resume state would be deleted, "
        "not archived"
    )
    assert tree(root, skip="_ckptkeeper") == before
    assert not archive.exists()


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("keep.yaml", "keep: last:2\nkeep_weights: [epoch:all]\n"),
        ("keep.yaml", "keep: last:2\nkeep_weights: epoch:all\n"),
        ("keep.toml", 'keep = ["last:2"]\nkeep_weights = ["epoch:all"]\n'),
    ],
)
def test_the_config_key_keep_weights(tmp_path: Path, name: str, text: str) -> None:
    root = sim_root(tmp_path)
    (tmp_path / name).write_text(text)
    code, data = plan_json(root, "--config", str(tmp_path / name))
    assert code == 0
    assert data["keep_weights"] == "epoch:all"
    assert data["summary"]["weights_only"] == 2
    assert cli("prune", root, "--config", tmp_path / name).exit_code == 0
    assert (root / "run" / "checkpoint-20" / MARKER).exists()


def test_the_environment_variable_and_flags_over_it(tmp_path: Path) -> None:
    root = sim_root(tmp_path)
    result = cli("plan", root, "--keep", "last:2", env={"CKPTKEEPER_KEEP_WEIGHTS": "epoch:all"})
    assert result.exit_code == 0, result.output
    assert "keep the weights only of one per epoch (epoch:all)" in result.output.splitlines()[0]
    code, data = plan_json(root, "--keep", "last:2", "--keep-weights", "every:30")
    assert (code, data["keep_weights"]) == (0, "every:30")
    result = cli(
        "plan", root, "--keep", "last:2", "--keep-weights", "every:30", env={"CKPTKEEPER_KEEP_WEIGHTS": "epoch:all"}
    )
    assert "(every:30)" in result.output.splitlines()[0] and "epoch:all" not in result.output.splitlines()[0]


def test_a_bad_rule_is_a_clear_error_naming_where_it_came_from(tmp_path: Path) -> None:
    root = sim_root(tmp_path)
    (tmp_path / "bad.yaml").write_text("keep: last:2\nkeep_weights: [epoch:all, epoch:sometimes]\n")
    cases = [
        (
            cli("plan", root, "--config", tmp_path / "bad.yaml"),
            "bad.yaml: keep_weights[1]: invalid rule 'epoch:sometimes'",
        ),
        (
            cli("plan", root, "--keep", "last:2", env={"CKPTKEEPER_KEEP_WEIGHTS": "bogus"}),
            "CKPTKEEPER_KEEP_WEIGHTS[0]: invalid rule 'bogus'",
        ),
        (
            cli("prune", root, "--keep", "last:2", "--keep-weights", "nope"),
            "Invalid value for '--keep-weights': invalid rule 'nope'",
        ),
    ]
    before = tree(root)
    for result, phrase in cases:
        assert result.exit_code == 2, result.output
        assert phrase in result.stderr
        assert "Valid forms: last:N" in result.stderr
    assert tree(root) == before


# --- what plan prints ------------------------------------------------------------------------------------------


def test_plan_text_shows_weights_only_and_the_summary(tmp_path: Path) -> None:
    root = sim_root(tmp_path)
    run = root / "run"
    size = {p.name: sum(f.stat().st_size for f in p.rglob("*")) for p in run.iterdir()}
    resume = {n: sum((run / n / r).stat().st_size for r in SIM_RESUME) for n in size}

    result = cli("plan", root, *KEEP)

    assert result.exit_code == 0, result.output
    out = result.output.splitlines()
    assert out[0] == (
        "Policy: keep the last 2 (last:2); keep the weights only of one per epoch (epoch:all); "
        "always keep the newest, incomplete ones, the Trainer's best; delete the rest"
    )
    rows = {line.split()[0]: line for line in out if line.startswith("  checkpoint-")}
    assert rows["checkpoint-20"].endswith("  keep (weights only)  epoch 1 (weights only)")
    assert rows["checkpoint-50"].endswith("  keep (weights only)  epoch 2 (weights only)")
    assert rows["checkpoint-70"].endswith("  keep                 last 2/2")
    assert rows["checkpoint-10"].endswith("  delete               no rule keeps it")
    kept = ("checkpoint-20", "checkpoint-50", "checkpoint-70", "checkpoint-78")
    kept_bytes = sum(size[n] for n in kept)
    freed = sum(v for n, v in size.items() if n not in kept)
    slim = resume["checkpoint-20"] + resume["checkpoint-50"]
    assert out[-1] == (
        f"Summary: 8 checkpoints in 1 run: keep 4 ({human_bytes(kept_bytes)}), "
        f"remove 4 ({human_bytes(freed)} to free); "
        f"2 of those kept become weights only ({human_bytes(slim)} more to free)"
    )


def test_plan_json_decision_and_summary(tmp_path: Path) -> None:
    root = sim_root(tmp_path)
    run = root / "run"
    size = {p.name: sum(f.stat().st_size for f in p.rglob("*")) for p in run.iterdir()}
    slim = sum((run / n / r).stat().st_size for n in ("checkpoint-20", "checkpoint-50") for r in SIM_RESUME)

    code, data = plan_json(root, *KEEP)

    assert code == 0
    assert (data["keep"], data["keep_weights"]) == ("last:2", "epoch:all")
    decisions = {c["name"]: c["decision"] for c in data["runs"][0]["checkpoints"]}
    assert decisions == {
        "checkpoint-10": "delete",
        "checkpoint-20": "weights-only",
        "checkpoint-30": "delete",
        "checkpoint-40": "delete",
        "checkpoint-50": "weights-only",
        "checkpoint-60": "delete",
        "checkpoint-70": "keep",
        "checkpoint-78": "keep",
    }
    kept = [n for n, d in decisions.items() if d != "delete"]
    removed = [n for n, d in decisions.items() if d == "delete"]
    assert data["summary"] == {
        "checkpoints": 8,
        "kept": 4,
        "weights_only": 2,
        "removed": 4,
        "refused": False,
        "bytes_kept": sum(size[n] for n in kept) - slim,
        "bytes_to_free": sum(size[n] for n in removed) + slim,
    }
    reasons = {c["name"]: c["reasons"] for c in data["runs"][0]["checkpoints"]}
    assert [r["text"] for r in reasons["checkpoint-20"]] == ["epoch 1 (weights only)"]
    assert reasons["checkpoint-20"][0]["rule"] == "epoch:all"


# --- the other layouts, pruned ----------------------------------------------------------------------------------


def test_prune_of_the_golden_run_touches_only_what_it_must(golden_root: Path) -> None:
    """--keep-weights epoch:all,best:2 alone: 80 (DeepSpeed, weights outside) loses global_step80/ and latest;
    40 (ZeRO-3) stays whole with no marker; 60 (save_only_model) is weights-only with nothing to slim and gets no
    marker; 70 (incomplete), 20 (the Trainer's best) and 90 (the newest) are not touched."""
    run = golden_root / "run"
    untouched = {
        n: tree(run / n) for n in ("checkpoint-20", "checkpoint-40", "checkpoint-60", "checkpoint-70", "checkpoint-90")
    }
    c80 = stamps(run / "checkpoint-80")
    mtime80 = (run / "checkpoint-80").stat().st_mtime_ns

    result = cli("prune", golden_root, "--keep-weights", "epoch:all,best:2")

    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-20",
        "checkpoint-40",
        "checkpoint-60",
        "checkpoint-70",
        "checkpoint-80",
        "checkpoint-90",
    ]
    assert {n: tree(run / n) for n in untouched} == untouched
    gone = ("global_step80", "latest", "rng_state.pth", "scheduler.pt")
    assert {rel: v for rel, v in stamps(run / "checkpoint-80").items() if rel != MARKER} == {
        rel: v for rel, v in c80.items() if rel.split("/")[0] not in gone
    }
    assert "zero_to_fp32.py" in c80 and (run / "checkpoint-80" / "zero_to_fp32.py").exists()
    assert (run / "checkpoint-80").stat().st_mtime_ns == mtime80
    assert "(removed global_step80, latest, rng_state.pth, scheduler.pt)" in result.output
    assert "Done: removed 3 checkpoints, made 1 weights only, freed " in result.output


def test_prune_of_an_fsdp_multi_rank_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    fsdp = {
        "optimizer_0/__0_0.distcp": b"o" * 500,
        "optimizer_0/.metadata": b"m",
        "pytorch_model_fsdp_0/__0_0.distcp": b"w" * 400,
        "pytorch_model_fsdp_0/.metadata": b"m",
        "rng_state_0.pth": b"r" * 30,
        "rng_state_1.pth": b"r" * 30,
        "scheduler.pt": b"s" * 10,
    }
    old = make_checkpoint(root / "run", 10, 1.0, 0.5, entries=fsdp, weights=False)
    make_checkpoint(root / "run", 20, 2.0, 0.4, entries=fsdp, weights=False)
    before = stamps(old)
    gone = ("optimizer_0", "rng_state_0.pth", "rng_state_1.pth", "scheduler.pt")
    files = [p for p in old.rglob("*") if p.is_file() and not p.is_symlink()]  # what deleting them frees
    freed = sum(p.lstat().st_size for p in files if p.relative_to(old).parts[0] in gone)

    result = cli("prune", root, "--keep-weights", "epoch:all")

    assert result.exit_code == 0, result.output
    removed = f"(removed {', '.join(gone)})"
    assert f"weights only  run/checkpoint-10  {human_bytes(freed)}  epoch 1 (weights only)  {removed}" in result.output
    assert {rel: v for rel, v in stamps(old).items() if rel != MARKER} == {
        rel: v for rel, v in before.items() if rel.split("/")[0] not in gone
    }
    assert (old / "pytorch_model_fsdp_0" / "__0_0.distcp").read_bytes() == b"w" * 400


# --- watch ------------------------------------------------------------------------------------------------------


def test_watch_exit_when_done_slims_a_finished_run(tmp_path: Path) -> None:
    root = sim_root(tmp_path)
    resume = sum((root / "run" / "checkpoint-20" / n).stat().st_size for n in SIM_RESUME)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CKPTKEEPER_")}
    command = [sys.executable, "-m", "ckptkeeper", "watch", str(root), *KEEP, "--settle", "0", "--exit-when-done"]

    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, env=environment)

    assert done.returncode == 0, done.stderr
    log = done.stderr
    assert "run/checkpoint-20 kept weights only: epoch 1 (weights only)" in log
    assert f"run/checkpoint-20 made weights only: {SIM_REMOVED}, freed {human_bytes(resume)}" in log
    assert f"run/checkpoint-50 made weights only: {SIM_REMOVED}, freed {human_bytes(resume)}" in log
    assert "exiting (--exit-when-done)" in log
    for name in ("checkpoint-20", "checkpoint-50"):
        assert (root / "run" / name / MARKER).exists()
        assert not any((root / "run" / name / n).exists() for n in SIM_RESUME)
    assert sorted(p.name for p in (root / "run").iterdir()) == [
        "checkpoint-20",
        "checkpoint-50",
        "checkpoint-70",
        "checkpoint-78",
    ]


def test_save_only_model_checkpoints_are_weights_only_with_nothing_to_slim(tmp_path: Path) -> None:
    root = sim_root(tmp_path, SimConfig(save_only_model=True))
    before = tree(root)
    code, data = plan_json(root, *KEEP)
    assert code == 0
    assert data["summary"]["weights_only"] == 2
    assert data["summary"]["bytes_to_free"] == sum(
        c["size_bytes"] for c in data["runs"][0]["checkpoints"] if c["decision"] == "delete"
    )
    result = cli("prune", root, *KEEP)
    assert result.exit_code == 0, result.output
    assert "weights only  " not in result.output
    assert not list(root.rglob(MARKER))
    assert {
        k: v
        for k, v in tree(root, skip="_ckptkeeper").items()
        if k.startswith(("run/checkpoint-20", "run/checkpoint-50"))
    } == {k: v for k, v in before.items() if k.startswith(("run/checkpoint-20", "run/checkpoint-50"))}
    assert not [e for e in journal(root) if "slim" in e["action"]]
