"""Instruction tuning (``--task instruct``): conversations -> chat-template tokens, prompt masked -> the response loss.

The loss is the mean cross-entropy of the response tokens (every token an assistant turn produces,
end-of-turn included) given everything before them; the LM head runs only at the positions that predict
one, chunk by chunk, so neither [batch, seq, vocab] nor [targets, vocab] logits are ever built. Evaluation
reports that loss and its perplexity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from nibble.data.batching import MAX_SEQ_LEN, Dataset
from nibble.data.chat import RenderOptions
from nibble.data.instruct import (
    InstructData,
    fit_length,
    load_instruct,
    parse_columns,
    read_instruct,
    set_chat_template,
    show_conversations,
)
from nibble.data.records import stratified_split
from nibble.devices import autocast, describe, resolve_device
from nibble.errors import NibbleError
from nibble.io.tokenizer import Tokenizer
from nibble.model.config import ModelConfig
from nibble.model.loading import resolve_model_dir
from nibble.nn.cross_entropy import chunk_elements
from nibble.train.config import TrainConfig
from nibble.train.tasks.base import SavedModel, TaskRun
from nibble.train.tasks.lm import evaluate_lm, lm_batch_loss, lm_forward, lm_report, target_count


def _read(config: TrainConfig, tokenizer: Tokenizer, path: str) -> InstructData:
    """The conversations of ``path`` rendered as ``config`` renders them (columns, thinking, trained turns)."""
    return read_instruct(path, tokenizer, config.columns, RenderOptions(config.thinking, config.train_turns))


def _val_data(config: TrainConfig, tokenizer: Tokenizer) -> InstructData:
    """The rows of ``config.val_data``, fitted to ``max_seq_len``."""
    return fit_length(_read(config, tokenizer, config.val_data), config.max_seq_len, False, config.val_data)


def _split(config: TrainConfig, tokenizer: Tokenizer) -> tuple[InstructData, InstructData | None]:
    """The training rows of ``config`` and its validation rows (``val_data``, or a seeded random fraction of the
    conversations: the rows one became stay together), the latter fitted to ``max_seq_len``."""
    rows = _read(config, tokenizer, config.data)
    if config.val_data:
        return rows, _val_data(config, tokenizer)
    if config.val_split <= 0:
        return rows, None
    lines, conversation_of = np.unique(rows.lines, return_inverse=True)
    train_conv, val_conv = stratified_split(np.zeros(len(lines), dtype=np.int64), config.val_split, config.seed)
    train_idx = np.flatnonzero(np.isin(conversation_of, train_conv))
    val_idx = np.flatnonzero(np.isin(conversation_of, val_conv))
    val = fit_length(rows.subset(val_idx), config.max_seq_len, False, config.data) if len(val_idx) else None
    return rows.subset(train_idx), val


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
        rows, val = _split(config, tokenizer)
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

    def held_out(self, config: TrainConfig, tokenizer: Tokenizer) -> tuple[Dataset, str] | None:
        """The validation rows of the run ``config`` describes (for the GGUF export's read-back) and where they
        came from; None when it held none out.

        Raises:
            NibbleError: the data file the run's config records is gone.
        """
        key = "val_data" if config.val_data else "data" if config.data and config.val_split > 0 else None
        if key is None:
            return None
        path = Path(getattr(config, key))
        if not path.exists():
            raise NibbleError(
                f"{path}: the run's {key} (recorded in its config.yaml) is gone; restore it, or pass --eval-data FILE"
            )
        if key == "val_data":
            val = _val_data(config, tokenizer)
        else:
            val = _split(config, tokenizer)[1]
        source = "the run's val_data" if key == "val_data" else f"the run's {config.val_split:g} validation split"
        return (val, f"{path} ({source})") if val else None

    def show_data(self, config: TrainConfig, rows: int, colour: bool) -> None:
        """``nibble data show``: print how training renders the first ``rows`` conversations of ``config.data``
        with the model's tokenizer (or ``config.chat_template``): see
        :func:`nibble.data.instruct.show_conversations`."""
        from nibble.io.tokenizer import load_tokenizer

        model_dir = resolve_model_dir(config.model)
        tokenizer = load_tokenizer(model_dir)
        set_chat_template(tokenizer, config.chat_template, model_dir)
        rendering = RenderOptions(config.thinking, config.train_turns)
        for line in show_conversations(config.data, tokenizer, rows, config.columns, rendering, colour):
            print(line, flush=True)
