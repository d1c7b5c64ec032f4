"""`ckptkeeper demo`: the daemon live beside a simulated Trainer. Needs no training job.

The simulated Trainer writes a run at a visible pace (the same files and write order as the Hugging Face
Trainer) while `watch` applies the rules as each checkpoint completes; then the plan of what is left is
printed with its reasons.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ckptkeeper.engine import Pipeline
from ckptkeeper.layout import default_state_dir
from ckptkeeper.logs import configure_logging
from ckptkeeper.policy import Policy
from ckptkeeper.render import plan_text
from ckptkeeper.rules import parse_rules
from ckptkeeper.simtrainer import SimConfig, SimulatedTrainer
from ckptkeeper.watch import Daemon, WatchOptions

DEMO_RUN = SimConfig(
    steps_per_epoch=20, epochs=6, save_steps=10, eval_steps=10, optimizer_bytes=200_000, seed=7, overfit_after=0.35
)
DEMO_SETTLE = 1.0
_CHOOSE = ", and the demo never removes what it did not create: choose a --dir whose outputs is absent or empty"


class DemoDirError(ValueError):
    """`--dir DIR` where DIR/outputs already holds something: the demo removes nothing it did not create."""


def check_demo_dir(directory: Path) -> Path:
    """DIR/outputs, where the demo writes its run: absent or an empty directory, else DemoDirError."""
    root = directory / "outputs"
    try:
        mode = root.lstat().st_mode
    except FileNotFoundError:
        return root
    except OSError as e:
        raise DemoDirError(f"cannot use {root}: {e.strerror or e}") from None
    if stat.S_ISLNK(mode):
        raise DemoDirError(f"{root} is a symbolic link{_CHOOSE}")
    if not stat.S_ISDIR(mode):
        raise DemoDirError(f"{root} exists and is not a directory{_CHOOSE}")
    try:
        with os.scandir(root) as entries:
            empty = next(entries, None) is None
    except OSError as e:
        raise DemoDirError(f"cannot use {root}: {e.strerror or e}") from None
    if not empty:
        raise DemoDirError(f"{root} is not empty{_CHOOSE}")
    return root


def run_demo(
    keep: str, directory: Path | None, say: Callable[[str], None], pace: float = 0.13, keep_weights: str = ""
) -> None:
    """Raises DemoDirError, before anything is written, when `directory`/outputs is not absent or empty."""
    if directory is not None:
        root = check_demo_dir(directory)
        workdir = directory
    else:
        workdir = Path(tempfile.mkdtemp(prefix="ckptkeeper-demo-"))
        root = workdir / "outputs"
    try:
        root.mkdir(parents=True, exist_ok=True)
        c = DEMO_RUN
        policy = Policy(parse_rules(keep), weight_rules=parse_rules(keep_weights))
        flags = f"--keep {keep}" + (f" --keep-weights {keep_weights}" if keep_weights else "")
        say(f"$ ckptkeeper watch {root} {flags} --settle {DEMO_SETTLE:g}")
        say(
            f"(a simulated Hugging Face Trainer writes {c.epochs} epochs of {c.steps_per_epoch} steps into it, "
            f"eval and save every {c.save_steps} steps; its eval loss turns up after a while)\n"
        )
        sys.stdout.flush()
        configure_logging("text", 0, sys.stdout)
        daemon = Daemon(root, policy, default_state_dir(root), WatchOptions(settle=DEMO_SETTLE, exit_when_done=True))
        watcher = threading.Thread(target=daemon.run, name="ckptkeeper-demo-watch", daemon=True)
        watcher.start()
        SimulatedTrainer(root, c).train(pace=pace)
        deadline = time.monotonic() + 30
        while watcher.is_alive() and time.monotonic() < deadline:
            watcher.join(0.1)
        if watcher.is_alive():
            daemon.request_stop()
            watcher.join(5)
        logging.getLogger("ckptkeeper").handlers.clear()

        result = Pipeline.checked(root, policy).survey(now=None)
        say(f"\nTraining finished. Left in {root}, and why:")
        say(f"$ ckptkeeper plan {root} {flags}")
        say(plan_text(str(root), policy, result.plan, result.warnings))
        say(f"\nThe journal of every action is {default_state_dir(root) / 'journal.jsonl'}.")
    finally:
        if directory is None:
            shutil.rmtree(workdir, ignore_errors=True)
            say("(The demo directory was removed; pass --dir DIR to keep it.)")
