"""Decoder models (Qwen3, Qwen3-MoE, Qwen2, Llama, Mistral) built from Hugging Face checkpoints."""

from nibble.model.config import ModelConfig
from nibble.model.loading import load_model
from nibble.model.model import DecoderModel, KVCache

__all__ = ["DecoderModel", "KVCache", "ModelConfig", "load_model"]
