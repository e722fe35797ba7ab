"""Classification data: reading JSONL/CSV, label maps, line-numbered errors, splits, batching, class weights."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from nibble.data import (
    BatchStream,
    ClassificationData,
    LabelMap,
    class_weights,
    collate,
    load_classification,
    read_rows,
    stratified_split,
)
from nibble.errors import NibbleError
from nibble.io.tokenizer import load_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def tokenizer(tmp_path):
    import helpers

    return load_tokenizer(helpers.write_tokenizer(tmp_path / "tok"))


def test_string_labels_map_in_sorted_order_and_round_trip(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "b", "label": "pos"}, {"text": "a", "label": "neg"}, ""])
    data = load_classification(path, tokenizer, max_seq_len=8)
    assert data.label_map.labels == ["neg", "pos"] and not data.label_map.multi_label
    assert data.targets.tolist() == [1, 0]
    assert data.ids.tolist() == [[ord("b")], [ord("a")]]
    data.label_map.save(tmp_path / "labels.json")
    assert LabelMap.load(tmp_path / "labels.json") == data.label_map


def test_int_labels_are_ids_and_csv_reads_like_jsonl(tmp_path, tokenizer):
    (tmp_path / "d.csv").write_text('sentence,y\n"hello, world",2\nbye,0\n"multi\nline",1\n')
    data = load_classification(tmp_path / "d.csv", tokenizer, text_column="sentence", label_column="y")
    assert data.label_map.labels == [0, 1, 2]
    assert data.targets.tolist() == [2, 0, 1]
    assert data.ids[0].tolist() == list(b"hello, world")
    assert data.lines.tolist() == [2, 3, 4]


def test_multi_label_rows(tmp_path, tokenizer):
    rows = [{"text": "x", "labels": ["b", "a"]}, {"text": "y", "labels": ["c"]}]
    data = load_classification(write_jsonl(tmp_path / "m.jsonl", rows), tokenizer)
    assert data.label_map.multi_label and data.label_map.labels == ["a", "b", "c"]
    assert data.targets.tolist() == [[0, 1], [2]]
    batch = collate(list(data.ids), list(data.targets), 0, 3, True)
    assert torch.equal(batch["labels"], torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))


def test_truncation_keeps_the_first_tokens_and_says_what_it_cut(tmp_path, tokenizer, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "abcdefgh", "label": 0}, {"text": "xy", "label": 1}])
    assert load_classification(path, tokenizer, max_seq_len=3).ids.tolist() == [list(b"abc"), list(b"xy")]
    said = [
        f"tokens: {path}: 1 of 2 rows cut to --max-seq-len 3, dropping 50.0% of the tokens (5 of 10); the longest "
        "row has 8 tokens (--max-seq-len 8 keeps every row whole)"
    ]

    def cuts() -> list[str]:
        return [line for line in capsys.readouterr().out.splitlines() if "cut to" in line]

    assert cuts() == said
    load_classification(path, tokenizer, max_seq_len=3)  # from the token cache: the same line
    assert cuts() == said
    load_classification(path, tokenizer, max_seq_len=8)
    assert cuts() == []


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"text": "a", "label": 0}', '{"text": "b", "label": 1', ""], r"d.jsonl line 2: not valid JSON"),
        (['{"text": "a", "label": 0}', "", '{"body": "b", "label": 1}'], r"d.jsonl line 3: no 'text' field"),
        (['{"text": "a"}'], r"d.jsonl line 1: no 'label' field"),
        (['{"text": 5, "label": 0}'], r"line 1: 'text' must be a string"),
        (['{"text": "a", "label": 1.5}'], r"line 1: 'label' must be an integer"),
        (['{"text": "a", "label": true}'], r"line 1: 'label' must be an integer"),
        (['{"text": "a", "label": 0}', '{"text": "b", "label": "x"}'], r"line 2: 'label' mixes integer and string"),
        (['{"text": "a", "label": [0]}', '{"text": "b", "label": 1}'], r"line 2: 'label' mixes single labels"),
        (["[1, 2]"], r"line 1: expected a JSON object"),
        (['{"text": "a", "label": 0}', '{"text": "b", "label": 0}'], r"at least two labels"),
        (['{"text": "", "label": 0}', '{"text": "b", "label": 1}'], r"line 1: the text is empty"),
        ([], r"holds no rows"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, tokenizer, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(NibbleError, match=message):
        load_classification(path, tokenizer)


def test_unknown_label_in_validation_data_names_the_line(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "a", "label": "x"}, {"text": "c", "label": "z"}])
    label_map = load_classification(train, tokenizer).label_map
    with pytest.raises(NibbleError, match=r"v.jsonl line 2: label 'z' is not one of the training labels \(x, y\)"):
        load_classification(val, tokenizer, label_map=label_map)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(NibbleError, match="no such data file"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(NibbleError, match="unknown data format '.xlsx'; use .jsonl, .csv/.tsv, .parquet"):
        read_rows(tmp_path / "d.xlsx")
    (tmp_path / "bad.csv").write_text("text,label\na,1,extra\n")
    with pytest.raises(NibbleError, match=r"bad.csv line 2: 3 cells"):
        read_rows(tmp_path / "bad.csv")


def test_stratified_split_keeps_class_proportions_and_is_seeded():
    targets = [0] * 50 + [1] * 30 + [2] * 20 + [3]
    train, val = (part.tolist() for part in stratified_split(targets, 0.2, seed=7))
    assert sorted(train + val) == list(range(len(targets)))
    assert Counter(targets[i] for i in val) == {0: 10, 1: 6, 2: 4}
    assert val == stratified_split(np.array(targets), 0.2, seed=7)[1].tolist()  # an array splits the same
    assert val != stratified_split(targets, 0.2, seed=8)[1].tolist()
    assert [p.tolist() for p in stratified_split(targets, 0.0, seed=7)] == [list(range(len(targets))), []]


def make_data(targets, multi=False):
    lm = LabelMap(list(range(1 + max(max(t) if isinstance(t, list) else t for t in targets))), multi)
    return ClassificationData([[i % 7 + 1] * (1 + i % 5) for i in range(len(targets))], list(targets), lm)


def test_batches_pad_dynamically_and_cover_each_epoch_once():
    data = make_data([i % 3 for i in range(10)])
    stream = BatchStream(data, batch_size=4, pad_id=99, seed=0)
    assert stream.batches_per_epoch == 3
    seen = []
    for _ in range(3):
        batch = stream.next_batch()
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == lengths.max()
        assert torch.all(batch["input_ids"][batch["attention_mask"] == 0] == 99)
        seen += [tuple(row[:n].tolist()) for row, n in zip(batch["input_ids"], lengths, strict=True)]
    assert sorted(seen) == sorted(tuple(x) for x in data.ids.tolist())
    assert not np.array_equal(stream.epoch_order(0), stream.epoch_order(1))


def test_stream_resumes_at_its_position():
    data = make_data([i % 2 for i in range(9)])
    a = BatchStream(data, 2, 0, seed=3)
    expected = [a.next_batch() for _ in range(12)]
    b = BatchStream(data, 2, 0, seed=3)
    for _ in range(7):
        b.next_batch()
    c = BatchStream(data, 2, 0, seed=3)
    c.load_state_dict(b.state_dict(), "ckpt")
    for want in expected[7:]:
        got = c.next_batch()
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(NibbleError, match="resume with the same data"):
        BatchStream(data, 2, 0, seed=4).load_state_dict(b.state_dict(), "ckpt")


def test_oversampling_balances_classes_each_epoch():
    data = make_data([0] * 12 + [1] * 3 + [2] * 1)
    stream = BatchStream(data, 4, 0, seed=0, groups=data.targets)
    order = stream.epoch_order(0)
    assert stream.epoch_size == len(order) == 36
    assert Counter(data.targets[i] for i in order) == {0: 12, 1: 12, 2: 12}
    assert set(order[np.array(data.targets)[order] == 0]) == set(range(12))


def test_class_weights_follow_their_formulas():
    data = make_data([0] * 6 + [1] * 3 + [2] * 1)
    n, k = 10, 3
    inverse = torch.tensor([n / (k * 6), n / (k * 3), n / (k * 1)])
    torch.testing.assert_close(class_weights(data, "inverse_freq"), inverse)
    torch.testing.assert_close(class_weights(data, "sqrt_inverse"), inverse.sqrt())
    assert class_weights(data, "none") is None
    multi = make_data([[0], [0, 1], [0], [2]], multi=True)
    torch.testing.assert_close(class_weights(multi, "inverse_freq"), torch.tensor([1 / 3, 3.0, 3.0]))
    with pytest.raises(NibbleError, match="class_weights"):
        class_weights(data, "balanced")


@pytest.mark.parametrize("part", [(0, 1), (1, 2)])
def test_most_tokens_is_the_largest_batch_the_stream_will_collate(part):
    # What the memory planner counts: the real tokens of the biggest micro-batch this rank will take.
    rows = [[5] * (1 + (7 * i) % 13) for i in range(11)]
    data = ClassificationData(rows, np.zeros(len(rows), dtype=np.int64), LabelMap(["a"]))
    stream = BatchStream(data, 4, 0, seed=1, part=part)
    predicted = stream.most_tokens(9)  # past an epoch's end (3 batches an epoch)
    assert stream.position == 0
    assert predicted == max(int(stream.next_batch()["attention_mask"].sum()) for _ in range(9))
