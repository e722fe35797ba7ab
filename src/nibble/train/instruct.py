"""The instruction pipeline: conversations -> chat-template tokens, prompt masked -> a run (:mod:`nibble.train.run`).

The loss is the mean cross-entropy of the response tokens (every token an assistant turn produces,
end-of-turn included) given everything before them; the LM head runs only at the positions that predict
one, chunk by chunk, so neither [batch, seq, vocab] nor [targets, vocab] logits are ever built. Evaluation
reports that loss and its perplexity.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from nibble.data.batching import iter_batches
from nibble.data.instruct import CHATML, IGNORE_INDEX, InstructData, fit_length, read_instruct, use_chat_template
from nibble.data.records import stratified_split
from nibble.errors import NibbleError
from nibble.io.tokenizer import load_tokenizer
from nibble.model.loading import resolve_model_dir
from nibble.nn.cross_entropy import linear_cross_entropy
from nibble.train.config import TrainConfig
from nibble.train.metrics import headline
from nibble.train.run import TaskRun, run_training


class LMOutputs(NamedTuple):
    """What :func:`lm_forward` hands :func:`lm_loss`: the hidden states that predict a target and the LM head."""

    hidden: torch.Tensor  # [N, H], in the compute dtype
    weight: torch.Tensor  # [V, H]


def lm_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> LMOutputs:
    """The final hidden states at the N positions whose next token is a target (``labels[:, 1:] != IGNORE_INDEX``)
    and the LM head's weight; :func:`lm_loss` turns them into the loss without building [N, V] logits."""
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])  # [B, T, H]
    predicts = batch["labels"][:, 1:] != IGNORE_INDEX  # [B, T-1]: position t predicts token t + 1
    selected = hidden[:, :-1][predicts]  # [N, H]
    if torch.is_autocast_enabled(selected.device.type):  # the head's matmul runs in the autocast dtype
        selected = selected.to(torch.get_autocast_dtype(selected.device.type))
    return LMOutputs(selected, model.lm_head.weight)


def lm_loss(outputs: LMOutputs, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (fp32 softmax) of the LM head at :func:`lm_forward`'s positions against the target tokens
    of ``labels`` [B, T], computed in chunks of rows (:func:`nibble.nn.cross_entropy.linear_cross_entropy`).

    A batch without targets gives a zero loss that still backpropagates (to nothing).
    """
    targets = labels[:, 1:]
    targets = targets[targets != IGNORE_INDEX]  # [N], in the order lm_forward selected the positions
    return linear_cross_entropy(outputs.hidden, outputs.weight, targets, reduction)


def evaluate_lm(model: nn.Module, data: InstructData, batch_size: int, pad_id: int) -> dict[str, Any]:
    """Mean response-token loss, its perplexity, and the counts it covers."""
    total, count = 0.0, 0
    with torch.no_grad():
        for _, batch in iter_batches(data, batch_size, pad_id):
            total += float(lm_loss(lm_forward(model, batch), batch["labels"], reduction="sum"))
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count, "examples": len(data)}


def train_instruct(config: TrainConfig) -> dict[str, Any]:
    """Run ``nibble train --task instruct``; returns the final evaluation (or {} without validation data)."""
    model_dir = resolve_model_dir(config.model)
    if not (model_dir / "config.json").is_file():
        raise NibbleError(f"{model_dir}: not a model directory (no config.json); check --model")
    tokenizer = load_tokenizer(model_dir)
    chatml = use_chat_template(tokenizer)
    if chatml:
        print(f"{model_dir}: the tokenizer has no chat template; rendering conversations as ChatML", flush=True)
    pad_id = tokenizer.pad_id
    rows = read_instruct(config.data, tokenizer)
    val: InstructData | None = None
    if config.val_data:
        val = fit_length(read_instruct(config.val_data, tokenizer), config.max_seq_len, False, config.val_data)
    elif config.val_split > 0:
        train_idx, val_idx = stratified_split([0] * len(rows), config.val_split, config.seed)
        rows, val = rows.subset(train_idx), (rows.subset(val_idx) if val_idx else None)
        val = fit_length(val, config.max_seq_len, False, config.data) if val else None
    data = fit_length(rows, config.max_seq_len, config.packing, config.data)
    eval_batch = config.eval_batch_size or 2 * config.batch_size

    def run_eval(m: nn.Module) -> dict[str, Any]:
        return evaluate_lm(m, val, eval_batch, pad_id)

    def report(metrics: dict[str, Any]) -> str:
        return f"{headline(metrics)}  ({metrics['tokens']} response tokens in {metrics['examples']} sequences)"

    summary = (
        f"{len(data)} {'packed ' if config.packing else ''}sequences with {data.target_tokens():,} response tokens, "
        f"{len(val) if val else 0} val sequences"
    )
    template = CHATML if chatml else None
    task = TaskRun(data, val, lm_loss, run_eval, summary, forward=lm_forward, chat_template=template, report=report)
    return run_training(config, model_dir, tokenizer, task)
