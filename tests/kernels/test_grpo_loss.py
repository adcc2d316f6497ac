"""Fused GRPO loss kernels against the plain-PyTorch reference in megatron_selfjudge/loss.py.

On CPU the kernels run in Triton's interpreter (tests/kernels/conftest.py), so shapes are small;
``block_v`` smaller than the vocabulary makes every row take several online-softmax steps with a
ragged last block (V = 997 is odd and prime).
"""
import math
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_selfjudge import loss as ref_loss
from megatron_selfjudge.kernels.bench import ulp_distance
from megatron_selfjudge.kernels.grpo_loss import LossParams, _forward, fused_grpo_loss, selective_logprobs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
V_ODD = 997
BLOCK = 256  # four vocab blocks per row, the last one ragged
TOL = dict(atol=1e-5, rtol=1e-5)


def make_batch(n=37, vocab=V_ODD, dtype=torch.float32, scale=3.0, masked=0.3, seed=0, old=True, ref=True):
    """Random logits, targets and per-token inputs; old/ref log-probs near the current ones."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    current = ref_loss.token_logprobs(logits.float(), targets)
    batch = dict(
        logits=logits.to(DEVICE),
        targets=targets.to(DEVICE),
        advantages=torch.randn(n, generator=gen).to(DEVICE),
        mask=(torch.rand(n, generator=gen) >= masked).to(DEVICE),
        old_logp=(current + 0.4 * torch.randn(n, generator=gen)).to(DEVICE) if old else None,
        ref_logp=(current + 0.4 * torch.randn(n, generator=gen)).to(DEVICE) if ref else None,
    )
    upstream = (0.5 + torch.rand(n, generator=gen)).to(DEVICE)  # non-uniform per-token weights
    return batch, upstream


def reference(batch, upstream, temperature=1.0, entropy_weight=0.0, side_weight=0.0, **params):
    """Per-token outputs and d(sum(g * (loss + e H + s (logp + kl))))/dlogits from loss.py, in fp32."""
    logits = batch["logits"].float().requires_grad_()
    mask = batch["mask"].float()
    logp = ref_loss.token_logprobs(logits, batch["targets"], temperature)
    per = ref_loss.per_token_policy_loss(logp, batch["advantages"], batch["old_logp"], batch["ref_logp"], **params)
    entropy = ref_loss.token_entropy(logits, temperature)
    total = (per.loss * upstream * mask).sum() + entropy_weight * (entropy * upstream * mask).sum()
    total = total + side_weight * ((logp * upstream.flip(0) + per.kl * upstream) * mask).sum()
    total.backward()
    return dict(loss=per.loss * mask, logprobs=logp * mask, kl=per.kl * mask, clipped=per.clipped * mask,
                entropy=entropy * mask, grad=logits.grad)


def fused(batch, upstream, temperature=1.0, entropy_weight=0.0, side_weight=0.0, inplace=False, **params):
    """The kernel's per-token outputs and logits gradient for the same objective."""
    logits = batch["logits"].clone().requires_grad_()
    work = logits * 1 if inplace else logits  # in-place backward needs a non-leaf buffer
    out = fused_grpo_loss(work, batch["targets"], batch["advantages"], batch["mask"], batch["old_logp"],
                          batch["ref_logp"], temperature=temperature, compute_entropy=True,
                          inplace_backward=inplace, block_v=BLOCK, **params)
    total = (out.loss * upstream).sum() + entropy_weight * (out.entropy * upstream).sum()
    if side_weight:  # gradients through the logprobs and kl outputs as well
        total = total + side_weight * (out.logprobs * upstream.flip(0) + out.kl * upstream).sum()
    total.backward()
    return dict(loss=out.loss, logprobs=out.logprobs, kl=out.kl, clipped=out.clipped, entropy=out.entropy,
                grad=logits.grad)


def assert_outputs_close(got, want, grad_check=True):
    for key in ("loss", "logprobs", "kl", "clipped", "entropy"):
        torch.testing.assert_close(got[key].detach(), want[key].detach(), **TOL, msg=lambda m: f"{key}: {m}")
    if grad_check:
        torch.testing.assert_close(got["grad"], want["grad"], **TOL, msg=lambda m: f"grad: {m}")


@pytest.mark.parametrize("case", [
    dict(),
    dict(temperature=0.7),
    dict(temperature=1.6, entropy_weight=0.3),
    dict(side_weight=0.7, entropy_weight=0.2),  # upstream gradients on logprobs and kl too
    dict(old=False),  # on-policy: ratio 1
    dict(ref=False),  # no KL term
    dict(old=False, ref=False, temperature=0.5),
    dict(masked=0.9, n=29),  # heavy masking
    dict(beta_kl=0.5, eps_low=0.1, eps_high=0.28, dual_clip=2.0, scale=6.0),  # clamps and dual clip active
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_fp32_forward_and_backward_match_reference(case):
    case = dict(case)
    batch_args = {k: case.pop(k) for k in ("old", "ref", "masked", "n", "scale") if k in case}
    batch, upstream = make_batch(**batch_args)
    assert_outputs_close(fused(batch, upstream, **case), reference(batch, upstream, **case))


@pytest.mark.parametrize("clamps", [(20.0, 10.0, 0.2), (0.15, 0.005, 0.1), (0.15, 10.0, 0.1)],
                         ids=["default-clamps", "tight-clamps", "tight-logratio-only"])
def test_clamps_and_clipping_derivative_against_autograd(clamps):
    """Every branch of dloss/dlogp (both clamps, the clip, the dual clip) against autograd of loss.py.

    The default clamps act only where the ratio saturates anyway; tight ones make their zero
    derivative visible at ordinary ratios.
    """
    logratio_clamp, kl_clamp, eps = clamps
    spread = 1.5 * logratio_clamp
    batch, _ = make_batch(scale=6.0, seed=3, masked=0.0)
    batch["old_logp"] = batch["old_logp"] + torch.linspace(-spread, spread, 37, device=DEVICE)
    batch["ref_logp"] = batch["ref_logp"] + torch.linspace(spread, -spread, 37, device=DEVICE)
    kwargs = dict(beta_kl=0.1, logratio_clamp=logratio_clamp, kl_clamp=kl_clamp, eps_low=eps, eps_high=eps)
    leaf = ref_loss.token_logprobs(batch["logits"], batch["targets"]).requires_grad_()
    per = ref_loss.per_token_policy_loss(leaf, batch["advantages"], batch["old_logp"], batch["ref_logp"], **kwargs)
    per.loss.sum().backward()
    logratio = leaf.detach() - batch["old_logp"]
    assert (logratio.abs() > logratio_clamp).any() and per.clipped.any()
    assert ((batch["ref_logp"] - leaf.detach()).abs() > logratio_clamp).any()
    if kl_clamp < 1.0 or logratio_clamp > 3.0:  # k3 can reach its clamp
        assert (per.kl == kl_clamp).any()
    if logratio_clamp > math.log(3.0):  # the ratio can pass the dual-clip bound c = 3
        assert ((batch["advantages"] < 0) & (per.ratio > 3.0)).any()
    fwd = _forward(batch["logits"], batch["targets"], batch["mask"], batch["advantages"], batch["old_logp"],
                   batch["ref_logp"], LossParams(**kwargs), None, 0, False, BLOCK)
    torch.testing.assert_close(fwd.loss, per.loss.detach(), **TOL)
    torch.testing.assert_close(fwd.dloss_dlogp, leaf.grad, **TOL)
    upstream = torch.rand(37, device=DEVICE) + 0.5
    assert_outputs_close(fused(batch, upstream, **kwargs), reference(batch, upstream, **kwargs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_grads_within_one_ulp(dtype):
    batch, upstream = make_batch(n=21, dtype=dtype, seed=1)
    got = fused(batch, upstream, temperature=0.8, entropy_weight=0.2)
    want = reference(batch, upstream, temperature=0.8, entropy_weight=0.2)  # fp32 math on the same values
    assert got["grad"].dtype == dtype
    assert_outputs_close(got, want, grad_check=False)
    distance = ulp_distance(got["grad"], want["grad"].to(dtype))
    assert int(distance.max()) <= 1, f"max {int(distance.max())} ulp"
    assert (got["grad"] != 0).sum() > 0.5 * got["grad"].numel()  # the comparison is not vacuous


def test_extreme_logits_are_finite_and_exact():
    gen = torch.Generator().manual_seed(4)
    n = 24
    logits = torch.randint(-1, 2, (n, V_ODD), generator=gen).float() * 1e4  # rows of +-1e4 and 0
    logits[0] = 1e4  # all at the max
    logits[1] = -1e4  # all at the min
    targets = torch.randint(0, V_ODD, (n,), generator=gen)
    logits[2] = -1e4
    logits[2, targets[2]] = 1e4  # a unique max at the target: log-prob exactly 0
    batch, upstream = make_batch(n=n, seed=4)
    batch.update(logits=logits.to(DEVICE), targets=targets.to(DEVICE),
                 mask=torch.ones(n, dtype=torch.bool, device=DEVICE))
    got, want = fused(batch, upstream), reference(batch, upstream)
    got = {key: value.detach() for key, value in got.items()}
    assert all(torch.isfinite(v).all() for v in got.values())
    assert_outputs_close(got, want)
    assert float(got["logprobs"][2]) == 0.0 and float(got["logprobs"].max()) <= 0.0


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_invariants_logprob_nonpositive_and_lse_at_least_max(temperature):
    batch, _ = make_batch(n=33, scale=50.0, seed=5)
    batch["logits"][:5] = 7.25  # all-equal rows
    batch["logits"][5:10] *= 200.0  # ~1e4
    fwd = _forward(batch["logits"], batch["targets"], None, None, None, None, LossParams(temperature=temperature),
                   None, 0, True, BLOCK)
    row_max, log_sum, entropy = fwd.softmax[:, 0], fwd.softmax[:, 1], fwd.softmax[:, 2]
    assert (fwd.logprobs <= 0).all()
    assert (row_max + log_sum >= (batch["logits"] / temperature).amax(dim=1)).all() and (log_sum >= 0).all()
    assert (entropy >= -1e-6).all() and (entropy <= math.log(V_ODD) + 1e-5).all()


def test_all_equal_rows_and_hand_computed_values():
    n = 6
    logits = torch.full((n, V_ODD), 3.5)
    logits[5, :2] = torch.tensor([0.0, math.log(3.0)])  # row 5: p(0) = 1/4, p(1) = 3/4 among the first two
    logits[5, 2:] = -1e4  # the rest have probability e^-1e4, i.e. 0 in fp32
    targets = torch.tensor([0, 17, 996, 500, 3, 1])
    batch, upstream = make_batch(n=n, seed=6, old=False, ref=False)
    batch.update(logits=logits.to(DEVICE), targets=targets.to(DEVICE),
                 mask=torch.ones(n, dtype=torch.bool, device=DEVICE))
    got = fused(batch, upstream, entropy_weight=0.5)
    want_logp = torch.tensor([-math.log(V_ODD)] * 5 + [math.log(0.75)])
    torch.testing.assert_close(got["logprobs"].detach().cpu(), want_logp, **TOL)
    want_entropy = torch.tensor([math.log(V_ODD)] * 5 + [-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])
    torch.testing.assert_close(got["entropy"].detach().cpu(), want_entropy, **TOL)
    # On-policy, A > 0 unclipped: dloss/dlogp = -A, so dlogits = g * -A * (onehot - p).
    adv, g = batch["advantages"][5].item(), upstream[5].item()
    p = torch.tensor([0.25, 0.75])
    dlogp_part = -adv * g * (torch.tensor([0.0, 1.0]) - p)
    h = float(want_entropy[5])
    dent_part = 0.5 * g * -p * (torch.log(p) + h)
    torch.testing.assert_close(got["grad"][5, :2].cpu(), dlogp_part + dent_part, **TOL)
    assert_outputs_close(got, reference(batch, upstream, entropy_weight=0.5))


@pytest.mark.parametrize("agg", ref_loss.AGG_MODES)
def test_aggregation_modes_through_token_weights(agg):
    batch_size, length = 4, 9
    batch, _ = make_batch(n=batch_size * length, seed=7, masked=0.4)
    batch["mask"][length:2 * length] = False  # one sequence with no valid token
    weights = ref_loss.token_weights(batch["mask"].view(batch_size, length), agg, None).reshape(-1)
    got, want = fused(batch, weights), reference(batch, weights)
    assert_outputs_close(got, want)
    as_bt = lambda key: batch[key].view(batch_size, length, *batch[key].shape[1:])  # noqa: E731
    total = ref_loss.policy_loss(as_bt("logits"), as_bt("targets"), as_bt("advantages"), as_bt("mask"),
                                 batch["old_logp"], batch["ref_logp"], agg=agg, impl="reference")[0]
    torch.testing.assert_close((got["loss"] * weights).sum(), total.detach(), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_equals_out_of_place(dtype):
    batch, upstream = make_batch(n=19, dtype=dtype, seed=8)
    out_of_place = fused(batch, upstream, temperature=0.9, entropy_weight=0.1)
    in_place = fused(batch, upstream, temperature=0.9, entropy_weight=0.1, inplace=True)
    assert torch.equal(in_place["grad"], out_of_place["grad"])


def test_inplace_backward_overwrites_the_logits_buffer():
    batch, upstream = make_batch(n=11, seed=9)
    work = batch["logits"].clone().requires_grad_() * 1
    out = fused_grpo_loss(work, batch["targets"], batch["advantages"], batch["mask"], batch["old_logp"],
                          batch["ref_logp"], inplace_backward=True, block_v=BLOCK)
    grads = {}
    work.register_hook(lambda grad: grads.setdefault("g", grad))
    (out.loss * upstream).sum().backward()
    assert grads["g"].data_ptr() == work.data_ptr()  # documented: logits are destroyed
    with pytest.raises(ValueError, match="non-leaf"):
        fused_grpo_loss(batch["logits"].clone().requires_grad_(), batch["targets"], batch["advantages"],
                        batch["mask"], inplace_backward=True)


def test_expanded_upstream_gradients_and_empty_batch():
    """loss.sum() hands backward stride-0 (expanded) gradients; N = 0 is a valid, empty batch."""
    batch, _ = make_batch(n=9, seed=17)
    leaf = batch["logits"].clone().requires_grad_()
    out = fused_grpo_loss(leaf, batch["targets"], batch["advantages"], batch["mask"], batch["old_logp"],
                          batch["ref_logp"], compute_entropy=True, block_v=BLOCK)
    (out.loss.sum() + out.entropy.mean()).backward()
    ones = torch.ones(9, device=DEVICE)
    want = reference(batch, ones, entropy_weight=1.0 / 9)
    torch.testing.assert_close(leaf.grad, want["grad"], **TOL)
    empty = torch.zeros(0, V_ODD, device=DEVICE, requires_grad=True)
    out = fused_grpo_loss(empty * 1, batch["targets"][:0], batch["advantages"][:0], batch["mask"][:0])
    out.loss.sum().backward()
    assert out.loss.shape == (0,) and empty.grad.shape == (0, V_ODD)


def test_strided_rows_and_no_mask():
    """Logits as a row-strided view (e.g. a slice of a wider buffer); mask None means all valid."""
    batch, upstream = make_batch(n=13, seed=16, masked=0.0)
    wide = torch.zeros(13, V_ODD + 21, device=DEVICE)
    wide[:, :V_ODD] = batch["logits"]
    leaf = wide.requires_grad_()
    view = leaf[:, :V_ODD]
    assert view.stride(0) == V_ODD + 21
    out = fused_grpo_loss(view, batch["targets"], batch["advantages"], None, batch["old_logp"], batch["ref_logp"],
                          block_v=BLOCK)
    (out.loss * upstream).sum().backward()
    want = reference(batch, upstream)
    torch.testing.assert_close(out.loss.detach(), want["loss"], **TOL)
    torch.testing.assert_close(leaf.grad[:, :V_ODD], want["grad"], **TOL)
    assert torch.equal(leaf.grad[:, V_ODD:], torch.zeros(13, 21, device=DEVICE))


def test_masked_tokens_have_zero_grad_and_ignore_junk():
    batch, upstream = make_batch(n=23, masked=0.5, seed=10)
    masked = ~batch["mask"]
    # Padding carries ignore-index targets and junk old/ref/advantages: none of it may leak.
    batch["targets"] = torch.where(masked, torch.full_like(batch["targets"], -100), batch["targets"])
    for key in ("old_logp", "ref_logp", "advantages"):
        batch[key] = torch.where(masked, torch.full_like(batch[key], float("nan")), batch[key])
    got = fused(batch, upstream, entropy_weight=0.2)
    assert torch.equal(got["grad"][masked], torch.zeros_like(got["grad"][masked]))
    for key in ("loss", "logprobs", "kl", "clipped", "entropy"):
        assert torch.equal(got[key][masked].detach(), torch.zeros(int(masked.sum()), device=DEVICE)), key
    assert (got["grad"][~masked] != 0).all(dim=1).any()


def test_selective_logprobs_matches_reference_without_grad():
    batch, _ = make_batch(n=30, seed=11, dtype=torch.bfloat16)
    logits = batch["logits"].requires_grad_()
    got = selective_logprobs(logits, batch["targets"], temperature=1.3, block_v=BLOCK)
    assert not got.requires_grad and got.dtype == torch.float32
    torch.testing.assert_close(got, ref_loss.token_logprobs(logits.detach(), batch["targets"], 1.3), **TOL)


def test_policy_loss_logits_kernel_equals_reference():
    batch_size, length = 3, 8
    batch, _ = make_batch(n=batch_size * length, seed=12, masked=0.3)
    results = {}
    for impl in ("reference", "logits_kernel"):
        logits = batch["logits"].view(batch_size, length, -1).clone().requires_grad_()
        loss, metrics = ref_loss.policy_loss(
            logits, batch["targets"].view(batch_size, length), batch["advantages"].view(batch_size, length),
            batch["mask"].view(batch_size, length), batch["old_logp"], batch["ref_logp"], temperature=0.8,
            agg="seq-mean-token-mean", impl=impl)
        loss.backward()
        results[impl] = (loss.detach(), logits.grad, metrics)
    torch.testing.assert_close(results["logits_kernel"][0], results["reference"][0], **TOL)
    torch.testing.assert_close(results["logits_kernel"][1], results["reference"][1], **TOL)
    for key, value in results["reference"][2].items():
        torch.testing.assert_close(torch.as_tensor(results["logits_kernel"][2][key]).float(), torch.as_tensor(value).float(),
                                   **TOL, msg=lambda m: f"metric {key}: {m}")


def test_bad_inputs_raise_clear_errors():
    batch, _ = make_batch(n=8, seed=13)
    args = (batch["logits"], batch["targets"], batch["advantages"], batch["mask"])
    with pytest.raises(ValueError, match="logits"):
        fused_grpo_loss(batch["logits"][0], *args[1:])
    with pytest.raises(ValueError, match="advantages"):
        fused_grpo_loss(batch["logits"], batch["targets"], batch["advantages"][:5], batch["mask"])
    with pytest.raises(TypeError, match="targets"):
        fused_grpo_loss(batch["logits"], batch["targets"].float(), batch["advantages"], batch["mask"])
    with pytest.raises(TypeError, match="logits dtype"):
        fused_grpo_loss(batch["logits"].double(), *args[1:])
    with pytest.raises(ValueError, match="temperature"):
        fused_grpo_loss(*args, temperature=0.0)
    with pytest.raises(ValueError, match="eps_low"):
        fused_grpo_loss(*args, eps_low=1.0)
    with pytest.raises(ValueError, match="dual_clip"):
        fused_grpo_loss(*args, dual_clip=1.0)
    bad_targets = batch["targets"].clone()
    bad_targets[batch["mask"].nonzero()[0]] = V_ODD  # a valid token outside the vocabulary
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fused_grpo_loss(batch["logits"], bad_targets, batch["advantages"], batch["mask"], block_v=BLOCK)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        selective_logprobs(batch["logits"], torch.full_like(bad_targets, -1), block_v=BLOCK)


@pytest.mark.gpu
def test_grid_covers_more_than_65535_tokens():
    """The flat 1-D grid has no 65,535 limit (far too slow for the CPU interpreter, hence gpu)."""
    n, vocab = 70_000, 1024
    batch, upstream = make_batch(n=n, vocab=vocab, seed=15, dtype=torch.bfloat16)
    got = fused(batch, upstream)
    want = reference(batch, upstream)
    assert_outputs_close(got, want, grad_check=False)
    assert int(ulp_distance(got["grad"], want["grad"].to(torch.bfloat16)).max()) <= 1


# ---------------------------------------------------------------- tensor parallel (2 gloo ranks)

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors under gloo, also on a GPU machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        batch, upstream = make_batch(n=17, seed=14, masked=0.3)
        batch = {k: (v.cpu() if v is not None else None) for k, v in batch.items()}
        # Uneven shards (499 + 498 columns) on purpose: nothing may assume equal split.
        bounds = [0, 499, V_ODD]
        start, stop = bounds[rank], bounds[rank + 1]
        shard = batch["logits"][:, start:stop].clone().requires_grad_()
        out = fused_grpo_loss(shard, batch["targets"], batch["advantages"], batch["mask"], batch["old_logp"],
                              batch["ref_logp"], temperature=0.9, compute_entropy=True, tp_group=dist.group.WORLD,
                              vocab_start_index=start, block_v=128)
        ((out.loss * upstream.cpu()).sum() + 0.3 * (out.entropy * upstream.cpu()).sum()).backward()
        logp = selective_logprobs(batch["logits"][:, start:stop], batch["targets"], 0.9, dist.group.WORLD, start,
                                  block_v=128)
        torch.save(dict(out=[t.detach() for t in out], grad=shard.grad, logp=logp), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_two_ranks_equals_single_rank():
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_tp_worker, args=(2, _free_port(), out_dir), nprocs=2, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + 240
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail("TP=2 workers timed out")
        parts = [torch.load(os.path.join(out_dir, f"{rank}.pt")) for rank in range(2)]
    batch, upstream = make_batch(n=17, seed=14, masked=0.3)  # TP=1 on this process's device
    logits = batch["logits"].clone().requires_grad_()
    single = fused_grpo_loss(logits, batch["targets"], batch["advantages"], batch["mask"], batch["old_logp"],
                             batch["ref_logp"], temperature=0.9, compute_entropy=True, block_v=128)
    ((single.loss * upstream).sum() + 0.3 * (single.entropy * upstream).sum()).backward()
    single_logp = selective_logprobs(batch["logits"], batch["targets"], 0.9, block_v=128).cpu()
    for rank in range(2):
        for got, want in zip(parts[rank]["out"], single):
            torch.testing.assert_close(got, want.detach().cpu(), **TOL)
        torch.testing.assert_close(parts[rank]["logp"], single_logp, **TOL)
    torch.testing.assert_close(torch.cat([parts[0]["grad"], parts[1]["grad"]], dim=1), logits.grad.cpu(), **TOL)
