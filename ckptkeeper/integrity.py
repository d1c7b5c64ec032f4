"""safetensors checks: the only module that imports safetensors.

`safe_open` memory-maps the file and validates the header (length, JSON, dtypes, offsets that tile the data
and cover the file exactly) without reading tensor data.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from pathlib import Path

INDEX_SUFFIX = ".safetensors.index.json"
# A real index is at most a few MB, even for the largest models; reading stops here (a sparse or endless file).
MAX_INDEX_BYTES = 64 << 20
# Python's default limit on the digits of an integer read from text (what transformers' json.load reads).
MAX_INT_DIGITS = 4300
# A shard name longer than a file name can be is shown cut (the index may hold megabytes of one).
SHOWN_NAME_CHARS = 255


def safetensors_problem(path: Path) -> str | None:
    """None when `path` is a valid safetensors file, else a short reason."""
    from safetensors import safe_open  # imported lazily: it pulls in numpy

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            f.keys()
    except FileNotFoundError:
        return f"{path.name} is missing"
    except Exception as e:  # SafetensorError, OSError, ...: all mean "not a usable file"
        detail = str(e).removeprefix("Error while deserializing header: ")
        return f"{path.name}: invalid safetensors ({detail})"
    return None


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
    if not stat.S_ISREG(mode := os.lstat(index).st_mode) and not stat.S_ISDIR(mode):
        raise _NotRegular
    try:  # O_NOFOLLOW and O_NONBLOCK again, in case the entry was replaced since the lstat
        fd = os.open(index, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise _NotRegular from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(index))
        if not stat.S_ISREG(st.st_mode):
            raise _NotRegular
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
