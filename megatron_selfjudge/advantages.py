"""Group-relative advantage estimators (docs/method.md, "Advantages"), in a registry keyed by name.

One group = one prompt's rollouts, keyed by a uid. Every estimator works in float64 on the
rewards of each group and returns fp32:

* ``grpo``:        (r - mean r) / (std r + eps), std the *sample* std (ddof = 1, torch.std's
                   default, as in verl and the papers' reference code).
* ``grpo_no_std``: r - mean r (Dr. GRPO).
* ``energy``:      e = r / T, A = e - logsumexp(e) (log of softmax(r/T)); ``center=True``
                   then subtracts the group mean, which equals (r - mean r) / T;
                   ``center=False`` adds log G instead, so A = log(G * softmax(r/T)_i), i.e.
                   mean_i exp(A_i) = 1 and A = 0 when all rewards tie.

A group whose rewards are all equal (every group of size 1 included) gets exactly 0, never a
rounding residue: it carries no preference between its rollouts.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_selfjudge.config import AdvantageConfig

FP32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class Groups:
    """Row -> group index with float64 group reductions broadcast back to rows."""

    index: torch.Tensor  # long [N]: group of each row
    size: torch.Tensor  # float64 [G]: rows per group

    @property
    def num_groups(self) -> int:
        """Number of distinct groups."""
        return int(self.size.shape[0])

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row sum of x over the row's group."""
        return torch.zeros(self.num_groups, dtype=x.dtype).index_add_(0, self.index, x)[self.index]

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row mean of x over the row's group."""
        return self.sum(x) / self.size[self.index]

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row max of x over the row's group."""
        return self._reduce(x, "amax")

    def min(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row min of x over the row's group."""
        return self._reduce(x, "amin")

    def _reduce(self, x: torch.Tensor, how: str) -> torch.Tensor:
        out = torch.zeros(self.num_groups, dtype=x.dtype)
        return out.scatter_reduce(0, self.index, x, how, include_self=False)[self.index]


Estimator = Callable[..., torch.Tensor]
ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    """Decorator adding ``fn(rewards_f64, groups, *, temperature, center, eps) -> f64 [N]`` under ``name``."""

    def add(fn: Estimator) -> Estimator:
        if name in ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ESTIMATORS[name] = fn
        return fn

    return add


@register_estimator("grpo")
def grpo(rewards: torch.Tensor, groups: Groups, *, eps: float, **_) -> torch.Tensor:
    """(r - mean) / (sample std + eps) within each group."""
    centered = rewards - groups.mean(rewards)
    # ddof = 1; size-1 groups are tied and zeroed by the caller, clamp only avoids 0/0 here.
    var = groups.sum(centered * centered) / (groups.size[groups.index] - 1).clamp(min=1)
    return centered / (var.sqrt() + eps)


@register_estimator("grpo_no_std")
def grpo_no_std(rewards: torch.Tensor, groups: Groups, **_) -> torch.Tensor:
    """r - mean within each group (Dr. GRPO)."""
    return rewards - groups.mean(rewards)


@register_estimator("energy")
def energy(rewards: torch.Tensor, groups: Groups, *, temperature: float, center: bool, **_) -> torch.Tensor:
    """Log-probability of each rollout under softmax(r / T) of its group, centred or shifted by log G."""
    # Shift by the group max first so exp never overflows; the -1e300 floor keeps the float64
    # group sums finite even when (r - max)/T is astronomically negative (tiny T).
    shifted = ((rewards - groups.max(rewards)) / temperature).clamp(min=-1e300)
    log_prob = shifted - torch.log(groups.sum(torch.exp(shifted)))
    if center:
        return log_prob - groups.mean(log_prob)
    return log_prob + torch.log(groups.size[groups.index])


def _group_index(group_ids, n: int) -> torch.Tensor:
    """Map uids (any hashables, or an integer tensor/array) to dense group indices [N]."""
    if isinstance(group_ids, np.ndarray) and group_ids.dtype.kind not in "iub":
        group_ids = group_ids.tolist()  # e.g. an array of uid strings
    if isinstance(group_ids, (torch.Tensor, np.ndarray)):
        ids = torch.as_tensor(group_ids)
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"group_ids tensor must be 1-D of integers, got {ids.dtype} shape {tuple(ids.shape)}")
        if ids.shape[0] != n:
            raise ValueError(f"group_ids has {ids.shape[0]} entries, rewards has {n}")
        return torch.unique(ids.cpu(), return_inverse=True)[1].long()
    if not isinstance(group_ids, Sequence) or isinstance(group_ids, (str, bytes)):
        raise TypeError(f"group_ids must be a sequence of hashables or an integer tensor, got {type(group_ids).__name__}")
    if len(group_ids) != n:
        raise ValueError(f"group_ids has {len(group_ids)} entries, rewards has {n}")
    dense: dict[Hashable, int] = {}
    try:
        index = [dense.setdefault(uid, len(dense)) for uid in group_ids]
    except TypeError as err:
        raise TypeError(f"group_ids entries must be hashable: {err}") from err
    return torch.tensor(index, dtype=torch.long)


def _as_rewards(rewards) -> torch.Tensor:
    if isinstance(rewards, (torch.Tensor, np.ndarray)):
        values = torch.as_tensor(rewards).detach().cpu().to(torch.float64)
    else:  # Python floats are float64: never round them through torch's fp32 default
        values = torch.as_tensor(rewards, dtype=torch.float64)
    if values.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("rewards must all be finite (found NaN or inf)")
    if values.numel() and float(values.abs().max()) > FP32_MAX:
        raise ValueError(f"rewards must lie within the fp32 range (|r| <= {FP32_MAX:.3e})")
    return values


def compute_advantages(
    rewards,
    group_ids,
    estimator: str,
    temperature: float = AdvantageConfig.temperature,
    center: bool = AdvantageConfig.center,
    eps: float = AdvantageConfig.eps,
) -> torch.Tensor:
    """Per-rollout advantages fp32 [N] from rewards [N] grouped by prompt uid (rows in any order).

    estimator: a name of ESTIMATORS; the keyword defaults are advantage.*'s.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; known: {sorted(ESTIMATORS)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    device = rewards.device if isinstance(rewards, torch.Tensor) else torch.device("cpu")
    values = _as_rewards(rewards)
    index = _group_index(group_ids, values.shape[0])
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    # Visit rows sorted by (group, reward) so every group reduction adds in the same order
    # whatever the input order: permuting the rows permutes the output bit for bit.
    order = torch.sort(values, stable=True).indices
    order = order[torch.sort(index[order], stable=True).indices]
    values, groups = values[order], Groups(index=index[order], size=torch.bincount(index).to(torch.float64))
    adv = ESTIMATORS[estimator](values, groups, temperature=temperature, center=center, eps=eps)
    tied = groups.max(values) == groups.min(values)
    adv = torch.where(tied, torch.zeros_like(adv), adv)
    # Saturate rather than overflow: an advantage beyond fp32 range is still "as large as fp32 holds".
    adv = adv.clamp(-FP32_MAX, FP32_MAX).to(torch.float32)
    return torch.empty_like(adv).index_copy_(0, order, adv).to(device)
