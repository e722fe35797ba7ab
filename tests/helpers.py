"""Tiny random Hugging Face checkpoints (Qwen3, Qwen2, Llama, Qwen3.5) and a byte-level tokenizer, for tests.

Every test that needs a model builds one here with transformers and saves it to a temporary directory,
so nibble is always compared against the real library and never against a downloaded file.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

# Small enough to build in milliseconds; hidden 64 keeps every projection's row length >= the NF4
# blocksize 64 (bitsandbytes' CPU dequantize is wrong for rows shorter than the blocksize).
TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
# Qwen3-MoE on top of TINY: 4 experts, 2 per token, each expert's projections whole NF4 blocks.
TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True)
# Qwen3.5 ("qwen3_5_text"): three layers, the middle one full attention; DeltaNet with 2 key heads shared by
# 4 value heads of 16; partial RoPE on 8 of 32 channels, with the mRoPE sections real checkpoints carry.
QWEN35 = dict(
    num_hidden_layers=3,
    head_dim=32,
    layer_types=["linear_attention", "full_attention", "linear_attention"],
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    },  # fmt: skip
)
# Qwen3.5-MoE and Qwen3-Next: the QWEN35 layers with TINY_MOE's experts and a shared expert of 32.
HYBRID_MOE = dict(shared_expert_intermediate_size=32)
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258


def hf_config(model_type: str = "qwen3", **overrides: Any):
    """A transformers config of ``model_type`` (qwen3, qwen3_moe, qwen2, llama, mistral, qwen3_5_text,
    qwen3_5_moe_text, qwen3_next) with TINY sizes (and TINY_MOE's experts, HYBRID_MOE's shared expert).

    Qwen3 gets ``head_dim=32`` (so q_dim 128 != hidden 64, as in real Qwen3 models), Qwen3.5 the QWEN35
    layout; pad/bos/eos are the ids of :func:`write_tokenizer`'s special tokens. ``overrides`` win over
    everything.
    """
    from transformers import AutoConfig

    kwargs: dict[str, Any] = dict(TINY, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if model_type in ("qwen3", "qwen3_moe"):
        kwargs["head_dim"] = 32
    if model_type in ("qwen3_moe", "qwen3_next", "qwen3_5_moe_text"):
        kwargs.update(TINY_MOE)
    if model_type in ("qwen3_5_text", "qwen3_next", "qwen3_5_moe_text"):
        kwargs.update(copy.deepcopy(QWEN35))
    if model_type in ("qwen3_next", "qwen3_5_moe_text"):
        kwargs.update(HYBRID_MOE)
    if model_type == "qwen3_5_moe_text":
        del kwargs["norm_topk_prob"]  # always on; not a key of its config
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def make_hf_model(
    model_type: str = "qwen3",
    *,
    num_labels: int | None = None,
    seed: int = 0,
    init_std: float | None = 0.1,
    **overrides: Any,
):
    """A random transformers model in fp32, eval mode: ``*ForCausalLM``, or ``*ForSequenceClassification``
    when ``num_labels`` is given.

    ``init_std`` re-draws every parameter (norm weights included, around 1) with that standard deviation,
    so differences between implementations show up in the logits instead of hiding under tiny weights.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = hf_config(model_type, **overrides)
    torch.manual_seed(seed)
    if num_labels is None:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        config.num_labels = num_labels
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    if init_std is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=gen) * init_std
                p.copy_(1.0 + noise if "norm" in name else noise)
    return model.eval()


def save_hf_model(model, path: str | Path, *, max_shard_size: str | None = None, tokenizer: bool = True) -> Path:
    """Save ``model`` as safetensors (sharded when ``max_shard_size`` is set, e.g. ``"20KB"``) plus a tokenizer."""
    path = Path(path)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        write_tokenizer(path)
    return path


def make_hf_checkpoint(
    path: str | Path,
    model_type: str = "qwen3",
    *,
    num_labels: int | None = None,
    seed: int = 0,
    max_shard_size: str | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
    **overrides: Any,
):
    """Build a random model (see :func:`make_hf_model`), save it to ``path`` in ``dtype``; return ``(path, model)``.

    The returned model is fp32; when ``dtype`` is fp16/bf16 its weights are rounded to that dtype first,
    so it matches what was written.
    """
    model = make_hf_model(model_type, num_labels=num_labels, seed=seed, **overrides)
    if dtype != torch.float32:
        save_hf_model(copy.deepcopy(model).to(dtype), path, max_shard_size=max_shard_size, tokenizer=tokenizer)
        with torch.no_grad():  # round the parameters only: buffers such as RoPE frequencies stay fp32
            for p in model.parameters():
                p.copy_(p.to(dtype).float())
    else:
        save_hf_model(model, path, max_shard_size=max_shard_size, tokenizer=tokenizer)
    return Path(path), model


def plan_opts(model_config, *, num_labels: int | None = None, device: str = "cpu", **fields: Any):
    """The memory planner's options for a run of ``TrainConfig(**fields)`` (dtype float32 unless given), built the
    one way a run builds them (``nibble.train.planning.plan_options``)."""
    from nibble.train.config import TrainConfig
    from nibble.train.planning import plan_options

    config = TrainConfig(**{"dtype": "float32", **fields})
    return plan_options(config, model_config, num_labels=num_labels, device=torch.device(device))


def save_fused_experts(path: str | Path) -> Path:
    """Rewrite the checkpoint at ``path`` with transformers' in-memory tensor names: each layer's experts fused as
    ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I] (``save_pretrained`` writes them per
    expert)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for old in path.glob("model*.safetensors*"):
        old.unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors", {"format": "pt"})
    return path


def make_qwen35_multimodal_checkpoint(path: str | Path, seed: int = 0):
    """A random ``Qwen3_5ForConditionalGeneration`` (QWEN35 decoder, a one-block vision tower) saved to ``path``
    with two ``mtp.*`` tensors added to its file, as published checkpoints carry; returns ``(path, model)``."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = hf_config("qwen3_5_text").to_dict()
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TINY["hidden_size"])
    config = Qwen3_5Config(text_config=text, vision_config=vision)
    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1.0 + noise if "norm" in name else noise)
    path = save_hf_model(model, path)
    tensors = load_file(path / "model.safetensors")
    tensors["mtp.fc.weight"] = torch.randn(TINY["hidden_size"], 2 * TINY["hidden_size"], generator=gen)
    tensors["mtp.norm.weight"] = torch.ones(TINY["hidden_size"])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path, model


def write_word_rows(path: str | Path, words: dict[str, list[str]], n: int, seed: int, length: int = 3) -> Path:
    """A JSONL classification file of ``n`` rows: each label's text is ``length`` words drawn from its list."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(words))
        rows.append({"text": " ".join(rng.choice(words[label]) for _ in range(length)), "label": label})
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_tokenizer(path: str | Path, chat_template: str | None = None) -> Path:
    """Write a byte-level tokenizer (256 byte tokens, no merges, then <pad> 256, <bos> 257, <eos> 258).

    Files: tokenizer.json and tokenizer_config.json (loadable by ``AutoTokenizer.from_pretrained``).
    Every UTF-8 text round-trips; one token per byte.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(path / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "model_max_length": TINY["max_position_embeddings"],
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path


def _byte_of(ch: str) -> int:
    """The byte that GPT-2's byte-level alphabet maps to character ``ch``."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    if ord(ch) in printable:
        return ord(ch)
    others = [b for b in range(256) if b not in printable]
    return others[ord(ch) - 256]


def right_padded_batch(lengths: list[int], vocab: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``input_ids`` [B, max(lengths)] right-padded with PAD_ID, and the matching attention mask."""
    gen = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.full((len(lengths), t), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(0, vocab, (n,), generator=gen)
        mask[row, :n] = 1
    return ids, mask


def write_jsonl(path: str | Path, rows) -> Path:
    """``rows`` (JSON-serializable objects) as a .jsonl file, one per line."""
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def label_task(data, loss_fn=None, evaluate=None, forward=None):
    """A TaskRun over ``data`` for tests that drive the Trainer directly: ``loss_fn(outputs, labels)`` (default: the
    cross-entropy of single-label classification), ``evaluate(model)``, ``forward(model, batch)``."""
    from nibble.train.metrics import classification_loss
    from nibble.train.tasks import TaskRun

    loss_fn = loss_fn or (lambda logits, labels: classification_loss(logits, labels, False))
    return TaskRun(
        train=data,
        val=None,
        loss=lambda outputs, batch: (loss_fn(outputs, batch["labels"]), {}),
        evaluate=None if evaluate is None else lambda model, batch_size: evaluate(model),
        forward=forward,
        summary="",
    )


def killed_writer(directory, name: str, kind: str = "staged_dir"):
    """Start a process that begins writing ``directory/name`` (a staged directory or an atomic file), SIGKILL
    it half-way, and return the temporaries it left."""
    import signal
    import subprocess
    import sys

    code = (
        "import sys, time; from nibble.io.files import staged_dir, atomic_file\n"
        f"with {kind}(sys.argv[1]) as tmp:\n"
        "    (tmp / 'half' if tmp.is_dir() else tmp).write_text('half'); print('ready', flush=True); time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code, str(directory / name)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "ready\n"
    process.send_signal(signal.SIGKILL)
    process.wait()
    return [p.name for p in directory.iterdir() if ".tmp-" in p.name]


def adapted(path: str | Path):
    """The checkpoint at ``path`` with LoRA (rank 4) on every linear layer, B drawn non-zero (seed 0) so the
    adapters change what the model computes and samples."""
    import nibble
    from nibble.nn import apply_lora
    from nibble.nn.lora import lora_layers

    model = nibble.load_model(path)
    apply_lora(model, "all-linear", rank=4, alpha=8.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.2)
    return model
