"""Memory arithmetic for a model shape: weights in each format, and an estimate for a training run.

Weight sizes are exact (they count the same tensors a loaded model holds); activation sizes are an
estimate of what autograd keeps for backward, documented in :func:`activation_bytes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from nibble.errors import NibbleError
from nibble.model.config import ModelConfig
from nibble.nn.lora import PROJECTIONS
from nibble.quant import QuantSpec
from nibble.quant.nf4 import NESTED_BLOCKSIZE

METHODS = ("qlora", "lora", "full")
WEIGHT_FORMATS = ("fp32", "bf16", "nf4", "nf4+dq", "int4")
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of each block projection (the same in every layer)."""
    h, i = config.hidden_size, config.intermediate_size
    return {
        "q_proj": (config.q_dim, h),
        "k_proj": (config.kv_dim, h),
        "v_proj": (config.kv_dim, h),
        "o_proj": (h, config.q_dim),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }


def weight_bytes(out_features: int, in_features: int, fmt: str | QuantSpec) -> int:
    """Bytes of one ``[out, in]`` weight stored dense (``"fp32"``, ``"bf16"``) or in 4 bits as a QuantSpec says.

    Raises:
        NibbleError: an unknown dense format, or INT4 with ``in_features`` not divisible by the group size.
    """
    n = out_features * in_features
    if fmt == "fp32":
        return 4 * n
    if fmt == "bf16":
        return 2 * n
    if not isinstance(fmt, QuantSpec) or fmt.format == "gguf":
        raise NibbleError(f"unknown weight format '{fmt}'; use one of {WEIGHT_FORMATS}")
    if fmt.format == "nf4":
        blocks = math.ceil(n / fmt.blocksize)
        if not fmt.double_quant:
            return math.ceil(n / 2) + 4 * blocks
        # uint8 code per block, fp32 absmax per 256 blocks, and the 256-entry fp32 code table.
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 * 256
    if in_features % fmt.group_size:
        raise NibbleError(
            f"in_features {in_features} is not divisible by INT4 group_size {fmt.group_size}; pick a group size "
            "that divides it"
        )
    return n // 2 + 2 * out_features * (in_features // fmt.group_size)


def column_formats(spec: QuantSpec) -> dict[str, str | QuantSpec]:
    """The formats of a weight-size table (WEIGHT_FORMATS), the 4-bit ones with ``spec``'s block and group sizes."""
    return {
        "fp32": "fp32",
        "bf16": "bf16",
        "nf4": replace(spec, format="nf4", double_quant=False),
        "nf4+dq": replace(spec, format="nf4", double_quant=True),
        "int4": replace(spec, format="int4"),
    }


def format_rows(config: ModelConfig, spec: QuantSpec | None = None) -> list[tuple[str, int, dict]]:
    """``(component, params, {format: bytes or None})``: embeddings, norms, block projections, all weights.

    Only block projections have 4-bit sizes (nothing else is ever quantized); INT4 is None too when the
    group size does not divide a projection's input features. ``spec`` gives the 4-bit block and group sizes.
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    embed = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    proj = sum(o * i for o, i in projection_shapes(config).values()) * layers
    norms = layers * (2 * h + 2 * config.head_dim * config.qk_norm) + h
    projections: dict[str, int | None] = {}
    for name, fmt in column_formats(spec or QuantSpec()).items():
        try:
            projections[name] = projections_bytes(config, fmt)
        except NibbleError:
            projections[name] = None
    dense = {"fp32": 4, "bf16": 2}
    tied = " (tied)" if config.tie_word_embeddings else ""
    return [
        (f"embeddings + lm_head{tied}", embed, {f: embed * dense[f] if f in dense else None for f in WEIGHT_FORMATS}),
        ("norms", norms, {f: norms * dense[f] if f in dense else None for f in WEIGHT_FORMATS}),
        ("block projections", proj, projections),
        (
            "all weights",
            embed + norms + proj,
            {f: (embed + norms + proj) * dense.get(f, 0) or None for f in WEIGHT_FORMATS},
        ),
    ]


def projections_bytes(config: ModelConfig, fmt: str | QuantSpec) -> int:
    """Bytes of all block projection weights (biases not included) stored as ``fmt`` (see :func:`weight_bytes`)."""
    per_layer = sum(weight_bytes(o, i, fmt) for o, i in projection_shapes(config).values())
    return per_layer * config.num_hidden_layers


@dataclass
class PlanOptions:
    """What a training run would look like; ``dtype`` is the dtype of dense weights and activations."""

    method: str = "qlora"
    quant: QuantSpec = field(default_factory=QuantSpec)
    task: str = "causal_lm"
    num_labels: int = 2
    seq_len: int = 512
    batch_size: int = 4
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    dtype: str = "float32"
    # bytes of the block projections as a .gguf file stores them (the ``gguf`` format keeps them so)
    gguf_projection_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise NibbleError(f"method '{self.method}' is not supported; use one of {METHODS}")
        if self.dtype not in DTYPE_NAMES:
            raise NibbleError(f"dtype '{self.dtype}' is not supported; use one of {sorted(DTYPE_NAMES)}")
        for name in ("seq_len", "batch_size", "lora_rank", "num_labels"):
            if getattr(self, name) < 1:
                raise NibbleError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        unknown = [t for t in self.lora_targets if t not in PROJECTIONS]
        if unknown or not self.lora_targets:
            raise NibbleError(f"LoRA targets {unknown or '(none)'} are not projections; use some of {PROJECTIONS}")


def activation_bytes(config: ModelConfig, opts: PlanOptions, checkpointing: bool) -> int:
    """Estimated bytes autograd keeps for backward in one training step.

    Per token and layer, a block keeps its input and the two norm outputs, q/k/v before and after RoPE,
    the attention output, gate, up, silu(gate) and their product (all in the compute dtype), plus the
    attention probabilities (heads x seq_len per token: CPU attention with a padding mask materializes
    them). With checkpointing only each block's input is kept, plus one block's activations while it
    is recomputed. The head adds fp32 logits and their gradient for causal LM.
    """
    e = DTYPE_NAMES[opts.dtype].itemsize
    h, i = config.hidden_size, config.intermediate_size
    tokens = opts.batch_size * opts.seq_len
    per_token_layer = e * (3 * h + 3 * config.q_dim + 3 * config.kv_dim + 4 * i)
    per_token_layer += e * config.num_attention_heads * opts.seq_len
    if checkpointing:
        blocks = tokens * (e * h * config.num_hidden_layers + per_token_layer)
    else:
        blocks = tokens * per_token_layer * config.num_hidden_layers
    head = tokens * config.vocab_size * 4 * 2 if opts.task == "causal_lm" else tokens * h * e
    return blocks + head


def plan_rows(config: ModelConfig, opts: PlanOptions) -> list[tuple[str, int, int]]:
    """``(component, params, bytes)`` rows for a run, ending with the two totals (params 0 there)."""
    e = DTYPE_NAMES[opts.dtype].itemsize
    h, layers = config.hidden_size, config.num_hidden_layers
    shapes = projection_shapes(config)
    proj_params = sum(o * i for o, i in shapes.values()) * layers
    rows: list[tuple[str, int, int]] = []
    embed = config.vocab_size * h
    tied = opts.task == "causal_lm" and config.tie_word_embeddings
    rows.append((f"embeddings{' (tied lm_head)' if tied else ''} [{opts.dtype}]", embed, embed * e))
    if opts.task == "causal_lm" and not tied:
        rows.append((f"lm_head [{opts.dtype}]", embed, embed * e))
    if opts.method == "qlora":
        if opts.quant.format == "gguf":
            if opts.gguf_projection_bytes is None:
                raise NibbleError("a gguf base keeps the blocks of a .gguf file; plan it with that file as --model")
            size = opts.gguf_projection_bytes
        else:
            size = projections_bytes(config, opts.quant)
        rows.append((f"block projections, frozen [{opts.quant.name}]", proj_params, size))
    else:
        state = "trainable" if opts.method == "full" else "frozen"
        rows.append((f"block projections, {state} [{opts.dtype}]", proj_params, proj_params * e))
    bias_params = layers * (
        (config.q_dim + 2 * config.kv_dim) * config.attention_bias
        + h * config.attention_out_bias
        + (2 * config.intermediate_size + h) * config.mlp_bias
    )
    if bias_params:
        rows.append((f"projection biases [{opts.dtype}]", bias_params, bias_params * e))
    norm_params = layers * (2 * h + 2 * config.head_dim * config.qk_norm) + h
    rows.append(("norms [fp32]", norm_params, norm_params * 4))
    trainable = 0
    if opts.task == "classify":
        score = opts.num_labels * h
        rows.append((f"score head, trainable [{opts.dtype}]", score, score * e))
        trainable += score
    if opts.method == "full":
        trainable += proj_params + bias_params + norm_params
    else:
        lora = opts.lora_rank * sum(sum(shapes[t]) for t in opts.lora_targets) * layers
        rows.append((f"LoRA r={opts.lora_rank} on {','.join(opts.lora_targets)} [fp32]", lora, lora * 4))
        trainable += lora
    rows.append(("gradients of trainable params [fp32]", trainable, trainable * 4))
    rows.append(("AdamW state (2 x fp32)", 2 * trainable, trainable * 8))
    weights_and_state = sum(size for _, _, size in rows)
    act = activation_bytes(config, opts, checkpointing=False)
    act_ckpt = activation_bytes(config, opts, checkpointing=True)
    rows.append(("activations, no checkpointing (estimate)", 0, act))
    rows.append(("activations, with checkpointing (estimate)", 0, act_ckpt))
    rows.append(("total, no checkpointing", 0, weights_and_state + act))
    rows.append(("total, with checkpointing", 0, weights_and_state + act_ckpt))
    return rows
