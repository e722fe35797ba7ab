"""``load_model``: a Hugging Face checkpoint directory -> DecoderModel, streamed tensor by tensor.

The model is built on the meta device (no memory), then each tensor is read from the memory-mapped
checkpoint as stored, moved to the model's device and converted there. With ``quantize`` set, each block
projection is quantized on that device and its full-precision copy dropped before the next tensor is read,
so the full-precision model never exists anywhere: host memory holds one tensor at a time, and the device
the final model plus the largest single fp32 tensor. The quantized projections are kept on disk, and later
loads of the same files in the same format read them instead (see :mod:`nibble.model.quant_cache`).
Checkpoints already quantized by bitsandbytes load their NF4 bytes unchanged. A ``.gguf`` file is converted
once into an HF directory in the cache (see :func:`resolve_model_dir`) and loaded from there.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from nibble.devices import dtype_name, resolve_device
from nibble.errors import NibbleError
from nibble.io import bnb
from nibble.io.files import file_identity, format_size, name_part, tree_bytes
from nibble.io.peft import MULTIMODAL_DECODER
from nibble.io.safetensors import Checkpoint, read_checkpoint
from nibble.model import moe
from nibble.model.config import ModelConfig
from nibble.model.model import TASKS, DecoderModel
from nibble.model.quant_cache import QuantCache
from nibble.nn import QuantLinear
from nibble.nn.experts import ExpertLinear
from nibble.nn.lora import ATTENTION_PROJECTIONS, DELTANET_DENSE, DELTANET_PROJECTIONS, MLP_PROJECTIONS
from nibble.quant import QuantizedWeight, QuantSpec, quantize

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tensors some checkpoints carry that a model never needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Where a multimodal checkpoint (Qwen3_5ForConditionalGeneration) keeps its text decoder, and what else it holds
# that a text model leaves out: the vision tower and the multi-token-prediction layers (for speculative decoding).
MULTIMODAL_EXTRAS = ("model.visual.", "mtp.")
# Gated DeltaNet parameters that are not projections (conv1d [C, 1, K], A_log and dt_bias [Hv], norm [Dv]).
DELTANET_PARAMETERS = ("conv1d.weight", "A_log", "dt_bias", "norm.weight")


def resolve_model_dir(path: str | Path) -> Path:
    """The HF model directory behind ``path``: ``path`` itself, or for a ``.gguf`` file its conversion.

    A GGUF file is converted once, in the precision its weights hold (see :attr:`GGUFModel.own_dtype`: float16
    for F16 and block types, bfloat16 for BF16, else float32), into ``<cache>/converted/<name>-<key>``
    (``$NIBBLE_CACHE`` or ``~/.cache/nibble``; the key hashes the file's identity: absolute path, size, mtime,
    inode and ctime), saying on stderr where and how big; later calls find it there, and a changed file is
    converted again. The conversion appears under that name only when complete, so an interrupted one is redone.

    Raises:
        NibbleError: a missing path, or a GGUF file that cannot be converted (see ``nibble.io.gguf``).
    """
    path = Path(path)
    if path.is_dir():
        return path
    if not path.exists():
        raise NibbleError(f"{path}: no such model directory or .gguf file")
    from nibble.io.fetch import cache_dir
    from nibble.io.gguf import SOURCE_NAME, convert_gguf, is_gguf, open_gguf

    if not is_gguf(path):
        raise NibbleError(f"{path}: not a directory (expected a model directory with config.json, or a .gguf file)")

    key = hashlib.sha256(json.dumps(file_identity(path)).encode()).hexdigest()[:16]
    target = cache_dir() / "converted" / f"{name_part(path.stem)}-{key}"
    if not (target / SOURCE_NAME).is_file():  # a conversion by a nibble that did not record its source is redone
        dtype = open_gguf(path).own_dtype
        # overwrite: a concurrent conversion of the same file may have finished first; both are identical
        convert_gguf(path, target, dtype=dtype, overwrite=True)
        print(
            f"cache: converted {path.name} ({format_size(path.stat().st_size)}) into {target} "
            f"({format_size(tree_bytes(target))}, {dtype_name(dtype)}); nibble cache lists and clears it",
            file=sys.stderr,
            flush=True,
        )
    return target


def load_model(
    path: str | Path,
    *,
    task: str = "causal_lm",
    num_labels: int | None = None,
    quantize: QuantSpec | str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    pooling: str = "last",
) -> DecoderModel:
    """Load a Qwen3 / Qwen3-MoE / Qwen2 / Llama / Mistral / Qwen3.5 checkpoint directory.

    A Qwen3.5 multimodal checkpoint loads its text decoder (``model.language_model.*``); its vision tower and
    ``mtp.*`` layers are left out (a note on stderr says so).

    Args:
        path: directory with config.json and model.safetensors (or a sharded index), or a .gguf file.
        task: "causal_lm" (LM head) or "classify" (``score`` head; fresh unless the checkpoint has one).
        num_labels: classifier outputs; defaults to the checkpoint's own.
        quantize: None, or how to store the seven block projections (and a MoE model's experts) in 4 bits (a
            QuantSpec, or a format name, "nf4" or "int4", with its default parameters); "gguf" keeps the blocks of a
            .gguf ``path`` (or of the file a converted directory came from) as they are.
        dtype: dtype of embeddings, dense projections and heads (norm weights are always fp32).
        device: where the model lives: ``"auto"`` (CUDA, then XPU, then MPS, else CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"``, ``"mps"``, ``"xpu"`` or a torch.device.
        pooling: "last" or "mean" (classify only).

    Returns:
        A DecoderModel in eval mode whose parameters all have ``requires_grad=False`` except ``score``.

    Raises:
        NibbleError: a bad option, a device this machine does not have, a missing directory, an invalid
            config.json, an unsupported architecture, a missing/garbled/truncated safetensors file, a missing or
            unexpected tensor or a wrong shape.
    """
    if task not in TASKS:
        raise NibbleError(f"task '{task}' is not supported; use one of {TASKS}")
    path = Path(path)
    spec = None if quantize is None else QuantSpec.of(quantize)
    if dtype not in DTYPES:
        raise NibbleError(f"dtype {dtype} is not supported; use torch.float32, torch.bfloat16 or torch.float16")
    device = resolve_device(device)
    if spec is not None and spec.format == "gguf":
        from nibble.io.gguf import native_model

        # the .gguf file read as it is: its projections keep their own blocks, the rest is dequantized
        gguf_model = native_model(path)
        config = ModelConfig.from_hf(gguf_model.config)
        ckpt = gguf_model.checkpoint()
    else:
        path = resolve_model_dir(path)
        ckpt = read_checkpoint(path)
        config = ModelConfig.from_hf(path, tensors=len(ckpt))
        bnb.check_quantization_config(config.quantization_config, str(path / "config.json"))
    if task == "classify":
        num_labels = _num_labels(ckpt, config, num_labels)
        config = replace(config, num_labels=num_labels)
    with torch.device("meta"):
        model = DecoderModel(config, task, num_labels, pooling, dtype)
    _check_unexpected(ckpt, model, config)
    loader = _Loader(ckpt, dtype, device, MULTIMODAL_DECODER if config.multimodal else "model.")
    cache = _quant_cache(path, ckpt, spec, loader)
    loaded = set(loader.quantized)  # the projections read from the cache
    backbone = model.model
    backbone.embed_tokens.weight = loader.parameter("model.embed_tokens.weight", backbone.embed_tokens.weight)
    for i, layer in enumerate(backbone.layers):
        groups = [("mlp", MLP_PROJECTIONS, spec)]
        if isinstance(layer.mlp, moe.SparseMoE):
            moe.load_sparse_block(layer.mlp, loader, f"model.layers.{i}.mlp", spec)
            groups = [("mlp.shared_expert", MLP_PROJECTIONS, spec)] if layer.mlp.shared_expert is not None else []
        if layer.linear:
            groups += [("linear_attn", DELTANET_PROJECTIONS, spec), ("linear_attn", DELTANET_DENSE, None)]
        else:
            groups.append(("self_attn", ATTENTION_PROJECTIONS, spec))
        for group, names, group_spec in groups:
            parent = layer.get_submodule(group)
            for name in (n for n in names if hasattr(parent, n)):  # (DeltaNet's names: one family's or the other's)
                prefix = f"model.layers.{i}.{group}.{name}"
                setattr(parent, name, loader.projection(prefix, getattr(parent, name), group_spec))
        params = ["input_layernorm.weight", "post_attention_layernorm.weight"]
        if layer.linear:
            params += [f"linear_attn.{name}" for name in DELTANET_PARAMETERS]
        elif config.qk_norm:
            params += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
        for name in params:
            owner, attr = name.rsplit(".", 1)
            module = layer.get_submodule(owner)
            setattr(module, attr, loader.parameter(f"model.layers.{i}.{name}", getattr(module, attr)))
    backbone.norm.weight = loader.parameter("model.norm.weight", backbone.norm.weight)
    if task == "causal_lm":
        _load_lm_head(model, loader, config)
    else:
        _load_score(model, loader, config)
    if cache is not None:  # QuantLinear weights as "<module>.weight", a sparse layer's experts as "<module>"
        weights = {
            f"{name}.weight" if isinstance(m, QuantLinear) else name: m.qweight
            for name, m in model.named_modules()
            if isinstance(m, (QuantLinear, ExpertLinear)) and m.qweight is not None
        }
        cache.refresh(loaded, weights, loader.misfit)
    return model.eval()


def _quant_cache(path: Path, ckpt: Checkpoint, spec: QuantSpec | None, loader: _Loader) -> QuantCache | None:
    """Hand ``loader`` the projections quantized by an earlier load of ``path`` as ``spec`` says (see
    :mod:`nibble.model.quant_cache`); returns the cache entry (None: no 4-bit format, a .gguf read natively, or a
    checkpoint 4-bit already)."""
    if spec is None or spec.format == "gguf":  # (a .gguf read as it is keeps its own blocks: nothing to cache)
        return None
    if bnb.is_quantized(ckpt, loader.stored("model.layers.0.mlp.gate_proj.weight")):
        return None
    cache = QuantCache(path, ckpt, spec)
    loader.quantized = cache.load(loader.dtype)
    return cache


def _num_labels(ckpt: Checkpoint, config: ModelConfig, num_labels: int | None) -> int:
    if "score.weight" in ckpt:
        stored = ckpt["score.weight"].shape[0]
        if num_labels is not None and num_labels != stored:
            raise NibbleError(
                f"{ckpt['score.weight'].path}: 'score.weight' has {stored} labels but num_labels={num_labels}; "
                "pass the checkpoint's count or start from its base model"
            )
        return stored
    num_labels = num_labels or config.num_labels
    if not isinstance(num_labels, int) or num_labels < 1:
        raise NibbleError("task 'classify' needs num_labels (a positive integer); the checkpoint has no 'score' head")
    return num_labels


def _load_lm_head(model: DecoderModel, loader: _Loader, config: ModelConfig) -> None:
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        return
    if "lm_head.weight" not in loader.ckpt and "score.weight" in loader.ckpt:
        raise NibbleError(
            f"{loader.ckpt.source}: no 'lm_head.weight': this is a sequence-classification checkpoint; "
            "load it with task='classify'"
        )
    model.lm_head.weight = loader.parameter("lm_head.weight", model.lm_head.weight)


def _load_score(model: DecoderModel, loader: _Loader, config: ModelConfig) -> None:
    if "score.weight" in loader.ckpt:
        weight = loader.parameter("score.weight", model.score.weight)
    else:
        # A fresh head, initialized as transformers initializes one: normal(0, initializer_range).
        weight = torch.empty(model.score.weight.shape, dtype=loader.dtype, device=loader.device)
        weight = nn.Parameter(weight.normal_(0.0, config.initializer_range))
    weight.requires_grad_(True)
    model.score.weight = weight


def _check_unexpected(ckpt: Checkpoint, model: DecoderModel, config: ModelConfig) -> None:
    """Reject tensors the model has no place for (before any is read), naming the first; a multimodal
    checkpoint's vision tower and mtp layers are left out with a note."""
    known = set(model.state_dict()) | {"lm_head.weight", "score.weight"}  # the other task's head is skipped
    known |= moe.checkpoint_keys(config)
    if config.multimodal:
        known = {MULTIMODAL_DECODER + k.removeprefix("model.") if k.startswith("model.") else k for k in known}
        extras = [key for key in ckpt if key.startswith(MULTIMODAL_EXTRAS)]
        if extras:
            kinds = " and ".join(f"{p}*" for p in MULTIMODAL_EXTRAS if any(k.startswith(p) for k in extras))
            print(f"note: {ckpt.source}: loading the text decoder only; {len(extras)} tensors ({kinds}) left out",
                  file=sys.stderr)  # fmt: skip
    else:
        extras = []

    def expected(key: str) -> bool:
        base = next((key.removesuffix(s) for s in bnb.AUX_SUFFIXES if key.endswith(s)), key)
        return base in known or key.endswith(_IGNORED_SUFFIXES)

    unexpected = [key for key in ckpt if not expected(key) and key not in extras]
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise NibbleError(
            f"{ckpt[unexpected[0]].path}: unexpected tensor '{unexpected[0]}'{more}; config.json describes "
            f"a {config.model_type} model with {config.num_hidden_layers} layers that has no such tensor"
        )


class _Loader:
    """Reads checkpoint tensors into parameters and projections on ``device``, one tensor at a time."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, decoder: str = "model."):
        self.ckpt = ckpt
        self.decoder = decoder  # where the checkpoint keeps what the model calls "model."
        self.dtype = dtype
        self.device = device
        self.quantized: dict[str, QuantizedWeight] = {}  # projections quantized earlier, by weight key
        self.misfit: str | None = None  # why one of them does not fit the model

    def cached(self, key: str, shape: tuple[int, ...]) -> QuantizedWeight | None:
        """The projection ``key`` quantized earlier, when it has the ``shape`` the model needs (else None: it is
        quantized again, and the cache entry remade)."""
        weight = self.quantized.pop(key, None)
        if weight is not None and tuple(weight.shape) != tuple(shape):
            self.misfit = self.misfit or f"'{key}' is {list(weight.shape)}, the model needs {list(shape)}"
            return None
        return weight

    def stored(self, key: str) -> str:
        """The checkpoint's name for the model's tensor ``key``."""
        return self.decoder + key.removeprefix("model.") if key.startswith("model.") else key

    def tensor(self, key: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``key`` (the model's name) in ``dtype`` on the device, checked against ``shape`` (an NF4 one
        is dequantized)."""
        key = self.stored(key)
        if bnb.is_quantized(self.ckpt, key):
            weight = bnb.read_nf4(self.ckpt, key).to(self.device)
            self._check_shape(key, tuple(weight.shape), shape)
            return weight.dequantize(dtype)
        info = self.ckpt.info(key)
        self._check_shape(key, info.shape, shape)
        if not info.is_float:
            raise NibbleError(f"{info.path}: tensor '{key}' is {info.dtype}, expected a float tensor")
        return self.ckpt.get_tensor(key, dtype, self.device)

    def parameter(self, key: str, like: torch.Tensor) -> nn.Parameter:
        """A frozen parameter shaped like ``like`` (keeps its dtype: fp32 norms stay fp32)."""
        return nn.Parameter(self.tensor(key, like.shape, like.dtype), requires_grad=False)

    def projection(self, prefix: str, linear: nn.Linear, spec: QuantSpec | None) -> nn.Linear | QuantLinear:
        """The projection ``prefix``: a QuantLinear (stored NF4 bytes as they are, else quantized as ``spec``
        says), or ``linear`` (on meta) filled as a frozen dense layer when ``spec`` is None."""
        weight_key = f"{prefix}.weight"
        stored = self.stored(weight_key)
        bias = None
        if linear.bias is not None:
            bias = self.tensor(f"{prefix}.bias", linear.bias.shape, self.dtype)
        if bnb.is_quantized(self.ckpt, stored):
            qweight = bnb.read_nf4(self.ckpt, stored)
            self._check_shape(stored, tuple(qweight.shape), linear.weight.shape)
            return QuantLinear(qweight.to(self.device), bias)
        if spec is not None and spec.format == "gguf":
            qweight = self.ckpt.quantized(stored)
            qweight.dtype = self.dtype
            return QuantLinear(qweight.to(self.device), bias)
        if spec is not None:
            qweight = self.cached(weight_key, tuple(linear.weight.shape))
            if qweight is None:
                dense = self.tensor(weight_key, linear.weight.shape, torch.float32)
                qweight = quantize(dense, spec)  # on the device, by the torch reference
                del dense
            else:
                qweight = qweight.to(self.device)
            self._check_shape(stored, tuple(qweight.shape), linear.weight.shape)
            qweight.dtype = self.dtype
            return QuantLinear(qweight, bias)
        weight = self.tensor(weight_key, linear.weight.shape, self.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias, requires_grad=False)
        return linear

    def _check_shape(self, key: str, actual: tuple[int, ...], expected: torch.Size) -> None:
        if tuple(actual) != tuple(expected):
            path = self.ckpt[key].path if key in self.ckpt else self.ckpt.source
            raise NibbleError(
                f"{path}: tensor '{key}' has shape {list(actual)} but config.json implies {list(expected)}"
            )
