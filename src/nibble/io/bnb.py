"""bitsandbytes 4-bit checkpoints: find and read the NF4 weights of one (bytes as they are), describe one.

The serialized layout of a quantized Linear (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``) is
implemented by :class:`nibble.quant.NF4Weight`; this module finds those tensors in a checkpoint and says
what the ``quantization_config`` that tells transformers about them holds. Writing a whole quantized
checkpoint is :func:`nibble.model.quantize.quantize_checkpoint`.
"""

from __future__ import annotations

import re
from typing import Any

from nibble.errors import NibbleError
from nibble.io.safetensors import Checkpoint
from nibble.quant import NF4Weight

NF4_STATE = ".quant_state.bitsandbytes__nf4"
FP4_STATE = ".quant_state.bitsandbytes__fp4"
# Tensors that accompany a quantized ``weight`` in bitsandbytes' layout.
AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", NF4_STATE)
# The block projections transformers replaces with bitsandbytes' Linear4bit; heads stay dense.
PROJECTION_WEIGHT = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
SKIP_MODULES = ["lm_head", "score"]


def check_quantization_config(qc: dict[str, Any] | None, source: str) -> None:
    """Accept no ``quantization_config`` or a bitsandbytes 4-bit NF4 one; anything else is a NibbleError."""
    if qc is None:
        return
    if not isinstance(qc, dict):
        raise NibbleError(f"{source}: 'quantization_config' must be an object")
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise NibbleError(
            f"{source}: quantization_config quant_method '{method}' is not supported; "
            "nibble reads bitsandbytes 4-bit (nf4) checkpoints or unquantized ones"
        )
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise NibbleError(f"{source}: bitsandbytes 8-bit checkpoints are not supported (only 4-bit nf4)")
    quant_type = qc.get("bnb_4bit_quant_type", "nf4")
    if quant_type != "nf4":
        raise NibbleError(f"{source}: bnb_4bit_quant_type '{quant_type}' is not supported (only nf4)")


def is_quantized(ckpt: Checkpoint, weight_key: str) -> bool:
    """Whether ``weight_key`` is stored as a bitsandbytes NF4 weight (an FP4 one is a NibbleError)."""
    if weight_key + FP4_STATE in ckpt:
        raise NibbleError(f"{ckpt[weight_key + FP4_STATE].path}: '{weight_key}' is bitsandbytes fp4; only nf4 loads")
    return weight_key + NF4_STATE in ckpt


def read_nf4(ckpt: Checkpoint, weight_key: str) -> NF4Weight:
    """The NF4 weight stored under ``weight_key`` (and its companion tensors), bytes unchanged."""
    names = [weight_key] + [weight_key + s for s in AUX_SUFFIXES if weight_key + s in ckpt]
    sd = {name: ckpt.get_tensor(name) for name in names}
    source = str(ckpt.info(weight_key).path)
    return NF4Weight.from_state_dict(sd, weight_key, source=source)


def quantization_config(double_quant: bool, compute_dtype: str = "float32") -> dict[str, Any]:
    """The ``quantization_config`` of a 4-bit NF4 checkpoint, as transformers writes and reads it."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": list(SKIP_MODULES),
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }
