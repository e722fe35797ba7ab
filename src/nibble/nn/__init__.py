"""Layers: QuantLinear (frozen 4-bit), and the model's building blocks."""

from nibble.nn.quant_linear import QuantLinear

__all__ = ["QuantLinear"]
