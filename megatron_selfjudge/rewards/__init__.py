"""Rewards: answer extraction and equivalence, majority/consistency, the Judge, and their combination."""

from megatron_selfjudge.rewards.answers import (
    EQUIVALENCE_MODES, answer_classes, answers_equivalent, extract_boxed, normalize_answer,
)
from megatron_selfjudge.rewards.combine import REWARD_MODES, RewardResult, compute_rewards, format_ok
from megatron_selfjudge.rewards.consistency import consistency_prior, majority_class, majority_rewards
from megatron_selfjudge.rewards.judge import (
    build_judge_prompt, calibrate, parse_judge_output, resolve_judge_scores,
)

__all__ = [
    "EQUIVALENCE_MODES", "REWARD_MODES", "RewardResult", "answer_classes", "answers_equivalent",
    "build_judge_prompt", "calibrate", "compute_rewards", "consistency_prior", "extract_boxed",
    "format_ok", "majority_class", "majority_rewards", "normalize_answer", "parse_judge_output",
    "resolve_judge_scores",
]
