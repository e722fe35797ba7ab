"""Merge a LoRA adapter into its base: a plain Hugging Face checkpoint with ``W + B A scale`` in every target.

The base is rebuilt as the adapter was trained (see :func:`nibble.model.adapter.load_adapted`); 4-bit
weights are dequantized and written dense, never re-quantized (rounding ``W + BA`` back to 4 bits would
lose most of the update). The merged model therefore computes what the adapted model computed in nibble.
Tensors are produced one shard at a time, so peak memory is the (possibly 4-bit) model plus one shard.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from nibble.errors import NibbleError
from nibble.io.files import read_json_object, staged_dir, writable_parent, write_json
from nibble.io.peft import MULTIMODAL_DECODER
from nibble.io.runinfo import LABEL_MAP, RUN_INFO
from nibble.io.safetensors import INDEX_NAME, SINGLE_NAME, read_checkpoint, save_file_atomic
from nibble.io.tokenizer import TOKENIZER_FILES
from nibble.model.adapter import AdapterInfo, load_adapted
from nibble.model.loading import MULTIMODAL_EXTRAS, resolve_model_dir
from nibble.model.model import DecoderModel
from nibble.model.moe import expert_tensors
from nibble.nn import LoRALinear, QuantLinear
from nibble.nn.experts import Experts

MERGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHARD_BYTES = 2 << 30
_COPIED = (*TOKENIZER_FILES, "generation_config.json")

Producer = Callable[[torch.dtype], torch.Tensor]


def dense_tensors(model: DecoderModel, fused_experts: bool = False) -> dict[str, tuple[tuple[int, ...], Producer]]:
    """Every weight of ``model`` under its Hugging Face name, as ``(shape, produce(dtype))`` in model order.

    LoRA layers give their merged weight, 4-bit layers their dequantized weight, experts theirs in the layout the
    checkpoint had, or fused stacks with ``fused_experts`` (see :func:`nibble.model.moe.expert_tensors`); a tied
    LM head is left out (transformers ties it again).
    """
    out: dict[str, tuple[tuple[int, ...], Producer]] = {}
    whole: list[str] = []  # layers written as one weight: their submodules are skipped
    for path, module in model.named_modules():
        if any(path.startswith(w + ".") for w in whole):
            continue
        prefix = f"{path}." if path else ""
        if isinstance(module, Experts):
            whole.append(path)
            out.update(expert_tensors(path, module, fused_experts))
            continue
        if isinstance(module, (LoRALinear, QuantLinear)):
            whole.append(path)
            shape = (module.out_features, module.in_features)
            if isinstance(module, LoRALinear):
                out[prefix + "weight"] = (shape, module.merged_weight)
                bias = module.base_layer.bias
            else:
                out[prefix + "weight"] = (shape, lambda dtype, m=module: m.dequantize(torch.float32).to(dtype))
                bias = module.bias
            if bias is not None:
                out[prefix + "bias"] = (tuple(bias.shape), lambda dtype, b=bias: b.detach().to(dtype))
            continue
        for name, param in module.named_parameters(recurse=False):
            if prefix + name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            out[prefix + name] = (tuple(param.shape), lambda dtype, p=param: p.detach().to(dtype))
    return out


def _shards(tensors: dict[str, tuple[tuple[int, ...], Producer]], itemsize: int, limit: int) -> list[list[str]]:
    """Tensor names grouped into consecutive shards of at most ``limit`` bytes (a larger tensor stands alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, _) in tensors.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def multimodal_tensors(
    tensors: dict[str, tuple[tuple[int, ...], Producer]], source: Path
) -> dict[str, tuple[tuple[int, ...], Producer]]:
    """``tensors`` of a multimodal checkpoint's text decoder under its names there (``model.language_model.*``),
    followed by the checkpoint's vision tower and ``mtp.*`` tensors from ``source``, copied as stored."""
    out = {
        (MULTIMODAL_DECODER + k.removeprefix("model.") if k.startswith("model.") else k): v for k, v in tensors.items()
    }
    ckpt = read_checkpoint(source)
    for key in ckpt:
        if key.startswith(MULTIMODAL_EXTRAS):
            out[key] = (ckpt[key].shape, lambda dtype, k=key: ckpt.get_tensor(k))
    return out


def write_checkpoint(
    model: DecoderModel,
    directory: Path,
    dtype: torch.dtype = torch.float32,
    shard_bytes: int = SHARD_BYTES,
    labels: list | None = None,
    source: Path | None = None,
) -> None:
    """Write ``model``'s dense weights (merged where LoRA is attached) and config.json into ``directory``.

    A causal LM from a multimodal checkpoint ``source`` keeps that checkpoint's layout and config.json (its vision
    tower and mtp layers copied through), so the result loads as the original class."""
    tensors = dense_tensors(model)
    multimodal = model.config.multimodal and model.task == "causal_lm" and source is not None
    if multimodal:
        tensors = multimodal_tensors(tensors, source)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _shards(tensors, itemsize, shard_bytes)
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, 1):
        filename = SINGLE_NAME if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        with torch.no_grad():
            shard = {name: tensors[name][1](dtype) for name in names}
        save_file_atomic(shard, directory / filename, metadata={"format": "pt"})
        del shard
        weight_map.update(dict.fromkeys(names, filename))
    if len(shards) > 1:
        total = sum(math.prod(shape) * itemsize for shape, _ in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(directory / INDEX_NAME, index)
    if multimodal:
        original = read_json_object(source / "config.json", "the base model needs a valid config.json")
        original.pop("quantization_config", None)
        write_json(directory / "config.json", {**original, "dtype": str(dtype).removeprefix("torch.")})
        return
    config = replace(model.config, torch_dtype=str(dtype).removeprefix("torch."), quantization_config=None)
    if model.task == "classify":
        names = labels or [f"LABEL_{i}" for i in range(model.num_labels)]
        config = replace(config, num_labels=model.num_labels, id2label=dict(enumerate(map(str, names))))
    else:
        config = replace(config, num_labels=None, id2label=None)
    write_json(directory / "config.json", config.to_hf())


def merge_adapter(
    model: str | Path,
    adapter: str | Path,
    output: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    overwrite: bool = False,
    shard_bytes: int = SHARD_BYTES,
    device: torch.device | str = "cpu",
    any_base: bool = False,
) -> tuple[Path, AdapterInfo]:
    """Write ``output``: ``model`` (directory or .gguf) with ``adapter`` merged in, as a plain HF checkpoint.

    The directory holds config.json (``*ForCausalLM``, or ``*ForSequenceClassification`` with the label
    names for a classify adapter), the weights in ``dtype`` (float32 or bfloat16), the tokenizer files and
    generation config, and for classifiers the label map; it is built under a temporary name and renamed.
    The base is loaded and merged on ``device``; each shard is copied to the host as it is written.

    Raises:
        NibbleError: a bad dtype, an ``output`` that exists (without ``overwrite``) or is a symbolic link, a parent
            that cannot be written, or anything
            :func:`load_adapted` rejects.
    """
    if isinstance(dtype, str):
        if dtype not in MERGE_DTYPES:
            raise NibbleError(f"dtype '{dtype}' is not supported for merging; use one of {', '.join(MERGE_DTYPES)}")
        dtype = MERGE_DTYPES[dtype]
    if dtype not in MERGE_DTYPES.values():
        raise NibbleError(f"dtype {dtype} is not supported for merging; use float32 or bfloat16")
    output = Path(output)
    if output.is_symlink():
        raise NibbleError(f"{output}: is a symbolic link; merge writes a directory: pass the one it names or another")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise NibbleError(f"{output}: already exists; choose another --output or pass --overwrite")
    writable_parent(output)
    model_dir = resolve_model_dir(model)
    adapted, info = load_adapted(model_dir, adapter, device=device, any_base=any_base)
    with staged_dir(output, overwrite=overwrite) as staging:
        write_checkpoint(adapted, staging, dtype, shard_bytes, info.labels, source=model_dir)
        tokenizer_source = info.directory if (info.directory / "tokenizer.json").is_file() else model_dir
        for name in _COPIED:
            source = tokenizer_source / name if name in TOKENIZER_FILES else model_dir / name
            if source.is_file():
                shutil.copyfile(source, staging / name)
        if info.task == "classify" and (info.directory / LABEL_MAP).is_file():
            shutil.copyfile(info.directory / LABEL_MAP, staging / LABEL_MAP)
        if (info.directory / RUN_INFO).is_file():
            merged = replace(
                info.run, quant=None, gguf_base=None, base_fingerprint=None, merged_from=str(info.directory)
            )
            merged.save(staging / RUN_INFO)
    return output, info
