"""Adversarial review of the redesign (#11, a064e3e): defects it introduced, each a failing test.

The redesign made a refusal hold the whole root in `watch` too (`policy.plan_root` with the run tracker's
`refused` runs as `refused_elsewhere`). The tests below show where the daemon's memory of refusals and of
held runs goes wrong: a hold that outlives its refused run, and a held run counted as pruned.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ckptkeeper.simtrainer import SimConfig, simulate_run
from tests.cliutil import ckptkeeper
from tests.watchutil import StartWatch, steps, wait_until

# As in test_refusal_scope: checkpoints 5, 10, 15, 20 with evals. Run "a" logs eval_a_loss only; run "b" logs
# eval_loss only, so KEEP is fine for a and refused for b.
WITH_A = SimConfig(steps_per_epoch=10, epochs=2, save_steps=5, eval_steps=5, eval_sets=("a",))
PLAIN = SimConfig(steps_per_epoch=10, epochs=2, save_steps=5, eval_steps=5)
KEEP = "best:1:a_loss,last:1"
ALL = [5, 10, 15, 20]


def _pruned_by_prune(tmp_path: Path) -> list[int]:
    """What `prune` leaves of run a alone (the control)."""
    alone = tmp_path / "control"
    simulate_run(alone / "a", WITH_A)
    done = ckptkeeper("prune", alone, "--keep", KEEP)
    assert done.returncode == 0, done.stdout + done.stderr
    kept = steps(alone / "a")
    assert kept != ALL
    return kept


def _root_with_refused_run_still_training(tmp_path: Path) -> Path:
    """Run a finished; run b refused and still training (a save in progress), so neither the daemon nor
    --exit-when-done is done with b."""
    root = tmp_path / "outputs"
    simulate_run(root / "a", WITH_A)
    simulate_run(root / "b", PLAIN)
    saving = root / "b" / "checkpoint-25"
    saving.mkdir()
    (saving / "checkpoint-is-incomplete.txt").write_text("saving")
    return root


def test_exit_when_done_exits_0_without_pruning_a_run_once_the_refusal_that_held_it_is_gone(
    tmp_path: Path, watch: StartWatch
) -> None:
    """A held run is recorded as finished *and pruned* (`RunTracker.record`: no removal left undone, since the
    hold turned every removal into a keep) and as quiet. When the refused run goes, nothing re-plans the held
    run, and --exit-when-done exits 0 saying every run 'is pruned' while run a still has every checkpoint
    that `prune` removes."""
    expected = _pruned_by_prune(tmp_path)
    root = _root_with_refused_run_still_training(tmp_path)
    w = watch(root, "--keep", KEEP, "--settle", "0", "--exit-when-done", "--state-dir", str(tmp_path / "state"))
    w.wait_log("held: retention is refused in run 'b'")
    assert steps(root / "a") == ALL  # held while b is refused: right
    shutil.rmtree(root / "b")  # the refusal is gone with its run
    code = w.wait_exit(30)
    assert (code, steps(root / "a")) == (0, expected), w.describe()


def test_a_held_run_is_pruned_soon_after_the_refusal_that_held_it_is_gone(tmp_path: Path, watch: StartWatch) -> None:
    """Without --exit-when-done: once the refused run is gone, the run it held is pruned at once, not at the
    next periodic full rescan (here 10 minutes away). The tracker clears its quiet runs when the set of
    refused runs changes, but asks for no pass over them."""
    expected = _pruned_by_prune(tmp_path)
    root = _root_with_refused_run_still_training(tmp_path)
    w = watch(root, "--keep", KEEP, "--settle", "0", "--rescan-interval", "600", "--state-dir", str(tmp_path / "state"))
    w.wait_log("held: retention is refused in run 'b'")
    shutil.rmtree(root / "b")
    wait_until(lambda: steps(root / "a") == expected, 15, lambda: f"run a pruned to {expected}: {w.describe()}")


def test_a_refusal_of_a_run_of_the_old_root_holds_the_recreated_root_forever(tmp_path: Path, watch: StartWatch) -> None:
    """The root is replaced by a new directory (moved away, a new one made in its place). `_forget_root`
    forgets the known runs but not `RunTracker.refused`; with the known runs forgotten, no full rescan ever
    forgets run b (it is forgotten only as `known_runs - found`). So run b, which the new root does not have,
    holds every run of the new root for as long as the daemon runs: the full rescan asked for when the new root
    is watched, and every periodic one after it. (Periodic rescans are far apart here only so that none can
    run between the swap and the health check that notices it, and forget run b while it is still known.)"""
    expected = _pruned_by_prune(tmp_path)
    root = _root_with_refused_run_still_training(tmp_path)
    w = watch(root, "--keep", KEEP, "--settle", "0", "--rescan-interval", "600", "--state-dir", str(tmp_path / "state"))
    w.wait_log("held: retention is refused in run 'b'")
    fresh = tmp_path / "fresh"
    simulate_run(fresh / "a", WITH_A)  # the new root: run a only, no run b anywhere
    os.rename(root, tmp_path / "old-outputs")
    os.rename(fresh, root)
    w.wait_log("was deleted and created again; watching the new one")
    wait_until(
        lambda: steps(root / "a") == expected,
        15,
        lambda: f"run a of the new root pruned to {expected} (the new root has no run b): {w.describe()}",
    )
