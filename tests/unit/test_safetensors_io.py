"""mergebake.safetensors_io against the safetensors library: the dtype table, the header
parser, the pread reader and the NaN/Inf scanner (FP8 included)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebake import MergebakeError
from mergebake.safetensors_io import (
    DTYPES,
    FLOAT_DTYPES,
    SafetensorsFile,
    TensorReader,
    count_nonfinite,
    scan_nonfinite,
    torch_dtype,
)


def test_the_dtype_table_is_what_safetensors_writes(tmp_path):
    tensors = {code: torch.zeros(2, 3, dtype=torch_dtype(code)) for code in DTYPES}
    save_file(tensors, tmp_path / "all.safetensors")
    st = SafetensorsFile.open(tmp_path / "all.safetensors")
    for code, t in tensors.items():
        info = st.tensors[code]
        assert info.dtype == code  # the code safetensors wrote for this torch dtype
        assert DTYPES[code].nbytes == t.element_size() and info.nbytes == 6 * t.element_size()
        assert DTYPES[code].is_float == t.is_floating_point()
    assert {"F8_E4M3", "F8_E5M2", "BF16"} <= FLOAT_DTYPES and "I8" not in FLOAT_DTYPES


def test_reader_gives_the_library_s_tensors(tmp_path):
    want = {
        "a": torch.randn(4, 5, dtype=torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(3).to(torch.float8_e4m3fn),
        "s": torch.tensor(1.5),
    }
    save_file(want, tmp_path / "x.safetensors", metadata={"format": "pt"})
    st = SafetensorsFile.open(tmp_path / "x.safetensors")
    assert st.metadata == {"format": "pt"}
    assert [i.start for i in st.tensors.values()] == sorted(i.start for i in st.tensors.values())
    loaded = load_file(tmp_path / "x.safetensors")
    buffer = torch.empty(1024, dtype=torch.uint8)
    with TensorReader() as reader:
        for name in want:
            for got in (reader.read(st.path, name), reader.read(st.path, name, buffer).clone()):
                assert got.dtype == loaded[name].dtype and got.shape == loaded[name].shape
                assert torch.equal(
                    got.reshape(-1).view(torch.uint8), loaded[name].reshape(-1).view(torch.uint8)
                )


def test_scanner_counts_nan_and_inf_in_every_float_dtype(tmp_path):
    nan = torch.full((2, 4), 1.0)
    nan[0, 1] = float("nan")
    inf = torch.ones(3, 3, dtype=torch.float16)
    inf[2, 2] = float("inf")
    inf[1, 0] = -float("inf")
    big = torch.full((64,), 60000.0, dtype=torch.float16)  # finite, but its sum overflows
    tensors = {
        "fp8": nan.to(torch.float8_e4m3fn),  # e4m3fn has NaN and no Inf
        "fp8_e5m2": inf.float().to(torch.float8_e5m2),
        "bf16": nan.to(torch.bfloat16),
        "fp16_inf": inf,
        "fp16_big": big,
        "ints": torch.arange(5),
        "fine": torch.randn(8, 8),
    }
    for name, t in tensors.items():  # the in-memory check against torch.isfinite
        want = int((~torch.isfinite(t.float())).sum()) if t.is_floating_point() else 0
        assert count_nonfinite(t) == want, name
    save_file(tensors, tmp_path / "a.safetensors")
    found = scan_nonfinite(SafetensorsFile.open(tmp_path / "a.safetensors").tensors)
    assert found == [("bf16", 1, 8), ("fp16_inf", 2, 9), ("fp8", 1, 8), ("fp8_e5m2", 2, 9)]


def _raw(tmp_path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    path = tmp_path / "raw.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_broken_headers_name_the_file(tmp_path):
    ok = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    assert SafetensorsFile.open(_raw(tmp_path, ok, b"\0" * 8)).tensors["w"].nbytes == 8
    path = _raw(tmp_path, ok, b"\0" * 4)
    with pytest.raises(MergebakeError, match=rf"^{path}: tensor 'w' ends at byte 8 .*truncated"):
        SafetensorsFile.open(path)
    wrong = {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    with pytest.raises(MergebakeError, match=r"data_offsets \[0, 8\], which do not hold F32 \[3\]"):
        SafetensorsFile.open(_raw(tmp_path, wrong, b"\0" * 8))
    path.write_bytes(b"\x05")
    with pytest.raises(MergebakeError, match=rf"^{path}: not a readable safetensors file"):
        SafetensorsFile.open(path)
