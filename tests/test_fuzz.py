"""Every parser of outside input, fuzzed: safetensors headers, GGUF files, JSONL/CSV rows, YAML configs,
config.json, tokenizer.json / tokenizer_config.json, chat templates, label maps, run metadata and checkpoint
state. The property: the input loads, or raises NibbleError with one line -- never another exception -- and
peak memory (Python and numpy allocations, traced) stays within a small multiple of the input's size.

Each test runs ``NIBBLE_FUZZ_EXAMPLES`` examples (default 25, a few seconds each); ``make fuzz`` runs
thousands.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import gguf
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helpers
from nibble.errors import NibbleError

EXAMPLES = int(os.environ.get("NIBBLE_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
# Peak traced memory allowed: this multiple of the input's bytes, plus a fixed allowance for the parser's own
# objects (a tokenizer, a jinja environment, numpy scratch).
MEMORY_MULTIPLE = 32
MEMORY_BASE = 8 << 20

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


def one_line_or_loads(parse: Callable[[], object], size: int) -> object:
    """Run ``parse``: it returns, or raises a one-line NibbleError; its traced peak memory stays bounded."""
    tracemalloc.start()
    try:
        return parse()
    except NibbleError as exc:
        assert str(exc) and "\n" not in str(exc), repr(str(exc))
        return exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= MEMORY_MULTIPLE * size + MEMORY_BASE, f"{peak} bytes traced for {size} bytes of input"


def parses_file(path: Path, content: bytes, parse: Callable[[Path], object]) -> object:
    """Write ``content`` to ``path`` and check ``parse(path)`` with :func:`one_line_or_loads`."""
    path.write_bytes(content)
    return one_line_or_loads(lambda: parse(path), len(content))


@st.composite
def mutated(draw, original: bytes) -> bytes:
    """``original`` with a few edits: bytes flipped, a run overwritten with a huge little-endian integer
    (lengths and counts), a cut, or random bytes appended."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "huge", "cut", "append"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "huge" and len(data) >= at + 8:
            data[at : at + 8] = struct.pack("<Q", draw(st.sampled_from([2**31, 2**32 + 7, 2**40, 2**62, 2**64 - 1])))
        elif kind == "cut":
            del data[at:]
        elif kind == "append":
            data += draw(st.binary(max_size=32))
    return bytes(data)


# -- safetensors ------------------------------------------------------------------------------------------


def safetensors_bytes() -> bytes:
    from safetensors.torch import save

    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    return save(tensors, metadata={"format": "pt"})


@st.composite
def safetensors_files(draw) -> bytes:
    good = safetensors_bytes()
    kind = draw(st.sampled_from(["mutated", "header", "random"]))
    if kind == "mutated":
        return draw(mutated(good))
    if kind == "header":  # a well-formed length prefix around any JSON
        text = json.dumps(draw(JSON)).encode() if draw(st.booleans()) else draw(st.binary(max_size=64))
        return struct.pack("<Q", len(text)) + text + draw(st.binary(max_size=64))
    return draw(st.binary(max_size=256))


@FUZZ
@given(data=safetensors_files())
def test_safetensors_headers(scratch, data):
    from nibble.io.safetensors import load_file

    parses_file(scratch / "fuzz.safetensors", data, load_file)


# -- GGUF -------------------------------------------------------------------------------------------------

GGUF_VALUES = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.floats(width=32),
    st.booleans(),
    st.text(max_size=12),
    st.lists(st.integers(0, 255), max_size=8),
    st.lists(st.text(max_size=6), max_size=8),
)
GGUF_KEYS = st.sampled_from(
    [
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.pre",
        "tokenizer.chat_template",
        "llama.context_length",
        "general.alignment",
    ]
)


def gguf_metadata_file(path: Path, entries: dict) -> bytes:
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in entries.items():
        if key == "general.alignment":
            continue  # the writer itself refuses bad alignments
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_int32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif value:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path.read_bytes()


@FUZZ
@given(entries=st.dictionaries(GGUF_KEYS, GGUF_VALUES, max_size=8), edit=st.booleans(), data=st.data())
def test_gguf_metadata_and_tokenizer(scratch, entries, edit, data):
    from nibble.io.gguf import GGUFFile

    path = scratch / "fuzz.gguf"
    content = gguf_metadata_file(path, entries)
    if edit:
        content = data.draw(mutated(content))
        path.write_bytes(content)

    def parse():
        file = GGUFFile(path)
        file.tokenizer_config()
        return file.tokenizer()

    one_line_or_loads(parse, len(content))


@pytest.fixture(scope="module")
def gguf_model(scratch):
    from gguf_files import tiny_model, write_gguf

    return write_gguf(scratch / "model.gguf", tiny_model("qwen3", tie_word_embeddings=True)).read_bytes()


@FUZZ
@given(data=st.data())
def test_gguf_model_files(scratch, gguf_model, data):
    from nibble.io.gguf import open_gguf

    content = data.draw(mutated(gguf_model))
    path = scratch / "fuzz-model.gguf"
    path.write_bytes(content)

    def parse():
        model = open_gguf(path)
        return model.config, model.tensor_shapes()

    one_line_or_loads(parse, len(content))


# -- data rows --------------------------------------------------------------------------------------------

ROW = st.dictionaries(st.sampled_from(["text", "label", "labels", "other"]), JSON, max_size=3)


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from([".jsonl", ".csv", ".tsv"]))
    kind = draw(st.sampled_from(["rows", "text", "bytes"]))
    if kind == "rows" and suffix == ".jsonl":
        lines = [json.dumps(r) for r in draw(st.lists(ROW, max_size=6))]
        return suffix, "\n".join(lines).encode()
    if kind == "rows":
        cells = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=8)
        rows = draw(st.lists(st.lists(cells, min_size=1, max_size=3), max_size=6))
        sep = "," if suffix == ".csv" else "\t"
        return suffix, ("text,label\n".replace(",", sep) + "\n".join(sep.join(r) for r in rows)).encode()
    if kind == "text":
        return suffix, draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    return suffix, draw(st.binary(max_size=200))


@pytest.fixture(scope="module")
def tokenizer(scratch):
    from nibble.io.tokenizer import load_tokenizer

    return load_tokenizer(helpers.write_tokenizer(scratch / "tokenizer"))


@FUZZ
@given(file=data_files())
def test_data_rows(scratch, tokenizer, file):
    from nibble.data.classify import load_classification
    from nibble.data.instruct import conversation
    from nibble.data.records import read_records

    suffix, content = file

    def parse(path):
        for line, record in read_records(path):
            with contextlib.suppress(NibbleError):
                conversation(record, path, line)
        return load_classification(path, tokenizer, max_seq_len=16)

    parses_file(scratch / f"fuzz{suffix}", content, parse)


# -- YAML configs and config.json -------------------------------------------------------------------------


@st.composite
def yaml_files(draw) -> bytes:
    from nibble.train.config import field_names

    kind = draw(st.sampled_from(["mapping", "text", "bytes"]))
    if kind == "mapping":
        keys = st.sampled_from([*field_names(), "bogus"])
        mapping = draw(st.dictionaries(keys, JSON, max_size=6))
        return yaml.safe_dump(mapping, allow_unicode=True).encode()
    if kind == "text":
        pieces = st.sampled_from(["lr: ", "&a ", "*a", "[", "]", "{", "}", "- ", "\n", ": ", "!!str ", ".nan", "1e999"])
        return "".join(draw(st.lists(pieces | st.text(max_size=4), max_size=30))).encode("utf-8", "surrogatepass")
    return draw(st.binary(max_size=200))


@FUZZ
@given(content=yaml_files())
def test_yaml_configs(scratch, content):
    from nibble.train.config import resolve_config

    parses_file(scratch / "fuzz.yaml", content, lambda path: resolve_config(path, {}, required=()))


CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
    "eos_token_id": 258,
    "sliding_window": None,
}


@FUZZ
@given(changes=st.dictionaries(st.sampled_from([*CONFIG, "num_labels", "id2label", "rope_scaling"]), JSON, max_size=4))
def test_config_json(scratch, changes):
    from nibble.model.config import ModelConfig

    parses_file(scratch / "config.json", json.dumps({**CONFIG, **changes}).encode(), ModelConfig.from_hf)


# -- tokenizer files and chat templates -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_json(scratch):
    helpers.write_tokenizer(scratch / "tok-template")
    return (scratch / "tok-template" / "tokenizer.json").read_bytes()


TOKENIZER_KEYS = ["bos_token", "eos_token", "pad_token", "unk_token", "extra_special_tokens",
                  "additional_special_tokens", "split_special_tokens", "chat_template"]  # fmt: skip


@FUZZ
@given(
    config=st.dictionaries(st.sampled_from(TOKENIZER_KEYS), JSON, max_size=4),
    edit_tokenizer=st.booleans(),
    data=st.data(),
)
def test_tokenizer_files(scratch, tokenizer_json, config, edit_tokenizer, data):
    from nibble.io.tokenizer import load_tokenizer

    directory = scratch / "tok"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    content = data.draw(mutated(tokenizer_json)) if edit_tokenizer else tokenizer_json
    (directory / "tokenizer.json").write_bytes(content)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))

    def parse():
        tokenizer = load_tokenizer(directory)
        tokenizer.encode("hello <eos>")
        with contextlib.suppress(NibbleError):
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
        return tokenizer.pad_id, tokenizer.eos_id

    one_line_or_loads(parse, len(content) + len(json.dumps(config)))


TEMPLATE_PIECES = [
    "{% for m in messages %}", "{% endfor %}", "{% if add_generation_prompt %}", "{% else %}", "{% endif %}",
    "{{ m['role'] }}", "{{ m.content|trim }}", "{{ messages[0]['content'] }}", "{{ loop.index }}",
    "{% set s = 'ab' %}", "{{ s ~ s }}", "{{ s * 3 }}", "{{ 'x' * 99999999 }}", "{{ range(5)|join(',') }}",
    "{% for i in range(100000) %}", "{{ raise_exception('no') }}", "{{ ''.__class__ }}", "{{ 1 / 0 }}",
    "{% macro f(x) %}{{ x }}{{ f(x) }}{% endmacro %}", "{{ f(1) }}", "{{ messages|tojson }}", "{{ '%5d' % 3 }}",
    "{{ s.center(7) }}", "{{ s.replace('a', s * 50) }}", "{{ none.x }}", "{{ messages|length }}", "text",
    "{{", "}}", "{%", "%}", "{#", "#}", "{% generation %}", "{% endgeneration %}", "{{ eos_token }}",
]  # fmt: skip


@FUZZ
@given(pieces=st.lists(st.sampled_from(TEMPLATE_PIECES) | st.text(max_size=5), max_size=14))
def test_chat_templates(pieces):
    from nibble.io.chat_template import render

    template = "".join(pieces)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    result = one_line_or_loads(lambda: render(template, "tokenizer_config.json", messages, eos_token="<eos>"), 64)
    if isinstance(result, NibbleError):
        assert str(result).startswith("tokenizer_config.json: ")


# -- label maps, run metadata, checkpoint state ------------------------------------------------------------


@FUZZ
@given(value=JSON, wrap=st.booleans())
def test_label_maps_and_run_metadata(scratch, value, wrap):
    from nibble.io.runinfo import LabelMap, RunInfo

    content = json.dumps({"labels": value, "multi_label": value} if wrap else value).encode()
    parses_file(scratch / "label_map.json", content, LabelMap.load)
    parses_file(scratch / "nibble.json", content, RunInfo.load)


@pytest.fixture(scope="module")
def checkpoint(scratch):
    from train.test_trainer import make_trainer

    trainer, _ = make_trainer(scratch / "run", total=2, save_every=1)
    trainer.train()
    return scratch / "run" / "checkpoints" / "step-2"


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["progress", "data", "window", "last_eval", "rng", "scaler",
                                                "optimizer_groups"]), JSON, max_size=3),
       inner=st.dictionaries(st.sampled_from(["step", "tokens", "position", "seed", "examples", "best_val_loss",
                                              "stopped_early", "first_step", "losses"]), JSON, max_size=3))  # fmt: skip
def test_checkpoint_state(scratch, checkpoint, changes, inner):
    from nibble.train.checkpoint import write_manifest
    from train.test_trainer import make_trainer

    path = scratch / "fuzz-checkpoint"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(checkpoint, path)
    state = json.loads((path / "state.json").read_text())
    for key, value in changes.items():
        state[key] = value
    for key in ("progress", "data", "window"):
        if isinstance(state.get(key), dict):
            state[key] = {**state[key], **inner}
    content = json.dumps(state).encode()
    (path / "state.json").write_bytes(content)
    write_manifest(path)
    resumed, _ = make_trainer(scratch / "resumed", total=4)
    one_line_or_loads(lambda: resumed.resume(path), len(content) + (path / "trainable.safetensors").stat().st_size)


MUTATIONS = ("reshape", "resize", "dtype", "nan", "inf", "negative", "drop", "extra", "rename")


@FUZZ
@given(
    file=st.sampled_from(["trainable", "optimizer", "rng"]),
    pick=st.integers(0, 1 << 16),
    mutation=st.sampled_from(MUTATIONS),
    shape=st.lists(st.integers(1, 7), min_size=0, max_size=3),
)
def test_checkpoint_tensors(scratch, checkpoint, file, pick, mutation, shape):
    # A checkpoint's bytes can be proven (the manifest) and still not fit: each of its tensors is checked for
    # name, shape, dtype and finiteness against what the run builds before anything uses it. Before, a reshaped
    # optimizer moment reached the fused AdamW kernel and corrupted the heap (free(): invalid next size).
    from safetensors.torch import load_file, save_file

    from nibble.train.checkpoint import write_manifest
    from train.test_trainer import make_trainer

    path = scratch / "fuzz-tensors"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(checkpoint, path)
    tensors = load_file(path / f"{file}.safetensors")
    name = sorted(tensors)[pick % len(tensors)]
    value = tensors[name]
    if mutation == "reshape":
        tensors[name] = torch.zeros(shape, dtype=value.dtype)
    elif mutation == "resize":
        tensors[name] = torch.zeros(value.numel() + 1, dtype=value.dtype)
    elif mutation == "dtype":
        tensors[name] = value.to(torch.float64 if value.dtype != torch.float64 else torch.float32)
    elif mutation in ("nan", "inf", "negative"):
        flat = value.to(torch.float32).flatten().clone()
        flat[pick % max(flat.numel(), 1)] = {"nan": math.nan, "inf": math.inf, "negative": -(2.0**40)}[mutation]
        tensors[name] = flat.view(value.shape).to(value.dtype) if value.is_floating_point() else flat.view(
            value.shape).to(torch.int64 if value.dtype == torch.int64 else value.dtype)  # fmt: skip
    elif mutation == "drop":
        del tensors[name]
    elif mutation == "extra":
        tensors[name + "x"] = value.clone()
    else:
        tensors[name + "x"] = tensors.pop(name)
    save_file(tensors, path / f"{file}.safetensors")
    (path / "manifest.json").unlink()
    write_manifest(path)
    resumed, _ = make_trainer(scratch / "resumed-tensors", total=4)
    size = (path / f"{file}.safetensors").stat().st_size
    result = one_line_or_loads(lambda: resumed.resume(path), size)
    if isinstance(result, NibbleError):
        assert name in str(result) or f"{file}.safetensors" in str(result), str(result)
    else:  # it fitted (a mutation that changed nothing the run relies on): the run goes on from it
        resumed.train()
