"""The instruction pipeline: conversations -> chat-template tokens, prompt masked -> a run (:mod:`nibble.train.run`).

The loss is the mean cross-entropy of the response tokens (every token an assistant turn produces,
end-of-turn included) given everything before them; the LM head runs only at the positions that predict
one, chunk by chunk, so neither [batch, seq, vocab] nor [targets, vocab] logits are ever built. Evaluation
reports that loss and its perplexity.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from nibble.data.instruct import (
    CHATML,
    IGNORE_INDEX,
    InstructData,
    default_system_prompt,
    fit_length,
    read_instruct,
    resolve_chat_template,
    use_chat_template,
)
from nibble.data.records import stratified_split
from nibble.devices import to_device
from nibble.errors import NibbleError
from nibble.io.tokenizer import Tokenizer, load_tokenizer
from nibble.model.loading import resolve_model_dir
from nibble.nn.cross_entropy import linear_cross_entropy
from nibble.train.config import TrainConfig
from nibble.train.distributed import all_sum, current, eval_batches
from nibble.train.metrics import headline
from nibble.train.run import TaskRun, TrainResult, run_training


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


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """The target tokens of a batch: what :func:`lm_loss` averages over."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def evaluate_lm(model: nn.Module, data: InstructData, batch_size: int, pad_id: int) -> dict[str, Any]:
    """Mean response-token loss, its perplexity, and the counts it covers (the loss sums on the model's device
    and is read once). Under torchrun each rank scores its share of the examples and the sums are reduced."""
    device = next(model.parameters()).device
    total, count = torch.zeros((), device=device), 0
    with torch.no_grad():
        for chunk, batch in eval_batches(data, batch_size, pad_id):
            targets = target_count(batch)  # counted on the host, before the batch moves
            batch = to_device(batch, device)
            loss = lm_loss(lm_forward(model, batch), batch["labels"], reduction="sum")
            if chunk:  # (not a stand-in batch: this rank's rows ran out)
                total += loss
                count += targets
    if current().active:
        total, count = all_sum(total), int(all_sum(torch.tensor(count, device=device)))
    loss = float(total) / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count, "examples": len(data)}


def set_chat_template(tokenizer: Tokenizer, override: str | None, model_dir: Path) -> str | None:
    """Give ``tokenizer`` the template ``override`` names (a file or a built-in name), or ChatML when it has
    none, and say so; also say when the template adds a default system message to conversations without one.
    Returns the template to save with the adapter (None: the tokenizer's own, which its files carry).
    """
    saved = None
    if override is not None:
        saved = tokenizer.chat_template = resolve_chat_template(override)
        print(f"chat template: {override} (instead of the model's)", flush=True)
    elif use_chat_template(tokenizer):
        saved = CHATML
        print(f"{model_dir}: the tokenizer has no chat template; rendering conversations as ChatML", flush=True)
    system = default_system_prompt(tokenizer)
    if system is not None:
        shown = system if len(system) <= 80 else system[:77] + "..."
        print(
            f"chat template: conversations without a system message get the template's default one ({shown!r}); "
            "give rows a system message or pass --chat-template to change it",
            flush=True,
        )
    return saved


def lm_report(metrics: dict[str, Any]) -> str:
    """One line: the response loss, its perplexity, and what it covers."""
    return f"{headline(metrics)}  ({metrics['tokens']} response tokens in {metrics['examples']} sequences)"


def train_instruct(config: TrainConfig) -> TrainResult:
    """Run ``nibble train --task instruct`` (see :func:`nibble.train.run.run_training`)."""
    model_dir = resolve_model_dir(config.model)
    if not (model_dir / "config.json").is_file():
        raise NibbleError(f"{model_dir}: not a model directory (no config.json); check --model")
    tokenizer = load_tokenizer(model_dir)
    template = set_chat_template(tokenizer, config.chat_template, model_dir)
    pad_id = tokenizer.pad_id
    rows = read_instruct(config.data, tokenizer, config.columns)
    val: InstructData | None = None
    if config.val_data:
        val_rows = read_instruct(config.val_data, tokenizer, config.columns)
        val = fit_length(val_rows, config.max_seq_len, False, config.val_data)
    elif config.val_split > 0:
        everything = np.zeros(len(rows), dtype=np.int64)  # one group: a seeded random fraction
        train_idx, val_idx = stratified_split(everything, config.val_split, config.seed)
        rows, val = rows.subset(train_idx), (rows.subset(val_idx) if len(val_idx) else None)
        val = fit_length(val, config.max_seq_len, False, config.data) if val else None
    data = fit_length(rows, config.max_seq_len, config.packing, config.data)

    def run_eval(m: nn.Module, batch_size: int) -> dict[str, Any]:
        return evaluate_lm(m, val, batch_size, pad_id)

    summary = (
        f"{len(data)} {'packed ' if config.packing else ''}sequences with {data.target_tokens():,} response tokens, "
        f"{len(val) if val else 0} val sequences"
    )
    task = TaskRun(
        data,
        val,
        lm_loss,
        run_eval,
        summary,
        forward=lm_forward,
        chat_template=template,
        report=lm_report,
        loss_units=target_count,
    )
    return run_training(config, model_dir, tokenizer, task)
