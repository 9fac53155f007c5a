"""A safetensors file read by hand: its header alone (names, shapes, dtypes, metadata: what a
load checks before it reads a byte of data), and rows of a tensor from their byte range
(what an expert-parallel rank reads of the experts it keeps).

    file = 8 bytes (header length n, little endian) + n bytes of JSON header + the data
    header = {name: {"dtype", "shape", "data_offsets": [start, stop]}, "__metadata__": {...}}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from moefy.errors import LoadError

# the dtypes a row read takes (safetensors' names)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16}


@dataclass(frozen=True)
class Header:
    """A safetensors file's header: ``tensors`` {name: (shape, dtype name)}, ``metadata``."""

    tensors: dict[str, tuple[tuple[int, ...], str]]
    metadata: dict[str, str]


def is_floating(dtype: str) -> bool:
    """Whether a safetensors dtype name (``F32``, ``BF16``, ``F8_E4M3``, ``I64`` ...) is a
    floating-point one."""
    return dtype.startswith("F") or dtype == "BF16"


def read_header(path: Path) -> Header:
    """The header of the safetensors file ``path``, checked against the file's size; a missing,
    damaged or truncated file raises ``LoadError``.

    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> f = Path(tempfile.mkdtemp()) / "t.safetensors"
    >>> save_file({"w": torch.zeros(2, 3)}, f, metadata={"k": "v"})
    >>> read_header(f)
    Header(tensors={'w': ((2, 3), 'F32')}, metadata={'k': 'v'})
    """
    if not path.is_file():
        raise LoadError(f"{path.parent} holds no {path.name}: the weights are missing")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        out, end = {}, 0
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, stop = meta["data_offsets"]
            end = max(end, stop)
            out[name] = (tuple(meta["shape"]), meta["dtype"])
        if 8 + n + end > size:
            raise ValueError(f"the file ends at byte {size}, its tensors need {8 + n + end}")
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError("__metadata__ is not a JSON object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise LoadError(f"{path} is damaged or truncated ({exc}); save the model again") from exc
    return Header(out, metadata)


def read_rows(path: Path, rows: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """{name: rows [start, stop) of that tensor}, each read from its byte range in the file
    alone (safetensors' own slicing reads the whole tensor first). Raises ValueError for a
    dtype it does not read or a file cut short (the caller says which file)."""
    if not rows:
        return {}
    out = {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        for name, (start, stop) in rows.items():
            meta = header[name]
            if meta["dtype"] not in DTYPES:
                raise ValueError(f"{name} is stored as {meta['dtype']}, which a sharded load "
                                 "does not read")
            dtype, shape = DTYPES[meta["dtype"]], meta["shape"]
            row = math.prod(shape[1:]) * dtype.itemsize
            f.seek(8 + n + meta["data_offsets"][0] + start * row)
            data = bytearray(f.read((stop - start) * row))
            if len(data) != (stop - start) * row:
                raise ValueError(f"{name} is cut short")
            out[name] = torch.frombuffer(data, dtype=dtype).reshape(stop - start, *shape[1:]) \
                if data else torch.empty(0, *shape[1:], dtype=dtype)
    return out
