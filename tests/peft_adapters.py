"""LoRA adapters written by PEFT itself on tiny transformers models: the oracle for applying and merging them."""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def save_peft_adapter(
    hf_model,
    path: str | Path,
    *,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
):
    """Wrap a copy of ``hf_model`` with a PEFT LoRA adapter whose A and B are both random (so the update is not
    zero), save it to ``path`` and return the PeftModel in eval mode. A sequence classifier (a model with a
    ``score`` head) gets a SEQ_CLS adapter whose saved head is perturbed too."""
    from peft import LoraConfig, get_peft_model

    task = "SEQ_CLS" if hasattr(hf_model, "score") else "CAUSAL_LM"
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, task_type=task)
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(hf_model), config)
    if task == "SEQ_CLS":
        head = model.base_model.model.score.modules_to_save["default"]
        with torch.no_grad():
            head.weight.add_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    model.save_pretrained(str(path))
    return model.eval()
