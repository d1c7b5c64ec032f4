"""Archiving to an object store (`--archive-to s3://...`): the commit protocol against moto's S3 server over real
HTTP, with the real s3fs client (tests/s3util.py). Upload, verify, manifest last, then the source goes through the
trash; an upload without a manifest is resumed and never counts; a complete archive is never overwritten; a
store that fails loses nothing and says so in one short line."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import pty
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cliutil import per_removal
from s3util import Bucket, S3Server, new_bucket, start_process, tree_digest
from watchutil import StartWatch, Watch, wait_until

from ckptkeeper.cli import main
from ckptkeeper.destination import MANIFEST_SUFFIX
from ckptkeeper.progress import UploadProgress
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
    return {k[len(head) :]: size for k, size in bucket.listing(head).items()}


def local_sizes(top: Path) -> dict[str, int]:
    return {p.relative_to(top).as_posix(): p.stat().st_size for p in top.rglob("*") if p.is_file()}


def manifest(bucket: Bucket, prefix: str) -> dict[str, object]:
    document: dict[str, object] = json.loads(bucket.get(f"archive/{prefix}{MANIFEST_SUFFIX}"))
    return document


def assert_store_failure(run: Path, url: str, message: str) -> None:
    """prune fails each archive with `message` (one short line per checkpoint), exits 1, and changes nothing."""
    before = tree_digest(run)
    result = cli("prune", run.parent, "--keep", "last:1", "--archive-to", url)
    assert result.exit_code == 1, result.output
    assert [line for line in lines(result) if line.startswith("FAILED")] == [
        f"FAILED        exp1/checkpoint-10  ({message})",
        f"FAILED        exp1/checkpoint-20  ({message})",  # not tried again in the same pass: the store is down
    ]
    assert lines(result)[-1] == "Error: 2 checkpoints could not be removed (see the FAILED lines above)"
    assert tree_digest(run) == before


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
            line.startswith(f"archived      exp1/{n}  ") and line.endswith(f"(uploaded to {s3_bucket.url}/exp1/{n})")
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
    journal = per_removal([json.loads(x) for x in (root / "_ckptkeeper" / "journal.jsonl").read_text().splitlines()])
    assert [(e["action"], e.get("checkpoint")) for e in journal] == [
        ("start-archive", "checkpoint-10"), ("archive", "checkpoint-10"),
        ("start-archive", "checkpoint-20"), ("archive", "checkpoint-20"),
    ]  # fmt: skip
    assert s3_bucket.uploads() == []


def test_a_dry_run_sends_nothing_to_the_store(run: Path, s3_bucket: Bucket) -> None:
    result = cli("prune", run.parent, "--keep", "last:1", "--archive-to", s3_bucket.url, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would archive exp1/checkpoint-10" in " ".join(result.output.split())
    assert s3_bucket.listing() == {}
    assert (run / "checkpoint-10").is_dir()


def test_an_upload_without_manifest_is_resumed_and_abandoned_parts_are_aborted(run: Path, s3_bucket: Bucket) -> None:
    """What a killed upload leaves: some objects whole, one of the right size with other bytes, a multipart
    upload begun and never completed. None of it counts; the next archive resumes it."""
    ckpt, head = run / "checkpoint-10", "archive/exp1/checkpoint-10/"
    digests = tree_digest(ckpt)
    client = s3_bucket.server.client()
    client.put_object(Bucket=s3_bucket.name, Key=head + "optimizer.pt", Body=(ckpt / "optimizer.pt").read_bytes())
    wrong = bytes(len((ckpt / "model.safetensors").read_bytes()))
    client.put_object(Bucket=s3_bucket.name, Key=head + "model.safetensors", Body=wrong)
    begun = client.create_multipart_upload(Bucket=s3_bucket.name, Key=head + "scheduler.pt")
    client.upload_part(
        Bucket=s3_bucket.name, Key=head + "scheduler.pt", UploadId=begun["UploadId"], PartNumber=1, Body=b"x"
    )
    sent_before = client.head_object(Bucket=s3_bucket.name, Key=head + "optimizer.pt")["LastModified"]
    plan = cli("plan", run.parent, "--keep", "last:1", "--archive-to", s3_bucket.url)
    assert "archive" in plan.output  # objects without a manifest are not an archive: still to be done

    result = cli("prune", run.parent, "--keep", "last:1", "--archive-to", s3_bucket.url)
    assert result.exit_code == 0, result.output
    document = manifest(s3_bucket, "exp1/checkpoint-10")
    files = document["files"]
    assert isinstance(files, list)
    assert {f["path"]: f["sha256"] for f in files} == digests
    assert {rel: hashlib.sha256(s3_bucket.get(head + rel)).hexdigest() for rel in digests} == digests
    assert client.head_object(Bucket=s3_bucket.name, Key=head + "optimizer.pt")["LastModified"] == sent_before
    assert s3_bucket.uploads() == []
    assert not ckpt.exists()


def test_a_complete_archive_that_matches_finishes_the_local_removal(run: Path, s3_bucket: Bucket) -> None:
    """A kill after the manifest, before the source went: the next pass finds the archive complete and matching,
    sends nothing, and removes the source."""
    twin = run.parent.parent / "twin" / "exp1"
    shutil.copytree(run, twin, symlinks=True)
    first = cli("prune", twin.parent, "--keep", "last:1", "--archive-to", s3_bucket.url)
    assert first.exit_code == 0, first.output
    written = s3_bucket.server.client().head_object(
        Bucket=s3_bucket.name, Key=f"archive/exp1/checkpoint-10{MANIFEST_SUFFIX}"
    )["LastModified"]
    result = cli("prune", run.parent, "--keep", "last:1", "--archive-to", s3_bucket.url)
    assert result.exit_code == 0, result.output
    assert f"(already archived to {s3_bucket.url}/exp1/checkpoint-10)" in result.output
    assert not (run / "checkpoint-10").exists()
    assert (
        s3_bucket.server.client().head_object(
            Bucket=s3_bucket.name, Key=f"archive/exp1/checkpoint-10{MANIFEST_SUFFIX}"
        )["LastModified"]
        == written
    )


def test_a_complete_archive_that_differs_is_never_overwritten_and_the_checkpoint_stays(
    run: Path, s3_bucket: Bucket
) -> None:
    """Another run of the same name was archived there (same layout, other bytes): an error, both kept."""
    twin = run.parent.parent / "twin" / "exp1"
    shutil.copytree(run, twin, symlinks=True)
    optimizer = twin / "checkpoint-10" / "optimizer.pt"
    times = optimizer.stat()
    optimizer.write_bytes(bytes(times.st_size))
    os.utime(optimizer, ns=(times.st_atime_ns, times.st_mtime_ns))  # still the older checkpoint by its file times
    assert cli("prune", twin.parent, "--keep", "last:1", "--archive-to", s3_bucket.url).exit_code == 0
    stored = s3_bucket.get(f"archive/exp1/checkpoint-10{MANIFEST_SUFFIX}")
    before = tree_digest(run / "checkpoint-10")
    result = cli("prune", run.parent, "--keep", "last:1", "--archive-to", s3_bucket.url)
    assert result.exit_code == 1, result.output
    assert (
        f"FAILED        exp1/checkpoint-10  (cannot archive {run}/checkpoint-10 to {s3_bucket.url}/exp1/checkpoint-10: "
        f"{s3_bucket.url}/exp1/checkpoint-10 is archived already and differs from the checkpoint: optimizer.pt: "
        "different size or content; both kept)"
    ) in lines(result)
    assert tree_digest(run / "checkpoint-10") == before
    assert s3_bucket.get(f"archive/exp1/checkpoint-10{MANIFEST_SUFFIX}") == stored


def test_a_bucket_that_does_not_exist_loses_nothing_and_says_so_briefly(run: Path, s3_bucket: Bucket) -> None:
    url = f"s3://{s3_bucket.name}-missing/archive"
    assert_store_failure(run, url, f"cannot archive to {url}: the bucket '{s3_bucket.name}-missing' does not exist")


def test_no_credentials_at_all(run: Path, s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    message = "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a role"
    assert_store_failure(run, s3_bucket.url, f"cannot archive to {s3_bucket.url}: {message}")
    assert s3_bucket.listing() == {}


def test_a_protocol_whose_package_is_missing_names_the_package(run: Path) -> None:
    pytest.importorskip("fsspec")
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    result = cli("prune", run.parent, "--keep", "last:1", "--archive-to", "gs://bucket/runs")
    assert result.exit_code == 2, result.output
    assert result.output == "Error: --archive-to gs://bucket/runs: needs gcsfs (pip install gcsfs)\n"
    unknown = cli("prune", run.parent, "--keep", "last:1", "--archive-to", "nosuch://bucket/runs")
    assert unknown.output == "Error: --archive-to nosuch://bucket/runs: fsspec knows no protocol 'nosuch'\n"
    assert (run / "checkpoint-10").is_dir()


@pytest.fixture
def own_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Bucket]]:
    """start(env) -> a bucket on a moto server of its own, in a child process (it can be killed)."""
    pytest.importorskip("s3fs")
    started: list[S3Server] = []

    def start(env: dict[str, str] | None = None) -> Bucket:
        server = start_process(env)
        started.append(server)
        return new_bucket(server, monkeypatch)

    yield start
    for server in started:
        server.stop()


def test_wrong_credentials_are_refused_by_the_store_and_nothing_is_lost(
    run: Path, own_server: Callable[..., Bucket], monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = own_server({"INITIAL_NO_AUTH_ACTION_COUNT": "1"})  # the bucket is made; then keys are checked
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    assert_store_failure(run, bucket.url, f"cannot archive to {bucket.url}: access denied: check the credentials")


def test_a_store_that_goes_away_mid_upload_loses_nothing(
    sim_run: Callable[..., Path], own_server: Callable[..., Bucket]
) -> None:
    """The server is killed while a large file is being sent in parts: the prune fails with one short line per
    checkpoint, the checkpoint stays whole, and no manifest exists."""
    big = SimConfig(steps_per_epoch=10, epochs=2, save_steps=10, eval_steps=10, optimizer_bytes=96 << 20)
    run = sim_run("exp1", big)
    bucket = own_server()
    before = tree_digest(run)
    prune = subprocess.Popen(
        [sys.executable, "-m", "ckptkeeper", "prune", str(run.parent), "--keep", "last:1", "--archive-to", bucket.url,
         "--archive-option", "config_kwargs={retries: {max_attempts: 2}}"],  # botocore's retries: fewer, to be quick
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not bucket.uploads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bucket.uploads(), "the multipart upload never began"
    bucket.server.stop()
    out, _ = prune.communicate(timeout=120)
    assert prune.returncode == 1, out
    port = bucket.server.endpoint.rsplit(":", 1)[1]
    assert (
        f"FAILED        exp1/checkpoint-10  (cannot archive to {bucket.url}: cannot reach the store "
        f"(http://127.0.0.1:{port}))"
    ) in out.splitlines(), out
    assert tree_digest(run) == before


# ---------------------------------------------------------------------------------------------- watch
def scrape(w: Watch) -> str:
    found = wait_until(lambda: re.search(r"serving metrics on (http://\S+)/metrics", w.log()), 15, w.describe)
    assert found is not None
    with urllib.request.urlopen(found.group(1) + "/metrics", timeout=5) as response:
        text: str = response.read().decode()
        return text


def metric(w: Watch, name: str) -> float:
    found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", scrape(w), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def journal_count(root: Path, action: str, checkpoint: str) -> int:
    path = root / "_ckptkeeper" / "journal.jsonl"
    entries = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return sum(1 for e in entries if e["action"] == action and e.get("checkpoint") == checkpoint)


def test_watch_retries_a_failing_store_at_a_growing_interval_then_archives(
    run: Path, s3_bucket: Bucket, watch: StartWatch
) -> None:
    """The bucket is missing at first: each archive fails, said once per checkpoint; the store is tried again
    after 5 s, then 10 s, not at every rescan (every 0.3 s here); once the bucket exists, both are archived."""
    root, name = run.parent, f"{s3_bucket.name}-late"
    url = f"s3://{name}/archive"
    before = tree_digest(run)
    shutil.copytree(run / "checkpoint-10", root.parent / "sizes" / "10")
    shutil.copytree(run / "checkpoint-20", root.parent / "sizes" / "20")
    w = watch(root, "--keep", "last:1", "--archive-to", url, "--settle", "0", "--rescan-interval", "0.3",
              "--metrics-port", "0")  # fmt: skip
    message = f"cannot archive to {url}: the bucket '{name}' does not exist"
    w.wait_log(f"exp1/checkpoint-10 could not be removed: {message} (the store is tried again at a growing interval)")
    wait_until(lambda: journal_count(root, "start-archive", "checkpoint-10") >= 2, 20, w.describe)
    rescans = metric(w, r'ckptkeeper_reconcile_duration_seconds_count\{scope="all"\}')
    assert rescans >= 8, rescans  # many passes, two attempts: the second after the first wait (5 s)
    assert journal_count(root, "start-archive", "checkpoint-10") == 2
    wait_until(lambda: metric(w, "ckptkeeper_archive_store_failures_total") == 2, 10, w.describe)
    assert tree_digest(run) == before
    s3_bucket.server.client().create_bucket(Bucket=name)
    wait_until(lambda: not (run / "checkpoint-10").exists() and not (run / "checkpoint-20").exists(), 30, w.describe)
    for step in (10, 20):
        assert len([x for x in w.lines() if f"checkpoint-{step} could not be removed" in x]) == 1, w.log()
        w.wait_log(f"exp1/checkpoint-{step} archived: uploaded to {url}/exp1/checkpoint-{step}")
    uploaded = sum(p.stat().st_size for p in (root.parent / "sizes").rglob("*") if p.is_file())
    assert metric(w, "ckptkeeper_archive_uploaded_bytes_total") == uploaded
    assert w.terminate()[0] == 0
    assert "Traceback" not in w.log()


# ---------------------------------------------------------------------------------------------- archive ls, restore
def test_archive_ls_and_restore_round_trip(run: Path, s3_bucket: Bucket, tmp_path: Path) -> None:
    """ls lists complete and cut-short uploads; restore brings a checkpoint back byte for byte, and plan sees it
    complete; a cut-short one is never restored."""
    (run / "checkpoint-10" / "sub").mkdir()  # a nested directory and a link travel too
    (run / "checkpoint-10" / "sub" / "notes.txt").write_text("nested\n")
    (run / "checkpoint-10" / "latest").symlink_to("sub/notes.txt")
    os.utime(run / "checkpoint-10", ns=(1, 1))
    for p in (run / "checkpoint-10").rglob("*"):
        os.utime(p, ns=(1, 1), follow_symlinks=False)
    before = tree_digest(run / "checkpoint-10")
    assert cli("prune", run.parent, "--keep", "last:1", "--archive-to", s3_bucket.url).exit_code == 0
    s3_bucket.server.client().put_object(Bucket=s3_bucket.name, Key="archive/other/checkpoint-5/model.bin", Body=b"12")

    listed = cli("archive", "ls", s3_bucket.url)
    assert listed.exit_code == 0, listed.output
    rows = [" ".join(line.split()) for line in lines(listed)]
    assert rows[0] == "RUN CHECKPOINT STEP SIZE WHEN STATE"
    assert rows[1].startswith("exp1 checkpoint-10 10 ") and rows[1].endswith(" UTC complete")
    assert rows[2].startswith("exp1 checkpoint-20 20 ") and rows[2].endswith(" UTC complete")
    assert rows[3].startswith("other checkpoint-5 5 2 B ")
    assert rows[3].endswith(" UTC incomplete (no manifest: an upload cut short)")
    assert rows[4] == f"2 complete, 1 incomplete, in {s3_bucket.url}"

    target = tmp_path / "restored" / "exp1"
    restored = cli("archive", "restore", f"{s3_bucket.url}/exp1/checkpoint-10", target)
    assert restored.exit_code == 0, restored.output
    assert restored.output.startswith(f"Restored {s3_bucket.url}/exp1/checkpoint-10 to {target / 'checkpoint-10'}: ")
    assert tree_digest(target / "checkpoint-10") == before
    assert os.readlink(target / "checkpoint-10" / "latest") == "sub/notes.txt"
    plan = cli("plan", target.parent, "--keep", "last:1", "--json")
    decisions = json.loads(plan.output)["runs"][0]["checkpoints"]
    assert [(d["name"], d["complete"]) for d in decisions] == [("checkpoint-10", True)]

    again = cli("archive", "restore", f"{s3_bucket.url}/exp1/checkpoint-10", target)
    assert again.exit_code == 1
    assert again.output == (
        f"Error: cannot restore {s3_bucket.url}/exp1/checkpoint-10: {target / 'checkpoint-10'} already exists: "
        "restore into another directory, or move it away first\n"
    )
    partial = cli("archive", "restore", f"{s3_bucket.url}/other/checkpoint-5", tmp_path / "x")
    assert partial.exit_code == 1
    assert partial.output == (
        f"Error: cannot restore {s3_bucket.url}/other/checkpoint-5: {s3_bucket.url}/other/checkpoint-5 has no "
        "manifest: it is not a complete archive (an upload cut short?)\n"
    )
    assert not (tmp_path / "x" / "checkpoint-5").exists()


def test_a_restore_that_finds_other_bytes_than_the_manifest_says_leaves_nothing(
    run: Path, s3_bucket: Bucket, tmp_path: Path
) -> None:
    assert cli("prune", run.parent, "--keep", "last:1", "--archive-to", s3_bucket.url).exit_code == 0
    key = "archive/exp1/checkpoint-10/optimizer.pt"
    size = len(s3_bucket.get(key))
    s3_bucket.server.client().put_object(Bucket=s3_bucket.name, Key=key, Body=bytes(size))  # same size, other bytes
    result = cli("archive", "restore", f"{s3_bucket.url}/exp1/checkpoint-10", tmp_path / "back")
    assert result.exit_code == 1
    assert result.output == (
        f"Error: cannot restore {s3_bucket.url}/exp1/checkpoint-10: optimizer.pt in the store differs from its "
        "manifest (other bytes: its SHA-256 differs)\n"
    )
    assert list((tmp_path / "back").iterdir()) == []


def test_sigterm_stops_an_upload_between_parts_within_the_grace_and_aborts_it(
    sim_run: Callable[..., Path], own_server: Callable[..., Bucket], watch: StartWatch
) -> None:
    """A stop mid-upload: the daemon stops between two parts, aborts the multipart upload (no part stays billed
    in the bucket), writes no manifest, keeps the checkpoint whole, and exits 0 within --grace."""
    big = SimConfig(steps_per_epoch=10, epochs=2, save_steps=10, eval_steps=10, optimizer_bytes=160 << 20)
    run = sim_run("exp1", big)
    bucket = own_server()
    before = tree_digest(run)
    w = watch(run.parent, "--keep", "last:1", "--archive-to", bucket.url, "--settle", "0", "--grace", "8")
    wait_until(bucket.uploads, 60, w.describe)
    code, seconds = w.terminate(timeout=20)
    assert code == 0, w.describe()
    assert seconds < 8, seconds
    w.wait_log("exp1/checkpoint-10: cut short by the stop (the upload was not complete; the checkpoint stays whole)")
    assert tree_digest(run) == before
    assert not any(k.endswith(MANIFEST_SUFFIX) for k in bucket.listing())
    assert bucket.uploads() == []


# ---------------------------------------------------------------------------------------------- progress
def test_upload_progress_says_bytes_rate_and_time_left_at_its_interval() -> None:
    now = [100.0]
    said: list[str] = []
    progress = UploadProgress("exp1/checkpoint-20 uploading", 4_000_000_000, said.append, 10.0, lambda: now[0])
    progress(500_000_000)  # at once: nothing yet
    now[0] = 110.0
    progress(350_000_000)
    now[0] = 115.0
    progress(100_000_000)  # within the interval: nothing
    assert said == ["exp1/checkpoint-20 uploading: 850.0 MB of 4.0 GB (21%), 85.0 MB/s, about 37 s left"]


def test_prune_draws_a_progress_bar_on_a_terminal_only(
    sim_run: Callable[..., Path], s3_bucket: Bucket, tmp_path: Path
) -> None:
    big = SimConfig(steps_per_epoch=10, epochs=2, save_steps=10, eval_steps=10, optimizer_bytes=96 << 20)
    run = sim_run("exp1", big)
    twin = tmp_path / "twin" / "exp1"
    shutil.copytree(run, twin)
    command = [sys.executable, "-m", "ckptkeeper", "prune", "--keep", "last:1", "--archive-to"]
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(
            [*command, s3_bucket.url, str(run.parent)],
            stdout=subprocess.PIPE,
            stderr=follower,
            timeout=120,
            check=False,
        )
        os.close(follower)
        on_terminal = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(leader, 65536):
                on_terminal += chunk
    finally:
        os.close(leader)
    assert done.returncode == 0, done.stdout
    assert re.search(rb"\r\[[#.]{24}\] uploading exp1/checkpoint-10: .* of 100\.\d MB \(\d+%\), ", on_terminal)
    assert b"\r" not in done.stdout
    piped = subprocess.run(
        [*command, f"{s3_bucket.url}-2", str(twin.parent)], capture_output=True, timeout=120, check=False
    )
    assert piped.returncode == 0, piped.stdout
    assert b"uploading" not in piped.stderr and b"\r" not in piped.stdout + piped.stderr


def test_archive_ls_of_a_missing_bucket_or_an_empty_prefix(s3_bucket: Bucket) -> None:
    missing = cli("archive", "ls", f"s3://{s3_bucket.name}-none/runs")
    assert missing.exit_code == 1
    assert missing.output == (
        f"Error: cannot list s3://{s3_bucket.name}-none/runs: the bucket '{s3_bucket.name}-none' does not exist\n"
    )
    empty = cli("archive", "ls", f"s3://{s3_bucket.name}/nothing-here")
    assert (empty.exit_code, empty.output) == (0, f"No archived checkpoints in s3://{s3_bucket.name}/nothing-here.\n")
    local = cli("archive", "ls", "/mnt/archive")
    assert local.exit_code == 2
    assert local.output == "Error: /mnt/archive: expected an object store URL such as s3://bucket/prefix\n"
