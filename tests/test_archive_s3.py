"""Archiving to an object store (`--archive-to s3://...`): the commit protocol against moto's S3 server over real
HTTP, with the real s3fs client (tests/s3util.py). Upload, verify, manifest last, then the source goes through the
trash; an upload without a manifest is resumed and never counts; a complete archive is never overwritten; a
store that fails loses nothing and says so in one short line."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from s3util import Bucket, tree_digest

from ckptkeeper.cli import main
from ckptkeeper.destination import MANIFEST_SUFFIX
from ckptkeeper.simtrainer import SimConfig

SMALL = SimConfig(steps_per_epoch=10, epochs=3, save_steps=10, eval_steps=10)
BIG = SimConfig(steps_per_epoch=10, epochs=2, save_steps=10, eval_steps=10, optimizer_bytes=(20 << 20) + 12345)


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def lines(result: Result) -> list[str]:
    return result.output.splitlines()


def checkpoint_keys(bucket: Bucket, prefix: str) -> dict[str, int]:
    """Objects of one archived checkpoint, by path relative to it."""
    head = f"archive/{prefix}/"
    return {k[len(head) :]: size for k, size in bucket.keys(head).items()}


def local_sizes(top: Path) -> dict[str, int]:
    return {p.relative_to(top).as_posix(): p.stat().st_size for p in top.rglob("*") if p.is_file()}


def manifest(bucket: Bucket, prefix: str) -> dict[str, object]:
    document: dict[str, object] = json.loads(bucket.get(f"archive/{prefix}{MANIFEST_SUFFIX}"))
    return document


@pytest.fixture
def run(sim_run: Callable[..., Path]) -> Path:
    """outputs/exp1 with checkpoint-10, 20, 30; `--keep last:1` archives 10 and 20."""
    return sim_run("exp1", SMALL)


def test_prune_uploads_verifies_writes_the_manifest_and_removes_the_source(run: Path, s3_bucket: Bucket) -> None:
    root = run.parent
    digests = {n: tree_digest(run / n) for n in ("checkpoint-10", "checkpoint-20")}
    sizes = {n: local_sizes(run / n) for n in ("checkpoint-10", "checkpoint-20")}
    result = cli("prune", root, "--keep", "last:1", "--archive-to", s3_bucket.url)
    assert result.exit_code == 0, result.output
    out = lines(result)
    print(result.output)
    assert out[0].endswith(f"; archive to {s3_bucket.url} the rest")
    for n in ("checkpoint-10", "checkpoint-20"):
        assert any(
            line.startswith(f"archived      exp1/{n}  ")
            and line.endswith(f"(uploaded to {s3_bucket.url}/exp1/{n})")
            for line in out
        ), out
        assert not (run / n).exists()
        assert checkpoint_keys(s3_bucket, f"exp1/{n}") == sizes[n]
        document = manifest(s3_bucket, f"exp1/{n}")
        files = document["files"]
        assert isinstance(files, list)
        assert {f["path"]: f["sha256"] for f in files} == digests[n]
        assert (document["run"], document["checkpoint"]) == ("exp1", n)
    assert (run / "checkpoint-30").is_dir()
    assert not any((root / "_ckptkeeper" / "trash").iterdir())
    journal = [json.loads(x) for x in (root / "_ckptkeeper" / "journal.jsonl").read_text().splitlines()]
    assert [(e["action"], e.get("checkpoint")) for e in journal] == [
        ("start-archive", "checkpoint-10"), ("archive", "checkpoint-10"),
        ("start-archive", "checkpoint-20"), ("archive", "checkpoint-20"),
    ]  # fmt: skip
    assert s3_bucket.uploads() == []
