"""The weight-sync stage: after every policy update the rollout engine is told about the new weights.

The trainer counts policy versions (one per optimizer update) and calls `push(version)` at the end
of each step; `ensure_current(version)` right before a rollout refuses an engine that holds older
weights. For an engine that reads the trainer's parameters in place (`shares_weights`, the
in-process megatron engine) a push only records the version and moves no bytes; an engine with
its own copy (vLLM) gets the HF-named tensors that `export()` yields, one at a time, so host
memory holds at most one gathered tensor beyond what the exporter buffers.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

import torch

from megatron_selfjudge.rollout.base import RolloutEngine

NamedTensors = Iterable[tuple[str, torch.Tensor]]


class WeightSync:
    """Pushes policy weights of a given version into one rollout engine and times it."""

    def __init__(self, engine: RolloutEngine, export: Optional[Callable[[], NamedTensors]] = None):
        if not engine.shares_weights and export is None:
            raise ValueError(f"{type(engine).__name__} holds its own weights: the sync stage needs an exporter "
                             "(the model family's HF converter)")
        self.engine = engine
        self.export = export

    def release(self) -> None:
        """Before the policy update: the engine frees what it can (vLLM sleep mode on GPU); push() wakes it."""
        self.engine.sleep()

    def push(self, version: int) -> dict[str, float]:
        """Wake the engine and load the policy's weights of `version`; returns time_weight_sync and bytes."""
        start = time.perf_counter()
        self.engine.wake_up()
        sent = self.engine.update_weights(None if self.engine.shares_weights else self.export(), version)
        return {"time_weight_sync": time.perf_counter() - start, "weight_sync_bytes": float(sent)}

    def ensure_current(self, version: int) -> None:
        """Raise EngineStateError unless the engine is awake and holds weights of `version`."""
        self.engine.check_ready(version)
