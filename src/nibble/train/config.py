"""TrainConfig: every setting of a training run, one dataclass behind both the YAML file and the CLI flags.

A YAML key is a field name; the flag is ``--field-name``. Values resolve as defaults <- YAML <- flags,
are validated together (errors name the key), and the resolved config is saved with the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from nibble.data.batching import MAX_SEQ_LEN
from nibble.devices import DTYPES, parse_bytes, resolve_device
from nibble.errors import NibbleError
from nibble.io.files import write_text_atomic
from nibble.quant import QuantSpec

_QUANT = QuantSpec()  # the default 4-bit format

Method = Literal["auto", "qlora", "lora", "full"]
_MAX_CONFIG_BYTES = 1 << 20


def _help(text: str, **extra: Any) -> Any:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    """A fine-tuning run. ``help`` metadata becomes the flag's help text."""

    model: str | None = field(
        default=None, metadata=_help("Hugging Face model directory (config.json + weights) or a .gguf file")
    )
    data: str | None = field(
        default=None,
        metadata=_help(
            "training data: .jsonl, .csv/.tsv, .parquet, .arrow, or a directory saved by datasets' save_to_disk; "
            "instruct rows: messages, conversations (ShareGPT), instruction/output[/input] (Alpaca), "
            "instruction/response or prompt/completion, each with an optional system (or see --columns)"
        ),
    )
    output: str | None = field(default=None, metadata=_help("output directory of the run"))
    task: str = field(
        default="classify",
        metadata=_help(
            "classify: a sequence classifier; instruct: a chat model, loss on the responses only; preference: DPO and "
            "its family on prompt/chosen/rejected pairs (see --loss); kto: prompt/completion/label rows; reward: a "
            "Bradley-Terry reward model on pairs; or a task of your own: an installed 'nibble.tasks' entry point's "
            "name, or module:Class (see nibble.train.tasks)"
        ),
    )
    method: Method = field(
        default="qlora",
        metadata=_help(
            "qlora: 4-bit frozen base + LoRA; lora: dense frozen base + LoRA; full; auto: the first of full, lora, "
            "qlora that fits the memory (see --memory-budget)"
        ),
    )
    device: str = field(
        default="auto",
        metadata=_help("auto|cpu|cuda|cuda:N|mps|xpu: where to compute (auto: CUDA, then XPU, then MPS, else CPU)"),
    )
    dist_backend: Literal["auto", "gloo", "nccl"] = field(
        default="auto",
        metadata=_help("under torchrun: the torch.distributed backend (auto: nccl on CUDA, gloo on the CPU)"),
    )
    shard_base: bool = field(
        default=False,
        metadata=_help(
            "under torchrun, methods qlora and lora: shard the frozen base over the ranks with FSDP2 (a 4-bit base as "
            "its packed bytes and block scales), gathered one block at a time, instead of a whole copy on every rank "
            "(DDP): for a base that does not fit one device (full fine-tuning always shards)"
        ),
    )
    memory_budget: str | None = field(
        default=None,
        metadata=_help(
            "memory the run may use, e.g. 12GB or 800MB (default: the device's free memory); with --method auto or "
            "a budget, the method, micro-batch, accumulation steps and gradient checkpointing are chosen to fit it"
        ),
    )
    quant_format: Literal["nf4", "int4", "gguf"] = field(
        default=_QUANT.format,
        metadata=_help(
            "format of the qlora base: nf4, int4, or gguf (a .gguf --model keeps its own blocks: Q4_0, Q4_1, Q5_0, "
            "Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F16, BF16, F32 -- the weights llama.cpp runs)"
        ),
    )
    double_quant: bool = field(default=_QUANT.double_quant, metadata=_help("double-quantize the NF4 block scales"))
    blocksize: int = field(default=_QUANT.blocksize, metadata=_help("NF4 block size"))
    group_size: int = field(default=_QUANT.group_size, metadata=_help("INT4 group size"))
    cache_budget_mb: int | None = field(
        default=None,
        metadata=_help(
            "memory (MiB) for dense copies of the frozen 4-bit weights, which skips dequantizing them in every step; "
            "'auto' (default): none on GPUs, on CPU at most what a dense base would take more than the 4-bit one "
            "(so qlora never needs more memory than lora); 0 keeps none"
        ),
    )
    max_steps: int | None = field(default=None, metadata=_help("optimizer steps (default: from --epochs)"))
    epochs: int = field(default=1, metadata=_help("passes over the training data when --max-steps is not set"))
    batch_size: int = field(default=8, metadata=_help("rows per micro-batch"))
    eval_batch_size: int | None = field(default=None, metadata=_help("rows per evaluation batch (default 2x batch)"))
    grad_accum: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    lr: float = field(default=2e-4, metadata=_help("peak learning rate"))
    warmup_ratio: float = field(default=0.03, metadata=_help("fraction of the steps spent warming up linearly"))
    min_lr_ratio: float = field(default=0.0, metadata=_help("cosine decay ends at lr x this"))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay"))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1"))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2"))
    adam_eps: float = field(default=1e-8, metadata=_help("AdamW epsilon"))
    max_grad_norm: float = field(default=1.0, metadata=_help("clip gradients to this global norm (0: no clipping)"))
    lora_rank: int = field(default=8, metadata=_help("LoRA rank r"))
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA alpha (scale alpha/r)"))
    lora_dropout: float = field(default=0.05, metadata=_help("dropout on the LoRA input"))
    lora_targets: str = field(
        default="q_proj,v_proj",
        metadata=_help(
            "comma-separated module names (experts: every expert of a MoE layer), or all-linear (the 7 projections; "
            "on a MoE model attention and experts)"
        ),
    )
    train_router: bool = field(default=False, metadata=_help("MoE models: also train the routers (dense, fp32)"))
    router_aux_loss: str | float = field(
        default="off",
        metadata=_help(
            "MoE models: add the load-balancing loss: off, on (weighted by config.json's router_aux_loss_coef), "
            "or its weight; logged as router_aux_loss either way"
        ),
    )
    use_rslora: bool = field(default=False, metadata=_help("rank-stabilized LoRA: scale alpha/sqrt(r)"))
    train_embeddings: bool = field(default=False, metadata=_help("full: also train the token embeddings"))
    gradient_checkpointing: bool = field(default=False, metadata=_help("recompute blocks in backward to save memory"))
    compile: bool = field(
        default=False,
        metadata=_help(
            "fuse each block's norms, RoPE and SwiGLU with torch.compile (needs a C++ compiler on CPU, Triton on "
            "GPU); pays on long runs only (2-core CPU: steps 1.06x faster after ~22 s of compiling on a first run)"
        ),
    )
    deterministic: bool = field(
        default=False,
        metadata=_help(
            "GPU runs that repeat bit for bit: torch's deterministic algorithms, a fixed cuBLAS workspace, and "
            "the fused 4-bit kernels on one tile with no split-K (atomic) reduction; decoding-size 4-bit matmuls "
            "run slower"
        ),
    )
    max_seq_len: int = field(default=MAX_SEQ_LEN, metadata=_help("truncate texts to this many tokens"))
    packing: bool = field(
        default=False, metadata=_help("instruct: concatenate examples into full max-seq-len sequences")
    )
    columns: str | None = field(
        default=None,
        metadata=_help(
            "instruct: read other column names as ROLE=COLUMN pairs, e.g. prompt=question,response=answer "
            "(roles: prompt, response, system, input, messages); in YAML also a mapping or a list"
        ),
    )
    chat_template: str | None = field(
        default=None,
        metadata=_help("instruct: a Jinja chat template file, or a built-in name (chatml), instead of the model's"),
    )
    thinking: Literal["keep", "empty", "drop"] | None = field(
        default=None,
        metadata=_help(
            "instruct: what the model learns about reasoning. keep: reasoning is trained, an answer without any is "
            "trained after the thinking-off prompt (its empty think block is context); empty: as keep, but an answer "
            "without reasoning is trained with its empty think block (Qwen3's recipe); drop: reasoning is removed. "
            "Default: empty where the template renders reasoning (Qwen3), else keep"
        ),
    )
    train_turns: Literal["all", "last"] = field(
        default="all",
        metadata=_help(
            "instruct: all: every assistant turn is a target (a conversation whose template drops earlier reasoning "
            "becomes one row per context inference gives a turn); last: only each conversation's final turn"
        ),
    )
    pooling: Literal["last", "mean"] = field(default="last", metadata=_help("classifier input: last token or mean"))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata=_help(
            "compute dtype (bfloat16/float16 autocast; float16 adds a grad scaler); auto: bfloat16 where the device "
            "computes it natively (recent GPUs, CPUs with AMX or AVX512-BF16), float16 on older CUDA GPUs, else float32"
        ),
    )
    seed: int = field(default=42, metadata=_help("seed for initialization, shuffling, dropout and the val split"))
    log_every: int = field(default=10, metadata=_help("write a metrics line every N steps"))
    eval_every: int = field(default=50, metadata=_help("evaluate every N steps (0: only at the end)"))
    save_every: int = field(default=100, metadata=_help("checkpoint every N steps (0: only at the end)"))
    keep_checkpoints: int = field(default=3, metadata=_help("keep the last K checkpoints"))
    early_stopping_patience: int = field(
        default=0, metadata=_help("stop after N evaluations without a lower val loss (0: never)")
    )
    report_to: str = field(
        default="none",
        metadata=_help(
            "also send the metrics to tensorboard (OUT/tensorboard) and/or wandb (OUT/wandb; WANDB_PROJECT and "
            "WANDB_MODE apply), comma-separated, or none; metrics.jsonl is always written"
        ),
    )
    eval_at_start: bool = field(
        default=False, metadata=_help("also evaluate before the first step (a baseline in metrics and plots)")
    )
    resume: str | None = field(
        default=None, metadata=_help("continue from the latest checkpoint under --output, or from PATH")
    )
    overwrite: bool = field(
        default=False,
        metadata=_help(
            "replace a previous run in --output: its files are moved aside (OUT/.replaced) and deleted once the "
            "new run has written its first checkpoint; a new run that stops before that puts them back. Only what "
            "nibble wrote there (OUT/.nibble-outputs.json) is replaced: a directory holding anything else, or a "
            "path the run reads inside the old run, is refused"
        ),
    )
    val_data: str | None = field(default=None, metadata=_help("validation data file (default: split from --data)"))
    config_file: str | None = field(
        default=None,
        compare=False,
        metadata=_help("the YAML file the config was read from (set by nibble, not a flag)", flag=False),
    )
    val_split: float = field(default=0.1, metadata=_help("stratified fraction of --data held out for validation"))
    text_column: str = field(default="text", metadata=_help("field holding the text"))
    label_column: str = field(default="label", metadata=_help("field holding the label (or list of labels)"))
    class_weights: Literal["none", "inverse_freq", "sqrt_inverse"] = field(
        default="none", metadata=_help("weight the loss by class frequency")
    )
    oversample: bool = field(default=False, metadata=_help("repeat minority-class rows up to the largest class"))

    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"] = field(
        default="sigmoid",
        metadata=_help(
            "preference: sigmoid (DPO), ipo, hinge, robust (DPO under label noise), simpo or orpo (both without a "
            "reference), TRL's loss_type names"
        ),
    )
    beta: float | None = field(
        default=None,
        metadata=_help(
            "preference, kto, grpo: the strength of the reference (ipo: tau; orpo: lambda, the odds-ratio weight; "
            "grpo: the k3 KL's weight); default the paper's: 0.1, simpo 2.0, grpo 0 (no reference pass)"
        ),
    )
    label_smoothing: float = field(
        default=0.0,
        metadata=_help("preference: the probability that a pair's labels are flipped (sigmoid: cDPO, robust, simpo)"),
    )
    simpo_gamma: float = field(default=0.5, metadata=_help("preference, loss simpo: the target reward margin gamma"))
    desirable_weight: float = field(default=1.0, metadata=_help("kto: weight of the desirable rows' losses"))
    undesirable_weight: float = field(default=1.0, metadata=_help("kto: weight of the undesirable rows' losses"))
    max_prompt_len: int | None = field(
        default=None,
        metadata=_help("preference, kto, reward: keep each prompt's last N tokens (before --max-seq-len cuts the end)"),
    )
    precompute_reference: bool = field(
        default=False,
        metadata=_help(
            "preference, kto: compute the reference log-probs once before training, stored beside the token cache and "
            "reused (required for --method full)"
        ),
    )
    skip_bad_rows: bool = field(
        default=False,
        metadata=_help("preference, kto, reward: count and leave out bad rows instead of stopping at the first"),
    )

    # GRPO (names and defaults as TRL's GRPOConfig)
    num_generations: int = field(default=8, metadata=_help("grpo: completions sampled per prompt (G)"))
    num_iterations: int = field(
        default=1, metadata=_help("grpo: optimizer steps on each sampled batch (μ; > 1 clips the ratio to the sampler)")
    )
    max_completion_len: int = field(default=512, metadata=_help("grpo: sample at most N tokens per completion"))
    temperature: float = field(default=1.0, metadata=_help("grpo: sampling temperature"))
    top_p: float = field(default=1.0, metadata=_help("grpo: nucleus sampling mass (1: off)"))
    top_k: int = field(default=0, metadata=_help("grpo: sample among the k most likely tokens (0: off)"))
    min_p: float | None = field(default=None, metadata=_help("grpo: drop tokens below min_p x the top probability"))
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = field(
        default="dapo", metadata=_help("grpo: the loss's normalization (TRL's loss_type)")
    )
    epsilon: float = field(default=0.2, metadata=_help("grpo: the ratio's lower clip 1 - epsilon"))
    epsilon_high: float | None = field(
        default=None, metadata=_help("grpo: the ratio's upper clip 1 + epsilon_high (default: epsilon; DAPO: 0.28)")
    )
    importance_level: Literal["token", "sequence"] = field(
        default="token", metadata=_help("grpo: importance ratio per token, or per sequence (GSPO)")
    )
    scale_rewards: Literal["group", "batch", "none"] = field(
        default="group", metadata=_help("grpo: divide advantages by the group's or batch's reward std, or not")
    )
    mask_truncated_completions: bool = field(
        default=False, metadata=_help("grpo: leave completions cut at --max-completion-len out of the loss")
    )
    rewards: str | list | None = field(
        default=None,
        metadata=_help(
            "grpo: the rewards, comma-separated built-ins or module:function (YAML: a list, with weights and settings)"
        ),
    )

    def validate(self, required: tuple[str, ...] = ("model", "data", "output")) -> TrainConfig:
        """Check every value (and that the ``required`` paths are set); raises NibbleError naming the first bad
        key. Returns self."""
        for key in required:
            if not getattr(self, key):
                raise NibbleError(f"'{key}' is required: pass --{key.replace('_', '-')} or set it in the YAML file")
        for name, hint in typing.get_type_hints(TrainConfig).items():
            _check_type(name, getattr(self, name), hint)
            if isinstance(getattr(self, name), float) and not math.isfinite(getattr(self, name)):
                raise NibbleError(f"'{name}' must be a finite number, got {getattr(self, name)}")
        positive = ("batch_size", "grad_accum", "lora_rank", "max_seq_len", "epochs", "log_every", "keep_checkpoints")
        for key in positive:
            if getattr(self, key) < 1:
                raise NibbleError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("max_steps", "eval_batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise NibbleError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        nonneg = ("eval_every", "save_every", "early_stopping_patience", "weight_decay", "max_grad_norm")
        for key in nonneg:
            if getattr(self, key) < 0:
                raise NibbleError(f"'{key}' must be >= 0, got {getattr(self, key)}")
        resolve_device(self.device)
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget, "memory_budget")
        if self.cache_budget_mb is not None and self.cache_budget_mb < 0:
            raise NibbleError(f"'cache_budget_mb' must be >= 0 or auto, got {self.cache_budget_mb}")
        if self.shard_base and self.cache_budget_mb:
            raise NibbleError(
                "'cache_budget_mb' keeps whole dense copies of the frozen weights on every rank, which 'shard_base' "
                "splits over the ranks; drop --cache-budget-mb (or set 0) with --shard-base"
            )
        if not self.lr > 0:
            raise NibbleError(f"'lr' must be > 0, got {self.lr}")
        for key in ("warmup_ratio", "min_lr_ratio", "lora_dropout", "val_split"):
            if not 0 <= getattr(self, key) < 1:
                raise NibbleError(f"'{key}' must be in [0, 1), got {getattr(self, key)}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise NibbleError(f"'{key}' must be in [0, 1), got {getattr(self, key)}")
        if self.adam_eps <= 0 or self.lora_alpha <= 0:
            raise NibbleError("'adam_eps' and 'lora_alpha' must be > 0")
        self.router_aux_weight(0.0)  # noqa: B018  (validates router_aux_loss)
        self._check_task()
        from nibble.nn.lora import resolve_targets
        from nibble.train.report import report_targets

        resolve_targets(self.lora_targets)
        report_targets(self.report_to)
        if self.quant_format == "gguf" and self.method != "qlora":
            raise NibbleError(
                "'quant_format' gguf keeps a .gguf file's blocks as the frozen base of method qlora; "
                "use --method qlora, or drop --quant-format gguf"
            )
        self.quant_spec  # noqa: B018  (validates the 4-bit format's parameters)
        return self

    def _check_task(self) -> None:
        """The task exists, the options of other tasks keep their defaults, and the task accepts its own."""
        from nibble.train.tasks import get_task, option_owners

        task = get_task(self.task)
        defaults = TrainConfig()
        for key, owners in option_owners().items():
            if key not in task.options and getattr(self, key) != getattr(defaults, key):
                *others, last = owners
                tasks = f"the {', '.join(others)} and {last} tasks" if others else f"task {last}"
                raise NibbleError(f"'{key}' applies to {tasks} only; drop it for {self.task}")
        task.check(self)

    @property
    def quant_spec(self) -> QuantSpec:
        """The 4-bit format of the frozen base, as one value."""
        return QuantSpec(self.quant_format, self.blocksize, self.group_size, self.double_quant)

    def router_aux_weight(self, coef: float) -> float:
        """The weight of the load-balancing loss: 0 (off), ``coef`` (on: config.json's router_aux_loss_coef), or
        the number given.

        Raises:
            NibbleError: anything else, or a negative number.
        """
        value = str(self.router_aux_loss).strip().lower()
        if value in ("off", "on"):
            return coef if value == "on" else 0.0
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not (math.isfinite(weight) and weight >= 0):
            raise NibbleError(f"'router_aux_loss' must be off, on or a weight >= 0, got {self.router_aux_loss!r}")
        return weight

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (loadable with :func:`load_config`)."""
        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))

    @property
    def torch_dtype(self):
        """The compute dtype, once ``dtype`` is resolved (not ``auto``; see :func:`nibble.devices.resolve_dtype`)."""
        return DTYPES[self.dtype]


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Raise NibbleError when ``value`` does not fit the annotation ``hint`` (None, bool, int, float, str, Literal)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return
        if typing.get_origin(option) is Literal and value in typing.get_args(option):
            return
        if option is bool and isinstance(value, bool):
            return
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if option is str and isinstance(value, str):
            return
        if option is list and isinstance(value, list):
            return
    literal = [typing.get_args(o) for o in options if typing.get_origin(o) is Literal]
    want = (
        f"one of {', '.join(map(str, literal[0]))}"
        if literal
        else " or ".join("null" if o is type(None) else o.__name__ for o in options)
    )
    raise NibbleError(f"'{name}' must be {want}, got {value!r}")


# Names other trainers (transformers TrainingArguments, PEFT LoraConfig, TRL) use for TrainConfig fields.
_KEY_ALIASES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "num_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum",
    "warmup": "warmup_ratio",
    "max_length": "max_seq_len",
    "max_seq_length": "max_seq_len",
    "r": "lora_rank",
    "target_modules": "lora_targets",
    "logging_steps": "log_every",
    "eval_steps": "eval_every",
    "save_steps": "save_every",
    "save_total_limit": "keep_checkpoints",
    "output_dir": "output",
    "model_name_or_path": "model",
    "resume_from_checkpoint": "resume",
}


def check_keys(data: Mapping[str, Any], source: str) -> None:
    """Raise NibbleError, naming ``source`` and suggesting the field meant, for a key TrainConfig lacks."""
    known = field_names()
    for key in data:
        if key not in known:
            alias = _KEY_ALIASES.get(str(key))
            close = [alias] if alias in known else difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise NibbleError(f"{source}: unknown key '{key}'{hint}")


class _AliasFound(Exception):
    pass


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: ``*name`` could expand a kilobyte into gigabytes (nested aliases,
    a "billion laughs"), and a config never needs one."""

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            raise _AliasFound(self.peek_event().start_mark.line + 1)
        return super().compose_node(parent, index)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The keys of a YAML config file; unknown keys are errors (with a suggestion).

    Raises:
        NibbleError: a missing, oversized (over 1 MiB) or invalid file, YAML aliases (``*name``), a value
            that is not a mapping, or an unknown key; names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise NibbleError(f"{path}: no such config file")
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise NibbleError(f"{path}: {path.stat().st_size} bytes is too large for a training config (at most 1 MiB)")
        loader = _NoAliasLoader(path.read_text(encoding="utf-8-sig"))
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except _AliasFound as exc:
        raise NibbleError(
            f"{path} line {exc.args[0]}: YAML aliases (*name) are not supported; write the value out"
        ) from None
    except RecursionError:
        raise NibbleError(f"{path}: nested too deeply to be a training config") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise NibbleError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise NibbleError(f"{path}: expected a mapping of keys to values")
    check_keys(data, str(path))
    if isinstance(data.get("lora_targets"), list):
        data["lora_targets"] = ",".join(map(str, data["lora_targets"]))
    if isinstance(data.get("columns"), dict):
        data["columns"] = ",".join(f"{role}={column}" for role, column in data["columns"].items())
    elif isinstance(data.get("columns"), list):
        data["columns"] = ",".join(map(str, data["columns"]))
    return data


# The fields naming a file or directory; stored absolute, so a run's config.yaml means the same from any directory.
PATH_FIELDS = ("model", "data", "val_data", "output", "resume", "chat_template", "config_file")


def absolute_paths(values: Mapping[str, Any], base: str | Path) -> dict[str, Any]:
    """``values`` with every relative path of :data:`PATH_FIELDS` made absolute against ``base`` (``~`` expanded);
    ``resume: latest`` stays as it is, and a chat template only becomes a path where that file exists (else it
    is a built-in template's name, or a mistake its error names as written)."""
    out = dict(values)
    for key in PATH_FIELDS:
        value = out.get(key)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value or (key == "resume" and value == "latest"):
            continue
        path = os.path.abspath(os.path.join(base, os.path.expanduser(value)))
        if key != "chat_template" or os.path.isfile(path):
            out[key] = path
    return out


def resolve_config(
    yaml_path: str | Path | None,
    overrides: dict[str, Any],
    required: tuple[str, ...] = ("model", "data", "output"),
) -> TrainConfig:
    """Defaults <- YAML file <- ``overrides`` (the flags given), validated (see :meth:`TrainConfig.validate`).

    Paths come out absolute: relative ones in the YAML file are taken from the file's own directory, those in
    ``overrides`` from the current directory (see :func:`absolute_paths`).
    """
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values = absolute_paths(read_yaml(yaml_path), Path(yaml_path).parent)
        values["config_file"] = os.path.abspath(yaml_path)
    values.update(absolute_paths(overrides, os.getcwd()))
    try:
        config = TrainConfig(**values)
    except TypeError as exc:
        raise NibbleError(f"bad training config: {exc}") from None
    return config.validate(required)
