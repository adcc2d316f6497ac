"""Next-token sampling shared by the rollout backends: temperature, top-p, greedy, log-probs.

All maths is in float32 whatever the logits' dtype. The returned log-prob of a token is
log softmax(logits / temperature) over the full vocabulary, not over the top-p nucleus: that is
the quantity the policy loss recomputes from the training forward, so old and new log-probs agree.
"""
from __future__ import annotations

from typing import Optional

import torch


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed` (one per generate() call)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits [B, V] with -inf outside the nucleus: the fewest top tokens whose mass reaches top_p."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_p >= 1.0:
        # A cumulative sum can exceed 1.0 by rounding; filtering at 1.0 would drop tail tokens.
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Mass strictly before each token: a token is kept while that mass is below top_p, so the
    # most likely token is always kept and the nucleus is the smallest set reaching top_p.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    greedy: bool,
    generator: Optional[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of logits [B, V]; return (int64 tokens [B], fp32 log-probs [B])."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {list(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    scaled = logits.float() / temperature
    if greedy:
        # argmax is unchanged by the temperature; ties go to the lowest id on every backend.
        tokens = torch.argmax(scaled, dim=-1)
    else:
        probs = torch.softmax(filter_top_p(scaled, top_p), dim=-1)
        tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    logprobs = torch.log_softmax(scaled, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, logprobs
