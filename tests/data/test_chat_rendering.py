"""Chat rows as Qwen users hold them: reasoning, tool calls, many turns, the thinking switch. A Qwen3-style
template (reasoning of turns before the last user message dropped, enable_thinking, tool calls) and a template
with {% generation %} blocks, both written here; masks compared with transformers', rows decoded to text."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

import helpers
from gguf_files import CHATML
from nibble.data.chat import THINKING, RenderOptions, chat_rows, parse_messages, resolve_thinking
from nibble.data.instruct import conversation, load_instruct
from nibble.errors import NibbleError
from nibble.io.tokenizer import load_tokenizer
from nibble.model.generate import prompt_ids

# Qwen3's behaviour, written from its documentation: a system block that lists the tools; an assistant turn
# after the last user message shows its reasoning (the final one always, as an empty think block if it has
# none), earlier ones their answer only; tool calls as <tool_call> JSON; consecutive tool results in one user
# turn; enable_thinking=false opens the generation prompt with an empty think block.
QWEN3_STYLE = (
    "{%- set ns = namespace(query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    '{{- \'\\n</tools>\\nCall one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\\n\' }}'
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- set content = m.content %}{%- set reasoning = '' %}"
    "{%- if m.reasoning_content is string %}{%- set reasoning = m.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
    "{%- set content = content.split('</think>')[-1] %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.query and (loop.last or reasoning) %}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- content.lstrip('\\n') }}"
    "{%- for call in m.tool_calls or [] %}"
    "{%- set f = call.function or call %}"
    "{%- if not loop.first or content %}{{- '\\n' }}{%- endif %}"
    '{{- \'<tool_call>\\n{"name": "\' + f.name + \'", "arguments": \' }}'
    "{{- f.arguments if f.arguments is string else f.arguments | tojson }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# ChatML whose assistant text (content and end-of-turn, not the newline after it) is a generation block.
GENERATION = (
    "{% for m in messages %}{% if m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_ROW = {
    "tools": TOOLS,
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "reasoning_content": "I should ask the tool.",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "Sunny and 21 C."},
    ],
}
TWO_QUESTIONS = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4."},
    {"role": "user", "content": "Times 3?"},
    {"role": "assistant", "reasoning_content": "4 times 3.", "content": "12."},
]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return load_tokenizer(helpers.write_tokenizer(tmp_path_factory.mktemp("qwen"), chat_template=QWEN3_STYLE))


def targets(tokenizer, row) -> list[str]:
    """The decoded runs of consecutive targets of a row."""
    runs, run = [], []
    for token, target in zip(row.ids.tolist(), row.mask.tolist(), strict=True):
        if target:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs + ([tokenizer.decode(run)] if run else [])


def rows_of(tokenizer, messages, tools=None, **options):
    return chat_rows(tokenizer, parse_messages(messages, "messages", "row"), "row", tools, RenderOptions(**options))


def test_generation_blocks_give_transformers_assistant_masks(tmp_path):
    path = helpers.write_tokenizer(tmp_path, chat_template=GENERATION)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass?"},
        {"role": "assistant", "content": "Green, mostly."},
    ]
    reference = AutoTokenizer.from_pretrained(path).apply_chat_template(
        chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    (row,) = rows_of(load_tokenizer(path), chat)
    assert row.ids.tolist() == reference["input_ids"]
    assert row.mask.tolist() == reference["assistant_masks"]
    assert targets(load_tokenizer(path), row) == ["Blue.<|im_end|>", "Green, mostly.<|im_end|>"]  # no newline


def test_a_multi_turn_reasoning_conversation_becomes_one_row_per_context(qwen, tmp_path, capsys):
    first, last = rows_of(qwen, TWO_QUESTIONS)
    q1, q2 = "<|im_start|>user\n2+2?<|im_end|>\n", "<|im_start|>user\nTimes 3?<|im_end|>\n"
    # the first answer in the context inference gives it: the conversation up to it, its reasoning trained
    assert qwen.decode(first.ids) == q1 + "<|im_start|>assistant\n<think>\nTwo and two.\n</think>\n\n4.<|im_end|>\n"
    assert targets(qwen, first) == ["<think>\nTwo and two.\n</think>\n\n4.<|im_end|>\n"]
    # the second after the history as the template renders it (no reasoning), the first answer context only
    reference = AutoTokenizer.from_pretrained(qwen.path).apply_chat_template(TWO_QUESTIONS, tokenize=False)
    assert (
        qwen.decode(last.ids)
        == reference
        == (
            q1
            + "<|im_start|>assistant\n4.<|im_end|>\n"
            + q2
            + "<|im_start|>assistant\n<think>\n4 times 3.\n</think>\n\n"
            "12.<|im_end|>\n"
        )
    )
    assert targets(qwen, last) == ["<think>\n4 times 3.\n</think>\n\n12.<|im_end|>\n"]
    (only,) = rows_of(qwen, TWO_QUESTIONS, train_turns="last")
    assert only.ids.tolist() == last.ids.tolist() and only.mask.tolist() == last.mask.tolist()

    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": TWO_QUESTIONS}) + "\n" + json.dumps({"messages": TWO_QUESTIONS[:2]}) + "\n")
    data = load_instruct(path, qwen)
    assert data.lines.tolist() == [1, 1, 2]
    said = [line for line in capsys.readouterr().out.splitlines() if "training rows" in line]
    assert len(said) == 1 and said[0].startswith("chats.jsonl: 2 conversations became 3 training rows")
    assert len(load_instruct(path, qwen, options=RenderOptions(train_turns="last"))) == 2


def test_the_thinking_modes_give_the_documented_token_streams(qwen, tmp_path):
    direct = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    reasoned = [direct[0], {"role": "assistant", "reasoning_content": "Greet back.", "content": "Hello."}]
    prompt, block = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<think>\nGreet back.\n</think>\n\n"
    empty = "<think>\n\n</think>\n\n"
    assert resolve_thinking(qwen, None) == "empty"
    expected = {  # (answer without reasoning, answer with reasoning): (text, targets)
        "keep": ((prompt + empty + "Hello.<|im_end|>\n", ["Hello.<|im_end|>\n"]),
                 (prompt + block + "Hello.<|im_end|>\n", [block + "Hello.<|im_end|>\n"])),
        "empty": ((prompt + empty + "Hello.<|im_end|>\n", [empty + "Hello.<|im_end|>\n"]),
                  (prompt + block + "Hello.<|im_end|>\n", [block + "Hello.<|im_end|>\n"])),
        "drop": ((prompt + empty + "Hello.<|im_end|>\n", ["Hello.<|im_end|>\n"]),
                 (prompt + empty + "Hello.<|im_end|>\n", ["Hello.<|im_end|>\n"])),
    }  # fmt: skip
    for thinking, streams in expected.items():
        for messages, (text, trained) in zip((direct, reasoned), streams, strict=True):
            (row,) = rows_of(qwen, messages, thinking=thinking)
            assert (qwen.decode(row.ids), targets(qwen, row)) == (text, trained), thinking
    # the thinking-off prompt is what `generate --thinking off` feeds: keep trains the answer after it
    assert qwen.decode(prompt_ids(qwen, "Hi", thinking=False)) == prompt + empty
    assert qwen.decode(prompt_ids(qwen, "Hi", thinking=True)) == prompt == qwen.decode(prompt_ids(qwen, "Hi"))

    # a template that does not render reasoning gets the think blocks in the content
    chatml = load_tokenizer(helpers.write_tokenizer(tmp_path, chat_template=CHATML))
    assert resolve_thinking(chatml, None) == "keep"
    for thinking, messages, answer in [
        ("keep", reasoned, block + "Hello."),
        ("keep", direct, "Hello."),
        ("empty", direct, empty + "Hello."),
        ("drop", reasoned, "Hello."),
    ]:
        (row,) = rows_of(chatml, messages, thinking=thinking)
        assert targets(chatml, row) == [answer + "<|im_end|>\n"], thinking


def test_changing_thinking_does_not_reuse_the_token_cache(qwen, tmp_path):
    path = tmp_path / "one.jsonl"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    path.write_text(json.dumps({"messages": chat}))
    counts = {t: load_instruct(path, qwen, options=RenderOptions(thinking=t)).target_tokens() for t in THINKING}
    assert counts["empty"] == counts["keep"] + len("<think>\n\n</think>\n\n")
    assert load_instruct(path, qwen, options=RenderOptions(thinking="keep")).target_tokens() == counts["keep"]


def test_tool_call_rows_render_as_the_template_renders_them(qwen, tmp_path):
    (row,) = rows_of(qwen, TOOL_ROW["messages"], TOOL_ROW["tools"])
    as_given = json.loads(json.dumps(TOOL_ROW["messages"]))
    as_given[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}  # transformers' documented form
    as_given[1]["content"] = ""
    reference = AutoTokenizer.from_pretrained(qwen.path)
    text = reference.apply_chat_template(as_given, tools=TOOLS, tokenize=False)
    assert qwen.decode(row.ids) == text and row.ids.tolist() == reference(text, add_special_tokens=False).input_ids
    assert json.dumps(TOOLS[0]) in text
    assert targets(qwen, row) == [
        '<think>\nI should ask the tool.\n</think>\n\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}'
        "\n</tool_call><|im_end|>\n",
        "<think>\n\n</think>\n\nSunny and 21 C.<|im_end|>\n",
    ]
    # the same row from a file, with the tools stored as a JSON string (as datasets often hold them)
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({**TOOL_ROW, "tools": json.dumps(TOOLS)}) + "\n")
    assert load_instruct(path, qwen, max_seq_len=4096).ids[0].tolist() == row.ids.tolist()


@pytest.mark.parametrize(
    ("messages", "extra", "message"),
    [
        ([{"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}], {},
         "line 2: message 0 is a tool result but no assistant message before it calls a tool"),
        ([{"role": "user", "content": "q", "reasoning_content": "hm"}, {"role": "assistant", "content": "a"}], {},
         "line 2: message 0 \\(user\\) has 'reasoning_content'; only assistant messages carry it"),
        ([{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}], {},
         "line 2: message 0 has role 'robot'; roles are system, user, assistant, tool"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"name": "f", "arguments": "{x"}]}],
         {}, "line 2: message 1 tool call 0 \\(f\\): 'arguments' is not JSON"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], {"tools": {"name": "f"}},
         "line 2: 'tools' must be a list of JSON schema objects"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think>a",
                                             "reasoning_content": "r"}], {},
         "line 2: message 1 has both 'reasoning_content' and a <think> block"),
    ],
)  # fmt: skip
def test_bad_chat_rows_are_one_line_naming_the_row(qwen, tmp_path, messages, extra, message):
    path = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": messages, **extra}) + "\n")
    with pytest.raises(NibbleError, match=message) as caught:
        load_instruct(path, qwen)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_generate_thinking_needs_the_chat_template(qwen):
    with pytest.raises(NibbleError, match="--thinking needs the chat template"):
        prompt_ids(qwen, "Hi", chat=False, thinking=True)


def test_the_readme_row_becomes_the_rows_the_readme_shows(qwen):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "reasoning_content": "I need the weather tool.", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": "sunny, 21 C"},
        {"role": "assistant", "reasoning_content": "The tool says sunny.", "content": "Sunny, 21 C."},
        {"role": "user", "content": "And tomorrow?"},
        {"role": "assistant", "content": "I can only see today."},
    ]
    call = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
    first, second = rows_of(qwen, messages, TOOLS)
    assert targets(qwen, first) == [
        "<think>\nI need the weather tool.\n</think>\n\n" + call,
        "<think>\nThe tool says sunny.\n</think>\n\nSunny, 21 C.<|im_end|>\n",
    ]
    assert targets(qwen, second) == ["<think>\n\n</think>\n\nI can only see today.<|im_end|>\n"]
    assert "I need the weather tool." not in qwen.decode(second.ids)
    dropped = rows_of(qwen, messages, TOOLS, thinking="drop")
    assert [targets(qwen, r) for r in dropped] == [
        [call],
        ["Sunny, 21 C.<|im_end|>\n"],
        ["I can only see today.<|im_end|>\n"],
    ]
    # a TRL prompt/completion row may split a call from its result
    row = {"prompt": messages[:2], "completion": messages[2:4]}
    assert [m["role"] for m in conversation(row, "f.jsonl", 1)] == ["user", "assistant", "tool", "assistant"]


TOOL_CALL = {"name": "weather", "arguments": {"city": "Paris"}}


def test_a_val_split_keeps_the_rows_of_a_conversation_together(qwen, tmp_path):
    from nibble.train.config import TrainConfig
    from nibble.train.tasks.instruct import InstructTask

    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": TWO_QUESTIONS}) + "\n" for _ in range(10)))
    config = TrainConfig(task="instruct", data=str(path), val_split=0.3, max_seq_len=512)
    run = InstructTask().setup(config, tmp_path, qwen)
    train, val = set(run.train.lines.tolist()), set(run.val.lines.tolist())
    assert len(run.train) + len(run.val) == 20 and len(val) == 3 and not train & val


def test_data_show_marks_the_trained_tokens_and_where_history_is_rewritten(qwen, tmp_path, capsys):
    from nibble.cli.main import main

    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": TWO_QUESTIONS}) + "\n" + json.dumps({"messages": TWO_QUESTIONS}) + "\n")
    assert main(["data", "show", "--model", str(qwen.path), "--data", str(path), "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "thinking: empty, train turns: all" in out and "line 2" not in out
    assert f"{path} line 1: 2 training rows (the template rewrites history: message 1 (assistant) renders as" in out
    assert "-- row 1: 98 tokens, 44 trained\n" in out
    assert "<|im_start|>assistant\n[[<think>\nTwo and two.\n</think>\n\n4.<|im_end|>\n]]" in out
    assert "<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>user" in out  # the history row, not trained
    assert main(["data", "show", "--model", str(qwen.path), "--data", str(path), "--thinking", "drop"]) == 0
    assert "thinking: drop" in capsys.readouterr().out


def test_a_conversation_ending_after_its_last_answer_trains_only_real_contexts(qwen):
    # ends with a user message: the whole text trains nothing (its answers are trained where they were last)
    messages = [*TWO_QUESTIONS[:2], {"role": "user", "content": "Thanks."}]
    (row,) = rows_of(qwen, messages)
    assert targets(qwen, row) == ["<think>\nTwo and two.\n</think>\n\n4.<|im_end|>\n"]
    assert "Thanks." not in qwen.decode(row.ids)


def test_data_show_of_a_task_that_cannot_show_its_data_is_one_line(qwen, tmp_path, capsys):
    from nibble.cli.main import main

    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": TWO_QUESTIONS}) + "\n")
    assert main(["data", "show", "--task", "classify", "--model", str(qwen.path), "--data", str(path)]) == 2
    assert (
        capsys.readouterr().err
        == "error: nibble data show: task 'classify' cannot show its data; use --task instruct\n"
    )
    assert main(["data", "show", "--task", "instruct", "--model", str(qwen.path), "--data", str(path)]) == 0
