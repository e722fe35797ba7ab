"""GRPO (``--task grpo``): online RL with verifiable rewards on a prompt dataset, no second model.

Each micro-batch takes ``batch_size / G`` prompts; the sampler (:mod:`nibble.model.sampler`) draws G completions
of each with the current adapter, the rewards (:mod:`grpo_rewards`) score them, advantages are group-relative, and
the loss (:mod:`grpo_loss`) is taken over the completions' log-probs through the chunked head, ``num_iterations``
optimizer steps in a row on the same completions (μ, TRL's ``num_iterations``: the steps after the first clip the
ratio to the policy that sampled them, whose log-probs the first pass recorded). The reference of
``--beta`` > 0 is the model with its adapters off; at β 0 (the default) no reference pass runs. Sampling draws from
torch's default generator, which every checkpoint saves, so a resumed run samples what the uninterrupted one did.

Data rows hold ``prompt`` (text, or a list of chat messages rendered with the chat template and the assistant's
opening) and whatever columns the rewards read (e.g. ``answer``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nibble.data.batching import pad_batch
from nibble.data.instruct import set_chat_template
from nibble.errors import NibbleError
from nibble.io.files import open_atomic, write_json
from nibble.model.sampler import SamplingConfig, sample
from nibble.nn.cross_entropy import linear_log_probs
from nibble.train.tasks.base import Batch, LossResult, SavedModel, TaskRun
from nibble.train.tasks.grpo_loss import GRPOObjective, group_advantages, grpo_loss
from nibble.train.tasks.grpo_rewards import Reward, RewardError, build_rewards, check_columns, score

if TYPE_CHECKING:
    from nibble.io.tokenizer import Tokenizer
    from nibble.model.config import ModelConfig
    from nibble.train.config import TrainConfig

SAMPLES = "samples.jsonl"
SETTINGS_FILE = "grpo.json"
# What an export carries for nibble eval: the rewards and how completions were drawn.
SAVED = ("rewards", "max_completion_len", "temperature", "top_p", "top_k", "min_p", "max_seq_len")


@dataclass
class PromptData:
    """Tokenized prompts with the rows' other columns; ``lines`` say where each row came from (for messages)."""

    path: str
    prompts: list[list[int]]
    texts: list[Any]
    columns: dict[str, list[Any]]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.prompts)

    def collate(self, indices, pad_id: int) -> dict[str, torch.Tensor]:
        """The prompts right-padded (see :func:`nibble.data.batching.pad_batch`), and ``rows`` [P] (their indices
        here)."""
        batch = pad_batch([self.prompts[i] for i in indices], pad_id)
        return {**batch, "rows": torch.tensor(list(indices), dtype=torch.long)}

    def subset(self, indices) -> PromptData:
        keep = [int(i) for i in indices]
        columns = {k: [v[i] for i in keep] for k, v in self.columns.items()}
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        return PromptData(self.path, pick(self.prompts), pick(self.texts), columns, pick(self.lines))


def load_prompts(path: str, tokenizer: Tokenizer, max_len: int) -> PromptData:
    """Read a prompt dataset (see the module docstring).

    Raises:
        NibbleError: a row without ``prompt``, a prompt of another type, an empty or too long prompt.
    """
    from nibble.data.records import place, read_records

    prompts, texts, lines, rows = [], [], [], []
    for line, row in read_records(path):
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            ids = tokenizer.encode(tokenizer.apply_chat_template(prompt, True), add_special_tokens=False)
        else:
            raise NibbleError(f"{place(path, line)}: 'prompt' must be text or a list of messages, got {prompt!r:.60}")
        if not ids or len(ids) > max_len:
            raise NibbleError(
                f"{place(path, line)}: the prompt has {len(ids)} tokens; it needs 1 to {max_len} "
                "(--max-seq-len minus --max-completion-len)"
            )
        prompts.append(ids)
        texts.append(prompt)
        lines.append(line)
        rows.append(row)
    if not prompts:
        raise NibbleError(f"{path}: no rows; a prompt dataset needs at least one")
    names = {k for row in rows for k in row if k != "prompt"}
    columns = {k: [row.get(k) for row in rows] for k in sorted(names)}
    return PromptData(path, prompts, texts, columns, lines)


def objective_of(config: TrainConfig) -> GRPOObjective:
    return GRPOObjective(
        loss_type=config.loss_type,
        epsilon=config.epsilon,
        epsilon_high=config.epsilon_high,
        beta=config.beta or 0.0,
        importance_sampling_level=config.importance_level,
        scale_rewards=config.scale_rewards,
        max_completion_length=config.max_completion_len,
    )


def reward_entries(config: TrainConfig) -> list:
    if isinstance(config.rewards, str):
        return [entry.strip() for entry in config.rewards.split(",") if entry.strip()]
    return list(config.rewards or [])


class Rollout:
    """Sampling and scoring for one run: what ``forward`` computes for a micro-batch of prompts."""

    def __init__(self, config: TrainConfig, tokenizer: Tokenizer, rewards: list[Reward]):
        self.config, self.tokenizer, self.rewards = config, tokenizer, rewards
        self.objective = objective_of(config)

    def sampling(self, model: nn.Module, temperature: float) -> SamplingConfig:
        """How completions are drawn; they stop at the model's and the tokenizer's end tokens."""
        from nibble.model.generate import stop_ids

        return SamplingConfig(
            max_new_tokens=self.config.max_completion_len,
            temperature=temperature,
            top_p=self.config.top_p,
            top_k=self.config.top_k,
            min_p=self.config.min_p,
            stop_token_ids=tuple(stop_ids(model, self.tokenizer)),
        )

    def complete(self, model: nn.Module, data: PromptData, rows: list[int], g: int, sampling: SamplingConfig):
        """Sample ``g`` completions of each row, decode and score them: ``(completions, texts, per_fn, total)``."""
        completions = sample(model, [data.prompts[r] for r in rows], g, sampling)
        texts = [self.tokenizer.decode(c.tokens, skip_special_tokens=True) for c in completions]
        owners = [rows[c.prompt_index] for c in completions]
        columns = {k: [v[r] for r in owners] for k, v in data.columns.items()}
        try:
            per_fn, total = score(self.rewards, [data.texts[r] for r in owners], texts, columns)
        except RewardError as exc:
            where = f" ({data.path} line {data.lines[owners[exc.row]]})" if exc.row is not None else ""
            raise RewardError(f"{exc}{where}", function=exc.function, row=exc.row) from None
        return completions, texts, per_fn, total

    def rollout(self, model: nn.Module, data: PromptData, batch: Batch) -> Batch:
        """Sample and score G completions of each of the micro-batch's prompts: the batch the loss trains on for
        ``num_iterations`` steps -- the prompt + completion rows (host tensors, see :func:`completion_batch`), the
        loss mask, the advantages, the reference's log-probs (β > 0) and the completions' statistics
        (``stat.<name>``). The old policy's log-probs are the first pass's (see :meth:`loss`)."""
        rows = batch["rows"].tolist()
        g = self.config.num_generations
        was_training = model.training
        model.eval()  # the policy samples without dropout
        start = time.perf_counter()
        sampling = self.sampling(model, self.config.temperature)
        completions, _, per_fn, total = self.complete(model, data, rows, g, sampling)
        seconds = time.perf_counter() - start
        model.train(was_training)
        device = batch["input_ids"].device
        lengths = torch.tensor([len(c.tokens) for c in completions], dtype=torch.float32)
        truncated = torch.tensor([c.truncated for c in completions], dtype=torch.float32)
        ids, attention, targets, starts = completion_batch(data, rows, completions, self.tokenizer.pad_id)
        mask = (targets >= 0).float()
        if self.config.mask_truncated_completions:
            mask = mask * (1 - truncated)[:, None]
        advantages = group_advantages(total, g, self.objective.scale_rewards)
        scored = (ids, attention, targets, starts)
        rolled = {"ids": ids, "attention": attention, "targets": targets, "starts": starts}
        rolled["mask"] = mask  # (on the host: the trainer weighs micro-batches by it, see units)
        rolled["advantages"] = advantages.to(device=device, dtype=torch.float32)
        if self.objective.needs_reference:  # computed once per sampling, as the reference never changes
            with model.adapters_disabled():
                rolled["ref_logps"] = completion_logps(model, scored, self.config.temperature, device)
        stats = {
            "reward": total.mean(),
            "reward_std": total.view(-1, g).std(dim=1).mean(),
            "advantage_std": advantages.std(),
            "completion_len": lengths.mean(),
            "completion_len_max": lengths.max(),
            "truncated": truncated.mean(),
            "sampler_tokens_per_s": lengths.sum() / max(seconds, 1e-9),
        }
        for i, reward in enumerate(self.rewards):
            stats[f"reward_{reward.name}"] = per_fn[:, i].mean()
            stats[f"reward_{reward.name}_std"] = per_fn[:, i].std()
        rolled.update({f"stat.{k}": v.to(device=device, dtype=torch.float32) for k, v in stats.items()})
        return rolled

    def units(self, rolled: Batch) -> float:
        """What a rolled-out micro-batch's loss averages over: its completion tokens that count for ``dapo`` (whose
        token mean spans the whole step, as TRL's), else its completions."""
        if self.objective.loss_type == "dapo":
            return float(rolled["mask"].sum())
        return float(rolled["ids"].shape[0])

    def forward(self, model: nn.Module, rolled: Batch) -> dict[str, torch.Tensor]:
        """The policy's log-probs of the rolled-out completions, with gradients."""
        batch = (rolled["ids"], rolled["attention"], rolled["targets"], rolled["starts"])
        return {"logps": completion_logps(model, batch, self.config.temperature, model.lm_head.weight.device)}

    def loss(self, outputs: dict[str, torch.Tensor], rolled: Batch) -> LossResult:
        """The GRPO loss against the sampling policy: on the first pass over a rollout its log-probs are the
        policy's own, detached (the ratio is 1 in value, its gradient counts), and with ``num_iterations`` > 1 they
        are kept in ``rolled`` for the passes after it, whose ratios then move away from 1."""
        logps = outputs["logps"]
        old = rolled.get("old_logps")
        if old is None:
            old = logps.detach()
            if self.config.num_iterations > 1:
                rolled["old_logps"] = old
        on = lambda key: rolled[key].to(logps.device)  # noqa: E731 (a resumed rollout is read onto the CPU)
        loss, metrics = grpo_loss(
            self.objective,
            logps,
            old.to(logps.device),
            on("advantages"),
            on("mask"),
            ref_logps=on("ref_logps") if self.objective.needs_reference else None,
        )
        stats = {k[len("stat.") :]: on(k) for k in rolled if k.startswith("stat.")}
        return loss, {**metrics, **stats}

    def evaluate(self, model: nn.Module, data: PromptData, batch_size: int) -> dict[str, Any]:
        """Greedy completions of every validation prompt, scored; ``loss`` is the negated mean total reward. Writes
        the prompts, completions and rewards to ``samples.jsonl`` (one evaluation appended after another)."""
        greedy = self.sampling(model, 0.0)
        records, totals, per_fns = [], [], []
        for start in range(0, len(data), batch_size):
            rows = list(range(start, min(start + batch_size, len(data))))
            _, texts, per_fn, total = self.complete(model, data, rows, 1, greedy)
            totals.append(total)
            per_fns.append(per_fn)
            for r, text, values in zip(rows, texts, per_fn.tolist(), strict=True):
                scored = {reward.name: v for reward, v in zip(self.rewards, values, strict=True)}
                records.append({"prompt": data.texts[r], "completion": text, "rewards": scored})
        total, per_fn = torch.cat(totals), torch.cat(per_fns)
        if self.config.output:  # a run's evaluations (nibble eval prints its scores only)
            append_samples(Path(self.config.output) / SAMPLES, records)
        metrics = {"loss": -float(total.mean()), "reward": float(total.mean())}
        metrics.update({f"reward_{r.name}": float(per_fn[:, i].mean()) for i, r in enumerate(self.rewards)})
        return metrics


def completion_batch(data: PromptData, rows: list[int], completions, pad_id: int):
    """``(ids [B, L], attention [B, L], targets [B, C], starts [B])``: prompt + completion right-padded, the
    completion tokens (-1 at padding) and where each completion starts in its row."""
    prompts = [data.prompts[rows[c.prompt_index]] for c in completions]
    width = max(len(p) + len(c.tokens) for p, c in zip(prompts, completions, strict=True))
    most = max(len(c.tokens) for c in completions)
    ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    targets = torch.full((len(completions), most), -1, dtype=torch.long)
    for b, (prompt, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[b, : len(prompt) + len(c.tokens)] = torch.tensor(prompt + c.tokens)
        attention[b, : len(prompt) + len(c.tokens)] = 1
        targets[b, : len(c.tokens)] = torch.tensor(c.tokens)
    return ids, attention, targets, torch.tensor([len(p) for p in prompts])


def completion_logps(
    model: nn.Module, batch: tuple[torch.Tensor, ...], temperature: float, device: torch.device
) -> torch.Tensor:
    """[B, C] the log-probs of the completion tokens of ``batch`` (:func:`completion_batch`; 0 at padding), from the
    logits over ``temperature`` as they were sampled, through the chunked head."""
    ids, attention, targets, starts = batch
    targets, starts = targets.cpu(), starts.cpu()  # (host tensors: no-ops, unless DDP moved them)
    real = targets >= 0  # [B, C]
    b, c = targets.shape
    positions = starts[:, None] + torch.arange(c)[None] - 1  # [B, C]: the position whose logits predict the token
    flat = (torch.arange(b)[:, None] * ids.shape[1] + positions)[real]  # [N], computed on the host
    hidden = model.hidden_states(ids.to(device), attention.to(device))  # [B, L, H]
    selected = hidden.reshape(b * ids.shape[1], -1).index_select(0, flat.to(device))  # [N, H]
    if torch.is_autocast_enabled(selected.device.type):
        selected = selected.to(torch.get_autocast_dtype(selected.device.type))
    if temperature > 0 and temperature != 1:
        selected = selected / temperature  # the head is linear: its logits over T
    values = linear_log_probs(selected, model.lm_head.weight, targets[real].to(device))  # [N] fp32
    return values.new_zeros(b, c).masked_scatter(real.to(device), values)


def append_samples(path: Path, records: list[dict[str, Any]]) -> None:
    """Add one evaluation's samples to ``path`` (the evaluation's number counted from the file), atomically."""
    old = path.read_text() if path.is_file() else ""
    number = len({json.loads(line)["evaluation"] for line in old.splitlines() if line.strip()})
    with open_atomic(path) as f:
        f.write(old)
        for record in records:
            f.write(json.dumps({"evaluation": number, **record}, ensure_ascii=False) + "\n")


class GRPOTask:
    """``--task grpo`` (see the module docstring)."""

    name = "grpo"
    head = "causal_lm"
    options = (
        "num_generations",
        "num_iterations",
        "max_completion_len",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "loss_type",
        "epsilon",
        "epsilon_high",
        "importance_level",
        "scale_rewards",
        "mask_truncated_completions",
        "rewards",
        "beta",
    )

    def check(self, config: TrainConfig) -> None:
        g = config.num_generations
        if g < 2:
            raise NibbleError(f"'num_generations' {g}: group-relative advantages need at least 2 completions a prompt")
        if config.num_iterations < 1:
            raise NibbleError(f"'num_iterations' {config.num_iterations} must be at least 1 (steps on each sampling)")
        if config.batch_size % g:
            raise NibbleError(
                f"'batch_size' {config.batch_size} counts completions and must be a multiple of num_generations {g}; "
                f"use {max(g, config.batch_size // g * g)}"
            )
        objective = objective_of(config)
        if objective.needs_reference and config.method == "full":
            raise NibbleError("task grpo with --beta > 0 needs adapters to switch off; use --method lora or qlora")
        if config.max_completion_len >= config.max_seq_len:
            raise NibbleError("'max_completion_len' must be below 'max_seq_len' (which holds prompt + completion)")
        build_rewards(reward_entries(config))  # a bad reward entry fails before the run starts
        SamplingConfig(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, min_p=config.min_p)

    def setup(self, config: TrainConfig, model_dir: Path, tokenizer: Tokenizer) -> TaskRun:
        from nibble.train.tasks.preference import split_val

        set_chat_template(tokenizer, config.chat_template, model_dir)
        max_prompt = config.max_seq_len - config.max_completion_len
        data = load_prompts(config.data, tokenizer, max_prompt)
        train, val = split_val(config, data, lambda path: load_prompts(path, tokenizer, max_prompt))
        rollout = Rollout(config, tokenizer, build_rewards(reward_entries(config)))
        for part in (train, val):
            if part is not None:
                check_columns(rollout.rewards, list(part.columns), part.path)
        names = ", ".join(f"{r.name} x{r.weight:g}" for r in rollout.rewards)
        return TaskRun(
            train=train,
            val=val,
            rollout=lambda model, batch: rollout.rollout(model, train, batch),
            forward=rollout.forward,
            loss=rollout.loss,
            iterations=config.num_iterations,
            loss_units=rollout.units,
            step_units=config.loss_type == "dapo",
            evaluate=(lambda model, bs: rollout.evaluate(model, val, bs)) if val is not None else None,
            summary=f"{len(train)} prompts, {len(val) if val else 0} val prompts; G={config.num_generations}; "
            f"loss {config.loss_type}; rewards {names}",
            rows_per_example=config.num_generations,
            save=lambda directory: write_json(directory / SETTINGS_FILE, {k: getattr(config, k) for k in SAVED}),
            report=reward_report,
        )

    def loss_memory(self, model: ModelConfig, config: TrainConfig) -> tuple[int, int]:
        # per token: the hidden state kept for the head and its gradient; fixed: the sampler's KV cache for the
        # micro-batch's completions at full length
        per_token = 2 * model.hidden_size * config.torch_dtype.itemsize
        full = sum(model.layer_type(i) == "full_attention" for i in range(model.num_hidden_layers))
        kv = 2 * full * model.num_key_value_heads * model.head_dim * config.torch_dtype.itemsize
        return per_token, config.batch_size * config.max_seq_len * kv

    def evaluate_saved(self, request: SavedModel) -> dict[str, Any]:
        """``nibble eval``: greedy completions of ``request.data``'s prompts, scored by the run's own rewards."""
        from nibble.devices import autocast, describe, resolve_device
        from nibble.model.generate import load_generator
        from nibble.model.loading import resolve_model_dir
        from nibble.train.config import TrainConfig
        from nibble.train.tasks.preference import read_objective

        saved, info, source = read_objective(request, SETTINGS_FILE, "grpo")
        if set(saved) != set(SAVED):
            raise NibbleError(f"{source / SETTINGS_FILE}: not GRPO settings; export it again with nibble train")
        config = TrainConfig(task="grpo", **saved)
        model_dir = resolve_model_dir(request.model)
        device = resolve_device(request.device)
        dtype = info.torch_dtype if request.adapter else torch.float32
        model, tokenizer = load_generator(
            model_dir, request.adapter, cache_budget_mb=request.cache_budget_mb, dtype=dtype, device=device,
            any_base=request.any_base,
        )  # fmt: skip
        print(describe(device, info.torch_dtype), flush=True)
        set_chat_template(tokenizer, request.options.get("chat_template"), model_dir)
        data = load_prompts(request.data, tokenizer, config.max_seq_len - config.max_completion_len)
        rollout = Rollout(config, tokenizer, build_rewards(reward_entries(config)))
        with autocast(device, info.torch_dtype), torch.no_grad():
            metrics = rollout.evaluate(model, data, request.batch_size)
        print(reward_report(metrics))
        return metrics


def reward_report(metrics: dict[str, Any]) -> str:
    """The final evaluation in one line: the mean total reward of the greedy completions, and each reward's."""
    parts = [f"{k[len('reward_') :]} {v:.4f}" for k, v in metrics.items() if k.startswith("reward_")]
    return f"mean reward {metrics['reward']:.4f}" + (f" ({', '.join(parts)})" if parts else "")
