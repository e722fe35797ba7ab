"""A base model with a LoRA adapter attached, rebuilt the way the adapter was trained.

An adapter directory holds PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``; one written by
``nibble train`` also holds ``nibble.json`` (how the base was loaded for training: 4-bit format, pooling)
and, for classifiers, ``label_map.json``. The base is loaded the same way again (a QLoRA adapter on the
same 4-bit weights it was trained against), so the adapted model computes what training computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nibble.errors import NibbleError
from nibble.io.files import model_fingerprint
from nibble.io.peft import PREFIX, TASK_TYPES, WEIGHTS_NAME, load_adapter, read_adapter_config
from nibble.io.runinfo import LABEL_MAP, RUN_INFO, LabelMap, RunInfo
from nibble.io.safetensors import SafetensorsFile
from nibble.model.loading import load_model, resolve_model_dir
from nibble.model.model import DecoderModel
from nibble.quant import QuantSpec


@dataclass
class AdapterInfo:
    """What an adapter directory says about itself.

    ``task`` is "causal_lm" or "classify"; ``run`` is nibble.json (empty for adapters written by PEFT);
    ``labels`` the label names in id order (classifiers with a label map), else None.
    """

    directory: Path
    task: str
    config: dict[str, Any]
    run: RunInfo
    num_labels: int | None = None
    labels: list[Any] | None = None

    @property
    def quant(self) -> QuantSpec | None:
        """The 4-bit format of the base the adapter was trained on (None: a dense base)."""
        return self.run.quant


def read_adapter_info(directory: str | Path) -> AdapterInfo:
    """Read an adapter directory's config, run info and label map (no weights are loaded).

    Raises:
        NibbleError: a missing directory or file, an unsupported adapter, or a task type nibble has no head for.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise NibbleError(f"{directory}: no such adapter directory")
    config = read_adapter_config(directory)
    tasks = {peft_name: task for task, peft_name in TASK_TYPES.items()}
    task_type = config.get("task_type") or "CAUSAL_LM"
    if task_type not in tasks:
        raise NibbleError(
            f"{directory / 'adapter_config.json'}: task_type '{task_type}' is not supported; "
            f"nibble applies {', '.join(sorted(tasks))} adapters"
        )
    info = AdapterInfo(directory, tasks[task_type], config, RunInfo.load(directory / RUN_INFO))
    if info.task == "classify":
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise NibbleError(f"{weights}: missing; the adapter directory is incomplete")
        head = SafetensorsFile(weights).tensors.get(f"{PREFIX}score.weight")
        if head is None:
            raise NibbleError(f"{weights}: a SEQ_CLS adapter without '{PREFIX}score.weight'; it has no classifier head")
        info.num_labels = head.shape[0]
        if (directory / LABEL_MAP).is_file():
            labels = LabelMap.load(directory / LABEL_MAP).labels
            if len(labels) != info.num_labels:
                raise NibbleError(
                    f"{directory / LABEL_MAP}: lists {len(labels)} labels but the head has {info.num_labels} outputs"
                )
            info.labels = labels
    return info


def load_adapted(
    model: str | Path,
    adapter: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    task: str | None = None,
    device: torch.device | str = "cpu",
    any_base: bool = False,
) -> tuple[DecoderModel, AdapterInfo]:
    """Load the base ``model`` (directory or .gguf) as the adapter was trained, with the adapter attached.

    Args:
        model: the base model the adapter was trained on.
        adapter: the adapter directory.
        dtype: dtype of the base's dense weights.
        task: the task the caller needs ("causal_lm" or "classify"); None accepts either.
        device: where the model lives (see :func:`nibble.model.loading.load_model`).
        any_base: apply the adapter to a base other than the one it records (see :func:`check_base`).

    Raises:
        NibbleError: an adapter for another task, one trained on another base (without ``any_base``), or one
            that does not fit the base (see ``load_adapter``).
    """
    info = read_adapter_info(adapter)
    if task is not None and info.task != task:
        want = TASK_TYPES[task]
        raise NibbleError(
            f"{info.directory}: a {info.config.get('task_type')} adapter, but this needs a {want} adapter "
            f"(trained with {'--task instruct' if task == 'causal_lm' else '--task classify'})"
        )
    check_gguf_base(info, model)
    if not any_base:
        check_base(info, model)
    base = load_model(
        resolve_model_dir(model),
        task=info.task,
        num_labels=info.num_labels,
        quantize=info.quant,
        dtype=dtype,
        device=device,
        pooling=info.run.pooling,
    )
    load_adapter(base, info.directory)
    for p in base.parameters():
        p.requires_grad_(False)
    return base.eval(), info


def check_gguf_base(info: AdapterInfo, model: str | Path) -> None:
    """An adapter trained on a GGUF file's own blocks applies to that file only (compared by size).

    Raises:
        NibbleError: ``model`` is another file than the one ``info``'s nibble.json names.
    """
    from nibble.io.gguf import gguf_source

    if info.quant is None or info.quant.format != "gguf" or not info.run.gguf_base:
        return
    trained = info.run.gguf_base
    source = gguf_source(resolve_model_dir(model))
    size = source.stat().st_size
    if trained.get("bytes") != size:
        raise NibbleError(
            f"{info.directory / RUN_INFO}: the adapter was trained on the blocks of {trained.get('file')} "
            f"({trained.get('bytes')} bytes), but --model is {source} ({size} bytes); pass that .gguf file"
        )


def check_base(info: AdapterInfo, model: str | Path) -> None:
    """An adapter applies to the base it was trained on: the content nibble.json records
    (``base_fingerprint``), or for an adapter without one the local directory adapter_config.json names
    (``base_model_name_or_path``, when it still exists). Nothing recorded or nothing left to compare: accepted.

    Raises:
        NibbleError: ``model`` differs from the recorded base; ``--any-base`` applies it anyway.
    """
    model_dir = resolve_model_dir(model)
    recorded, where = info.run.base_fingerprint, info.directory / RUN_INFO
    named = info.config.get("base_model_name_or_path")
    if recorded is None and named and Path(named).is_dir() and Path(named).resolve() != model_dir.resolve():
        recorded, where = model_fingerprint(named), info.directory / "adapter_config.json"
    if recorded is not None and model_fingerprint(model_dir) != recorded:
        trained = info.run.base_model or named or "another model"
        raise NibbleError(
            f"{where}: the adapter was trained on {trained}, but --model {model} holds other weights; pass that "
            "model, or --any-base to apply it anyway"
        )
