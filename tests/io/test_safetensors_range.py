"""The hand-read safetensors header and byte-range rows equal what safetensors itself reads;
a damaged file is a LoadError."""

import json

import pytest
import torch
from safetensors.torch import save_file

from moefy.errors import LoadError
from moefy.io.safetensors_range import is_floating, read_header, read_rows

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_equal_the_slice(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(6, 3, 2, generator=g).to(dtype), "b": torch.randn(4, generator=g)}
    save_file(tensors, tmp_path / "t.safetensors")
    rows = read_rows(tmp_path / "t.safetensors", {"w": (2, 5), "b": (3, 3)})
    assert torch.equal(rows["w"], tensors["w"][2:5]) and rows["b"].shape == (0,)


def test_header_names_shapes_dtypes_and_metadata(tmp_path):
    save_file({"w": torch.zeros(2, 3), "i": torch.zeros(4, dtype=torch.int64)},
              tmp_path / "t.safetensors", metadata={"moefy": "abc"})
    header = read_header(tmp_path / "t.safetensors")
    assert header.tensors == {"w": ((2, 3), "F32"), "i": ((4,), "I64")}
    assert header.metadata["moefy"] == "abc"
    assert [is_floating(d) for d in ("F32", "BF16", "F8_E4M3", "I64", "BOOL")] == [
        True, True, True, False, False]


def _with_header(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("damage, message", [
    ("cut", "its tensors need"),
    ("metadata", "__metadata__ is not a JSON object"),
    ("not-json", "damaged or truncated"),
    ("missing", "holds no t.safetensors"),
])
def test_damaged_files(tmp_path, damage, message):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.zeros(8)}, path)
    if damage == "cut":
        path.write_bytes(path.read_bytes()[:-4])
    elif damage == "metadata":
        _with_header(path, {"__metadata__": ["x"], "w": {"dtype": "F32", "shape": [1],
                                                          "data_offsets": [0, 4]}}, b"\0" * 4)
    elif damage == "not-json":
        path.write_bytes((2).to_bytes(8, "little") + b"{x")
    else:
        path.unlink()
    with pytest.raises(LoadError, match=message):
        read_header(path)
