"""loss.rollout_correction on hand-made log-prob mismatches: the weights are the capped ratios, and every loss
implementation (reference, the Triton logits kernel, the fused-linear kernel; interpreted on CPU) scales each
token's policy-gradient term, and its gradient, by exactly that weight while the KL term stays unweighted."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_selfjudge import loss as ref_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = dict(atol=1e-5, rtol=1e-5)


def test_token_and_sequence_weights_are_the_capped_ratios():
    train = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, -3.0, -2.0]])
    rollout = torch.tensor([[-1.5, -1.0, -0.5, 9.0], [-0.2, -1.1, -3.0, -2.5]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    cap = 1.5
    token = ref_loss.rollout_correction_weights(train, rollout, mask, "token", cap)
    # exp(0.5)=1.65 -> capped at 1.5; exp(-1)=0.37; exp(0)=1; the padded position gets 0.
    want = torch.tensor([[1.5, math.exp(-1.0), 1.0, 0.0], [math.exp(-0.8), math.exp(0.1), 1.0, 1.5]])
    torch.testing.assert_close(token, want)
    seq = ref_loss.rollout_correction_weights(train, rollout, mask, "sequence", cap)
    # Row 0: exp(0.5 - 1 + 0) = 0.61 on its three tokens; row 1: exp(-0.8 + 0.1 + 0 + 0.5) = 0.82.
    torch.testing.assert_close(seq, torch.tensor([[math.exp(-0.5)] * 3 + [0.0], [math.exp(-0.2)] * 4]))
    huge = ref_loss.rollout_correction_weights(torch.zeros(1, 3000), torch.full((1, 3000), -1.0),
                                               torch.ones(1, 3000), "sequence", cap)
    assert torch.equal(huge, torch.full((1, 3000), 1.5))  # exp(3000) capped, never inf
    assert ref_loss.rollout_correction_weights(train, rollout, mask, "none", cap) is None
    with pytest.raises(ValueError, match="rollout correction"):
        ref_loss.rollout_correction_weights(train, rollout, mask, "tokens", cap)
    with pytest.raises(ValueError, match="cap"):
        ref_loss.rollout_correction_weights(train, rollout, mask, "token", 0.0)


def test_mismatch_metrics_on_hand_made_log_probs():
    train = torch.tensor([[-1.0, -2.0, 5.0]])
    rollout = torch.tensor([[-1.5, -1.0, 0.0]])
    got = ref_loss.rollout_mismatch(train, rollout, torch.tensor([[1, 1, 0]]))
    r = torch.tensor([0.5, -1.0], dtype=torch.float64)
    assert got["rollout_logp_diff_mean"] == pytest.approx(0.75)
    assert got["rollout_logp_diff_max"] == pytest.approx(1.0)
    assert got["rollout_k3"] == pytest.approx(float((r.exp() - 1 - r).mean()))


def _inputs(seed=3, n=24, vocab=301, hidden=16):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen)
    weight = torch.randn(vocab, hidden, generator=gen) * 0.3
    targets = torch.randint(0, vocab, (n,), generator=gen)
    logp = ref_loss.token_logprobs(h @ weight.T, targets, 0.9)
    # Advantages of both signs, old log-probs far enough to hit the clip and the dual clip.
    adv = torch.randn(n, generator=gen) * 2
    old = logp + torch.randn(n, generator=gen) * 0.6
    ref = logp + torch.randn(n, generator=gen) * 0.3
    rollout = old + torch.randn(n, generator=gen) * 0.5  # the rollout engine's log-probs of the same tokens
    w = ref_loss.rollout_correction_weights(old.view(1, -1), rollout.view(1, -1), torch.ones(1, n), "token", 1.3)
    return h, weight, targets, adv, old, ref, w.view(-1)


@pytest.mark.parametrize("impl", list(ref_loss.LOSS_IMPLS))
def test_every_impl_scales_the_pg_term_and_its_gradient_by_the_weight(impl):
    h, weight, targets, adv, old, ref, w = _inputs()
    assert (w < 1.3).any() and (w == 1.3).any()  # some tokens are truncated, some not
    params = ref_loss.LossParams.of(dict(temperature=0.9, beta_kl=0.05))
    chosen = ref_loss.LOSS_IMPLS[impl]

    def terms(scale: torch.Tensor):
        hidden = h.clone().to(DEVICE).requires_grad_()
        source = ref_loss.HiddenStates(hidden, weight.to(DEVICE)) if chosen.from_hidden \
            else hidden @ weight.to(DEVICE).T
        out = chosen.per_token(source, targets.to(DEVICE), (adv * scale).to(DEVICE), old.to(DEVICE), ref.to(DEVICE),
                               params, valid=torch.ones_like(targets, dtype=torch.bool).to(DEVICE))
        return out, hidden

    plain, h_plain = terms(torch.ones_like(w))
    weighted, h_weighted = terms(w)
    # pg is scaled by w per token; the KL term and the ratio are untouched.
    torch.testing.assert_close(weighted.pg.cpu(), (plain.pg * w.to(DEVICE)).cpu(), **TOL)
    torch.testing.assert_close(weighted.kl.cpu(), plain.kl.cpu(), **TOL)
    torch.testing.assert_close(weighted.ratio.cpu(), plain.ratio.cpu(), **TOL)
    torch.testing.assert_close(weighted.clipped.cpu(), plain.clipped.cpu())
    # Gradient: d(sum of the impl's loss) equals d(sum(w * pg + beta * kl)) of loss.py's differentiable terms.
    weighted.loss.sum().backward()
    leaf = h.clone().to(DEVICE).requires_grad_()
    logp = ref_loss.token_logprobs(leaf @ weight.to(DEVICE).T, targets.to(DEVICE), 0.9)
    per = ref_loss.per_token_policy_loss(logp, adv.to(DEVICE), old.to(DEVICE), ref.to(DEVICE), beta_kl=0.05)
    (per.pg * w.to(DEVICE) + 0.05 * per.kl).sum().backward()
    torch.testing.assert_close(h_weighted.grad.cpu(), leaf.grad.cpu(), atol=1e-4, rtol=1e-4)
    plain.loss.sum().backward()
    assert not torch.allclose(h_weighted.grad, h_plain.grad, atol=1e-4)  # the weights did change the gradient


def test_policy_loss_applies_rollout_weight_per_token():
    h, weight, targets, adv, old, ref, w = _inputs(seed=5)
    logits = (h @ weight.T).view(2, 12, -1)
    args = (targets.view(2, 12), adv.view(2, 12), torch.ones(2, 12), old.view(2, 12), ref.view(2, 12))
    weighted, metrics = ref_loss.policy_loss(logits, *args, impl="reference", temperature=0.9, beta_kl=0.05,
                                             rollout_weight=w.view(2, 12))
    logp = ref_loss.token_logprobs(logits.reshape(-1, logits.shape[-1]), targets, 0.9)
    per = ref_loss.per_token_policy_loss(logp, adv, old, ref, beta_kl=0.05)
    torch.testing.assert_close(weighted, ((per.pg * w + 0.05 * per.kl) / 24).sum(), **TOL)
    plain, _ = ref_loss.policy_loss(logits, *args, impl="reference", temperature=0.9, beta_kl=0.05)
    assert not torch.allclose(weighted, plain)
    with pytest.raises(ValueError, match="rollout_weight"):
        ref_loss.policy_loss(logits, *args, impl="reference", rollout_weight=w[:5])
