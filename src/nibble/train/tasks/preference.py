"""Preference tuning (``--task preference --loss sigmoid|ipo|hinge|robust|simpo|orpo``): pairs of completions ->
the DPO family's losses on their log-probabilities, with no second model in memory.

Each pair's chosen and rejected sequences run in one batch (the chosen rows first; the model computes real tokens
only). A completion's log-probability is the sum over its tokens, taken through the chunked LM head
(:func:`nibble.nn.cross_entropy.linear_log_probs`, never [N, vocab] logits). The reference is the same model with
its adapters off, run under no_grad before the policy pass -- or, with ``--precompute-reference``, log-probs
computed once before training (the only reference full fine-tuning has). With ``l = log pi - log pi_ref`` of the
chosen (c) and rejected (r) completion and ``d = l_c - l_r`` (TRL's definitions):

- sigmoid (DPO, Rafailov et al. 2023): ``-(1-e) log s(b d) - e log s(-b d)`` (``e`` = label smoothing: cDPO);
- hinge: ``relu(1 - b d)``;
- ipo (Azar et al. 2023): ``(d' - 1/(2b))^2``, ``d'`` with each log-ratio averaged over its completion's tokens;
- robust (Chowdhury et al. 2024): ``(-(1-e) log s(b d) + e log s(-b d)) / (1 - 2e)``;
- simpo (Meng et al. 2024, no reference): ``z = a_c - a_r - g/b`` with ``a`` the mean token log-prob,
  ``-(1-e) log s(b z) - e log s(-b z)``;
- orpo (Hong et al. 2024, no reference): the chosen completion's token NLL ``- b log s(log odds_c - log odds_r)``,
  ``log odds = a - log(1 - exp(a))``, ``b`` being ORPO's lambda.

Metrics (per log window and evaluation, TRL's names): rewards/chosen and rewards/rejected (``b l``; simpo and orpo
``b a``), rewards/margins, rewards/accuracies (the share of pairs whose chosen reward is higher: the preference
accuracy), logps/chosen and logps/rejected (summed log-probs); orpo adds nll_loss and log_odds_ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nibble.data.batching import MAX_SEQ_LEN
from nibble.data.instruct import set_chat_template
from nibble.data.preference import PairData, Truncation, load_pairs
from nibble.devices import autocast, describe, resolve_device, to_device
from nibble.errors import NibbleError
from nibble.io.files import read_json_object, write_json
from nibble.io.tokenizer import Tokenizer
from nibble.model.config import ModelConfig
from nibble.model.loading import resolve_model_dir
from nibble.nn.cross_entropy import chunk_elements, linear_log_probs
from nibble.nn.lora import lora_layers
from nibble.train.config import TrainConfig
from nibble.train.distributed import all_sum, eval_batches
from nibble.train.tasks.base import Batch, LossResult, SavedModel, TaskRun

LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
PAPER_BETA = {"simpo": 2.0}  # every other loss: 0.1
OBJECTIVE_FILE = "preference.json"  # beside an exported adapter: how eval scores it


def sequence_logps(model: nn.Module, batch: Batch) -> torch.Tensor:
    """[R] each sequence's summed log-probability of its completion tokens (the batch's ``target_*``, see
    :func:`nibble.data.preference._sequences_batch`), through the chunked LM head."""
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], token_index=batch["token_index"])
    rows, width = hidden.shape[0], hidden.shape[2]
    selected = hidden[:, :-1].reshape(-1, width).index_select(0, batch["target_index"])  # [N, H]
    if torch.is_autocast_enabled(selected.device.type):  # the head's matmul runs in the autocast dtype
        selected = selected.to(torch.get_autocast_dtype(selected.device.type))
    tokens = linear_log_probs(selected, model.lm_head.weight, batch["targets"])  # [N] fp32
    return tokens.new_zeros(rows).index_add(0, batch["target_row"], tokens)


def reference_logps(model: nn.Module, batch: Batch) -> torch.Tensor:
    """[R] :func:`sequence_logps` of the reference: the precomputed ``ref_logps`` of the batch, else the model with
    its adapters off, without gradients."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    if not lora_layers(model):
        raise NibbleError(
            "the reference is the model with its adapters off, and this model has none (--method full); pass "
            "--precompute-reference"
        )
    with torch.no_grad(), model.adapters_disabled():
        return sequence_logps(model, batch)


def base_logps(model: nn.Module, batch: Batch) -> torch.Tensor:
    """[R] :func:`sequence_logps` of the model as loaded: its adapters off (a fully fine-tuned model: before any
    step), without gradients."""
    with torch.no_grad(), model.adapters_disabled():
        return sequence_logps(model, batch)


def pair_reference(model: nn.Module, batch: Batch) -> torch.Tensor:
    """[B, 2] the reference log-probs of a pair batch's chosen and rejected completions."""
    return torch.stack(base_logps(model, batch).chunk(2), dim=1)


def precompute_reference(
    model: nn.Module,
    data,
    *,
    columns,
    key: dict[str, Any],
    batch_size: int,
    pad_id: int,
    dtype: torch.dtype,
) -> None:
    """Set ``data.reference`` ([rows, 2]: ``columns(model, batch)`` of every batch, in file order) from the file
    beside the data's token cache that ``key`` (the model, how it was loaded, the truncation) and the rows name, or
    compute it there once (before training; a resumed run reads it back). Under torchrun every rank computes it (a
    sharded model needs them all) and rank 0 writes it."""
    import hashlib
    import json
    import time

    from nibble.data.batching import iter_batches
    from nibble.io.files import WriteError
    from nibble.io.safetensors import load_file, save_file_atomic
    from nibble.train.distributed import barrier, broadcast_text, current

    lines = hashlib.sha256(np.ascontiguousarray(data.lines, dtype=np.int64).tobytes()).hexdigest()
    text = json.dumps({**key, "rows": lines}, sort_keys=True)
    path = Path(data.cache_dir) / f"reference-{hashlib.sha256(text.encode()).hexdigest()[:20]}.safetensors"
    if broadcast_text("found" if path.is_file() else ""):
        reference = load_file(path)["logps"]
        if tuple(reference.shape) != (len(data), 2):
            raise NibbleError(f"{path}: holds {tuple(reference.shape)} log-probs for {len(data)} rows; delete it")
        print(f"reference: reusing {path}", flush=True)
    else:
        started, device, parts = time.perf_counter(), next(model.parameters()).device, []
        was_training = model.training
        model.eval()
        with torch.no_grad(), autocast(device, dtype):
            for _, batch in iter_batches(data, batch_size, pad_id):
                parts.append(columns(model, to_device(batch, device)).float().cpu())
        model.train(was_training)
        reference = torch.cat(parts)
        stored = current().is_main and path.parent.is_dir()  # (not beside a token cache held in memory)
        if stored:
            try:
                save_file_atomic({"logps": reference}, path, metadata={"key": text})
            except WriteError as exc:  # a cache: the run goes on without it
                print(f"note: cannot keep the reference log-probs ({exc}); they are computed again next time")
                stored = False
        barrier()
        took = time.perf_counter() - started
        where = f", stored in {path}" if stored else ""
        print(f"reference: log-probs of {len(data)} rows computed in {took:.1f} s{where}", flush=True)
    data.reference = reference.numpy()


def reference_key(config: TrainConfig, model_dir: Path, dtype: torch.dtype) -> dict[str, Any]:
    """What the reference log-probs depend on besides the rows: the model's files, how it is loaded, the truncation."""
    from nibble.data.tokens import source_identity

    quant = config.quant_spec.to_json() if config.method == "qlora" else None
    return {"model": source_identity(model_dir), "method": "full" if config.method == "full" else "lora",
            "quant": quant, "dtype": str(dtype), "max_seq_len": config.max_seq_len,
            "max_prompt_len": config.max_prompt_len}  # fmt: skip


def prepare_reference(config: TrainConfig, model_dir: Path, datasets: list, columns, pad_id: int):
    """The TaskRun ``prepare`` hook of ``--precompute-reference`` (None without it)."""
    if not config.precompute_reference:
        return None

    def prepare(model: nn.Module, batch_size: int, dtype: torch.dtype) -> None:
        key = {**reference_key(config, model_dir, dtype), "task": config.task}
        for data in datasets:
            if data is not None:
                precompute_reference(model, data, columns=columns, key=key, batch_size=batch_size, pad_id=pad_id,
                                     dtype=dtype)  # fmt: skip

    return prepare


class PairOutputs(NamedTuple):
    """What the forward hands the loss: the completions' summed log-probs, chosen rows first."""

    policy: torch.Tensor  # [2B], with gradients
    reference: torch.Tensor | None  # [2B], none for the reference-free losses


@dataclass(frozen=True)
class Objective:
    """A preference loss and its parameters (see the module docstring)."""

    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5

    @classmethod
    def from_config(cls, config: TrainConfig) -> Objective:
        beta = config.beta if config.beta is not None else PAPER_BETA.get(config.loss, 0.1)
        return cls(config.loss, beta, config.label_smoothing, config.simpo_gamma)

    @property
    def needs_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise NibbleError(f"'loss' must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.beta <= 0:
            raise NibbleError(f"'beta' must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise NibbleError(f"'label_smoothing' must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss not in ("sigmoid", "robust", "simpo"):
            raise NibbleError(f"'label_smoothing' applies to loss sigmoid, robust and simpo; drop it for {self.loss}")

    def forward(self, model: nn.Module, batch: Batch) -> PairOutputs:
        reference = reference_logps(model, batch) if self.needs_reference else None
        return PairOutputs(sequence_logps(model, batch), reference)

    def terms(self, outputs: PairOutputs, batch: Batch) -> dict[str, torch.Tensor]:
        """Per pair ([B] each): ``loss`` (orpo: without the NLL term), ``chosen``/``rejected`` rewards,
        ``logps_chosen``/``logps_rejected``; orpo also ``log_odds``, and the chosen NLL's ``nll_sum`` and
        ``nll_tokens``."""
        tokens = batch["completion_tokens"].float()
        pc, pr = outputs.policy.chunk(2)
        nc, nr = tokens.chunk(2)
        b, e = self.beta, self.label_smoothing
        out = {"logps_chosen": pc.detach(), "logps_rejected": pr.detach()}
        if self.needs_reference:
            rc, rr = outputs.reference.chunk(2)
            lc, lr = pc - rc, pr - rr
            d = lc - lr
            if self.loss == "sigmoid":
                loss = -(1 - e) * F.logsigmoid(b * d) - e * F.logsigmoid(-b * d)
            elif self.loss == "hinge":
                loss = torch.relu(1 - b * d)
            elif self.loss == "ipo":
                loss = (lc / nc - lr / nr - 1 / (2 * b)) ** 2
            else:  # robust
                loss = (-(1 - e) * F.logsigmoid(b * d) + e * F.logsigmoid(-b * d)) / (1 - 2 * e)
            out.update(loss=loss, chosen=b * lc.detach(), rejected=b * lr.detach())
            return out
        ac, ar = pc / nc, pr / nr
        if self.loss == "simpo":
            z = ac - ar - self.simpo_gamma / b
            loss = -(1 - e) * F.logsigmoid(b * z) - e * F.logsigmoid(-b * z)
        else:  # orpo
            log_odds = (ac - ar) - (torch.log1p(-torch.exp(ac)) - torch.log1p(-torch.exp(ar)))
            loss = -b * F.logsigmoid(log_odds)
            out.update(log_odds=log_odds.detach(), nll_sum=-pc.sum(), nll_tokens=nc.sum())
        out.update(loss=loss, chosen=b * ac.detach(), rejected=b * ar.detach())
        return out

    def batch_loss(self, outputs: PairOutputs, batch: Batch) -> LossResult:
        """The mean loss over the batch's pairs (orpo: plus the chosen tokens' mean NLL) and TRL's metrics."""
        t = self.terms(outputs, batch)
        loss = t["loss"].mean()
        metrics = {
            "rewards/chosen": t["chosen"].mean(),
            "rewards/rejected": t["rejected"].mean(),
            "rewards/margins": (t["chosen"] - t["rejected"]).mean(),
            "rewards/accuracies": (t["chosen"] > t["rejected"]).float().mean(),
            "logps/chosen": t["logps_chosen"].mean(),
            "logps/rejected": t["logps_rejected"].mean(),
        }
        if self.loss == "orpo":
            nll = t["nll_sum"] / t["nll_tokens"].clamp_min(1)
            metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": t["log_odds"].mean()})
            loss = loss + nll
        return loss, metrics

    def to_json(self) -> dict[str, Any]:
        return {"loss": self.loss, "beta": self.beta, "label_smoothing": self.label_smoothing,
                "simpo_gamma": self.simpo_gamma}  # fmt: skip


def pairs_of(batch: Batch) -> int:
    """The pairs a batch holds: what the loss averages over."""
    return int(batch["completion_tokens"].shape[0]) // 2


def evaluate_pairs(model: nn.Module, objective: Objective, data: PairData, batch_size: int, pad_id: int) -> dict:
    """Mean loss and reward metrics over ``data``'s pairs; ``accuracy`` is the preference accuracy (the share of
    pairs whose chosen completion gets the higher reward). Sums stay on the device and are read once; under torchrun
    each rank scores its share and the sums are reduced."""
    device = next(model.parameters()).device
    names = ("loss", "chosen", "rejected", "correct", "logps_chosen", "logps_rejected", "nll_sum", "nll_tokens")
    sums = torch.zeros(len(names), device=device, dtype=torch.float64)
    pairs = 0
    with torch.no_grad():
        for chunk, batch in eval_batches(data, batch_size, pad_id):
            batch = to_device(batch, device)
            t = objective.terms(objective.forward(model, batch), batch)
            if not chunk:  # a stand-in batch: this rank's rows ran out
                continue
            t["correct"] = (t["chosen"] > t["rejected"]).float()
            values = [t[k].sum() if k in t else torch.zeros((), device=device) for k in names]
            sums += torch.stack(values).double()
            pairs += len(chunk)
    sums = all_sum(sums)
    pairs = int(all_sum(torch.tensor(pairs, device=device)))
    total = dict(zip(names, sums.tolist(), strict=True))
    n = max(pairs, 1)
    nll = total["nll_sum"] / max(total["nll_tokens"], 1) if objective.loss == "orpo" else 0.0
    metrics = {
        "loss": total["loss"] / n + nll,
        "accuracy": total["correct"] / n,
        "rewards/chosen": total["chosen"] / n,
        "rewards/rejected": total["rejected"] / n,
        "rewards/margins": (total["chosen"] - total["rejected"]) / n,
        "logps/chosen": total["logps_chosen"] / n,
        "logps/rejected": total["logps_rejected"] / n,
        "pairs": pairs,
    }
    if objective.loss == "orpo":
        metrics["nll_loss"] = nll
    return metrics


def pair_report(metrics: dict[str, Any]) -> str:
    return (
        f"loss {metrics['loss']:.4f}  preference accuracy {metrics['accuracy']:.4f}  margin "
        f"{metrics['rewards/margins']:.4f}  ({metrics['pairs']} pairs)"
    )


def truncation_of(config: TrainConfig) -> Truncation:
    return Truncation(config.max_seq_len, config.max_prompt_len)


def check_reference(config: TrainConfig, needs_reference: bool) -> None:
    """Full fine-tuning has no adapters to switch off: its reference must be precomputed."""
    if needs_reference and config.method == "full" and not config.precompute_reference:
        raise NibbleError(
            f"task {config.task} with --method full needs --precompute-reference: the reference is the model before "
            "training, and full fine-tuning keeps no adapter to switch off"
        )


def split_val(config: TrainConfig, data, load):
    """``(train, val)``: ``--val-data`` read with ``load``, or a seeded ``--val-split`` fraction of ``data``."""
    from nibble.data.records import stratified_split

    if config.val_data:
        return data, load(config.val_data)
    if config.val_split > 0:
        train_idx, val_idx = stratified_split(np.zeros(len(data), dtype=np.int64), config.val_split, config.seed)
        return data.subset(train_idx), (data.subset(val_idx) if len(val_idx) else None)
    return data, None


def pair_memory(model: ModelConfig, config: TrainConfig) -> tuple[int, int]:
    """Per token: the hidden states gathered at the completion tokens and their per-row gradient (kept for
    backward), in the compute dtype. Fixed: one chunk of fp32 logits and its compute-dtype copy; a full run's fp32
    gradient of the LM head. The reference pass keeps nothing for backward (no_grad, before the policy pass)."""
    e = config.torch_dtype.itemsize
    head_grad = 4 * model.vocab_size * model.hidden_size if config.method == "full" else 0
    chunk = chunk_elements(resolve_device(config.device).type)
    return 2 * e * model.hidden_size, chunk * (4 + e) + head_grad


class PreferenceTask:
    """``--task preference``: the DPO family on pairs (see the module docstring)."""

    name = "preference"
    head = "causal_lm"
    sequences_per_row = 2
    options = (
        "loss",
        "beta",
        "label_smoothing",
        "simpo_gamma",
        "max_prompt_len",
        "precompute_reference",
        "chat_template",
        "skip_bad_rows",
    )

    def check(self, config: TrainConfig) -> None:
        Objective.from_config(config).check()
        if config.max_prompt_len is not None and config.max_prompt_len < 1:
            raise NibbleError(f"'max_prompt_len' must be >= 1, got {config.max_prompt_len}")
        check_reference(config, Objective.from_config(config).needs_reference)
        if config.loss != "simpo" and config.simpo_gamma != TrainConfig().simpo_gamma:
            raise NibbleError(f"'simpo_gamma' applies to loss simpo only; drop it for {config.loss}")
        if config.precompute_reference and not Objective.from_config(config).needs_reference:
            raise NibbleError(f"'precompute_reference': loss {config.loss} has no reference; drop it")

    def setup(self, config: TrainConfig, model_dir: Path, tokenizer: Tokenizer) -> TaskRun:
        template = set_chat_template(tokenizer, config.chat_template, model_dir)
        objective = Objective.from_config(config)
        truncation = truncation_of(config)

        def load(path: str) -> PairData:
            return load_pairs(path, tokenizer, truncation, config.skip_bad_rows)

        data, val = split_val(config, load(config.data), load)
        pad_id = tokenizer.pad_id

        def run_eval(m: nn.Module, batch_size: int) -> dict[str, Any]:
            return evaluate_pairs(m, objective, val, batch_size, pad_id)

        def save(directory: Path) -> None:
            save_run_files(directory, template, OBJECTIVE_FILE, objective.to_json(), config)

        reference = "none"
        if objective.needs_reference:
            reference = "precomputed" if config.precompute_reference else "adapters off"
        summary = (
            f"{len(data)} pairs, {len(val) if val else 0} val pairs; loss {objective.loss}, beta {objective.beta:g}, "
            f"reference {reference}"
        )
        return TaskRun(
            train=data,
            val=val,
            forward=objective.forward,
            loss=objective.batch_loss,
            loss_units=pairs_of,
            evaluate=run_eval if val is not None else None,
            summary=summary,
            save=save,
            report=pair_report,
            prepare=prepare_reference(config, model_dir, [data, val], pair_reference, pad_id),
        )

    def loss_memory(self, model: ModelConfig, config: TrainConfig) -> tuple[int, int]:
        return pair_memory(model, config)

    def evaluate_saved(self, request: SavedModel) -> dict[str, Any]:
        saved, info, source = read_objective(request, OBJECTIVE_FILE, "preference")
        max_prompt_len = saved.pop("max_prompt_len", None)
        try:
            objective = Objective(**saved)
            objective.check()
        except (TypeError, NibbleError) as exc:
            raise NibbleError(f"{source / OBJECTIVE_FILE}: not a preference objective ({exc})") from None
        truncation = Truncation(request.max_seq_len or info.max_seq_len or MAX_SEQ_LEN, max_prompt_len)
        load = lambda path, tokenizer: load_pairs(path, tokenizer, truncation)  # noqa: E731
        model, tokenizer, data = open_scored(request, info, load, pair_reference if objective.needs_reference else None)
        with autocast(next(model.parameters()).device, info.torch_dtype):
            metrics = evaluate_pairs(model, objective, data, request.batch_size, tokenizer.pad_id)
        print(pair_report(metrics))
        return metrics


def read_objective(request: SavedModel, name: str, task: str) -> tuple[dict[str, Any], Any, Path]:
    """The objective file ``name`` of a trained adapter or model, its run info and the directory holding them."""
    from nibble.io.runinfo import RUN_INFO, RunInfo
    from nibble.model.adapter import read_adapter_info

    if request.adapter:
        adapter = read_adapter_info(request.adapter)
        info, source = adapter.run, Path(adapter.directory)
    else:
        source = resolve_model_dir(request.model)
        info = RunInfo.load(source / RUN_INFO)
    saved = read_json_object(source / name, f"export the model again with nibble train --task {task}")
    return saved, info, source


def open_scored(request: SavedModel, info, load, columns):
    """``(model, tokenizer, data)`` for ``nibble eval`` of a preference or KTO run: ``load(path, tokenizer)`` reads
    the data; with ``columns`` (the reference log-probs of a batch) a fully fine-tuned model's reference is its base
    model, loaded first and alone to compute them (see :func:`precompute_reference`), then dropped; an adapter's
    reference is its base with the adapter off."""
    from nibble.model.generate import load_generator

    device = resolve_device(request.device)
    data = None
    if columns is not None and not request.adapter:
        if not info.base_model:
            raise NibbleError(f"{request.model}: nibble.json names no base model, the reference; pass --adapter")
        base_dir = resolve_model_dir(info.base_model)
        base, tokenizer = load_generator(base_dir, None, cache_budget_mb=request.cache_budget_mb, device=device)
        set_chat_template(tokenizer, request.options.get("chat_template"), base_dir)
        data = load(request.data, tokenizer)
        from nibble.data.tokens import source_identity

        key = {"model": source_identity(base_dir), "method": "full", "truncation": str(data.truncation), "task": "eval"}
        precompute_reference(base, data, columns=columns, key=key, batch_size=request.batch_size,
                             pad_id=tokenizer.pad_id, dtype=info.torch_dtype)  # fmt: skip
        del base
    model_dir = resolve_model_dir(request.model)
    dtype = info.torch_dtype if request.adapter else torch.float32
    model, tokenizer = load_generator(
        model_dir, request.adapter, cache_budget_mb=request.cache_budget_mb, dtype=dtype, device=device
    )
    print(describe(device, info.torch_dtype), flush=True)
    set_chat_template(tokenizer, request.options.get("chat_template"), model_dir)
    return model, tokenizer, data if data is not None else load(request.data, tokenizer)


def save_run_files(directory: Path, template: str | None, name: str, objective: dict, config: TrainConfig) -> None:
    """What an export of a preference or KTO run carries beside its weights: the chat template it rendered with
    (when not the tokenizer's own) and its objective with the prompt truncation, read back by ``nibble eval``."""
    if template is not None:
        (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    write_json(directory / name, {**objective, "max_prompt_len": config.max_prompt_len})


__all__ = ["Objective", "PreferenceTask", "evaluate_pairs", "reference_logps", "sequence_logps"]
