"""The atomic-write helpers: a staged directory appears only complete, and nothing half-written is left."""

from __future__ import annotations

import threading

import pytest

import helpers
from nibble.errors import NibbleError
from nibble.io.files import read_json_object, remove_stale_staging, staged_dir, write_text_atomic


def litter(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_the_target_appears_only_when_the_block_completes(tmp_path):
    target = tmp_path / "out"
    with staged_dir(target) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not target.exists()
        (tmp / "b.txt").write_text("b")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.txt"]
    assert litter(tmp_path) == []


def test_a_failure_leaves_no_target_and_no_litter(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with staged_dir(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("disk on fire")
    assert not target.exists() and litter(tmp_path) == []


def test_a_failure_while_overwriting_keeps_the_old_directory(tmp_path):
    target = tmp_path / "out"
    with staged_dir(target) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with staged_dir(target, overwrite=True) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError
    assert (target / "v").read_text() == "1" and litter(tmp_path) == []


def test_an_existing_target_needs_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(NibbleError, match="out: already exists"):
        with staged_dir(target):
            pass
    assert (target / "keep").read_text() == "x" and litter(tmp_path) == []
    (tmp_path / "empty").mkdir()
    with staged_dir(tmp_path / "empty") as tmp:  # an empty directory is no run to protect
        (tmp / "new").write_text("y")
    assert (tmp_path / "empty" / "new").read_text() == "y"


def test_overwrite_replaces_without_a_moment_where_the_target_is_missing(tmp_path):
    target = tmp_path / "out"
    with staged_dir(target) as tmp:
        (tmp / "v").write_text("0")
    missing: list[int] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if not target.is_dir():
                missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for version in range(1, 40):
            with staged_dir(target, overwrite=True) as tmp:
                (tmp / "v").write_text(str(version))
    finally:
        stop.set()
        watcher.join()
    assert (target / "v").read_text() == "39" and [p.name for p in target.iterdir()] == ["v"]
    assert missing == [] and litter(tmp_path) == []


def test_write_text_atomic_and_stale_staging_cleanup(tmp_path):
    path = write_text_atomic(tmp_path / "sub" / "report.json", '{"a": 1}\n')
    assert read_json_object(path, "fix it") == {"a": 1}
    (tmp_path / "sub" / ".report.json.tmp-12345678").write_text("half")
    (tmp_path / "sub" / ".run.tmp-abcdef12").mkdir()
    (tmp_path / "sub" / ".run.old-abcdef12").mkdir()
    remove_stale_staging(tmp_path / "sub")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["report.json"]
    with pytest.raises(NibbleError, match="not valid JSON.*fix it"):
        read_json_object(write_text_atomic(tmp_path / "bad.json", "{]"), "fix it")


@pytest.mark.parametrize("kind", ["staged_dir", "atomic_file"])
def test_what_a_killed_writer_left_is_removed_by_the_next_write_beside_it(tmp_path, kind):
    from nibble.io.files import atomic_file, staged_dir

    (tmp_path / "live").mkdir()
    left = helpers.killed_writer(tmp_path, "merged", kind)
    assert len(left) == 1 and left[0].startswith(".merged.tmp-")
    with staged_dir(tmp_path / "live") as tmp:  # a concurrent writer's own staging stays while it runs
        assert tmp.name in [p.name for p in tmp_path.iterdir()]
        write_text_atomic(tmp_path / "report.json", "{}")
        assert tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live", "report.json"]
    helpers.killed_writer(tmp_path, "merged", kind)
    with atomic_file(tmp_path / "other.bin") as tmp:
        tmp.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live", "other.bin", "report.json"]


def test_every_file_and_directory_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """What the rename publishes is on the disk first: each file's data and the staged directory itself."""
    import os

    import nibble.io.files as files

    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def publish(real):
        def move(src, dst):
            events.append(("rename", str(src)))
            real(src, dst)

        return move

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", publish(real_replace))
    monkeypatch.setattr(files.os, "rename", publish(real_rename))
    write_text_atomic(tmp_path / "a.txt", "text")
    with staged_dir(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"\0" * 10)
        (tmp / "x.json").write_text("{}")
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    assert len(renames) == 2, events
    synced = [(i, path) for i, (kind, path) in enumerate(events) if kind == "fsync"]
    file_tmp = events[renames[0]][1]
    assert any(path == os.path.realpath(file_tmp) and i < renames[0] for i, path in synced), events
    staging = os.path.realpath(events[renames[1]][1])
    for inside in (staging, f"{staging}/sub/w.bin", f"{staging}/x.json"):
        assert any(path == inside and renames[0] < i < renames[1] for i, path in synced), (inside, events)
    assert (tmp_path / "out" / "sub" / "w.bin").read_bytes() == b"\0" * 10
