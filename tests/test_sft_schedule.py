"""The warm-start learning-rate schedule (optim.sft_schedule) against hand-computed values."""
import math

import pytest

from megatron_selfjudge.config import ConfigError, OptimConfig, load_config
from megatron_selfjudge.sft import sft_lr_at


def test_constant_is_sft_lr_throughout():
    o = OptimConfig(sft_lr=1e-3)
    assert [sft_lr_at(o, k, 100) for k in (0, 50, 99)] == [1e-3] * 3


def test_warmup_then_cosine_by_hand():
    o = OptimConfig(sft_lr=1e-3, sft_schedule="cosine", sft_warmup_steps=10, sft_min_lr=1e-4)
    # Warmup: step k (0-based) trains at (k + 1) / 10 of the peak, the 10th at the peak itself.
    assert sft_lr_at(o, 0, 110) == pytest.approx(1e-4)
    assert sft_lr_at(o, 4, 110) == pytest.approx(5e-4)
    assert sft_lr_at(o, 9, 110) == pytest.approx(1e-3)
    # Then half a cosine from the peak to the floor over the remaining 100 steps.
    for k in (10, 35, 60, 85, 109):
        ratio = (k + 1 - 10) / 100
        assert sft_lr_at(o, k, 110) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * ratio)) * 9e-4)


def test_linear_without_warmup_by_hand():
    o = OptimConfig(sft_lr=2e-3, sft_schedule="linear", sft_min_lr=1e-4)
    # Step k is the value after k + 1 increments: the last of the 4 steps lands on the floor.
    assert [sft_lr_at(o, k, 4) for k in range(4)] == pytest.approx([1.525e-3, 1.05e-3, 0.575e-3, 1e-4])


@pytest.mark.parametrize("override,message", [
    ("optim.sft_schedule=step", "optim.sft_schedule"),
    ("optim.sft_min_lr=1.0", r"optim.sft_min_lr=1.0 is out of range: must be in \[0, optim.sft_lr"),
    ("optim.sft_warmup_steps=1000", r"optim.sft_warmup_steps=1000 is out of range: must be in \[0, "
                                    r"trainer.sft_steps=1000\)"),
])
def test_bad_schedules_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
