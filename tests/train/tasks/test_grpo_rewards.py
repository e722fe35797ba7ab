"""GRPO rewards: the built-ins' parse rules, weighted sums, user functions and their failures."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from nibble.errors import NibbleError
from nibble.train.tasks.grpo_rewards import RewardError, build_rewards, check_columns, score
from nibble.train.tasks.json_schema import schema_errors, validates

COMPLETIONS = [
    "2 + 3 = 5, so the answer is 5.",
    "I think \\boxed{\\frac{1}{2}} or rather \\boxed{1,000}",
    "<think>hmm</think><answer> 42 </answer>",
    "no answer here",
]


def rewards_of(entries, completions=COMPLETIONS, **columns):
    found = build_rewards(entries)
    return score(found, ["p"] * len(completions), completions, columns)


@pytest.mark.parametrize(
    ("spec", "answers", "expected"),
    [
        ({"type": "exact"}, ["5", "1000", "42.0", "0"], [1, 1, 1, 0]),  # numbers by value, commas dropped
        ({"type": "exact", "parse": "boxed"}, ["x", "1,000", "42", "x"], [0, 1, 0, 0]),  # the last box only
        ({"type": "exact", "parse": "tag"}, ["5", "5", "42", "5"], [0, 0, 1, 0]),
        ({"type": "exact", "parse": "regex", "pattern": r"answer is (\d+)"}, ["5", "1", "42", "1"], [1, 0, 0, 0]),
        ({"type": "exact", "parse": "text"}, ["x", "x", "x", "no answer here"], [0, 0, 0, 1]),
        ({"type": "numeric", "tolerance": 0.5}, ["5.4", "999.6", "41", "1"], [1, 1, 0, 0]),
        ({"type": "numeric", "tolerance": 0.01, "relative": True}, ["5.04", "1009", "42.5", "1"], [1, 1, 0, 0]),
    ],
)
def test_answer_rewards(spec, answers, expected):
    per_function, total = rewards_of([spec], answer=answers)
    assert per_function.shape == (4, 1)
    assert total.tolist() == expected


def test_format_length_json_and_weighted_sum():
    completions = ['{"name": "a", "age": 3}', '{"name": "a", "age": -1}', "<answer>1</answer>", '{"age": 2}']
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    entries = [
        {"type": "json", "schema": schema, "weight": 2.0},
        {"type": "regex", "pattern": r"<answer>.*</answer>", "full": True},
        {"type": "length", "target": 10, "penalty": 0.5, "weight": 0.1},
    ]
    per_function, total = rewards_of(entries, completions)
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.float64)
    torch.testing.assert_close(per_function[:, 0], torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(per_function[:, 1], torch.tensor([0, 0, 1.0, 0], dtype=torch.float64))
    torch.testing.assert_close(per_function[:, 2], -0.5 * (lengths - 10).abs())
    torch.testing.assert_close(total, 2 * per_function[:, 0] + per_function[:, 1] + 0.1 * per_function[:, 2])


@pytest.mark.parametrize(
    ("value", "valid"),
    [([1, 2.0], True), ([1, 2.5], False), ([True], False), ([], False), ([1, 2, 3, 4], False), ("ab", False)],
)
def test_schema_arrays_and_integers(value, valid):
    assert validates(value, {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}) is valid


def test_schema_keywords_it_cannot_check_are_refused():
    assert schema_errors({"type": "object", "properties": {"a": {"oneOf": []}}}) == [
        "#/properties/a uses 'oneOf', which this validator does not check"
    ]
    with pytest.raises(NibbleError, match="'rewards' entry 0: 'schema' #/properties/a uses 'oneOf'"):
        build_rewards([{"type": "json", "schema": {"properties": {"a": {"oneOf": []}}}}])


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "unit_rewards.py").write_text(
        textwrap.dedent(
            """
            def brevity(prompts, completions, answer, **_):
                return [1.0 / (1 + len(c)) + (a == "x") for c, a in zip(completions, answer)]

            def broken(prompts, completions, **_):
                return [1.0, float("nan")]

            def raising(prompts, completions, **_):
                raise ValueError("no scores today")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("unit_rewards", None)


def test_user_function_is_batched_and_weighted(user_module):
    assert "unit_rewards" not in sys.modules  # imported only when named
    per_function, total = rewards_of([{"type": "unit_rewards:brevity", "weight": 3}], ["ab", "c"], answer=["x", "y"])
    assert "unit_rewards" in sys.modules
    torch.testing.assert_close(total, torch.tensor([3 * (1 / 3 + 1), 3 * 0.5], dtype=torch.float64))


@pytest.mark.parametrize(
    ("target", "message", "row"),
    [
        ("unit_rewards:broken", "reward unit_rewards:broken returned nan for completion 1", 1),
        ("unit_rewards:raising", "reward unit_rewards:raising raised ValueError: no scores today", None),
    ],
)
def test_failing_rewards_name_function_and_row(user_module, target, message, row):
    with pytest.raises(RewardError, match=message) as caught:
        rewards_of([target], ["a", "b"])
    assert (caught.value.function, caught.value.row) == (target, row)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "needs 'rewards'"),
        (["bogus"], "type 'bogus' is not a reward"),
        ([{"type": "exact", "parse": "first"}], "'parse' 'first'"),
        (["nowhere_xyz:fn"], "cannot import"),
        ([{"type": "regex", "pattern": "("}], "not a regular expression"),
        ([{"type": "regex"}], "bad settings"),
        ([{"type": "exact", "weight": "high"}], "'weight'"),
    ],
)
def test_bad_reward_config_is_one_line(entries, message):
    with pytest.raises(NibbleError, match=message):
        build_rewards(entries)


def test_missing_column_is_named():
    with pytest.raises(NibbleError, match="column 'answer'"):
        rewards_of(["exact"])


def test_names_are_unique():
    names = [r.name for r in build_rewards(["exact", {"type": "exact", "parse": "boxed"}, "numeric", "exact"])]
    assert names == ["exact", "exact_2", "numeric", "exact_3"]


def test_columns_a_built_in_reads_are_checked_against_the_data():
    rewards = build_rewards([{"type": "numeric", "column": "solution"}, {"type": "length", "target": 3}])
    check_columns(rewards, ["solution"], "data.jsonl")
    with pytest.raises(NibbleError, match="data.jsonl: reward numeric reads column 'solution', which the rows lack"):
        check_columns(rewards, ["answer"], "data.jsonl")
