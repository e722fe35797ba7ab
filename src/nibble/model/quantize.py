"""``quantize_checkpoint``: a Hugging Face checkpoint with its block projections stored as bitsandbytes NF4."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from nibble.devices import resolve_device
from nibble.errors import NibbleError
from nibble.io import bnb
from nibble.io.files import read_json_object, staged_dir
from nibble.io.safetensors import DTYPES, INDEX_NAME, read_checkpoint, save_file_atomic
from nibble.model.config import ModelConfig
from nibble.quant import QuantSpec, quantize


def quantize_checkpoint(
    model_dir: str | Path, output_dir: str | Path, spec: QuantSpec, device: torch.device | str = "cpu"
) -> dict[str, int]:
    """Write ``output_dir``: the checkpoint of ``model_dir`` with every block projection in NF4 (``spec``).

    The weights go to one ``model.safetensors`` in bitsandbytes' layout, ``config.json`` gains a
    ``quantization_config``, and every other file (tokenizer, generation config, chat template) is copied.
    Projections are read and quantized one at a time, on ``device`` (any torch device, see
    :func:`nibble.devices.resolve_device`); the directory appears only when complete.
    Returns counts: ``quantized``, ``kept`` tensors and ``bytes_in`` / ``bytes_out`` of weights.

    Raises:
        NibbleError: a device this machine does not have, a spec that is not NF4, unreadable input, an input
            that is already quantized, or an output that exists and is not empty.
    """
    device = resolve_device(device)
    if spec.format != "nf4":
        raise NibbleError(f"checkpoints are written in bitsandbytes' NF4 layout; format '{spec.format}' has none")
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if not model_dir.is_dir():
        raise NibbleError(f"{model_dir}: not a model directory")
    config_path = model_dir / "config.json"
    config = read_json_object(config_path, "a model directory needs a valid config.json")
    if config.get("quantization_config"):
        raise NibbleError(f"{config_path}: the checkpoint is already quantized (it has a quantization_config)")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise NibbleError(f"{output_dir}: already exists and is not an empty directory; choose another --output")
    ModelConfig.from_hf(config)  # rejects architectures nibble cannot load before any work is done
    ckpt = read_checkpoint(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    stats = {"quantized": 0, "kept": 0, "bytes_in": 0, "bytes_out": 0}
    for name, info in ckpt.items():
        stats["bytes_in"] += info.end - info.start
        if bnb.PROJECTION_WEIGHT.match(name) and info.is_float and len(info.shape) == 2:
            qweight = quantize(ckpt.get_tensor(name, torch.float32, device), spec).to("cpu")
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
    config["quantization_config"] = bnb.quantization_config(
        spec.double_quant, dtype if isinstance(dtype, str) else "float32"
    )
    with staged_dir(output_dir) as staging:
        save_file_atomic(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        del tensors
        for src in sorted(model_dir.iterdir()):
            if src.is_file() and not _is_weight_file(src) and src.name != "config.json":
                shutil.copy2(src, staging / src.name)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return stats


def _is_weight_file(path: Path) -> bool:
    return path.suffix in (".safetensors", ".bin", ".pt", ".pth") or path.name == INDEX_NAME
