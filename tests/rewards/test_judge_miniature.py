"""The generative Judge in miniature: the short rubric, flawed solutions, the judging warm-start pairs
(scores by hand from the rubric's weights) and the Judge monitor metrics."""
import math
import re

import numpy as np
import pytest

from megatron_selfjudge.config import ConfigError, load_config
from megatron_selfjudge.data.prompts import format_response, sft_target
from megatron_selfjudge.data.synthetic import FAMILIES, flawed_solutions, make_synthetic_splits
from megatron_selfjudge.data.task import PROMPT_KIND, judging_pairs, load_task
from megatron_selfjudge.rewards.combine import JUDGE_MONITOR_SUMS, compute_rewards, judge_monitor_means
from megatron_selfjudge.rewards.judge import build_judge_prompt, parse_judge_output


@pytest.fixture(scope="module")
def examples():
    return make_synthetic_splits(seed=5, n_sft=64, n_unlabeled=1, n_test=0)["train_sft"]


def test_short_rubric_is_the_question_and_the_candidate():
    assert build_judge_prompt(" Add the two digits. ", "<think>3+4=7</think>\\boxed{7}", "short") == \
        "Add the two digits. Grade: <think>3+4=7</think>\\boxed{7}"
    assert "answer_correctness (weight 0.5)" in build_judge_prompt("q", "r")  # the paper's, by default
    with pytest.raises(ValueError, match="judge.rubric: unknown 'long'"):
        build_judge_prompt("q", "r", "long")
    with pytest.raises(ConfigError, match="judge.rubric"):
        load_config(None, ["judge.rubric=long"])


def _value(trace: str) -> int:
    """The result a trace states (its last number; 'none' counts zero)."""
    return 0 if trace == "none" else int(re.split(r"[=, ]", trace)[-1])


def test_every_flaw_is_wrong_in_its_own_way(examples):
    seen = set()
    for i, ex in enumerate(examples):
        flaws = flawed_solutions(ex, np.random.default_rng(i))
        kinds = [k for k, _, _ in flaws]
        assert len(set(kinds)) == len(kinds) and "mismatch" in kinds
        for kind, trace, answer in flaws:
            seen.add((ex.family, kind))
            assert answer != ex.answer, (ex.question, kind, trace, answer)  # every flaw ends in a wrong answer
            if kind == "mismatch":  # the right trace, another boxed value
                assert trace == ex.reasoning and _value(trace) != int(answer)
            elif kind == "misread":  # other values read, followed correctly to the trace's own result
                assert trace != ex.reasoning and _value(trace) == int(answer)
            else:  # slip: the right values, a wrong result
                assert kind == "slip" and _value(trace) == int(answer)
                assert trace.rsplit("=" if "=" in trace else " ", 1)[0] == \
                    ex.reasoning.rsplit("=" if "=" in ex.reasoning else " ", 1)[0]
    assert {f for f, _ in seen} == set(FAMILIES) and {k for _, k in seen} == {"mismatch", "misread", "slip"}


def test_judging_pairs_score_by_the_rubric_weights(examples):
    pairs = judging_pairs(examples, seed=0, rubric="short")
    assert len(pairs) == 2 * len(examples)
    # Hand-computed: right 0.5 + 0.3 + 0.2; misread keeps only reasoning (0.3); slip and mismatch only grounding.
    want = {"right": 1.0, "misread": 0.3, "slip": 0.2, "mismatch": 0.2}
    flaws = set()
    for k, ex in enumerate(examples):
        for rec, target in pairs[2 * k:2 * k + 2]:
            flaw = rec.meta["flaw"]
            flaws.add(flaw)
            assert rec.meta[PROMPT_KIND] == "judge" and rec.images == [ex.image] and rec.answer is None
            candidate = rec.question.split(" Grade: ", 1)[1]
            assert rec.question == build_judge_prompt(ex.question, candidate, "short")
            if flaw == "right":
                assert candidate == sft_target(ex)
            # The Judge first reads the image itself (the true trace), then boxes the score the parser reads.
            assert target.startswith(f"<think>{ex.reasoning}</think>")
            assert parse_judge_output(target) == pytest.approx(want[flaw])
        assert [r.meta["flaw"] for r, _ in pairs[2 * k:2 * k + 2]][0] == "right"
    assert flaws == set(want)


BASE = ["data.synthetic_sft=8", "data.synthetic_unlabeled=16", "data.synthetic_test=2", "trainer.prompts_per_step=4",
        "trainer.mini_batch_prompts=2", "judge.kind=generative", "judge.rubric=short", "judge.max_prompt_len=96",
        "judge.max_tokens=16"]


def test_config_adds_judging_pairs():
    task = load_task(load_config(None, BASE + ["data.synthetic_sft_judge=3", "data.synthetic_sft_ask=2"]))
    kinds = [r.meta.get(PROMPT_KIND) for r, _ in task.sft]
    assert kinds == [None] * 8 + ["ask", "ask", None] * 2 + ["judge"] * 6
    with pytest.raises(ConfigError, match=r"data.synthetic_sft_judge=9 is out of range"):
        load_config(None, BASE + ["data.synthetic_sft_judge=9"])
    # Without a generative Judge in the reward the model's context is not sized for Judge prompts.
    for other in ("judge.kind=likelihood", "reward.mode=majority"):
        with pytest.raises(ConfigError, match=r"data.synthetic_sft_judge=3 is out of range: must be 0 unless "
                                              r"data.train=synthetic, judge.kind=generative"):
            load_config(None, BASE + ["data.synthetic_sft_judge=3", other])


def _checked(overrides):
    """Trainer.check_prompt_lengths on the run's task, without building any model."""
    from megatron_selfjudge.megatron.models.family import build_family
    from megatron_selfjudge.trainer import Trainer

    tr = Trainer.__new__(Trainer)
    tr.cfg = load_config(None, BASE + overrides)
    tr.task, tr.family = load_task(tr.cfg), build_family(tr.cfg)
    tr.tokenizer = tr.family.tokenizer
    tr.check_prompt_lengths()


def test_judge_targets_must_fit_what_the_judge_may_write():
    from megatron_selfjudge.data.datasets import DatasetError

    _checked(["data.synthetic_sft_judge=8", "data.synthetic_families=[add]"])  # <think>a+b=s</think>\boxed{0.3}
    # Counting traces are longer: "<think>1,2,...,9</think>\boxed{1}" would always be cut off at 16 tokens.
    with pytest.raises(DatasetError, match=r"synthetic:train_sft_judge row \d+: warm-start target of \d+ tokens "
                                           r"\(with EOS\) exceeds judge.max_tokens=16"):
        _checked(["data.synthetic_sft_judge=8", "data.synthetic_families=[count]"])
    _checked(["data.synthetic_sft_judge=8", "data.synthetic_families=[count]", "judge.max_tokens=32"])
    # The same bound for a taught question against rollout.max_response_len ("What is the left digit?" is 24
    # characters); a solution target may be longer than the rollouts (a warm start of longer traces).
    with pytest.raises(DatasetError, match=r"synthetic:train_sft_ask row 0: warm-start target .* exceeds "
                                           r"rollout.max_response_len=16"):
        _checked(["rollout.max_response_len=16", "data.synthetic_sft_ask=2", "data.synthetic_families=[add]"])
    _checked(["rollout.max_response_len=8", "data.synthetic_families=[add]"])


def test_judge_monitor_by_hand_and_over_ranks():
    right, wrong = format_response("1+2=3", "3"), format_response("1+2=4", "4")
    responses = [right, wrong, right, wrong]
    kw = dict(ground_truths=["3"] * 4, unparsed_policy="neutral")
    res = compute_rewards(responses, [0, 0, 1, 1], "judge", judge_scores=[0.9, 0.3, None, 0.1], **kw)
    m = judge_monitor_means(res.metrics())
    assert not any(k in m for k in JUDGE_MONITOR_SUMS)
    # Row 2 is unparsed (neutral): left out. Right answers: 0.9; wrong: (0.3 + 0.1) / 2; all: 1.3 / 3.
    assert m["judge_score_right"] == pytest.approx(0.9) and m["judge_score_wrong"] == pytest.approx(0.2)
    assert m["judge_score_mean"] == pytest.approx(1.3 / 3)
    # Two data-parallel halves: their sums add up to the whole batch's (what the trainer reduces).
    halves = [compute_rewards(responses[k:k + 2], [0, 0], "judge", judge_scores=s, ground_truths=["3"] * 2,
                              unparsed_policy="neutral").metrics() for k, s in ((0, [0.9, 0.3]), (2, [None, 0.1]))]
    summed = judge_monitor_means({key: halves[0][key] + halves[1][key] for key in JUDGE_MONITOR_SUMS})
    assert summed == pytest.approx({k: m[k] for k in ("judge_score_mean", "judge_score_right", "judge_score_wrong")})
    # No right answer anywhere: that mean is None rather than a made-up number; no Judge, no keys.
    only_wrong = judge_monitor_means(compute_rewards([wrong], [0], "judge", judge_scores=[0.4], **{
        **kw, "ground_truths": ["3"]}).metrics())
    assert only_wrong["judge_score_right"] is None and only_wrong["judge_score_wrong"] == pytest.approx(0.4)
    assert not any(k.startswith("judge_score") for k in compute_rewards([right], [0], "majority").metrics())
    assert math.isfinite(m["judge_score_mean"])
