"""rollout.backend=vllm on tiny Qwen2.5 text and Qwen2.5-VL: vLLM's log-probs of its own samples equal the
megatron policy's (fp32), weight pushes keep them equal (and without a push they differ), stop ids, CPU seeds.

One vLLM engine per model kind for the whole module (start-up takes tens of seconds on two cores). The
megatron side is qwen.build_model in this process on a one-rank gloo group, which vLLM then reuses.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "megatron"))

import tiny_qwen  # noqa: E402
from dist_utils import free_port  # noqa: E402

from megatron_selfjudge.rollout.base import EngineStateError, RolloutRequest, SamplingConfig  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

TOL = 1e-4
TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo world with megatron's groups (vLLM joins the same world)."""
    import torch.distributed as dist

    from megatron_selfjudge.megatron.parallel import destroy_parallel, initialize_parallel

    created = not dist.is_initialized()
    if created:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
    initialize_parallel(1, 1)
    yield
    destroy_parallel()
    from vllm.distributed import parallel_state as vllm_state

    vllm_state.destroy_model_parallel()
    vllm_state.destroy_distributed_environment()
    if created and dist.is_initialized():
        dist.destroy_process_group()


class Setup:
    """One model kind: its HF folder, the megatron policy built from it, the vLLM engine and a prompt."""

    def __init__(self, kind: str, path: Path):
        from megatron_selfjudge.megatron.models import qwen
        from megatron_selfjudge.rollout.vllm_engine import VllmRolloutEngine, VllmSettings

        self.kind = kind
        self.path = path  # the session's tiny folder (tests/conftest.py), read only
        self.policy = qwen.build_model(self.path)
        self.policy.module.eval()
        self.engine = VllmRolloutEngine(str(self.path), settings=VllmSettings(max_model_len=512, kv_cache_gb=1),
                                        seed=0)
        self.image = tiny_qwen.test_image(0)
        content = ([{"type": "image"}] if kind == "vl" else []) + [{"type": "text", "text": "Add 17 and 25."}]
        self.messages = [{"role": "user", "content": content}]
        ids = self.engine.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=True)
        self.prompt_ids = list(ids if isinstance(ids, list) else ids["input_ids"])

    def requests(self, uids=("a", "b")) -> list[RolloutRequest]:
        images = [self.image] if self.kind == "vl" else None
        return [RolloutRequest(uid=u, prompt_ids=self.prompt_ids, images=images) for u in uids]

    def megatron_logprobs(self, response_ids: list[int]) -> torch.Tensor:
        """log softmax(logits / T) of response_ids under the megatron policy, after the prompt."""
        from megatron_selfjudge.megatron.models import qwen

        pixel_values = grid = None
        prompt = self.prompt_ids
        if self.kind == "vl":  # the processor expands the image placeholder to the image's tokens
            processor = qwen.load_processor(self.path)
            text = processor.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=False)
            inputs = processor(images=[self.image], text=[text], return_tensors="pt")
            prompt, pixel_values, grid = inputs["input_ids"][0].tolist(), inputs["pixel_values"], inputs["image_grid_thw"]
        ids = torch.tensor([prompt + list(response_ids)])
        with torch.no_grad():
            logits = qwen.forward(self.policy, ids, qwen.position_ids(self.policy, ids, grid), pixel_values, grid)
        p, r = len(prompt), len(response_ids)
        logp = torch.log_softmax(logits[0, p - 1:p + r - 1].float() / TEMPERATURE, dim=-1)
        return logp.gather(-1, ids[0, p:].unsqueeze(-1)).squeeze(-1)

    def max_mismatch(self, trajectories) -> float:
        return max(float((self.megatron_logprobs(t.response_ids) - t.logprobs).abs().max()) for t in trajectories)


@pytest.fixture(scope="module")
def setups(process_group, vl_dir, text_dir):
    made: dict[str, Setup] = {}

    def get(kind: str) -> Setup:
        # Built once: a dropped engine's shutdown would tear down vLLM's process-wide groups.
        if kind not in made:
            made[kind] = Setup(kind, vl_dir if kind == "vl" else text_dir)
        return made[kind]

    yield get
    for s in made.values():
        s.engine.close()


SAMPLING = SamplingConfig(n=3, temperature=TEMPERATURE, max_new_tokens=8, seed=5)


@pytest.mark.parametrize("kind", ["text", "vl"])
def test_logprobs_equal_megatron_and_push_keeps_them_equal(kind, setups):
    from megatron_selfjudge.megatron.models import qwen

    s = setups(kind)
    trajs = s.engine.generate(s.requests(), SAMPLING)
    assert [(t.uid, t.sample_index) for t in trajs] == [(u, i) for u in "ab" for i in range(3)]
    assert all(t.logprobs.dtype == torch.float32 and t.logprobs.shape == (len(t.response_ids),) for t in trajs)
    assert len({tuple(t.response_ids) for t in trajs}) > 1  # sampled, not one repeated sequence
    assert s.max_mismatch(trajs) < TOL

    # A deterministic perturbation of the megatron policy (a stand-in for an optimizer step).
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in sorted(s.policy.module.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    stale = s.engine.generate(s.requests(), SAMPLING)
    assert s.max_mismatch(stale) > 1e-2  # without the push the engine samples from the old weights
    with pytest.raises(EngineStateError, match="push the weights"):
        s.engine.check_ready(version=1)

    # Small buckets: the push is streamed, never the whole model at once.
    s.engine.settings = dataclasses.replace(s.engine.settings, sync_bucket_mb=8)
    sent = s.engine.update_weights(qwen.export_hf_weights(s.policy), version=1)
    sync = s.engine.last_sync
    largest = max(p.numel() * p.element_size() for p in s.policy.module.parameters())
    assert sync["buckets"] > 1 and sync["peak_bucket_bytes"] <= 8 * 2**20 + largest
    assert sent == sync["bytes"] > 0
    s.engine.check_ready(version=1)
    assert s.max_mismatch(s.engine.generate(s.requests(), SAMPLING)) < TOL
    with pytest.raises(ValueError, match="older"):
        s.engine.update_weights(qwen.export_hf_weights(s.policy), version=0)


@pytest.mark.parametrize("kind", ["text"])
def test_stop_ids_and_cpu_seeds(kind, setups):
    s = setups(kind)
    greedy = SamplingConfig(n=1, max_new_tokens=4, greedy=True, temperature=1.0)
    first = s.engine.generate(s.requests(("g",)), greedy)[0]
    assert first.finish_reason == "length" and len(first.response_ids) == 4
    ids = first.response_ids
    # The last token that does not occur before its position: greedy decoding stops exactly there.
    at = max(i for i, t in enumerate(ids) if t not in ids[:i])
    stopped = s.engine.generate(s.requests(("g",)), dataclasses.replace(greedy, stop_token_ids=(ids[at],)))[0]
    # The stop id ends the response and is kept as its last token (the policy is trained to stop).
    assert stopped.response_ids == ids[:at + 1] and stopped.finish_reason == "stop"
    assert stopped.text == s.engine.tokenizer.decode(ids[:at], skip_special_tokens=True)

    state = torch.random.get_rng_state()
    one = s.engine.generate(s.requests(), SAMPLING)
    assert torch.equal(torch.random.get_rng_state(), state)  # the trainer's RNG stream is untouched
    again = s.engine.generate(s.requests(), SAMPLING)
    other = s.engine.generate(s.requests(), dataclasses.replace(SAMPLING, seed=6))
    def samples(ts):
        return [t.response_ids for t in ts]

    assert samples(one) == samples(again)  # a call is a function of (seed, requests, weights)
    assert samples(one) != samples(other)


def test_sleep_is_a_no_op_on_cpu_but_the_engine_refuses_to_roll_out_asleep(setups):
    s = setups("text")
    s.engine.sleep()
    with pytest.raises(EngineStateError, match="asleep"):
        s.engine.generate(s.requests(), SAMPLING)
    s.engine.wake_up()
    assert len(s.engine.generate(s.requests(("w",)), dataclasses.replace(SAMPLING, n=1))) == 1


def test_request_errors_are_one_line(setups):
    s = setups("text")
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        s.engine.generate([RolloutRequest(uid="x", prompt_ids=[10**7])], SAMPLING)
    with pytest.raises(ValueError, match="text-only"):
        s.engine.generate([RolloutRequest(uid="x", prompt_ids=s.prompt_ids, images=[s.image])], SAMPLING)


def test_vl_prompt_with_expanded_placeholders_and_preprocessed_images(setups):
    """The trainer's layout: placeholders expanded to the image's tokens, preprocessed pixels in `images`
    and the PIL images in metadata['source_images']: the same samples as the chat-template prompt."""
    from megatron_selfjudge.megatron.models import qwen

    s = setups("vl")
    processor = qwen.load_processor(s.path)
    text = processor.apply_chat_template(s.messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[s.image], text=[text], return_tensors="pt")
    expanded = inputs["input_ids"][0].tolist()
    assert len(expanded) == len(s.prompt_ids) + 23  # one placeholder became the image's 24 tokens
    request = RolloutRequest(uid="a", prompt_ids=expanded, images=inputs["pixel_values"],
                             metadata={"source_images": [s.image]})
    got = s.engine.generate([request], SAMPLING)
    want = s.engine.generate(s.requests(("a",)), SAMPLING)
    assert [t.response_ids for t in got] == [t.response_ids for t in want]
    assert all(t.prompt_ids == expanded for t in got)  # trajectories keep the caller's (training) layout
    with pytest.raises(TypeError, match="PIL images"):
        s.engine.generate([RolloutRequest(uid="a", prompt_ids=expanded, images=inputs["pixel_values"])], SAMPLING)
