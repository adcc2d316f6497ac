"""Running a megatron-core policy on a PolicyBatch: stage forward, label positions, forward-only log-probs.

What is model-specific (the module's forward, its placeholder id, how many decoder positions an
image placeholder expands to) comes from the module's model family (megatron/models/family.py).

Where a label's logits live. Without expansion the logits at text position t predict labels[t].
When each image placeholder is replaced by `image_seq_len` embeddings, text position t sits
at decoder position `cumsum(span)[t] - 1` (span = image_seq_len for a placeholder, else 1): the
LAST position of token t's span, which is exactly the position whose logits predict the token
after t (an image's last embedding predicts the text that follows it). Losses are computed on
the logits gathered at those positions for response labels only, so prompt and image positions
never enter the loss. Every family's logits come back batch-first, [b, s, V/tp].

`compute_logprobs` is the forward-only path for old/reference log-probs and for a likelihood
judge: rows are split over data-parallel ranks, cut into token-budget micro-batches, run through
`get_forward_backward_func(forward_only=True)`, then the last pipeline stage broadcasts its
result to the other stages and the DP shards are all-gathered, so every rank returns [B, T].
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, NamedTuple, Optional

import torch
import torch.distributed as dist

from megatron_selfjudge import loss as loss_ref
from megatron_selfjudge.megatron.batching import PolicyBatch, data_parallel_shard, micro_batches_by_tokens
from megatron_selfjudge.megatron.models.family import ModelInfo, family_of


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare megatron model inside DDP / Float16Module wrappers."""
    from megatron.core.utils import unwrap_model as megatron_unwrap

    return megatron_unwrap(model)


def model_info(model: torch.nn.Module) -> ModelInfo:
    """Describe `model` (bare or wrapped) for batching and loss code: asks its model family."""
    return family_of(model)


def label_positions(tokens: torch.Tensor, image_token_index: int, image_seq_len: int) -> torch.Tensor:
    """[B, T] long: the decoder position whose logits predict labels[b, t] (see module docstring)."""
    if image_seq_len <= 0:
        return torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    span = torch.where(tokens == image_token_index, image_seq_len, 1)
    return torch.cumsum(span, dim=1) - 1


def check_fits(batch: PolicyBatch, info: ModelInfo) -> None:
    """Refuse rows that a decoder with a length cap (images expanded) would silently truncate."""
    if info.max_seq_len is None:
        return
    longest = int(batch.token_costs(info.image_token_index, info.image_seq_len).max())
    if longest > info.max_seq_len:
        raise ValueError(f"a sequence needs {longest} decoder positions (images expanded) but the model's "
                         f"language_max_sequence_length is {info.max_seq_len}; it would be truncated")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    megatron's region backward all-reduces ``grad.contiguous()`` and returns ``grad``: for a strided
    gradient (the bypassed output's comes back through GPTModel's [s, b] -> [b, s] transpose) that
    would silently skip the reduction, so the gradient is made contiguous first.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _OutputLayerBypass:
    """Stands in for a ColumnParallelLinear output layer's forward: its prepared input, and the weight it got."""

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer
        self.weight: Optional[torch.Tensor] = None

    def __call__(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                 runtime_gather_output: Optional[bool] = None) -> tuple[torch.Tensor, None]:
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        layer = self.layer
        if getattr(layer, "bias", None) is not None:
            raise ValueError("loss.impl=fused_linear does not support an output layer with a bias")
        self.weight = layer.weight if weight is None else weight
        # The same input preparation as ColumnParallelLinear.forward: the fused loss's d_hidden is this
        # rank's vocab shard's part, summed over ranks by these regions' backward.
        if layer.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True,
                                                          group=layer.tp_group)
        elif getattr(layer, "disable_grad_reduce", False):
            hidden = input_
        else:
            hidden = copy_to_tensor_model_parallel_region(input_, group=layer.tp_group)
        return _ContiguousGrad.apply(hidden), None


def output_layer(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The last stage's output layer of a (wrapped) megatron model (a multimodal model's language model's), or None."""
    bare = unwrap_model(model)
    language = getattr(bare, "language_model", bare)
    return getattr(language, "output_layer", None)


@contextmanager
def bypass_output_layer(model: torch.nn.Module) -> Iterator[_OutputLayerBypass]:
    """Within this block the model returns hidden states [b, s, H]; the bypass records the output weight."""
    layer = output_layer(model)
    if layer is None:
        raise ValueError("the model has no output layer on this pipeline stage to bypass")
    bypass = _OutputLayerBypass(layer)
    layer.forward = bypass  # an instance attribute shadows the class's forward for this block only
    try:
        yield bypass
    finally:
        del layer.forward


def stage_forward(model: torch.nn.Module, micro: PolicyBatch, info: ModelInfo,
                  from_hidden: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """This pipeline stage's output for one micro-batch, and the output weight when ``from_hidden``.

    On the last stage the output is logits [b, s, V/tp], or with ``from_hidden`` the hidden states
    [b, s, H] that the output layer would have multiplied with the returned weight [V/tp, H].
    """
    from megatron.core import parallel_state

    bypass = from_hidden and parallel_state.is_pipeline_last_stage()
    with bypass_output_layer(model) if bypass else nullcontext() as layer:
        output = info.family.run(model, micro, info)
    return output, (layer.weight if bypass else None)


def response_logits(logits: torch.Tensor, micro: PolicyBatch,
                    info: ModelInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [N, V/tp] (or hidden states [N, H]) of the N response labels, with their (rows, cols) in the text layout."""
    if logits.dim() != 3 or logits.shape[0] != micro.size:
        raise ValueError(f"expected batch-first logits [{micro.size}, s, V], got {tuple(logits.shape)}")
    rows, cols = micro.loss_mask.bool().nonzero(as_tuple=True)
    positions = label_positions(micro.tokens, info.image_token_index, info.image_seq_len)[rows, cols]
    if positions.numel() and int(positions.max()) >= logits.shape[1]:
        raise ValueError(f"a response label maps to decoder position {int(positions.max())} but the logits "
                         f"hold {logits.shape[1]} positions")
    return logits[rows, positions], rows, cols


def loss_source(output: torch.Tensor, micro: PolicyBatch, info: ModelInfo,
                weight: Optional[torch.Tensor]) -> tuple[loss_ref.Source, loss_ref.VocabShard, torch.Tensor, torch.Tensor]:
    """What the loss implementation reads for the response labels, this rank's vocab shard, and (rows, cols)."""
    from megatron.core import parallel_state

    selected, rows, cols = response_logits(output, micro, info)
    source = selected if weight is None else loss_ref.HiddenStates(selected, weight)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    local_vocab = selected.shape[-1] if weight is None else weight.shape[0]
    shard = loss_ref.VocabShard(parallel_state.get_tensor_model_parallel_group() if tp > 1 else None,
                                parallel_state.get_tensor_model_parallel_rank() * local_vocab)
    return source, shard, rows, cols


def run_schedule(model: torch.nn.Module, micro_batches: list[PolicyBatch], forward_step_func: Callable,
                 info: ModelInfo, forward_only: bool) -> list:
    """Run megatron's schedule (1F1B when PP > 1) over the micro-batches; returns the loss dicts."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    if info.pipeline_parallel:
        # Token-budget micro-batches differ in shape; stages exchange shapes before activations.
        get_model_config(model).variable_seq_lengths = True
    lengths = [int(m.token_costs(info.image_token_index, info.image_seq_len).max()) for m in micro_batches]
    # A decoder with a length cap pads every stage's activations to it under pipeline parallelism.
    seq_length = info.max_seq_len if (info.max_seq_len is not None and info.pipeline_parallel) else max(lengths)
    return get_forward_backward_func()(
        forward_step_func=forward_step_func, data_iterator=iter(micro_batches), model=[model],
        num_microbatches=len(micro_batches), seq_length=seq_length,
        micro_batch_size=max(m.size for m in micro_batches), forward_only=forward_only)


def split_micro_batches(batch: PolicyBatch, info: ModelInfo, max_tokens: int) -> tuple[list, list[PolicyBatch]]:
    """Token-budget micro-batches of `batch` (on the model's device) and their row indices."""
    check_fits(batch, info)
    costs = batch.token_costs(info.image_token_index, info.image_seq_len).tolist()
    groups = micro_batches_by_tokens(costs, max_tokens)
    return groups, [batch.select(g, info.image_token_index).to(info.device) for g in groups]


def _broadcast_from_last_stage(tensor: torch.Tensor) -> None:
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(tensor, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())


def _gather_data_parallel(local: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Concatenate each DP rank's [rows_r, T] block (balanced contiguous shards) into [num_rows, T]."""
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1:
        return local
    width = -(-num_rows // dp)
    padded = torch.zeros(width, local.shape[1], dtype=local.dtype, device=local.device)
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(dp)]
    dist.all_gather(parts, padded, group=parallel_state.get_data_parallel_group())
    sizes = [len(data_parallel_shard(num_rows, r, dp)) for r in range(dp)]
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class ScoredTokens(NamedTuple):
    """compute_logprobs(token_stats=True): fp32 [B, T] each, 0 outside the loss mask."""

    logp: torch.Tensor
    entropy: torch.Tensor  # H(p_t) of softmax(logits / T)
    self_certainty: torch.Tensor  # KL(U || p_t), megatron.logprobs.vocab_parallel_token_stats


def _token_stats(source: loss_ref.Source, temperature: float, shard: loss_ref.VocabShard) -> torch.Tensor:
    """[2, N] entropy and self-certainty of the response labels' distributions (logits or hidden + weight)."""
    from megatron_selfjudge.megatron.logprobs import vocab_parallel_token_stats

    if isinstance(source, loss_ref.HiddenStates):
        stats = vocab_parallel_token_stats(source.hidden, temperature, shard.group, weight=source.weight)
    else:
        stats = vocab_parallel_token_stats(source, temperature, shard.group)
    return torch.stack(stats)


@torch.no_grad()
def compute_logprobs(
    model: torch.nn.Module,
    batch: PolicyBatch,
    *,
    temperature: float = 1.0,
    max_tokens: int = 4096,
    shard_data_parallel: bool = True,
    impl: str = "auto",
    token_stats: bool = False,
) -> torch.Tensor | ScoredTokens:
    """fp32 [B, T] log p(labels) under softmax(logits / T) where loss_mask is 1, else 0; same on every rank.

    With `shard_data_parallel` each DP rank scores its share of rows and the shares are gathered
    (the batch must be identical on all ranks); otherwise every rank scores all of `batch`.
    `impl` names the loss implementation (loss.LOSS_IMPLS, or 'auto') that computes the log-probs.
    `token_stats` also returns each label position's entropy and self-certainty (a ScoredTokens),
    from the same forward pass (the self-certainty and entropy rewards read them).
    """
    from megatron.core import parallel_state

    info = model_info(model)
    chosen = loss_ref.resolve_impl(impl, info.device)
    was_training = model.training
    model.eval()
    rows = list(range(batch.size))
    if shard_data_parallel:
        rows = data_parallel_shard(batch.size, parallel_state.get_data_parallel_rank(),
                                   parallel_state.get_data_parallel_world_size())
    local = batch.select(rows, info.image_token_index) if len(rows) != batch.size else batch
    groups, micro_batches = split_micro_batches(local, info, max_tokens)

    def forward_step(data_iterator, chunk):
        micro = next(data_iterator)
        output, weight = stage_forward(chunk, micro, info, from_hidden=chosen.from_hidden)

        def loss_func(output):
            source, shard, r, c = loss_source(output, micro, info, weight)
            logp = chosen.logprobs(source, micro.labels[r, c], temperature, shard=shard)
            values = torch.cat([logp.float().unsqueeze(0), _token_stats(source, temperature, shard)]) \
                if token_stats else logp.float().unsqueeze(0)
            return output.new_zeros(()), torch.tensor(r.numel(), dtype=torch.int), {"values": values, "rows": r, "cols": c}

        return output, loss_func

    try:
        stored = run_schedule(model, micro_batches, forward_step, info, forward_only=True)
    finally:
        model.train(was_training)
    # [k, B, T]: the log-probs, then (token_stats) the entropy and the self-certainty.
    result = torch.zeros(3 if token_stats else 1, local.size, batch.tokens.shape[1], dtype=torch.float32,
                         device=info.device)
    if parallel_state.is_pipeline_last_stage():
        for group, out in zip(groups, stored):
            index = torch.as_tensor(group, device=info.device)[out["rows"]]
            result[:, index, out["cols"]] = out["values"]
    _broadcast_from_last_stage(result)
    if shard_data_parallel:
        result = torch.stack([_gather_data_parallel(part, batch.size) for part in result])
    return ScoredTokens(*result) if token_stats else result[0]
