"""Benchmark of the fused GRPO loss against eager PyTorch, torch.compile and Liger-Kernel.

    python -m megatron_selfjudge.kernels.bench [--tokens 4096 16384 32768] [--vocab 152064]
        [--dtype bfloat16] [--reps 20] [--out benchmarks/results] [--providers fused eager compile liger]
        [--block-v 4096]   (the fused kernel's vocab block, for tuning sweeps on a new GPU)
        [--suite logits fused_linear]   (fused_linear: hidden states in, see bench_fused_linear.py)

Every provider computes the same objective: per-token GRPO loss (old and reference log-probs
given, so ratio, clipping and KL are all live) summed with token-mean weights, then its
gradient with respect to the logits. Forward, backward and forward+backward are timed separately
(CUDA events, warm-up, median of ``reps``). The bandwidth bound uses the minimum traffic any
implementation needs: the forward reads the logits once (N*V*b bytes), the backward reads them
once and writes dlogits once (2*N*V*b), forward+backward 3*N*V*b; it is divided by the bandwidth
of a device-to-device copy measured in the same run. Peak extra memory is the rise of
``torch.cuda.max_memory_allocated`` over the inputs during one forward+backward (the dlogits
output included).

``compile`` is torch.compile of the same reference math (minus ``token_logprobs``' host-side
target check, a graph break); compile time is spent in the warm-up and not timed.

Liger-Kernel's ``triton_grpo_loss`` takes logits [B, L+1, V] and drops the last position itself;
it gets B = 8 sequences of L = N/8 tokens with one extra (unused) logits row each, per-sequence
advantages, ``inplace=False`` like ours, and its own reduction (its per-token math has no dual
clip or clamps, a few scalar ops per token: the vocabulary passes, which dominate, are the same).

Without CUDA it runs a small shape with the kernel in Triton's interpreter and wall-clock timing,
so that CI exercises the whole path; those numbers say nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .loss_params import LossParams

PROVIDERS = ("fused", "eager", "compile", "liger")
CPU_DEFAULT_PROVIDERS = ("fused", "eager")  # inductor's C++ compile is minutes on a 2-core box
GPU_SHAPES = dict(tokens=(4096, 16384, 32768), vocab=152064, reps=20, warmup=5)
CPU_SHAPES = dict(tokens=(64,), vocab=1000, reps=3, warmup=1)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The config defaults (temperature 1): the benches time the loss as training runs it.
LOSS_ARGS = {k: v for k, v in LossParams()._asdict().items() if k in ("eps_low", "eps_high", "dual_clip", "beta_kl")}
CHECK_ROWS = 512
LIGER_SEQS = 8


def _inputs(n: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """Logits and per-token inputs of one benchmark shape (old/ref log-probs near the current ones)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, vocab, generator=gen, device=device, dtype=torch.float32).mul_(2.0).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen, device=device)
    noise = lambda: 0.1 * torch.randn(n, generator=gen, device=device)  # noqa: E731
    base = -torch.rand(n, generator=gen, device=device) * 10
    return dict(logits=logits, targets=targets, advantages=torch.randn(n, generator=gen, device=device),
                mask=torch.ones(n, dtype=torch.bool, device=device), old_logp=base + noise(), ref_logp=base + noise(),
                weights=torch.full((n,), 1.0 / n, device=device))


def _reference_core(logits, targets, advantages, old_logp, ref_logp, weights):
    """The eager objective from loss.py's reference functions (no metrics, no entropy pass)."""
    from megatron_selfjudge import loss as ref

    logp = ref.token_logprobs(logits, targets, 1.0)
    per = ref.per_token_policy_loss(logp, advantages, old_logp, ref_logp, **LOSS_ARGS)
    return (per.loss * weights).sum()


def _compilable_core(logits, targets, advantages, old_logp, ref_logp, weights):
    """The same objective without token_logprobs' host-side target check, which would break the graph."""
    from megatron_selfjudge import loss as ref

    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    per = ref.per_token_policy_loss(logp, advantages, old_logp, ref_logp, **LOSS_ARGS)
    return (per.loss * weights).sum()


def _make_forward(provider: str, data: dict,
                  block_v: int | None = None) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    """A zero-argument forward returning a scalar loss, and the leaf whose grad it produces."""
    if provider == "fused":
        from .grpo_loss import fused_grpo_loss

        leaf = data["logits"].detach().requires_grad_()
        args = (leaf, data["targets"], data["advantages"], data["mask"], data["old_logp"], data["ref_logp"])
        kwargs = dict(temperature=1.0, block_v=block_v, **LOSS_ARGS)
        return lambda: (fused_grpo_loss(*args, **kwargs).loss * data["weights"]).sum(), leaf
    if provider in ("eager", "compile"):
        leaf = data["logits"].detach().requires_grad_()
        core = torch.compile(_compilable_core) if provider == "compile" else _reference_core
        args = (leaf, data["targets"], data["advantages"], data["old_logp"], data["ref_logp"], data["weights"])
        return lambda: core(*args), leaf
    if provider == "liger":
        return _liger_forward(data)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def _liger_forward(data: dict):
    grpo = importlib.import_module("liger_kernel.transformers.grpo_loss")
    n, vocab = data["logits"].shape
    if n % LIGER_SEQS:
        raise ValueError(f"liger layout needs tokens divisible by {LIGER_SEQS}, got {n}")
    seq = n // LIGER_SEQS
    # [B, L+1, V]: Liger reads positions 0..L-1 of each sequence and ignores the last one.
    logits = torch.empty(LIGER_SEQS, seq + 1, vocab, dtype=data["logits"].dtype, device=data["logits"].device)
    logits[:, :seq] = data["logits"].view(LIGER_SEQS, seq, vocab)
    logits[:, seq] = 0
    leaf = logits.requires_grad_()
    view = lambda key: data[key].view(LIGER_SEQS, seq).contiguous()  # noqa: E731
    adv = data["advantages"].view(LIGER_SEQS, seq)[:, 0].contiguous()

    def forward():
        out = grpo.triton_grpo_loss(leaf, view("old_logp"), view("ref_logp"), view("targets"), adv,
                                    completion_mask=view("mask").int(), temperature=1.0, beta=LOSS_ARGS["beta_kl"],
                                    eps_low=LOSS_ARGS["eps_low"], eps_high=LOSS_ARGS["eps_high"], inplace=False)
        return out[0] if isinstance(out, (tuple, list)) else out
    return forward, leaf


@dataclass
class _Run:
    """How this run measures: timer, repetitions, the copy bandwidth bound, the kernel's block size."""

    timer: _Timer
    reps: int
    warmup: int
    copy_gbps: float
    block_v: int | None


class _Timer:
    """Milliseconds of one call: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end)


def _median_ms(timer: _Timer, setup: Callable[[], object], body: Callable[[object], object],
               reps: int, warmup: int) -> float:
    for _ in range(warmup):
        body(setup())
    samples = []
    for _ in range(reps):
        state = setup()  # untimed: e.g. the forward whose backward is timed
        samples.append(timer(lambda: body(state)))
    return statistics.median(samples)


def _time_provider(provider: str, data: dict, run: _Run) -> dict:
    forward, leaf = _make_forward(provider, data, run.block_v)
    timer, reps, warmup = run.timer, run.reps, run.warmup

    def fresh():
        leaf.grad = None  # so backward stores dlogits instead of adding into an old gradient
        return None

    def forward_for_backward():
        fresh()
        return forward()

    result = {
        "forward_ms": _median_ms(timer, fresh, lambda _: forward(), reps, warmup),
        "backward_ms": _median_ms(timer, forward_for_backward, lambda loss: loss.backward(), reps, warmup),
        "fwd_bwd_ms": _median_ms(timer, fresh, lambda _: forward().backward(), reps, warmup),
    }
    result["peak_extra_mem_bytes"] = _peak_extra_memory(forward, fresh, leaf.device)
    leaf.grad = None
    return result


def _peak_extra_memory(forward, fresh, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None  # the CPU allocator keeps no peak statistics
    fresh()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _copy_bandwidth_gbps(device: torch.device, nbytes: int, timer: _Timer, reps: int) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), the practical HBM bound."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = _median_ms(timer, lambda: None, lambda _: dst.copy_(src), max(reps, 3), 2)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _agreement(data: dict) -> dict:
    """Fused vs eager reference on the first rows: loss, log-probs and dlogits (in ulps of the dtype)."""
    from megatron_selfjudge import loss as ref

    from .grpo_loss import fused_grpo_loss

    rows = min(CHECK_ROWS, data["logits"].shape[0])
    part = {key: value[:rows] for key, value in data.items()}
    part["weights"] = torch.rand(rows, device=part["logits"].device) + 0.5  # non-uniform upstream gradient
    fused_leaf = part["logits"].clone().requires_grad_()
    out = fused_grpo_loss(fused_leaf, part["targets"], part["advantages"], part["mask"], part["old_logp"],
                          part["ref_logp"], **LOSS_ARGS)
    (out.loss * part["weights"]).sum().backward()
    ref_leaf = part["logits"].float().requires_grad_()
    logp = ref.token_logprobs(ref_leaf, part["targets"])
    per = ref.per_token_policy_loss(logp, part["advantages"], part["old_logp"], part["ref_logp"], **LOSS_ARGS)
    (per.loss * part["weights"]).sum().backward()
    check = {
        "rows": rows,
        "loss_max_abs_diff": float((out.loss.detach() - per.loss.detach()).abs().max()),
        "logprobs_max_abs_diff": float((out.logprobs.detach() - logp.detach()).abs().max()),
    }
    expected = ref_leaf.grad.to(fused_leaf.dtype)
    if fused_leaf.dtype == torch.float32:
        check["grad_max_abs_diff"] = float((fused_leaf.grad - expected).abs().max())
    else:
        check["grad_max_ulp"] = int(ulp_distance(fused_leaf.grad, expected).max())
    return check


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable bf16/fp16 values apart a and b are, elementwise (+0 == -0)."""
    if a.dtype != b.dtype or a.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"ulp_distance needs two bf16 or two fp16 tensors, got {a.dtype} and {b.dtype}")

    def ordered(x):
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits & 0x7FFF)
    return (ordered(a) - ordered(b)).abs()


def _versions() -> dict:
    found = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for name in ("triton", "liger_kernel"):
        try:
            found[name] = importlib.import_module(name).__version__
        except (ImportError, AttributeError):
            found[name] = None
    return found


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def _with_rates(entry: dict, n: int, vocab: int, elem: int, copy_gbps: float) -> dict:
    traffic = {"forward": n * vocab * elem, "backward": 2 * n * vocab * elem, "fwd_bwd": 3 * n * vocab * elem}
    for phase, nbytes in traffic.items():
        gbps = nbytes / entry[f"{phase}_ms"] / 1e6
        entry[f"{phase}_gbps"] = gbps
        entry[f"{phase}_frac_of_bound"] = gbps / copy_gbps
    return entry


def _run_one(provider: str, data: dict, run: _Run) -> dict:
    n, vocab = data["logits"].shape
    entry = {"provider": provider, "tokens": n, "vocab": vocab}
    try:
        entry.update(_time_provider(provider, data, run), status="ok")
        _with_rates(entry, n, vocab, data["logits"].element_size(), run.copy_gbps)
    except ImportError as err:
        entry["status"] = f"skipped: not installed ({err.name or err})"
    except torch.cuda.OutOfMemoryError:
        entry["status"] = "out of memory"
    except Exception as err:  # a competitor failing (e.g. another Liger API) must not hide the others
        if provider == "fused":
            raise
        entry["status"] = f"error: {type(err).__name__}: {str(err)[:200]}"
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return entry


def run_kernel_bench(
    tokens: Sequence[int] | None = None,
    vocab: int | None = None,
    dtype: str = "bfloat16",
    reps: int | None = None,
    out_dir: str | Path = "benchmarks/results",
    providers: Sequence[str] | None = None,
    warmup: int | None = None,
    device: str | None = None,
    show: bool = True,
    block_v: int | None = None,
) -> dict:
    """Time every provider on every shape, print a table and write the JSON; returns the JSON payload."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first loaded
    defaults = GPU_SHAPES if dev.type == "cuda" else CPU_SHAPES
    tokens = tuple(tokens or defaults["tokens"])
    vocab = vocab or defaults["vocab"]
    reps = reps or defaults["reps"]
    warmup = defaults["warmup"] if warmup is None else warmup
    providers = tuple(providers or (PROVIDERS if dev.type == "cuda" else CPU_DEFAULT_PROVIDERS))
    _validate(tokens, vocab, dtype, reps, providers)
    torch_dtype = DTYPES[dtype]
    timer = _Timer(dev)
    # At least 64 MiB so the copy measures memory, not launch overhead; at most 2 GiB.
    copy_bytes = min(max(max(tokens) * vocab * torch_dtype.itemsize, 64 << 20), 2 << 30)
    copy_gbps = _copy_bandwidth_gbps(dev, copy_bytes, timer, reps)
    run = _Run(timer, reps, warmup, copy_gbps, block_v)
    results, checks = [], []
    for n in tokens:
        data = _inputs(n, vocab, torch_dtype, dev)
        checks.append({"tokens": n, **_agreement(data)})
        results.extend(_run_one(p, data, run) for p in providers)
        del data
    payload = {
        "benchmark": "fused_grpo_loss",
        "device": _device_name(dev),
        "device_type": dev.type,
        "timing": "cuda events, median" if dev.type == "cuda" else "wall clock (Triton interpreter), median",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "dtype": dtype,
        "vocab": vocab,
        "tokens": list(tokens),
        "reps": reps,
        "warmup": warmup,
        "loss_args": LOSS_ARGS,
        "min_bytes": "forward reads logits once (N*V*b); backward reads logits and writes dlogits once (2*N*V*b)",
        "copy_bandwidth_gbps": copy_gbps,
        "liger_layout": f"logits [{LIGER_SEQS}, N/{LIGER_SEQS}+1, V], inplace=False",
        "fused_block_v": block_v,  # None: the kernel's default launch configuration
        "results": results,
        "checks": checks,
    }
    payload["path"] = str(_write(payload, Path(out_dir)))
    if show:
        _print_table(payload)
    return payload


def _validate(tokens, vocab, dtype, reps, providers) -> None:
    if not tokens or any(int(n) <= 0 for n in tokens):
        raise ValueError(f"tokens must be positive integers, got {tokens!r}")
    if vocab <= 0:
        raise ValueError(f"vocab must be > 0, got {vocab!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if reps <= 0:
        raise ValueError(f"reps must be > 0, got {reps!r}")
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        raise ValueError(f"providers must be among {PROVIDERS}, got unknown {sorted(unknown)}")


def _write(payload: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", payload["device"]).strip("-").lower() or payload["device_type"]
    path = out_dir / f"grpo_loss_{slug}_{payload['date'][:10]}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _print_table(payload: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fused GRPO loss, V={payload['vocab']} {payload['dtype']} on {payload['device']} "
                        f"(copy bound {payload['copy_bandwidth_gbps']:.0f} GB/s; {payload['timing']})")
    for column in ("N", "provider", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd+bwd GB/s",
                   "bound fwd/bwd/both", "peak extra MiB", "fused speed-up"):
        table.add_column(column, justify="right")
    fused = {r["tokens"]: r for r in payload["results"] if r["provider"] == "fused" and r["status"] == "ok"}
    for r in payload["results"]:
        if r["status"] != "ok":
            table.add_row(str(r["tokens"]), r["provider"], r["status"], *[""] * 6)
            continue
        peak = "-" if r["peak_extra_mem_bytes"] is None else f"{r['peak_extra_mem_bytes'] / 2**20:.0f}"
        base = fused.get(r["tokens"])
        speedup = f"{r['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}x" if base else "-"
        bound = "/".join(f"{100 * r[f'{p}_frac_of_bound']:.0f}%" for p in ("forward", "backward", "fwd_bwd"))
        table.add_row(str(r["tokens"]), r["provider"], f"{r['forward_ms']:.3f}", f"{r['backward_ms']:.3f}",
                      f"{r['fwd_bwd_ms']:.3f}", f"{r['fwd_bwd_gbps']:.1f}", bound, peak, speedup)
    console = Console()
    if not console.is_terminal:  # logs and CI: do not squeeze the columns to 80 characters
        console = Console(width=160)
    console.print(table)
    for check in payload["checks"]:
        console.print(f"check N={check['tokens']} ({check['rows']} rows) fused vs eager: {check}")
    console.print(f"wrote {payload['path']}")


SUITES = ("logits", "fused_linear")


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point (also used by ``selfjudge bench kernels``); returns {suite: payload}."""
    from . import bench_fused_linear

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", nargs="+", choices=SUITES, default=list(SUITES),
                        help="logits: the logits-in kernel; fused_linear: hidden states in (bench_fused_linear.py)")
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts N timed (default GPU: 4096 16384 32768; "
                        "fused_linear: 16384; an empty list: fused_linear times nothing, only the memory curve)")
    parser.add_argument("--memory-tokens", type=int, nargs="+",
                        help="fused_linear: token counts of the peak-memory curve (default GPU: 4096 .. 131072)")
    parser.add_argument("--vocab", type=int, help="vocabulary size V (default GPU: 152064)")
    parser.add_argument("--hidden", type=int, help="fused_linear: hidden size H (default GPU: 3584)")
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    parser.add_argument("--reps", type=int, help="timed repetitions per measurement (median reported)")
    parser.add_argument("--warmup", type=int, help="untimed repetitions first")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    parser.add_argument("--providers", nargs="+", help=f"subset of providers: logits {PROVIDERS}, "
                        f"fused_linear {bench_fused_linear.PROVIDERS}")
    parser.add_argument("--block-v", type=int, help="override the kernels' vocab block (tuning sweeps)")
    parser.add_argument("--chunk-tokens", type=int, help="fused_linear: tokens per backward chunk")
    args = parser.parse_args(argv)
    common = dict(vocab=args.vocab, dtype=args.dtype, reps=args.reps, out_dir=args.out, warmup=args.warmup,
                  block_v=args.block_v)
    wanted = lambda names: None if args.providers is None else [p for p in args.providers if p in names]  # noqa: E731
    unknown = set(args.providers or ()) - set(PROVIDERS) - set(bench_fused_linear.PROVIDERS)
    if unknown:
        parser.error(f"unknown providers {sorted(unknown)}")
    out = {}
    # A suite none of whose providers were named is skipped.
    if "logits" in args.suite and wanted(PROVIDERS) != []:
        out["logits"] = run_kernel_bench(tokens=args.tokens, providers=wanted(PROVIDERS), **common)
    if "fused_linear" in args.suite and wanted(bench_fused_linear.PROVIDERS) != []:
        out["fused_linear"] = bench_fused_linear.run_fused_linear_bench(
            tokens=args.tokens, memory_tokens=args.memory_tokens, hidden=args.hidden, chunk_tokens=args.chunk_tokens,
            providers=wanted(bench_fused_linear.PROVIDERS), **common)
    return out


if __name__ == "__main__":
    main()
