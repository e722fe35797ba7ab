"""A GGUF model's Hugging Face ``config.json``, from its metadata (and the few tensors that carry config).

Llama 3 RoPE scaling is stored as a ``rope_freqs`` tensor of per-frequency divisors rather than as parameters;
the parameters are recovered from it and checked by rebuilding the tensor.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from nibble.errors import NibbleError
from nibble.io.gguf.metadata import decimal
from nibble.io.gguf.names import HYBRID, MOE, Geometry, links
from nibble.io.rope import rope_config_keys

if TYPE_CHECKING:
    from nibble.io.gguf.model import GGUFModel

# llama.cpp architecture -> (transformers class, model_type)
_HF_CLASSES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "qwen35": ("Qwen3_5ForCausalLM", "qwen3_5_text"),
    "qwen35moe": ("Qwen3_5MoeForCausalLM", "qwen3_5_moe_text"),
    "qwen3next": ("Qwen3NextForCausalLM", "qwen3_next"),
}
# mRoPE sections llama.cpp's converter writes when a Qwen3.5 checkpoint names none
_DEFAULT_MROPE = (11, 11, 10)


def hf_config(model: GGUFModel) -> dict[str, Any]:
    """The model's HF ``config.json`` as a dict (the fields of the transformers config of its family).

    Raises:
        NibbleError: missing or inconsistent metadata, or more blocks than the file has tensors for.
    """
    arch, meta = model.architecture, model.meta
    hidden = int(meta("{arch}.embedding_length"))
    heads = int(meta("{arch}.attention.head_count"))
    kv_heads = int(meta("{arch}.attention.head_count_kv", heads))
    head_dim = int(meta("{arch}.attention.key_length", hidden // heads))
    value_dim = int(meta("{arch}.attention.value_length", head_dim))
    rotary_dim = int(meta("{arch}.rope.dimension_count", head_dim))
    partial = arch in HYBRID  # (the hybrid families rotate a fraction of each head)
    if value_dim != head_dim or (rotary_dim != head_dim and not partial) or rotary_dim > head_dim:
        raise NibbleError(
            f"{model.path}: key/value/rotary head sizes {head_dim}/{value_dim}/{rotary_dim} differ, "
            f"which llama.cpp's {arch} does not support"
        )
    theta = decimal(meta("{arch}.rope.freq_base", 10000.0))
    hf_class, model_type = _HF_CLASSES[arch]
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": int(model.gguf_tensor("token_embd.weight").shape[1]),
        "hidden_size": hidden,
        "num_hidden_layers": int(meta("{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(meta("{arch}.context_length")),
        "rms_norm_eps": decimal(meta("{arch}.attention.layer_norm_rms_epsilon")),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in model.gguf_tensors,
        "dtype": "float32",
    }
    if arch != "qwen35moe" or meta("{arch}.feed_forward_length", None) is not None:  # (no dense MLP there)
        config["intermediate_size"] = int(meta("{arch}.feed_forward_length"))
    if arch in ("llama", "qwen3", "qwen3moe"):
        config["attention_bias"] = "blk.0.attn_q.bias" in model.gguf_tensors
    if arch == "llama":
        config["mlp_bias"] = False
    if arch == "qwen2":
        # Qwen2Config has no head_dim: it is always hidden_size / num_attention_heads
        if head_dim * heads != hidden:
            raise NibbleError(f"{model.path}: qwen2 heads of size {head_dim} do not tile hidden size {hidden}")
        del config["head_dim"]
        config["use_sliding_window"] = False
    if arch in MOE:
        config.update(_experts(model))
    if partial:
        config.update(_hybrid(model, config["num_hidden_layers"]))
        sections = [int(s) for s in meta("{arch}.rope.dimension_sections", list(_DEFAULT_MROPE))][:3]
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
        rope["partial_rotary_factor"] = rotary_dim / head_dim
        if arch != "qwen3next":
            rope.update(mrope_section=sections, mrope_interleaved=True)
        config["rope_parameters"] = rope
    # a block has this many tensors: a count the file cannot hold is refused before anything is built per block
    stored, per_block = len(model.gguf_tensors), _fewest_block_tensors(config, arch)
    if config["num_hidden_layers"] * per_block > stored:
        raise NibbleError(
            f"{model.path}: metadata key '{arch}.block_count' says {config['num_hidden_layers']} blocks of at "
            f"least {per_block} tensors, but the file holds {stored} tensors; the file is corrupt"
        )
    if not partial:
        config.update(rope_config_keys(theta, _rope_scaling(model, theta, head_dim) or None))
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        token_id = meta(f"tokenizer.ggml.{key}", None)
        if token_id is not None:
            config[f"{name}_token_id"] = int(token_id)
    return config


def _experts(model: GGUFModel) -> dict[str, Any]:
    """The expert keys of a sparse family's config (every layer sparse, top-k weights renormalized, as
    llama.cpp computes these families)."""
    meta = model.meta
    keys: dict[str, Any] = {
        "num_experts": int(meta("{arch}.expert_count")),
        "num_experts_per_tok": int(meta("{arch}.expert_used_count")),
        "moe_intermediate_size": int(meta("{arch}.expert_feed_forward_length")),
    }
    if keys["num_experts_per_tok"] > keys["num_experts"] or keys["num_experts_per_tok"] < 1:
        raise NibbleError(
            f"{model.path}: metadata says {keys['num_experts_per_tok']} of {keys['num_experts']} experts per "
            "token; the file is corrupt"
        )
    if model.architecture != "qwen3moe":
        keys["shared_expert_intermediate_size"] = int(meta("{arch}.expert_shared_feed_forward_length"))
    if model.architecture != "qwen35moe":  # (Qwen3.5-MoE's config has no such keys: always so)
        keys.update(norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    return keys


def _hybrid(model: GGUFModel, layers: int) -> dict[str, Any]:
    """The Gated DeltaNet keys of a hybrid family's config (layer ``i`` is full attention when ``i + 1`` is a
    multiple of ``full_attention_interval``)."""
    meta = model.meta
    interval = int(meta("{arch}.full_attention_interval", 4))
    v_heads = int(meta("{arch}.ssm.time_step_rank"))
    inner = int(meta("{arch}.ssm.inner_size"))
    if interval < 1 or v_heads < 1 or inner % v_heads:
        raise NibbleError(
            f"{model.path}: DeltaNet metadata (full_attention_interval {interval}, {v_heads} value heads, inner "
            f"size {inner}) is inconsistent; the file is corrupt"
        )
    return {
        "layer_types": ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)],
        "full_attention_interval": interval,
        "linear_num_key_heads": int(meta("{arch}.ssm.group_count")),
        "linear_num_value_heads": v_heads,
        "linear_key_head_dim": int(meta("{arch}.ssm.state_size")),
        "linear_value_head_dim": inner // v_heads,
        "linear_conv_kernel_dim": int(meta("{arch}.ssm.conv_kernel")),
        "attn_output_gate": True,
    }


def _fewest_block_tensors(config: dict[str, Any], arch: str) -> int:
    """The fewest tensors any block of ``config`` has."""
    counts = []
    for kind in ("full_attention", "linear_attention") if arch in HYBRID else ("full_attention",):
        block = Geometry.of({**config, "num_hidden_layers": 1, "layer_types": [kind]}, arch)
        counts.append(sum(name.startswith("blk.") for link in links(block) for name, _ in link.gguf))
    return min(counts)


def _rope_scaling(model: GGUFModel, theta: float, head_dim: int) -> dict[str, Any]:
    """RoPE scaling as transformers' ``rope_scaling`` object (empty for plain RoPE)."""
    kind = model.meta("{arch}.rope.scaling.type", "none")
    if "rope_freqs.weight" in model.gguf_tensors:  # llama.cpp's form of Llama 3 (3.1, 3.2, ...) scaling
        stored = model.gguf_tensor("rope_freqs.weight")
        factors = gguf.quants.dequantize(stored.data, stored.tensor_type).astype(np.float64).reshape(-1)
        original = int(model.meta("{arch}.rope.scaling.original_context_length", 8192))
        params = _llama3_rope(factors, theta, head_dim, original)
        if params is None:
            raise NibbleError(
                f"{model.path}: tensor 'rope_freqs.weight' holds RoPE factors that do not follow Llama 3's "
                "scaling rule, which is the only per-frequency scaling nibble converts"
            )
        return params
    if kind == "none":
        return {}
    if kind == "linear":
        return {"rope_type": "linear", "factor": decimal(model.meta("{arch}.rope.scaling.factor"))}
    raise NibbleError(f"{model.path}: RoPE scaling type '{kind}' is not supported (none and linear are)")


def llama3_rope_factors(theta: float, head_dim: int, params: dict[str, Any]) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores for Llama 3 RoPE scaling (``rope_freqs``): 1 for short
    wavelengths, ``factor`` for long ones, and a smooth blend in between."""
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelength = 2 * math.pi / inv_freq
    ratio = params["original_max_position_embeddings"] / wavelength
    low, high, factor = params["low_freq_factor"], params["high_freq_factor"], params["factor"]
    smooth = np.clip((ratio - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1.0 - smooth) / factor + smooth)


def _llama3_rope(factors: np.ndarray, theta: float, head_dim: int, original: int) -> dict[str, Any] | None:
    """Recover Llama 3 scaling parameters from stored RoPE factors, or None when they follow another rule.

    The factors depend on the parameters only through ``original / low_freq_factor`` and
    ``original / high_freq_factor``, so ``original`` (8192 unless the file says) fixes the scale. In the
    blend band ``1 / factor_i`` is linear in ``original / wavelength_i``; two or more band points give the
    line, fewer leave Llama 3's own defaults to be checked.
    """
    if factors.shape != (head_dim // 2,) or not np.all(factors >= 1.0):
        return None
    factor = float(factors.max())
    if factor == 1.0:
        return None
    params = {"rope_type": "llama3", "factor": decimal(factor), "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    params["original_max_position_embeddings"] = original
    ratio = original * (theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)) / (2 * math.pi)
    band = (factors > 1.0 + 1e-6) & (factors < factor * (1 - 1e-6))
    if band.sum() >= 2:
        # smooth = (ratio - low) / (high - low), read back from 1 / f = (1 - smooth) / factor + smooth
        smooth = (1.0 / factors[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(ratio[band], smooth, 1)
        low = -intercept / slope
        params["low_freq_factor"] = float(f"{low:.6g}")
        params["high_freq_factor"] = float(f"{low + 1.0 / slope:.6g}")
    rebuilt = llama3_rope_factors(theta, head_dim, params)
    return params if np.allclose(rebuilt, factors, rtol=1e-4, atol=0) else None
