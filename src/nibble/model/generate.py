"""Token-by-token generation with a KV cache: greedy, or sampled with temperature / top-k / top-p."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from nibble.errors import NibbleError
from nibble.model.model import DecoderModel


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick one token from ``logits`` [V]: argmax at temperature 0, else sample the filtered softmax."""
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
