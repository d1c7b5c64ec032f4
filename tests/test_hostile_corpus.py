"""A corpus of hostile inputs, each run end to end through the real CLI (`ckptkeeper plan ROOT --keep K --json`,
the text plan, `ckptkeeper prune` and a second plan), with the exact decision expected for every checkpoint.

Every case builds a tree below `<tmp>/root` (and, for links, targets in `<tmp>/outside`) and asserts:
- the plan's decision for every checkpoint: `keep`, `delete` or `incomplete` (kept, with its reason), and that
  nothing else is planned (names that are not checkpoints never appear);
- the key phrase of a reason or of the command's output;
- `plan` changes nothing at all below `<tmp>` (not even the state directory);
- `prune` removes exactly the checkpoints the plan deletes: every other file, link and directory below `<tmp>`
  (outside targets included) keeps its kind, mode, size, mtime and content, and kept checkpoint directories
  keep their mtime; only the state directory is new;
- a second plan after the prune removes nothing (the kept set is a fixed point).

Most cases run in-process through click's CliRunner; those marked `process` run as `python -m ckptkeeper`
with a strict UTF-8 stdout and a 4 GiB address-space limit. `CASES` is the corpus as data:
`python tests/corpus_table.py` prints it as a markdown table.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ckptkeeper.cli import main
from ckptkeeper.integrity import encode_safetensors
from ckptkeeper.state import ROOT_LOCK_NAME
from ckptkeeper.units import count

Build = Callable[[Path], None]  # gets the root; the root's parent holds `outside/`
Tree = dict[str, tuple[object, ...]]

KEEP, DELETE, INCOMPLETE = "keep", "delete", "incomplete"
INDEX = "model.safetensors.index.json"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@dataclass(frozen=True)
class Case:
    name: str
    what: str  # the hostile input, in words (for the table)
    build: Build
    keep: str
    # "<run>/<checkpoint>" ("<checkpoint>" for the root's own) -> keep | delete | incomplete; exactly these
    expect: Mapping[str, str]
    # the same keys -> a phrase of that checkpoint's reasons; "output" -> a phrase of the text plan's output
    phrases: Mapping[str, str] = field(default_factory=dict)
    exit_code: int = 0  # of plan and of prune
    arg: Callable[[Path], Path] | None = None  # the ROOT argument, from the root (default: the root)
    process: bool = False  # run plan --json and prune as `python -m ckptkeeper`
    intact: tuple[str, ...] = ()  # paths below <tmp> (outside targets) that must survive the prune unchanged
    ignored: tuple[str, ...] = ()  # paths below the root that look like checkpoints or runs but are not
    defect: str | None = None  # a known defect: the case is xfail(strict=True)
    needs_root: bool = False
    flags: Callable[[Path], list[str]] | None = None  # more arguments of plan and prune, from the root


# --- building blocks -----------------------------------------------------------------------------------------

MODEL = encode_safetensors({"w": ("float32", [2, 2], bytes(16)), "b": ("int64", [1], bytes(8))}, {"format": "pt"})


def trainer_state(
    step: int,
    epoch: object = 1.0,
    loss: object = None,
    best: object = None,
    history: bool = True,
    **extra: object,
) -> dict[str, Any]:
    """A trainer_state.json document as the Trainer writes it (keys sorted, a train and an eval entry)."""
    doc: dict[str, Any] = {
        "best_global_step": best,
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": epoch,
        "eval_steps": 10,
        "global_step": step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "logging_steps": 10,
        "max_steps": 1000,
        "num_train_epochs": 10,
        "save_steps": 10,
        "stateful_callbacks": {
            "TrainerControl": {"args": {"should_training_stop": False, "should_save": True}, "attributes": {}}
        },
        "total_flos": 12345.0,
        "train_batch_size": 8,
        "trial_name": None,
        "trial_params": None,
    }
    if history:
        entries: list[dict[str, Any]] = [
            {"epoch": epoch, "grad_norm": 1.5, "learning_rate": 5e-05, "loss": 0.9, "step": step}
        ]
        if loss is not None:
            entries.append({"epoch": epoch, "eval_loss": loss, "eval_runtime": 0.1, "step": step})
        doc["log_history"] = entries
    doc.update(extra)
    return doc


def encode_state(doc: object) -> bytes:
    # Python's json writes NaN/Infinity as bare tokens, as the Trainer does.
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def checkpoint(run: Path, step: int, state: bytes | None = None, name: str | None = None, **doc: Any) -> Path:
    directory = run / (name or f"checkpoint-{step}")
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "tiny"}\n')
    (directory / "model.safetensors").write_bytes(MODEL)
    (directory / "training_args.bin").write_bytes(b"\x80\x04args")
    (directory / "trainer_state.json").write_bytes(
        state if state is not None else encode_state(trainer_state(step, **doc))
    )
    return directory


def raw_safetensors(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def safetensors_bytes(header: object, data: bytes) -> bytes:
    return raw_safetensors(json.dumps(header).encode(), data)


def write(path: Path, data: bytes | str) -> None:
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)


def outside(root: Path) -> Path:
    return root.parent / "outside"


STD_EPOCHS = {10: 1.0, 20: 2.0, 30: 3.0, 40: 4.0}
STD_LOSSES = {10: 0.5, 20: 0.4, 30: 0.3, 40: 0.2}


def standard(mutate: Callable[[Path], None], epochs: Mapping[int, object] = STD_EPOCHS) -> Build:
    """root/run with the good checkpoints 10, 20, 30 and checkpoint-40, which `mutate` makes hostile."""

    def build(root: Path) -> None:
        for step in (10, 20, 30, 40):
            checkpoint(root / "run", step, epoch=epochs[step], loss=STD_LOSSES[step])
        mutate(root / "run" / "checkpoint-40")

    return build


def std_expect(forty: str) -> dict[str, str]:
    if forty == INCOMPLETE:
        return {
            "run/checkpoint-10": DELETE,
            "run/checkpoint-20": DELETE,
            "run/checkpoint-30": KEEP,
            "run/checkpoint-40": INCOMPLETE,
        }
    return {
        "run/checkpoint-10": DELETE,
        "run/checkpoint-20": DELETE,
        "run/checkpoint-30": DELETE,
        "run/checkpoint-40": KEEP,
    }


def broken40(name: str, what: str, mutate: Callable[[Path], None], phrase: str, **kw: Any) -> Case:
    """checkpoint-40 is made incomplete: with last:1 it is kept as incomplete, 30 is the newest complete."""
    return Case(name, what, standard(mutate), "last:1", std_expect(INCOMPLETE), {"run/checkpoint-40": phrase}, **kw)


def fine40(name: str, what: str, mutate: Callable[[Path], None], **kw: Any) -> Case:
    """checkpoint-40 is odd but complete: with last:1 it is the one kept, 10, 20 and 30 go."""
    return Case(name, what, standard(mutate), "last:1", std_expect(KEEP), {"run/checkpoint-40": "last 1/1"}, **kw)


def set_state(data: bytes | Callable[[], bytes]) -> Callable[[Path], None]:
    def mutate(directory: Path) -> None:
        write(directory / "trainer_state.json", data() if callable(data) else data)

    return mutate


def state_with(**doc: Any) -> Callable[[Path], None]:
    return set_state(encode_state(trainer_state(40, **{"epoch": 4.0, "loss": 0.2, **doc})))


def set_file(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda directory: write(directory / name, data)


def deep_tree(top: Path, levels: int) -> None:
    """`top/ddd.../ddd.../...` with names of 250 bytes: from 17 levels on, longer than PATH_MAX (4096) allows
    to name in one path (made through directory fds)."""
    name = "d" * 250
    fd = os.open(top, os.O_RDONLY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)


def sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


# --- trainer_state.json --------------------------------------------------------------------------------------

FULL_STATE = encode_state(trainer_state(40, epoch=4.0, loss=0.2))
N = len(FULL_STATE)
CUTS = [1, 2, 16, 100, N // 4, N // 2, 3 * N // 4, N - 3, N - 2]


def _nan_metrics(root: Path) -> None:
    for step, loss in ((10, 0.5), (20, 0.3), (30, float("nan")), (40, 0.4)):
        checkpoint(root / "run", step, epoch=step / 10, loss=loss)


def _infinite_metrics(root: Path) -> None:
    for step, loss in ((10, 0.5), (20, float("-inf")), (30, float("inf")), (40, 0.4)):
        checkpoint(root / "run", step, epoch=step / 10, loss=loss)


def _string_metric(root: Path) -> None:
    for step, loss in ((10, 0.5), (20, "0.01"), (30, True), (40, 0.4)):
        checkpoint(root / "run", step, epoch=step / 10, loss=loss)


def _duplicate_metric_key(root: Path) -> None:
    checkpoint(root / "run", 10, epoch=1.0, loss=0.5)
    # At step 20 the eval entry says 0.01, then 0.9: the last value wins, as with every JSON reader.
    text = encode_state(trainer_state(20, epoch=2.0, loss=0.777)).decode()
    assert text.count('"eval_loss": 0.777') == 1
    checkpoint(
        root / "run", 20, state=text.replace('"eval_loss": 0.777', '"eval_loss": 0.01, "eval_loss": 0.9').encode()
    )
    for step, loss in ((30, 0.3), (40, 0.4)):  # written in step order, as a Trainer does
        checkpoint(root / "run", step, epoch=step / 10, loss=loss)


def _integer_metric_beyond_floats(root: Path) -> None:
    for step, loss in ((10, 0.5), (20, 10**400), (30, 0.3), (40, 0.4)):
        checkpoint(root / "run", step, epoch=step / 10, loss=loss)


def _float_literal_beyond_range_metric(root: Path) -> None:
    for step, loss in ((10, 0.5), (20, 0.777), (30, 0.3), (40, 0.4)):  # written in step order: one run
        state = encode_state(trainer_state(step, epoch=step / 10, loss=loss))
        checkpoint(root / "run", step, state=state.replace(b'"eval_loss": 0.777', b'"eval_loss": 1e999'))
    assert b'"eval_loss": 1e999' in (root / "run" / "checkpoint-20" / "trainer_state.json").read_bytes()


def _no_eval_anywhere(root: Path) -> None:
    for step in (10, 20, 30):
        checkpoint(root / "run", step, epoch=step / 10, history=False)


def _huge_state(directory: Path) -> None:
    """A 100 MB trainer_state.json: a valid document with a 100 MB value under an unknown key."""
    doc = trainer_state(40, epoch=4.0, loss=0.2)
    head = encode_state(doc)[:-2]  # without the closing "}\n"
    with open(directory / "trainer_state.json", "wb") as f:
        f.write(head + b',\n  "zz_padding": "')
        chunk = b"x" * (1 << 20)
        f.writelines(chunk for _ in range(100))
        f.write(b'"\n}\n')


def _deep_state() -> bytes:
    depth = 100_000
    return b'{"global_step": 40, "epoch": 4.0, "unknown": ' + b"[" * depth + b"]" * depth + b"}"


def _fifo(name: str) -> Callable[[Path], None]:
    def mutate(directory: Path) -> None:
        (directory / name).unlink(missing_ok=True)
        os.mkfifo(directory / name)

    return mutate


def _device(name: str) -> Callable[[Path], None]:
    """`name` becomes a character device node: the one /dev/zero is (1, 5), an endless read."""

    def mutate(directory: Path) -> None:
        (directory / name).unlink(missing_ok=True)
        try:
            os.mknod(directory / name, stat.S_IFCHR | 0o644, os.makedev(1, 5))
        except PermissionError:
            pytest.skip("cannot make a device node here (needs CAP_MKNOD)")

    return mutate


def _link(name: str, target: Callable[[Path], Path | str]) -> Callable[[Path], None]:
    def mutate(directory: Path) -> None:
        (directory / name).unlink(missing_ok=True)
        (directory / name).symlink_to(target(directory))

    return mutate


def _outside_state(directory: Path) -> Path:
    target = outside(directory.parent.parent) / "trainer_state.json"
    target.write_bytes(FULL_STATE)
    return target


def _state_dir(directory: Path) -> None:
    (directory / "trainer_state.json").unlink()
    (directory / "trainer_state.json").mkdir()


def _empty_checkpoint(directory: Path) -> None:
    shutil.rmtree(directory)
    directory.mkdir()


def _sparse_state(directory: Path) -> None:
    sparse(directory / "trainer_state.json", 64 << 30)


TRAINER_STATE_CASES = [
    broken40("ts-empty", "trainer_state.json of 0 bytes", set_state(b""), "trainer_state.json is empty"),
    broken40("ts-blank", "trainer_state.json of whitespace only", set_state(b" \n\t\n"), "trainer_state.json is empty"),
    *[
        broken40(
            f"ts-cut-at-{cut}",
            f"a Trainer's trainer_state.json cut after {cut} of {N} bytes",
            set_state(FULL_STATE[:cut]),
            "trainer_state.json is not valid JSON",
        )
        for cut in CUTS
    ],
    fine40(
        "ts-cut-only-newline",
        f"trainer_state.json cut after {N - 1} of {N} bytes (only the final newline lost)",
        set_state(FULL_STATE[:-1]),
    ),
    broken40(
        "ts-array", "trainer_state.json holds a JSON array", set_state(b"[1, 2]"), "holds a JSON array, not an object"
    ),
    broken40(
        "ts-string",
        "trainer_state.json holds a JSON string",
        set_state(b'"checkpoint"'),
        "holds a JSON string, not an object",
    ),
    broken40(
        "ts-number", "trainer_state.json holds a JSON number", set_state(b"40"), "holds a JSON number, not an object"
    ),
    broken40("ts-null", "trainer_state.json holds JSON null", set_state(b"null"), "holds a JSON null, not an object"),
    broken40(
        "ts-bool", "trainer_state.json holds JSON true", set_state(b"true"), "holds a JSON boolean, not an object"
    ),
    Case(
        "ts-nan-metric",
        "eval_loss NaN (bare token) at step 30",
        _nan_metrics,
        "best:1",
        {
            "run/checkpoint-10": DELETE,
            "run/checkpoint-20": KEEP,
            "run/checkpoint-30": DELETE,
            "run/checkpoint-40": KEEP,
        },
        {"run/checkpoint-20": "best eval_loss=0.3000 (1/1)", "run/checkpoint-40": "protected: newest"},
    ),
    Case(
        "ts-infinite-metrics",
        "eval_loss -Infinity at step 20 and Infinity at step 30",
        _infinite_metrics,
        "best:1",
        {
            "run/checkpoint-10": DELETE,
            "run/checkpoint-20": KEEP,
            "run/checkpoint-30": DELETE,
            "run/checkpoint-40": KEEP,
        },
        {"run/checkpoint-20": "best eval_loss=-inf (1/1)", "run/checkpoint-40": "protected: newest"},
    ),
    Case(
        "ts-string-and-bool-metric",
        'eval_loss "0.01" (a string) at step 20 and true at step 30: not metrics',
        _string_metric,
        "best:1",
        {
            "run/checkpoint-10": DELETE,
            "run/checkpoint-20": DELETE,
            "run/checkpoint-30": DELETE,
            "run/checkpoint-40": KEEP,
        },
        {"run/checkpoint-40": "best eval_loss=0.4000 (1/1), protected: newest"},
    ),
    Case(
        "ts-duplicate-metric-key",
        "an eval entry with eval_loss twice (0.01, then 0.9): the last wins",
        _duplicate_metric_key,
        "best:1",
        {
            "run/checkpoint-10": DELETE,
            "run/checkpoint-20": DELETE,
            "run/checkpoint-30": KEEP,
            "run/checkpoint-40": KEEP,
        },
        {"run/checkpoint-30": "best eval_loss=0.3000 (1/1)"},
    ),
    Case(
        "ts-metric-401-digits",
        "eval_loss a 401-digit integer at step 20 (no float holds it): not a metric, the key is ignored",
        _integer_metric_beyond_floats,
        "best:1:loss:max",
        {
            "run/checkpoint-10": KEEP,
            "run/checkpoint-20": DELETE,
            "run/checkpoint-30": DELETE,
            "run/checkpoint-40": KEEP,
        },
        {"run/checkpoint-10": "best eval_loss=0.5000 (1/1)", "run/checkpoint-40": "protected: newest"},
    ),
    Case(
        "ts-metric-1e999",
        "eval_loss 1e999 at step 20: Infinity, as every JSON reader (the Trainer's too) reads it",
        _float_literal_beyond_range_metric,
        "best:1:loss:max",
        {
            "run/checkpoint-10": DELETE,
            "run/checkpoint-20": KEEP,
            "run/checkpoint-30": DELETE,
            "run/checkpoint-40": KEEP,
        },
        {"run/checkpoint-20": "best eval_loss=inf (1/1)", "run/checkpoint-40": "protected: newest"},
    ),
    broken40(
        "ts-integer-5000-digits",
        "a 5000-digit integer (grad_norm) in log_history: longer than Python reads (4300 digits)",
        set_state(FULL_STATE.replace(b'"grad_norm": 1.5', b'"grad_norm": 1' + b"0" * 4999)),
        "trainer_state.json holds a number too long to read (over 4300 digits)",
    ),
    Case(
        "ts-nan-epoch",
        "epoch NaN in the newest checkpoint: it has no epoch bucket",
        standard(lambda d: None, {10: 0.5, 20: 1.0, 30: 1.5, 40: float("nan")}),
        "epoch:all",
        {"run/checkpoint-10": DELETE, "run/checkpoint-20": KEEP, "run/checkpoint-30": KEEP, "run/checkpoint-40": KEEP},
        {"run/checkpoint-20": "epoch 1", "run/checkpoint-30": "epoch 2", "run/checkpoint-40": "protected: newest"},
    ),
    Case(
        "ts-infinite-epochs",
        "epoch Infinity at step 20 and -Infinity at step 40",
        standard(lambda d: None, {10: 0.5, 20: float("inf"), 30: 1.5, 40: float("-inf")}),
        "epoch:all",
        {"run/checkpoint-10": KEEP, "run/checkpoint-20": DELETE, "run/checkpoint-30": KEEP, "run/checkpoint-40": KEEP},
        {"run/checkpoint-10": "epoch 1", "run/checkpoint-30": "epoch 2", "run/checkpoint-40": "protected: newest"},
    ),
    Case(
        "ts-epoch-401-digits",
        "epoch a 401-digit integer at step 20 and its negative at step 40 (no float holds them): no epoch",
        standard(lambda d: None, {10: 0.5, 20: 10**400, 30: 1.5, 40: -(10**400)}),
        "epoch:all",
        {"run/checkpoint-10": KEEP, "run/checkpoint-20": DELETE, "run/checkpoint-30": KEEP, "run/checkpoint-40": KEEP},
        {"run/checkpoint-10": "epoch 1", "run/checkpoint-30": "epoch 2", "run/checkpoint-40": "protected: newest"},
    ),
    broken40(
        "ts-epoch-5000-digits",
        "epoch a 5000-digit integer: longer than Python reads (4300 digits)",
        set_state(FULL_STATE.replace(b'"epoch": 4.0', b'"epoch": 1' + b"0" * 4999, 1)),
        "trainer_state.json holds a number too long to read (over 4300 digits)",
    ),
    Case(
        "ts-extreme-epochs",
        "epoch -3.5 at step 10 and 1e308 at step 40",
        standard(lambda d: None, {10: -3.5, 20: 1.0, 30: 1.5, 40: 1e308}),
        "epoch:2",
        {
            "run/checkpoint-10": DELETE,
            "run/checkpoint-20": DELETE,
            "run/checkpoint-30": KEEP,
            "run/checkpoint-40": KEEP,
        },
        {"run/checkpoint-30": "epoch 2", "run/checkpoint-40": f"epoch {int(1e308)}"},
    ),
    broken40(
        "ts-string-epoch",
        'epoch "4.0" (a string)',
        state_with(epoch="4.0"),
        "trainer_state.json: epoch: input should be a valid number",
    ),
    broken40(
        "ts-bool-epoch",
        "epoch true",
        state_with(epoch=True),
        "trainer_state.json: epoch: input should be a valid number",
    ),
    broken40(
        "ts-string-global-step",
        'global_step "40" (a string)',
        state_with(global_step="40"),
        "global_step: input should be a valid integer",
    ),
    broken40(
        "ts-float-global-step",
        "global_step 40.0 (a float)",
        state_with(global_step=40.0),
        "global_step: input should be a valid integer",
    ),
    broken40(
        "ts-bool-global-step",
        "global_step true",
        state_with(global_step=True),
        "global_step: input should be a valid integer",
    ),
    broken40(
        "ts-global-step-mismatch",
        "global_step 99 in checkpoint-40",
        state_with(global_step=99),
        "global_step 99 in trainer_state.json does not match checkpoint-40",
    ),
    broken40(
        "ts-negative-global-step",
        "global_step -40 in checkpoint-40",
        state_with(global_step=-40),
        "global_step -40 in trainer_state.json does not match checkpoint-40",
    ),
    fine40("ts-no-log-history", "no log_history key at all", state_with(history=False)),
    Case(
        "ts-no-eval-with-best-rule",
        "no log_history in any checkpoint, keep best:1: not refused, best keeps nothing yet",
        _no_eval_anywhere,
        "best:1",
        {"run/checkpoint-10": DELETE, "run/checkpoint-20": DELETE, "run/checkpoint-30": KEEP},
        {"run/checkpoint-30": "protected: newest"},
    ),
    broken40(
        "ts-log-history-object",
        "log_history is an object, not a list",
        state_with(log_history={}),
        "log_history: input should be a valid list",
    ),
    broken40(
        "ts-log-history-entry-number",
        "log_history holds a number among its entries",
        state_with(log_history=[{"step": 40, "eval_loss": 0.2}, 7]),
        "log_history.1: input should be a valid dictionary",
    ),
    fine40("ts-huge-100mb", "a 100 MB trainer_state.json (a valid document with a 100 MB unknown value)", _huge_state),
    broken40(
        "ts-deep-100k",
        "an unknown key nested 100,000 arrays deep",
        set_state(_deep_state),
        "trainer_state.json is nested too deeply",
        process=True,
    ),
    broken40(
        "ts-not-utf8",
        "a Latin-1 byte (\\xe9) in a string value",
        set_state(FULL_STATE.replace(b'"trial_name": null', b'"trial_name": "\xe9t\xe9"')),
        "trainer_state.json is not UTF-8 text",
    ),
    broken40(
        "ts-bom",
        "a UTF-8 byte order mark before the document (the Trainer's json.loads refuses it)",
        set_state(b"\xef\xbb\xbf" + FULL_STATE),
        "trainer_state.json starts with a byte order mark, which the Trainer cannot read",
    ),
    broken40(
        "ts-utf16",
        "the document encoded as UTF-16 (with its BOM)",
        set_state(FULL_STATE.decode().encode("utf-16")),
        "trainer_state.json is not UTF-8 text",
    ),
    fine40(
        "ts-duplicate-key-last-wins",
        "global_step twice: 99, then 40 (the last wins: it matches)",
        set_state(FULL_STATE.replace(b'"global_step": 40', b'"global_step": 99, "global_step": 40')),
    ),
    broken40(
        "ts-duplicate-key-mismatch",
        "global_step twice: 40, then 99 (the last wins: it does not match)",
        set_state(FULL_STATE.replace(b'"global_step": 40', b'"global_step": 40, "global_step": 99')),
        "global_step 99 in trainer_state.json does not match checkpoint-40",
    ),
    broken40(
        "ts-sparse-64gib",
        "a sparse 64 GiB trainer_state.json (no disk used; more than memory)",
        _sparse_state,
        "trainer_state.json is larger than 512 MiB (68719476736 bytes)",
        process=True,
    ),
    broken40(
        "ts-fifo",
        "trainer_state.json is a FIFO (a read would block forever)",
        _fifo("trainer_state.json"),
        "trainer_state.json is not a regular file",
    ),
    broken40(
        "ts-device-node",
        "trainer_state.json is a character device node (that of /dev/zero)",
        _device("trainer_state.json"),
        "trainer_state.json is not a regular file",
        needs_root=True,
    ),
    broken40(
        "ts-directory", "trainer_state.json is a directory", _state_dir, "trainer_state.json is not a regular file"
    ),
    broken40(
        "ts-symlink-outside",
        "trainer_state.json is a symlink to a valid file outside the root",
        _link("trainer_state.json", _outside_state),
        "trainer_state.json is not a regular file",
        intact=("outside/trainer_state.json",),
    ),
    broken40(
        "ts-symlink-dev-zero",
        "trainer_state.json is a symlink to /dev/zero",
        _link("trainer_state.json", lambda d: "/dev/zero"),
        "trainer_state.json is not a regular file",
    ),
    broken40("ts-missing", "an empty checkpoint directory", _empty_checkpoint, "incomplete: no trainer_state.json"),
]

# --- safetensors ---------------------------------------------------------------------------------------------

HEADER_LEN = struct.unpack("<Q", MODEL[:8])[0]


def _shards(
    broken: str | None = None, missing: str | None = None, index: bytes | None = None
) -> Callable[[Path], None]:
    """checkpoint-40 holds a sharded model: two shards and model.safetensors.index.json."""

    def mutate(directory: Path) -> None:
        (directory / "model.safetensors").unlink()
        weight_map = {}
        for i, shard in enumerate(SHARDS, start=1):
            (directory / shard).write_bytes(MODEL)
            weight_map[f"layer{i}.w"] = shard
            weight_map[f"layer{i}.b"] = shard
        doc = {"metadata": {"total_size": 2 * len(MODEL)}, "weight_map": weight_map}
        (directory / INDEX).write_bytes(index if index is not None else json.dumps(doc, indent=2).encode())
        if broken:
            (directory / broken).write_bytes(MODEL[:-5])
        if missing:
            (directory / missing).unlink()

    return mutate


def _index_link(target: Callable[[Path], str | Path]) -> Callable[[Path], None]:
    def mutate(directory: Path) -> None:
        _shards()(directory)
        os.rename(directory / INDEX, directory.parent.parent.parent / "outside" / INDEX)
        (directory / INDEX).symlink_to(target(directory))

    return mutate


def _index_fifo(directory: Path) -> None:
    _shards()(directory)
    (directory / INDEX).unlink()
    os.mkfifo(directory / INDEX)


def _index_device(directory: Path) -> None:
    _shards()(directory)
    _device(INDEX)(directory)


def _index_sparse(directory: Path) -> None:
    _shards()(directory)
    sparse(directory / INDEX, 1 << 30)


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

SAFETENSORS_CASES = [
    broken40(
        "st-truncated",
        "model.safetensors cut 5 bytes short",
        set_file("model.safetensors", MODEL[:-5]),
        "model.safetensors: invalid safetensors (incomplete metadata, file not fully covered)",
    ),
    broken40(
        "st-truncated-in-header",
        "model.safetensors cut inside its header",
        set_file("model.safetensors", MODEL[:20]),
        "model.safetensors: invalid safetensors (invalid header length)",
    ),
    broken40(
        "st-trailing-bytes",
        "model.safetensors with 7 bytes appended",
        set_file("model.safetensors", MODEL + b"garbage"),
        "model.safetensors: invalid safetensors (incomplete metadata, file not fully covered)",
    ),
    broken40(
        "st-header-length-past-end",
        "a header length one byte larger than the file",
        set_file("model.safetensors", struct.pack("<Q", len(MODEL) + 1) + MODEL[8:]),
        "model.safetensors: invalid safetensors (invalid header length)",
    ),
    broken40(
        "st-header-length-2-63",
        "a header length of 2**63",
        set_file("model.safetensors", struct.pack("<Q", 2**63) + MODEL[8:]),
        "model.safetensors: invalid safetensors (header too large)",
    ),
    broken40(
        "st-header-not-json",
        "a header of x bytes instead of JSON",
        set_file("model.safetensors", MODEL[:8] + b"x" * HEADER_LEN + MODEL[8 + HEADER_LEN :]),
        "model.safetensors: invalid safetensors (invalid JSON in header",
    ),
    broken40(
        "st-header-not-utf8",
        "a tensor name with a \\xff byte in the header",
        set_file(
            "model.safetensors", raw_safetensors(b'{"\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8))
        ),
        "model.safetensors: invalid safetensors (invalid UTF-8 in header",
    ),
    broken40(
        "st-offsets-overlap",
        "two tensors whose byte ranges overlap",
        set_file(
            "model.safetensors", safetensors_bytes({"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}}, bytes(12))
        ),
        "model.safetensors: invalid safetensors (invalid offset for tensor `b`)",
    ),
    broken40(
        "st-offsets-gap",
        "two tensors with a gap between their byte ranges",
        set_file(
            "model.safetensors", safetensors_bytes({"a": F32x2, "b": {**F32x2, "data_offsets": [16, 24]}}, bytes(24))
        ),
        "model.safetensors: invalid safetensors (invalid offset for tensor `b`)",
    ),
    broken40(
        "st-offsets-reversed",
        "a tensor whose end offset is before its start",
        set_file("model.safetensors", safetensors_bytes({"a": {**F32x2, "data_offsets": [8, 0]}}, bytes(8))),
        "model.safetensors: invalid safetensors (invalid offset for tensor `a`)",
    ),
    fine40(
        "st-offsets-listed-out-of-order",
        "tensors listed in the header out of offset order, tiling the data exactly (valid)",
        set_file(
            "model.safetensors", safetensors_bytes({"b": {**F32x2, "data_offsets": [8, 16]}, "a": F32x2}, bytes(16))
        ),
    ),
    broken40(
        "st-dtype-shape-mismatch",
        "F64 of shape [2] over an 8-byte range",
        set_file("model.safetensors", safetensors_bytes({"a": {**F32x2, "dtype": "F64"}}, bytes(8))),
        "model.safetensors: invalid safetensors (invalid shape, data type, or offset for tensor)",
    ),
    broken40(
        "st-shape-overflow",
        "a shape of [2**62, 2**62] over an 8-byte range",
        set_file("model.safetensors", safetensors_bytes({"a": {**F32x2, "shape": [2**62, 2**62]}}, bytes(8))),
        "model.safetensors: invalid safetensors (overflow computing buffer size",
    ),
    broken40(
        "st-unknown-dtype",
        'dtype "Q7"',
        set_file("model.safetensors", safetensors_bytes({"a": {**F32x2, "dtype": "Q7"}}, bytes(8))),
        "unknown dtype 'Q7'",
    ),
    broken40(
        "st-empty",
        "model.safetensors of 0 bytes",
        set_file("model.safetensors", b""),
        "model.safetensors: invalid safetensors (header too small)",
    ),
    broken40(
        "st-other-file-broken",
        "a second safetensors file (adapter_model.safetensors) of 5 bytes",
        set_file("adapter_model.safetensors", b"12345"),
        "adapter_model.safetensors: invalid safetensors (header too small)",
    ),
    fine40("st-sharded-valid", "a valid sharded model: two shards and their index", _shards()),
    broken40(
        "st-index-missing-shard",
        "model.safetensors.index.json names a shard that is missing",
        _shards(missing=SHARDS[1]),
        f"{INDEX} names {SHARDS[1]}, which is missing",
    ),
    broken40(
        "st-index-broken-shard",
        "model.safetensors.index.json names a shard that is cut short",
        _shards(broken=SHARDS[1]),
        f"{SHARDS[1]}: invalid safetensors (incomplete metadata, file not fully covered)",
    ),
    broken40(
        "st-index-not-json",
        "model.safetensors.index.json cut short",
        _shards(index=b'{"weight_map": {'),
        f"{INDEX} is not valid JSON",
    ),
    broken40(
        "st-index-path-traversal",
        "the index names ../checkpoint-30/model.safetensors as a shard",
        _shards(index=json.dumps({"weight_map": {"w": "../checkpoint-30/model.safetensors"}}).encode()),
        f"{INDEX} names a shard outside the checkpoint: '../checkpoint-30/model.safetensors'",
    ),
    broken40(
        "st-index-symlink-outside",
        "model.safetensors.index.json is a symlink to a valid index outside the root",
        _index_link(lambda d: d.parent.parent.parent / "outside" / INDEX),
        f"{INDEX} is not a regular file",
        intact=(f"outside/{INDEX}",),
    ),
    broken40(
        "st-index-symlink-dev-zero",
        "model.safetensors.index.json is a symlink to /dev/zero (an endless read)",
        _index_link(lambda d: "/dev/zero"),
        f"{INDEX} is not a regular file",
    ),
    broken40(
        "st-index-fifo",
        "model.safetensors.index.json is a FIFO (a read would block forever)",
        _index_fifo,
        f"{INDEX} is not a regular file",
    ),
    broken40(
        "st-index-device-node",
        "model.safetensors.index.json is a character device node (that of /dev/zero)",
        _index_device,
        f"{INDEX} is not a regular file",
        needs_root=True,
    ),
    broken40(
        "st-index-sparse-1gib",
        "a sparse 1 GiB model.safetensors.index.json",
        _index_sparse,
        f"{INDEX} is larger than 64 MiB",
    ),
    fine40(
        "st-safetensors-symlink-dev-zero",
        "model.safetensors is a symlink to /dev/zero (links are not opened; the link is the only model file)",
        _link("model.safetensors", lambda d: "/dev/zero"),
    ),
    broken40(
        "st-leftover-tmp",
        "a leftover .tmpk3j2a1 file of the safetensors writer",
        set_file(".tmpk3j2a1", MODEL[:30]),
        "temporary file .tmpk3j2a1 present (write in progress)",
    ),
    broken40(
        "st-incomplete-marker",
        "the Trainer's checkpoint-is-incomplete.txt marker",
        set_file("checkpoint-is-incomplete.txt", b""),
        "checkpoint-is-incomplete.txt present (save in progress)",
    ),
    broken40(
        "st-empty-rng-state",
        "an empty rng_state_7.pth (rank 7 still saving: no barrier before rank 0's files) in a complete checkpoint",
        set_file("rng_state_7.pth", b""),
        "rng_state_7.pth is empty (a save in progress?)",
    ),
    broken40(
        "st-tree-deeper-than-path-max",
        "a directory tree inside the checkpoint whose paths are longer than PATH_MAX (20 levels of 250 bytes)",
        lambda d: deep_tree(d, 20),
        "cannot read: File name too long",
    ),
]

# --- names ---------------------------------------------------------------------------------------------------


def _named(name: str, kind: str = "checkpoint") -> Build:
    """root/run with checkpoint-10 and checkpoint-20, and a full checkpoint (or a file/FIFO) under `name`."""

    def build(root: Path) -> None:
        checkpoint(root / "run", 10, epoch=1.0, loss=0.5)
        checkpoint(root / "run", 20, epoch=2.0, loss=0.4)
        if kind == "checkpoint":
            checkpoint(root / "run", 7, name=name, epoch=0.5, loss=0.1)
        elif kind == "file":
            (root / "run" / name).write_bytes(FULL_STATE)
        else:
            os.mkfifo(root / "run" / name)

    return build


NAMED_EXPECT = {"run/checkpoint-10": DELETE, "run/checkpoint-20": KEEP}


def named(case: str, name: str, what: str, kind: str = "checkpoint") -> Case:
    phrases = {"run/checkpoint-20": "last 1/1"}
    return Case(case, what, _named(name, kind), "last:1", NAMED_EXPECT, phrases, ignored=(f"run/{name}",))


BIG = 10**30
BIGGER = 10**240  # checkpoint-<241 digits>: 252 bytes, still a valid file name


def _big_steps(root: Path) -> None:
    for step in (99, BIG, BIGGER):
        checkpoint(root / "run", step, epoch=1.0, loss=0.5)


def _step_zero(root: Path) -> None:
    checkpoint(root, 0, epoch=0.0)
    checkpoint(root, 10, epoch=1.0)


def _nested_checkpoint(root: Path) -> None:
    inner = checkpoint(root / "run", 10, epoch=1.0)
    checkpoint(inner, 5, epoch=0.5)
    checkpoint(root / "run", 20, epoch=2.0)


def _hidden_and_deep(root: Path) -> None:
    checkpoint(root / "run", 10, epoch=1.0)
    checkpoint(root / "run", 20, epoch=2.0)
    checkpoint(root / ".hidden" / "run", 10, epoch=1.0)
    checkpoint(root / ".hidden" / "run", 20, epoch=2.0)
    checkpoint(root / "a" / "b" / "c" / "d" / "e", 10, epoch=1.0)
    checkpoint(root / "a" / "b" / "c" / "d" / "e", 20, epoch=2.0)


NON_UTF8_RUN = os.fsdecode(b"run-\xff\xfe")


def _non_utf8_run(root: Path) -> None:
    for step in (10, 20):
        checkpoint(root / NON_UTF8_RUN, step, epoch=step / 10)


NEWLINE_RUN = "exp\n  checkpoint-99  keep"


def _newline_run(root: Path) -> None:
    for step in (10, 20):
        checkpoint(root / NEWLINE_RUN, step, epoch=step / 10)


NAME_CASES = [
    named("name-leading-zeros", "checkpoint-007", "checkpoint-007: leading zeros are not the Trainer's name"),
    named("name-exponent", "checkpoint-1e3", "checkpoint-1e3"),
    named("name-negative", "checkpoint--5", "checkpoint--5"),
    named("name-bak-suffix", "checkpoint-10.bak", "checkpoint-10.bak beside checkpoint-10"),
    named("name-upper-case", "CHECKPOINT-10", "CHECKPOINT-10"),
    named(
        "name-arabic-indic-digit",
        "checkpoint-\u0663",
        "checkpoint-\u0663 (an Arabic-Indic digit three, which int() accepts)",
    ),
    named("name-fullwidth-digits", "checkpoint-\uff13\uff10", "checkpoint-\uff13\uff10 (fullwidth digits)"),
    named("name-trailing-space", "checkpoint-30 ", "'checkpoint-30 ' (a trailing space)"),
    named("name-file", "checkpoint-30", "a regular FILE named checkpoint-30", kind="file"),
    named("name-fifo", "checkpoint-30", "a FIFO named checkpoint-30", kind="fifo"),
    Case(
        "name-huge-steps",
        "checkpoint-99, checkpoint-10**30 and checkpoint-10**240: ordered by number, not by name",
        _big_steps,
        "last:2",
        {"run/checkpoint-99": DELETE, f"run/checkpoint-{BIG}": KEEP, f"run/checkpoint-{BIGGER}": KEEP},
        {f"run/checkpoint-{BIG}": "last 2/2", f"run/checkpoint-{BIGGER}": "last 1/2, protected: newest"},
        process=True,
    ),
    Case(
        "name-step-zero",
        "checkpoint-0 in the root itself",
        _step_zero,
        "last:1",
        {"checkpoint-0": DELETE, "checkpoint-10": KEEP},
        {"checkpoint-10": "last 1/1"},
    ),
    Case(
        "name-checkpoint-inside-checkpoint",
        "run/checkpoint-10/checkpoint-5: a checkpoint directory is never searched for runs",
        _nested_checkpoint,
        "last:1",
        {"run/checkpoint-10": DELETE, "run/checkpoint-20": KEEP},
        ignored=("run/checkpoint-10/checkpoint-5",),
    ),
    Case(
        "name-hidden-and-too-deep",
        "runs in .hidden/run and at depth 5 (a/b/c/d/e): never searched",
        _hidden_and_deep,
        "last:1",
        {"run/checkpoint-10": DELETE, "run/checkpoint-20": KEEP},
        ignored=(".hidden/run/checkpoint-10", "a/b/c/d/e/checkpoint-10"),
    ),
    Case(
        "name-run-not-utf8",
        "a run directory whose name is not UTF-8 (run-\\xff\\xfe), with a strict UTF-8 stdout",
        _non_utf8_run,
        "last:1",
        {f"{NON_UTF8_RUN}/checkpoint-10": DELETE, f"{NON_UTF8_RUN}/checkpoint-20": KEEP},
        {"output": "run run-\\udcff\\udcfe"},
        process=True,
    ),
    Case(
        "name-run-with-newline",
        "a run directory whose name holds a newline and a fake table row",
        _newline_run,
        "last:1",
        {f"{NEWLINE_RUN}/checkpoint-10": DELETE, f"{NEWLINE_RUN}/checkpoint-20": KEEP},
        phrases={"output": "run exp\\n  checkpoint-99  keep  (2 checkpoints)"},  # escaped: no fake row
    ),
]

# --- links ---------------------------------------------------------------------------------------------------


def _checkpoint_link_outside(root: Path) -> None:
    checkpoint(root / "run", 10, epoch=1.0)
    checkpoint(root / "run", 20, epoch=2.0)
    checkpoint(outside(root), 50, epoch=5.0)
    (root / "run" / "checkpoint-50").symlink_to(outside(root) / "checkpoint-50")
    (root / "linkonly").mkdir()
    (root / "linkonly" / "checkpoint-60").symlink_to(outside(root) / "checkpoint-50")


def _links_inside_checkpoint(root: Path) -> None:
    precious = outside(root) / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "data.bin").write_bytes(b"precious data")
    (precious / "sub" / "more.bin").write_bytes(b"more")
    (outside(root) / "blob.bin").write_bytes(b"blob")
    (outside(root) / "hard.bin").write_bytes(b"hard-linked")
    old = checkpoint(root / "run", 10, epoch=1.0)
    (old / "shared").symlink_to(precious)  # absolute link to a directory outside
    (old / "weights.bin").symlink_to(os.path.relpath(outside(root) / "blob.bin", old))  # relative link to a file
    (old / "up").symlink_to("../../..")  # to <tmp> itself
    (old / "hard.bin").hardlink_to(outside(root) / "hard.bin")
    checkpoint(root / "run", 20, epoch=2.0)


def _run_dir_links(root: Path) -> None:
    checkpoint(root / "run", 10, epoch=1.0)
    checkpoint(root / "run", 20, epoch=2.0)
    checkpoint(outside(root) / "exp", 10, epoch=1.0)
    checkpoint(outside(root) / "exp", 20, epoch=2.0)
    (root / "external").symlink_to(outside(root) / "exp")  # a run directory that is a link out of the root
    (root / "alias").symlink_to(root / "run")  # and one that is a link to a run inside


def _root_link(root: Path) -> None:
    checkpoint(root / "run", 10, epoch=1.0)
    checkpoint(root / "run", 20, epoch=2.0)
    (root.parent / "root-link").symlink_to(root)


def _loops(root: Path) -> None:
    # checkpoint-10's links are made before checkpoint-20 is written: a link is a file written into the
    # checkpoint, and one made later would (rightly) make checkpoint-10 the newest written, so protected.
    old = checkpoint(root / "run", 10, epoch=1.0)
    (old / "self").symlink_to(".")
    (old / "cycle-a").symlink_to("cycle-b")
    (old / "cycle-b").symlink_to("cycle-a")
    new = checkpoint(root / "run", 20, epoch=2.0)
    (root / "run" / "loop").symlink_to("..")
    (root / "up").symlink_to(root)
    (root / "a").symlink_to(root / "b")
    (root / "b").symlink_to(root / "a")
    (new / "self").symlink_to(".")
    (new / "parent").symlink_to("..")


def _checkpoint_links_inside(root: Path) -> None:
    checkpoint(root / "run", 10, epoch=1.0)
    checkpoint(root / "run", 20, epoch=2.0)
    (root / "run" / "checkpoint-60").symlink_to("checkpoint-10")  # to a sibling that is deleted
    (root / "run" / "checkpoint-70").symlink_to(root / "nowhere")  # dangling


LINK_CASES = [
    Case(
        "link-checkpoint-to-outside",
        "run/checkpoint-50 (and linkonly/checkpoint-60) are symlinks to a newer checkpoint outside the root",
        _checkpoint_link_outside,
        "last:1",
        {"run/checkpoint-10": DELETE, "run/checkpoint-20": KEEP},
        {"run/checkpoint-20": "last 1/1, protected: newest"},
        ignored=("run/checkpoint-50", "linkonly/checkpoint-60"),
        intact=("outside/checkpoint-50/trainer_state.json", "outside/checkpoint-50/model.safetensors"),
    ),
    Case(
        "link-inside-checkpoint-to-outside",
        "the deleted checkpoint holds symlinks to a directory and a file outside, a link to ../../.. and a hard link",
        _links_inside_checkpoint,
        "last:1",
        {"run/checkpoint-10": DELETE, "run/checkpoint-20": KEEP},
        intact=("outside/precious/data.bin", "outside/precious/sub/more.bin", "outside/blob.bin", "outside/hard.bin"),
    ),
    Case(
        "link-run-directory",
        "root/external is a symlink to a run outside the root; root/alias a symlink to root/run",
        _run_dir_links,
        "last:1",
        {"run/checkpoint-10": DELETE, "run/checkpoint-20": KEEP},
        ignored=("external", "alias"),
        intact=("outside/exp/checkpoint-10/trainer_state.json", "outside/exp/checkpoint-20/trainer_state.json"),
    ),
    Case(
        "link-root",
        "ROOT is given as a symlink to the real root",
        _root_link,
        "last:1",
        {"run/checkpoint-10": DELETE, "run/checkpoint-20": KEEP},
        arg=lambda root: root.parent / "root-link",
        process=True,
    ),
    Case(
        "link-loops",
        "loops of symlinks: run/loop -> .., up -> root, a <-> b, self -> . and a cycle inside checkpoints",
        _loops,
        "last:1",
        {"run/checkpoint-10": DELETE, "run/checkpoint-20": KEEP},
        ignored=("run/loop", "up", "a", "b"),
        process=True,
    ),
    Case(
        "link-checkpoint-to-sibling",
        "checkpoint-60 is a symlink to checkpoint-10 (deleted); checkpoint-70 a dangling symlink",
        _checkpoint_links_inside,
        "last:1",
        {"run/checkpoint-10": DELETE, "run/checkpoint-20": KEEP},
        ignored=("run/checkpoint-60", "run/checkpoint-70"),
    ),
]

# --- the root, rules and protections --------------------------------------------------------------------------


def _typo_run(root: Path) -> None:
    for step in (10, 20, 30):
        checkpoint(root / "run", step, epoch=step / 10, loss=STD_LOSSES[step])


def _best_traversal(root: Path) -> None:
    for step in (10, 20, 30):
        checkpoint(root / "run", step, epoch=step / 10, loss=STD_LOSSES[step])
    checkpoint(
        root / "run",
        40,
        epoch=4.0,
        loss=0.2,
        best_model_checkpoint="../../../../etc/checkpoint-10",
    )


def _best_nonsense(root: Path) -> None:
    for step in (10, 20):
        checkpoint(root / "run", step, epoch=step / 10)
    checkpoint(root / "run", 30, epoch=3.0, best=-10)
    checkpoint(root / "other", 10, epoch=1.0)
    checkpoint(root / "other", 20, epoch=2.0, best=BIG)


ROOT_CASES = [
    Case(
        "root-missing",
        "ROOT does not exist",
        lambda root: None,
        "last:1",
        {},
        {"output": "does not exist"},
        2,
        arg=lambda r: r / "missing",
    ),
    Case(
        "root-is-a-file",
        "ROOT is a regular file",
        lambda root: (root / "file").touch(),
        "last:1",
        {},
        {"output": "is not a directory"},
        2,
        arg=lambda r: r / "file",
    ),
    Case(
        "root-empty",
        "ROOT holds no checkpoint at all",
        lambda root: None,
        "last:1",
        {},
        {"output": "No checkpoint-N directories found below"},
    ),
    Case(
        "rule-metric-typo",
        "keep best:1:acuracy (a typo) in a run that has eval_loss: refused, nothing removed",
        _typo_run,
        "best:1:acuracy",
        {"run/checkpoint-10": KEEP, "run/checkpoint-20": KEEP, "run/checkpoint-30": KEEP},
        {
            "output": "(the run's metrics: eval_loss, eval_runtime)",
            "run/checkpoint-10": "refused: nothing is removed in this run",
        },
        3,
    ),
    Case(
        "best-model-checkpoint-traversal",
        "best_model_checkpoint ../../../../etc/checkpoint-10: only its last component counts",
        _best_traversal,
        "last:1",
        {
            "run/checkpoint-10": KEEP,
            "run/checkpoint-20": DELETE,
            "run/checkpoint-30": DELETE,
            "run/checkpoint-40": KEEP,
        },
        {"run/checkpoint-10": "protected: trainer best"},
    ),
    Case(
        "best-global-step-nonsense",
        "best_global_step -10 in one run and 10**30 in another: no checkpoint has them",
        _best_nonsense,
        "last:1",
        {
            "other/checkpoint-10": DELETE,
            "other/checkpoint-20": KEEP,
            "run/checkpoint-10": DELETE,
            "run/checkpoint-20": DELETE,
            "run/checkpoint-30": KEEP,
        },
    ),
]


def _three_checkpoints(root: Path) -> None:
    for step in (10, 20, 30):
        checkpoint(root / "run", step, epoch=step / 10, loss=STD_LOSSES[step])


def _archive_link_to_root(root: Path) -> None:
    _three_checkpoints(root)
    (root.parent / "outside" / "archive").symlink_to(root, target_is_directory=True)


def _home_as_state(root: Path) -> None:
    _three_checkpoints(root)
    (root.parent / "outside" / "trash").mkdir()
    (root.parent / "outside" / "trash" / "photo.jpg").write_bytes(b"precious")
    (root.parent / "outside" / "notes.txt").write_text("mine")


# Issue #10's classes, given as paths and flags: aliases of the root, a state directory that is not
# ckptkeeper's or lies inside a checkpoint, a root that is a checkpoint, a repeated --keep.
PATH_CASES = [
    Case(
        "path-archive-link-to-root",
        "--archive-to a symlink to ROOT: every archived checkpoint would be deleted as 'already archived'",
        _archive_link_to_root,
        "last:1",
        {},
        {"output": "is the root"},
        2,
        flags=lambda r: ["--archive-to", str(r.parent / "outside" / "archive")],
        intact=("outside/archive",),
    ),
    Case(
        "path-archive-in-state-trash",
        "--archive-to inside the state directory's trash: the next start would empty the archive",
        _three_checkpoints,
        "last:1",
        {},
        {"output": "is inside the state directory"},
        2,
        flags=lambda r: ["--state-dir", str(r.parent / "state"), "--archive-to", str(r.parent / "state" / "trash")],
    ),
    Case(
        "path-state-dir-not-ours",
        "--state-dir a home directory that holds trash/: its trash would be emptied as leftovers",
        _home_as_state,
        "last:1",
        {},
        {"output": "was not made by ckptkeeper"},
        2,
        flags=lambda r: ["--state-dir", str(r.parent / "outside")],
        intact=("outside/trash/photo.jpg", "outside/notes.txt"),
    ),
    Case(
        "path-state-dir-in-checkpoint",
        "--state-dir inside a kept checkpoint: its files and mtime would change",
        _three_checkpoints,
        "last:1",
        {},
        {"output": "is inside a checkpoint (checkpoint-30)"},
        2,
        flags=lambda r: ["--state-dir", str(r / "run" / "checkpoint-30" / "state")],
    ),
    Case(
        "path-root-is-checkpoint",
        "ROOT is itself a checkpoint directory: the default state directory would be written inside it",
        _three_checkpoints,
        "last:1",
        {},
        {"output": "is a checkpoint directory or inside one (checkpoint-30)"},
        2,
        arg=lambda r: r / "run" / "checkpoint-30",
    ),
    Case(
        "keep-repeated",
        "--keep last:1 --keep every:20: both rules apply (a union), never only the last flag",
        _three_checkpoints,
        "last:1",
        {"run/checkpoint-10": DELETE, "run/checkpoint-20": KEEP, "run/checkpoint-30": KEEP},
        {"run/checkpoint-20": "every 20"},
        flags=lambda r: ["--keep", "every:20"],
    ),
]

CASES: list[Case] = [
    *TRAINER_STATE_CASES,
    *SAFETENSORS_CASES,
    *NAME_CASES,
    *LINK_CASES,
    *ROOT_CASES,
    *PATH_CASES,
]


def _code(text: str) -> str:
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _step(key: str, with_run: bool) -> str:
    run, _, name = key.rpartition("/")
    digits = name.removeprefix("checkpoint-")
    if len(digits) > 12 and digits == "1" + "0" * (len(digits) - 1):
        digits = f"10^{len(digits) - 1}"
    return f"{run}/{digits}" if with_run else digits


def outcome(case: Case) -> str:
    """The expected outcome in words, for the table: the steps kept, deleted and incomplete, and the phrases."""
    if case.exit_code == 2:
        return f"usage error, exit 2: {_code(case.phrases['output'])}"
    by_kind: dict[str, list[str]] = {}
    several_runs = len({key.rpartition("/")[0] for key in case.expect}) > 1
    for key, kind in case.expect.items():
        by_kind.setdefault(kind, []).append(_step(key, several_runs))
    parts = [f"{kind} {', '.join(by_kind[kind])}" for kind in (KEEP, DELETE, INCOMPLETE) if kind in by_kind]
    if case.ignored:
        shown = (p if p.isprintable() and p == p.strip() else repr(p) for p in case.ignored)
        parts.append("left alone: " + ", ".join(shown))
    notes = [_code(p) for k, p in case.phrases.items() if k == "output" or case.expect.get(k) == INCOMPLETE]
    head = "refused, exit 3: " if case.exit_code == 3 else ""
    return head + ("; ".join(parts) or "nothing planned") + (": " + ", ".join(notes) if notes else "")


# Corpus entries that need more than the table's harness (a mount): (name, input, --keep, expected, known defect).
EXTRA_ROWS = [
    (
        "mount-inside-checkpoint",
        "a filesystem bind-mounted inside a checkpoint that prune deletes",
        "last:1",
        "refused for that checkpoint (exit 1: a filesystem is mounted inside it); it stays whole, so does the mount",
        False,
    ),
]


# --- the harness ---------------------------------------------------------------------------------------------

SMALL = 1 << 20


def snapshot(base: Path, skip: Path) -> Tree:
    """Everything below `base` (links not followed, `skip` and the root's lock beside it left out): kind, mode,
    size, mtime and content."""
    tree: Tree = {}
    pending = [base]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as e:  # deeper than PATH_MAX
            tree[os.path.relpath(directory, base) + "/*"] = ("unlistable", e.errno)
            continue
        for entry in entries:
            path = Path(entry.path)
            if path in (skip, skip.parent / ROOT_LOCK_NAME):
                continue
            rel = os.path.relpath(path, base)
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as e:  # a path longer than PATH_MAX
                tree[rel] = ("unstatable", e.errno)
                continue
            if stat.S_ISDIR(st.st_mode):
                tree[rel] = ("dir", st.st_mode, st.st_mtime_ns)
                pending.append(path)
            elif stat.S_ISLNK(st.st_mode):
                tree[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode) and st.st_size <= SMALL:
                tree[rel] = (
                    "file",
                    st.st_mode,
                    st.st_size,
                    st.st_mtime_ns,
                    hashlib.sha256(path.read_bytes()).hexdigest(),
                )
            else:  # large files, FIFOs: never opened
                tree[rel] = ("other", st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
    return tree


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def _clean_environment() -> dict[str, str | None]:
    return {k: None for k in os.environ if k.startswith("CKPTKEEPER_")}


def invoke(args: list[str], process: bool) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `ckptkeeper ARGS`, in a child process or in-process."""
    if process:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTKEEPER_")}
        env["PYTHONIOENCODING"] = "utf-8"  # strict: a path that is not UTF-8 must not break the output
        done = subprocess.run(
            [sys.executable, "-m", "ckptkeeper", *args],
            check=False,
            capture_output=True,
            timeout=120,
            env=env,
            preexec_fn=_limit_memory,
        )
        stdout, stderr = done.stdout.decode(), done.stderr.decode("utf-8", "backslashreplace")
        assert "Traceback" not in stderr, stderr
        return done.returncode, stdout, stderr
    result = CliRunner().invoke(main, args, env=_clean_environment())
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # the traceback, not an exit code
    return result.exit_code, result.stdout, result.stderr


def decisions(plan: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    found = {}
    for run in plan["runs"]:
        for c in run["checkpoints"]:
            key = c["name"] if run["run"] == "." else f"{run['run']}/{c['name']}"
            reasons = ", ".join(r["text"] for r in c["reasons"])
            if not c["complete"]:
                assert c["decision"] == KEEP, (key, c)
                assert c["incomplete_reason"] and f"incomplete: {c['incomplete_reason']}" in reasons
                found[key] = (INCOMPLETE, reasons)
            else:
                assert c["decision"] in (KEEP, DELETE), (key, c)
                found[key] = (c["decision"], reasons)
    return found


def unmount_below(base: Path) -> None:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    for point in sorted((p for p in points if p.startswith(f"{base}/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    yield tmp_path
    unmount_below(tmp_path)
    shutil.rmtree(tmp_path, ignore_errors=True)  # the 100 MB and deep-tree cases leave nothing behind


def check_case(case: Case, base: Path) -> None:
    root = base / "root"
    case.build(root)
    arg = str(case.arg(root) if case.arg else root)
    flags = case.flags(root) if case.flags else []
    state_dir = root / "_ckptkeeper"
    before = snapshot(base, skip=state_dir)
    for path in case.intact:
        assert path in before, f"{path} is not part of the case"
    for path in case.ignored:
        assert os.path.join("root", path) in before, f"{path} is not part of the case"

    # 1. plan --json: the exact decisions
    code, out, err = invoke(["plan", arg, "--keep", case.keep, "--json", *flags], case.process)
    assert code == case.exit_code, (out, err)
    if case.exit_code == 2:
        assert case.phrases["output"] in err
        code, out, err = invoke(["prune", arg, "--keep", case.keep, *flags], case.process)
        assert (code, case.phrases["output"] in err) == (2, True), (out, err)
        assert snapshot(base, skip=state_dir) == before
        assert not state_dir.exists()
        return
    found = decisions(json.loads(out))
    assert {k: kind for k, (kind, _) in found.items()} == dict(case.expect)
    for key, phrase in case.phrases.items():
        if key != "output":
            assert phrase in found[key][1], (key, found[key])

    # 2. the text plan: same exit, every phrase shown, no crash on any name
    code, text, err = invoke(["plan", arg, "--keep", case.keep, *flags], False)
    assert code == case.exit_code, (text, err)
    for key, phrase in case.phrases.items():
        assert phrase in text + err, (key, phrase)
    assert snapshot(base, skip=state_dir) == before, "plan changed something"
    assert not state_dir.exists(), "plan created the state directory"

    # 3. prune: exactly the planned deletions, nothing else touched
    code, out, err = invoke(["prune", arg, "--keep", case.keep, *flags], case.process)
    assert code == case.exit_code, (out, err)
    deleted = [k for k, kind in case.expect.items() if kind == DELETE] if case.exit_code == 0 else []
    assert f"removed {count(len(deleted), 'checkpoint')}" in out or case.exit_code != 0, out
    after = snapshot(base, skip=state_dir)
    gone = {os.path.join("root", k) for k in deleted}
    loosened = {"root", *(os.path.dirname(g) for g in gone)}  # directories whose entries changed

    def expected(rel: str, value: tuple[object, ...]) -> tuple[object, ...]:
        return value[:2] if rel in loosened and value[0] == "dir" else value

    want = {
        rel: expected(rel, v) for rel, v in before.items() if not any(rel == g or rel.startswith(g + "/") for g in gone)
    }
    assert {rel: expected(rel, v) for rel, v in after.items()} == want
    for path in (*case.intact, *(os.path.join("root", p) for p in case.ignored)):
        if not any(path.startswith(g + "/") for g in gone):
            assert after[path] == before[path]

    # 4. a second plan removes nothing more
    if case.exit_code == 0:
        code, out, err = invoke(["plan", arg, "--keep", case.keep, "--json", *flags], False)
        assert code == 0, (out, err)
        again = json.loads(out)
        assert again["summary"]["removed"] == 0
        assert set(decisions(again)) == {k for k, kind in case.expect.items() if kind != DELETE}


def _param(case: Case) -> Any:
    marks = []
    if case.defect:
        marks.append(pytest.mark.xfail(strict=True, reason=case.defect))
    if case.needs_root:
        marks.append(pytest.mark.skipif(os.geteuid() != 0, reason="needs root"))
    return pytest.param(case, id=case.name, marks=marks)


def test_the_corpus_is_large_and_names_are_unique() -> None:
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_hostile_input(case: Case, base: Path) -> None:
    check_case(case, base)


# --- beyond the table: a filesystem mounted inside a checkpoint -----------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to bind-mount")
def test_a_filesystem_mounted_inside_a_deleted_checkpoint_is_not_emptied(base: Path) -> None:
    root = base / "root"
    (base / "outside" / "precious.txt").write_text("precious")  # before the checkpoints: 20 is the newest written
    checkpoint(root / "run", 10, epoch=1.0)
    checkpoint(root / "run", 20, epoch=2.0)
    mount_point = root / "run" / "checkpoint-10" / "mnt"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "--bind", str(base / "outside"), str(mount_point)], check=False, capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"mount --bind failed: {done.stderr.strip()}")
    code, out, err = invoke(["prune", str(root), "--keep", "last:1"], False)
    assert code == 1, (out, err)  # refused for that checkpoint, reported, retried at the next pass
    assert f"a filesystem is mounted inside it, at {mount_point}" in out
    assert (base / "outside" / "precious.txt").read_text() == "precious"
    assert (root / "run" / "checkpoint-10" / "trainer_state.json").exists()  # left whole under its name
