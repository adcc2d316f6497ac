"""Tests for the advantage estimators: hand-computed values, a numpy reference, hypothesis properties."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_selfjudge import advantages as A
from megatron_selfjudge.advantages import ESTIMATORS, compute_advantages, register_estimator

VARIANTS = [("grpo", True), ("grpo_no_std", True), ("energy", True), ("energy", False)]
FP32_MAX = float(np.finfo(np.float32).max)


def numpy_reference(rewards, groups, estimator, temperature=1.0, center=True, eps=1e-6):
    """Loop-per-group float64 implementation written straight from the formulas (docs/method.md, "Advantages")."""
    r, g = np.asarray(rewards, dtype=np.float64), np.asarray(groups)
    out = np.zeros_like(r)
    for uid in np.unique(g):
        rows = g == uid
        x = r[rows]
        if x.max() == x.min():
            continue  # ties (and single rollouts) carry no preference: exactly 0
        if estimator == "grpo":
            out[rows] = (x - x.mean()) / (np.std(x, ddof=1) + eps)
        elif estimator == "grpo_no_std":
            out[rows] = x - x.mean()
        else:
            e = x / temperature
            a = e - np.logaddexp.reduce(e)
            out[rows] = a - a.mean() if center else a + np.log(len(x))
    return out


# ---------------------------------------------------------------- hand-computed values
def test_grpo_hand_computed_uses_sample_std():
    got = compute_advantages([1.0, 0.0, 1.0, 0.0], ["q", "q", "q", "q"], "grpo")
    # mean 0.5, sample std sqrt((4 * 0.25) / 3) = 0.57735 (population std would be 0.5)
    std = math.sqrt(1.0 / 3.0)
    want = torch.tensor([0.5, -0.5, 0.5, -0.5]) / (std + 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert got.dtype == torch.float32


def test_grpo_no_std_hand_computed():
    got = compute_advantages([1.0, 0.0, 0.0, 3.0, 5.0], [7, 7, 7, 9, 9], "grpo_no_std")
    torch.testing.assert_close(got, torch.tensor([2 / 3, -1 / 3, -1 / 3, -1.0, 1.0]))


def test_energy_hand_computed_both_centerings():
    rewards, groups, temp = [1.0, 0.0, 1.0], ["a", "a", "a"], 0.5
    # e = (2, 0, 2); logsumexp(e) = log(2 e^2 + 1)
    lse = math.log(2 * math.exp(2.0) + 1.0)
    shifted = compute_advantages(rewards, groups, "energy", temperature=temp, center=False)
    want = torch.tensor([2.0 - lse + math.log(3), -lse + math.log(3), 2.0 - lse + math.log(3)])
    torch.testing.assert_close(shifted, want)
    centered = compute_advantages(rewards, groups, "energy", temperature=temp, center=True)
    torch.testing.assert_close(centered, torch.tensor([2 / 3, -4 / 3, 2 / 3]))  # (r - 2/3) / 0.5


@pytest.mark.parametrize("estimator,center", VARIANTS)
def test_ties_and_singletons_are_exactly_zero(estimator, center):
    # the mean of three 0.1s is 0.10000000000000002 in float64: only an explicit tie rule gives 0
    rewards = [0.1, 0.1, 0.1, 0.7, -3.0, 2.0, 2.0]
    groups = ["a", "a", "a", "b", "c", "d", "d"]
    got = compute_advantages(rewards, groups, estimator, temperature=0.3, center=center)
    assert torch.equal(got, torch.zeros(7))


@pytest.mark.parametrize("estimator,center", VARIANTS)
def test_matches_numpy_reference_interleaved_groups(estimator, center):
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=40) * 3
    rewards[:5] = 1.0  # plus a tied group
    groups = np.array([0] * 5 + list(rng.integers(1, 6, size=35)))
    perm = rng.permutation(40)
    rewards, groups = rewards[perm], groups[perm]
    got = compute_advantages(torch.tensor(rewards), torch.tensor(groups), estimator, temperature=0.7, center=center)
    want = numpy_reference(rewards, groups, estimator, temperature=0.7, center=center)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_group_id_kinds_give_the_same_result():
    rewards = [0.0, 1.0, 0.5, 1.0, 0.2, 0.9]
    as_strings = ["u1", "u2", "u1", "u2", "u1", "u2"]
    as_tuples = [("img", 1), ("img", 2)] * 3
    as_ints = torch.tensor([10, -4, 10, -4, 10, -4])
    as_numpy = np.array([3, 1, 3, 1, 3, 1], dtype=np.int32)
    as_numpy_strings = np.array(as_strings)
    results = [compute_advantages(rewards, ids, "grpo")
               for ids in (as_strings, as_tuples, as_ints, as_numpy, as_numpy_strings)]
    for other in results[1:]:
        assert torch.equal(results[0], other)


@pytest.mark.parametrize("estimator,center", VARIANTS)
def test_row_order_does_not_change_rounding(estimator, center):
    # float64 sums depend on order here ((1e16 + 1) - 1e16 = 0 but (1e16 - 1e16) + 1 = 1),
    # so exact permutation equivariance needs a canonical reduction order
    import itertools

    rewards = [1e16, 1.0, -1e16]
    base = compute_advantages(rewards, [0, 0, 0], estimator, center=center)
    for perm in itertools.permutations(range(3)):
        got = compute_advantages([rewards[i] for i in perm], [0, 0, 0], estimator, center=center)
        assert torch.equal(got, base[list(perm)]), perm


@pytest.mark.parametrize("estimator,center", VARIANTS)
def test_extreme_rewards_saturate_instead_of_overflowing(estimator, center):
    rewards = [FP32_MAX, -FP32_MAX, -FP32_MAX, 1e-45, -1e-45, 0.0]
    got = compute_advantages(rewards, [0, 0, 0, 1, 1, 1], estimator, temperature=1e-3, center=center)
    assert torch.isfinite(got).all()
    assert got[0] > 0 and got[1] < 0 and got[3] >= got[5] >= got[4]
    if estimator == "grpo":
        assert got[3] > got[5] > got[4]  # z-scores are scale-free, even for subnormal rewards
    elif center:  # r - mean = 4M/3 for the first row, beyond fp32: it saturates
        assert float(got[0]) == FP32_MAX
    else:  # log-probability of the losers: -2M / T
        assert float(got[1]) == -FP32_MAX and abs(float(got[0]) - math.log(3)) < 1e-6


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match=r"known: \['energy', 'grpo', 'grpo_no_std'\]"):
        compute_advantages([1.0, 0.0], [0, 0], "ppo")
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages([1.0, 0.0], [0], "grpo")
    with pytest.raises(ValueError, match="finite"):
        compute_advantages([1.0, float("nan")], [0, 0], "grpo")
    with pytest.raises(ValueError, match="fp32"):
        compute_advantages([1e300, 0.0], [0, 0], "grpo")
    with pytest.raises(ValueError, match="temperature"):
        compute_advantages([1.0, 0.0], [0, 0], "energy", temperature=0.0)
    with pytest.raises(ValueError, match="eps"):
        compute_advantages([1.0, 0.0], [0, 0], "grpo", eps=0.0)
    with pytest.raises(ValueError, match="rewards"):
        compute_advantages([[1.0, 0.0]], [0, 0], "grpo")
    with pytest.raises(TypeError, match="hashable"):
        compute_advantages([1.0, 0.0], [[0], [0]], "grpo")
    with pytest.raises(TypeError, match="group_ids"):
        compute_advantages([1.0, 0.0], torch.tensor([0.0, 1.0]), "grpo")
    with pytest.raises(TypeError, match="group_ids"):
        compute_advantages([1.0, 0.0], "ab", "grpo")
    assert compute_advantages([], [], "grpo").shape == (0,)


def test_register_estimator(monkeypatch):
    monkeypatch.setattr(A, "ESTIMATORS", dict(ESTIMATORS))

    @register_estimator("rank")
    def rank(rewards, groups, **_):
        return rewards - groups.min(rewards)

    got = compute_advantages([3.0, 1.0, 2.0, 2.0], ["a", "a", "a", "b"], "rank")
    assert torch.equal(got, torch.tensor([2.0, 0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="already registered"):
        register_estimator("grpo")(rank)


# ---------------------------------------------------------------- hypothesis properties
# any finite fp32 (huge, tiny, subnormal), with the range ends drawn often
fp32_any = st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False),
                     st.sampled_from([FP32_MAX, -FP32_MAX, 1e-45, 0.0]))
moderate = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def grouped(draw, values=fp32_any, max_size=24):
    n = draw(st.integers(1, max_size))
    rewards = draw(st.lists(values, min_size=n, max_size=n))
    groups = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    return rewards, groups


@settings(max_examples=150, deadline=None)
@given(grouped(), st.permutations(range(24)), st.sampled_from(VARIANTS), st.floats(1e-3, 1e3))
def test_permuting_rows_permutes_outputs_exactly(data, perm, variant, temp):
    rewards, groups = data
    perm = [i for i in perm if i < len(rewards)]
    # relabel the groups too: uids are names, not numbers
    names = [f"uid-{g * 7 % 5}" for g in groups]
    base = compute_advantages(rewards, groups, variant[0], temperature=temp, center=variant[1])
    moved = compute_advantages([rewards[i] for i in perm], [names[i] for i in perm], variant[0],
                               temperature=temp, center=variant[1])
    assert torch.equal(moved, base[perm])


@settings(max_examples=200, deadline=None)
@given(grouped(), st.sampled_from(VARIANTS), st.floats(1e-6, 1e6))
def test_finite_for_any_fp32_rewards(data, variant, temp):
    rewards, groups = data
    got = compute_advantages(rewards, groups, variant[0], temperature=temp, center=variant[1])
    assert torch.isfinite(got).all()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(fp32_any, st.integers(1, 6)), min_size=1, max_size=6), st.sampled_from(VARIANTS),
       st.floats(1e-3, 1e3))
def test_tied_groups_give_exact_zero(spec, variant, temp):
    rewards = [value for value, size in spec for _ in range(size)]
    groups = [gid for gid, (_, size) in enumerate(spec) for _ in range(size)]
    got = compute_advantages(rewards, groups, variant[0], temperature=temp, center=variant[1])
    assert torch.equal(got, torch.zeros(len(rewards)))


def _per_group(rewards, groups, adv):
    r, g, a = np.asarray(rewards, np.float64), np.asarray(groups), adv.double().numpy()
    return [(r[g == u], a[g == u]) for u in np.unique(g)]


@settings(max_examples=150, deadline=None)
@given(grouped(moderate))
def test_grpo_zero_mean_and_samuelson_bound(data):
    rewards, groups = data
    for r, a in _per_group(rewards, groups, compute_advantages(rewards, groups, "grpo")):
        size = len(r)
        assert abs(a.sum()) <= 1e-5 * size
        # a z-score with the sample std never exceeds (G - 1) / sqrt(G) (Samuelson's inequality)
        assert np.abs(a).max() <= (size - 1) / math.sqrt(size) + 1e-5
    np.testing.assert_allclose(compute_advantages(rewards, groups, "grpo").numpy(),
                               numpy_reference(rewards, groups, "grpo"), rtol=1e-5, atol=1e-5)


@settings(max_examples=150, deadline=None)
@given(grouped(moderate), st.floats(0.05, 20.0))
def test_energy_centered_equals_scaled_grpo_no_std(data, temp):
    rewards, groups = data
    got = compute_advantages(rewards, groups, "energy", temperature=temp, center=True).double()
    r, g = np.asarray(rewards, np.float64), np.asarray(groups)
    want = np.array([(r[i] - r[g == g[i]].mean()) / temp for i in range(len(r))])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6 * (1 + np.abs(r).max() / temp))


@settings(max_examples=150, deadline=None)
@given(grouped(moderate), st.floats(0.05, 20.0))
def test_energy_uncentered_is_log_of_g_times_softmax(data, temp):
    rewards, groups = data
    adv = compute_advantages(rewards, groups, "energy", temperature=temp, center=False)
    for r, a in _per_group(rewards, groups, adv):
        size = len(r)
        # exp(A) = G * softmax(r / T): it sums to G, i.e. logsumexp(A) = log G, and A <= log G
        if np.exp(a).sum() > 0:  # every exp can underflow only when one rollout holds all the mass
            assert abs(np.logaddexp.reduce(a) - math.log(size)) <= 1e-5
        assert a.max() <= math.log(size) + 1e-6
        # differences are the scaled reward differences, as for the centred variant
        scale = 1 + np.abs(r).max() / temp
        np.testing.assert_allclose(a - a[0], (r - r[0]) / temp, rtol=1e-5, atol=1e-6 * scale)
