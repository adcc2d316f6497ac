"""Rollouts from a megatron-core policy in-process, with megatron-core's static inference stack.

What is megatron-core's and what is ours:
- megatron-core: `GPTInferenceWrapper` (eval mode, TP logits gather, pipeline send/recv between
  stages) and `StaticInferenceContext` (the per-layer KV cache). The forward pass, the cache and
  all parallel communication are megatron's.
- ours: the batched sampling loop. The legacy `TextGenerationController` loop (behind
  `StaticInferenceEngine(legacy=True)`) does not fit RL rollouts: it returns log-probs of the
  untempered logits, knows one end-of-text id, drops the EOS from the response, re-seeds the
  global torch RNG on every call, and its VLM controller only runs batch size 1. The loop below
  follows the same schedule (prefill up to the shortest prompt, then one position per step, the
  longer prompts feeding their own tokens until they start generating), so no padding mask is
  ever needed, and adds what RL needs (see `generate`).
- the model itself: its model family (megatron/models/family.py) says where the vocabulary and
  length cap live, which id marks an image, how many decoder positions an image takes, and which
  inference wrapper runs it (the tiny LLaVA's is in megatron/models/tiny.py).

Sampling is deterministic per sample and identical on every rank of a model-parallel group:
every sampled sequence has its own CPU generator seeded by (seed, uid, sample index)
(`sampling.row_seed`), which advances once per token that sequence generates, so a sample does
not depend on the batch it is decoded in or on the data-parallel rank that decodes it. Each TP
rank holds the same gathered logits and the same generators; the last pipeline stage samples
and broadcasts the tokens and log-probs to the other stages. All ranks of a TP/PP group must
call generate() with the same requests and sampling config.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from megatron_selfjudge.megatron import cpu
from megatron_selfjudge.megatron.batching import PackedImages, concat_images
from megatron_selfjudge.megatron.forward import unwrap_model
from megatron_selfjudge.megatron.models.family import family_of
from megatron_selfjudge.rollout.base import (
    RolloutEngine,
    RolloutRequest,
    SamplingConfig,
    Trajectory,
    check_requests,
    default_stop_ids,
)
from megatron_selfjudge.rollout.sampling import make_generator, row_seed, sample_tokens


@dataclass
class _Row:
    """One sequence to generate: a request's prompt and the index of this sample."""

    request: int
    sample: int
    uid: str
    prompt: list[int]
    images: Optional[torch.Tensor]


@dataclass
class _RowResult:
    ids: list[int]
    logprobs: list[float]
    stopped: bool


@dataclass
class _BatchState:
    """Token buffer and per-row progress of one generation batch."""

    tokens: torch.Tensor  # [B, max prompt + max_new]: prompts, then generated ids in place
    lengths: torch.Tensor  # [B] prompt lengths
    out_ids: torch.Tensor  # [B, max_new]
    out_logp: torch.Tensor  # [B, max_new] fp32
    n_gen: torch.Tensor  # [B] tokens generated so far
    stopped: torch.Tensor  # [B] ended on a stop id
    done: torch.Tensor  # [B] stopped or at max_new
    stop: torch.Tensor  # stop ids

    @classmethod
    def create(cls, batch: list[_Row], max_new: int, stop_ids: tuple[int, ...], pad: int,
               device: torch.device) -> "_BatchState":
        """Right-padded prompts in a buffer long enough for max_new more tokens."""
        lengths = torch.tensor([len(r.prompt) for r in batch], device=device)
        tokens = torch.full((len(batch), int(lengths.max()) + max_new), pad, dtype=torch.long, device=device)
        for i, row in enumerate(batch):
            tokens[i, :len(row.prompt)] = torch.tensor(row.prompt, dtype=torch.long)
        zeros = functools.partial(torch.zeros, len(batch), device=device)
        return cls(tokens, lengths, zeros(max_new, dtype=torch.long), zeros(max_new, dtype=torch.float32),
                   zeros(dtype=torch.long), zeros(dtype=torch.bool), zeros(dtype=torch.bool),
                   torch.tensor(stop_ids, dtype=torch.long, device=device))

    def record(self, end: int, nxt: torch.Tensor, logp: torch.Tensor) -> None:
        """Take the tokens sampled for position `end` where a row is generating there."""
        # Rows whose prompt ends by `end` generate at position `end`; longer prompts keep their
        # own token there and feed it at the next step (megatron's static-batch schedule).
        active = (self.lengths <= end) & ~self.done
        rows = active.nonzero().squeeze(-1)
        pos = end - self.lengths[rows]
        self.tokens[rows, end] = nxt[rows]
        self.out_ids[rows, pos] = nxt[rows]
        self.out_logp[rows, pos] = logp[rows]
        self.n_gen += active.long()
        hit_stop = active & torch.isin(nxt, self.stop)
        self.stopped |= hit_stop
        self.done |= hit_stop | (active & (self.n_gen >= self.out_ids.shape[1]))

    def results(self) -> list[_RowResult]:
        """Each row's generated ids and log-probs (with the stop id when it stopped)."""
        return [_RowResult(self.out_ids[i, :n].tolist(), self.out_logp[i, :n].tolist(), bool(self.stopped[i]))
                for i, n in enumerate(self.n_gen.tolist())]


class MegatronRolloutEngine(RolloutEngine):
    """In-process rollouts from this rank's TP/PP shard of any model family's megatron module.

    The engine holds a reference to the policy module, so optimizer steps are seen by the next
    generate() without any copy (`shares_weights`: update_weights only records the version). The
    KV cache lives for one generate() call, so sleep() has nothing to free. The module's
    train/eval mode is restored after each call.
    """

    shares_weights = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 64,
        image_processor: Optional[Callable[[list], torch.Tensor]] = None,
    ) -> None:
        if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if tokenizer is None or not hasattr(tokenizer, "decode"):
            raise TypeError("tokenizer must have a decode(ids, skip_special_tokens=...) method")
        cpu.activate()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.image_processor = image_processor
        if isinstance(model, (list, tuple)):
            raise ValueError("virtual pipeline (a list of model chunks) is not supported for generation")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a megatron-core module, got {type(model).__name__}")
        self.model = model
        self.info = family_of(model)
        self._language = self.info.family.language_model(unwrap_model(model))

    # ---- RolloutEngine ----
    def close(self) -> None:
        """Drop the reference to the policy."""
        super().close()
        self.model = None

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig) -> list[Trajectory]:
        """Sample `sampling.n` responses per request; ordered by request, then sample index.

        Generation stops per row at the tokenizer's EOS or any `stop_token_ids` (kept as the
        last response token, finish_reason "stop") or after `max_new_tokens` ("length").
        Rows are batched `max_batch_size` at a time with a KV cache. Each sample is a function of
        (sampling, its request's uid and prompt, its sample index, weights), whatever else is in
        the batch: give every request of a run a distinct uid.
        """
        self.check_ready()
        check_requests(requests)
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        rows = self._rows(requests, sampling.n)
        self._check_lengths(rows, sampling.max_new_tokens)
        stop_ids = default_stop_ids(self.tokenizer, sampling)
        device = self._device()
        generators = [make_generator(row_seed(sampling.seed, row.uid, row.sample)) for row in rows]
        results: dict[int, _RowResult] = {}
        was_training = self.model.training
        try:
            for batch in self._batches(rows):
                out = self._generate_batch([rows[i] for i in batch], sampling, stop_ids,
                                           [generators[i] for i in batch], device)
                results.update(zip(batch, out))
        finally:
            self.model.train(was_training)
        return [self._trajectory(requests[row.request], row, results[i]) for i, row in enumerate(rows)]

    # ---- preparation ----
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _images_of(self, request: RolloutRequest, n_image_tokens: int) -> Optional[torch.Tensor]:
        images = request.images
        if images is None:
            if n_image_tokens:
                raise ValueError(f"request {request.uid!r}: prompt has {n_image_tokens} image tokens but no images")
            return None
        if isinstance(images, PackedImages):  # a family's variable-size images, already preprocessed
            if len(images) != n_image_tokens:
                raise ValueError(f"request {request.uid!r}: {len(images)} images but "
                                 f"{n_image_tokens} image tokens in prompt_ids")
            return images
        if not isinstance(images, torch.Tensor):
            if self.image_processor is None:
                raise TypeError(f"request {request.uid!r}: images must be a tensor [N, C, H, W] "
                                "unless the engine has an image_processor")
            images = self.image_processor(list(images))
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise ValueError(f"request {request.uid!r}: images must be [C, H, W] or [N, C, H, W], "
                             f"got shape {list(images.shape)}")
        if images.shape[0] != n_image_tokens:
            raise ValueError(f"request {request.uid!r}: {images.shape[0]} images but "
                             f"{n_image_tokens} image tokens in prompt_ids")
        return images

    def _rows(self, requests: Sequence[RolloutRequest], n: int) -> list[_Row]:
        multimodal = self.info.multimodal
        image_index = self.info.image_token_index if multimodal else None
        vocab = self._language.vocab_size
        rows = []
        for r, req in enumerate(requests):
            bad = [t for t in req.prompt_ids if not (0 <= t < vocab or t == image_index)]
            if bad:
                raise ValueError(f"request {req.uid!r}: prompt id {bad[0]} outside the model vocabulary "
                                 f"[0, {vocab})")
            n_img = sum(t == image_index for t in req.prompt_ids) if multimodal else 0
            if not multimodal and req.images is not None:
                raise ValueError(f"request {req.uid!r} has images but the model is text-only")
            images = self._images_of(req, n_img) if multimodal else None
            rows.extend(_Row(r, s, req.uid, list(req.prompt_ids), images) for s in range(n))
        return rows

    def _extra_per_row(self, row: _Row) -> int:
        if row.images is None:
            return 0
        return len(row.images) * max(self.info.image_seq_len - 1, 0)

    def _check_lengths(self, rows: list[_Row], max_new: int) -> None:
        limit = self._language.max_sequence_length
        for row in rows:
            total = len(row.prompt) + max_new + self._extra_per_row(row)
            if total > limit:
                raise ValueError(
                    f"prompt length {len(row.prompt)} + max_new_tokens {max_new} (+ image embeddings "
                    f"{self._extra_per_row(row)}) = {total} exceeds the model's max_sequence_length {limit}"
                )

    def _batches(self, rows: list[_Row]) -> list[list[int]]:
        # Every row of a batch must expand to the same decoder length, so rows are grouped by
        # their number of images (the KV cache is indexed by one shared position).
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(0 if row.images is None else len(row.images), []).append(i)
        return [ids[k:k + self.max_batch_size] for ids in groups.values()
                for k in range(0, len(ids), self.max_batch_size)]

    # ---- the sampling loop ----
    def _wrapper(self, batch: list[_Row], total_len: int, device: torch.device):
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
            InferenceWrapperConfig,
        )
        from megatron.core.utils import get_model_config

        config = get_model_config(self.model)
        extra = self._extra_per_row(batch[0])
        wrapper_config = InferenceWrapperConfig(
            hidden_size=config.hidden_size,
            params_dtype=config.params_dtype,
            # -1: never split the batch into pipeline micro-batches; one forward per stage.
            inference_batch_times_seqlen_threshold=-1,
            padded_vocab_size=self._language.vocab_size,
            inference_max_requests=len(batch),
            inference_max_seq_length=total_len + extra,
            fp32_residual_connection=config.fp32_residual_connection,
        )
        context = StaticInferenceContext(len(batch), total_len + extra)
        # Rows of a batch hold the same number of images (see _batches), so all or none have some.
        images = concat_images([row.images for row in batch]) if batch[0].images is not None else None
        return self.info.family.inference_wrapper(self.model, wrapper_config, context, images, extra)

    def _check_image_positions(self, batch: list[_Row], prefill_len: int) -> None:
        if not self.info.multimodal:
            return
        index = self.info.image_token_index
        for row in batch:
            if any(t == index for t in row.prompt[prefill_len:]):
                raise ValueError(
                    f"request {row.uid!r}: an image token sits at or after position {prefill_len}, the "
                    "shortest prompt's length in its batch; put image tokens before the prompt text"
                )

    def _generate_batch(self, batch: list[_Row], sampling: SamplingConfig, stop_ids: tuple[int, ...],
                        generators: list[torch.Generator], device: torch.device) -> list[_RowResult]:
        pad = int(getattr(self.tokenizer, "pad_token_id", None) or 0)
        state = _BatchState.create(batch, sampling.max_new_tokens, stop_ids, pad, device)
        min_len = int(state.lengths.min())
        self._check_image_positions(batch, min_len)
        wrapper = self._wrapper(batch, state.tokens.shape[1], device)
        wrapper.prep_model_for_inference()
        inputs = wrapper.prep_inference_input(state.tokens)
        start, end = 0, min_len
        with torch.inference_mode():
            while True:
                logits = wrapper.run_one_forward_step(wrapper.get_batch_for_context_window(inputs, start, end))
                # Only rows that take a token at `end` draw a random number (see the module docstring).
                active = ((state.lengths <= end) & ~state.done).tolist()
                drawing = [g if a else None for g, a in zip(generators, active)]
                state.record(end, *self._sample(logits, sampling, drawing, len(batch), device))
                if bool(state.done.all()):
                    break
                if bool((state.lengths <= end).all()):
                    wrapper.inference_context.enable_decode_mode()
                start, end = end, end + 1
        return state.results()

    def _sample(self, logits: Optional[torch.Tensor], sampling: SamplingConfig,
                generators: list[Optional[torch.Generator]], batch_size: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample on the last pipeline stage and broadcast (tokens, log-probs) to the other stages."""
        from megatron.core import parallel_state

        last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        if last_stage:
            nxt, logp = sample_tokens(logits[:, -1, :], temperature=sampling.temperature,
                                      top_p=sampling.top_p, greedy=sampling.greedy, generator=generators)
        else:
            nxt = torch.empty(batch_size, dtype=torch.long, device=device)
            logp = torch.empty(batch_size, dtype=torch.float32, device=device)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            group = parallel_state.get_pipeline_model_parallel_group()
            src = parallel_state.get_pipeline_model_parallel_last_rank()
            torch.distributed.broadcast(nxt, src=src, group=group)
            torch.distributed.broadcast(logp, src=src, group=group)
        return nxt, logp

    # ---- results ----
    def _trajectory(self, request: RolloutRequest, row: _Row, result: _RowResult) -> Trajectory:
        text_ids = result.ids[:-1] if result.stopped else result.ids
        return Trajectory(
            uid=request.uid,
            sample_index=row.sample,
            prompt_ids=list(request.prompt_ids),
            response_ids=result.ids,
            # Built outside inference mode so the trainer may use it in autograd expressions.
            logprobs=torch.tensor(result.logprobs, dtype=torch.float32),
            finish_reason="stop" if result.stopped else "length",
            text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
        )
