"""Temperature / top-p / greedy sampling: hand-computed nuclei, log-probs and sample frequencies."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_selfjudge.rollout.sampling import filter_top_p, make_generator, sample_tokens


def chi_square_threshold(df: int, z: float = 3.09) -> float:
    """Upper 0.999 quantile of chi-square(df) by the Wilson-Hilferty approximation."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom; categories expecting < min_expected are pooled."""
    total = float(counts.sum())
    expected = probs.double() * total
    big = expected >= min_expected
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return stat, int(keep.sum()) - 1


def test_filter_top_p_hand_computed():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    # Sorted 0.5, 0.3, 0.15, 0.05: mass before each = 0, 0.5, 0.8, 0.95.
    kept = lambda p: torch.isfinite(filter_top_p(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.51) == [True, False, True, False]
    assert kept(0.8) == [True, False, True, False]
    assert kept(0.81) == [True, False, True, True]
    assert kept(0.96) == [True, True, True, True]
    assert kept(1e-9) == [True, False, False, False]


def test_filter_top_p_one_keeps_everything_even_when_cumsum_rounds_above_one():
    logits = torch.randn(4, 50_000, generator=torch.Generator().manual_seed(0)) * 3
    assert filter_top_p(logits, 1.0) is logits
    with pytest.raises(ValueError, match="top_p"):
        filter_top_p(logits, 0.0)


def test_greedy_is_argmax_and_logprob_uses_temperature():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]], dtype=torch.bfloat16)
    tokens, logp = sample_tokens(logits, temperature=0.5, top_p=1.0, greedy=True, generator=None)
    assert tokens.tolist() == [1, 2]
    assert logp.dtype == torch.float32
    expected = torch.log_softmax(logits.float() / 0.5, dim=-1)[[0, 1], [1, 2]]
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-6)


def test_logprob_is_over_the_full_vocabulary_not_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    tokens, logp = sample_tokens(logits, temperature=1.0, top_p=0.3, greedy=False,
                                 generator=make_generator(0))
    assert tokens.tolist() == [0]  # the nucleus is the single top token
    assert float(logp) == pytest.approx(float(torch.log_softmax(logits, -1)[0, 0]), abs=1e-6)
    assert float(logp) < -0.1  # a nucleus-renormalised log-prob would be 0


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = torch.zeros(64, 100)
    draw = lambda seed: sample_tokens(logits, temperature=1.0, top_p=1.0, greedy=False,  # noqa: E731
                                      generator=make_generator(seed))[0]
    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.5, 0.8)])
def test_sample_frequencies_match_softmax_of_scaled_logits(temperature, top_p):
    logits = torch.randn(30, generator=torch.Generator().manual_seed(1)) * 2
    n = 20_000
    tokens, _ = sample_tokens(logits.expand(n, -1), temperature=temperature, top_p=top_p, greedy=False,
                              generator=make_generator(11))
    counts = torch.bincount(tokens, minlength=30)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        # Independent nucleus: walk the sorted probabilities until their sum reaches top_p.
        order = torch.argsort(probs, descending=True).tolist()
        nucleus, mass = [], 0.0
        for idx in order:
            nucleus.append(idx)
            mass += float(probs[idx])
            if mass >= top_p:
                break
        outside = torch.ones(30, dtype=torch.bool)
        outside[nucleus] = False
        assert counts[outside].sum() == 0
        probs = probs.masked_fill(outside, 0.0)
        probs = probs / probs.sum()
    stat, df = chi_square(counts, probs)
    assert stat < chi_square_threshold(df), (stat, df)
    # The test has power: the untempered distribution is rejected.
    if temperature != 1.0:
        wrong, wdf = chi_square(counts, torch.softmax(logits, -1))
        assert wrong > chi_square_threshold(wdf)


def test_per_row_generators_draw_only_for_their_row():
    """Row i's token depends only on its own generator; a None row draws nothing."""
    from megatron_selfjudge.rollout.sampling import row_seed

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seeds = [row_seed(7, "u", i) for i in range(3)]
    together, _ = sample_tokens(logits, temperature=1.0, top_p=0.9, greedy=False,
                                generator=[make_generator(s) for s in seeds])
    for i, seed in enumerate(seeds):
        alone, _ = sample_tokens(logits[i:i + 1], temperature=1.0, top_p=0.9, greedy=False,
                                 generator=[make_generator(seed)])
        assert alone.item() == together[i].item()
    gen = make_generator(seeds[1])
    sample_tokens(logits, temperature=1.0, top_p=1.0, greedy=False, generator=[None, gen, None])
    assert torch.equal(gen.get_state(), _advanced_once(seeds[1]))
    assert len({row_seed(7, "u", i) for i in range(100)} | {row_seed(8, "u", 0), row_seed(7, "v", 0)}) == 102
    assert all(0 <= row_seed(s, "u", 0) < 2**63 for s in (0, 2**62))


def _advanced_once(seed: int) -> torch.Tensor:
    gen = make_generator(seed)
    torch.rand((), generator=gen, dtype=torch.float64)
    return gen.get_state()
