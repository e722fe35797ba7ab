"""Patterns from adapter files: the automaton matches exactly what re.fullmatch matches, and a pattern that
makes re backtrack exponentially is matched in linear time or refused in one line."""

import random
import re

import pytest

from nibble.errors import NibbleError
from nibble.io.pattern import MAX_PATTERN, FullMatch

NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.11.self_attn.v_proj",
    "model.layers.3.mlp.down_proj",
    "score",
    "",
    "a",
    "aaaa",
    "ab_1.c",
]
PIECES = [".", "a", "b", r"\d", r"\.", "[a-c_]", "[^.]", r"\w", "q_proj", "model", "(v|q)", "(?:ab|a)", "^", "$"]
QUANTIFIERS = ["", "", "*", "+", "?", "{2}", "{1,3}", "*?"]


def _random_pattern(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 6)):
        piece = rng.choice(PIECES)
        if piece not in ("^", "$"):
            piece = f"(?:{piece})" if len(piece) > 1 and not piece.startswith(("[", "(", "\\")) else piece
            piece += rng.choice(QUANTIFIERS)
        parts.append(piece)
    return "".join(parts) if rng.random() < 0.8 else "|".join(parts)


def test_matches_what_re_fullmatch_matches_fuzzed():
    rng = random.Random(0)
    for _ in range(400):
        pattern = _random_pattern(rng)
        ours = FullMatch(pattern, "p")
        for name in NAMES + ["".join(rng.choice("ab._1q") for _ in range(rng.randint(0, 8)))]:
            assert ours(name) == bool(re.fullmatch(pattern, name)), (pattern, name)


def test_peft_style_patterns():
    match = FullMatch(r".*\.(q_proj|v_proj)", "p")
    assert match("model.layers.0.self_attn.q_proj") and not match("model.layers.3.mlp.down_proj")
    layer = FullMatch(r"model\.layers\.\d+\.self_attn\.v_proj", "p")
    assert layer("model.layers.11.self_attn.v_proj") and not layer("model.layers.x.self_attn.v_proj")


@pytest.mark.parametrize("pattern", ["(.*.*)*X", "(a+)+b", "(a|aa)*b", ".*" * 400 + "X"])
def test_a_catastrophic_pattern_is_matched_in_linear_time(pattern):
    match = FullMatch(pattern, "p")
    assert not match("a" * 300)  # with re: longer than the age of the universe


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"(a)\1", "backtracking-free"),
        ("(?=a)a", "backtracking-free"),
        ("(?i)q_proj", "inline flags"),
        ("(?:a{1000}){1000}", "automaton states"),
        ("x" * (MAX_PATTERN + 1), "characters long"),
        ("(a", "not a valid regular expression"),
        ("(" * 5000 + ")" * 5000, ""),
    ],
)
def test_what_has_no_automaton_is_one_line(pattern, why):
    with pytest.raises(NibbleError, match=f"^adapter_config.json: 'target_modules' .*{re.escape(why)}"):
        FullMatch(pattern, "adapter_config.json: 'target_modules'")
