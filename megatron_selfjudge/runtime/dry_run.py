"""`selfjudge train --config FILE --dry-run`: the layout, batches, steps and per-GPU memory of a run, at once.

It validates the config, reads the model's sizes (for an HF folder only its config.json:
runtime/preflight.model_shape), runs the launch checks that depend on the config alone against the
target machine (the world size given, one node of up to GPUS_PER_NODE CUDA GPUs with NCCL and
Transformer Engine), and prints the memory estimate per GPU against the GPU's size. Nothing is
built, no weights are read, megatron is not imported and no process group is started.
"""
from __future__ import annotations

from typing import Optional

from megatron_selfjudge.config import Config
from megatron_selfjudge.runtime import preflight
from megatron_selfjudge.runtime.preflight import GIB, Platform, PreflightError

GPUS_PER_NODE = 8  # the recipes' node: 8 x 80 GB (A800 / H100)
DEFAULT_GPU_GIB = 80.0


def target_world_size(requested: Optional[int]) -> int:
    """--world-size, else WORLD_SIZE, else one node of GPUS_PER_NODE GPUs."""
    if requested is not None:
        if requested < 1:
            raise PreflightError(f"--world-size={requested} must be >= 1")
        return requested
    return preflight._env_int("WORLD_SIZE", GPUS_PER_NODE)


def report(cfg: Config, world_size: int, gpu_gib: float = DEFAULT_GPU_GIB) -> tuple[list[str], preflight.MemoryEstimate]:
    """The dry-run's lines and estimate; PreflightError (one line) when a launch check fails."""
    if not gpu_gib > 0:
        raise PreflightError(f"--gpu-memory={gpu_gib} must be a positive number of GiB")
    t, r, p = cfg.trainer, cfg.rollout, cfg.parallel
    shape = preflight.model_shape(cfg)
    local = min(world_size, GPUS_PER_NODE)
    target = Platform(world_size=world_size, local_world_size=local, cuda=True, gpu_count=local, nccl=True,
                      transformer_engine=True, host="target")
    checks = preflight.launch_checks(cfg, target, shape)
    preflight.require(checks)
    gpu_bytes = int(gpu_gib * GIB)
    estimate = preflight.memory_estimate(cfg, shape, world_size, cuda=True, gpu_bytes=gpu_bytes)
    dp = world_size // (p.tp * p.pp)
    updates = t.prompts_per_step // t.mini_batch_prompts
    steps = (f"trainer.max_steps={t.max_steps}" if t.max_steps >= 0 else
             f"trainer.epochs={t.epochs} x (training rows // {t.prompts_per_step} prompts) "
             "(rows are counted when the data loads)")
    lines = [
        f"model: {shape.description}",
        *(f"{c.name}: {c.message}" for c in checks if c.name in ("layout", "tp/pp split", "prompt split",
                                                                   "transformer impl")),
        f"rollouts: {t.prompts_per_step} prompts x {r.n} = {t.prompts_per_step * r.n} trajectories per step "
        f"({-(-t.prompts_per_step // dp)} prompts per data-parallel rank), {r.max_prompt_len} + {r.max_response_len} "
        f"tokens, engine batches of {r.max_batch_size} rows",
        f"updates: {updates} mini-batches of {t.mini_batch_prompts} prompts per step "
        f"({t.mini_batch_prompts // max(dp, 1)} per data-parallel rank), micro-batches of at most "
        f"{t.micro_batch_tokens} tokens",
        f"steps: {steps}",
    ]
    if estimate is None:
        lines.append("memory: not estimated (the model family cannot count its parameters before building)")
        return lines, estimate
    lines.append(f"memory per GPU (estimate; frozen copy "
                 f"{'offloaded between uses' if cfg.trainer.offload_frozen else 'resident'}, no activation "
                 "recomputation):")
    lines += estimate.table(gpu_bytes)
    return lines, estimate


def main(cfg: Config, world_size: Optional[int] = None, gpu_gib: float = DEFAULT_GPU_GIB) -> int:
    """Print the dry-run report; PreflightError when a check fails or the estimate exceeds the GPU."""
    world = target_world_size(world_size)
    lines, estimate = report(cfg, world, gpu_gib)
    print("\n".join(lines), flush=True)
    if estimate is not None and estimate.total > gpu_gib * GIB:
        vllm = ("; with rollout.backend=vllm lower rollout.vllm.gpu_memory_utilization or rollout.vllm.kv_cache_gb, "
                "or set judge.share_engine=true") if cfg.rollout.backend == "vllm" else ""
        raise PreflightError(
            f"the estimate's {estimate.peak_phase} peak of {preflight.format_bytes(estimate.total)} per GPU exceeds "
            f"{gpu_gib:g} GiB; lower trainer.micro_batch_tokens or rollout.max_batch_size, or raise parallel.tp{vllm}")
    return 0
