"""The CPU runtime: version guard, idempotence, and each redirect behaving like its CUDA original."""
from __future__ import annotations

import pytest
import torch

from megatron_selfjudge.megatron import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU runtime is inert with CUDA")


def test_refuses_other_megatron_core_version(monkeypatch):
    from megatron.core import package_info

    monkeypatch.setattr(cpu, "_ACTIVE", False)
    monkeypatch.setattr(package_info, "__version__", "0.15.2")
    with pytest.raises(RuntimeError) as excinfo:
        cpu.activate()
    message = str(excinfo.value)
    assert "0.15.2" in message and cpu.EXPECTED_MEGATRON_CORE in message
    assert not cpu.is_active()


def test_activate_is_idempotent():
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel
    from megatron.core.pipeline_parallel import schedules

    assert cpu.activate() is True
    patched = (CLIPViTModel.__init__, schedules.torch, torch.cuda.current_device, torch.Tensor.cuda)
    assert cpu.activate() is True
    assert patched == (CLIPViTModel.__init__, schedules.torch, torch.cuda.current_device, torch.Tensor.cuda)
    assert cpu.is_active()


def test_device_redirects():
    from megatron.core.pipeline_parallel import schedules

    cpu.activate()
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    x = torch.arange(3)
    assert x.cuda().device.type == "cpu" and torch.equal(x.cuda(), x)
    made = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    assert made.device.type == "cpu" and made.dtype == torch.int
    # The view leaves everything that is not a CUDA device untouched.
    assert schedules.torch.ones(2, device="meta").device.type == "meta"
    assert schedules.torch.Tensor is torch.Tensor


def test_causal_masks_match_reference():
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    cpu.activate()
    sq = 5
    reference = torch.ones(sq, sq).triu(diagonal=1).bool()  # True = masked (future) position
    assert torch.equal(tutils.get_default_causal_mask(sq), reference)
    assert fused_softmax.get_default_causal_mask is tutils.get_default_causal_mask
    window = tutils.get_sliding_window_causal_mask(4, 4, (1, 0))
    i, j = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    assert torch.equal(window, ~((j <= i) & (j >= i - 1)))


def test_rng_tracker_forks_on_cpu_generator():
    from megatron.core.tensor_parallel import random as mrandom

    cpu.activate()
    mrandom.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
    tracker = mrandom.get_cuda_rng_tracker()
    torch.manual_seed(7)
    expected_default = torch.rand(4)
    torch.manual_seed(7)
    with tracker.fork():
        inside_first = torch.rand(4)
    after = torch.rand(4)
    # The default stream resumes where it was; the forked stream is separate and persistent.
    assert torch.equal(after, expected_default)
    assert not torch.equal(inside_first, expected_default)
    with tracker.fork():
        inside_second = torch.rand(4)
    assert not torch.equal(inside_second, inside_first)
    # Re-seeding reproduces the forked stream from the start.
    mrandom.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
    with mrandom.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), inside_first)


def test_host_event_times_and_noops():
    cpu.activate()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    sum(range(10000))
    end.record()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert start.elapsed_time(end) >= 0.0


def test_grad_clipping_scales_cpu_grads():
    from megatron.core.optimizer import optimizer as moptimizer

    cpu.activate()
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([0.0, 4.0, 0.0])
    moptimizer.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=5.0)
    total = torch.cat([p.grad for p in params]).norm()
    assert abs(float(total) - 1.0) < 1e-5
    moptimizer.clip_grad_by_total_norm_fp32(params, max_norm=10.0, total_norm=1.0)  # below max: unchanged
    assert abs(float(torch.cat([p.grad for p in params]).norm()) - 1.0) < 1e-5
