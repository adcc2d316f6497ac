import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_selfjudge.config import CalibrationConfig
from megatron_selfjudge.rewards.judge import (
    CRITERIA_WEIGHTS, build_judge_prompt, calibrate, parse_judge_output, resolve_judge_scores,
)

# The method's check values of g(s) (docs/method.md), to the precision printed there.
CHECK_VALUES = [(0.0, 0.8001, 4), (0.4, 0.90, 2), (0.5, 0.976, 3), (0.95, 1.10, 2), (1.0, 1.1848, 4)]


@pytest.mark.parametrize("s,expected,digits", CHECK_VALUES)
def test_calibration_check_values(s, expected, digits):
    assert round(calibrate(s), digits) == expected
    assert round(float(calibrate(np.array([s]))[0]), digits) == expected
    assert round(float(calibrate(torch.tensor([s]))[0]), digits) == expected


def _reference_g(s, tau_h=0.95, tau_l=0.40, kappa_h=0.02, kappa_l=0.05, alpha_h=0.2, alpha_l=0.2,
                 g_min=0.8, g_max=1.2):
    s = min(1.0, max(0.0, s))
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    g = 1 + alpha_h * sig((s - tau_h) / kappa_h) - alpha_l * sig((tau_l - s) / kappa_l)
    return min(g_max, max(g_min, g))


def test_calibration_backends_agree_with_reference():
    s = np.linspace(-0.5, 1.5, 201)
    ref = np.array([_reference_g(x) for x in s])
    np.testing.assert_allclose(calibrate(s), ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(calibrate(torch.tensor(s)).numpy(), ref, rtol=0, atol=1e-6)
    assert calibrate(torch.tensor(s)).dtype == torch.float32
    np.testing.assert_allclose([calibrate(float(x)) for x in s], ref, rtol=0, atol=1e-12)
    # s is clipped to [0, 1] before anything else
    assert calibrate(-3.0) == calibrate(0.0) and calibrate(7.0) == calibrate(1.0)


def test_calibration_monotone_and_clamped():
    s = np.linspace(0, 1, 1001)
    g = calibrate(s)
    assert np.all(np.diff(g) >= 0)
    assert g.min() >= 0.8 and g.max() <= 1.2
    strong = calibrate(s, CalibrationConfig(alpha_h=1.0, alpha_l=1.0, kappa_h=1e-4, kappa_l=1e-4))  # no overflow
    assert np.isfinite(strong).all() and strong.min() == 0.8 and strong.max() == 1.2
    assert calibrate(1.0, CalibrationConfig(alpha_h=1.0, kappa_h=1e-4)) == 1.2


def test_calibration_reads_every_parameter():
    params = dict(tau_h=0.7, tau_l=0.2, kappa_h=0.1, kappa_l=0.03, alpha_h=0.5, alpha_l=0.3, g_min=0.6, g_max=1.4)
    s = np.linspace(0, 1, 101)
    ref = np.array([_reference_g(x, **params) for x in s])
    np.testing.assert_allclose(calibrate(s, CalibrationConfig(**params)), ref, rtol=0, atol=1e-12)
    assert not np.allclose(ref, calibrate(s))  # the parameters above change g


def test_calibration_bad_params():
    with pytest.raises(ValueError, match="kappa"):
        calibrate(0.5, CalibrationConfig(kappa_h=0.0))
    with pytest.raises(ValueError, match="g_min"):
        calibrate(0.5, CalibrationConfig(g_min=1.3, g_max=1.2))


@pytest.mark.parametrize("text,expected", [
    (r"Looks right. {\"overall_score\": 0.2} \boxed{0.8}", 0.8),
    (r"\boxed{0.2} changed my mind \boxed{0.9}", 0.9),
    (r"\boxed{1.7}", 1.0),
    (r"\boxed{-0.2}", 0.0),
    (r"\boxed{ 0.65. }", 0.65),
    (r"\boxed{$0.5$}", 0.5),
    (r"\boxed{1}", 1.0),
    (r"\boxed{.25}", 0.25),
    ('rationale {"answer_correctness": 1, "overall_score": 0.6} \\boxed{good}', 0.6),
    ('{"scores": {"answer_correctness": 1.0}, "overall_score": 0.42}', 0.42),
    ('{"overall_score": "0.9"}', 0.9),
    ('{"overall_score": 3}', 1.0),
    (r'{"overall_score": 0.3} and \boxed{0.7', 0.3),  # unclosed box: JSON fallback
    ("garbage without any score", None),
    (r"\boxed{nan}", None),
    (r"\boxed{inf}", None),
    ('{"overall_score": NaN}', None),
    ('{"overall_score": true}', None),
    ('{"overall_score": null}', None),
    ('{"overall_score": __import__("os").getcwd()}', None),
    ('{"overall_score": 0.5', None),  # truncated JSON
    ("", None),
])
def test_parse_judge_output(text, expected):
    assert parse_judge_output(text) == expected


def test_parse_judge_output_pathological_fast():
    cases = [
        ("{" * 1_000_000 + '"overall_score": 1}', 1.0),  # the innermost object is valid JSON
        ("{" * 1_000_000 + '"overall_score": 1', None),
        ('{"overall_score": ' * 100_000, None),
        (r"\boxed{" * 100_000, None),
        ("x" * 1_000_000 + r"\boxed{0.5}", 0.5),
    ]
    for text, expected in cases:
        t0 = time.perf_counter()
        out = parse_judge_output(text)
        assert time.perf_counter() - t0 < 0.5
        assert out == expected


def test_parse_rejects_non_str():
    with pytest.raises(TypeError, match="judge output"):
        parse_judge_output(None)


def test_resolve_zero_and_neutral():
    parsed = [0.5, None, [1.0, None], [None, None], [0.2, 0.4, 0.9], 1.3]
    scores, unparsed = resolve_judge_scores(parsed, "zero")
    assert scores == pytest.approx([0.5, 0.0, 0.5, 0.0, 0.5, 1.0])
    assert unparsed == 4
    scores, unparsed = resolve_judge_scores(parsed, "neutral")
    assert unparsed == 4
    assert scores[0] == 0.5 and scores[2] == 1.0 and scores[4] == pytest.approx(0.5)
    assert math.isnan(scores[1]) and math.isnan(scores[3])  # NaN = neutral sentinel


def test_resolve_bad_inputs():
    with pytest.raises(ValueError, match="unparsed_policy"):
        resolve_judge_scores([0.5], "drop")
    with pytest.raises(TypeError, match=r"judge_scores\[1\]"):
        resolve_judge_scores([0.5, "0.7"], "zero")
    with pytest.raises(ValueError, match=r"judge_scores\[0\]"):
        resolve_judge_scores([[]], "zero")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.one_of(st.none(), st.floats(-2, 2)), min_size=1, max_size=4),
                min_size=1, max_size=8))
def test_resolve_bounds(parsed):
    n_none = sum(x is None for row in parsed for x in row)
    zero, u0 = resolve_judge_scores(parsed, "zero")
    assert u0 == n_none and all(0.0 <= s <= 1.0 for s in zero)
    neutral, u1 = resolve_judge_scores(parsed, "neutral")
    assert u1 == n_none
    for row, s in zip(parsed, neutral):
        assert math.isnan(s) == all(x is None for x in row)


def test_prompt_content():
    question, response = "How many red circles?", "<think>I count 3.</think> \\boxed{3}"
    prompt = build_judge_prompt(question, response)
    assert question in prompt and response in prompt
    for name, weight in CRITERIA_WEIGHTS.items():
        assert name in prompt and str(weight) in prompt
    assert math.isclose(sum(CRITERIA_WEIGHTS.values()), 1.0)
    assert "overall_score" in prompt and "<think>" in prompt and "\\boxed{" in prompt
    assert prompt.index("JSON") < prompt.rindex("\\boxed{")  # overall score asked for last
    with pytest.raises(TypeError):
        build_judge_prompt(question, None)
