"""Memory arithmetic for a model shape: weights in each format, and an estimate for a training run.

Weight sizes are exact (they count the same tensors a loaded model holds); activation sizes are an
estimate of what autograd keeps for backward, documented in :func:`activation_bytes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from nibble.devices import DTYPES
from nibble.errors import NibbleError
from nibble.model.config import ModelConfig
from nibble.nn.lora import PROJECTIONS
from nibble.nn.quant_linear import FrozenWeight, auto_cache_budget, plan_copies
from nibble.quant import QuantSpec
from nibble.quant.nf4 import NESTED_BLOCKSIZE

METHODS = ("qlora", "lora", "full")
# What a memory budget picks first: the most weights trained, then the least memory.
METHODS_BY_PREFERENCE = ("full", "lora", "qlora")
WEIGHT_FORMATS = ("fp32", "bf16", "nf4", "nf4+dq", "int4")


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
    """What a training run would look like.

    ``dtype`` is the compute dtype (activations; the dense frozen base of ``lora``/``qlora`` runs too; ``full``
    keeps fp32 master weights); ``batch_size`` is the micro-batch; ``device`` (a device type) and
    ``cache_budget`` (bytes, None for the per-device default) decide the dense copies of frozen 4-bit weights.
    """

    method: str = "qlora"
    quant: QuantSpec = field(default_factory=QuantSpec)
    task: str = "causal_lm"
    num_labels: int = 2
    seq_len: int = 512
    batch_size: int = 4
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_dropout: float = 0.0
    dtype: str = "float32"
    checkpointing: bool = False
    train_embeddings: bool = False
    device: str = "cpu"
    cache_budget: int | None = None
    # bytes of the block projections as a .gguf file stores them (the ``gguf`` format keeps them so)
    gguf_projection_bytes: int | None = None
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
        unknown = [t for t in self.lora_targets if t not in PROJECTIONS]
        if unknown or not self.lora_targets:
            raise NibbleError(f"LoRA targets {unknown or '(none)'} are not projections; use some of {PROJECTIONS}")

    @property
    def weight_dtype(self) -> str:
        """The dtype dense weights are stored in: fp32 master weights for ``full`` and fp32 runs, else ``dtype``."""
        return "float32" if self.method == "full" else self.dtype


def block_activation_bytes(config: ModelConfig, opts: PlanOptions) -> int:
    """Bytes one decoder block keeps for backward per token (counted from what autograd saves in nibble's block).

    Every method keeps the block input and the residual after attention, the q/k norm inputs (QK-norm models),
    rotated q and k, v and the attention output, gate, up and silu(gate). ``full`` also keeps the norm outputs
    and the projection inputs. Each LoRA target keeps its input, with dropout a dropped copy per target and the
    dropout mask (the input's dtype on the CPU, 1 byte where a fused dropout runs), and its rank-r output. Off
    the CPU the attention probabilities (heads x seq_len) are counted too, in case no fused attention kernel
    takes the padding mask; on the CPU the fused kernel always does.
    """
    e = DTYPES[opts.dtype].itemsize
    h, q, kv, i = config.hidden_size, config.q_dim, config.kv_dim, config.intermediate_size
    kept = 2 * h + 2 * q + 2 * kv + 3 * i + (q + kv) * config.qk_norm
    inputs = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": q, "gate_proj": h, "up_proj": h, "down_proj": i}
    if opts.method == "full":
        kept += 2 * h + (q + kv) * config.qk_norm + 2 * h + q + i
    elif opts.lora_dropout > 0:
        mask = e if opts.device == "cpu" else 1
        out = sum(inputs[t] * e + inputs[t] * mask + opts.lora_rank * e for t in opts.lora_targets)
        return e * kept + out + _attention_probabilities(config, opts)
    else:
        shared = {"q_proj": "a1", "k_proj": "a1", "v_proj": "a1", "gate_proj": "a2", "up_proj": "a2"}
        kept += sum({shared.get(t, t): inputs[t] for t in opts.lora_targets}.values())
        kept += opts.lora_rank * len(opts.lora_targets)
    return e * kept + _attention_probabilities(config, opts)


def _attention_probabilities(config: ModelConfig, opts: PlanOptions) -> int:
    if opts.device == "cpu":
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
    tokens = opts.batch_size * opts.seq_len
    block = block_activation_bytes(config, opts)
    kept = tokens * (e * h * layers + block) if checkpointing else tokens * block * layers
    backward = tokens * block
    final_norm = tokens * h * (e + 4 * (opts.method == "full"))
    mask = 5 * opts.batch_size * opts.seq_len**2
    if opts.loss_bytes_per_token is not None:
        head = tokens * opts.loss_bytes_per_token + opts.loss_fixed_bytes
    else:
        head = tokens * config.vocab_size * 4 * 2 if opts.task == "causal_lm" else tokens * h * e
    return kept + backward + final_norm + mask + head


# What a CPU run's resident memory holds beyond its live tensors. The C allocator's slack, in blocks' worth of
# activations: glibc's malloc keeps memory that a step's temporaries freed and returns it in pieces. Measured on
# a 4-layer Qwen3 (hidden 256, 16 x 96 tokens), peak RSS above the live peak (seen with MALLOC_MMAP_THRESHOLD_=65536,
# which returns every freed block) was 1.4 (full) to 2.6 (LoRA with gradient checkpointing) blocks' worth. And a
# fixed part, what the first steps set up (library buffers, the autograd engine): 23-26 MB on a 2-layer, hidden-64
# model whose weights and activations are negligible.
CPU_SLACK_BLOCKS = 3
CPU_SLACK_FIXED = 32 * 2**20


def allocator_slack_bytes(config: ModelConfig, opts: PlanOptions) -> int:
    """Resident memory beyond the live tensors at a CPU run's peak (see :data:`CPU_SLACK_BLOCKS`); 0 off the CPU,
    where the measure is the allocator's peak of live tensors."""
    if opts.device != "cpu":
        return 0
    tokens = opts.batch_size * opts.seq_len
    return CPU_SLACK_BLOCKS * tokens * block_activation_bytes(config, opts) + CPU_SLACK_FIXED


def frozen_weights(config: ModelConfig, opts: PlanOptions) -> list[FrozenWeight]:
    """The block projections of a ``qlora`` run as 4-bit frozen weights, in model order (layer by layer); a
    ``gguf`` base's share of its file's projection bytes in proportion to each weight's size."""
    spec, shapes = opts.quant, projection_shapes(config).values()
    if spec.format == "gguf":
        per_element = _gguf_projection_bytes(opts) / (sum(o * i for o, i in shapes) * config.num_hidden_layers)
        per_layer = [FrozenWeight(o, i, round(o * i * per_element), spec.format) for o, i in shapes]
    else:
        per_layer = [FrozenWeight(o, i, weight_bytes(o, i, spec), spec.format) for o, i in shapes]
    return per_layer * config.num_hidden_layers


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
    shapes = projection_shapes(config)
    proj_params = sum(o * i for o, i in shapes.values()) * layers
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
    bias_params = layers * (
        (config.q_dim + 2 * config.kv_dim) * config.attention_bias
        + h * config.attention_out_bias
        + (2 * config.intermediate_size + h) * config.mlp_bias
    )
    if bias_params:
        rows.append((f"projection biases [{wdtype}]", bias_params, bias_params * w))
    norm_params = layers * (2 * h + 2 * config.head_dim * config.qk_norm) + h
    rows.append(("norms [fp32]", norm_params, norm_params * 4))
    trainable = 0
    if opts.task == "classify":
        score = opts.num_labels * h
        rows.append(("score head, trainable [fp32]", score, score * 4))
        trainable += score
    if opts.method == "full":
        trainable += proj_params + bias_params + norm_params
        if opts.train_embeddings:
            trainable += embed
    else:
        lora = opts.lora_rank * sum(sum(shapes[t]) for t in opts.lora_targets) * layers
        rows.append((f"LoRA r={opts.lora_rank} on {','.join(opts.lora_targets)} [fp32]", lora, lora * 4))
        trainable += lora
    rows.append(("gradients of trainable params [fp32]", trainable, trainable * 4))
    rows.append(("AdamW state (2 x fp32)", 2 * trainable, trainable * 8))
    weights_and_state = sum(size for _, _, size in rows)
    # Writing a checkpoint serializes the trainable weights and their AdamW state (one copy); a full run's export
    # serializes every weight. Either happens between steps, when the activations are gone.
    writing = max(12 * trainable, 4 * (proj_params + bias_params + norm_params + embed) * (opts.method == "full"))
    rows.append(("writing checkpoints (serialized copies)", 0, writing))
    slack = allocator_slack_bytes(config, opts)
    if slack:
        rows.append(("CPU runtime: allocator slack, library buffers", 0, slack))
    act = activation_bytes(config, opts, checkpointing=False)
    act_ckpt = activation_bytes(config, opts, checkpointing=True)
    rows.append(("activations, no checkpointing (estimate)", 0, act))
    rows.append(("activations, with checkpointing (estimate)", 0, act_ckpt))
    rows.append(("total, no checkpointing", 0, weights_and_state + max(act + slack, writing)))
    rows.append(("total, with checkpointing", 0, weights_and_state + max(act_ckpt + slack, writing)))
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
