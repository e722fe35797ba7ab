"""Tensor names and layouts: where each Hugging Face tensor lives in llama.cpp's GGUF files, for every
architecture nibble writes and reads (``llama``, ``qwen2``, ``qwen3``, ``qwen3moe``, ``qwen35``, ``qwen35moe``,
``qwen3next``).

A :class:`Link` ties one HF tensor to the GGUF tensor(s) holding it, with the two value maps between them. The
facts (llama.cpp's converter):

- ``llama`` q/k rows (and biases) have each head's two rotary halves interleaved;
- experts are 3-D tensors ``ffn_{gate,up,down}_exps`` ``[experts, rows, cols]``; HF's fused ``gate_up_proj``
  is split into the gate and up stacks;
- the hybrid families (qwen35, qwen35moe, qwen3next) store their zero-centred RMSNorm weights as ``1 + w``
  (the gated norm ``ssm_norm`` is stored as it is), ``A_log`` as ``ssm_a = -exp(A_log)``, ``dt_bias`` as
  ``ssm_dt.bias`` and the conv kernel without its unit axis;
- qwen35/qwen35moe reorder the DeltaNet value heads from grouped by key head (HF) to tiled
  (``[g0v0, g1v0, .., g0v1, g1v1, ..]``) in every tensor with a value-head axis;
- qwen3next splits HF's per-key-head ``in_proj_qkvz`` ``[q, k, v, z]`` groups into ``attn_qkv`` (all q, all k,
  all v) and ``attn_gate`` (all z); ``in_proj_ba`` is ``ssm_ba`` as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nibble.errors import NibbleError

Tensor = torch.Tensor
HYBRID = ("qwen35", "qwen35moe", "qwen3next")
MOE = ("qwen3moe", "qwen35moe", "qwen3next")
ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "qwen35", "qwen35moe", "qwen3next")
# Kept in F32 whatever type the weights take: routers, the shared-expert gate, the conv kernel (llama.cpp's
# converter keeps these in full precision).
FULL_PRECISION = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight")


@dataclass(frozen=True)
class Geometry:
    """The sizes a model's tensors follow, read from an HF config dict (:meth:`of`)."""

    arch: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    gated_attention: bool = False
    linear: tuple[bool, ...] = ()
    k_heads: int = 0
    v_heads: int = 0
    k_dim: int = 0
    v_dim: int = 0
    conv: int = 0
    experts: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0

    @classmethod
    def of(cls, config: dict[str, Any], arch: str) -> Geometry:
        """The geometry of HF config ``config`` written as llama.cpp architecture ``arch``."""
        heads = config["num_attention_heads"]
        kinds = config.get("layer_types") or []
        return cls(
            arch=arch,
            vocab=config["vocab_size"],
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate=config.get("intermediate_size", 0),
            tied=bool(config.get("tie_word_embeddings")),
            qkv_bias=arch == "qwen2" or bool(config.get("attention_bias")),
            out_bias=arch == "llama" and bool(config.get("attention_bias")),
            qk_norm=arch not in ("llama", "qwen2"),
            gated_attention=arch in HYBRID,
            linear=tuple(kind == "linear_attention" for kind in kinds) if arch in HYBRID else (),
            k_heads=config.get("linear_num_key_heads", 0),
            v_heads=config.get("linear_num_value_heads", 0),
            k_dim=config.get("linear_key_head_dim", 0),
            v_dim=config.get("linear_value_head_dim", 0),
            conv=config.get("linear_conv_kernel_dim", 0),
            experts=config.get("num_experts", 0) if arch in MOE else 0,
            expert_intermediate=config.get("moe_intermediate_size", 0),
            shared_intermediate=config.get("shared_expert_intermediate_size", 0) if arch in MOE else 0,
        )

    def is_linear(self, layer: int) -> bool:
        return bool(self.linear) and self.linear[layer]


@dataclass(frozen=True)
class Link:
    """One HF tensor (``hf``, shape ``shape``) stored as the GGUF tensors ``gguf`` (name, torch-order shape):
    ``to_gguf(hf_tensor)`` gives their values in order, ``to_hf(*gguf_tensors)`` the HF tensor back."""

    hf: str
    shape: tuple[int, ...]
    gguf: tuple[tuple[str, tuple[int, ...]], ...]
    to_gguf: Callable[[Tensor], tuple[Tensor, ...]]
    to_hf: Callable[..., Tensor]


def _same(hf: str, shape: tuple[int, ...], name: str, forward=None, backward=None) -> Link:
    """A link of one HF tensor to one GGUF tensor of the same shape (through ``forward``/``backward``)."""
    forward = forward or (lambda t: t)
    backward = backward or (lambda t: t)
    return Link(hf, shape, ((name, shape),), lambda t: (forward(t),), backward)


def _tile_v_heads(t: Tensor, dim: int, g: Geometry, size: int) -> Tensor:
    """Value heads along ``dim`` (each ``size`` wide) from grouped by key head to tiled order."""
    shape = list(t.shape)
    per_k = g.v_heads // g.k_heads
    t = t.reshape(*shape[:dim], g.k_heads, per_k, size, *shape[dim + 1 :])
    return t.transpose(dim, dim + 1).reshape(shape).contiguous()


def _group_v_heads(t: Tensor, dim: int, g: Geometry, size: int) -> Tensor:
    """The inverse of :func:`_tile_v_heads`."""
    shape = list(t.shape)
    per_k = g.v_heads // g.k_heads
    t = t.reshape(*shape[:dim], per_k, g.k_heads, size, *shape[dim + 1 :])
    return t.transpose(dim, dim + 1).reshape(shape).contiguous()


def _qkv_rows(g: Geometry) -> int:
    return 2 * g.k_heads * g.k_dim + g.v_heads * g.v_dim


def _deltanet_links(p: str, b: str, g: Geometry) -> list[Link]:
    """The links of one Gated DeltaNet mixer (``p``: its HF prefix, ``b``: the block's GGUF prefix)."""
    qk, vd = 2 * g.k_heads * g.k_dim, g.v_heads * g.v_dim
    conv_shape = (_qkv_rows(g), 1, g.conv)
    heads = (g.v_heads,)
    if g.arch == "qwen3next":
        group = [g.k_dim, g.k_dim, vd // g.k_heads, vd // g.k_heads]

        def split(t: Tensor) -> tuple[Tensor, Tensor]:
            q, k, v, z = t.reshape(g.k_heads, sum(group), g.hidden).split(group, dim=1)
            flat = [x.reshape(-1, g.hidden) for x in (q, k, v, z)]
            return torch.cat(flat[:3]), flat[3].contiguous()

        def join(qkv: Tensor, z: Tensor) -> Tensor:
            q, k, v = qkv.split([qk // 2, qk // 2, vd])
            parts = [x.reshape(g.k_heads, -1, g.hidden) for x in (q, k, v, z)]
            return torch.cat(parts, dim=1).reshape(-1, g.hidden)

        qkvz = Link(
            f"{p}in_proj_qkvz.weight",
            (qk + 2 * vd, g.hidden),
            ((f"{b}attn_qkv.weight", (qk + vd, g.hidden)), (f"{b}attn_gate.weight", (vd, g.hidden))),
            split,
            join,
        )
        return [
            qkvz,
            _same(f"{p}in_proj_ba.weight", (2 * g.v_heads, g.hidden), f"{b}ssm_ba.weight"),
            Link(
                f"{p}conv1d.weight",
                conv_shape,
                ((f"{b}ssm_conv1d.weight", (_qkv_rows(g), g.conv)),),
                lambda t: (t[:, 0].contiguous(),),
                lambda t: t[:, None],
            ),
            _same(f"{p}dt_bias", heads, f"{b}ssm_dt.bias"),
            _same(f"{p}A_log", heads, f"{b}ssm_a", lambda t: -t.exp(), lambda t: (-t).log()),
            _same(f"{p}norm.weight", (g.v_dim,), f"{b}ssm_norm.weight"),
            _same(f"{p}out_proj.weight", (g.hidden, vd), f"{b}ssm_out.weight"),
        ]

    def tile(dim: int, size: int):
        return lambda t: _tile_v_heads(t, dim, g, size)

    def group(dim: int, size: int):
        return lambda t: _group_v_heads(t, dim, g, size)

    def tile_v_part(t: Tensor) -> Tensor:
        return torch.cat([t[:qk], _tile_v_heads(t[qk:], 0, g, g.v_dim)])

    def group_v_part(t: Tensor) -> Tensor:
        return torch.cat([t[:qk], _group_v_heads(t[qk:], 0, g, g.v_dim)])

    return [
        _same(f"{p}in_proj_qkv.weight", (qk + vd, g.hidden), f"{b}attn_qkv.weight", tile_v_part, group_v_part),
        _same(f"{p}in_proj_z.weight", (vd, g.hidden), f"{b}attn_gate.weight", tile(0, g.v_dim), group(0, g.v_dim)),
        _same(f"{p}in_proj_b.weight", (g.v_heads, g.hidden), f"{b}ssm_beta.weight", tile(0, 1), group(0, 1)),
        _same(f"{p}in_proj_a.weight", (g.v_heads, g.hidden), f"{b}ssm_alpha.weight", tile(0, 1), group(0, 1)),
        Link(
            f"{p}conv1d.weight",
            conv_shape,
            ((f"{b}ssm_conv1d.weight", (_qkv_rows(g), g.conv)),),
            lambda t: (tile_v_part(t[:, 0]),),
            lambda t: group_v_part(t)[:, None],
        ),
        _same(f"{p}dt_bias", heads, f"{b}ssm_dt.bias", tile(0, 1), group(0, 1)),
        _same(
            f"{p}A_log", heads, f"{b}ssm_a", lambda t: -_tile_v_heads(t, 0, g, 1).exp(), lambda t: group(0, 1)(-t).log()
        ),
        _same(f"{p}norm.weight", (g.v_dim,), f"{b}ssm_norm.weight"),
        _same(f"{p}out_proj.weight", (g.hidden, vd), f"{b}ssm_out.weight", tile(1, g.v_dim), group(1, g.v_dim)),
    ]


def _attention_links(p: str, b: str, g: Geometry, layer_norm) -> list[Link]:
    """The links of one full-attention mixer."""
    q_rows, kv_rows = g.heads * g.head_dim, g.kv_heads * g.head_dim
    rotary = g.arch == "llama"

    def heads(name: str) -> int:
        return g.heads if name == "q" else g.kv_heads

    links = []
    for name, rows in (("q", q_rows * (2 if g.gated_attention else 1)), ("k", kv_rows), ("v", kv_rows)):
        suffixes = ("weight", "bias") if g.qkv_bias else ("weight",)
        for suffix in suffixes:
            shape = (rows, g.hidden) if suffix == "weight" else (rows,)
            if rotary and name != "v":
                n = heads(name)
                links.append(
                    _same(
                        f"{p}{name}_proj.{suffix}",
                        shape,
                        f"{b}attn_{name}.{suffix}",
                        lambda t, n=n: permute_rotary(t, n),
                        lambda t, n=n: unpermute_rotary(t, n),
                    )
                )
            else:
                links.append(_same(f"{p}{name}_proj.{suffix}", shape, f"{b}attn_{name}.{suffix}"))
    links.append(_same(f"{p}o_proj.weight", (g.hidden, q_rows), f"{b}attn_output.weight"))
    if g.out_bias:
        links.append(_same(f"{p}o_proj.bias", (g.hidden,), f"{b}attn_output.bias"))
    if g.qk_norm:
        links += [layer_norm(f"{p}{n}_norm.weight", (g.head_dim,), f"{b}attn_{n}_norm.weight") for n in "qk"]
    return links


def _mlp_links(p: str, b: str, g: Geometry) -> list[Link]:
    """The links of one block's MLP: SwiGLU, or a sparse MoE block (with its shared expert, if any)."""
    if not g.experts:
        i = g.intermediate
        return [
            _same(f"{p}gate_proj.weight", (i, g.hidden), f"{b}ffn_gate.weight"),
            _same(f"{p}up_proj.weight", (i, g.hidden), f"{b}ffn_up.weight"),
            _same(f"{p}down_proj.weight", (g.hidden, i), f"{b}ffn_down.weight"),
        ]
    e, i = g.experts, g.expert_intermediate
    links = [
        _same(f"{p}gate.weight", (e, g.hidden), f"{b}ffn_gate_inp.weight"),
        Link(
            f"{p}experts.gate_up_proj",
            (e, 2 * i, g.hidden),
            ((f"{b}ffn_gate_exps.weight", (e, i, g.hidden)), (f"{b}ffn_up_exps.weight", (e, i, g.hidden))),
            lambda t: (t[:, :i].contiguous(), t[:, i:].contiguous()),
            lambda gate, up: torch.cat([gate, up], dim=1),
        ),
        _same(f"{p}experts.down_proj", (e, g.hidden, i), f"{b}ffn_down_exps.weight"),
    ]
    if g.shared_intermediate:
        s = g.shared_intermediate
        links += [
            _same(f"{p}shared_expert.gate_proj.weight", (s, g.hidden), f"{b}ffn_gate_shexp.weight"),
            _same(f"{p}shared_expert.up_proj.weight", (s, g.hidden), f"{b}ffn_up_shexp.weight"),
            _same(f"{p}shared_expert.down_proj.weight", (g.hidden, s), f"{b}ffn_down_shexp.weight"),
            _same(f"{p}shared_expert_gate.weight", (1, g.hidden), f"{b}ffn_gate_inp_shexp.weight"),
        ]
    return links


def links(g: Geometry) -> list[Link]:
    """Every tensor of a causal LM of geometry ``g``, in model order (a tied LM head left out)."""
    if g.arch in HYBRID:

        def norm(hf: str, shape: tuple[int, ...], name: str) -> Link:
            return _same(hf, shape, name, lambda t: t + 1, lambda t: t - 1)

    else:
        norm = _same
    out = [_same("model.embed_tokens.weight", (g.vocab, g.hidden), "token_embd.weight")]
    for layer in range(g.layers):
        p, b = f"model.layers.{layer}.", f"blk.{layer}."
        out.append(norm(f"{p}input_layernorm.weight", (g.hidden,), f"{b}attn_norm.weight"))
        if g.is_linear(layer):
            out += _deltanet_links(f"{p}linear_attn.", b, g)
        else:
            out += _attention_links(f"{p}self_attn.", b, g, norm)
        after = "post_attention_norm" if g.arch in HYBRID else "ffn_norm"
        out.append(norm(f"{p}post_attention_layernorm.weight", (g.hidden,), f"{b}{after}.weight"))
        out += _mlp_links(f"{p}mlp.", b, g)
    out.append(norm("model.norm.weight", (g.hidden,), "output_norm.weight"))
    if not g.tied:
        out.append(_same("lm_head.weight", (g.vocab, g.hidden), "output.weight"))
    return out


def check_links(g: Geometry, where: str) -> None:
    """Refuse geometries llama.cpp's layout cannot hold (value heads that do not tile the key heads)."""
    if any(g.linear) and (g.k_heads <= 0 or g.v_heads % g.k_heads):
        raise NibbleError(f"{where}: {g.v_heads} DeltaNet value heads are not a multiple of the {g.k_heads} key heads")


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


# The dense families' seven block projections in GGUF (what a GGUF-native base keeps in the file's blocks).
PROJECTION = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")
_ROTARY = re.compile(r"blk\.\d+\.attn_[qk]\.(weight|bias)")


def is_rotary_permuted(architecture: str, name: str) -> bool:
    """Whether llama.cpp stores tensor ``name``'s rows in its rotary order (llama q/k weights and biases)."""
    return architecture == "llama" and _ROTARY.fullmatch(name) is not None
