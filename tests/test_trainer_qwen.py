"""`selfjudge train --config examples/tiny_qwen2_5_vl_cpu.yaml` as a user runs it, on a tiny folder
made by `selfjudge convert tiny-qwen` (tests/conftest.py's session `vl_dir`): UPT steps run and save, a run
resumed from its step-1 checkpoint (as a preemption leaves it) gives the uninterrupted run's step 2,
TP=2 and PP=2 (torchrun, 2 gloo ranks) match one rank, and the tiny Qwen2.5 text model trains a step.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_selfjudge.metrics import METRICS_FILE, read_metrics
from megatron_selfjudge.runtime.setup import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_qwen2_5_vl_cpu.yaml"
TIMEOUT = 900
# Coin-flip rewards: a random tiny model's judge/format rewards are all equal (zero advantages).
STEPS = ["trainer.max_steps=2", "reward.mode=random"]


def _env() -> dict:
    import os

    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _train_args(hf: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "megatron_selfjudge.cli", "train", "--config", str(EXAMPLE), f"model.hf_path={hf}",
            f"trainer.run_dir={run_dir}", *extra]


def _train(hf: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, *_train_args(hf, run_dir, *extra)])


def _steps(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("time_")} for row in read_metrics(run_dir)]


def _stopped_after_step_1(finished: Path, dest: Path) -> Path:
    """A copy of a finished 2-step run as a stop after step 1's checkpoint leaves it (no step 2 on disk)."""
    shutil.copytree(finished, dest)
    ckpts = dest / "checkpoints"
    shutil.rmtree(ckpts / "step_00000002")
    (ckpts / "latest").write_text("step_00000001\n")
    metrics = dest / METRICS_FILE
    metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])
    assert [r["step"] for r in read_metrics(dest)] == [1]
    return dest


def _resume_gives_step_2(hf: Path, finished: Path, dest: Path, *steps: str) -> None:
    """Resuming the stopped copy writes step 2 again, equal to the uninterrupted run's (time_* aside)."""
    out = _train(hf, _stopped_after_step_1(finished, dest), *steps)
    assert "resumed from" in out.stderr and "step_00000001" in out.stderr
    assert (dest / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert _steps(dest) == _steps(finished)


@pytest.fixture(scope="module")
def reference_run(vl_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    _train(vl_dir, run_dir, *STEPS)
    return run_dir


def test_example_trains_and_saves(reference_run):
    rows = read_metrics(reference_run)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["rollouts_per_rank"] == 8 and row["entropy"] > 0
        assert row["loss"] != 0 and row["grad_norm"] > 0  # the policy is updated
    assert (reference_run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert (reference_run / "checkpoints" / "initial" / "latest").exists()


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(vl_dir, reference_run, tmp_path):
    _resume_gives_step_2(vl_dir, reference_run, tmp_path / "run", *STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_two_ranks_match_one(vl_dir, reference_run, tmp_path, layout):
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
          *_train_args(vl_dir, tmp_path, *STEPS, layout)])
    got, want = _steps(tmp_path), _steps(reference_run)
    assert [r["step"] for r in got] == [1, 2]
    for g, w in zip(got, want):
        for key in ("reward_mean", "response_len_mean", "adv_mean", "adv_std", "stop_frac", "loss", "kl",
                    "entropy", "grad_norm", "clip_frac", "pg_loss"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (key, g[key], w[key])


@pytest.mark.slow
def test_text_model_trains_a_step(text_dir, tmp_path):
    run_dir = tmp_path / "run"
    _train(text_dir, run_dir, "model.preset=qwen2.5", *STEPS, "trainer.max_steps=1")
    (row,) = read_metrics(run_dir)
    assert row["step"] == 1 and row["rollouts_per_rank"] == 8 and row["loss"] != 0 and row["grad_norm"] > 0


def test_missing_model_folder_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, *_train_args(tmp_path / "absent", tmp_path / "run")], env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "model.hf_path" in line]
    assert len(lines) == 1 and "absent" in lines[0] and "Traceback" not in proc.stderr
