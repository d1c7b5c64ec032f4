"""The README's `plan --json` example is what the command prints, and reasons have the keys it documents.

The example is made again the way the README says it was made: the simulated run written by the same
`python -c` line, as a process run in a fresh directory (the run's trainer_state.json names its best
checkpoint by the path given, so the path changes the sizes), then the same `ckptkeeper plan ... --json`
command through click's CliRunner in that directory. The README's block sits between two marker comments.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from ckptkeeper.cli import main
from ckptkeeper.model import ReasonKind

PROJECT = Path(__file__).resolve().parent.parent
README = PROJECT / "README.md"
BEGIN, END = "<!-- plan-json-example -->", "<!-- /plan-json-example -->"
# The README's own lines, word for word (test_the_readme_shows_how_its_example_is_made checks they are there).
MAKE_RUN = (
    "from pathlib import Path; from ckptkeeper.simtrainer import SimConfig, simulate_run; "
    "simulate_run(Path('outputs/exp1'), SimConfig(steps_per_epoch=10, epochs=3, overfit_after=0.5))"
)
COMMAND = "ckptkeeper plan outputs --keep best:1,last:1 --json"
REASON_KEYS = ["kind", "rule", "rank", "released", "until", "text"]


def example_block(readme: str) -> str:
    """The JSON between the markers (a ```json fence inside them)."""
    assert readme.count(BEGIN) == 1, f"README.md must hold {BEGIN} exactly once"
    assert readme.count(END) == 1, f"README.md must hold {END} exactly once"
    inside = readme.partition(BEGIN)[2].partition(END)[0]
    fenced = re.fullmatch(r"\s*```json\n(.*?)```\s*", inside, flags=re.DOTALL)
    assert fenced is not None, "the plan --json example is not one ```json block between its markers"
    return fenced.group(1)


def check_example(readme: str, printed: str) -> None:
    """The README's example is the one run of `runs` in `printed`, value for value and line for line."""
    block = example_block(readme)
    runs = json.loads(printed)["runs"]
    assert len(runs) == 1, runs
    assert json.loads(block) == runs[0], "README.md's plan --json example is not what the command prints"
    # As printed, the run sits 4 spaces deep (inside `runs`, inside the top object).
    assert textwrap.indent(block, " " * 4) in printed, "README.md's example is not laid out as the command prints it"


def run_plan(workdir: Path, make_run: str, command: str) -> Result:
    """Write the simulated run(s) in `workdir` as a process, then run `command` there; its stdout and exit code."""
    subprocess.run([sys.executable, "-c", make_run], cwd=workdir, check=True)
    args = shlex.split(command)
    assert args[0] == "ckptkeeper"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        return CliRunner().invoke(main, args[1:])


@pytest.fixture(scope="module")
def printed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    result = run_plan(tmp_path_factory.mktemp("docs-json"), MAKE_RUN, COMMAND)
    assert result.exit_code == 0, result.output
    yield result.stdout


def _reasons(output: str) -> list[dict[str, Any]]:
    data = json.loads(output)
    return [r for run in data["runs"] for c in run["checkpoints"] for r in c["reasons"]]


def _assert_documented_shape(reason: dict[str, Any]) -> None:
    assert list(reason) == REASON_KEYS, reason
    assert reason["kind"] in {k.value for k in ReasonKind}, reason
    assert reason["rule"] is None or isinstance(reason["rule"], str), reason
    rank = reason["rank"]
    assert rank is None or (type(rank) is int and rank >= 1), reason
    assert isinstance(reason["text"], str), reason
    assert reason["text"], reason


def test_the_readme_example_is_what_plan_json_prints(printed: str) -> None:
    check_example(README.read_text(encoding="utf-8"), printed)


def test_the_readme_shows_how_its_example_is_made() -> None:
    readme = README.read_text(encoding="utf-8")
    before = readme.partition(BEGIN)[0].rpartition("### `ckptkeeper plan`")[2]
    assert f'python -c "{MAKE_RUN}"' in before, "README.md no longer shows how its plan --json example was made"
    assert COMMAND in before, "README.md no longer shows the command of its plan --json example"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('"rank": 1,', '"rank": 2,'),  # a value
        ('"size_bytes": ', '"size_bytes": 1'),  # a number
        ('      "text": "no rule keeps it"', '      "text": "no rule keeps it" '),  # only the layout
    ],
)
def test_a_readme_example_that_disagrees_fails(printed: str, old: str, new: str) -> None:
    readme = README.read_text(encoding="utf-8")
    block = example_block(readme)
    assert old in block
    wrong = readme.replace(block, block.replace(old, new, 1))
    with pytest.raises(AssertionError):
        check_example(wrong, printed)


def test_reason_objects_have_the_documented_keys(printed: str) -> None:
    reasons = _reasons(printed)
    for reason in reasons:
        _assert_documented_shape(reason)
    by_kind = {r["kind"]: r for r in reasons}
    assert set(by_kind) == {"best", "trainer-best", "no-rule-keeps", "last", "newest"}
    assert by_kind["best"] == {
        "kind": "best",
        "rule": "best:1",
        "rank": 1,
        "released": False,
        "until": None,
        "text": "best eval_loss=0.5842 (1/1)",
    }
    assert by_kind["trainer-best"] == {
        "kind": "trainer-best",
        "rule": "protected:trainer-best",
        "rank": None,
        "released": False,
        "until": None,
        "text": "protected: trainer best",
    }
    assert by_kind["last"] == {
        "kind": "last",
        "rule": "last:1",
        "rank": 1,
        "released": False,
        "until": None,
        "text": "last 1/1",
    }
    assert by_kind["newest"] == {
        "kind": "newest",
        "rule": "protected:newest",
        "rank": None,
        "released": False,
        "until": None,
        "text": "protected: newest",
    }
    assert by_kind["no-rule-keeps"] == {
        "kind": "no-rule-keeps",
        "rule": None,
        "rank": None,
        "released": False,
        "until": None,
        "text": "no rule keeps it",
    }


def test_refused_and_held_reasons_have_the_documented_keys(tmp_path: Path) -> None:
    """The README's refusal-scope input: `exp1` has evals but not the misspelt metric, `exp2` none yet."""
    make = (
        "from pathlib import Path; from ckptkeeper.simtrainer import SimConfig, simulate_run; "
        "simulate_run(Path('outputs/exp1'), SimConfig(steps_per_epoch=10, epochs=3)); "
        "simulate_run(Path('outputs/exp2'), SimConfig(steps_per_epoch=10, epochs=3, eval_strategy='no', "
        "metric_for_best_model=None))"
    )
    result = run_plan(tmp_path, make, "ckptkeeper plan outputs --keep best:1:acuracy,last:1 --json")
    assert result.exit_code == 3, result.output
    reasons = _reasons(result.stdout)
    for reason in reasons:
        _assert_documented_shape(reason)
    by_kind = {r["kind"]: r for r in reasons}
    assert by_kind["refused"] == {
        "kind": "refused",
        "rule": "refused",
        "rank": None,
        "released": False,
        "until": None,
        "text": "refused: nothing is removed in this run",
    }
    assert by_kind["held"] == {
        "kind": "held",
        "rule": "refused",
        "rank": None,
        "released": False,
        "until": None,
        "text": "held: retention is refused in run 'exp1'",
    }
    summary = json.loads(result.stdout)["summary"]
    assert (summary["refused"], summary["removed"], summary["bytes_to_free"]) == (True, 0, 0)


def test_the_readme_documents_every_reason_key_and_kind() -> None:
    readme = README.read_text(encoding="utf-8")
    section = readme.partition("### `ckptkeeper plan`")[2].partition(BEGIN)[0]
    for key in REASON_KEYS:
        assert re.search(rf"^\| `{key}` \|", section, flags=re.MULTILINE), f"the reason key {key!r} is not documented"
    kinds_row = re.search(r"^\| `kind` \|(.*)$", section, flags=re.MULTILINE)
    assert kinds_row is not None
    for kind in ReasonKind:
        assert f"`{kind.value}`" in kinds_row.group(1), f"the reason kind {kind.value!r} is not documented"


def test_the_readme_module_table_lists_every_module() -> None:
    section = README.read_text(encoding="utf-8").partition("\n## Development")[2]
    first_cells = re.findall(r"^\| ([^|]*\.py[^|]*) \|", section, flags=re.MULTILINE)
    listed = {name for cell in first_cells for name in re.findall(r"`([A-Za-z_]+\.py)`", cell)}
    modules = {p.name for p in (PROJECT / "ckptkeeper").glob("*.py")}
    assert listed == modules, f"missing from the table: {sorted(modules - listed)}; gone: {sorted(listed - modules)}"
