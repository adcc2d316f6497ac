"""Frozen reference/Judge copies: exact weights, no grad, unchanged by policy updates, offload round trips."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import run_distributed  # noqa: E402
from test_forward import TEMPERATURE, llava_builder, make_batch  # noqa: E402


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _frozen_worker(rank: int, world: int) -> dict:
    from megatron_selfjudge.megatron.forward import compute_logprobs
    from megatron_selfjudge.megatron.frozen import frozen_copy
    from megatron_selfjudge.megatron.optimizer import build_optimizer
    from megatron_selfjudge.megatron.parallel import initialize_parallel
    from megatron_selfjudge.megatron.train_step import train_step
    from test_train_step import loss_settings

    initialize_parallel(tp=1, pp=1, seed=1)
    build = llava_builder()
    policy = build()
    initial = _state(policy)
    judge = frozen_copy(policy, build)
    batch = make_batch(seed=0)
    out = {"initial_logp": compute_logprobs(policy, batch, temperature=TEMPERATURE)}
    out["copy_equal"] = all(torch.equal(v, initial[k]) for k, v in _state(judge.module).items())
    out["flags"] = (judge.module.training, any(p.requires_grad for p in judge.module.parameters()))

    ddp, optimizer = build_optimizer(policy, lr=1e-2)
    train_step(ddp, optimizer, batch, loss_settings())
    out["policy_moved"] = max((v - initial[k]).abs().max().item() for k, v in _state(policy).items())
    out["judge_moved"] = max((v - initial[k]).abs().max().item() for k, v in _state(judge.module).items())
    out["judge_logp"] = judge.logprobs(batch, temperature=TEMPERATURE)

    pointers = [p.data_ptr() for p in judge.module.parameters()]
    judge.offload()
    judge.offload()  # idempotent
    out["offloaded"] = judge.offloaded
    out["moved_storage"] = all(p.data_ptr() != q for p, q in zip(judge.module.parameters(), pointers))
    try:
        judge.logprobs(batch)
        out["offloaded_error"] = None
    except RuntimeError as err:
        out["offloaded_error"] = str(err)
    judge.onload()
    out["after_round_trip_equal"] = all(torch.equal(v, initial[k]) for k, v in _state(judge.module).items())
    out["after_round_trip_flags"] = (judge.offloaded, any(p.requires_grad for p in judge.module.parameters()))
    out["after_round_trip_logp"] = judge.logprobs(batch, temperature=TEMPERATURE)
    try:
        frozen_copy(policy, llava_builder(vocab_size=128))
        out["mismatch_error"] = None
    except ValueError as err:
        out["mismatch_error"] = str(err)
    return out


@pytest.fixture(scope="module")
def frozen_run() -> dict:
    return run_distributed(_frozen_worker, 1, timeout=240)[0]


@pytest.mark.slow
def test_copy_holds_policy_weights_without_grad(frozen_run):
    assert frozen_run["copy_equal"]
    assert frozen_run["flags"] == (False, False)  # eval mode, no parameter requires grad


@pytest.mark.slow
def test_copy_is_unchanged_by_policy_update(frozen_run):
    assert frozen_run["policy_moved"] > 1e-4
    assert frozen_run["judge_moved"] == 0.0
    torch.testing.assert_close(frozen_run["judge_logp"], frozen_run["initial_logp"], atol=0, rtol=0)


@pytest.mark.slow
def test_offload_onload_round_trip_keeps_state(frozen_run):
    assert frozen_run["offloaded"] and frozen_run["moved_storage"]
    assert "onload" in frozen_run["offloaded_error"]
    assert frozen_run["after_round_trip_equal"]
    assert frozen_run["after_round_trip_flags"] == (False, False)
    torch.testing.assert_close(frozen_run["after_round_trip_logp"], frozen_run["initial_logp"], atol=0, rtol=0)


@pytest.mark.slow
def test_copy_with_other_architecture_is_refused(frozen_run):
    assert frozen_run["mismatch_error"] is not None and "shape" in frozen_run["mismatch_error"]


def test_use_offloads_between_uses_only_when_asked():
    from megatron_selfjudge.megatron.frozen import FrozenModel

    for between in (False, True):
        frozen = FrozenModel(torch.nn.Linear(3, 2), offload_between_uses=between)
        before = [p.detach().clone() for p in frozen.module.parameters()]
        with frozen.use() as inside:
            assert inside is frozen and not frozen.offloaded
        assert frozen.offloaded == between
        with frozen.use():
            assert all(torch.equal(p, q) for p, q in zip(frozen.module.parameters(), before))
