"""The GRPO loss hyper-parameters and their checks: the one definition the reference and the kernels share.

``megatron_selfjudge/loss.py`` (the plain-PyTorch oracle and the loss-implementation registry)
and the Triton ops (``grpo_loss.py``, ``fused_linear_grpo.py``) all import from here, and this
module imports neither, so there is no import cycle between the reference and the kernels.
Nothing here needs Triton.

The defaults of the configurable hyper-parameters are read from the config dataclasses
(``config.LossConfig`` and the sampling temperature of ``config.RolloutConfig``), their one
source; the public loss functions take them as ``**hyper`` keywords and build a ``LossParams``,
so no signature restates them.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

from megatron_selfjudge.config import LossConfig, RolloutConfig

LOGRATIO_CLAMP = 20.0  # |log-ratio| bound before exp, for both the ratio and the k3 KL
KL_CLAMP = 10.0  # |k3| bound


def check_temperature(temperature: float) -> None:
    """Raise ValueError unless temperature is a finite number > 0."""
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def check_loss_args(eps_low, eps_high, dual_clip, beta_kl, logratio_clamp, kl_clamp) -> None:
    """Raise ValueError naming the first out-of-range loss hyper-parameter."""
    if not 0 <= eps_low < 1:
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low!r}")
    if not eps_high >= 0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high!r}")
    if not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip!r}")
    if not beta_kl >= 0:
        raise ValueError(f"beta_kl must be >= 0, got {beta_kl!r}")
    if not (logratio_clamp > 0 and kl_clamp > 0):
        raise ValueError(f"logratio_clamp and kl_clamp must be > 0, got {logratio_clamp!r}, {kl_clamp!r}")


def _default(cls: type, name: str) -> float:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


class LossParams(NamedTuple):
    """Hyper-parameters of the per-token loss; defaults are the config's (docs/method.md)."""

    temperature: float = _default(RolloutConfig, "temperature")
    eps_low: float = _default(LossConfig, "eps_low")
    eps_high: float = _default(LossConfig, "eps_high")
    dual_clip: float = _default(LossConfig, "dual_clip")
    beta_kl: float = _default(LossConfig, "beta_kl")
    logratio_clamp: float = LOGRATIO_CLAMP
    kl_clamp: float = KL_CLAMP

    def check(self) -> "LossParams":
        """Raise ValueError naming the first bad value; returns self."""
        check_temperature(self.temperature)
        check_loss_args(self.eps_low, self.eps_high, self.dual_clip, self.beta_kl, self.logratio_clamp,
                        self.kl_clamp)
        return self

    @classmethod
    def of(cls, hyper: dict) -> "LossParams":
        """Checked LossParams from keyword arguments; an unknown name raises TypeError naming it."""
        unknown = sorted(set(hyper) - set(cls._fields))
        if unknown:
            raise TypeError(f"unknown loss hyper-parameter(s) {unknown}; known: {list(cls._fields)}")
        return cls(**hyper).check()
