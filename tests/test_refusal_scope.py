"""One rule, in one place (`policy.plan_root`), for plan, prune and watch alike (issue #11):

- bad paths (archive, state directory) are refused by the library with the same message, whichever
  command is given them, and exit 2;
- a refusal holds the whole root: while any run's retention is refused, no run loses a checkpoint, and
  `plan` shows exactly that (`keep` / `held: ...`), in text and in `--json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ckptkeeper.simtrainer import SimConfig, simulate_run
from tests.cliutil import ckptkeeper
from tests.watchutil import steps

# checkpoints 5, 10, 15, 20 with evals. Run "a" logs eval_a_loss only; run "b" logs eval_loss only.
WITH_A = SimConfig(steps_per_epoch=10, epochs=2, save_steps=5, eval_steps=5, eval_sets=("a",))
PLAIN = SimConfig(steps_per_epoch=10, epochs=2, save_steps=5, eval_steps=5)
KEEP = "best:1:a_loss,last:1"  # fine for run a; refused for run b, which has evals but not eval_a_loss
REFUSAL = (
    "rule 'best:1:eval_a_loss': no checkpoint has eval_a_loss; did you mean eval_loss? (the run's metrics: "
    "eval_accuracy, eval_loss, eval_runtime, eval_samples_per_second, eval_steps_per_second)"
)


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "outputs"
    simulate_run(root / "a", WITH_A)
    simulate_run(root / "b", PLAIN)
    return root


def _bad_layouts(tmp_path: Path, root: Path) -> dict[str, tuple[list[str], str]]:
    not_ours = tmp_path / "somebody-elses"
    not_ours.mkdir()
    (not_ours / "notes.txt").write_text("mine")
    (tmp_path / "link-to-root").symlink_to(root)
    return {
        "archive inside the root": (
            ["--archive-to", str(root / "archive")],
            f"--archive-to {root / 'archive'} is inside the root {root}",
        ),
        "archive is the root by a link": (
            ["--archive-to", str(tmp_path / "link-to-root")],
            f"--archive-to {tmp_path / 'link-to-root'} is the root {root}",
        ),
        "state directory is the root": (["--state-dir", str(root)], f"the state directory {root} is the root"),
        "state directory not ckptkeeper's": (["--state-dir", str(not_ours)], f"the state directory {not_ours} "),
    }


@pytest.mark.parametrize(
    "case",
    [
        "archive inside the root",
        "archive is the root by a link",
        "state directory is the root",
        "state directory not ckptkeeper's",
    ],
)
def test_plan_prune_and_watch_refuse_the_same_bad_paths_with_the_same_message(tmp_path: Path, case: str) -> None:
    root = _root(tmp_path)
    flags, expected = _bad_layouts(tmp_path, root)[case]
    errors = {}
    for command in ("plan", "prune", "watch"):
        done = ckptkeeper(command, root, "--keep", "last:1", *flags, timeout=60)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        errors[command] = done.stderr.strip().splitlines()[-1]
    assert errors["plan"] == errors["prune"] == errors["watch"], errors
    assert errors["plan"].startswith(f"Error: {expected}"), errors["plan"]
    assert steps(root / "a") == steps(root / "b") == [5, 10, 15, 20]
    assert not (root / "archive").exists()


def test_one_refused_run_holds_the_whole_root_in_plan_prune_and_watch(tmp_path: Path) -> None:
    root = _root(tmp_path)
    before = {run: steps(root / run) for run in ("a", "b")}

    planned = ckptkeeper("plan", root, "--keep", KEEP)
    assert planned.returncode == 3, planned.stdout + planned.stderr
    assert planned.stderr == f"Error: refused in run 'b'; nothing would be removed: {REFUSAL}\n"
    rows = [line.split() for line in planned.stdout.splitlines() if line.startswith("  checkpoint-")]
    assert rows and all(row[-1] != "delete" and "keep" in row for row in rows), planned.stdout
    assert "held: retention is refused in run 'b'" in planned.stdout  # run a's would-be removals say why
    assert planned.stdout.rstrip().endswith("refused in 1 run (see REFUSED above), so nothing is removed")

    as_json = json.loads(ckptkeeper("plan", root, "--keep", KEEP, "--json").stdout)
    decisions = {(r["run"], c["name"]): c for r in as_json["runs"] for c in r["checkpoints"]}
    assert {c["decision"] for c in decisions.values()} == {"keep"}
    held = decisions[("a", "checkpoint-10")]["reasons"]
    assert held == [
        {
            "kind": "held",
            "rule": "refused",
            "rank": None,
            "released": False,
            "until": None,
            "text": "held: retention is refused in run 'b'",
        }
    ]
    assert as_json["summary"]["removed"] == 0 and as_json["summary"]["refused"] is True

    pruned = ckptkeeper("prune", root, "--keep", KEEP)
    assert pruned.returncode == 3, pruned.stdout + pruned.stderr
    assert pruned.stderr.endswith(f"Error: refused in run 'b'; nothing was removed: {REFUSAL}\n")
    assert {run: steps(root / run) for run in ("a", "b")} == before

    watched = ckptkeeper("watch", root, "--keep", KEEP, "--settle", "0", "--exit-when-done", timeout=60)
    assert watched.returncode == 3, watched.stderr
    assert "run a: nothing is removed there: held: retention is refused in run 'b'" in watched.stderr
    assert f"run b: refused, nothing is removed there: {REFUSAL}" in watched.stderr  # as plan and prune say it
    assert "every run has finished training, but retention was refused in b; exiting with code 3" in watched.stderr
    assert {run: steps(root / run) for run in ("a", "b")} == before  # run a lost nothing, as with prune


def test_without_the_refused_run_the_same_root_is_pruned_by_both(tmp_path: Path) -> None:
    """The control: the hold comes from run b alone. Moved away, prune and watch both prune run a."""
    root = _root(tmp_path)
    os.rename(root / "b", tmp_path / "b")
    assert ckptkeeper("prune", root, "--keep", KEEP).returncode == 0
    kept_by_prune = steps(root / "a")
    assert kept_by_prune != [5, 10, 15, 20]
    simulate_run(tmp_path / "again" / "a", WITH_A)
    watched = ckptkeeper("watch", tmp_path / "again", "--keep", KEEP, "--settle", "0", "--exit-when-done", timeout=60)
    assert watched.returncode == 0, watched.stderr
    assert steps(tmp_path / "again" / "a") == kept_by_prune
