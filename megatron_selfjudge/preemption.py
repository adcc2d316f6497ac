"""Run-control guards every rank agrees on: preemption signals and non-finite steps.

Preemption. Slurm sends SIGTERM before it kills a job (and, with ``#SBATCH --signal=USR1@120``,
SIGUSR1 a chosen time earlier). `PreemptionHandler` turns either signal into a flag instead of
dying mid-step; the trainer polls `should_stop()` once per step, at the same point on every rank
(it is a collective), then saves a checkpoint and exits 0::

    with PreemptionHandler() as preemption:
        for step in ...:
            ...one step, metrics written...
            if preemption.should_stop():
                save_checkpoint(...)
                return 0

The signal may reach only some ranks (Slurm signals the launcher, which forwards it unevenly), so
`should_stop` takes the MAX of the flag over all ranks: every rank stops at the same step.

Non-finite steps. megatron-core's optimizer.step() returns (update_successful, grad_norm,
num_zeros). Only with fp16 loss scaling does it look for inf/NaN gradients (found_inf, all-reduced
over the model-parallel group) and skip the update, returning (False, None, None). With fp32
params (FP32Optimizer) or bf16 without a loss scale it never checks: a NaN gradient yields a NaN
grad_norm, the clip coefficient ``max_norm / nan`` fails its ``< 1`` test, and Adam writes NaN into
the weights and moments, all inside step(). So the check must run BEFORE optimizer.step(), on the
gradients megatron's DDP has already reduced::

    metrics = forward_backward(...)                      # grads in the DDP buffers
    if not is_finite_step(metrics["loss"], model=ddp_model):
        ddp_model.zero_grad_buffer(); optimizer.zero_grad()
        log a warning, count the skipped step, move on    # weights and Adam state untouched
    else:
        ok, grad_norm, _ = optimizer.step()              # ok is False only for fp16 overflow
"""
from __future__ import annotations

import math
import signal
import threading
from types import FrameType
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from megatron_selfjudge.runtime.ranks import any_rank

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

Number = Union[float, int, torch.Tensor, None]


class PreemptionHandler:
    """Context manager: SIGTERM/SIGUSR1 set a stop flag (no exit); previous handlers come back on exit."""

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS, group: Any = None):
        signals = tuple(signals)
        if not signals:
            raise ValueError("signals must name at least one signal")
        for sig in signals:
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                raise ValueError(f"signal {signal.Signals(sig).name} cannot be caught")
        self.signals = signals
        self.group = group
        self._received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        # Only record: a signal handler runs between two bytecodes of the training loop.
        self._received = signum

    def __enter__(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler must be entered in the main thread (Python delivers "
                               "signals to the main thread only)")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            # None means the previous handler was not installed from Python; the default is the best match.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    @property
    def received(self) -> Optional[str]:
        """Name of the signal this rank received (None if none): local, no communication."""
        return None if self._received is None else signal.Signals(self._received).name

    def should_stop(self) -> bool:
        """Whether any rank received a stop signal; a collective, so call it at the same point on every rank."""
        return any_rank(self._received is not None, self.group)


def _is_finite_number(value: Number) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isfinite(value)
    raise TypeError(f"loss and grad_norm must be numbers, tensors or None, got {type(value).__name__}")


def _grads_are_finite(model: Union[torch.nn.Module, Iterable[torch.nn.Module]]) -> bool:
    """Whether every local gradient (megatron's main_grad buffer, else .grad) of the model(s) is finite."""
    modules = [model] if isinstance(model, torch.nn.Module) else list(model)
    checks = []
    for module in modules:
        for param in module.parameters():
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            if grad is not None:
                checks.append(torch.isfinite(grad).all())
    # One host sync for the whole model instead of one per parameter.
    return not checks or bool(torch.stack(checks).all())


def is_finite_step(loss: Number, grad_norm: Number = None, *, model: Any = None, group: Any = None) -> bool:
    """False when the loss, grad_norm or any gradient of `model` is inf/NaN on any rank; a collective.

    Call it after backward and BEFORE optimizer.step() (see the module docstring): megatron's step
    does not skip non-finite fp32/bf16 updates. With the distributed optimizer every rank's local
    buffer is scanned, so a NaN is seen wherever it sits after the reduce-scatter.
    """
    local_ok = _is_finite_number(loss) and _is_finite_number(grad_norm)
    if local_ok and model is not None:
        local_ok = _grads_are_finite(model)
    return not any_rank(not local_ok, group)
