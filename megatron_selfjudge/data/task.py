"""A run's prompts: the task (training, warm-start and held-out records) and the prompt samplers.

Training files (``data.train``: one path or a list) are streamed: ``datasets.open_records``
scans each once at load (broken rows raise or are skipped and reported with file and row;
``data.limit`` keeps a file's first N usable rows) and keeps only the positions of its usable
rows; a step's prompts are read on demand (``Task.draw``). With ``data.weights`` every step
draws a fixed share of its prompts from each file (largest-remainder rounding of
weight x trainer.prompts_per_step); without, the files are one pool. The order is a seeded
permutation per epoch (``data.shuffle=false``: file order), checkpointed as the sampler's state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from megatron_selfjudge.config import Config


def train_files(train: str | Sequence[str]) -> list[str]:
    """data.train as a list of paths (a single path is a list of one)."""
    return [train] if isinstance(train, str) else [str(p) for p in train]


def step_counts(weights: Sequence[float], k: int) -> list[int]:
    """k prompts shared out by weight: floors of the exact shares, the rest to the largest remainders."""
    total = float(sum(weights))
    exact = [w * k / total for w in weights]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:k - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass
class Task:
    """Prompts of the run: unlabeled training prompts, optional SFT pairs, held-out test prompts."""

    train: Sequence  # PromptRecords: a list (synthetic), StreamingRecords or ConcatRecords (files)
    test: list
    sft: list = field(default_factory=list)  # (PromptRecord, target response text)
    skipped: int = 0
    step_counts: Optional[list[int]] = None  # prompts per step from each file (data.weights), else None
    shuffle: bool = True

    def draw(self, indices: Sequence[int]) -> list:
        """The training records at these sampler indices (streamed files read each row group once)."""
        from megatron_selfjudge.data.datasets import take_records

        return take_records(self.train, indices)

    def sampler(self, seed: int, state: Optional[dict] = None) -> "PromptSampler | MixedSampler":
        """The run's prompt sampler, at the position `state` (a checkpointed sampler.state())."""
        state = dict(state or {})
        if self.step_counts is None:
            if "parts" in state:
                raise ValueError("the checkpoint's data cursor is for data.weights (several files mixed)")
            return PromptSampler(len(self.train), seed, shuffle=self.shuffle, **state)
        if state and "parts" not in state:
            raise ValueError("the checkpoint's data cursor is for one pool of prompts, not data.weights")
        sizes = [len(p) for p in self.train.parts]  # type: ignore[attr-defined]
        return MixedSampler(sizes, self.step_counts, seed, shuffle=self.shuffle, **state)


# PromptRecord.meta key of a warm-start prompt that is not a question to solve: its kind names the
# instruction appended to it and the config key bounding its length (absent: data.instruction and
# rollout.max_prompt_len). Question-writing cues and Judge prompts are whole prompts, as the synthesis
# command and the generative Judge send them.
PROMPT_KIND = "prompt_kind"
PROMPT_KINDS = {"ask": ("", "rollout.max_prompt_len"), "judge": ("", "judge.max_prompt_len")}
# The generation limit a warm-start target of each kind must fit: a question or a verdict taught past
# it is always cut off (synth drops a truncated reply, the Judge's parser finds no score).
TARGET_LIMITS = {"ask": "rollout.max_response_len", "judge": "judge.max_tokens"}


def question_writing_pairs(examples: Sequence, seed: int, instruction: str) -> list[tuple]:
    """Three warm-start pairs per synthetic example that teach `selfjudge synth`'s two strategies.

    "image + the example's question + in-context cue -> one of the image's other questions",
    "image + direct cue -> any of its questions" (cues of the synthesis prompt style that
    `instruction` selects, so training and synthesis prompts are the same text), and "the other
    question -> its solution", so that the questions the policy learns to write are ones it can answer.
    """
    from megatron_selfjudge.data import prompts
    from megatron_selfjudge.data.datasets import PromptRecord
    from megatron_selfjudge.synth.prompts import prompt_style

    style = prompt_style("auto", instruction)
    pairs: list[tuple] = []
    for i, ex in enumerate(examples):
        if not ex.alternatives:
            raise ValueError(f"synthetic example {ex.uid} ({ex.family}) has no other question to ask")
        rng = np.random.default_rng([seed, 11, i])
        question, answer, reasoning = ex.alternatives[int(rng.integers(len(ex.alternatives)))]
        direct = ([(ex.question, ex.answer)] + [(q, a) for q, a, _ in ex.alternatives])[
            int(rng.integers(len(ex.alternatives) + 1))][0]
        source = "synthetic:train_sft_ask"
        for kind, cue, target in (("in-context", style.render("in-context", ex.question), question),
                                  ("direct", style.render("direct", ""), direct)):
            rec = PromptRecord(uid=f"{ex.uid}/ask-{kind}", images=[ex.image], question=cue, answer=None,
                               source_file=source, row=i, meta={"family": ex.family, PROMPT_KIND: "ask"})
            pairs.append((rec, f"<question>{target}</question>" if style.tagged else target))
        rec = PromptRecord(uid=f"{ex.uid}/asked", images=[ex.image], question=question, answer=answer,
                           source_file=source, row=i, meta={"family": ex.family, "reasoning": reasoning})
        pairs.append((rec, prompts.format_response(reasoning, answer)))
    return pairs


def judging_pairs(examples: Sequence, seed: int, rubric: str) -> list[tuple]:
    """Two warm-start pairs per synthetic example that teach the generative Judge in miniature.

    The example's question with a right solution and with a flawed one (synthetic.flawed_solutions,
    one flaw drawn per example), each in judge.rubric's prompt, as the trainer's Judge sends it. The
    target is the Judge's own reading of the image (the example's true trace) and then the rubric's
    weighted overall score: answer_correctness, reasoning_quality and visual_grounding each 1 or 0 by
    the flaw (a misread trace is sound reasoning on wrong values; a slip or a boxed answer that is not
    the trace's result is unsound reasoning on the right values).
    """
    from megatron_selfjudge.data import prompts, synthetic
    from megatron_selfjudge.data.datasets import PromptRecord
    from megatron_selfjudge.rewards.judge import CRITERIA_WEIGHTS, build_judge_prompt

    met = {"right": ("answer_correctness", "reasoning_quality", "visual_grounding"),
           "misread": ("reasoning_quality",), "slip": ("visual_grounding",), "mismatch": ("visual_grounding",)}
    pairs: list[tuple] = []
    for i, ex in enumerate(examples):
        rng = np.random.default_rng([seed, 13, i])
        flaws = synthetic.flawed_solutions(ex, rng)
        flaw, reasoning, answer = flaws[int(rng.integers(len(flaws)))]
        for kind, candidate in (("right", prompts.sft_target(ex)), (flaw, prompts.format_response(reasoning, answer))):
            score = round(sum(CRITERIA_WEIGHTS[c] for c in met[kind]), 4)
            rec = PromptRecord(uid=f"{ex.uid}/judge-{kind}", images=[ex.image],
                               question=build_judge_prompt(ex.question, candidate, rubric), answer=None,
                               source_file="synthetic:train_sft_judge", row=i,
                               meta={"family": ex.family, PROMPT_KIND: "judge", "flaw": kind})
            pairs.append((rec, prompts.format_response(ex.reasoning, f"{score:g}")))
    return pairs


def load_task(cfg: Config) -> Task:
    """The embedded synthetic task, or local files in the published schemas."""
    from megatron_selfjudge.data import datasets, prompts, synthetic

    d, per_step = cfg.data, cfg.trainer.prompts_per_step
    if d.train == "synthetic":
        splits = synthetic.make_synthetic_splits(
            seed=d.synthetic_seed, n_sft=d.synthetic_sft, n_unlabeled=d.synthetic_unlabeled,
            n_test=d.synthetic_test, image_size=cfg.model.image_size, families=tuple(d.synthetic_families))
        sft = list(zip(datasets.examples_to_records(splits["train_sft"], "synthetic:train_sft"),
                       [prompts.sft_target(ex) for ex in splits["train_sft"]]))
        sft += question_writing_pairs(splits["train_sft"][:d.synthetic_sft_ask], d.synthetic_seed, d.instruction)
        sft += judging_pairs(splits["train_sft"][:d.synthetic_sft_judge], d.synthetic_seed, cfg.judge.rubric)
        return Task(train=datasets.examples_to_records(splits["train_unlabeled"], "synthetic:train_unlabeled"),
                    test=datasets.examples_to_records(splits["test"], "synthetic:test"), sft=sft,
                    shuffle=d.shuffle)
    limits = datasets.ImageLimits.from_config(d, image_size=cfg.model.image_size)
    files = train_files(d.train)
    parts = [datasets.open_records(f, on_error=d.on_error, limit=d.limit or None, limits=limits,
                                   workers=d.workers) for f in files]
    test = (datasets.load_records(d.eval, on_error=d.on_error, require_answer=True, limits=limits)
            if d.eval else None)
    skipped = sum(p.skipped for p in parts) + (test.skipped if test else 0)
    for name, part in zip(files, parts):
        if not len(part):
            raise datasets.DatasetError(f"data.train: {name!r} holds no usable rows ({part.skipped} skipped)")
    counts = step_counts(list(d.weights), per_step) if d.weights else None
    if counts is None:
        total = sum(len(p) for p in parts)
        if total < per_step:
            shown = files[0] if len(files) == 1 else files
            raise datasets.DatasetError(
                f"data.train: {shown!r} holds {total} usable rows ({sum(p.skipped for p in parts)} skipped), "
                f"fewer than one step's trainer.prompts_per_step={per_step}")
    else:
        for i, (name, part, count) in enumerate(zip(files, parts, counts)):
            if count < 1:
                raise datasets.DatasetError(
                    f"data.weights[{i}]={d.weights[i]} gives {name!r} no prompt of a step's "
                    f"trainer.prompts_per_step={per_step}; raise its weight or drop the file")
            if len(part) < count:
                raise datasets.DatasetError(
                    f"data.train: {name!r} holds {len(part)} usable rows ({part.skipped} skipped), fewer than "
                    f"its {count} prompts of a step (data.weights[{i}]={d.weights[i]})")
    train = parts[0] if len(parts) == 1 else datasets.ConcatRecords(parts)
    return Task(train=train, test=list(test.records) if test else [], skipped=skipped, step_counts=counts,
                shuffle=d.shuffle)


class PromptSampler:
    """Epoch-wise shuffled order over the training prompts; its cursor is checkpointed."""

    def __init__(self, num: int, seed: int, epoch: int = 0, offset: int = 0, *, shuffle: bool = True,
                 key: tuple[int, ...] = ()):
        if num < 1:
            raise ValueError("the training set is empty")
        self.num, self.seed, self.epoch, self.offset = num, seed, epoch, offset
        self.shuffle, self.key = shuffle, tuple(key)  # key: which file of a mixture (its own stream)
        self._cached: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:  # one permutation per epoch, not per step
            order = (np.random.default_rng([self.seed, *self.key, epoch]).permutation(self.num)
                     if self.shuffle else np.arange(self.num))
            self._cached = (epoch, order)
        return self._cached[1]

    def next(self, k: int) -> list[int]:
        """The next k indices of this epoch's order; a remainder shorter than k is dropped
        (as DataLoader's drop_last), so a step never holds the same prompt twice."""
        if k > self.num:
            raise ValueError(f"trainer.prompts_per_step={k} exceeds the {self.num} training prompts")
        if self.offset + k > self.num:
            self.epoch, self.offset = self.epoch + 1, 0
        out = self._order(self.epoch)[self.offset:self.offset + k].tolist()
        self.offset += k
        return out

    def state(self) -> dict:
        """JSON-able cursor."""
        return {"epoch": self.epoch, "offset": self.offset}


class MixedSampler:
    """Several files mixed by data.weights: each step takes counts[i] prompts from file i (its own
    epochs and seeded order), the step's prompts then shuffled together; the cursor is checkpointed."""

    def __init__(self, sizes: Sequence[int], counts: Sequence[int], seed: int, shuffle: bool = True,
                 parts: Optional[Sequence[dict]] = None, draws: int = 0):
        if len(sizes) != len(counts) or (parts is not None and len(parts) != len(sizes)):
            raise ValueError(f"the data cursor holds {len(parts or [])} files, the run {len(sizes)}")
        self.counts, self.seed, self.shuffle, self.draws = list(counts), seed, shuffle, draws
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.samplers = [PromptSampler(n, seed, shuffle=shuffle, key=(i + 1,), **(parts[i] if parts else {}))
                         for i, n in enumerate(sizes)]

    def next(self, k: int) -> list[int]:
        """The next step's k indices (positions in the files' concatenation)."""
        if k != sum(self.counts):
            raise ValueError(f"a step of {k} prompts; data.weights were shared out for {sum(self.counts)}")
        out = [int(start) + j for sampler, count, start in zip(self.samplers, self.counts, self.starts)
               for j in sampler.next(count)]
        if self.shuffle:  # mixed within the step, so every mini-batch sees every file
            out = [out[i] for i in np.random.default_rng([self.seed, 0, self.draws]).permutation(len(out))]
        self.draws += 1
        return out

    def state(self) -> dict:
        """JSON-able cursor: one per file, and the steps drawn."""
        return {"parts": [s.state() for s in self.samplers], "draws": self.draws}
