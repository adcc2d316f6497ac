"""Rollouts from a vLLM engine colocated in the training process (`rollout.backend=vllm`).

The engine is built once from the model family's HF folder (`model.hf_path`) and holds its own
copy of the weights: after every policy update the weight-sync stage streams the policy's
HF-named tensors into it (`update_weights`), in buckets of `rollout.vllm.sync_bucket_mb`, through
`collective_rpc` and the model runner's in-place `reload_weights`; prefix and encoder caches are
reset afterwards (stale image embeddings would otherwise be served). The version check of
RolloutEngine refuses any rollout on weights older than the policy's.

What the returned log-probs are: vLLM's *processed* log-probs of each sampled token, i.e.
log softmax(logits / temperature), the RolloutEngine contract, whenever `top_p == 1` and sampling
is not greedy (the recipe's default). With `top_p < 1` vLLM renormalises over the nucleus, and a
greedy request is sampled at temperature 0 (log softmax of the raw logits); the trainer
recomputes the old log-probs itself, so these only change the logged rollout/train mismatch.

Seeds: where vLLM supports per-request seeds (GPU), every sample is its own request seeded with
`sampling.row_seed(seed, uid, sample)`, so a sample does not depend on its batch or rank, as with
the megatron engine. On CPU a per-request seed crashes vLLM 0.32.0 (`CPU Generator does not use
offset`): each prompt is one request with n = G, and the call draws from torch's global generator
seeded with `sampling.seed` for the call (the caller's RNG state is restored afterwards). A CPU
rollout is then a function of (seed, the requests in order, weights), so a resumed run repeats
it, but a prompt's samples depend on the batch it is drawn in.

vLLM-version specifics live in `rollout/vllm_compat.py`; settings that work on this machine's CPU
are in `VllmSettings` defaults (in-process engine core, eager mode, a fixed KV-cache size).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

from megatron_selfjudge.rollout.base import (
    EngineStateError,
    RolloutEngine,
    RolloutRequest,
    SamplingConfig,
    Trajectory,
    check_requests,
    default_stop_ids,
)
from megatron_selfjudge.config import PARAMS_DTYPES, VllmRolloutConfig, torch_dtype
from megatron_selfjudge.rollout.sampling import row_seed

log = logging.getLogger(__name__)

_CONFIG = VllmRolloutConfig()  # the one source of the defaults below (documented in config.py)


@dataclass(frozen=True)
class VllmSettings:
    """Engine construction settings (config: `rollout.vllm.*`, documented there)."""

    tensor_parallel_size: int = _CONFIG.tp
    dtype: str = "float32"  # config "" means model.params_dtype; a bare engine needs a name
    max_model_len: int = _CONFIG.max_model_len
    gpu_memory_utilization: float = _CONFIG.gpu_memory_utilization
    kv_cache_gb: float = _CONFIG.kv_cache_gb
    sync_bucket_mb: int = _CONFIG.sync_bucket_mb
    sleep_level: int = _CONFIG.sleep_level
    max_images_per_prompt: int = _CONFIG.max_images_per_prompt
    max_num_seqs: int = 256  # the trainer passes rollout.max_batch_size
    enable_prefix_caching: bool = _CONFIG.enable_prefix_caching

    def __post_init__(self) -> None:
        if self.dtype not in PARAMS_DTYPES:
            raise ValueError(f"rollout.vllm dtype must be one of {sorted(PARAMS_DTYPES)}, got {self.dtype!r}")
        for key in ("tensor_parallel_size", "max_model_len", "sync_bucket_mb", "max_num_seqs", "max_images_per_prompt"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"rollout.vllm {key} must be an int >= 1, got {value!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.vllm gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.kv_cache_gb < 0:
            raise ValueError(f"rollout.vllm kv_cache_gb must be >= 0, got {self.kv_cache_gb!r}")
        if self.sleep_level not in (0, 1, 2):
            raise ValueError(f"rollout.vllm sleep_level must be 0, 1 or 2, got {self.sleep_level!r}")


def per_request_seeds_supported() -> bool:
    """Whether vLLM on this platform accepts SamplingParams(seed=...) (not the CPU backend of 0.32.0)."""
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


def _tied_embeddings(hf_config: Any) -> bool:
    text = getattr(hf_config, "text_config", None)
    tied = getattr(hf_config, "tie_word_embeddings", None)
    if tied is None and text is not None:
        tied = getattr(text, "tie_word_embeddings", None)
    return bool(tied)


class WeightStream:
    """HF-named tensors, moved to the engine's device and dtype one bucket at a time.

    Host memory holds at most one bucket (`bucket_bytes`, or one tensor when a tensor is bigger)
    beyond what the exporter itself buffers. With tied embeddings `lm_head.weight` is dropped
    (vLLM's model reads its head from the input embedding). `names` and `bytes` are what passed.
    """

    def __init__(self, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                 device: torch.device, dtype: torch.dtype, tied: bool):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes!r}")
        self._source = iter(named_tensors)
        self.bucket_bytes = bucket_bytes
        self.device, self.dtype, self.tied = device, dtype, tied
        self.names: list[str] = []
        self.bytes = 0
        self.buckets = 0
        self.peak_bucket_bytes = 0

    def _buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, tensor in self._source:
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise TypeError(f"weight stream: expected (str, Tensor) pairs, got ({type(name).__name__}, "
                                f"{type(tensor).__name__})")
            if self.tied and name == "lm_head.weight":
                continue
            moved = tensor.detach().to(self.device, self.dtype)
            bucket.append((name, moved))
            size += moved.numel() * moved.element_size()
            if size >= self.bucket_bytes:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in self._buckets():
            size = sum(t.numel() * t.element_size() for _, t in bucket)
            self.buckets += 1
            self.bytes += size
            self.peak_bucket_bytes = max(self.peak_bucket_bytes, size)
            for name, tensor in bucket:
                self.names.append(name)
                yield name, tensor
            del bucket  # the next bucket is gathered only after this one was consumed


def _reload(worker: Any, stream: WeightStream) -> int:
    """Runs on the vLLM worker (in this process): reload its weights in place from the stream."""
    from megatron_selfjudge.rollout import vllm_compat

    model = worker.model_runner.get_model()
    aliases = vllm_compat.parameter_aliases(model)
    worker.model_runner.reload_weights(weights_iterator=iter(stream))
    vllm_compat.restore_aliases(model, aliases)
    return len(stream.names)


@contextlib.contextmanager
def _seeded_global_rng(seed: int):
    """torch's global CPU generator seeded with `seed` inside; the caller's state restored after."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        yield
    finally:
        torch.random.set_rng_state(state)


def _as_pil_images(request: RolloutRequest) -> list:
    """The request's images as PIL images: `images` itself, or `metadata["source_images"]` when `images`
    holds a family's preprocessed pixels (vLLM runs the HF image processor itself)."""
    from PIL import Image

    images = request.images
    if isinstance(images, Image.Image):
        images = [images]
    if not (isinstance(images, (list, tuple)) and all(isinstance(im, Image.Image) for im in images)):
        images = request.metadata.get("source_images")
        images = list(images) if images is not None else None
    if not images or not all(isinstance(im, Image.Image) for im in images):
        raise TypeError(f"request {request.uid!r}: the vLLM engine takes images as PIL images (in images or "
                        f"metadata['source_images']), got {type(request.images).__name__}")
    return [im.convert("RGB") for im in images]


def collapse_placeholders(ids: list[int], placeholder: int) -> list[int]:
    """One placeholder per image: a run of `placeholder` ids (a processor-expanded image) becomes one id.

    vLLM expands each image's placeholder itself from the image; a prompt whose placeholders are already
    expanded (the training-side layout) is given to it collapsed.
    """
    out: list[int] = []
    for t in ids:
        if not (t == placeholder and out and out[-1] == placeholder):
            out.append(t)
    return out


class VllmRolloutEngine(RolloutEngine):
    """A vLLM `LLM` in this process, loaded from an HF folder, fed the policy's weights every step."""

    shares_weights = False

    def __init__(self, hf_path: str, tokenizer: Any = None, *, settings: Optional[VllmSettings] = None,
                 seed: int = 0, **_unused: Any) -> None:
        from megatron_selfjudge.megatron.models import qwen
        from megatron_selfjudge.rollout import vllm_compat

        if not hf_path:
            raise ValueError("rollout.backend=vllm needs model.hf_path (a local HF folder)")
        self.settings = settings or VllmSettings()
        self.hf_path = str(Path(hf_path))
        self.hf_config = qwen.load_hf_config(self.hf_path)
        self.tokenizer = tokenizer if tokenizer is not None else qwen.load_tokenizer(self.hf_path)
        self.multimodal = qwen.is_vision_language(self.hf_config)
        self.tied = _tied_embeddings(self.hf_config)
        s = self.settings
        vllm_compat.activate(s.kv_cache_gb if s.kv_cache_gb > 0 else 2.0)
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=self.hf_path, tokenizer=self.hf_path, dtype=s.dtype, seed=int(seed), enforce_eager=True,
            max_model_len=s.max_model_len, tensor_parallel_size=s.tensor_parallel_size,
            gpu_memory_utilization=s.gpu_memory_utilization, max_num_seqs=s.max_num_seqs,
            enable_prefix_caching=s.enable_prefix_caching,
            # log softmax(logits / temperature): the log-probs the training loss recomputes.
            logprobs_mode="processed_logprobs",
            # The folder's generation_config.json (repetition penalty, top-k...) must not change sampling.
            generation_config="vllm",
            skip_tokenizer_init=False,
        )
        if self.multimodal:
            kwargs["limit_mm_per_prompt"] = {"image": s.max_images_per_prompt, "video": 0}
        self.on_gpu = torch.cuda.is_available()
        if self.on_gpu:
            kwargs["enable_sleep_mode"] = s.sleep_level > 0
            if s.kv_cache_gb > 0:
                kwargs["kv_cache_memory_bytes"] = int(s.kv_cache_gb * 2**30)
        if s.tensor_parallel_size > 1:
            # Each training rank drives its own engine shard over the torch.distributed world torchrun made.
            kwargs["distributed_executor_backend"] = "external_launcher"
        start = time.perf_counter()
        # vLLM seeds the process's global RNGs at start-up; the trainer's streams must not move.
        with _seeded_global_rng(int(seed)):
            self.llm = LLM(**kwargs)
        self.startup_seconds = time.perf_counter() - start
        self.per_request_seeds = per_request_seeds_supported()
        self._slept_once = False
        self.last_sync: dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg: Any, **kwargs: Any) -> "VllmRolloutEngine":
        """The engine of a run: model.hf_path, rollout.vllm.* and the run seed."""
        v = cfg.rollout.vllm
        dtype = v.dtype or cfg.model.params_dtype
        settings = VllmSettings(
            tensor_parallel_size=v.tp, dtype=dtype, max_model_len=v.max_model_len,
            gpu_memory_utilization=v.gpu_memory_utilization, kv_cache_gb=v.kv_cache_gb,
            sync_bucket_mb=v.sync_bucket_mb, sleep_level=v.sleep_level,
            max_num_seqs=max(cfg.rollout.max_batch_size, 1), enable_prefix_caching=v.enable_prefix_caching,
            max_images_per_prompt=v.max_images_per_prompt)
        hf_path = kwargs.pop("hf_path", None) or cfg.model.hf_path
        kwargs.pop("model", None)  # the engine has its own copy of the weights
        return cls(hf_path, kwargs.pop("tokenizer", None), settings=settings, seed=cfg.trainer.seed)

    # ---- RolloutEngine ----
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig) -> list[Trajectory]:
        """Sample `sampling.n` responses per request; ordered by request, then sample index."""
        from vllm import SamplingParams

        self.check_ready()
        check_requests(requests)
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        prompts = [self._prompt(req) for req in requests]
        stop = list(default_stop_ids(self.tokenizer, sampling))
        common = dict(temperature=0.0 if sampling.greedy else sampling.temperature,
                      top_p=1.0 if sampling.greedy else sampling.top_p, max_tokens=sampling.max_new_tokens,
                      stop_token_ids=stop, logprobs=0, detokenize=False, skip_special_tokens=True)
        if self.per_request_seeds and not sampling.greedy:
            # One request per sample, each with its own seed: independent of batch and rank.
            inputs, params = [], []
            for req, prompt in zip(requests, prompts):
                for s in range(sampling.n):
                    inputs.append(prompt)
                    params.append(SamplingParams(n=1, seed=row_seed(sampling.seed, req.uid, s), **common))
            outputs = self.llm.generate(inputs, params, use_tqdm=False)
            completions = [out.outputs[0] for out in outputs]
            grouped = [completions[i * sampling.n:(i + 1) * sampling.n] for i in range(len(requests))]
        else:
            params = SamplingParams(n=sampling.n, **common)
            with _seeded_global_rng(sampling.seed):
                outputs = self.llm.generate(prompts, params, use_tqdm=False)
            grouped = [sorted(out.outputs, key=lambda c: c.index) for out in outputs]
        trajectories = []
        for req, completions in zip(requests, grouped):
            if len(completions) != sampling.n:
                raise RuntimeError(f"vLLM returned {len(completions)} samples for {req.uid!r}, expected {sampling.n}")
            trajectories.extend(self._trajectory(req, s, c, set(stop)) for s, c in enumerate(completions))
        return trajectories

    def _prompt(self, request: RolloutRequest) -> dict:
        vocab = int(getattr(getattr(self.hf_config, "text_config", None) or self.hf_config, "vocab_size"))
        bad = [t for t in request.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {request.uid!r}: prompt id {bad[0]} outside the model vocabulary [0, {vocab})")
        prompt: dict[str, Any] = {"prompt_token_ids": list(request.prompt_ids)}
        if request.images is not None:
            if not self.multimodal:
                raise ValueError(f"request {request.uid!r} has images but the model is text-only")
            images = _as_pil_images(request)
            prompt["prompt_token_ids"] = collapse_placeholders(request.prompt_ids, self.hf_config.image_token_id)
            placeholders = sum(t == self.hf_config.image_token_id for t in prompt["prompt_token_ids"])
            if placeholders != len(images):
                raise ValueError(f"request {request.uid!r}: {len(images)} images but {placeholders} image "
                                 "placeholders in prompt_ids")
            prompt["multi_modal_data"] = {"image": images[0] if len(images) == 1 else images}
        return prompt

    def _trajectory(self, request: RolloutRequest, sample: int, completion: Any, stop: set[int]) -> Trajectory:
        ids = [int(t) for t in completion.token_ids]
        if completion.logprobs is None or len(completion.logprobs) != len(ids):
            raise RuntimeError(f"vLLM returned no log-prob per token for {request.uid!r}")
        logprobs = [float(step[tok].logprob) for step, tok in zip(completion.logprobs, ids)]
        reason = completion.finish_reason
        if reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended request {request.uid!r} with {reason!r}")
        stopped = reason == "stop" and bool(ids) and ids[-1] in stop
        text_ids = ids[:-1] if stopped else ids
        return Trajectory(uid=request.uid, sample_index=sample, prompt_ids=list(request.prompt_ids),
                          response_ids=ids, logprobs=torch.tensor(logprobs, dtype=torch.float32),
                          finish_reason="stop" if stopped else "length",
                          text=self.tokenizer.decode(text_ids, skip_special_tokens=True))

    # ---- weights ----
    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")

    def weight_stream(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> WeightStream:
        """The bucketed stream update_weights feeds the engine (sizes from rollout.vllm.sync_bucket_mb)."""
        return WeightStream(named_tensors, self.settings.sync_bucket_mb * 2**20, self._device(),
                            torch_dtype(self.settings.dtype), self.tied)

    def _load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        if self._asleep:
            self.wake_up()
        stream = self.weight_stream(named_tensors)
        start = time.perf_counter()
        self.llm.collective_rpc(_reload, args=(stream,))
        # Cached KV blocks and image embeddings were computed with the old weights.
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        expected = self._expected_names()
        missing = sorted(expected - set(stream.names))
        if missing:
            # vLLM's layer-wise reload leaves unloaded weights unset: this engine cannot be used.
            self.close()
            raise EngineStateError(f"weight push lacked {len(missing)} tensors (e.g. {missing[0]}); the vLLM "
                                   "engine is closed")
        self.last_sync = {"seconds": time.perf_counter() - start, "bytes": float(stream.bytes),
                          "buckets": float(stream.buckets), "peak_bucket_bytes": float(stream.peak_bucket_bytes)}
        return stream.bytes

    def _expected_names(self) -> set[str]:
        """HF names in the folder's safetensors (lm_head excluded when tied): what a push must cover."""
        if not hasattr(self, "_expected"):
            from safetensors import safe_open

            names: set[str] = set()
            for file in sorted(Path(self.hf_path).glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    names.update(f.keys())
            if self.tied:
                names.discard("lm_head.weight")
            self._expected = names
        return self._expected

    # ---- memory ----
    def sleep(self) -> None:
        """GPU: vLLM sleep mode (level rollout.vllm.sleep_level) frees KV cache and weights; CPU: nothing to free."""
        super().sleep()
        if self.on_gpu and self.settings.sleep_level > 0:
            self.llm.sleep(level=self.settings.sleep_level)
        elif not self._slept_once:
            log.info("vLLM engine: sleep() is a no-op on CPU (sleep mode needs CUDA); memory stays allocated")
        self._slept_once = True

    def wake_up(self) -> None:
        """Re-allocate what sleep() freed (weights are reloaded by the next push at level 2)."""
        if self._asleep and self.on_gpu and self.settings.sleep_level > 0:
            self.llm.wake_up()
        super().wake_up()

    def close(self) -> None:
        """Shut the engine down now (while the process groups it uses still exist) and drop it."""
        if self.llm is not None:
            # vLLM otherwise shuts down from a finalizer at interpreter exit, after torch.distributed's teardown.
            self.llm.llm_engine.engine_core.shutdown()
        super().close()
        self.llm = None
