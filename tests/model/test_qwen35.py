"""Qwen3.5 (hybrid Gated DeltaNet + gated full attention) against transformers: its config, logits of
``Qwen3_5ForCausalLM``, of a ``Qwen3_5ForConditionalGeneration`` checkpoint (text decoder only) and of a
classifier; padded and packed rows equal to each row alone."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import nibble
from helpers import PAD_ID, hf_config, make_qwen35_multimodal_checkpoint, right_padded_batch
from nibble.errors import NibbleError
from nibble.model.config import ModelConfig

LENGTHS = [9, 3, 70, 1]  # one row crosses the 64-token chunk of the delta rule
ATOL_HF = 1e-4
ATOL_ROWS = 1e-5


def text_config_json(**overrides):
    return json.loads(hf_config("qwen3_5_text", **overrides).to_json_string())


def test_config_reads_the_hybrid_fields():
    config = ModelConfig.from_hf(text_config_json())
    assert config.layer_types == ("linear_attention", "full_attention", "linear_attention")
    assert (config.linear_num_key_heads, config.linear_num_value_heads) == (2, 4)
    assert (config.linear_key_dim, config.linear_value_dim, config.linear_conv_kernel_dim) == (32, 64, 4)
    assert config.rotary_dim == 8 and config.attn_output_gate and config.zero_centred_norm and config.qk_norm
    assert not config.multimodal and config.is_hybrid


def test_config_defaults_follow_transformers():
    data = text_config_json(num_hidden_layers=8, layer_types=None)
    assert data["layer_types"][3] == data["layer_types"][7] == "full_attention"  # what transformers filled in
    expected = tuple(data.pop("layer_types"))
    data.pop("rope_parameters")
    config = ModelConfig.from_hf(data)
    assert config.layer_types == expected and config.partial_rotary_factor == 0.25


def test_config_of_a_multimodal_checkpoint_is_its_text_config(tmp_path):
    from transformers import Qwen3_5Config

    data = json.loads(Qwen3_5Config(text_config=text_config_json()).to_json_string())
    assert ModelConfig.from_hf(data) == replace(ModelConfig.from_hf(text_config_json()), multimodal=True)
    del data["text_config"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(NibbleError, match=r"config.json: model_type 'qwen3_5' needs a 'text_config'"):
        ModelConfig.from_hf(tmp_path)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"layer_types": ["linear_attention"] * 2}, "'layer_types' has 2 entries for 3 layers"),
        ({"layer_types": ["linear_attention", "sliding_attention", "full_attention"]}, "'sliding_attention'"),
        ({"linear_num_value_heads": 3}, "linear_num_value_heads (3) must be a multiple of linear_num_key_heads"),
        ({"linear_conv_kernel_dim": 0}, "'linear_conv_kernel_dim' must be a positive integer"),
    ],
)
def test_bad_hybrid_config_names_the_key(tmp_path, change, fragment):
    data = {**text_config_json(), **change}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(NibbleError) as exc:
        ModelConfig.from_hf(tmp_path)
    assert fragment in str(exc.value) and str(tmp_path / "config.json") in str(exc.value)


def test_causal_lm_logits_equal_transformers(shared_checkpoint):
    path, hf = shared_checkpoint("qwen3_5_text")
    model = nibble.load_model(path)
    assert [type(layer.linear_attn if layer.linear else layer.self_attn).__name__ for layer in model.model.layers] == [
        "GatedDeltaNet", "Attention", "GatedDeltaNet"
    ]  # fmt: skip
    ids, _ = right_padded_batch([130, 130])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL_HF, rtol=0)


def test_multimodal_checkpoint_loads_its_text_decoder(tmp_path, capfd):
    path, hf = make_qwen35_multimodal_checkpoint(tmp_path / "mm")
    model = nibble.load_model(path)
    note = capfd.readouterr().err
    assert "loading the text decoder only" in note and "model.visual.* and mtp.*" in note
    ids, _ = right_padded_batch([40, 40])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, atol=ATOL_HF, rtol=0)


def test_classifier_logits_equal_transformers(shared_checkpoint):
    path, hf = shared_checkpoint("qwen3_5_text", num_labels=3)
    assert type(hf).__name__ == "Qwen3_5TextForSequenceClassification"  # what AutoModel builds for qwen3_5_text
    model = nibble.load_model(path, task="classify")
    ids, mask = right_padded_batch(LENGTHS)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), hf(ids, attention_mask=mask).logits, atol=ATOL_HF, rtol=0)


def left_padded(ids, mask):
    """The same rows with their padding moved to the left."""
    out, out_mask = torch.full_like(ids, PAD_ID), torch.zeros_like(mask)
    for row, n in enumerate(mask.sum(1).tolist()):
        out[row, ids.shape[1] - n :], out_mask[row, ids.shape[1] - n :] = ids[row, :n], 1
    return out, out_mask


def test_padded_and_packed_rows_equal_each_row_alone_logits_and_gradients(shared_checkpoint):
    path, _ = shared_checkpoint("qwen3_5_text")
    model = nibble.load_model(path)
    for p in model.parameters():
        p.requires_grad_(True)
    ids, mask = right_padded_batch(LENGTHS)
    right = model(ids, mask)
    (right[mask.bool()] ** 2).mean().backward()  # padding-free: the real tokens packed into one row
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.no_grad():
        lids, lmask = left_padded(ids, mask)
        left = model(lids, lmask)
        t = ids.shape[1]
        for row, n in enumerate(LENGTHS):
            alone = model(ids[row : row + 1, :n])[0]
            torch.testing.assert_close(right[row, :n], alone, atol=ATOL_ROWS, rtol=0)
            torch.testing.assert_close(left[row, t - n :], alone, atol=ATOL_ROWS, rtol=0)
    total = sum(LENGTHS)
    for row, n in enumerate(LENGTHS):  # the same loss, row by row
        ((model(ids[row : row + 1, :n])[0] ** 2).sum() / (total * right.shape[-1])).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=ATOL_ROWS, rtol=1e-4, msg=name)


def test_greedy_generation_equals_transformers(shared_checkpoint):
    from nibble.model.generate import generate

    path, hf = shared_checkpoint("qwen3_5_text")
    model = nibble.load_model(path)
    prompt, _ = right_padded_batch([70])  # the prefill crosses a chunk; then one token at a time
    ours = generate(model, prompt, max_new_tokens=12, eos_token_id=[])
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=PAD_ID)
    assert ours == theirs[0, prompt.shape[1] :].tolist()


def test_prompt_in_pieces_equals_it_at_once(shared_checkpoint):
    path, _ = shared_checkpoint("qwen3_5_text")
    model = nibble.load_model(path)
    ids, _ = right_padded_batch([70, 70])
    with torch.no_grad():
        cache = model.new_cache(2, 80)
        pieces = [model.hidden_states(ids[:, a:b], cache=cache) for a, b in ((0, 30), (30, 31), (31, 70))]
        torch.testing.assert_close(torch.cat(pieces, 1), model.hidden_states(ids), atol=1e-4, rtol=0)
    assert all(state.dtype == torch.float32 for state in cache.states.values())
    assert sorted(cache.states) == sorted(cache.conv_windows) == [0, 2] and cache.keys[0] is None


def test_plan_counts_the_weights_a_loaded_qwen35_holds(shared_checkpoint):
    from helpers import plan_opts
    from nibble.model.memory import DELTANET_DENSE_ROW, format_rows, plan_rows, projections_bytes
    from nibble.nn import QuantLinear
    from nibble.quant import QuantSpec

    path, _ = shared_checkpoint("qwen3_5_text")
    quantized = nibble.load_model(path, quantize="nf4")
    held = sum(m.qweight.memory_bytes() for m in quantized.modules() if isinstance(m, QuantLinear))
    assert projections_bytes(quantized.config, QuantSpec("nf4")) == held
    dense = nibble.load_model(path)
    rows = {name: params for name, params, _ in format_rows(dense.config)}
    assert rows["all weights"] == sum(p.numel() for p in dense.parameters())
    linear = [layer.linear_attn for layer in dense.model.layers if layer.linear]
    stays_dense = sum(
        p.numel()
        for m in linear
        for n, p in m.named_parameters()
        if not n.startswith(("in_proj_qkv", "in_proj_z", "out_proj"))
    )
    assert rows[DELTANET_DENSE_ROW] == stays_dense
    opts = plan_opts(dense.config, max_seq_len=128, batch_size=2)
    plan = {name: size for name, _, size in plan_rows(dense.config, opts)}
    states = 2 * 4 * 2 * 16 * 16 * 4  # rows x value heads x chunks x d_k x d_v x fp32
    assert (
        plan["delta rule backward: chunk states, chunk matrices (in activations)"]
        == states + 10 * 2 * 4 * 2 * 64 * 64 * 4
    )


def test_merge_of_a_multimodal_checkpoint_loads_as_the_original_class(tmp_path):
    from safetensors.torch import load_file
    from transformers import Qwen3_5ForConditionalGeneration

    from nibble.cli.main import main
    from peft_adapters import save_peft_adapter

    base, hf = make_qwen35_multimodal_checkpoint(tmp_path / "mm")
    peft_model = save_peft_adapter(hf, tmp_path / "adapter", targets=("in_proj_qkv", "out_proj", "q_proj", "up_proj"))
    assert (
        main(["merge", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m")])
        == 0
    )
    merged = Qwen3_5ForConditionalGeneration.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ids, _ = right_padded_batch([21, 21])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=ATOL_HF, rtol=0)
    source, written = load_file(base / "model.safetensors"), load_file(tmp_path / "m" / "model.safetensors")
    extras = [k for k in source if k.startswith(("mtp.", "model.visual."))]
    assert "mtp.fc.weight" in extras and all(torch.equal(written[k], source[k]) for k in extras)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == [
        "Qwen3_5ForConditionalGeneration"
    ]


def test_merge_of_a_text_checkpoint_loads_in_transformers(shared_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from nibble.cli.main import main
    from peft_adapters import save_peft_adapter

    base, hf = shared_checkpoint("qwen3_5_text")
    peft_model = save_peft_adapter(hf, tmp_path / "adapter", targets=("in_proj_z", "k_proj", "down_proj"))
    assert (
        main(["merge", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m")])
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert type(merged).__name__ == "Qwen3_5ForCausalLM"
    ids, _ = right_padded_batch([66, 66])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=ATOL_HF, rtol=0)
