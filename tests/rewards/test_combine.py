import math
import re
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_selfjudge.config import CalibrationConfig
from megatron_selfjudge.rewards.combine import (LABEL_MONITOR_SUMS, REWARD_MODES, compute_rewards, format_ok,
                                               label_monitor_means)

FORMAT_RE = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)  # the spec's regex


def g_ref(s):
    """The method's g(s) with its defaults, written out independently."""
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    return min(1.2, max(0.8, 1 + 0.2 * sig((s - 0.95) / 0.02) - 0.2 * sig((0.40 - s) / 0.05)))


# Two groups, rows interleaved. Group "p1": answers 2, 4/2 (same class), 3, none.
# Group 7: empty response, A, (A) (same class as A).
RESPONSES = [
    "<think>a</think> \\boxed{2}",          # r0 p1 ok
    "",                                      # r4 7  empty: no answer, bad format
    "<think>b</think> so \\boxed{\\frac{4}{2}}",  # r1 p1 ok
    "<think>x</think>\\boxed{A}",            # r5 7  ok
    "no think \\boxed{3}",                   # r2 p1 bad format
    "<think>y</think>\\boxed{(A)}",          # r6 7  ok
    "<think>c</think> no box",               # r3 p1 bad format, no answer
]
GROUPS = ["p1", 7, "p1", 7, "p1", 7, "p1"]
JUDGE = [1.0, 0.9, [0.5, None], None, 0.95, 0.0, 0.4]
PRIOR = [0.5, 0.0, 0.5, 2 / 3, 0.25, 2 / 3, 0.0]
FMT = [True, False, True, True, False, True, False]


def test_shared_fields():
    res = compute_rewards(RESPONSES, GROUPS, "majority")
    assert res.answers == ["2", None, "\\frac{4}{2}", "A", "3", "(A)", None]
    assert res.format_ok == FMT
    assert res.classes == [0, None, 0, 0, 1, 0, None]
    assert res.prior == pytest.approx(PRIOR)
    assert res.pseudo_labels == ["2", "A", "2", "A", "2", "A", "2"]
    assert res.judge_scores is None and res.gt_correct is None


def test_majority_and_consistency_hand_computed():
    assert compute_rewards(RESPONSES, GROUPS, "majority").rewards == [1, 0, 1, 1, 0, 1, 0]
    assert compute_rewards(RESPONSES, GROUPS, "consistency").rewards == pytest.approx(PRIOR)


def test_judge_hand_computed_zero_policy():
    res = compute_rewards(RESPONSES, GROUPS, "judge", judge_scores=JUDGE)
    s = [1.0, 0.9, 0.25, 0.0, 0.95, 0.0, 0.4]
    assert res.judge_scores == pytest.approx(s)
    assert res.num_judge_unparsed == 2
    expected = [
        0.5 * 1.18482714,      # g(1) check value
        0.0,                   # p = 0, penalty, clipped at 0
        0.5 * g_ref(0.25),
        2 / 3 * 0.80006707,    # unparsed counted as s = 0: g(0) check value
        0.0,                   # 0.25 * 1.1 - 0.5 < 0, clipped
        2 / 3 * 0.80006707,
        0.0,                   # p = 0 and penalty
    ]
    assert res.rewards == pytest.approx(expected, abs=1e-7)


def test_judge_hand_computed_neutral_policy():
    res = compute_rewards(RESPONSES, GROUPS, "judge", judge_scores=JUDGE, unparsed_policy="neutral")
    assert res.num_judge_unparsed == 2
    assert math.isnan(res.judge_scores[3]) and res.calibration[3] == 1.0
    assert res.rewards[2] == pytest.approx(0.5 * g_ref(0.5))  # mean over the parsed sample only
    assert res.rewards[3] == pytest.approx(2 / 3)  # neutral: g = 1, reward = prior


def test_judge_raw_hand_computed():
    res = compute_rewards(RESPONSES, GROUPS, "judge_raw", judge_scores=JUDGE)
    assert res.rewards == pytest.approx([1.0, 0.4, 0.25, 0.0, 0.45, 0.0, -0.1])
    res = compute_rewards(RESPONSES, GROUPS, "judge_raw", judge_scores=JUDGE, unparsed_policy="neutral",
                          format_penalty=0.25)
    # neutral row takes its group's mean parsed score (0.9 + 0.0) / 2
    assert res.rewards == pytest.approx([1.0, 0.65, 0.5, 0.45, 0.7, 0.0, 0.15])


def test_ground_truth_and_pseudo_label_acc():
    gts = ["2", "B", "2", "B", "2", "B", "2"]
    res = compute_rewards(RESPONSES, GROUPS, "ground_truth", ground_truths=gts)
    assert res.rewards == [1, 0, 1, 0, 0, 0, 0]
    assert res.pseudo_label_acc == 0.5  # p1's majority "2" is right, 7's "A" is not
    res = compute_rewards(RESPONSES, GROUPS, "majority", ground_truths=["2.0"] * 7)
    assert res.gt_correct == [True, False, True, False, False, False, False]
    m = label_monitor_means(res.metrics())
    assert m["pseudo_label_acc"] == 0.5 and m["gt_acc"] == pytest.approx(2 / 7)
    assert not any(k in m for k in LABEL_MONITOR_SUMS)


def test_label_monitors_skip_unlabelled_rows_and_add_up_over_ranks():
    # A mixed file: group p1 has labels, group 7 none. Its rows are left out, not counted wrong.
    gts = ["2", None, "2", None, "2", None, "2"]
    res = compute_rewards(RESPONSES, GROUPS, "majority", ground_truths=gts)
    assert res.gt_correct == [True, None, True, None, False, None, False]
    m = label_monitor_means(res.metrics())
    assert m["gt_acc"] == pytest.approx(2 / 4) and m["pseudo_label_acc"] == 1.0  # p1's majority "2" is right
    with pytest.raises(ValueError, match="row 1 has none"):
        compute_rewards(RESPONSES, GROUPS, "ground_truth", ground_truths=gts)
    # Two data-parallel ranks, one holding only the unlabelled group: the same keys on both ranks
    # (the trainer reduces them in one all-reduce), and their sums give the whole batch's means.
    p1 = [i for i, g in enumerate(GROUPS) if g == "p1"]
    g7 = [i for i, g in enumerate(GROUPS) if g == 7]
    halves = [compute_rewards([RESPONSES[i] for i in rows], [GROUPS[i] for i in rows], "majority",
                              ground_truths=[gts[i] for i in rows]).metrics() for rows in (p1, g7)]
    assert sorted(halves[0]) == sorted(halves[1])
    summed = label_monitor_means({k: halves[0][k] + halves[1][k] for k in LABEL_MONITOR_SUMS})
    assert summed == pytest.approx({"gt_acc": m["gt_acc"], "pseudo_label_acc": m["pseudo_label_acc"]})
    # No label anywhere: neither monitor is logged (rather than a made-up 0).
    assert label_monitor_means(halves[1]).keys().isdisjoint({"gt_acc", "pseudo_label_acc"})


def _group_of(answers, uid="q"):
    responses = [f"<think>t</think> \\boxed{{{a}}}" if a is not None else "<think>t</think>"
                 for a in answers]
    return responses, [uid] * len(answers)


def test_gate_seven_and_six_of_eight():
    r, g = _group_of(["5"] * 7 + ["6"])
    assert compute_rewards(r, g, "consistency").rewards == [1.0] * 7 + [0.0]
    assert compute_rewards(r, g, "consistency", consistency_gate=1.0).rewards == \
        [0.875] * 7 + [0.125]
    r, g = _group_of(["5", "6", "5", "5", "6", "5", "5", "5.0"])
    assert compute_rewards(r, g, "consistency").rewards == \
        [0.75, 0.25, 0.75, 0.75, 0.25, 0.75, 0.75, 0.75]
    # the same group under exact equivalence: "5.0" is its own class, 5/8 agree
    assert compute_rewards(r, g, "consistency", equivalence="exact").rewards == \
        [0.625, 0.25, 0.625, 0.625, 0.25, 0.625, 0.625, 0.125]


def test_all_missing_group_and_empty_responses():
    r, g = ["", "", "<think></think>"], [1, 1, 1]
    for mode in ("majority", "consistency", "judge"):
        res = compute_rewards(r, g, mode, judge_scores=[0.9, None, 1.0])
        assert res.rewards == [0.0, 0.0, 0.0]
        assert res.pseudo_labels == [None] * 3
    res = compute_rewards(r, g, "judge_raw", judge_scores=[0.9, 0.1, 1.0])
    assert res.rewards == pytest.approx([0.4, -0.4, 0.5])


def test_calibration_overrides_and_empty_batch():
    r, g = _group_of(["5", "5"])
    res = compute_rewards(r, g, "judge", judge_scores=[1.0, 0.0], calibration=CalibrationConfig(g_max=1.0, g_min=1.0))
    assert res.rewards == [1.0, 1.0]  # g pinned to 1: reward = prior
    empty = compute_rewards([], [], "ground_truth", ground_truths=[])
    assert empty.rewards == [] and empty.pseudo_label_acc is None


def test_result_helpers():
    res = compute_rewards(RESPONSES, GROUPS, "judge", judge_scores=JUDGE)
    t = res.as_tensor()
    assert t.dtype == torch.float32 and t.shape == (7,)
    m = res.metrics()
    assert m["judge_unparsed"] == 2.0 and m["format_ok_frac"] == pytest.approx(4 / 7)
    assert m["answer_frac"] == pytest.approx(5 / 7)
    assert set(REWARD_MODES) == {"majority", "consistency", "judge", "judge_raw", "ground_truth", "random",
                                 "agreement", "self_certainty", "neg_entropy", "ttrl"}


def test_random_control_draws_bernoulli_from_the_seed():
    res = compute_rewards(RESPONSES, GROUPS, "random", ground_truths=["4"] * 7, seed=11)
    # The stream the control run has always used: torch.randint(0, 2) from Generator(seed).
    expected = torch.randint(0, 2, (7,), generator=torch.Generator().manual_seed(11)).float().tolist()
    assert res.rewards == expected and set(res.rewards) <= {0.0, 1.0}
    assert compute_rewards(RESPONSES, GROUPS, "random", seed=11).rewards == expected
    assert compute_rewards(RESPONSES, GROUPS, "random", seed=12).rewards != expected or len(set(expected)) == 1
    majority = compute_rewards(RESPONSES, GROUPS, "majority", ground_truths=["4"] * 7)
    # the label-free monitors are those of the majority vote, only the rewards are random
    assert res.majority == majority.majority and res.pseudo_label_acc == majority.pseudo_label_acc


def test_bad_inputs():
    with pytest.raises(ValueError, match="reward mode"):
        compute_rewards(["x"], [0], "vibes")
    with pytest.raises(ValueError, match="group_ids"):
        compute_rewards(["x", "y"], [0], "majority")
    with pytest.raises(ValueError, match="judge_scores"):
        compute_rewards(["x"], [0], "judge")
    with pytest.raises(ValueError, match="judge_scores"):
        compute_rewards(["x"], [0], "judge", judge_scores=[0.1, 0.2])
    with pytest.raises(ValueError, match="ground_truths"):
        compute_rewards(["x"], [0], "ground_truth")
    with pytest.raises(ValueError, match="format_penalty"):
        compute_rewards(["x"], [0], "majority", format_penalty=-1)
    with pytest.raises(ValueError, match="seed"):
        compute_rewards(["x"], [0], "random")
    with pytest.raises(ValueError, match="equivalence mode"):
        compute_rewards(["x"], [0], "majority", equivalence="loose")
    with pytest.raises(TypeError, match=r"group_ids\[0\]"):
        compute_rewards(["x"], [[0]], "majority")
    with pytest.raises(TypeError, match=r"responses\[0\]"):
        compute_rewards([None], [0], "majority")


# ------------------------------------------------------------------ format term

TOKENS = ["<think>", "</think>", "\\boxed{", "}", "{", "a", "\n", " ", "<", "think>", "\\boxed"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=10))
def test_format_ok_matches_spec_regex(tokens):
    text = "".join(tokens)
    assert format_ok(text) == bool(FORMAT_RE.fullmatch(text))


def test_format_ok_megabyte_fast():
    cases = [
        ("<think>" + "x" * 1_000_000 + "</think>" + "\\boxed{" * 100_000, False),
        ("<think>" + "</think>" * 100_000 + "\\boxed{1}" + "y" * 1_000_000, True),
        ("<think>" * 150_000, False),
        (" <think></think>\\boxed{1}", False),  # the whole response must match
    ]
    for text, expected in cases:
        t0 = time.perf_counter()
        assert format_ok(text) is expected
        assert time.perf_counter() - t0 < 0.5


# ------------------------------------------------------------------ properties

VOCAB = [None, "1", "2", "0.5", "\\frac{1}{2}", "A", "(A)", "x+1", "1+x", "7"]
row_st = st.tuples(
    st.sampled_from(["u1", "u2", 3]),
    st.sampled_from(VOCAB),
    st.booleans(),  # well formatted?
    st.one_of(st.none(), st.floats(0, 1), st.lists(st.one_of(st.none(), st.floats(0, 1)),
                                                     min_size=1, max_size=3)),
)


def _build(rows):
    responses = []
    for _, ans, ok, _ in rows:
        box = "" if ans is None else f"\\boxed{{{ans}}}"
        responses.append(f"<think>r</think> {box}" if ok else f"answer {box}")
    return responses, [r[0] for r in rows], [r[3] for r in rows]


def _unique_top(uids, classes):
    """True when no group has a tie for the most frequent class (majority is then order-free)."""
    groups = {}
    for uid, cls in zip(uids, classes):
        if cls is not None:
            groups.setdefault(uid, []).append(cls)
    for members in groups.values():
        counts = sorted((members.count(c) for c in set(members)), reverse=True)
        if len(counts) > 1 and counts[0] == counts[1]:
            return False
    return True


@settings(max_examples=40, deadline=None)
@given(st.lists(row_st, min_size=1, max_size=12), st.randoms(use_true_random=False),
       st.sampled_from(["zero", "neutral"]), st.sampled_from(["normalized", "symbolic"]))
def test_permutation_bounds_and_no_nan(rows, rnd, policy, equivalence):
    perm = list(range(len(rows)))
    rnd.shuffle(perm)
    responses, uids, judge = _build(rows)
    p_responses, p_uids, p_judge = _build([rows[i] for i in perm])
    gts = ["1" if u == "u1" else "A" for u in uids]
    p_gts = [gts[i] for i in perm]
    for mode in REWARD_MODES:
        if REWARD_MODES[mode].needs_token_stats or REWARD_MODES[mode].needs_votes:
            continue  # their extra inputs are crafted in tests/rewards/test_baselines.py
        kw = dict(judge_scores=judge, ground_truths=gts, unparsed_policy=policy,
                  equivalence=equivalence, timeout=30.0, seed=3)
        res = compute_rewards(responses, uids, mode, **kw)
        kw.update(judge_scores=p_judge, ground_truths=p_gts)
        p_res = compute_rewards(p_responses, p_uids, mode, **kw)
        r = res.rewards
        assert all(not math.isnan(x) for x in r)
        low = -0.5 if mode == "judge_raw" else 0.0
        assert all(low <= x <= 1.0 for x in r), (mode, r)
        if mode == "random":  # drawn in row order: a control, not a function of the responses
            assert set(r) <= {0.0, 1.0}
        elif mode != "majority" or _unique_top(uids, res.classes):
            assert p_res.rewards == pytest.approx([r[i] for i in perm]), mode
        assert p_res.num_judge_unparsed == res.num_judge_unparsed
        # rows without an answer never earn anything from agreement
        for x, a in zip(r, res.answers):
            if a is None and mode in ("majority", "consistency", "judge", "ground_truth"):
                assert x == 0.0


def _mixed_label_ranks_worker(rank: int, world: int, gts: list) -> dict:
    from megatron_selfjudge.megatron.parallel import initialize_parallel
    from megatron_selfjudge.trainer import reduce_step_monitors

    initialize_parallel(tp=1, pp=1, seed=0)  # two data-parallel ranks
    rows = [i for i, g in enumerate(GROUPS) if (g == "p1") == (rank == 0)]
    res = compute_rewards([RESPONSES[i] for i in rows], [GROUPS[i] for i in rows], "judge",
                          judge_scores=[0.9] * len(rows), ground_truths=[gts[i] for i in rows])
    return reduce_step_monitors({**res.metrics(), "reward_mean": 0.5})


@pytest.mark.slow  # two spawned gloo ranks
def test_step_monitors_over_two_ranks_of_which_one_has_no_labels():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "megatron"))
    from dist_utils import run_distributed

    # Rank 0 holds group p1 (labelled), rank 1 group 7 (unlabelled): the per-rank key sets must
    # agree for the one all-reduce, and the result is the whole batch's, computed here on one process.
    gts = ["2", None, "2", None, "2", None, "2"]
    whole = compute_rewards(RESPONSES, GROUPS, "judge", judge_scores=[0.9] * 7, ground_truths=gts)
    want = label_monitor_means(whole.metrics())
    for got in run_distributed(_mixed_label_ranks_worker, 2, gts, timeout=120):
        assert got["gt_acc"] == pytest.approx(want["gt_acc"]) and got["pseudo_label_acc"] == want["pseudo_label_acc"]
        assert got["judge_score_right"] == pytest.approx(0.9) and got["judge_score_mean"] == pytest.approx(0.9)
        assert got["reward_mean"] == pytest.approx(0.5) and not any(k in got for k in LABEL_MONITOR_SUMS)
