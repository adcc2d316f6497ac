"""Benchmark of the fused output layer + GRPO loss (hidden states in) against the ways that build the logits.

    python -m megatron_selfjudge.kernels.bench --suite fused_linear [--tokens 16384] [--memory-tokens 4096 ... 131072]
        [--vocab 152064] [--hidden 3584] [--dtype bfloat16] [--providers fused_linear logits_kernel eager compile liger]

Every provider computes the same objective from hidden states h [N, H] and an output weight
W [V, H]: the per-token GRPO loss (old and reference log-probs given) summed with token-mean
weights, and its gradient with respect to h and W.

* ``fused_linear``: ``kernels/fused_linear_grpo.py`` (the logits never exist);
* ``logits_kernel``: cuBLAS ``h @ W.T`` then the logits-in Triton kernel (``grpo_loss.py``), the
  "GEMM + logits kernel" baseline the fused op is measured against;
* ``eager`` / ``compile``: ``h @ W.T`` then loss.py's reference math, eager or torch.compile;
* ``liger``: Liger-Kernel's chunked ``LigerFusedLinearGRPOLoss`` (``loss_type="bnpo"``: a token
  mean; 8 sequences of N/8 tokens, per-sequence advantages), when installed.

Two measurements. Peak memory versus N (``--memory-tokens``; 4k to 128k tokens on the GPU): the
bytes torch allocates during one forward+backward beyond what existed before (inputs), gradients
included. On the GPU that is the rise of ``torch.cuda.max_memory_allocated``; on the CPU
``StorageTracker`` counts the storages aten ops create and free (the profiler's allocation events
were tried first: over a long interpreter run they lose events and under-count), NOT the process
RSS, which the Triton interpreter's own numpy buffers inflate. Triton kernels allocate nothing
themselves on either device, so these counts carry over from the CPU to the GPU. The curve is plotted to a PNG beside the JSON. Timing (``--tokens``): forward, backward
and both (median); achieved FLOP/s of the output layer's useful work (2NVH forward, 4NVH backward;
the fused op spends 2NVH more recomputing logits) against a measured GEMM of the same shape, and
achieved bandwidth of the minimum traffic (read h and W, write their gradients) against the measured
copy bound. On the CPU timing runs in Triton's interpreter and says nothing about GPU speed.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import bench as logits_bench

PROVIDERS = ("fused_linear", "logits_kernel", "eager", "compile", "liger")
CPU_DEFAULT_PROVIDERS = ("fused_linear", "logits_kernel", "eager")  # inductor's C++ compile is minutes here
GPU_SHAPES = dict(tokens=(16384,), memory_tokens=(4096, 8192, 16384, 32768, 65536, 131072), vocab=152064,
                  hidden=3584, reps=10, warmup=3, chunk_tokens=None)
# Small H so the interpreter gets through 4k tokens; the logits still dwarf everything else.
# A 256-token backward chunk so the curve passes several chunks (the GPU default is a 256 MiB buffer).
CPU_SHAPES = dict(tokens=(256,), memory_tokens=(1024, 2048, 4096), vocab=2048, hidden=32, reps=1, warmup=0,
                  chunk_tokens=256)
LIGER_SEQS = 8


def _inputs(n: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """Hidden states and weight giving logits of spread ~2 (like the logits bench), and per-token inputs."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen, device=device).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen, device=device) * (2.0 / hidden ** 0.5)).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen, device=device)
    base = -torch.rand(n, generator=gen, device=device) * 10
    noise = lambda: 0.1 * torch.randn(n, generator=gen, device=device)  # noqa: E731
    return dict(hidden=h, weight=w, targets=targets, advantages=torch.randn(n, generator=gen, device=device),
                mask=torch.ones(n, dtype=torch.bool, device=device), old_logp=base + noise(),
                ref_logp=base + noise(), weights=torch.full((n,), 1.0 / n, device=device))


def _make_forward(provider: str, data: dict, block_v: int | None = None,
                  chunk_tokens: int | None = None) -> tuple[Callable[[], torch.Tensor], tuple]:
    """A zero-argument forward returning the scalar objective, and the leaves (h, W) it differentiates."""
    h = data["hidden"].detach().requires_grad_()
    w = data["weight"].detach().requires_grad_()
    rest = (data["targets"], data["advantages"], data["old_logp"], data["ref_logp"], data["weights"])
    if provider == "fused_linear":
        from .fused_linear_grpo import fused_linear_grpo_loss

        def forward():
            out = fused_linear_grpo_loss(h, w, data["targets"], data["advantages"], data["mask"], data["old_logp"],
                                         data["ref_logp"], block_v=block_v, chunk_tokens=chunk_tokens,
                                         **logits_bench.LOSS_ARGS)
            return (out.loss * data["weights"]).sum()
        return forward, (h, w)
    if provider == "logits_kernel":
        from .grpo_loss import fused_grpo_loss

        def forward():
            out = fused_grpo_loss(h @ w.T, data["targets"], data["advantages"], data["mask"], data["old_logp"],
                                  data["ref_logp"], **logits_bench.LOSS_ARGS)
            return (out.loss * data["weights"]).sum()
        return forward, (h, w)
    if provider == "eager":
        return (lambda: logits_bench._reference_core(h @ w.T, *rest)), (h, w)
    if provider == "compile":
        core = torch.compile(lambda hh, ww, *args: logits_bench._compilable_core(hh @ ww.T, *args))
        return (lambda: core(h, w, *rest)), (h, w)
    if provider == "liger":
        return _liger_forward(data, h, w), (h, w)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def _liger_forward(data: dict, h: torch.Tensor, w: torch.Tensor) -> Callable[[], torch.Tensor]:
    chunked = importlib.import_module("liger_kernel.chunked_loss")
    n = h.shape[0]
    if n % LIGER_SEQS:
        raise ValueError(f"liger layout needs tokens divisible by {LIGER_SEQS}, got {n}")
    seq = n // LIGER_SEQS
    loss = chunked.LigerFusedLinearGRPOLoss(beta=logits_bench.LOSS_ARGS["beta_kl"], use_ref_model=True,
                                            epsilon_low=logits_bench.LOSS_ARGS["eps_low"],
                                            epsilon_high=logits_bench.LOSS_ARGS["eps_high"], loss_type="bnpo")
    view = lambda key: data[key].view(LIGER_SEQS, seq)  # noqa: E731
    adv = data["advantages"].view(LIGER_SEQS, seq)[:, 0].contiguous()

    def forward():
        out = loss(h.view(LIGER_SEQS, seq, -1), w, view("targets"), view("mask").int(), adv,
                   ref_per_token_logps=view("ref_logp"), old_per_token_logps=view("old_logp"))
        return out[0] if isinstance(out, (tuple, list)) else out
    return forward


class StorageTracker(TorchDispatchMode):
    """Counts the bytes of every tensor storage aten ops create while active, and their peak.

    Each op's outputs with a storage not seen yet are added; storages whose last reference died are
    subtracted (checked after every op, before its outputs are added). Autograd's ops (gradients
    included) pass through it too. What it cannot see: scratch memory inside a single aten kernel,
    and Triton's interpreter's numpy tiles (which are registers on the GPU).
    """

    def __init__(self):
        super().__init__()
        self.live: dict = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                if storage.nbytes() and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
        return out


def peak_allocated_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes torch allocates while fn runs, beyond what was allocated before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with StorageTracker() as tracker:
        fn()
    return tracker.peak


def _fwd_bwd(forward: Callable[[], torch.Tensor], leaves: tuple) -> Callable[[], None]:
    def run():
        for leaf in leaves:
            leaf.grad = None
        forward().backward()
    return run


def _gemm_tflops(n: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device, timer, reps: int) -> float:
    """Measured TFLOP/s of the logits GEMM h @ W.T at this shape (the compute bound the rates are divided by)."""
    h = torch.randn(n, hidden, device=device).to(dtype)
    w = torch.randn(vocab, hidden, device=device).to(dtype)
    ms = logits_bench._median_ms(timer, lambda: None, lambda _: h @ w.T, max(reps, 3), 1)
    return 2 * n * vocab * hidden / ms / 1e9


def _with_rates(entry: dict, n: int, vocab: int, hidden: int, elem: int, copy_gbps: float, gemm_tflops: float) -> dict:
    flops = {"forward": 2 * n * vocab * hidden, "backward": 4 * n * vocab * hidden, "fwd_bwd": 6 * n * vocab * hidden}
    inputs = (n + vocab) * hidden * elem
    traffic = {"forward": inputs, "backward": 2 * inputs, "fwd_bwd": 3 * inputs}
    for phase in flops:
        ms = entry[f"{phase}_ms"]
        entry[f"{phase}_tflops"] = flops[phase] / ms / 1e9
        entry[f"{phase}_frac_of_gemm_peak"] = entry[f"{phase}_tflops"] / gemm_tflops
        entry[f"{phase}_gbps"] = traffic[phase] / ms / 1e6
        entry[f"{phase}_frac_of_copy_bound"] = entry[f"{phase}_gbps"] / copy_gbps
    return entry


def _guarded(provider: str, entry: dict, work: Callable[[], dict]) -> dict:
    try:
        entry.update(work(), status="ok")
    except ImportError as err:
        entry["status"] = f"skipped: not installed ({err.name or err})"
    except torch.cuda.OutOfMemoryError:
        entry["status"] = "out of memory"
    except Exception as err:  # a competitor failing must not hide the others
        if provider == "fused_linear":
            raise
        entry["status"] = f"error: {type(err).__name__}: {str(err)[:200]}"
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return entry


def _time(provider: str, data: dict, run: logits_bench._Run, chunk_tokens: int | None) -> dict:
    forward, leaves = _make_forward(provider, data, run.block_v, chunk_tokens)

    def fresh():
        for leaf in leaves:
            leaf.grad = None

    def forward_for_backward():
        fresh()
        return forward()

    return {
        "forward_ms": logits_bench._median_ms(run.timer, fresh, lambda _: forward(), run.reps, run.warmup),
        "backward_ms": logits_bench._median_ms(run.timer, forward_for_backward, lambda loss: loss.backward(),
                                               run.reps, run.warmup),
        "fwd_bwd_ms": logits_bench._median_ms(run.timer, fresh, lambda _: forward().backward(), run.reps, run.warmup),
    }


def _memory(provider: str, data: dict, block_v: int | None, chunk_tokens: int | None, device: torch.device) -> dict:
    forward, leaves = _make_forward(provider, data, block_v, chunk_tokens)
    run = _fwd_bwd(forward, leaves)
    if provider == "compile":
        run()  # compile outside the measured call
    peak = peak_allocated_bytes(run, device)
    for leaf in leaves:
        leaf.grad = None
    return {"peak_bytes": peak}


def run_fused_linear_bench(
    tokens: Sequence[int] | None = None,
    memory_tokens: Sequence[int] | None = None,
    vocab: int | None = None,
    hidden: int | None = None,
    dtype: str = "bfloat16",
    reps: int | None = None,
    out_dir: str | Path = "benchmarks/results",
    providers: Sequence[str] | None = None,
    warmup: int | None = None,
    device: str | None = None,
    show: bool = True,
    block_v: int | None = None,
    chunk_tokens: int | None = None,
    plot: bool = True,
) -> dict:
    """Memory curve and timings of every provider; prints a table, writes the JSON (and PNG); returns the payload."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first loaded
    defaults = GPU_SHAPES if dev.type == "cuda" else CPU_SHAPES
    tokens = tuple(defaults["tokens"] if tokens is None else tokens)
    memory_tokens = tuple(defaults["memory_tokens"] if memory_tokens is None else memory_tokens)
    vocab, hidden = vocab or defaults["vocab"], hidden or defaults["hidden"]
    reps = reps or defaults["reps"]
    warmup = defaults["warmup"] if warmup is None else warmup
    chunk_tokens = chunk_tokens or defaults["chunk_tokens"]
    providers = tuple(providers or (PROVIDERS if dev.type == "cuda" else CPU_DEFAULT_PROVIDERS))
    if hidden <= 0:
        raise ValueError(f"hidden must be > 0, got {hidden!r}")
    if unknown := set(providers) - set(PROVIDERS):
        raise ValueError(f"providers must be among {PROVIDERS}, got unknown {sorted(unknown)}")
    logits_bench._validate(tokens + memory_tokens or (1,), vocab, dtype, reps, ())
    torch_dtype = logits_bench.DTYPES[dtype]
    timer = logits_bench._Timer(dev)
    elem = torch_dtype.itemsize
    copy_gbps = gemm_tflops = None
    if tokens:
        copy_bytes = min(max(max(tokens) * vocab * elem, 64 << 20), 2 << 30)
        copy_gbps = logits_bench._copy_bandwidth_gbps(dev, copy_bytes, timer, reps)
        gemm_tflops = _gemm_tflops(max(tokens), vocab, hidden, torch_dtype, dev, timer, reps)
    run = logits_bench._Run(timer, reps, warmup, copy_gbps, block_v)
    memory, timings = [], []
    for n in memory_tokens:
        data = _inputs(n, vocab, hidden, torch_dtype, dev)
        for p in providers:
            entry = {"provider": p, "tokens": n, "logits_bytes": n * vocab * elem}
            memory.append(_guarded(p, entry, lambda: _memory(p, data, block_v, chunk_tokens, dev)))
        del data
    for n in tokens:
        data = _inputs(n, vocab, hidden, torch_dtype, dev)
        for p in providers:
            entry = _guarded(p, {"provider": p, "tokens": n}, lambda: _time(p, data, run, chunk_tokens))
            if entry["status"] == "ok":
                _with_rates(entry, n, vocab, hidden, elem, copy_gbps, gemm_tflops)
            timings.append(entry)
        del data
    payload = {
        "benchmark": "fused_linear_grpo_loss",
        "device": logits_bench._device_name(dev),
        "device_type": dev.type,
        "timing": "cuda events, median" if dev.type == "cuda" else "wall clock (Triton interpreter), median",
        "memory_measure": ("torch.cuda.max_memory_allocated rise" if dev.type == "cuda"
                           else "storages created by aten ops (StorageTracker), not RSS"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": logits_bench._versions(),
        "dtype": dtype, "vocab": vocab, "hidden": hidden, "reps": reps, "warmup": warmup,
        "tokens": list(tokens), "memory_tokens": list(memory_tokens),
        "loss_args": logits_bench.LOSS_ARGS,
        "useful_flops": "output layer: 2NVH forward, 4NVH backward (fused_linear also recomputes 2NVH)",
        "min_bytes": "(N + V) * H * b read in forward; read again and the gradients written in backward",
        "copy_bandwidth_gbps": copy_gbps,
        "gemm_tflops": gemm_tflops,
        "fused_block_v": block_v,
        "fused_chunk_tokens": chunk_tokens,  # None: the op's default (a 256 MiB dlogits buffer)
        "memory": memory,
        "results": timings,
        "targets": _targets(timings),
    }
    out = Path(out_dir)
    payload["path"] = str(_write(payload, out))
    if plot and memory:
        payload["plot"] = str(plot_memory(payload, Path(payload["path"]).with_suffix(".png")))
        Path(payload["path"]).write_text(json.dumps(payload, indent=2) + "\n")
    if show:
        _print(payload)
    return payload


def _targets(timings: list) -> dict:
    """fused_linear's fwd+bwd time over 'cuBLAS GEMM + logits kernel' (target <= 1.2) per N."""
    ok = {(r["provider"], r["tokens"]): r for r in timings if r["status"] == "ok"}
    out = {}
    for (provider, n), row in ok.items():
        base = ok.get(("logits_kernel", n))
        if provider == "fused_linear" and base:
            out[f"fused_linear_over_gemm_plus_logits_kernel_N{n}"] = row["fwd_bwd_ms"] / base["fwd_bwd_ms"]
    return out


def _write(payload: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", payload["device"]).strip("-").lower() or payload["device_type"]
    path = out_dir / f"fused_linear_{slug}_{payload['date'][:10]}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def plot_memory(payload: dict, path: Path) -> Path:
    """Peak allocated MiB versus N per provider (log-log), with the logits' own size for scale."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    rows = [r for r in payload["memory"] if r["status"] == "ok"]
    for provider in dict.fromkeys(r["provider"] for r in rows):
        points = sorted((r["tokens"], r["peak_bytes"] / 2**20) for r in rows if r["provider"] == provider)
        ax.plot(*zip(*points), marker="o", label=provider)
    sizes = sorted({r["tokens"]: r["logits_bytes"] for r in payload["memory"]}.items())
    ax.plot([n for n, _ in sizes], [b / 2**20 for _, b in sizes], linestyle=":", color="grey",
            label=f"one [N, V] {payload['dtype']} logits")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("peak allocated during fwd+bwd (MiB)")
    ax.set_title(f"V={payload['vocab']}, H={payload['hidden']}, {payload['dtype']} on {payload['device']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _print(payload: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if Console().is_terminal else Console(width=160)
    table = Table(title=f"peak allocated during fwd+bwd, V={payload['vocab']} H={payload['hidden']} "
                        f"{payload['dtype']} on {payload['device']} ({payload['memory_measure']})")
    providers = list(dict.fromkeys(r["provider"] for r in payload["memory"]))
    table.add_column("N", justify="right")
    table.add_column("logits MiB", justify="right")
    for p in providers:
        table.add_column(f"{p} MiB", justify="right")
    for n in payload["memory_tokens"]:
        cells = {r["provider"]: (f"{r['peak_bytes'] / 2**20:.1f}" if r["status"] == "ok" else r["status"])
                 for r in payload["memory"] if r["tokens"] == n}
        logits = n * payload["vocab"] * logits_bench.DTYPES[payload["dtype"]].itemsize / 2**20
        table.add_row(str(n), f"{logits:.1f}", *[cells.get(p, "-") for p in providers])
    console.print(table)
    if payload["results"]:
        timing = Table(title=f"fwd+bwd timing ({payload['timing']}; GEMM {payload['gemm_tflops']:.1f} TFLOP/s, "
                             f"copy {payload['copy_bandwidth_gbps']:.0f} GB/s)")
        for column in ("N", "provider", "fwd ms", "bwd ms", "fwd+bwd ms", "TFLOP/s", "of GEMM peak", "GB/s"):
            timing.add_column(column, justify="right")
        for r in payload["results"]:
            if r["status"] != "ok":
                timing.add_row(str(r["tokens"]), r["provider"], r["status"], *[""] * 5)
                continue
            timing.add_row(str(r["tokens"]), r["provider"], f"{r['forward_ms']:.2f}", f"{r['backward_ms']:.2f}",
                           f"{r['fwd_bwd_ms']:.2f}", f"{r['fwd_bwd_tflops']:.2f}",
                           f"{100 * r['fwd_bwd_frac_of_gemm_peak']:.0f}%", f"{r['fwd_bwd_gbps']:.1f}")
        console.print(timing)
    console.print(f"targets: {payload['targets']}")
    console.print(f"wrote {payload['path']}" + (f" and {payload['plot']}" if payload.get("plot") else ""))
