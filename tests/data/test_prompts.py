"""Format instruction and SFT targets: the target shape satisfies ALGORITHM.md's format rule."""

import re

import pytest

from megatron_selfjudge.data.prompts import (FORMAT_INSTRUCTION, INSTRUCTIONS, SHORT_INSTRUCTION,
                                             build_prompt_text, format_response, get_instruction,
                                             sft_target, strip_image_tags)
from megatron_selfjudge.data.synthetic import make_synthetic_splits
from megatron_selfjudge.data.tokenizer import CharTokenizer

# ALGORITHM.md section 3: the whole response must match this (dot matches newline).
FORMAT_RULE = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)


def test_targets_follow_the_format_rule():
    exs = make_synthetic_splits(seed=9, n_sft=8, n_unlabeled=0, n_test=0)["train_sft"]
    for ex in exs:
        target = sft_target(ex)
        assert FORMAT_RULE.fullmatch(target)
        assert target.endswith("\\boxed{" + ex.answer + "}")
        # The tiny default allows 32 response tokens, EOS included.
        assert len(CharTokenizer().encode(target)) + 1 <= 32
    assert format_response("a\nb", "\\frac{1}{2}") == "<think>a\nb</think>\\boxed{\\frac{1}{2}}"


def test_format_response_rejects_broken_targets():
    with pytest.raises(ValueError, match="reasoning"):
        format_response("<think>x", "1")
    with pytest.raises(ValueError, match="answer"):
        format_response("x", "1}")
    with pytest.raises(ValueError, match="answer"):
        format_response("x", "}{")


def test_instructions_name_the_format():
    for text in (FORMAT_INSTRUCTION, SHORT_INSTRUCTION):
        assert "<think>" in text and "</think>" in text and "\\boxed{" in text
    assert get_instruction("short") == SHORT_INSTRUCTION and get_instruction("none") == ""
    assert set(INSTRUCTIONS) == {"full", "short", "mmupt", "none"}
    with pytest.raises(ValueError, match="instruction"):
        get_instruction("long")


def test_prompt_text_and_image_tags():
    assert build_prompt_text("  Add.  ", " Go.") == "Add. Go."
    assert strip_image_tags("<image>Find x.") == "Find x."
    assert strip_image_tags("Compare <image1> and <image2>  now") == "Compare and now"
    with pytest.raises(TypeError, match="question"):
        build_prompt_text(None)
