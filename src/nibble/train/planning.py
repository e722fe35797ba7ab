"""Planning a run's memory: the planner's view of a config (:func:`plan_options`, the one place a
:class:`~nibble.model.memory.PlanOptions` is built), the budget, and the choices that fit it. ``nibble plan``
prints what these compute; ``nibble train`` applies them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from nibble.devices import device_memory, parse_bytes
from nibble.errors import NibbleError
from nibble.io.gguf import native_model
from nibble.model.config import ModelConfig
from nibble.model.memory import (
    METHODS_BY_PREFERENCE,
    PlanOptions,
    RunPlan,
    choose_plan,
    estimate_bytes,
    plan_candidates,
    projection_shapes,
)
from nibble.nn.lora import resolve_targets
from nibble.train.config import TrainConfig, read_yaml
from nibble.train.tasks import get_task

# The share of a device's free memory a run plans to fill when no --memory-budget is given: the rest absorbs
# what the estimate leaves out (allocator fragmentation, library workspaces).
FREE_MEMORY_SHARE = 0.9


def plan_options(
    config: TrainConfig, model: ModelConfig, *, num_labels: int | None, device: torch.device
) -> PlanOptions:
    """The memory planner's view of a config whose dtype is resolved (``method`` auto is planned as qlora); a
    ``gguf`` base is sized by the blocks its file stores; the task gives its head and its loss's memory term."""
    gguf_bytes = native_model(config.model).projection_bytes() if config.quant_spec.format == "gguf" else None
    task = get_task(config.task)
    per_token, fixed = task.loss_memory(model, config)
    return PlanOptions(
        method="qlora" if config.method == "auto" else config.method,
        quant=config.quant_spec,
        task=task.head,
        num_labels=num_labels or 2,
        seq_len=config.max_seq_len,
        # a row of a pair task is two sequences (a preference pair's chosen and rejected completion)
        batch_size=config.batch_size * getattr(task, "sequences_per_row", 1),
        lora_rank=config.lora_rank,
        lora_targets=resolve_targets(config.lora_targets),
        train_router=config.train_router,
        lora_dropout=config.lora_dropout,
        dtype=config.dtype,
        checkpointing=config.gradient_checkpointing,
        train_embeddings=config.train_embeddings,
        device=device.type,
        cache_budget=None if config.cache_budget_mb is None else config.cache_budget_mb * 2**20,
        gguf_projection_bytes=gguf_bytes,
        loss_bytes_per_token=per_token,
        loss_fixed_bytes=fixed,
    )


def memory_budget(config: TrainConfig, device: torch.device) -> tuple[int, str]:
    """The bytes a run may use and where that number comes from: ``memory_budget``, else a share of the device's
    free memory.

    Raises:
        NibbleError: no budget given and the device's free memory is unknown.
    """
    if config.memory_budget is not None:
        return parse_bytes(config.memory_budget, "memory_budget"), f"--memory-budget {config.memory_budget}"
    free, _ = device_memory(device)
    if free is None:
        raise NibbleError(f"the free memory of {device} is unknown; pass --memory-budget (e.g. 12GB)")
    return int(free * FREE_MEMORY_SHARE), f"{FREE_MEMORY_SHARE:.0%} of the free memory of {device}"


def plan_space(config: TrainConfig) -> tuple[int, tuple[str, ...], tuple[bool, ...]]:
    """What a planned run chooses among: ``(batch, methods, checkpointing settings)``. The batch (micro-batch x
    accumulation steps) is the one the config asks for; every method for ``auto``; checkpointing only if the
    config does not already ask for it."""
    methods = METHODS_BY_PREFERENCE if config.method == "auto" else (config.method,)
    checkpointing = (True,) if config.gradient_checkpointing else (False, True)
    return config.batch_size * config.grad_accum, methods, checkpointing


def fit_to_memory(
    config: TrainConfig, model: ModelConfig, num_labels: int | None, device: torch.device
) -> tuple[TrainConfig, RunPlan | None, str]:
    """With ``method`` auto or a ``memory_budget``: the config with method, micro-batch, accumulation steps and
    gradient checkpointing chosen to fit (see :func:`nibble.model.memory.choose_plan`; the requested batch size
    times accumulation steps is kept), the plan and where its budget comes from. Otherwise the config unchanged.

    Resuming a planned run takes the choices from its ``config.yaml`` (the free memory may differ now, and the
    data position in a checkpoint only fits the same micro-batch).
    """
    if config.method != "auto" and config.memory_budget is None:
        return config, None, ""
    budget, source = memory_budget(config, device)
    saved = Path(config.output or ".") / "config.yaml"
    if config.resume and config.output and saved.is_file():
        previous = read_yaml(saved)
        keys = ("method", "batch_size", "grad_accum", "gradient_checkpointing")
        config = replace(config, **{k: previous[k] for k in keys if k in previous})
        opts = plan_options(config, model, num_labels=num_labels, device=device)
        plan = RunPlan(
            config.method,
            config.batch_size,
            config.grad_accum,
            config.gradient_checkpointing,
            estimate_bytes(model, opts, cache_limit=0),
            budget,
        )
        return config, plan, f"{source}; the choices of {saved}"
    opts = plan_options(config, model, num_labels=num_labels, device=device)
    plan = choose_plan(plan_candidates(model, opts, budget, *plan_space(config)), budget)
    planned = dict(method=plan.method, batch_size=plan.batch_size, grad_accum=plan.grad_accum)
    return replace(config, gradient_checkpointing=plan.checkpointing, **planned), plan, source


def check_lora_rank(config: TrainConfig, model_config: ModelConfig) -> None:
    """A LoRA rank above min(in, out) of a target adds nothing (the update's rank cannot exceed it) and can
    exhaust memory: refuse it before the model is loaded, naming the target and the limit."""
    if config.method == "full":
        return
    shapes = projection_shapes(model_config)
    for target in resolve_targets(config.lora_targets):
        shape = shapes.get(target.rsplit(".", 1)[-1])
        if shape is not None and config.lora_rank > min(shape):
            raise NibbleError(
                f"'lora_rank' {config.lora_rank} is larger than {target} allows ({shape[1]} -> {shape[0]} "
                f"features, so at most {min(shape)}); use --lora-rank {min(shape)} or less"
            )


def train_flops_per_token(model: ModelConfig, method: str) -> int:
    """Matmul FLOPs of a training step per token in the block projections (attention scores and the head left
    out, as their share depends on the lengths): forward 2N, backward 2N for the input gradients, and 2N more
    for the weight gradients when the weights train (``full``; the adapters of LoRA are negligible)."""
    params = sum(o * i for o, i in projection_shapes(model).values()) * model.num_hidden_layers
    return (6 if method == "full" else 4) * params
