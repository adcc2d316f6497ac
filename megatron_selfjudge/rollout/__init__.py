"""Rollouts: the backend-neutral engine interface and its backends (`rollout.backend`).

`build_engine("megatron", model=..., tokenizer=...)` imports megatron-core only when chosen.
"""
from megatron_selfjudge.rollout import base
from megatron_selfjudge.rollout.base import *  # noqa: F401,F403  (the interface is the package API)

__all__ = list(base.__all__)
