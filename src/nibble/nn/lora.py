"""LoRA: a trainable low-rank update on top of a frozen dense or 4-bit linear layer.

``y = base(x) + B(A(dropout(x))) * scale`` with ``A`` [r, in] (Kaiming-uniform, a=sqrt(5)), ``B`` [out, r]
(zeros) and ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). Submodule names (``base_layer``,
``lora_A``, ``lora_B``) follow PEFT, so a wrapped model's state-dict keys are PEFT's keys without the
``base_model.model.`` prefix and the ``.default`` adapter name.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cached_property

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nibble import kernels
from nibble.errors import NibbleError
from nibble.nn.experts import ExpertLinear
from nibble.nn.quant_linear import QuantLinear

# The seven projections of a decoder block (Hugging Face names): what LoRA targets and 4-bit formats store.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
# The target naming every mixture-of-experts layer's experts (both fused projections, a LoRA per expert).
EXPERTS = "experts"
# Gated DeltaNet's projections (the linear-attention layers of Qwen3.5, and Qwen3-Next's fused in_proj_qkvz) that
# LoRA targets and 4-bit formats store; in_proj_b and in_proj_a (hidden -> one value per value head; Qwen3-Next's
# in_proj_ba both) stay dense: with 32 heads they hold 0.6% of a layer's weights, and 4-bit blocks of 64 along
# hidden would quantize each head's gate input whole.
DELTANET_PROJECTIONS = ("in_proj_qkv", "in_proj_z", "in_proj_qkvz", "out_proj")
DELTANET_DENSE = ("in_proj_b", "in_proj_a", "in_proj_ba")
# What "all-linear" adapts: every one of these the model has.
ALL_LINEAR = (*PROJECTIONS, *DELTANET_PROJECTIONS, EXPERTS)
DEFAULT_TARGETS = ("q_proj", "v_proj")

# From this many input elements (1 MiB in fp32) a dropped adapter input is recomputed in the backward rather
# than kept: below it, checkpoint's own cost made a 250-token SmolLM2 step 3% slower for little memory.
RECOMPUTE_MIN_ELEMENTS = 1 << 18


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 (wrapping arithmetic, logical shifts): a bijection whose every output bit
    depends on every input bit, the same on every device."""
    z = z ^ ((z >> 30) & ((1 << 34) - 1))
    z = z * _MUL1
    z = z ^ ((z >> 27) & ((1 << 37) - 1))
    z = z * _MUL2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def _signed(value: int) -> int:
    """A 64-bit unsigned value as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_MUL1, _MUL2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
_GOLDEN = _signed(0x9E3779B97F4A7C15)


def hash64(*parts: object) -> int:
    """A stable int64 digest of ``parts`` (their ``str``), the same in every process."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class DropoutKeys:
    """One int64 key per real token of a packed batch, from the sequence's tokens and the token's position in it,
    so a sequence's dropout masks are the same whatever batch, padding, micro-batch or rank it sits in.

    ``ids`` [N] are the packed token ids, ``rows`` [N] each token's batch row, ``positions`` [N] its index among its
    row's real tokens, ``last`` [B] where each row's last token sits among the N (the rows of a last-token-only
    block). The keys are computed on first use, on the device, reading nothing back. Two identical sequences in
    one step get the same keys, hence the same masks.
    """

    def __init__(self, ids: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, last: torch.Tensor):
        self.ids, self.rows, self.positions, self.last = ids, rows, positions, last

    @cached_property
    def tokens(self) -> torch.Tensor:
        """[N] the token keys: a hash of (the sequence's hash, the position)."""
        step = self.positions * _GOLDEN
        per_token = _mix(self.ids + step)  # (token, position) -> 64 bits; a row's sum of them is its content hash
        sequence = torch.zeros(self.last.shape[0], dtype=torch.int64, device=self.ids.device)
        sequence.index_add_(0, self.rows, per_token)  # integer sums: the same in any order
        return _mix(_mix(sequence)[self.rows] + step)

    def for_rows(self, rows: int) -> torch.Tensor:
        """The keys of an input of ``rows`` rows: every token's, or each sequence's last token's."""
        if rows == self.tokens.shape[0]:
            return self.tokens
        if rows == self.last.shape[0]:
            return self.tokens[self.last]
        tokens, sequences = self.tokens.shape[0], self.last.shape[0]
        raise NibbleError(f"a LoRA input of {rows} rows in a batch of {tokens} tokens and {sequences} sequences")


_KEYS: ContextVar[DropoutKeys | None] = ContextVar("nibble_dropout_keys", default=None)


@contextmanager
def dropout_keys(keys: DropoutKeys | None) -> Iterator[None]:
    """Inside, every :class:`LoRALinear` in training draws its dropout mask from ``keys`` (None: from torch's
    generator). The model enters it around each decoder block, so a recomputed block enters it again."""
    token = _KEYS.set(keys)
    try:
        yield
    finally:
        _KEYS.reset(token)


_FALLBACK = {"seed": None, "count": 0}


def _fallback_salt() -> int:
    """A fresh salt per call for a loop that never called :func:`set_dropout_step`: a hash of torch's seed
    (``torch.initial_seed``) and the count of such calls under that seed in this process, made on the host
    without a tensor (the model may live on any device, or on none)."""
    seed = torch.initial_seed()
    if _FALLBACK["seed"] != seed:
        _FALLBACK.update(seed=seed, count=0)
    _FALLBACK["count"] += 1
    return hash((seed, _FALLBACK["count"]))  # (an int tuple's hash is the same in every process)


class LoRADropout(nn.Module):
    """Dropout of the adapter's input whose mask costs a tenth of ``nn.Dropout``'s.

    Each element keeps its value (scaled by ``1 / (1 - p)``) when a 16-bit random lane is past a threshold,
    four lanes per 64-bit word. ``p`` is rounded to a multiple of 1/65536 (0.05 becomes 0.0500031), and the scale
    uses the rounded value, so the expected output is exactly the input.

    With per-row ``keys`` (see :class:`DropoutKeys`) row ``i``'s words are a counter-based hash of
    ``(keys[i], salt, word)``, where ``salt`` digests (run seed, optimizer step, this layer's path) once
    :func:`set_dropout_step` named them (else a fresh one per call, from torch's seed): a token's mask
    then depends on its sequence, its position, the step and the layer alone, not on the batch layout, the
    micro-batch split or the rank. Without keys the words come from torch's generator (``random_``).
    """

    def __init__(self, p: float):
        super().__init__()
        self.drop_lanes = round(p * 65536)  # lanes (of 65536 values) that drop an element
        self.p = self.drop_lanes / 65536
        self.scale = 1.0 / (1.0 - self.p)
        self.path = ""  # the layer's module path (set by apply_lora): what tells layers' masks apart
        self.salt: int | None = None  # see set_dropout_step

    def salted(self, keys: torch.Tensor) -> torch.Tensor:
        """``keys`` [rows] mixed with this layer's salt for the current step (what :meth:`mask` takes)."""
        return keys ^ (self.salt if self.salt is not None else _fallback_salt())

    def mask(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """A keep-mask shaped like ``x`` [..., features], already scaled: ``1 / (1 - p)`` or 0 per element, in fp32
        (a bf16 scale would be 0.2% off); from salted per-row ``keys`` (:meth:`salted`, one per row of ``x``'s
        leading dimensions) or, without them, from torch's generator."""
        if keys is None:
            n = x.numel()
            words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
            lanes = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
        else:
            features = x.shape[-1]
            counter = torch.arange((features + 3) // 4, dtype=torch.int64, device=x.device) * _GOLDEN
            words = _mix(keys.reshape(-1, 1) + counter)  # [rows, words]
            lanes = words.view(torch.int16)[:, :features].reshape(x.shape)
        keep = lanes >= self.drop_lanes - 32768
        return keep.to(torch.float32).mul_(self.scale)

    def forward(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training or self.drop_lanes == 0:
            return x
        return x * self.mask(x, keys)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


def set_dropout_step(model: nn.Module, seed: int, step: int) -> None:
    """Key every LoRA dropout of ``model`` to (``seed``, optimizer ``step``, its layer) for the step to come: with
    the model's :class:`DropoutKeys` each sequence's masks are then the same whatever the world size, micro-batch
    split or padding."""
    for module in model.modules():
        if isinstance(module, LoRADropout):
            module.salt = hash64("lora-dropout", seed, step, module.path)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` or ``QuantLinear`` plus a trainable rank-``rank`` update.

    Args:
        base: the layer to adapt; its parameters are frozen here.
        rank: r, the inner dimension of the update (>= 1).
        alpha: the scaling numerator.
        dropout: dropout probability on the adapter's input (the base sees ``x`` unchanged).
        use_rslora: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
    """

    def __init__(
        self,
        base: nn.Linear | QuantLinear,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ):
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantLinear)):
            raise NibbleError(f"LoRA wraps nn.Linear or QuantLinear layers, not {type(base).__name__}")
        if rank < 1:
            raise NibbleError(f"lora_rank must be >= 1, got {rank}")
        if rank > min(base.in_features, base.out_features):  # checked before A and B are allocated
            raise NibbleError(
                f"lora_rank {rank} is larger than a {base.in_features} -> {base.out_features} layer allows "
                f"(at most {min(base.in_features, base.out_features)})"
            )
        if not 0.0 <= dropout < 1.0:
            raise NibbleError(f"lora_dropout must be in [0, 1), got {dropout}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), use_rslora
        self.scaling = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        self.lora_dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device if isinstance(base, nn.Linear) else base.qweight.device
        # nn.Linear's own init is kaiming_uniform_(a=sqrt(5)): exactly LoRA's init for A.
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device)
        nn.init.zeros_(self.lora_B.weight)
        self.disabled = False  # see adapters_disabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disabled:
            return result
        # The adapter computes in the autocast dtype when autocast is on (as nn.Linear would), else in its
        # own (fp32) dtype; kernels.linear runs bf16 on fp32 units where the CPU has no bf16 arithmetic.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.lora_A.weight.dtype
        with torch.autocast(device, enabled=False):
            drop = self.lora_dropout
            dropping = self.training and isinstance(drop, LoRADropout) and drop.drop_lanes > 0
            source = _KEYS.get() if dropping else None
            keys = drop.salted(source.for_rows(x.numel() // x.shape[-1])) if source is not None else None
            if dropping and torch.is_grad_enabled() and x.numel() >= RECOMPUTE_MIN_ELEMENTS:
                # Autograd would keep the dropped copy of x and its fp32 mask, 8 bytes per input element per
                # adapter (0.8 of 3.9 GB in a 4 x 512-token SmolLM2 step, LoRA on q,v). Recomputed in the
                # backward instead, with the same mask (the same keys, or checkpoint restoring the RNG state), it
                # keeps only x.
                h = checkpoint(self._down, x, dtype, keys, use_reentrant=False)
            else:
                h = self._down(x, dtype, keys)
            update = kernels.linear(h, self.lora_B.weight) * self.scaling  # [..., out]
        return result + update.to(result.dtype)

    def _down(self, x: torch.Tensor, dtype: torch.dtype, keys: torch.Tensor | None = None) -> torch.Tensor:
        """``A(dropout(x))`` [..., r] in ``dtype``; ``keys``: the salted per-row dropout keys, if any."""
        dropped = self.lora_dropout(x, keys) if keys is not None else self.lora_dropout(x)
        return kernels.linear(dropped.to(dtype), self.lora_A.weight)

    def delta_weight(self) -> torch.Tensor:
        """``B @ A * scale`` [out, in] in fp32: what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight ``W + B A scale`` [out, in] (a 4-bit base is dequantized first)."""
        if isinstance(self.base_layer, QuantLinear):
            base = self.base_layer.dequantize(torch.float32)
        else:
            base = self.base_layer.weight.float()
        return (base + self.delta_weight()).to(dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"


def resolve_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """Target module names from a list, a comma-separated string, or ``"all-linear"`` (:data:`ALL_LINEAR`: the
    seven projections, Gated DeltaNet's in_proj_qkv, in_proj_z, out_proj, and the experts of mixture-of-experts
    layers)."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t).strip() for t in targets]
    names = [n for n in names if n]
    if not names:
        raise NibbleError("lora_targets is empty; name modules such as q_proj,v_proj or use all-linear")
    if "all-linear" in names:
        if len(names) > 1:
            raise NibbleError("lora_targets: all-linear already covers every projection; give it alone")
        return ALL_LINEAR
    return tuple(dict.fromkeys(names))


def apply_lora(
    model: nn.Module,
    targets: str | Iterable[str] = DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> list[str]:
    """Replace the linear layers named by ``targets`` with :class:`LoRALinear` wrappers; ``experts`` gives every
    :class:`~nibble.nn.experts.ExpertLinear` a LoRA per expert (without dropout: PEFT's LoRA on expert parameters
    has none).

    A target matches a module whose path equals it or ends with ``"." + target`` (PEFT's rule), so
    ``q_proj`` selects every layer's query projection and ``model.layers.0.self_attn.q_proj`` just one.
    ``all-linear`` takes whichever of its names the model has (on a mixture-of-experts model: attention and
    experts, as PEFT reads such an adapter). Returns the full paths of the adapted modules,
    in model order.

    Raises:
        NibbleError: a target that matches no linear layer (the message lists the names that exist); with
            all-linear, only the names this model has are wanted.
    """
    wanted = resolve_targets(targets)
    every = wanted == ALL_LINEAR
    if any(isinstance(m, ExpertLinear) for m in model.modules()):
        # PEFT on transformers 5 reads gate_proj/up_proj/down_proj targets of a mixture-of-experts model as its
        # experts' (the layout of transformers 4), so the dense SwiGLU of an mlp_only layer cannot be a target there.
        mlp = [t for t in wanted if t.rsplit(".", 1)[-1] in MLP_PROJECTIONS]
        if mlp and not every:
            raise NibbleError(
                f"lora_targets: {', '.join(mlp)} on a mixture-of-experts model: PEFT reads these names as the "
                "experts'; target 'experts' (or all-linear: attention and experts)"
            )
        wanted = tuple(t for t in wanted if t not in mlp)
    found: list[tuple[nn.Module, str, str]] = []
    matched: set[str] = set()
    available: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            raise NibbleError(f"{path} already has a LoRA adapter")
        if isinstance(module, ExpertLinear) and EXPERTS in wanted:
            matched.add(EXPERTS)
            found.append((module, "", path))
        for child_name, child in module.named_children():
            if not isinstance(child, (nn.Linear, QuantLinear)):
                continue
            available.add(child_name)
            full = f"{path}.{child_name}" if path else child_name
            hits = [t for t in wanted if full == t or full.endswith("." + t)]
            if hits:
                matched.update(hits)
                found.append((module, child_name, full))
    missing = [t for t in wanted if t not in matched]
    if missing and (not every or not matched):
        if EXPERTS in missing:
            raise NibbleError(
                "lora_targets: 'experts' names the experts of mixture-of-experts layers; this model has none"
            )
        raise NibbleError(
            f"lora_targets: no linear layer named {', '.join(missing)}; this model has {', '.join(sorted(available))}"
        )
    for parent, name, path in found:
        if isinstance(parent, ExpertLinear):
            parent.add_lora(rank, alpha, use_rslora)
        else:
            layer = LoRALinear(getattr(parent, name), rank, alpha, dropout, use_rslora)
            if isinstance(layer.lora_dropout, LoRADropout):
                layer.lora_dropout.path = path
            setattr(parent, name, layer)
    return [path for _, _, path in found]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model`` by its module path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


# The parts of a model trainable parameters are counted by, in the order they are reported.
PARTS = ("attention", "linear attention", "mlp", "experts", "router", "other")


def trainable_parts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters by part of the model (in :data:`PARTS` order): ``attention``, ``linear attention``
    (Gated DeltaNet), ``mlp`` (dense SwiGLU, a shared expert), ``experts``, ``router``, ``other`` (heads,
    embeddings, norms); parts with none are left out."""
    parts = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".self_attn." in name:
            part = "attention"
        elif ".linear_attn." in name:
            part = "linear attention"
        elif ".mlp.experts." in name:
            part = "experts"
        elif ".mlp.gate." in name and "_proj" not in name:
            part = "router"
        elif ".mlp." in name:
            part = "mlp"
        else:
            part = "other"
        parts[part] += p.numel()
    return {part: n for part, n in parts.items() if n}


def expert_lora_layers(model: nn.Module) -> dict[str, ExpertLinear]:
    """Every :class:`~nibble.nn.experts.ExpertLinear` with a LoRA in ``model`` by its module path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, ExpertLinear) and m.lora_A is not None}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside, every :class:`LoRALinear` of ``model`` computes its base layer alone: the model is its frozen base
    (a reference pass, as preference tuning needs, with no copy of the weights), and no gradient reaches the
    adapters. Under DDP run the disabled pass without gradients (``torch.no_grad()``): DDP expects every
    trainable parameter it wraps to be used by a forward it differentiates."""
    layers = list(lora_layers(model).values())
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before, strict=True):
            layer.disabled = was
