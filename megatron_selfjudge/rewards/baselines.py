"""The literature's label-free baselines, as pure per-group functions (docs/method.md, "Rewards").

- soft agreement (EvoLMM): `r_i = (c(a_i) / G) ** gamma`, 0 without an answer;
- self-certainty (Intuitor): the mean over the response's tokens of KL(U || p_t), where U is
  uniform over the vocabulary and p_t the policy's next-token distribution at token t;
- negative entropy (RENT): minus the mean over the response's tokens of H(p_t);
- majority vote over more votes than trained samples (TTRL): the pseudo-label is the majority
  answer of all `rollout.vote_n` samples of a prompt, and the first `rollout.n` are trained on.

The per-token statistics come from the scoring forward pass (megatron/logprobs.py,
`vocab_parallel_token_stats`); this module turns them into per-response means.
`rewards/combine.py` registers the modes that use these functions.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_selfjudge.rewards.consistency import consistency_prior


def agreement_rewards(classes: Sequence[int | None], gamma: float) -> list[float]:
    """EvoLMM's soft agreement of one group: (c(a_i)/G) ** gamma; 0 for a row without an answer."""
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"agreement gamma must be a finite number > 0, got {gamma!r}")
    # A gate of 1.0 never binarises: the prior is then the plain answer frequency c(a_i)/G.
    return [p ** gamma if c is not None else 0.0 for p, c in zip(consistency_prior(classes, 1.0), classes)]


@dataclass(frozen=True)
class ResponseStats:
    """Per response (one entry per row): means over its tokens of the policy's token entropy and self-certainty."""

    entropy: list[float]
    self_certainty: list[float]

    def __post_init__(self) -> None:
        if len(self.entropy) != len(self.self_certainty):
            raise ValueError(f"ResponseStats: {len(self.entropy)} entropies but {len(self.self_certainty)} "
                             "self-certainties")
        for name, values in (("entropy", self.entropy), ("self_certainty", self.self_certainty)):
            for row, v in enumerate(values):
                if not (isinstance(v, (int, float)) and math.isfinite(v)):
                    raise ValueError(f"ResponseStats.{name}[{row}] must be a finite number, got {v!r}")

    def __len__(self) -> int:
        return len(self.entropy)


def response_means(values, mask) -> list[float]:
    """Mean of values [B, T] over each row's response tokens (mask [B, T]); a row without one is refused."""
    if tuple(values.shape) != tuple(mask.shape) or values.dim() != 2:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must both be [B, T]")
    values, valid = values.detach().cpu(), mask.detach().cpu().bool()
    counts = valid.sum(dim=1)
    if counts.numel() and int(counts.min()) == 0:
        row = int((counts == 0).nonzero()[0])
        raise ValueError(f"row {row} has no response token: its mean token statistic is undefined")
    total = values.double().masked_fill(~valid, 0.0).sum(dim=1)
    return (total / counts.clamp(min=1)).tolist()


def response_stats(entropy, self_certainty, mask) -> ResponseStats:
    """ResponseStats from the scoring pass's per-token entropy and self-certainty [B, T] and the loss mask."""
    return ResponseStats(response_means(entropy, mask), response_means(self_certainty, mask))
