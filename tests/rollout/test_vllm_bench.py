"""`selfjudge bench rollout` refuses bad sizes with one line (exit 2) before building anything; the table prints."""
from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_selfjudge.rollout import bench


@pytest.mark.parametrize("flag", ["--prompts", "--samples", "--max-new-tokens", "--pushes", "--sync-bucket-mb"])
def test_non_positive_sizes_are_one_line_errors(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main([flag, "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"selfjudge bench rollout: {flag} must be >= 1"]


def test_cli_exit_code():
    proc = subprocess.run([sys.executable, "-m", "megatron_selfjudge.cli", "bench", "rollout", "--prompts", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == ["selfjudge bench rollout: --prompts must be >= 1"]


def test_table_lists_both_engines_and_the_push(capsys):
    engines = {name: {"generated_tokens": 64, "seconds": s, "tokens_per_s": 64 / s} for name, s in
               (("megatron", 2.0), ("vllm", 0.5))}
    bench.print_table({"model": "m", "prompts": 2, "samples": 4, "max_new_tokens": 8, "dtype": "float32",
                       "device": "cpu", "engines": engines, "vllm_over_megatron_tokens_per_s": 4.0,
                       "weight_sync": {"bytes": 2e8, "seconds_mean": 0.5, "seconds_per_gb": 2.5, "pushes": 3,
                                       "bucket_mb": 512}})
    out = capsys.readouterr().out
    assert "megatron" in out and "vllm" in out and "4.00x" in out and "2.50 s/GB" in out
