"""Instruction data: the rendered ids equal transformers' chat tokenization, only assistant turns are targets,
ChatML stands in for a missing template, packing keeps labels, and every bad row is one line naming it."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

import helpers
from gguf_files import CHATML
from nibble.data.chat import chat_rows
from nibble.data.instruct import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    InstructData,
    conversation,
    default_system_prompt,
    encode_conversation,
    load_instruct,
    pack,
    parse_columns,
    resolve_chat_template,
    use_chat_template,
)
from nibble.errors import NibbleError
from nibble.io.tokenizer import load_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Colour of the sky?"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green, mostly."},
]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return helpers.write_tokenizer(tmp_path_factory.mktemp("chat"), chat_template=CHATML)


def targets(tokenizer, ids, labels) -> str:
    assert all(lab in (tok, IGNORE_INDEX) for tok, lab in zip(ids, labels, strict=True))
    return tokenizer.decode([lab for lab in labels if lab != IGNORE_INDEX])


def test_ids_are_transformers_chat_tokens_and_only_assistant_turns_are_targets(chat_dir):
    tokenizer = load_tokenizer(chat_dir)
    ids, labels = encode_conversation(tokenizer, CHAT)
    reference = AutoTokenizer.from_pretrained(chat_dir)
    text = reference.apply_chat_template(CHAT, tokenize=False)
    assert ids == reference(text, add_special_tokens=False).input_ids
    assert targets(tokenizer, ids, labels) == "Blue.<|im_end|>\nGreen, mostly.<|im_end|>\n"
    first = text.index("Blue.")
    assert tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX]) == (
        text[:first] + text[first + len("Blue.<|im_end|>\n") : text.index("Green")]
    )


def test_instruction_rows_and_the_chatml_fallback_end_turns_with_eos(tmp_path):
    tokenizer = load_tokenizer(helpers.write_tokenizer(tmp_path))
    assert tokenizer.chat_template is None and use_chat_template(tokenizer)
    assert not use_chat_template(tokenizer)
    messages = conversation({"instruction": "Add 2 and 2.", "response": "4", "system": "Math."}, "f.jsonl", 3)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    ids, labels = encode_conversation(tokenizer, messages)
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nMath.<eos>\n<|im_start|>user\nAdd 2 and 2.<eos>\n<|im_start|>assistant\n4<eos>\n"
    )
    assert targets(tokenizer, ids, labels) == "4<eos>\n"


def test_load_truncates_or_packs(chat_dir, tmp_path, capsys):
    tokenizer = load_tokenizer(chat_dir)
    rows = [{"instruction": "x" * n, "response": "y" * 5} for n in (3, 8, 1)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    full = load_instruct(path, tokenizer, max_seq_len=1000)
    assert full.lines.tolist() == [1, 2, 3] and full.target_tokens() == 3 * 16  # "yyyyy<|im_end|>\n", a token a byte
    cut = load_instruct(path, tokenizer, max_seq_len=60)  # the prompts take 51 to 58 tokens
    assert [len(ids) for ids in cut.ids] == [60, 60, 60] and cut.ids[0].tolist() == full.ids[0][:60].tolist()
    assert cut.target_tokens() == sum(60 - int(f) for f in full.first_target)  # every response runs past 60
    longest = max(len(ids) for ids in full.ids)
    dropped = full.target_tokens() - cut.target_tokens()
    assert [line for line in capsys.readouterr().out.splitlines(True) if "cut to" in line] == [
        f"tokens: {path}: 3 of 3 rows cut to --max-seq-len 60, dropping {100 * dropped / 48:.1f}% of the response "
        f"tokens ({dropped} of 48); the longest row has {longest} tokens (--max-seq-len {longest} keeps every row "
        "whole)\n"
    ]
    load_instruct(path, tokenizer, max_seq_len=longest)
    assert "cut to" not in capsys.readouterr().out  # nothing cut, nothing said
    packed = load_instruct(path, tokenizer, max_seq_len=50, packing=True)
    assert [len(ids) for ids in packed.ids][:-1] == [50] * (len(packed) - 1)
    assert sum(packed.ids.tolist(), []) == sum(full.ids.tolist(), [])
    assert sum((packed.labels(i).tolist() for i in range(len(packed))), []) == sum(
        (full.labels(i).tolist() for i in range(len(full))), []
    )
    starts = [packed.labels(i)[0] for i in range(len(packed))]  # a piece's first token predicts nothing
    assert packed.target_tokens() == full.target_tokens() - sum(t != IGNORE_INDEX for t in starts)
    with pytest.raises(NibbleError, match=r"rows.jsonl line 2: no response token within max_seq_len 55"):
        load_instruct(path, tokenizer, max_seq_len=55)


def test_pack_records_the_line_each_sequence_starts_in():
    data = InstructData.from_lists([[1, 2, 3], [4, 5], [6, 7, 8, 9]], [[1, 2, 3], [4, 5], [6, 7, 8, 9]], [10, 20, 30])
    packed = pack(data, 4)
    assert packed.ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9]] and packed.lines.tolist() == [10, 20, 30]
    batch = packed.collate([0, 2], pad_id=0)
    assert batch["labels"].tolist() == [[1, 2, 3, 4], [9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"text": "hi"}, r"line 2: no instruction schema matches the fields \(text\); expected 'messages', "),
        ({"instruction": "hi", "response": 3}, r"line 2: 'response' must be a string, got int"),
        ({"messages": []}, r"line 2: 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, r"line 2: message 0 must be an object with string 'role' and 'content'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"line 2: no message with role 'assistant'"),
    ],
)
def test_bad_rows_name_the_line(chat_dir, tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(NibbleError, match=message):
        load_instruct(path, load_tokenizer(chat_dir))


def test_a_template_that_rewrites_earlier_turns_trains_each_turn_in_its_own_context(tmp_path):
    # renders only the last assistant turn in full: earlier turns change once later ones follow
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[old]{% else %}"
        "<{{ m['role'] }}>{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tokenizer = load_tokenizer(helpers.write_tokenizer(tmp_path, chat_template=template))
    with pytest.raises(NibbleError, match="f.jsonl line 1: the chat template rewrites earlier turns; .* is 2 rows"):
        encode_conversation(tokenizer, CHAT, "f.jsonl line 1")
    first, last = chat_rows(tokenizer, CHAT)
    assert tokenizer.decode(first.ids) == "<system>Be brief.<user>Colour of the sky?<assistant>Blue."
    assert tokenizer.decode(last.ids) == (
        "<system>Be brief.<user>Colour of the sky?[old]<user>And grass?<assistant>Green, mostly."
    )
    assert tokenizer.decode(first.ids[first.mask == 1]) == "Blue."
    assert tokenizer.decode(last.ids[last.mask == 1]) == "Green, mostly."
    ids, labels = encode_conversation(tokenizer, CHAT[:3])
    assert targets(tokenizer, ids, labels) == "Blue."


S, Q, A = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Sky?"},
    {"role": "assistant", "content": "Blue."},
)


@pytest.mark.parametrize(
    ("row", "columns", "expected"),
    [
        ({"messages": [S, Q, A]}, None, [S, Q, A]),
        (
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "Sky?"},
                    {"from": "gpt", "value": "Blue."},
                ]
            },
            None,
            [S, Q, A],
        ),  # fmt: skip
        ({"instruction": "Sky?", "input": "", "output": "Blue.", "system": "Be brief."}, None, [S, Q, A]),
        ({"instruction": "Sky?", "input": None, "output": "Blue."}, None, [Q, A]),  # a null cell is no field
        (
            {"instruction": "Colour?", "input": "The sky.", "output": "Blue."},
            None,
            [{"role": "user", "content": "Colour?\n\nThe sky."}, A],
        ),
        ({"instruction": "Sky?", "response": "Blue.", "system": "Be brief."}, None, [S, Q, A]),
        ({"prompt": "Sky?", "completion": "Blue."}, None, [Q, A]),
        ({"prompt": [S, Q], "completion": [A]}, None, [S, Q, A]),
        ({"q": "Sky?", "a": "Blue.", "sys": "Be brief."}, "prompt=q, response=a, system=sys", [S, Q, A]),
        (
            {"q": "Colour?", "ctx": "The sky.", "a": "Blue."},
            "prompt=q,input=ctx,response=a",
            [{"role": "user", "content": "Colour?\n\nThe sky."}, A],
        ),  # fmt: skip
        ({"chat": [Q, A], "messages": "ignored"}, "messages=chat", [Q, A]),
    ],
)
def test_every_schema_reads_as_the_same_messages(row, columns, expected):
    assert conversation(row, "f.jsonl", 1, parse_columns(columns)) == expected


@pytest.mark.parametrize(
    ("row", "columns", "message"),
    [
        ({"question": "Sky?", "answer": "Blue."}, None,
         r"f.jsonl line 4: no instruction schema matches the fields \(question, answer\); expected 'messages', "
         r"'conversations' \(ShareGPT\).* or map the columns with --columns prompt=COL,response=COL"),
        ({"question": "Sky?"}, "prompt=question,response=answer", r"line 4: no column 'answer' \(fields: question\)"),
        ({"conversations": [{"from": "bot", "value": "hi"}]}, None, r"line 4: message 0 is from 'bot'; ShareGPT turns"),
        ({"prompt": "Sky?", "completion": 3}, None, r"line 4: 'completion' must be a string, got int"),
    ],
)  # fmt: skip
def test_rows_no_schema_fits_name_their_fields(row, columns, message):
    with pytest.raises(NibbleError, match=message):
        conversation(row, "f.jsonl", 4, parse_columns(columns))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("prompt", r"'prompt' is not ROLE=COLUMN"),
        ("query=q,response=a", r"unknown role 'query'; roles are prompt, response, system, input, messages"),
        ("prompt=a,prompt=b,response=c", r"role 'prompt' is mapped twice"),
        ("prompt=q", r"map both 'prompt' and 'response' \(or 'messages'\)"),
        ("messages=chat,system=s", r"'messages' names the whole conversation"),
    ],
)
def test_bad_column_mappings_are_one_line(spec, message):
    with pytest.raises(NibbleError, match=f"columns: {message}"):
        parse_columns(spec)


QWEN_STYLE = (
    "{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{% if not (m['role'] == 'system' and loop.first) %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SYSTEM_IN_FIRST_TURN = (  # a Llama 2 style template: the system text joins the first user turn
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ '[INST] <<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ ('' if loop.index0 > 0 and messages[0]['role'] == 'system' and loop.index0 == 1 "
    "else '[INST] ') + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' </s>' }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    ("template", "injected"),
    [(QWEN_STYLE, "You are a helpful assistant."), (CHATML, None), (SYSTEM_IN_FIRST_TURN, None)],
)
def test_a_default_system_prompt_is_found_by_rendering(tmp_path, template, injected):
    tokenizer = load_tokenizer(helpers.write_tokenizer(tmp_path, chat_template=template))
    assert default_system_prompt(tokenizer) == injected


def test_chat_templates_by_name_or_file(tmp_path):
    assert resolve_chat_template("chatml") == BUILTIN_TEMPLATES["chatml"]
    (tmp_path / "t.jinja").write_text(QWEN_STYLE)
    assert resolve_chat_template(str(tmp_path / "t.jinja")) == QWEN_STYLE
    with pytest.raises(
        NibbleError, match=r"--chat-template vicuna: no such file and not a built-in template \(chatml\)"
    ):
        resolve_chat_template("vicuna")


INSTRUCT_UNDER_LIMIT = """
import json, resource, sys
from nibble.data.instruct import read_instruct
from nibble.io.tokenizer import load_tokenizer

tok, small, big, row_bytes = sys.argv[1:]
tokenizer = load_tokenizer(tok)
read_instruct(small, tokenizer)
held = int([line for line in open("/proc/self/status") if line.startswith("VmData")][0].split()[1]) * 1024
limit = held + 24 * int(row_bytes) + 64 * 2**20  # (64 MiB: one window's encoding)
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
data = read_instruct(big, tokenizer)
print("LOADED " + json.dumps([[len(row) for row in data.ids], int(data.mask[1].sum())]), flush=True)
"""


@pytest.mark.slow
def test_a_long_conversation_is_tokenized_in_memory_linear_in_its_tokens(tmp_path):
    """A 4 MB assistant turn, one token per byte (the fixture's byte-level vocabulary, the worst case): the
    conversation is tokenized in windows into compact arrays, within 24x the row plus 64 MiB for a window under
    RLIMIT_DATA (the whole encoding and Python lists took ~350x), with the assistant turn as the targets."""
    import os
    import subprocess
    import sys

    tok = helpers.write_tokenizer(tmp_path / "tok", chat_template=CHATML)
    small = helpers.write_jsonl(tmp_path / "small.jsonl", [{"messages": CHAT}])
    row_bytes = 4 * 2**20
    answer = "word " * (row_bytes // 5)
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]
    big = helpers.write_jsonl(tmp_path / "big.jsonl", [{"messages": CHAT}, {"messages": turn}])
    env = {**os.environ, "NIBBLE_TOKEN_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-c", INSTRUCT_UNDER_LIMIT, tok, small, big, row_bytes]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lengths, targets = json.loads(result.stdout.split("LOADED ", 1)[1])
    reference = load_tokenizer(tok)
    rendered = reference.apply_chat_template(turn)
    assert lengths[1] == len(reference.encode(rendered, add_special_tokens=False))
    assert targets == len(reference.encode(rendered[rendered.index("word") :], add_special_tokens=False))
