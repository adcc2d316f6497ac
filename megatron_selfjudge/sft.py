"""Stage 1, the supervised warm start: labelled (prompt, target) pairs before label-free training.

Its gradient is the policy-gradient step with advantage 1 on the target tokens (on-policy ratio 1,
no KL), which is exactly the gradient of the token-mean negative log-likelihood, so it runs
through the same megatron train step as stage 2. It trains at `optim.sft_lr`; stage 2 then starts
from a fresh optimizer state at `optim.lr`. The paper's premise allows labels only here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from megatron_selfjudge.megatron import optimizer as optim

if TYPE_CHECKING:
    from megatron_selfjudge.config import OptimConfig
    from megatron_selfjudge.trainer import Trainer

SFT_SCHEDULES = ("constant", "linear", "cosine")  # decay styles of megatron-core's OptimizerParamScheduler


def sft_lr_schedule(o: "OptimConfig", total: int) -> Callable[[int], float]:
    """step (0-based, of `total`) -> the warm-start learning rate: megatron-core's OptimizerParamScheduler
    formula (linear warmup, then optim.sft_schedule down to optim.sft_min_lr). Built once per warm start."""
    from types import SimpleNamespace

    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    # The scheduler only computes here: its optimizer has no groups (the real groups carry stage 2's
    # max_lr, which it would read instead of optim.sft_lr).
    sched = OptimizerParamScheduler(SimpleNamespace(param_groups=[]), init_lr=0.0, max_lr=o.sft_lr,
                                    min_lr=o.sft_min_lr, lr_warmup_steps=o.sft_warmup_steps,
                                    lr_decay_steps=max(total, o.sft_warmup_steps + 1),
                                    lr_decay_style=o.sft_schedule, start_wd=0.0, end_wd=0.0, wd_incr_steps=1,
                                    wd_incr_style="constant")

    def lr_at(step: int) -> float:
        # Step k trains at the scheduler's value after k + 1 increments: warmup's first step is above 0
        # and the last step of a decay lands on sft_min_lr.
        sched.num_steps = step + 1
        return sched.get_lr({})
    return lr_at


def sft_lr_at(o: "OptimConfig", step: int, total: int) -> float:
    """The warm-start learning rate of one step (sft_lr_schedule for a single look-up)."""
    return sft_lr_schedule(o, total)(step)


def sft_step(tr: "Trainer", with_nll: bool) -> dict:
    """One supervised step on a batch of labelled pairs drawn for this step.

    with_nll adds the batch's pre-update NLL (an extra forward pass, so only on logged steps).
    """
    from megatron_selfjudge.data.collate import encode_response
    from megatron_selfjudge.megatron.forward import compute_logprobs
    from megatron_selfjudge.megatron.train_step import train_step

    t = tr.cfg.trainer
    rng = np.random.default_rng([t.seed, 7, tr.state["sft_step"]])
    picks = rng.choice(len(tr.task.sft), size=min(t.sft_batch_size, len(tr.task.sft)), replace=False)
    recs = [tr.task.sft[i][0] for i in picks]
    images = [tr.images_of(r) for r in recs]
    batch = tr.policy_batch([tr.encode_record(r, images=im) for r, im in zip(recs, images)],
                            [encode_response(tr.task.sft[i][1], tr.tokenizer) for i in picks],
                            images, torch.ones(len(recs)))
    out = {}
    if with_nll:
        logp = compute_logprobs(tr.ddp, batch, temperature=1.0, max_tokens=t.micro_batch_tokens, impl=tr.cfg.loss.impl)
        out["sft_nll"] = float(-(logp.sum() / batch.loss_mask.sum()))
    m = train_step(tr.ddp, tr.optimizer, batch, tr.loss_settings(sft=True), max_tokens=t.micro_batch_tokens)
    return {**out, "grad_norm": m["grad_norm"]}


def run_sft(tr: "Trainer", preempt: Any) -> bool:
    """Stage 1 to `trainer.sft_steps`; True when a stop signal ended it early (a checkpoint was saved)."""
    t = tr.cfg.trainer
    if not tr.task.sft or t.sft_steps == 0:
        tr.state["phase"] = "upt"
        return False
    tr.metrics.truncate_after(tr.state["sft_step"], prefix="sft")
    with tr.log.progress("SFT warm start", t.sft_steps, tr.state["sft_step"]) as advance:
        log_every = max(1, t.sft_steps // 10)
        lr_at = sft_lr_schedule(tr.cfg.optim, t.sft_steps)
        nll = float("nan")
        while tr.state["sft_step"] < t.sft_steps:
            logged = (tr.state["sft_step"] + 1) % log_every == 0
            lr = lr_at(tr.state["sft_step"])
            optim.set_lr(tr.optimizer, lr)
            m = {**sft_step(tr, with_nll=logged), "lr": lr}
            tr.state["sft_step"] += 1
            if logged:
                nll = m["sft_nll"]
                tr.metrics.log(tr.state["sft_step"], m, prefix="sft")
            advance(f"nll {nll:.3f}")
            if preempt.should_stop():
                tr.save()
                return True
    optim.reset_optimizer_state(tr.optimizer)
    optim.set_lr(tr.optimizer, tr.cfg.optim.lr)
    tr.state["phase"] = "upt"
    return False
