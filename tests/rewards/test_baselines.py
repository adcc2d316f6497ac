"""The literature's label-free baselines (rewards/baselines.py and their modes in rewards/combine.py),
against groups and distributions computed by hand."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from megatron_selfjudge.config import ConfigError, load_config
from megatron_selfjudge.megatron.logprobs import vocab_parallel_token_stats
from megatron_selfjudge.rewards.baselines import ResponseStats, agreement_rewards, response_means, response_stats
from megatron_selfjudge.rewards.combine import REWARD_MODES, compute_rewards

sys.path.insert(0, str(Path(__file__).parents[1] / "megatron"))
from dist_utils import run_distributed  # noqa: E402


def boxed(answer: str | None) -> str:
    return "<think>x</think> no answer" if answer is None else f"<think>x</think> \\boxed{{{answer}}}"


def rewards(answers, mode, **kw):
    return compute_rewards([boxed(a) for a in answers], ["q"] * len(answers), mode, equivalence="exact", **kw)


# ---- EvoLMM: soft agreement ----

def test_agreement_power_of_a_hand_computed_group():
    # Frequencies 2/4, 2/4, 1/4 and no answer: squared 0.25, 0.25, 0.0625, 0.
    assert rewards(["a", "a", "b", None], "agreement", agreement_gamma=2.0).rewards == [0.25, 0.25, 0.0625, 0.0]
    got = rewards(["a", "a", "b", None], "agreement", agreement_gamma=0.5).rewards
    assert got == pytest.approx([math.sqrt(0.5), math.sqrt(0.5), 0.5, 0.0], abs=1e-12)


def test_agreement_is_per_group_and_ignores_the_consistency_gate():
    # Group q: 3 of 4 agree (0.75 < gate 0.85: no binarising anyway); group r: all 3 agree.
    responses = [boxed(a) for a in ["a", "a", "a", "b", "c", "c", "c"]]
    res = compute_rewards(responses, ["q"] * 4 + ["r"] * 3, "agreement", equivalence="exact",
                          agreement_gamma=1.0, consistency_gate=0.5)
    # The gate of 0.5 binarises the prior (0.75 > 0.5) but not the agreement reward.
    assert res.prior[:4] == [1.0, 1.0, 1.0, 0.0]
    assert res.rewards == pytest.approx([0.75, 0.75, 0.75, 0.25, 1.0, 1.0, 1.0])


def test_agreement_gamma_must_be_positive():
    with pytest.raises(ValueError, match="gamma"):
        agreement_rewards([0, 0], 0.0)
    with pytest.raises(ConfigError, match="reward.agreement_gamma"):
        load_config(None, ["reward.agreement_gamma=0"])


# ---- token statistics: self-certainty (Intuitor) and entropy (RENT) ----

def test_self_certainty_and_entropy_of_hand_computed_distributions():
    v = 4
    uniform = torch.zeros(1, v)
    probs = [0.7, 0.1, 0.1, 0.1]
    peaked = torch.tensor([[math.log(p) for p in probs]]) + 3.0  # any shift: softmax is unchanged
    entropy, certainty = vocab_parallel_token_stats(torch.cat([uniform, peaked]))
    # KL(U || p) = sum_v (1/V) log((1/V) / p_v); H(p) = -sum_v p_v log p_v.
    kl_by_hand = sum(0.25 * math.log(0.25 / p) for p in probs)
    h_by_hand = -sum(p * math.log(p) for p in probs)
    assert kl_by_hand == pytest.approx(0.42981, abs=1e-5)  # 0.25 * (ln(0.25/0.7) + 3 ln 2.5)
    torch.testing.assert_close(certainty, torch.tensor([0.0, kl_by_hand]), atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, torch.tensor([math.log(v), h_by_hand]), atol=1e-6, rtol=0)


def test_token_stats_use_the_temperature_and_blocks_do_not_change_them():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    logp = torch.log_softmax(logits.double() / 0.7, dim=-1)
    ref_h = -(logp.exp() * logp).sum(-1)
    ref_kl = -math.log(11) - logp.mean(-1)
    for block in (1 << 26, 11, 30):  # one block, one row per block, two rows per block
        h, kl = vocab_parallel_token_stats(logits, 0.7, block_elements=block)
        assert h.shape == kl.shape == (3, 5) and h.dtype == torch.float32
        torch.testing.assert_close(h.double(), ref_h, atol=1e-5, rtol=0)
        torch.testing.assert_close(kl.double(), ref_kl, atol=1e-5, rtol=0)


def test_token_stats_from_hidden_states_and_output_weight():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(6, 8, generator=g), torch.randn(13, 8, generator=g)
    direct = vocab_parallel_token_stats(hidden @ weight.t(), 1.3)
    blocked = vocab_parallel_token_stats(hidden, 1.3, weight=weight, block_elements=13 * 2)
    for a, b in zip(direct, blocked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="weight"):
        vocab_parallel_token_stats(hidden, weight=weight.t())


def test_response_means_average_each_rows_response_tokens():
    values = torch.tensor([[1.0, 2.0, 9.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert response_means(values, mask) == [1.5, 6.0]
    with pytest.raises(ValueError, match="row 1 has no response token"):
        response_means(values, torch.tensor([[1, 0, 0], [0, 0, 0]]))
    stats = response_stats(values, -values, mask)
    assert stats.entropy == [1.5, 6.0] and stats.self_certainty == [-1.5, -6.0]


def test_self_certainty_and_neg_entropy_modes_read_the_response_stats():
    stats = ResponseStats(entropy=[0.9404, 1.3863, 0.2], self_certainty=[0.4298, 0.0, 1.1])
    answers = ["a", None, "b"]  # the answers do not matter to these modes
    assert rewards(answers, "self_certainty", response_stats=stats).rewards == [0.4298, 0.0, 1.1]
    assert rewards(answers, "neg_entropy", response_stats=stats).rewards == [-0.9404, -1.3863, -0.2]
    res = rewards(answers, "self_certainty", response_stats=stats)
    assert res.metrics()["self_certainty_mean"] == pytest.approx((0.4298 + 1.1) / 3)
    for mode in ("self_certainty", "neg_entropy"):
        assert REWARD_MODES[mode].needs_token_stats
        with pytest.raises(ValueError, match="needs response_stats"):
            rewards(answers, mode)
    with pytest.raises(ValueError, match="response_stats has 2 rows"):
        rewards(answers, "neg_entropy", response_stats=ResponseStats([0.0, 0.0], [0.0, 0.0]))
    with pytest.raises(ValueError, match="finite"):
        ResponseStats([float("nan")], [0.0])


# ---- TTRL: more votes than trained samples ----

def test_ttrl_label_from_all_votes_differs_from_the_trained_samples_majority():
    trained = ["a", "a", "b", "c"]  # alone: a wins 2-1-1
    extra = ["b", "b", "b", "a"]  # all 8: b 4, a 3, c 1
    kw = dict(votes=[boxed(a) for a in extra], vote_group_ids=["q"] * 4)
    ttrl = rewards(trained, "ttrl", **kw)
    assert ttrl.rewards == [0.0, 0.0, 1.0, 0.0]
    assert ttrl.pseudo_labels == ["b"] * 4
    plain = rewards(trained, "majority")
    assert plain.rewards == [1.0, 1.0, 0.0, 0.0] and plain.pseudo_labels == ["a"] * 4
    # The prior stays the trained group's own: 2/4, 2/4, 1/4, 1/4.
    assert ttrl.prior == [0.5, 0.5, 0.25, 0.25]
    # Pseudo-label accuracy counts the voted label.
    labelled = rewards(trained, "ttrl", ground_truths=["b"] * 4, **kw)
    assert labelled.pseudo_label_acc == 1.0 and plain.pseudo_label_acc is None


def test_ttrl_votes_are_checked():
    with pytest.raises(ValueError, match="needs votes"):
        rewards(["a", "b"], "ttrl")
    with pytest.raises(ValueError, match="group 'z', which has no trained row"):
        rewards(["a", "b"], "ttrl", votes=[boxed("a")], vote_group_ids=["z"])
    with pytest.raises(ValueError, match="go together"):
        rewards(["a", "b"], "ttrl", votes=[boxed("a")])


def test_ttrl_config_needs_more_votes_than_trained_samples():
    with pytest.raises(ConfigError, match="rollout.vote_n"):
        load_config(None, ["reward.mode=ttrl", "rollout.n=8", "rollout.vote_n=8"])
    cfg = load_config(None, ["reward.mode=ttrl", "rollout.n=4", "rollout.vote_n=16"])
    assert cfg.rollout.vote_n == 16
    load_config(None, ["reward.mode=majority", "rollout.n=8", "rollout.vote_n=8"])  # unused: not checked


# ---- tensor parallelism: the vocabulary sharded over 2 ranks ----

def _tp2_stats_worker(rank: int, world: int) -> list:
    from megatron.core import parallel_state

    from megatron_selfjudge.megatron.parallel import initialize_parallel

    initialize_parallel(tp=world, pp=1, seed=0)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 10, generator=g) * 3
    hidden, weight = torch.randn(5, 8, generator=g), torch.randn(10, 8, generator=g)
    group = parallel_state.get_tensor_model_parallel_group()
    shard = logits.chunk(world, dim=-1)[rank].contiguous()
    w_shard = weight.chunk(world, dim=0)[rank].contiguous()
    return [vocab_parallel_token_stats(shard, 0.8),  # megatron's TP group found by itself
            vocab_parallel_token_stats(shard, 0.8, group, block_elements=5),
            vocab_parallel_token_stats(hidden, 1.0, None, weight=w_shard, block_elements=10)]


@pytest.mark.slow
def test_tp2_token_stats_equal_tp1():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 10, generator=g) * 3
    hidden, weight = torch.randn(5, 8, generator=g), torch.randn(10, 8, generator=g)
    expected = [vocab_parallel_token_stats(logits, 0.8)] * 2 + [vocab_parallel_token_stats(hidden @ weight.t())]
    for per_rank in run_distributed(_tp2_stats_worker, 2, timeout=120):
        for got, ref in zip(per_rank, expected):
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---- the scoring forward pass returns them ----

def _scoring_worker(rank: int, world: int) -> dict:
    sys.path.insert(0, str(Path(__file__).parents[1] / "megatron"))
    from test_forward import MAX_SEQ, VOCAB, make_batch

    from megatron_selfjudge.megatron.forward import compute_logprobs
    from megatron_selfjudge.megatron.models import build_gpt
    from megatron_selfjudge.megatron.parallel import initialize_parallel

    initialize_parallel(tp=1, pp=1, seed=1)
    model = build_gpt(VOCAB, 2, 32, 4, 64, MAX_SEQ, seed=3)
    batch = make_batch(seed=1)
    text = type(batch)(tokens=batch.tokens.clamp(min=2), labels=batch.labels, loss_mask=batch.loss_mask)
    with torch.no_grad():
        logits = model(text.tokens, torch.arange(text.tokens.shape[1]).expand_as(text.tokens), None)
    return {"logits": logits, "mask": text.loss_mask,
            "plain": compute_logprobs(model, text, temperature=0.7, max_tokens=24),
            "scored": tuple(compute_logprobs(model, text, temperature=0.7, max_tokens=24, token_stats=True))}


@pytest.mark.slow
def test_scoring_pass_returns_entropy_and_self_certainty_of_each_response_token():
    out = run_distributed(_scoring_worker, 1, timeout=240)[0]
    logp_all = torch.log_softmax(out["logits"].double() / 0.7, dim=-1)
    mask = out["mask"].bool()
    logp, entropy, certainty = out["scored"]
    torch.testing.assert_close(logp, out["plain"], atol=0, rtol=0)
    ref_h = (-(logp_all.exp() * logp_all).sum(-1)).float() * mask
    ref_kl = (-math.log(logp_all.shape[-1]) - logp_all.mean(-1)).float() * mask
    torch.testing.assert_close(entropy, ref_h, atol=1e-5, rtol=0)
    torch.testing.assert_close(certainty, ref_kl, atol=1e-5, rtol=0)
    assert (certainty[mask] > 0).all() and (entropy[~mask] == 0).all()
