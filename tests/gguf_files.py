"""Synthetic GGUF files for tests: tiny transformers models written the way llama.cpp lays them out.

q/k rows of llama models are reordered, dimensions are fastest-first, and weights are stored in a mix of
quantized block types, with a small byte-level BPE tokenizer and a ChatML template in the metadata.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import helpers

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3 RoPE scaling (llama.cpp stores it as a rope_freqs tensor)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=1024,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine; the early bird catches the worm",
    "naïve café déjà vu — Grüße aus Köln 東京 🙂",
    "    indented lines\nand new lines\r\n\tand tabs, 12345 numbers",
    "<think>reasoning</think> we're done, aren't we? I'LL see",
] * 10
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# GGUF name of each HF block tensor (relative to model.layers.N.)
_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# how each kind of tensor is stored: a mix of every type the round trip should cover
_STORAGE = {
    "token_embd": Q.F16,
    "output": Q.Q8_0,
    "attn_q": Q.Q8_0,
    "attn_k": Q.Q4_0,
    "attn_v": Q.Q4_1,
    "attn_output": Q.F16,
    "ffn_gate": Q.BF16,
    "ffn_up": Q.Q8_0,
    "ffn_down": Q.Q5_1,
}


@cache
def byte_level_bpe() -> Tokenizer:
    """A small byte-level BPE (GPT-2 style) trained on a fixed corpus; the specials come first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"


def interleave_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, the two rotary halves interleaved row by row."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """What llama.cpp's converter stores as ``rope_freqs`` for a Llama 3 scaled RoPE (one value per pair)."""
    low_wavelength = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high_wavelength = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * np.pi * rope["rope_theta"] ** (i / head_dim)
        if wavelength < high_wavelength:
            factors.append(1.0)
        elif wavelength > low_wavelength:
            factors.append(rope["factor"])
        else:
            ratio = rope["original_max_position_embeddings"] / wavelength
            smooth = (ratio - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def stored(hf_name: str, weight: torch.Tensor) -> tuple[Q, np.ndarray]:
    """The ggml type a synthetic file stores ``hf_name`` in, and the values it will hold (after rounding)."""
    kind = gguf_name(hf_name).split(".")[-2]
    qtype = _STORAGE.get(kind, Q.F32) if weight.ndim == 2 else Q.F32
    array = weight.detach().numpy().astype(np.float32)
    return qtype, gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype).reshape(array.shape)


def write_gguf(path: Path, model, *, arch: str | None = None, pre: str = "gpt-2", skip: str | None = None) -> Path:
    """Write ``model`` (a transformers CausalLM) as a GGUF file as llama.cpp would, with the test tokenizer."""
    config = model.config
    arch = arch or config.model_type
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("synthetic test model")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = config.rope_parameters
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)

    tok = byte_level_bpe()
    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    merges = [" ".join(pair) for pair in json.loads(tok.to_str())["model"]["merges"]]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.USER_DEFINED] * 2
    types += [gguf.TokenType.NORMAL] * (len(tokens) - len(types))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    for hf_name, weight in model.state_dict().items():
        name = gguf_name(hf_name)
        if name == skip or (hf_name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        qtype, _ = stored(hf_name, weight)
        array = weight.detach().numpy().astype(np.float32)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            array = interleave_rotary(array, heads)
        data = gguf.quants.quantize(array, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_model(model_type: str, **overrides):
    vocab = byte_level_bpe().get_vocab_size()
    return helpers.make_hf_model(
        model_type, vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides
    )


def save_tiny(path: Path, model) -> Path:
    """Save a :func:`tiny_model` as an HF directory with the test BPE tokenizer and a ChatML template."""
    path = Path(path)
    model.save_pretrained(path)
    byte_level_bpe().save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path


def write_sentencepiece_gguf(path: Path, with_merges: bool) -> Path:
    """A llama-type (SentencePiece BPE, byte fallback) vocabulary: <unk> <s> </s>, 256 byte tokens, pieces."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, show_progress=False)
    trained.train_from_iterator(CORPUS, trainer)
    pieces = sorted(trained.get_vocab().items(), key=lambda kv: kv[1])
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = specials + byte_tokens + [p for p, _ in pieces]
    # SentencePiece scores: higher is merged earlier; later pieces score lower
    scores = [0.0] * (3 + 256) + [-float(i // 4) for i in range(len(pieces))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(pieces)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if with_merges:
        writer.add_token_merges([" ".join(m) for m in json.loads(trained.to_str())["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
