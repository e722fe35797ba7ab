"""Tensor names and layouts: llama.cpp's GGUF names against Hugging Face's, the tensors a model of a config has,
and llama.cpp's rotary row order.

llama.cpp's converter reorders the rows of ``attn_q``/``attn_k`` of ``llama`` models so that each head's two
rotary halves are interleaved (pairs ``(i, i + d/2)`` become neighbours); converting back undoes it. Qwen2/Qwen3
files are written without that reordering.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from nibble.errors import NibbleError

# GGUF tensor name -> HF name; per-block names are relative to ``model.layers.{i}.``.
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
PROJECTION = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")
_ROTARY = re.compile(r"blk\.\d+\.attn_[qk]\.(weight|bias)")


def gguf_name(hf_name: str) -> str:
    """The GGUF name of an HF tensor name (``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``).

    Raises:
        NibbleError: a tensor llama.cpp's decoders have no place for.
    """
    for gguf_key, hf_key in _GLOBAL_TENSORS.items():
        if hf_name == hf_key:
            return gguf_key
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    parts = {hf: g for g, hf in _BLOCK_TENSORS.items()}
    if match is None or match.group(2) not in parts:
        raise NibbleError(f"tensor '{hf_name}' has no GGUF name (llama.cpp's llama/qwen2/qwen3 models have none)")
    layer, part, kind = match.groups()
    return f"blk.{layer}.{parts[part]}.{kind}"


def hf_name(gguf_name: str) -> str:
    """The HF name of a GGUF tensor name that :func:`expected_tensors` lists."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_NAME.fullmatch(gguf_name)
    assert match is not None  # names were checked against the expected set
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_TENSORS[part]}.{kind}"


def block_tensors(config: dict[str, Any], architecture: str) -> dict[str, tuple[int, ...]]:
    """GGUF name (within ``blk.{i}.``) -> torch shape of every tensor one block of ``config`` has."""
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim", hidden // config["num_attention_heads"])
    q_rows, kv_rows = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    inter = config["intermediate_size"]
    block = {
        "attn_norm.weight": (hidden,),
        "ffn_norm.weight": (hidden,),
        "attn_q.weight": (q_rows, hidden),
        "attn_k.weight": (kv_rows, hidden),
        "attn_v.weight": (kv_rows, hidden),
        "attn_output.weight": (hidden, q_rows),
        "ffn_gate.weight": (inter, hidden),
        "ffn_up.weight": (inter, hidden),
        "ffn_down.weight": (hidden, inter),
    }
    if architecture == "qwen2" or config.get("attention_bias"):
        block.update({"attn_q.bias": (q_rows,), "attn_k.bias": (kv_rows,), "attn_v.bias": (kv_rows,)})
    if architecture == "llama" and config.get("attention_bias"):
        block["attn_output.bias"] = (hidden,)
    if architecture == "qwen3":
        block.update({"attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,)})
    return block


def expected_tensors(config: dict[str, Any], architecture: str) -> dict[str, tuple[int, ...]]:
    """GGUF name -> torch shape of every tensor a model of ``config`` has (callers bound the layer count)."""
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    expected = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        expected["output.weight"] = (vocab, hidden)
    block = block_tensors(config, architecture)
    for i in range(config["num_hidden_layers"]):
        expected.update({f"blk.{i}.{name}": shape for name, shape in block.items()})
    return expected


def is_rotary_permuted(architecture: str, name: str) -> bool:
    """Whether llama.cpp stores tensor ``name``'s rows in its rotary order (llama q/k weights and biases)."""
    return architecture == "llama" and _ROTARY.fullmatch(name) is not None


def unpermute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, rows ``[a0, b0, a1, b1, ...]`` back to ``[a0, a1, .., b0, b1, ..]``
    (``a``/``b`` the first/second rotary half)."""
    rows = weight.shape[0]
    # [heads * head_dim, ...] -> [heads, head_dim / 2, 2, ...] -> swap the last two row axes
    grouped = weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
    return grouped.transpose(1, 2).reshape(weight.shape).contiguous()


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order from HF's (the inverse of :func:`unpermute_rotary`): per head, the two rotary
    halves interleaved row by row."""
    rows = weight.shape[0]
    # [heads * head_dim, ...] -> [heads, 2, head_dim / 2, ...] -> swap the two row axes
    grouped = weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
    return grouped.transpose(1, 2).reshape(weight.shape).contiguous()
