# ruff: noqa: E501 (the crafted headers read best one per line)
"""The direct safetensors check (`integrity.header_problem`) gives the safetensors library's verdict.

ckptkeeper reads a safetensors header itself instead of through the library (which imports numpy: a tenth
of a second at every start). A file is complete only when the library, which the Trainer loads it with,
would open it; so the two must agree on every file: the fixtures of the real Trainer, a corpus of crafted
headers (each rule of the format, and where Python's JSON reader and the library's differ), and random
headers with random damage. The messages agree too, word for word, except the detail after `invalid JSON
in header:` (the library quotes its JSON reader's error) and which tensor an `invalid offset` names when
two tensors start at the same offset (the library's choice depends on its hash order).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptkeeper.integrity import DTYPE_BITS, header_problem, safetensors_problem

PROJECT = Path(__file__).resolve().parent.parent
JSON_ERROR = "invalid JSON in header"


def library_problem(path: Path) -> str | None:
    """The library's verdict, as ckptkeeper took it before the direct check (the oracle)."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            f.keys()
    except Exception as e:
        return str(e).removeprefix("Error while deserializing header: ")
    return None


def direct_problem(path: Path) -> str | None:
    with open(path, "rb") as f:
        return header_problem(f, os.fstat(f.fileno()).st_size)


FAMILIES = {
    "header too small": "length",
    "header too large": "length",
    "invalid header length": "length",
    JSON_ERROR: "syntax",
    "invalid UTF-8 in header": "syntax",
}


def family(problem: str) -> str:
    """What kind of problem: the header's length, its text, or the layout it declares."""
    return next((kind for start, kind in FAMILIES.items() if problem.startswith(start)), "layout")


def assert_same_verdict(path: Path, exact: bool = True) -> None:
    """The same verdict; with `exact`, the same words (see the module's docstring for the two exceptions).
    Without it, the same kind of problem: the library checks tensors that share an offset in its hash
    order, so which of their problems it names first varies from run to run."""
    library, direct = library_problem(path), direct_problem(path)
    raw = path.read_bytes()[:300]
    assert (library is None) == (direct is None), f"library: {library!r}, direct: {direct!r}, file: {raw!r}"
    if library is None or direct is None:
        return
    assert family(direct) == family(library), (library, direct)
    if not exact:
        return
    if library.startswith(JSON_ERROR):
        assert direct.startswith(JSON_ERROR), (library, direct)
    elif library.startswith("invalid offset for tensor"):
        assert direct.startswith("invalid offset for tensor"), (library, direct)
    else:
        assert direct == library


def write(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def test_every_safetensors_file_of_the_fixtures() -> None:
    files = sorted((PROJECT / "tests" / "fixtures").rglob("*.safetensors"))
    assert len(files) >= 10, "the fixtures lost their safetensors files?"
    for path in files:
        assert direct_problem(path) is None
        assert_same_verdict(path)


TENSOR = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]'
CRAFTED: dict[str, tuple[bytes, bytes]] = {
    "valid": (b'{"a":' + TENSOR + b"}}", b"\0" * 4),
    "no tensors": (b"{}", b""),
    "padding spaces": (b" {}   ", b""),
    "metadata null": (b'{"__metadata__":null}', b""),
    "metadata of strings": (b'{"__metadata__":{"format":"pt"}}', b""),
    "metadata not strings": (b'{"__metadata__":{"a":1}}', b""),
    "metadata a list": (b'{"__metadata__":[]}', b""),
    "metadata twice": (b'{"__metadata__":{"a":"b"},"__metadata__":{"a":"c"}}', b""),
    "a tensor twice, the last wins": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":' + TENSOR + b"}}", b"\0" * 4),
    "a field twice": (b'{"a":' + TENSOR + b',"dtype":"F32"}}', b"\0" * 4),
    "an unknown field twice": (b'{"a":' + TENSOR + b',"x":1,"x":2}}', b"\0" * 4),
    "NaN in an unknown field": (b'{"a":' + TENSOR + b',"x":NaN}}', b"\0" * 4),
    "1e400 in an unknown field": (b'{"a":' + TENSOR + b',"x":1e400}}', b"\0" * 4),
    "a 400-digit integer in an unknown field": (b'{"a":' + TENSOR + b',"x":' + b"9" * 400 + b"}}", b"\0" * 4),
    "a 300-digit integer in an unknown field": (b'{"a":' + TENSOR + b',"x":' + b"9" * 300 + b"}}", b"\0" * 4),
    "a 5000-digit integer in an unknown field": (b'{"a":' + TENSOR + b',"x":' + b"9" * 5000 + b"}}", b"\0" * 4),
    "-0 in an unknown field": (b'{"a":' + TENSOR + b',"x":-0}}', b"\0" * 4),
    "-0 in a shape": (b'{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', b""),
    "1.0 in a shape": (b'{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', b"\0" * 4),
    "1e0 in a shape": (b'{"a":{"dtype":"F32","shape":[1e0],"data_offsets":[0,4]}}', b"\0" * 4),
    "true in a shape": (b'{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', b"\0" * 4),
    "a negative size": (b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', b"\0" * 4),
    "three offsets": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,4]}}', b"\0" * 4),
    "no offsets": (b'{"a":{"dtype":"F32","shape":[1]}}', b""),
    "an unknown dtype": (b'{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}', b"\0" * 16),
    "a lower-case dtype": (b'{"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
    "a tensor that is null": (b'{"a":null}', b""),
    "an array, not an object": (b"[]", b""),
    "trailing characters": (b"{} x", b""),
    "a byte-order mark": (b"\xef\xbb\xbf{}", b""),
    "invalid UTF-8": (b'{"\xff":' + TENSOR + b"}}", b"\0" * 4),
    "UTF-8 cut short": (b'{"\xe2\x82":' + TENSOR + b"}}", b"\0" * 4),
    "UTF-8 cut short at the end": (b'{"a":' + TENSOR + b'}} \xe2\x82', b"\0" * 4),
    "a UTF-8 surrogate": (b'{"\xed\xa0\x80":' + TENSOR + b"}}", b"\0" * 4),
    "an overlong UTF-8": (b'{"\xc0\xaf":' + TENSOR + b"}}", b"\0" * 4),
    "a lone surrogate escape": (b'{"\\ud800":' + TENSOR + b"}}", b"\0" * 4),
    "a surrogate pair escape": (b'{"\\ud83d\\ude00":' + TENSOR + b"}}", b"\0" * 4),
    "a control character in a name": (b'{"a\x01":' + TENSOR + b"}}", b"\0" * 4),
    "nested 127 deep": (b'{"a":' + TENSOR + b',"x":' + b"[" * 125 + b"]" * 125 + b"}}", b"\0" * 4),
    "nested 128 deep": (b'{"a":' + TENSOR + b',"x":' + b"[" * 126 + b"]" * 126 + b"}}", b"\0" * 4),
    "nested 3000 deep": (b'{"a":' + TENSOR + b',"x":' + b"[" * 3000 + b"]" * 3000 + b"}}", b"\0" * 4),
    "a gap between tensors": (b'{"a":' + TENSOR + b'},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}', b"\0" * 12),
    "overlapping tensors": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8),
    "an offset that ends before it starts": (b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}', b""),
    "a size that is not the shape's": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', b"\0" * 4),
    "data left after the tensors": (b'{"a":' + TENSOR + b"}}", b"\0" * 5),
    "data missing": (b'{"a":' + TENSOR + b"}}", b"\0" * 3),
    "F4 of an odd count": (b'{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', b"\0" * 2),
    "F4 of an even count": (b'{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}', b"\0" * 2),
    "F6 of four": (b'{"a":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[0,3]}}', b"\0" * 3),
    "a shape that overflows before a zero": (b'{"a":{"dtype":"F32","shape":[1099511627776,1099511627776,0],"data_offsets":[0,0]}}', b""),
    "a shape times the dtype that overflows": (b'{"a":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]}}', b""),
    "the largest size": (b'{"a":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,18446744073709551615]}}', b""),
    "a size beyond 64 bits": (b'{"a":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,1]}}', b"\0"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_headers(tmp_path: Path, case: str) -> None:
    header, data = CRAFTED[case]
    assert_same_verdict(write(tmp_path / "model.safetensors", header, data))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "header too small"),
        (b"\0" * 7, "header too small"),
        (struct.pack("<Q", 2**64 - 1), "header too large"),
        (struct.pack("<Q", 100_000_001) + b"{}", "header too large"),
        (struct.pack("<Q", 100_000_000) + b"{}", "invalid header length"),
        (struct.pack("<Q", 3) + b"{}", "invalid header length"),
    ],
)
def test_lengths(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    assert direct_problem(path) == problem
    assert_same_verdict(path)


def test_a_file_that_is_gone_or_unreadable_is_named(tmp_path: Path) -> None:
    assert safetensors_problem(tmp_path / "model.safetensors") == "model.safetensors is missing"
    (tmp_path / "dir.safetensors").mkdir()
    problem = safetensors_problem(tmp_path / "dir.safetensors")
    assert problem == "dir.safetensors: invalid safetensors (a directory, not a regular file)"
    os.mkfifo(tmp_path / "fifo.safetensors")  # never opened: a writer waiting on it is not released
    problem = safetensors_problem(tmp_path / "fifo.safetensors")
    assert problem == "fifo.safetensors: invalid safetensors (a FIFO, not a regular file)"


dtypes = st.sampled_from([*DTYPE_BITS, "F128", "int8"])
shapes = st.lists(st.one_of(st.integers(0, 5), st.sampled_from([2**32, 2**63, 2**64 - 1])), max_size=3)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, int]:
    """A header of up to four tensors laid out end to end (mostly right), and the data size it implies."""
    tensors, offset = {}, 0
    for i in range(draw(st.integers(0, 4))):
        dtype, shape = draw(dtypes), draw(shapes)
        count = 1
        for d in shape:
            count *= d
        size = count * DTYPE_BITS.get(dtype, 8) // 8 if count < 1 << 20 else draw(st.integers(0, 64))
        size += draw(st.sampled_from([0, 0, 0, 0, 1, -1])) if size else 0
        start = offset + draw(st.sampled_from([0, 0, 0, 0, 1, -1])) if offset else 0
        tensors[draw(st.sampled_from([f"t{i}", "t0", "__metadata__", ""]))] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [start, start + size],
        }
        offset = start + size
    if draw(st.booleans()):
        tensors["__metadata__"] = draw(st.sampled_from([{"format": "pt"}, {}, None, {"a": 1}, "pt"]))  # type: ignore[assignment]
    text = json.dumps(tensors, separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])))
    return text.encode() + b" " * draw(st.integers(0, 7)), max(0, offset)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=headers(),
    extra=st.sampled_from([0, 0, 0, 1, -1]),
    damage=st.sampled_from(["none", "none", "flip", "cut"]),
    where=st.floats(0, 1),
)
def test_random_headers_with_random_damage(
    tmp_path: Path, header: tuple[bytes, int], extra: int, damage: str, where: float
) -> None:
    raw, data = header
    content = bytearray(struct.pack("<Q", len(raw)) + raw + b"\0" * max(0, min(data + extra, 1 << 16)))
    at = min(int(where * len(content)), len(content) - 1)
    if damage == "flip":
        content[at] ^= 0x5A  # one damaged byte: in the length, the JSON, or the data
    elif damage == "cut":
        del content[at:]  # cut short, as by a write in progress
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(content))
    assert_same_verdict(path, exact=False)
