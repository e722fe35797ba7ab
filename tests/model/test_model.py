"""DecoderModel against transformers: LM and classifier logits, pooling, RoPE scaling, KV cache, checkpointing."""

from __future__ import annotations

import pytest
import torch

import nibble
from helpers import EOS_ID, make_hf_checkpoint, right_padded_batch
from nibble.errors import NibbleError
from nibble.model import DecoderModel
from nibble.nn import QuantLinear

ATOL = 1e-4
FAMILIES = {
    "qwen3": ("qwen3", {}),  # QK-norm, head_dim 32 != hidden / heads
    "qwen2": ("qwen2", {}),  # q/k/v bias
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "mistral-window": ("mistral", {"sliding_window": 4}),
}
LENGTHS = [9, 6, 2]


def real_positions(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool()[..., None]


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_logits_equal_transformers(shared_checkpoint, family):
    model_type, kwargs = FAMILIES[family]
    path, hf = shared_checkpoint(model_type, **kwargs)
    model = nibble.load_model(path)
    ids, mask = right_padded_batch(LENGTHS)
    with torch.no_grad():
        ours, theirs = model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
        unpadded = model(ids[:1]), hf(input_ids=ids[:1]).logits
    assert ours.shape == (3, max(LENGTHS), hf.config.vocab_size)
    # Pad positions are never used; compare every real one.
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=ATOL, rtol=0)
    torch.testing.assert_close(*unpadded, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama-tied"])
def test_classifier_logits_equal_transformers_on_right_padded_batch(shared_checkpoint, family):
    model_type, kwargs = FAMILIES[family]
    path, hf = shared_checkpoint(model_type, num_labels=3, **kwargs)
    model = nibble.load_model(path, task="classify")
    ids, mask = right_padded_batch(LENGTHS)
    with torch.no_grad():
        ours, theirs = model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == (3, 3)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert model.score.weight.requires_grad
    assert not any(p.requires_grad for name, p in model.named_parameters() if not name.startswith("score"))


def test_state_dict_keys_are_hugging_face_keys(shared_checkpoint):
    for kwargs, task in (({}, "causal_lm"), ({"num_labels": 3}, "classify")):
        path, hf = shared_checkpoint("qwen3", **kwargs)
        model = nibble.load_model(path, task=task)
        assert set(model.state_dict()) == set(hf.state_dict())
        for key, value in hf.state_dict().items():
            assert model.state_dict()[key].shape == value.shape


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_fresh_classifier_head_pools_then_projects(shared_checkpoint, pooling):
    path, hf = shared_checkpoint("qwen2")
    torch.manual_seed(0)
    model = nibble.load_model(path, task="classify", num_labels=4, pooling=pooling)
    ids, mask = right_padded_batch(LENGTHS)
    with torch.no_grad():
        hidden = hf.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
        if pooling == "last":
            pooled = hidden[torch.arange(3), torch.tensor(LENGTHS) - 1]
        else:
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        expected = pooled @ model.score.weight.T
        ours = model(ids, mask)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    assert model.score.weight.shape == (4, 64)
    assert 0.01 < model.score.weight.std().item() < 0.03  # transformers' normal(0, initializer_range=0.02)


def test_hidden_states_are_final_normed(shared_checkpoint):
    path, hf = shared_checkpoint("qwen3")
    model = nibble.load_model(path)
    ids, mask = right_padded_batch(LENGTHS)
    with torch.no_grad():
        ours = model.hidden_states(ids, mask)
        theirs = hf.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 32},
        {"rope_type": "linear", "factor": 4.0},
    ],
    ids=["llama3", "linear"],
)  # fmt: skip
def test_scaled_rope_equals_transformers(tmp_path, rope):
    params = {"rope_theta": 500000.0, **rope}
    path, hf = make_hf_checkpoint(tmp_path, "llama", rope_parameters=params, max_position_embeddings=128)
    model = nibble.load_model(path)
    assert model.config.rope_scaling["rope_type"] == rope["rope_type"]
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_kv_cache_matches_full_forward(shared_checkpoint):
    path, _ = shared_checkpoint("qwen3")
    model = nibble.load_model(path)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 12)
        # A prefill, a multi-token chunk after it (offset causal mask), then single tokens.
        pieces = [model(ids[:, :5], cache=cache), model(ids[:, 5:8], cache=cache)]
        pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)
    assert cache.length == 12


def test_sliding_window_with_kv_cache(shared_checkpoint):
    model_type, kwargs = FAMILIES["mistral-window"]
    path, hf = shared_checkpoint(model_type, **kwargs)
    model = nibble.load_model(path)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model.new_cache(1, 10)
        steps = [model(ids[:, :6], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(6, 10)]
        torch.testing.assert_close(torch.cat(steps, 1), hf(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(shared_checkpoint):
    path, _ = shared_checkpoint("qwen2")
    model = nibble.load_model(path)
    for p in model.parameters():
        p.requires_grad_(True)
    ids, mask = right_padded_batch(LENGTHS)
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        loss = model(ids, mask).logsumexp(-1).mul(mask).sum()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-5, msg=name)


def test_left_padded_batch_equals_transformers_and_stays_finite(shared_checkpoint):
    path, hf = shared_checkpoint("qwen3")
    model = nibble.load_model(path)
    ids, mask = right_padded_batch([7, 4])
    ids, mask = torch.stack([ids[0], ids[1].roll(3)]), torch.stack([mask[0], mask[1].roll(3)])  # row 1: 3 pads first
    with torch.no_grad():
        ours, theirs = model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(ours).all()  # pad queries see no real key; they must not turn into NaN
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=ATOL, rtol=0)


def test_bf16_model_keeps_fp32_norms_and_tracks_fp32_logits(shared_checkpoint):
    path, hf = shared_checkpoint("qwen3")
    model = nibble.load_model(path, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_norm.weight.dtype == torch.float32
    ids, _ = right_padded_batch([8])
    with torch.no_grad():
        ours = model(ids).float()
        theirs = hf(input_ids=ids).logits
    assert ours.dtype == torch.float32
    assert (ours - theirs).abs().max() < 0.1 * theirs.abs().max()


def test_projections_are_swappable_modules(shared_checkpoint):
    path, _ = shared_checkpoint("llama", tie_word_embeddings=True)
    model = nibble.load_model(path, quantize="nf4")
    attn1 = model.model.layers[1].self_attn
    assert isinstance(attn1.q_proj, QuantLinear)
    assert type(nibble.load_model(path).model.layers[1].self_attn.q_proj) is torch.nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, _ = right_padded_batch([5])

    class Doubled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    with torch.no_grad():
        before = model(ids)
        attn1.v_proj = Doubled(attn1.v_proj)
        after = model(ids)
    assert not torch.allclose(before, after)


def test_unknown_task_and_pooling_are_rejected(shared_checkpoint):
    path, _ = shared_checkpoint("qwen3")
    model = nibble.load_model(path)
    with pytest.raises(NibbleError, match="task 'seq2seq'"):
        DecoderModel(model.config, task="seq2seq")
    with pytest.raises(NibbleError, match="pooling 'max'"):
        DecoderModel(model.config, task="classify", num_labels=2, pooling="max")
    assert EOS_ID in model.config.eos_token_ids
