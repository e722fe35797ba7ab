"""Preference and KTO rows as users hold them -> the token ids TRL's trainers make of them (a transformers tokenizer
on the same tokenizer.json, the same rule: the completion starts where prompt and prompt + completion diverge),
TRL's truncation, and every bad row one line naming it, or counted and left out with skip_bad_rows."""

from __future__ import annotations

import json

import pytest

from nibble.data.instruct import CHATML
from nibble.data.preference import Truncation, load_pairs, load_unpaired
from nibble.errors import NibbleError
from nibble.io.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    import helpers

    path = tmp_path_factory.mktemp("tok")
    helpers.write_tokenizer(path)
    return path


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NIBBLE_TOKEN_CACHE", str(tmp_path / "cache"))


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hf_tokenizer(path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), eos_token="<eos>")


def trl_ids(hf, prompt, completion):
    """DPOTrainer's tokenization of a string row: EOS appended, prompt and prompt+completion tokenized alone."""
    p = hf(prompt, add_special_tokens=False)["input_ids"]
    full = hf(prompt + completion + "<eos>", add_special_tokens=False)["input_ids"]
    cut = next((i for i, (a, b) in enumerate(zip(p, full, strict=False)) if a != b), min(len(p), len(full)))
    return p[:cut], full[cut:]


def test_string_pairs_tokenize_as_trl_does(tmp_path, tok_dir):
    rows = [{"prompt": "What is 2+2? ", "chosen": "4", "rejected": "five"}, {"prompt": "Hi", "chosen": " there",
            "rejected": "!", "margin": 1.5}]  # fmt: skip
    data = load_pairs(write(tmp_path / "p.jsonl", rows), load_tokenizer(tok_dir), Truncation(64))
    hf = hf_tokenizer(tok_dir)
    for i, row in enumerate(rows):
        prompt, chosen = trl_ids(hf, row["prompt"], row["chosen"])
        _, rejected = trl_ids(hf, row["prompt"], row["rejected"])
        assert data.prompt[i].tolist() == prompt[: len(data.prompt[i])]
        assert data.prompt[i].tolist() + data.chosen[i].tolist() == prompt + chosen
        assert data.prompt[i].tolist() + data.rejected[i].tolist() == prompt + rejected
    assert data.margin.tolist() == [0.0, 1.5]
    batch = data.collate([0, 1], pad_id=0)
    assert batch["input_ids"].shape[0] == 4  # chosen rows, then rejected rows
    assert batch["completion_tokens"].tolist() == [
        len(data.chosen[0]), len(data.chosen[1]), len(data.rejected[0]), len(data.rejected[1])
    ]  # fmt: skip
    assert (batch["targets"] == batch["input_ids"][:, 1:].reshape(-1)[batch["target_index"]]).all()


def test_conversational_pairs_with_implicit_and_explicit_prompt_render_the_same(tmp_path, tok_dir):
    tokenizer = load_tokenizer(tok_dir)
    tokenizer.chat_template = CHATML
    user = [{"role": "user", "content": "Capital of France?"}]
    good, bad = [{"role": "assistant", "content": "Paris"}], [{"role": "assistant", "content": "Rome"}]
    implicit = write(tmp_path / "i.jsonl", [{"chosen": user + good, "rejected": user + bad}])
    explicit = write(tmp_path / "e.jsonl", [{"prompt": user, "chosen": good, "rejected": bad}])
    a, b = load_pairs(implicit, tokenizer, Truncation(64)), load_pairs(explicit, tokenizer, Truncation(64))
    assert a.prompt[0].tolist() == b.prompt[0].tolist() and a.chosen[0].tolist() == b.chosen[0].tolist()
    rendered = tokenizer.apply_chat_template(user, add_generation_prompt=True)
    assert tokenizer.decode(a.prompt[0].tolist()) == rendered
    assert tokenizer.decode(a.chosen[0].tolist()) == "Paris" + tokenizer.special_tokens["eos_token"] + "\n"


def test_truncation_keeps_the_prompt_end_then_the_sequence_start(tmp_path, tok_dir, capsys):
    rows = [{"prompt": "abcdefghij", "chosen": "XYZ", "rejected": "Q"}]
    tokenizer = load_tokenizer(tok_dir)
    full = load_pairs(write(tmp_path / "t.jsonl", rows), tokenizer, Truncation(64))
    assert "cut to" not in capsys.readouterr().out
    cut = load_pairs(tmp_path / "t.jsonl", tokenizer, Truncation(max_seq_len=6, max_prompt_len=4))
    assert cut.lengths().tolist() == [6 + 4 + 2]  # chosen cut at 6, rejected 4 + 1 + EOS
    assert [line for line in capsys.readouterr().out.splitlines() if "cut to" in line] == [
        f"tokens: {tmp_path / 't.jsonl'}: 1 of 1 rows cut to --max-seq-len 6, dropping 33.3% of the completion tokens "
        "(2 of 6); the longest row has 8 tokens (--max-seq-len 8 keeps every row whole)"
    ]
    batch = cut.collate([0], pad_id=0)
    prompt, chosen = full.prompt[0].tolist(), full.chosen[0].tolist()
    assert batch["input_ids"][0].tolist() == (prompt[-4:] + chosen)[:6]
    assert batch["completion_tokens"].tolist() == [2, 2]


BAD = [
    ({"prompt": "p", "chosen": "a"}, "line 2: no 'rejected' field"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "line 2: 'chosen' equals 'rejected'"),
    ({"prompt": "p", "chosen": "a", "rejected": 3}, "line 2: 'rejected' must be a string like the prompt"),
    ({"chosen": "a", "rejected": "b"}, "line 2: no 'prompt' field; string pairs need one"),
    (
        {
            "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}],
        },
        "line 2: 'chosen' and 'rejected' do not begin with the same prompt messages",
    ),  # fmt: skip
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "line 2: 'margin' must be a finite number"),
]


@pytest.mark.parametrize("row,message", BAD)
def test_a_bad_row_is_one_line_naming_it(tmp_path, tok_dir, row, message):
    path = write(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(NibbleError) as err:
        load_pairs(path, load_tokenizer(tok_dir), Truncation(64))
    assert message in str(err.value) and "--skip-bad-rows" in str(err.value)
    assert "\n" not in str(err.value)


def test_skip_bad_rows_counts_and_leaves_them_out(tmp_path, tok_dir, capsys):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] + [row for row, _ in BAD]
    rows.append({"prompt": "a very long prompt indeed", "chosen": "a", "rejected": "b"})
    data = load_pairs(write(tmp_path / "s.jsonl", rows), load_tokenizer(tok_dir), Truncation(12), skip_bad_rows=True)
    assert data.lines.tolist() == [1]
    out = capsys.readouterr().out
    assert "skipped 6 bad rows" in out and "skipped 1 bad row " in out
    long = write(tmp_path / "long.jsonl", [rows[0], rows[-1]])
    with pytest.raises(NibbleError, match=r"line 2: the prompt leaves no completion token within max_seq_len 12"):
        load_pairs(long, load_tokenizer(tok_dir), Truncation(12))


def test_kto_rows_and_their_mismatched_kl_sequences(tmp_path, tok_dir):
    rows = [{"prompt": "1+1=", "completion": "2", "label": True}, {"prompt": "2+2=", "completion": "5", "label": False},
            {"prompt": "3+3=", "completion": "6", "label": True}]  # fmt: skip
    tokenizer = load_tokenizer(tok_dir)
    data = load_unpaired(write(tmp_path / "k.jsonl", rows), tokenizer, Truncation(64))
    assert data.label.tolist() == [1, 0, 1]
    batch = data.collate([0, 1, 2], pad_id=0)
    assert batch["input_ids"].shape[0] == 3 and batch["desirable"].tolist() == [True, False, True]
    # the KL sequences: row i's prompt with the completion of row i - 1 (TRL's rotation), also in a shuffled batch
    batch = data.collate([1, 0], pad_id=0)
    kl = [batch["kl_input_ids"][r][batch["kl_attention_mask"][r].bool()].tolist() for r in range(2)]
    assert kl == [
        data.prompt[1].tolist() + data.completion[0].tolist(),
        data.prompt[0].tolist() + data.completion[2].tolist(),
    ]
    with pytest.raises(NibbleError, match=r"line 1: 'label' must be true \(desirable\) or false"):
        load_unpaired(write(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "c", "label": 1}]), tokenizer,
                      Truncation(64))  # fmt: skip


PAIRS_UNDER_LIMIT = """
import json, resource, sys
from nibble.data.preference import Truncation, load_pairs
from nibble.io.tokenizer import load_tokenizer

tok, small, big, row_bytes = sys.argv[1:]
tokenizer = load_tokenizer(tok)
load_pairs(small, tokenizer, Truncation(16, 8))
held = int([line for line in open("/proc/self/status") if line.startswith("VmData")][0].split()[1]) * 1024
limit = held + 64 * int(row_bytes) + 64 * 2**20  # (64 MiB: one window's encoding)
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
data = load_pairs(big, tokenizer, Truncation(16, 8))
print("LOADED " + json.dumps([len(data), len(data.prompt[1]), len(data.chosen[1]), len(data.rejected[1])]))
"""


@pytest.mark.slow
def test_a_long_pair_is_tokenized_in_memory_linear_in_its_tokens(tmp_path, tok_dir):
    """A 2 MB prompt, tokenized three times as TRL does (alone, with each completion), one token per byte: in
    windows into compact arrays, within 64x the row plus 64 MiB for a window under RLIMIT_DATA (whole encodings
    and Python lists took ~310x), with the lengths of whole encodings."""
    import os
    import subprocess
    import sys

    small = write(tmp_path / "small.jsonl", [{"prompt": "Q", "chosen": "yes", "rejected": "no"}])
    row_bytes = 2 * 2**20
    long = {"prompt": "word " * (row_bytes // 5), "chosen": " fine", "rejected": " bad"}
    big = write(tmp_path / "big.jsonl", [{"prompt": "Q", "chosen": "yes", "rejected": "no"}, long])
    env = {**os.environ, "NIBBLE_TOKEN_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-c", PAIRS_UNDER_LIMIT, tok_dir, small, big, row_bytes]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    tokenizer = load_tokenizer(tok_dir)
    eos = tokenizer.special_tokens["eos_token"]
    prompt = len(tokenizer.encode(long["prompt"], add_special_tokens=False))
    chosen = len(tokenizer.encode(long["prompt"] + long["chosen"] + eos, add_special_tokens=False)) - prompt
    rejected = len(tokenizer.encode(long["prompt"] + long["rejected"] + eos, add_special_tokens=False)) - prompt
    assert json.loads(result.stdout.split("LOADED ", 1)[1]) == [2, prompt, chosen, rejected]
