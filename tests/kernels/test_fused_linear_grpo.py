"""Fused hidden-states -> log-prob -> GRPO loss against the reference chain (torch matmul -> log_softmax -> loss.py).

On CPU the kernels run in Triton's interpreter (tests/kernels/conftest.py), so shapes are tiny. H = 21
and V = 103 are odd; with BLOCK_V = 32 every row's vocabulary is split over four tiles (the last
ragged) and merged by the online log-sum-exp, BLOCK_H = 16 splits H in two, and chunk_tokens = 10
(smaller than BLOCK_N = 16, not a divisor of N = 37) makes the backward's token chunks end inside a
token tile; two vocabulary splits (64 + 39 columns) make the forward merge partials like TP shards. Gradients are checked for d_hidden and d_weight under a non-uniform upstream gradient.
"""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_selfjudge import loss as ref_loss
from megatron_selfjudge.kernels.fused_linear_grpo import fused_linear_grpo_loss, fused_linear_logprobs, launch_blocks
from megatron_selfjudge.kernels.grpo_loss import fused_grpo_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N, H, V = 37, 21, 103
BLOCKS = dict(block_n=16, block_v=32, block_h=16, chunk_tokens=10, vocab_splits=2)  # splits of 64 + 39 columns
TOL = dict(atol=1e-5, rtol=1e-5)
OUTPUTS = ("loss", "logprobs", "kl", "clipped", "entropy")


def make_batch(n=N, hidden=H, vocab=V, dtype=torch.float32, masked=0.3, seed=0, old=True, ref=True, scale=1.0):
    """Hidden states, an output weight, targets and per-token inputs; old/ref log-probs near the current ones."""
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hidden, generator=gen) * scale).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * 0.6).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    current = ref_loss.token_logprobs(h.float() @ w.float().T, targets)
    batch = dict(
        hidden=h, weight=w, targets=targets, advantages=torch.randn(n, generator=gen),
        mask=torch.rand(n, generator=gen) >= masked,
        old_logp=current + 0.4 * torch.randn(n, generator=gen) if old else None,
        ref_logp=current + 0.4 * torch.randn(n, generator=gen) if ref else None,
    )
    upstream = 0.5 + torch.rand(n, generator=gen)  # non-uniform per-token weights
    return {k: (v.to(DEVICE) if v is not None else None) for k, v in batch.items()}, upstream.to(DEVICE)


def objective(out, upstream, mask, entropy_weight, side_weight):
    """sum(g * (loss + e H + s (logp + kl))) over valid tokens: every output's gradient path is live."""
    keep = mask.float()
    total = (out["loss"] * upstream * keep).sum() + entropy_weight * (out["entropy"] * upstream * keep).sum()
    return total + side_weight * ((out["logprobs"] * upstream.flip(0) + out["kl"] * upstream) * keep).sum()


def reference(batch, upstream, temperature=1.0, entropy_weight=0.0, side_weight=0.0, **params):
    """The unfused chain in fp32: logits = h @ W^T, loss.py's log-probs, entropy and per-token loss."""
    h = batch["hidden"].float().requires_grad_()
    w = batch["weight"].float().requires_grad_()
    logits = h @ w.T
    logp = ref_loss.token_logprobs(logits, batch["targets"], temperature)
    per = ref_loss.per_token_policy_loss(logp, batch["advantages"], batch["old_logp"], batch["ref_logp"], **params)
    mask = batch["mask"].float()
    out = dict(loss=per.loss * mask, logprobs=logp * mask, kl=per.kl * mask, clipped=per.clipped * mask,
               entropy=ref_loss.token_entropy(logits, temperature) * mask)
    objective(out, upstream, batch["mask"], entropy_weight, side_weight).backward()
    return {**{k: v.detach() for k, v in out.items()}, "d_hidden": h.grad, "d_weight": w.grad}


def fused(batch, upstream, temperature=1.0, entropy_weight=0.0, side_weight=0.0, blocks=BLOCKS, **params):
    """The fused op's outputs and gradients for the same objective."""
    h = batch["hidden"].clone().requires_grad_()
    w = batch["weight"].clone().requires_grad_()
    res = fused_linear_grpo_loss(h, w, batch["targets"], batch["advantages"], batch["mask"], batch["old_logp"],
                                 batch["ref_logp"], temperature=temperature, compute_entropy=True, **blocks, **params)
    out = {key: getattr(res, key) for key in OUTPUTS}
    objective(out, upstream, batch["mask"], entropy_weight, side_weight).backward()
    return {**{k: v.detach() for k, v in out.items()}, "d_hidden": h.grad, "d_weight": w.grad}


def assert_close(got, want, grads=True):
    for key in OUTPUTS:
        torch.testing.assert_close(got[key].float(), want[key].float(), **TOL, msg=lambda m: f"{key}: {m}")
    for key in ("d_hidden", "d_weight") if grads else ():
        # Gradients sum N (d_weight) or V (d_hidden) products in another order: fp32 noise relative to their size.
        scale = max(1.0, float(want[key].abs().max()))
        torch.testing.assert_close(got[key].float(), want[key].float(), atol=1e-5 * scale, rtol=1e-5,
                                   msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("case", [
    dict(),
    dict(temperature=0.7),
    dict(temperature=1.6, entropy_weight=0.3),
    dict(side_weight=0.7, entropy_weight=0.2),  # upstream gradients on logprobs and kl too
    dict(old=False, ref=False, temperature=0.5),  # on-policy, no KL
    dict(masked=0.9),  # heavy masking
    dict(beta_kl=0.5, eps_low=0.1, eps_high=0.28, dual_clip=2.0, scale=3.0),  # clips, dual clip, clamps
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_fp32_forward_and_backward_match_the_reference_chain(case):
    case = dict(case)
    batch_args = {k: case.pop(k) for k in ("old", "ref", "masked", "scale") if k in case}
    batch, upstream = make_batch(**batch_args)
    got, want = fused(batch, upstream, **case), reference(batch, upstream, **case)
    assert_close(got, want)
    assert got["d_weight"].abs().max() > 0 and got["d_hidden"].abs().max() > 0


@pytest.mark.parametrize("blocks", [
    dict(block_n=16, block_v=16, block_h=16, chunk_tokens=37, vocab_splits=1),  # one backward chunk, one split
    dict(block_n=32, block_v=128, block_h=32, chunk_tokens=1),  # one vocab tile per row, one token per chunk
    dict(block_n=16, block_v=16, block_h=16, vocab_splits=5),  # asks five: four splits, 32 + 32 + 32 + 7 columns
    dict(),  # the default launch configuration
], ids=["one-chunk", "token-chunks", "five-splits", "defaults"])
def test_tiling_does_not_change_the_result(blocks):
    batch, upstream = make_batch(seed=1)
    assert_close(fused(batch, upstream, temperature=0.8, entropy_weight=0.1, blocks=blocks),
                 fused(batch, upstream, temperature=0.8, entropy_weight=0.1))


def test_equals_the_logits_kernel_on_the_materialised_logits():
    """Shared math: the fused op and grpo_loss.fused_grpo_loss on h @ W^T agree in every output and gradient."""
    batch, upstream = make_batch(seed=2)
    got = fused(batch, upstream, temperature=0.9, entropy_weight=0.2, side_weight=0.5)
    h = batch["hidden"].clone().requires_grad_()
    w = batch["weight"].clone().requires_grad_()
    res = fused_grpo_loss(h @ w.T, batch["targets"], batch["advantages"], batch["mask"], batch["old_logp"],
                          batch["ref_logp"], temperature=0.9, compute_entropy=True, block_v=32)
    out = {key: getattr(res, key) for key in OUTPUTS}
    objective(out, upstream, batch["mask"], 0.2, 0.5).backward()
    assert_close(got, {**{k: v.detach() for k, v in out.items()}, "d_hidden": h.grad, "d_weight": w.grad})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_two_ulps_of_the_largest_gradient(dtype):
    """bf16/fp16 inputs: fp32 statistics equal fp32 math on the same values; gradients are rounded once
    (dlogits to the dtype, as an unfused low-precision output layer also does), so each is within two
    ulps of its largest magnitude."""
    batch, upstream = make_batch(dtype=dtype, seed=3)
    got = fused(batch, upstream, temperature=0.8, entropy_weight=0.2)
    want = reference(batch, upstream, temperature=0.8, entropy_weight=0.2)
    assert got["d_hidden"].dtype == dtype and got["d_weight"].dtype == dtype
    assert_close(got, want, grads=False)
    for key in ("d_hidden", "d_weight"):
        largest = float(want[key].abs().max())
        ulp = 2.0 ** (torch.tensor(largest).log2().floor().item()) * torch.finfo(dtype).eps
        error = float((got[key].float() - want[key]).abs().max())
        assert error <= 2 * ulp, f"{key}: {error} > 2 ulp ({ulp})"
        assert (got[key] != 0).float().mean() > 0.5  # not vacuous


def test_forward_only_logprobs_and_entropy():
    batch, _ = make_batch(seed=4, dtype=torch.bfloat16)
    h = batch["hidden"].requires_grad_()
    logp, entropy = fused_linear_logprobs(h, batch["weight"], batch["targets"], 1.3, with_entropy=True,
                                          block_n=16, block_v=32, block_h=16, vocab_splits=3)
    assert not logp.requires_grad and logp.dtype == torch.float32
    logits = h.detach().float() @ batch["weight"].float().T
    torch.testing.assert_close(logp, ref_loss.token_logprobs(logits, batch["targets"], 1.3), **TOL)
    torch.testing.assert_close(entropy, ref_loss.token_entropy(logits, 1.3), **TOL)
    only = fused_linear_logprobs(h, batch["weight"], batch["targets"], 1.3)
    torch.testing.assert_close(only, logp, **TOL)  # default tiles: another summation order


def test_masked_tokens_have_zero_gradient_and_ignore_junk():
    batch, upstream = make_batch(masked=0.5, seed=5)
    masked = ~batch["mask"]
    batch["targets"] = torch.where(masked, torch.full_like(batch["targets"], -100), batch["targets"])
    for key in ("old_logp", "ref_logp", "advantages"):
        batch[key] = torch.where(masked, torch.full_like(batch[key], float("nan")), batch[key])
    got = fused(batch, upstream, entropy_weight=0.2)
    assert torch.equal(got["d_hidden"][masked], torch.zeros_like(got["d_hidden"][masked]))
    for key in OUTPUTS:
        assert torch.equal(got[key][masked], torch.zeros(int(masked.sum()), device=DEVICE)), key
    assert torch.isfinite(got["d_weight"]).all() and (got["d_hidden"][~masked] != 0).any()
    clean = dict(batch, targets=batch["targets"].clamp(min=0),
                 **{k: torch.nan_to_num(batch[k]) for k in ("old_logp", "ref_logp", "advantages")})
    assert_close(got, reference(clean, upstream, entropy_weight=0.2))


def test_empty_batch_and_unused_hidden_gradient():
    batch, _ = make_batch(n=0, seed=6)
    h, w = batch["hidden"].requires_grad_(), batch["weight"].clone().requires_grad_()
    out = fused_linear_grpo_loss(h, w, batch["targets"], batch["advantages"], batch["mask"], **BLOCKS)
    out.loss.sum().backward()
    assert out.loss.shape == (0,) and h.grad.shape == (0, H) and torch.equal(w.grad, torch.zeros_like(w))
    batch, upstream = make_batch(seed=7)
    w = batch["weight"].clone().requires_grad_()  # hidden without grad: only d_weight is formed
    res = fused_linear_grpo_loss(batch["hidden"], w, batch["targets"], batch["advantages"], batch["mask"],
                                 batch["old_logp"], batch["ref_logp"], **BLOCKS)
    (res.loss * upstream).sum().backward()
    torch.testing.assert_close(w.grad, reference(batch, upstream)["d_weight"], **TOL)


def test_bad_inputs_raise_clear_errors():
    batch, _ = make_batch(n=8, seed=8)
    args = (batch["hidden"], batch["weight"], batch["targets"], batch["advantages"], batch["mask"])
    with pytest.raises(ValueError, match="share a non-empty H"):
        fused_linear_grpo_loss(batch["hidden"][:, :5], *args[1:])
    with pytest.raises(TypeError, match="same dtype"):
        fused_linear_grpo_loss(batch["hidden"].bfloat16(), *args[1:])
    with pytest.raises(ValueError, match="advantages"):
        fused_linear_grpo_loss(*args[:3], batch["advantages"][:3], batch["mask"])
    with pytest.raises(ValueError, match="eps_low"):
        fused_linear_grpo_loss(*args, eps_low=1.5)
    with pytest.raises(ValueError, match="block_v"):
        fused_linear_grpo_loss(*args, block_v=24)
    bad = batch["targets"].clone()
    bad[batch["mask"].nonzero()[0]] = V
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fused_linear_grpo_loss(*args[:2], bad, *args[3:], **BLOCKS)


def test_default_chunk_fits_the_buffer_budget():
    from megatron_selfjudge.kernels import fused_linear_grpo as op

    blocks = launch_blocks(200_000, 152_064, 3584, 2, torch.device("cuda"), vocab_splits=1)
    assert blocks.chunk_tokens % blocks.block_n == 0
    assert blocks.chunk_tokens * 152_064 * 2 <= op.CHUNK_BYTES < (blocks.chunk_tokens + blocks.block_n) * 152_064 * 2
    assert (blocks.splits, blocks.cols_per_split) == (1, 152_064)  # 1188 whole tiles of 128 columns
    split = launch_blocks(512, 103, 21, 4, torch.device("cpu"), block_v=16, vocab_splits=5)
    assert (split.cols_per_split, split.splits) == (32, 4)  # 7 tiles in 5 asks: 2 tiles a split, 4 splits


# ---------------------------------------------------------------- tensor parallel (2 gloo ranks)

def _tp_worker(rank: int, world: int) -> dict:
    """One rank of a TP=2 group (gloo, spawned by dist_utils): its vocab shard's outputs and gradients."""
    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors under gloo, also on a GPU machine
    batch, upstream = make_batch(seed=9)
    batch = {k: (v.cpu() if v is not None else None) for k, v in batch.items()}
    bounds = [0, 51, V]  # uneven vocab shards (51 + 52 rows of the weight)
    start, stop = bounds[rank], bounds[rank + 1]
    h = batch["hidden"].clone().requires_grad_()
    w = batch["weight"][start:stop].clone().requires_grad_()
    res = fused_linear_grpo_loss(h, w, batch["targets"], batch["advantages"], batch["mask"], batch["old_logp"],
                                 batch["ref_logp"], temperature=0.9, compute_entropy=True,
                                 tp_group=dist.group.WORLD, vocab_start_index=start, **BLOCKS)
    out = {key: getattr(res, key) for key in OUTPUTS}
    objective(out, upstream.cpu(), batch["mask"], 0.3, 0.0).backward()
    logp = fused_linear_logprobs(batch["hidden"], batch["weight"][start:stop], batch["targets"], 0.9,
                                 dist.group.WORLD, start, block_n=16, block_v=32, block_h=16, vocab_splits=2)
    return dict(out={k: v.detach() for k, v in out.items()}, d_hidden=h.grad, d_weight=w.grad, logp=logp)


@pytest.mark.slow
def test_tensor_parallel_two_ranks_equal_one():
    """Outputs equal on both ranks; d_weight shards concatenate and d_hidden parts sum to TP=1's."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "megatron"))
    from dist_utils import run_distributed

    parts = run_distributed(_tp_worker, 2, timeout=240)
    batch, upstream = make_batch(seed=9)
    single = fused(batch, upstream, temperature=0.9, entropy_weight=0.3)
    for part in parts:
        for key in OUTPUTS:
            torch.testing.assert_close(part["out"][key], single[key].cpu(), **TOL, msg=key)
    torch.testing.assert_close(parts[0]["d_hidden"] + parts[1]["d_hidden"], single["d_hidden"].cpu(), **TOL)
    torch.testing.assert_close(torch.cat([parts[0]["d_weight"], parts[1]["d_weight"]]), single["d_weight"].cpu(),
                               **TOL)
    full_logp = fused_linear_logprobs(batch["hidden"], batch["weight"], batch["targets"], 0.9).cpu()
    for part in parts:
        torch.testing.assert_close(part["logp"], full_logp, **TOL)


@pytest.mark.gpu
def test_cuda_bf16_long_sequence_matches_the_chain():
    """A real tile configuration on the GPU: N = 20,000 tokens, V = 32,000, H = 256, several chunks."""
    batch, upstream = make_batch(n=20_000, hidden=256, vocab=32_000, dtype=torch.bfloat16, seed=10, masked=0.1)
    blocks = dict(chunk_tokens=4096)
    got = fused(batch, upstream, temperature=0.8, entropy_weight=0.1, blocks=blocks)
    want = reference(batch, upstream, temperature=0.8, entropy_weight=0.1)
    for key in OUTPUTS:
        torch.testing.assert_close(got[key], want[key], atol=2e-4, rtol=2e-4, msg=key)
    for key in ("d_hidden", "d_weight"):
        largest = float(want[key].abs().max())
        assert float((got[key].float() - want[key]).abs().max()) <= 4 * largest * torch.finfo(torch.bfloat16).eps, key


def test_registry_impl_takes_fp32_hidden_with_a_bf16_weight():
    """megatron's Float16Module returns the last stage's output in fp32: the impl casts it back exactly."""
    batch, upstream = make_batch(dtype=torch.bfloat16, seed=11)
    impl = ref_loss.LOSS_IMPLS["fused_linear"]
    params = ref_loss.LossParams(temperature=0.9)
    grads = []
    for hidden in (batch["hidden"], batch["hidden"].float()):
        leaf = hidden.clone().requires_grad_()
        terms = impl.per_token(ref_loss.HiddenStates(leaf, batch["weight"]), batch["targets"], batch["advantages"],
                               batch["old_logp"], batch["ref_logp"], params, valid=batch["mask"])
        (terms.loss * upstream).sum().backward()
        grads.append((terms.loss.detach(), leaf.grad))
    assert grads[1][1].dtype == torch.float32
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=0, rtol=0)
    torch.testing.assert_close(grads[1][1], grads[0][1].float(), atol=0, rtol=0)
    logp = impl.logprobs(ref_loss.HiddenStates(batch["hidden"].float(), batch["weight"]), batch["targets"], 0.9)
    same = impl.logprobs(ref_loss.HiddenStates(batch["hidden"], batch["weight"]), batch["targets"], 0.9)
    torch.testing.assert_close(logp, same, atol=0, rtol=0)
