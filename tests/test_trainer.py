"""End-to-end runs of `selfjudge train` as a user launches it (subprocesses, tiny sizes).

The uninterrupted run is the reference: a run stopped by SIGTERM, resumed, killed with SIGKILL
after its next checkpoint and resumed again must write the same per-step metrics (exactly, except
wall-clock timings); a TP=2 run under torchrun must match TP=1.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_selfjudge.metrics import STEP_KEYS, read_metrics
from megatron_selfjudge.runtime.setup import free_port

TINY = [
    "trainer.sft_steps=4", "optim.sft_warmup_steps=0", "trainer.max_steps=5", "trainer.save_every=2", "trainer.prompts_per_step=4",
    "trainer.mini_batch_prompts=2", "rollout.n=4", "rollout.max_response_len=16", "data.synthetic_sft=32",
    "data.synthetic_unlabeled=64", "data.synthetic_test=8", "model.num_layers=1", "optim.lr=1e-3",
]
TIMEOUT = 600


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_selfjudge.cli", "train", *TINY, f"trainer.run_dir={run_dir}", *extra]


def _train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(run_dir, *extra), env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(_cmd(run_dir, *extra), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in read_metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before step {step}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {TIMEOUT} s")


def _steps(run_dir: Path) -> list[dict]:
    """Per-step metrics without wall-clock timings."""
    return [{k: v for k, v in row.items() if not k.startswith("time_")} for row in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    _train(run_dir)
    return run_dir


@pytest.mark.slow
def test_run_directory_contents(reference_run):
    rows = read_metrics(reference_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for row in rows:
        assert set(STEP_KEYS) <= set(row), set(STEP_KEYS) - set(row)
        assert "pseudo_label_acc" in row  # the synthetic task has labels for monitoring
    assert (reference_run / "config.yaml").read_text().count("max_steps: 5") == 1
    results = json.loads((reference_run / "results.json").read_text())
    assert set(results["evals"]) == {"before", "after"} and results["steps"] == 5
    assert "| before |" in (reference_run / "results.md").read_text()
    ckpts = reference_run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000005"
    assert (ckpts / "initial" / "latest").exists()
    assert any((reference_run / "tensorboard").iterdir())


@pytest.mark.slow
def test_sigterm_then_sigkill_both_resume_exactly(reference_run, tmp_path):
    """One run stopped twice (one run's cost for both checks): SIGTERM saves and exits 0; its resume is
    killed with SIGKILL after a checkpoint, losing a step; the second resume still equals the reference."""
    proc = _start(tmp_path)
    _wait_for_step(proc, tmp_path, 1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, output[-3000:]
    assert "preempted" in output
    stopped = max(r["step"] for r in read_metrics(tmp_path))
    assert stopped <= 2, stopped  # the signal came during step 2 at the latest; it ends that step
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    proc = _start(tmp_path)
    _wait_for_step(proc, tmp_path, 3)  # a checkpoint at step 2 exists; step 3 is lost with the kill
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    out = _train(tmp_path)
    assert "resumed from" in out.stderr
    assert _steps(tmp_path) == _steps(reference_run)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.tp=1"])  # TP=2, and DP=2
def test_two_ranks_match_one(reference_run, tmp_path, layout):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "megatron_selfjudge.cli", "train", *TINY, layout,
           f"trainer.run_dir={tmp_path}", "trainer.max_steps=2"]  # step 2 follows the first update
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got, want = _steps(tmp_path), _steps(reference_run)[:2]
    assert [r["step"] for r in got] == [1, 2]
    dp = 2 if layout == "parallel.tp=1" else 1
    for g, w in zip(got, want):
        # Each DP rank rolls out only its share of the prompts (4 prompts x 4 samples per step)...
        assert w["rollouts_per_rank"] == 16 and g["rollouts_per_rank"] == 16 / dp
        # ...and samples the same tokens as the one-rank run (per-sample seeds; TP gathers the same
        # logits), so sample statistics agree (a DP mean of rank means differs at most by rounding);
        # losses differ only by fp32 summation order (vocab shards for TP, gradient all-reduce for DP).
        for key in ("reward_mean", "response_len_mean", "adv_mean", "adv_std", "pseudo_label_acc",
                    "judge_unparsed", "stop_frac"):
            assert g[key] == pytest.approx(w[key], rel=1e-9, abs=1e-12), (key, g[key], w[key])
        for key in ("loss", "kl", "entropy", "grad_norm", "clip_frac"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-5), key


def _bad_parquet(path: Path) -> Path:
    from megatron_selfjudge.data.synthetic import make_synthetic_splits, write_geometry3k_parquet

    good = write_geometry3k_parquet(make_synthetic_splits(0, 0, 6, 0)["train_unlabeled"], path.with_suffix(".ok"))
    table = pq.read_table(good)
    images = table.column("images").to_pylist()
    images[4] = [{"bytes": b"not an image", "path": "broken.png"}]
    table = table.set_column(table.schema.get_field_index("images"), "images",
                             pa.array(images, type=table.schema.field("images").type))
    pq.write_table(table, path)
    return path


def test_corrupt_training_row_names_file_and_row(tmp_path):
    bad = _bad_parquet(tmp_path / "train.parquet")
    proc = subprocess.run(_cmd(tmp_path / "run", f"data.train={bad}"), env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "row 4" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_corrupt_row_skipped_and_counted(tmp_path):
    bad = _bad_parquet(tmp_path / "train.parquet")
    out = _train(tmp_path / "run", f"data.train={bad}", "data.on_error=skip", "trainer.max_steps=1",
                 "trainer.sft_steps=0")
    assert "skipped 1 unusable rows" in out.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1]


@pytest.mark.slow
def test_generative_judge_unparsed_outputs_are_counted(tmp_path):
    # An untrained tiny Judge cannot write a rubric score: every output is unparseable, and with
    # judge.unparsed=neutral the reward falls back to the consistency prior (g = 1).
    _train(tmp_path, "judge.kind=generative", "judge.unparsed=neutral", "judge.max_tokens=8",
           "judge.max_prompt_len=1600", "trainer.max_steps=1", "trainer.sft_steps=0", "data.synthetic_test=0")
    (row,) = read_metrics(tmp_path)
    assert row["judge_unparsed"] == 4 * 4  # prompts_per_step x rollout.n, one Judge sample each
    assert 0.0 <= row["reward_mean"] <= 1.0


@pytest.mark.slow
def test_text_only_policy_random_control_and_epoch_wrap(tmp_path):
    # 6 unlabeled prompts, 4 per step: every step starts a new epoch (the short remainder is
    # dropped), so no step holds a prompt twice; tiny-gpt takes the same prompts without images.
    _train(tmp_path, "model.preset=tiny-gpt", "reward.mode=random", "advantage.estimator=grpo",
           "data.synthetic_unlabeled=6", "trainer.max_steps=3", "trainer.save_every=0")
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0.0 <= r["reward_mean"] <= 1.0 for r in rows)
    state = json.loads((tmp_path / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["sampler"] == {"epoch": 2, "offset": 4}


@pytest.mark.slow
def test_sigterm_during_sft_saves_and_resumes_sft(tmp_path):
    args = ("trainer.sft_steps=60", "trainer.max_steps=1", "data.synthetic_test=0")
    proc = _start(tmp_path, *args)
    deadline = time.monotonic() + TIMEOUT
    sft_file = tmp_path / "sft_metrics.jsonl"
    while not (sft_file.exists() and sft_file.read_text().strip()):  # first SFT log line: step 6
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0 and "preempted during SFT" in output, output[-3000:]
    state = json.loads((tmp_path / "checkpoints" / "step_00000000" / "trainer_state.json").read_text())
    assert state["phase"] == "sft" and 6 <= state["sft_step"] < 60
    _train(tmp_path, *args)
    sft_steps = [json.loads(ln)["step"] for ln in sft_file.read_text().splitlines()]
    assert sft_steps == list(range(6, 61, 6))  # continued, nothing logged twice
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
