import torch

from megatron_selfjudge.eval.heldout import EvalResult, evaluate, format_table
from megatron_selfjudge.rollout.base import RolloutEngine, RolloutRequest, Trajectory


class ScriptedEngine(RolloutEngine):
    """Returns fixed texts: greedy per uid, and G sampled texts per uid."""

    def __init__(self, greedy: dict, sampled: dict):
        self.greedy, self.sampled = greedy, sampled

    def generate(self, requests, sampling):
        out = []
        for req in requests:
            texts = [self.greedy[req.uid]] if sampling.greedy else self.sampled[req.uid]
            assert len(texts) == sampling.n
            out += [Trajectory(uid=req.uid, sample_index=i, prompt_ids=req.prompt_ids, response_ids=[1],
                               logprobs=torch.zeros(1), finish_reason="stop", text=t) for i, t in enumerate(texts)]
        return out

    def sync_from(self, model):
        pass


def box(x: str) -> str:
    return f"<think>.</think>\\boxed{{{x}}}"


def test_metrics_by_hand():
    # p1: label 7; greedy right; samples 7,7,3,none -> 2/4 right, majority 7 right.
    # p2: label 1/2; greedy 0.4 wrong; samples 0.5, \frac{1}{2}, 2, 2 -> 2/4 right; classes {1/2: 2, 2: 2},
    #     tie -> first seen (0.5) -> right.
    # p3: label 5; greedy none; samples 4,4,4,5 -> 1/4 right, majority 4 wrong.
    engine = ScriptedEngine(
        greedy={"p1": box("7"), "p2": box("0.4"), "p3": "no box"},
        sampled={"p1": [box("7"), box("7"), box("3"), "none"],
                 "p2": [box("0.5"), box("\\frac{1}{2}"), box("2"), box("2")],
                 "p3": [box("4"), box("4"), box("4"), box("5")]})
    reqs = [RolloutRequest(uid=u, prompt_ids=[1, 2]) for u in ("p1", "p2", "p3")]
    res = evaluate(engine, reqs, ["7", "1/2", "5"], samples=4, temperature=1.0, top_p=1.0,
                   max_new_tokens=8, seed=0)
    assert res.n == 3 and res.samples == 4
    assert res.greedy_pass1 == 1 / 3
    assert res.sampled_pass1 == 5 / 12
    assert res.maj_at_g == 2 / 3
    assert res.format_ok == 11 / 12
    table = format_table({"before": res, "after": EvalResult(**res.as_dict())})
    assert table.count("| 0.333 | 0.417 | 0.667 |") == 2
