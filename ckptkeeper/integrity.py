"""Integrity checks of what a checkpoint holds: safetensors headers and shard indexes.

A safetensors file is checked directly against its format (`header_problem`), with the checks the
safetensors library makes, worded as it words them; tests hold the two to the same verdict on every
fixture and on a hostile corpus. The library itself is imported only to write files (`encode_safetensors`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import sys
from pathlib import Path
from typing import BinaryIO, Protocol

from ckptkeeper.regular import NotRegular, open_regular

INDEX_SUFFIX = ".safetensors.index.json"
LENGTH_BYTES = 8  # the header's length, a little-endian u64, opens the file
MAX_HEADER_BYTES = 100_000_000  # the library's limit
MAX_USIZE = (1 << 64) - 1
MAX_JSON_DEPTH = 127  # the library's JSON reader (serde_json) refuses 128 levels of nesting
OVERFLOW = "overflow computing buffer size from shape and/or element type"
# Bits per element of each dtype the library knows (its `Dtype::bitsize`).
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip
SUB_BYTE_SLICE = (
    "The slice is slicing for subbytes dtypes, and the slice does not end up at a byte boundary, this is invalid."
)
# A real index is at most a few MB, even for the largest models; reading stops here (a sparse or endless file).
MAX_INDEX_BYTES = 64 << 20
# Python's default limit on the digits of an integer read from text (what transformers' json.load reads).
MAX_INT_DIGITS = 4300
# A shard name longer than a file name can be is shown cut (the index may hold megabytes of one).
SHOWN_NAME_CHARS = 255


def safetensors_problem(path: Path) -> str | None:
    """None when `path` is a valid safetensors file, else a short reason (worded as the library words it)."""
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        return f"{path.name} is missing"
    except NotRegular as e:
        return f"{path.name}: invalid safetensors ({e.kind}, not a regular file)"
    except OSError as e:
        return f"{path.name}: invalid safetensors (I/O error: {e.strerror or e})"
    return open_safetensors_problem(fd, path.name)


def open_safetensors_problem(fd: int, name: str) -> str | None:
    """`safetensors_problem` of the file open as `fd` (a regular file, opened by the caller; closed here)."""
    try:
        detail = header_problem(_FdReader(fd), os.fstat(fd).st_size)
    except OSError as e:
        detail = f"I/O error: {e.strerror or e}"
    finally:
        os.close(fd)
    return None if detail is None else f"{name}: invalid safetensors ({detail})"


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


class _FdReader:
    """read(n) of a descriptor as a buffered file reads: up to n bytes, fewer only at the end of the file (a read
    may return less than asked for on some filesystems). Without os.fdopen's buffer object and its three system
    calls (fstat, the isatty ioctl, lseek), most of what opening a small file cost."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def read(self, size: int, /) -> bytes:
        chunks: list[bytes] = []
        while size > 0 and (chunk := os.read(self._fd, size)):
            chunks.append(chunk)
            size -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def header_problem(f: _Readable | BinaryIO, size: int) -> str | None:
    """Why the safetensors file open as `f`, of `size` bytes, is not valid; None when it is. The format's
    own checks, as the safetensors library makes them (its Rust `read_metadata` and `Metadata::validate`):
    an 8-byte little-endian header length of at most 100 MB, within the file; a UTF-8 JSON object of tensors
    (`dtype`, `shape`, `data_offsets`) and an optional `__metadata__` of strings; offsets that, sorted, tile
    the data from 0 with no gap or overlap, each tensor exactly its shape times its dtype's size; and the
    data ending exactly at the end of the file. Only the header is read (tensor data never is), and nothing
    is imported: the library brings numpy with it, a tenth of a second at every start."""
    try:
        n, raw = _read_header(f, size)
        end = _data_end(_header_tensors(raw))
    except _HeaderError as e:
        return str(e)
    return None if LENGTH_BYTES + n + end == size else "incomplete metadata, file not fully covered"


def _read_header(f: _Readable | BinaryIO, size: int) -> tuple[int, bytes]:
    """The header's length and bytes."""
    if size < LENGTH_BYTES:
        raise _HeaderError("header too small")
    n = int.from_bytes(f.read(LENGTH_BYTES), "little")
    if n > MAX_HEADER_BYTES:
        raise _HeaderError("header too large")
    raw = f.read(n) if LENGTH_BYTES + n <= size else b""
    if len(raw) != n:  # beyond the file, or the file shrank since the fstat (a write in progress)
        raise _HeaderError("invalid header length")
    return n, raw


def _data_end(tensors: list[tuple[str, str, list[int], tuple[int, int]]]) -> int:
    """Where the tensors' data ends, once checked to tile it from 0, each its shape times its dtype's size."""
    end = 0
    for name, dtype, shape, (begin, stop) in sorted(tensors, key=lambda t: t[3]):
        if begin != end or stop < begin:
            raise _HeaderError(f"invalid offset for tensor `{name}`")
        end = stop
        bits = _elements(shape) * DTYPE_BITS[dtype]
        if bits > MAX_USIZE:
            raise _HeaderError(OVERFLOW)
        if bits % 8:
            raise _HeaderError(SUB_BYTE_SLICE)
        if stop - begin != bits // 8:
            raise _HeaderError("invalid shape, data type, or offset for tensor")
    return end


class _HeaderError(Exception):
    """The header is not what the format allows; the message says why, as the library does."""


def _header_tensors(raw: bytes) -> list[tuple[str, str, list[int], tuple[int, int]]]:
    """(name, dtype, shape, data_offsets) of each tensor the header declares."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # worded as Rust's Utf8Error, which the library shows
        if e.reason == "unexpected end of data":
            raise _HeaderError(
                f"invalid UTF-8 in header: incomplete utf-8 byte sequence from index {e.start}"
            ) from None
        raise _HeaderError(
            f"invalid UTF-8 in header: invalid utf-8 sequence of {e.end - e.start} bytes from index {e.start}"
        ) from None
    try:
        header = _decode_header(text)
    except (ValueError, RecursionError, _NumberTooLong) as e:
        raise _HeaderError(f"invalid JSON in header: {e}") from None
    if not isinstance(header, dict):
        raise _HeaderError("invalid JSON in header: not an object")
    # Each level of nesting opens with a bracket: text with no more brackets than the limit cannot nest deeper.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(header) > MAX_JSON_DEPTH:
        raise _HeaderError("invalid JSON in header: recursion limit exceeded")
    if isinstance(header, _Object) and "__metadata__" in header.repeated:
        raise _HeaderError("invalid JSON in header: duplicate field `__metadata__`")
    meta = header.pop("__metadata__", None)
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        raise _HeaderError("invalid JSON in header: __metadata__ is not a map of strings")
    if "\\u" in text:  # a lone surrogate comes from a \u escape only: decoded UTF-8 holds none
        _no_lone_surrogates(header, meta)
    return [(name, *_tensor_info(info)) for name, info in header.items()]


def _tensor_info(info: object) -> tuple[str, list[int], tuple[int, int]]:
    if not isinstance(info, dict):
        raise _HeaderError("invalid JSON in header: a tensor is not an object")
    if isinstance(info, _Object) and (repeated := info.repeated & {"dtype", "shape", "data_offsets"}):
        raise _HeaderError(f"invalid JSON in header: duplicate field `{min(repeated)}`")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _HeaderError(f"invalid JSON in header: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_usize(d) for d in shape):
        raise _HeaderError("invalid JSON in header: shape is not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_usize(o) for o in offsets):
        raise _HeaderError("invalid JSON in header: data_offsets is not two sizes")
    return dtype, shape, (offsets[0], offsets[1])


def _usize(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_USIZE


def _elements(shape: list[int]) -> int:
    """The product of `shape`, overflowing (as the library's checked fold does) if any partial product does."""
    n = 1
    for d in shape:
        n *= d
        if n > MAX_USIZE:
            raise _HeaderError(OVERFLOW)
    return n


class _Object(dict[str, object]):
    """A JSON object, with the keys it gave more than once (the last value wins, as in the library, except
    for a tensor's own fields and `__metadata__`, which the library refuses twice)."""

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        super().__init__(pairs)
        self.repeated: set[str] = set()
        if len(self) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    self.repeated.add(key)
                seen.add(key)


def _json_int(digits: str) -> int | float:
    """An integer as the library's JSON reader takes it: `-0` is a float there (no size may be -0), and an
    integer beyond a float's range is out of range even where nothing reads it."""
    if digits == "-0":
        return -0.0
    value = _parse_int(digits)
    if abs(value) > sys.float_info.max:
        raise ValueError("number out of range")
    return value


def _depth(value: object) -> int:
    """How deeply arrays and objects nest in `value` (a bare value is 0; `{}` is 1), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            todo.extend((child, level + 1) for child in children)
    return deepest


def _not_json(constant: str) -> float:
    raise ValueError(f"{constant} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


# One decoder for every header (json.loads with these arguments built a new one per call).
_HEADER_DECODER = json.JSONDecoder(
    parse_constant=_not_json, parse_float=_finite_float, parse_int=_json_int, object_pairs_hook=_Object
)


def _decode_header(text: str) -> object:
    """json.loads(text) with the hooks above: its own refusal of a byte order mark first, with its message."""
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _HEADER_DECODER.decode(text)


def _no_lone_surrogates(*values: object) -> None:
    """JSON escapes can spell a lone UTF-16 surrogate (`\\ud800`), which Python's json accepts and the
    library's (serde_json) does not: such a header is invalid."""
    for value in values:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _HeaderError("invalid JSON in header: lone surrogate in a string") from None
        elif isinstance(value, dict):
            _no_lone_surrogates(*value.keys(), *value.values())
        elif isinstance(value, list):
            _no_lone_surrogates(*value)


class _NotRegular(Exception):
    pass


class _TooLarge(Exception):
    pass


class _NumberTooLong(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class _BadIndex(Exception):
    """An index that cannot be read as JSON; the message is the reason, naming the index."""


def _parse_int(digits: str) -> int:
    """json's integer conversion, with an integer of over MAX_INT_DIGITS digits (or over a lower limit set
    for the interpreter) as _NumberTooLong, not int()'s bare ValueError: even with the interpreter's limit
    off, since a long integer converts in quadratic time."""
    if len(digits) - digits.startswith("-") > MAX_INT_DIGITS:
        raise _NumberTooLong(MAX_INT_DIGITS)
    try:
        return int(digits)
    except ValueError:
        raise _NumberTooLong(sys.get_int_max_str_digits()) from None


def _shown(name: str) -> str:
    """A name read from a file, for a reason: as it is when printable, else as its repr (a newline in it
    would fake a row of the plan), cut after SHOWN_NAME_CHARS characters."""
    text = name if name.isprintable() else repr(name)
    return text if len(text) <= SHOWN_NAME_CHARS else text[:SHOWN_NAME_CHARS] + "..."


def _read_index(index: Path) -> bytes:
    """The bytes of a regular file. A symlink is not followed (it may lead out of the root, or to /dev/zero),
    a FIFO is not waited on, a device is not opened, and no more than MAX_INDEX_BYTES are read (a sparse file
    of any size)."""
    try:
        fd = open_regular(index)
    except NotRegular as e:
        if stat.S_ISDIR(e.mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(index)) from None
        raise _NotRegular from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        data = f.read(MAX_INDEX_BYTES + 1) if st.st_size <= MAX_INDEX_BYTES else b""
    if st.st_size > MAX_INDEX_BYTES or len(data) > MAX_INDEX_BYTES:
        raise _TooLarge
    return data


def index_problem(directory: Path, index: Path, valid_shards: set[str]) -> str | None:
    """Check that a `*.safetensors.index.json` names only shards present in `valid_shards`.

    Any content gives a reason or None, never an exception: JSON that does not parse (bad bytes, too deep)
    is "not valid JSON"; an integer of over 4300 digits (Python's default limit), which transformers'
    json.load cannot read either, is "a number too long to read". Numbers are otherwise
    ignored (only weight_map's strings count), so `1e999`, NaN or a 401-digit integer in `metadata` is fine.
    Shard names are shown escaped when not printable and cut when longer than a file name can be."""
    try:
        raw = _load_index(index)
    except _BadIndex as e:
        return str(e)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return f"{index.name} has no weight_map of tensor names to shard files"
    return _shard_problem(directory, index.name, sorted(set(weight_map.values())), valid_shards)


def _load_index(index: Path) -> object:
    """The JSON value of an index file, or _BadIndex with the reason it cannot be read."""
    try:
        data = _read_index(index)
    except _NotRegular:
        raise _BadIndex(f"{index.name} is not a regular file") from None
    except _TooLarge:
        raise _BadIndex(f"{index.name} is larger than {MAX_INDEX_BYTES >> 20} MiB, too large for an index") from None
    except OSError:
        raise _BadIndex(f"{index.name} is not valid JSON") from None
    try:
        return json.loads(data, parse_int=_parse_int)
    except _NumberTooLong as e:
        raise _BadIndex(f"{index.name} holds a number too long to read (over {e.limit} digits)") from None
    except (ValueError, RecursionError):
        raise _BadIndex(f"{index.name} is not valid JSON") from None


def _shard_problem(directory: Path, index_name: str, shards: list[str], valid_shards: set[str]) -> str | None:
    """The first of `shards` (the index's shard names, sorted) that is outside the checkpoint or not among
    `valid_shards`, as a reason; None when all are valid."""
    for shard in shards:
        if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            return f"{index_name} names a shard outside the checkpoint: {_shown(repr(shard))}"
        if shard not in valid_shards:
            try:
                present = (directory / shard).is_file()
            except OSError:  # a name longer than the filesystem allows (ENAMETOOLONG): no such file
                present = False
            return f"{index_name} names {_shown(shard)}, which is {'not valid' if present else 'missing'}"
    return None


def encode_safetensors(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str]) -> bytes:
    """Serialize raw tensors {name: (dtype, shape, data)} with the safetensors library."""
    import ctypes

    from safetensors import TensorSpec, serialize

    buffers = {name: ctypes.create_string_buffer(data, len(data)) for name, (_, _, data) in tensors.items()}
    specs = {
        name: TensorSpec(dtype=dtype, shape=shape, data_ptr=ctypes.addressof(buffers[name]), data_len=len(data))
        for name, (dtype, shape, data) in tensors.items()
    }
    return bytes(serialize(specs, metadata=metadata))
