"""Vocab-parallel log-probs and entropy equal log_softmax on the gathered vocab, forward and backward."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from megatron_selfjudge.megatron.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import run_distributed  # noqa: E402

N, V, T = 7, 12, 0.7
TOL = 1e-5  # fp32 vs an fp64 reference, logits of magnitude ~10


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, N, V, generator=g) * 3
    targets = torch.randint(0, V, (2, N), generator=g)
    grad_logp = torch.randn(2, N, generator=g)  # non-uniform upstream grads
    grad_ent = torch.randn(2, N, generator=g)
    return logits, targets, grad_logp, grad_ent


def _reference(logits, targets, grad_logp, grad_ent, temperature):
    """Plain fp64 PyTorch on the full vocab: values and d(sum(g1*logp + g2*H))/dlogits, as fp32."""
    x = logits.double().requires_grad_(True)
    grad_logp, grad_ent = grad_logp.double(), grad_ent.double()
    logp_all = torch.log_softmax(x / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    (logp * grad_logp + entropy * grad_ent).sum().backward()
    return logp.detach().float(), entropy.detach().float(), x.grad.float()


def _ours(logits, targets, grad_logp, grad_ent, temperature, tp_group=None):
    x = logits.clone().requires_grad_(True)
    logp = vocab_parallel_logprobs(x, targets, temperature=temperature, tp_group=tp_group)
    entropy = vocab_parallel_entropy(x, temperature=temperature, tp_group=tp_group)
    (logp * grad_logp + entropy * grad_ent).sum().backward()
    return logp.detach(), entropy.detach(), x.grad, x.detach()


@pytest.mark.parametrize("temperature", [1.0, T])
def test_single_process_matches_log_softmax(temperature):
    logits, targets, grad_logp, grad_ent = _inputs()
    ref = _reference(logits, targets, grad_logp, grad_ent, temperature)
    logp, entropy, grad, _ = _ours(logits, targets, grad_logp, grad_ent, temperature)
    assert logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, ref[0], atol=TOL, rtol=0)
    torch.testing.assert_close(entropy, ref[1], atol=TOL, rtol=0)
    torch.testing.assert_close(grad, ref[2], atol=TOL, rtol=0)


def test_entropy_of_uniform_and_one_hot():
    uniform = torch.zeros(3, V)
    torch.testing.assert_close(vocab_parallel_entropy(uniform), torch.full((3,), float(torch.log(torch.tensor(V)))))
    peaked = torch.full((1, V), -1e4)
    peaked[0, 3] = 0.0
    assert vocab_parallel_entropy(peaked).abs().max() < 1e-6


def test_bad_inputs_raise():
    logits, targets, _, _ = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_entropy(logits, temperature=-1.0)
    with pytest.raises(ValueError, match="targets"):
        vocab_parallel_logprobs(logits, torch.full_like(targets, V))
    with pytest.raises(ValueError, match="targets"):
        vocab_parallel_logprobs(logits, targets[:, :-1])
    with pytest.raises(TypeError, match="targets"):
        vocab_parallel_logprobs(logits, targets.float())
    with pytest.raises(TypeError, match="logits"):
        vocab_parallel_logprobs(targets, targets)


CASES = [(T, False), (1.3, True)]  # (temperature, pass megatron's TP group explicitly)


def _tp2_worker(rank: int, world: int) -> list:
    from megatron.core import parallel_state

    from megatron_selfjudge.megatron.parallel import initialize_parallel

    initialize_parallel(tp=world, pp=1, seed=0)
    logits, targets, grad_logp, grad_ent = _inputs()
    shard = logits.chunk(world, dim=-1)[rank].contiguous()
    out = []
    for temperature, explicit_group in CASES:
        group = parallel_state.get_tensor_model_parallel_group() if explicit_group else None
        before = shard.clone()
        logp, entropy, grad, after = _ours(shard, targets, grad_logp, grad_ent, temperature, group)
        assert torch.equal(after, before), "inputs must not be modified in place"
        out.append((logp, entropy, grad))
    return out


@pytest.mark.slow
def test_tp2_matches_gathered_reference():
    logits, targets, grad_logp, grad_ent = _inputs()
    results = run_distributed(_tp2_worker, 2, timeout=120)
    for case, (temperature, _) in enumerate(CASES):
        ref_logp, ref_entropy, ref_grad = _reference(logits, targets, grad_logp, grad_ent, temperature)
        for rank, per_case in enumerate(results):
            logp, entropy, grad = per_case[case]
            torch.testing.assert_close(logp, ref_logp, atol=TOL, rtol=0)
            torch.testing.assert_close(entropy, ref_entropy, atol=TOL, rtol=0)
            torch.testing.assert_close(grad, ref_grad.chunk(2, dim=-1)[rank], atol=TOL, rtol=0)
