"""Data files at their edges: a UTF-8 byte-order mark is accepted, bad UTF-8 is named by its line, empty labels
are refused, and integer labels cannot make a head larger than the data justifies."""

import json

import pytest

from helpers import write_tokenizer
from nibble.data.classify import build_label_map, load_classification, read_rows
from nibble.data.records import read_records
from nibble.errors import NibbleError
from nibble.io.tokenizer import load_tokenizer

BOM = b"\xef\xbb\xbf"


@pytest.fixture
def tokenizer(tmp_path):
    return load_tokenizer(write_tokenizer(tmp_path / "tok"))


@pytest.mark.parametrize(
    "name,content",
    [
        ("rows.jsonl", b'{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n'),
        ("rows.csv", b"text,label\ngood,pos\nbad,neg\n"),
        ("rows.tsv", b"text\tlabel\ngood\tpos\nbad\tneg\n"),
    ],
)
def test_a_byte_order_mark_is_accepted(tmp_path, name, content):
    plain, marked = tmp_path / name, tmp_path / f"bom-{name}"
    plain.write_bytes(content)
    marked.write_bytes(BOM + content)
    assert list(read_records(marked)) == list(read_records(plain))
    assert [r.label for r in read_rows(marked)] == ["pos", "neg"]


JSONL_ROWS = b'{"text": "good", "label": "pos"}\n{"text": "ok", "label": "pos"}\n{"text": "b\xe9d", "label": "neg"}\n'


@pytest.mark.parametrize(
    "name,content,where",
    [
        ("rows.jsonl", JSONL_ROWS, "line 3: not UTF-8 text \\(byte 12 of the line"),
        ("rows.csv", b"text,label\ngood,pos\nok,pos\nb\xe9d,neg\n", "line 4: not UTF-8 text \\(byte 2 of the line"),
    ],
)
def test_bad_utf8_names_the_line(tmp_path, name, content, where):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(NibbleError, match=rf"{name} {where}") as exc:
        read_rows(path)
    assert "\n" not in str(exc.value) and "save the file as UTF-8" in str(exc.value)


@pytest.mark.parametrize(
    "name,content,line",
    [
        ("rows.csv", "text,label\ngood,pos\nbad,\n", 3),
        ("rows.csv", 'text,label\ngood,pos\nbad,"  "\n', 3),
        ("rows.jsonl", '{"text": "good", "label": "pos"}\n{"text": "bad", "label": ""}\n', 2),
        ("rows.jsonl", '{"text": "good", "labels": ["pos", ""]}\n', 1),
    ],
)
def test_an_empty_label_is_refused(tmp_path, name, content, line):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(NibbleError, match=rf"{name} line {line}: '(label|labels)' is empty; give every row a label"):
        read_rows(path)


def rows_with(directory, labels):
    directory.mkdir(exist_ok=True)
    path = directory / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": y}) + "\n" for i, y in enumerate(labels)))
    return path


def test_dense_integer_labels_are_class_ids(tmp_path, tokenizer, capsys):
    # 0..4 with 3 missing: still ids (at least half of 0..max occur); nothing to warn about
    data = load_classification(rows_with(tmp_path, [0, 1, 2, 4, 4, 1]), tokenizer)
    assert data.label_map.labels == [0, 1, 2, 3, 4] and data.targets.tolist() == [0, 1, 2, 4, 4, 1]
    assert capsys.readouterr().err == ""


def test_sparse_integer_labels_are_mapped_like_strings_with_a_warning(tmp_path, tokenizer, capsys):
    # One row labelled 2000000 once built a 2,000,001-class head.
    path = rows_with(tmp_path, [0, 1, 0, 2000000, 1])
    data = load_classification(path, tokenizer)
    assert data.label_map.labels == [0, 1, 2000000] and data.targets.tolist() == [0, 1, 0, 2, 1]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"warning: {path}: integer labels are sparse (3 distinct, up to 2000000)" in err
    # evaluation data is encoded with the same map
    val = load_classification(rows_with(tmp_path / "val", [2000000, 0]), tokenizer, label_map=data.label_map)
    assert val.targets.tolist() == [2, 0]


def test_label_map_sizes_follow_the_rule():
    def labels(values):
        return build_label_map(values, False, "rows").labels

    assert labels([1, 2, 3, 4, 5]) == [0, 1, 2, 3, 4, 5]  # star ratings: ids, class 0 unused
    assert labels([0, 7]) == [0, 7]  # 2 of 8 ids used: mapped
    assert labels(["b", "a"]) == ["a", "b"]


def test_long_digit_strings_in_csv_stay_text(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("text,label\n" + "1" * 5000 + ",1\nshort,22\n")
    records = [r for _, r in read_records(path)]
    assert records[0]["text"] == "1" * 5000 and records[0]["label"] == 1 and records[1]["label"] == 22


@pytest.mark.parametrize(
    "line",
    ["[" * 100_000 + "]" * 100_000, '{"text": "a", "label": ' + "9" * 5000 + "}"],
    ids=["deeply-nested", "huge-integer"],
)
def test_json_that_python_refuses_is_a_bad_line(tmp_path, line):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a", "label": 1}\n' + line + "\n")
    with pytest.raises(NibbleError, match=r"rows.jsonl line 2: not valid JSON"):
        list(read_records(path))


@pytest.mark.parametrize(
    ("values", "arrow_type", "shown"),
    [
        (["1.50", "2.25"], "decimal", "Decimal 1.50"),
        ([0, 86_400], "timestamp", "datetime 1970-01-01"),
        ([0, 1], "date", "date 1970-01-01"),
        ([b"\x00a", b"b"], "binary", "bytes"),
        ([1.5, 2.5], "float", "1.5"),
    ],
)
def test_a_decimal_timestamp_or_binary_label_column_is_one_line(tmp_path, values, arrow_type, shown):
    from decimal import Decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {
        "decimal": (pa.decimal128(5, 2), [Decimal(v) for v in values] if arrow_type == "decimal" else values),
        "timestamp": (pa.timestamp("s"), values),
        "date": (pa.date32(), values),
        "binary": (pa.binary(), values),
        "float": (pa.float64(), values),
    }
    kind, cells = types[arrow_type]
    table = pa.table({"text": pa.array(["a", "b"]), "label": pa.array(cells, type=kind)})
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(NibbleError, match=r"d.parquet.*'label' must be an integer >= 0, a string") as caught:
        read_rows(tmp_path / "d.parquet")
    assert f"got {shown}" in str(caught.value) and "\n" not in str(caught.value)


# Tokenizes a small file first (imports, the tokenizer's own memory), then limits RLIMIT_DATA to what the process
# holds plus LIMIT_ROWS times the big row, and loads the file holding it with --max-seq-len 16.
UNDER_LIMIT = """
import resource, sys
from nibble.data.classify import load_classification
from nibble.io.tokenizer import load_tokenizer

tok, small, big, row_bytes = sys.argv[1:]
tokenizer = load_tokenizer(tok)
load_classification(small, tokenizer, max_seq_len=16)
held = int([line for line in open("/proc/self/status") if line.startswith("VmData")][0].split()[1]) * 1024
limit = held + 4 * int(row_bytes)
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
data = load_classification(big, tokenizer, max_seq_len=16)
print("LOADED", data.ids.lengths().tolist(), flush=True)
"""


def test_one_huge_row_is_cut_before_tokenizing_under_a_memory_limit(tmp_path):
    """One 200 MB JSON row with --max-seq-len 16: its text is cut to a bound from the length before it is
    tokenized (tokenizing all of it once allocated gigabytes), so the load fits in 4x the row's size, and the
    cut is counted."""
    import os
    import subprocess
    import sys

    tok = write_tokenizer(tmp_path / "tok")
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    big = tmp_path / "big.jsonl"
    row_bytes = 200 * 2**20
    with open(big, "w") as f:
        f.write('{"text": "ok", "label": "pos"}\n{"text": "')
        for _ in range(row_bytes // 2**20):
            f.write("word " * (2**20 // 5))
        f.write('", "label": "neg"}\n{"text": "fine", "label": "pos"}\n')
    env = {**os.environ, "NIBBLE_TOKEN_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-c", UNDER_LIMIT, tok, small, big, row_bytes]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADED [2, 16, 4]" in result.stdout
    assert "1 of 3 rows cut to --max-seq-len 16, dropping at least" in result.stdout
