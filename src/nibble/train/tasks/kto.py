"""KTO (``--task kto``, Ethayarajh et al. 2024): single completions labelled desirable or undesirable ->
prospect-theory losses on their log-ratios to the reference (the adapters off, or precomputed).

With ``l = log pi(y|x) - log pi_ref(y|x)`` (summed over the completion's tokens) and the KL estimate
``z = max(0, mean(log pi(y'|x) - log pi_ref(y'|x)))`` over mismatched pairs (each row's prompt with another row's
completion, see :class:`nibble.data.preference.UnpairedData`), detached and averaged over the global batch, a
desirable row's loss is ``w_d (1 - s(b (l - z)))`` and an undesirable one's ``w_u (1 - s(b (z - l)))``; the loss is
their mean over the batch's rows (TRL's KTOTrainer, loss_type "kto"). Metrics: kl, rewards/chosen and
rewards/rejected (``b l`` of the desirable / undesirable rows; 0 in a step without such rows), logps/chosen,
logps/rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from nibble.data.batching import MAX_SEQ_LEN
from nibble.data.instruct import set_chat_template
from nibble.data.preference import Truncation, UnpairedData, load_unpaired, sub_batch
from nibble.devices import autocast, to_device
from nibble.errors import NibbleError
from nibble.io.tokenizer import Tokenizer
from nibble.model.config import ModelConfig
from nibble.train.config import TrainConfig
from nibble.train.distributed import all_sum, current, eval_batches
from nibble.train.tasks.base import Batch, LossResult, SavedModel, TaskRun
from nibble.train.tasks.preference import (
    base_logps,
    check_reference,
    open_scored,
    pair_memory,
    prepare_reference,
    read_objective,
    reference_logps,
    save_run_files,
    sequence_logps,
    split_val,
    truncation_of,
)

OBJECTIVE_FILE = "kto.json"


class KTOOutputs(NamedTuple):
    policy: torch.Tensor  # [B] summed completion log-probs, with gradients
    reference: torch.Tensor  # [B]
    kl: torch.Tensor  # [] the detached KL estimate z


@dataclass(frozen=True)
class KTOObjective:
    """KTO's loss and its parameters (see the module docstring)."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def check(self) -> None:
        if self.beta <= 0:
            raise NibbleError(f"'beta' must be > 0, got {self.beta}")
        for key in ("desirable_weight", "undesirable_weight"):
            if getattr(self, key) <= 0:
                raise NibbleError(f"'{key}' must be > 0, got {getattr(self, key)}")

    def forward(self, model: nn.Module, batch: Batch) -> KTOOutputs:
        kl_batch = sub_batch(batch, "kl_")
        with torch.no_grad():
            kl_terms = sequence_logps(model, kl_batch) - reference_logps(model, kl_batch)
            sums = torch.stack([kl_terms.sum(), kl_terms.new_tensor(float(kl_terms.numel()))])
            if current().active:  # the mean over the global batch, whatever the world size
                sums = all_sum(sums)
            kl = (sums[0] / sums[1].clamp_min(1)).clamp_min(0)
        return KTOOutputs(sequence_logps(model, batch), reference_logps(model, batch), kl)

    def terms(self, outputs: KTOOutputs, batch: Batch) -> dict[str, torch.Tensor]:
        desirable = batch["desirable"]
        logratio = outputs.policy - outputs.reference
        b = self.beta
        chosen = self.desirable_weight * (1 - torch.sigmoid(b * (logratio - outputs.kl)))
        rejected = self.undesirable_weight * (1 - torch.sigmoid(b * (outputs.kl - logratio)))
        return {"loss": torch.where(desirable, chosen, rejected), "rewards": b * logratio.detach(),
                "logps": outputs.policy.detach(), "desirable": desirable.float()}  # fmt: skip

    def batch_loss(self, outputs: KTOOutputs, batch: Batch) -> LossResult:
        t = self.terms(outputs, batch)
        d = t["desirable"]
        n_d, n_u = d.sum().clamp_min(1), (1 - d).sum().clamp_min(1)
        metrics = {
            "kl": outputs.kl,
            "rewards/chosen": (t["rewards"] * d).sum() / n_d,
            "rewards/rejected": (t["rewards"] * (1 - d)).sum() / n_u,
            "logps/chosen": (t["logps"] * d).sum() / n_d,
            "logps/rejected": (t["logps"] * (1 - d)).sum() / n_u,
        }
        return t["loss"].mean(), metrics

    def to_json(self) -> dict[str, Any]:
        return {"beta": self.beta, "desirable_weight": self.desirable_weight,
                "undesirable_weight": self.undesirable_weight}  # fmt: skip


def evaluate_unpaired(model: nn.Module, objective: KTOObjective, data: UnpairedData, batch_size: int, pad_id: int):
    """Mean loss over ``data``'s rows, the mean KL estimate of its batches, and the rewards of the desirable and the
    undesirable rows; ``accuracy``: the share of rows whose reward has the sign of its label."""
    device = next(model.parameters()).device
    names = ("loss", "reward_d", "reward_u", "n_d", "correct", "kl", "batches")
    sums = torch.zeros(len(names), device=device, dtype=torch.float64)
    with torch.no_grad():
        for chunk, batch in eval_batches(data, batch_size, pad_id):
            batch = to_device(batch, device)
            outputs = objective.forward(model, batch)
            if not chunk:
                continue
            t = objective.terms(outputs, batch)
            d, r = t["desirable"], t["rewards"]
            right = torch.where(d.bool(), r > 0, r < 0).float()
            values = [t["loss"].sum(), (r * d).sum(), (r * (1 - d)).sum(), d.sum(), right.sum(), outputs.kl, 1.0]
            sums += torch.stack([torch.as_tensor(v, device=device).double() for v in values])
    total = dict(zip(names, all_sum(sums).tolist(), strict=True))
    rows = len(data)
    n_u = rows - total["n_d"]
    return {
        "loss": total["loss"] / rows,
        "accuracy": total["correct"] / rows,
        "kl": total["kl"] / max(total["batches"], 1),
        "rewards/chosen": total["reward_d"] / max(total["n_d"], 1),
        "rewards/rejected": total["reward_u"] / max(n_u, 1),
        "rows": rows,
    }


def kto_report(metrics: dict[str, Any]) -> str:
    return (
        f"loss {metrics['loss']:.4f}  accuracy {metrics['accuracy']:.4f}  kl {metrics['kl']:.4f}  rewards desirable "
        f"{metrics['rewards/chosen']:.4f} undesirable {metrics['rewards/rejected']:.4f}  ({metrics['rows']} rows)"
    )


def objective_of(config: TrainConfig) -> KTOObjective:
    beta = config.beta if config.beta is not None else 0.1
    return KTOObjective(beta, config.desirable_weight, config.undesirable_weight)


def unpaired_reference(model: nn.Module, batch: Batch) -> torch.Tensor:
    """[B, 2] the reference log-probs of a KTO batch's completions and of its mismatched KL sequences."""
    return torch.stack([base_logps(model, batch), base_logps(model, sub_batch(batch, "kl_"))], dim=1)


class KTOTask:
    """``--task kto``: KTO on labelled single completions (see the module docstring)."""

    name = "kto"
    head = "causal_lm"
    options = (
        "beta",
        "desirable_weight",
        "undesirable_weight",
        "max_prompt_len",
        "precompute_reference",
        "chat_template",
        "skip_bad_rows",
    )

    def check(self, config: TrainConfig) -> None:
        objective_of(config).check()
        check_reference(config, True)

    def setup(self, config: TrainConfig, model_dir: Path, tokenizer: Tokenizer) -> TaskRun:
        template = set_chat_template(tokenizer, config.chat_template, model_dir)
        objective, truncation = objective_of(config), truncation_of(config)

        def load(path: str) -> UnpairedData:
            return load_unpaired(path, tokenizer, truncation, config.skip_bad_rows)

        data, val = split_val(config, load(config.data), load)
        pad_id = tokenizer.pad_id
        desirable = int(data.label.sum())

        def save(directory: Path) -> None:
            save_run_files(directory, template, OBJECTIVE_FILE, objective.to_json(), config)

        return TaskRun(
            train=data,
            val=val,
            forward=objective.forward,
            loss=objective.batch_loss,
            evaluate=(lambda m, bs: evaluate_unpaired(m, objective, val, bs, pad_id)) if val is not None else None,
            summary=(
                f"{len(data)} rows ({desirable} desirable, {len(data) - desirable} undesirable), "
                f"{len(val) if val else 0} val rows; beta {objective.beta:g}"
            ),
            save=save,
            report=kto_report,
            prepare=prepare_reference(config, model_dir, [data, val], unpaired_reference, pad_id),
        )

    def loss_memory(self, model: ModelConfig, config: TrainConfig) -> tuple[int, int]:
        return pair_memory(model, config)

    def evaluate_saved(self, request: SavedModel) -> dict[str, Any]:
        saved, info, source = read_objective(request, OBJECTIVE_FILE, "kto")
        max_prompt_len = saved.pop("max_prompt_len", None)
        try:
            objective = KTOObjective(**saved)
            objective.check()
        except (TypeError, NibbleError) as exc:
            raise NibbleError(f"{source / OBJECTIVE_FILE}: not a KTO objective ({exc})") from None
        truncation = Truncation(request.max_seq_len or info.max_seq_len or MAX_SEQ_LEN, max_prompt_len)
        load = lambda path, tokenizer: load_unpaired(path, tokenizer, truncation)  # noqa: E731
        model, tokenizer, data = open_scored(request, info, load, unpaired_reference)
        with autocast(next(model.parameters()).device, info.torch_dtype):
            metrics = evaluate_unpaired(model, objective, data, request.batch_size, tokenizer.pad_id)
        print(kto_report(metrics))
        return metrics
