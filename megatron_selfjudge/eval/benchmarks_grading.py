r"""Grading of benchmark items with the project's answer code, and the benchmarks' own scores.

The final answer is the last `\boxed{}` (rewards.answers.extract_boxed); equivalence is
rewards.answers (normalisation, numbers within 1e-6 relative, symbolic through math-verify).
This is rule-based grading: the papers' numbers come from VLMEvalKit, which asks an LLM to
extract the answer, so ours differ from theirs by a few points (see the README).

Per kind (`BenchItem.kind`):
- choice: the answer's letter (`B`, `(B)`, `B. text`), or the option whose text the answer
  equals, must be the gold letter (MathVision's rule: letter or option text); MathVista maps
  an answer that equals no option to the nearest option text, as its evaluator does;
- letters (LogicVista): the sorted letter sets must be equal (`B, D` == `D,B`);
- free: rewards.answers equivalence (1e-6 relative for numbers, symbolic otherwise);
- float (DynaMath): |answer - gold| <= 0.001, else the free rule; text: the normalised gold is a
  substring of the normalised answer;
- integer / float / list (MathVista): integer answers truncated to int, floats rounded to the
  item's precision, then compared exactly; lists compared as normalised strings.

Benchmark scores beside plain accuracy:
- WeMath four dimensions per composite problem (a 2-step or 3-step problem and its one-step
  sub-problems): IK (a sub-problem wrong, composite wrong), IG (all subs right, composite wrong),
  CM (composite right and all subs right; loose: any sub right), RM (composite right and a sub
  wrong; loose: all subs wrong); score = (N - 0.5 IG - RM - IK) / N over N composites;
- DynaMath worst case: share of questions whose every variant is right;
- MathVerse per version through the `version` sub-category.
"""
from __future__ import annotations

import difflib
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

from megatron_selfjudge.eval.benchmarks import LETTERS, BenchItem, parse_letter_set
from megatron_selfjudge.rewards.answers import (
    answer_classes,
    answers_equivalent,
    is_choice_letter,
    normalize_answer,
    simple_number,
)
from megatron_selfjudge.rewards.consistency import majority_class

_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
DYNAMATH_FLOAT_TOL = 1e-3  # DynaMath's evaluator: floats right within 0.001


def choice_letter(answer: Optional[str], choices: Sequence[str], nearest: bool = False) -> Optional[str]:
    """The option an answer names: its letter, else the option whose text it equals (else the nearest text)."""
    if answer is None:
        return None
    norm = normalize_answer(answer)
    if is_choice_letter(norm):
        return norm
    for k, text in enumerate(choices):
        if answers_equivalent(answer, text, "symbolic"):
            return LETTERS[k]
    if nearest and choices and norm:
        ratios = [difflib.SequenceMatcher(None, answer.strip().lower(), c.lower()).ratio() for c in choices]
        return LETTERS[max(range(len(choices)), key=ratios.__getitem__)]
    return None


def answer_letter_set(answer: Optional[str]) -> Optional[frozenset[str]]:
    """Letters of a multi-select answer, read raw and without LaTeX commands and braces (`\\text{B, D}`)."""
    if answer is None:
        return None
    bare = re.sub(r"[\\{}$]", " ", _LATEX_COMMAND_RE.sub(" ", answer))
    return parse_letter_set(answer) or parse_letter_set(bare)


def canonical_answer(item: BenchItem, answer: Optional[str]) -> Optional[str]:
    """The answer in the form grading compares (a letter, a sorted letter list); None for no answer."""
    if answer is None or not answer.strip():
        return None
    if item.kind == "choice":
        return choice_letter(answer, item.choices, nearest=item.benchmark == "mathvista") or answer.strip()
    if item.kind == "letters":
        letters = answer_letter_set(answer)
        return ", ".join(sorted(letters)) if letters else answer.strip()
    return answer.strip()


def _number(text: str):
    return simple_number(normalize_answer(text))


def is_correct(item: BenchItem, answer: Optional[str]) -> bool:
    """Whether an extracted answer is right for the item under its benchmark's rule."""
    answer = canonical_answer(item, answer)
    if answer is None:
        return False
    kind, gold = item.kind, item.gold
    if kind == "choice":
        return answer == gold
    if kind == "letters":
        return answer_letter_set(answer) == parse_letter_set(gold)
    if kind == "float" and item.precision is None:  # DynaMath
        x, g = _number(answer), _number(gold)
        if x is not None and g is not None:
            return abs(x - g) <= DYNAMATH_FLOAT_TOL
        return answers_equivalent(answer, gold, "symbolic")
    if kind == "text":
        a, g = normalize_answer(answer).lower(), normalize_answer(gold).lower()
        return bool(g) and g in a
    if kind in ("integer", "float"):  # MathVista
        x, g = _number(answer), _number(gold)
        if x is None or g is None:
            return False
        if kind == "integer":
            return int(x) == int(g)  # its evaluator: str(int(float(prediction)))
        return round(float(x), item.precision) == round(float(g), item.precision)
    if kind == "list":
        return answers_equivalent(answer, gold, "normalized")
    return answers_equivalent(answer, gold, "symbolic")


def majority_answer(item: BenchItem, answers: Sequence[Optional[str]]) -> Optional[str]:
    """maj@K: the most frequent canonical answer (ties to the first seen; none when no sample answered)."""
    canon = [canonical_answer(item, a) for a in answers]
    classes = answer_classes(canon, "symbolic")
    winner = majority_class(classes)
    return None if winner is None else canon[classes.index(winner)]


# ---------------------------------------------------------------- scores

@dataclass
class Graded:
    """One item's grade, with what the scores group by."""

    qid: str
    group: str
    part: str
    categories: dict[str, list[str]]
    correct: bool
    sample_correct: float = 0.0  # share of the K samples that are right (n > 1)


def _rate(num: float, den: int) -> Optional[float]:
    return num / den if den else None


def category_table(graded: Sequence[Graded], names: Sequence[str]) -> dict:
    """{sub-category: {value: {n, correct, accuracy}}}; an item counts once under each of its values."""
    out: dict = {}
    for name in names:
        cells: dict = defaultdict(lambda: [0, 0])
        for g in graded:
            for value in g.categories.get(name, ["unknown"]):
                cells[value][0] += 1
                cells[value][1] += int(g.correct)
        out[name] = {v: {"n": n, "correct": c, "accuracy": _rate(c, n)} for v, (n, c) in sorted(cells.items())}
    return out


def wemath_scores(graded: Sequence[Graded]) -> dict:
    """Four-dimensional strict and loose scores over the complete composite problems."""
    groups: dict[str, dict[str, bool]] = defaultdict(dict)
    for g in graded:
        groups[g.group][g.part] = g.correct
    counts = {"strict": dict.fromkeys(("IK", "IG", "CM", "RM"), 0), "loose": dict.fromkeys(("IK", "IG", "CM", "RM"), 0)}
    complete, incomplete = 0, 0
    for name, parts in groups.items():
        steps = int(name.split("-", 1)[0])
        prefix = next(iter(parts)).split("_", 1)[0]
        subs = [parts.get(f"{prefix}_{k}") for k in range(1, steps + 1)]
        composite = parts.get(f"{prefix}_multi")
        if composite is None or any(s is None for s in subs):
            incomplete += 1  # e.g. a row skipped or cut by --limit: not scored
            continue
        complete += 1
        all_right, any_right = all(subs), any(subs)
        for mode in ("strict", "loose"):
            if not composite:
                counts[mode]["IG" if all_right else "IK"] += 1
            elif all_right or (mode == "loose" and any_right):
                counts[mode]["CM"] += 1
            else:
                counts[mode]["RM"] += 1
    out: dict = {"composites": complete, "incomplete_composites": incomplete}
    for mode, c in counts.items():
        score = _rate(complete - 0.5 * c["IG"] - c["RM"] - c["IK"], complete)
        out[mode] = {**c, **{f"{k}_rate": _rate(v, complete) for k, v in c.items()}, "score": score}
    return out


def dynamath_scores(graded: Sequence[Graded]) -> dict:
    """Average accuracy over variants and worst-case accuracy (every variant of a question right)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for g in graded:
        groups[g.group].append(g.correct)
    most = max((len(v) for v in groups.values()), default=0)
    return {"questions": len(groups), "variants_max": most,
            "questions_with_fewer_variants": sum(len(v) < most for v in groups.values()),
            "average_accuracy": _rate(sum(map(sum, groups.values())), sum(map(len, groups.values()))),
            "worst_case_accuracy": _rate(sum(all(v) for v in groups.values()), len(groups))}


EXTRA_SCORES = {"wemath": wemath_scores, "dynamath": dynamath_scores}


@dataclass
class Summary:
    """A benchmark's scores (the JSON written as eval/<benchmark>.json, less settings and versions)."""

    benchmark: str
    graded: int
    correct: int
    accuracy: Optional[float]
    categories: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    sampled_pass1: Optional[float] = None


def summarize(benchmark: str, graded: Sequence[Graded], category_names: Sequence[str], samples: int) -> Summary:
    """Plain accuracy, the sub-category table and the benchmark's own scores."""
    correct = sum(g.correct for g in graded)
    extra = EXTRA_SCORES.get(benchmark)
    pass1 = _rate(math.fsum(g.sample_correct for g in graded), len(graded)) if samples > 1 else None
    return Summary(benchmark=benchmark, graded=len(graded), correct=correct, accuracy=_rate(correct, len(graded)),
                   categories=category_table(graded, category_names), scores=extra(graded) if extra else {},
                   sampled_pass1=pass1)
