"""The sparse mixture-of-experts block of Qwen3-MoE, Qwen3.5-MoE and Qwen3-Next: a dense router, top-k SwiGLU
experts, a gated shared expert (Qwen3.5-MoE, Qwen3-Next), the load-balancing loss.

``gate`` (the router, ``hidden -> num_experts``, always dense) scores each token; softmax in fp32; the
``num_experts_per_tok`` best experts are kept, their probabilities renormalized to sum to 1 when
``norm_topk_prob``; the experts' outputs are summed with those weights (see :mod:`nibble.nn.experts` for the
grouped compute). Checkpoints store the experts fused (``experts.gate_up_proj`` [E, 2I, H], gate rows first, and
``experts.down_proj`` [E, H, I], as transformers 5 holds them) or per expert (``experts.{e}.gate_proj.weight``
[I, H], ``up_proj``, ``down_proj`` [H, I], as published checkpoints and transformers 5's ``save_pretrained``
write them); :func:`load_sparse_block` reads both, one expert at a time when quantizing. The shared expert
(``shared_expert``, a SwiGLU every token passes through) adds ``sigmoid(shared_expert_gate x)`` times its output;
its projections are stored like a dense layer's, its gate (``hidden -> 1``) stays dense like the router.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from nibble.errors import NibbleError
from nibble.model.config import ModelConfig
from nibble.nn.experts import EXPERT_PROJECTIONS, ExpertLinear, Experts
from nibble.quant import QuantizedWeight, QuantSpec, quantize_rows

# The per-expert layout's tensors of each fused projection, in the order the fused rows hold them.
PER_EXPERT = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class RouterStats(NamedTuple):
    """One layer's routing of a batch, what the load-balancing loss needs: top-k assignments per expert [E]
    (no gradient), the sum of every token's router probabilities [E] (fp32, differentiable), and the tokens."""

    assigned: torch.Tensor
    probability: torch.Tensor
    tokens: int


class SparseMoE(nn.Module):
    """Router + experts of one decoder layer (Hugging Face names: ``gate``, ``experts``, and ``shared_expert`` +
    ``shared_expert_gate`` when the config has a shared expert: pass that SwiGLU module as ``shared_expert``).

    ``ops`` gives the SwiGLU (the model's :class:`~nibble.model.model.Elementwise`). With ``record_stats`` set, each
    training-mode forward with gradients on keeps its :class:`RouterStats` in ``router_stats`` for
    :func:`load_balancing_loss`.
    """

    def __init__(
        self, config: ModelConfig, ops: Any, dtype: torch.dtype = torch.float32, shared_expert: nn.Module | None = None
    ):
        super().__init__()
        moe = config.moe
        if moe is None:
            raise NibbleError(f"a {config.model_type} config has no mixture-of-experts settings")
        self.num_experts, self.top_k, self.norm_topk_prob = moe.num_experts, moe.num_experts_per_tok, moe.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, moe.num_experts, bias=False, dtype=dtype)
        self.experts = Experts(moe.num_experts, config.hidden_size, moe.moe_intermediate_size, dtype)
        if (shared_expert is None) != (moe.shared_expert_intermediate_size == 0):
            raise NibbleError("a shared expert module is needed exactly when the config has a shared expert")
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False, dtype=dtype)
        self.ops = ops
        self.record_stats = False
        self.router_stats: RouterStats | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` [T, H] -> router probabilities [T, E] (fp32), top-k weights [T, k] (fp32) and experts [T, k]."""
        probs = torch.softmax(in_dtype_of(self.gate, x), dim=-1, dtype=torch.float32)  # [T, E]
        top_weight, top_index = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.norm_topk_prob:
            top_weight = top_weight / top_weight.sum(dim=-1, keepdim=True)
        return probs, top_weight, top_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H] packed tokens -> [T, H]."""
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))
        with torch.autocast(device, enabled=False):
            probs, top_weight, top_index = self.route(x)
            if self.record_stats and self.training and torch.is_grad_enabled():
                assigned = torch.bincount(top_index.reshape(-1), minlength=self.num_experts).float()
                self.router_stats = RouterStats(assigned, probs.sum(dim=0), x.shape[0])
            out = self.experts(x, top_index, top_weight.to(x.dtype), self.ops.swiglu)
            if self.shared_expert is None:
                return out
            return out + torch.sigmoid(in_dtype_of(self.shared_expert_gate, x)) * self.shared_expert(x)


def in_dtype_of(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` computed in ``x``'s dtype, as autocast would (a trained router keeps fp32 master weights)."""
    return F.linear(x, linear.weight.to(x.dtype))


def sparse_blocks(model: nn.Module) -> Iterator[SparseMoE]:
    """Every :class:`SparseMoE` block of ``model``, in model order."""
    return (m for m in model.modules() if isinstance(m, SparseMoE))


def load_balancing_loss(model: nn.Module) -> torch.Tensor | None:
    """The load-balancing loss of the last training forward, as transformers computes it (Switch Transformer's,
    over the real tokens of all sparse layers together): ``E * sum_e f_e * P_e`` with ``f_e`` the top-k
    assignments to expert ``e`` and ``P_e`` its summed router probability, both per token. Unweighted (the caller
    multiplies by ``router_aux_loss_coef``); None without a sparse block or a recorded forward. Clears the records.
    """
    stats = []
    for block in sparse_blocks(model):
        if block.router_stats is not None:
            stats.append(block.router_stats)
            block.router_stats = None
    if not stats:
        return None
    tokens = sum(s.tokens for s in stats)
    assigned = torch.stack([s.assigned for s in stats]).sum(0) / tokens  # [E]
    probability = torch.stack([s.probability for s in stats]).sum(0) / tokens  # [E]
    return (assigned * probability).sum() * assigned.numel()


class RouterLoss:
    """A task's training loss plus ``weight`` x :func:`load_balancing_loss` of ``model`` (transformers' total when
    the weight is router_aux_loss_coef), with the load-balancing loss among the named metrics the log window
    averages, weighted or not.

    ``loss(outputs, batch) -> (loss, {name: scalar})``, a task's loss; the wrapper is one too.
    """

    def __init__(self, model: nn.Module, loss: Any, weight: float):
        self.model, self.loss, self.weight = model, loss, weight
        for block in sparse_blocks(model):
            block.record_stats = True

    def __call__(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, metrics = self.loss(outputs, batch)
        aux = load_balancing_loss(self.model)
        if aux is None:
            return loss, metrics
        metrics = {**metrics, "router_aux_loss": aux.detach()}
        return (loss + self.weight * aux.to(loss.dtype) if self.weight else loss), metrics


def checkpoint_keys(config: ModelConfig) -> set[str]:
    """The names a checkpoint may give the sparse blocks' tensors (router, and experts in either layout)."""
    moe = config.moe
    if moe is None:
        return set()
    keys = set()
    for i in range(config.num_hidden_layers):
        if not moe.is_sparse(i):
            continue
        prefix = f"model.layers.{i}.mlp"
        keys.add(f"{prefix}.gate.weight")
        for fused, parts in PER_EXPERT.items():
            keys.add(f"{prefix}.experts.{fused}")
            keys.update(f"{prefix}.experts.{e}.{p}.weight" for e in range(moe.num_experts) for p in parts)
    return keys


def expert_tensors(path: str, experts: Experts, fused: bool = False) -> dict[str, tuple[tuple[int, ...], Any]]:
    """The checkpoint tensors of the experts at module ``path`` (``model.layers.i.mlp.experts``) in the layout
    they were loaded from (fused stacks whatever it was, with ``fused``), as ``name -> (shape, produce(dtype))``;
    each produces the merged weight (LoRA added, 4-bit dequantized), one expert at a time in the per-expert
    layout."""
    out: dict[str, tuple[tuple[int, ...], Any]] = {}
    for name in EXPERT_PROJECTIONS:
        proj: ExpertLinear = getattr(experts, name)
        e, n, k = proj.num_experts, proj.out_features, proj.in_features
        if experts.fused or fused:
            stack = lambda dtype, p=proj: torch.stack([p.merged_weight(i, dtype) for i in range(p.num_experts)])  # noqa: E731
            out[f"{path}.{name}"] = ((e, n, k), stack)
            continue
        parts = PER_EXPERT[name]
        rows = n // len(parts)
        for i in range(e):
            for j, part in enumerate(parts):
                piece = lambda dtype, p=proj, i=i, j=j, r=rows: p.merged_weight(i, dtype)[j * r : (j + 1) * r]  # noqa: E731
                out[f"{path}.{i}.{part}.weight"] = ((rows, k), piece)
    return out


def load_sparse_block(block: SparseMoE, loader: Any, prefix: str, spec: QuantSpec | None) -> None:
    """Fill ``block`` (built on the meta device) from checkpoint tensors under ``prefix`` (``model.layers.i.mlp``).

    ``loader`` is :mod:`nibble.model.loading`'s tensor reader (``ckpt``, ``dtype``, ``device``, ``tensor``,
    ``parameter``, and ``quantized``: weights an earlier load quantized, by the model's key). The router stays
    dense; the experts are dense in the loader's dtype, or quantized as ``spec`` says one expert at a time (or
    taken from ``loader.quantized``).

    Raises:
        NibbleError: a missing tensor or a wrong shape (naming the file and key), or experts a format cannot cut
            into whole blocks per expert.
    """
    block.gate.weight = loader.parameter(f"{prefix}.gate.weight", block.gate.weight)
    if block.shared_expert is not None:
        gate = block.shared_expert_gate
        gate.weight = loader.parameter(f"{prefix}.shared_expert_gate.weight", gate.weight)
    block.experts.fused = f"{prefix}.experts.gate_up_proj" in loader.ckpt
    for name in EXPERT_PROJECTIONS:
        proj: ExpertLinear = getattr(block.experts, name)
        fused_key = f"{prefix}.experts.{name}"
        shape = (proj.num_experts * proj.out_features, proj.in_features)
        cached = loader.cached(fused_key, shape) if spec is not None else None
        if cached is not None:
            cached = cached.to(loader.device)
            cached.dtype = loader.dtype
            proj.set_weight(cached)
            continue
        dtype = torch.float32 if spec is not None else loader.dtype
        if fused_key in loader.ckpt:
            fused = loader.tensor(fused_key, torch.Size((proj.num_experts, proj.out_features, proj.in_features)), dtype)
            experts: Iterator[torch.Tensor] = iter(fused.unbind(0))
        else:
            experts = _per_expert(loader, f"{prefix}.experts", name, proj, dtype)
        proj.set_weight(_experts_weight(experts, proj, spec, loader.dtype, fused_key))


def _per_expert(loader: Any, prefix: str, name: str, proj: ExpertLinear, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Expert after expert, its ``[out, in]`` weight read from the per-expert tensors (gate rows above up rows)."""
    parts = PER_EXPERT[name]
    rows = proj.out_features // len(parts)
    shape = torch.Size((rows, proj.in_features))
    for e in range(proj.num_experts):
        tensors = [loader.tensor(f"{prefix}.{e}.{part}.weight", shape, dtype) for part in parts]
        yield tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _experts_weight(
    experts: Iterator[torch.Tensor], proj: ExpertLinear, spec: QuantSpec | None, dtype: torch.dtype, key: str
) -> torch.Tensor | QuantizedWeight:
    if spec is None:
        first = next(experts)
        out = first.new_empty(proj.num_experts, proj.out_features, proj.in_features)
        out[0] = first
        for e, weight in enumerate(experts, start=1):
            out[e] = weight
        return out
    if spec.format == "gguf":
        raise NibbleError(f"{key}: experts from a .gguf file's own blocks are not supported yet; load it with nf4")
    try:
        qweight = quantize_rows(experts, spec)
    except NibbleError as exc:
        raise NibbleError(f"{key}: {exc}") from None
    qweight.dtype = dtype
    return qweight
