"""Files written so that nothing half-written ever looks complete, and JSON objects read with clear errors."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
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
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, huge ints
        raise NibbleError(f"{path}: not valid JSON ({' '.join(str(exc).split())}); {fix}") from None
    if not isinstance(data, dict):
        raise NibbleError(f"{path}: expected a JSON object; {fix}")
    return data


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented UTF-8 JSON with a final newline (inside a staged directory, or atomically via
    :func:`write_text_atomic` where the file stands alone)."""
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def file_identity(path: str | Path) -> list[Any]:
    """What tells a file's versions apart without reading it: resolved path, size, modification time, inode and
    status-change time (a copy of the same size with the mtime set back still gets a new inode or ctime)."""
    path = Path(path).resolve()
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]


NAME_BYTES = 100  # of a user's file name in a cache entry's name (a name holds 255 bytes; temporaries add ~30)


def name_part(name: str) -> str:
    """``name`` cut to at most :data:`NAME_BYTES` bytes of UTF-8, never inside a character: the readable part of a
    cache entry's name (a digest beside it keeps entries apart)."""
    return name.encode("utf-8", "surrogateescape")[:NAME_BYTES].decode("utf-8", "ignore")


def _fsync_tree(directory: Path) -> None:
    """fsync every file under ``directory`` and the directory itself, before it is renamed into place."""
    for file in directory.rglob("*"):
        if file.is_file() and not file.is_symlink():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SAMPLE = 1 << 16
_MODEL_FILES = ("config.json", "tokenizer.json", "*.safetensors", "*.safetensors.index.json", "*.gguf")


def model_fingerprint(path: str | Path) -> str:
    """A cheap SHA-256 that tells two models apart (a model directory's config, tokenizer and weight files, or one
    file): each file's name and size and 64 KiB at its start, middle and end. Two trainings of the same
    architecture share shapes but no weight bytes, so the samples differ; a file rewritten in place is read anew.
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted({f for pattern in _MODEL_FILES for f in path.glob(pattern)})
    digest = hashlib.sha256()
    for file in files:
        if not file.is_file():
            continue
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as f:
            for offset in (0, max(size // 2 - _SAMPLE // 2, 0), max(size - _SAMPLE, 0)):
                f.seek(offset)
                digest.update(f.read(_SAMPLE))
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex (read through one 1 MiB buffer)."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(1 << 20))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(buffer[:n])
    return digest.hexdigest()


def format_size(n: int) -> str:
    """``n`` bytes as the short text nibble prints: ``1.5 GiB``, ``12.0 MiB`` or ``3.0 KiB``."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def tree_bytes(path: str | Path) -> int:
    """The bytes of the file ``path``, or of every file under the directory ``path`` (links not followed; 0 for
    what vanished meanwhile)."""
    path = Path(path)
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class WriteError(NibbleError):
    """A write that failed (full disk, quota, file-size limit, permissions); ``cause`` is the OSError."""

    def __init__(self, message: str, cause: OSError):
        super().__init__(message)
        self.cause = cause


def write_error(directory: str | Path, exc: OSError, needed: int | None = None) -> WriteError:
    """The one-line error for a write into ``directory`` that failed with ``exc`` (a full disk, a quota, a
    file-size limit, permissions): names the directory, the free space, and ``needed`` bytes when known."""
    directory = Path(directory)
    probe = next((p for p in (directory, *directory.parents) if p.exists()), Path("."))
    try:
        free = f"{format_size(shutil.disk_usage(probe).free)} free"
    except OSError:
        free = "free space unknown"
    need = f", about {format_size(needed)} needed" if needed else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        message = f"{directory}: no space left on the device ({free}{need}); free some space or write elsewhere"
    else:
        message = (
            f"{directory}: cannot write ({exc.strerror or exc}; {free}{need}); check the directory or write elsewhere"
        )
    return WriteError(message, exc)


def writable_parent(path: str | Path) -> None:
    """Check, before any work, that ``path`` can be written: its nearest existing parent is a directory in which a
    file can be created (a read-only file system, permissions and a file where a directory should be show here,
    not after a model was loaded and merged).

    Raises:
        NibbleError: one line naming the parent and the reason.
    """
    path = Path(path)
    parent = next((p for p in path.parents if p.exists() or p.is_symlink()), Path("."))
    if not parent.is_dir():
        raise NibbleError(f"{parent}: is a file, not a directory; choose another output path than {path}")
    probe = _temporary(parent / path.name, "tmp")
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise write_error(parent, exc) from None


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary name beside ``path``, fsync, then rename it onto ``path``.

    Raises:
        NibbleError: the write failed (full disk, permissions); ``path`` is left as it was.
    """
    with open_atomic(path) as f:
        f.write(text)
    return Path(path)


@contextmanager
def atomic_file(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """The one way a single file is written: ``with atomic_file(out) as tmp:`` -- write the file ``tmp`` (a
    temporary sibling of ``out``); on normal exit it is fsynced and renamed onto ``out``; if the block raises, it
    is deleted and ``out`` is left as it was.

    Raises:
        NibbleError: the write failed (full disk, quota, file-size limit, permissions), naming the directory and
            the ``needed`` bytes when known.
    """
    path = Path(path)
    tmp = _temporary(path, "tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(path.parent)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
            # some writers (safetensors) create their file 0600; every output gets the mode open() would give
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path.parent, exc, needed) from None
    finally:
        with contextlib.suppress(OSError):  # (no temporary, or no directory for one: the error above says why)
            tmp.unlink()


@contextmanager
def open_atomic(path: str | Path, newline: str | None = None) -> Iterator[TextIO]:
    """A UTF-8 text file to write in pieces that appears at ``path`` only when the block succeeds (see
    :func:`atomic_file`).

    Raises:
        NibbleError: the write failed (full disk, permissions), naming the directory.
    """
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline=newline) as f:
        yield f


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temporary(path: Path, kind: str) -> Path:
    """A temporary sibling of ``path`` that names its writer: ``.NAME.tmp-PID-RANDOM`` (``kind`` tmp or old)."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _writer_gone(name: str) -> bool:
    """Whether the process named in the temporary ``name`` (see :func:`_temporary`) no longer runs."""
    kind = ".tmp-" if ".tmp-" in name else ".old-"
    pid, _, tag = name.rsplit(kind, 1)[-1].partition("-")
    if not pid.isdigit() or len(tag) != 8:
        return False  # (named before writers were: not known to be gone)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def remove_dead_temporaries(directory: str | Path) -> None:
    """Delete what a killed writer (SIGKILL, power loss) left in ``directory``: temporary files and staged
    directories whose process is gone. Any writer's next start beside them does this, so none outlives the next
    run; those of a live process (a concurrent write) are left alone."""
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith(".")]
    except OSError:
        return
    for entry in entries:
        if (".tmp-" in entry.name or ".old-" in entry.name) and _writer_gone(entry.name):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)


def _occupied(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


@contextmanager
def staged_dir(target: str | Path, overwrite: bool = False, needed: int | None = None) -> Iterator[Path]:
    """Build a directory under a temporary sibling name; it becomes ``target`` only when the block succeeds.

    ``with staged_dir(out) as tmp:`` -- write into ``tmp``; on normal exit ``tmp`` is renamed to ``out``.
    If the block raises, ``tmp`` is removed and ``out`` is left as it was. With ``overwrite``, an existing
    ``out`` is swapped for the new directory in one atomic exchange (Linux ``renameat2``), so ``out``
    always exists, old or new; where the file system cannot exchange, the old one is renamed aside first.
    ``needed`` (bytes, when known) is named in the error when the disk fills up.

    Raises:
        NibbleError: ``target`` is a symbolic link, or exists (a file, or a non-empty directory) and ``overwrite``
            is false; or a
            write failed (full disk, permissions), after the partial directory was removed.
    """
    target = Path(target)
    if target.is_symlink():
        raise NibbleError(f"{target}: is a symbolic link; write to the directory it names, or choose another path")
    if target.exists() and not target.is_dir():
        raise NibbleError(f"{target}: is a file, not a directory; choose another output path")
    if _occupied(target) and not overwrite:
        raise NibbleError(f"{target}: already exists; choose another output directory or pass --overwrite")
    staging = _temporary(target, "tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(target.parent)
        staging.mkdir()  # (not mkdtemp: its mode 0700 would stay on the finished directory)
        yield staging
        _fsync_tree(staging)
        _install(staging, target)
    except OSError as exc:
        raise write_error(target.parent, exc, needed) from None
    except WriteError as exc:  # a file inside: name the directory being written, not its temporary name
        raise write_error(target.parent, exc.cause, needed) from None
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
    retired = _temporary(target, "old")
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
