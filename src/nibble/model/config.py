"""ModelConfig: the shape of a decoder, read from (and written back to) a Hugging Face ``config.json``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nibble.errors import NibbleError
from nibble.io.files import read_json_object
from nibble.io.rope import rope_config_keys

# model_type -> the class-name prefix transformers uses (Qwen3ForCausalLM, ...).
ARCHITECTURES = {
    "qwen3": "Qwen3",
    "qwen2": "Qwen2",
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen3_5_text": "Qwen3_5",
    "qwen3_moe": "Qwen3Moe",
    "qwen3_5_moe_text": "Qwen3_5Moe",
    "qwen3_next": "Qwen3Next",
}
# A Qwen3_5ForConditionalGeneration config.json (model_type "qwen3_5", or "qwen3_5_moe") holds the decoder's
# config under "text_config"; nibble loads that decoder as "qwen3_5_text" ("qwen3_5_moe_text").
MULTIMODAL_TYPES = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
# The families with Gated DeltaNet layers, and those with mixture-of-experts blocks.
HYBRID_TYPES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")
MOE_TYPES = ("qwen3_moe", "qwen3_5_moe_text", "qwen3_next")
# The families whose attention has Qwen3's per-head q/k RMSNorm.
QK_NORM_TYPES = ("qwen3", *MOE_TYPES, "qwen3_5_text")
LAYER_TYPES = ("full_attention", "linear_attention")
ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    """Sizes and family features of a Qwen3 / Qwen2 / Llama / Mistral decoder.

    ``moe`` is None for a dense decoder, else the sparse blocks' sizes (:class:`MoEConfig`).
    ``rope_scaling`` is None for plain RoPE, else a dict with ``rope_type`` ("linear" or "llama3") and
    that type's parameters. ``attention_bias`` puts a bias on q/k/v; ``attention_out_bias`` on o_proj
    (Llama and Qwen3 use one flag for all four, Qwen2 biases q/k/v only). ``qk_norm`` is Qwen3's per-head
    RMSNorm on q and k. ``sliding_window`` (Mistral) limits how far back each token attends.

    Qwen3.5 (``qwen3_5_text``; also Qwen3.5-MoE and Qwen3-Next, :data:`HYBRID_TYPES`) adds: ``layer_types``
    (one of :data:`LAYER_TYPES` per layer; None means full attention everywhere), the Gated DeltaNet sizes of its
    ``linear_attention`` layers (``linear_*``), ``attn_output_gate`` (q_proj also yields a per-channel gate on the
    attention output), ``partial_rotary_factor`` (RoPE on that fraction of each head) and ``zero_centred_norm``
    (RMSNorms scale by ``1 + weight``). Qwen3-Next's DeltaNet layers fuse their input projections
    (``linear_fused_projections``: ``in_proj_qkvz`` and ``in_proj_ba``, grouped by key head). ``multimodal``
    records a checkpoint whose decoder sits under ``model.language_model``.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    num_labels: int | None = None
    id2label: dict[int, str] | None = None
    initializer_range: float = 0.02
    torch_dtype: str | None = None
    layer_types: tuple[str, ...] | None = None
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    attn_output_gate: bool = False
    partial_rotary_factor: float = 1.0
    mrope_section: tuple[int, ...] | None = None
    zero_centred_norm: bool = False
    linear_fused_projections: bool = False
    multimodal: bool = False
    quantization_config: dict[str, Any] | None = field(default=None, repr=False)
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            _positive_int(self, name)
        _positive_int(self, "num_key_value_heads")
        _positive_int(self, "head_dim")
        if self.model_type not in ARCHITECTURES:
            raise NibbleError(f"model_type '{self.model_type}' is not supported; use one of {sorted(ARCHITECTURES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise NibbleError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise NibbleError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.layer_types is not None:
            self._check_layer_types()
        if self.rotary_dim % 2 or self.rotary_dim < 2:
            raise NibbleError(
                f"partial_rotary_factor {self.partial_rotary_factor} of head_dim {self.head_dim} gives "
                f"{self.rotary_dim} rotary channels; it must be an even number >= 2"
            )
        if self.num_labels is not None and (not isinstance(self.num_labels, int) or self.num_labels < 1):
            raise NibbleError(f"num_labels must be a positive integer, got {self.num_labels!r}")

    def _check_layer_types(self) -> None:
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise NibbleError(
                f"config.json: 'layer_types' has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise NibbleError(f"config.json: layer type '{unknown[0]}' is not supported; use one of {LAYER_TYPES}")
        if "linear_attention" in self.layer_types:
            for name in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                         "linear_value_head_dim", "linear_conv_kernel_dim"):  # fmt: skip
                _positive_int(self, name)
            if self.linear_num_value_heads % self.linear_num_key_heads:
                raise NibbleError(
                    f"config.json: linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                    f"linear_num_key_heads ({self.linear_num_key_heads})"
                )

    def layer_type(self, index: int) -> str:
        """``"full_attention"`` or ``"linear_attention"`` for layer ``index``."""
        return "full_attention" if self.layer_types is None else self.layer_types[index]

    @property
    def is_hybrid(self) -> bool:
        """Whether some layer is Gated DeltaNet linear attention."""
        return self.layer_types is not None and "linear_attention" in self.layer_types

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (the first ones; all of them unless partial)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        """Width of a DeltaNet layer's queries (and of its keys): key heads x key head dim."""
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        """Width of a DeltaNet layer's values (and of its output gate ``z``)."""
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def q_dim(self) -> int:
        """Width of the query projection's output (heads x head_dim), which may differ from hidden_size."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        """``eos_token_id`` as a list (empty when unset)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def from_hf(cls, source: dict[str, Any] | str | Path, *, tensors: int | None = None) -> ModelConfig:
        """Build from a ``config.json`` dict, a path to one, or a model directory holding one. ``tensors`` (the
        count the checkpoint holds, when known) bounds the layer count: every layer stores tensors of its own.

        Raises:
            NibbleError: missing or invalid JSON, an unsupported architecture or feature, a missing or
                invalid size, more layers than ``tensors``; the message names the file (or "config.json") and
                the key.
        """
        if isinstance(source, dict):
            return _from_dict(source, "config.json", tensors)
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        data = read_json_object(path, "a model directory needs a valid config.json")
        return _from_dict(data, str(path), tensors)

    def to_hf(self, architecture: str | None = None) -> dict[str, Any]:
        """A ``config.json`` dict transformers (4.x and 5.x) loads: ``*ForCausalLM``, or
        ``*ForSequenceClassification`` when ``num_labels`` is set (``architecture`` overrides).
        ``quantization_config`` is left out."""
        prefix = ARCHITECTURES[self.model_type]
        if architecture is None:
            architecture = f"{prefix}ForSequenceClassification" if self.num_labels else f"{prefix}ForCausalLM"
        out: dict[str, Any] = {
            "architectures": [architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            **rope_config_keys(self.rope_theta, self.rope_scaling),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.model_type in ("llama", *QK_NORM_TYPES):
            out["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.moe is not None:
            out.update(self.moe.to_hf())
        if self.model_type in HYBRID_TYPES:
            out["rope_parameters"]["partial_rotary_factor"] = self.partial_rotary_factor
            if self.mrope_section is not None:
                out["rope_parameters"].update(mrope_section=list(self.mrope_section), mrope_interleaved=True)
            out["layer_types"] = list(self.layer_types or ["full_attention"] * self.num_hidden_layers)
            for name in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                         "linear_value_head_dim", "linear_conv_kernel_dim"):  # fmt: skip
                out[name] = getattr(self, name)
        if self.torch_dtype:
            out["dtype"] = self.torch_dtype
        if self.num_labels:
            out["num_labels"] = self.num_labels
            labels = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
            out["id2label"] = {str(i): name for i, name in labels.items()}
            out["label2id"] = {name: i for i, name in labels.items()}
        return out

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON-serializable values."""
        return asdict(self)


def _positive_int(cfg: ModelConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise NibbleError(f"config.json: '{name}' must be a positive integer, got {value!r}")


def _model_type(data: dict[str, Any], source: str) -> str:
    model_type = data.get("model_type")
    if model_type is None:
        for arch in data.get("architectures") or []:
            for key, prefix in ARCHITECTURES.items():
                if isinstance(arch, str) and arch.startswith(prefix + "For"):
                    return key
        raise NibbleError(f"{source}: no 'model_type' (expected one of {sorted(ARCHITECTURES)})")
    if isinstance(model_type, str) and model_type in MULTIMODAL_TYPES:
        return MULTIMODAL_TYPES[model_type]
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise NibbleError(
            f"{source}: model_type '{model_type}' is not supported; nibble loads {', '.join(sorted(ARCHITECTURES))}"
        )
    return model_type


def _rope(
    data: dict[str, Any], source: str, partial_default: float | None
) -> tuple[float, dict[str, Any] | None, float]:
    """(theta, scaling, partial_rotary_factor) from ``rope_parameters`` (transformers >= 5) or ``rope_theta`` +
    ``rope_scaling``; a family without partial RoPE (``partial_default`` None) must have a factor of 1."""
    params = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise NibbleError(f"{source}: 'rope_parameters' must be an object")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise NibbleError(f"{source}: per-layer-type 'rope_parameters' are not supported")
    theta = params.get("rope_theta", data.get("rope_theta", 10000.0))
    if not _is_positive_number(theta):
        raise NibbleError(f"{source}: 'rope_theta' must be a positive number, got {theta!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise NibbleError(f"{source}: rope_type '{rope_type}' is not supported; use one of {ROPE_TYPES}")
    partial = params.get("partial_rotary_factor", data.get("partial_rotary_factor", partial_default or 1.0))
    if not (partial_default and _is_positive_number(partial) and partial <= 1) and partial != 1.0:
        raise NibbleError(f"{source}: 'partial_rotary_factor' {partial} is not supported (only 1.0)")
    if rope_type == "default":
        return float(theta), None, float(partial)
    scaling: dict[str, Any] = {"rope_type": rope_type, "factor": params.get("factor")}
    if rope_type == "llama3":
        for key in _LLAMA3_KEYS[1:]:
            scaling[key] = params.get(key)
        if scaling["original_max_position_embeddings"] is None:
            scaling["original_max_position_embeddings"] = data.get("max_position_embeddings")
    for key, value in scaling.items():
        if key != "rope_type" and not _is_positive_number(value):
            raise NibbleError(f"{source}: rope scaling '{key}' must be a positive number, got {value!r}")
    return float(theta), scaling, float(partial)


def _mrope_section(data: dict[str, Any], source: str) -> tuple[int, ...] | None:
    """The mRoPE sections of ``rope_parameters`` (channel pairs per position axis), None when absent; on text
    every axis holds the same position, so they change nothing nibble computes (GGUF export writes them)."""
    sections = (data.get("rope_parameters") or data.get("rope_scaling") or {}).get("mrope_section")
    if sections is None:
        return None
    if not isinstance(sections, list) or not all(type(s) is int and s >= 0 for s in sections):
        raise NibbleError(f"{source}: 'mrope_section' must be a list of channel-pair counts, got {sections!r}")
    return tuple(sections)


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _field(data: dict[str, Any], key: str, source: str, default: Any, kind: str) -> Any:
    """``data[key]`` (or ``default``) checked against ``kind``: "int" (>= 1), "int?" (any integer or null),
    "int>=1?" (>= 1 or null), "number" (finite, > 0), "number>=0", "bool", "str?", "object?", or "ids?" (an
    integer, a list of integers, or null)."""
    value = data.get(key, default)
    optional = kind.endswith("?")
    if optional and value is None:
        return None
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = {
        "int": is_int and value >= 1,
        "int?": is_int,
        "int>=1?": is_int and value >= 1,
        "number": _is_positive_number(value),
        "number>=0": _is_positive_number(value) or (is_int or isinstance(value, float)) and value == 0,
        "bool": isinstance(value, bool),
        "str?": isinstance(value, str),
        "object?": isinstance(value, dict),
        "ids?": is_int or (isinstance(value, list) and all(type(v) is int for v in value)),
    }[kind]
    if not ok:
        want = {
            "int": "a positive integer",
            "int?": "an integer or null",
            "int>=1?": "a positive integer or null",
            "number": "a finite positive number",
            "number>=0": "a finite number >= 0",
            "bool": "true or false",
            "str?": "a string or null",
            "object?": "an object or null",
            "ids?": "an integer, a list of integers, or null",
        }[kind]
        raise NibbleError(f"{source}: '{key}' must be {want}, got {repr(value)[:80]}")
    return value


def _from_dict(data: dict[str, Any], source: str, tensors: int | None = None) -> ModelConfig:
    model_type = _model_type(data, source)
    multimodal = data.get("model_type") in MULTIMODAL_TYPES
    if multimodal:
        text = _field(data, "text_config", source, None, "object?")
        if text is None:
            raise NibbleError(f"{source}: model_type '{data['model_type']}' needs a 'text_config' object")
        source = f"{source} (text_config)"
        data = {"tie_word_embeddings": data.get("tie_word_embeddings", False), **text, "model_type": model_type}
    if model_type == "qwen3_5_moe_text" and "intermediate_size" not in data:  # no dense SwiGLU: not in its config
        data = {**data, "intermediate_size": data.get("moe_intermediate_size", 512)}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in data:
            raise NibbleError(f"{source}: missing '{key}'")
        _field(data, key, source, None, "int")
    if tensors is not None and data["num_hidden_layers"] > tensors:  # checked before anything is built per layer
        raise NibbleError(
            f"{source}: 'num_hidden_layers' is {data['num_hidden_layers']}, but the checkpoint holds {tensors} "
            "tensors, fewer than one per layer; the config is corrupt"
        )
    act = data.get("hidden_act", data.get("hidden_activation", "silu"))
    if act != "silu":
        raise NibbleError(f"{source}: hidden_act '{act}' is not supported (only silu)")
    if _field(data, "use_sliding_window", source, False, "bool"):
        raise NibbleError(f"{source}: 'use_sliding_window' true is not supported")
    archs = data.get("architectures") or []
    if not isinstance(archs, list):
        raise NibbleError(f"{source}: 'architectures' must be a list of class names")
    heads = data["num_attention_heads"]
    kv_heads = _field(data, "num_key_value_heads", source, None, "int>=1?") or heads
    head_dim = _field(data, "head_dim", source, None, "int>=1?")
    if head_dim is None:
        if data["hidden_size"] % heads:
            raise NibbleError(f"{source}: hidden_size must be a multiple of num_attention_heads when head_dim is unset")
        head_dim = data["hidden_size"] // heads
    hybrid = model_type in HYBRID_TYPES
    theta, scaling, partial = _rope(data, source, 0.25 if hybrid else None)  # transformers' Qwen3.5 default
    bias = _field(data, "attention_bias", source, False, "bool")
    labels = _field(data, "id2label", source, None, "object?")
    num_labels = _field(data, "num_labels", source, None, "int>=1?")
    if num_labels is None and any(str(a).endswith("ForSequenceClassification") for a in archs) and labels:
        num_labels = len(labels)
    id2label = None
    if labels and num_labels and len(labels) == num_labels:
        try:
            id2label = {int(k): str(v) for k, v in labels.items()}
        except ValueError:
            raise NibbleError(f"{source}: 'id2label' must map integer ids to names") from None
    sliding = _field(data, "sliding_window", source, None, "int>=1?") if model_type == "mistral" else None
    dtype = _field(data, "dtype", source, None, "str?")
    dtype = dtype if dtype is not None else _field(data, "torch_dtype", source, None, "str?")
    try:
        return ModelConfig(
            vocab_size=data["vocab_size"],
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            num_hidden_layers=data["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            model_type=model_type,
            rms_norm_eps=float(_field(data, "rms_norm_eps", source, 1e-6, "number")),
            rope_theta=theta,
            rope_scaling=scaling,
            mrope_section=_mrope_section(data, source) if hybrid else None,
            max_position_embeddings=_field(data, "max_position_embeddings", source, 4096, "int"),
            tie_word_embeddings=_field(data, "tie_word_embeddings", source, False, "bool"),
            # Qwen2 always biases q/k/v and never o_proj; Mistral has no biases.
            attention_bias=model_type == "qwen2" or (bias and model_type != "mistral"),
            attention_out_bias=bias and model_type in ("llama", *QK_NORM_TYPES),
            mlp_bias=_field(data, "mlp_bias", source, False, "bool") and model_type == "llama",
            qk_norm=model_type in QK_NORM_TYPES,
            sliding_window=sliding,
            pad_token_id=_field(data, "pad_token_id", source, None, "int?"),
            bos_token_id=_field(data, "bos_token_id", source, None, "int?"),
            eos_token_id=_field(data, "eos_token_id", source, None, "ids?"),
            num_labels=num_labels,
            id2label=id2label,
            initializer_range=float(_field(data, "initializer_range", source, 0.02, "number>=0")),
            torch_dtype=dtype,
            **(_hybrid_fields(data, source, partial, model_type) if hybrid else {}),
            multimodal=multimodal,
            quantization_config=_field(data, "quantization_config", source, None, "object?"),
            moe=_moe(data, source, model_type) if model_type in MOE_TYPES else None,
        )
    except (TypeError, ValueError) as exc:
        raise NibbleError(f"{source}: invalid value ({exc})") from None
    except NibbleError as exc:
        raise NibbleError(f"{source}: {str(exc).removeprefix('config.json: ')}") from None


@dataclass(frozen=True)
class MoEConfig:
    """The sparse mixture-of-experts blocks of Qwen3-MoE, Qwen3.5-MoE and Qwen3-Next: ``num_experts`` SwiGLU experts
    of width ``moe_intermediate_size``, ``num_experts_per_tok`` chosen per token by a softmax router (their weights
    renormalized to sum to 1 when ``norm_topk_prob``). Layer ``i`` is sparse unless it is in
    ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0``; the others keep a dense SwiGLU of
    ``intermediate_size``. ``router_aux_loss_coef`` weighs the load-balancing loss. A shared expert (a SwiGLU of
    ``shared_expert_intermediate_size``, 0 for none: Qwen3-MoE) sees every token, its output scaled by
    ``sigmoid(shared_expert_gate x)``."""

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    shared_expert_intermediate_size: int = 0

    def is_sparse(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` has a sparse MoE block (else a dense SwiGLU)."""
        return layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0

    def to_hf(self) -> dict[str, Any]:
        """The config.json keys (``num_experts`` as published checkpoints write it; transformers 5 reads it)."""
        out = asdict(self)
        out["mlp_only_layers"] = list(self.mlp_only_layers)
        if not self.shared_expert_intermediate_size:
            del out["shared_expert_intermediate_size"]
        return out


def _moe(data: dict[str, Any], source: str, model_type: str) -> MoEConfig:
    # transformers 5 writes num_experts as num_local_experts; published Qwen3-MoE configs write num_experts
    key = "num_experts" if "num_experts" in data else "num_local_experts"
    experts = _field(data, key, source, None, "int")
    top_k = _field(data, "num_experts_per_tok", source, None, "int")
    if top_k > experts:
        raise NibbleError(f"{source}: 'num_experts_per_tok' ({top_k}) must be at most '{key}' ({experts})")
    if model_type == "qwen3_5_moe_text":  # every layer sparse, top-k always renormalized (no config keys)
        data = {**data, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}
    only = data.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(type(i) is int for i in only):
        raise NibbleError(f"{source}: 'mlp_only_layers' must be a list of layer indices, got {repr(only)[:80]}")
    shared = 0 if model_type == "qwen3_moe" else _field(data, "shared_expert_intermediate_size", source, 512, "int")
    return MoEConfig(
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=_field(data, "moe_intermediate_size", source, None, "int"),
        norm_topk_prob=_field(data, "norm_topk_prob", source, model_type == "qwen3_next", "bool"),
        decoder_sparse_step=_field(data, "decoder_sparse_step", source, 1, "int"),
        mlp_only_layers=tuple(only),
        router_aux_loss_coef=float(_field(data, "router_aux_loss_coef", source, 0.001, "number>=0")),
        shared_expert_intermediate_size=shared,
    )


def _hybrid_fields(data: dict[str, Any], source: str, partial: float, model_type: str) -> dict[str, Any]:
    """The Qwen3.5 / Qwen3-Next fields of ModelConfig from its config.json (transformers' defaults where a key is
    absent)."""
    layers = data["num_hidden_layers"]
    layer_types = data.get("layer_types")
    if layer_types is None:
        interval = _field(data, "full_attention_interval", source, 4, "int")
        layer_types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
        raise NibbleError(f"{source}: 'layer_types' must be a list of layer type names")
    sizes = {"linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
             "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4}  # fmt: skip
    return {
        "layer_types": tuple(layer_types),
        **{key: _field(data, key, source, default, "int") for key, default in sizes.items()},
        "attn_output_gate": True,  # transformers' Qwen3.5 attention always gates (no config key)
        "partial_rotary_factor": partial,
        "zero_centred_norm": True,
        "linear_fused_projections": model_type == "qwen3_next",
    }
