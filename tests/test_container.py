"""The sidecar image, built from the top-level Dockerfile and run with podman (the sandbox's wrapper,
/work/shared/tools/podman, or $CKPTKEEPER_PODMAN): a real container watches a host directory into which
the simulated Trainer writes a run; what it keeps on disk, what it serves on /metrics and /healthz, the
user it runs as, how it stops on SIGTERM and what the image declares are checked.

This test FAILS (never skips) when podman cannot build or run the image: CI runs it to prove the image works.

The image is built with `--format docker`: podman's default OCI image format has no place for HEALTHCHECK
(podman warns "HEALTHCHECK is not supported for OCI image format and will be ignored"), while `docker build`
always writes the Docker format, so this is the image a user gets from `docker build .`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from watchutil import TrainerThread, journal, steps, wait_until

from ckptkeeper.simtrainer import SimConfig

PROJECT = Path(__file__).resolve().parent.parent
PODMAN = os.environ.get("CKPTKEEPER_PODMAN", "/work/shared/tools/podman")
BASE_IMAGE = os.environ.get("CKPTKEEPER_BASE_IMAGE", "localhost/python-base:bookworm")
IMAGE = "ckptkeeper:test"
UID = 10001
# 4 steps per epoch, 2 epochs, a save every 2 steps: checkpoints 2, 4, 6, 8; no eval, so no trainer best.
RUN = SimConfig(steps_per_epoch=4, epochs=2, save_steps=2, eval_strategy="no", metric_for_best_model=None)
ALL_STEPS = [2, 4, 6, 8]
KEPT = [6, 8]  # --keep last:2


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PODMAN_QUIET": "1"}
    try:
        done = subprocess.run([PODMAN, *args], check=False, capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError:
        pytest.fail(f"podman cannot run: {PODMAN} does not exist (set CKPTKEEPER_PODMAN to a podman binary)")
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`podman {' '.join(args)}` did not finish within {timeout:g} s: {e.stderr!r}")
    if check and done.returncode != 0:
        pytest.fail(
            f"`podman {' '.join(args)}` failed with exit code {done.returncode}:\n"
            f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
        )
    return done


@pytest.fixture(scope="module")
def image() -> str:
    """Build the image once for this module (about 40 s; much longer the very first time on a machine)."""
    podman(
        "build",
        "--format",
        "docker",
        "--build-arg",
        f"BASE_IMAGE={BASE_IMAGE}",
        "-t",
        IMAGE,
        str(PROJECT),
        timeout=900,
    )
    return IMAGE


@pytest.fixture
def containers() -> Iterator[list[str]]:
    """Names of the containers a test starts; each is removed (forcibly) afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        podman("rm", "--force", "--time", "0", name, check=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value of every sample in a Prometheus text exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return found


def test_image_metadata(image: str) -> None:
    """The image declares its healthcheck, non-root user, entrypoint, metrics port and OCI labels."""
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    config = info["Config"]
    health = info.get("Healthcheck") or config.get("Healthcheck")  # podman: top level; docker: in Config
    assert health, f"no HEALTHCHECK in the image: {json.dumps(info, indent=1)[:3000]}"
    assert health["Test"][0] == "CMD" and any("/healthz" in part for part in health["Test"]), health
    assert health["Timeout"] > 0 and health["Interval"] > 0, health
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["ckptkeeper"]
    assert "9100/tcp" in config.get("ExposedPorts", {})
    assert "CKPTKEEPER_METRICS_PORT=9100" in config["Env"]
    labels = config.get("Labels") or info.get("Labels") or {}
    for key in ("title", "description", "version", "licenses", "source"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"label org.opencontainers.image.{key}: {labels}"
    assert labels["org.opencontainers.image.title"] == "ckptkeeper"
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
    print(f"\nimage {image}: {size} bytes ({size / 1e6:.1f} MB)")
    assert 0 < size < 500e6, size


@dataclass(frozen=True)
class Sidecar:
    """A running ckptkeeper container: its name, and the host port its metrics server listens on."""

    name: str
    port: int

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def running(self) -> bool:
        state = podman("inspect", "--format", "{{.State.Running}}", self.name).stdout.strip()
        if state != "true":
            raise AssertionError(f"the container stopped early; its log:\n{self.logs()}")
        return True

    def healthy(self) -> bool:
        self.running()
        try:
            return http_get(f"http://127.0.0.1:{self.port}/healthz") == (200, "ok\n")
        except OSError:
            return False


def start_sidecar(image: str, outputs: Path, containers: list[str]) -> Sidecar:
    """`watch /outputs --keep last:2` in a container of `image`, with `outputs` mounted as /outputs."""
    port = free_port()
    name = f"ckptkeeper-test-{uuid.uuid4().hex[:10]}"
    containers.append(name)
    podman(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--env",
        f"CKPTKEEPER_METRICS_PORT={port}",
        "--volume",
        f"{outputs}:/outputs",
        image,
        "watch",
        "/outputs",
        "--keep",
        "last:2",
        "--settle",
        "0.3",
    )
    return Sidecar(name, port)


def train_into(outputs: Path) -> list[int]:
    """The simulated Trainer writes a run into `outputs` (the steps it saved); umask 0 makes its directories
    writable by the container's user, as fsGroup or a shared uid does in a real deployment."""
    old_umask = os.umask(0)
    try:
        trainer = TrainerThread(outputs / "run", RUN, pace=0.02)
        trainer.start()
        return [step for step, _ in trainer.finish(60)]
    finally:
        os.umask(old_umask)


def check_metrics(sidecar: Sidecar, deleted: list[dict[str, Any]]) -> None:
    """/metrics counts the removals and what is kept; /healthz still answers."""
    port = sidecar.port
    removed = len(ALL_STEPS) - len(KEPT)
    run_label = (("run", "run"),)

    def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        status, text = http_get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        found = samples(text)
        # The counters move during a pass, the gauges at its end: wait for both.
        done = found.get(("ckptkeeper_checkpoints_removed_total", run_label)) == removed
        return found if done and found.get(("ckptkeeper_checkpoints_seen", run_label)) == len(KEPT) else None

    found = wait_until(scraped, 10, lambda: http_get(f"http://127.0.0.1:{port}/metrics")[1])
    assert found[("ckptkeeper_checkpoints_removed_total", run_label)] == removed
    assert found[("ckptkeeper_checkpoints_kept", run_label)] == len(KEPT)
    assert found[("ckptkeeper_checkpoints_seen", run_label)] == len(KEPT)
    assert found[("ckptkeeper_bytes_freed_total", ())] == sum(e["bytes"] for e in deleted)
    assert found[("ckptkeeper_errors_total", ())] == 0
    assert found[("ckptkeeper_observer_mode", (("mode", "inotify"),))] == 1
    assert found[("ckptkeeper_observer_mode", (("mode", "polling"),))] == 0
    assert abs(found[("ckptkeeper_last_reconcile_timestamp_seconds", ())] - time.time()) < 60
    assert http_get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")


def check_stops_on_sigterm(sidecar: Sidecar, run: Path) -> None:
    """SIGTERM (what `podman stop`, `docker stop` and the kubelet send): exit 0, well within the grace period."""
    start = time.monotonic()
    podman("stop", "--time", "15", sidecar.name, timeout=30)
    took = time.monotonic() - start
    code = podman("wait", sidecar.name).stdout.strip()
    assert code == "0", f"exit code {code}; log:\n{sidecar.logs()}"
    assert took < 10, f"stopping took {took:.1f} s"
    assert "received SIGTERM" in sidecar.logs()
    assert steps(run) == KEPT


def test_the_image_can_archive_to_s3(image: str) -> None:
    """The s3 extra is installed: s3fs imports, and `--archive-to s3://` passes the start-up check (which names the
    package to install when it is missing)."""
    done = podman("run", "--rm", "--entrypoint", "python", image, "-c", "import s3fs; print(s3fs.__version__)")
    assert done.stdout.strip(), done.stdout
    dry = podman(
        "run", "--rm", "--tmpfs", "/outputs", image, "prune", "/outputs", "--keep", "last:1", "--archive-to",
        "s3://bucket/runs", "--dry-run", check=False,
    )  # fmt: skip
    assert "needs s3fs" not in dry.stdout + dry.stderr, dry.stdout + dry.stderr
    assert dry.returncode == 0, dry.stdout + dry.stderr


def test_sidecar_prunes_serves_metrics_and_stops_on_sigterm(image: str, containers: list[str], tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    outputs.chmod(0o777)  # the container's user (uid 10001) creates its state directory here
    sidecar = start_sidecar(image, outputs, containers)
    wait_until(sidecar.healthy, 30, lambda: f"/healthz to answer 200 ok; the container's log:\n{sidecar.logs()}")

    # The image's HEALTHCHECK command itself passes inside the running container.
    podman("healthcheck", "run", sidecar.name)

    # The process inside runs as the image's non-root user.
    assert podman("exec", sidecar.name, "id", "-u").stdout.strip() == str(UID)
    assert podman("exec", sidecar.name, "id", "-g").stdout.strip() == str(UID)

    # The simulated Trainer writes a run while the container watches.
    saved = train_into(outputs)
    assert saved == ALL_STEPS
    run = outputs / "run"
    wait_until(lambda: steps(run) == KEPT, 30, lambda: f"only {KEPT} in {steps(run)}; log:\n{sidecar.logs()}")
    trash = outputs / "_ckptkeeper" / "trash"
    wait_until(lambda: not trash.exists() or not os.listdir(trash), 10, "the trash to be emptied")

    # The outcome line is journaled just after the rename into the trash, so the reaper thread may have emptied
    # the trash a moment before the last line is written: wait for it as for the rest.
    def journaled() -> list[dict[str, Any]] | None:
        found = [e for e in journal(outputs / "_ckptkeeper") if e["action"] == "delete"]
        return found if len(found) >= 2 else None

    deleted = wait_until(journaled, 10, lambda: f"both deletes journaled: {journal(outputs / '_ckptkeeper')}")
    assert sorted(e["step"] for e in deleted) == [2, 4], deleted

    check_metrics(sidecar, deleted)
    assert "checkpoint-2 deleted: freed" in sidecar.logs()
    check_stops_on_sigterm(sidecar, run)
