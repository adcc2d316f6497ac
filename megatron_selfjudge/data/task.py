"""A run's prompts: the task (training, warm-start and held-out records) and the prompt sampler."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_selfjudge.config import Config


@dataclass
class Task:
    """Prompts of the run: unlabeled training prompts, optional SFT pairs, held-out test prompts."""

    train: list  # PromptRecord
    test: list
    sft: list = field(default_factory=list)  # (PromptRecord, target response text)
    skipped: int = 0


def load_task(cfg: Config) -> Task:
    """The embedded synthetic task, or local files in the published schemas."""
    from megatron_selfjudge.data import datasets, prompts, synthetic

    d = cfg.data
    if d.train == "synthetic":
        splits = synthetic.make_synthetic_splits(
            seed=d.synthetic_seed, n_sft=d.synthetic_sft, n_unlabeled=d.synthetic_unlabeled,
            n_test=d.synthetic_test, image_size=cfg.model.image_size, families=tuple(d.synthetic_families))
        sft = list(zip(datasets.examples_to_records(splits["train_sft"], "synthetic:train_sft"),
                       [prompts.sft_target(ex) for ex in splits["train_sft"]]))
        return Task(train=datasets.examples_to_records(splits["train_unlabeled"], "synthetic:train_unlabeled"),
                    test=datasets.examples_to_records(splits["test"], "synthetic:test"), sft=sft)
    limits = datasets.ImageLimits.from_config(d, image_size=cfg.model.image_size)
    train = datasets.load_records(d.train, on_error=d.on_error, limits=limits)
    test = (datasets.load_records(d.eval, on_error=d.on_error, require_answer=True, limits=limits)
            if d.eval else None)
    skipped = train.skipped + (test.skipped if test else 0)
    if not train.records:
        raise datasets.DatasetError(f"data.train: {d.train!r} holds no usable rows ({train.skipped} skipped)")
    if len(train.records) < cfg.trainer.prompts_per_step:
        raise datasets.DatasetError(
            f"data.train: {d.train!r} holds {len(train.records)} usable rows ({train.skipped} skipped), fewer than "
            f"one step's trainer.prompts_per_step={cfg.trainer.prompts_per_step}")
    return Task(train=list(train.records), test=list(test.records) if test else [], skipped=skipped)


class PromptSampler:
    """Epoch-wise shuffled order over the training prompts; its cursor is checkpointed."""

    def __init__(self, num: int, seed: int, epoch: int = 0, offset: int = 0):
        if num < 1:
            raise ValueError("the training set is empty")
        self.num, self.seed, self.epoch, self.offset = num, seed, epoch, offset

    def _order(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num).tolist()

    def next(self, k: int) -> list[int]:
        """The next k indices of this epoch's order; a remainder shorter than k is dropped
        (as DataLoader's drop_last), so a step never holds the same prompt twice."""
        if k > self.num:
            raise ValueError(f"trainer.prompts_per_step={k} exceeds the {self.num} training prompts")
        if self.offset + k > self.num:
            self.epoch, self.offset = self.epoch + 1, 0
        out = self._order(self.epoch)[self.offset:self.offset + k]
        self.offset += k
        return out

    def state(self) -> dict:
        """JSON-able cursor."""
        return {"epoch": self.epoch, "offset": self.offset}
