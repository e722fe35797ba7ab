"""LoRA adapters in PEFT's on-disk layout, so ``PeftModel.from_pretrained`` loads what nibble trains.

A directory holds ``adapter_config.json`` (the keys PEFT 0.21 writes for a LoRA adapter) and
``adapter_model.safetensors`` with PEFT's tensor names: ``base_model.model.<module path>.lora_A.weight``
[r, in], ``...lora_B.weight`` [out, r], and for a classifier ``base_model.model.score.weight`` (the
head PEFT keeps whole through ``modules_to_save``).

LoRA on the experts of a mixture-of-experts layer is PEFT's LoRA on fused 3-D parameters (``target_parameters``
``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``): per expert ``e`` a rank-r A and B, stored as
``lora_A.weight`` [E*r, in] (expert-major rows) and ``lora_B.weight`` [out, r*E] (column ``j*E + e`` is rank
``j`` of expert ``e``). PEFT nests one wrapper per parameter in the order the module registers them, so the
gate/up adapter's keys are ``...mlp.experts.base_layer.lora_A.weight`` and the down adapter's
``...mlp.experts.lora_A.weight``. PEFT's wrapper has no dropout: such an adapter records ``lora_dropout`` 0
(nibble trains the experts' LoRA without dropout).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nibble.errors import NibbleError
from nibble.io.files import read_json_object
from nibble.io.pattern import FullMatch
from nibble.io.safetensors import copy_into, load_file, save_file_atomic
from nibble.nn.lora import EXPERTS, apply_lora, expert_lora_layers, lora_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Where transformers' multimodal Qwen3.5 class keeps the text decoder that nibble calls "model.".
MULTIMODAL_DECODER = "model.language_model."


def peft_path(model: nn.Module, path: str) -> str:
    """The PEFT name of ``model``'s module ``path``: under ``model.language_model.`` for a multimodal checkpoint's
    decoder (its adapter then loads on transformers' multimodal class, as PEFT would have written it)."""
    config = getattr(model, "config", None)
    if getattr(config, "multimodal", False) and path.startswith("model."):
        path = MULTIMODAL_DECODER + path.removeprefix("model.")
    return PREFIX + path


PEFT_VERSION = "0.21.2"
TASK_TYPES = {"classify": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}
HEADS = {"classify": "score"}
# The module name of a mixture-of-experts router: trained (--train-router), it is kept whole like a head. PEFT
# matches modules_to_save as a plain suffix of the module path, so the entry written is ROUTER_TO_SAVE: "gate"
# alone would also catch a shared expert's "shared_expert_gate". Both are read.
ROUTER = "gate"
ROUTER_TO_SAVE = f"mlp.{ROUTER}"
# target_parameters of an adapter with LoRA on the experts (sorted, as PEFT writes them), and the number of
# PEFT's nested base_layer wrappers around each (the first registered parameter is wrapped first, innermost).
EXPERT_PARAMETERS = ("mlp.experts.down_proj", "mlp.experts.gate_up_proj")
EXPERT_NESTING = {"gate_up_proj": "base_layer.", "down_proj": ""}
MAX_RANK = 1 << 16  # beyond any layer's width


def adapter_config(
    *,
    base_model: str | None,
    targets: list[str],
    rank: int,
    alpha: float,
    dropout: float,
    use_rslora: bool,
    task: str,
) -> dict[str, Any]:
    """The adapter_config.json object, with every key PEFT writes for LoRA (defaults where unused)."""
    head = HEADS.get(task)
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": dropout,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": [head] if head else None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "peft_version": PEFT_VERSION,
        "qalora_group_size": 16,
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(t for t in targets if t != EXPERTS),
        "target_parameters": None,
        "task_type": TASK_TYPES[task],
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": use_rslora,
        "velora_config": None,
    }


def adapter_tensors(model: nn.Module, task: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names: every LoRA A/B, plus the classifier head."""
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model).items():
        tensors[f"{peft_path(model, path)}.lora_A.weight"] = layer.lora_A.weight.detach()
        tensors[f"{peft_path(model, path)}.lora_B.weight"] = layer.lora_B.weight.detach()
    for path, experts in expert_lora_layers(model).items():
        a_key, b_key = _expert_keys(path)
        e, out, r = experts.lora_B.shape
        tensors[a_key] = experts.lora_A.detach().reshape(e * r, -1)  # [E, r, in] -> [E*r, in]
        tensors[b_key] = experts.lora_B.detach().permute(1, 2, 0).reshape(out, r * e)  # [E, out, r] -> [out, r*E]
    head = HEADS.get(task)
    if head is not None:
        tensors[f"{PREFIX}{head}.weight"] = getattr(model, head).weight.detach()
    for path, router in _routers(model).items():
        if router.weight.requires_grad:
            tensors[f"{PREFIX}{path}.weight"] = router.weight.detach()
    return tensors


def _routers(model: nn.Module) -> dict[str, nn.Linear]:
    """The routers of ``model``'s sparse blocks by module path (``model.layers.i.mlp.gate``)."""
    return {
        path: m
        for path, m in model.named_modules()
        if path.endswith(f".mlp.{ROUTER}")
        and isinstance(m, nn.Linear)
        and hasattr(model.get_submodule(path[:-5]), "experts")
    }


def _expert_keys(path: str) -> tuple[str, str]:
    """PEFT's lora_A and lora_B keys of the experts' projection at module ``path`` (``...mlp.experts.down_proj``)."""
    parent, name = path.rsplit(".", 1)
    inner = f"{PREFIX}{parent}.{EXPERT_NESTING[name]}"
    return f"{inner}lora_A.weight", f"{inner}lora_B.weight"


def save_adapter(model: nn.Module, directory: str | Path, config: dict[str, Any]) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``.

    The config's targets are those the model has (``all-linear`` on a mixture-of-experts model whose layers are
    all sparse has no gate_proj): ``target_modules`` the ones that adapted a linear layer, and ``experts`` as
    ``target_parameters`` (with ``lora_dropout`` 0, see the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = list(lora_layers(model))
    config = dict(config)
    config["target_modules"] = sorted(
        t for t in config["target_modules"] if any(p == t or p.endswith("." + t) for p in paths)
    )
    if expert_lora_layers(model):
        config.update(target_parameters=list(EXPERT_PARAMETERS), lora_dropout=0.0)
    if any(router.weight.requires_grad for router in _routers(model).values()):
        config["modules_to_save"] = [*(config["modules_to_save"] or []), ROUTER_TO_SAVE]
    task = next(t for t, name in TASK_TYPES.items() if name == config["task_type"])
    save_file_atomic(adapter_tensors(model, task), directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """adapter_config.json, checked for what nibble can apply (plain LoRA, no per-module patterns)."""
    path = Path(directory) / CONFIG_NAME
    config = read_json_object(path, "--adapter must be a directory written by nibble train or PEFT")
    if config.get("peft_type") != "LORA":
        raise NibbleError(f"{path}: not a LoRA adapter (peft_type must be LORA)")
    _check_values(config, path)
    unsupported = {
        "use_dora": False,
        "lora_bias": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layer_replication": None,
        "trainable_token_indices": None,
    }
    parameters = config.get("target_parameters")
    tails = sorted(".".join(str(t).split(".")[-3:]) for t in parameters or [])
    if parameters and tails != list(EXPERT_PARAMETERS):
        raise NibbleError(
            f"{path}: 'target_parameters' = {parameters!r} is not supported; nibble applies LoRA to parameters "
            f"only as {list(EXPERT_PARAMETERS)} (both experts' projections)"
        )
    for key, plain in unsupported.items():
        if config.get(key) is not None and config[key] != plain:
            raise NibbleError(f"{path}: '{key}' = {config[key]!r} is not supported; nibble applies plain LoRA")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise NibbleError(f"{path}: missing key '{key}'")
    return config


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_values(config: dict[str, Any], path: Path) -> None:
    """Each value nibble reads has the type and range PEFT writes; the first that has not is one line."""
    checks: dict[str, tuple[Any, str]] = {
        "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_RANK, f"1..{MAX_RANK}"),
        "lora_alpha": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
        "lora_dropout": (lambda v: v is None or (_is_number(v) and 0 <= v < 1), "a number in [0, 1)"),
        "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
        "target_modules": (
            lambda v: v is None or isinstance(v, str) or _is_names(v),
            "a list of module names or a regular expression",
        ),
        "modules_to_save": (lambda v: v is None or _is_names(v), "a list of module names or null"),
        "target_parameters": (lambda v: v is None or _is_names(v), "a list of parameter names or null"),
        "task_type": (lambda v: v is None or isinstance(v, str), "a string such as CAUSAL_LM or SEQ_CLS"),
        "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a path or null"),
    }
    for key, (ok, want) in checks.items():
        if key in config and not ok(config[key]):
            raise NibbleError(f"{path}: '{key}' must be {want}, got {config[key]!r:.80}")


def module_targets(config: dict[str, Any], model: nn.Module, source: str) -> list[str] | str:
    """The adapter's ``target_modules`` as a list of module names (or ``all-linear``): a string other than
    ``all-linear`` is a pattern that must match a module's whole name (as PEFT reads it), matched without
    backtracking (see :mod:`nibble.io.pattern`)."""
    targets = config["target_modules"] or []
    if not isinstance(targets, str) or targets == "all-linear":
        return targets
    what = f"{source}: 'target_modules' {targets!r:.80}"
    match = FullMatch(targets, what)
    found = [path for path, m in model.named_modules() if hasattr(m, "in_features") and match(path)]
    if not found:
        raise NibbleError(f"{what} matches no linear layer of the model; the adapter is for another model")
    return found


def load_adapter(model: nn.Module, directory: str | Path) -> dict[str, Any]:
    """Attach the adapter in ``directory`` to ``model`` (LoRA layers + head weights); returns its config.

    Raises:
        NibbleError: an unsupported config, a target that is not in the model, a missing or unexpected
            tensor, or a shape that does not fit.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise NibbleError(f"{weights}: missing; the adapter directory is incomplete")
    tensors = load_file(weights)
    targets = module_targets(config, model, str(directory / CONFIG_NAME))
    if config.get("target_parameters"):
        if isinstance(targets, str):
            raise NibbleError(f"{directory / CONFIG_NAME}: 'target_modules' {targets!r} with 'target_parameters'")
        targets = [*targets, EXPERTS]
    wrapped = apply_lora(
        model,
        targets,
        rank=config["r"],
        alpha=float(config["lora_alpha"]),
        dropout=0.0,
        use_rslora=bool(config.get("use_rslora", False)),
    )
    expected: dict[str, torch.Tensor] = {}
    layers = lora_layers(model)
    for path in wrapped:
        if path in layers:
            expected[f"{peft_path(model, path)}.lora_A.weight"] = layers[path].lora_A.weight
            expected[f"{peft_path(model, path)}.lora_B.weight"] = layers[path].lora_B.weight
    experts = expert_lora_layers(model)
    for path, layer in experts.items():  # read in PEFT's layout, copied into nibble's below
        e, out, r = layer.lora_B.shape
        a_key, b_key = _expert_keys(path)
        expected[a_key], expected[b_key] = torch.empty(e * r, layer.in_features), torch.empty(out, r * e)
    for head in config.get("modules_to_save") or []:
        module = getattr(model, head, None)
        if isinstance(module, nn.Linear) and f"{PREFIX}{head}.weight" in tensors:
            expected[f"{PREFIX}{head}.weight"] = module.weight
        if head in (ROUTER, ROUTER_TO_SAVE):
            expected.update({f"{PREFIX}{path}.weight": router.weight for path, router in _routers(model).items()})
    copy_into(expected, tensors, str(weights), "the adapter does not fit this model")
    with torch.no_grad():
        for path, layer in experts.items():
            a_key, b_key = _expert_keys(path)
            e, out, r = layer.lora_B.shape
            layer.lora_A.copy_(expected[a_key].view(e, r, -1))  # [E*r, in] -> [E, r, in]
            layer.lora_B.copy_(expected[b_key].view(out, r, e).permute(2, 0, 1))  # [out, r*E] -> [E, out, r]
    _check_update_bounds(model, directory)
    return config


def _check_update_bounds(model: nn.Module, source: Path) -> None:
    """Refuse an adapter whose update ``scaling * B @ A`` could overflow float32 (a huge finite ``lora_alpha``,
    or huge weights: eval then reported nan and merge wrote infinities). The bound ``scaling * r * max|B| *
    max|A|`` is cheap (no product is formed) and above every entry of the update.

    Raises:
        NibbleError: one line naming the layer, its alpha and the bound.
    """
    limit = torch.finfo(torch.float32).max
    layers = [(p, m.lora_A.weight, m.lora_B.weight, m) for p, m in lora_layers(model).items()]
    layers += [(p, m.lora_A, m.lora_B, m) for p, m in expert_lora_layers(model).items()]
    for path, a, b, layer in layers:
        bound = layer.scaling * a.shape[-2] * float(b.detach().abs().max()) * float(a.detach().abs().max())
        if not bound <= limit:
            raise NibbleError(
                f"{source}: the update of '{path}' (lora_alpha {layer.alpha:g}, weights up to "
                f"{max(float(a.detach().abs().max()), float(b.detach().abs().max())):g}) can reach {bound:g}, beyond "
                "float32; the adapter is corrupt"
            )
