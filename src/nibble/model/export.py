"""GGUF export: a model (with its LoRA adapter merged) or a LoRA adapter alone, as files llama.cpp runs.

The merged weights come from the model as nibble computes it: each adapted projection is ``W + B A scale``
with ``W`` the dequantized base the adapter was trained on (never a re-quantized one), and every tensor is
quantized once, into the GGUF type chosen for it. Layout facts (llama.cpp's converter):

- architectures: Llama, SmolLM and Mistral are ``llama`` (no sliding window); Qwen2 ``qwen2`` (q/k/v
  biases); Qwen3 ``qwen3`` (per-head q/k RMSNorm); Qwen3-MoE ``qwen3moe``; Qwen3.5 ``qwen35``, Qwen3.5-MoE
  ``qwen35moe`` and Qwen3-Next ``qwen3next`` (full attention every ``full_attention_interval`` layers, Gated
  DeltaNet in the others); where each tensor goes and how its values change is
  :mod:`nibble.io.gguf.names`' business;
- a tied LM head is left out (llama.cpp reuses ``token_embd``); Llama 3 RoPE scaling is a ``rope_freqs``
  tensor of per-frequency divisors, linear scaling two metadata keys;
- a LoRA adapter file has ``general.type`` ``adapter``, ``adapter.type`` ``lora``, ``adapter.lora.alpha``
  and tensors ``<weight name>.lora_a`` ``[r, in]`` / ``.lora_b`` ``[out, r]``; llama.cpp scales ``B A`` by
  ``alpha / r``.

Tensor types: norms, biases, RoPE factors, routers and the DeltaNet conv kernel are F32; a weight (2-D, or
3-D expert stacks) takes the requested type, except the
LM head (or the token embedding standing in for a tied one), which takes Q6_K when a 4-bit type is
requested, as ``llama-quantize`` does. A K-quant needs rows that are a multiple of 256 values: other rows
fall back to Q5_0 (for Q4_K) or Q8_0 (for Q6_K), and rows no 32-block type tiles to F16.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import torch

from nibble.errors import NibbleError
from nibble.io.gguf import GGUFTensor, llama3_rope_factors, tokenizer_metadata, write_gguf
from nibble.io.gguf.names import FULL_PRECISION, HYBRID, MOE, Geometry, Link, check_links, links
from nibble.io.peft import PREFIX, WEIGHTS_NAME
from nibble.io.safetensors import load_file
from nibble.io.tokenizer import Tokenizer
from nibble.model.adapter import AdapterInfo
from nibble.model.config import ModelConfig
from nibble.model.merge import dense_tensors
from nibble.model.model import DecoderModel
from nibble.nn.lora import PROJECTIONS
from nibble.quant.gguf import BLOCKS

# --quant name -> ggml type
QUANTS = {
    "f32": "F32",
    "f16": "F16",
    "bf16": "BF16",
    "q8_0": "Q8_0",
    "q6_k": "Q6_K",
    "q4_k": "Q4_K",
    "q4_1": "Q4_1",
    "q4_0": "Q4_0",
}
ADAPTER_QUANTS = ("f32", "f16", "bf16")
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "qwen3_5_text": "qwen35",
    "qwen3_5_moe_text": "qwen35moe",
    "qwen3_next": "qwen3next",
}
# Families whose LoRA adapters llama.cpp applies one projection at a time, as nibble writes them.
ADAPTER_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
    "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
_HEAD_TYPES = {"Q4_0": "Q6_K", "Q4_1": "Q6_K", "Q4_K": "Q6_K"}
_FALLBACKS = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}
_LORA_KEY = re.compile(rf"{re.escape(PREFIX)}model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


@dataclass
class ExportedTensor:
    """One tensor of an exported file: its GGUF name, type, torch-order shape, and whether its type fell back."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    fallback: bool = False

    @property
    def params(self) -> int:
        return math.prod(self.shape)


@dataclass
class ExportResult:
    """What was written: the file, its architecture, and each tensor's type."""

    path: Path
    architecture: str
    tensors: list[ExportedTensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def type_summary(self) -> dict[str, dict[str, int]]:
        """Per ggml type: how many tensors, parameters and bytes the file holds in it."""
        out: dict[str, dict[str, int]] = {}
        for t in self.tensors:
            block, size = BLOCKS[t.ggml_type]
            entry = out.setdefault(t.ggml_type, {"tensors": 0, "params": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["params"] += t.params
            entry["bytes"] += t.params // block * size
        return out


def architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture that runs ``config``'s model.

    Raises:
        NibbleError: a model llama.cpp's architecture would compute differently: a Qwen3 with an o_proj bias, a
            sparse model with dense layers among its sparse ones or top-k weights not renormalized, a hybrid
            whose full-attention layers are not every ``full_attention_interval``-th, or ungated attention.
    """
    if config.model_type not in GGUF_ARCHITECTURES:
        raise NibbleError(
            f"GGUF export of {config.model_type} models is not supported; export the PEFT adapter or a merged "
            "checkpoint (nibble merge)"
        )
    arch = GGUF_ARCHITECTURES[config.model_type]
    if arch not in ("llama", "qwen2") and config.attention_out_bias:
        raise NibbleError(f"a {config.model_type} model with attention biases has no llama.cpp counterpart")
    moe = config.moe
    if arch in MOE and moe is not None:
        if moe.mlp_only_layers or moe.decoder_sparse_step != 1:
            raise NibbleError(
                f"a {config.model_type} model with dense layers among its sparse ones (mlp_only_layers "
                f"{list(moe.mlp_only_layers)}, decoder_sparse_step {moe.decoder_sparse_step}) has no llama.cpp "
                f"counterpart: its {arch} makes every layer sparse"
            )
        if not moe.norm_topk_prob:
            raise NibbleError(
                f"a {config.model_type} model with norm_topk_prob false has no llama.cpp counterpart: its {arch} "
                "always renormalizes the top-k expert weights"
            )
    if arch in HYBRID:
        interval = _full_attention_interval(config)
        if interval is None:
            raise NibbleError(
                f"layer_types {list(config.layer_types or ())} do not put full attention on every n-th layer; "
                f"llama.cpp's {arch} reads the layer kinds from one full_attention_interval"
            )
        if not config.attn_output_gate:
            raise NibbleError(f"a {config.model_type} model without attn_output_gate has no llama.cpp counterpart")
    return arch


def _full_attention_interval(config: ModelConfig) -> int | None:
    """``n`` when layer ``i`` is full attention exactly when ``i + 1`` is a multiple of ``n``, else None."""
    kinds = list(config.layer_types or ())
    full = [i for i, kind in enumerate(kinds) if kind == "full_attention"]
    n = full[0] + 1 if full else len(kinds) + 1
    expected = ["full_attention" if (i + 1) % n == 0 else "linear_attention" for i in range(len(kinds))]
    return n if kinds == expected else None


def tensor_type(shape: tuple[int, ...], wanted: str, head: bool = False, name: str = "") -> tuple[str, bool]:
    """``(ggml type, fell back)`` for tensor ``name`` of ``shape`` when ``wanted`` is requested (see the module
    doc)."""
    if len(shape) == 1 or name.endswith(FULL_PRECISION):
        return "F32", False
    if head:
        wanted = _HEAD_TYPES.get(wanted, wanted)
    cols = shape[-1]
    chosen = wanted
    if cols % BLOCKS[chosen][0]:
        chosen = _FALLBACKS.get(chosen, chosen)
    if cols % BLOCKS[chosen][0]:
        chosen = "F16"
    return chosen, chosen != wanted


def model_metadata(config: ModelConfig, arch: str, name: str, file_type: str) -> dict[str, object]:
    """The ``general.*`` and ``{arch}.*`` keys llama.cpp reads for ``config``."""
    meta: dict[str, object] = {
        "general.type": "model",
        "general.name": name,
        "general.file_type": int(_FILE_TYPES[file_type]),
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        f"{arch}.vocab_size": config.vocab_size,
        f"{arch}.context_length": config.max_position_embeddings,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.block_count": config.num_hidden_layers,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.attention.head_count": config.num_attention_heads,
        f"{arch}.attention.head_count_kv": config.num_key_value_heads,
        f"{arch}.attention.key_length": config.head_dim,
        f"{arch}.attention.value_length": config.head_dim,
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        f"{arch}.rope.dimension_count": config.head_dim,
        f"{arch}.rope.freq_base": float(config.rope_theta),
    }
    moe = config.moe
    if arch in MOE and moe is not None:
        meta[f"{arch}.expert_count"] = moe.num_experts
        meta[f"{arch}.expert_used_count"] = moe.num_experts_per_tok
        meta[f"{arch}.expert_feed_forward_length"] = moe.moe_intermediate_size
        if moe.shared_expert_intermediate_size:
            meta[f"{arch}.expert_shared_feed_forward_length"] = moe.shared_expert_intermediate_size
    if arch in HYBRID:
        v_heads = config.linear_num_value_heads
        meta[f"{arch}.rope.dimension_count"] = int(config.head_dim * config.partial_rotary_factor)
        meta[f"{arch}.full_attention_interval"] = _full_attention_interval(config)
        meta[f"{arch}.ssm.conv_kernel"] = config.linear_conv_kernel_dim
        meta[f"{arch}.ssm.state_size"] = config.linear_key_head_dim
        meta[f"{arch}.ssm.group_count"] = config.linear_num_key_heads
        meta[f"{arch}.ssm.time_step_rank"] = v_heads
        meta[f"{arch}.ssm.inner_size"] = config.linear_value_head_dim * v_heads
    if arch in ("qwen35", "qwen35moe"):  # (llama.cpp requires the mRoPE sections; text positions use them all alike)
        sections = list(config.mrope_section or (11, 11, 10))
        meta[f"{arch}.rope.dimension_sections"] = [int(s) for s in sections] + [0] * (4 - len(sections))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(scaling["factor"])
    elif scaling.get("rope_type") == "llama3":
        meta[f"{arch}.rope.scaling.original_context_length"] = int(scaling["original_max_position_embeddings"])
    return meta


def model_tensors(model: DecoderModel, wanted: str, arch: str) -> tuple[list[GGUFTensor], list[ExportedTensor]]:
    """The tensors of ``model`` (LoRA merged, 4-bit bases dequantized) to write, in model order, with types."""
    config = model.config
    layout = Geometry.of(config.to_hf(), arch)
    check_links(layout, "the model")
    head = "output.weight" if not config.tie_word_embeddings else "token_embd.weight"
    hf = dense_tensors(model, fused_experts=True)
    out: list[GGUFTensor] = []
    chosen: list[ExportedTensor] = []
    for link in links(layout):
        values = _link_values(link, hf[link.hf][1])
        for j, (name, shape) in enumerate(link.gguf):
            kind, fell_back = tensor_type(shape, wanted, head=name == head, name=name)
            out.append(GGUFTensor(name, shape, kind, lambda j=j, values=values: values(j)))
            chosen.append(ExportedTensor(name, kind, shape, fell_back))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "llama3":
        params = {"rope_type": "llama3", **scaling}
        factors = torch.from_numpy(llama3_rope_factors(config.rope_theta, config.head_dim, params)).float()
        shape = (config.head_dim // 2,)
        out.append(GGUFTensor("rope_freqs.weight", shape, "F32", lambda: factors))
        chosen.append(ExportedTensor("rope_freqs.weight", "F32", shape))
    return out, chosen


def _link_values(link: Link, produce: Callable[[torch.dtype], torch.Tensor]) -> Callable[[int], torch.Tensor]:
    """``values(j)``: the ``j``-th GGUF tensor of ``link``, the HF tensor produced once for all of them (they are
    written one after another, and the last one drops it)."""
    held: list[tuple[torch.Tensor, ...]] = []

    def values(j: int) -> torch.Tensor:
        if not held:
            with torch.no_grad():
                held.append(link.to_gguf(produce(torch.float32)))
        parts = held[0]
        if j == len(parts) - 1:
            held.clear()
        return parts[j]

    return values


def export_model(
    model: DecoderModel,
    tokenizer: Tokenizer,
    output: str | Path,
    quant: str = "f16",
    *,
    name: str = "nibble export",
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Write ``model`` (a causal LM; LoRA layers merged) as a GGUF file llama.cpp loads.

    Raises:
        NibbleError: a classifier, an unknown ``quant``, a model or tokenizer llama.cpp has no counterpart
            for, or an ``output`` that exists (without ``overwrite``).
    """
    if model.task != "causal_lm":
        raise NibbleError("llama.cpp runs causal language models; a classifier has no GGUF form")
    if quant not in QUANTS:
        raise NibbleError(f"--quant {quant} is not supported; use one of {', '.join(QUANTS)}")
    config = model.config
    arch = architecture(config)
    wanted = QUANTS[quant]
    tensors, chosen = model_tensors(model, wanted, arch)
    metadata = {**model_metadata(config, arch, name, wanted), **tokenizer_metadata(tokenizer, config.vocab_size)}
    path = write_gguf(output, arch, metadata, tensors, overwrite=overwrite, log=log)
    result = ExportResult(path, arch, chosen)
    if config.sliding_window and config.sliding_window < config.max_position_embeddings:
        result.notes.append(
            f"sliding window {config.sliding_window}: llama.cpp's llama attends to the whole context, so outputs "
            f"agree up to {config.sliding_window} tokens"
        )
    return result


def export_adapter(
    config: ModelConfig, info: AdapterInfo, output: str | Path, quant: str = "f16", *, overwrite: bool = False
) -> ExportResult:
    """Write the LoRA adapter ``info`` (for a base shaped as ``config``) as a llama.cpp LoRA GGUF.

    B's rows follow the base's q/k row order (interleaved for ``llama``); ``adapter.lora.alpha`` is the
    adapter's alpha (``alpha * sqrt(r)`` for rsLoRA, so that llama.cpp's ``alpha / r`` is the trained scale).

    Raises:
        NibbleError: a classification adapter, a target that is no block projection, a ``quant`` other than
            f32/f16/bf16, missing or misshapen tensors, or an ``output`` that exists (without ``overwrite``).
    """
    if info.task != "causal_lm":
        raise NibbleError(
            f"{info.directory}: a classification adapter; llama.cpp runs causal language models (train with "
            "--task instruct to export an adapter)"
        )
    if quant not in ADAPTER_QUANTS:
        raise NibbleError(f"--quant {quant}: a LoRA adapter is written as {', '.join(ADAPTER_QUANTS)}")
    arch = architecture(config)
    if arch not in ADAPTER_ARCHITECTURES:
        raise NibbleError(
            f"{info.directory}: a LoRA adapter GGUF is written for {', '.join(ADAPTER_ARCHITECTURES)} models; for "
            f"{arch}, export the model with the adapter merged instead (nibble export without --adapter-only)"
        )
    rank, alpha = int(info.config["r"]), float(info.config["lora_alpha"])
    if info.config.get("use_rslora"):
        alpha *= math.sqrt(rank)
    weights = info.directory / WEIGHTS_NAME
    stored = load_file(weights)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in stored.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None or match.group(3) not in PROJECTIONS:
            raise NibbleError(f"{weights}: '{key}' is not a LoRA weight of a block projection; llama.cpp has no place")
        layer, group, proj, half = match.groups()
        pairs.setdefault(f"model.layers.{layer}.{group}.{proj}.weight", {})[half] = tensor.float()
    tensors: list[GGUFTensor] = []
    chosen: list[ExportedTensor] = []
    kind = QUANTS[quant]
    by_hf = {link.hf: link for link in links(Geometry.of(config.to_hf(), arch))}
    for hf_name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise NibbleError(f"{weights}: '{hf_name}' lacks lora_{'B' if 'A' in pair else 'A'}")
        if hf_name not in by_hf:
            raise NibbleError(f"{weights}: '{hf_name}' is not a weight of the {config.num_hidden_layers}-layer base")
        ((name, _),) = by_hf[hf_name].gguf
        # B's rows follow the weight's row order in the file (the same map as the weight's: a row permutation)
        a, (b,) = pair["A"], by_hf[hf_name].to_gguf(pair["B"])
        if a.shape[0] != rank or b.shape[1] != rank:
            raise NibbleError(f"{weights}: '{hf_name}' has rank {a.shape[0]}/{b.shape[1]}, the config says r={rank}")
        for suffix, value in (("lora_a", a), ("lora_b", b)):
            t_kind, _ = tensor_type(tuple(value.shape), kind)
            tensors.append(GGUFTensor(f"{name}.{suffix}", tuple(value.shape), t_kind, lambda v=value: v))
            chosen.append(ExportedTensor(f"{name}.{suffix}", t_kind, tuple(value.shape)))
    if not tensors:
        raise NibbleError(f"{weights}: holds no LoRA weights")
    metadata = {
        "general.type": "adapter",
        "general.name": info.directory.name,
        "adapter.type": "lora",
        "adapter.lora.alpha": alpha,
    }
    path = write_gguf(output, arch, metadata, tensors, overwrite=overwrite)
    return ExportResult(path, arch, chosen)
