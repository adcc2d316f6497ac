"""The fused-linear benchmark on tiny shapes (interpreter on CPU): the memory curve, its figure, the rates."""
import json
from pathlib import Path

import pytest
import torch

from megatron_selfjudge.kernels import bench, bench_fused_linear

MEMORY_TOKENS = (64, 128, 256)
VOCAB, HIDDEN, CHUNK = 1024, 16, 32


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return bench.main(["--suite", "fused_linear", "--tokens", "32", "--memory-tokens", *map(str, MEMORY_TOKENS),
                       "--vocab", str(VOCAB), "--hidden", str(HIDDEN), "--chunk-tokens", str(CHUNK), "--reps", "1",
                       "--warmup", "0", "--providers", "fused_linear", "logits_kernel", "eager", "liger",
                       "--out", str(out)])["fused_linear"]


def test_storage_tracker_counts_allocations_and_frees():
    with bench_fused_linear.StorageTracker() as tracker:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(500, dtype=torch.float64)  # 4000 bytes
        view = b.view(50, 10)  # shares b's storage: nothing new
        c = view * 1  # a new 4000 bytes: peak 12000
        del a, b, view, c
        d = torch.zeros(10)  # 40 bytes, counted after the frees were seen
        e = d + 1  # 40 more
    assert tracker.peak == 12_000 and tracker.current == 80
    del d, e


def test_peak_allocated_bytes_of_a_known_function():
    x = torch.randn(100, 100)  # allocated before: not counted
    assert bench_fused_linear.peak_allocated_bytes(lambda: (x * 2).sum(), torch.device("cpu")) == 40_000 + 4


def test_fused_linear_memory_is_flat_in_n_while_the_others_grow_with_the_logits(payload):
    peak = {(r["provider"], r["tokens"]): r["peak_bytes"] for r in payload["memory"] if r["status"] == "ok"}
    small, large = MEMORY_TOKENS[0], MEMORY_TOKENS[-1]
    logits = lambda n: n * VOCAB * 2  # noqa: E731 (bf16 logits of n tokens)
    # Beyond one chunk the fused op grows only by per-token vectors: d_hidden (H bf16) and at most 64
    # fp32 statistics and outputs per token, whatever V is (a logits row alone is V * 2 = 2048 bytes).
    per_token = (peak[("fused_linear", large)] - peak[("fused_linear", small)]) / (large - small)
    assert 0 < per_token <= 2 * HIDDEN + 64 * 4
    assert peak[("fused_linear", large)] < logits(large)
    for provider in ("logits_kernel", "eager"):  # they hold at least the logits and their gradient
        assert peak[(provider, large)] >= 2 * logits(large)
        assert peak[(provider, large)] - peak[(provider, small)] >= 2 * (logits(large) - logits(small))
    assert Path(payload["plot"]).stat().st_size > 0 and payload["plot"].endswith(".png")


def test_json_has_rates_and_the_target_ratio(payload):
    stored = json.loads(Path(payload["path"]).read_text())
    assert stored["memory_tokens"] == list(MEMORY_TOKENS) and stored["hidden"] == HIDDEN
    assert stored["gemm_tflops"] > 0 and stored["copy_bandwidth_gbps"] > 0 and stored["fused_chunk_tokens"] == CHUNK
    rows = {(r["provider"], r["tokens"]): r for r in stored["results"]}
    fused = rows[("fused_linear", 32)]
    assert fused["status"] == "ok"
    flops = 6 * 32 * VOCAB * HIDDEN
    assert fused["fwd_bwd_tflops"] == pytest.approx(flops / fused["fwd_bwd_ms"] / 1e9)
    assert fused["fwd_bwd_frac_of_gemm_peak"] == pytest.approx(fused["fwd_bwd_tflops"] / stored["gemm_tflops"])
    assert fused["fwd_bwd_gbps"] == pytest.approx(3 * (32 + VOCAB) * HIDDEN * 2 / fused["fwd_bwd_ms"] / 1e6)
    ratio = stored["targets"]["fused_linear_over_gemm_plus_logits_kernel_N32"]
    assert ratio == pytest.approx(fused["fwd_bwd_ms"] / rows[("logits_kernel", 32)]["fwd_bwd_ms"])
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        assert rows[("liger", 32)]["status"].startswith("skipped: not installed")


def test_every_provider_computes_the_same_objective_and_gradients():
    data = bench_fused_linear._inputs(48, 200, 24, torch.float32, torch.device("cpu"), seed=3)
    results = {}
    for provider in ("fused_linear", "logits_kernel", "eager"):
        forward, (h, w) = bench_fused_linear._make_forward(provider, data, chunk_tokens=16)
        loss = forward()
        loss.backward()
        results[provider] = (loss.detach(), h.grad, w.grad)
    for provider in ("fused_linear", "logits_kernel"):
        for got, want in zip(results[provider], results["eager"]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=provider)
