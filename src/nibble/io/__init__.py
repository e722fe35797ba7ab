"""Reading and writing weights and model files: safetensors, bitsandbytes 4-bit checkpoints, and more."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nibble.errors import NibbleError


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
