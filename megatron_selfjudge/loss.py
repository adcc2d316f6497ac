"""GRPO policy loss: the plain-PyTorch reference (ALGORITHM.md section 6) and the loss-implementation registry.

Everything here is computed in fp32 whatever the logits' dtype (fp64 stays fp64, for
gradcheck) and written the way the formula reads, so it can serve as the oracle the Triton
kernels (kernels/grpo_loss.py, kernels/fused_linear_grpo.py) are tested against.

Definitions the kernels share:

* ``ratio = exp(clamp(logp - old_logp, -logratio_clamp, logratio_clamp))``; the clamp also
  stops the gradient outside that range (so does every clamp below).
* ``pg = max(-A*ratio, -A*clip(ratio, 1-eps_low, 1+eps_high))``, then for ``A < 0``
  ``pg = min(pg, -dual_clip*A)``.
* ``clipped`` is 1 where the max picked the clipped term *strictly*:
  ``-A*clip(ratio) > -A*ratio``, i.e. ``A > 0 and ratio > 1+eps_high`` or
  ``A < 0 and ratio < 1-eps_low``. ``A == 0`` is never clipped, and the dual clip
  (``A < 0 and ratio > dual_clip``) is NOT counted here (it is reported separately as the
  ``dual_clip_frac`` metric), matching the usual PPO ``clipfrac``.
* ``kl = clamp(exp(d) - d - 1, -kl_clamp, kl_clamp)`` with ``d = clamp(ref_logp - logp, ±logratio_clamp)``
  (the k3 estimator), 0 when ``ref_logp`` is None; ``loss = pg + beta_kl * kl``.

Metrics (``policy_loss``) are token-means over the valid tokens of *this call* (not global;
``valid_tokens`` is returned so callers can re-weight across micro-batches and ranks):
``pg_loss`` (mean pg), ``kl`` (mean k3), ``clip_frac``, ``dual_clip_frac``, ``entropy``, and
``ratio_min``/``ratio_max``; with no valid token the means are 0 and the ratio range is 1.

Aggregation is a weighted sum, ``loss = sum(per_token_loss * token_weights(...))``, with the
normaliser supplied by the caller so micro-batches and data-parallel ranks add up exactly.

The registry (``LOSS_IMPLS``, chosen by ``loss.impl``) is the one place that says how per-token
terms and forward-only log-probs are computed, for the update, for old/reference log-probs and
for ``policy_loss``:

* ``reference``: this module's PyTorch math on logits (megatron's vocab-parallel cross entropy
  and entropy when the vocabulary is sharded over tensor-parallel ranks);
* ``logits_kernel``: the Triton kernels of ``kernels/grpo_loss.py`` on logits;
* ``fused_linear``: ``kernels/fused_linear_grpo.py``, from the hidden states before the output
  layer and this rank's output weight, never materialising the [N, V] logits;
* ``auto``: ``logits_kernel`` for CUDA tensors when the entropy bonus is off, else ``reference``
  (Triton's CPU interpreter is ~1000x slower than eager; tests ask for the kernels by name).

The hyper-parameter checks and clamp defaults live in ``kernels/loss_params.py``, which both this
module and the kernels import (and which imports neither), so there is no import cycle.
"""
from __future__ import annotations

import abc
import importlib
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist

from megatron_selfjudge.kernels.loss_params import (  # noqa: F401 (re-exported: the public checks)
    KL_CLAMP,
    LOGRATIO_CLAMP,
    LossParams,
    check_loss_args,
    check_temperature,
)
from megatron_selfjudge.config import LossConfig

_LOSS_DEFAULTS = LossConfig()  # the one source of the keyword defaults below

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
ROLLOUT_CORRECTIONS = ("none", "token", "sequence")  # loss.rollout_correction
KERNEL_MODULE = "megatron_selfjudge.kernels.grpo_loss"
FUSED_LINEAR_MODULE = "megatron_selfjudge.kernels.fused_linear_grpo"


class PerTokenLoss(NamedTuple):
    """Per-token terms of the policy loss, all fp32 and shaped like ``logp``."""

    loss: torch.Tensor
    pg: torch.Tensor
    kl: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor


def _acc(tensor: torch.Tensor) -> torch.Tensor:
    """Compute in fp32, or in fp64 when given fp64 (so gradcheck can run on the reference)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _scaled_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    check_temperature(temperature)
    return torch.log_softmax(_acc(logits) / temperature, dim=-1)


def _gather_targets(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logprobs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def _entropy(logprobs: torch.Tensor) -> torch.Tensor:
    # p * logp with p == 0 is 0 here because logp stays finite for finite logits.
    return -(logprobs.exp() * logprobs).sum(dim=-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each target token under softmax(logits / temperature), fp32 [...]."""
    _check_targets(logits, targets)
    return _gather_targets(_scaled_log_softmax(logits, temperature), targets)


def _check_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal logits shape without vocab "
                         f"{tuple(logits.shape[:-1])}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    vocab = logits.shape[-1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"targets must lie in [0, {vocab}), got range [{int(targets.min())}, {int(targets.max())}]")


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, fp32 [...]."""
    return _entropy(_scaled_log_softmax(logits, temperature))


def per_token_policy_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    **hyper: float,
) -> PerTokenLoss:
    """Clipped, dual-clipped policy-gradient loss plus k3 KL per token (see the module docstring).

    `hyper`: LossParams fields but the temperature (the log-probs are already scaled).
    """
    if "temperature" in hyper:
        raise TypeError("per_token_policy_loss takes log-probs already computed at the temperature; "
                        "pass temperature to policy_loss or the log-prob functions")
    p = LossParams.of(hyper)
    eps_low, eps_high, dual_clip, beta_kl, logratio_clamp, kl_clamp = p[1:]
    for name, tensor in (("advantages", advantages), ("old_logp", old_logp), ("ref_logp", ref_logp)):
        if tensor is not None and tensor.shape != logp.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} must equal logp shape {tuple(logp.shape)}")
    logp = _acc(logp)
    adv = advantages.detach().to(logp.dtype)
    # On-policy: old == current values, so ratio == 1 while the gradient still flows through logp.
    old = logp.detach() if old_logp is None else old_logp.detach().to(logp.dtype)
    ratio = torch.exp(torch.clamp(logp - old, -logratio_clamp, logratio_clamp))

    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    pg = torch.where(adv < 0, torch.minimum(pg, -dual_clip * adv), pg)
    clipped = (pg_clipped > pg_unclipped).to(logp.dtype)

    if ref_logp is None:
        kl = torch.zeros_like(logp)
    else:
        log_ratio_ref = torch.clamp(ref_logp.detach().to(logp.dtype) - logp, -logratio_clamp, logratio_clamp)
        kl = torch.clamp(torch.exp(log_ratio_ref) - log_ratio_ref - 1.0, -kl_clamp, kl_clamp)
    return PerTokenLoss(loss=pg + beta_kl * kl, pg=pg, kl=kl, ratio=ratio, clipped=clipped)


def _as_count(value, name: str) -> float:
    count = float(value.item() if isinstance(value, torch.Tensor) else value)
    if not count >= 0 or count == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return count


def token_weights(mask: torch.Tensor, agg: str, global_normalizer: float | int | torch.Tensor | None = None) -> torch.Tensor:
    """Per-token fp32 weights [B,T] so that sum(per_token_loss * weights) is the chosen aggregation.

    ``global_normalizer`` is the number of valid tokens (token-mean) or of sequences with at
    least one valid token (seq-mean-*) over the whole global batch; None counts it from ``mask``.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    valid = mask.float()
    if valid.numel() and not bool(((valid == 0) | (valid == 1)).all()):
        raise ValueError("mask must hold only 0/1 (or bool) values")
    seq_len = valid.sum(dim=1, keepdim=True)
    if agg == "token-mean":
        local_count, per_token = valid.sum(), valid
    else:
        local_count = (seq_len > 0).sum()
        # seq-mean-token-mean: each sequence contributes the mean over its own valid tokens.
        per_token = valid / seq_len.clamp(min=1) if agg == "seq-mean-token-mean" else valid
    local_count = float(local_count)
    norm = local_count if global_normalizer is None else _as_count(global_normalizer, "global_normalizer")
    if norm < local_count:
        raise ValueError(f"global_normalizer ({norm}) is smaller than this mask's own count ({local_count}) "
                         f"for agg={agg!r}; it must count the whole global batch")
    if norm == 0:  # nothing valid anywhere: every weight is 0, never 0/0
        return torch.zeros_like(valid)
    return per_token / norm


def rollout_correction_weights(train_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                               mode: str, cap: float) -> Optional[torch.Tensor]:
    """Truncated importance weights [B, T] (fp32, 0 off the mask) for rollouts sampled by another engine.

    token: w_t = min(exp(train_logp_t - rollout_logp_t), cap); sequence: every token of a row gets
    min(exp(sum_t (train_logp_t - rollout_logp_t)), cap); none: None. The loss multiplies each
    token's advantage by w_t, which (w > 0, the clipped and dual-clipped pg being positively
    homogeneous in A) scales exactly the token's policy-gradient term and leaves the KL term alone,
    in every loss implementation alike (they all take per-token advantages).
    """
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"rollout correction must be one of {ROLLOUT_CORRECTIONS}, got {mode!r}")
    if not cap > 0:
        raise ValueError(f"rollout correction cap must be > 0, got {cap!r}")
    if mode == "none":
        return None
    if train_logp.shape != rollout_logp.shape or train_logp.shape != mask.shape:
        raise ValueError(f"train_logp {tuple(train_logp.shape)}, rollout_logp {tuple(rollout_logp.shape)} and "
                         f"mask {tuple(mask.shape)} must have one shape")
    valid = mask.bool()
    log_ratio = torch.where(valid, train_logp.double() - rollout_logp.double(), torch.zeros((), dtype=torch.float64))
    if mode == "sequence":
        log_ratio = log_ratio.sum(dim=1, keepdim=True).expand_as(log_ratio)
    # min(exp(x), cap) computed as exp(min(x, log cap)): no overflow for a long sequence's sum.
    weights = torch.exp(torch.clamp(log_ratio, max=math.log(cap)))
    return torch.where(valid, weights, torch.zeros((), dtype=torch.float64)).float()


def rollout_mismatch(train_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean and max |rollout - train| log-prob over the masked tokens, and the k3 estimate of KL(rollout || train).

    k3 = mean(exp(r) - r - 1) with r = train_logp - rollout_logp, the samples being the rollout engine's.
    """
    valid = mask.bool()
    if not bool(valid.any()):
        return {"rollout_logp_diff_mean": 0.0, "rollout_logp_diff_max": 0.0, "rollout_k3": 0.0}
    r = (train_logp.double() - rollout_logp.double())[valid]
    return {"rollout_logp_diff_mean": float(r.abs().mean()), "rollout_logp_diff_max": float(r.abs().max()),
            "rollout_k3": float((torch.expm1(r) - r).mean())}


def _valid_mean(x: torch.Tensor, valid: torch.Tensor, empty: float = 0.0) -> torch.Tensor:
    count = valid.sum()
    total = torch.where(valid, x.detach().float(), torch.zeros((), device=x.device)).sum()
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, empty))


def _metrics(per: "TokenTerms", adv: torch.Tensor, valid: torch.Tensor, dual_clip: float) -> dict[str, torch.Tensor]:
    """Token-means over valid tokens of this call (not global); ratio range 1.0 when nothing is valid."""
    ratio = per.ratio.detach()
    big, one = torch.tensor(float("inf"), device=ratio.device), torch.tensor(1.0, device=ratio.device)
    ratio_min = torch.where(valid, ratio, big).min() if valid.any() else one
    ratio_max = torch.where(valid, ratio, -big).max() if valid.any() else one
    return {
        "pg_loss": _valid_mean(per.pg, valid),
        "kl": _valid_mean(per.kl, valid),
        "clip_frac": _valid_mean(per.clipped, valid),
        "dual_clip_frac": _valid_mean(((adv < 0) & (ratio > dual_clip)).float(), valid),
        "entropy": _valid_mean(per.entropy, valid),
        "ratio_min": ratio_min,
        "ratio_max": ratio_max,
        "valid_tokens": valid.sum().float(),
    }


def _flatten_inputs(logits, targets, advantages, mask, old_logp, ref_logp, agg):
    """Bring everything to the mask's [B, T] layout; per-sequence advantages [B] are broadcast."""
    if mask.dim() == 1:
        if agg != "token-mean":
            raise ValueError(f"agg={agg!r} needs a [B, T] mask to know the sequences; got a 1-D mask")
        mask = mask.unsqueeze(0)
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T] (or [N] for token-mean), got shape {tuple(mask.shape)}")
    batch, length = mask.shape
    if logits.dim() not in (2, 3) or logits.shape[:-1].numel() != batch * length:
        raise ValueError(f"logits must be [B, T, V] or [B*T, V] matching mask {tuple(mask.shape)}, "
                         f"got {tuple(logits.shape)}")
    if advantages.dim() == 1 and advantages.shape[0] == batch and batch * length != batch:
        advantages = advantages.unsqueeze(1).expand(batch, length)

    def to_bt(name, tensor):
        if tensor is None:
            return None
        if tensor.numel() != batch * length:
            raise ValueError(f"{name} has {tensor.numel()} elements, expected {batch * length} (mask {tuple(mask.shape)})")
        return tensor.reshape(batch, length)

    return (logits.reshape(batch, length, logits.shape[-1]), to_bt("targets", targets),
            to_bt("advantages", advantages), mask.bool(), to_bt("old_logp", old_logp), to_bt("ref_logp", ref_logp))


def policy_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    *,
    agg: str = _LOSS_DEFAULTS.agg,
    global_normalizer: float | int | torch.Tensor | None = None,
    entropy_coef: float = _LOSS_DEFAULTS.entropy_coef,
    impl: str = _LOSS_DEFAULTS.impl,
    rollout_weight: torch.Tensor | None = None,
    **hyper: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Aggregated GRPO policy loss from logits, and token-mean metrics (detached 0-d tensors).

    `hyper`: LossParams fields (temperature, eps_low, eps_high, dual_clip, beta_kl, clamps); every
    default here is the config's (config.LossConfig). `rollout_weight` [B, T]: the per-token
    rollout-correction weights (rollout_correction_weights), or None.
    """
    chosen = resolve_impl(impl, logits.device, entropy_coef)
    if chosen.from_hidden:
        raise ValueError(f"impl={impl!r} takes hidden states and the output weight, not logits; "
                         f"policy_loss serves {tuple(n for n, i in LOSS_IMPLS.items() if not i.from_hidden)}")
    logits, targets, adv, valid, old_logp, ref_logp = _flatten_inputs(
        logits, targets, advantages, mask, old_logp, ref_logp, agg)
    params = LossParams.of(hyper)
    weights = token_weights(valid, agg, global_normalizer)
    # Padding may carry ignore-index targets or junk old/ref/advantage values; neutralise them so
    # masked tokens contribute exactly 0 (never 0 * inf) and get exactly 0 gradient.
    zero = torch.zeros((), dtype=torch.float32, device=logits.device)
    targets = torch.where(valid, targets, torch.zeros_like(targets))
    adv = torch.where(valid, _acc(adv.detach()), zero)
    if rollout_weight is not None:
        if rollout_weight.numel() != adv.numel():
            raise ValueError(f"rollout_weight has {rollout_weight.numel()} elements, expected {adv.numel()}")
        adv = adv * _acc(rollout_weight.detach()).reshape(adv.shape)
    old_logp = None if old_logp is None else torch.where(valid, _acc(old_logp.detach()), zero)
    ref_logp = None if ref_logp is None else torch.where(valid, _acc(ref_logp.detach()), zero)
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    terms = chosen.per_token(logits.reshape(-1, logits.shape[-1]), flat(targets), flat(adv), flat(old_logp),
                             flat(ref_logp), params, valid=flat(valid), entropy_grad=entropy_coef != 0)
    terms = TokenTerms(*(t.reshape(valid.shape) for t in terms))
    loss = (terms.loss * weights).sum()
    if entropy_coef:
        loss = loss - entropy_coef * (terms.entropy * weights).sum()
    return loss, _metrics(terms, adv, valid, params.dual_clip)


# ---------------------------------------------------------------- the loss-implementation registry

@dataclass(frozen=True)
class HiddenStates:
    """What ``fused_linear`` consumes instead of logits: hidden [N, H] and this rank's output weight [V_local, H]."""

    hidden: torch.Tensor
    weight: torch.Tensor


@dataclass(frozen=True)
class VocabShard:
    """Where this rank's vocabulary columns sit: the tensor-parallel group (None: whole vocab here) and first id."""

    group: Optional[dist.ProcessGroup] = None
    start: int = 0


class TokenTerms(NamedTuple):
    """Per-token fp32 results of one implementation; ``loss`` (and ``entropy`` when asked) carry the gradient."""

    loss: torch.Tensor
    logp: torch.Tensor
    pg: torch.Tensor
    kl: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor
    entropy: torch.Tensor


Source = Union[torch.Tensor, HiddenStates]


class LossImpl(abc.ABC):
    """One way to compute the per-token loss terms and forward-only log-probs (see the module docstring)."""

    name: str = ""
    from_hidden: bool = False  # True: consumes HiddenStates, so the model must stop before its output layer
    module: Optional[str] = None  # the kernel module it needs, if any

    def available(self) -> bool:
        """Whether its kernel module imports here (triton installed, interpreter or GPU)."""
        if self.module is None:
            return True
        try:
            importlib.import_module(self.module)
        except ImportError:
            return False
        return True

    def _kernel(self):
        try:
            return importlib.import_module(self.module)
        except ImportError as err:
            raise RuntimeError(f"loss impl {self.name!r} needs {self.module}, which failed to import ({err}); "
                               "is triton installed? On CPU set TRITON_INTERPRET=1 before importing triton") from err

    @abc.abstractmethod
    def per_token(self, source: Source, targets: torch.Tensor, advantages: torch.Tensor,
                  old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor], params: LossParams, *,
                  valid: Optional[torch.Tensor] = None, shard: VocabShard = VocabShard(),
                  entropy_grad: bool = False) -> TokenTerms:
        """Per-token terms for N tokens ([N] inputs); ``valid`` None means every token counts.

        The kernels skip tokens with ``valid`` False (zero outputs and gradient); the reference
        computes them too, so its callers zero masked tokens' inputs and weights (policy_loss does).
        """

    @abc.abstractmethod
    def logprobs(self, source: Source, targets: torch.Tensor, temperature: float, *,
                 shard: VocabShard = VocabShard()) -> torch.Tensor:
        """fp32 [N] log softmax(logits / T)[target], no gradient (old/reference log-probs, likelihood Judge)."""

    def _terms_from_kernel(self, out, old_logp, params: LossParams) -> TokenTerms:
        """TokenTerms from a kernel's FusedLossOutput: pg = loss - beta kl, ratio from the log-probs."""
        logp = out.logprobs.detach()
        old = logp if old_logp is None else old_logp
        ratio = torch.exp(torch.clamp(logp - old, -params.logratio_clamp, params.logratio_clamp))
        kl = out.kl.detach()
        return TokenTerms(out.loss, logp, out.loss.detach() - params.beta_kl * kl, kl, ratio, out.clipped.float(),
                          out.entropy)


class _Reference(LossImpl):
    name = "reference"

    def per_token(self, source, targets, advantages, old_logp, ref_logp, params, *, valid=None,
                  shard=VocabShard(), entropy_grad=False):
        logits = _logits_only(self, source)
        loss_args = params._asdict()
        temperature = loss_args.pop("temperature")
        if shard.group is None:
            _check_targets(logits, targets)
            logprobs = _scaled_log_softmax(logits, temperature)  # one [N, V] pass serves both terms
            logp = _gather_targets(logprobs, targets)
            # The entropy is always reported; it only carries a gradient when it is part of the loss.
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
                entropy = _entropy(logprobs)
        else:
            from megatron_selfjudge.megatron.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs

            logp = vocab_parallel_logprobs(logits, targets, temperature, shard.group)
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
                entropy = vocab_parallel_entropy(logits, temperature, shard.group)
        per = per_token_policy_loss(logp, advantages, old_logp, ref_logp, **loss_args)
        return TokenTerms(per.loss, logp.detach(), per.pg.detach(), per.kl.detach(), per.ratio.detach(),
                          per.clipped, entropy)

    @torch.no_grad()
    def logprobs(self, source, targets, temperature, *, shard=VocabShard()):
        logits = _logits_only(self, source)
        if shard.group is None:
            return token_logprobs(logits, targets, temperature)
        from megatron_selfjudge.megatron.logprobs import vocab_parallel_logprobs

        return vocab_parallel_logprobs(logits, targets, temperature, shard.group)


class _LogitsKernel(LossImpl):
    name = "logits_kernel"
    module = KERNEL_MODULE

    def per_token(self, source, targets, advantages, old_logp, ref_logp, params, *, valid=None,
                  shard=VocabShard(), entropy_grad=False):
        logits = _logits_only(self, source)
        out = self._kernel().fused_grpo_loss(
            logits if logits.stride(-1) == 1 else logits.contiguous(), targets, advantages, valid, old_logp,
            ref_logp, compute_entropy=True, tp_group=shard.group, vocab_start_index=shard.start, **params._asdict())
        return self._terms_from_kernel(out, old_logp, params)

    def logprobs(self, source, targets, temperature, *, shard=VocabShard()):
        logits = _logits_only(self, source)
        return self._kernel().selective_logprobs(logits.contiguous(), targets, temperature, shard.group, shard.start)


class _FusedLinear(LossImpl):
    name = "fused_linear"
    from_hidden = True
    module = FUSED_LINEAR_MODULE

    def per_token(self, source, targets, advantages, old_logp, ref_logp, params, *, valid=None,
                  shard=VocabShard(), entropy_grad=False):
        hidden = _hidden_only(self, source)
        out = self._kernel().fused_linear_grpo_loss(
            _in_weight_dtype(hidden), hidden.weight, targets, advantages, valid, old_logp, ref_logp, compute_entropy=True,
            tp_group=shard.group, vocab_start_index=shard.start, **params._asdict())
        return self._terms_from_kernel(out, old_logp, params)

    def logprobs(self, source, targets, temperature, *, shard=VocabShard()):
        hidden = _hidden_only(self, source)
        return self._kernel().fused_linear_logprobs(_in_weight_dtype(hidden), hidden.weight, targets, temperature,
                                                    shard.group, shard.start)


def _logits_only(impl: LossImpl, source: Source) -> torch.Tensor:
    if not isinstance(source, torch.Tensor):
        raise TypeError(f"loss impl {impl.name!r} takes logits [N, V_local], got {type(source).__name__}")
    return source


def _hidden_only(impl: LossImpl, source: Source) -> HiddenStates:
    if not isinstance(source, HiddenStates):
        raise TypeError(f"loss impl {impl.name!r} takes HiddenStates(hidden, weight), got {type(source).__name__}")
    return source


def _in_weight_dtype(source: HiddenStates) -> torch.Tensor:
    """The hidden states in the weight's dtype: megatron's Float16Module hands the last stage's output
    back in fp32, and bf16 -> fp32 -> bf16 is exact."""
    return source.hidden.to(source.weight.dtype)


LOSS_IMPLS: dict[str, LossImpl] = {impl.name: impl for impl in (_Reference(), _LogitsKernel(), _FusedLinear())}
IMPL_CHOICES = ("auto", *LOSS_IMPLS)  # what loss.impl accepts (config validation reads this)


def resolve_impl(name: str, device: torch.device, entropy_coef: float = 0.0) -> LossImpl:
    """The implementation ``name`` stands for on ``device`` ('auto': the logits kernel on CUDA without entropy bonus)."""
    if name not in IMPL_CHOICES:
        raise ValueError(f"impl must be one of {IMPL_CHOICES}, got {name!r}")
    if name != "auto":
        return LOSS_IMPLS[name]
    kernel = LOSS_IMPLS["logits_kernel"]
    if torch.device(device).type == "cuda" and entropy_coef == 0 and kernel.available():
        return kernel
    return LOSS_IMPLS["reference"]
