"""Resuming a damaged or mismatched run directory: fall back where an intact checkpoint exists,
refuse (exit 2, one line, nothing overwritten) where continuing would change what the run means.

Each test copies one finished tiny run (checkpoints at steps 2, 4 and 5) and damages the copy.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import TIMEOUT, _cmd, _env, _steps, _train  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    _train(run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "initial", "latest", "step_00000002", "step_00000004", "step_00000005"]
    return run_dir


def _copy(finished_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    return run_dir


def _rerun(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(run_dir, *extra), env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _snapshot(run_dir: Path) -> dict:
    """Bytes of every file a refused start must leave alone."""
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock" and "tensorboard" not in p.parts}


def _one_line_refusal(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("selfjudge:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_damaged_newest_checkpoint_falls_back_and_continues_exactly(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path)
    shard = sorted((run_dir / "checkpoints" / "step_00000005" / "dist").glob("*.distcp"))[0]
    _flip_byte(shard)
    proc = _rerun(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint step_00000005 is damaged" in proc.stderr and shard.name in proc.stderr, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step_00000004" in proc.stderr
    # Step 5 was trained again from step 4's checkpoint and matches the original run exactly.
    assert _steps(run_dir) == _steps(finished_run)


def test_all_step_checkpoints_unusable_is_refused_and_nothing_is_overwritten(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path)
    for step_dir in (run_dir / "checkpoints").glob("step_*"):
        (step_dir / "trainer_state.json").write_bytes(b"\x00garbage")
    before = _snapshot(run_dir)
    proc = _rerun(run_dir)
    _one_line_refusal(proc, "none can be resumed", "step_00000005", "step_00000002", "trainer.resume=never")
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("damage,words", [
    ("delete", "initial is missing"),
    ("incomplete", "initial holds no complete checkpoint"),
    ("corrupt", "initial copy (reference and Judge) is damaged"),
])
def test_stage_two_without_its_initial_copy_is_refused(finished_run, tmp_path, damage, words):
    run_dir = _copy(finished_run, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000005")  # resume inside stage 2, at step 4
    (run_dir / "checkpoints" / "latest").write_text("step_00000004\n")
    initial = run_dir / "checkpoints" / "initial"
    if damage == "delete":
        shutil.rmtree(initial)
    elif damage == "incomplete":
        (initial / "step_00000000" / "checkpoint.json").unlink()
    else:
        _flip_byte(sorted((initial / "step_00000000" / "dist").glob("*.distcp"))[0])
    before = _snapshot(run_dir)
    _one_line_refusal(_rerun(run_dir), words)
    assert _snapshot(run_dir) == before


def test_changed_meaning_on_resume_is_refused_before_config_is_overwritten(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path)
    before = _snapshot(run_dir)
    _one_line_refusal(_rerun(run_dir, "reward.mode=majority"), "reward.mode: 'judge' -> 'majority'",
                      "trainer.allow_config_change=[reward.mode]")
    assert _snapshot(run_dir) == before
