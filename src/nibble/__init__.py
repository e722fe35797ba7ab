"""nibble: fine-tune decoder language models on one small machine (4-bit frozen weights + LoRA)."""

__version__ = "0.1.0"
