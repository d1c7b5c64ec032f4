"""`ckptkeeper demo`: a simulated Trainer run, its plan, the prune, and what is left. Needs no training job."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ckptkeeper.engine import Policy, apply_plan, default_state_dir, make_plan
from ckptkeeper.render import human_bytes, outcome_line, plan_text, totals_line
from ckptkeeper.rules import parse_rules
from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.state import StateDir

DEMO_RUN = SimConfig(
    steps_per_epoch=20, epochs=6, save_steps=10, eval_steps=10, optimizer_bytes=200_000, seed=7, overfit_after=0.35
)


def run_demo(keep: str, directory: Path | None, say: Callable[[str], None]) -> None:
    workdir = directory or Path(tempfile.mkdtemp(prefix="ckptkeeper-demo-"))
    root = workdir / "outputs"
    try:
        if root.exists():
            shutil.rmtree(root)
        c = DEMO_RUN
        simulate_run(root, c)
        say(f"A simulated Hugging Face Trainer wrote a run to {root}:")
        say(
            f"  {c.epochs} epochs of {c.steps_per_epoch} steps, eval and save every {c.save_steps} steps, "
            "best model by eval_loss.\n"
        )
        policy = Policy(parse_rules(keep))
        state = StateDir(default_state_dir(root))
        result = make_plan(root, policy, state.path)
        say(f"$ ckptkeeper plan {root} --keep {keep}")
        say(plan_text(str(root), policy, result.runs, result.warnings))
        if result.refusals:
            say("The plan is refused, so the demo removes nothing.")
            return
        say(f"\n$ ckptkeeper prune {root} --keep {keep}")
        state.acquire_lock(root)
        try:
            totals = apply_plan(root, result.runs, policy, state, lambda o: say(outcome_line(o)))
        finally:
            state.release_lock()
        say(totals_line(totals, dry_run=False))
        say(f"\nLeft in {root}:")
        for d in sorted(
            (d for p in make_plan(root, policy, state.path).runs for d in p.decisions), key=lambda d: d.checkpoint.step
        ):
            say(f"  {d.checkpoint.name:<15} {human_bytes(d.checkpoint.size_bytes):>9}  {', '.join(d.reasons)}")
        say(f"\nThe journal of what was done is {state.journal_path}.")
    finally:
        if directory is None:
            shutil.rmtree(workdir, ignore_errors=True)
            say("(The demo directory was removed; pass --dir DIR to keep it.)")
