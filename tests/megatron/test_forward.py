"""Forward-only log-probs of response tokens for the tiny LLaVA policy (megatron_selfjudge/megatron/forward.py).

Also hosts the small batch/model factories the other GRPO-step tests import.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import run_distributed  # noqa: E402

VOCAB, IMG, PATCH, IMG_TOKEN, MAX_SEQ = 96, 16, 4, -200, 40
IMG_SEQ = (IMG // PATCH) ** 2  # embeddings per image (class token dropped)
TEMPERATURE = 0.7
TOL = 1e-5


def make_batch(seed: int = 0, rows: int = 8, image_seed: int | None = None):
    """Rows of [bos, image, question...] + response, right-padded; random advantages and images."""
    from megatron_selfjudge.data.collate import build_sequences
    from megatron_selfjudge.megatron.batching import PolicyBatch

    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for _ in range(rows):
        question = torch.randint(3, VOCAB, (2 + int(torch.randint(0, 3, (1,), generator=g)),), generator=g)
        prompts.append([1, IMG_TOKEN] + question.tolist())
        responses.append(torch.randint(3, VOCAB, (2 + int(torch.randint(0, 5, (1,), generator=g)),),
                                       generator=g).tolist())
    seq = build_sequences(prompts, responses, pad_id=0)
    images_gen = g if image_seed is None else torch.Generator().manual_seed(image_seed)
    advantages = torch.randn(rows, generator=g)
    return PolicyBatch.from_sequences(seq, advantages, images=torch.randn(rows, 3, IMG, IMG, generator=images_gen))


def llava_builder(seed: int = 5, **overrides):
    """A builder for this rank's stage of the tiny LLaVA policy (used for policy and frozen copies)."""
    from megatron.core import parallel_state as ps

    from megatron_selfjudge.megatron.models import build_tiny_llava

    kwargs = dict(vocab_size=VOCAB, max_seq_len=MAX_SEQ, img_size=IMG, patch_dim=PATCH,
                  image_token_index=IMG_TOKEN, pre_process=ps.is_pipeline_first_stage(),
                  post_process=ps.is_pipeline_last_stage(), seed=seed)
    kwargs.update(overrides)
    return functools.partial(build_tiny_llava, **kwargs)


def expected_positions(tokens: torch.Tensor) -> torch.Tensor:
    """Decoder position predicting labels[b, t], by walking each row (independent of label_positions)."""
    out = torch.zeros_like(tokens)
    for b in range(tokens.shape[0]):
        position = -1
        for t in range(tokens.shape[1]):
            position += IMG_SEQ if int(tokens[b, t]) == IMG_TOKEN else 1
            out[b, t] = position
    return out


def full_logits(model, batch) -> torch.Tensor:
    """Batch-first logits [B, S, V] of a TP=1, PP=1 model from a direct forward call."""
    positions = torch.arange(batch.tokens.shape[1]).expand_as(batch.tokens)
    logits, _ = model(batch.images, batch.tokens, positions, None)
    return logits


def label_logits(logits: torch.Tensor, batch) -> torch.Tensor:
    """[B, T, V]: the logits predicting each label, gathered at expected_positions."""
    index = expected_positions(batch.tokens).unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return logits.gather(1, index)


def test_label_positions_text_only_is_identity():
    from megatron_selfjudge.megatron.forward import label_positions

    tokens = torch.tensor([[5, 6, 7], [8, 9, 0]])
    assert torch.equal(label_positions(tokens, IMG_TOKEN, 0), torch.tensor([[0, 1, 2], [0, 1, 2]]))


def test_label_positions_shift_after_each_image():
    from megatron_selfjudge.megatron.forward import label_positions

    # Image spans 3 positions: 5 -> 0, image -> 1..3 (its last embedding 3 predicts 7), 7 -> 4, ...
    tokens = torch.tensor([[5, IMG_TOKEN, 7, IMG_TOKEN, 8], [IMG_TOKEN, 4, 4, 4, 4]])
    expected = torch.tensor([[0, 3, 4, 7, 8], [2, 3, 4, 5, 6]])
    assert torch.equal(label_positions(tokens, IMG_TOKEN, 3), expected)


def _forward_worker(rank: int, world: int) -> dict:
    from megatron_selfjudge import loss as loss_ref
    from megatron_selfjudge.megatron.batching import PolicyBatch
    from megatron_selfjudge.megatron.forward import compute_logprobs
    from megatron_selfjudge.megatron.parallel import initialize_parallel

    initialize_parallel(tp=1, pp=1, seed=1)
    model = llava_builder()()
    batch = make_batch(seed=0)
    with torch.no_grad():
        ref = loss_ref.token_logprobs(label_logits(full_logits(model, batch), batch), batch.labels.clamp(min=0),
                                      TEMPERATURE) * batch.loss_mask
    out = {"reference": ref, "training_mode_kept": None}
    model.train()
    out["one_micro"] = compute_logprobs(model, batch, temperature=TEMPERATURE, max_tokens=10_000)
    out["training_mode_kept"] = model.training
    out["many_micro"] = compute_logprobs(model, batch, temperature=TEMPERATURE, max_tokens=MAX_SEQ)
    out["other_image"] = compute_logprobs(model, make_batch(seed=0, image_seed=99), temperature=TEMPERATURE)
    tokens = torch.full((1, 30), 5)
    tokens[0, 1] = IMG_TOKEN  # 29 text tokens + 16 image positions = 45 > MAX_SEQ
    too_long = PolicyBatch(tokens=tokens, labels=torch.full((1, 30), 5), loss_mask=torch.ones(1, 30),
                           images=torch.zeros(1, 3, IMG, IMG))
    try:
        compute_logprobs(model, too_long)
        out["too_long_error"] = None
    except ValueError as err:
        out["too_long_error"] = str(err)
    out.update(_gpt_checks())
    return out


def _gpt_checks() -> dict:
    """Text-only GPTModel: no images, logits position t predicts labels[t]."""
    from megatron_selfjudge import loss as loss_ref
    from megatron_selfjudge.megatron.forward import compute_logprobs
    from megatron_selfjudge.megatron.models import build_gpt

    model = build_gpt(VOCAB, 2, 32, 4, 64, MAX_SEQ, seed=3)
    batch = make_batch(seed=1)
    text = type(batch)(tokens=batch.tokens.clamp(min=2), labels=batch.labels, loss_mask=batch.loss_mask)
    with torch.no_grad():
        logits = model(text.tokens, torch.arange(text.tokens.shape[1]).expand_as(text.tokens), None)
        ref = loss_ref.token_logprobs(logits, text.labels.clamp(min=0), TEMPERATURE) * text.loss_mask
    return {"gpt_reference": ref, "gpt": compute_logprobs(model, text, temperature=TEMPERATURE, max_tokens=24)}


@pytest.fixture(scope="module")
def forward_run() -> dict:
    return run_distributed(_forward_worker, 1, timeout=240)[0]


@pytest.mark.slow
def test_logprobs_match_plain_forward_at_label_positions(forward_run):
    ref, got = forward_run["reference"], forward_run["one_micro"]
    mask = make_batch(seed=0).loss_mask.bool()
    assert got.dtype == torch.float32 and got.shape == mask.shape
    assert (got[mask] < 0).all() and (got[~mask] == 0).all()
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    assert forward_run["training_mode_kept"] is True


@pytest.mark.slow
def test_token_budget_micro_batches_give_same_logprobs(forward_run):
    torch.testing.assert_close(forward_run["many_micro"], forward_run["one_micro"], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_changing_the_image_changes_response_logprobs(forward_run):
    mask = make_batch(seed=0).loss_mask.bool()
    delta = (forward_run["other_image"] - forward_run["one_micro"])[mask].abs()
    # Every response token comes after the image, so every one of them must move.
    assert delta.min() > 1e-4


@pytest.mark.slow
def test_sequence_longer_than_decoder_is_refused(forward_run):
    assert forward_run["too_long_error"] is not None and "language_max_sequence_length" in forward_run["too_long_error"]


@pytest.mark.slow
def test_text_only_gpt_logprobs_match_plain_forward(forward_run):
    assert (forward_run["gpt"] != 0).sum() == make_batch(seed=1).loss_mask.sum()
    torch.testing.assert_close(forward_run["gpt"], forward_run["gpt_reference"], atol=TOL, rtol=0)


def test_model_info_rejects_other_modules():
    from megatron_selfjudge.megatron.forward import model_info

    with pytest.raises(TypeError, match="no model family knows a Linear"):
        model_info(torch.nn.Linear(2, 2))
