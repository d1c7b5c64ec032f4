"""safetensors header checks and the sharded index check, on real files made with the safetensors library."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from ckptkeeper.integrity import encode_safetensors, index_problem, safetensors_problem
from ckptkeeper.scan import read_checkpoint

HF = Path(__file__).parent / "fixtures" / "hf"
INDEX = "model.safetensors.index.json"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def valid_bytes(seed: int = 1) -> bytes:
    weight = np.arange(6, dtype=np.float32) * seed
    return encode_safetensors(
        {
            "layer.weight": ("float32", [2, 3], weight.tobytes()),
            "layer.step": ("int64", [1], seed.to_bytes(8, "little")),
        },
        {"format": "pt"},
    )


def header_length(data: bytes) -> int:
    return int(struct.unpack("<Q", data[:8])[0])


def problem_of(tmp_path: Path, data: bytes, name: str = "model.safetensors") -> str | None:
    path = tmp_path / name
    path.write_bytes(data)
    return safetensors_problem(path)


# --- single files ------------------------------------------------------------------------------------


def test_encode_safetensors_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(valid_bytes(3))
    loaded = load_file(path)
    assert sorted(loaded) == ["layer.step", "layer.weight"]
    assert loaded["layer.weight"].dtype == np.float32
    assert loaded["layer.weight"].tolist() == [[0.0, 3.0, 6.0], [9.0, 12.0, 15.0]]
    assert loaded["layer.step"].tolist() == [3]


def test_a_valid_file(tmp_path: Path) -> None:
    assert problem_of(tmp_path, valid_bytes()) is None


def test_a_real_trainer_file_is_valid() -> None:
    assert safetensors_problem(HF / "A" / "checkpoint-78" / "model.safetensors") is None


def test_a_file_with_only_metadata_is_valid(tmp_path: Path) -> None:
    header = b'{"__metadata__":{"format":"pt"}}'
    assert problem_of(tmp_path, struct.pack("<Q", len(header)) + header) is None


@pytest.mark.parametrize("cut", [1, 8, 24])
def test_a_file_cut_short_in_the_data(tmp_path: Path, cut: int) -> None:
    data = valid_bytes()
    assert problem_of(tmp_path, data[:-cut]) == (
        "model.safetensors: invalid safetensors (incomplete metadata, file not fully covered)"
    )


def test_a_file_cut_short_in_the_header(tmp_path: Path) -> None:
    data = valid_bytes()
    assert header_length(data) > 20
    assert problem_of(tmp_path, data[:20]) == "model.safetensors: invalid safetensors (invalid header length)"


@pytest.mark.parametrize("extra", [b"\0", b"garbage", bytes(4096)])
def test_trailing_bytes(tmp_path: Path, extra: bytes) -> None:
    assert problem_of(tmp_path, valid_bytes() + extra) == (
        "model.safetensors: invalid safetensors (incomplete metadata, file not fully covered)"
    )


def test_a_header_length_larger_than_the_file(tmp_path: Path) -> None:
    data = valid_bytes()
    bigger = struct.pack("<Q", len(data) + 1) + data[8:]
    assert problem_of(tmp_path, bigger) == "model.safetensors: invalid safetensors (invalid header length)"


def test_an_absurd_header_length(tmp_path: Path) -> None:
    data = struct.pack("<Q", 2**63) + valid_bytes()[8:]
    assert problem_of(tmp_path, data) == "model.safetensors: invalid safetensors (header too large)"


def test_a_header_that_is_not_json(tmp_path: Path) -> None:
    data = valid_bytes()
    n = header_length(data)
    garbled = data[:8] + b"x" * n + data[8 + n :]
    assert problem_of(tmp_path, garbled) == (
        "model.safetensors: invalid safetensors (invalid JSON in header: Expecting value: line 1 column 1 (char 0))"
    )


def test_a_header_that_is_json_but_not_an_object(tmp_path: Path) -> None:
    header = b"[1, 2]"
    assert problem_of(tmp_path, struct.pack("<Q", len(header)) + header) == (
        "model.safetensors: invalid safetensors (invalid JSON in header: not an object)"
    )


def test_offsets_that_leave_a_gap(tmp_path: Path) -> None:
    header = json.dumps(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]},
        }
    ).encode()
    data = struct.pack("<Q", len(header)) + header + bytes(24)
    assert problem_of(tmp_path, data) == "model.safetensors: invalid safetensors (invalid offset for tensor `b`)"


def test_a_shape_that_does_not_match_the_offsets(tmp_path: Path) -> None:
    header = json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    data = struct.pack("<Q", len(header)) + header + bytes(8)
    assert problem_of(tmp_path, data) == (
        "model.safetensors: invalid safetensors (invalid shape, data type, or offset for tensor)"
    )


@pytest.mark.parametrize("data", [b"", b"12345", b"\0" * 7], ids=["empty", "5-bytes", "7-bytes"])
def test_files_too_small_for_a_header(tmp_path: Path, data: bytes) -> None:
    assert problem_of(tmp_path, data) == "model.safetensors: invalid safetensors (header too small)"


def test_a_zero_header_length(tmp_path: Path) -> None:
    assert problem_of(tmp_path, struct.pack("<Q", 0)) == (
        "model.safetensors: invalid safetensors (invalid JSON in header: Expecting value: line 1 column 1 (char 0))"
    )


def test_the_reason_names_the_file(tmp_path: Path) -> None:
    assert problem_of(tmp_path, b"", name="adapter_model.safetensors") == (
        "adapter_model.safetensors: invalid safetensors (header too small)"
    )


def test_a_missing_file(tmp_path: Path) -> None:
    assert safetensors_problem(tmp_path / "model.safetensors") == "model.safetensors is missing"


# --- sharded sets: the index ------------------------------------------------------------------------


def write_shards(directory: Path, shards: tuple[str, ...] = SHARDS) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, name in enumerate(shards, start=1):
        (directory / name).write_bytes(valid_bytes(i))
        weight_map[f"layer{i}.weight"] = name
        weight_map[f"layer{i}.step"] = name
    return weight_map


def write_index(directory: Path, weight_map: object, name: str = INDEX) -> Path:
    path = directory / name
    path.write_text(json.dumps({"metadata": {"total_size": 64}, "weight_map": weight_map}, indent=2))
    return path


def test_a_valid_sharded_set(tmp_path: Path) -> None:
    index = write_index(tmp_path, write_shards(tmp_path))
    assert index_problem(tmp_path, index, set(SHARDS)) is None


def test_an_index_that_names_a_missing_shard(tmp_path: Path) -> None:
    weight_map = write_shards(tmp_path, SHARDS[:1])
    weight_map["layer2.weight"] = SHARDS[1]
    index = write_index(tmp_path, weight_map)
    assert index_problem(tmp_path, index, {SHARDS[0]}) == (
        f"{INDEX} names model-00002-of-00002.safetensors, which is missing"
    )


def test_an_index_that_names_a_shard_that_is_not_valid(tmp_path: Path) -> None:
    index = write_index(tmp_path, write_shards(tmp_path))
    # The caller passes the shards it found valid; the second one is present but was not among them.
    assert index_problem(tmp_path, index, {SHARDS[0]}) == (
        f"{INDEX} names model-00002-of-00002.safetensors, which is not valid"
    )


@pytest.mark.parametrize(
    "shard",
    [
        "sub/model-00001-of-00002.safetensors",
        "../checkpoint-10/model.safetensors",
        "/etc/model.safetensors",
        "sub\\model.safetensors",
        "..",
        ".",
        "",
    ],
)
def test_an_index_that_names_a_path_outside_the_checkpoint(tmp_path: Path, shard: str) -> None:
    index = write_index(tmp_path, {"layer.weight": shard})
    assert index_problem(tmp_path, index, {shard}) == f"{INDEX} names a shard outside the checkpoint: {shard!r}"


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"not json", b'{"weight_map": {"a": "\xff.safetensors"}}', b"[" * 100_000],
    ids=["empty", "cut", "text", "not-utf8", "deep"],
)
def test_an_index_that_is_not_json(tmp_path: Path, content: bytes) -> None:
    index = tmp_path / INDEX
    index.write_bytes(content)
    assert index_problem(tmp_path, index, set()) == f"{INDEX} is not valid JSON"


def test_an_index_that_cannot_be_read(tmp_path: Path) -> None:
    index = tmp_path / INDEX
    index.mkdir()
    assert index_problem(tmp_path, index, set()) == f"{INDEX} is not valid JSON"


@pytest.mark.parametrize(
    "document",
    [{"metadata": {}}, {"weight_map": ["a.safetensors"]}, {"weight_map": {"a": 1}}, {"weight_map": None}, [1], "x"],
)
def test_an_index_without_a_usable_weight_map(tmp_path: Path, document: object) -> None:
    index = tmp_path / INDEX
    index.write_text(json.dumps(document))
    assert index_problem(tmp_path, index, set()) == f"{INDEX} has no weight_map of tensor names to shard files"


# --- the same, judged as part of a checkpoint ---------------------------------------------------------


def sharded_checkpoint(run: Path, step: int = 10) -> Path:
    directory = run / f"checkpoint-{step}"
    write_index(directory, write_shards(directory))
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": 1.0}))
    return directory


def test_a_checkpoint_with_a_valid_sharded_set_is_complete(tmp_path: Path) -> None:
    c = read_checkpoint(sharded_checkpoint(tmp_path), 10)
    assert (c.complete, c.incomplete_reason) == (True, None)


def test_a_checkpoint_whose_index_names_a_missing_shard_is_incomplete(tmp_path: Path) -> None:
    directory = sharded_checkpoint(tmp_path)
    (directory / SHARDS[1]).unlink()
    c = read_checkpoint(directory, 10)
    assert c.complete is False
    assert c.incomplete_reason == f"{INDEX} names {SHARDS[1]}, which is missing"


def test_a_checkpoint_with_a_broken_shard_is_incomplete(tmp_path: Path) -> None:
    directory = sharded_checkpoint(tmp_path)
    shard = directory / SHARDS[1]
    shard.write_bytes(shard.read_bytes()[:-4])
    c = read_checkpoint(directory, 10)
    assert c.complete is False
    assert c.incomplete_reason == (f"{SHARDS[1]}: invalid safetensors (incomplete metadata, file not fully covered)")


def test_a_checkpoint_whose_index_names_a_path_with_a_slash_is_incomplete(tmp_path: Path) -> None:
    directory = sharded_checkpoint(tmp_path)
    (directory / "sub").mkdir()
    os.rename(directory / SHARDS[1], directory / "sub" / SHARDS[1])
    weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
    write_index(directory, {k: (f"sub/{v}" if v == SHARDS[1] else v) for k, v in weight_map.items()})
    c = read_checkpoint(directory, 10)
    assert c.incomplete_reason == f"{INDEX} names a shard outside the checkpoint: 'sub/{SHARDS[1]}'"


def test_a_checkpoint_whose_index_is_not_json_is_incomplete(tmp_path: Path) -> None:
    directory = sharded_checkpoint(tmp_path)
    (directory / INDEX).write_text('{"weight_map": {')
    c = read_checkpoint(directory, 10)
    assert c.incomplete_reason == f"{INDEX} is not valid JSON"


def test_a_shard_that_is_a_symlink_is_not_opened_and_not_valid(tmp_path: Path) -> None:
    directory = sharded_checkpoint(tmp_path / "run")
    outside = tmp_path / "elsewhere.safetensors"
    os.rename(directory / SHARDS[1], outside)
    os.symlink(outside, directory / SHARDS[1])
    c = read_checkpoint(directory, 10)
    assert c.incomplete_reason == f"{INDEX} names {SHARDS[1]}, which is not valid"


def test_any_index_file_is_checked_not_only_the_models(tmp_path: Path) -> None:
    directory = sharded_checkpoint(tmp_path)
    write_index(directory, {"adapter.weight": "adapter-00001-of-00001.safetensors"}, "adapter.safetensors.index.json")
    c = read_checkpoint(directory, 10)
    assert c.incomplete_reason == (
        "adapter.safetensors.index.json names adapter-00001-of-00001.safetensors, which is missing"
    )
