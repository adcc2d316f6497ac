"""What the policy is asked when it writes new questions, and how its reply becomes a question.

MM-UPT's two synthesis strategies (ALGORITHM.md section 7); the wording here is this project's:

- ``in-context``: the image and an existing question about it; the policy writes a different
  question about the same image.
- ``direct``: the image alone; the policy writes a question about it.

Two prompt styles: ``full`` asks an instruction-following model for one question between
``<question>`` and ``</question>`` (a reply without a closed tag pair has no question);
``short`` is a compact cue for the tiny character-level policy, whose whole prompt must fit
in a few dozen tokens, and takes the whole reply (a leading ``Question:`` label dropped).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

STRATEGIES = ("in-context", "direct")
STYLES = ("full", "short")

_FULL_IN_CONTEXT = (
    "Here is a question someone asked about the image above:\n{question}\n"
    "Write one different question about the same image: a math problem that can be solved from what"
    " the image shows and that has a single short final answer. Do not solve it and give no hints."
    " Reply with the new question only, between <question> and </question>."
)
_FULL_DIRECT = (
    "Study the image above and write one math problem about it. The problem must be solvable from what"
    " the image shows and have a single short final answer. Do not solve it and give no hints."
    " Reply with the problem only, between <question> and </question>."
)
_SHORT_IN_CONTEXT = "{question} Another question:"
_SHORT_DIRECT = "A question about this image:"

_TAGGED_RE = re.compile(r"<question>(.*?)</question>", re.DOTALL)
_LABEL_RE = re.compile(r"^\s*(?:new\s+|another\s+)?(?:question|problem)\s*[:\-]\s*", re.IGNORECASE)


@dataclass(frozen=True)
class SynthPrompt:
    """One prompt style: the text of each strategy and whether the reply must be tagged."""

    style: str
    in_context: str
    direct: str
    tagged: bool

    def render(self, strategy: str, question: str) -> str:
        """The synthesis prompt text for one source row (question unused by `direct`)."""
        if strategy == "in-context":
            return self.in_context.format(question=question.strip())
        if strategy == "direct":
            return self.direct
        raise ValueError(f"strategy: unknown {strategy!r}; choose one of {STRATEGIES}")


PROMPTS = {
    "full": SynthPrompt("full", _FULL_IN_CONTEXT, _FULL_DIRECT, tagged=True),
    "short": SynthPrompt("short", _SHORT_IN_CONTEXT, _SHORT_DIRECT, tagged=False),
}


def prompt_style(name: str, instruction: str) -> SynthPrompt:
    """The style `name`; 'auto' follows the run's data.instruction ('short' for the tiny policy)."""
    if name == "auto":
        name = "short" if instruction == "short" else "full"
    if name not in PROMPTS:
        raise ValueError(f"prompt style: unknown {name!r}; choose auto or one of {STYLES}")
    return PROMPTS[name]


def parse_reply(text: str, finish_reason: str, tagged: bool) -> tuple[Optional[str], Optional[str]]:
    """(question, None) from the policy's reply, or (None, reason) when it holds none.

    Tagged: the content of the last closed ``<question>...</question>`` pair, so a reply cut
    after its closed pair still counts; an opened, unclosed pair is 'truncated' when the reply
    hit the token limit. Plain: the whole reply, which must have ended on a stop token.
    """
    if tagged:
        found = _TAGGED_RE.findall(text)
        if found:
            return found[-1], None
        if "<question>" in text and finish_reason == "length":
            return None, "truncated"
        return None, "no_question"
    if finish_reason == "length":
        return None, "truncated"
    return _LABEL_RE.sub("", text, count=1), None
