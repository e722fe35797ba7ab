"""Batched sampling for online RL: G completions of each prompt at once, with the log-prob of every sampled token.

All ``prompts x G`` sequences decode together from one preallocated cache (KV for full attention, conv window +
recurrent state for Gated DeltaNet layers); each prompt is prefilled once and its cache copied to its G rows. The
LoRA adapters stay active and unmerged, so the sampled policy is the trained one. Prompts of different lengths are
left-padded into one batch on full-attention models; a model with recurrent layers (which take no padding with a
cache) decodes each prompt length as its own batch. A row that stops (an end token, a stop string) leaves its
batch at once.

Each sampled token's log-prob is recorded from the logits it was drawn from, as TRL scores its old policy:
``log_softmax(logits / temperature)`` before top-k / top-p / min-p filtering (temperature 1 when greedy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from nibble.errors import NibbleError
from nibble.model.model import DecoderModel, KVCache


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How tokens are drawn: greedy at ``temperature`` 0; ``top_k`` 0 and ``top_p`` 1 keep every token; ``min_p``
    drops tokens less likely than ``min_p`` x the most likely one. Defaults as TRL's GRPOConfig."""

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise NibbleError(f"'max_completion_len' {self.max_new_tokens} must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise NibbleError("'temperature' must be >= 0, 'top_p' in (0, 1] and 'top_k' >= 0 (0: no top-k)")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise NibbleError(f"'min_p' {self.min_p} must be in [0, 1]")


@dataclass
class Completion:
    """One sampled sequence: its tokens (a stop token included), their log-probs, and whether it was cut at
    ``max_new_tokens`` before stopping (``truncated``)."""

    prompt_index: int
    tokens: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    truncated: bool = False


def filter_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """[B, V] temperature-scaled logits with the tokens top-k / top-p / min-p drop set to -inf."""
    logits = logits.float() / config.temperature
    if 0 < config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.min_p is not None and config.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < config.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    if config.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top token always stays).
        drop = probs.cumsum(-1) - probs >= config.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def pick(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """[B] the next token of each row: argmax when greedy, else drawn (on the generator's device) from the
    filtered softmax."""
    if config.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, config).softmax(-1)
    if generator is not None:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


def token_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B] log-probs of ``tokens`` [B] under ``logits`` [B, V] scaled by the temperature (1 when greedy)."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    return scaled.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]


def keep_rows(cache: KVCache, rows: torch.Tensor) -> None:
    """Shrink ``cache`` to the batch rows ``rows`` [B'] (in that order), in place."""
    for store in (cache.keys, cache.values):
        for i, tensor in enumerate(store):
            if tensor is not None:
                store[i] = tensor.index_select(0, rows)
    for store in (cache.conv_windows, cache.states):
        for i in store:
            store[i] = store[i].index_select(0, rows)


@torch.inference_mode()
def sample(
    model: DecoderModel,
    prompts: Sequence[Sequence[int]],
    num_generations: int,
    config: SamplingConfig,
    *,
    generator: torch.Generator | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> list[Completion]:
    """Sample ``num_generations`` completions of each prompt (token ids), returned prompt by prompt: the G
    completions of prompt 0, then of prompt 1, ...

    ``decode`` (token ids -> text) is needed for ``config.stop_strings``: a completion stops once its text contains
    one (its tokens up to there are kept). The same ``generator`` state gives the same completions.

    Raises:
        NibbleError: a classify model, an empty prompt, or stop strings without ``decode``.
    """
    if model.task != "causal_lm":
        raise NibbleError("sampling needs a causal_lm model (load it with task='causal_lm')")
    if config.stop_strings and decode is None:
        raise NibbleError("stop strings need the tokenizer to decode completions")
    if any(len(p) == 0 for p in prompts):
        raise NibbleError("a prompt is empty; every prompt needs at least one token")
    completions = [Completion(i) for i in range(len(prompts)) for _ in range(num_generations)]
    layers = range(model.config.num_hidden_layers)
    recurrent = any(model.config.layer_type(i) != "full_attention" for i in layers)
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt) if recurrent else 0, []).append(i)
    for indices in by_length.values():
        rows = [completions[i * num_generations + g] for i in indices for g in range(num_generations)]
        sample_batch(model, [prompts[i] for i in indices], num_generations, rows, config, generator, decode)
    return completions


def sample_batch(
    model: DecoderModel,
    prompts: list[Sequence[int]],
    num_generations: int,
    rows: list[Completion],
    config: SamplingConfig,
    generator: torch.Generator | None,
    decode: Callable[[list[int]], str] | None,
) -> None:
    """Fill ``rows`` (G per prompt, in order) with completions of ``prompts``, left-padded to one length when they
    differ (full-attention models only: the pad keys are masked, and RoPE sees each row shifted as a whole)."""
    device = model.model.embed_tokens.weight.device
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    keys = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(list(prompt))
        keys[i, width - len(prompt) :] = 1
    keys = keys.to(device) if not bool(keys.all()) else None  # [P, T]: which cached positions are real
    cache = model.new_cache(len(prompts), width + config.max_new_tokens)
    hidden = model.hidden_states(ids.to(device), keys, cache=cache)[:, -1]  # [P, H]: the last position is real
    repeat = torch.arange(len(prompts), device=device).repeat_interleave(num_generations)  # [P * G]
    keep_rows(cache, repeat)
    keys = keys.index_select(0, repeat) if keys is not None else None  # [B, T]
    logits = model.lm_head(hidden).index_select(0, repeat)  # [B, V]
    stops = torch.tensor(config.stop_token_ids, dtype=torch.long, device=device)
    live = list(range(len(rows)))  # the rows still in the batch, in batch order
    for step in range(config.max_new_tokens):
        tokens = pick(logits, config, generator)  # [B]
        logps = token_logps(logits, tokens, config.temperature)
        ended = torch.isin(tokens, stops)
        # One host transfer per step: the tokens, their log-probs and which rows ended.
        host = torch.stack((tokens.double(), logps.double(), ended.double())).cpu()
        finished = []
        for b, row in enumerate(live):
            completion = rows[row]
            completion.tokens.append(int(host[0, b]))
            completion.logps.append(float(host[1, b]))
            if host[2, b] or (config.stop_strings and stopped_by_string(completion, config.stop_strings, decode)):
                finished.append(b)
        if step == config.max_new_tokens - 1:
            for b in set(range(len(live))) - set(finished):
                rows[live[b]].truncated = True
            return
        if finished:
            done = set(finished)
            kept = [b for b in range(len(live)) if b not in done]
            if not kept:
                return
            index = torch.tensor(kept, dtype=torch.long, device=device)
            keep_rows(cache, index)
            tokens = tokens.index_select(0, index)
            keys = keys.index_select(0, index) if keys is not None else None
            live = [live[b] for b in kept]
        if keys is not None:
            keys = torch.cat((keys, keys.new_ones(len(live), 1)), 1)  # [B, past + 1]
        hidden = model.hidden_states(tokens[:, None], keys, cache=cache)[:, -1]  # [B, H]
        logits = model.lm_head(hidden)


def stopped_by_string(completion: Completion, stop_strings: Sequence[str], decode: Callable) -> bool:
    """Whether the completion's text contains a stop string (checked after every token, so it just appeared)."""
    text = decode(completion.tokens)
    return any(s in text for s in stop_strings)
