"""Instruction tuning (``--task instruct``): conversations -> chat-template tokens, prompt masked -> the response loss.

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

from nibble.data.batching import MAX_SEQ_LEN
from nibble.data.chat import RenderOptions
from nibble.data.instruct import (
    CHATML,
    InstructData,
    default_system_prompt,
    fit_length,
    load_instruct,
    parse_columns,
    read_instruct,
    resolve_chat_template,
    show_conversations,
    use_chat_template,
)
from nibble.data.records import stratified_split
from nibble.devices import autocast, describe, resolve_device, to_device
from nibble.io.tokenizer import Tokenizer
from nibble.model.config import ModelConfig
from nibble.model.loading import resolve_model_dir
from nibble.nn.cross_entropy import chunk_elements, linear_cross_entropy
from nibble.train.config import TrainConfig
from nibble.train.distributed import all_sum, current, eval_batches
from nibble.train.metrics import headline
from nibble.train.tasks.base import Batch, LossResult, SavedModel, TaskRun


class LMOutputs(NamedTuple):
    """What :func:`lm_forward` hands :func:`lm_loss`: the hidden states that predict a target, the LM head and the
    target tokens."""

    hidden: torch.Tensor  # [N, H], in the compute dtype
    weight: torch.Tensor  # [V, H]
    targets: torch.Tensor  # [N]


def lm_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> LMOutputs:
    """The final hidden states at the N positions whose next token is a target (the batch's ``target_index``, found
    when it was collated: see :func:`nibble.data.instruct.collate_lm`), the LM head's weight and those targets;
    :func:`lm_loss` turns them into the loss without building [N, V] logits."""
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], token_index=batch["token_index"])
    width = hidden.shape[2]
    selected = hidden[:, :-1].reshape(-1, width).index_select(0, batch["target_index"])  # [N, H]
    if torch.is_autocast_enabled(selected.device.type):  # the head's matmul runs in the autocast dtype
        selected = selected.to(torch.get_autocast_dtype(selected.device.type))
    return LMOutputs(selected, model.lm_head.weight, batch["targets"])


def lm_loss(outputs: LMOutputs, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (fp32 softmax) of the LM head at :func:`lm_forward`'s positions against their target tokens,
    computed in chunks of rows (:func:`nibble.nn.cross_entropy.linear_cross_entropy`).

    A batch without targets gives a zero loss that still backpropagates (to nothing).
    """
    return linear_cross_entropy(outputs.hidden, outputs.weight, outputs.targets, reduction)


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """The target tokens of a batch: what :func:`lm_loss` averages over (from its shape: nothing is read)."""
    return batch["targets"].shape[0]


def evaluate_lm(model: nn.Module, data: InstructData, batch_size: int, pad_id: int) -> dict[str, Any]:
    """Mean response-token loss, its perplexity, and the counts it covers (the loss sums on the model's device
    and is read once). Under torchrun each rank scores its share of the examples and the sums are reduced."""
    device = next(model.parameters()).device
    total, count = torch.zeros((), device=device), 0
    with torch.no_grad():
        for chunk, batch in eval_batches(data, batch_size, pad_id):
            targets = target_count(batch)  # counted on the host, before the batch moves
            batch = to_device(batch, device)
            loss = lm_loss(lm_forward(model, batch), reduction="sum")
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


def show_data(
    model: str | Path,
    data: str | Path,
    rows: int,
    columns: str | None = None,
    chat_template: str | None = None,
    options: RenderOptions | None = None,
    colour: bool = False,
) -> None:
    """Print how training would render the first ``rows`` conversations of ``data`` with ``model``'s tokenizer
    (or ``chat_template``): see :func:`nibble.data.instruct.show_conversations`."""
    from nibble.io.tokenizer import load_tokenizer

    model_dir = resolve_model_dir(model)
    tokenizer = load_tokenizer(model_dir)
    set_chat_template(tokenizer, chat_template, model_dir)
    for line in show_conversations(data, tokenizer, rows, columns, options or RenderOptions(), colour):
        print(line, flush=True)


def lm_report(metrics: dict[str, Any]) -> str:
    """One line: the response loss, its perplexity, and what it covers."""
    return f"{headline(metrics)}  ({metrics['tokens']} response tokens in {metrics['examples']} sequences)"


def lm_batch_loss(outputs: LMOutputs, batch: Batch) -> LossResult:
    """The training loss of a batch (:func:`lm_loss`; no other metrics)."""
    return lm_loss(outputs), {}


class InstructTask:
    """``--task instruct``: a chat model trained on its responses (see the module docstring)."""

    name = "instruct"
    head = "causal_lm"
    options = ("packing", "columns", "chat_template", "thinking", "train_turns")

    def check(self, config: TrainConfig) -> None:
        parse_columns(config.columns)

    def setup(self, config: TrainConfig, model_dir: Path, tokenizer: Tokenizer) -> TaskRun:
        template = set_chat_template(tokenizer, config.chat_template, model_dir)
        pad_id = tokenizer.pad_id
        rendering = RenderOptions(config.thinking, config.train_turns)
        rows = read_instruct(config.data, tokenizer, config.columns, rendering)
        val: InstructData | None = None
        if config.val_data:
            val_rows = read_instruct(config.val_data, tokenizer, config.columns, rendering)
            val = fit_length(val_rows, config.max_seq_len, False, config.val_data)
        elif config.val_split > 0:
            # a seeded random fraction of the conversations (the rows one became stay together)
            lines, conversation_of = np.unique(rows.lines, return_inverse=True)
            train_conv, val_conv = stratified_split(np.zeros(len(lines), dtype=np.int64), config.val_split, config.seed)
            train_idx = np.flatnonzero(np.isin(conversation_of, train_conv))
            val_idx = np.flatnonzero(np.isin(conversation_of, val_conv))
            rows, val = rows.subset(train_idx), (rows.subset(val_idx) if len(val_idx) else None)
            val = fit_length(val, config.max_seq_len, False, config.data) if val else None
        data = fit_length(rows, config.max_seq_len, config.packing, config.data)

        def run_eval(m: nn.Module, batch_size: int) -> dict[str, Any]:
            return evaluate_lm(m, val, batch_size, pad_id)

        def save(directory: Path) -> None:
            if template is not None:
                (directory / "chat_template.jinja").write_text(template, encoding="utf-8")

        summary = (
            f"{len(data)} {'packed ' if config.packing else ''}sequences with {data.target_tokens():,} response "
            f"tokens, {len(val) if val else 0} val sequences"
        )
        return TaskRun(
            train=data,
            val=val,
            forward=lm_forward,
            loss=lm_batch_loss,
            loss_units=target_count,
            evaluate=run_eval if val is not None else None,
            summary=summary,
            save=save,
            report=lm_report,
        )

    def loss_memory(self, model: ModelConfig, config: TrainConfig) -> tuple[int, int]:
        """Per token: the hidden states gathered at the targets and their gradient (the chunked loss keeps it for
        backward), in the compute dtype. Fixed: one chunk of fp32 logits and its compute-dtype gradient, and a
        full run's fp32 gradient of the LM head, which the loss accumulates itself (no [N, vocab] logits)."""
        e = config.torch_dtype.itemsize
        head_grad = 4 * model.vocab_size * model.hidden_size if config.method == "full" else 0
        chunk = chunk_elements(resolve_device(config.device).type)
        return 2 * e * model.hidden_size, chunk * (4 + e) + head_grad

    def evaluate_saved(self, request: SavedModel) -> dict[str, Any]:
        import torch

        from nibble.io.runinfo import RUN_INFO, RunInfo
        from nibble.model.adapter import read_adapter_info
        from nibble.model.generate import load_generator

        model_dir = resolve_model_dir(request.model)
        info = read_adapter_info(request.adapter).run if request.adapter else RunInfo.load(model_dir / RUN_INFO)
        # As training built it: an adapter's base in the run's dtype; a fully fine-tuned model in fp32 (autocast).
        dtype = info.torch_dtype if request.adapter else torch.float32
        device = resolve_device(request.device)
        model, tokenizer = load_generator(
            model_dir,
            request.adapter,
            cache_budget_mb=request.cache_budget_mb,
            dtype=dtype,
            device=device,
            any_base=request.any_base,
        )
        print(describe(device, info.torch_dtype), flush=True)
        set_chat_template(tokenizer, request.options.get("chat_template"), model_dir)
        data = load_instruct(
            request.data,
            tokenizer,
            max_seq_len=request.max_seq_len or info.max_seq_len or MAX_SEQ_LEN,
            columns=request.options.get("columns") or info.columns,
            options=RenderOptions(info.thinking, info.train_turns or "all"),
        )
        with autocast(device, info.torch_dtype):
            metrics = evaluate_lm(model, data, request.batch_size, tokenizer.pad_id)
        print(lm_report(metrics))
        return metrics
