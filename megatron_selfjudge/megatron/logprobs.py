"""Per-token log-probs and entropy from vocab-parallel logits, without gathering the vocabulary.

Logits arrive sharded along the last dim: rank r of the TP group holds vocab ids
[r * V_local, (r + 1) * V_local). Log-probs reuse megatron-core's vocab-parallel cross entropy
(logp = -CE of logits / T); entropy all-reduces the max, the sum of exp and the sum of p * z.
Both return fp32 and are differentiable with respect to the logits.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _megatron_tp_group() -> Optional[dist.ProcessGroup]:
    """megatron's TP group, or None when its parallel state is not set up (single process)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group()


def _resolve_group(tp_group: Optional[dist.ProcessGroup]) -> Optional[dist.ProcessGroup]:
    """The TP group to reduce over; None means no reduction (the whole vocab is local)."""
    group = _megatron_tp_group() if tp_group is None else tp_group
    if group is not None and dist.get_world_size(group) == 1:
        return None
    return group


def _check_inputs(logits: torch.Tensor, temperature: float) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point tensor")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocab) dim, got shape {tuple(logits.shape)}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


def _check_targets(targets: torch.Tensor, logits: torch.Tensor, vocab_size: int) -> None:
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an int32/int64 tensor, got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal logits shape without the "
                         f"vocab dim {tuple(logits.shape[:-1])}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        raise ValueError(f"targets must lie in [0, {vocab_size}) (the full vocab)")


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """fp32 log p(target) under softmax(logits / T), logits [..., V/tp] sharded over the TP group."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    _check_inputs(logits, temperature)
    group = _resolve_group(tp_group)
    tp = 1 if group is None else dist.get_world_size(group)
    _check_targets(targets, logits, logits.shape[-1] * tp)
    # Dividing always yields a fresh fp32 tensor: megatron's CE subtracts the max from its input
    # in place, which must not touch the caller's logits.
    scaled = logits.float() / float(temperature)
    if group is None:
        return torch.log_softmax(scaled, dim=-1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if group is not _megatron_tp_group():
        raise ValueError("tp_group must be megatron's tensor-parallel group: its vocab-parallel cross "
                         "entropy reduces over that group only")
    return -vocab_parallel_cross_entropy(scaled, targets.long())


class _VocabParallelEntropy(torch.autograd.Function):
    """Entropy of softmax(z) with z sharded over the vocab; backward needs no communication."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        z_max = z.max(dim=-1).values
        if group is not None:
            dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=group)
        exp = torch.exp(z - z_max.unsqueeze(-1))
        sums = torch.stack([exp.sum(dim=-1), (exp * z).sum(dim=-1)])
        if group is not None:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        sum_exp, sum_exp_z = sums[0], sums[1]
        mean_z = sum_exp_z / sum_exp  # E_p[z], global
        probs = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(z, probs, mean_z)
        return z_max + torch.log(sum_exp) - mean_z

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        z, probs, mean_z = ctx.saved_tensors
        # dH/dz_i = p_i * (E_p[z] - z_i); every term is local once E_p[z] is known.
        grad = probs * (mean_z.unsqueeze(-1) - z) * grad_out.unsqueeze(-1)
        return grad, None


def vocab_parallel_entropy(
    logits: torch.Tensor,
    temperature: float = 1.0,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """fp32 entropy of softmax(logits / T) per position, logits [..., V/tp] sharded over the TP group."""
    _check_inputs(logits, temperature)
    group = _resolve_group(tp_group)
    return _VocabParallelEntropy.apply(logits.float() / float(temperature), group)
