"""Tests for the reference policy loss: hand-computed branches, gradients, aggregation, masking, dispatch."""
import math
import sys
import types
from collections import namedtuple

import pytest
import torch

from megatron_selfjudge import loss as L
from megatron_selfjudge.loss import (
    AGG_MODES,
    per_token_policy_loss,
    policy_loss,
    token_entropy,
    token_logprobs,
    token_weights,
)

HP = dict(eps_low=0.2, eps_high=0.2, dual_clip=3.0)


# ---------------------------------------------------------------- log-probs and entropy
def test_token_logprobs_hand_computed_with_temperature():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    targets = torch.tensor([2, 1])
    got = token_logprobs(logits, targets, temperature=2.0)
    # log softmax(z / 2) at the target, written out by hand
    want0 = 1.5 - math.log(math.exp(0.5) + math.exp(1.0) + math.exp(1.5))
    want1 = -0.5 - math.log(math.exp(0.0) + math.exp(-0.5) + math.exp(2.0))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([want0, want1]), rtol=0, atol=1e-6)


def test_token_entropy_hand_computed():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e4, -1e4]])
    got = token_entropy(logits)
    # uniform over 4: log 4; second row: p = (1/4, 3/4), the -1e4 entries have p = 0
    want = torch.tensor([math.log(4.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # temperature 2 on logits z equals temperature 1 on z / 2
    z = torch.randn(5, 7)
    torch.testing.assert_close(token_entropy(z, 2.0), token_entropy(z / 2.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_logits_give_fp32_outputs(dtype):
    logits = torch.randn(4, 9).to(dtype)
    targets = torch.randint(0, 9, (4,))
    got = token_logprobs(logits, targets)
    assert got.dtype == torch.float32 and token_entropy(logits).dtype == torch.float32
    want = torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- per-token branches
def _per_token(adv, ratio, **kw):
    """Per-token loss for given advantages and ratios: logp = log(ratio) + old with old = -1."""
    old = torch.full((len(adv),), -1.0, dtype=torch.float64)
    logp = (torch.log(torch.tensor(ratio, dtype=torch.float64)) + old).requires_grad_(True)
    out = per_token_policy_loss(logp, torch.tensor(adv, dtype=torch.float64), old, **{**HP, "beta_kl": 0.0, **kw})
    (grad,) = torch.autograd.grad(out.loss.sum(), logp)
    return out, grad


def test_each_clip_branch_hand_computed():
    cases = [  # (A, ratio, pg, clipped, d pg / d logp)
        (1.0, 1.1, -1.1, 0.0, -1.1),      # A > 0 inside the clip range
        (1.0, 1.5, -1.2, 1.0, 0.0),       # A > 0 above 1 + eps_high: clipped, no gradient
        (1.0, 0.5, -0.5, 0.0, -0.5),      # A > 0 below 1 - eps_low: the clip does not bind
        (-1.0, 0.5, 0.8, 1.0, 0.0),       # A < 0 below 1 - eps_low: clipped
        (-1.0, 1.5, 1.5, 0.0, 1.5),       # A < 0 above 1 + eps_high: not clipped, below dual clip
        (-2.0, 5.0, 6.0, 0.0, 0.0),       # A < 0 huge ratio: dual clip -c*A = 6 binds
        (-1.0, 2.9, 2.9, 0.0, 2.9),       # A < 0 just under the dual clip
        (0.0, 7.0, 0.0, 0.0, 0.0),        # A == 0
    ]
    adv, ratio, pg, clipped, grad = (list(col) for col in zip(*cases))
    out, got_grad = _per_token(adv, ratio)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(out.ratio, t(ratio), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.pg, t(pg), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.clipped, t(clipped))
    torch.testing.assert_close(got_grad, t(grad), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.kl, torch.zeros(len(adv), dtype=torch.float64))


def test_asymmetric_eps_and_logratio_clamp():
    out, _ = _per_token([1.0, -1.0], [1.25, 0.85], eps_low=0.1, eps_high=0.3)
    torch.testing.assert_close(out.pg, torch.tensor([-1.25, 0.9], dtype=torch.float64))  # 0.85 < 1 - 0.1
    torch.testing.assert_close(out.clipped, torch.tensor([0.0, 1.0], dtype=torch.float64))
    logp = torch.tensor([30.0, -30.0], requires_grad=True)
    out = per_token_policy_loss(logp, torch.tensor([1.0, 1.0]), torch.zeros(2))
    torch.testing.assert_close(out.ratio, torch.tensor([math.exp(20.0), math.exp(-20.0)]))
    (grad,) = torch.autograd.grad(out.loss.sum(), logp)
    assert torch.equal(grad, torch.zeros(2))  # beyond the clamp nothing flows back


def test_on_policy_ratio_is_one_and_gradient_flows():
    logp = torch.tensor([-0.3, -2.0, -5.0], requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 0.5])
    out = per_token_policy_loss(logp, adv, None, None, beta_kl=0.0)
    assert torch.equal(out.ratio, torch.ones(3)) and torch.equal(out.clipped, torch.zeros(3))
    torch.testing.assert_close(out.pg, -adv)
    (grad,) = torch.autograd.grad(out.loss.sum(), logp)
    torch.testing.assert_close(grad, -adv)  # d(-A * exp(logp - sg(logp))) / d logp = -A


def test_k3_kl_with_both_clamps():
    d = torch.tensor([0.5, -0.5, 3.0, -5.0, 25.0, -30.0, 0.0], dtype=torch.float64)  # ref - logp
    logp = torch.full_like(d, -2.0)
    out = per_token_policy_loss(logp, torch.zeros_like(d), None, logp + d, beta_kl=0.25)
    raw = [math.exp(x) - x - 1 for x in (0.5, -0.5, 3.0, -5.0)]
    want = torch.tensor(raw + [10.0, 10.0, 0.0], dtype=torch.float64)
    # exp(3)-4 = 16.09 and the clamped log-ratios (+-20) all exceed kl_clamp = 10
    want[2] = 10.0
    torch.testing.assert_close(out.kl, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, out.pg + 0.25 * want, rtol=1e-12, atol=1e-12)
    # with a looser kl clamp the log-ratio clamp becomes visible: exp(20) - 21 and exp(-20) + 19
    wide = per_token_policy_loss(logp, torch.zeros_like(d), None, logp + d, kl_clamp=1e12)
    torch.testing.assert_close(wide.kl[4:6], torch.tensor([math.exp(20) - 21, math.exp(-20) + 19],
                                                          dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.equal(per_token_policy_loss(logp, torch.zeros_like(d)).kl, torch.zeros_like(d))


def test_k3_gradient():
    logp = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -0.5], dtype=torch.float64)
    out = per_token_policy_loss(logp, torch.zeros(2, dtype=torch.float64), None, ref, beta_kl=1.0)
    (grad,) = torch.autograd.grad(out.loss.sum(), logp)
    d = ref - logp.detach()
    torch.testing.assert_close(grad, 1.0 - torch.exp(d))  # d/dlogp [e^d - d - 1] with d = ref - logp


# ---------------------------------------------------------------- token weights
def test_token_weights_hand_computed():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    w = token_weights(mask, "token-mean")
    torch.testing.assert_close(w, mask.float() / 6)
    w = token_weights(mask, "seq-mean-token-mean")
    want = torch.tensor([[1 / 4, 1 / 4, 0, 0], [0, 0, 0, 0], [1 / 8, 1 / 8, 1 / 8, 1 / 8]])
    torch.testing.assert_close(w, want)
    w = token_weights(mask, "seq-mean-token-sum", global_normalizer=4)
    torch.testing.assert_close(w, mask.float() / 4)
    w = token_weights(mask.bool(), "token-mean", global_normalizer=torch.tensor(12))
    torch.testing.assert_close(w, mask.float() / 12)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_token_weights_empty_and_zero_normalizer(agg):
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert torch.equal(token_weights(empty, agg), torch.zeros(2, 3))
    assert torch.equal(token_weights(empty, agg, global_normalizer=0), torch.zeros(2, 3))
    assert torch.equal(token_weights(empty, agg, global_normalizer=5), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="global_normalizer"):
        token_weights(torch.ones(2, 3), agg, global_normalizer=1)  # smaller than the local count


def test_token_weights_bad_input():
    with pytest.raises(ValueError, match="agg"):
        token_weights(torch.ones(2, 3), "mean")
    with pytest.raises(ValueError, match="mask"):
        token_weights(torch.ones(6), "token-mean")
    with pytest.raises(ValueError, match="0/1"):
        token_weights(torch.full((2, 3), 2.0), "token-mean")
    with pytest.raises(ValueError, match="global_normalizer"):
        token_weights(torch.ones(2, 3), "token-mean", global_normalizer=-1)


# ---------------------------------------------------------------- policy_loss end to end
def _batch(b=6, t=7, v=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=dtype) * 2
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[1] = False  # one sequence with no valid token
    mask[2, :3] = False  # left padding
    adv = torch.randn(b, generator=g, dtype=dtype)
    with torch.no_grad():
        logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    # old/ref near the current policy, spread enough that some tokens clip
    old = logp + 0.4 * torch.randn(b, t, generator=g, dtype=dtype)
    ref = logp + 0.3 * torch.randn(b, t, generator=g, dtype=dtype)
    return logits, targets, adv, mask, old, ref


def _reference_aggregate(per_token, mask, agg):
    """Aggregation written independently of token_weights."""
    rows = [per_token[i][mask[i]] for i in range(mask.shape[0]) if mask[i].any()]
    if agg == "token-mean":
        return torch.cat(rows).mean()
    if agg == "seq-mean-token-mean":
        return torch.stack([r.mean() for r in rows]).mean()
    return torch.stack([r.sum() for r in rows]).mean()


@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_loss_matches_explicit_aggregation(agg):
    logits, targets, adv, mask, old, ref = _batch()
    loss, metrics = policy_loss(logits, targets, adv, mask, old, ref, agg=agg, beta_kl=0.1, impl="reference", **HP)
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    per = per_token_policy_loss(logp, adv[:, None].expand_as(logp), old, ref, beta_kl=0.1, **HP)
    torch.testing.assert_close(loss, _reference_aggregate(per.loss, mask, agg), rtol=1e-6, atol=1e-6)
    assert 0 < float(metrics["clip_frac"]) < 1  # the batch exercises both branches
    torch.testing.assert_close(metrics["clip_frac"], per.clipped[mask].mean())
    dual = (adv[:, None] < 0) & (per.ratio > HP["dual_clip"])
    torch.testing.assert_close(metrics["dual_clip_frac"], dual[mask].float().mean())
    torch.testing.assert_close(metrics["kl"], per.kl[mask].mean())
    torch.testing.assert_close(metrics["pg_loss"], per.pg[mask].mean())
    torch.testing.assert_close(metrics["ratio_min"], per.ratio[mask].min())
    torch.testing.assert_close(metrics["ratio_max"], per.ratio[mask].max())
    torch.testing.assert_close(metrics["entropy"], token_entropy(logits)[mask].mean())
    assert float(metrics["valid_tokens"]) == mask.sum()
    # the entropy bonus is subtracted: a higher entropy lowers the loss
    bonus, _ = policy_loss(logits, targets, adv, mask, old, ref, agg=agg, beta_kl=0.1, entropy_coef=0.3,
                           impl="reference", **HP)
    want_bonus = loss - 0.3 * _reference_aggregate(token_entropy(logits), mask, agg)
    torch.testing.assert_close(bonus, want_bonus, rtol=1e-6, atol=1e-6)


def test_flat_logits_and_per_token_advantages_match_batched():
    logits, targets, adv, mask, old, ref = _batch()
    b, t, v = logits.shape
    want, _ = policy_loss(logits, targets, adv, mask, old, ref, impl="reference")
    got, _ = policy_loss(logits.reshape(b * t, v), targets.reshape(-1), adv[:, None].expand(b, t).reshape(-1),
                         mask, old.reshape(-1), ref.reshape(-1), impl="reference")
    torch.testing.assert_close(got, want)
    # a 1-D mask is one flat token list: fine for token-mean, refused for seq-mean
    flat, _ = policy_loss(logits.reshape(b * t, v), targets.reshape(-1), adv[:, None].expand(b, t).reshape(-1),
                          mask.reshape(-1), old.reshape(-1), ref.reshape(-1), impl="reference")
    torch.testing.assert_close(flat, want)
    with pytest.raises(ValueError, match="seq-mean"):
        policy_loss(logits.reshape(b * t, v), targets.reshape(-1), torch.zeros(b * t), mask.reshape(-1),
                    agg="seq-mean-token-mean", impl="reference")


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("with_ref", [True, False])
def test_gradcheck_float64(agg, with_ref):
    logits, targets, adv, mask, old, ref = _batch(b=3, t=4, v=5, seed=1, dtype=torch.float64)
    ref = ref if with_ref else None
    logits.requires_grad_(True)

    def fn(z):
        return policy_loss(z, targets, adv, mask, old, ref, agg=agg, beta_kl=0.1, entropy_coef=0.05,
                           impl="reference", **HP)[0]

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_on_policy_gradient_is_policy_gradient(agg):
    # gradcheck cannot see a stop-gradient (old moves with logp), so compare with -A * grad(logp)
    logits, targets, adv, mask, _, _ = _batch(seed=11, dtype=torch.float64)
    logits.requires_grad_(True)
    loss, metrics = policy_loss(logits, targets, adv, mask, agg=agg, impl="reference")
    (got,) = torch.autograd.grad(loss, logits)
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    surrogate = (token_weights(mask, agg) * -adv[:, None] * logp).sum()
    (want,) = torch.autograd.grad(surrogate, logits)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(loss.detach(), (token_weights(mask, agg) * -adv[:, None]).sum().detach())
    assert float(metrics["ratio_min"]) == float(metrics["ratio_max"]) == 1.0


@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batches_and_dp_ranks_sum_to_global_loss_and_grads(agg):
    logits, targets, adv, mask, old, ref = _batch(b=8, t=6, seed=2)
    logits.requires_grad_(True)
    kw = dict(agg=agg, beta_kl=0.05, entropy_coef=0.01, impl="reference", **HP)
    full, _ = policy_loss(logits, targets, adv, mask, old, ref, **kw)
    (full_grad,) = torch.autograd.grad(full, logits)

    norm = mask.sum() if agg == "token-mean" else mask.any(dim=1).sum()
    # rank 0 holds rows 0-3 in micro-batches [0:1], [1:4]; rank 1 holds rows 4-7 in [4:6], [6:8]
    ranks = [[slice(0, 1), slice(1, 4)], [slice(4, 6), slice(6, 8)]]
    total, grad = torch.zeros(()), torch.zeros_like(logits)
    for micro_batches in ranks:
        for s in micro_batches:
            part, _ = policy_loss(logits[s], targets[s], adv[s], mask[s], old[s], ref[s], global_normalizer=norm, **kw)
            (g,) = torch.autograd.grad(part, logits)
            total, grad = total + part.detach(), grad + g
    torch.testing.assert_close(total, full.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, full_grad, rtol=0, atol=1e-6)


def test_masked_tokens_get_zero_gradient_even_with_junk_padding():
    logits, targets, adv, mask, old, ref = _batch(seed=3)
    targets = torch.where(mask, targets, torch.full_like(targets, -100))  # ignore-index padding
    old = torch.where(mask, old, torch.full_like(old, float("nan")))
    ref = torch.where(mask, ref, torch.full_like(ref, -float("inf")))
    adv_tok = torch.where(mask, adv[:, None].expand_as(mask), torch.full(mask.shape, float("inf")))
    logits.requires_grad_(True)
    for agg in AGG_MODES:
        loss, metrics = policy_loss(logits, targets, adv_tok, mask, old, ref, agg=agg, impl="reference")
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
        assert grad[mask].abs().sum() > 0


def test_temperature_scales_logits_before_log_softmax():
    logits, targets, adv, mask, old, ref = _batch(seed=4)
    temp = 0.7
    got, m_got = policy_loss(logits, targets, adv, mask, old, ref, temperature=temp, impl="reference")
    want, m_want = policy_loss(logits / temp, targets, adv, mask, old, ref, temperature=1.0, impl="reference")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(m_got["entropy"], m_want["entropy"])
    # by hand for one token: logp = z_t / T - log sum_j exp(z_j / T)
    z, t = logits[0, 0].double().tolist(), int(targets[0, 0])
    hand = z[t] / temp - math.log(sum(math.exp(x / temp) for x in z))
    assert abs(float(token_logprobs(logits[0, :1], targets[0, :1], temp)) - hand) < 1e-5


def test_extreme_logits_are_finite():
    g = torch.Generator().manual_seed(5)
    logits = (torch.randint(0, 2, (3, 4, 13), generator=g).float() * 2 - 1) * 1e4
    logits[0, 0] = 1e4  # an all-equal row
    logits.requires_grad_(True)
    targets = torch.randint(0, 13, (3, 4), generator=g)
    mask = torch.ones(3, 4, dtype=torch.bool)
    logp = token_logprobs(logits, targets)
    assert torch.isfinite(logp).all() and (logp <= 0).all()
    assert torch.isfinite(token_entropy(logits)).all() and (token_entropy(logits) >= -1e-6).all()
    old = torch.full((3, 4), -1.0)
    loss, metrics = policy_loss(logits, targets, torch.tensor([1.0, -1.0, 2.0]), mask, old, old,
                                entropy_coef=0.1, impl="reference")
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_all_masked_batch_gives_zero_loss_and_neutral_metrics():
    logits, targets, adv, mask, old, ref = _batch(seed=6)
    logits.requires_grad_(True)
    loss, metrics = policy_loss(logits, targets, adv, torch.zeros_like(mask), old, ref, impl="reference")
    assert float(loss.detach()) == 0.0
    assert float(metrics["clip_frac"]) == 0.0 and float(metrics["ratio_min"]) == 1.0
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_bad_arguments_raise_clear_errors():
    logits, targets, adv, mask, old, ref = _batch(seed=7)
    cases = [
        (dict(temperature=0.0), "temperature"),
        (dict(eps_low=1.0), "eps_low"),
        (dict(dual_clip=1.0), "dual_clip"),
        (dict(agg="sum"), "agg"),
        (dict(impl="cuda"), "impl"),
        (dict(impl="fused_linear"), "hidden states"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ValueError, match=field):
            policy_loss(logits, targets, adv, mask, old, ref, **kwargs)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(logits[0], torch.full((7,), 11))
    with pytest.raises(TypeError, match="targets"):
        token_logprobs(logits[0], torch.zeros(7))
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(logits, targets, adv, mask, old[:, :3], ref)
    with pytest.raises(ValueError, match="advantages"):
        per_token_policy_loss(torch.zeros(3), torch.zeros(4))


# ---------------------------------------------------------------- implementation dispatch
FusedOut = namedtuple("FusedOut", "loss logprobs kl clipped entropy")


def _fake_kernel_module(calls):
    """Stand-in for kernels/grpo_loss.py with the brief's API, built on the reference: tests the wiring."""

    def fused_grpo_loss(logits, targets, advantages, mask, old_logp=None, ref_logp=None, *, temperature,
                        eps_low, eps_high, dual_clip, beta_kl, logratio_clamp=L.LOGRATIO_CLAMP,
                        kl_clamp=L.KL_CLAMP, compute_entropy=False, tp_group=None, vocab_start_index=0,
                        inplace_backward=False):
        calls.append(dict(shape=tuple(logits.shape), mask=mask.clone(), temperature=temperature, eps_low=eps_low,
                          eps_high=eps_high, dual_clip=dual_clip, beta_kl=beta_kl))
        logp = token_logprobs(logits, targets, temperature)
        per = per_token_policy_loss(logp, advantages, old_logp, ref_logp, eps_low=eps_low, eps_high=eps_high,
                                    dual_clip=dual_clip, beta_kl=beta_kl)
        keep = mask.float()
        entropy = token_entropy(logits, temperature) * keep if compute_entropy else None
        return FusedOut(per.loss * keep, logp.detach(), per.kl.detach() * keep, per.clipped * keep, entropy)

    module = types.ModuleType(L.KERNEL_MODULE)
    module.fused_grpo_loss = fused_grpo_loss
    return module


@pytest.mark.parametrize("agg", AGG_MODES)
def test_logits_kernel_wiring_matches_reference(monkeypatch, agg):
    calls = []
    monkeypatch.setitem(sys.modules, L.KERNEL_MODULE, _fake_kernel_module(calls))
    logits, targets, adv, mask, old, ref = _batch(seed=8)
    logits.requires_grad_(True)
    kw = dict(agg=agg, temperature=0.9, eps_low=0.1, eps_high=0.28, dual_clip=2.5, beta_kl=0.2, entropy_coef=0.05)
    for o, r in ((old, ref), (None, None)):
        want, m_want = policy_loss(logits, targets, adv, mask, o, r, impl="reference", **kw)
        got, m_got = policy_loss(logits, targets, adv, mask, o, r, impl="logits_kernel", **kw)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, logits)[0], torch.autograd.grad(want, logits)[0])
        assert m_got.keys() == m_want.keys()
        for key in m_want:
            torch.testing.assert_close(m_got[key], m_want[key], msg=key)
    call = calls[-1]
    assert call["shape"] == (6 * 7, 11) and torch.equal(call["mask"], mask.reshape(-1))
    assert (call["temperature"], call["eps_low"], call["eps_high"], call["dual_clip"], call["beta_kl"]) == (
        0.9, 0.1, 0.28, 2.5, 0.2)


def test_auto_impl_choice(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, L.KERNEL_MODULE, _fake_kernel_module(calls))
    logits, targets, adv, mask, old, ref = _batch(seed=9)
    # CPU logits: the reference, even with the interpreter on (it is ~1000x slower than eager).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    policy_loss(logits, targets, adv, mask, old, ref, impl="auto")
    assert calls == []
    policy_loss(logits, targets, adv, mask, old, ref, impl="logits_kernel")
    assert len(calls) == 1
    if torch.cuda.is_available():
        cuda = [t.cuda() for t in (logits, targets, adv, mask, old, ref)]
        policy_loss(*cuda, impl="auto", entropy_coef=0.1)  # entropy bonus: the reference
        assert len(calls) == 1
        policy_loss(*cuda, impl="auto")
        assert len(calls) == 2


def test_logits_kernel_import_failure_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, L.KERNEL_MODULE, None)  # makes the import raise ImportError
    logits, targets, adv, mask, old, ref = _batch(seed=10)
    with pytest.raises(RuntimeError, match="grpo_loss"):
        policy_loss(logits, targets, adv, mask, old, ref, impl="logits_kernel")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    loss, _ = policy_loss(logits, targets, adv, mask, old, ref, impl="auto")  # falls back to the reference
    want, _ = policy_loss(logits, targets, adv, mask, old, ref, impl="reference")
    assert torch.equal(loss, want)


def test_registry_names_and_auto_resolution(monkeypatch):
    """One list of names: the registry's, 'auto' on top; auto takes the logits kernel only for CUDA."""
    assert L.IMPL_CHOICES == ("auto", "reference", "logits_kernel", "fused_linear")
    assert [impl.from_hidden for impl in L.LOSS_IMPLS.values()] == [False, False, True]
    monkeypatch.setitem(sys.modules, L.KERNEL_MODULE, _fake_kernel_module([]))
    cuda = torch.device("cuda")  # only the device type is read: no GPU needed
    assert L.resolve_impl("auto", cuda).name == "logits_kernel"
    assert L.resolve_impl("auto", cuda, entropy_coef=0.1).name == "reference"
    assert L.resolve_impl("auto", torch.device("cpu")).name == "reference"
    assert L.resolve_impl("fused_linear", torch.device("cpu")) is L.LOSS_IMPLS["fused_linear"]
    monkeypatch.setitem(sys.modules, L.KERNEL_MODULE, None)
    assert L.resolve_impl("auto", cuda).name == "reference"  # kernel not importable: the reference
    with pytest.raises(ValueError, match="impl must be one of"):
        L.resolve_impl("torch", cuda)


def test_config_accepts_exactly_the_registry_names():
    from megatron_selfjudge.config import ConfigError, load_config

    for name in L.IMPL_CHOICES:
        assert load_config(overrides=[f"loss.impl={name}"]).loss.impl == name
    with pytest.raises(ConfigError, match="loss.impl"):
        load_config(overrides=["loss.impl=triton"])


def test_impls_reject_the_other_kind_of_input():
    logits = torch.randn(3, 5)
    hidden = L.HiddenStates(torch.randn(3, 4), torch.randn(5, 4))
    targets, zeros = torch.tensor([0, 1, 4]), torch.zeros(3)
    with pytest.raises(TypeError, match="HiddenStates"):
        L.LOSS_IMPLS["fused_linear"].logprobs(logits, targets, 1.0)
    with pytest.raises(TypeError, match="logits"):
        L.LOSS_IMPLS["reference"].per_token(hidden, targets, zeros, None, None, L.LossParams())


def test_unknown_hyper_parameter_is_named():
    """A misspelt hyper-parameter is refused by name, not silently replaced by its default."""
    logits, targets = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    adv, mask = torch.ones(2), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match="beta_k"):
        policy_loss(logits, targets, adv, mask, impl="reference", beta_k=0.1)
    with pytest.raises(TypeError, match="temperature"):
        per_token_policy_loss(torch.zeros(3), torch.zeros(3), temperature=0.5)
