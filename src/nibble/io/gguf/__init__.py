"""GGUF, llama.cpp's single-file format, both ways: a model file read into Hugging Face layout (config, float
weights or their own blocks, tokenizer) or converted into a model directory; a model or adapter written as a
file llama.cpp loads.

``open_gguf(path)`` validates a model file and exposes what a loader needs without writing anything:
``config`` (an HF ``config.json`` dict), ``tensors(dtype)`` (HF-named float tensors, dequantized one at a
time), ``tokenizer()`` (a ``tokenizers.Tokenizer``), ``tokenizer_config()`` and ``save_tokenizer(dir)``.
``convert_gguf`` writes all of it as a model directory. ``GGUFFile`` is the metadata-and-tokenizer part alone,
for files without model tensors. ``write_gguf`` and ``tokenizer_metadata`` are the way out.

One module per job: ``reader`` (the bounded parser), ``metadata`` (typed metadata, ``GGUFFile``), ``tokenizer``
(both directions), ``config`` (the HF config), ``names`` (where each tensor lives in llama.cpp's layouts),
``model`` (``GGUFModel``), ``convert`` and ``write``.
"""

from nibble.io.gguf.config import llama3_rope_factors
from nibble.io.gguf.convert import convert_gguf
from nibble.io.gguf.metadata import GGUFFile, is_gguf
from nibble.io.gguf.model import (
    NATIVE_ARCHITECTURES,
    SOURCE_NAME,
    GGUFCheckpoint,
    GGUFModel,
    gguf_source,
    native_model,
    open_gguf,
)
from nibble.io.gguf.names import ARCHITECTURES, permute_rotary, unpermute_rotary
from nibble.io.gguf.tokenizer import tokenizer_metadata
from nibble.io.gguf.write import GGUFTensor, write_gguf

__all__ = [
    "ARCHITECTURES",
    "NATIVE_ARCHITECTURES",
    "SOURCE_NAME",
    "GGUFCheckpoint",
    "GGUFFile",
    "GGUFModel",
    "GGUFTensor",
    "convert_gguf",
    "gguf_source",
    "is_gguf",
    "llama3_rope_factors",
    "native_model",
    "open_gguf",
    "permute_rotary",
    "tokenizer_metadata",
    "unpermute_rotary",
    "write_gguf",
]
