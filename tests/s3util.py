"""A real S3 server for the tests: moto's, over HTTP on 127.0.0.1 (as s3fs's own test suite runs it), used by
ckptkeeper through the real s3fs client. Credentials and endpoint reach ckptkeeper the standard way: the AWS
environment variables (`AWS_ENDPOINT_URL` included), never a flag of ckptkeeper's."""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class S3Server:
    """moto's S3 server, in this process (ThreadedMotoServer) or in a child process (`--process`)."""

    endpoint: str
    handle: Any
    _client: Any = None

    def client(self) -> Any:
        """One boto3 client per server (making one costs ~15 ms)."""
        if self._client is None:
            boto3 = importlib.import_module("boto3")  # no type stubs
            self._client = boto3.client("s3", endpoint_url=self.endpoint, **_boto_credentials())
        return self._client

    def stop(self) -> None:
        if isinstance(self.handle, subprocess.Popen):
            self.handle.kill()
            self.handle.wait()
        else:
            self.handle.stop()


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


def start_threaded() -> S3Server:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return S3Server(f"http://{host}:{port}", server)


def start_process(env: dict[str, str] | None = None, port: int | None = None) -> S3Server:
    """moto's server as a child process (one that can be killed, or run with settings of its own, such as
    INITIAL_NO_AUTH_ACTION_COUNT=0 to check credentials)."""
    port = port or free_port()
    child = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return S3Server(f"http://127.0.0.1:{port}", child)
        except OSError:
            time.sleep(0.05)
    child.kill()
    raise RuntimeError("moto's server did not start within 30 s")


@dataclass
class Bucket:
    """A fresh bucket on the server; `url` is an archive URL below it."""

    server: S3Server
    name: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}/archive"

    def listing(self, prefix: str = "") -> dict[str, int]:
        """Every object (key -> size) below `prefix`."""
        found: dict[str, int] = {}
        pages = self.server.client().get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", []):
                found[item["Key"]] = int(item["Size"])
        return found

    def get(self, key: str) -> bytes:
        body: bytes = self.server.client().get_object(Bucket=self.name, Key=key)["Body"].read()
        return body

    def uploads(self) -> list[str]:
        """Keys of multipart uploads begun and neither completed nor aborted."""
        found = self.server.client().list_multipart_uploads(Bucket=self.name)
        return [u["Key"] for u in found.get("Uploads", [])]


def environment(endpoint: str) -> dict[str, str]:
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}


def new_bucket(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    for key, value in environment(server.endpoint).items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    name = f"ckpt-{uuid.uuid4().hex[:16]}"
    server.client().create_bucket(Bucket=name)
    return Bucket(server, name)


def tree_digest(top: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below `top` (links: their target)."""
    found: dict[str, str] = {}
    for path in sorted(top.rglob("*")):
        rel = path.relative_to(top).as_posix()
        if path.is_symlink():
            found[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def server_iterator() -> Iterator[S3Server]:
    server = start_threaded()
    try:
        yield server
    finally:
        server.stop()
