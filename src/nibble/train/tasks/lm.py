"""The causal-LM pieces every task on an LM head shares: the forward to the target positions, the chunked
cross-entropy, the perplexity evaluation and its report (instruction tuning's loss; the GGUF export's read-back).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from nibble.data.batching import Dataset
from nibble.devices import to_device
from nibble.nn.cross_entropy import linear_cross_entropy
from nibble.train.distributed import all_sum, current, eval_batches
from nibble.train.metrics import headline
from nibble.train.tasks.base import Batch, LossResult


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


def evaluate_lm(model: nn.Module, data: Dataset, batch_size: int, pad_id: int) -> dict[str, Any]:
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


def lm_report(metrics: dict[str, Any]) -> str:
    """One line: the response loss, its perplexity, and what it covers."""
    return f"{headline(metrics)}  ({metrics['tokens']} response tokens in {metrics['examples']} sequences)"


def lm_batch_loss(outputs: LMOutputs, batch: Batch) -> LossResult:
    """The training loss of a batch (:func:`lm_loss`; no other metrics)."""
    return lm_loss(outputs), {}
