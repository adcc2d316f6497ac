"""The rollout engine interface: what the trainer asks for and what every backend returns.

Backend-neutral on purpose: nothing here imports megatron-core or vLLM, so a vLLM backend can
implement the same contract. Backends are looked up by name (`rollout.backend`); the built-in
ones are imported lazily so that choosing one never imports another's dependencies.
"""
from __future__ import annotations

import abc
import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

__all__ = [
    "FINISH_REASONS", "EngineStateError", "RolloutEngine", "RolloutRequest", "SamplingConfig", "Trajectory",
    "available_engines", "build_engine", "build_engine_for", "check_requests", "default_stop_ids", "register_engine",
]

FINISH_REASONS = ("stop", "length")

# name -> "module:attribute"; imported on first use so `build_engine("megatron")` is the only
# thing that pulls in megatron-core.
_BUILTIN_ENGINES: dict[str, str] = {
    "megatron": "megatron_selfjudge.rollout.megatron_engine:MegatronRolloutEngine",
    "vllm": "megatron_selfjudge.rollout.vllm_engine:VllmRolloutEngine",
}
_REGISTERED_ENGINES: dict[str, Callable[..., "RolloutEngine"]] = {}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample: G = n samples per prompt, temperature/top-p or greedy, stop ids and seed.

    Generation always stops at the tokenizer's EOS as well as at any id in `stop_token_ids`.
    `temperature` also scales the returned log-probs (log softmax(logits / temperature)), even
    when `greedy` is set, so they match the training loss's temperature-scaled log-probs.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0
    greedy: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) \
                or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        stop = tuple(self.stop_token_ids)
        if not all(_is_int(t) and t >= 0 for t in stop):
            raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", stop)
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if not isinstance(self.greedy, bool):
            raise TypeError(f"greedy must be a bool, got {type(self.greedy).__name__}")


@dataclass
class RolloutRequest:
    """One prompt: a uid that groups its G samples, prompt token ids and optional images.

    `images` is a float tensor of preprocessed pixels ([C, H, W] or [num_images, C, H, W], one
    image per image placeholder in `prompt_ids`) or a list of PIL images for a backend that has an
    image processor; None for text-only prompts.
    """

    uid: str
    prompt_ids: list[int]
    images: Any = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.uid, str) or not self.uid:
            raise ValueError(f"uid must be a non-empty str, got {self.uid!r}")
        if isinstance(self.prompt_ids, torch.Tensor):
            if self.prompt_ids.dim() != 1:
                raise ValueError(f"prompt_ids of {self.uid!r}: expected a 1-D tensor")
            self.prompt_ids = [int(t) for t in self.prompt_ids.tolist()]
        self.prompt_ids = list(self.prompt_ids)
        if not self.prompt_ids:
            raise ValueError(f"prompt_ids of {self.uid!r} is empty")
        # Negative ids are allowed: some models mark image positions with one (LLaVA uses -200);
        # each backend checks the ids against its own vocabulary.
        if not all(_is_int(t) for t in self.prompt_ids):
            raise ValueError(f"prompt_ids of {self.uid!r} must be ints")


@dataclass
class Trajectory:
    """One sampled response: ids, text, per-token log-probs and why it ended.

    `response_ids` includes the stop token when `finish_reason == "stop"` (so the policy is
    trained to stop); `text` is the decoded response without stop/special tokens. `logprobs` is a
    float32 tensor with one entry per response id: log softmax(logits / temperature) of that id.
    """

    uid: str
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: torch.Tensor
    finish_reason: str
    text: str

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
        if self.logprobs.dtype != torch.float32 or self.logprobs.shape != (len(self.response_ids),):
            raise ValueError(
                f"logprobs of {self.uid!r}: expected float32 [{len(self.response_ids)}], "
                f"got {self.logprobs.dtype} {list(self.logprobs.shape)}"
            )


def check_requests(requests: Sequence[RolloutRequest]) -> None:
    """Raise if requests is empty, holds a non-request, or repeats a uid (uids key the groups)."""
    if isinstance(requests, RolloutRequest) or not isinstance(requests, Sequence):
        raise TypeError("requests must be a sequence of RolloutRequest")
    if not requests:
        raise ValueError("requests is empty")
    seen: set[str] = set()
    for i, req in enumerate(requests):
        if not isinstance(req, RolloutRequest):
            raise TypeError(f"requests[{i}] is {type(req).__name__}, expected RolloutRequest")
        if req.uid in seen:
            raise ValueError(f"requests: uid {req.uid!r} appears twice; uids must be unique")
        seen.add(req.uid)


class EngineStateError(RuntimeError):
    """The engine was asked to generate while asleep, closed, or on weights older than the policy's."""


class RolloutEngine(abc.ABC):
    """A backend that samples G responses per prompt from the current policy.

    Life cycle, driven by the trainer's weight-sync stage (rollout/weight_sync.py):
    `update_weights(named_tensors, version)` after every policy update (HF-named tensors, streamed
    in buckets; None for an engine that reads the trainer's own parameters, `shares_weights`),
    `sleep()` to free the engine's memory while the trainer updates and `wake_up()` before the
    next rollout, `close()` at the end. `weights_version` is the version last loaded; the stage
    refuses to roll out when it differs from the policy's.
    """

    #: True when generate() reads the trainer's parameters in place: update_weights gets None.
    shares_weights: bool = False
    _weights_version: int = 0
    _asleep: bool = False
    _closed: bool = False

    @abc.abstractmethod
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig) -> list[Trajectory]:
        """Sample `sampling.n` trajectories per request, ordered by request then sample index."""

    def _load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load HF-named tensors into the engine's copy of the policy; return the bytes loaded.

        Every engine that does not share the trainer's weights implements it.
        """
        raise NotImplementedError(f"{type(self).__name__} neither shares the trainer's weights nor loads them")

    def update_weights(self, named_tensors: Optional[Iterable[tuple[str, torch.Tensor]]], version: int) -> int:
        """Take the policy's weights of `version` (a non-decreasing int); returns the bytes received."""
        self._check_open()
        if not _is_int(version) or version < self._weights_version:
            raise ValueError(f"weights version {version!r} is older than the loaded {self._weights_version}")
        if self.shares_weights:
            if named_tensors is not None:
                raise ValueError(f"{type(self).__name__} shares the trainer's weights: pass named_tensors=None")
            loaded = 0
        else:
            if named_tensors is None:
                raise ValueError(f"{type(self).__name__} holds its own weights: pass the named tensors")
            loaded = self._load_weights(named_tensors)
        self._weights_version = version
        return loaded

    @property
    def weights_version(self) -> int:
        """Version of the weights the next generate() uses."""
        return self._weights_version

    def sleep(self) -> None:
        """Free what the engine holds between rollouts (KV cache, its weight copy); wake_up() restores it."""
        self._check_open()
        self._asleep = True

    def wake_up(self) -> None:
        """Undo sleep() before the next generate()."""
        self._check_open()
        self._asleep = False

    def close(self) -> None:
        """Release the engine for good; any later call raises EngineStateError."""
        self._closed = True

    def check_ready(self, version: Optional[int] = None) -> None:
        """Raise EngineStateError unless the engine is open, awake and (if given) holds `version`."""
        self._check_open()
        if self._asleep:
            raise EngineStateError(f"{type(self).__name__} is asleep: call wake_up() before generate()")
        if version is not None and version != self._weights_version:
            raise EngineStateError(f"{type(self).__name__} holds weights version {self._weights_version}, the "
                                   f"policy is at {version}: push the weights (update_weights) first")

    def _check_open(self) -> None:
        if self._closed:
            raise EngineStateError(f"{type(self).__name__} is closed")


def register_engine(name: str, factory: Callable[..., RolloutEngine]) -> None:
    """Add a backend under `name` (e.g. from a plugin); refuses to shadow an existing name."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if name in _BUILTIN_ENGINES or name in _REGISTERED_ENGINES:
        raise ValueError(f"rollout backend {name!r} is already registered")
    if not callable(factory):
        raise TypeError("factory must be callable")
    _REGISTERED_ENGINES[name] = factory


def available_engines() -> list[str]:
    """Names accepted by build_engine."""
    return sorted(set(_BUILTIN_ENGINES) | set(_REGISTERED_ENGINES))


def _factory(name: str) -> Callable[..., RolloutEngine]:
    if name in _REGISTERED_ENGINES:
        return _REGISTERED_ENGINES[name]
    if name not in _BUILTIN_ENGINES:
        raise ValueError(f"rollout.backend: unknown backend {name!r}; known backends: {available_engines()}")
    module_name, attr = _BUILTIN_ENGINES[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


def build_engine(name: str, **kwargs: Any) -> RolloutEngine:
    """Construct the backend registered under `name` with its keyword arguments."""
    return _factory(name)(**kwargs)


def build_engine_for(name: str, cfg: Any, **kwargs: Any) -> RolloutEngine:
    """The backend of a run: a factory with `from_config(cfg, **kwargs)` also reads its own config keys."""
    factory = _factory(name)
    from_config = getattr(factory, "from_config", None)
    return from_config(cfg, **kwargs) if callable(from_config) else factory(**kwargs)


def default_stop_ids(tokenizer: Optional[Any], sampling: SamplingConfig) -> tuple[int, ...]:
    """The stop set: `sampling.stop_token_ids` plus the tokenizer's EOS when it has one."""
    stop = list(sampling.stop_token_ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos not in stop:
        stop.append(int(eos))
    return tuple(stop)
