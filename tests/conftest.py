"""Shared test helpers. Fixture data under tests/fixtures/hf is a copy of the real Trainer output in
../shared/fixtures/hf (see tests/fixtures/README-shared.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from s3util import Bucket, S3Server, new_bucket, server_iterator
from watchutil import StartWatch, Watch

from ckptkeeper.simtrainer import SimConfig, simulate_run

FIXTURES = Path(__file__).parent / "fixtures"
HF_FIXTURES = FIXTURES / "hf"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--crash-rounds",
        type=int,
        default=None,
        metavar="N",
        help="SIGKILL rounds per mode of the crash-safety campaign (tests/test_crash_safety.py); "
        "overrides $CKPTKEEPER_CRASH_ROUNDS (default 200)",
    )


@pytest.fixture
def hf_run(tmp_path: Path) -> Callable[[str], Path]:
    """Copy one real Trainer run (A, B, C, D2, E, G) into a fresh directory and return its path."""

    def copy(name: str) -> Path:
        target = tmp_path / "outputs" / name
        shutil.copytree(HF_FIXTURES / name, target, ignore=shutil.ignore_patterns("MANIFEST.json"))
        # The Trainer's own file times (git keeps none: a checkout writes checkpoint-104 before checkpoint-26,
        # which would look like a directory mixing two runs, SPEC "Protections" 1).
        manifest = json.loads((HF_FIXTURES / name / "MANIFEST.json").read_text(encoding="utf-8"))
        for entry in [*manifest["files"], *manifest["dirs"]]:
            os.utime(target / entry["path"], ns=(entry["mtime_ns"], entry["mtime_ns"]))
        return target

    return copy


@pytest.fixture
def sim_run(tmp_path: Path) -> Callable[..., Path]:
    """Write a simulated Trainer run at tmp_path/outputs/<name> and return its path."""

    def make(name: str = "run", config: SimConfig | None = None) -> Path:
        target = tmp_path / "outputs" / name
        simulate_run(target, config or SimConfig())
        return target

    return make


def _tmpfs_mounts() -> list[Path]:
    mounts = []
    with open("/proc/mounts") as f:
        for line in f:
            _, where, kind, options, *_ = line.split()
            where = where.replace("\\040", " ")
            if kind == "tmpfs" and "rw" in options.split(",") and not where.startswith(("/sys", "/proc")):
                mounts.append(Path(where))
    return sorted(mounts, key=lambda p: p != Path("/dev/shm"))


@pytest.fixture(scope="session")
def tmpfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A writable tmpfs on another filesystem than tmp_path: an existing one, or one mounted here (root)."""
    here = tmp_path_factory.getbasetemp().stat().st_dev
    for mount in _tmpfs_mounts():
        try:
            if mount.stat().st_dev != here and os.access(mount, os.W_OK):
                yield mount
                return
        except OSError:
            continue
    if os.geteuid() != 0:
        pytest.skip("no writable tmpfs on another filesystem than the temp dir, and not root to mount one")
    mount = tmp_path_factory.mktemp("tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=768m", "ckptkeeper-test", str(mount)],
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"no tmpfs on another filesystem, and `mount -t tmpfs` failed: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[StartWatch]:
    """Start `ckptkeeper watch ROOT ARGS...`; every process still running at the end is killed."""
    started: list[Watch] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(root: Path, *args: str, prefix: Sequence[str] = ()) -> Watch:
        w = Watch(root, args, logs / f"watch-{len(started)}.log", prefix)
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """mount(kind, name, options) -> a fresh filesystem (`mount -t kind`) at tmp_path/name, unmounted at the end;
    the test is skipped where it cannot mount (not root, no such filesystem)."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    made: list[Path] = []

    def make(kind: str, name: str, options: str = "") -> Path:
        where = tmp_path / name
        where.mkdir(parents=True, exist_ok=True)
        args = ["mount", "-t", kind, *(["-o", options] if options else []), f"ckptkeeper-{name}", str(where)]
        done = subprocess.run(args, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"mount -t {kind} failed: {done.stderr.strip()}")
        made.append(where)
        return where

    yield make
    for where in reversed(made):
        if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1, for the whole session (tests/s3util.py)."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    yield from server_iterator()


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """A fresh bucket, and the AWS environment (endpoint, credentials) pointing at it for this process and its
    children."""
    return new_bucket(s3_server, monkeypatch)
