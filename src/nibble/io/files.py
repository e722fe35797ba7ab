"""Files written so that nothing half-written ever looks complete, and JSON objects read with clear errors."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from nibble.errors import NibbleError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def read_json_object(path: str | Path, fix: str) -> dict[str, Any]:
    """The JSON object stored in ``path``; a missing, unreadable or non-object file is a NibbleError.

    ``fix`` completes the error message with what the user should do (e.g. "restore the tokenizer file").
    """
    path = Path(path)
    if not path.is_file():
        raise NibbleError(f"{path}: no such file; {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NibbleError(f"{path}: not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise NibbleError(f"{path}: expected a JSON object; {fix}")
    return data


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented UTF-8 JSON with a final newline (inside a staged directory, or atomically via
    :func:`write_text_atomic` where the file stands alone)."""
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary name beside ``path``, fsync, then rename it onto ``path``."""
    with open_atomic(path) as f:
        f.write(text)
    return Path(path)


@contextmanager
def open_atomic(path: str | Path, newline: str | None = None) -> Iterator[TextIO]:
    """A UTF-8 text file to write in pieces that appears at ``path`` only when the block succeeds.

    ``with open_atomic(out) as f:`` -- write to ``f`` (a temporary sibling); on normal exit it is flushed,
    fsynced and renamed onto ``out``; if the block raises, it is deleted and ``out`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8", newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _occupied(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


@contextmanager
def staged_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary sibling name; it becomes ``target`` only when the block succeeds.

    ``with staged_dir(out) as tmp:`` -- write into ``tmp``; on normal exit ``tmp`` is renamed to ``out``.
    If the block raises, ``tmp`` is removed and ``out`` is left as it was. With ``overwrite``, an existing
    ``out`` is swapped for the new directory in one atomic exchange (Linux ``renameat2``), so ``out``
    always exists, old or new; where the file system cannot exchange, the old one is renamed aside first.

    Raises:
        NibbleError: ``target`` exists (a file, or a non-empty directory) and ``overwrite`` is false.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NibbleError(f"{target}: is a file, not a directory; choose another output path")
    if _occupied(target) and not overwrite:
        raise NibbleError(f"{target}: already exists; choose another output directory or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()  # (not mkdtemp: its mode 0700 would stay on the finished directory)
    try:
        yield staging
        _install(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _install(staging: Path, target: Path) -> None:
    """Move the finished ``staging`` directory to ``target``; what ``target`` held is deleted afterwards."""
    if not _occupied(target):
        if target.is_dir():
            target.rmdir()
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging)  # now the old directory
        return
    retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, retired)
    os.rename(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


def remove_stale_staging(directory: str | Path) -> None:
    """Delete what an interrupted :func:`staged_dir` or :func:`write_text_atomic` left in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for leftover in directory.glob(".*"):
        if ".tmp-" in leftover.name or ".old-" in leftover.name:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
