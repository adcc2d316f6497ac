"""Fused output layer + log-prob + GRPO loss: from hidden states to the loss without the [N, V] logits.

``fused_linear_grpo_loss(hidden [N, H], weight [V_local, H], ...)`` returns the same per-token
outputs as ``grpo_loss.fused_grpo_loss`` applied to ``logits = hidden @ weight.T`` (loss,
log-probs, KL, clipped flags, entropy), with autograd to ``hidden`` and ``weight``;
``fused_linear_logprobs`` is its forward-only form (old/reference log-probs, the likelihood Judge).

Forward: ``linear_row_stats_kernel`` gives each program BLOCK_N tokens and one split of this
rank's vocabulary, streamed in BLOCK_V columns; each logits tile is a ``tl.dot`` over H in BLOCK_H
steps with fp32 accumulation, folded at once into an online log-sum-exp (fp32), so logits never
reach memory. The row statistics it writes are those of the logits-in kernel, one [N, 5] partial
per vocabulary split (splits keep the GPU busy when N is short), so the rest is literally the same
code: ``grpo_loss.finish_forward`` (the one tensor-parallel collective, 20 bytes per
token, and ``token_loss_kernel``: ratio, clip, dual clip, k3 and their derivative).

Backward, per chunk of ``chunk_tokens`` tokens: ``linear_dlogits_kernel`` recomputes the chunk's
logits tile by tile and writes dL/dlogits (``row_grad_kernel``'s formula, shared helpers) into one
reusable [chunk, V_local] buffer in the weight's dtype; then d_hidden[chunk] = g @ W and
d_weight += g^T @ h_chunk are two plain GEMMs (cuBLAS on the GPU, which a hand-written tl.dot
GEMM would not beat). Memory beyond the inputs and gradients: that buffer, the per-token
statistics, and an fp32 [V_local, H] accumulator for d_weight when there are several chunks, all
independent of N. The logits are recomputed once in backward (3 x 2NVH FLOPs in all, against
2 x 2NVH + the logits' memory traffic for an unfused output layer).

Tensor parallelism: ``weight`` is this rank's vocabulary shard starting at ``vocab_start_index``;
the statistics are merged across ``tp_group`` in forward as in the logits-in kernel. The returned
d_hidden is this shard's contribution: summing it over the tensor-parallel ranks is the caller's
(megatron's output layer does it in the backward of its input region; ``megatron/forward.py``
keeps that region, and with sequence parallelism its all-gather of the hidden states and the
matching reduce-scatter).

Dtypes: bf16, fp16 or fp32 for hidden and weight (the same). On the GPU bf16/fp16 tiles go to the
tensor cores with fp32 accumulation and fp32 operands use exact IEEE products (not TF32); in
Triton's CPU interpreter the tiles are cast to fp32 first (its tl.dot needs that).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from .grpo_loss import (
    _FLOAT_DTYPES,
    FusedLossOutput,
    _interpreted,
    _kernels,
    finish_forward,
    upstream_args,
    upstream_flags,
)
from .loss_params import LossParams

CHUNK_BYTES = 256 << 20  # default size of the backward's dlogits chunk buffer


class Blocks(NamedTuple):
    """Tile sizes of the fused kernels (powers of two >= 16, as tl.dot requires), the forward's vocabulary
    splits (columns per split, a multiple of block_v) and the backward chunk."""

    block_n: int
    block_v: int
    block_h: int
    chunk_tokens: int
    cols_per_split: int
    splits: int


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for grid sizes."""
    return -(-a // b)


def _pow2(value: int, name: str) -> int:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    return value


def launch_blocks(n: int, vocab: int, hidden: int, elem: int, device: torch.device, block_n: int | None = None,
                  block_v: int | None = None, block_h: int | None = None, chunk_tokens: int | None = None,
                  vocab_splits: int | None = None) -> Blocks:
    """Tiles for this shape: tensor-core sized on the GPU, smaller in the (slow, per-op) interpreter.

    The forward splits the vocabulary when N / block_n token tiles alone would leave the GPU's
    multiprocessors idle (about four programs per multiprocessor); the interpreter gains nothing
    from splitting, so it uses one split unless asked.
    """
    fit = lambda size, cap: min(cap, max(16, 1 << math.ceil(math.log2(max(size, 1)))))  # noqa: E731
    gpu = device.type == "cuda"
    bn = _pow2(block_n, "block_n") if block_n else fit(n, 64 if gpu else 32)
    bv = _pow2(block_v, "block_v") if block_v else fit(vocab, 128 if gpu else 256)
    bh = _pow2(block_h, "block_h") if block_h else fit(hidden, 64)
    if chunk_tokens is None:
        # As many tokens as fit CHUNK_BYTES of dlogits, a multiple of the token tile, at least one tile.
        chunk_tokens = max(bn, (CHUNK_BYTES // max(vocab * elem, 1)) // bn * bn)
    elif chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    tiles = _cdiv(max(vocab, 1), bv)
    if vocab_splits is None:
        programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count if gpu else 1
        vocab_splits = max(1, _cdiv(programs, _cdiv(max(n, 1), bn)))
    elif vocab_splits < 1:
        raise ValueError(f"vocab_splits must be >= 1, got {vocab_splits}")
    cols = _cdiv(tiles, min(vocab_splits, tiles)) * bv
    return Blocks(bn, bv, bh, int(chunk_tokens), cols, _cdiv(max(vocab, 1), cols))


def _kernel_flags(weight: torch.Tensor) -> dict:
    interpreted = weight.device.type == "cpu"
    if interpreted and not _interpreted():
        raise RuntimeError("hidden states are on the CPU but the Triton kernels were compiled for a GPU; "
                           "set TRITON_INTERPRET=1 before the kernels are first used")
    flags = dict(DOT_FP32=interpreted, IEEE=weight.dtype == torch.float32 and not interpreted)
    if not interpreted:
        flags["num_warps"] = 4
    return flags


def _check(hidden, weight, targets, advantages, mask, old_logp, ref_logp, params: LossParams) -> None:
    for name, tensor in (("hidden", hidden), ("weight", weight)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got {getattr(tensor, 'shape', type(tensor))}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} dtype must be one of {_FLOAT_DTYPES}, got {tensor.dtype}")
    if hidden.shape[1] != weight.shape[1] or weight.shape[0] == 0 or hidden.shape[1] == 0:
        raise ValueError(f"hidden [N, H] and weight [V_local, H] must share a non-empty H, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device}, weight on {weight.device}")
    n = hidden.shape[0]
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets must be int32/int64, got {targets.dtype}")
    for name, tensor in (("targets", targets), ("advantages", advantages), ("mask", mask),
                         ("old_logp", old_logp), ("ref_logp", ref_logp)):
        if tensor is not None and tuple(tensor.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},) to match hidden, got {tuple(tensor.shape)}")
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device}, hidden on {hidden.device}")
    params.check()


def _row_stats(hidden, weight, targets, valid, params: LossParams, vocab_start: int, with_entropy: bool,
               blocks: Blocks) -> torch.Tensor:
    """This shard's [splits, N, 5] softmax statistics (row_stats_kernel's layout) straight from hidden @ weight.T."""
    n, vocab = hidden.shape[0], weight.shape[0]
    stats = torch.empty((blocks.splits, n, 5), dtype=torch.float32, device=hidden.device)
    if n:
        _kernels().linear_row_stats_kernel[(_cdiv(n, blocks.block_n), blocks.splits)](
            hidden, hidden.stride(0), weight, weight.stride(0), targets, valid if valid is not None else targets,
            stats, n, vocab, hidden.shape[1], vocab_start, blocks.cols_per_split, 1.0 / params.temperature,
            BLOCK_N=blocks.block_n, BLOCK_V=blocks.block_v, BLOCK_H=blocks.block_h, HAS_VALID=valid is not None,
            WITH_ENTROPY=with_entropy, **_kernel_flags(weight))
    return stats


def _accumulate_wgrad(acc: torch.Tensor, grad: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc += grad^T @ hidden with fp32 accumulation and no rounding of the chunk's product to bf16/fp16."""
    if acc.dtype == grad.dtype:
        acc.addmm_(grad.t(), hidden)
        return
    if acc.is_cuda:
        # bf16/fp16 operands, fp32 accumulation into acc itself (aten::addmm.dtype_out, CUDA only): no
        # [V, H] temporary; then the variant with one; the fp32 copy of the chunk is the last resort.
        try:
            torch.addmm(acc, grad.t(), hidden, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
        try:
            acc += torch.mm(grad.t(), hidden, out_dtype=torch.float32)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    acc.addmm_(grad.t().float(), hidden.float())  # exact but with an fp32 copy of the chunk


class _FusedLinearGRPOLoss(torch.autograd.Function):
    """Autograd wrapper: stats kernel + per-token loss in forward; chunked dlogits recompute + GEMMs in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, advantages, valid, old_logp, ref_logp, params, tp_group, vocab_start,
                compute_entropy, blocks):
        stats = _row_stats(hidden, weight, targets, valid, params, vocab_start, compute_entropy, blocks)
        fwd = finish_forward(stats, valid, advantages, old_logp, ref_logp, params, tp_group)
        ctx.save_for_backward(hidden, weight, targets, valid, fwd.softmax, fwd.dloss_dlogp, fwd.dkl_dlogp)
        ctx.config = (params.temperature, vocab_start, compute_entropy, blocks)
        ctx.mark_non_differentiable(fwd.clipped)
        ctx.set_materialize_grads(False)  # unused outputs get None gradients: their terms are skipped
        return fwd.loss, fwd.logprobs, fwd.kl, fwd.clipped, fwd.entropy

    @staticmethod
    def backward(ctx, g_loss, g_logp, g_kl, _g_clipped, g_entropy):
        hidden, weight, targets, valid, softmax, dloss, dkl = ctx.saved_tensors
        temperature, vocab_start, compute_entropy, blocks = ctx.config
        if not compute_entropy:
            g_entropy = None
        n, vocab = hidden.shape[0], weight.shape[0]
        d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if ctx.needs_input_grad[0] else None
        want_dw = ctx.needs_input_grad[1]
        chunk = min(blocks.chunk_tokens, max(n, 1))
        several = n > chunk
        # fp32 d_weight accumulation across chunks (one rounding at the end); one chunk needs none.
        d_weight = torch.zeros(weight.shape, dtype=torch.float32 if several else weight.dtype,
                               device=weight.device) if want_dw else None
        if n and (d_hidden is not None or want_dw):
            buffer = torch.empty((chunk, vocab), dtype=weight.dtype, device=weight.device)
            upstream = upstream_args(g_loss, g_logp, g_kl, g_entropy, dloss)
            flags = dict(**upstream_flags(g_loss, g_logp, g_kl, g_entropy), **_kernel_flags(weight))
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                grad = buffer[:stop - start]
                _kernels().linear_dlogits_kernel[(_cdiv(stop - start, blocks.block_n),
                                                  _cdiv(vocab, blocks.block_v))](
                    hidden, hidden.stride(0), weight, weight.stride(0), grad, grad.stride(0), targets, valid, softmax,
                    dloss, dkl, *upstream, start, stop, vocab, hidden.shape[1], vocab_start, 1.0 / temperature,
                    BLOCK_N=blocks.block_n, BLOCK_V=blocks.block_v, BLOCK_H=blocks.block_h, **flags)
                if d_hidden is not None:
                    torch.mm(grad, weight, out=d_hidden[start:stop])
                if want_dw:
                    _accumulate_wgrad(d_weight, grad, hidden[start:stop])
            del buffer
        elif d_hidden is not None:
            d_hidden.zero_()
        if d_weight is not None and d_weight.dtype != weight.dtype:
            d_weight = d_weight.to(weight.dtype)
        return d_hidden, d_weight, None, None, None, None, None, None, None, None, None, None


def _prepare(hidden, weight, targets, advantages, mask, old_logp, ref_logp, params, block_n, block_v, block_h,
             chunk_tokens, vocab_splits):
    _check(hidden, weight, targets, advantages, mask, old_logp, ref_logp, params)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    valid = None if mask is None else mask.bool().contiguous()
    blocks = launch_blocks(hidden.shape[0], weight.shape[0], hidden.shape[1], weight.element_size(), weight.device,
                           block_n, block_v, block_h, chunk_tokens, vocab_splits)
    # Rows contiguous in H: the kernels index [row * stride + k].
    contiguous = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    return contiguous(hidden), contiguous(weight), targets.contiguous(), valid, blocks


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    *,
    compute_entropy: bool = False,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start_index: int = 0,
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
    chunk_tokens: int | None = None,
    vocab_splits: int | None = None,
    **hyper: float,
) -> FusedLossOutput:
    """Per-token GRPO loss, log-probs, KL, clipped flags (and entropy) of logits = hidden @ weight.T, never built.

    `hyper`: fields of LossParams (temperature, eps_low, ...; defaults: the config's).
    """
    params = LossParams.of(hyper)
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a tensor [N], got {type(advantages).__name__}")
    hidden, weight, targets, valid, blocks = _prepare(hidden, weight, targets, advantages, mask, old_logp, ref_logp,
                                                      params, block_n, block_v, block_h, chunk_tokens, vocab_splits)
    if valid is None:
        valid = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    per_token = lambda t: None if t is None else t.detach().float().contiguous()  # noqa: E731
    loss, logp, kl, clipped, entropy = _FusedLinearGRPOLoss.apply(
        hidden, weight, targets, per_token(advantages), valid, per_token(old_logp), per_token(ref_logp), params,
        tp_group, int(vocab_start_index), bool(compute_entropy), blocks)
    return FusedLossOutput(loss, logp, kl, clipped, entropy if compute_entropy else None)


@torch.no_grad()
def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start_index: int = 0,
    *,
    with_entropy: bool = False,
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
    vocab_splits: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 [N] log softmax(hidden @ weight.T / T)[target] (and the entropy), without grad or logits."""
    params = LossParams(temperature=temperature)
    hidden, weight, targets, _, blocks = _prepare(hidden, weight, targets, None, None, None, None, params,
                                                  block_n, block_v, block_h, None, vocab_splits)
    stats = _row_stats(hidden, weight, targets, None, params, int(vocab_start_index), with_entropy, blocks)
    fwd = finish_forward(stats, None, None, None, None, params, tp_group)
    return (fwd.logprobs, fwd.softmax[:, 2].clone()) if with_entropy else fwd.logprobs
