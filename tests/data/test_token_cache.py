"""The token cache: built once and reused while the file, tokenizer and settings are unchanged, rebuilt (and the
stale copy removed) when the file changes, never left half-written; and its ragged/packed views equal the same
operations on Python lists."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import zlib

import numpy as np
import pytest

import helpers
from nibble.data import tokens
from nibble.data.classify import load_classification
from nibble.data.ragged import Packed, Ragged
from nibble.data.tokens import CacheWriter, Column, TokenCache
from nibble.errors import NibbleError
from nibble.io.tokenizer import load_tokenizer


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "tokens"
    monkeypatch.setenv("NIBBLE_TOKEN_CACHE", str(root))
    return root


@pytest.fixture
def tokenizer(tmp_path):
    return load_tokenizer(helpers.write_tokenizer(tmp_path / "tok"))


def write_rows(path, n, seed=0):
    rng = random.Random(seed)
    rows = [{"text": "x" * rng.randint(1, 12), "label": "ab"[i % 2]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def entries(root):
    return sorted(p.name for p in root.iterdir())


def test_reused_while_unchanged_rebuilt_when_the_file_changes(tmp_path, cache_root, tokenizer, capsys):
    data = write_rows(tmp_path / "d.jsonl", 20)
    first = load_classification(data, tokenizer, max_seq_len=8)
    assert "tokens: 20 rows of d.jsonl tokenized" in capsys.readouterr().out
    [built] = entries(cache_root)
    stamp = (cache_root / built / "ids.bin").stat().st_mtime_ns
    again = load_classification(data, tokenizer, max_seq_len=8)
    assert f"tokens: reusing {cache_root / built}" in capsys.readouterr().out
    assert (cache_root / built / "ids.bin").stat().st_mtime_ns == stamp
    assert again.ids.tolist() == first.ids.tolist() and again.targets.tolist() == first.targets.tolist()

    load_classification(data, tokenizer, max_seq_len=4)  # another setting: a second cache beside the first
    assert len(entries(cache_root)) == 2
    write_rows(data, 21, seed=1)  # the file changes: both caches of its old version go
    os.utime(data, ns=(stamp + 10**9, stamp + 10**9))
    changed = load_classification(data, tokenizer, max_seq_len=8)
    assert len(changed) == 21 and len(entries(cache_root)) == 1 and built not in entries(cache_root)


def test_a_changed_tokenizer_is_another_cache(tmp_path, cache_root, tokenizer):
    data = write_rows(tmp_path / "d.jsonl", 5)
    load_classification(data, tokenizer, max_seq_len=8)
    config = tokenizer.path / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "split_special_tokens": True}))
    load_classification(data, load_tokenizer(tokenizer.path), max_seq_len=8)
    assert len(entries(cache_root)) == 2


def test_a_failed_build_leaves_nothing(tmp_path, cache_root, tokenizer):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n{"text": "", "label": "y"}\n')
    with pytest.raises(NibbleError, match="d.jsonl line 2: the text is empty"):
        load_classification(data, tokenizer)
    assert entries(cache_root) == []


def test_writer_columns_equal_the_rows_across_flushes(tmp_path, monkeypatch):
    monkeypatch.setattr(tokens, "_FLUSH_VALUES", 7)  # many flushes, mid-row included
    rng = random.Random(3)
    rows = [[rng.randrange(2**32) for _ in range(rng.randint(0, 9))] for _ in range(50)]
    columns = {"ids": Column("uint32"), "lines": Column("int64", ragged=False)}
    writer = CacheWriter(tmp_path, columns)
    for i, row in enumerate(rows):
        writer.append(ids=row, lines=10 * i)
    writer.finish({"note": "x"})
    cache = TokenCache(tmp_path)
    assert cache.rows == 50 and cache.meta["note"] == "x"
    assert cache.ragged("ids").tolist() == rows
    assert cache.column("lines").tolist() == [10 * i for i in range(50)]


def test_ragged_and_packed_views_match_lists():
    rng = random.Random(0)
    rows = [[rng.randrange(100) for _ in range(rng.randint(1, 9))] for _ in range(40)]
    ragged = Ragged.from_lists(rows)
    pick = [5, 3, 3, 39, 0, 17]
    view = ragged.subset(pick).cut(4)
    expected = [rows[i][:4] for i in pick]
    assert view.tolist() == expected and view.lengths().tolist() == [len(r) for r in expected]
    assert view.total() == sum(map(sum, expected)) and view.total(skip_first=True) == sum(sum(r[1:]) for r in expected)
    assert view.concat().tolist() == sum(expected, [])
    assert view.subset([1, 0]).tolist() == [expected[1], expected[0]]

    flat = sum(rows, [])
    packed = Packed(ragged.subset(range(3, 40)), 6)
    flat = sum(rows[3:], [])
    assert packed.tolist() == [flat[i : i + 6] for i in range(0, len(flat), 6)]
    assert packed.lengths().tolist() == [len(p) for p in packed.tolist()]
    starts = np.cumsum([0] + [len(r) for r in rows[3:]])
    assert packed.first_rows().tolist() == [
        int(np.searchsorted(starts, i, "right")) - 1 for i in range(0, len(flat), 6)
    ]
    assert packed.total(skip_first=True) == sum(sum(p[1:]) for p in packed.tolist())
    with pytest.raises(IndexError):
        packed[len(packed)]


def test_a_same_size_same_mtime_swap_is_noticed(tmp_path, cache_root, tokenizer):
    data = write_rows(tmp_path / "d.jsonl", 20, seed=0)
    first = load_classification(data, tokenizer, max_seq_len=8)
    stat = data.stat()
    swapped = tmp_path / "swap.jsonl"
    swapped.write_bytes(data.read_bytes()[:-1].replace(b'"a"', b'"b"', 1) + b"\n")
    os.utime(swapped, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(swapped, data)  # same path, size and mtime; another inode
    assert (data.stat().st_size, data.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    again = load_classification(data, tokenizer, max_seq_len=8)
    assert again.targets.tolist() != first.targets.tolist()


def damage_cases(directory, rng):
    """Seeded mutations of a built cache directory: truncated, grown, or overwritten files, offsets out of
    order, meta.json counts and dtypes changed."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    file = files[rng.randrange(len(files))]
    data = bytearray(file.read_bytes())
    kind = rng.choice(["truncate", "grow", "offsets", "meta"])
    if kind == "truncate" and data:
        file.write_bytes(bytes(data[: rng.randrange(len(data))]))
    elif kind == "grow":
        file.write_bytes(bytes(data) + b"\0" * rng.randint(1, 64))
    elif kind == "offsets":
        offsets = next(p for p in files if p.name.endswith(".offsets.bin"))
        values = np.fromfile(offsets, dtype=np.int64)
        values[rng.randrange(1, len(values))] = rng.choice([-5, 10**12, values[-1] + 1])
        values.tofile(offsets)
    else:
        meta = json.loads((directory / "meta.json").read_text())
        column = rng.choice(sorted(meta["columns"]))
        meta["columns"][column][rng.choice(["values", "dtype"])] = rng.choice([-1, 10**9, "int8", "x"])
        (directory / "meta.json").write_text(json.dumps(meta))
    return kind


@pytest.mark.parametrize("seed", range(12))
def test_a_damaged_cache_is_rebuilt_saying_so(tmp_path, cache_root, tokenizer, capsys, seed):
    data = write_rows(tmp_path / "d.jsonl", 20)
    first = load_classification(data, tokenizer, max_seq_len=8)
    expected = (first.ids.tolist(), first.targets.tolist())  # (read now: the views map the files damaged below)
    [built] = entries(cache_root)
    kind = damage_cases(cache_root / built, random.Random(seed))
    capsys.readouterr()
    again = load_classification(data, tokenizer, max_seq_len=8)
    out = capsys.readouterr().out
    assert (again.ids.tolist(), again.targets.tolist()) == expected, (kind, out)
    if f"tokens: reusing {cache_root / built}" not in out:  # every mutation but a no-op is noticed
        lines = [line for line in out.splitlines() if "is damaged" in line]
        assert len(lines) == 1 and "tokenizing again" in lines[0], (kind, out)


def test_an_unwritable_cache_is_skipped_with_one_line(tmp_path, monkeypatch, tokenizer, capsys):
    data = write_rows(tmp_path / "d.jsonl", 10)
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("NIBBLE_TOKEN_CACHE", str(tmp_path / "file" / "tokens"))
    loaded = load_classification(data, tokenizer, max_seq_len=8)
    out = capsys.readouterr().out
    assert len(loaded.ids) == 10 and out.count("note: cannot write the token cache") == 1


@pytest.mark.parametrize("path", ["/dev/zero", "/proc", "fifo"])
def test_no_reads_from_a_fifo_a_device_or_proc(tmp_path, cache_root, tokenizer, path):
    if path == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
    with pytest.raises(NibbleError) as exc:
        load_classification(path, tokenizer, max_seq_len=8)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)


def test_ids_beyond_the_vocabulary_or_a_changed_byte_are_rebuilt(tmp_path, cache_root, tokenizer, capsys):
    """A cache whose files keep their sizes: one byte changed (the checksum differs), and an id at or beyond the
    vocabulary with meta.json's checksum recomputed to match (the bound catches it)."""
    data = write_rows(tmp_path / "d.jsonl", 20)
    expected = load_classification(data, tokenizer, max_seq_len=8).ids.tolist()
    [built] = entries(cache_root)
    directory = cache_root / built
    for kind in ("byte", "id"):
        ids = np.fromfile(directory / "ids.bin", dtype=np.uint32)
        if kind == "byte":
            ids[3] ^= 1
        else:
            ids[5] = len(tokenizer)
            meta = json.loads((directory / "meta.json").read_text())
            meta["crc32"]["ids.bin"] = zlib.crc32(ids.tobytes())
            (directory / "meta.json").write_text(json.dumps(meta))
        ids.tofile(directory / "ids.bin")
        capsys.readouterr()
        assert load_classification(data, tokenizer, max_seq_len=8).ids.tolist() == expected
        [line] = [line for line in capsys.readouterr().out.splitlines() if "is damaged" in line]
        assert ("checksum" if kind == "byte" else f"not below the vocabulary's {len(tokenizer)}") in line


@pytest.mark.parametrize("errno_", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_full_disk_mid_write_is_one_note_and_leaves_no_entry(
    tmp_path, cache_root, tokenizer, monkeypatch, capsys, errno_
):
    """The disk fills up after the first flush: the rows come from memory, nothing is left in the cache, and
    the next run (with space again) builds and reuses a cache as usual."""
    monkeypatch.setattr(tokens, "_FLUSH_VALUES", 8)  # several writes per build
    data = write_rows(tmp_path / "d.jsonl", 40)
    reference = load_classification(data, tokenizer, max_seq_len=8)
    expected = (reference.ids.tolist(), reference.targets.tolist())
    for entry in cache_root.iterdir():
        shutil.rmtree(entry)
    write = tokens.CacheWriter._write
    calls = []

    def full(self, file, f, values):
        calls.append(file)
        if self.directory is not None and len(calls) > 2:
            raise OSError(errno_, os.strerror(errno_))
        write(self, file, f, values)

    monkeypatch.setattr(tokens.CacheWriter, "_write", full)
    capsys.readouterr()
    loaded = load_classification(data, tokenizer, max_seq_len=8)
    out = capsys.readouterr().out
    assert (loaded.ids.tolist(), loaded.targets.tolist()) == expected
    assert out.count("note: cannot write the token cache") == 1 and "into memory" in out, out
    assert entries(cache_root) == []
    monkeypatch.setattr(tokens.CacheWriter, "_write", write)
    load_classification(data, tokenizer, max_seq_len=8)
    assert len(entries(cache_root)) == 1


def test_another_write_error_is_not_hidden(tmp_path, cache_root, tokenizer, monkeypatch):
    def broken(self, file, f, values):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(tokens.CacheWriter, "_write", broken)
    with pytest.raises(NibbleError, match="Bad file descriptor"):
        load_classification(write_rows(tmp_path / "d.jsonl", 5), tokenizer, max_seq_len=8)
    assert entries(cache_root) == []


def test_a_long_file_name_is_cut_to_fit_the_cache_entrys_name(tmp_path, cache_root, tokenizer, capsys):
    data = write_rows(tmp_path / ("数" * 80 + ".jsonl"), 10)  # 246 bytes: room for no digest beside it
    load_classification(data, tokenizer, max_seq_len=8)
    [built] = entries(cache_root)
    assert len(built.encode()) <= 200 and built.startswith("数" * 33 + "-")
    load_classification(data, tokenizer, max_seq_len=8)
    assert f"tokens: reusing {cache_root / built}" in capsys.readouterr().out
