from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_selfjudge.rewards.consistency import (
    consistency_prior, majority_class, majority_rewards,
)

classes_st = st.lists(st.one_of(st.none(), st.integers(0, 4)), min_size=1, max_size=12)


def test_majority_hand_computed():
    assert majority_rewards([0, 1, 1, None, 2, 1]) == [0, 1, 1, 0, 0, 1]
    # tie between class 3 (seen first) and class 0: the first seen wins
    assert majority_class([3, 0, 0, 3]) == 3
    assert majority_rewards([3, 0, 0, 3]) == [1, 0, 0, 1]
    # missing answers never win, even when they are the most common
    assert majority_rewards([None, None, None, 1]) == [0, 0, 0, 1]
    assert majority_rewards([None, None]) == [0, 0]
    assert majority_class([None, None]) is None


def test_gate_binarises_seven_of_eight():
    classes = [0] * 7 + [1]
    # max p = 7/8 = 0.875 > 0.85: binarised
    assert consistency_prior(classes, 0.85) == [1.0] * 7 + [0.0]
    # gate 1.0 = pure frequency
    assert consistency_prior(classes, 1.0) == [0.875] * 7 + [0.125]


def test_gate_keeps_frequencies_six_of_eight():
    classes = [0, 1, 0, 0, 1, 0, 0, 0]  # 6 of 8: 0.75 <= 0.85
    assert consistency_prior(classes, 0.85) == [0.75, 0.25, 0.75, 0.75, 0.25, 0.75, 0.75, 0.75]


def test_gate_is_strict():
    # 17 of 20 gives max p = 0.85 exactly: not above the gate, so frequencies are kept
    classes = [0] * 17 + [1] * 3
    assert consistency_prior(classes, 0.85) == [0.85] * 17 + [0.15] * 3
    assert consistency_prior(classes, 0.84) == [1.0] * 17 + [0.0] * 3
    # gate 0: any group with an answer is binarised, i.e. plain majority
    assert consistency_prior([0, 1, 1, None], 0.0) == majority_rewards([0, 1, 1, None])


def test_prior_with_missing_answers():
    # G counts missing trajectories too: 3/5, 1/5, missing 0
    assert consistency_prior([0, 0, None, 1, 0]) == [0.6, 0.6, 0.0, 0.2, 0.6]
    assert consistency_prior([None] * 4) == [0.0] * 4
    # all eight agree: p = 1 > gate, binarised and identical to frequency
    assert consistency_prior([2] * 8) == [1.0] * 8


def test_bad_inputs():
    with pytest.raises(ValueError, match="gate"):
        consistency_prior([0], 1.5)
    with pytest.raises(ValueError, match="classes"):
        majority_rewards([])


def _reference_prior(classes, gate):
    counts = Counter(c for c in classes if c is not None)
    if not counts:
        return [0.0] * len(classes)
    top = max(counts.values())
    mode = [c for c in classes if c is not None and counts[c] == top][0]
    if top / len(classes) > gate:
        return [float(c == mode) for c in classes]
    return [counts[c] / len(classes) if c is not None else 0.0 for c in classes]


@settings(max_examples=200, deadline=None)
@given(classes_st, st.sampled_from([0.0, 0.5, 0.85, 1.0]))
def test_prior_matches_reference_and_bounds(classes, gate):
    p = consistency_prior(classes, gate)
    assert p == pytest.approx(_reference_prior(classes, gate))
    assert all(0.0 <= x <= 1.0 for x in p)
    assert all(x == 0.0 for x, c in zip(p, classes) if c is None)
    m = majority_rewards(classes)
    assert set(m) <= {0.0, 1.0}
    # exactly one class wins when any answer exists
    winners = {c for c, r in zip(classes, m) if r == 1.0}
    assert len(winners) == (1 if any(c is not None for c in classes) else 0)


@settings(max_examples=100, deadline=None)
@given(classes_st, st.randoms(use_true_random=False))
def test_prior_is_permutation_equivariant_without_ties(classes, rnd):
    # Frequencies are order-free; the majority only depends on order through ties.
    perm = list(range(len(classes)))
    rnd.shuffle(perm)
    shuffled = [classes[i] for i in perm]
    p, ps = consistency_prior(classes, 1.0), consistency_prior(shuffled, 1.0)
    assert ps == [p[i] for i in perm]
    counts = Counter(c for c in classes if c is not None)
    if counts and list(counts.values()).count(max(counts.values())) == 1:
        m, ms = majority_rewards(classes), majority_rewards(shuffled)
        assert ms == [m[i] for i in perm]
