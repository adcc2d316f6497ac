"""Judges: the kind registry, the likelihood score, and the generative Judge's requests and parsing."""
import math

import pytest
import torch

from megatron_selfjudge.config import JudgeConfig
from megatron_selfjudge.judges import JUDGE_KINDS, GenerativeJudge, JudgePrompt, LikelihoodJudge
from megatron_selfjudge.rewards.judge import build_judge_prompt
from megatron_selfjudge.rollout.base import RolloutEngine, Trajectory


def test_kinds_registry_names_every_judge_class():
    assert JUDGE_KINDS == {"generative": GenerativeJudge, "likelihood": LikelihoodJudge}
    assert JudgeConfig().kind in JUDGE_KINDS


def test_likelihood_score_is_the_geometric_mean_probability():
    logp = torch.tensor([[math.log(0.5), math.log(0.125), 7.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    scores = LikelihoodJudge().scores_from_logprobs(logp, mask)
    assert scores[0] == [pytest.approx(0.25, rel=1e-6)]  # (0.5 * 0.125) ** (1/2); the masked 7.0 is ignored
    assert scores[1] == [1.0]  # no valid token: mean log p = 0


class RecordingEngine(RolloutEngine):
    """Answers every Judge request with the next scripted verdicts and records what it was asked."""

    def __init__(self, verdicts):
        self.verdicts, self.calls = list(verdicts), []

    def generate(self, requests, sampling):
        self.calls.append((list(requests), sampling))
        out = []
        for req in requests:
            for i in range(sampling.n):
                out.append(Trajectory(uid=req.uid, sample_index=i, prompt_ids=req.prompt_ids, response_ids=[1],
                                      logprobs=torch.zeros(1), finish_reason="stop", text=self.verdicts.pop(0)))
        return out


def _traj(uid, index, text):
    return Trajectory(uid=uid, sample_index=index, prompt_ids=[1], response_ids=[2], logprobs=torch.zeros(1),
                      finish_reason="stop", text=text)


def test_generative_judge_requests_and_parsed_scores():
    engine = RecordingEngine(["fine \\boxed{0.8}", "no verdict", '{"overall_score": 0.3}', "\\boxed{2}"])
    encoded = []

    def encode(text, n_images, images=None):
        assert images is (image if n_images else None)  # the prompt's images size its placeholders
        encoded.append((text, n_images))
        return [len(encoded)]

    judge = GenerativeJudge(engine, encode, samples=2, temperature=0.7, top_p=0.9, max_tokens=16, seed=100)
    image = torch.zeros(1, 3, 4, 4)
    prompts = [JudgePrompt(uid="q1", question="What is 2+2?", images=image),
               JudgePrompt(uid="q2", question="Name it.", images=None)]
    trajectories = [_traj("q1", 3, "<think>2+2</think>\\boxed{4}"), _traj("q2", 0, "a cat")]
    scores, texts = judge.score(prompts, trajectories, step=5)
    assert scores == [[0.8, None], [0.3, 1.0]]  # boxed, unparsed; JSON fallback, boxed clamped to 1
    assert len(texts) == 4
    assert encoded == [(build_judge_prompt("What is 2+2?", "<think>2+2</think>\\boxed{4}"), 1),
                       (build_judge_prompt("Name it.", "a cat"), 0)]
    (requests, sampling), = engine.calls
    assert [r.uid for r in requests] == ["q1/3", "q2/0"] and requests[0].images is image and requests[1].images is None
    assert (sampling.n, sampling.temperature, sampling.top_p, sampling.max_new_tokens, sampling.seed) == (2, 0.7, 0.9, 16, 105)
