"""Triton kernels for the fused GRPO loss, importable as megatron_selfjudge.kernels."""
