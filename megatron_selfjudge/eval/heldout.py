"""Held-out evaluation: greedy pass@1, sampled pass@1 and maj@G against reference answers.

Grading uses the same answer extraction and equivalence as the rewards, so "correct" means
what the reward functions would call equal to the label.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

from megatron_selfjudge.rewards.answers import answer_classes, answers_equivalent, extract_boxed
from megatron_selfjudge.rewards.consistency import majority_class
from megatron_selfjudge.rollout.base import RolloutEngine, RolloutRequest, SamplingConfig


@dataclass
class EvalResult:
    """Accuracies on one split; `n` prompts, `samples` = G for the sampled metrics."""

    n: int
    samples: int
    greedy_pass1: float
    sampled_pass1: float
    maj_at_g: float
    format_ok: float  # fraction of sampled responses with an extractable boxed answer

    def as_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)


def _correct(answer: Optional[str], label: Optional[str], equivalence: str, timeout: float) -> bool:
    return answer is not None and label is not None and answers_equivalent(answer, label, equivalence,
                                                                           timeout=timeout)


class EvalInterrupted(Exception):
    """A stop request (preemption) ended an evaluation early; nothing of it is recorded."""


def evaluate(engine: RolloutEngine, requests: Sequence[RolloutRequest], labels: Sequence[str], *,
             samples: int, temperature: float, top_p: float, max_new_tokens: int, seed: int,
             equivalence: str, timeout: float, batch_size: Optional[int] = None,
             should_stop: Optional[Callable[[], bool]] = None,
             progress: Optional[Callable[[str], None]] = None) -> EvalResult:
    """Generate greedily and with G samples per prompt, and grade against `labels`.

    equivalence and timeout are reward.equivalence and reward.symbolic_timeout: grading agrees
    with the rewards.

    Generation runs in calls of at most `batch_size` rows (one call per pass when None), each
    graded as it returns. `should_stop` is polled before every call (a collective when it is
    PreemptionHandler.should_stop: every rank polls at the same points); when it returns True,
    EvalInterrupted is raised. So a stop request waits at most one generation batch and its
    grading. The k-th sampled call draws from seed + 1 + k: results depend on batch_size.
    """
    if len(requests) != len(labels):
        raise ValueError(f"{len(requests)} requests but {len(labels)} labels")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
    rows = batch_size or max(1, len(requests) * samples)

    def poll() -> None:
        if should_stop is not None and should_stop():
            raise EvalInterrupted("evaluation interrupted by a stop request")

    if progress:
        progress(f"eval: greedy on {len(requests)} prompts")
    greedy_ok = []
    for start in range(0, len(requests), rows):
        poll()
        greedy = engine.generate(requests[start:start + rows], SamplingConfig(
            n=1, greedy=True, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed))
        greedy_ok += [_correct(extract_boxed(t.text), lab, equivalence, timeout)
                      for t, lab in zip(greedy, labels[start:start + rows])]
    if progress:
        progress(f"eval: {samples} samples on {len(requests)} prompts")
    sample_ok, maj_ok, boxed = 0, 0, 0
    per_call = max(1, rows // samples)  # a prompt's G samples stay in one call
    for k, start in enumerate(range(0, len(requests), per_call)):
        poll()
        sampled = engine.generate(requests[start:start + per_call], SamplingConfig(
            n=samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed + 1 + k))
        for i, label in enumerate(labels[start:start + per_call]):
            answers = [extract_boxed(t.text) for t in sampled[i * samples:(i + 1) * samples]]
            boxed += sum(a is not None for a in answers)
            sample_ok += sum(_correct(a, label, equivalence, timeout) for a in answers)
            classes = answer_classes(answers, equivalence, timeout=timeout)
            winner = majority_class(classes)
            if winner is not None:
                maj_ok += _correct(answers[classes.index(winner)], label, equivalence, timeout)
    n = max(1, len(labels))
    return EvalResult(n=len(labels), samples=samples, greedy_pass1=sum(greedy_ok) / n,
                      sampled_pass1=sample_ok / (n * samples), maj_at_g=maj_ok / n,
                      format_ok=boxed / (n * samples))


def format_table(rows: dict[str, EvalResult]) -> str:
    """A Markdown table of several evaluations (e.g. before / after)."""
    lines = ["| run | greedy pass@1 | sampled pass@1 | maj@G | boxed answers | prompts |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r.greedy_pass1:.3f} | {r.sampled_pass1:.3f} | {r.maj_at_g:.3f} "
                     f"| {r.format_ok:.3f} | {r.n} |")
    return "\n".join(lines)
