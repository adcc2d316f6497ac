"""GRPO with rollout.backend=vllm on the tiny Qwen2.5-VL example, as a user runs it (`selfjudge train`):
the steps run with the weights pushed every step (the engine's log-probs of its samples stay equal to the
trainer's after each update), the truncated-IS correction is on, a resumed run equals an uninterrupted one,
and with DP=2 each rank's engine generates only its share."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from megatron_selfjudge.metrics import read_metrics
from megatron_selfjudge.runtime.setup import free_port

sys.path.insert(0, str(Path(__file__).parents[1]))

from test_trainer_qwen import _resume_gives_step_2, _run, _train, _train_args  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

# A learning rate large enough that a step moves the log-probs far past the tolerance: a missed push shows.
STEPS = ["trainer.max_steps=2", "reward.mode=random", "rollout.backend=vllm", "optim.lr=1e-3",
         "loss.rollout_correction=token", "loss.rollout_correction_cap=2.0", "rollout.vllm.kv_cache_gb=1",
         "rollout.vllm.max_model_len=512"]


@pytest.fixture(scope="module")
def vllm_run(vl_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("vllm_run")
    _train(vl_dir, run_dir, *STEPS)
    return run_dir


def test_vllm_rollouts_train_with_weights_pushed_every_step(vllm_run):
    rows = read_metrics(vllm_run)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["rollouts_per_rank"] == 8 and row["loss"] != 0 and row["grad_norm"] > 0
        # Step 2 samples from the weights step 1 produced: equal log-probs mean the push reached the engine.
        assert row["rollout_logp_diff_max"] < 1e-3 and abs(row["rollout_k3"]) < 1e-6
        assert row["rollout_weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert row["weight_sync_bytes"] > 1e6 and row["time_weight_sync"] > 0
    # The update did move the policy: the step-2 rollouts differ from step 1's in what they score.
    assert rows[0]["entropy"] != rows[1]["entropy"]


@pytest.mark.slow
def test_vllm_resumed_run_equals_uninterrupted(vl_dir, vllm_run, tmp_path):
    # The resumed engine is built from the HF folder's initial weights: step 2 equals only if the
    # resumed policy is pushed into it first.
    _resume_gives_step_2(vl_dir, vllm_run, tmp_path / "run", *STEPS)


@pytest.mark.slow
def test_vllm_two_data_parallel_ranks_generate_their_shares(vl_dir, tmp_path):
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
          *_train_args(vl_dir, tmp_path, *STEPS, "trainer.max_steps=1", "trainer.mini_batch_prompts=2")])
    (row,) = read_metrics(tmp_path)
    # 2 prompts x 4 samples per step over two ranks: 4 trajectories each.
    assert row["rollouts_per_rank"] == 4 and row["rollout_logp_diff_max"] < 1e-3


@pytest.mark.slow
def test_generative_judge_on_its_own_vllm_engine(vl_dir, tmp_path):
    # The Judge gets a second vLLM engine (frozen initial weights, with the prompts' images); an untrained
    # tiny Judge writes no parseable score, so every one of its 8 verdicts is counted as unparsed.
    _train(vl_dir, tmp_path, *STEPS, "trainer.max_steps=1", "reward.mode=judge", "judge.kind=generative",
           "judge.unparsed=neutral", "judge.max_tokens=8", "judge.max_prompt_len=1600", "rollout.vllm.max_model_len=2048")
    (row,) = read_metrics(tmp_path)
    assert row["judge_unparsed"] == 8 and 0.0 <= row["reward_mean"] <= 1.0
