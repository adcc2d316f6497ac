"""AdamW for a megatron-core policy: DDP wrapping, megatron's optimizer, gradient clipping.

The GRPO step (train_step.py) gives every micro-batch loss its share of ONE global normaliser
(valid tokens or sequences over all micro-batches and data-parallel ranks), so the gradients of
the micro-batch losses already add up to the gradient of the global loss. Megatron's defaults
would rescale that twice (the schedule divides each loss by the number of micro-batches and DDP
averages over data-parallel ranks). `build_optimizer` therefore switches the model config to
`calculate_per_token_loss` (the schedule leaves losses alone, DDP sums gradients) and installs a
gradient finaliser that does megatron's reductions without its per-token division.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from megatron_selfjudge.config import OptimConfig
from megatron_selfjudge.megatron import cpu


def _check_hparams(lr: float, weight_decay: float, clip_grad: float, betas: tuple[float, float],
                   eps: float) -> None:
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not clip_grad >= 0:
        raise ValueError(f"clip_grad must be >= 0 (0 disables clipping), got {clip_grad!r}")
    if not all(0 <= b < 1 for b in betas):
        raise ValueError(f"adam betas must lie in [0, 1), got {betas!r}")
    if not eps > 0:
        raise ValueError(f"adam_eps must be > 0, got {eps!r}")


def _finalize_without_token_scaling(model: list, num_tokens: Optional[torch.Tensor] = None,
                                    pg_collection: Any = None, force_all_reduce: bool = False) -> None:
    """megatron's finalize_model_grads (DP/embedding/layernorm reductions), minus the 1/num_tokens scaling."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    # The losses already carry the global normaliser; dividing by the token count again would
    # turn a token-mean into a mean over tokens squared.
    finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)


def data_parallel_size() -> int:
    """Size of megatron's data-parallel group (1 when model parallelism is not initialised)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_data_parallel_world_size()


def build_optimizer(
    model: torch.nn.Module,
    optim: Optional[OptimConfig] = None,
    *,
    use_distributed_optimizer: Optional[bool] = None,
    grad_reduce_in_fp32: bool = True,
    **overrides: float,
):
    """Wrap `model` in megatron DDP and build megatron's AdamW; returns (ddp_model, optimizer).

    The hyper-parameters are `optim` (a config.OptimConfig; its defaults when None) with
    `overrides` of its field names (lr, weight_decay, grad_clip, adam_beta1, adam_beta2,
    adam_eps) on top; an unknown name raises TypeError. `use_distributed_optimizer` defaults
    to True exactly when the data-parallel size is > 1 (optimizer state sharded over DP ranks).
    Build before the first forward; the model's config is switched to sum (not average)
    gradients, see the module docstring.
    """
    o = dataclasses.replace(optim if optim is not None else OptimConfig(), **overrides)
    lr, weight_decay, clip_grad = o.lr, o.weight_decay, o.grad_clip
    adam_beta1, adam_beta2, adam_eps = o.adam_beta1, o.adam_beta2, o.adam_eps
    _check_hparams(lr, weight_decay, clip_grad, (adam_beta1, adam_beta2), adam_eps)
    cpu.activate()
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    if isinstance(model, DistributedDataParallel):
        raise TypeError("model is already wrapped in DistributedDataParallel; pass the bare module")
    if use_distributed_optimizer is None:
        use_distributed_optimizer = data_parallel_size() > 1
    config = model.config
    # Must precede DDP construction: DDP picks its gradient scaling factor (1, i.e. a sum) from it.
    config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_grad_reduce=False,
        average_in_collective=False,
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    opt_config = OptimizerConfig(
        optimizer="adam",  # torch/TE/apex AdamW: decoupled weight decay
        lr=lr,
        min_lr=lr,
        weight_decay=weight_decay,
        clip_grad=clip_grad,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        adam_eps=adam_eps,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = _finalize_without_token_scaling
    # fp16 loss scaling (a no-op scale of 1 for fp32/bf16), as megatron's training loop wires it.
    config.grad_scale_func = optimizer.scale_loss
    return ddp, optimizer


def reset_optimizer_state(optimizer: Any) -> None:
    """Forget Adam moments (the UPT stage starts its optimizer afresh after SFT)."""
    from collections import defaultdict

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        inner.state = defaultdict(dict)
        for group in inner.param_groups:  # fused Adams (TE/Apex) keep the step count here
            group.pop("step", None)


def set_lr(optimizer: Any, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def is_fresh(optimizer: Any) -> bool:
    """True when the optimizer has never stepped (no moments in any inner optimizer)."""
    return not any(getattr(opt, "optimizer", opt).state for opt in getattr(optimizer, "chained_optimizers", [optimizer]))
