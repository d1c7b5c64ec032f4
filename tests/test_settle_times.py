"""What the settle time measures, on real filesystems and through the real daemon and CLI (issue #10):

- 6: on a filesystem whose file times are whole seconds (ext4 with 128-byte inodes, mounted from an image
  here), a checkpoint waits its settle time plus that granularity, so a checkpoint still being written never
  counts early and the resume point before it survives;
- 7: file times in the future (a writer's clock ahead) settle by what ckptkeeper itself saw unchanged, said
  once in the log, so `--exit-when-done` does not wait for the clock to catch up;
- 10: an empty file (a rank's `rng_state_<rank>.pth` not written yet, with no barrier before rank 0's
  `trainer_state.json`) makes a checkpoint incomplete whatever its times say.

Run as a script, this file is the slow multi-rank writer of the coarse-timestamp test (`publish_slowly`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from watchutil import StartWatch, Watch, steps, wait_until

from ckptkeeper.scan import ContentCache, read_checkpoint
from ckptkeeper.simtrainer import SaveEvent, SimConfig, SimulatedTrainer, simulate_run

# 8 steps, a checkpoint every 2 (2, 4, 6, 8; the last says training stopped), no eval and no Trainer best.
SMALL = SimConfig(steps_per_epoch=4, epochs=2, save_steps=2, eval_strategy="no", metric_for_best_model=None)
WORLD = 8  # ranks, each writing its own rng_state_<rank>.pth
RNG_STATE_BYTES = 14_455  # a real Trainer's rng_state.pth (CPU), as the fixtures record its size
FUTURE = 3600.0  # a writer's clock an hour ahead


def _run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _unmount(mount: Path, image: Path) -> None:
    if _run("umount", str(mount)).returncode != 0:
        _run("umount", "-l", str(mount))  # still busy: detach it from the tree now, free it when unused
    # `mount -o loop` sets autoclear, but a lazy unmount or a failed mount can leave the device attached.
    attached = _run("losetup", "-j", str(image)).stdout
    for line in attached.splitlines():
        _run("losetup", "-d", line.split(":", 1)[0])


@pytest.fixture
def coarse_fs(tmp_path: Path) -> Iterator[Path]:
    """A freshly made ext4 with 128-byte inodes, loop-mounted: its file times are whole seconds."""
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem image needs root")
    missing = [tool for tool in ("mkfs.ext4", "mount", "umount", "losetup") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    image = tmp_path / "coarse.ext4"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    made = _run("mkfs.ext4", "-q", "-F", "-I", "128", str(image))
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 -I 128 failed: {made.stderr.strip()}")
    mount = tmp_path / "coarse"
    mount.mkdir()
    mounted = _run("mount", "-o", "loop", str(image), str(mount))
    if mounted.returncode != 0:
        _unmount(mount, image)
        pytest.skip(f"`mount -o loop` failed: {mounted.stderr.strip()}")
    try:
        probe = mount / "probe"
        probe.write_bytes(b"x")
        ns = probe.stat().st_mtime_ns
        probe.unlink()
        if ns % 1_000_000_000:
            pytest.skip(f"ext4 with 128-byte inodes kept sub-second file times here (mtime {ns} ns)")
        yield mount
    finally:
        _unmount(mount, image)


def _lstats(directory: Path) -> list[os.stat_result]:
    return [directory.lstat(), *(p.lstat() for p in directory.rglob("*"))]


def _newest_change(directory: Path) -> float:
    return max(max(st.st_mtime, st.st_ctime) for st in _lstats(directory))


def _wait_past(when: float) -> None:
    wait_until(lambda: time.time() > when, when - time.time() + 5, f"the clock to pass {when:.3f}")


def _times_ns(directory: Path) -> list[int]:
    return [t for st in _lstats(directory) for t in (st.st_mtime_ns, st.st_ctime_ns)]


def _set_times_ahead(path: Path, seconds: float) -> None:
    """Give `path` (and everything below it) modification times `seconds` ahead, as a writer whose clock is
    ahead does. A fraction of a second is kept, so the times themselves say nothing of granularity."""
    when = time.time_ns() + int(seconds * 1e9) + 123_456_789
    for p in [*sorted(path.rglob("*"), reverse=True), path] if path.is_dir() else [path]:
        os.utime(p, ns=(when, when), follow_symlinks=False)


def _ckptkeeper(*args: str) -> subprocess.CompletedProcess[str]:
    return _run(sys.executable, "-m", "ckptkeeper", *args)


def _plan(root: Path, *args: str) -> dict[str, dict[str, Any]]:
    """`ckptkeeper plan ROOT ARGS --json`: checkpoint name -> its entry, for the one run below ROOT."""
    done = _ckptkeeper("plan", str(root), *args, "--json")
    assert done.returncode == 0, done.stderr
    (run,) = json.loads(done.stdout)["runs"]
    return {c["name"]: c for c in run["checkpoints"]}


def _prune(root: Path, *args: str) -> None:
    done = _ckptkeeper("prune", str(root), *args)
    assert done.returncode == 0, f"prune exited {done.returncode}:\n{done.stdout}{done.stderr}"


def _metrics_url(w: Watch) -> str:
    found = wait_until(lambda: re.search(r"serving metrics on (http://\S+)/metrics", w.log()), 15, w.describe)
    assert found is not None
    return found.group(1)


def _full_rescans(url: str) -> int:
    """How many full rescans (the first pass, periodic ones) the daemon has finished, by its own metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(r'^ckptkeeper_reconcile_duration_seconds_count\{scope="all"\} (\S+)$', text, re.MULTILINE)
    return int(float(found.group(1))) if found else 0


def _assert_no_failure_logged(w: Watch) -> None:
    text = w.log()
    assert "Traceback" not in text, w.describe()
    assert not [line for line in text.splitlines() if " ERROR " in line or " CRITICAL " in line], w.describe()


# ---- 6. coarse timestamps --------------------------------------------------------------------------------------
def _write_within_one_second(run: Path, step: int, parity: int) -> Path:
    """Checkpoint `step`, written by the simulated Trainer entirely within one second whose number has
    `parity` (odd: some time is odd, so the granularity judged is 1 s; even: all are, so it is 2 s)."""

    def early_in_such_a_second() -> bool:
        now = time.time()
        return int(now) % 2 == parity and now % 1 < 0.5

    for _ in range(5):
        wait_until(early_in_such_a_second, 5, "the first half of a second of the right parity")
        directory = SimulatedTrainer(run, SMALL).save(step, final=False)
        seconds = {t // 1_000_000_000 for t in _times_ns(directory)}
        if len(seconds) == 1 and seconds.pop() % 2 == parity:
            return directory
        shutil.rmtree(directory)  # the write crossed into the next second: again
    pytest.fail("could not write a checkpoint within one second in 5 tries")


@pytest.mark.parametrize(("parity", "granularity"), [(1, 1), (0, 2)], ids=["whole-seconds", "even-seconds"])
def test_whole_second_file_times_settle_a_granularity_later(coarse_fs: Path, parity: int, granularity: int) -> None:
    run = coarse_fs / "outputs" / "run"
    run.mkdir(parents=True)
    directory = _write_within_one_second(run, 2, parity)
    assert all(t % 1_000_000_000 == 0 for t in _times_ns(directory))
    newest = _newest_change(directory)  # the second the write happened in, rounded down

    just_now = read_checkpoint(directory, 2, now=time.time(), settle=2)
    assert not just_now.complete
    expected = rf"changed \d\.\d s ago \(settle 2 s \+ {granularity} s timestamp granularity\)"
    assert re.fullmatch(expected, just_now.incomplete_reason or ""), just_now.incomplete_reason

    settled_at = newest + 2 + granularity
    for now in (newest + 0.5, newest + 2.0, newest + 2.5, settled_at - 0.1):
        c = read_checkpoint(directory, 2, now=now, settle=2)
        assert not c.complete, f"counted as settled {now - newest:.1f} s after its whole-second time"
        assert c.incomplete_reason == (
            f"changed {now - newest:.1f} s ago (settle 2 s + {granularity} s timestamp granularity)"
        )
        assert c.settles_at == settled_at
    settled = read_checkpoint(directory, 2, now=settled_at, settle=2)
    assert settled.complete, settled.incomplete_reason
    assert settled.incomplete_reason is None


def publish_slowly(run: Path, staging: Path, finished: Path, gap: float, after_state: int) -> None:
    """The writer process of the next test: a simulated Trainer on `WORLD` ranks with no barrier before rank 0
    writes trainer_state.json. Each checkpoint is made in `staging` (the same filesystem) and moved into
    `run` file by file, so no file is ever seen half written: rank 0's files and the first ranks' RNG
    states, then trainer_state.json, then the last `after_state` ranks' RNG states, `gap` s apart (these
    ranks are slow). The next checkpoint follows at once. `finished/<step>` marks each one finished."""
    config = SimConfig(steps_per_epoch=4, epochs=1, save_steps=1, eval_strategy="no", metric_for_best_model=None)

    def publish(event: SaveEvent) -> None:
        source, target = event.path, run / event.path.name
        rng = random.Random(event.step)
        os.rename(source / "rng_state.pth", source / "rng_state_0.pth")
        for rank in range(1, WORLD):
            (source / f"rng_state_{rank}.pth").write_bytes(rng.randbytes(RNG_STATE_BYTES))
        rank0 = ["config.json", "model.safetensors", "training_args.bin", "optimizer.pt", "scheduler.pt"]
        early = [f"rng_state_{rank}.pth" for rank in range(WORLD - after_state)]
        late = [f"rng_state_{rank}.pth" for rank in range(WORLD - after_state, WORLD)]
        target.mkdir()
        for name in [*rank0, *early]:
            os.rename(source / name, target / name)
            time.sleep(0.05)
        os.rename(source / "trainer_state.json", target / "trainer_state.json")
        start = time.monotonic()
        for i, name in enumerate(late, 1):
            time.sleep(max(0.0, start + i * gap - time.monotonic()))  # on a schedule: gaps do not add up
            os.rename(source / name, target / name)
        source.rmdir()
        (finished / str(event.step)).touch()

    run.mkdir(parents=True, exist_ok=True)
    SimulatedTrainer(staging, config).train(on_save=publish)


def test_the_resume_point_survives_while_its_successor_is_still_written(
    coarse_fs: Path, watch: StartWatch, tmp_path: Path
) -> None:
    """Checkpoints 1..4, each moved in over ~2 s, its last five ranks' files 0.35 s apart after
    trainer_state.json. Whole-second times read up to 1 s old: by them alone, a checkpoint looks unchanged
    for the 1 s settle time while its next file is still 0.35 s away, and counts, and `last:1` removes the
    one before it, the only finished checkpoint to resume from. The five gaps start 0.35 s apart modulo a
    second, so whatever the phase, one of them straddles the moment whole-second times claim 1 s of quiet."""
    root = coarse_fs / "outputs"
    run = root / "run"
    staging = coarse_fs / "staging"  # the same filesystem as the run: files are moved in, never copied
    finished = tmp_path / "finished"
    for d in (root, staging, finished):
        d.mkdir()
    w = watch(root, "--keep", "last:1", "--settle", "1")
    w.wait_log("watching ")
    out = tmp_path / "writer.log"
    with open(out, "wb") as log:
        writer = subprocess.Popen(
            [sys.executable, __file__, str(run), str(staging), str(finished), "0.35", "5"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    samples, violations = 0, []
    try:
        deadline = time.monotonic() + 90
        while writer.poll() is None or steps(run) != [4]:
            # What is finished is read before the listing: it was finished before the listing was made.
            done = [int(n) for n in os.listdir(finished)]
            present = steps(run)
            samples += 1
            if done and max(done) not in present:
                violations.append(f"{time.time():.3f}: checkpoint-{max(done)} finished but gone; on disk: {present}")
            assert time.monotonic() < deadline, f"no end after 90 s; on disk: {present}\n{w.describe()}"
            if writer.poll() not in (None, 0):
                break
            time.sleep(0.001)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(10)
    assert writer.returncode == 0, out.read_text()
    assert not violations, (
        f"the resume point was removed while its successor was still written ({len(violations)} of {samples} "
        f"samples): first {violations[0]}\n{w.describe()}"
    )
    assert steps(run) == [4]  # the daemon did remove checkpoints 1-3, each once its successor was finished
    _assert_no_failure_logged(w)


# ---- 7. file times in the future ------------------------------------------------------------------------------
SKEW_WARNING = re.compile(r"run/checkpoint-8: its file times lie (\d+) s in the future")


def test_future_file_times_settle_by_what_was_seen_unchanged(tmp_path: Path) -> None:
    run = tmp_path / "run"
    simulate_run(run, SMALL)
    directory = run / "checkpoint-8"
    _set_times_ahead(directory, FUTURE)
    if all(t % 1_000_000_000 == 0 for t in _times_ns(directory)):
        pytest.skip("the temporary directory's filesystem keeps only whole-second times")
    cache = ContentCache()
    t0 = time.time()

    first = read_checkpoint(directory, 8, now=t0, settle=2, cache=cache)
    assert not first.complete
    assert first.times_in_future
    assert first.incomplete_reason == (
        "file times 3600 s in the future (a clock ahead?): waiting until seen unchanged for 2 s"
    )
    assert first.settles_at == t0 + 2
    assert not read_checkpoint(directory, 8, now=t0 + 1.9, settle=2, cache=cache).complete
    unchanged = read_checkpoint(directory, 8, now=t0 + 2, settle=2, cache=cache)
    assert unchanged.complete, unchanged.incomplete_reason

    # The writer (its clock still ahead) changes a file: the observed settle starts again from this look.
    with open(directory / "scheduler.pt", "ab") as f:
        f.write(b"\0" * 64)
    _set_times_ahead(directory / "scheduler.pt", FUTURE)
    changed = read_checkpoint(directory, 8, now=t0 + 2.5, settle=2, cache=cache)
    assert not changed.complete, "a checkpoint changed since its last look counted as settled"
    assert re.fullmatch(
        r"file times \d+ s in the future \(a clock ahead\?\): waiting until seen unchanged for 2 s",
        changed.incomplete_reason or "",
    ), changed.incomplete_reason
    assert changed.settles_at == t0 + 2.5 + 2  # first seen, as it is now, at t0 + 2.5
    assert not read_checkpoint(directory, 8, now=t0 + 4.4, settle=2, cache=cache).complete
    again = read_checkpoint(directory, 8, now=t0 + 4.5, settle=2, cache=cache)
    assert again.complete, again.incomplete_reason


def test_a_clock_behind_does_not_make_a_checkpoint_seen_changing_count_at_once(tmp_path: Path) -> None:
    """The mirror image of a clock ahead: the file times' clock (an NFS server's) an hour *behind*
    ckptkeeper's, given here as `now` an hour ahead of the real clock (a local filesystem cannot set a
    ctime back). A checkpoint that changed between two looks 0.1 s apart was being written in that very
    moment; its file times, an hour old, must not make it count as settled."""
    run = tmp_path / "run"
    simulate_run(run, SMALL)
    directory = run / "checkpoint-8"
    cache = ContentCache()
    t0 = time.time() + FUTURE
    assert read_checkpoint(directory, 8, now=t0, settle=2, cache=cache).complete  # an hour old by its times
    (directory / f"rng_state_{WORLD - 1}.pth").write_bytes(b"\1" * RNG_STATE_BYTES)  # a late rank's file
    changed = read_checkpoint(directory, 8, now=t0 + 0.1, settle=2, cache=cache)
    assert not changed.complete, "seen changing 0.1 s ago, counted as settled by file times an hour old"
    assert changed.incomplete_reason == "seen changing 0.0 s ago (settle 2 s)", changed.incomplete_reason
    assert changed.settles_at == t0 + 0.1 + 2
    assert not read_checkpoint(directory, 8, now=t0 + 2.0, settle=2, cache=cache).complete
    assert read_checkpoint(directory, 8, now=t0 + 2.1, settle=2, cache=cache).complete


def test_exit_when_done_does_not_wait_for_the_clock_to_catch_up(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    run = root / "run"
    simulate_run(run, SMALL)
    _set_times_ahead(run / "checkpoint-8", FUTURE)  # the final checkpoint: training stopped
    started = time.monotonic()
    w = watch(root, "--keep", "last:1", "--settle", "1", "--exit-when-done", "--rescan-interval", "1")
    assert w.wait_exit(30) == 0, w.describe()
    took = time.monotonic() - started
    assert took < 15, f"took {took:.1f} s to exit\n{w.describe()}"
    assert "run/checkpoint-8 kept: newest" in w.log(), w.describe()  # it counted, settled as seen
    assert 8 in steps(run) and not {2, 4} & set(steps(run))
    assert "exiting (--exit-when-done)" in w.log()
    warnings = SKEW_WARNING.findall(w.log())
    assert len(warnings) == 1, w.describe()
    assert 3500 <= int(warnings[0]) <= 3600, w.describe()
    _assert_no_failure_logged(w)


def test_future_file_times_are_said_once_across_rescans(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    run = root / "run"
    simulate_run(run, SMALL)
    _set_times_ahead(run / "checkpoint-8", FUTURE)
    w = watch(root, "--keep", "last:1", "--settle", "1", "--rescan-interval", "1", "--metrics-port", "0")
    url = _metrics_url(w)
    w.wait_log("run/checkpoint-8 kept: newest")  # it settled, by what the daemon saw
    seen = _full_rescans(url)
    wait_until(lambda: _full_rescans(url) >= seen + 3, 30, lambda: f"3 more full rescans\n{w.describe()}")
    assert len(SKEW_WARNING.findall(w.log())) == 1, w.describe()
    assert w.log().count("in the future") == 1, w.describe()
    _assert_no_failure_logged(w)
    assert w.terminate()[0] == 0


def test_one_look_calls_future_file_times_incomplete(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    run = root / "run"
    simulate_run(run, SMALL)
    _set_times_ahead(run / "checkpoint-8", FUTURE)
    _wait_past(_newest_change(run / "checkpoint-6") + 5)  # the others have settled by their times
    plan = _plan(root, "--keep", "last:1", "--settle", "5")
    assert not plan["checkpoint-8"]["complete"]
    found = re.fullmatch(
        r"file times (\d+) s in the future \(a clock ahead\?\): waiting until seen unchanged for 5 s",
        plan["checkpoint-8"]["incomplete_reason"] or "",
    )
    assert found, plan["checkpoint-8"]
    assert 3500 <= int(found.group(1)) <= 3600
    assert plan["checkpoint-8"]["decision"] == "keep"
    # the future one does not count for the rules
    assert "last 1/1" in [r["text"] for r in plan["checkpoint-6"]["reasons"]]
    _prune(root, "--keep", "last:1", "--settle", "5")
    assert steps(run) == [6, 8]


# ---- 10. multi-GPU saves: a rank's file still empty ------------------------------------------------------------
EMPTY_REASON = f"rng_state_{WORLD - 1}.pth is empty (a save in progress?)"


def _as_ranks(directory: Path, last_rank_empty: bool = True) -> None:
    """Make a single-process checkpoint look like one saved on `WORLD` ranks, as the Trainer writes it
    there (each rank its own rng_state_<rank>.pth); the last rank's file still empty if asked."""
    os.rename(directory / "rng_state.pth", directory / "rng_state_0.pth")
    for rank in range(1, WORLD):
        size = 0 if last_rank_empty and rank == WORLD - 1 else RNG_STATE_BYTES
        (directory / f"rng_state_{rank}.pth").write_bytes(b"\1" * size)


def test_an_empty_rank_file_keeps_a_checkpoint_incomplete_for_plan_and_prune(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    run = root / "run"
    simulate_run(run, SMALL)
    directory = run / "checkpoint-8"
    _as_ranks(directory)  # after trainer_state.json: there is no barrier before rank 0 writes it

    plan = _plan(root, "--keep", "last:1")
    assert not plan["checkpoint-8"]["complete"]
    assert plan["checkpoint-8"]["incomplete_reason"] == EMPTY_REASON
    assert plan["checkpoint-8"]["decision"] == "keep"
    assert plan["checkpoint-8"]["reasons"][0]["text"] == f"incomplete: {EMPTY_REASON}"
    assert "last 1/1" in [r["text"] for r in plan["checkpoint-6"]["reasons"]]  # checkpoint-8 does not count for last:1
    assert [plan[f"checkpoint-{s}"]["decision"] for s in (2, 4)] == ["delete", "delete"]
    _prune(root, "--keep", "last:1")
    assert steps(run) == [6, 8]

    # However long it stays so: no settle time makes an empty file complete.
    _wait_past(_newest_change(directory) + 1)
    assert _plan(root, "--keep", "last:1", "--settle", "1")["checkpoint-8"]["incomplete_reason"] == EMPTY_REASON
    _prune(root, "--keep", "last:1", "--settle", "1")
    assert steps(run) == [6, 8]

    (directory / f"rng_state_{WORLD - 1}.pth").write_bytes(b"\1" * RNG_STATE_BYTES)  # the last rank is done
    after = _plan(root, "--keep", "last:1", "--settle", "3")["checkpoint-8"]
    assert re.fullmatch(r"changed \d+\.\d s ago \(settle 3 s\)", after["incomplete_reason"] or ""), after
    _wait_past(_newest_change(directory) + 3)
    plan = _plan(root, "--keep", "last:1", "--settle", "3")
    assert plan["checkpoint-8"]["complete"], plan["checkpoint-8"]
    assert "last 1/1" in [r["text"] for r in plan["checkpoint-8"]["reasons"]]
    _prune(root, "--keep", "last:1", "--settle", "3")
    assert steps(run) == [8]


def test_the_daemon_waits_for_the_last_ranks_file(tmp_path: Path, watch: StartWatch) -> None:
    root = tmp_path / "outputs"
    run = root / "run"
    simulate_run(run, SMALL)
    staging = tmp_path / "staging"
    staging.mkdir()
    os.rename(run / "checkpoint-8", staging / "checkpoint-8")  # written anew below, on 8 ranks
    w = watch(root, "--keep", "last:1", "--settle", "1", "--rescan-interval", "1", "--metrics-port", "0", "-v")
    url = _metrics_url(w)
    wait_until(lambda: steps(run) == [6], 15, lambda: f"checkpoints 2 and 4 removed\n{w.describe()}")

    # Every rank but the last has written its file, and so has rank 0 its trainer_state.json; the last rank
    # has opened its file and written nothing yet. The directory is moved into place as it is, so the
    # daemon's first look sees just that.
    _as_ranks(staging / "checkpoint-8")
    with open(staging / "checkpoint-8" / f"rng_state_{WORLD - 1}.pth", "wb") as last_rank:
        os.rename(staging / "checkpoint-8", run / "checkpoint-8")
        # Well past the settle time, and the daemon has looked at the whole root since.
        _wait_past(_newest_change(run / "checkpoint-8") + 1.5)
        seen = _full_rescans(url)
        wait_until(lambda: _full_rescans(url) >= seen + 2, 30, lambda: f"2 more full rescans\n{w.describe()}")
        assert steps(run) == [6, 8], f"the resume point was removed\n{w.describe()}"
        assert "run/checkpoint-8 kept" not in w.log(), w.describe()
        assert f"run/checkpoint-8 waiting: incomplete: {EMPTY_REASON}" in w.log(), w.describe()
        last_rank.write(b"\1" * RNG_STATE_BYTES)
    wait_until(lambda: steps(run) == [8], 15, lambda: f"checkpoint-6 removed\n{w.describe()}")
    w.wait_log("run/checkpoint-8 kept: newest")
    _assert_no_failure_logged(w)
    assert w.terminate()[0] == 0


def _main(argv: Sequence[str]) -> None:
    run, staging, finished, gap, after_state = argv
    publish_slowly(Path(run), Path(staging), Path(finished), float(gap), int(after_state))


if __name__ == "__main__":
    _main(sys.argv[1:])
