"""Layers: QuantLinear (frozen 4-bit) and LoRALinear (trainable low-rank update), and the projection names."""

from nibble.nn.lora import PROJECTIONS, LoRALinear, apply_lora
from nibble.nn.quant_linear import QuantLinear

__all__ = ["PROJECTIONS", "LoRALinear", "QuantLinear", "apply_lora"]
