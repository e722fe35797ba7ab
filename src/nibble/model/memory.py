"""Memory arithmetic for a model shape: weights in each format, and an estimate for a training run.

Weight sizes are exact (they count the same tensors a loaded model holds); activation sizes are an
estimate of what autograd keeps for backward, documented in :func:`activation_bytes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from nibble.devices import DTYPES
from nibble.errors import NibbleError
from nibble.kernels import attention_on_fp32_units, on_fp32_units
from nibble.model.config import ModelConfig
from nibble.nn.delta_rule import CHUNK
from nibble.nn.lora import ALL_LINEAR, EXPERTS, MLP_PROJECTIONS, RECOMPUTE_MIN_ELEMENTS
from nibble.nn.quant_linear import FrozenWeight, auto_cache_budget, plan_copies
from nibble.quant import QuantSpec
from nibble.quant.nf4 import NESTED_BLOCKSIZE
from nibble.quant.spec import indivisible_group

METHODS = ("qlora", "lora", "full")
# What a memory budget picks first: the most weights trained, then the least memory.
METHODS_BY_PREFERENCE = ("full", "lora", "qlora")
WEIGHT_FORMATS = ("fp32", "bf16", "nf4", "nf4+dq", "int4")


def layer_projection_shapes(config: ModelConfig, layer: int) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of each block projection of ``layer`` (those 4-bit formats store): the
    attention or Gated DeltaNet ones, then the MLP's."""
    h, i = config.hidden_size, config.intermediate_size
    if config.layer_type(layer) == "linear_attention":
        key, value = config.linear_key_dim, config.linear_value_dim
        if config.linear_fused_projections:
            mixer = {"in_proj_qkvz": (2 * key + 2 * value, h), "out_proj": (h, value)}
        else:
            mixer = {"in_proj_qkv": (2 * key + value, h), "in_proj_z": (value, h), "out_proj": (h, value)}
    else:
        q_out = 2 * config.q_dim if config.attn_output_gate else config.q_dim
        mixer = {"q_proj": (q_out, h), "k_proj": (config.kv_dim, h), "v_proj": (config.kv_dim, h),
                 "o_proj": (h, config.q_dim)}  # fmt: skip
    return {**mixer, "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def all_layer_shapes(config: ModelConfig) -> list[dict[str, tuple[int, int]]]:
    """:func:`layer_projection_shapes` of every layer, in order."""
    kinds = {t: layer_projection_shapes(config, config.layer_types.index(t)) for t in set(config.layer_types or [])}
    if not kinds:
        return [layer_projection_shapes(config, 0)] * config.num_hidden_layers
    return [kinds[config.layer_type(i)] for i in range(config.num_hidden_layers)]


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of each kind of block projection the model has, by name."""
    out: dict[str, tuple[int, int]] = {}
    for shapes in all_layer_shapes(config):
        out.update(shapes)
    return out


def deltanet_dense_params(config: ModelConfig) -> int:
    """Parameters of the Gated DeltaNet layers that stay dense: in_proj_b and in_proj_a, the conv, A_log and
    dt_bias, the gated norm (0 without such layers)."""
    linear = sum(config.layer_type(i) == "linear_attention" for i in range(config.num_hidden_layers))
    heads, channels = config.linear_num_value_heads, 2 * config.linear_key_dim + config.linear_value_dim
    per_layer = 2 * heads * config.hidden_size + channels * config.linear_conv_kernel_dim + 2 * heads
    return linear * (per_layer + config.linear_value_head_dim)


def _full_layers(config: ModelConfig) -> int:
    return sum(config.layer_type(i) == "full_attention" for i in range(config.num_hidden_layers))


def expert_shapes(config: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """``(experts, out_features, in_features)`` of each fused expert projection of a sparse layer ({} when dense)."""
    moe = config.moe
    if moe is None:
        return {}
    e, h, i = moe.num_experts, config.hidden_size, moe.moe_intermediate_size
    return {"gate_up_proj": (e, 2 * i, h), "down_proj": (e, h, i)}


def sparse_layers(config: ModelConfig) -> int:
    """How many decoder layers hold a sparse MoE block instead of the dense SwiGLU."""
    moe = config.moe
    return 0 if moe is None else sum(moe.is_sparse(i) for i in range(config.num_hidden_layers))


def shared_expert_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """``(out_features, in_features)`` of a sparse layer's shared-expert projections ([] without one)."""
    width = 0 if config.moe is None else config.moe.shared_expert_intermediate_size
    h = config.hidden_size
    return [(width, h), (width, h), (h, width)] if width else []


def frozen_shapes(config: ModelConfig) -> list[tuple[int, int, int]]:
    """``(how many, rows, in_features)`` of each kind of frozen block weight in the model: each layer's mixer
    projections (attention or Gated DeltaNet), the SwiGLU's in the dense layers, and each sparse layer's experts
    as one ``[experts * out, in]`` weight per projection (how they are stored in 4 bits) and its shared expert's."""
    counts: dict[tuple[int, int], int] = {}
    moe = config.moe
    experts = [(e * o, i) for e, o, i in expert_shapes(config).values()] + shared_expert_shapes(config)
    for layer, shapes in enumerate(all_layer_shapes(config)):
        sparse = moe is not None and moe.is_sparse(layer)
        kept = [shape for name, shape in shapes.items() if not (sparse and name in MLP_PROJECTIONS)]
        for shape in kept + (experts if sparse else []):
            counts[shape] = counts.get(shape, 0) + 1
    return [(n, o, i) for (o, i), n in counts.items()]


def router_params(config: ModelConfig) -> int:
    """Parameters of the sparse layers' routers and shared-expert gates (always dense)."""
    if config.moe is None:
        return 0
    gates = config.moe.num_experts + (config.moe.shared_expert_intermediate_size > 0)
    return sparse_layers(config) * gates * config.hidden_size


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
        raise NibbleError(indivisible_group(in_features, fmt.group_size))
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
    proj = sum(n * o * i for n, o, i in frozen_shapes(config))
    norms = layers * 2 * h + _full_layers(config) * 2 * config.head_dim * config.qk_norm + h + router_params(config)
    other = deltanet_dense_params(config)
    projections: dict[str, int | None] = {}
    for name, fmt in column_formats(spec or QuantSpec()).items():
        try:
            projections[name] = projections_bytes(config, fmt)
        except NibbleError:
            projections[name] = None
    dense = {"fp32": 4, "bf16": 2}
    tied = " (tied)" if config.tie_word_embeddings else ""
    rows = [
        (f"embeddings + lm_head{tied}", embed, {f: embed * dense[f] if f in dense else None for f in WEIGHT_FORMATS}),
        (
            "norms" + (" + routers" if config.moe else ""),
            norms,
            {f: norms * dense[f] if f in dense else None for f in WEIGHT_FORMATS},
        ),
        ("block projections", proj, projections),
    ]
    if other:
        rows.append((DELTANET_DENSE_ROW, other, {f: other * dense[f] if f in dense else None for f in WEIGHT_FORMATS}))
    total = embed + norms + proj + other
    return [*rows, ("all weights", total, {f: total * dense.get(f, 0) or None for f in WEIGHT_FORMATS})]


DELTANET_DENSE_ROW = "DeltaNet b/a, conv, A_log, dt_bias, norm"


def projections_bytes(config: ModelConfig, fmt: str | QuantSpec) -> int:
    """Bytes of all block projection weights, experts included (biases and routers not), stored as ``fmt`` (see
    :func:`weight_bytes`)."""
    return sum(n * weight_bytes(o, i, fmt) for n, o, i in frozen_shapes(config))


@dataclass(kw_only=True)
class PlanOptions:
    """What a training run would look like, built from its config (``nibble.train.planning.plan_options``, the one
    place that does: the run's settings keep their defaults there, in ``TrainConfig``, and nowhere here).

    ``dtype`` is the compute dtype (activations; the dense frozen base of ``lora``/``qlora`` runs too; ``full``
    keeps fp32 master weights); ``batch_size`` is the micro-batch; ``task`` the model head (``causal_lm`` or
    ``classify``); ``device`` (a device type) and ``cache_budget`` (bytes, None for the per-device default) decide
    the dense copies of frozen 4-bit weights.
    """

    method: str
    quant: QuantSpec
    task: str
    num_labels: int
    seq_len: int
    batch_size: int
    lora_rank: int
    lora_targets: tuple[str, ...]
    lora_dropout: float
    dtype: str
    checkpointing: bool
    train_embeddings: bool
    device: str
    cache_budget: int | None
    train_router: bool
    # bytes of the block projections as a .gguf file stores them (the ``gguf`` format keeps them so)
    gguf_projection_bytes: int | None = None
    # the most real (non-pad) tokens a micro-batch of the run holds, where its data is known; else every row
    # is taken to be ``seq_len`` tokens long
    batch_tokens: int | None = None
    # the training task's head and loss at the step's peak: bytes per token and fixed bytes (None: the head's
    # output for every token, fp32 logits and their gradient for causal_lm)
    loss_bytes_per_token: int | None = None
    loss_fixed_bytes: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise NibbleError(f"method '{self.method}' is not supported; use one of {METHODS}")
        if self.dtype not in DTYPES:
            raise NibbleError(f"dtype '{self.dtype}' is not supported; use one of {sorted(DTYPES)}")
        for name in ("seq_len", "batch_size", "lora_rank", "num_labels"):
            if getattr(self, name) < 1:
                raise NibbleError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        unknown = [t for t in self.lora_targets if t not in ALL_LINEAR]
        if unknown or not self.lora_targets:
            raise NibbleError(f"LoRA targets {unknown or '(none)'} are not projections; use some of {ALL_LINEAR}")

    @property
    def tokens(self) -> int:
        """Tokens of the largest micro-batch: what activations scale with (padding is never computed)."""
        return self.batch_size * self.seq_len if self.batch_tokens is None else self.batch_tokens

    @property
    def weight_dtype(self) -> str:
        """The dtype dense weights are stored in: fp32 master weights for ``full`` and fp32 runs, else ``dtype``."""
        return "float32" if self.method == "full" else self.dtype


def block_activation_bytes(config: ModelConfig, opts: PlanOptions, kind: str = "full_attention") -> int:
    """Bytes one decoder block of ``kind`` keeps for backward per token: what autograd saves in nibble's block, as its
    saved-tensor hooks count it (tests/model/test_memory.py checks this against them for each method and dtype).

    Every method keeps the block input and the residual after attention (fp32: autocast keeps the residual
    stream in fp32), rotated q and k, v and the attention output (fp32 where a CPU without native bf16 runs
    attention on its fp32 units), and SwiGLU's gate and up. A LoRA method keeps each distinct adapter input
    once: the first norm's output (q/k/v), the attention output (o_proj, already kept), the second norm's
    output (gate/up) and SwiGLU's output (down_proj); the dropped copy of a large input is recomputed in the
    backward (of a small one it is kept, with its fp32 mask), and without dropout fp32 units keep an fp32 copy
    of each input. Each adapter keeps its rank-r output. ``full``
    keeps every projection's input (in a low-precision run, a cast of its norm's fp32 output per projection)
    and the normalized inputs of both norms (their weights train). Off the CPU the attention probabilities
    (heads x seq_len) are counted too, in case no fused attention kernel takes the padding mask; on the CPU the
    fused kernel always does.

    A Gated DeltaNet block (``kind`` ``linear_attention``) keeps instead of attention's tensors the conv's input
    and output, q/k/v after SiLU, the L2-normed q and k, g and beta (fp32), the rule's output, z, the gated
    norm's fp32 product and out_proj's input; the delta rule itself keeps only its inputs (see
    :func:`delta_rule_backward_bytes` for its backward). That count is by reading the code, not yet checked
    against saved-tensor hooks.
    """
    if kind == "linear_attention":
        return _deltanet_block_bytes(config, opts)
    e = DTYPES[opts.dtype].itemsize
    on_cpu, cpu = opts.device == "cpu", torch.device("cpu")
    fp32_units = on_cpu and on_fp32_units(DTYPES[opts.dtype], cpu)
    a = 4 if on_cpu and attention_on_fp32_units(DTYPES[opts.dtype], cpu, opts.seq_len) else e
    h, q, kv, i = config.hidden_size, config.q_dim, config.kv_dim, config.intermediate_size
    kept = 4 * 2 * h + a * (2 * q + 2 * kv) + e * (_mlp_kept(config) + (q + kv) * config.qk_norm)
    if opts.method == "full":
        # The norms' fp32 outputs, which autocast casts once for each projection that reads them (3 + 2).
        norm_outputs = 4 * 2 * h if e == 4 else e * 5 * h
        # QK-norm with trainable weights: the normalized q and k and their outputs before RoPE, in fp32.
        qk = 4 * 3 * (q + kv) * config.qk_norm
        return kept + 4 * 2 * h + norm_outputs + e * i + qk + _attention_probabilities(config, opts, kind)
    targets = _lora_targets(config, opts.lora_targets)
    if EXPERTS in targets:  # each expert LoRA's rank-r output per assignment (its inputs are kept anyway)
        kept += e * 2 * config.moe.num_experts_per_tok * opts.lora_rank
    inputs = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": 0, "gate_proj": h, "up_proj": h, "down_proj": i}
    targets = tuple(t for t in targets if t in inputs)  # (a hybrid model's DeltaNet targets are not in this block)
    shared = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
    distinct = {shared.get(t, t): inputs[t] for t in targets}  # each adapter input once (o_proj's is kept: 0)
    kept += e * sum(distinct.values())
    if opts.lora_dropout == 0 and fp32_units:
        kept += 4 * sum(size or q for size in distinct.values())
    elif opts.lora_dropout > 0:
        # Small inputs are not recomputed: each adapter keeps its dropped copy and the fp32 mask.
        small = [inputs[t] or q for t in targets if opts.tokens * (inputs[t] or q) < RECOMPUTE_MIN_ELEMENTS]
        kept += (e + 4) * sum(small)
    kept += 4 * opts.lora_rank * len(targets)
    return kept + _attention_probabilities(config, opts, kind)


def _deltanet_block_bytes(config: ModelConfig, opts: PlanOptions) -> int:
    """Bytes a Gated DeltaNet block keeps for backward per token (see :func:`block_activation_bytes`)."""
    e = DTYPES[opts.dtype].itemsize
    h, i = config.hidden_size, config.intermediate_size
    key, value = config.linear_key_dim, config.linear_value_dim
    conv = 2 * key + value
    kept = 2 * h + 3 * conv + 3 * value + 3 * i + (2 * key + 2 * config.linear_num_value_heads + value) * 4 // e
    inputs = {"in_proj_qkv": h, "in_proj_z": h, "in_proj_qkvz": h, "out_proj": value, "gate_proj": h, "up_proj": h,
              "down_proj": i}  # fmt: skip
    targets = [t for t in opts.lora_targets if t in inputs]
    if opts.method == "full":
        kept += 4 * h + value + i
    elif opts.lora_dropout > 0:
        mask = e if opts.device == "cpu" else 1
        out = sum(inputs[t] * e + inputs[t] * mask + opts.lora_rank * e for t in targets)
        return e * kept + out
    else:
        shared = {"in_proj_z": "in_proj_qkv", "up_proj": "gate_proj"}
        kept += sum({shared.get(t, t): inputs[t] for t in targets}.values())
        kept += opts.lora_rank * len(targets)
    return e * kept


def _mlp_kept(config: ModelConfig) -> int:
    """Elements per token the MLP keeps for backward: gate and up of the dense SwiGLU; in a sparse
    layer, per routed assignment (top-k per token), the gathered input, gate, up, their SwiGLU and the expert's
    output, and the fp32 router probabilities (counted as elements of the compute dtype, a slight over-count in
    bf16), and a shared expert's gate and up and its gated output. A model with both kinds of layer is counted at
    the larger."""
    dense = 2 * config.intermediate_size if sparse_layers(config) < config.num_hidden_layers else 0
    if config.moe is None:
        return dense
    k, i, h = config.moe.num_experts_per_tok, config.moe.moe_intermediate_size, config.hidden_size
    shared = config.moe.shared_expert_intermediate_size
    return max(dense, k * (2 * h + 3 * i) + config.moe.num_experts + (2 * shared + h if shared else 0))


def lora_params(config: ModelConfig, target: str, rank: int) -> int:
    """Trainable parameters of a rank-``rank`` LoRA on ``target`` (a projection name, or ``experts``) in every layer
    that has it: ``rank * (in + out)`` per matrix, per expert for the experts."""
    if target == EXPERTS:
        return sparse_layers(config) * sum(rank * e * (o + i) for e, o, i in expert_shapes(config).values())
    moe = config.moe
    total = 0
    for layer, shapes in enumerate(all_layer_shapes(config)):
        if target in shapes and not (target in MLP_PROJECTIONS and moe is not None and moe.is_sparse(layer)):
            total += rank * sum(shapes[target])
    return total


def _lora_targets(config: ModelConfig, targets: tuple[str, ...]) -> tuple[str, ...]:
    """The targets that adapt something in this model: experts only where it has sparse layers, the SwiGLU's
    projections only where it has none, and of the others those it has (see :func:`nibble.nn.lora.apply_lora`)."""
    has = projection_shapes(config)  # all-linear names Gated DeltaNet's projections too: those the model has
    if config.moe is None:
        return tuple(t for t in targets if t != EXPERTS and t in has)
    return tuple(t for t in targets if t == EXPERTS or (t in has and t not in MLP_PROJECTIONS))


def _attention_probabilities(config: ModelConfig, opts: PlanOptions, kind: str) -> int:
    if opts.device == "cpu" or kind == "linear_attention":
        return 0
    return DTYPES[opts.dtype].itemsize * config.num_attention_heads * opts.seq_len


def activation_bytes(config: ModelConfig, opts: PlanOptions, checkpointing: bool | None = None) -> int:
    """Estimated bytes of activations at the peak of one training step (``checkpointing`` overrides the option's).

    Without checkpointing every block keeps :func:`block_activation_bytes` per token; with it only each block's
    input stays, and one block's activations are recomputed during backward. Backward needs one more block's
    worth for the gradients flowing through it. The final norm keeps its input, the padding mask is built once
    (bool and float), and the head and loss add the task's term (``loss_bytes_per_token``, ``loss_fixed_bytes``;
    without one, fp32 logits and their gradient for causal LM).
    """
    checkpointing = opts.checkpointing if checkpointing is None else checkpointing
    e = DTYPES[opts.dtype].itemsize
    h, layers = config.hidden_size, config.num_hidden_layers
    tokens = opts.tokens
    blocks = [block_activation_bytes(config, opts, config.layer_type(i)) for i in range(layers)]
    block = max(blocks)
    kept = tokens * (e * h * layers + block) if checkpointing else tokens * sum(blocks)
    backward = tokens * block + delta_rule_backward_bytes(config, opts)
    final_norm = tokens * h * (e + 4 * (opts.method == "full"))
    mask = 5 * opts.batch_size * opts.seq_len**2
    if opts.loss_bytes_per_token is not None:
        head = tokens * opts.loss_bytes_per_token + opts.loss_fixed_bytes
    else:
        head = tokens * config.vocab_size * 4 * 2 if opts.task == "causal_lm" else tokens * h * e
    return kept + backward + final_norm + mask + head


def delta_rule_backward_bytes(config: ModelConfig, opts: PlanOptions) -> int:
    """What the delta rule's backward (one Gated DeltaNet layer at a time) holds while it runs: the recurrent state
    entering every 64-token chunk (fp32 ``num_v_heads x d_k x d_v`` per chunk per row) and about ten fp32
    chunk-by-chunk matrices per value head (0 without such layers)."""
    if not config.is_hybrid:
        return 0
    chunks = -(-opts.seq_len // CHUNK)
    heads = config.linear_num_value_heads
    states = opts.batch_size * heads * chunks * config.linear_key_head_dim * config.linear_value_head_dim * 4
    return states + 10 * opts.batch_size * heads * chunks * CHUNK * CHUNK * 4


# What a CPU run's resident memory holds beyond its live tensors, as a share of the activations: glibc's malloc
# (at its default settings, which plain runs keep) holds on to much of what a step's activations and temporaries
# freed, and the resident set grows over the first steps. How much varies from run to run of the same command.
# Measured on SmolLM2-135M QLoRA classification (batch 16 of short texts, 4 steps, 2-core AVX2 EPYC, 1 thread):
# peak RSS above the weights and the estimated activations was 0.46-1.10x those activations in fp32 (6 runs) and
# 0.85-1.28x in bf16 on fp32 units (6 runs); the share is the middle of both. And a fixed part, what the first
# steps set up (library buffers, the autograd engine): 23-26 MB on a 2-layer, hidden-64 model whose weights and
# activations are negligible.
CPU_SLACK_SHARE = 1.0
CPU_SLACK_FIXED = 32 * 2**20


def allocator_slack_bytes(opts: PlanOptions, activations: int) -> int:
    """Resident memory beyond the live tensors at the peak of a CPU run whose steps keep ``activations`` bytes
    (see :data:`CPU_SLACK_SHARE`); 0 off the CPU, where the measure is the allocator's peak of live tensors."""
    if opts.device != "cpu":
        return 0
    return round(CPU_SLACK_SHARE * activations) + CPU_SLACK_FIXED


def frozen_weights(config: ModelConfig, opts: PlanOptions) -> list[FrozenWeight]:
    """The frozen 4-bit weights of a ``qlora`` run in model order (layer by layer): the block projections (attention
    or Gated DeltaNet, and the SwiGLU's), and in a sparse layer its experts as one weight per projection
    (dequantized an expert at a time); a ``gguf`` base's share of its file's projection bytes in proportion to
    each weight's size."""
    spec, moe = opts.quant, config.moe
    layers = []
    for i, shapes in enumerate(all_layer_shapes(config)):
        sparse = moe is not None and moe.is_sparse(i)
        row = [(shape, 1) for name, shape in shapes.items() if not (sparse and name in MLP_PROJECTIONS)]
        layers.append(row + [((e * o, k), e) for e, o, k in expert_shapes(config).values() if sparse])
    if spec.format == "gguf":
        per_element = _gguf_projection_bytes(opts) / sum(math.prod(shape) for row in layers for shape, _ in row)
        size = lambda shape: round(math.prod(shape) * per_element)  # noqa: E731
    else:
        size = lambda shape: weight_bytes(*shape, spec)  # noqa: E731
    return [FrozenWeight(*shape, size(shape), spec.format, pieces) for row in layers for shape, pieces in row]


def _gguf_projection_bytes(opts: PlanOptions) -> int:
    if opts.gguf_projection_bytes is None:
        raise NibbleError("a gguf base keeps the blocks of a .gguf file; plan it with that file as --model")
    return opts.gguf_projection_bytes


def dense_copies(config: ModelConfig, opts: PlanOptions, limit: int | None = None) -> tuple[int, int, int]:
    """``(copies, 4-bit layers, bytes)``: the dense copies of frozen 4-bit weights a ``qlora`` run keeps.

    The budget is ``opts.cache_budget`` or the device's default (:func:`nibble.nn.quant_linear.auto_cache_budget`),
    at most ``limit`` bytes when given; ``(0, 0, 0)`` for the other methods.
    """
    if opts.method != "qlora":
        return 0, 0, 0
    weights = frozen_weights(config, opts)
    dtype = DTYPES[opts.dtype]
    budget = opts.cache_budget
    if budget is None:
        budget = auto_cache_budget(weights, dtype, torch.device(opts.device))
    if limit is not None:
        budget = min(budget, max(limit, 0))
    chosen = plan_copies(weights, budget, dtype)
    used = sum(w.dense_bytes(dtype) for w, keep in zip(weights, chosen, strict=True) if keep)
    return sum(chosen), len(weights), used


def plan_rows(config: ModelConfig, opts: PlanOptions, cache_limit: int | None = None) -> list[tuple[str, int, int]]:
    """``(component, params, bytes)`` rows for a run, ending with the activations and the totals without and with
    gradient checkpointing (params 0 there).

    ``cache_limit`` bounds the dense copies of frozen 4-bit weights (see :func:`dense_copies`).
    """
    e = DTYPES[opts.dtype].itemsize
    wdtype = opts.weight_dtype
    w = DTYPES[wdtype].itemsize
    h, layers = config.hidden_size, config.num_hidden_layers
    proj_params = sum(n * o * i for n, o, i in frozen_shapes(config))
    rows: list[tuple[str, int, int]] = []
    embed = config.vocab_size * h
    tied = opts.task == "causal_lm" and config.tie_word_embeddings
    rows.append((f"embeddings{' (tied lm_head)' if tied else ''} [{wdtype}]", embed, embed * w))
    if opts.task == "causal_lm" and not tied:
        rows.append((f"lm_head [{wdtype}]", embed, embed * w))
    if opts.method == "qlora":
        if opts.quant.format == "gguf":
            size = _gguf_projection_bytes(opts)
        else:
            size = projections_bytes(config, opts.quant)
        rows.append((f"block projections, frozen [{opts.quant.name}]", proj_params, size))
        copies, total, copy_bytes = dense_copies(config, opts, cache_limit)
        if copies:
            params = copy_bytes // e
            rows.append((f"dense copies of {copies}/{total} frozen 4-bit weights [{opts.dtype}]", params, copy_bytes))
        if copies < total:
            weights = frozen_weights(config, opts)
            rows.append(("dequantize workspace (largest 4-bit weight)", 0, max(x.workspace_bytes() for x in weights)))
    else:
        state = "trainable" if opts.method == "full" else "frozen"
        rows.append((f"block projections, {state} [{wdtype}]", proj_params, proj_params * w))
        if opts.method == "full" and opts.dtype != "float32":
            # Autocast casts each fp32 weight to the compute dtype; backward keeps the casts until it is done.
            rows.append((f"autocast copies of the projections [{opts.dtype}]", proj_params, proj_params * e))
    full_layers = _full_layers(config)
    bias_params = full_layers * (
        (config.q_dim + 2 * config.kv_dim) * config.attention_bias + h * config.attention_out_bias
    )
    bias_params += layers * (2 * config.intermediate_size + h) * config.mlp_bias
    if bias_params:
        rows.append((f"projection biases [{wdtype}]", bias_params, bias_params * w))
    norm_params = layers * 2 * h + full_layers * 2 * config.head_dim * config.qk_norm + h
    # The DeltaNet parts that stay dense (fp32 A_log, dt_bias and norm counted at the weight dtype: they are tiny).
    norm_params += deltanet_dense_params(config)
    rows.append(
        ("norms" + (" and " + DELTANET_DENSE_ROW if config.is_hybrid else "") + " [fp32]", norm_params, norm_params * 4)
    )
    trainable = 0
    routers = router_params(config)
    if routers:
        router_trains = opts.train_router or opts.method == "full"
        router_dtype = "fp32" if router_trains else wdtype
        state = "trainable" if router_trains else "frozen"
        rows.append((f"routers, {state} [{router_dtype}]", routers, routers * (4 if router_trains else w)))
        trainable += routers if opts.train_router and opts.method != "full" else 0
    if opts.task == "classify":
        score = opts.num_labels * h
        rows.append(("score head, trainable [fp32]", score, score * 4))
        trainable += score
    if opts.method == "full":
        trainable += proj_params + bias_params + norm_params
        if opts.train_embeddings:
            trainable += embed
    else:
        targets = _lora_targets(config, opts.lora_targets)
        lora = sum(lora_params(config, t, opts.lora_rank) for t in targets)
        rows.append((f"LoRA r={opts.lora_rank} on {','.join(targets)} [fp32]", lora, lora * 4))
        trainable += lora
    rows.append(("gradients of trainable params [fp32]", trainable, trainable * 4))
    rows.append(("AdamW state (2 x fp32)", 2 * trainable, trainable * 8))
    weights_and_state = sum(size for _, _, size in rows)
    # Writing a checkpoint serializes the trainable weights and their AdamW state (one copy); a full run's export
    # serializes every weight. Either happens between steps, when the activations are gone.
    writing = max(12 * trainable, 4 * (proj_params + bias_params + norm_params + embed) * (opts.method == "full"))
    rows.append(("writing checkpoints (serialized copies)", 0, writing))
    if config.is_hybrid:
        state = delta_rule_backward_bytes(config, opts)
        rows.append(("delta rule backward: chunk states, chunk matrices (in activations)", 0, state))
    act = activation_bytes(config, opts, checkpointing=False)
    act_ckpt = activation_bytes(config, opts, checkpointing=True)
    slack, slack_ckpt = allocator_slack_bytes(opts, act), allocator_slack_bytes(opts, act_ckpt)
    if slack:
        rows.append(("CPU runtime: allocator slack, library buffers", 0, slack_ckpt if opts.checkpointing else slack))
    rows.append(("activations, no checkpointing (estimate)", 0, act))
    rows.append(("activations, with checkpointing (estimate)", 0, act_ckpt))
    rows.append(("total, no checkpointing", 0, weights_and_state + max(act + slack, writing)))
    rows.append(("total, with checkpointing", 0, weights_and_state + max(act_ckpt + slack_ckpt, writing)))
    return rows


def estimate_bytes(config: ModelConfig, opts: PlanOptions, cache_limit: int | None = None) -> int:
    """What the run is estimated to need at its peak: the total of :func:`plan_rows` with or without gradient
    checkpointing, as ``opts`` says."""
    return plan_rows(config, opts, cache_limit)[-1 if opts.checkpointing else -2][2]


@dataclass(frozen=True)
class RunPlan:
    """A run that fits a memory budget: method, micro-batch x accumulation steps, checkpointing, and the estimate
    (dense copies of 4-bit weights left out: they fill what the budget leaves, see :func:`dense_copies`)."""

    method: str
    batch_size: int
    grad_accum: int
    checkpointing: bool
    estimate_bytes: int
    budget_bytes: int

    def describe(self) -> str:
        ckpt = "with" if self.checkpointing else "no"
        return (
            f"{self.method}, micro-batch {self.batch_size} x {self.grad_accum} accumulation step(s) "
            f"(batch {self.batch_size * self.grad_accum}), {ckpt} gradient checkpointing; "
            f"estimate {self.estimate_bytes / 1e9:.3f} GB of a {self.budget_bytes / 1e9:.3f} GB budget"
        )


def plan_candidates(
    config: ModelConfig,
    opts: PlanOptions,
    budget: int,
    effective_batch: int,
    methods: tuple[str, ...] = METHODS_BY_PREFERENCE,
    checkpointing: tuple[bool, ...] = (False, True),
) -> list[RunPlan | tuple[str, bool, int]]:
    """For each method (in order) and checkpointing setting: the :class:`RunPlan` with the largest micro-batch
    that divides ``effective_batch`` and fits ``budget``, or ``(method, checkpointing, estimate at micro-batch 1)``
    when none fits."""
    sizes = [b for b in range(effective_batch, 0, -1) if effective_batch % b == 0]
    out: list[RunPlan | tuple[str, bool, int]] = []
    for method in methods:
        for ckpt in checkpointing:
            found: RunPlan | tuple[str, bool, int] | None = None
            for b in sizes:
                trial = replace(opts, method=method, batch_size=b, checkpointing=ckpt)
                need = estimate_bytes(config, trial, cache_limit=0)
                if need <= budget:
                    found = RunPlan(method, b, effective_batch // b, ckpt, need, budget)
                    break
            out.append(found or (method, ckpt, need))
    return out


def choose_plan(candidates: list[RunPlan | tuple[str, bool, int]], budget: int) -> RunPlan:
    """The first of :func:`plan_candidates` (in the budget ``budget``) that fits: with the default order, full, then
    lora, then qlora, each without gradient checkpointing before with it.

    Raises:
        NibbleError: nothing fits (the message gives the smallest estimate and what to change).
    """
    for candidate in candidates:
        if isinstance(candidate, RunPlan):
            return candidate
    method, ckpt, need = min(candidates, key=lambda c: c[2])
    raise NibbleError(
        f"no run fits the memory budget of {budget / 1e9:.3f} GB: the smallest, {method} with micro-batch 1"
        f"{' and gradient checkpointing' if ckpt else ''}, needs an estimated {need / 1e9:.3f} GB; raise "
        "--memory-budget, lower --max-seq-len or --lora-rank, or use a smaller model"
    )
