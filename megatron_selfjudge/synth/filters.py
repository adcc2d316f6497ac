"""The filters a synthesised question must pass: well-formed, new, and answerable by the policy.

- well-formed (`check_question`): text between length bounds, with letters or digits, that
  decodes cleanly and does not carry an answer (a ``\\boxed{}``, reasoning or answer tags);
- new (`similarity`, `DuplicateIndex`): its normalised text is not a near-duplicate of the
  source question or of a question kept before it (character n-gram Jaccard similarity);
- answerable (`agreement`): the policy's answers to n samples of it, grouped into classes by
  the reward's equivalence (rewards/answers.py), elect a majority (rewards/consistency.py)
  that holds at least the required share of the n samples (samples without an answer count
  in the denominator and never win).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

from megatron_selfjudge.data.prompts import strip_image_tags
from megatron_selfjudge.rewards.answers import answer_classes, extract_boxed
from megatron_selfjudge.rewards.consistency import majority_class

NGRAM = 3  # character n-grams: short math questions differ in one symbol ("find x" / "find y")
_LEAK_RE = re.compile(r"\\boxed|</?think>|</?answer>")
_STRAY_TAG_RE = re.compile(r"</?question>")
_SENTENCE_PUNCT_RE = re.compile(r"[.,;:!?'\"`]")
_UNDECODABLE = "\ufffd"  # what a tokenizer decodes unknown ids to


def clean_question(text: str) -> str:
    """The question as it would be written to the data set: image tags removed, spaces collapsed."""
    return strip_image_tags(text)


def check_question(question: str, *, min_chars: int, max_chars: int) -> Optional[str]:
    """None when `question` (already cleaned) is well-formed, else the reason it is not."""
    if not question:
        return "empty"
    if _LEAK_RE.search(question):
        return "leaks_answer"
    if _STRAY_TAG_RE.search(question):
        return "stray_tags"
    if _UNDECODABLE in question or not question.isprintable():
        return "undecodable"
    if not any(ch.isalnum() for ch in question):
        return "no_text"
    if len(question) < min_chars:
        return "too_short"
    if len(question) > max_chars:
        return "too_long"
    return None


def normalize_text(text: str) -> str:
    """Lower case, image tags and sentence punctuation dropped, whitespace collapsed."""
    return " ".join(_SENTENCE_PUNCT_RE.sub(" ", strip_image_tags(text).lower()).split())


def ngrams(text: str, n: int = NGRAM) -> frozenset[str]:
    """Character n-grams of the normalised text (the whole text when shorter than n)."""
    norm = normalize_text(text)
    if len(norm) <= n:
        return frozenset([norm]) if norm else frozenset()
    return frozenset(norm[i:i + n] for i in range(len(norm) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a & b| / |a | b|; two empty sets are identical (1.0)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def similarity(a: str, b: str) -> float:
    """Character n-gram Jaccard similarity of two texts after normalisation, in [0, 1]."""
    return jaccard(ngrams(a), ngrams(b))


class DuplicateIndex:
    """Kept questions, grouped by scope (e.g. one image), to find near-duplicates of a new one.

    Only questions whose n-gram sets are of compatible size are compared: Jaccard >= t needs
    t * |A| <= |B| <= |A| / t, so a large global index is not scanned whole.
    """

    def __init__(self, threshold: float):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"similarity threshold must be in (0, 1], got {threshold!r}")
        self.threshold = threshold
        self._by_scope: dict[Hashable, dict[int, list[frozenset[str]]]] = {}

    def duplicate(self, question: str, scope: Hashable = None) -> bool:
        """Whether a question kept in `scope` is at least `threshold` similar to `question`."""
        grams = ngrams(question)
        sizes = self._by_scope.get(scope, {})
        low, high = self.threshold * len(grams), len(grams) / self.threshold
        return any(jaccard(grams, other) >= self.threshold
                   for size, members in sizes.items() if low <= size <= high for other in members)

    def add(self, question: str, scope: Hashable = None) -> None:
        """Keep `question` in `scope`."""
        grams = ngrams(question)
        self._by_scope.setdefault(scope, {}).setdefault(len(grams), []).append(grams)


@dataclass(frozen=True)
class Vote:
    """The policy's majority answer to one question and the share of samples that gave it."""

    answer: Optional[str]  # the majority class's first answer; None when no sample had one
    agreement: float  # votes of the majority / all samples (0.0 without a majority)
    samples: int


def agreement(texts: Sequence[str], equivalence: str, timeout: float) -> Vote:
    """Majority vote over the boxed answers of `texts` (the n sampled responses to one question)."""
    if not texts:
        raise ValueError("agreement needs at least one sampled response")
    answers = [extract_boxed(t) for t in texts]
    classes = answer_classes(answers, equivalence, timeout=timeout)
    winner = majority_class(classes)
    if winner is None:
        return Vote(answer=None, agreement=0.0, samples=len(texts))
    return Vote(answer=answers[classes.index(winner)].strip(), agreement=classes.count(winner) / len(texts),
                samples=len(texts))


def answerable(vote: Vote, threshold: float) -> bool:
    """A majority exists and holds at least `threshold` of the samples."""
    return vote.answer is not None and vote.agreement >= threshold
