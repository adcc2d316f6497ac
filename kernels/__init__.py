"""Triton ops of the GRPO loss, importable as megatron_selfjudge.kernels.

grpo_loss.py (from logits) and fused_linear_grpo.py (from hidden states and the output weight) are
each an autograd Function and its launches beside the shared kernels in _triton_kernels.py;
loss_params.py holds the hyper-parameter checks the reference loss shares; bench*.py and
gpu_report.py measure and report them.
"""
