"""Pre-flight checks: each one triggered, with its one-line message; the memory estimate by hand."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_selfjudge.config import load_config
from megatron_selfjudge.megatron.models import resolve_transformer_impl
from megatron_selfjudge.runtime import preflight
from megatron_selfjudge.runtime.preflight import Platform, PreflightError

sys.path.insert(0, str(Path(__file__).parents[1] / "megatron"))
from dist_utils import run_distributed  # noqa: E402

CPU = Platform(host="h0")
GPU8 = Platform(world_size=8, local_world_size=8, cuda=True, gpu_count=8, nccl=True, transformer_engine=True,
                host="h0")


def _cfg(*overrides: str, run_dir: Path | None = None):
    extra = [f"trainer.run_dir={run_dir}"] if run_dir is not None else []
    return load_config(None, [*overrides, *extra])


def _failures(cfg, platform, vocab=124) -> dict:
    shape = dataclasses.replace(preflight.model_shape(cfg), vocab_size=vocab)
    return {c.name: c.message for c in preflight.launch_checks(cfg, platform, shape) if not c.ok}


# --- phase 1 --------------------------------------------------------------------------------

def test_embedded_default_passes_on_cpu():
    cfg = _cfg()
    checks = preflight.launch_checks(cfg, CPU, preflight.model_shape(cfg))
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert {c.name: c.message for c in checks}["layout"] == "world size 1 = tp 1 x pp 1 x dp 1"


def test_tp_larger_than_world_in_one_process():
    msg = _failures(_cfg("parallel.tp=2"), CPU)["layout"]
    assert msg.startswith("parallel.tp=2 x parallel.pp=1 needs 2 processes but the run has 1")
    assert "torchrun --nproc-per-node 2" in msg and "\n" not in msg


def test_world_not_a_multiple_of_tp_pp():
    msg = _failures(_cfg("parallel.tp=2", "parallel.pp=2"), Platform(world_size=6, host="h"))["layout"]
    assert msg.startswith("world size 6 is not a multiple of parallel.tp=2 x parallel.pp=2 = 4")


@pytest.mark.parametrize("overrides, vocab, expected", [
    (["parallel.tp=8", "model.num_attention_heads=4"], 128, "model.num_attention_heads=4 is not divisible by parallel.tp=8"),
    (["parallel.tp=8", "model.num_attention_heads=8", "model.ffn_hidden_size=260"], 128,
     "model.ffn_hidden_size=260 is not divisible by parallel.tp=8"),
    (["parallel.pp=4", "parallel.tp=2", "model.num_layers=2"], 128, "model.num_layers=2 is not divisible by parallel.pp=4"),
    (["parallel.tp=8", "model.num_attention_heads=8"], 128,
     "the ViT's 4 heads (model.vision_hidden_size=64 / 16) is not divisible by parallel.tp=8"),
    (["parallel.tp=8", "model.num_attention_heads=8", "model.vision_hidden_size=128"], 124,
     "the vocabulary of 124 tokens is not divisible by parallel.tp=8"),
])
def test_split_divisibility(overrides, vocab, expected):
    msg = _failures(_cfg(*overrides), GPU8, vocab)["tp/pp split"]
    assert msg.startswith(expected)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights_on_cpu(dtype):
    msg = _failures(_cfg(f"model.params_dtype={dtype}"), CPU)["params dtype"]
    assert msg.startswith(f"model.params_dtype={dtype} needs CUDA") and "model.params_dtype=float32" in msg
    assert "params dtype" not in _failures(_cfg(f"model.params_dtype={dtype}"), GPU8, 128)


@pytest.mark.parametrize("impl", ["logits_kernel", "fused_linear"])
def test_triton_loss_on_cpu(impl):
    msg = _failures(_cfg(f"loss.impl={impl}"), CPU)["loss impl"]
    assert msg.startswith(f"loss.impl={impl} runs a Triton kernel, which needs CUDA")
    assert "loss impl" not in _failures(_cfg(f"loss.impl={impl}"), GPU8, 128)
    assert "loss impl" not in _failures(_cfg("loss.impl=reference"), CPU)


@pytest.mark.parametrize("requested, te, cuda, expected", [
    ("auto", True, True, "transformer_engine"),
    ("auto", True, False, "local"),
    ("auto", False, True, "local"),
    ("auto", False, False, "local"),
    ("local", True, True, "local"),
    ("local", False, False, "local"),
    ("transformer_engine", True, True, "transformer_engine"),
])
def test_resolve_transformer_impl(requested, te, cuda, expected):
    assert resolve_transformer_impl(requested, te, cuda) == expected


@pytest.mark.parametrize("te, cuda, needs", [(False, True, "Transformer Engine"), (False, False, "Transformer Engine"),
                                             (True, False, "CUDA")])
def test_transformer_engine_request_where_it_cannot_run(te, cuda, needs):
    with pytest.raises(RuntimeError, match=f"needs {needs}"):
        resolve_transformer_impl("transformer_engine", te, cuda)
    msg = _failures(_cfg("model.transformer_impl=transformer_engine"),
                    Platform(cuda=cuda, gpu_count=int(cuda), nccl=True, transformer_engine=te, host="h"))
    assert msg["transformer impl"].startswith(f"model.transformer_impl=transformer_engine needs {needs}")
    with pytest.raises(ValueError, match="transformer_impl must be one of"):
        resolve_transformer_impl("apex", te, cuda)


def test_cuda_run_without_nccl():
    platform = Platform(cuda=True, gpu_count=1, nccl=False, host="h")
    msg = _failures(_cfg("model.params_dtype=bfloat16"), platform, 128)["NCCL"]
    assert msg.startswith("this CUDA run needs NCCL")


def test_fewer_gpus_than_local_processes(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    platform = Platform(world_size=8, local_world_size=8, local_rank=5, cuda=True, gpu_count=4, nccl=True, host="h")
    msg = _failures(_cfg(), platform, 128)["GPUs"]
    assert msg.startswith("8 processes on this node (LOCAL_WORLD_SIZE, LOCAL_RANK=5) but 4 GPU(s) visible "
                          "(CUDA_VISIBLE_DEVICES=0,1,2,3)")
    assert "--nproc-per-node 4" in msg


def test_check_launch_raises_the_first_failure():
    with pytest.raises(PreflightError, match="^parallel.tp=2 x parallel.pp=1 needs 2 processes"):
        preflight.check_launch(_cfg("parallel.tp=2", "model.params_dtype=bfloat16"), CPU)


# --- memory estimate ------------------------------------------------------------------------

def test_memory_estimate_by_hand():
    cfg = _cfg("model.preset=tiny-gpt", "model.params_dtype=bfloat16", "parallel.tp=2", "model.num_layers=2",
               "model.hidden_size=64", "rollout.max_batch_size=8", "trainer.prompts_per_step=2",
               "trainer.mini_batch_prompts=2", "rollout.n=8", "rollout.max_prompt_len=10",
               "rollout.max_response_len=20", "reward.mode=majority", "trainer.micro_batch_tokens=50")
    shape = dataclasses.replace(preflight.model_shape(cfg), parameters=1000, vocab_size=100)
    est = preflight.estimate_memory(cfg, shape, world_size=4)
    # 500 local params (tp 2); bf16 weights and frozen copy 2 B, fp32 grads 4 B, Adam 12 B over dp 2;
    # activations: 50 tokens x 2 layers x (4 h + (3 q + 3 kv + 3 ffn) / tp) x 2 B, h = q = kv = 64, ffn 256;
    # KV: 2 (K, V) x 2 layers x 2 heads (4 / tp) x 16 head dim x 2 B per token, 8 rows x 30 tokens;
    # logits 50 x 50 x 8 B.
    activations = 50 * 2 * (4 * 64 + (3 * 64 + 3 * 64 + 3 * 256) // 2) * 2
    assert est.parts == {"weights": 1000, "grads": 2000, "optimizer": 3000, "frozen copy": 1000,
                         "activations": activations, "logits": 20000, "rollout KV cache": 240 * 256}
    persistent = 1000 + 2000 + 3000
    assert est.phase_totals() == {"rollout": persistent + 240 * 256, "reference/Judge": persistent + 1000 + 20000,
                                  "training": persistent + activations + 20000}
    assert est.total == persistent + activations + 20000 and est.peak_phase == "training"
    kept = preflight.estimate_memory(cfg, shape, world_size=4, offload_frozen=False)  # frozen copy stays on the GPU
    assert kept.total == est.total + 1000
    judge = _cfg("model.preset=tiny-gpt", "model.params_dtype=bfloat16", "parallel.tp=2", "model.num_layers=2",
                 "model.hidden_size=64", "rollout.max_batch_size=8", "trainer.prompts_per_step=2",
                 "trainer.mini_batch_prompts=2", "rollout.n=8", "rollout.max_prompt_len=10",
                 "rollout.max_response_len=20", "reward.mode=judge", "judge.kind=generative", "judge.samples=2",
                 "judge.max_prompt_len=40", "judge.max_tokens=10", "trainer.micro_batch_tokens=50")
    # The generative Judge's batch: 8 rows (max_batch_size; 16 wanted) x 50 tokens, in the reference/Judge phase.
    judged = preflight.estimate_memory(judge, dataclasses.replace(shape), 4)
    assert judged.parts["Judge KV cache"] == 400 * 256
    assert judged.phase_totals()["reference/Judge"] == persistent + 1000 + 400 * 256 + 20000


def test_memory_check_refuses_what_does_not_fit():
    est = preflight.MemoryEstimate(parts={"weights": 3 * preflight.GIB, "KV cache": 2 * preflight.GIB})
    msg = preflight.check_memory(est, 6 * preflight.GIB, "GPU 0 (H100)")
    assert msg.endswith("6.00 GiB free on GPU 0 (H100)")
    with pytest.raises(PreflightError) as err:
        preflight.check_memory(est, 1 * preflight.GIB, "GPU 3 (A800)")
    assert str(err.value).startswith("GPU 3 (A800) has 1.00 GiB free but the config needs weights 3.00 GiB, "
                                     "KV cache 2.00 GiB: at least 5.00 GiB per rank")


def _count_built(rank: int, world: int, variants: list) -> list[tuple[int, int]]:
    from megatron_selfjudge.megatron.models.family import build_family
    from megatron_selfjudge.megatron.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=0)
    out = []
    for overrides in variants:
        cfg = load_config(None, overrides)
        model = build_family(cfg).builder()()
        out.append((sum(p.numel() for p in model.parameters()), preflight.model_shape(cfg).parameters))
    return out


@pytest.mark.slow
def test_parameter_count_matches_the_built_model():
    pytest.importorskip("megatron.core")
    variants = [[], ["model.preset=tiny-gpt"],
                ["model.hidden_size=48", "model.num_attention_heads=3", "model.vision_hidden_size=32",
                 "model.patch_size=4", "model.num_layers=3", "model.ffn_hidden_size=100", "model.vision_num_layers=2"]]
    [pairs] = run_distributed(_count_built, 1, variants)
    for built, counted in pairs:
        assert counted == built


# --- phase 2 --------------------------------------------------------------------------------

def _probe_checks(cfg, platform=CPU) -> dict:
    est = preflight.MemoryEstimate(parts={"weights": 1})
    probe = preflight.rank_checks(cfg, platform, est)
    probe.remove()
    return {c.name: c for c in probe.checks}


def test_data_files_missing(tmp_path):
    msg = _probe_checks(_cfg(f"data.train={tmp_path / 'nope.parquet'}", run_dir=tmp_path / "run"))["data files"]
    assert not msg.ok and msg.message == f"data.train={str(tmp_path / 'nope.parquet')!r} does not exist on this node"
    (tmp_path / "train.jsonl").write_text("{}\n")
    msg = _probe_checks(_cfg(f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path}",
                             run_dir=tmp_path / "run"))["data files"]
    assert not msg.ok and msg.message == f"data.eval={str(tmp_path)!r} is not a file on this node"


def test_run_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    check = _probe_checks(_cfg(run_dir=blocker / "run"))["run directory"]
    assert not check.ok and check.message.startswith(f"run directory {blocker / 'run'}")
    assert "\n" not in check.message


def test_run_dir_probe_is_removed(tmp_path):
    check = _probe_checks(_cfg(run_dir=tmp_path / "run"))["run directory"]
    assert check.ok and list((tmp_path / "run").iterdir()) == []


def test_shared_check_names_the_ranks_it_cannot_see(tmp_path):
    for rank, token in ((0, "a"), (1, "b"), (3, "stale")):
        preflight.probe_path(tmp_path, rank).write_text(token)
    tokens = ["a", "b", "c", "d", "e"]  # rank 3's file is a stale probe of another run
    with pytest.raises(PreflightError) as err:
        preflight.check_shared(tmp_path, tokens, ["n0", "n0", "n1", "n1", "n2"])
    assert "does not see the probe files of rank(s) 2-4 on n1, n2" in str(err.value)
    assert preflight.check_shared(tmp_path, ["a", "b"], ["n0", "n0"]) == "shared by all 2 ranks"


def _phase_two(rank: int, world: int, base: str) -> list[str]:
    """Three scenarios on two gloo ranks: shared folder, node-local folders, a data file missing on rank 1."""
    from megatron_selfjudge.runtime.ranks import RankFailedError

    base = Path(base)
    out = []
    for run_dir, data in ((base / "shared", None), (base / f"local{rank}", None),
                          (base / "shared", base / ("train.jsonl" if rank == 0 else "missing.jsonl"))):
        cfg = _cfg(*([f"data.train={data}"] if data else []), run_dir=run_dir)
        try:
            checks = preflight.check_ranks(cfg, preflight.check_launch(cfg))
            out.append("ok " + {c.name: c.message for c in checks}["shared run directory"])
        except (PreflightError, RankFailedError) as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    return out


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="two gloo ranks on CPU")
def test_phase_two_on_two_ranks(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    rank0, rank1 = run_distributed(_phase_two, 2, str(tmp_path))
    assert rank0[0] == rank1[0] == "ok shared by all 2 ranks"
    for msg in (rank0[1], rank1[1]):  # every rank stops with rank 0's verdict
        assert msg.startswith(f"PreflightError: trainer.run_dir={str(tmp_path / 'local0')!r} is not one folder")
        assert "does not see the probe files of rank(s) 1" in msg
    assert rank1[2].startswith(f"PreflightError: rank 1 (") and "missing.jsonl' does not exist on this node" in rank1[2]
    assert rank0[2] == "RankFailedError: pre-flight checks failed on rank 1; see that rank's error"
    leftovers = [p for p in tmp_path.rglob(f"{preflight.PROBE_PREFIX}*")]
    assert leftovers == []


# --- the command line: one line, exit 2 -------------------------------------------------------

def _train(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "megatron_selfjudge.cli", "train", *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, expected", [
    (["parallel.tp=2"], "parallel.tp=2 x parallel.pp=1 needs 2 processes but the run has 1"),
    (["model.params_dtype=bfloat16"], "model.params_dtype=bfloat16 needs CUDA"),
    (["loss.impl=logits_kernel"], "loss.impl=logits_kernel runs a Triton kernel, which needs CUDA"),
])
def test_cli_refuses_in_one_line(tmp_path, args, expected):
    proc = _train(*args, f"trainer.run_dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selfjudge: pre-flight check failed: "), lines
    assert expected in lines[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_empty_config_file_is_refused_in_one_line(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    proc = _train("--config", str(empty), f"trainer.run_dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "selfjudge: pre-flight check failed: model.params_dtype=bfloat16 needs CUDA"), lines


def test_prompt_split_over_data_parallel_ranks():
    assert "4 prompts of each mini-batch" in preflight.check_prompt_split(8, 1, 1, 2)
    assert "8 prompts" in preflight.check_prompt_split(8, 2, 1, 2)  # tp=2 on 2 ranks: dp = 1
    with pytest.raises(PreflightError, match=r"mini_batch_prompts=6 does not split over the 4 data-parallel"):
        preflight.check_prompt_split(6, 1, 1, 4)


def test_memory_check_without_a_parameter_count_says_so():
    assert preflight.check_memory(None, 10 * preflight.GIB, "GPU 0").startswith("not estimated")
