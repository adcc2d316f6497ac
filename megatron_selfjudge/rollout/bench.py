"""`selfjudge bench rollout`: generated tokens/s of the vLLM and megatron engines, side by side, and weight-sync s/GB.

Both engines run in this process on the same model (an HF folder, by default a tiny random Qwen2.5-VL
built on the spot) and the same requests (prompts of the synthetic task with their images, G samples
each, `--max-new-tokens` each); the megatron engine reads the policy module built from the folder,
the vLLM engine its own copy. Each engine first generates one warm-up request (not timed). Then the
policy's HF-named weights are pushed into the vLLM engine `--pushes` times (the trainer's
weight-sync stage) and the mean seconds per GB pushed is reported. Results: a JSON file in `--out`
and a rich table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import torch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfjudge bench rollout", description=__doc__.split("\n")[0])
    p.add_argument("--hf-path", default="", help="HF folder (Qwen2.5-VL or Qwen2.5); default: a tiny random one")
    p.add_argument("--text", action="store_true", help="the default tiny model is text-only Qwen2.5")
    p.add_argument("--prompts", type=int, default=8, help="prompts per engine (default 8)")
    p.add_argument("--samples", type=int, default=4, help="G samples per prompt (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per sample (default 32)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both engines' dtype")
    p.add_argument("--pushes", type=int, default=3, help="timed weight pushes into vLLM (default 3)")
    p.add_argument("--sync-bucket-mb", type=int, default=512, help="weight-push bucket size")
    p.add_argument("--out", default="runs/bench", help="folder of the JSON result")
    return p


def _positive(args: argparse.Namespace) -> None:
    for key in ("prompts", "samples", "max_new_tokens", "pushes", "sync_bucket_mb"):
        if getattr(args, key) < 1:
            print(f"selfjudge bench rollout: --{key.replace('_', '-')} must be >= 1", file=sys.stderr)
            raise SystemExit(2)


class BenchError(ValueError):
    """The bench cannot run as asked (e.g. under torchrun); one line."""


def _requests(family, task_records, n_prompts: int) -> list:
    from megatron_selfjudge.rollout.base import RolloutRequest

    out = []
    for rec in task_records[:n_prompts]:
        images = family.images(rec.images)
        ids = family.prompt_ids(rec.question, family.num_images(rec.images), "")
        if images is not None:
            ids = family.expand_images(ids, images)
        out.append(RolloutRequest(uid=rec.uid, prompt_ids=ids, images=images,
                                  metadata={"source_images": rec.images} if images is not None else {}))
    return out


def _timed_generate(engine, requests, sampling) -> dict:
    engine.generate(requests[:1], dataclasses.replace(sampling, n=1, max_new_tokens=4))  # warm-up, not timed
    start = time.perf_counter()
    trajs = engine.generate(requests, sampling)
    seconds = time.perf_counter() - start
    tokens = sum(len(t.response_ids) for t in trajs)
    return {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds,
            "sequences": len(trajs)}


def run(args: argparse.Namespace) -> dict:
    """Build both engines, time them and the weight push; returns the result dict."""
    from megatron_selfjudge.config import load_config
    from megatron_selfjudge.data.task import load_task
    from megatron_selfjudge.megatron.models import tiny_hf
    from megatron_selfjudge.megatron.models.family import build_family
    from megatron_selfjudge.rollout.base import SamplingConfig, build_engine
    from megatron_selfjudge.rollout.vllm_engine import VllmRolloutEngine

    from megatron_selfjudge.runtime.setup import one_process

    # The one-rank group (and its rendezvous variables) is taken down before the folder goes.
    with tempfile.TemporaryDirectory() as tmp, one_process("selfjudge bench rollout", error=BenchError):
        hf_path = args.hf_path
        if not hf_path:
            make = tiny_hf.make_tiny_qwen2_5 if args.text else tiny_hf.make_tiny_qwen2_5_vl
            hf_path = str(make(Path(tmp) / "model"))
        from megatron_selfjudge.megatron.models import qwen

        vl = qwen.is_vision_language(qwen.load_hf_config(hf_path))
        overrides = [f"model.preset={'qwen2.5-vl' if vl else 'qwen2.5'}", f"model.hf_path={hf_path}",
                     f"model.params_dtype={args.dtype}", "model.image_size=56", "model.patch_size=28",
                     f"rollout.n={max(args.samples, 2)}", f"rollout.max_response_len={args.max_new_tokens}",
                     f"rollout.max_batch_size={args.prompts * args.samples}", "rollout.max_prompt_len=512",
                     f"rollout.vllm.sync_bucket_mb={args.sync_bucket_mb}", "rollout.vllm.max_model_len=1024",
                     f"data.synthetic_unlabeled={max(args.prompts, 8)}", f"trainer.prompts_per_step={max(args.prompts, 8)}",
                     "trainer.mini_batch_prompts=1", "data.synthetic_test=0", "data.synthetic_sft=0",
                     "data.instruction=short", f"trainer.run_dir={tmp}/run"]
        cfg = load_config(None, overrides)
        torch.manual_seed(0)
        family = build_family(cfg)
        policy = family.builder()()
        task = load_task(cfg)
        requests = _requests(family, task.train, args.prompts)
        sampling = SamplingConfig(n=args.samples, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=1)

        megatron = build_engine("megatron", model=policy, tokenizer=family.tokenizer,
                                max_batch_size=args.prompts * args.samples)
        results = {"megatron": _timed_generate(megatron, requests, sampling)}
        megatron.close()
        start = time.perf_counter()
        vllm = VllmRolloutEngine.from_config(cfg, tokenizer=family.tokenizer)
        startup = time.perf_counter() - start
        results["vllm"] = {**_timed_generate(vllm, requests, sampling), "startup_seconds": startup}
        pushes = []
        for version in range(1, args.pushes + 1):
            start = time.perf_counter()
            sent = vllm.update_weights(family.export_hf(policy), version)
            pushes.append((time.perf_counter() - start, sent))
        vllm.close()
    seconds = sum(s for s, _ in pushes) / len(pushes)
    gb = pushes[0][1] / 1e9
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.hf_path or f"tiny random {'Qwen2.5' if args.text else 'Qwen2.5-VL'}",
        "vision_language": vl, "dtype": args.dtype, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(), "prompts": args.prompts, "samples": args.samples,
        "max_new_tokens": args.max_new_tokens, "engines": results,
        "vllm_over_megatron_tokens_per_s": results["vllm"]["tokens_per_s"] / results["megatron"]["tokens_per_s"],
        "weight_sync": {"pushes": len(pushes), "bytes": pushes[0][1], "seconds_mean": seconds,
                        "seconds_per_gb": seconds / gb, "bucket_mb": args.sync_bucket_mb},
    }


def print_table(result: dict) -> None:
    """The result as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rollout engines: {result['model']}, {result['prompts']} prompts x {result['samples']} "
                        f"samples x {result['max_new_tokens']} tokens, {result['dtype']}, {result['device']}")
    for col in ("engine", "generated tokens", "seconds", "tokens/s"):
        table.add_column(col, justify="right" if col != "engine" else "left")
    for name, r in result["engines"].items():
        table.add_row(name, str(r["generated_tokens"]), f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.1f}")
    console = Console()
    console.print(table)
    w = result["weight_sync"]
    console.print(f"vLLM / megatron tokens/s: {result['vllm_over_megatron_tokens_per_s']:.2f}x; weight push: "
                  f"{w['bytes'] / 1e6:.1f} MB in {w['seconds_mean']:.3f} s = {w['seconds_per_gb']:.2f} s/GB "
                  f"(mean of {w['pushes']}, buckets of {w['bucket_mb']} MiB)")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse, run, print the table and write the JSON; returns the result."""
    args = _parser().parse_args(argv)
    _positive(args)
    try:
        result = run(args)
    except BenchError as exc:
        print(f"selfjudge bench rollout: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"rollout_{result['date'][:19].replace(':', '')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {path}")
    return result
