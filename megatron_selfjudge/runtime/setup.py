"""Process set-up of a run: the process group and megatron's groups, seeding, rank roles."""
from __future__ import annotations

import contextlib
import os
import random
import socket
from typing import Iterator

_RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
PORT_ATTEMPTS = 5  # ports tried for a one-process group before its EADDRINUSE is raised


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(tp: int, pp: int, seed: int) -> bool:
    """Join (or, for a plain `selfjudge train`, create) the process group and megatron's groups.

    Returns True when this call created a one-rank group that `teardown_distributed` must destroy.
    """
    import torch.distributed as dist

    from megatron_selfjudge.megatron.parallel import init_process_group, initialize_parallel

    created = False
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        # Single process: a one-rank group on loopback, so the code path is the torchrun one.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        created = True
        # The port is free when picked but bound only later: a one-process job started at the same
        # moment (selfjudge compare --jobs N) can take it first. Then pick another one.
        for attempt in range(PORT_ATTEMPTS):
            os.environ["MASTER_PORT"] = str(free_port())
            try:
                init_process_group()
                break
            except dist.DistNetworkError as exc:
                if "EADDRINUSE" not in str(exc) or attempt == PORT_ATTEMPTS - 1:
                    for key in _RANK_VARS:  # leave no half-made rendezvous behind
                        os.environ.pop(key, None)
                    raise
    initialize_parallel(tp, pp, seed=seed)
    return created


def teardown_distributed(created: bool) -> None:
    """Destroy megatron's groups, and the process group when `setup_distributed` created it."""
    import torch.distributed as dist

    from megatron_selfjudge.megatron.parallel import destroy_parallel

    destroy_parallel()
    if created and dist.is_initialized():
        dist.destroy_process_group()
        for key in _RANK_VARS:
            os.environ.pop(key, None)


@contextlib.contextmanager
def one_process(command: str, seed: int = 0, error: type[Exception] = ValueError) -> Iterator[None]:
    """A one-rank process group and megatron's groups at TP=PP=1 for `command`, torn down (env included) after.

    Raises `error` (one line) when started under a launcher with more than one rank.
    """
    import torch.distributed as dist

    world = str(dist.get_world_size()) if dist.is_initialized() else os.environ.get("WORLD_SIZE", "1")
    if world != "1":
        raise error(f"{command} runs in one process, but WORLD_SIZE={world} (run it without torchrun)")
    created = setup_distributed(1, 1, seed)
    try:
        yield
    finally:
        teardown_distributed(created)


def without_launch_env(env: "os._Environ | dict") -> dict:
    """A copy of `env` without the rendezvous variables, for a child that is a job of its own."""
    return {k: v for k, v in env.items() if k not in _RANK_VARS}


def is_main_rank() -> bool:
    """Global rank 0 writes files and prints."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs (megatron's tracker is seeded by initialize_parallel)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
