"""bitsandbytes 4-bit checkpoints: read the NF4 weights of one (bytes as they are) and write one.

The serialized layout of a quantized Linear (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``) is
described in shared/design.md and implemented by :class:`nibble.quant.NF4Weight`; this module finds
those tensors in a checkpoint and writes the ``quantization_config`` that tells transformers about them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from nibble.errors import NibbleError
from nibble.io.safetensors import DTYPES, INDEX_NAME, Checkpoint, read_checkpoint, save_file_atomic
from nibble.quant import NF4Weight, nf4

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


def quantize_checkpoint(
    model_dir: str | Path, output_dir: str | Path, *, double_quant: bool = False, blocksize: int = 64
) -> dict[str, int]:
    """Write ``output_dir``: the checkpoint of ``model_dir`` with every block projection in NF4.

    The weights go to one ``model.safetensors`` in bitsandbytes' layout, ``config.json`` gains a
    ``quantization_config``, and every other file (tokenizer, generation config, chat template) is copied.
    Projections are read and quantized one at a time. Everything is written into a temporary sibling
    directory that is renamed to ``output_dir`` at the end, so a crash never leaves a partial checkpoint.
    Returns counts: ``quantized``, ``kept`` tensors and ``bytes_in`` / ``bytes_out`` of weights.

    Raises:
        NibbleError: unreadable input, an input that is already quantized, or an output that exists
            and is not empty.
    """
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    config_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise NibbleError(f"{model_dir}: not a model directory")
    if not config_path.is_file():
        raise NibbleError(f"{config_path}: no such file (a model directory needs a config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise NibbleError(f"{config_path}: not valid JSON ({exc})") from None
    if config.get("quantization_config"):
        raise NibbleError(f"{config_path}: the checkpoint is already quantized (it has a quantization_config)")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise NibbleError(f"{output_dir}: already exists and is not an empty directory; choose another --output")
    from nibble.model.config import ModelConfig

    ModelConfig.from_hf(config_path)  # rejects architectures nibble cannot load before any work is done
    ckpt = read_checkpoint(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    stats = {"quantized": 0, "kept": 0, "bytes_in": 0, "bytes_out": 0}
    for name, info in ckpt.items():
        stats["bytes_in"] += info.end - info.start
        if PROJECTION_WEIGHT.match(name) and info.is_float and len(info.shape) == 2:
            qweight = nf4.quantize(ckpt.get_tensor(name, torch.float32), blocksize, double_quant)
            qweight.dtype = DTYPES[info.dtype]  # the dtype bitsandbytes dequantizes back to
            tensors.update(qweight.state_dict(name))
            stats["quantized"] += 1
            stats["bytes_out"] += qweight.memory_bytes()
        else:
            tensors[name] = ckpt.get_tensor(name)
            stats["kept"] += 1
            stats["bytes_out"] += info.end - info.start
    if not stats["quantized"]:
        raise NibbleError(f"{model_dir}: no block projection weights (model.layers.N.*_proj.weight) to quantize")
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    config["quantization_config"] = quantization_config(double_quant, dtype if isinstance(dtype, str) else "float32")
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file_atomic(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        del tensors
        for src in sorted(model_dir.iterdir()):
            if src.is_file() and not _is_weight_file(src) and src.name != "config.json":
                shutil.copy2(src, tmp / src.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if output_dir.is_dir():
            output_dir.rmdir()
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


def _is_weight_file(path: Path) -> bool:
    return path.suffix in (".safetensors", ".bin", ".pt", ".pth") or path.name == INDEX_NAME
