"""``nibble quantize`` and ``nibble plan`` through the real command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nibble.cli.main import main

QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
}


def test_quantize_writes_a_loadable_checkpoint(shared_checkpoint, tmp_path, capsys):
    path, _ = shared_checkpoint("qwen2")
    out = tmp_path / "nf4"
    assert main(["quantize", "--model", str(path), "--output", str(out), "--double-quant", "--blocksize", "128"]) == 0
    printed = capsys.readouterr().out
    assert "quantized 14 projections to nf4 with double quantization" in printed
    state = json.loads(bytes(_tensor(out, "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4")))
    assert state["blocksize"] == 128 and "nested_offset" in state


def _tensor(path, name):
    from nibble.io.safetensors import read_checkpoint

    return read_checkpoint(path).get_tensor(name).tolist()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["quantize", "--model", "{missing}", "--output", "{out}"], "no such model directory or .gguf file"),
        (["quantize", "--model", "{broken}", "--output", "{out}"], "garbled safetensors header"),
        (["plan", "--model", "{missing}"], "no such file"),
        (["plan", "--model", "{config}", "--lora-targets", "qkv"], "LoRA targets ['qkv']"),
        (["plan", "--model", "{config}", "--max-seq-len", "0"], "'max_seq_len' must be >= 1"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, fragment):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(QWEN3_4B))
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_4B))
    names = {
        "missing": tmp_path / "nope",
        "out": tmp_path / "out",
        "broken": broken,
        "config": tmp_path / "config.json",
    }
    assert main([a.format(**names) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err
    assert not (tmp_path / "out").exists()


def test_plan_prints_the_qwen3_4b_table(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_4B))
    assert main(["plan", "--model", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:32].strip(): line[32:].split() for line in lines}
    # params, then fp32 / bf16 / nf4 / nf4+dq / int4 sizes (value, "GB" pairs)
    assert rows["block projections"][:7] == ["3.63B", "14.53", "GB", "7.27", "GB", "2.04", "GB"]
    assert rows["all weights"][:3] == ["4.02B", "16.09", "GB"]
    frozen = next(line.split() for line in lines if line.startswith("block projections, frozen [nf4]"))
    assert frozen[-3:] == ["3.63B", "2.04", "GB"]
    for label in ("LoRA r=8", "AdamW state", "activations, no checkpointing", "activations, with checkpointing"):
        assert any(line.startswith(label) for line in lines), label


def test_plan_methods_and_options(shared_checkpoint, capsys):
    path, _ = shared_checkpoint("qwen3")
    for argv in (["--method", "full", "--task", "classify"], ["--method", "lora", "--lora-targets", "all-linear"],
                 ["--quant-format", "int4", "--group-size", "64", "--dtype", "bfloat16"]):  # fmt: skip
        assert main(["plan", "--model", str(path / "config.json"), *argv]) == 0
    out = capsys.readouterr().out
    assert "block projections, trainable [float32]" in out and "score head, trainable" in out
    assert "LoRA r=8 on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" in out
    int4_row = next(line for line in out.splitlines() if line.startswith("block projections, frozen [int4]"))
    assert int4_row.split()[-3:] == ["98.30K", "52.22", "KB"]  # 49152 packed bytes + 3072 fp16 scales


def test_the_installed_command_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "nibble", "plan", "--model", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr and result.stdout == ""
