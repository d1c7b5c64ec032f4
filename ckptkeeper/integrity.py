"""safetensors checks: the only module that imports safetensors.

`safe_open` memory-maps the file and validates the header (length, JSON, dtypes, offsets that tile the data
and cover the file exactly) without reading tensor data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

INDEX_SUFFIX = ".safetensors.index.json"


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


def index_problem(directory: Path, index: Path, valid_shards: set[str]) -> str | None:
    """Check that a `*.safetensors.index.json` names only shards present in `valid_shards`."""
    try:
        raw = json.loads(index.read_bytes())
    except (OSError, ValueError, RecursionError):
        return f"{index.name} is not valid JSON"
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return f"{index.name} has no weight_map of tensor names to shard files"
    for shard in sorted(set(weight_map.values())):
        if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            return f"{index.name} names a shard outside the checkpoint: {shard!r}"
        if shard not in valid_shards:
            present = (directory / shard).is_file()
            return f"{index.name} names {shard}, which is {'not valid' if present else 'missing'}"
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
