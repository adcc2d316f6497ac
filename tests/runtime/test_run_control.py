"""Preemption during evaluation and kill -9 at chosen and random points: the run resumes exactly.

The reference is an uninterrupted run with the same overrides; interrupted-and-resumed runs must
write the same per-step metrics (except wall-clock timings) and the same evaluation results.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from test_trainer import TIMEOUT, _cmd, _env, _steps, _train  # noqa: E402

# Like tests/test_trainer.py (see conftest.py): the CPU/gloo end-to-end runs.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo end-to-end runs; CUDA machine")

# Small generation batches and 32 held-out prompts: an evaluation is 8 greedy + 32 sampled calls.
RUN = ("trainer.sft_steps=2", "optim.sft_warmup_steps=0", "trainer.max_steps=3", "rollout.max_batch_size=4", "data.synthetic_test=32")


def _start(run_dir: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(_cmd(run_dir, *RUN), env=env or _env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _evals(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())["evals"]


def _kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    """SIGKILL `proc` as soon as ready() is true (polled every millisecond)."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {what}: {proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{what} not reached"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    _train(run_dir, *RUN)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("name, step, recorded", [("before", 0, set()), ("after", 3, {"before"})])
def test_sigterm_during_evaluation_stops_within_a_batch_and_resumes_exactly(reference, tmp_path, name, step,
                                                                            recorded):
    proc = _start(tmp_path)
    lines, starts = [], 0
    for line in proc.stdout:  # wait until evaluation `name` is generating
        lines.append(line)
        starts += "eval: greedy on" in line
        if starts == (1 if name == "before" else 2):
            break
    assert proc.poll() is None, "".join(lines)[-3000:]
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=TIMEOUT)
    waited = time.monotonic() - sent
    assert proc.returncode == 0, output[-3000:]
    assert f"preempted during evaluation {name!r}" in output, output[-3000:]
    assert f"eval {name}:" not in output  # it did not run to its end first
    # The bound: one generation batch of 4 rows, then a checkpoint save and the exit.
    assert waited < 60, waited  # a sanity cap on a shared 2-core machine; measured ~6 s
    state = json.loads((tmp_path / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())
    assert set(state["evals"]) == recorded  # the interrupted evaluation is not recorded
    out = _train(tmp_path, *RUN)
    assert "resumed from" in out.stderr
    assert _steps(tmp_path) == _steps(reference)
    assert _evals(tmp_path) == _evals(reference)


@pytest.mark.slow
def test_kill9_inside_a_save_inside_the_metrics_rewrite_and_at_random_resumes_exactly(reference, tmp_path):
    ckpts = tmp_path / "checkpoints"
    # 1. Inside the final save: its temporary folder exists, the checkpoint is not published yet.
    proc = _start(tmp_path)
    _kill_when(proc, lambda: (ckpts / ".tmp.step_00000003").exists(), "the final save")
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert [r["step"] for r in _steps(tmp_path)] == [1, 2, 3]
    # 2. Inside the metrics rewrite of the resume (hook: the new file is written, not yet renamed).
    before = (tmp_path / "metrics.jsonl").read_bytes()
    proc = _start(tmp_path, env={**_env(), "SELFJUDGE_TEST_KILL_AT": "metrics_rewrite"})
    proc.wait(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read()[-3000:]
    assert (tmp_path / "metrics.jsonl").read_bytes() == before  # the old file, whole
    # 3. At a random moment of the next resume.
    seed = int.from_bytes(os.urandom(4), "little")
    delay = random.Random(seed).uniform(0.0, 15.0)
    proc = _start(tmp_path)
    start = time.monotonic()
    _kill_when(proc, lambda: time.monotonic() - start > delay, f"{delay:.2f} s (seed {seed})")
    # 4. Resume to the end.
    _train(tmp_path, *RUN)
    assert _steps(tmp_path) == _steps(reference), f"random kill at {delay:.2f} s (seed {seed})"
    assert _evals(tmp_path) == _evals(reference)
    assert not (tmp_path / "metrics.jsonl.part").exists()


@pytest.mark.slow
def test_sigterm_after_the_run_exits_zero(reference, tmp_path):
    """Everything is saved; a stop signal during teardown (the probe found one killing the process,
    exit -15) ends the run normally: the handler stays installed until the process groups are gone."""
    env = {**_env(), "SELFJUDGE_TEST_SIGTERM_AT": "teardown"}
    proc = subprocess.run(_cmd(tmp_path, *RUN), env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "results.md").is_file()
    assert _steps(tmp_path) == _steps(reference)
