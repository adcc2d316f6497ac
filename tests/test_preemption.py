"""Preemption signals become an agreed stop flag; non-finite steps are detected on every rank."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from megatron_selfjudge.preemption import PreemptionHandler, is_finite_step

sys.path.insert(0, str(Path(__file__).parent / "megatron"))
from dist_utils import run_distributed  # noqa: E402


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_flag_without_exiting(sig):
    with PreemptionHandler() as handler:
        assert not handler.should_stop() and handler.received is None
        os.kill(os.getpid(), sig)
        # Python runs the handler at the next bytecode boundary; we are still alive to check.
        assert handler.should_stop()
        assert handler.received == signal.Signals(sig).name


def test_previous_handlers_are_restored():
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    before_usr1 = signal.signal(signal.SIGUSR1, previous)
    before_term = signal.getsignal(signal.SIGTERM)
    try:
        with PreemptionHandler() as handler:
            assert signal.getsignal(signal.SIGUSR1) is not previous
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.getsignal(signal.SIGTERM) is before_term
        os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == [signal.SIGUSR1] and not handler.should_stop()
    finally:
        signal.signal(signal.SIGUSR1, before_usr1)


def test_restored_even_when_the_body_raises():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyError):
        with PreemptionHandler(signals=[signal.SIGTERM]):
            raise KeyError("boom")
    assert signal.getsignal(signal.SIGTERM) is before


def test_bad_arguments():
    with pytest.raises(ValueError, match="SIGKILL"):
        PreemptionHandler(signals=[signal.SIGKILL])
    with pytest.raises(ValueError, match="at least one"):
        PreemptionHandler(signals=[])
    with pytest.raises(TypeError, match="str"):
        is_finite_step("nan")


def test_is_finite_step_single_process():
    assert is_finite_step(1.5, 0.3)
    assert is_finite_step(torch.tensor(2.0), None)
    assert not is_finite_step(float("nan"), 1.0)
    assert not is_finite_step(1.0, float("inf"))
    assert not is_finite_step(torch.tensor([1.0, float("-inf")]))

    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    assert is_finite_step(1.0, model=model)
    model.bias.grad[0] = float("nan")
    assert not is_finite_step(1.0, model=model)
    # megatron's DDP keeps gradients in param.main_grad; that buffer is the one checked when present.
    model.bias.grad[0] = 0.0
    model.weight.main_grad = torch.full((2, 3), float("inf"))
    assert not is_finite_step(1.0, model=[model])


def _agreement_worker(rank: int, world: int) -> dict:
    out = {}
    with PreemptionHandler() as handler:
        out["before"] = handler.should_stop()
        if rank == 0:  # Slurm's signal reached only this rank
            os.kill(os.getpid(), signal.SIGTERM)
        out["received"] = handler.received
        out["after"] = handler.should_stop()
    # Rank 1 alone sees a NaN loss; rank 0 alone sees a NaN gradient; then nobody does.
    out["nan_loss_on_1"] = is_finite_step(float("nan") if rank == 1 else 1.0, 0.5)
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    if rank == 0:
        model.weight.grad[0, 0] = float("inf")
    out["inf_grad_on_0"] = is_finite_step(1.0, model=model)
    out["all_finite"] = is_finite_step(1.0, 0.5)
    out["megatron"] = _megatron_nan_step(rank)
    return out


def _megatron_nan_step(rank: int) -> dict:
    """DP=2 GPT with megatron's DDP + distributed optimizer; only rank 1's loss is NaN."""
    from megatron_selfjudge.megatron.models import build_gpt
    from megatron_selfjudge.megatron.optimizer import build_optimizer
    from megatron_selfjudge.megatron.parallel import initialize_parallel

    initialize_parallel(tp=1, pp=1, seed=0)
    ddp, optimizer = build_optimizer(build_gpt(vocab_size=16, num_layers=1, hidden_size=8, num_attention_heads=2,
                                               ffn_hidden_size=16, max_seq_len=8), lr=1e-2)
    ids = torch.randint(0, 16, (1, 6))
    loss = ddp(ids, torch.arange(6).expand(1, 6), None, labels=ids).mean()
    if rank == 1:
        loss = loss * float("nan")
    loss.backward()
    ddp.finish_grad_sync()
    out = {"finite": is_finite_step(loss.detach() if rank == 0 else 1.0, model=ddp)}
    # What the guard prevents: megatron's fp32 step neither skips nor reports failure.
    update_ok, grad_norm, _ = optimizer.step()
    out["megatron_step"] = (update_ok, grad_norm == grad_norm)
    out["weights_nan"] = any(bool(torch.isnan(p).any()) for p in ddp.parameters())
    return out


@pytest.mark.slow
def test_two_ranks_agree():
    ranks = run_distributed(_agreement_worker, 2, timeout=120)
    assert [r["received"] for r in ranks] == ["SIGTERM", None]
    assert [r["before"] for r in ranks] == [False, False]
    assert [r["after"] for r in ranks] == [True, True]  # both stop at the same step
    assert [r["nan_loss_on_1"] for r in ranks] == [False, False]
    assert [r["inf_grad_on_0"] for r in ranks] == [False, False]
    assert [r["all_finite"] for r in ranks] == [True, True]
    # Rank 0's own loss and gradient shard may look fine; the guard still says no on both ranks.
    assert [r["megatron"]["finite"] for r in ranks] == [False, False]
    assert [r["megatron"]["megatron_step"] for r in ranks] == [(True, False)] * 2  # "success", NaN norm
    assert [r["megatron"]["weights_nan"] for r in ranks] == [True, True]
