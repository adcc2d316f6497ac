"""`selfjudge env`: versions from the installed metadata, GPUs, launch layout, pre-flight verdicts."""
from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import pytest
import torch

from megatron_selfjudge import env_report


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        monkeypatch.delenv(key, raising=False)


def test_versions_come_from_the_installed_packages():
    rows = dict(env_report.versions())
    assert rows["python"] == ".".join(map(str, sys.version_info[:3]))
    assert rows["torch"] == torch.__version__
    assert rows["megatron-core"] == metadata.version("megatron-core")
    assert rows["triton"] == metadata.version("triton")
    assert set(rows) >= {"CUDA (torch built with)", "NCCL", "transformer-engine", "vllm", "transformers", "mbridge"}
    assert env_report.package_version(["no-such-distribution-xyz"]) is None
    assert env_report.package_version(["no-such-distribution-xyz", "megatron_core"]) == metadata.version("megatron-core")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU machine only")
def test_no_gpus_on_cpu():
    assert env_report.gpus(with_free_memory=True) == ["none visible (torch.cuda.is_available() is False)"]


def test_layout_lines_in_rank_order():
    rows = [{"rank": 1, "node": "1", "local_rank": 0, "local_world_size": 1, "host": "b", "pid": 2},
            {"rank": 0, "node": "0", "local_rank": 0, "local_world_size": 1, "host": "a", "pid": 1}]
    assert env_report.format_layout(rows) == ["rank 0: node 0, local rank 0 of 1, host a, pid 1",
                                              "rank 1: node 1, local rank 0 of 1, host b, pid 2"]


def test_report_lists_every_check(tmp_path, capsys):
    assert env_report.main(None, [f"trainer.run_dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    for name in ("layout", "tp/pp split", "params dtype", "loss impl", "transformer impl", "NCCL", "GPUs",
                 "data files", "run directory", "memory", "shared run directory"):
        assert f"ok    {name}: " in out, name
    assert "pre-flight: all checks pass" in out
    assert "  rank 0: node 0, local rank 0 of 1" in out
    assert list((tmp_path / "run").iterdir()) == []  # the probe file is gone


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU machine only")
def test_report_shows_what_training_would_refuse(tmp_path, capsys):
    assert env_report.main(None, ["model.params_dtype=bfloat16", "parallel.tp=2",
                                  f"trainer.run_dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    assert "FAIL  layout: parallel.tp=2 x parallel.pp=1 needs 2 processes" in out
    assert "FAIL  params dtype: model.params_dtype=bfloat16 needs CUDA" in out
    assert "pre-flight: 2 check(s) fail" in out
    assert "(embedded default, model.params_dtype=bfloat16 parallel.tp=2" in out


def test_cli_env_bad_key_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "megatron_selfjudge.cli", "env", "model.no_such_key=1"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selfjudge: config error:") and "no_such_key" in lines[0]
