"""The bounded GGUF reader: the same fields and tensors as ``gguf.GGUFReader`` on good files (the reference),
and every size a bad file states checked against the file before anything is allocated."""

import struct
import tracemalloc

import gguf
import numpy as np
import pytest

from gguf_files import tiny_model, write_gguf
from nibble.errors import NibbleError
from nibble.io.gguf import open_gguf


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "qwen3.gguf"
    return write_gguf(path, tiny_model("qwen3", tie_word_embeddings=True))


def same_as_gguf_package(path):
    from nibble.io.gguf.reader import read_gguf

    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    assert list(ours.fields) == [k for k in theirs.fields if not k.startswith("GGUF.")]
    for key, field in ours.fields.items():
        assert field.contents() == theirs.fields[key].contents(), key
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, a.shape.tolist()) == (b.name, b.tensor_type, b.shape.tolist())
        assert (a.n_elements, a.n_bytes, a.data_offset) == (b.n_elements, b.n_bytes, b.data_offset)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and np.array_equal(a.data, b.data)


def test_a_model_file_reads_as_the_gguf_package_reads_it(model_file):
    same_as_gguf_package(model_file)


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_every_value_type_and_byte_order(tmp_path, endian):
    path = tmp_path / "values.gguf"
    writer = gguf.GGUFWriter(path, "llama", endianess=endian)
    writer.add_uint8("u8", 250)
    writer.add_int8("i8", -5)
    writer.add_uint16("u16", 65000)
    writer.add_int16("i16", -300)
    writer.add_uint32("u32", 4_000_000_000)
    writer.add_int32("i32", -70000)
    writer.add_float32("f32", 0.1)
    writer.add_uint64("u64", 2**63)
    writer.add_int64("i64", -(2**40))
    writer.add_float64("f64", 1e-300)
    writer.add_bool("yes", True)
    writer.add_string("text", "naïve ☃")
    writer.add_array("ints", [1, 2, 3])
    writer.add_array("floats", [0.5, 1.5])
    writer.add_array("words", ["a", "", "ünï"])
    writer.add_tensor("w", np.arange(64, dtype=np.float32).reshape(2, 32))
    writer.add_tensor("h", np.arange(32, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    same_as_gguf_package(path)


def header(kv_count: int, tensor_count: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensor_count, kv_count)


def key(name: str, value_type: int) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", value_type)


ARCH = key("general.architecture", 8) + struct.pack("<Q", 5) + b"llama"


def tensor_info(name: str, dims: list[int], ggml_type: int, offset: int) -> bytes:
    info = struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", len(dims))
    return info + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ggml_type, offset)


BAD = {
    # an array header claiming 2**40 u8 elements in a file of a few dozen bytes: the gguf package's reader
    # walked it element by element, allocating for each
    "huge-array": (header(2) + ARCH + key("tokens", 9) + struct.pack("<IQ", 0, 2**40) + b"\0" * 64,
                   "metadata 'tokens' (1099511627776 elements) needs 1099511627776 bytes"),
    "huge-string-array": (header(2) + ARCH + key("tokens", 9) + struct.pack("<IQ", 8, 2**40),
                          "needs 8796093022208 bytes"),
    "long-string": (header(1) + key("general.architecture", 8) + struct.pack("<Q", 2**62),
                    "metadata 'general.architecture' needs 4611686018427387904 bytes"),
    "long-key": (header(1) + struct.pack("<Q", 2**50) + b"\0" * 16, "a metadata key needs 1125899906842624 bytes"),
    "many-entries": (header(2**60) + ARCH, "1152921504606846976 metadata entries needs"),
    "many-tensors": (header(1, 2**58) + ARCH, "288230376151711744 tensor entries needs"),
    "value-type": (header(2) + ARCH + key("x", 13) + b"\0" * 8, "metadata 'x' has unknown value type 13"),
    "item-type": (header(2) + ARCH + key("x", 9) + struct.pack("<IQ", 77, 1), "array of unknown value type 77"),
    "nesting": (header(2) + ARCH + key("x", 9) + struct.pack("<IQ", 9, 1) * 5 + b"\0" * 64, "nests arrays more"),
    "duplicate-key": (header(2) + ARCH + ARCH, "metadata key 'general.architecture' appears twice"),
    "dims": (header(1, 1) + ARCH + tensor_info("w", [1] * 5, 0, 0), "tensor 'w' has 5 dimensions"),
    "tensor-type": (header(1, 1) + ARCH + tensor_info("w", [4], 99, 0), "tensor 'w' has unknown type 99"),
    "tensor-past-end": (header(1, 1) + ARCH + tensor_info("w", [2**20, 2**20], 0, 0),
                        "tensor 'w' needs bytes"),
    "blocks": (header(1, 1) + ARCH + tensor_info("w", [33], 2, 0), "rows of 33 are not whole Q4_0 blocks"),
    "alignment": (header(2) + ARCH + key("general.alignment", 4) + struct.pack("<I", 3),
                  "general.alignment must be a power of two"),
    "version": (b"GGUF" + struct.pack("<IQQ", 7, 0, 0), "GGUF version 7 is not supported"),
    "bad-utf8-key": (header(1) + struct.pack("<Q", 2) + b"\xff\xfe" + b"\0" * 16, "a metadata key at offset 32 is not"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_size_the_file_cannot_hold_is_refused_before_allocating(tmp_path, name):
    data, message = BAD[name]
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(NibbleError) as exc:
            open_gguf(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    text = str(exc.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text
    assert peak < 1 << 20  # a few dozen bytes of file: well under a megabyte of memory


def test_metadata_arrays_are_bounded_by_the_file_size(tmp_path):
    # 1.2M one-byte elements: the bytes are there, but a Python list of them costs ~40 bytes each
    count = (1 << 20) + (1 << 18)
    path = tmp_path / "bytes.gguf"
    path.write_bytes(header(2) + ARCH + key("x", 9) + struct.pack("<IQ", 0, count) + bytes(count))
    with pytest.raises(NibbleError, match=rf"metadata arrays hold {count} elements, more than {1 << 20}"):
        open_gguf(path)


def test_reading_is_lean(model_file):
    from nibble.io.gguf.reader import read_gguf

    tracemalloc.start()
    try:
        read_gguf(model_file).fields["tokenizer.ggml.tokens"].contents()
        ours = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ours < 2 * model_file.stat().st_size
