"""Reward models (``--task reward``): pairs of completions -> a Bradley-Terry scorer, the classification head with
one output on each sequence's last token.

The loss of a pair is ``-log s(r_c - r_r - m)``, ``r`` the scores of prompt + chosen and prompt + rejected and ``m``
the row's optional ``margin`` (0 without one), averaged over the pairs (TRL's RewardTrainer). Metrics: accuracy (the
share of pairs scored the right way round) and margin (the mean ``r_c - r_r``). The export is a sequence
classification adapter with one label (``AutoModelForSequenceClassification`` + PEFT score the same), which
``nibble predict`` uses to score rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nibble.data.batching import MAX_SEQ_LEN
from nibble.data.instruct import set_chat_template
from nibble.data.preference import PairData, Truncation, load_pairs
from nibble.devices import autocast, to_device
from nibble.errors import NibbleError
from nibble.io.files import open_atomic, write_json
from nibble.io.tokenizer import Tokenizer
from nibble.model.config import ModelConfig
from nibble.train.config import TrainConfig
from nibble.train.distributed import all_sum, eval_batches
from nibble.train.tasks.base import Batch, LossResult, SavedModel, TaskRun, decoder_forward
from nibble.train.tasks.preference import pairs_of, split_val, truncation_of

REWARD_FILE = "reward.json"  # beside an export: the prompt truncation eval and predict read the data with


def reward_terms(scores: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-pair loss [B], r_c - r_r [B])`` from the scores [2B, 1] of a pair batch (chosen rows first)."""
    chosen, rejected = scores.float().squeeze(-1).chunk(2)
    diff = chosen - rejected
    return -F.logsigmoid(diff - batch["margin"]), diff


def reward_loss(scores: torch.Tensor, batch: Batch) -> LossResult:
    loss, diff = reward_terms(scores, batch)
    d = diff.detach()
    return loss.mean(), {"accuracy": (d > 0).float().mean(), "margin": d.mean()}


def evaluate_rewards(model: nn.Module, data: PairData, batch_size: int, pad_id: int) -> dict[str, Any]:
    """Mean loss, accuracy (the chosen completion scored higher) and margin over ``data``'s pairs."""
    device = next(model.parameters()).device
    sums = torch.zeros(3, device=device, dtype=torch.float64)
    with torch.no_grad():
        for chunk, batch in eval_batches(data, batch_size, pad_id):
            batch = to_device(batch, device)
            loss, diff = reward_terms(decoder_forward(model, batch), batch)
            if chunk:
                sums += torch.stack([loss.sum(), (diff > 0).float().sum(), diff.sum()]).double()
    loss, right, margin = all_sum(sums).tolist()
    n = len(data)
    return {"loss": loss / n, "accuracy": right / n, "margin": margin / n, "pairs": n}


def reward_report(metrics: dict[str, Any]) -> str:
    return (
        f"loss {metrics['loss']:.4f}  accuracy {metrics['accuracy']:.4f}  margin {metrics['margin']:.4f}  "
        f"({metrics['pairs']} pairs)"
    )


class RewardTask:
    """``--task reward``: a Bradley-Terry reward model (see the module docstring)."""

    name = "reward"
    head = "classify"
    sequences_per_row = 2
    options = ("max_prompt_len", "chat_template", "skip_bad_rows", "pooling")

    def check(self, config: TrainConfig) -> None:
        if config.max_prompt_len is not None and config.max_prompt_len < 1:
            raise NibbleError(f"'max_prompt_len' must be >= 1, got {config.max_prompt_len}")

    def setup(self, config: TrainConfig, model_dir: Path, tokenizer: Tokenizer) -> TaskRun:
        template = set_chat_template(tokenizer, config.chat_template, model_dir)
        truncation = truncation_of(config)

        def load(path: str) -> PairData:
            return load_pairs(path, tokenizer, truncation, config.skip_bad_rows)

        data, val = split_val(config, load(config.data), load)
        pad_id = tokenizer.pad_id

        def save(directory: Path) -> None:
            if template is not None:
                (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
            write_json(directory / REWARD_FILE, {"max_prompt_len": config.max_prompt_len})

        return TaskRun(
            train=data,
            val=val,
            loss=reward_loss,
            forward=decoder_forward,
            loss_units=pairs_of,
            evaluate=(lambda m, bs: evaluate_rewards(m, val, bs, pad_id)) if val is not None else None,
            summary=f"{len(data)} pairs, {len(val) if val else 0} val pairs; a one-output score head",
            num_labels=1,
            save=save,
            report=reward_report,
        )

    def loss_memory(self, model: ModelConfig, config: TrainConfig) -> tuple[int, int]:
        # the pooled hidden states and their scores, in the compute dtype
        return model.hidden_size * config.torch_dtype.itemsize, 0

    def _open(self, request: SavedModel) -> tuple[nn.Module, Tokenizer, PairData, Any]:
        from nibble.io.files import read_json_object
        from nibble.model.loading import resolve_model_dir
        from nibble.train.tasks.classify import open_classifier

        model, tokenizer, _, info = open_classifier(request)
        if model.num_labels != 1:
            raise NibbleError(f"--adapter/--model: a classifier with {model.num_labels} labels is not a reward model")
        source = Path(request.adapter or resolve_model_dir(request.model))
        saved = read_json_object(source / REWARD_FILE, "export it again with nibble train --task reward")
        set_chat_template(tokenizer, request.options.get("chat_template"), resolve_model_dir(request.model))
        truncation = Truncation(request.max_seq_len or info.max_seq_len or MAX_SEQ_LEN, saved.get("max_prompt_len"))
        return model, tokenizer, load_pairs(request.data, tokenizer, truncation), info

    def evaluate_saved(self, request: SavedModel) -> dict[str, Any]:
        model, tokenizer, data, info = self._open(request)
        with autocast(next(model.parameters()).device, info.torch_dtype):
            metrics = evaluate_rewards(model, data, request.batch_size, tokenizer.pad_id)
        print(reward_report(metrics))
        return metrics

    def predict(self, request: SavedModel, output: Path, id_column: str | None) -> int:
        """``nibble predict``: each pair row's scores, ``{"row" (or the id column): ..., "chosen": r_c,
        "rejected": r_r}``, to ``output`` (.jsonl)."""
        if output.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
            raise NibbleError(f"--output {output}: write reward scores to a .jsonl file")
        model, tokenizer, data, info = self._open(request)
        ids = _row_ids(request.data, id_column, data)
        device = next(model.parameters()).device
        with open_atomic(output) as f, autocast(device, info.torch_dtype), torch.no_grad():
            for start in range(0, len(data), request.batch_size):
                rows = list(range(start, min(start + request.batch_size, len(data))))
                batch = to_device(data.collate(rows, tokenizer.pad_id), device)
                chosen, rejected = decoder_forward(model, batch).float().squeeze(-1).chunk(2)
                for i, c, r in zip(rows, chosen.tolist(), rejected.tolist(), strict=True):
                    f.write(json.dumps({**ids[i], "chosen": c, "rejected": r}, ensure_ascii=False) + "\n")
        return len(data)


def _row_ids(path: str, id_column: str | None, data: PairData) -> list[dict[str, Any]]:
    """Each row's identity: ``{id_column: value}`` (default: ``id`` when the rows have one), else its line."""
    from nibble.data.records import place, read_records

    by_line = dict(read_records(path))
    first = next(iter(by_line.values()))
    column = id_column or ("id" if "id" in first else None)
    out = []
    for line in data.lines.tolist():
        if column is None:
            out.append({"line": line})
        elif column not in by_line[line]:
            raise NibbleError(f"{place(path, line)}: no '{column}' column; fix --id-column")
        else:
            out.append({column: by_line[line][column]})
    return out
