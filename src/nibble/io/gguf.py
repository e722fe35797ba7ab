"""GGUF (llama.cpp's single-file format) read into Hugging Face layout: config, float weights, tokenizer.

``open_gguf(path)`` validates a model file and exposes what a loader needs without writing anything:
``config`` (an HF ``config.json`` dict), ``tensors(dtype)`` (HF-named float tensors, dequantized one at a
time), ``tokenizer()`` (a ``tokenizers.Tokenizer``), ``tokenizer_config()`` and ``save_tokenizer(dir)``.
``convert_gguf`` writes all of it as a model directory that transformers and nibble load like any other.
``GGUFFile`` is the metadata-and-tokenizer part alone, for files without model tensors.

Facts this relies on:
- GGUF lists dimensions fastest-first, so a tensor's torch shape is its GGUF shape reversed; quantized
  types are dequantized to fp32 by the ``gguf`` package.
- llama.cpp's converter reorders the rows of ``attn_q``/``attn_k`` of ``llama`` models so that each head's
  two rotary halves are interleaved (pairs ``(i, i + d/2)`` become neighbours); converting back undoes it.
  Qwen2/Qwen3 files are written without that reordering.
- Llama 3 RoPE scaling is stored as a ``rope_freqs`` tensor of per-frequency divisors rather than as
  parameters; the parameters are recovered from it and checked by rebuilding the tensor.
- Tokenizers: ``gpt2`` is byte-level BPE (tokens spelled in the GPT-2 byte alphabet, merges as "a b"),
  ``llama`` is SentencePiece BPE with byte fallback (merges given, or implied by the token scores).
  Both are rebuilt the way transformers rebuilds them from a GGUF, so the ids are the same.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from nibble.errors import NibbleError
from nibble.io.files import read_json_object, staged_dir, write_json
from nibble.io.gguf_reader import GGUFContents, read_gguf
from nibble.io.rope import rope_config_keys
from nibble.io.safetensors import Checkpoint, TensorInfo
from nibble.quant.gguf import NATIVE_TYPES, GGUFWeight

ARCHITECTURES = ("llama", "qwen2", "qwen3")
_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_GGUF_MAGIC = b"GGUF"
# Written into a converted directory: the GGUF file it came from (for bases that keep the file's own blocks).
SOURCE_NAME = "gguf_source.json"
_REQUIRED = object()
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}

# GGUF tensor name -> HF name; per-block names are relative to ``model.layers.{i}.``.
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_PROJECTION = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")

# Pre-tokenizer splits for ``tokenizer.ggml.pre`` values whose vocabularies were not learned on GPT-2's
# split; any other value uses GPT-2's (the byte-level pre-tokenizer's built-in regex).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ``tokenizer.ggml.pre`` values that split every digit off before GPT-2's split (llama.cpp's "\p{N}" rule).
DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell")
_PRE_TOKENIZER_SPLITS = {
    "llama3": LLAMA3_SPLIT,
    "llama-v3": LLAMA3_SPLIT,
    "llama-bpe": LLAMA3_SPLIT,
    "smaug-bpe": LLAMA3_SPLIT,
    "falcon3": LLAMA3_SPLIT,
    "dbrx": LLAMA3_SPLIT,
    "qwen2": QWEN2_SPLIT,
    "deepseek-r1-qwen": QWEN2_SPLIT,
}
# tokenizer.ggml.token_type values (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes keep their character, the
    other 68 bytes take the characters from U+0100 upward in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    spelled = {b: chr(b) for b in keep}
    extra = (b for b in range(256) if b not in spelled)
    spelled.update({b: chr(0x100 + n) for n, b in enumerate(extra)})
    return spelled


class GGUFFile:
    """A readable GGUF file: its metadata and the tokenizer the metadata describes (no model checks).

    Raises:
        NibbleError: missing or unreadable file, not a GGUF, truncated or corrupt; later, missing or
            corrupt metadata. Every message is one line naming the file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader = _open_reader(self.path)
        self.architecture: str = self.meta("general.architecture")

    def meta(self, key: str, default: Any = _REQUIRED) -> Any:
        """Metadata value ``key`` (``{arch}`` filled in); a missing key is ``default``, or a NibbleError."""
        key = key.replace("{arch}", getattr(self, "architecture", ""))
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise NibbleError(f"{self.path}: metadata key '{key}' is missing; the file is incomplete")
            return default
        try:
            value = field.contents()
        except (UnicodeDecodeError, IndexError, ValueError) as exc:
            raise NibbleError(f"{self.path}: metadata key '{key}' is corrupt ({exc})") from None
        return _checked_meta(self.path, key, value)

    # -- tokenizer --------------------------------------------------------------------------------

    def tokenizer(self):
        """The tokenizer described by the file's ``tokenizer.ggml.*`` metadata, as a ``tokenizers.Tokenizer``."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
        from tokenizers.models import BPE

        kind = self.meta("tokenizer.ggml.model")
        tokens: list[str] = self.meta("tokenizer.ggml.tokens")
        token_types: list[int] = self.meta("tokenizer.ggml.token_type", [])
        merges = self.meta("tokenizer.ggml.merges", None)
        # token types are optional metadata; when present there is one per token
        if token_types and len(token_types) != len(tokens):
            raise NibbleError(f"{self.path}: {len(token_types)} token types for {len(tokens)} tokens")
        control = [t for t, kind_ in zip(tokens, token_types, strict=False) if kind_ == _CONTROL]
        if kind == "gpt2":
            if merges is None:
                raise NibbleError(f"{self.path}: byte-level tokenizer without 'tokenizer.ggml.merges'")
            alphabet = _byte_alphabet()
            letters = set(alphabet.values())

            def spell(token: str) -> str:
                # a token written outside the byte alphabet (a raw added token) is respelled from its UTF-8 bytes
                return token if set(token) <= letters else "".join(alphabet[b] for b in token.encode("utf-8"))

            vocab = {spell(token): i for i, token in enumerate(tokens)}
            tokenizer = Tokenizer(BPE(vocab, [_split_merge(self.path, m) for m in merges], fuse_unk=False))
            pre = self.meta("tokenizer.ggml.pre", None)
            split = _PRE_TOKENIZER_SPLITS.get(pre)
            if pre in DIGIT_SPLIT_PRE:
                tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                    [
                        pre_tokenizers.Digits(individual_digits=True),
                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                    ]
                )
            elif split is None:
                tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            else:
                tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                    [
                        pre_tokenizers.Split(Regex(split), behavior="isolated"),
                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                    ]
                )
            tokenizer.decoder = decoders.ByteLevel()
            # a control token outside the byte alphabet is no real vocabulary entry (a llama.cpp mislabel)
            control = [t for t in control if set(t) <= letters]
        elif kind == "llama":
            vocab = {token: i for i, token in enumerate(tokens)}
            if merges is not None:
                pairs = [_split_merge(self.path, m) for m in merges]
            else:
                scores = self.meta("tokenizer.ggml.scores")
                if len(scores) != len(tokens):
                    raise NibbleError(f"{self.path}: {len(scores)} token scores for {len(tokens)} tokens")
                pairs = _merges_from_scores(tokens, scores)
            tokenizer = Tokenizer(BPE(vocab, pairs, fuse_unk=True, byte_fallback=True))
            tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
                replacement="\u2581", prepend_scheme="first", split=False
            )
            tokenizer.decoder = decoders.Sequence(
                [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
            )
        else:
            raise NibbleError(
                f"{self.path}: tokenizer model '{kind}' is not supported (gpt2 byte-level BPE and llama "
                "SentencePiece BPE are)"
            )
        tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
        user = [t for t, kind_ in zip(tokens, token_types, strict=False) if kind_ == _USER_DEFINED and t in vocab]
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

        config = self.tokenizer_config()
        bos, eos = config.get("bos_token"), config.get("eos_token")
        add_bos = config["add_bos_token"] and bos is not None
        add_eos = config["add_eos_token"] and eos is not None

        def template(sequence: str, type_id: int) -> list[str]:
            return [*([f"{bos}:{type_id}"] if add_bos else []), f"${sequence}:{type_id}"] + (
                [f"{eos}:{type_id}"] if add_eos else []
            )

        specials = {token: tokenizer.token_to_id(token) for token, on in ((bos, add_bos), (eos, add_eos)) if on}
        tokenizer.post_processor = processors.TemplateProcessing(
            single=template("A", 0), pair=template("A", 0) + template("B", 1), special_tokens=list(specials.items())
        )
        return tokenizer

    def tokenizer_config(self) -> dict[str, Any]:
        """``tokenizer_config.json``: special tokens, whether BOS/EOS are added, the chat template."""
        tokens: list[str] = self.meta("tokenizer.ggml.tokens")
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
            token_id = self.meta(f"tokenizer.ggml.{key}_token_id", None)
            if token_id is not None:
                if not 0 <= int(token_id) < len(tokens):
                    raise NibbleError(f"{self.path}: {name} token id {token_id} is outside the {len(tokens)} tokens")
                config[f"{name}_token"] = tokens[int(token_id)]
        # SentencePiece vocabularies add BOS unless the file says otherwise (as llama.cpp does)
        config["add_bos_token"] = bool(
            self.meta("tokenizer.ggml.add_bos_token", self.meta("tokenizer.ggml.model") == "llama")
        )
        config["add_eos_token"] = bool(self.meta("tokenizer.ggml.add_eos_token", False))
        config["clean_up_tokenization_spaces"] = False
        context = self.meta("{arch}.context_length", None)
        if context is not None:
            config["model_max_length"] = int(context)
        template = self.meta("tokenizer.chat_template", None)
        if template is not None:
            config["chat_template"] = template
        return config

    def save_tokenizer(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer().save(str(directory / "tokenizer.json"))
        text = json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
        (directory / "tokenizer_config.json").write_text(text, encoding="utf-8")


class GGUFModel(GGUFFile):
    """A validated GGUF file of a supported decoder: HF config, HF-named tensors and tokenizer, read on demand.

    Raises:
        NibbleError: everything :class:`GGUFFile` rejects, an architecture other than llama/qwen2/qwen3,
            missing metadata, missing/unknown/misshapen tensors, or a tensor type the gguf package cannot
            dequantize -- all found when the file is opened, before anything is written.
    """

    def __init__(self, path: str | Path):
        super().__init__(path)
        if self.architecture not in ARCHITECTURES:
            raise NibbleError(
                f"{self.path}: architecture '{self.architecture}' is not supported; "
                f"nibble converts {', '.join(ARCHITECTURES)} GGUF files"
            )
        self._plan = self._plan_tensors()

    @cached_property
    def config(self) -> dict[str, Any]:
        """The model's HF ``config.json`` as a dict (LlamaConfig / Qwen2Config / Qwen3Config fields)."""
        arch = self.architecture
        hidden = int(self.meta("{arch}.embedding_length"))
        heads = int(self.meta("{arch}.attention.head_count"))
        kv_heads = int(self.meta("{arch}.attention.head_count_kv", heads))
        head_dim = int(self.meta("{arch}.attention.key_length", hidden // heads))
        value_dim = int(self.meta("{arch}.attention.value_length", head_dim))
        rotary_dim = int(self.meta("{arch}.rope.dimension_count", head_dim))
        if value_dim != head_dim or rotary_dim != head_dim:
            raise NibbleError(
                f"{self.path}: key/value/rotary head sizes {head_dim}/{value_dim}/{rotary_dim} differ, "
                "which llama/qwen models do not support"
            )
        vocab = int(self._tensor("token_embd.weight").shape[1])
        theta = _decimal(self.meta("{arch}.rope.freq_base", 10000.0))
        config: dict[str, Any] = {
            "architectures": [_HF_CLASSES[arch]],
            "model_type": arch,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": int(self.meta("{arch}.feed_forward_length")),
            "num_hidden_layers": int(self.meta("{arch}.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": int(self.meta("{arch}.context_length")),
            "rms_norm_eps": _decimal(self.meta("{arch}.attention.layer_norm_rms_epsilon")),
            "hidden_act": "silu",
            "tie_word_embeddings": "output.weight" not in self._tensors_by_name,
            "dtype": "float32",
        }
        if arch in ("llama", "qwen3"):
            config["attention_bias"] = "blk.0.attn_q.bias" in self._tensors_by_name
        if arch == "llama":
            config["mlp_bias"] = False
        if arch == "qwen2":
            # Qwen2Config has no head_dim: it is always hidden_size / num_attention_heads
            if head_dim * heads != hidden:
                raise NibbleError(f"{self.path}: qwen2 heads of size {head_dim} do not tile hidden size {hidden}")
            del config["head_dim"]
            config["use_sliding_window"] = False
        config.update(rope_config_keys(theta, self._rope_scaling(theta, head_dim) or None))
        for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
            token_id = self.meta(f"tokenizer.ggml.{key}", None)
            if token_id is not None:
                config[f"{name}_token_id"] = int(token_id)
        return config

    def _rope_scaling(self, theta: float, head_dim: int) -> dict[str, Any]:
        """RoPE scaling as transformers' ``rope_scaling`` object (empty for plain RoPE)."""
        kind = self.meta("{arch}.rope.scaling.type", "none")
        if "rope_freqs.weight" in self._tensors_by_name:  # llama.cpp's form of Llama 3 (3.1, 3.2, ...) scaling
            stored = self._tensor("rope_freqs.weight")
            factors = gguf.quants.dequantize(stored.data, stored.tensor_type).astype(np.float64).reshape(-1)
            original = int(self.meta("{arch}.rope.scaling.original_context_length", 8192))
            params = _llama3_rope(factors, theta, head_dim, original)
            if params is None:
                raise NibbleError(
                    f"{self.path}: tensor 'rope_freqs.weight' holds RoPE factors that do not follow Llama 3's "
                    "scaling rule, which is the only per-frequency scaling nibble converts"
                )
            return params
        if kind == "none":
            return {}
        if kind == "linear":
            return {"rope_type": "linear", "factor": _decimal(self.meta("{arch}.rope.scaling.factor"))}
        raise NibbleError(f"{self.path}: RoPE scaling type '{kind}' is not supported (none and linear are)")

    # -- tensors ----------------------------------------------------------------------------------

    @cached_property
    def _tensors_by_name(self) -> dict[str, Any]:
        return {t.name: t for t in self.reader.tensors}

    def _tensor(self, name: str):
        tensor = self._tensors_by_name.get(name)
        if tensor is None:
            raise NibbleError(f"{self.path}: missing tensor '{name}'; the file is incomplete")
        return tensor

    def _plan_tensors(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """HF name -> (GGUF name, torch shape) for every tensor, checked against the config."""
        config = self.config
        layers, hidden = config["num_hidden_layers"], config["hidden_size"]
        head_dim = config.get("head_dim", hidden // config["num_attention_heads"])
        q_rows, kv_rows = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
        inter, vocab = config["intermediate_size"], config["vocab_size"]
        expected = {
            "token_embd.weight": (vocab, hidden),
            "output_norm.weight": (hidden,),
        }
        if not config["tie_word_embeddings"]:
            expected["output.weight"] = (vocab, hidden)
        block = {
            "attn_norm.weight": (hidden,),
            "ffn_norm.weight": (hidden,),
            "attn_q.weight": (q_rows, hidden),
            "attn_k.weight": (kv_rows, hidden),
            "attn_v.weight": (kv_rows, hidden),
            "attn_output.weight": (hidden, q_rows),
            "ffn_gate.weight": (inter, hidden),
            "ffn_up.weight": (inter, hidden),
            "ffn_down.weight": (hidden, inter),
        }
        if self.architecture == "qwen2" or config.get("attention_bias"):
            block.update({"attn_q.bias": (q_rows,), "attn_k.bias": (kv_rows,), "attn_v.bias": (kv_rows,)})
        if self.architecture == "llama" and config.get("attention_bias"):
            block["attn_output.bias"] = (hidden,)
        if self.architecture == "qwen3":
            block.update({"attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,)})
        for i in range(layers):
            expected.update({f"blk.{i}.{name}": shape for name, shape in block.items()})

        for name in self._tensors_by_name:
            if name not in expected and name != "rope_freqs.weight":  # read into the config, not a weight
                raise NibbleError(
                    f"{self.path}: unexpected tensor '{name}' for a {layers}-layer {self.architecture} model; "
                    "the file's metadata and tensors disagree or it holds parts nibble does not support"
                )
        plan: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name, shape in expected.items():
            tensor = self._tensor(name)
            actual = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            if actual != shape:
                raise NibbleError(f"{self.path}: tensor '{name}' has shape {list(actual)}, expected {list(shape)}")
            _check_dequantizable(self.path, tensor)
            plan[_hf_name(name)] = (name, shape)
        return plan

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> torch shape of every tensor the model has, known without reading tensor data."""
        return {hf: shape for hf, (_, shape) in self._plan.items()}

    def tensor(self, hf_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor by HF name, dequantized to fp32 (then cast to ``dtype``), q/k rows back in HF order."""
        name, shape = self._plan[hf_name]
        gguf_tensor = self._tensor(name)
        values = gguf.quants.dequantize(gguf_tensor.data, gguf_tensor.tensor_type)
        # F32 data comes back as a view of the read-only file map: copy only then
        weight = torch.from_numpy(np.require(values, np.float32, ["C", "W"])).reshape(shape)
        if self._permuted(name):
            weight = unpermute_rotary(weight, self._rotary_heads(name))
        return weight.to(dtype)

    def quantized(self, hf_name: str) -> GGUFWeight:
        """A 2-D weight by HF name in the file's own block type (q/k rows back in HF order; no value changes).

        Raises:
            NibbleError: a tensor stored in a type nibble does not keep as it is (see ``NATIVE_TYPES``).
        """
        name, shape = self._plan[hf_name]
        gguf_tensor = self._tensor(name)
        kind = gguf_tensor.tensor_type.name
        if kind not in NATIVE_TYPES:
            raise NibbleError(
                f"{self.path}: tensor '{name}' is {kind}, which a GGUF-native base cannot keep (it keeps "
                f"{', '.join(NATIVE_TYPES)}); use --quant-format nf4 or int4 for this file"
            )
        data = np.ascontiguousarray(gguf_tensor.data).view(np.uint8).reshape(shape[0], -1)
        weight = GGUFWeight(torch.from_numpy(data.copy()), kind, shape[1])
        if self._permuted(name):
            rows = torch.arange(shape[0]).unsqueeze(1)
            weight = weight.select_rows(unpermute_rotary(rows, self._rotary_heads(name))[:, 0])
        return weight

    def projection_bytes(self) -> int:
        """Bytes the file stores the seven block projections' weights in (what a GGUF-native base holds)."""
        names = [n for n, (g, _) in self._plan.items() if _PROJECTION.fullmatch(g)]
        return sum(int(self._tensor(self._plan[n][0]).n_bytes) for n in names)

    def tensor_type(self, hf_name: str) -> str:
        """The ggml type name (``Q4_K``, ``F32``, ...) the file stores tensor ``hf_name`` in."""
        return self._tensor(self._plan[hf_name][0]).tensor_type.name

    def _permuted(self, name: str) -> bool:
        """Whether llama.cpp stores this tensor's rows in its rotary order (llama q/k weights and biases)."""
        return self.architecture == "llama" and re.fullmatch(r"blk\.\d+\.attn_[qk]\.(weight|bias)", name) is not None

    def _rotary_heads(self, name: str) -> int:
        return self.config["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"]

    def checkpoint(self) -> GGUFCheckpoint:
        """The tensors as a checkpoint :func:`nibble.model.load_model` reads (see :class:`GGUFCheckpoint`)."""
        return GGUFCheckpoint(self)

    def tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """``(hf_name, tensor)`` for every tensor, one at a time (drop each before asking for the next)."""
        for hf_name in self._plan:
            yield hf_name, self.tensor(hf_name, dtype)


class GGUFCheckpoint(Checkpoint):
    """A GGUF model's tensors under their HF names, read the way a safetensors ``Checkpoint`` is read: each
    as fp32 (dequantized), or a 2-D weight in its own blocks with :meth:`quantized`."""

    def __init__(self, model: GGUFModel):
        super().__init__([], model.path)
        self.model = model
        self._infos = {
            name: TensorInfo(name, "F32", shape, 0, 0, model.path) for name, shape in model.tensor_shapes().items()
        }

    def get_tensor(
        self, name: str, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> torch.Tensor:
        self.info(name)
        tensor = self.model.tensor(name, dtype or torch.float32)
        return tensor if device is None else tensor.to(device)

    def items_stream(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._infos:
            yield name, self.get_tensor(name, dtype)

    def quantized(self, name: str) -> GGUFWeight:
        """The 2-D weight ``name`` in the file's own blocks (see :meth:`GGUFModel.quantized`)."""
        self.info(name)
        return self.model.quantized(name)


def llama3_rope_factors(theta: float, head_dim: int, params: dict[str, Any]) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores for Llama 3 RoPE scaling (``rope_freqs``): 1 for short
    wavelengths, ``factor`` for long ones, and a smooth blend in between."""
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelength = 2 * math.pi / inv_freq
    ratio = params["original_max_position_embeddings"] / wavelength
    low, high, factor = params["low_freq_factor"], params["high_freq_factor"], params["factor"]
    smooth = np.clip((ratio - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1.0 - smooth) / factor + smooth)


def _llama3_rope(factors: np.ndarray, theta: float, head_dim: int, original: int) -> dict[str, Any] | None:
    """Recover Llama 3 scaling parameters from stored RoPE factors, or None when they follow another rule.

    The factors depend on the parameters only through ``original / low_freq_factor`` and
    ``original / high_freq_factor``, so ``original`` (8192 unless the file says) fixes the scale. In the
    blend band ``1 / factor_i`` is linear in ``original / wavelength_i``; two or more band points give the
    line, fewer leave Llama 3's own defaults to be checked.
    """
    if factors.shape != (head_dim // 2,) or not np.all(factors >= 1.0):
        return None
    factor = float(factors.max())
    if factor == 1.0:
        return None
    params = {"rope_type": "llama3", "factor": _decimal(factor), "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    params["original_max_position_embeddings"] = original
    ratio = original * (theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)) / (2 * math.pi)
    band = (factors > 1.0 + 1e-6) & (factors < factor * (1 - 1e-6))
    if band.sum() >= 2:
        # smooth = (ratio - low) / (high - low), read back from 1 / f = (1 - smooth) / factor + smooth
        smooth = (1.0 / factors[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(ratio[band], smooth, 1)
        low = -intercept / slope
        params["low_freq_factor"] = float(f"{low:.6g}")
        params["high_freq_factor"] = float(f"{low + 1.0 / slope:.6g}")
    rebuilt = llama3_rope_factors(theta, head_dim, params)
    return params if np.allclose(rebuilt, factors, rtol=1e-4, atol=0) else None


# The type of every metadata value nibble reads, by the end of its key.
_META_KINDS = {
    "_token_id": "id",
    "context_length": "size",
    "embedding_length": "size",
    "head_count": "size",
    "head_count_kv": "size",
    "key_length": "size",
    "value_length": "size",
    "dimension_count": "size",
    "feed_forward_length": "size",
    "block_count": "size",
    "freq_base": "number",
    "layer_norm_rms_epsilon": "number",
    "scaling.factor": "number",
    "add_bos_token": "bool",
    "add_eos_token": "bool",
    "ggml.tokens": "strings",
    "ggml.merges": "strings",
    "ggml.token_type": "ints",
    "ggml.scores": "numbers",
    "architecture": "str",
    "ggml.model": "str",
    "ggml.pre": "str",
    "chat_template": "str",
    "scaling.type": "str",
}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_META_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "id": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer"),
    "number": (lambda v: _is_number(v) and v > 0, "a finite positive number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "strings": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "ints": (lambda v: isinstance(v, list) and all(type(x) is int for x in v), "a list of integers"),
    "numbers": (lambda v: isinstance(v, list) and all(_is_number(x) for x in v), "a list of finite numbers"),
}


def _checked_meta(path: Path, key: str, value: Any) -> Any:
    """``value`` when it has the type nibble expects for ``key``, else a NibbleError naming the key."""
    kind = next((kind for end, kind in _META_KINDS.items() if key.endswith(end)), None)
    if kind is not None:
        ok, want = _META_CHECKS[kind]
        if not ok(value):
            raise NibbleError(f"{path}: metadata key '{key}' must be {want}, got {repr(value)[:60]}")
    return value


def _decimal(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-06, not 9.99999997e-07):
    the value the model's own config had before it was stored in 32 bits."""
    return float(str(np.float32(value)))


def _split_merge(path: Path, merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep or not left or not right:
        raise NibbleError(f"{path}: malformed merge {merge!r} in 'tokenizer.ggml.merges'")
    return left, right


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: every split of a token into two vocabulary
    pieces, best token score first, then longer left piece, then longer right piece; ties keep
    token order, and the splits of one token are ordered by the ids of their pieces."""
    index = {token: i for i, token in enumerate(tokens)}
    score = dict(zip(tokens, scores, strict=True))
    candidates = []
    for token, token_score in score.items():
        splits = [(token[:k], token[k:]) for k in range(1, len(token))]
        splits = sorted(
            (p for p in splits if p[0] in index and p[1] in index), key=lambda p: (index[p[0]], index[p[1]])
        )
        candidates.extend((left, right, token_score) for left, right in splits)
    candidates.sort(key=lambda c: (-c[2], -len(c[0]), -len(c[1])))
    return [(left, right) for left, right, _ in candidates]


def gguf_name(hf_name: str) -> str:
    """The GGUF name of an HF tensor name (``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``).

    Raises:
        NibbleError: a tensor llama.cpp's decoders have no place for.
    """
    for gguf_key, hf_key in _GLOBAL_TENSORS.items():
        if hf_name == hf_key:
            return gguf_key
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    parts = {hf: g for g, hf in _BLOCK_TENSORS.items()}
    if match is None or match.group(2) not in parts:
        raise NibbleError(f"tensor '{hf_name}' has no GGUF name (llama.cpp's llama/qwen2/qwen3 models have none)")
    layer, part, kind = match.groups()
    return f"blk.{layer}.{parts[part]}.{kind}"


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_NAME.fullmatch(gguf_name)
    assert match is not None  # names were checked against the expected set
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_TENSORS[part]}.{kind}"


def unpermute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, rows ``[a0, b0, a1, b1, ...]`` back to ``[a0, a1, .., b0, b1, ..]``
    (``a``/``b`` the first/second rotary half)."""
    rows = weight.shape[0]
    # [heads * head_dim, ...] -> [heads, head_dim / 2, 2, ...] -> swap the last two row axes
    grouped = weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
    return grouped.transpose(1, 2).reshape(weight.shape).contiguous()


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order from HF's (the inverse of :func:`unpermute_rotary`): per head, the two rotary
    halves interleaved row by row."""
    rows = weight.shape[0]
    # [heads * head_dim, ...] -> [heads, 2, head_dim / 2, ...] -> swap the two row axes
    grouped = weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
    return grouped.transpose(1, 2).reshape(weight.shape).contiguous()


def _check_dequantizable(path: Path, tensor) -> None:
    """Fail before any output is written when the gguf package cannot dequantize this tensor's type."""
    first_row = np.ascontiguousarray(tensor.data.reshape(-1, tensor.data.shape[-1])[:1])
    try:
        gguf.quants.dequantize(first_row, tensor.tensor_type)
    except NotImplementedError:
        raise NibbleError(
            f"{path}: tensor '{tensor.name}' is stored as {tensor.tensor_type.name}, which the gguf package "
            "cannot dequantize; convert a file with F32/F16/BF16/Q4_0/Q4_1/Q5_*/Q8_0/K-quant tensors"
        ) from None


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def _open_reader(path: Path) -> GGUFContents:
    """The parsed file (fields and tensors, as ``gguf.GGUFReader`` gives them), or a NibbleError naming it."""
    if not path.exists():
        raise NibbleError(f"{path}: no such file")
    if not path.is_file():
        raise NibbleError(f"{path}: not a file; pass the path of a .gguf file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise NibbleError(f"{path}: cannot read ({exc.strerror})") from None
    if magic != _GGUF_MAGIC:
        raise NibbleError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    # memory-maps the file and views every tensor; every size is checked against the file first
    return read_gguf(path)


def open_gguf(path: str | Path) -> GGUFModel:
    """Open and validate a GGUF model file (see :class:`GGUFModel`)."""
    return GGUFModel(path)


def _source_record(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def native_model(path: str | Path) -> GGUFModel:
    """The GGUF file whose own blocks a GGUF-native base keeps (see :func:`gguf_source`), opened.

    Raises:
        NibbleError: anything :func:`gguf_source` or :func:`open_gguf` rejects.
    """
    return open_gguf(gguf_source(path))


def gguf_source(path: str | Path) -> Path:
    """``path`` itself (a file), or the .gguf file the directory ``path`` was converted from (recorded in its
    ``gguf_source.json``), checked to be unchanged since.

    Raises:
        NibbleError: a directory that was not converted from a GGUF file, or a source file that is gone or
            changed.
    """
    path = Path(path)
    if path.is_dir():
        marker = path / SOURCE_NAME
        if not marker.is_file():
            raise NibbleError(
                f"{path}: not converted from a .gguf file, so it has no GGUF blocks to keep; pass the .gguf file "
                "as --model, or use --quant-format nf4 or int4"
            )
        record = read_json_object(marker, "convert the .gguf file again")
        source = Path(str(record.get("path", "")))
        if not source.is_file():
            raise NibbleError(f"{marker}: the GGUF file it was converted from, {source}, is gone; pass it as --model")
        if _source_record(source) != record:
            raise NibbleError(
                f"{source}: changed since {path} was converted from it; pass the .gguf file itself as --model"
            )
        path = source
    return path


def _write_safetensors(
    path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, produce: Callable[[str], torch.Tensor]
) -> None:
    """Write one safetensors file whose tensors are produced one at a time: the header is built from the
    known shapes first, so peak memory is a single tensor rather than the whole model."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name, shape in shapes.items():
            tensor = produce(name)
            assert tensor.shape == shape and tensor.dtype == dtype
            f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


def convert_gguf(
    path: str | Path,
    output: str | Path,
    dtype: torch.dtype | str = torch.float32,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Convert a GGUF file into an HF model directory: config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json (with the chat template), and ``gguf_source.json`` naming the file it came from.

    The directory is built under a temporary name beside ``output`` and renamed into place at the end,
    so ``output`` is either absent, the old directory (with ``overwrite``) or the complete conversion.

    Args:
        path: the .gguf file.
        output: the directory to create; it must not exist (or be empty) unless ``overwrite``.
        dtype: weight dtype in model.safetensors: float32 (exact), bfloat16 or float16.
        overwrite: replace an existing ``output`` directory.
        log: called with one line per step.

    Raises:
        NibbleError: anything :class:`GGUFModel` rejects, an unknown dtype, or an ``output`` that exists.
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise NibbleError(f"dtype '{dtype}' is not supported; use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype not in _SAFETENSORS_DTYPES:
        raise NibbleError(f"dtype {dtype} is not supported; use one of {', '.join(_DTYPES)}")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise NibbleError(f"{output}: is a file, not a directory; choose another output path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise NibbleError(f"{output}: already exists; choose another output directory or pass --overwrite")

    model = open_gguf(path)
    say = log or (lambda line: None)
    with staged_dir(output, overwrite=overwrite) as staging:
        config = {**model.config, "dtype": str(dtype).removeprefix("torch.")}
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        shapes = model.tensor_shapes()
        say(f"writing {len(shapes)} tensors ({sum(math.prod(s) for s in shapes.values()) / 1e6:.1f}M parameters)")
        _write_safetensors(staging / "model.safetensors", shapes, dtype, lambda name: model.tensor(name, dtype))
        say("writing the tokenizer")
        model.save_tokenizer(staging)
        write_json(staging / SOURCE_NAME, _source_record(model.path))
    return output
