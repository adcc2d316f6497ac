"""Assemble the one JSON of ``scripts/gpu_check.sh``: device, versions, the gpu tests, the benchmarks, the targets.

    python -m megatron_selfjudge.kernels.gpu_report --work DIR --out benchmarks/results [--dry-run]

``DIR`` is the check's scratch folder: ``junit.xml`` (pytest -m gpu), ``steps.json`` (each step's
status and seconds, written by the script), ``logits/*.json`` (the logits-in kernel benchmark,
default launch first, then the --block-v sweep) and ``fused_linear/*.json``. The targets of issue 14
are evaluated from those figures; a figure that is missing (a step failed, Liger not installed)
gives ``met: null``, never a guess.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import torch

TARGETS = {
    "logits_kernel_fwd_bwd_frac_of_copy_bound": (">=", 0.85),
    "logits_kernel_speedup_over_liger": (">=", 1.3),
    "logits_kernel_speedup_over_eager": (">=", 5.0),
    "fused_linear_over_gemm_plus_logits_kernel": ("<=", 1.2),
    # "at flat memory": what the fused op adds per extra token, against one row of bf16 logits.
    "fused_linear_peak_growth_per_token_over_logits_row": ("<=", 0.05),
}


def device_info() -> dict:
    """The accelerator (or the CPU in a dry run) and the software around it."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "platform": platform.platform()}
    for name in ("triton", "megatron.core", "liger_kernel"):
        try:
            info[name] = getattr(importlib.import_module(name), "__version__", "unknown")
        except ImportError:
            info[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"sm_{props.major}{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    else:
        info.update(device=platform.processor() or "cpu", capability=None)
    return info


def read_junit(path: Path) -> dict:
    """{test id: {outcome, seconds, message}} and totals from pytest's junit XML (empty when absent)."""
    if not path.exists():
        return {"status": "missing", "tests": {}}
    tests, totals = {}, {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome = "failed" if tag == "failure" else tag
                message = (child.get("message") or "")[:300]
        totals[outcome] += 1
        tests[f"{case.get('classname')}::{case.get('name')}"] = {
            "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message}
    return {"status": "ok", **totals, "tests": tests}


def _load(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []


def _ok(rows: list, provider: str, tokens: int | None = None) -> dict | None:
    for row in rows:
        if row["provider"] == provider and row.get("status") == "ok" and (tokens is None or row["tokens"] == tokens):
            return row
    return None


def logits_summary(runs: list[dict]) -> dict:
    """The default launch's providers at its largest N, and the fused kernel per --block-v of the sweep."""
    if not runs:
        return {"status": "missing"}
    default = next((r for r in runs if r.get("fused_block_v") is None), runs[0])
    n = max(default["tokens"])
    rows = default["results"]
    fused, eager, liger = _ok(rows, "fused", n), _ok(rows, "eager", n), _ok(rows, "liger", n)
    sweep = []
    for run in runs:
        row = _ok(run["results"], "fused", n)
        if row:
            sweep.append({"block_v": run.get("fused_block_v"), "fwd_bwd_ms": row["fwd_bwd_ms"],
                          "fwd_bwd_frac_of_bound": row["fwd_bwd_frac_of_bound"]})
    best = min(sweep, key=lambda s: s["fwd_bwd_ms"]) if sweep else None
    return {
        "status": "ok", "tokens": n, "vocab": default["vocab"], "dtype": default["dtype"],
        "copy_bandwidth_gbps": default["copy_bandwidth_gbps"], "results": rows, "checks": default.get("checks"),
        "block_v_sweep": sweep, "best_block_v": best,
        "figures": {
            "logits_kernel_fwd_bwd_frac_of_copy_bound": best["fwd_bwd_frac_of_bound"] if best else None,
            "logits_kernel_speedup_over_liger": (liger["fwd_bwd_ms"] / best["fwd_bwd_ms"]) if liger and best else None,
            "logits_kernel_speedup_over_eager": (eager["fwd_bwd_ms"] / best["fwd_bwd_ms"]) if eager and best else None,
        } if fused else {},
    }


def fused_linear_summary(runs: list[dict]) -> dict:
    """The memory curve (peak MiB per provider and N), the timings and the fused-over-(GEMM + kernel) ratio."""
    if not runs:
        return {"status": "missing"}
    run = runs[-1]
    curve: dict = {}
    for row in run["memory"]:
        curve.setdefault(row["provider"], {})[str(row["tokens"])] = (
            round(row["peak_bytes"] / 2**20, 3) if row["status"] == "ok" else row["status"])
    ratios = list(run.get("targets", {}).values())
    fused = sorted((r["tokens"], r["peak_bytes"], r["logits_bytes"]) for r in run["memory"]
                   if r["provider"] == "fused_linear" and r["status"] == "ok")
    growth = None
    if len(fused) >= 2 and fused[-1][0] > fused[0][0]:
        (n0, peak0, _), (n1, peak1, logits1) = fused[0], fused[-1]
        growth = (peak1 - peak0) / (n1 - n0) / (logits1 / n1)
    return {"status": "ok", "vocab": run["vocab"], "hidden": run["hidden"], "dtype": run["dtype"],
            "gemm_tflops": run["gemm_tflops"], "copy_bandwidth_gbps": run["copy_bandwidth_gbps"],
            "peak_mib": curve, "results": run["results"], "plot": run.get("plot"),
            "figures": {"fused_linear_over_gemm_plus_logits_kernel": ratios[-1] if ratios else None,
                        "fused_linear_peak_growth_per_token_over_logits_row": growth}}


def evaluate(figures: dict) -> dict:
    """Each target: the measured value, the bound and whether it is met (None when not measured)."""
    out = {}
    for name, (op, bound) in TARGETS.items():
        value = figures.get(name)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[name] = {"value": value, "target": f"{op} {bound}", "met": met}
    return out


def assemble(work: Path, out_dir: Path, dry_run: bool = False) -> Path:
    """Write gpu_check_<device>_<date>.json under out_dir from the scratch folder ``work``; returns its path."""
    steps_path = work / "steps.json"
    steps = json.loads(steps_path.read_text()) if steps_path.exists() else {}
    logits = logits_summary(_load(work / "logits"))
    linear = fused_linear_summary(_load(work / "fused_linear"))
    device = device_info()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    payload = {
        "check": "scripts/gpu_check.sh", "dry_run": dry_run, "date": date, "device": device, "steps": steps,
        "gpu_tests": read_junit(work / "junit.xml"), "logits_kernel_bench": logits, "fused_linear_bench": linear,
        "targets": evaluate({**logits.get("figures", {}), **linear.get("figures", {})}),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device["device"]).strip("-").lower() or "device"
    path = out_dir / f"gpu_check_{'dry-run_' if dry_run else ''}{slug}_{date[:10]}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    """Command-line entry point of the report step."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="the check's scratch folder")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    parser.add_argument("--dry-run", action="store_true", help="mark the JSON as a CPU dry run")
    args = parser.parse_args(argv)
    path = assemble(Path(args.work), Path(args.out), args.dry_run)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
