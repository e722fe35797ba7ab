"""Shared fixtures: tiny random Hugging Face checkpoints saved to temporary directories (see tests/helpers.py)."""

from __future__ import annotations

import os

# The suite runs as two xdist workers on two cores: one thread each (and in the CLI subprocesses they
# start) avoids oversubscription, which made some tests 4x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import helpers  # noqa: E402
from nibble.io.fetch import cache_dir  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory):
    """Token caches of the data files tests write go to a temporary directory (CLI subprocesses inherit it)."""
    path = tmp_path_factory.mktemp("token-cache")
    os.environ["NIBBLE_TOKEN_CACHE"] = str(path)
    return path


def _private_cache() -> Path:
    """A fresh cache directory for this test process (and the CLI processes it starts), so that GGUF
    conversions and 4-bit bases of temporary test models never pile up in the user's cache; the user's
    downloaded .gguf files and their conversions are linked in, so tests of the real model find them."""
    user, private = cache_dir(), Path(tempfile.mkdtemp(prefix="nibble-test-cache-"))
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    (private / "converted").mkdir()
    if user.is_dir():
        for gguf in user.glob("*.gguf"):
            (private / gguf.name).symlink_to(gguf)
        for converted in user.glob("converted/*"):
            (private / "converted" / converted.name).symlink_to(converted)
    return private


os.environ["NIBBLE_CACHE"] = str(_private_cache())


@pytest.fixture
def hf_checkpoint(tmp_path):
    """A factory: ``hf_checkpoint(model_type="qwen3", num_labels=None, **overrides) -> (path, hf_model)``.

    Each call writes a fresh checkpoint (config.json, safetensors, tokenizer) under ``tmp_path``; tests
    may modify or break it.
    """
    counter = iter(range(1_000_000))

    def make(model_type: str = "qwen3", **kwargs):
        return helpers.make_hf_checkpoint(tmp_path / f"{model_type}-{next(counter)}", model_type, **kwargs)

    return make


@pytest.fixture(scope="session")
def shared_checkpoint(tmp_path_factory):
    """Like ``hf_checkpoint``, but each distinct set of arguments is built once per session and shared.

    Tests must only read these checkpoints and must not modify the returned transformers model.
    """
    cache: dict[str, tuple] = {}

    def make(model_type: str = "qwen3", **kwargs):
        key = f"{model_type}-{sorted(kwargs.items(), key=str)}"
        if key not in cache:
            path = tmp_path_factory.mktemp(model_type)
            cache[key] = helpers.make_hf_checkpoint(path, model_type, **kwargs)
        return cache[key]

    return make
