"""Agreement between ranks: a flag raised on any rank, or one rank's failure, reaches all of them.

Both are collectives: every rank calls them at the same point. Without torch.distributed (or with
one rank) they are local.
"""
from __future__ import annotations

from typing import Any, Optional


class RankFailedError(RuntimeError):
    """Raised on the ranks that did not fail when another rank did; its own error is reported there."""


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def collective_device(group: Any = None):
    """Device for small collective tensors: NCCL reduces CUDA tensors only, gloo CPU ones."""
    import torch
    import torch.distributed as dist

    if _distributed() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool, group: Any = None) -> bool:
    """True when `flag` is True on any rank of `group` (the world by default)."""
    import torch
    import torch.distributed as dist

    if not _distributed() or dist.get_world_size(group) == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=collective_device(group))
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item() > 0)


def raise_if_any_rank_failed(error: Optional[BaseException], what: str) -> None:
    """Re-raise `error` on its rank and a `RankFailedError` naming that rank on the others.

    `what` names the failed operation in the others' message ("checkpoint loading failed on rank
    1"); no rank is left waiting in a later collective for one that gave up.
    """
    import torch
    import torch.distributed as dist

    rank = dist.get_rank() if _distributed() else 0
    failed = torch.tensor([rank if error is not None else -1], dtype=torch.int64, device=collective_device())
    if _distributed() and dist.get_world_size() > 1:
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(failed.item()) >= 0:
        raise RankFailedError(f"{what} failed on rank {int(failed.item())}; see that rank's error")
