"""Tiny GPTModel / LLaVAModel under megatron-core on CPU: TP=2 and PP=2 match the single-rank run."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import run_distributed  # noqa: E402

VOCAB, LAYERS, HIDDEN, HEADS, FFN, SEQ, BATCH = 64, 2, 32, 4, 64, 8, 2
TOL = 1e-5


def _gpt_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:],
            "position_ids": torch.arange(SEQ).expand(BATCH, -1)}


def _build_gpt(seed: int = 3):
    from megatron.core import parallel_state as ps

    from megatron_selfjudge.megatron.models import build_gpt

    return build_gpt(VOCAB, LAYERS, HIDDEN, HEADS, FFN, SEQ, pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(), seed=seed)


def _gather_tp(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _full_params(model, use_grad: bool = False) -> dict:
    """Parameters (or main grads) of this PP stage, TP-gathered, keyed by global layer number."""
    out = {}
    layer_names = {}
    for module_name, module in model.named_modules():
        if hasattr(module, "layer_number") and module_name.split(".")[-2:-1] == ["layers"]:
            layer_names[module_name] = f"{module_name.rsplit('.', 1)[0]}.{module.layer_number}"
    for name, param in model.named_parameters():
        value = param.main_grad if use_grad else param.data
        if getattr(param, "tensor_model_parallel", False):
            value = _gather_tp(value, param.partition_dim)
        for local, global_name in layer_names.items():
            if name.startswith(local + "."):
                name = global_name + name[len(local):]
                break
        out[name.removeprefix("module.")] = value.clone()
    return out


LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (tp, pp) on 2 ranks; tp=1, pp=1 runs as 2 identical DP replicas


def _logprobs(model, batch) -> torch.Tensor:
    from megatron_selfjudge.megatron.logprobs import vocab_parallel_logprobs

    with torch.no_grad():
        logits = model(batch["input_ids"], batch["position_ids"], None)  # [B, S, V/tp]
    return vocab_parallel_logprobs(logits, batch["targets"], temperature=0.7)


def _train_step(model, batches: list, distributed_optimizer: bool = False) -> dict:
    """One optimizer step through get_forward_backward_func; losses before/after, grads, weights."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_selfjudge.megatron.logprobs import vocab_parallel_logprobs

    config = model.config
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer), model)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=1.0,
                        use_distributed_optimizer=distributed_optimizer), [ddp])

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        logits = chunk(batch["input_ids"], batch["position_ids"], None)

        def loss_func(output):
            loss = -vocab_parallel_logprobs(output, batch["targets"]).mean()
            # clone: the schedule divides the returned loss by num_microbatches in place.
            return loss, {"loss": loss.detach().clone()}

        return logits, loss_func

    def run(forward_only: bool) -> float:
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp],
            num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=BATCH,
            forward_only=forward_only)
        if not ps.is_pipeline_last_stage():
            return float("nan")
        return float(torch.stack([d["loss"] for d in losses]).mean())

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss_before = run(forward_only=False)
    grads = _full_params(ddp, use_grad=True)
    ok, grad_norm, _ = optimizer.step()
    assert ok
    loss_after = run(forward_only=True)
    return {"loss_before": loss_before, "loss_after": loss_after, "grad_norm": float(grad_norm),
            "grads": grads, "params": _full_params(ddp)}


def _gpt_worker(rank: int, world: int) -> dict:
    from megatron_selfjudge.megatron.parallel import destroy_parallel, initialize_parallel

    batches = [_gpt_batch(10), _gpt_batch(11)]
    out = {}
    for tp, pp in LAYOUTS:
        initialize_parallel(tp=tp, pp=pp, seed=1)
        model = _build_gpt()
        result = {"logprobs": _logprobs(model, _gpt_batch(0)) if pp == 1 else None}
        result.update(_train_step(model, batches))
        out[(tp, pp)] = result
        destroy_parallel()
    # DP=2 with megatron's distributed optimizer: each rank takes one of the two micro-batches.
    initialize_parallel(tp=1, pp=1, seed=1)
    out["dp2"] = _train_step(_build_gpt(), [batches[rank]], distributed_optimizer=True)
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def gpt_runs() -> list:
    """Per rank: {(tp, pp): results}, all layouts run in one spawn to pay megatron's import once."""
    return run_distributed(_gpt_worker, 2, timeout=300)


@pytest.mark.slow
def test_gpt_tp2_logprobs_equal_tp1(gpt_runs):
    ref = gpt_runs[0][(1, 1)]["logprobs"]
    assert ref.shape == (BATCH, SEQ) and ref.dtype == torch.float32 and (ref < 0).all()
    for rank_runs in gpt_runs:
        torch.testing.assert_close(rank_runs[(2, 1)]["logprobs"], ref, atol=TOL, rtol=0)


@pytest.mark.slow
def test_gpt_tp2_optimizer_step_equals_tp1(gpt_runs):
    ref = gpt_runs[0][(1, 1)]
    assert ref["loss_after"] < ref["loss_before"]
    for rank_runs in gpt_runs:
        out = rank_runs[(2, 1)]
        assert abs(out["loss_before"] - ref["loss_before"]) < TOL
        assert abs(out["loss_after"] - ref["loss_after"]) < TOL
        assert abs(out["grad_norm"] - ref["grad_norm"]) < TOL
        for key in ("grads", "params"):
            assert out[key].keys() == ref[key].keys()
            for name, value in ref[key].items():
                torch.testing.assert_close(out[key][name], value, atol=TOL, rtol=0, msg=f"{key} {name}")


@pytest.mark.slow
def test_gpt_pp2_1f1b_equals_pp1(gpt_runs):
    ref = gpt_runs[0][(1, 1)]
    stages = [rank_runs[(1, 2)] for rank_runs in gpt_runs]
    assert abs(stages[-1]["loss_before"] - ref["loss_before"]) < TOL
    assert abs(stages[-1]["loss_after"] - ref["loss_after"]) < TOL
    for stage in stages:
        assert abs(stage["grad_norm"] - ref["grad_norm"]) < TOL
    for key in ("grads", "params"):
        merged = {name: v for stage in stages for name, v in stage[key].items()}
        assert merged.keys() == ref[key].keys()
        for name, value in ref[key].items():
            torch.testing.assert_close(merged[name], value, atol=TOL, rtol=0, msg=f"{key} {name}")


@pytest.mark.slow
def test_gpt_dp2_distributed_optimizer_equals_tp1(gpt_runs):
    ref = gpt_runs[0][(1, 1)]
    ranks = [rank_runs["dp2"] for rank_runs in gpt_runs]
    # Each rank's loss is its half; DDP averages the two halves' grads like the 2 micro-batches.
    assert abs(sum(r["loss_before"] for r in ranks) / 2 - ref["loss_before"]) < TOL
    for out in ranks:
        assert abs(out["grad_norm"] - ref["grad_norm"]) < TOL
        for name, value in ref["params"].items():
            torch.testing.assert_close(out["params"][name], value, atol=TOL, rtol=0, msg=name)


IMG_TOKEN, TEXT_LEN, IMG, PATCH = -200, 10, 16, 4
LLAVA_SEQ = TEXT_LEN - 1 + (IMG // PATCH) ** 2  # the image token expands to 16 embeddings
LLAVA_VOCAB = 96


def _llava_batch(seed: int, image_seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, LLAVA_VOCAB, (BATCH, TEXT_LEN), generator=g)
    input_ids[:, 3] = IMG_TOKEN  # three text tokens, the image, six text tokens
    return {"images": torch.randn(BATCH, 3, IMG, IMG, generator=torch.Generator().manual_seed(image_seed)),
            "input_ids": input_ids,
            "position_ids": torch.arange(TEXT_LEN).expand(BATCH, -1),
            "targets": torch.randint(0, LLAVA_VOCAB, (BATCH, LLAVA_SEQ), generator=g)}


def _llava_forward_step(data_iterator, chunk):
    from megatron_selfjudge.megatron.logprobs import vocab_parallel_logprobs

    batch = next(data_iterator)
    output, _ = chunk(batch["images"], batch["input_ids"], batch["position_ids"], None)

    def loss_func(logits):
        logp = vocab_parallel_logprobs(logits, batch["targets"])
        return -logp.mean(), {"logp": logp.detach().clone()}

    return output, loss_func


def _llava_worker(rank: int, world: int) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_selfjudge.megatron.models import build_tiny_llava
    from megatron_selfjudge.megatron.parallel import destroy_parallel, initialize_parallel

    out = {}
    for tp, pp in LAYOUTS:
        initialize_parallel(tp=tp, pp=pp, seed=1)
        model = build_tiny_llava(vocab_size=LLAVA_VOCAB, max_seq_len=LLAVA_SEQ, img_size=IMG, patch_dim=PATCH,
                                 image_token_index=IMG_TOKEN, pre_process=ps.is_pipeline_first_stage(),
                                 post_process=ps.is_pipeline_last_stage(), seed=5)
        batches = [_llava_batch(20, image_seed=0), _llava_batch(20, image_seed=1)]
        with torch.no_grad():
            stored = get_forward_backward_func()(
                forward_step_func=_llava_forward_step, data_iterator=iter(batches), model=[model],
                num_microbatches=len(batches), seq_length=LLAVA_SEQ, micro_batch_size=BATCH,
                forward_only=True)
        out[(tp, pp)] = [d["logp"] for d in stored] if ps.is_pipeline_last_stage() else None
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def llava_runs() -> list:
    """Per rank: {(tp, pp): [log-probs for image A, for image B]} from one spawn."""
    return run_distributed(_llava_worker, 2, timeout=300)


@pytest.mark.slow
def test_llava_tp2_and_pp2_logprobs_equal_tp1(llava_runs):
    ref = llava_runs[0][(1, 1)]
    assert ref[0].shape == (BATCH, LLAVA_SEQ)
    candidates = [runs[(2, 1)] for runs in llava_runs] + [llava_runs[-1][(1, 2)]]
    for logps in candidates:
        for got, want in zip(logps, ref):
            torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.slow
def test_llava_image_changes_logprobs_only_after_it(llava_runs):
    image_a, image_b = llava_runs[0][(1, 1)]
    # Causal attention: the three text positions before the image cannot see it.
    torch.testing.assert_close(image_a[:, :3], image_b[:, :3], atol=TOL, rtol=0)
    assert (image_a[:, 3:] - image_b[:, 3:]).abs().max() > 1e-3


def test_builders_reject_bad_arguments():
    from megatron_selfjudge.megatron.models import build_gpt, build_tiny_llava

    with pytest.raises(ValueError, match="transformer_impl"):
        build_gpt(VOCAB, LAYERS, HIDDEN, HEADS, FFN, SEQ, transformer_impl="apex")
    with pytest.raises(ValueError, match="vocab_size"):
        build_gpt(0, LAYERS, HIDDEN, HEADS, FFN, SEQ)
    with pytest.raises(ValueError, match="img_size"):
        build_tiny_llava(img_size=18, patch_dim=4)
    with pytest.raises(ValueError, match="image_token_index"):
        build_tiny_llava(vocab_size=128, image_token_index=5)


def test_transformer_engine_missing_is_a_clear_error():
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("Transformer Engine is installed")
    from megatron_selfjudge.megatron.models import build_gpt

    with pytest.raises(RuntimeError, match="Transformer Engine"):
        build_gpt(VOCAB, LAYERS, HIDDEN, HEADS, FFN, SEQ, transformer_impl="transformer_engine")
