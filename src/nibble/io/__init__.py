"""Reading and writing files: safetensors, bitsandbytes 4-bit checkpoints, GGUF, PEFT adapters, the tokenizer,
the run metadata files, and the atomic-write helpers every writer uses."""

from nibble.io.files import read_json_object, staged_dir, write_text_atomic

__all__ = ["read_json_object", "staged_dir", "write_text_atomic"]
