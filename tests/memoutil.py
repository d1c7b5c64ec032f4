"""What the scan memo's and the read-ahead's tests share: one simulated run, settled past the window in which
a lstat signature cannot vouch for a look (so that a `prune` writes it down)."""

from __future__ import annotations

import time
from pathlib import Path

from ckptkeeper.scan import TIMESTAMP_TICK
from ckptkeeper.simtrainer import SimConfig, simulate_run

CONFIG = SimConfig(steps_per_epoch=10, epochs=3, save_steps=5, eval_steps=5)  # checkpoints 5 .. 30


def settled() -> None:
    time.sleep(TIMESTAMP_TICK + 0.15)  # past the window in which a signature cannot vouch


def settled_outputs(tmp_path: Path) -> Path:
    """tmp_path/outputs holding the run `exp` of CONFIG, settled."""
    top = tmp_path / "outputs"
    simulate_run(top / "exp", CONFIG)
    settled()
    return top
