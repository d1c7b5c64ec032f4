"""The real lm-evaluation-harness fixture (tests/fixtures/lm-eval, a copy of ../shared/fixtures/lm-eval), made
usable at a new place.

The fixture was written by the real Trainer and the real `lm_eval` CLI in `/tmp/lmeval-out` (see its README).
lm-eval records the checkpoint it evaluated by the path it was given (`model_name`,
`config.model_args.pretrained`, `configs.<task>.metadata.pretrained`), and ckptkeeper ties a results file to
a checkpoint by that path, by identity: a copy elsewhere must say where its checkpoints now are.

    fixture = copy_lmeval_fixture(tmp_path / "lm")      # run/, evals/, evals-jsonfile/ below tmp_path/lm
    ckptkeeper("plan", fixture.root, "--metric", f"acc_norm=lm-eval:{fixture.evals}#/results/synth_likes/acc_norm,none")

`copy_lmeval_fixture` copies the trees, rewrites every absolute path under `/tmp/lmeval-out` recorded in a
results file (found by content, as ckptkeeper finds them: the copies named `eval_results.json` in
checkpoint-80 and -240 too) to the same path under the new location, keeps relative ones (`checkpoint-240`,
as the relative-path run recorded it) and trailing slashes, and changes nothing else in the file, byte for
byte. It then gives every file the modification time the real run gave it (MANIFEST.json; git keeps none),
so the newest written checkpoint is the highest step, as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LMEVAL_FIXTURE = Path(__file__).parent / "fixtures" / "lm-eval"
RECORDED_ROOT = "/tmp/lmeval-out"  # where the fixture was made: every absolute path in it starts so
TREES = ("run", "evals", "evals-jsonfile")

# The harness's numbers (newest results file of each checkpoint, absolute path), from the fixture's README.
ACC_NORM = {
    40: 0.3333333333333333,
    80: 0.4166666666666667,
    120: 0.4166666666666667,
    160: 0.6458333333333334,
    200: 0.625,
    240: 0.7708333333333334,
}
ACC_NORM_POINTER = "/results/synth_likes/acc_norm,none"
WORD_PERPLEXITY_POINTER = "/results/synth_ppl/word_perplexity,none"


@dataclass(frozen=True)
class LmEvalFixture:
    root: Path  # holds run/, evals/ and evals-jsonfile/ (the recorded /tmp/lmeval-out)
    run: Path  # the Trainer's output_dir: checkpoint-40 ... checkpoint-240
    evals: Path  # lm-eval --output_path (a directory)
    evals_jsonfile: Path  # lm-eval --output_path .../results.json (one results file, checkpoint-120)

    def results_files(self) -> list[Path]:
        """Every lm-eval results file below the root, found by content."""
        return sorted(p for p in self.root.rglob("*.json") if is_results_file(p))


def is_results_file(path: Path) -> bool:
    """Does `path` hold an lm-eval results document (top level: results, config.model_args, lm_eval_version)?"""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return is_results_doc(doc)


def is_results_doc(doc: object) -> bool:
    if not isinstance(doc, dict) or "results" not in doc or "lm_eval_version" not in doc:
        return False
    config = doc.get("config")
    return isinstance(config, dict) and isinstance(config.get("model_args"), dict)


def _recorded_string(old: str) -> re.Pattern[str]:
    """A JSON string token that is `old` or starts with `old/` (its opening quote and `old`)."""
    return re.compile('"' + re.escape(json.dumps(old)[1:-1]) + r'(?=[/"])')


def _rewritten(value: Any, old: str, new: str) -> Any:
    """`value` with every string `old` or `old/...` made `new` or `new/...` (what the text rewrite must give)."""
    if isinstance(value, str) and (value == old or value.startswith(old + "/")):
        return new + value[len(old) :]
    if isinstance(value, dict):
        return {k: _rewritten(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewritten(v, old, new) for v in value]
    return value


def rewrite_recorded_paths(path: Path, old: str, new: str) -> bool:
    """Rewrite, in the results file at `path`, every recorded path `old` or `old/...` to `new` or `new/...`,
    in the text itself (everything else stays byte for byte; the file's times are kept). False if `path` is not
    a results file or records no such path."""
    text = path.read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    if not is_results_doc(doc):
        return False
    replaced, n = _recorded_string(old).subn(lambda _m: '"' + json.dumps(new)[1:-1], text)
    if n == 0:
        return False
    if json.loads(replaced) != _rewritten(doc, old, new):  # a key, or a path inside a longer string: say so
        raise AssertionError(f"{path}: rewriting {old} -> {new} changed more than the recorded paths")
    st = path.stat()
    path.write_text(replaced, encoding="utf-8")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return True


def _restore_times(dest: Path) -> None:
    """Each file's mtime from MANIFEST.json; each directory's, the newest of what it holds (as after the run)."""
    manifest = json.loads((LMEVAL_FIXTURE / "MANIFEST.json").read_text(encoding="utf-8"))
    for entry in manifest["files"]:
        target = dest / entry["path"]
        if target.is_file():
            os.utime(target, ns=(entry["mtime_ns"], entry["mtime_ns"]))
    for tree in TREES:
        dirs = sorted((p for p in (dest / tree).rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for directory in [*dirs, dest / tree]:
            newest = max((p.stat().st_mtime_ns for p in directory.iterdir()), default=None)
            if newest is not None:
                os.utime(directory, ns=(newest, newest))


def copy_lmeval_fixture(dest: Path, recorded_as: Path | str | None = None) -> LmEvalFixture:
    """Copy run/, evals/ and evals-jsonfile/ to `dest` (created), with every absolute recorded path moved from
    /tmp/lmeval-out to `recorded_as` (default: `dest` itself; give another spelling of it, such as a path
    through a symlink, to record the checkpoints that way), and the real run's file times."""
    dest.mkdir(parents=True, exist_ok=True)
    for tree in TREES:
        shutil.copytree(LMEVAL_FIXTURE / tree, dest / tree)
    _restore_times(dest)
    new = os.fspath(dest if recorded_as is None else recorded_as)
    fixture = LmEvalFixture(dest, dest / "run", dest / "evals", dest / "evals-jsonfile")
    for path in fixture.results_files():
        rewrite_recorded_paths(path, RECORDED_ROOT, new)
    return fixture


def newest_results(fixture: LmEvalFixture, checkpoint: Path) -> dict[str, Any] | None:
    """The newest (by `date`) results document that records `checkpoint` by exactly this absolute path, or by
    it with a trailing slash; None if none does. The harness's own view, for test oracles."""
    best: dict[str, Any] | None = None
    for path in fixture.results_files():
        doc = json.loads(path.read_bytes())
        recorded = str(doc["config"]["model_args"].get("peft") or doc["config"]["model_args"].get("pretrained"))
        if recorded.rstrip("/") == os.fspath(checkpoint) and (best is None or doc["date"] > best["date"]):
            best = doc
    return best
