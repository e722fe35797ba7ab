"""Token-by-token generation with a KV cache: greedy, or sampled with temperature / top-k / top-p.

:func:`generate` works on token ids; :func:`generate_text` on text (chat template, streaming text out),
with :func:`load_generator` to build the model (and adapter) and tokenizer from paths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nibble.errors import NibbleError
from nibble.model.model import DecoderModel
from nibble.nn.quant_linear import cache_budget_bytes, cache_dense_weights
from nibble.quant import QuantSpec

if TYPE_CHECKING:
    from nibble.io.tokenizer import Tokenizer


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick one token from ``logits`` [V]: argmax at temperature 0, else sample the filtered softmax (on the
    ``generator``'s device, so a seed picks the same tokens whatever device computed the logits)."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top token always stays).
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    if generator is not None:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(
    model: DecoderModel,
    input_ids: torch.Tensor | Sequence[int],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Continue ``input_ids`` ([1, T] or a list of ids); return the new tokens only.

    Stops after ``max_new_tokens`` or at an end-of-sequence token (included in the result).
    ``eos_token_id`` None means the model config's eos ids; pass ``[]`` to never stop early.
    ``on_token(id)`` is called as each token is chosen (for streaming).

    Raises:
        NibbleError: a classify model, an empty prompt, or more than one sequence.
    """
    if model.task != "causal_lm":
        raise NibbleError("generate needs a causal_lm model (load it with task='causal_lm')")
    device = model.model.embed_tokens.weight.device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise NibbleError(f"generate takes one non-empty sequence ([1, T] or a list); got shape {tuple(ids.shape)}")
    if eos_token_id is None:
        stop = set(model.config.eos_token_ids)
    else:
        stop = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    cache = model.new_cache(1, ids.shape[1] + max_new_tokens)
    out: list[int] = []
    for _ in range(max_new_tokens):
        hidden = model.hidden_states(ids, cache=cache)[:, -1]  # [1, H]: only the last position needs logits
        token = sample_next(model.lm_head(hidden)[0], temperature, top_k, top_p, generator)
        out.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop:
            break
        ids = torch.tensor([[token]], dtype=torch.long, device=device)
    return out


def prompt_ids(
    tokenizer: Tokenizer,
    prompt: str,
    *,
    chat: bool | None = None,
    system: str | None = None,
    thinking: bool | None = None,
) -> list[int]:
    """Token ids of ``prompt``: a user turn rendered with the chat template (plus the assistant's opening) when
    ``chat`` (default: when the tokenizer has a template), else the plain text with the tokenizer's own
    special tokens. ``thinking`` reaches the template as ``enable_thinking`` (None: the template's default).

    Raises:
        NibbleError: ``chat=True`` for a tokenizer without a chat template, or an empty prompt.
    """
    use_chat = tokenizer.chat_template is not None if chat is None else chat
    if use_chat:
        messages = [{"role": "system", "content": system}] if system is not None else []
        switch = {} if thinking is None else {"enable_thinking": thinking}
        text = tokenizer.apply_chat_template([*messages, {"role": "user", "content": prompt}], True, **switch)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        if system is not None or thinking is not None:
            flag = "--system" if system is not None else "--thinking"
            raise NibbleError(f"{flag} needs the chat template; drop {flag} or --no-chat")
        ids = tokenizer.encode(prompt)
    if not ids:
        raise NibbleError("the prompt is empty; give some text")
    return ids


class TextStream:
    """Turns token ids into text as they arrive: ``push(id)`` returns the text that became final.

    The whole sequence is decoded each time (special tokens skipped) and only the new tail is returned.
    A character split over byte tokens decodes as U+FFFD until its last byte arrives, and an unfinished
    character has at most three bytes, so up to three trailing U+FFFD are held back.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        pending = min(3, len(text) - len(text.rstrip("\ufffd")))
        return self._take(text[: len(text) - pending])

    def flush(self) -> str:
        """Whatever is left (an unfinished character included)."""
        return self._take(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _take(self, text: str) -> str:
        piece = text[self.emitted :]
        self.emitted = max(self.emitted, len(text))
        return piece


def stop_ids(model: DecoderModel, tokenizer: Tokenizer) -> list[int]:
    """The tokens that end generation: the model config's eos ids and the tokenizer's eos token."""
    ids = list(model.config.eos_token_ids)
    if tokenizer.eos_id is not None and tokenizer.eos_id not in ids:
        ids.append(tokenizer.eos_id)
    return ids


def generate_text(
    model: DecoderModel,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    chat: bool | None = None,
    system: str | None = None,
    thinking: bool | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Answer ``prompt`` (see :func:`prompt_ids`) and return the new text; ``on_text`` receives it piece by piece.

    Greedy at temperature 0; otherwise sampled (``seed`` makes it reproducible). Stops at an end-of-sequence
    token (see :func:`stop_ids`), which is not part of the text.
    """
    ids = prompt_ids(tokenizer, prompt, chat=chat, system=system, thinking=thinking)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    stream = TextStream(tokenizer)

    def emit(token: int) -> None:
        piece = stream.push(token)
        if piece and on_text is not None:
            on_text(piece)

    generate(model, ids, max_new_tokens, temperature, top_k, top_p, stop_ids(model, tokenizer), generator, emit)
    rest = stream.flush()
    if rest and on_text is not None:
        on_text(rest)
    return tokenizer.decode(stream.ids, skip_special_tokens=True)


def load_generator(
    model: str | Path,
    adapter: str | Path | None = None,
    *,
    quantize: QuantSpec | str | None = None,
    cache_budget_mb: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    any_base: bool = False,
) -> tuple[DecoderModel, Tokenizer]:
    """A causal LM and its tokenizer from a model directory or .gguf file, optionally with a LoRA adapter.

    With ``adapter`` the base is loaded as the adapter was trained (a QLoRA adapter on its 4-bit base);
    ``quantize`` stores a base without adapter in 4 bits. The model lives on ``device`` and computes in ``dtype``.
    Frozen 4-bit weights keep dense copies within ``cache_budget_mb`` MiB (None: the device's default, see
    :func:`nibble.nn.quant_linear.cache_budget_bytes`; 0: none), which makes each token faster. The tokenizer is
    the adapter's when it has one (it carries the chat template training used), else the model's.

    Raises:
        NibbleError: a bad path, an adapter that is not a CAUSAL_LM adapter or does not fit the base.
    """
    from nibble.io.tokenizer import load_tokenizer
    from nibble.model.adapter import load_adapted
    from nibble.model.loading import load_model, resolve_model_dir

    model_dir = resolve_model_dir(model)
    if adapter is None:
        lm = load_model(model_dir, quantize=quantize, dtype=dtype, device=device)
        source = model_dir
    else:
        if quantize is not None:
            raise NibbleError("--quantize applies to a base without adapter; an adapter's base loads as it was trained")
        lm, info = load_adapted(model_dir, adapter, task="causal_lm", dtype=dtype, device=device, any_base=any_base)
        source = info.directory if (info.directory / "tokenizer.json").is_file() else model_dir
    cache_dense_weights(lm, cache_budget_bytes(lm, dtype, cache_budget_mb), dtype)
    tokenizer = load_tokenizer(source)
    tokenizer.check_fits(lm.config.vocab_size, model)
    return lm, tokenizer
