"""Benchmark ckptkeeper's removal actions (delete, archive) against the shell doing the same.

    python -m benchmarks.bench_actions [--quick] [--json FILE] [--workdir DIR] [--only delete|archive|rename]
                                       [--reps N] [--keep-files]

3. Delete. ckptkeeper's real code path, as the daemon runs it: `actions.delete_checkpoint` with a StateDir
   (one rename of the checkpoint into the trash), then the daemon's Reaper thread empties that trash entry;
   the clock stops when the Reaper has finished (the bytes are gone). Baseline: `rm -rf` (a subprocess) of
   an identical tree. Two shapes: many small files, a few large ones.
4. Archive to another filesystem (a tmpfs, and an ext4 image loop-mounted from the benchmark's disk):
   `actions.archive_checkpoint` (copy under a temporary name, fsync, verify, rename into place, then delete
   the source as in 3) vs `cp -a SRC DST && rm -rf SRC`, and vs `cp -a SRC DST && sync -f DST && rm -rf SRC`
   (the same, durable: syncfs of the target's filesystem). Same-filesystem archive (one rename): a 1 MB
   checkpoint vs a 10 GB one (its optimizer.pt allocated with `fallocate`: real blocks, not sparse).

Trees come from the simulated trainer (ckptkeeper.simtrainer): one template per shape, copied with
`cp -a` into a fresh tree for every side of every repetition (copies, not hard links: deleting a hard link
frees no blocks). All trees of a repetition are built first; `os.sync()` runs before each timed step, so
the writeback of the copies is billed to no one; the order of the sides rotates with the repetition.
Figures: median [min, max] seconds over the repetitions, and the ratio ckptkeeper / baseline of each
repetition (paired), median [min, max]. Nothing is asserted. Needs root for the mounts (skipped otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Summary,
    filesystem_of,
    fmt,
    fmt_summary,
    load_average,
    machine_lines,
    markdown_table,
    summarize,
)
from ckptkeeper import actions
from ckptkeeper.reaper import Reaper
from ckptkeeper.simtrainer import SimConfig, simulate_run
from ckptkeeper.state import StateDir

TARGET_RATIO = 1.1  # delete and archive to another filesystem, vs the shell (from the issue; never asserted)
GiB = 1 << 30
MiB = 1 << 20


# ---- shapes ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    name: str
    shards: int  # model-0000i-of-0000n.safetensors files (1: model.safetensors)
    model_floats: int  # float32s per shard
    optimizer_bytes: int

    def config(self) -> SimConfig:
        # One step, saved, evaluated and logged: a single checkpoint-1 with every file the Trainer writes.
        return SimConfig(
            steps_per_epoch=1,
            epochs=1,
            save_steps=1,
            eval_steps=1,
            logging_steps=1,
            shards=self.shards,
            model_floats=self.model_floats,
            optimizer_bytes=self.optimizer_bytes,
        )


def shapes(quick: bool, scale: float = 1.0) -> tuple[Shape, Shape]:
    """Many small files (a sharded checkpoint of 3,000 ~1 KiB shards; --quick: 500), and a few large files
    (two model shards and optimizer.pt: 1 GiB; --quick: 64 MiB). `scale` shrinks the large one (little disk)."""
    if quick:
        return Shape("small files", 500, 256, 4096), Shape("large files", 2, 2 * MiB, 48 * MiB)
    floats = int(16 * MiB * scale)  # 64 MiB per shard
    return Shape("small files", 3000, 256, 4096), Shape("large files", 2, floats, int(896 * MiB * scale))


@dataclass
class Template:
    shape: Shape
    checkpoint: Path
    files: int
    size: int
    build_seconds: float

    def describe(self) -> str:
        return f"{self.files} files, {self.size / MiB:,.1f} MiB"


def build_template(base: Path, shape: Shape) -> Template:
    started = time.monotonic()
    out = base / shape.name.replace(" ", "-")
    simulate_run(out, shape.config())
    checkpoint = out / "checkpoint-1"
    files, size = tree_stats(checkpoint)
    return Template(shape, checkpoint, files, size, time.monotonic() - started)


def tree_stats(top: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            files += 1
            size += os.lstat(os.path.join(dirpath, name)).st_size
    return files, size


def fresh_tree(template: Path, root: Path) -> Path:
    """A copy of the template at ROOT/run/checkpoint-1 (`cp -a`: in-kernel copy, same layout)."""
    run = root / "run"
    run.mkdir(parents=True)
    checkpoint = run / template.name
    subprocess.run(["cp", "-a", "--", str(template), str(checkpoint)], check=True)
    return checkpoint


# ---- one comparison -------------------------------------------------------------------------------------
@dataclass
class Case:
    root: Path
    checkpoint: Path
    target: Path | None = None  # archive: where the copy goes

    @property
    def state(self) -> StateDir:
        return StateDir(self.root / "_ckptkeeper")


Act = Callable[[Case], None]


@dataclass
class Side:
    name: str
    act: Act


@dataclass
class Comparison:
    label: str
    shape: str
    tree: str
    sides: list[str]
    seconds: dict[str, list[float]] = field(default_factory=dict)  # side -> one figure per repetition
    phases: dict[str, list[float]] = field(default_factory=dict)  # ckptkeeper's archive, per phase

    def summary(self, side: str) -> Summary:
        return summarize(self.seconds[side])

    def ratios(self, side: str, baseline: str) -> list[float]:
        return [c / b for c, b in zip(self.seconds[side], self.seconds[baseline], strict=True)]


def compare(
    label: str,
    template: Template,
    sides: list[Side],
    reps: int,
    make_case: Callable[[str, int], Case],
    check: Callable[[Case], None],
    phase_log: dict[str, list[float]] | None = None,
) -> Comparison:
    result = Comparison(label, template.shape.name, template.describe(), [s.name for s in sides])
    for side in sides:
        result.seconds[side.name] = []
    for rep in range(reps):
        shift = rep % len(sides)
        order = sides[shift:] + sides[:shift]  # every side takes every position in turn
        cases = {side.name: make_case(side.name, rep) for side in order}  # all trees of the rep first
        for side in order:
            case = cases[side.name]
            os.sync()  # the copies' writeback (and the previous step's) is billed to no one
            started = time.perf_counter()
            side.act(case)
            result.seconds[side.name].append(time.perf_counter() - started)
            check(case)
            if case.target is not None:
                shutil.rmtree(case.target.parent.parent, ignore_errors=True)
            shutil.rmtree(case.root, ignore_errors=True)
    os.sync()
    if phase_log is not None:
        result.phases = {name: list(values) for name, values in phase_log.items()}
        phase_log.clear()
    return result


# ---- the sides ---------------------------------------------------------------------------------------------
class Daemonish:
    """ckptkeeper's side, as the daemon runs it: the action hands the trash entry to a Reaper thread, and
    the step is over when the Reaper has emptied it."""

    def __init__(self) -> None:
        self.reaper = Reaper()
        self.reaper.start()

    def delete(self, case: Case) -> None:
        actions.delete_checkpoint(case.root, case.checkpoint, case.state, dispose=self.reaper.dispose)
        self.reaper.queue.join()

    def archive(self, case: Case) -> None:
        assert case.target is not None
        outcome = actions.archive_checkpoint(
            case.root, case.checkpoint, case.target, case.state, dispose=self.reaper.dispose
        )
        self.reaper.queue.join()
        if outcome != "copied":
            raise RuntimeError(f"archive_checkpoint said {outcome!r}, expected 'copied'")

    def close(self) -> None:
        self.reaper.stop(60.0)


def rm_rf(case: Case) -> None:
    subprocess.run(["rm", "-rf", "--", str(case.checkpoint)], check=True)


def cp_rm(case: Case) -> None:
    assert case.target is not None
    script = 'cp -a -- "$1" "$2" && rm -rf -- "$1"'
    subprocess.run(["sh", "-c", script, "sh", str(case.checkpoint), str(case.target)], check=True)


def cp_sync_rm(case: Case) -> None:
    assert case.target is not None
    script = 'cp -a -- "$1" "$2" && sync -f "$2" && rm -rf -- "$1"'
    subprocess.run(["sh", "-c", script, "sh", str(case.checkpoint), str(case.target)], check=True)


def check_deleted(case: Case) -> None:
    if os.path.lexists(case.checkpoint):
        raise RuntimeError(f"{case.checkpoint} still exists")
    trash = case.state.trash
    if trash.exists() and any(trash.iterdir()):
        raise RuntimeError(f"the trash {trash} is not empty")


def checker_archived(template: Template) -> Callable[[Case], None]:
    def check(case: Case) -> None:
        check_deleted(case)
        assert case.target is not None
        if tree_stats(case.target) != (template.files, template.size):
            raise RuntimeError(f"{case.target} does not hold a whole copy")

    return check


@contextlib.contextmanager
def phase_timing(log: dict[str, list[float]]) -> Iterator[None]:
    """Time the phases of archive_checkpoint: copy (actions._copy_tree: the copy, each chunk read back and
    compared where the target is not served from this kernel's page cache, every fsync), verify
    (actions.verify_copy), remove source (actions.delete_checkpoint until the Reaper is done, measured by the
    caller as the rest). The wrappers cost microseconds per call."""
    patched: list[tuple[Any, str, Any]] = []
    depth = [0]

    def wrap(owner: Any, attr: str, phase: str) -> None:
        original = getattr(owner, attr, None)
        if original is None:
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            depth[0] += 1
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    log.setdefault(phase, []).append(time.perf_counter() - started)

        setattr(owner, attr, timed)
        patched.append((owner, attr, original))

    wrap(actions, "_copy_tree", "copy, compare, fsync")
    wrap(actions, "verify_copy", "verify")
    try:
        yield
    finally:
        for owner, attr, original in reversed(patched):
            setattr(owner, attr, original)


# ---- 3. delete -----------------------------------------------------------------------------------------------
def measure_delete(work: Path, template: Template, reps: int, ours: Daemonish) -> Comparison:
    def make_case(side: str, rep: int) -> Case:
        root = work / f"delete-{side.split(maxsplit=1)[0]}-{rep}"
        return Case(root, fresh_tree(template.checkpoint, root))

    sides = [Side("ckptkeeper", ours.delete), Side("rm -rf", rm_rf)]
    return compare("delete", template, sides, reps, make_case, check_deleted)


# ---- 4. archive to another filesystem ----------------------------------------------------------------------------
def measure_archive(
    work: Path, destination: Path, fs_name: str, template: Template, reps: int, ours: Daemonish
) -> Comparison:
    def make_case(side: str, rep: int) -> Case:
        tag = {"ckptkeeper": "ours", "cp -a && rm -rf": "cp", "cp -a && sync -f && rm -rf": "cpsync"}[side]
        root = work / f"archive-{tag}-{rep}"
        target = destination / f"archive-{tag}-{rep}" / "run" / "checkpoint-1"
        target.parent.mkdir(parents=True)  # the shell's `cp -a` needs it; ckptkeeper would create it
        return Case(root, fresh_tree(template.checkpoint, root), target)

    log: dict[str, list[float]] = {}
    sides = [
        Side("ckptkeeper", ours.archive),
        Side("cp -a && rm -rf", cp_rm),
        Side("cp -a && sync -f && rm -rf", cp_sync_rm),
    ]
    with phase_timing(log):
        return compare(f"archive to {fs_name}", template, sides, reps, make_case, checker_archived(template), log)


@contextlib.contextmanager
def tmpfs_mount(path: Path, size: int) -> Iterator[str | None]:
    """Mount a tmpfs on `path`; yields None, or why it could not."""
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        yield f"mount -t tmpfs failed: {done.stderr.strip() or done.returncode}"
        return
    try:
        yield None
    finally:
        unmount(path)


@contextlib.contextmanager
def ext4_image_mount(image: Path, path: Path, size: int) -> Iterator[str | None]:
    """An ext4 filesystem in a file on the benchmark's disk, loop-mounted on `path` (inode tables and journal
    written by mkfs, so no lazy-init thread writes behind the benchmark's back); yields None or why not."""
    path.mkdir()
    steps = [
        ["truncate", "-s", str(size), str(image)],
        ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)],
        ["mount", "-o", "loop", str(image), str(path)],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, check=False)
        except OSError as e:
            yield f"`{step[0]}` failed: {e}"
            image.unlink(missing_ok=True)
            return
        if done.returncode != 0:
            yield f"`{' '.join(step[:2])} ...` failed: {done.stderr.strip() or done.returncode}"
            image.unlink(missing_ok=True)
            return
    try:
        yield None
    finally:
        unmount(path)  # `mount -o loop` set autoclear: the loop device goes with the mount
        image.unlink(missing_ok=True)


def unmount(path: Path) -> None:
    for attempt in range(50):
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.1 * (attempt + 1) if attempt < 5 else 0.5)
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


# ---- same-filesystem archive: a rename ---------------------------------------------------------------------------
@dataclass
class RenameResult:
    small_bytes: int
    big_bytes: int
    big_allocated: int
    note: str
    seconds: dict[str, list[float]]

    def ratios(self) -> list[float]:
        return [b / s for b, s in zip(self.seconds["big"], self.seconds["small"], strict=True)]


def big_size(work: Path, quick: bool) -> tuple[int, str]:
    """10 GiB (--quick: 1 GiB), less when the disk has under 30 GiB free."""
    wanted = GiB if quick else 10 * GiB
    free = shutil.disk_usage(work).free
    if quick:
        note = "--quick: 1 GiB instead of 10 GiB"
        return (wanted, note) if free >= 30 * GiB else (min(wanted, max(64 * MiB, free // 20)), note + ", less (disk)")
    if free >= 30 * GiB:
        return wanted, ""
    size = max(64 * MiB, (free // 10) // MiB * MiB)
    return size, (
        f"NOTE: only {free / GiB:.1f} GiB free on the benchmark's disk (under 30 GiB): the big checkpoint is "
        f"{size / GiB:.2f} GiB instead of 10 GiB"
    )


def measure_rename(work: Path, reps: int, quick: bool) -> RenameResult:
    """archive_checkpoint to a directory on the same filesystem (one rename), 1 MB vs 10 GB checkpoints; the
    checkpoint is renamed back (untimed) after each step."""
    size, note = big_size(work, quick)
    root = work / "rename-root"
    small_cfg = SimConfig(steps_per_epoch=1, epochs=1, save_steps=1, eval_steps=1, logging_steps=1)
    simulate_run(root / "run-1mb", replace(small_cfg, optimizer_bytes=MiB - 16 * 1024))
    simulate_run(root / "run-big", small_cfg)
    big_optimizer = root / "run-big" / "checkpoint-1" / "optimizer.pt"
    subprocess.run(["fallocate", "-l", str(size), str(big_optimizer)], check=True)
    allocated = os.stat(big_optimizer).st_blocks * 512
    checkpoints = {"small": root / "run-1mb" / "checkpoint-1", "big": root / "run-big" / "checkpoint-1"}
    archive = work / "rename-archive"
    state = StateDir(root / "_ckptkeeper")
    seconds: dict[str, list[float]] = {"small": [], "big": []}
    try:
        for rep in range(reps):
            for which in ("small", "big") if rep % 2 == 0 else ("big", "small"):
                source = checkpoints[which]
                target = archive / source.parent.name / source.name
                os.sync()
                started = time.perf_counter()
                outcome = actions.archive_checkpoint(root, source, target, state)
                seconds[which].append(time.perf_counter() - started)
                if outcome != "renamed":
                    raise RuntimeError(f"same-filesystem archive said {outcome!r}, expected 'renamed'")
                os.rename(target, source)
        return RenameResult(
            tree_stats(checkpoints["small"])[1], tree_stats(checkpoints["big"])[1], allocated, note, seconds
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(archive, ignore_errors=True)


# ---- report ----------------------------------------------------------------------------------------------------
def ratio_cell(values: list[float]) -> str:
    return fmt_summary(summarize(values), 2)


def met(values: list[float]) -> str:
    median = summarize(values).median
    return "met" if median <= TARGET_RATIO else "**missed**"


def delete_table(results: list[Comparison]) -> str:
    rows = []
    for r in results:
        ratios = r.ratios("ckptkeeper", "rm -rf")
        rows.append(
            [
                f"{r.shape} ({r.tree})",
                fmt_summary(r.summary("ckptkeeper")),
                fmt_summary(r.summary("rm -rf")),
                ratio_cell(ratios),
                f"≤ {TARGET_RATIO:g}: {met(ratios)}",
            ]
        )
    headers = ["shape", "ckptkeeper delete, s", "rm -rf, s", "ratio (paired)", "target"]
    return markdown_table(headers, rows)


def archive_table(results: list[Comparison]) -> str:
    rows = []
    for r in results:
        plain = r.ratios("ckptkeeper", "cp -a && rm -rf")
        durable = r.ratios("ckptkeeper", "cp -a && sync -f && rm -rf")
        rows.append(
            [
                r.label.removeprefix("archive to "),
                f"{r.shape} ({r.tree})",
                fmt_summary(r.summary("ckptkeeper")),
                fmt_summary(r.summary("cp -a && rm -rf")),
                ratio_cell(plain),
                fmt_summary(r.summary("cp -a && sync -f && rm -rf")),
                ratio_cell(durable),
                f"≤ {TARGET_RATIO:g} vs cp -a: {met(plain)}",
            ]
        )
    headers = [
        "target filesystem",
        "shape",
        "ckptkeeper archive, s",
        "cp -a && rm -rf, s",
        "ratio",
        "cp -a && sync -f && rm -rf, s",
        "ratio",
        "target",
    ]
    return markdown_table(headers, rows)


def phase_lines(results: list[Comparison]) -> list[str]:
    lines = []
    for r in results:
        if not r.phases:
            continue
        total = r.summary("ckptkeeper").median
        known = {name: summarize(values).median for name, values in r.phases.items()}
        parts = [f"{name} {fmt(value)} s" for name, value in known.items()]
        rest = total - sum(known.values())
        parts.append(f"rest (guard, rename into place, delete the source) {fmt(rest)} s")
        lines.append(f"- {r.label}, {r.shape}: ckptkeeper's median {fmt(total)} s = " + ", ".join(parts))
    return lines


def rename_table(r: RenameResult) -> str:
    small, big = summarize(r.seconds["small"]).scaled(1000), summarize(r.seconds["big"]).scaled(1000)
    rows = [
        [f"{r.small_bytes / MiB:.2f} MiB", fmt_summary(small, 3), ""],
        [
            f"{r.big_bytes / GiB:.2f} GiB ({r.big_allocated / GiB:.2f} GiB allocated)",
            fmt_summary(big, 3),
            f"{ratio_cell(r.ratios())} (ratio of medians {big.median / small.median:.2f})",
        ],
    ]
    return markdown_table(["checkpoint", "archive (one rename), ms", "big / small (paired)"], rows)


# ---- main ---------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_actions", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions, small trees (well under a minute)")
    parser.add_argument("--workdir", type=Path, help="where to build the trees (default: a new temp dir)")
    parser.add_argument("--json", type=Path, help="also write every raw figure to this file")
    parser.add_argument("--only", choices=["delete", "archive", "rename"], help="run one part only")
    parser.add_argument("--reps", type=int, help="repetitions (default 5; --quick: 3)")
    parser.add_argument("--keep-files", action="store_true", help="leave the work directory (the templates) behind")
    return parser.parse_args(argv)


def print_header(quick: bool, work: Path, free: int, scale: float) -> None:
    print("# ckptkeeper removal actions benchmark" + (" (--quick)" if quick else ""))
    print()
    print("Machine:")
    print("\n".join(machine_lines(work)))
    print(f"- free on the benchmark's disk: {free / GiB:.1f} GiB")
    print()
    if scale < 1.0:
        print(f"NOTE: under 20 GiB free: the large-file shape is scaled down to {scale:.2f} of its size.\n")
    sys.stdout.flush()


def delete_part(trees: Path, templates: list[Template], reps: int, ours: Daemonish) -> list[dict[str, Any]]:
    """Part 3: measure and report; the raw figures."""
    part = time.monotonic()
    deletes = [measure_delete(trees, t, reps, ours) for t in templates]
    print(f"## 3. Delete: ckptkeeper vs `rm -rf` ({reps} repetitions, seconds)")
    print()
    print(delete_table(deletes))
    print()
    print(
        "- ckptkeeper: delete_checkpoint (guard, one rename into ROOT/_ckptkeeper/trash) + the daemon's "
        "Reaper thread emptying the entry (shutil.rmtree), until it is done; rm -rf: a subprocess"
    )
    print(f"- trees on {filesystem_of(trees)}; part took {time.monotonic() - part:.0f} s")
    print()
    sys.stdout.flush()
    return [asdict(r) for r in deletes]


def measure_archives(
    work: Path, trees: Path, templates: list[Template], reps: int, ours: Daemonish
) -> tuple[list[Comparison], list[str]]:
    """Part 4's figures: to a tmpfs and to a loop-mounted ext4 image; and why either was skipped."""
    archives: list[Comparison] = []
    skipped: list[str] = []
    mounts = work / "mnt"
    mounts.mkdir()
    big = max(t.size for t in templates)
    with tmpfs_mount(mounts / "tmpfs", 2 * big + 256 * MiB) as problem:
        if problem:
            skipped.append(f"tmpfs: {problem}")
        else:
            dest = mounts / "tmpfs"
            archives += [measure_archive(trees, dest, "tmpfs", t, reps, ours) for t in templates]
    image_size = max(512 * MiB, 3 * big)
    with ext4_image_mount(work / "ext4.img", mounts / "ext4", image_size) as problem:
        if problem:
            skipped.append(f"ext4 on another filesystem (loop-mounted image): {problem}")
        else:
            dest = mounts / "ext4"
            name = f"ext4 (loop, {image_size / GiB:.1f} GiB image)"
            archives += [measure_archive(trees, dest, name, t, reps, ours) for t in templates]
    return archives, skipped


def archive_part(
    work: Path, trees: Path, templates: list[Template], reps: int, ours: Daemonish
) -> tuple[list[Comparison], list[str]]:
    """Part 4: measure and report; the figures and the skipped targets."""
    part = time.monotonic()
    archives, skipped = measure_archives(work, trees, templates, reps, ours)
    print(f"## 4. Archive to another filesystem: ckptkeeper vs `cp -a` ({reps} repetitions, seconds)")
    print()
    if archives:
        print(archive_table(archives))
        print()
    for line in skipped:
        print(f"- SKIPPED {line}")
    print(
        "- ckptkeeper: archive_checkpoint (copy under a temporary name, each chunk read back and compared "
        "with the source's on FUSE/NFS/SMB (not on tmpfs or ext4), fsync every file and directory, verify "
        "names/kinds/sizes/safetensors headers, rename into place, then delete the source as in 3); "
        "`sync -f DST` is syncfs(2) of the target's filesystem"
    )
    print(*phase_lines(archives), sep="\n")
    print(f"- sources on {filesystem_of(trees)}; part took {time.monotonic() - part:.0f} s")
    print()
    sys.stdout.flush()
    return archives, skipped


def rename_part(work: Path, reps: int, quick: bool) -> dict[str, Any]:
    """Part 4b: measure and report; the raw figures."""
    part = time.monotonic()
    rename_reps = max(reps, 5 if quick else 11)
    renamed = measure_rename(work, rename_reps, quick)
    print(f"## 4b. Archive on the same filesystem: one rename, small vs big ({rename_reps} repetitions)")
    print()
    print(rename_table(renamed))
    print()
    if renamed.note:
        print(f"- {renamed.note}")
    print(f"- on {filesystem_of(work)}; part took {time.monotonic() - part:.0f} s")
    print()
    return {**asdict(renamed), "ratios": renamed.ratios()}


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    reps = opts.reps or (3 if opts.quick else 5)
    work = Path(tempfile.mkdtemp(prefix="ckptkeeper-bench-actions-", dir=opts.workdir))
    started = time.monotonic()
    load_start = load_average()
    free = shutil.disk_usage(work).free
    # The large shape needs ~5 copies on the disk at once (template, 3 sources, the ext4 image's copy).
    scale = 1.0 if opts.quick or free >= 20 * GiB else max(0.05, free / (20 * GiB))
    small, large = shapes(opts.quick, scale)
    print_header(opts.quick, work, free, scale)
    raw: dict[str, Any] = {"quick": opts.quick, "reps": reps, "machine": machine_lines(work)}
    ours = Daemonish()
    try:
        templates = [build_template(work / "templates", shape) for shape in (small, large)]
        raw["shapes"] = [{**asdict(t.shape), "files": t.files, "bytes": t.size} for t in templates]
        trees = work / "trees"
        trees.mkdir()
        if opts.only in (None, "delete"):
            raw["delete"] = delete_part(trees, templates, reps, ours)
        if opts.only in (None, "archive"):
            archives, skipped = archive_part(work, trees, templates, reps, ours)
            raw["archive"] = [asdict(r) for r in archives]
            raw["archive_skipped"] = skipped
        if opts.only in (None, "rename"):
            raw["rename"] = rename_part(work, reps, opts.quick)
        print(f"Total benchmark time: {time.monotonic() - started:.0f} s")
        print(f"Load average (1, 5, 15 min) at the start: {load_start}; at the end: {load_average()}")
        if opts.json:
            opts.json.write_text(json.dumps(raw, indent=2) + "\n")
    finally:
        ours.close()
        if opts.keep_files:
            print(f"(files kept in {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
