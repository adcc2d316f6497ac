"""The megatron-core rollout engine against independent references.

References: a full-recompute greedy loop (argmax of a plain forward over the whole sequence, no
KV cache), a teacher-forced forward for the log-probs, megatron-core's own legacy static
controller for greedy tokens, softmax(logits / T) for sample frequencies, and TP=1 for TP=2/PP=2.
Single-rank tests share one in-process gloo group; multi-rank tests spawn processes.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1] / "megatron"))
from dist_utils import free_port, run_distributed  # noqa: E402
from test_sampling import chi_square, chi_square_threshold  # noqa: E402

from megatron_selfjudge.data.tokenizer import CharTokenizer  # noqa: E402
from megatron_selfjudge.rollout.base import RolloutRequest, SamplingConfig, build_engine  # noqa: E402

LAYERS, HIDDEN, HEADS, FFN, MAX_SEQ = 2, 32, 4, 64, 64
IMAGE = -200
LOGPROB_TOL = 1e-5


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def single_rank():
    """megatron TP=1/PP=1 state in this process over a one-rank gloo group."""
    from megatron_selfjudge.megatron.parallel import destroy_parallel, initialize_parallel

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        pytest.skip("a multi-rank process group is already active in this process")
    initialize_parallel(tp=1, pp=1, seed=0)
    yield
    destroy_parallel()
    if created:
        dist.destroy_process_group()


def _sharpen(module: torch.nn.Module, factor: float) -> None:
    """Scale every weight matrix so a random tiny model's outputs depend on its inputs.

    At the default init (std 0.02) the logits of a 2-layer model barely move with the prompt or
    the image, which would let a wrong KV-cache offset pass unnoticed.
    """
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2 and "position_embeddings" not in name and "class_token" not in name:
                param.mul_(factor)


def _gpt(seed: int = 3, factor: float = 6.0):
    from megatron.core import parallel_state as ps

    from megatron_selfjudge.megatron.models import build_gpt

    model = build_gpt(CharTokenizer().vocab_size, LAYERS, HIDDEN, HEADS, FFN, MAX_SEQ,
                      pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                      seed=seed)
    _sharpen(model, factor)
    return model


def _llava(seed: int = 2, factor: float = 8.0):
    from megatron.core import parallel_state as ps

    from megatron_selfjudge.megatron.models import build_tiny_llava

    model = build_tiny_llava(vocab_size=CharTokenizer().vocab_size, max_seq_len=MAX_SEQ, image_token_index=IMAGE,
                             pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                             seed=seed)
    _sharpen(model, factor)
    return model


def _prompts(tok: CharTokenizer, n: int = 4) -> list[RolloutRequest]:
    """Prompts of different lengths, so prefill and per-row decode starts are both exercised."""
    texts = ["1+2=", "ab", "7*8-3=", "hello wor", "x", "12+34+5="]
    return [RolloutRequest(f"p{i}", tok.encode(texts[i % len(texts)])) for i in range(n)]


def _images(seed: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 16, 16, generator=g) for _ in range(n)]


def _full_logits(model, ids: list[int], image=None) -> torch.Tensor:
    """Last-position-per-token logits [len(ids), V] of one plain forward (no KV cache)."""
    tokens = torch.tensor([ids])
    positions = torch.arange(len(ids)).unsqueeze(0)
    with torch.no_grad():
        if image is None:
            return model(tokens, positions, None)[0].float()
        logits, _ = model(image if image.dim() == 4 else image.unsqueeze(0), tokens, positions, None)
        if IMAGE not in ids:
            return logits[0].float()
        # Image embeddings precede the text after the image token; keep text positions only.
        n_extra = logits.shape[1] - len(ids)
        at = ids.index(IMAGE)
        keep = list(range(at)) + list(range(at + n_extra, logits.shape[1]))
        return logits[0, keep].float()


def _reference_greedy(model, prompt: list[int], max_new: int, stop: set[int], image=None) -> list[int]:
    ids = list(prompt)
    for _ in range(max_new):
        ids.append(int(_full_logits(model, ids, image)[-1].argmax()))
        if ids[-1] in stop:
            break
    return ids[len(prompt):]


def _teacher_forced_logprobs(model, prompt: list[int], response: list[int], temperature: float,
                             image=None) -> torch.Tensor:
    logits = _full_logits(model, prompt + response[:-1], image)[len(prompt) - 1:]
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


# ---------------------------------------------------------------- GPT, one rank
def test_greedy_equals_full_recompute_reference(single_rank):
    tok = CharTokenizer()
    model = _gpt()
    engine = build_engine("megatron", model=model, tokenizer=tok, max_batch_size=5)
    requests = _prompts(tok, 5)
    out = engine.generate(requests, SamplingConfig(n=2, greedy=True, max_new_tokens=12))
    assert [(t.uid, t.sample_index) for t in out] == [(r.uid, s) for r in requests for s in range(2)]
    model.eval()
    for traj in out:
        expected = _reference_greedy(model, traj.prompt_ids, 12, {tok.eos_token_id})
        assert traj.response_ids == expected
        assert traj.finish_reason == ("stop" if expected[-1] == tok.eos_token_id else "length")
    assert len({tuple(t.response_ids) for t in out}) > 1  # the model does depend on the prompt


def test_greedy_equals_megatron_static_controller(single_rank):
    """Our loop reproduces megatron-core's legacy TextGenerationController token for token."""
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.inference_request import InferenceRequest
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
        InferenceWrapperConfig,
    )
    from megatron.core.inference.sampling_params import SamplingParams
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    tok = CharTokenizer()

    class MegatronTokenizer:  # the interface megatron's controller calls
        eod, bos = tok.eos_token_id, None

        def detokenize(self, ids, skip_special_tokens=True):
            return tok.decode(ids, skip_special_tokens=True)

    model = _gpt(seed=5)
    requests = _prompts(tok, 4)
    ours = build_engine("megatron", model=model, tokenizer=tok).generate(
        requests, SamplingConfig(greedy=True, max_new_tokens=10))
    config = InferenceWrapperConfig(hidden_size=HIDDEN, params_dtype=torch.float32,
                                    inference_batch_times_seqlen_threshold=-1, padded_vocab_size=tok.vocab_size,
                                    inference_max_requests=len(requests), inference_max_seq_length=MAX_SEQ)
    wrapper = GPTInferenceWrapper(model, config, StaticInferenceContext.from_config(config))
    controller = TextGenerationController(wrapper, MegatronTokenizer())
    params = SamplingParams(top_k=1, num_tokens_to_generate=10)
    batch = OrderedDict((r.uid, InferenceRequest(request_id=r.uid, prompt=tok.decode(r.prompt_ids),
                                                 sampling_params=params, prompt_tokens=list(r.prompt_ids)))
                        for r in requests)
    theirs = controller.generate_all_output_tokens_static_batch(batch)
    for traj in ours:
        mine = traj.response_ids[:-1] if traj.finish_reason == "stop" else traj.response_ids
        assert theirs[traj.uid].generated_tokens.tolist() == mine  # megatron drops the EOS


def test_sampled_logprobs_equal_teacher_forced_forward(single_rank):
    tok = CharTokenizer()
    model = _gpt()
    engine = build_engine("megatron", model=model, tokenizer=tok, max_batch_size=4)
    out = engine.generate(_prompts(tok, 3), SamplingConfig(n=3, temperature=0.7, top_p=0.9,
                                                           max_new_tokens=10, seed=5))
    model.eval()
    for traj in out:
        assert traj.logprobs.dtype == torch.float32 and len(traj.logprobs) == len(traj.response_ids)
        ref = _teacher_forced_logprobs(model, traj.prompt_ids, traj.response_ids, 0.7)
        torch.testing.assert_close(traj.logprobs, ref, rtol=0, atol=LOGPROB_TOL)
        assert (traj.logprobs <= 0).all()


def test_tiny_top_p_equals_greedy(single_rank):
    tok = CharTokenizer()
    engine = build_engine("megatron", model=_gpt(), tokenizer=tok)
    requests = _prompts(tok, 3)
    greedy = engine.generate(requests, SamplingConfig(n=1, greedy=True, temperature=1.3, max_new_tokens=8))
    nucleus = engine.generate(requests, SamplingConfig(n=2, top_p=1e-6, temperature=1.3, max_new_tokens=8, seed=9))
    for g, pair in zip(greedy, (nucleus[0:2], nucleus[2:4], nucleus[4:6])):
        for t in pair:
            assert t.response_ids == g.response_ids
            torch.testing.assert_close(t.logprobs, g.logprobs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 0.85)])
def test_first_token_frequencies_match_softmax_of_logits(single_rank, temperature, top_p):
    tok = CharTokenizer()
    model = _gpt()
    prompt = tok.encode("7*8-3=")
    n = 3000
    engine = build_engine("megatron", model=model, tokenizer=tok, max_batch_size=n)
    out = engine.generate([RolloutRequest("q", prompt)],
                          SamplingConfig(n=n, temperature=temperature, top_p=top_p, max_new_tokens=1, seed=1))
    counts = torch.bincount(torch.tensor([t.response_ids[0] for t in out]), minlength=tok.vocab_size)
    model.eval()
    probs = torch.softmax(_full_logits(model, prompt)[-1] / temperature, -1)
    sorted_p, order = torch.sort(probs, descending=True)
    n_keep = int((torch.cumsum(sorted_p, 0) < top_p).sum()) + 1 if top_p < 1 else len(probs)
    nucleus = torch.zeros_like(probs, dtype=torch.bool)
    nucleus[order[:n_keep]] = True
    assert counts[~nucleus].sum() == 0
    target = torch.where(nucleus, probs, torch.zeros_like(probs))
    stat, df = chi_square(counts, target / target.sum())
    assert stat < chi_square_threshold(df), (stat, df)
    # Power check: the distribution at another temperature is rejected by the same test.
    other = torch.where(nucleus, torch.softmax(_full_logits(model, prompt)[-1] / 2.0, -1), torch.zeros_like(probs))
    assert chi_square(counts, other / other.sum())[0] > chi_square_threshold(df)


class _EosTokenizer(CharTokenizer):
    """The char tokenizer with a chosen id as EOS (to make a random model stop on cue)."""

    def __init__(self, eos: int):
        super().__init__()
        self._eos = eos

    @property
    def eos_token_id(self) -> int:
        return self._eos


def test_stop_tokens_end_rows_independently(single_rank):
    tok = CharTokenizer()
    model = _gpt()
    requests = _prompts(tok, 3)
    free = build_engine("megatron", model=model, tokenizer=tok).generate(
        requests, SamplingConfig(greedy=True, max_new_tokens=12))
    ref = free[0].response_ids
    assert free[0].finish_reason == "length" and len(ref) == 12
    k = next(i for i in range(2, 12) if ref[i] not in ref[:i])  # a first occurrence to stop at
    for engine, sampling in (
        (build_engine("megatron", model=model, tokenizer=tok), SamplingConfig(greedy=True, max_new_tokens=12,
                                                                              stop_token_ids=(ref[k],))),
        (build_engine("megatron", model=model, tokenizer=_EosTokenizer(ref[k])),
         SamplingConfig(greedy=True, max_new_tokens=12)),
    ):
        out = engine.generate(requests, sampling)
        assert out[0].response_ids == ref[:k + 1]
        assert out[0].finish_reason == "stop"
        assert out[0].text == tok.decode(ref[:k], skip_special_tokens=True)
        assert len(out[0].logprobs) == k + 1
        torch.testing.assert_close(out[0].logprobs, free[0].logprobs[:k + 1], rtol=0, atol=1e-6)
        for o, f in zip(out[1:], free[1:]):  # other rows are unaffected by row 0 stopping
            cut = next((i + 1 for i, t in enumerate(f.response_ids) if t == ref[k]), len(f.response_ids))
            assert o.response_ids == f.response_ids[:cut]


def test_length_limit_and_text(single_rank):
    tok = CharTokenizer()
    out = build_engine("megatron", model=_gpt(), tokenizer=tok).generate(
        _prompts(tok, 2), SamplingConfig(n=2, max_new_tokens=5, seed=3))
    for t in out:
        if t.finish_reason == "length":
            assert len(t.response_ids) == 5 and tok.eos_token_id not in t.response_ids
            assert t.text == tok.decode(t.response_ids, skip_special_tokens=True)
        else:
            assert t.response_ids[-1] == tok.eos_token_id and len(t.response_ids) <= 5


def test_seeded_determinism_and_no_side_effects(single_rank):
    tok = CharTokenizer()
    model = _gpt()
    engine = build_engine("megatron", model=model, tokenizer=tok, max_batch_size=3)
    sampling = SamplingConfig(n=4, max_new_tokens=8, seed=21)
    model.train()
    rng = torch.get_rng_state()
    a = engine.generate(_prompts(tok, 2), sampling)
    assert model.training  # the trainer's mode is restored
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not touched
    model.eval()
    b = engine.generate(_prompts(tok, 2), sampling)
    assert not model.training
    c = engine.generate(_prompts(tok, 2), SamplingConfig(n=4, max_new_tokens=8, seed=22))
    assert [t.response_ids for t in a] == [t.response_ids for t in b]
    assert [t.response_ids for t in a] != [t.response_ids for t in c]
    assert len({tuple(t.response_ids) for t in a}) > 1  # samples of one prompt differ


def test_a_sample_does_not_depend_on_its_batch(single_rank):
    """Per-sample seeds: a request's samples are the same alone, with other requests (of other
    prompt lengths), in another order and in other batch sizes; this is what lets data-parallel
    ranks each roll out a share of the prompts and still sample what one process would."""
    tok = CharTokenizer()
    engine = build_engine("megatron", model=_gpt(), tokenizer=tok, max_batch_size=16)
    target = RolloutRequest("target", tok.encode("abab="))
    others = [RolloutRequest("o1", tok.encode("a=")), RolloutRequest("o2", tok.encode("abababab="))]
    sampling = SamplingConfig(n=3, max_new_tokens=8, seed=5)

    def samples(requests, batch_size):
        engine.max_batch_size = batch_size
        return [(t.sample_index, t.response_ids, t.logprobs) for t in engine.generate(requests, sampling)
                if t.uid == "target"]

    alone = samples([target], 16)
    assert len({tuple(ids) for _, ids, _ in alone}) > 1
    for requests, batch_size in (([others[0], target, others[1]], 16), ([others[1], target], 2),
                                 ([target, *others], 1)):
        got = samples(requests, batch_size)
        assert [(i, ids) for i, ids, _ in got] == [(i, ids) for i, ids, _ in alone], (batch_size, len(requests))
        for (_, _, a), (_, _, b) in zip(got, alone):
            torch.testing.assert_close(a, b, rtol=0, atol=LOGPROB_TOL)
    renamed = samples([RolloutRequest("target", tok.encode("abab="))], 16)
    assert [ids for _, ids, _ in renamed] == [ids for _, ids, _ in alone]
    other_uid = engine.generate([RolloutRequest("another", tok.encode("abab="))], sampling)
    assert [t.response_ids for t in other_uid] != [ids for _, ids, _ in alone]  # the uid is part of the seed


def test_weights_are_shared_with_the_policy(single_rank):
    tok = CharTokenizer()
    model = _gpt()
    engine = build_engine("megatron", model=model, tokenizer=tok)
    sampling = SamplingConfig(greedy=True, max_new_tokens=6)
    before = engine.generate(_prompts(tok, 1), sampling)[0]
    with torch.no_grad():  # an "optimizer step" in place
        model.output_layer.weight.mul_(-1.0)
    after = engine.generate(_prompts(tok, 1), sampling)[0]
    assert after.response_ids != before.response_ids
    # Shared weights: a push moves no bytes and only records the version.
    assert engine.shares_weights and engine.update_weights(None, 1) == 0 and engine.weights_version == 1
    with pytest.raises(ValueError, match="shares the trainer's weights"):
        engine.update_weights([("w", torch.zeros(1))], 2)
    with pytest.raises(ValueError, match="virtual pipeline"):
        build_engine("megatron", model=[model], tokenizer=tok)
    engine.close()
    with pytest.raises(Exception, match="closed"):
        engine.generate(_prompts(tok, 1), sampling)


def test_bad_input_gives_clear_errors(single_rank):
    tok = CharTokenizer()
    engine = build_engine("megatron", model=_gpt(), tokenizer=tok)
    with pytest.raises(ValueError, match="max_sequence_length"):
        engine.generate([RolloutRequest("a", tok.encode("x" * 60))], SamplingConfig(max_new_tokens=10))
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        engine.generate([RolloutRequest("a", [1, 500])], SamplingConfig())
    with pytest.raises(ValueError, match="text-only"):
        engine.generate([RolloutRequest("a", [5, 6], images=torch.zeros(3, 16, 16))], SamplingConfig())
    with pytest.raises(TypeError, match="SamplingConfig"):
        engine.generate([RolloutRequest("a", [5])], {"n": 2})
    with pytest.raises(ValueError, match="max_batch_size"):
        build_engine("megatron", model=_gpt(), tokenizer=tok, max_batch_size=0)


# ---------------------------------------------------------------- LLaVA, one rank
def test_llava_matches_references_and_uses_the_image(single_rank):
    tok = CharTokenizer()
    model = _llava()
    images = _images(0, 3)
    texts = ["ab=", "abab=", "3+4="]
    requests = [RolloutRequest(f"v{i}", [IMAGE] + tok.encode(t), images=images[i]) for i, t in enumerate(texts)]
    requests.append(RolloutRequest("text-only", tok.encode("12=")))
    engine = build_engine("megatron", model=model, tokenizer=tok, max_batch_size=4)
    greedy = engine.generate(requests, SamplingConfig(n=2, greedy=True, max_new_tokens=8))
    sampled = engine.generate(requests, SamplingConfig(n=2, temperature=0.8, max_new_tokens=8, seed=4))
    model.eval()
    image_of = {r.uid: r.images for r in requests}
    image_of["text-only"] = torch.empty(0, 3, 16, 16)
    for traj in greedy:
        expected = _reference_greedy(model, traj.prompt_ids, 8, {tok.eos_token_id}, image_of[traj.uid])
        assert traj.response_ids == expected
    for traj in sampled:
        ref = _teacher_forced_logprobs(model, traj.prompt_ids, traj.response_ids, 0.8, image_of[traj.uid])
        torch.testing.assert_close(traj.logprobs, ref, rtol=0, atol=LOGPROB_TOL)
    # Same prompt, same seed, another image: the first-token distribution moves.
    swapped = [RolloutRequest(r.uid, r.prompt_ids, images=_images(7, 1)[0]) for r in requests[:1]]
    a = engine.generate(requests[:1], SamplingConfig(n=1, greedy=True, max_new_tokens=1))[0]
    b = engine.generate(swapped, SamplingConfig(n=1, greedy=True, max_new_tokens=1))[0]
    p_a = _teacher_forced_logprobs(model, a.prompt_ids, a.response_ids, 1.0, swapped[0].images)
    assert abs(float(a.logprobs[0]) - float(p_a[0])) > 1e-2
    assert a.response_ids != b.response_ids or abs(float(a.logprobs[0]) - float(b.logprobs[0])) > 1e-2


def test_llava_image_errors(single_rank):
    tok = CharTokenizer()
    engine = build_engine("megatron", model=_llava(), tokenizer=tok)
    img = _images(0, 1)[0]
    with pytest.raises(ValueError, match="no images"):
        engine.generate([RolloutRequest("a", [IMAGE, 5, 6])], SamplingConfig())
    with pytest.raises(ValueError, match="2 images but 1 image tokens"):
        engine.generate([RolloutRequest("a", [IMAGE, 5], images=torch.stack([img, img]))], SamplingConfig())
    with pytest.raises(TypeError, match="image_processor"):
        engine.generate([RolloutRequest("a", [IMAGE, 5], images=["not a tensor"])], SamplingConfig())
    with pytest.raises(ValueError, match="image token sits"):
        late_image = RolloutRequest("a", [5, 6, 7, IMAGE], images=img)
        engine.generate([late_image, RolloutRequest("b", [IMAGE, 5], images=img)], SamplingConfig(max_new_tokens=4))


# ---------------------------------------------------------------- multi-rank
def _generate_worker(rank: int, world: int, tp: int, pp: int, kind: str) -> list:
    from megatron_selfjudge.megatron.parallel import initialize_parallel

    initialize_parallel(tp=tp, pp=pp, seed=0)
    tok = CharTokenizer()
    if kind == "gpt":
        model, requests = _gpt(), _prompts(tok, 3)
    else:
        model = _llava()
        requests = [RolloutRequest(f"v{i}", [IMAGE] + tok.encode(t), images=img)
                    for i, (t, img) in enumerate(zip(["ab=", "abab="], _images(0, 2)))]
    engine = build_engine("megatron", model=model, tokenizer=tok, max_batch_size=4)
    out = engine.generate(requests, SamplingConfig(n=3, temperature=1.0, top_p=0.95, max_new_tokens=10, seed=13))
    return [(t.uid, t.sample_index, t.response_ids, t.logprobs, t.finish_reason) for t in out]


def _assert_same_generations(reference: list, other: list) -> None:
    assert len(reference) == len(other)
    for ref, got in zip(reference, other):
        assert ref[:3] == got[:3] and ref[4] == got[4]
        torch.testing.assert_close(got[3], ref[3], rtol=0, atol=LOGPROB_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt", "llava"])
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_tp2_and_pp2_generate_the_same_tokens_as_one_rank(single_rank, kind, tp, pp):
    reference = _generate_worker(0, 1, 1, 1, kind)
    assert len({tuple(r[2]) for r in reference}) > 1
    for ranks_out in run_distributed(_generate_worker, tp * pp, tp, pp, kind, timeout=240):
        _assert_same_generations(reference, ranks_out)
