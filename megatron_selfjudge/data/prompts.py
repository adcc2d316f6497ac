"""The answer-format instruction appended to every question, and SFT target texts.

ALGORITHM.md section 1: the policy reasons inside ``<think>...</think>`` and puts its final
answer right after it as ``\\boxed{ANSWER}``. ``FORMAT_INSTRUCTION`` asks for that in full
sentences (for instruction-tuned models); ``SHORT_INSTRUCTION`` is a compact version for
the tiny character-level policy, whose whole prompt must fit in a few dozen tokens.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .synthetic import Example

FORMAT_INSTRUCTION = (
    " Work the problem out step by step between <think> and </think>. Immediately after"
    " </think>, write only the final answer, wrapped as \\boxed{ANSWER}."
)
SHORT_INSTRUCTION = " Reply <think>..</think>\\boxed{}."
# What MM-UPT appends to each question (DATASETS.md); kept for reproducing that baseline.
MMUPT_INSTRUCTION = " Please reason step by step, and put your final answer within \\boxed{}."

INSTRUCTIONS = {"full": FORMAT_INSTRUCTION, "short": SHORT_INSTRUCTION, "mmupt": MMUPT_INSTRUCTION,
                "none": ""}

_IMAGE_TAG = re.compile(r"<image\d*>")


def get_instruction(name: str) -> str:
    """The instruction text registered under name ('full', 'short', 'mmupt', 'none')."""
    if name not in INSTRUCTIONS:
        raise ValueError(f"instruction: unknown name {name!r}; choose one of {sorted(INSTRUCTIONS)}")
    return INSTRUCTIONS[name]


def strip_image_tags(question: str) -> str:
    """The question without ``<image>``/``<imageN>`` tags (images travel as placeholder tokens)."""
    return " ".join(_IMAGE_TAG.sub(" ", question).split())


def build_prompt_text(question: str, instruction: str = FORMAT_INSTRUCTION) -> str:
    """Question text followed by the format instruction."""
    if not isinstance(question, str):
        raise TypeError(f"question: expected str, got {type(question).__name__}")
    return question.strip() + instruction


def format_response(reasoning: str, answer: str) -> str:
    """The target response shape: ``<think>reasoning</think>\\boxed{answer}``."""
    if "<think>" in reasoning or "</think>" in reasoning:
        raise ValueError("reasoning: must not contain <think> or </think> tags")
    if not _balanced(answer):
        # An unbalanced brace would end the box early for the balanced-brace answer extractor.
        raise ValueError(f"answer: braces must be balanced inside \\boxed{{}}, got {answer!r}")
    return f"<think>{reasoning}</think>\\boxed{{{answer}}}"


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return False
    return depth == 0


def sft_target(example: "Example") -> str:
    """SFT target text of a synthetic example (its short reasoning trace and answer)."""
    return format_response(example.reasoning, example.answer)
