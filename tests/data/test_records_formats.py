"""Records from every format: JSONL, CSV, Parquet, Arrow (file and stream) and datasets directories give the same
rows; problems name the file and row; a missing optional package is one line naming it."""

from __future__ import annotations

import json
import sys

import pytest

from nibble.data.records import place, read_records
from nibble.errors import NibbleError

ROWS = [
    {"text": "good, fine", "label": "pos", "id": 7},
    {"text": "bad\nworse", "label": "neg", "id": 8},
    {"text": "so-so", "label": "pos", "id": 9},
]


def write_formats(root):
    """The same rows as JSONL, Parquet, Arrow file and stream formats, and a datasets directory."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, root / "d.parquet", row_group_size=2)  # rows span two row groups
    with pa.ipc.new_file(root / "file.arrow", table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    with pa.ipc.new_stream(root / "stream.arrow", table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    datasets.Dataset.from_list(ROWS).save_to_disk(root / "saved")
    return root


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    return write_formats(tmp_path_factory.mktemp("formats"))


@pytest.mark.parametrize("name", ["d.parquet", "file.arrow", "stream.arrow", "saved"])
def test_every_format_reads_the_same_rows_numbered_from_one(formats, name):
    assert list(read_records(formats / name)) == [(i, row) for i, row in enumerate(ROWS, 1)]
    assert list(read_records(formats / "d.jsonl")) == [(i, row) for i, row in enumerate(ROWS, 1)]
    assert place(formats / name, 2) == f"{formats / name} row 2"
    assert place(formats / "d.jsonl", 2) == f"{formats / 'd.jsonl'} line 2"


def test_dataset_dict_directories_name_their_splits(formats, tmp_path):
    import datasets

    saved = datasets.load_from_disk(str(formats / "saved"))
    datasets.DatasetDict({"train": saved, "test": saved}).save_to_disk(tmp_path / "dict")
    with pytest.raises(NibbleError, match=r"dict: a DatasetDict with splits test, train; pass one split's directory"):
        list(read_records(tmp_path / "dict"))
    assert [r for _, r in read_records(tmp_path / "dict" / "train")] == ROWS
    (tmp_path / "plain").mkdir()
    with pytest.raises(NibbleError, match=r"plain: a directory, but not one written by datasets' save_to_disk"):
        list(read_records(tmp_path / "plain"))


@pytest.mark.parametrize("name", ["bad.parquet", "bad.arrow"])
def test_a_corrupt_file_is_one_line(tmp_path, name):
    (tmp_path / name).write_bytes(b"not columnar data at all")
    with pytest.raises(NibbleError, match=rf"{name}: not a readable (Parquet|Arrow) file"):
        list(read_records(tmp_path / name))


@pytest.mark.parametrize(
    ("name", "module", "package"),
    [
        ("d.parquet", "pyarrow.parquet", "pyarrow"),
        ("file.arrow", "pyarrow", "pyarrow"),
        ("saved", "datasets", "datasets"),
    ],
)
def test_a_missing_optional_package_is_named(formats, monkeypatch, name, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if the package were not installed
    with pytest.raises(
        NibbleError, match=rf"needs the '{package}' package; pip install {package} \(or nibble\[data\]\)"
    ):
        list(read_records(formats / name))
