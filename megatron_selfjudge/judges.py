"""Judges: turn (prompt, response) pairs into scores in [0, 1] with the frozen initial model.

Two kinds behind one interface, `score(prompts, trajectories) -> per-trajectory list of K
parsed scores (None = unparseable)`:

- `GenerativeJudge` (the paper's): the frozen model reads the image, the question and the
  candidate's full response under the rubric of `rewards.judge.build_judge_prompt`, writes a
  rationale and a boxed overall score, which `rewards.judge.parse_judge_output` reads.
- `LikelihoodJudge` (for models too small to follow a rubric): the frozen model's geometric
  mean token probability of the response, exp(mean log p), which lies in [0, 1] by
  construction and is never unparseable.

`JUDGE_KINDS` maps each `judge.kind` to its class (config validation reads the names there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from megatron_selfjudge.rewards.judge import build_judge_prompt, parse_judge_output
from megatron_selfjudge.rollout.base import RolloutEngine, RolloutRequest, SamplingConfig, Trajectory


@dataclass
class JudgePrompt:
    """What a Judge needs of a rollout's prompt: the question text and its images."""

    uid: str
    question: str
    images: Optional[Any]  # the family's preprocessed images ([N, C, H, W] or PackedImages), or None
    source_images: Optional[Any] = None  # the record's own (PIL) images, for an engine that preprocesses itself (vLLM)


def mean_token_logprob(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean of `logp` over `mask` (rows without a valid token get 0, i.e. probability 1)."""
    mask = mask.to(logp.dtype)
    count = mask.sum(dim=1)
    return (logp * mask).sum(dim=1) / count.clamp(min=1)


class LikelihoodJudge:
    """Score = exp(mean log p(response | prompt, image)) under the frozen initial model."""

    kind = "likelihood"

    def scores_from_logprobs(self, logp: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
        """Scores from precomputed frozen-model log-probs [B, T] of the response tokens."""
        score = torch.exp(mean_token_logprob(logp.float(), mask)).clamp(0.0, 1.0)
        return [[float(s)] for s in score.tolist()]


class GenerativeJudge:
    """The frozen model writes a rubric judgement; its boxed overall score is parsed."""

    kind = "generative"

    def __init__(self, engine: RolloutEngine, encode_prompt: Any, *, samples: int, temperature: float,
                 top_p: float, max_tokens: int, seed: int, rubric: str = "full", greedy: bool = False):
        """judge.samples, judge.temperature, judge.top_p, judge.max_tokens and judge.rubric; seed + step per step.

        greedy: argmax verdicts (measuring the Judge, eval/judge_check.py); training samples them.
        """
        self.engine = engine
        # (text, n_images, images=...) -> token ids with image placeholders (sized by the images)
        self.encode_prompt = encode_prompt
        self.samples = samples
        self.temperature = temperature
        self.top_p = top_p
        self.max_tokens = max_tokens
        self.seed = seed
        self.rubric = rubric
        self.greedy = greedy

    def requests(self, prompts: Sequence[JudgePrompt], trajectories: Sequence[Trajectory]) -> list[RolloutRequest]:
        """One Judge request per trajectory (the trajectory's prompt's image attached)."""
        by_uid = {p.uid: p for p in prompts}
        out = []
        for t in trajectories:
            p = by_uid[t.uid]
            n_images = 0 if p.images is None else len(p.images)
            ids = self.encode_prompt(build_judge_prompt(p.question, t.text, self.rubric), n_images, images=p.images)
            meta = {"source_images": p.source_images} if p.source_images is not None else {}
            out.append(RolloutRequest(uid=f"{t.uid}/{t.sample_index}", prompt_ids=ids, images=p.images, metadata=meta))
        return out

    def score(self, prompts: Sequence[JudgePrompt], trajectories: Sequence[Trajectory],
              step: int = 0) -> tuple[list[list[Optional[float]]], list[str]]:
        """Per trajectory, K parsed scores (None where unparseable), plus the raw Judge texts."""
        sampling = SamplingConfig(n=self.samples, temperature=self.temperature, top_p=self.top_p,
                                  max_new_tokens=self.max_tokens, seed=self.seed + step, greedy=self.greedy)
        outputs = self.engine.generate(self.requests(prompts, trajectories), sampling)
        k = self.samples
        texts = [o.text for o in outputs]
        scores = [[parse_judge_output(texts[i * k + j]) for j in range(k)] for i in range(len(trajectories))]
        return scores, texts


JUDGE_KINDS: dict[str, type] = {cls.kind: cls for cls in (GenerativeJudge, LikelihoodJudge)}
