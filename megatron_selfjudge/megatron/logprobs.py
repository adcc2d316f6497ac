"""Per-token log-probs and entropy from vocab-parallel logits, without gathering the vocabulary.

Logits arrive sharded along the last dim: rank r of the TP group holds vocab ids
[r * V_local, (r + 1) * V_local). Log-probs reuse megatron-core's vocab-parallel cross entropy
(logp = -CE of logits / T); entropy all-reduces the max, the sum of exp and the sum of p * z.
Both return fp32 and are differentiable with respect to the logits. `vocab_parallel_token_stats`
(no gradient) adds the sum of z for the self-certainty KL(U || p) = logsumexp(z) - mean_v z - log V,
in row chunks so that at most one [chunk, V/tp] fp32 block exists at a time.
"""
from __future__ import annotations

import math
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


def _shifted_exp(z: torch.Tensor, group: Optional[dist.ProcessGroup]) -> tuple[torch.Tensor, torch.Tensor]:
    """The global max of z over the (sharded) vocab and exp(z - max) of this shard."""
    z_max = z.max(dim=-1).values
    if group is not None:
        dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=group)
    return z_max, torch.exp(z - z_max.unsqueeze(-1))


def _vocab_sums(parts: list[torch.Tensor], group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """The per-position sums in `parts`, stacked and summed over the TP group in one all-reduce."""
    sums = torch.stack(parts)
    if group is not None:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return sums


class _VocabParallelEntropy(torch.autograd.Function):
    """Entropy of softmax(z) with z sharded over the vocab; backward needs no communication."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        z_max, exp = _shifted_exp(z, group)
        sums = _vocab_sums([exp.sum(dim=-1), (exp * z).sum(dim=-1)], group)
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


# Elements of one fp32 [rows, V/tp] block in vocab_parallel_token_stats (256 MiB).
TOKEN_STATS_BLOCK = 1 << 26


@torch.no_grad()
def vocab_parallel_token_stats(
    inputs: torch.Tensor,
    temperature: float = 1.0,
    tp_group: Optional[dist.ProcessGroup] = None,
    weight: Optional[torch.Tensor] = None,
    block_elements: int = TOKEN_STATS_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (entropy, self-certainty) per position of p = softmax(logits / T), no gradient.

    inputs: logits [..., V/tp] sharded over the TP group, or, with `weight` (this rank's output
    weight [V/tp, H]), hidden states [..., H] whose logits are formed block by block and dropped.
    Self-certainty is KL(U || p) = -log V - mean_v log p(v) (Intuitor), with V the full (padded)
    vocabulary the logits span: 0 for a uniform p, large for a peaked one.
    """
    _check_inputs(inputs, temperature)
    group = _resolve_group(tp_group)
    if weight is not None and (weight.dim() != 2 or weight.shape[1] != inputs.shape[-1]):
        raise ValueError(f"weight must be [V/tp, {inputs.shape[-1]}], got {tuple(weight.shape)}")
    local_vocab = inputs.shape[-1] if weight is None else weight.shape[0]
    vocab = local_vocab * (1 if group is None else dist.get_world_size(group))
    flat = inputs.reshape(-1, inputs.shape[-1])
    # Every TP rank holds the same rows, so every rank runs the same number of collectives.
    rows = max(1, block_elements // local_vocab)
    entropy, certainty = [], []
    for block in flat.split(rows):
        logits = block if weight is None else block.to(weight.dtype) @ weight.t()
        z = logits.float() / float(temperature)
        z_max, exp = _shifted_exp(z, group)
        sums = _vocab_sums([exp.sum(dim=-1), (exp * z).sum(dim=-1), z.sum(dim=-1)], group)
        log_norm = z_max + torch.log(sums[0])  # logsumexp(z) over the whole vocab
        entropy.append(log_norm - sums[1] / sums[0])
        certainty.append(log_norm - sums[2] / vocab - math.log(vocab))
    shape = inputs.shape[:-1]
    empty = inputs.new_zeros(0, dtype=torch.float32)
    return (torch.cat(entropy).reshape(shape) if entropy else empty.reshape(shape),
            torch.cat(certainty).reshape(shape) if certainty else empty.reshape(shape))
