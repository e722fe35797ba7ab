"""What a run exports: the adapter (LoRA methods, PEFT layout) or the whole model (full), with ``nibble.json``,
the tokenizer and the task's own files, written under a temporary name and renamed when complete."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from nibble.io.files import model_fingerprint, staged_dir
from nibble.io.gguf import gguf_source
from nibble.io.peft import adapter_config, save_adapter
from nibble.io.runinfo import RUN_INFO, RunInfo
from nibble.io.tokenizer import Tokenizer
from nibble.model.merge import write_checkpoint
from nibble.nn.lora import lora_layers
from nibble.train.config import TrainConfig
from nibble.train.tasks import TaskRun, get_task


def run_info(config: TrainConfig, step: int | None = None, model_dir: Path | None = None) -> RunInfo:
    """How the model was trained: what eval/predict/generate/merge need to rebuild it the same way, the model
    the run started from (and the content of its HF directory ``model_dir``), and the optimizer step the weights
    come from."""
    quant = config.quant_spec if config.method == "qlora" else None
    gguf_base = None
    if quant is not None and quant.format == "gguf":
        source = gguf_source(config.model)
        gguf_base = {"file": source.name, "bytes": source.stat().st_size}
    return RunInfo(
        task=config.task,
        method=config.method,
        quant=quant,
        gguf_base=gguf_base,
        dtype=config.dtype,
        pooling=config.pooling,
        max_seq_len=config.max_seq_len,
        text_column=config.text_column,
        label_column=config.label_column,
        columns=config.columns,
        thinking=config.thinking,
        train_turns=config.train_turns,
        base_model=str(Path(config.model).resolve()) if config.model else None,
        step=step,
        base_fingerprint=model_fingerprint(model_dir) if model_dir is not None else None,
    )


def export(
    model: nn.Module,
    *,
    config: TrainConfig,
    tokenizer: Tokenizer,
    final: Path,
    task: TaskRun,
    model_dir: Path,
    step: int,
) -> Path:
    """Write the adapter (LoRA methods) or the whole model (full) at ``step`` to ``final``, which appears only
    when complete. The adapter names ``model_dir`` (the HF directory the base was loaded from: the one given,
    or a .gguf file's conversion) as its base, so PEFT's ``AutoPeftModel*`` can load it; nibble.json keeps the
    model as the user named it."""
    exported = model.parameters() if config.method == "full" else (p for p in model.parameters() if p.requires_grad)
    needed = sum(p.numel() * 4 for p in exported)  # written in fp32
    with staged_dir(final, overwrite=True, needed=needed) as tmp:
        if config.method == "full":
            write_checkpoint(model, tmp, torch.float32, labels=task.labels or None)
        else:
            peft_config = adapter_config(
                base_model=str(model_dir.resolve()),
                targets=sorted({path.rsplit(".", 1)[-1] for path in lora_layers(model)}),  # what all-linear found
                rank=config.lora_rank,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
                use_rslora=config.use_rslora,
                task=get_task(config.task).head,
            )
            save_adapter(model, tmp, peft_config)
        run_info(config, step, model_dir).save(tmp / RUN_INFO)
        tokenizer.save(tmp)
        if task.save is not None:  # after the tokenizer's files: a chat template of the run's replaces the model's
            task.save(tmp)
    return final


def copy_export(source: Path, final: Path) -> None:
    """``final`` as a copy of the export ``source`` (the last evaluation was the best: ``best/`` holds it)."""
    with staged_dir(final, overwrite=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
