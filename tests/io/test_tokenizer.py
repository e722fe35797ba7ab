"""nibble's Tokenizer against transformers' AutoTokenizer on the same directory: ids, truncation, chat template."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from nibble.errors import NibbleError
from nibble.io.tokenizer import load_tokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine; the early bird catches the worm",
    "naïve café déjà vu — Grüße aus Köln 東京 🙂",
    "    indented lines\nand new lines\r\n\tand tabs",
] * 20
TEXTS = [
    "the quick brown fox",
    "Grüße aus 東京 🙂 and unseen wörds",
    "  leading spaces and <|im_end|> a special token inside",
    "",
    "numbers 1234567 and punctuation!?",
]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<sys>{{ m['content'] }}\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build(path, config, post_processor=True):
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}, indent=1)
    )
    return path


CONFIGS = {
    "plain": ({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, True),
    "add_eos": ({"bos_token": "<s>", "eos_token": "<|im_end|>", "add_eos_token": True}, True),
    "no_post_processor": ({"eos_token": "<|endoftext|>", "bos_token": "<s>", "add_bos_token": True}, False),
    "missing_special": ({"eos_token": "<|endoftext|>", "pad_token": "<pad>", "unk_token": "<unk>"}, True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ids_equal_autotokenizer(tmp_path, name):
    config, post = CONFIGS[name]
    path = build(tmp_path / name, config, post)
    ours, theirs = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
        for n in (3, 8):
            assert ours.encode(text, max_length=n) == theirs(text, truncation=True, max_length=n)["input_ids"]
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs(text)["input_ids"])
    assert ours.pad_id == (theirs.pad_token_id if theirs.pad_token_id is not None else theirs.eos_token_id)
    assert ours.eos_id == theirs.eos_token_id and ours.bos_id == theirs.bos_token_id
    assert len(ours) == len(theirs)


def test_fixture_tokenizer_matches(tmp_path):
    import helpers

    path = helpers.write_tokenizer(tmp_path)
    ours, theirs = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"]
    assert ours.pad_id == helpers.PAD_ID and ours.eos_id == helpers.EOS_ID


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_renders_as_transformers(tmp_path, add_generation_prompt):
    path = build(tmp_path, {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE})
    ours, theirs = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "  hi there  "},
        {"role": "assistant", "content": "hello"},
    ]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text.startswith("<s><sys>be brief\n<|im_start|>user\nhi there<|im_end|>")


def test_saved_copy_gives_the_same_ids(tmp_path):
    path = build(tmp_path / "src", {"eos_token": "<|im_end|>", "add_eos_token": True, "chat_template": TEMPLATE})
    (tmp_path / "copy").mkdir()
    load_tokenizer(path).save(tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    for text in TEXTS:
        assert again.encode(text) == load_tokenizer(path).encode(text)
    assert again.chat_template == TEMPLATE


def test_errors_name_the_file(tmp_path):
    with pytest.raises(NibbleError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(NibbleError, match="tokenizer.json: not a valid"):
        load_tokenizer(tmp_path)
    path = build(tmp_path / "ok", {"eos_token": "<|endoftext|>"})
    with pytest.raises(NibbleError, match="no chat_template"):
        load_tokenizer(path).apply_chat_template([{"role": "user", "content": "x"}])
    (path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(NibbleError, match="tokenizer_config.json: expected a JSON object"):
        load_tokenizer(path)


def test_a_cut_text_gives_the_ids_of_the_whole_texts_truncation(tmp_path):
    """Texts are cut to a bound from ``max_length`` before tokenizing; the ids still equal AutoTokenizer's
    truncation of the whole text, across post-processors, a normalizer that drops characters (runs of which
    make the first cut too short) and lengths from 1, and the count of cut texts is exact."""
    import random

    rng = random.Random(0)
    words = " ".join(CORPUS).split() + ["~" * 3000, "\n\n", "🙂" * 50]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 400))) for _ in range(40)]
    texts += ["~" * 20000 + " the end of a long run", "x" * 70000]
    for name, drop in (("plain", False), ("add_eos", True), ("no_post_processor", False)):
        config, post = CONFIGS[name]
        path = build(tmp_path / name, config, post)
        if drop:  # "~" normalized away: a token covers more text than it spells
            spec = json.loads((path / "tokenizer.json").read_text())
            spec["normalizer"] = {
                "type": "Sequence",
                "normalizers": [spec["normalizer"], {"type": "Replace", "pattern": {"String": "~"}, "content": ""}],
            }
            (path / "tokenizer.json").write_text(json.dumps(spec))
        ours, theirs = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
        for n in (1, 5, 16, 120):
            ids, beyond, partial = result = ours.encode_truncated(texts, n)
            assert ids == [theirs(t, truncation=True, max_length=n)["input_ids"] for t in texts], (name, n)
            full = [len(theirs(t)["input_ids"]) for t in texts]
            assert result.cut == sum(length > n for length in full), (name, n)
            for length, over, part in zip(full, beyond, partial, strict=True):  # exact unless cut before tokenizing
                assert over == max(length - n, 0) if not part else 0 < over <= length - n, (name, n)
            assert ours.encode_batch(texts, max_length=n) == ids


def test_a_long_text_tokenized_in_windows_gives_the_whole_texts_tokens(tmp_path, monkeypatch):
    """Windows of 300 characters overlapping by 64: the ids and token starts equal one encoding of the whole
    text (special tokens, multi-byte characters and long runs crossing the window edges), for a byte-level
    BPE and a Metaspace one (whose first piece differs: it falls back to the whole text), and the windows were
    used where they can be."""
    import random

    import numpy as np

    from nibble.io import tokenizer as module

    monkeypatch.setattr(module, "_WINDOW_CHARS", 300)
    monkeypatch.setattr(module, "_OVERLAP_CHARS", 64)
    rng = random.Random(1)
    words = " ".join(CORPUS).split() + ["<|im_end|>", "<|im_start|>", "東京🙂", "  ", "\n", "x" * 90]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(50, 600))) for _ in range(12)]
    texts += ["a" * 5000, "🙂" * 700]
    metaspace = build(tmp_path / "meta", CONFIGS["plain"][0])
    spec = json.loads((metaspace / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True}
    spec["decoder"] = None
    (metaspace / "tokenizer.json").write_text(json.dumps(spec))
    for path in (build(tmp_path / "bpe", CONFIGS["plain"][0]), metaspace):
        ours = load_tokenizer(path)
        windows = 0
        for text in texts:
            whole = ours.backend.encode(text, add_special_tokens=False)
            windowed = ours._windowed(text)
            windows += windowed is not None
            ids, starts = ours.encode_positions(text)
            assert ids.tolist() == whole.ids and starts.tolist() == [o[0] for o in whole.offsets], text[:40]
            if windowed is not None:
                assert np.array_equal(windowed[0], ids) and np.array_equal(windowed[1], starts)
        assert windows >= (len(texts) - 2 if path.name == "bpe" else 0), (path.name, windows)
