"""Layers: QuantLinear (frozen 4-bit), LoRALinear (trainable low-rank update), and the model's building blocks."""

from nibble.nn.lora import LoRALinear, apply_lora
from nibble.nn.quant_linear import QuantLinear

__all__ = ["LoRALinear", "QuantLinear", "apply_lora"]
