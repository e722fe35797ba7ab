"""``convert_gguf``: a GGUF model file written as a Hugging Face model directory that transformers and nibble
load like any other."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from nibble.errors import NibbleError
from nibble.io.files import staged_dir, write_json
from nibble.io.gguf.model import SOURCE_NAME, open_gguf, source_record
from nibble.io.safetensors import write_streamed

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert_gguf(
    path: str | Path,
    output: str | Path,
    dtype: torch.dtype | str = torch.float32,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Convert a GGUF file into an HF model directory: config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json (with the chat template), and ``gguf_source.json`` naming the file it came from.

    The directory is built under a temporary name beside ``output`` and renamed into place at the end,
    so ``output`` is either absent, the old directory (with ``overwrite``) or the complete conversion.

    Args:
        path: the .gguf file.
        output: the directory to create; it must not exist (or be empty) unless ``overwrite``.
        dtype: weight dtype in model.safetensors: float32 (exact), bfloat16 or float16.
        overwrite: replace an existing ``output`` directory.
        log: called with one line per step.

    Raises:
        NibbleError: anything :class:`~nibble.io.gguf.model.GGUFModel` rejects, an unknown dtype, or an
            ``output`` that exists.
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise NibbleError(f"dtype '{dtype}' is not supported; use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise NibbleError(f"dtype {dtype} is not supported; use one of {', '.join(_DTYPES)}")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise NibbleError(f"{output}: is a file, not a directory; choose another output path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise NibbleError(f"{output}: already exists; choose another output directory or pass --overwrite")

    model = open_gguf(path)
    say = log or (lambda line: None)
    with staged_dir(output, overwrite=overwrite) as staging:
        config = {**model.config, "dtype": str(dtype).removeprefix("torch.")}
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        shapes = model.tensor_shapes()
        say(f"writing {len(shapes)} tensors ({sum(math.prod(s) for s in shapes.values()) / 1e6:.1f}M parameters)")

        def tensor(name: str) -> torch.Tensor:
            value = model.tensor(name, dtype)
            if dtype == torch.float16 and not bool(torch.isfinite(value).all()):
                raise NibbleError(
                    f"{model.path}: tensor '{name}' holds values beyond float16's range; convert it with nibble "
                    "convert --dtype float32 and pass that directory as --model"
                )
            return value

        write_streamed(staging / "model.safetensors", shapes, dtype, tensor)
        say("writing the tokenizer")
        model.save_tokenizer(staging)
        write_json(staging / SOURCE_NAME, source_record(model.path))
    return output
