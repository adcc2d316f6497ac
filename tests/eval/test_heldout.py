import pytest
import torch

from megatron_selfjudge.eval.heldout import EvalInterrupted, EvalResult, evaluate, format_table
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
                   max_new_tokens=8, seed=0, equivalence="symbolic", timeout=30.0)
    assert res.n == 3 and res.samples == 4
    assert res.greedy_pass1 == 1 / 3
    assert res.sampled_pass1 == 5 / 12
    assert res.maj_at_g == 2 / 3
    assert res.format_ok == 11 / 12
    table = format_table({"before": res, "after": EvalResult(**res.as_dict())})
    assert table.count("| 0.333 | 0.417 | 0.667 |") == 2


class CountingEngine(ScriptedEngine):
    """ScriptedEngine that records the rows of every generate call."""

    def __init__(self, greedy: dict, sampled: dict):
        super().__init__(greedy, sampled)
        self.calls = []

    def generate(self, requests, sampling):
        self.calls.append((sampling.greedy, len(requests) * sampling.n, sampling.seed))
        return super().generate(requests, sampling)


def _engine_and_requests(n_prompts: int, samples: int):
    uids = [f"p{i}" for i in range(n_prompts)]
    engine = CountingEngine(greedy={u: box("1") for u in uids},
                            sampled={u: [box("1")] * (samples - 1) + [box("2")] for u in uids})
    return engine, [RolloutRequest(uid=u, prompt_ids=[1]) for u in uids], ["1"] * n_prompts


def test_batches_bound_each_generation_call():
    engine, reqs, labels = _engine_and_requests(5, samples=4)
    res = evaluate(engine, reqs, labels, samples=4, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3,
                   batch_size=8, equivalence="exact", timeout=5.0)
    # Greedy: 5 rows in batches of <= 8; sampled: 20 rows, 2 prompts (8 rows) per call.
    assert [rows for greedy, rows, _ in engine.calls] == [5, 8, 8, 4]
    assert len({seed for greedy, _, seed in engine.calls if not greedy}) == 3  # a distinct stream per batch
    assert (res.greedy_pass1, res.sampled_pass1, res.maj_at_g, res.format_ok) == (1.0, 0.75, 1.0, 1.0)


def test_stop_request_interrupts_between_batches():
    engine, reqs, labels = _engine_and_requests(6, samples=2)
    polls = []

    def should_stop() -> bool:
        polls.append(len(engine.calls))
        return len(engine.calls) == 3  # signal arrives during the third generation batch

    with pytest.raises(EvalInterrupted):
        evaluate(engine, reqs, labels, samples=2, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=0,
                 batch_size=2, should_stop=should_stop, equivalence="exact", timeout=5.0)
    assert len(engine.calls) == 3  # stopped right after the batch in flight, nothing more generated
    assert polls == [0, 1, 2, 3]  # polled before every batch
