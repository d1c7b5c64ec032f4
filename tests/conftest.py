"""Shared test helpers. Fixture data under tests/fixtures/hf is a copy of the real Trainer output in
../shared/fixtures/hf (see tests/fixtures/README-shared.md)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from ckptkeeper.simtrainer import SimConfig, simulate_run

FIXTURES = Path(__file__).parent / "fixtures"
HF_FIXTURES = FIXTURES / "hf"


@pytest.fixture
def hf_run(tmp_path: Path) -> Callable[[str], Path]:
    """Copy one real Trainer run (A, B, C, D2, E, G) into a fresh directory and return its path."""

    def copy(name: str) -> Path:
        target = tmp_path / "outputs" / name
        shutil.copytree(HF_FIXTURES / name, target, ignore=shutil.ignore_patterns("MANIFEST.json"))
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
