"""Fused GRPO policy loss from (vocab-parallel) logits: Triton forward and backward.

``fused_grpo_loss`` returns per-token fp32 loss, log-probs, KL, clipped flags and optionally
entropy for logits [N, V_local] (bf16, fp16 or fp32) of one tensor-parallel rank; autograd
flows back to the logits. Aggregation stays outside (multiply ``loss`` by per-token weights
and sum), so every aggregation mode of ``megatron_selfjudge/loss.py`` works unchanged.

Three kernels: the forward reads the logits once (one online-softmax pass per token giving max,
sum-exp, target logit and an entropy partial), a per-token kernel merges those (over the
tensor-parallel ranks) and computes the loss and its derivative d loss / d logp in one launch,
and the backward reads the logits once and writes dlogits once, with
dlogits = (c * (onehot(target) - softmax) - c_H * p * (log p + H)) / T per row, where c gathers
the upstream gradients of loss, logprobs and kl times their d/dlogp and c_H that of the entropy.
That is the minimum data movement. Nothing of size [N, V] is ever
materialised in fp32; dlogits are computed in fp32 registers and rounded once to the logits'
dtype. With ``inplace_backward=True`` the gradient is written into the logits buffer itself
(saving one [N, V] allocation): the logits are DESTROYED by backward and must not be used
afterwards by anything else (off by default).

Tensor parallelism: pass ``tp_group`` and this rank's ``vocab_start_index``; the ranks exchange
five floats per token in one all_gather (gloo or NCCL) and nothing in backward (each rank
writes its own shard). Shards may be uneven; a target id outside every shard is an error.

On a machine without CUDA the kernels run in Triton's interpreter: TRITON_INTERPRET=1 must be
in the environment when the kernels are first loaded; ``_kernels()`` sets it when CUDA is
absent and nothing has loaded them yet.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import torch.distributed as dist

from ._tp import gather_partials
from .loss_params import LossParams

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOKEN_BLOCK = 128  # tokens per program of the O(N) per-token kernel
_KERNELS = None


class FusedLossOutput(NamedTuple):
    """Per-token fp32 outputs; ``entropy`` is None unless requested."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    kl: torch.Tensor
    clipped: torch.Tensor
    entropy: torch.Tensor | None


def _kernels():
    """Import the Triton kernels once, in interpreter mode when there is no CUDA."""
    global _KERNELS
    if _KERNELS is None:
        if not torch.cuda.is_available():
            # Triton decides interpreted vs compiled when @triton.jit runs, i.e. at this import.
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from . import _triton_kernels

        _KERNELS = _triton_kernels
    return _KERNELS


def _interpreted() -> bool:
    return type(_kernels().row_stats_kernel).__name__ == "InterpretedFunction"


def _launch_config(vocab: int, device: torch.device, block_v: int | None) -> dict:
    """BLOCK_V and warps: wide blocks on GPU (bandwidth), modest ones in the slow interpreter."""
    if block_v is not None:
        if block_v < 16 or block_v & (block_v - 1):
            raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
        size = block_v
    else:
        cap = 1024 if device.type == "cpu" else 4096
        size = min(cap, max(16, 1 << math.ceil(math.log2(max(vocab, 1)))))
    if device.type == "cpu":
        if not _interpreted():
            raise RuntimeError("logits are on the CPU but the Triton kernels were compiled for a GPU; "
                               "set TRITON_INTERPRET=1 before the kernels are first used")
        return {"BLOCK_V": size}
    # 4096 bf16 columns over 8 warps = 16 values (two 16-byte loads) per thread per step.
    return {"BLOCK_V": size, "num_warps": 8 if size >= 2048 else 4}


def _check_inputs(logits, targets, advantages, mask, old_logp, ref_logp, params: LossParams) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a [N, V_local] tensor, got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits dtype must be one of {_FLOAT_DTYPES}, got {logits.dtype}")
    if logits.shape[1] == 0 or logits.stride(1) != 1:
        raise ValueError("logits must have a non-empty, contiguous vocab dimension (stride(1) == 1)")
    n = logits.shape[0]
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets must be int32/int64, got {targets.dtype}")
    for name, tensor in (("targets", targets), ("advantages", advantages), ("mask", mask),
                         ("old_logp", old_logp), ("ref_logp", ref_logp)):
        if tensor is not None and tuple(tensor.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},) to match logits, got {tuple(tensor.shape)}")
        if tensor is not None and tensor.device != logits.device:
            raise ValueError(f"{name} is on {tensor.device}, logits on {logits.device}")
    params.check()  # the checks the reference uses too: one definition of a valid hyper-parameter


def _check_found(found: torch.Tensor) -> None:
    """Every valid token's target id must lie in exactly one rank's vocab shard (masked tokens read 1)."""
    message = "a valid token's target id lies outside the vocabulary (no tensor-parallel shard holds it)"
    if found.is_cuda:
        torch._assert_async((found == 1).all(), message)  # no host sync on the GPU
    elif not bool((found == 1).all()):
        raise ValueError(message)


class _Forward(NamedTuple):
    """What the forward kernels produce: outputs, and what backward needs."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    kl: torch.Tensor
    clipped: torch.Tensor
    entropy: torch.Tensor
    softmax: torch.Tensor  # [N, 4]: global max M, log S (lse = M + log S), entropy H, target found
    dloss_dlogp: torch.Tensor
    dkl_dlogp: torch.Tensor


def _forward(logits, targets, valid, advantages, old_logp, ref_logp, params: LossParams, tp_group,
             vocab_start: int, with_entropy: bool, block_v: int | None) -> _Forward:
    """Vocabulary pass on this shard, the one collective, then the per-token loss in one launch."""
    n, vocab = logits.shape
    device = logits.device
    stats = torch.empty((n, 5), dtype=torch.float32, device=device)
    if n:
        _kernels().row_stats_kernel[(n,)](
            logits, logits.stride(0), targets, valid if valid is not None else targets, stats,
            vocab, vocab_start, 1.0 / params.temperature,
            HAS_VALID=valid is not None, WITH_ENTROPY=with_entropy, **_launch_config(vocab, device, block_v))
    return finish_forward(stats, valid, advantages, old_logp, ref_logp, params, tp_group)


def finish_forward(stats: torch.Tensor, valid, advantages, old_logp, ref_logp, params: LossParams,
                   tp_group) -> _Forward:
    """From this shard's [N, 5] (or [splits, N, 5]) row statistics: the one collective, then the per-token loss.

    Shared by every op whose vocabulary pass ends in ``row_stats_kernel``'s layout (the logits-in
    kernel here, the fused linear op of ``fused_linear_grpo.py``): one copy of the loss math. The
    partials of every rank and every vocabulary split are merged alike by ``token_loss_kernel``.
    """
    n, device = stats.shape[-2], stats.device
    # loss, logprobs, kl, clipped, entropy, dloss/dlogp, dkl/dlogp: all written by token_loss_kernel.
    out = [torch.empty(n, dtype=torch.float32, device=device) for _ in range(7)]
    softmax = torch.empty((n, 4), dtype=torch.float32, device=device)
    parts = gather_partials(stats, tp_group)
    parts = parts.reshape(parts.shape[:-2].numel(), n, 5)  # every rank's every split: partials to merge
    if n:
        with_loss = advantages is not None
        dummy = out[0]  # pointer for the inputs a constexpr flag switches off
        _kernels().token_loss_kernel[(-(-n // TOKEN_BLOCK),)](
            parts, parts.shape[0], n, valid if valid is not None else dummy,
            advantages if with_loss else dummy, dummy if old_logp is None else old_logp,
            dummy if ref_logp is None else ref_logp,
            out[0], out[1], out[2], out[3], out[4], softmax, out[5], out[6],
            params.eps_low, params.eps_high, params.dual_clip, params.beta_kl, params.logratio_clamp, params.kl_clamp,
            BLOCK_N=TOKEN_BLOCK, HAS_VALID=valid is not None, WITH_LOSS=with_loss,
            HAS_OLD=old_logp is not None, HAS_REF=ref_logp is not None)
    _check_found(softmax[:, 3])
    return _Forward(*out[:5], softmax, *out[5:])


def upstream_args(g_loss, g_logp, g_kl, g_entropy, placeholder: torch.Tensor) -> list:
    """(pointer, stride) pairs of the four upstream [N] gradients for the backward kernels; None -> placeholder."""
    args = []
    for g in (g_loss, g_logp, g_kl, g_entropy):
        # Strided [N] gradients as they come (stride 0 for an expanded one); None switches a term off.
        args += [placeholder, 0] if g is None else [g.float(), g.float().stride(0)]
    return args


def upstream_flags(g_loss, g_logp, g_kl, g_entropy) -> dict:
    """The backward kernels' constexpr switches for the upstream gradients that exist."""
    return dict(HAS_G_LOSS=g_loss is not None, HAS_G_LOGP=g_logp is not None, HAS_G_KL=g_kl is not None,
                HAS_G_ENT=g_entropy is not None)


class _FusedGRPOLoss(torch.autograd.Function):
    """Autograd wrapper: two forward kernels (vocab pass, per-token loss); one backward kernel."""

    @staticmethod
    def forward(ctx, logits, targets, advantages, valid, old_logp, ref_logp, params, tp_group, vocab_start,
                compute_entropy, inplace, block_v):
        fwd = _forward(logits, targets, valid, advantages, old_logp, ref_logp, params, tp_group, vocab_start,
                       compute_entropy, block_v)
        ctx.save_for_backward(logits, targets, valid, fwd.softmax, fwd.dloss_dlogp, fwd.dkl_dlogp)
        ctx.config = (params.temperature, vocab_start, compute_entropy, inplace, block_v)
        ctx.mark_non_differentiable(fwd.clipped)
        # Unused outputs get None gradients (not zeros): the kernel then skips their terms.
        ctx.set_materialize_grads(False)
        return fwd.loss, fwd.logprobs, fwd.kl, fwd.clipped, fwd.entropy

    @staticmethod
    def backward(ctx, g_loss, g_logp, g_kl, _g_clipped, g_entropy):
        logits, targets, valid, softmax, dloss, dkl = ctx.saved_tensors
        temperature, vocab_start, compute_entropy, inplace, block_v = ctx.config
        if not compute_entropy:
            g_entropy = None
        grad = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        n, vocab = logits.shape
        if n:
            _kernels().row_grad_kernel[(n,)](
                logits, logits.stride(0), grad, grad.stride(0), targets, valid, softmax, dloss, dkl,
                *upstream_args(g_loss, g_logp, g_kl, g_entropy, dloss), vocab, vocab_start, 1.0 / temperature,
                **upstream_flags(g_loss, g_logp, g_kl, g_entropy), **_launch_config(vocab, logits.device, block_v))
        return grad, None, None, None, None, None, None, None, None, None, None, None


def fused_grpo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    *,
    compute_entropy: bool = False,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start_index: int = 0,
    inplace_backward: bool = False,
    block_v: int | None = None,
    **hyper: float,
) -> FusedLossOutput:
    """Per-token GRPO loss, log-probs, KL, clipped flags (and entropy) from logits [N, V_local].

    `hyper`: fields of LossParams (temperature, eps_low, ...; defaults: the config's).
    """
    params = LossParams.of(hyper)
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a tensor [N], got {type(advantages).__name__}")
    _check_inputs(logits, targets, advantages, mask, old_logp, ref_logp, params)
    if inplace_backward and logits.requires_grad and logits.is_leaf:
        raise ValueError("inplace_backward needs non-leaf logits: the gradient would overwrite the leaf itself")
    valid = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device) if mask is None else mask.bool()
    per_token = lambda t: None if t is None else t.detach().float().contiguous()  # noqa: E731 (fp32 [N] for the kernel)
    out = _FusedGRPOLoss.apply(logits, targets.contiguous(), per_token(advantages), valid.contiguous(),
                               per_token(old_logp), per_token(ref_logp), params, tp_group, int(vocab_start_index),
                               bool(compute_entropy), bool(inplace_backward), block_v)
    loss, logp, kl, clipped, entropy = out
    return FusedLossOutput(loss, logp, kl, clipped, entropy if compute_entropy else None)


@torch.no_grad()
def selective_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start_index: int = 0,
    *,
    block_v: int | None = None,
) -> torch.Tensor:
    """log softmax(logits / T)[target] per token, fp32 [N], without grad (old/reference log-probs)."""
    params = LossParams(temperature=temperature)
    _check_inputs(logits, targets, None, None, None, None, params)
    return _forward(logits, targets.contiguous(), None, None, None, None, params, tp_group, int(vocab_start_index),
                    False, block_v).logprobs
