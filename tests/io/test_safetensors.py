"""The safetensors reader and atomic writer: dtypes, conversion, sharding, chunking, and corrupt files."""

from __future__ import annotations

import json
import os
import stat
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nibble.errors import NibbleError
from nibble.io import safetensors as st
from nibble.io.files import write_text_atomic
from nibble.io.safetensors import load_file, read_checkpoint, save_file_atomic

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool]  # fmt: skip


def sample(dtype: torch.dtype, shape=(5, 7)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.randint(0, 100, shape, generator=gen).to(dtype)


def test_every_dtype_round_trips_and_interoperates(tmp_path):
    tensors = {f"t.{str(d).removeprefix('torch.')}": sample(d) for d in ALL_DTYPES}
    tensors["empty"] = torch.zeros(0, 3)
    tensors["scalar"] = torch.tensor(3.5)
    path = save_file_atomic(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    ours = load_file(path)
    assert ours.keys() == tensors.keys()
    for name, t in tensors.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name
    with safe_open(str(path), "pt") as f:  # the reference reader reads what we wrote
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)
    save_file(tensors, str(tmp_path / "ref.safetensors"))  # and we read what the reference wrote
    ref = read_checkpoint(tmp_path / "ref.safetensors")
    for name, t in tensors.items():
        assert torch.equal(ref.get_tensor(name), t)


@pytest.mark.parametrize("src", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dst", [torch.float32, torch.float16, torch.bfloat16])
def test_float_conversion_equals_torch(tmp_path, src, dst):
    t = sample(src, (33, 17))
    save_file({"w": t, "ids": torch.arange(4)}, str(tmp_path / "m.safetensors"))
    ckpt = read_checkpoint(tmp_path / "m.safetensors")
    assert torch.equal(ckpt.get_tensor("w", dst), t.to(dst))
    assert ckpt.get_tensor("ids", dst).dtype == torch.int64  # integer tensors are never converted


def test_chunked_and_unaligned_reads(tmp_path, monkeypatch):
    """Tensors longer than a chunk, and data that does not start on an element boundary."""
    u8 = torch.arange(3, dtype=torch.uint8)
    f32 = torch.randn(1000)
    bf16 = torch.randn(301).to(torch.bfloat16)
    header = {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "F32", "shape": [1000], "data_offsets": [3, 4003]},
        "c": {"dtype": "BF16", "shape": [301], "data_offsets": [4003, 4605]},
    }
    raw = json.dumps(header).encode()
    data = u8.numpy().tobytes() + f32.numpy().tobytes() + bf16.view(torch.int16).numpy().tobytes()
    (tmp_path / "odd.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    monkeypatch.setattr(st, "_CHUNK_BYTES", 64)
    ckpt = read_checkpoint(tmp_path / "odd.safetensors")
    assert list(ckpt) == ["a", "b", "c"]
    assert torch.equal(ckpt.get_tensor("a"), u8)
    assert torch.equal(ckpt.get_tensor("b"), f32)
    assert torch.equal(ckpt.get_tensor("c", torch.float32), bf16.float())
    streamed = dict(ckpt.items_stream(torch.float32))
    assert torch.equal(streamed["b"], f32) and streamed["c"].dtype == torch.float32


def test_sharded_directory_and_index(tmp_path):
    save_file({"x": torch.ones(2), "y": torch.zeros(3)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"z": torch.full((4,), 2.0)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {"x": "model-00001-of-00002.safetensors", "y": "model-00001-of-00002.safetensors",
                  "z": "model-00002-of-00002.safetensors"}  # fmt: skip
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ckpt = read_checkpoint(tmp_path)
    assert sorted(ckpt) == ["x", "y", "z"] and ckpt["z"].shape == (4,)
    assert torch.equal(ckpt.get_tensor("z"), torch.full((4,), 2.0))
    weight_map["w"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(NibbleError, match="tensor 'w' is assigned to 'model-00002-of-00002.safetensors'"):
        read_checkpoint(tmp_path)


def test_a_directory_without_an_index_reads_every_file_and_rejects_duplicates(tmp_path):
    save_file({"x": torch.ones(2)}, str(tmp_path / "adapter_model.safetensors"))
    assert list(read_checkpoint(tmp_path)) == ["x"]
    save_file({"x": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(NibbleError, match="tensor 'x' is also in"):
        read_checkpoint(tmp_path)
    with pytest.raises(NibbleError, match="missing tensor 'nope'"):
        read_checkpoint(tmp_path / "other.safetensors").get_tensor("nope")


def _header_file(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


CORRUPT = {
    "empty": (lambda p: p.write_bytes(b""), "truncated or not a safetensors file"),
    "huge header": (lambda p: p.write_bytes(struct.pack("<Q", 10**12) + b"{}"), "header claims"),
    "not json": (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]"), "garbled safetensors header"),
    "not an object": (lambda p: p.write_bytes(struct.pack("<Q", 2) + b"[]"), "garbled safetensors header"),
    "bad entry": (lambda p: _header_file(p, {"w": {"dtype": "F32"}}), "garbled header entry for tensor 'w'"),
    "bad dtype": (
        lambda p: _header_file(p, {"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0"),
        "tensor 'w' has dtype F8_E4M3",
    ),
    "size mismatch": (
        lambda p: _header_file(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(8)),
        "F32[2] needs 8 bytes",
    ),
    "truncated data": (
        lambda p: _header_file(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(10)),
        "truncated: tensor 'w' ends at data byte 16 but the file holds only 10",
    ),
}


@pytest.mark.parametrize("kind", CORRUPT)
def test_corrupt_files_fail_with_one_line_naming_the_file(tmp_path, kind):
    path = tmp_path / "model.safetensors"
    write, fragment = CORRUPT[kind]
    write(path)
    with pytest.raises(NibbleError) as exc:
        read_checkpoint(tmp_path)
    assert str(path) in str(exc.value) and fragment in str(exc.value) and "\n" not in str(exc.value)


def test_missing_paths_and_pickle_only_directories(tmp_path):
    with pytest.raises(NibbleError, match="no such file or directory"):
        read_checkpoint(tmp_path / "nothing")
    with pytest.raises(NibbleError, match="no model.safetensors"):
        read_checkpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(NibbleError, match="pickle weights"):
        read_checkpoint(tmp_path)


def test_file_truncated_after_opening_is_caught_when_read(tmp_path):
    path = save_file_atomic({"w": torch.randn(64)}, tmp_path / "m.safetensors")
    ckpt = read_checkpoint(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(NibbleError, match="truncated while reading tensor 'w'"):
        ckpt.get_tensor("w")


def test_atomic_save_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "w.safetensors"
    save_file_atomic({"a": torch.ones(3)}, path)
    weight = torch.randn(4, 4)
    save_file_atomic({"embed": weight, "head": weight, "view": weight[1:3]}, path)  # shared storage is copied
    out = load_file(path)
    assert (
        torch.equal(out["embed"], weight) and torch.equal(out["head"], weight) and torch.equal(out["view"], weight[1:3])
    )
    with pytest.raises(NibbleError, match="'bad' is a list"):
        save_file_atomic({"bad": [1, 2]}, path)
    with pytest.raises(NibbleError, match="metadata must map str to str"):
        save_file_atomic({"a": torch.ones(1)}, path, metadata={"step": 3})
    assert torch.equal(load_file(path)["embed"], weight)  # the failed writes left the old file intact
    assert [p.name for p in path.parent.iterdir()] == ["w.safetensors"]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_saved_file_mode_follows_the_umask(tmp_path, mask):
    # safetensors creates its file 0600; outputs must get what open() gives, as the JSON and text outputs do
    old = os.umask(mask)
    try:
        save_file_atomic({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
        write_text_atomic(tmp_path / "t.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "t.txt").stat().st_mode) == 0o666 & ~mask
