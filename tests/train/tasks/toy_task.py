"""A task added without touching src/: predict each row's last token from the tokens before it.

The loss is the cross-entropy of the LM head at the row's last position; the task also logs the share of
rows it predicts right (a named metric of the log window), evaluates loss and accuracy, and exports a
``toy.json`` beside the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from toy_data import LastTokenData, read_last_token

from nibble.data.batching import MAX_SEQ_LEN, iter_batches
from nibble.devices import autocast, to_device
from nibble.model.generate import load_generator
from nibble.train.tasks import TaskRun


def last_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, V] logits at each row's last real position."""
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])  # [B, T, H]
    last = batch["attention_mask"].sum(1) - 1
    return model.lm_head(hidden[torch.arange(hidden.shape[0]), last]).float()


def loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]):
    right = (logits.argmax(-1) == batch["labels"]).float().mean()
    return F.cross_entropy(logits, batch["labels"]), {"toy_accuracy": right}


def evaluate(model, data: LastTokenData, batch_size: int, pad_id: int) -> dict[str, Any]:
    device = next(model.parameters()).device
    total, right = 0.0, 0.0
    with torch.no_grad():
        for _, batch in iter_batches(data, batch_size, pad_id):
            batch = to_device(batch, device)
            logits = last_logits(model, batch)
            total += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            right += float((logits.argmax(-1) == batch["labels"]).sum())
    return {"loss": total / len(data), "accuracy": right / len(data), "examples": len(data)}


class ToyTask:
    name = "toy"
    head = "causal_lm"
    options = ()

    def check(self, config) -> None:
        pass

    def setup(self, config, model_dir: Path, tokenizer) -> TaskRun:
        data = read_last_token(config.data, tokenizer, config.max_seq_len)
        val = read_last_token(config.val_data, tokenizer, config.max_seq_len)

        def save(directory: Path) -> None:
            (directory / "toy.json").write_text(json.dumps({"rows": len(data)}))

        return TaskRun(
            train=data,
            val=val,
            forward=last_logits,
            loss=loss,
            evaluate=lambda model, batch_size: evaluate(model, val, batch_size, tokenizer.pad_id),
            save=save,
            summary=f"{len(data)} rows to complete by one token",
        )

    def loss_memory(self, model, config) -> tuple[int, int]:
        return 0, 0

    def evaluate_saved(self, request) -> dict[str, Any]:
        model, tokenizer = load_generator(request.model, request.adapter, device=torch.device(request.device))
        data = read_last_token(request.data, tokenizer, request.max_seq_len or MAX_SEQ_LEN)
        with autocast(torch.device(request.device), torch.float32):
            metrics = evaluate(model, data, request.batch_size, tokenizer.pad_id)
        print(f"toy accuracy {metrics['accuracy']:.3f}")
        return metrics
