"""One process at a time in a run directory: an exclusive ``flock`` on a file inside it.

The kernel drops the lock when its holder exits, however it exits (SIGKILL included), so a crashed run
never leaves a stale lock behind; the file itself only records the holder's pid for the error message.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nibble.errors import NibbleError

LOCK_NAME = ".nibble.lock"


@contextmanager
def locked_directory(directory: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (created if missing) for the ``with`` block.

    On exit the lock file is removed, and so is ``directory`` when this call created it and nothing else
    was put there (a run refused before writing anything leaves no trace).

    Raises:
        NibbleError: another process holds the lock (its pid is named), or the directory cannot be created.
    """
    directory = Path(directory)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NibbleError(f"{directory}: cannot create the output directory ({exc.strerror})") from None
    path = directory / LOCK_NAME
    fd = _acquire(path, directory)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield directory
    finally:
        # Unlink before unlocking: a process that opened the old file finds it gone and retries (see _acquire).
        path.unlink(missing_ok=True)
        os.close(fd)
        if created:
            try:
                directory.rmdir()  # only succeeds when empty
            except OSError:
                pass


def _acquire(path: Path, directory: Path) -> int:
    """An open descriptor of ``path`` holding its exclusive lock."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise NibbleError(f"{path}: cannot create the run's lock file ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise NibbleError(
                f"{directory}: another nibble run ({holder}) is using this output directory; "
                "wait for it to finish, stop it, or choose another --output"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder finished and removed the file between our open and our lock: try again


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"
