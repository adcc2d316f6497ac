"""Next-token sampling shared by the rollout backends: temperature, top-p, greedy, log-probs.

All maths is in float32 whatever the logits' dtype. The returned log-prob of a token is
log softmax(logits / temperature) over the full vocabulary, not over the top-p nucleus: that is
the quantity the policy loss recomputes from the training forward, so old and new log-probs agree.

Seeds are per sample: `row_seed(seed, uid, sample_index)` seeds one CPU generator per sampled
sequence, which draws one uniform number per token (inverse-CDF sampling). A sample therefore
depends only on (seed, uid, sample index, weights), not on which batch, rank or device draws it:
a run sharded over data-parallel ranks samples what one process would.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence, Union

import torch

Generators = Union[torch.Generator, Sequence[Optional[torch.Generator]]]


def row_seed(seed: int, uid: str, sample: int) -> int:
    """A 63-bit seed for sample `sample` of request `uid` (the same whatever batch or rank draws it)."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{uid}\x00{int(sample)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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


def _uniforms(generator: Generators, rows: int, device: torch.device) -> torch.Tensor:
    """[rows] float64 uniforms in [0, 1): one per row from its own generator, or all from one."""
    if isinstance(generator, torch.Generator):
        return torch.rand(rows, generator=generator, dtype=torch.float64, device=generator.device).to(device)
    if len(generator) != rows:
        raise ValueError(f"{len(generator)} generators for {rows} rows")
    # None: a row that takes no token at this step (it is still reading its prompt, or done) draws
    # nothing, so each sample's stream advances once per token it generates.
    draws = [torch.zeros((), dtype=torch.float64) if g is None else
             torch.rand((), generator=g, dtype=torch.float64, device=g.device).to("cpu") for g in generator]
    return torch.stack(draws).to(device)


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    greedy: bool,
    generator: Optional[Generators],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of logits [B, V]; return (int64 tokens [B], fp32 log-probs [B]).

    `generator` is one generator for the batch or one per row (per-sample seeds; None for a row
    whose token is not used at this step).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {list(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    scaled = logits.float() / temperature
    if greedy:
        # argmax is unchanged by the temperature; ties go to the lowest id on every backend.
        tokens = torch.argmax(scaled, dim=-1)
    else:
        if generator is None:
            raise ValueError("sampling needs a generator (or one per row)")
        probs = torch.softmax(filter_top_p(scaled, top_p), dim=-1)
        # Inverse CDF: the first token whose cumulative mass exceeds u * total mass. float64 keeps
        # the cumulative sum exact enough over a 150k vocabulary; right=True never picks a zero-mass
        # (filtered) token.
        cdf = probs.double().cumsum(dim=-1)
        target = _uniforms(generator, logits.shape[0], logits.device) * cdf[:, -1]
        tokens = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
        tokens = tokens.clamp_(max=logits.shape[-1] - 1)
    logprobs = torch.log_softmax(scaled, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, logprobs
