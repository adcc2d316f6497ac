"""The one tensor-parallel collective of the fused loss: gather every rank's per-token partials.

Each rank holds logits for columns [vocab_start, vocab_start + V_local) and reduces them to five
fp32 numbers per token (max, sum-exp, entropy partial, target logit, target found; see
``_triton_kernels.row_stats_kernel``). One all_gather of that [N, 5] tensor (20 bytes per token,
never the logits) is all the ranks exchange, in forward; backward needs nothing (each rank
writes the gradient of its own shard). Every rank then merges the partials identically
(``token_loss_kernel``), so all ranks see the same loss. Works with gloo (CPU) and NCCL (GPU).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def gather_partials(stats: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[world, *stats.shape] partials from every rank of ``group`` ([1, ...], no communication, without one).

    ``stats`` is [N, 5], or [splits, N, 5] when an op splits its vocabulary pass (fused_linear_grpo).
    """
    if group is None or dist.get_world_size(group) == 1:
        return stats.unsqueeze(0)
    parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, stats.contiguous(), group=group)
    return torch.stack(parts)
