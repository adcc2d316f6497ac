"""One entry point for every reward mode (docs/method.md, "Rewards"), computed per prompt group.

Rows are trajectories in any order; `group_ids` holds each row's prompt uid (any hashable);
groups may have any size. Modes live in `REWARD_MODES` (name -> RewardMode: its function and
the inputs it needs), verl-style; config validation reads the names from there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from megatron_selfjudge.config import CalibrationConfig, JudgeConfig, RewardConfig
from megatron_selfjudge.rewards.answers import answer_classes, answers_equivalent, extract_boxed
from megatron_selfjudge.rewards.baselines import ResponseStats, agreement_rewards
from megatron_selfjudge.rewards.consistency import consistency_prior, majority_rewards
from megatron_selfjudge.rewards.judge import calibrate, resolve_judge_scores

_THINK_OPEN, _THINK_CLOSE, _BOX = "<think>", "</think>", "\\boxed{"


def format_ok(response: str) -> bool:
    r"""Whether the whole response matches `<think>.*</think>.*\boxed\{.*\}.*` (DOTALL).

    Equivalent to that regex but linear: each `.*` may match anything, so taking the
    earliest occurrence of each literal is always a valid match when any match exists.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be str, got {type(response).__name__}")
    if not response.startswith(_THINK_OPEN):
        return False
    close = response.find(_THINK_CLOSE, len(_THINK_OPEN))
    if close < 0:
        return False
    box = response.find(_BOX, close + len(_THINK_CLOSE))
    return box >= 0 and response.find("}", box + len(_BOX)) >= 0


@dataclass
class RewardResult:
    """Rewards and everything that went into them, one entry per row unless noted."""

    rewards: list[float]
    answers: list[str | None]
    classes: list[int | None]  # answer class id within the row's group (None: no answer)
    format_ok: list[bool]
    prior: list[float]  # consistency prior p_i (after the confidence gate)
    majority: list[float]  # 1[a_i == group mode]; the mode over the group and its extra votes, if any
    pseudo_labels: list[str | None]  # the majority answer of the row's group (and its extra votes)
    judge_scores: list[float] | None = None  # mean Judge score; NaN = neutral (no score)
    calibration: list[float] | None = None  # g(s_i); 1.0 for neutral rows
    num_judge_unparsed: int = 0  # unparseable Judge samples (not trajectories)
    # Answer matches ground truth (monitoring; None for a row without a label).
    gt_correct: list[bool | None] | None = None
    pseudo_label_hits: int = 0  # labelled groups whose majority answer is right
    pseudo_label_groups: int = 0  # groups with a label
    response_stats: ResponseStats | None = None  # per-row mean token entropy and self-certainty

    @property
    def pseudo_label_acc(self) -> float | None:
        """Fraction of labelled groups whose majority answer is right (None: no group had a label)."""
        return self.pseudo_label_hits / self.pseudo_label_groups if self.pseudo_label_groups else None

    def as_tensor(self):
        """Rewards as an fp32 torch tensor [N]."""
        import torch

        return torch.tensor(self.rewards, dtype=torch.float32)

    def metrics(self) -> dict[str, float]:
        """Scalar summaries for logging."""
        n = max(1, len(self.rewards))
        out = {
            "reward_mean": sum(self.rewards) / n,
            "format_ok_frac": sum(self.format_ok) / n,
            "answer_frac": sum(a is not None for a in self.answers) / n,
            "judge_unparsed": float(self.num_judge_unparsed),
        }
        # Label monitors as sums and counts, present on every rank even where no row has a label, so
        # the key set is the same on all data-parallel ranks (label_monitor_means divides).
        labelled = [c for c in (self.gt_correct or []) if c is not None]
        out.update(gt_correct_sum=float(sum(labelled)), gt_rows=float(len(labelled)),
                   pseudo_label_hits=float(self.pseudo_label_hits), pseudo_label_groups=float(self.pseudo_label_groups))
        if self.response_stats is not None:
            out["self_certainty_mean"] = sum(self.response_stats.self_certainty) / n
        if self.judge_scores is not None:
            # Sums and row counts (they add up over data-parallel ranks; judge_monitor_means divides).
            # Right/wrong is monitoring only (labels never reach a label-free reward): does the Judge
            # score right answers higher than wrong ones?
            correct = self.gt_correct or [None] * len(self.judge_scores)
            for part, want in (("", None), ("_right", True), ("_wrong", False)):
                scores = [s for s, ok in zip(self.judge_scores, correct)
                          if not math.isnan(s) and (want is None or ok is want)]
                out[f"judge_score{part}_sum"], out[f"judge_scored{part}_rows"] = float(sum(scores)), float(len(scores))
        return out


JUDGE_MONITOR_SUMS = tuple(f"judge_{kind}{part}_{x}" for part in ("", "_right", "_wrong")
                           for kind, x in (("score", "sum"), ("scored", "rows")))


def judge_monitor_means(metrics: dict) -> dict:
    """Replace RewardResult.metrics' Judge sums by judge_score_mean / _right / _wrong (None: no such row)."""
    for part in ("", "_right", "_wrong"):
        total, rows = metrics.pop(f"judge_score{part}_sum", None), metrics.pop(f"judge_scored{part}_rows", None)
        if rows is not None:
            metrics[f"judge_score{'_mean' if not part else part}"] = total / rows if rows else None
    return metrics


LABEL_MONITOR_SUMS = ("gt_correct_sum", "gt_rows", "pseudo_label_hits", "pseudo_label_groups")


def label_monitor_means(metrics: dict) -> dict:
    """Replace RewardResult.metrics' label sums by gt_acc and pseudo_label_acc (left out when no row
    or group of the batch had a label)."""
    for mean, total, count in (("gt_acc", "gt_correct_sum", "gt_rows"),
                               ("pseudo_label_acc", "pseudo_label_hits", "pseudo_label_groups")):
        hits, rows = metrics.pop(total, None), metrics.pop(count, None)
        if rows:
            metrics[mean] = hits / rows
    return metrics


def _group_rows(group_ids: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    groups: dict[Hashable, list[int]] = {}
    for row, uid in enumerate(group_ids):
        try:
            groups.setdefault(uid, []).append(row)
        except TypeError as exc:
            raise TypeError(f"group_ids[{row}] must be hashable, got {type(uid).__name__}") from exc
    return groups


@dataclass(frozen=True)
class ModeInputs:
    """What a reward mode reads besides the RewardResult: the groups, the format terms, a seed."""

    groups: dict[Hashable, list[int]]  # prompt uid -> its rows
    penalties: list[float]  # f_i: 0, or -format_penalty when the format is broken
    seed: int | None
    agreement_gamma: float = RewardConfig.agreement_gamma


def _judge(res: RewardResult, inputs: ModeInputs) -> list[float]:
    """r = clip(p * g(s) + f, 0, 1); a neutral row (NaN score) has g = 1."""
    return [min(1.0, max(0.0, p * g + f)) for p, g, f in zip(res.prior, res.calibration, inputs.penalties)]


def _judge_raw(res: RewardResult, inputs: ModeInputs) -> list[float]:
    """r = s + f; a neutral row takes its group's mean parsed score, i.e. (nearly) zero advantage."""
    s = res.judge_scores
    out = [0.0] * len(s)
    for rows in inputs.groups.values():
        parsed = [s[i] for i in rows if not math.isnan(s[i])]
        fill = sum(parsed) / len(parsed) if parsed else 0.0
        for i in rows:
            out[i] = (fill if math.isnan(s[i]) else s[i]) + inputs.penalties[i]
    return out


def _random(res: RewardResult, inputs: ModeInputs) -> list[float]:
    """Control run: Bernoulli(1/2) rewards drawn from `seed`, whatever the responses say."""
    import torch

    gen = torch.Generator().manual_seed(inputs.seed)
    return torch.randint(0, 2, (len(res.answers),), generator=gen).float().tolist()


def _agreement(res: RewardResult, inputs: ModeInputs) -> list[float]:
    """EvoLMM: (c(a_i)/G) ** gamma within each group."""
    out = [0.0] * len(res.classes)
    for rows in inputs.groups.values():
        for i, r in zip(rows, agreement_rewards([res.classes[i] for i in rows], inputs.agreement_gamma)):
            out[i] = r
    return out


@dataclass(frozen=True)
class RewardMode:
    """One reward mode: rewards from the group statistics, and which optional inputs it needs."""

    fn: Callable[[RewardResult, ModeInputs], Sequence[float]]
    needs_judge: bool = False  # judge_scores
    needs_labels: bool = False  # ground_truths
    needs_seed: bool = False
    needs_token_stats: bool = False  # response_stats: the policy's token entropy / self-certainty
    needs_votes: bool = False  # votes: rollout.vote_n samples per prompt, of which rollout.n are trained


REWARD_MODES: dict[str, RewardMode] = {
    "majority": RewardMode(lambda res, inputs: res.majority),
    "consistency": RewardMode(lambda res, inputs: res.prior),
    "judge": RewardMode(_judge, needs_judge=True),
    "judge_raw": RewardMode(_judge_raw, needs_judge=True),
    "ground_truth": RewardMode(lambda res, inputs: [float(c) for c in res.gt_correct], needs_labels=True),
    "random": RewardMode(_random, needs_seed=True),
    "agreement": RewardMode(_agreement),
    "self_certainty": RewardMode(lambda res, inputs: res.response_stats.self_certainty, needs_token_stats=True),
    "neg_entropy": RewardMode(lambda res, inputs: [-h for h in res.response_stats.entropy], needs_token_stats=True),
    # The majority reward, with the mode taken over the group and its extra votes.
    "ttrl": RewardMode(lambda res, inputs: res.majority, needs_votes=True),
}


def _check_inputs(responses, group_ids, mode, judge_scores, ground_truths, format_penalty, seed,
                  response_stats, votes, vote_group_ids) -> None:
    if mode not in REWARD_MODES:
        raise ValueError(f"reward mode must be one of {sorted(REWARD_MODES)}, got {mode!r}")
    needs = REWARD_MODES[mode]
    for row, response in enumerate(responses):
        if not isinstance(response, str):
            raise TypeError(f"responses[{row}] must be str, got {type(response).__name__}")
    if len(group_ids) != len(responses):
        raise ValueError(f"group_ids has {len(group_ids)} rows, responses has {len(responses)}")
    for name, values in (("judge_scores", judge_scores), ("ground_truths", ground_truths)):
        if values is not None and len(values) != len(responses):
            raise ValueError(f"{name} has {len(values)} rows, responses has {len(responses)}")
    if needs.needs_judge and judge_scores is None:
        raise ValueError(f"reward mode {mode!r} needs judge_scores")
    if needs.needs_labels and ground_truths is None:
        raise ValueError(f"reward mode {mode!r} needs ground_truths")
    if needs.needs_labels and (row := next((i for i, gt in enumerate(ground_truths) if gt is None), None)) is not None:
        raise ValueError(f"reward mode {mode!r} needs a ground truth for every row; row {row} has none")
    if needs.needs_seed and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"reward mode {mode!r} needs an integer seed, got {seed!r}")
    if response_stats is not None and len(response_stats) != len(responses):
        raise ValueError(f"response_stats has {len(response_stats)} rows, responses has {len(responses)}")
    if needs.needs_token_stats and response_stats is None:
        raise ValueError(f"reward mode {mode!r} needs response_stats (the policy's token statistics)")
    if (votes is None) != (vote_group_ids is None):
        raise ValueError("votes and vote_group_ids go together")
    if votes is not None:
        if len(votes) != len(vote_group_ids):
            raise ValueError(f"vote_group_ids has {len(vote_group_ids)} rows, votes has {len(votes)}")
        for row, vote in enumerate(votes):
            if not isinstance(vote, str):
                raise TypeError(f"votes[{row}] must be str, got {type(vote).__name__}")
        known = set(group_ids)
        stray = next((uid for uid in vote_group_ids if uid not in known), None)
        if stray is not None:
            raise ValueError(f"votes hold group {stray!r}, which has no trained row")
    if needs.needs_votes and votes is None:
        raise ValueError(f"reward mode {mode!r} needs votes (the extra voting samples)")
    if not format_penalty >= 0:
        raise ValueError(f"format_penalty must be >= 0, got {format_penalty!r}")


def compute_rewards(
    responses: Sequence[str],
    group_ids: Sequence[Hashable],
    mode: str,
    *,
    judge_scores: Sequence | None = None,
    ground_truths: Sequence[str | None] | None = None,
    equivalence: str = RewardConfig.equivalence,
    consistency_gate: float = RewardConfig.consistency_gate,
    format_penalty: float = RewardConfig.format_penalty,
    calibration: CalibrationConfig | None = None,
    unparsed_policy: str = JudgeConfig.unparsed,
    timeout: float = RewardConfig.symbolic_timeout,
    seed: int | None = None,
    agreement_gamma: float = RewardConfig.agreement_gamma,
    response_stats: ResponseStats | None = None,
    votes: Sequence[str] | None = None,
    vote_group_ids: Sequence[Hashable] | None = None,
) -> RewardResult:
    """Rewards for a batch of trajectories under `mode`, a name of REWARD_MODES (docs/method.md).

    Keyword defaults are the config dataclasses' (reward.*, judge.unparsed).
    judge_scores: per row, a parsed Judge score (float or None) or a list of K of them.
    ground_truths: per row, the reference answer (needed for `ground_truth`; otherwise
    used only for monitoring). calibration: reward.calibration (None: its defaults).
    seed: the draw of the `random` control mode. agreement_gamma: the exponent of `agreement`.
    response_stats: per row, the policy's mean token entropy and self-certainty (`self_certainty`,
    `neg_entropy`). votes / vote_group_ids: responses of extra voting samples and their prompt uids
    (`ttrl`): each group's mode and pseudo-label are then taken over its rows and its votes.
    """
    _check_inputs(responses, group_ids, mode, judge_scores, ground_truths, format_penalty, seed,
                  response_stats, votes, vote_group_ids)
    n = len(responses)
    answers = [extract_boxed(r) for r in responses]
    fmt = [format_ok(r) for r in responses]
    groups = _group_rows(group_ids)
    classes: list[int | None] = [None] * n
    prior, majority, pseudo = [0.0] * n, [0.0] * n, [None] * n
    group_label: dict[Hashable, str | None] = {}
    vote_answers: dict[Hashable, list[str | None]] = {}
    for uid, vote in zip(vote_group_ids or (), votes or ()):
        vote_answers.setdefault(uid, []).append(extract_boxed(vote))
    for uid, rows in groups.items():
        # The group's own rows come first, so their class ids are those of the group alone.
        voters = [answers[i] for i in rows] + vote_answers.get(uid, [])
        cls_all = answer_classes(voters, equivalence, timeout=timeout)
        cls = cls_all[:len(rows)]
        p = consistency_prior(cls, consistency_gate)
        m_all = majority_rewards(cls_all)
        m = m_all[:len(rows)]
        label = next((a for a, v in zip(voters, m_all) if v == 1.0), None)
        group_label[uid] = label
        for k, i in enumerate(rows):
            classes[i], prior[i], majority[i], pseudo[i] = cls[k], p[k], m[k], label
    res = RewardResult([], answers, classes, fmt, prior, majority, pseudo, response_stats=response_stats)
    if judge_scores is not None:
        res.judge_scores, res.num_judge_unparsed = resolve_judge_scores(judge_scores, unparsed_policy)
        res.calibration = [1.0 if math.isnan(s) else calibrate(s, calibration) for s in res.judge_scores]
    if ground_truths is not None:
        # Rows without a label (a mixed file) are left out of the monitors, not counted wrong.
        res.gt_correct = [None if gt is None else answers_equivalent(a, gt, equivalence, timeout=timeout)
                          for a, gt in zip(answers, ground_truths)]
        first_row_gt = {uid: ground_truths[rows[0]] for uid, rows in groups.items()}
        hits = [answers_equivalent(group_label[u], gt, equivalence, timeout=timeout)
                for u, gt in first_row_gt.items() if gt is not None]
        res.pseudo_label_hits, res.pseudo_label_groups = sum(hits), len(hits)
    penalties = [0.0 if ok else -float(format_penalty) for ok in fmt]
    inputs = ModeInputs(groups, penalties, seed, agreement_gamma)
    res.rewards = [float(r) for r in REWARD_MODES[mode].fn(res, inputs)]
    return res
