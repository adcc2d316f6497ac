"""The generative Judge: its rubric prompt, parsing its verdict, and the calibration g(s).

A Judge verdict is untrusted model text: it is read with regexes and `json.loads` only.
Unparseable verdicts are represented as None by `parse_judge_output`; `resolve_judge_scores`
turns them into a per-trajectory score where NaN is the explicit "neutral" sentinel
(no modulation: g = 1), which `combine.compute_rewards` honours.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from megatron_selfjudge.config import CalibrationConfig
from megatron_selfjudge.rewards.answers import extract_boxed

if TYPE_CHECKING:  # torch stays an optional import for the Judge's float path
    import numpy as np
    import torch

CRITERIA_WEIGHTS = {"answer_correctness": 0.5, "reasoning_quality": 0.3, "visual_grounding": 0.2}
# judge.unparsed: what an unparseable Judge sample contributes to its trajectory's mean score.
# A number is averaged in like a parsed score (the reference code's 0.0); None leaves the sample
# out, and a trajectory with no sample left is neutral (NaN: g = 1, no modulation).
UNPARSED_POLICIES: dict[str, float | None] = {"zero": 0.0, "neutral": None}

_PROMPT = """You are grading one candidate solution to a question about the attached image(s).
Do not solve the problem from scratch unless you need to check a step; judge what is written.

Question:
{question}

Candidate solution (everything between the markers):
<<<BEGIN SOLUTION>>>
{response}
<<<END SOLUTION>>>

Score each criterion with a number from 0 to 1:
- answer_correctness (weight {w_answer}): is the final answer right for this image and question?
- reasoning_quality (weight {w_reason}): are the steps valid, relevant and free of contradictions?
- visual_grounding (weight {w_visual}): does the reasoning use what the image really shows
  (values, labels, shapes, positions) rather than invented details?
overall_score = {w_answer} * answer_correctness + {w_reason} * reasoning_quality
              + {w_visual} * visual_grounding.

Validity rule, applied before anything else: if the reasoning is not enclosed in <think> and
</think>, or the final answer does not come after </think>, or the \\boxed{{}} holds anything other
than one final value, then every score, overall_score included, is 0.

Reply in this order:
1. A short rationale (at most five sentences).
2. The scores as one JSON object, for example
   {{"answer_correctness": 0.0, "reasoning_quality": 0.0, "visual_grounding": 0.0, "overall_score": 0.0}}
3. On the last line, the overall score alone inside \\boxed{{}}, for example \\boxed{{0.75}}.
"""

# The compact cue for the tiny character-level policy, whose context holds a few dozen tokens: it
# learns the rubric from its warm start (data.synthetic_sft_judge) instead of reading it.
_SHORT_PROMPT = "{question} Grade: {response}"
RUBRICS = {"full": _PROMPT, "short": _SHORT_PROMPT}  # judge.rubric

_NUMBER_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_KEY = '"overall_score"'
_MAX_JSON_TRIES = 32  # bounded so a verdict full of '{' cannot make parsing quadratic
_MAX_JSON_SPAN = 8192


def build_judge_prompt(question: str, response: str, rubric: str = "full") -> str:
    """Text part of the Judge's input (the caller attaches the image(s)); rubric: a name of RUBRICS."""
    if not isinstance(question, str) or not isinstance(response, str):
        raise TypeError("question and response must be str")
    if rubric not in RUBRICS:
        raise ValueError(f"judge.rubric: unknown {rubric!r}; choose one of {sorted(RUBRICS)}")
    w = CRITERIA_WEIGHTS
    return RUBRICS[rubric].format(
        question=question.strip(), response=response,
        w_answer=w["answer_correctness"], w_reason=w["reasoning_quality"], w_visual=w["visual_grounding"],
    )


def _as_score(value) -> float | None:
    """A finite number (or numeric string) clamped to [0, 1], else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip().rstrip(".").replace("$", "").strip()
        if not _NUMBER_RE.match(text):
            return None  # no float() on text: it would accept 'nan' and 'inf'
        value = float(text)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return min(1.0, max(0.0, float(value)))


def _json_overall(text: str) -> float | None:
    """overall_score of the JSON object holding the last '"overall_score"' key, if any."""
    key_at = text.rfind(_KEY)
    if key_at < 0:
        return None
    decoder = json.JSONDecoder()
    brace = key_at
    for _ in range(_MAX_JSON_TRIES):
        brace = text.rfind("{", max(0, key_at - _MAX_JSON_SPAN), brace)
        if brace < 0:
            return None
        try:
            obj, _ = decoder.raw_decode(text, brace)
        except ValueError:
            continue
        if isinstance(obj, dict) and "overall_score" in obj:
            return _as_score(obj["overall_score"])
    return None


def parse_judge_output(text: str) -> float | None:
    r"""Judge verdict: last \boxed{} as a float in [0,1]; else JSON overall_score; else None."""
    if not isinstance(text, str):
        raise TypeError(f"judge output must be str, got {type(text).__name__}")
    boxed = extract_boxed(text)
    score = _as_score(boxed) if boxed is not None else None
    return score if score is not None else _json_overall(text)


def _sigmoid_float(x: float) -> float:
    # stable on both sides: exp never sees a large positive argument
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _sigmoid_numpy(x):
    import numpy as np

    return 0.5 * (1.0 + np.tanh(0.5 * x))  # tanh form never overflows


def _sigmoid_torch(x):
    import torch

    return torch.sigmoid(x)


def calibrate(s: float | np.ndarray | torch.Tensor,
              params: CalibrationConfig | None = None) -> float | np.ndarray | torch.Tensor:
    """g(s): smooth bounded bonus for high Judge scores, malus for low ones (float/ndarray/tensor).

    params: reward.calibration (None: its dataclass defaults).
    """
    c = CalibrationConfig() if params is None else params
    if c.kappa_h <= 0 or c.kappa_l <= 0:
        raise ValueError(f"kappa_h and kappa_l must be > 0, got {c.kappa_h!r}, {c.kappa_l!r}")
    if c.g_min > c.g_max:
        raise ValueError(f"g_min must be <= g_max, got {c.g_min!r} > {c.g_max!r}")
    module = type(s).__module__.split(".")[0]
    if module == "torch":
        s, sig = s.float().clamp(0.0, 1.0), _sigmoid_torch
    elif module == "numpy":
        import numpy as np

        s, sig = np.clip(np.asarray(s, dtype=np.float64), 0.0, 1.0), _sigmoid_numpy
    else:
        s = float(s)
        if math.isnan(s):
            raise ValueError("judge score s is NaN: map unparsed scores with resolve_judge_scores first")
        s, sig = min(1.0, max(0.0, s)), _sigmoid_float
    g = 1 + c.alpha_h * sig((s - c.tau_h) / c.kappa_h) - c.alpha_l * sig((c.tau_l - s) / c.kappa_l)
    if module == "torch":
        return g.clamp(c.g_min, c.g_max)
    if module == "numpy":
        return np.clip(g, c.g_min, c.g_max)
    return min(c.g_max, max(c.g_min, g))


def resolve_judge_scores(parsed: Sequence[float | None | Sequence[float | None]],
                         policy: str) -> tuple[list[float], int]:
    """Mean of each trajectory's K parsed samples, and the number of unparsed samples.

    policy, a name of UNPARSED_POLICIES: "zero" counts an unparsed sample as 0.0; "neutral"
    leaves it out of the mean, and a trajectory with none parsed gets NaN, meaning "no
    modulation" (combine maps it to g = 1).
    """
    if policy not in UNPARSED_POLICIES:
        raise ValueError(f"unparsed_policy must be one of {tuple(UNPARSED_POLICIES)}, got {policy!r}")
    fill = UNPARSED_POLICIES[policy]
    scores: list[float] = []
    unparsed = 0
    for row, item in enumerate(parsed):
        samples = list(item) if isinstance(item, (list, tuple)) else [item]
        if not samples:
            raise ValueError(f"judge_scores[{row}] holds no samples")
        valid = []
        for x in samples:
            if x is None or (isinstance(x, float) and math.isnan(x)):
                unparsed += 1
                if fill is not None:
                    valid.append(fill)
            elif isinstance(x, (int, float)) and not isinstance(x, bool):
                valid.append(min(1.0, max(0.0, float(x))))
            else:
                raise TypeError(f"judge_scores[{row}] must hold floats or None, got {type(x).__name__}")
        scores.append(sum(valid) / len(valid) if valid else math.nan)
    return scores, unparsed
