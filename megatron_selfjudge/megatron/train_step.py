"""One GRPO policy update inside megatron-core, and the mini-batch loop over a rollout batch.

The loss of ALGORITHM.md section 6 is a weighted sum over response tokens,
``sum(loss_t * w_t)``, with weights from `loss.token_weights` whose normaliser counts the whole
global batch (all micro-batches on all data-parallel ranks). Each micro-batch therefore returns
its own part of the global loss; megatron's schedule is told not to rescale it
(`calculate_per_token_loss`, set by optimizer.build_optimizer) and DDP sums gradients across
ranks, so the accumulated gradient is the gradient of the exact global aggregation.

Per-token terms come from vocab-parallel logits divided by the temperature, computed by the
loss implementation `settings.impl` names (the registry in `loss.py`): `reference` (megatron's
vocab-parallel cross entropy + `loss.per_token_policy_loss`), `logits_kernel` (the Triton kernels
of `kernels/grpo_loss.py`) or `fused_linear` (`kernels/fused_linear_grpo.py`, from the hidden
states and the output weight, so the logits never exist). The logits are never gathered over the
vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_selfjudge import loss as loss_ref
from megatron_selfjudge.megatron import forward as fwd
from megatron_selfjudge.megatron.batching import PolicyBatch, data_parallel_shard, prompt_mini_batches
from megatron_selfjudge.runtime.ranks import collective_device

# Per micro-batch sums, reduced over micro-batches and DP ranks before any division.
_SUM_KEYS = ("loss", "pg", "kl", "clipped", "entropy", "tokens")


@dataclass(frozen=True)
class LossSettings:
    """Policy-loss hyper-parameters; no defaults here: config.LossConfig is their one source."""

    temperature: float  # the sampling temperature: log-probs come from logits / temperature
    eps_low: float
    eps_high: float
    dual_clip: float
    beta_kl: float
    agg: str  # one of loss.AGG_MODES
    entropy_coef: float
    impl: str  # one of loss.IMPL_CHOICES

    def __post_init__(self) -> None:
        if self.agg not in loss_ref.AGG_MODES:
            raise ValueError(f"agg must be one of {loss_ref.AGG_MODES}, got {self.agg!r}")
        if self.impl not in loss_ref.IMPL_CHOICES:
            raise ValueError(f"impl must be one of {loss_ref.IMPL_CHOICES}, got {self.impl!r}")
        self.params()

    def params(self) -> loss_ref.LossParams:
        """The per-token loss hyper-parameters, checked."""
        return loss_ref.LossParams(self.temperature, self.eps_low, self.eps_high, self.dual_clip,
                                   self.beta_kl).check()


def global_normalizer(loss_mask: torch.Tensor, agg: str) -> float:
    """Valid tokens (token-mean) or sequences with a valid token (seq-mean-*) summed over DP ranks."""
    from megatron.core import parallel_state

    valid = loss_mask.float()
    local = valid.sum() if agg == "token-mean" else (valid.sum(dim=1) > 0).sum().float()
    total = local.reshape(1).to(device=collective_device(), dtype=torch.float64)
    if parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return float(total.item())


def micro_batch_loss(output: torch.Tensor, micro: PolicyBatch, settings: LossSettings, normalizer: float,
                     info: fwd.ModelInfo, output_weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    """This micro-batch's share of the global loss, and summed stats.

    `output` is the last stage's logits [b, s, V/tp], or its hidden states [b, s, H] when
    `output_weight` (this rank's output-layer weight [V/tp, H]) is given (a hidden-state impl).
    """
    if micro.advantages is None:
        raise ValueError("advantages are required for the policy update")
    impl = loss_ref.resolve_impl(settings.impl, output.device, settings.entropy_coef)
    if impl.from_hidden != (output_weight is not None):
        raise ValueError(f"loss impl {impl.name!r} needs {'hidden states and the output weight' if impl.from_hidden else 'logits'}")
    source, shard, rows, cols = fwd.loss_source(output, micro, info, output_weight)
    weights = loss_ref.token_weights(micro.loss_mask, settings.agg, normalizer)[rows, cols]
    adv = micro.advantages.float()[rows]
    if micro.rollout_weight is not None:  # truncated IS weight per token: scales its pg term (loss.py)
        adv = adv * micro.rollout_weight.float()[rows, cols]
    old = None if micro.old_logp is None else micro.old_logp.float()[rows, cols]
    ref = None if micro.ref_logp is None else micro.ref_logp.float()[rows, cols]
    terms = impl.per_token(source, micro.labels[rows, cols], adv, old, ref, settings.params(), shard=shard,
                           entropy_grad=settings.entropy_coef != 0)
    loss = (terms.loss * weights).sum()
    if settings.entropy_coef:
        loss = loss - settings.entropy_coef * (terms.entropy * weights).sum()
    stats = torch.stack([loss.detach(), terms.pg.sum(), terms.kl.sum(), terms.clipped.float().sum(),
                         terms.entropy.detach().sum(), torch.tensor(float(rows.numel()), device=loss.device)]).double()
    inf = torch.tensor(float("inf"), device=loss.device, dtype=torch.float64)
    ratio = terms.ratio
    extremes = torch.stack([ratio.min().double() if ratio.numel() else inf,
                            -ratio.max().double() if ratio.numel() else inf])
    return loss, {"sums": stats, "neg_extremes": extremes}


def zero_grads(model: torch.nn.Module, optimizer) -> None:
    """Clear DDP's main-grad buffers AND the optimizer's `param.grad` aliases of them.

    After optimizer.step() megatron leaves `param.grad` pointing into the main-grad buffer; if only
    the buffer is zeroed, the next backward accumulates into that alias and DDP's hook then adds it
    to the buffer again, doubling those gradients.
    """
    if not hasattr(model, "zero_grad_buffer"):
        raise TypeError("model must be the DistributedDataParallel module returned by build_optimizer")
    model.zero_grad_buffer()
    optimizer.zero_grad()


def forward_backward(model: torch.nn.Module, batch: PolicyBatch, settings: LossSettings, *,
                     max_tokens: int = 4096) -> dict[str, float]:
    """Accumulate the gradient of the global GRPO loss for this rank's rows; returns global metrics.

    Call zero_grads() first (train_step does).
    """
    info = fwd.model_info(model)
    from_hidden = loss_ref.resolve_impl(settings.impl, info.device, settings.entropy_coef).from_hidden
    normalizer = global_normalizer(batch.loss_mask, settings.agg)
    _, micro_batches = fwd.split_micro_batches(batch, info, max_tokens)

    def forward_step(data_iterator, chunk):
        micro = next(data_iterator)
        output, weight = fwd.stage_forward(chunk, micro, info, from_hidden=from_hidden)

        def loss_func(output):
            loss, stats = micro_batch_loss(output, micro, settings, normalizer, info, weight)
            # 3-tuple + calculate_per_token_loss: the schedule keeps the loss as is.
            return loss, torch.tensor(int(micro.loss_mask.sum()), dtype=torch.int), stats

        return output, loss_func

    stored = fwd.run_schedule(model, micro_batches, forward_step, info, forward_only=False)
    metrics = _reduce_metrics(stored, info.device)
    metrics["num_sequences"], metrics["response_len_mean"] = _length_stats(batch.loss_mask)
    return metrics


def _reduce_metrics(stored: list, device: torch.device) -> dict[str, float]:
    """Sum/min/max the micro-batch stats over micro-batches and DP ranks; same dict on every rank."""
    from megatron.core import parallel_state

    sums = torch.zeros(len(_SUM_KEYS), dtype=torch.float64, device=device)
    extremes = torch.full((2,), float("inf"), dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage():
        for item in stored:
            sums += item["sums"].to(device)
            extremes = torch.minimum(extremes, item["neg_extremes"].to(device))
    if parallel_state.get_data_parallel_world_size() > 1:
        group = parallel_state.get_data_parallel_group()
        dist.all_reduce(sums, group=group)
        dist.all_reduce(extremes, op=dist.ReduceOp.MIN, group=group)
    fwd._broadcast_from_last_stage(sums)
    fwd._broadcast_from_last_stage(extremes)
    total = dict(zip(_SUM_KEYS, sums.tolist()))
    count = max(total["tokens"], 1.0)
    any_token = total["tokens"] > 0
    return {
        "loss": total["loss"],
        "pg_loss": total["pg"] / count,
        "kl": total["kl"] / count,
        "clip_frac": total["clipped"] / count,
        "entropy": total["entropy"] / count,
        "ratio_min": float(extremes[0]) if any_token else 1.0,
        "ratio_max": float(-extremes[1]) if any_token else 1.0,
        "num_tokens": total["tokens"],
    }


def _length_stats(loss_mask: torch.Tensor) -> tuple[float, float]:
    """(sequences, mean response length) over all DP ranks."""
    from megatron.core import parallel_state

    stats = torch.tensor([float(loss_mask.shape[0]), float(loss_mask.sum())], dtype=torch.float64,
                         device=collective_device())
    if parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(stats, group=parallel_state.get_data_parallel_group())
    return float(stats[0]), float(stats[1] / max(float(stats[0]), 1.0))


def train_step(model: torch.nn.Module, optimizer, batch: PolicyBatch, settings: LossSettings, *,
               max_tokens: int = 4096) -> dict[str, float]:
    """One optimizer step on this rank's rows of one mini-batch; metrics are global (all ranks).

    A non-finite loss or gradient on any rank skips the update (weights and Adam state untouched)
    and reports `skipped = 1`: megatron's step() only checks for inf/NaN under fp16 loss scaling.
    """
    from megatron_selfjudge.preemption import is_finite_step

    model.train()
    zero_grads(model, optimizer)
    metrics = forward_backward(model, batch, settings, max_tokens=max_tokens)
    if not is_finite_step(metrics["loss"], model=model):
        zero_grads(model, optimizer)
        metrics.update(grad_norm=float("nan"), skipped=1.0)
        return metrics
    update_ok, grad_norm, _ = optimizer.step()
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["skipped"] = 0.0 if update_ok else 1.0  # fp16 overflow: megatron skipped it itself
    return metrics


def train_on_rollout(model: torch.nn.Module, optimizer, batch: PolicyBatch, settings: LossSettings, *,
                     group_ids: Sequence, prompts_per_mini_batch: int, max_tokens: int = 4096,
                     image_token_index: Optional[int] = None, local: bool = False) -> list[dict[str, float]]:
    """Several updates per rollout batch: one train_step per mini-batch of prompts (ALGORITHM.md 6).

    `prompts_per_mini_batch` counts the prompts of a mini-batch over all DP ranks. With `local`,
    `batch` is this rank's share of the step (batching.prompt_shard: its part of every mini-batch)
    and each of its consecutive `prompts_per_mini_batch / dp` prompts is its part of one update.
    Otherwise `batch` is the whole rollout batch, identical on every rank, and each mini-batch is
    split over the DP ranks. Old/ref log-probs are attached before the first update either way.
    """
    from megatron.core import parallel_state

    if len(group_ids) != batch.size:
        raise ValueError(f"group_ids has {len(group_ids)} entries for {batch.size} sequences")
    index = fwd.model_info(model).image_token_index if image_token_index is None else image_token_index
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    if local and prompts_per_mini_batch % dp_size:
        raise ValueError(f"a mini-batch of {prompts_per_mini_batch} prompts does not split over {dp_size} DP ranks")
    history = []
    for rows in prompt_mini_batches(group_ids, prompts_per_mini_batch // dp_size if local else prompts_per_mini_batch):
        mine = rows if local else [rows[i] for i in data_parallel_shard(len(rows), dp_rank, dp_size)]
        history.append(train_step(model, optimizer, batch.select(mine, index), settings, max_tokens=max_tokens))
    return history
