"""Collate: prompt layout, padding, image tensors, and loss masks that cover only responses."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from megatron_selfjudge.data.collate import (build_sequences, encode_prompt, encode_response, image_to_tensor,
                                             pad_sequences)
from megatron_selfjudge.data.datasets import examples_to_records
from megatron_selfjudge.data.prompts import SHORT_INSTRUCTION, sft_target
from megatron_selfjudge.data.synthetic import make_synthetic_splits
from megatron_selfjudge.data.tokenizer import CharTokenizer

TOK = CharTokenizer()
LLAVA_IMAGE_INDEX = -200  # megatron-core LLaVAModel's default image_token_index


@pytest.fixture(scope="module")
def records():
    exs = make_synthetic_splits(seed=5, n_sft=0, n_unlabeled=0, n_test=6)["test"]
    return exs, examples_to_records(exs)


def test_prompt_layout(records):
    exs, recs = records
    ids = encode_prompt(recs[0].question, 1, TOK, instruction=SHORT_INSTRUCTION)
    assert ids[:2] == [TOK.bos_token_id, TOK.image_token_id]
    assert TOK.decode(ids[2:]) == recs[0].question + SHORT_INSTRUCTION
    ids = encode_prompt("q", 2, TOK, image_token_id=LLAVA_IMAGE_INDEX, image_tokens_per_image=3,
                        add_bos=False, instruction="")
    assert ids == [LLAVA_IMAGE_INDEX] * 6 + TOK.encode("q")


def test_image_tensor_normalisation(records):
    exs, _ = records
    image = image_to_tensor(exs[3].image, 32)
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    raw = exs[3].image_array().astype(np.float64)  # [C, H, W] uint8 -> reference by hand
    assert np.allclose(image.numpy(), (raw / 255.0 - 0.5) / 0.5, atol=1e-6)
    clip = image_to_tensor(exs[0].image, 32, mean=(0.1, 0.2, 0.3), std=(0.2, 0.4, 0.8))
    blue = exs[0].image_array()[2].astype(np.float64)
    assert np.allclose(clip[2].numpy(), (blue / 255.0 - 0.3) / 0.8, atol=1e-6)
    resized = image_to_tensor(Image.new("RGB", (50, 20), (255, 0, 0)), 16)
    assert resized.shape == (3, 16, 16) and torch.allclose(resized[0], torch.ones(16, 16))
    with pytest.raises(TypeError, match="image"):
        image_to_tensor(np.zeros((3, 4, 4)), 4)


def test_pad_sequences_right_pads():
    ids = pad_sequences([[5, 6, 7], [8]], pad_id=0)
    assert ids.dtype == torch.long and ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    with pytest.raises(ValueError, match="at least one"):
        pad_sequences([], 0)


PROMPT_IDS = st.lists(st.integers(10, 20), min_size=1, max_size=9)
RESPONSE_IDS = st.lists(st.integers(30, 40), min_size=0, max_size=9)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(PROMPT_IDS, RESPONSE_IDS), min_size=1, max_size=5))
def test_loss_mask_covers_exactly_the_response(pairs):
    # Prompt ids (10..20, plus an image placeholder) and response ids (30..40) never overlap,
    # so "label is a response token" can be read off the label values themselves.
    prompts = [[LLAVA_IMAGE_INDEX] + p for p, _ in pairs]
    responses = [r for _, r in pairs]
    seq = build_sequences(prompts, responses, pad_id=0)
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    full = torch.tensor([p + r + [0] * (width - len(p) - len(r)) for p, r in zip(prompts, responses)])
    assert torch.equal(seq.tokens, full[:, :-1]) and torch.equal(seq.labels, full[:, 1:])
    expected = (seq.labels >= 30) & (seq.labels <= 40)
    assert torch.equal(seq.loss_mask, expected.float())
    assert seq.loss_mask.sum(1).tolist() == [float(len(r)) for r in responses]
    assert not seq.loss_mask[seq.labels == LLAVA_IMAGE_INDEX].any()
    # The logits at position t predict labels[t]: a response token's logit sits one to the left.
    for b, (p, r) in enumerate(zip(prompts, responses)):
        assert seq.loss_mask[b, len(p) - 1: len(p) - 1 + len(r)].sum() == len(r)


def test_sft_sequences_from_records(records):
    exs, recs = records
    prompt_ids = [encode_prompt(r.question, len(r.images), TOK, instruction=SHORT_INSTRUCTION) for r in recs]
    responses = [encode_response(sft_target(e), TOK) for e in exs]
    seq = build_sequences(prompt_ids, responses, TOK.pad_token_id)
    for b, ex in enumerate(exs):
        trained = seq.labels[b][seq.loss_mask[b].bool()].tolist()
        assert TOK.decode(trained) == sft_target(ex) + TOK.eos_token
        assert TOK.image_token_id not in trained and TOK.bos_token_id not in trained
    assert seq.loss_mask.sum(1).tolist() == [float(len(r)) for r in responses]
    with pytest.raises(ValueError, match="same length"):
        build_sequences(prompt_ids, responses[:2], 0)
    with pytest.raises(ValueError, match="at least one token"):
        build_sequences([[]], [[31]], 0)


def test_synthetic_prompts_fit_the_tiny_default():
    # The embedded default's rollout.max_prompt_len: every family's longest question must fit.
    from megatron_selfjudge.config import load_config

    limit = load_config(None, []).rollout.max_prompt_len
    exs = make_synthetic_splits(seed=0, n_sft=0, n_unlabeled=0, n_test=64)["test"]
    lengths = [len(encode_prompt(r.question, len(r.images), TOK, instruction=SHORT_INSTRUCTION))
               for r in examples_to_records(exs)]
    assert max(lengths) <= limit
