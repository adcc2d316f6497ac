"""CPU runtime for megatron-core 0.16.1: redirect its CUDA-only calls so it runs under gloo.

megatron-core assumes a GPU in a few dozen places that have nothing to do with the maths
(device literals, RNG bookkeeping, timers). `activate()` rebinds those module attributes to CPU
equivalents when CUDA is absent; it never edits installed files and is a no-op on a GPU machine.
Every patch targets the exact megatron-core version below, so any other version is refused.

Patches (each: what -> why):
- torch.cuda.current_device -> "cpu": used as `device=` for buffers (TP all-gather, p2p shapes,
  rotary freqs, DDP grad buffers); on CPU the device is simply "cpu".
- torch.cuda.get_rng_state / set_rng_state / manual_seed -> torch CPU RNG: the RNG tracker and
  `model_parallel_cuda_manual_seed` seed and save "the GPU generator"; on CPU that is the
  default CPU generator, which is also the one CPU dropout and init draw from.
- tensor_parallel.random._get_cuda_rng_state / _set_cuda_rng_state -> CPU RNG state: the tracker's
  fork() swaps states through these, which call CUDA generators directly.
- logger filter on tensor_parallel.random: fork() warns when the CPU RNG moves inside a GPU
  RNG region; on CPU both are the same generator, so the warning is always a false alarm.
- torch.cuda.synchronize / empty_cache -> no-op: nothing asynchronous or cached to flush on CPU.
- torch.cuda.Event -> a timing event on the host clock: timers and p2p code record events.
- Tensor.cuda -> Tensor.to("cpu") (a no-op copy): CLIP ViT's position ids, the optimizer's state
  reload and the generation controller move tensors with `.cuda()`.
- module-global `torch` in pipeline_parallel.schedules, optimizer.{optimizer,clip_grads,grad_scaler},
  tensor_parallel.data and megatron.core.utils -> a view of torch whose tensor factories map
  device "cuda" to "cpu": they create token counters, norm and overflow buffers, loss scales and
  broadcast sizes with `device="cuda"` literals.
- transformer.utils / fusions.fused_softmax get_default_causal_mask and
  get_sliding_window_causal_mask -> CPU versions: the masks are built with `device="cuda"`.
- optimizer.optimizer.clip_grad_by_total_norm_fp32 -> the same scaling without its
  `grad.type() == "torch.cuda.FloatTensor"` assertion, which CPU grads ("torch.FloatTensor") fail.
- DistributedOptimizer.__init__ and Float16OptimizerWithFloat16Params.__init__ -> run with
  `Tensor.type()` naming CPU tensors as their CUDA types ("torch.FloatTensor" ->
  "torch.cuda.FloatTensor"), only for the duration of those constructors: they sort parameters
  into fp32 / fp16 / bf16 groups by that string and reject anything else.
- CLIPViTModel.__init__ default ln_pre_impl / ln_post_impl -> WrappedTorchNorm: without
  Transformer Engine the default is torch.nn.LayerNorm, which rejects the `config=` keyword
  build_module passes.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
import types
from typing import Any, Callable

import torch

EXPECTED_MEGATRON_CORE = "0.16.1"

_ACTIVE = False
_CUDA_STRINGS = ("cuda",)


def installed_megatron_core_version() -> str:
    """Version string of the installed megatron-core."""
    from megatron.core import package_info

    return package_info.__version__


def is_active() -> bool:
    """Whether the CPU patches are in place in this process."""
    return _ACTIVE


def activate() -> bool:
    """Patch megatron-core for CPU use; idempotent; returns True when patches are in place."""
    global _ACTIVE
    if torch.cuda.is_available():
        return False
    if _ACTIVE:
        return True
    version = installed_megatron_core_version()
    if version != EXPECTED_MEGATRON_CORE:
        raise RuntimeError(
            f"megatron_selfjudge.megatron.cpu supports megatron-core {EXPECTED_MEGATRON_CORE} only, "
            f"but megatron-core {version} is installed; install megatron-core=={EXPECTED_MEGATRON_CORE} "
            "or run on a CUDA machine"
        )
    _patch_torch_cuda()
    _patch_rng_tracker()
    _patch_device_literals()
    _patch_masks()
    _patch_clip_vit_norm()
    _patch_grad_clipping()
    _patch_optimizer_type_checks()
    _ACTIVE = True
    return True


def _to_cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (string, torch.device or index) to "cpu"; leave others alone."""
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    if isinstance(device, str) and device.split(":")[0] in _CUDA_STRINGS:
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return "cpu"
    return device


class _HostEvent:
    """Stand-in for torch.cuda.Event that records host time, for megatron's timers."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._t: float | None = None

    def record(self, stream: Any = None) -> None:
        self._t = time.perf_counter()

    def synchronize(self) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_HostEvent") -> float:
        if self._t is None or end._t is None:
            raise RuntimeError("elapsed_time needs both events recorded")
        return (end._t - self._t) * 1000.0


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _cpu_tensor_cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **kwargs: Any):
    return self.to("cpu", non_blocking=non_blocking)


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.cuda.synchronize = _noop
    torch.cuda.empty_cache = _noop
    torch.cuda.Event = _HostEvent
    torch.Tensor.cuda = _cpu_tensor_cuda


class _RandomFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    logging.getLogger(mrandom.__name__).addFilter(_RandomFilter())


def _factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapped


def _cpu_torch_view() -> types.ModuleType:
    """A module that forwards to torch but whose tensor factories turn device "cuda" into "cpu"."""
    view = types.ModuleType("torch_cpu_view")
    view.__dict__.update(torch.__dict__)
    for name in ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like",
                 "empty_like", "full_like", "randn", "rand", "randint"):
        setattr(view, name, _factory(getattr(torch, name)))
    return view


def _patch_device_literals() -> None:
    import megatron.core.utils as mutils
    from megatron.core.optimizer import clip_grads, grad_scaler
    from megatron.core.optimizer import optimizer as moptimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import data as tp_data

    view = _cpu_torch_view()
    for module in (schedules, moptimizer, clip_grads, grad_scaler, tp_data, mutils):
        module.torch = view


def _patch_masks() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    def causal(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    def sliding(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
        m = torch.ones(sq, skv, dtype=torch.bool)
        mu = torch.triu(m, diagonal=skv - sq - window_size[0])
        return ~torch.tril(mu, diagonal=skv - sq + window_size[1])

    for module in (tutils, fused_softmax):
        module.get_default_causal_mask = causal
        module.get_sliding_window_causal_mask = sliding


def _patch_clip_vit_norm() -> None:
    from megatron.core.models.vision import clip_vit_model
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original = clip_vit_model.CLIPViTModel.__init__

    @functools.wraps(original)
    def init(self, transformer_config, transformer_layer_spec, ln_pre_impl=WrappedTorchNorm,
             ln_post_impl=WrappedTorchNorm, *args, **kwargs):
        original(self, transformer_config, transformer_layer_spec, ln_pre_impl, ln_post_impl,
                 *args, **kwargs)

    clip_vit_model.CLIPViTModel.__init__ = init


def _clip_grad_by_total_norm_cpu(parameters: Any, max_norm: float, total_norm: float,
                                 use_decoupled_grad: bool = False) -> None:
    """megatron's clip_grad_by_total_norm_fp32 for CPU grads: scale by max_norm / total_norm."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    for grad in grads:
        if grad.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"gradient clipping expects fp32/bf16 grads, got {grad.dtype}")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for grad in grads:
            grad.detach().mul_(clip_coeff)


def _patch_grad_clipping() -> None:
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer

    moptimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu


@contextlib.contextmanager
def _cuda_type_names():
    """Within the block, `tensor.type()` of a CPU tensor reports the matching torch.cuda type name."""
    original = torch.Tensor.type

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapped


def _patch_optimizer_type_checks() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for cls in (DistributedOptimizer, Float16OptimizerWithFloat16Params):
        cls.__init__ = _with_cuda_type_names(cls.__init__)
