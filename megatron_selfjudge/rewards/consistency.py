"""Label-free rewards from agreement inside one prompt's group: majority and consistency.

Input is the class id of each trajectory's answer (from `answers.answer_classes`: ids in
first-seen order, None for a trajectory without an answer). G is the group size,
trajectories without an answer included.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from megatron_selfjudge.config import RewardConfig


def _counts(classes: Sequence[int | None]) -> Counter:
    if len(classes) == 0:
        raise ValueError("classes must hold at least one trajectory")
    return Counter(c for c in classes if c is not None)


def majority_class(classes: Sequence[int | None]) -> int | None:
    """Most frequent class; ties go to the first seen; None when no trajectory has an answer."""
    counts = _counts(classes)
    if not counts:
        return None
    best = max(counts.values())
    # Scan in row order so a tie resolves to the class that appeared first.
    return next(c for c in classes if c is not None and counts[c] == best)


def majority_rewards(classes: Sequence[int | None]) -> list[float]:
    """MM-UPT reward 1[a_i == mode]; a missing answer scores 0 and never wins."""
    mode = majority_class(classes)
    return [1.0 if c is not None and c == mode else 0.0 for c in classes]


def consistency_prior(classes: Sequence[int | None],
                      gate: float = RewardConfig.consistency_gate) -> list[float]:
    """p_i = c(a_i)/G, binarised to 1[a_i == mode] when max p > gate (gate 1.0: never)."""
    if not 0.0 <= gate <= 1.0:
        raise ValueError(f"consistency gate must be in [0, 1], got {gate!r}")
    counts = _counts(classes)
    if not counts:
        return [0.0] * len(classes)
    g = len(classes)
    if max(counts.values()) / g > gate:
        return majority_rewards(classes)
    return [counts[c] / g if c is not None else 0.0 for c in classes]
