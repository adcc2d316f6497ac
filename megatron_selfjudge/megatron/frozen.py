"""Frozen copies of the initial policy: the reference model and the Judge.

A frozen copy is built by the policy's own builder on the same TP/PP layout (so its shards line
up with the policy's), receives the policy's weights, never takes gradients and stays in eval
mode. Between uses it can be offloaded: parameters and buffers move to host memory (pinned when
a GPU is present, so the copy back is fast) and the accelerator holds only the policy, which is
how one GPU fits policy + reference + Judge for a 7B model.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from megatron_selfjudge.megatron.batching import PolicyBatch
from megatron_selfjudge.megatron.forward import compute_logprobs, unwrap_model


class FrozenModel:
    """A no-grad, eval-mode megatron model with explicit offload()/onload() between uses.

    With `offload_between_uses`, `use()` brings the weights in for a block and sends them back to
    host memory after it (the trainer does this around the reference and Judge stages on GPU).
    """

    def __init__(self, module: torch.nn.Module, offload_between_uses: bool = False):
        self.module = module
        self.device = next(module.parameters()).device
        self.offload_between_uses = offload_between_uses
        self._offloaded = False
        module.eval()
        for param in module.parameters():
            param.requires_grad_(False)

    @property
    def offloaded(self) -> bool:
        """Whether the weights currently live in host memory."""
        return self._offloaded

    def _tensors(self) -> Iterator[torch.Tensor]:
        yield from self.module.parameters()
        yield from (b for b in self.module.buffers() if b is not None)

    def offload(self) -> None:
        """Move parameters and buffers to host memory (pinned with CUDA); a no-op when already there."""
        if self._offloaded:
            return
        pin = torch.cuda.is_available()
        for tensor in self._tensors():
            host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            host.copy_(tensor.data)
            tensor.data = host
        self._offloaded = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # actually return the freed blocks to the other models

    def onload(self) -> None:
        """Move parameters and buffers back to the device the copy was built on."""
        if not self._offloaded:
            return
        for tensor in self._tensors():
            tensor.data = tensor.data.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._offloaded = False

    @contextlib.contextmanager
    def use(self) -> Iterator["FrozenModel"]:
        """The weights on their device for the block; offloaded again after it when offloading between uses."""
        self.onload()
        try:
            yield self
        finally:
            if self.offload_between_uses:
                self.offload()

    def logprobs(self, batch: PolicyBatch, **kwargs) -> torch.Tensor:
        """forward.compute_logprobs with this model (reference log-probs, likelihood-judge scores)."""
        if self._offloaded:
            raise RuntimeError("this frozen model is offloaded to host memory; call onload() first")
        return compute_logprobs(self.module, batch, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward of the wrapped module (refused while offloaded)."""
        if self._offloaded:
            raise RuntimeError("this frozen model is offloaded to host memory; call onload() first")
        with torch.no_grad():
            return self.module(*args, **kwargs)


def frozen_copy(policy: torch.nn.Module, build: Callable[[], torch.nn.Module],
                offload_between_uses: bool = False) -> FrozenModel:
    """A FrozenModel holding `policy`'s current weights, built by `build()` (the policy's builder).

    `build` must create the same architecture on this rank's TP/PP stage (e.g. a functools.partial
    of models.build_tiny_llava with the policy's arguments); weights are then copied exactly.
    """
    source = unwrap_model(policy)
    module = build()
    if type(module) is not type(source):
        raise TypeError(f"build() made a {type(module).__name__}, the policy is a {type(source).__name__}")
    target_state, source_state = module.state_dict(), source.state_dict()
    differing = sorted(set(target_state) ^ set(source_state))
    if differing:
        raise ValueError(f"build() does not match the policy's layout; differing keys: {differing[:5]}")
    for name, value in target_state.items():
        if isinstance(value, torch.Tensor) and value.shape != source_state[name].shape:
            raise ValueError(f"{name}: shape {tuple(value.shape)} != policy's {tuple(source_state[name].shape)}")
    module.load_state_dict(source_state, strict=True)  # copies: the policy's storage is not shared
    frozen = FrozenModel(module, offload_between_uses)
    if offload_between_uses:
        frozen.offload()
    return frozen
