"""The Qwen2.5-VL-7B recipes (examples/qwen2_5_vl_7b_*.yaml) and `selfjudge train --dry-run`.

The dry run reads only the model folder's config.json: these tests give it a folder holding
nothing else, and check in a fresh interpreter that megatron and transformers were never imported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from megatron_selfjudge.config import Config, leaf_items, load_config
from megatron_selfjudge.runtime import preflight

ROOT = Path(__file__).parents[1]
RECIPES = sorted((ROOT / "examples").glob("qwen2_5_vl_7b_*.yaml"))
SEVEN_B = ROOT / "tests" / "fixtures" / "qwen2_5_vl_7b_instruct_config.json"
TERMS = ("weights", "grads", "optimizer", "frozen copy", "activations", "logits", "rollout KV cache",
         "Judge KV cache")
# Run the CLI in a fresh interpreter; afterwards neither megatron nor transformers may have been imported.
DRIVER = ("import sys\nfrom megatron_selfjudge.cli import main\nrc = main(sys.argv[1:])\n"
          "heavy = [m for m in ('megatron.core', 'megatron', 'transformers', 'mbridge') if m in sys.modules]\n"
          "print('IMPORTED', heavy)\nsys.exit(rc)\n")


@pytest.fixture
def seven_b(tmp_path) -> Path:
    """A model folder holding only the published config.json of Qwen2.5-VL-7B-Instruct."""
    folder = tmp_path / "Qwen2.5-VL-7B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(SEVEN_B.read_text())
    return folder


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-c", DRIVER, "train", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_three_recipes():
    assert [p.name for p in RECIPES] == ["qwen2_5_vl_7b_geo3k.yaml", "qwen2_5_vl_7b_geoqa.yaml",
                                         "qwen2_5_vl_7b_mmr1.yaml"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_with_the_papers_defaults_and_lists_only_overrides(recipe):
    cfg = load_config(recipe)
    assert (cfg.model.preset, cfg.model.params_dtype, cfg.parallel.tp, cfg.parallel.pp) == ("qwen2.5-vl", "bfloat16", 2, 1)
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.max_response_len) == (8, 1.0, 2048)
    assert (cfg.optim.lr, cfg.loss.beta_kl, cfg.reward.mode, cfg.advantage.estimator) == (1e-6, 0.01, "judge", "energy")
    assert (cfg.trainer.prompts_per_step, cfg.trainer.mini_batch_prompts, cfg.trainer.epochs) == (512, 128, 15)
    listed = OmegaConf.to_container(OmegaConf.load(recipe))
    defaults = dict(leaf_items(Config()))
    flat = {f"{section}.{key}": value for section, keys in listed.items() for key, value in keys.items()}
    same = sorted(key for key, value in flat.items() if defaults[key] == value)
    assert not same, f"{recipe.name} restates defaults: {same}"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_dry_run_prints_layout_and_memory_and_builds_nothing(recipe, seven_b):
    out = _dry_run("--config", str(recipe), "--dry-run", f"model.hf_path={seven_b}")
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout
    assert f"model: qwen2_5_vl from {seven_b / 'config.json'}: 8.29 B parameters (0.68 B vision tower)" in out.stdout
    assert "layout: world size 8 = tp 2 x pp 1 x dp 4" in out.stdout
    assert "updates: 4 mini-batches of 128 prompts per step (32 per data-parallel rank)" in out.stdout
    for term in TERMS:
        assert f"\n  {term} " in out.stdout, term
    assert "peak (training)" in out.stdout and "of 80.00 GiB per GPU" in out.stdout
    # The layout and memory written out in the recipe's comments are this dry run's output.
    written = [line[4:].strip() for line in recipe.read_text().splitlines()
               if line.startswith("#   ") and any(k in line for k in (*TERMS, "phase ", "peak", "layout:",
                                                                        "tp/pp split:", "rollouts:", "updates:"))]
    assert len(written) >= 14
    shown = [line.strip() for line in out.stdout.splitlines()]
    assert [line for line in written if line not in shown] == []


def test_dry_run_world_size_and_gpu_size(seven_b):
    out = _dry_run("--config", str(RECIPES[0]), "--dry-run", "--world-size", "16", "--gpu-memory", "40",
                   f"model.hf_path={seven_b}")
    assert "layout: world size 16 = tp 2 x pp 1 x dp 8" in out.stdout
    # 40 GiB is too small: the table is printed, then one line says so (exit 2).
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "per GPU exceeds 40 GiB" in out.stderr


@pytest.mark.parametrize("override, message", [
    (["parallel.tp=8"], "num_attention_heads=28 of {cfg} is not divisible by parallel.tp=8"),
    (["parallel.tp=1", "parallel.pp=8"], "num_hidden_layers=28 of {cfg} is not divisible by parallel.pp=8"),
    (["parallel.tp=3"], "world size 8 is not a multiple of parallel.tp=3"),
])
def test_bad_layout_is_one_line(override, message, seven_b):
    out = _dry_run("--config", str(RECIPES[0]), "--dry-run", f"model.hf_path={seven_b}", *override)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert message.format(cfg=seven_b / "config.json") in out.stderr


def test_missing_model_folder_is_one_line(tmp_path):
    out = _dry_run("--config", str(RECIPES[0]), "--dry-run", f"model.hf_path={tmp_path}")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert f"model folder {str(tmp_path)!r} has no config.json" in out.stderr


def _tiny_vl_config(folder: Path, **text) -> dict:
    """A small GQA Qwen2.5-VL config.json in `folder` (no weights: the estimate reads only this)."""
    config = {"model_type": "qwen2_5_vl", "tie_word_embeddings": False,
              "text_config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                              "intermediate_size": 128, "num_hidden_layers": 4, "vocab_size": 1000, **text},
              "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
                                "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2,
                                "temporal_patch_size": 2, "in_channels": 3}}
    (folder / "config.json").write_text(json.dumps(config))
    return config


VLLM_RUN = ["model.preset=qwen2.5-vl", "model.params_dtype=bfloat16", "parallel.tp=2", "trainer.prompts_per_step=2",
            "trainer.mini_batch_prompts=2", "rollout.n=4", "rollout.max_batch_size=4", "rollout.max_prompt_len=20",
            "rollout.max_response_len=30", "trainer.micro_batch_tokens=100", "rollout.backend=vllm",
            "rollout.vllm.dtype=float32", "reward.mode=judge", "judge.kind=generative"]


def test_vllm_engines_by_hand(tmp_path):
    """rollout.backend=vllm: each engine's weights and KV cache, and the phases they are resident in."""
    _tiny_vl_config(tmp_path)
    cfg = load_config(None, [*VLLM_RUN, f"model.hf_path={tmp_path}", "rollout.vllm.tp=2",
                             "rollout.vllm.kv_cache_gb=0.5"], embedded_default=False)
    shape = preflight.model_shape(cfg)
    est = preflight.estimate_memory(cfg, shape, world_size=2)
    engine = -(-shape.parameters // 2) * 4  # whole model over rollout.vllm.tp=2, float32
    assert est.parts["rollout engine weights"] == est.parts["Judge engine weights"] == engine
    assert est.parts["rollout KV cache"] == est.parts["Judge KV cache"] == preflight.GIB // 2
    persistent = sum(est.parts[k] for k in ("weights", "grads", "optimizer"))
    both = 2 * (engine + preflight.GIB // 2)
    # The policy's engine sleeps through the update; the Judge's own engine never sleeps.
    assert est.phase_totals() == {
        "rollout": persistent + both,
        "reference/Judge": persistent + est.parts["frozen copy"] + est.parts["logits"] + both,
        "training": persistent + est.parts["activations"] + est.parts["logits"] + engine + preflight.GIB // 2}
    # Without kv_cache_gb the engine takes gpu_memory_utilization of the GPU, its weights included.
    cfg = load_config(None, [*VLLM_RUN, f"model.hf_path={tmp_path}", "rollout.vllm.gpu_memory_utilization=0.25",
                             "judge.share_engine=true", "rollout.vllm.sleep_level=0"], embedded_default=False)
    est = preflight.estimate_memory(cfg, shape, world_size=2, gpu_bytes=8 * preflight.GIB)
    engine = shape.parameters * 4
    assert est.parts["rollout KV cache"] == 2 * preflight.GIB - engine
    assert "Judge KV cache" not in est.parts  # the Judge samples from the policy's engine
    assert all("rollout KV cache" in names for names in est.phases.values())  # sleep_level 0: always resident


def test_estimate_by_hand_for_a_tiny_qwen_config(tmp_path):
    """Every term of estimate_memory from its inputs, for a small GQA VL model at tp 2 x pp 2 x dp 2."""
    h, heads, kv_heads, head_dim, ffn, layers, vocab = 64, 4, 2, 16, 128, 4, 1000
    hv, fv, depth, out_h = 32, 48, 2, 64
    config = {"model_type": "qwen2_5_vl", "tie_word_embeddings": False,
              "text_config": {"hidden_size": h, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                              "intermediate_size": ffn, "num_hidden_layers": layers, "vocab_size": vocab},
              "vision_config": {"depth": depth, "hidden_size": hv, "intermediate_size": fv, "num_heads": 2,
                                "out_hidden_size": out_h, "patch_size": 14, "spatial_merge_size": 2,
                                "temporal_patch_size": 2, "in_channels": 3}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = load_config(None, ["model.preset=qwen2.5-vl", f"model.hf_path={tmp_path}", "model.params_dtype=bfloat16",
                             "parallel.tp=2", "parallel.pp=2", "trainer.micro_batch_tokens=100",
                             "rollout.max_batch_size=4", "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=2",
                             "rollout.n=4", "rollout.max_prompt_len=20", "rollout.max_response_len=30",
                             "reward.mode=judge", "judge.kind=generative", "judge.max_prompt_len=50",
                             "judge.max_tokens=10"], embedded_default=False)
    shape = preflight.model_shape(cfg)
    # Parameters, part by part (HF module layout).
    layer = 2 * h + (h * h + h) + 2 * (h * kv_heads * head_dim + kv_heads * head_dim) + h * h + 3 * h * ffn
    vision = (3 * 2 * 14 * 14 * hv + depth * (2 * hv + (hv * 3 * hv + 3 * hv) + (hv * hv + hv)
                                              + 2 * (hv * fv + fv) + (fv * hv + hv))
              + hv + (4 * hv * 4 * hv + 4 * hv) + (4 * hv * out_h + out_h))
    assert shape.parameters == layers * layer + 2 * vocab * h + h + vision
    # pp 2: each stage has 2 layers; the first also the embedding and vision tower (the larger end).
    local = (2 * layer + vocab * h + vision) // 2  # over tp 2
    dp, width, tokens = 8 // (2 * 2), 2, 100
    est = preflight.estimate_memory(cfg, shape, world_size=8)
    per_token_layer = (4 * h + (3 * heads * head_dim + 3 * kv_heads * head_dim + 3 * ffn) // 2) * width
    kv_row = 2 * 2 * (kv_heads // 2) * head_dim * width  # K and V x 2 stage layers x 1 kv head per tp rank
    assert est.parts == {
        "weights": local * width, "grads": local * 4, "optimizer": local * 12 // dp, "frozen copy": local * width,
        "activations": tokens * per_token_layer * 2 * 2,  # 2 stage layers x pp 2 micro-batches in flight
        "logits": tokens * vocab // 2 * 8,
        "rollout KV cache": 4 * (20 + 30) * kv_row,  # min(4 rows, 1 prompt per dp rank x 4 rollouts)
        "Judge KV cache": 4 * (50 + 10) * kv_row,
    }
    persistent = local * (width + 4) + local * 12 // dp
    assert est.total == max(persistent + 4 * 50 * kv_row,
                            persistent + local * width + 4 * 60 * kv_row + tokens * vocab // 2 * 8,
                            persistent + tokens * per_token_layer * 4 + tokens * vocab // 2 * 8)
