"""nibble: fine-tune decoder language models on one small machine (4-bit frozen weights + LoRA)."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Attributes imported on first use: they pull in torch and the model code, and `import nibble` (and the CLI's
# start) stays light. `nibble.train` is the training package, which is callable: nibble.train(config).
_LAZY = {
    "load_model": ("nibble.model.loading", "load_model"),
    "train": ("nibble.train", None),
    "TrainConfig": ("nibble.train.config", "TrainConfig"),
    "TrainResult": ("nibble.train.run", "TrainResult"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'nibble' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    loaded = importlib.import_module(module)
    return loaded if attribute is None else getattr(loaded, attribute)
