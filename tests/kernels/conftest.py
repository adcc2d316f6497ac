"""Kernel tests run in Triton's interpreter when there is no GPU.

Triton picks interpreted vs compiled when a ``@triton.jit`` decorator runs, so the switch must be
in the environment before any kernel module is imported: this file is imported by pytest before
the test modules of this folder.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
