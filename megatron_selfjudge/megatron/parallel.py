"""Process-group set-up and teardown for megatron-core (TP x PP x DP), on CPU (gloo) or CUDA (nccl)."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_selfjudge.megatron import cpu


def init_process_group(timeout_s: float = 300.0) -> None:
    """Join the default process group from torchrun-style env vars (RANK, WORLD_SIZE, MASTER_*)."""
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"torch.distributed is not initialised and env vars {missing} are unset")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def initialize_parallel(tp: int = 1, pp: int = 1, seed: int = 0) -> None:
    """Create megatron's TP/PP/DP groups over all ranks and seed its RNG tracker."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    for name, value in (("tp", tp), ("pp", pp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    cpu.activate()
    init_process_group()
    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp * pp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron's groups (the default process group is left to its owner)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def mean_over_data_parallel(values: dict[str, float], sums: Sequence[str] = ()) -> dict[str, float]:
    """Each value averaged over the data-parallel ranks (summed for the keys in `sums`); same on every rank.

    Meant for per-rank means over equally many rows, whose mean is then the whole batch's mean.
    """
    from megatron.core import parallel_state

    from megatron_selfjudge.runtime.ranks import collective_device

    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1:
        return dict(values)
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(packed, group=parallel_state.get_data_parallel_group())
    return {k: v if k in sums else v / dp for k, v in zip(keys, packed.tolist())}


def max_over_data_parallel(value: float) -> float:
    """The largest of the data-parallel ranks' values (same on every rank)."""
    from megatron.core import parallel_state

    from megatron_selfjudge.runtime.ranks import collective_device

    if parallel_state.get_data_parallel_world_size() == 1:
        return float(value)
    packed = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
    return float(packed.item())
