"""A non-finite loss or gradient skips the update instead of writing NaN into the weights."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import run_distributed  # noqa: E402
from test_forward import llava_builder, make_batch  # noqa: E402


def _worker(rank: int, world: int) -> dict:
    from megatron_selfjudge.megatron.optimizer import build_optimizer
    from megatron_selfjudge.megatron.parallel import destroy_parallel, initialize_parallel
    from megatron_selfjudge.megatron.train_step import LossSettings, train_step

    initialize_parallel(tp=1, pp=1, seed=1)
    try:
        policy = llava_builder()()
        ddp, optimizer = build_optimizer(policy, lr=1e-2)
        settings = LossSettings(temperature=1.0, eps_low=0.2, eps_high=0.2, dual_clip=3.0, beta_kl=0.0,
                                agg="token-mean", entropy_coef=0.0, impl="reference")
        before = {k: v.detach().clone() for k, v in policy.state_dict().items() if isinstance(v, torch.Tensor)}
        bad = make_batch(seed=3)
        bad.advantages[2] = float("nan")
        skipped = train_step(ddp, optimizer, bad, settings, max_tokens=4096)
        after_bad = {k: v.detach().clone() for k, v in policy.state_dict().items() if isinstance(v, torch.Tensor)}
        good = train_step(ddp, optimizer, make_batch(seed=3), settings, max_tokens=4096)
        after_good = policy.state_dict()
        return {
            "skipped": skipped["skipped"], "good_skipped": good["skipped"],
            "unchanged": all(torch.equal(before[k], after_bad[k]) for k in before),
            "finite_after_good": all(bool(torch.isfinite(v).all()) for v in after_good.values()
                                     if isinstance(v, torch.Tensor) and v.is_floating_point()),
            "changed_after_good": any(not torch.equal(before[k], after_good[k]) for k in before),
        }
    finally:
        destroy_parallel()


@pytest.mark.slow
def test_nan_advantage_skips_the_update_then_training_goes_on():
    (res,) = run_distributed(_worker, 1)
    assert res["skipped"] == 1.0 and res["unchanged"]
    assert res["good_skipped"] == 0.0 and res["changed_after_good"] and res["finite_after_good"]
