"""Collate: prompt layout, padding, image tensors, and loss masks that cover only responses."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from megatron_selfjudge.data.collate import (build_sequences, collate_prompts, encode_prompt,
                                             encode_response, image_to_tensor, pad_sequences)
from megatron_selfjudge.data.datasets import PromptRecord, examples_to_records
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


def test_left_padded_prompt_batch(records):
    exs, recs = records
    batch = collate_prompts(recs, TOK, image_size=32, instruction=SHORT_INSTRUCTION)
    lengths = [len(p) for p in batch.prompt_ids]
    assert batch.prompt_lengths.tolist() == lengths and len(set(lengths)) > 1
    assert batch.input_ids.shape == (6, max(lengths)) and batch.attention_mask.dtype == torch.bool
    for b, n in enumerate(lengths):
        width = batch.input_ids.shape[1]
        assert batch.input_ids[b, width - n:].tolist() == batch.prompt_ids[b]
        assert (batch.input_ids[b, : width - n] == TOK.pad_token_id).all()
        assert batch.attention_mask[b].sum() == n and batch.attention_mask[b, -1]
        assert batch.position_ids[b, width - n:].tolist() == list(range(n))
    assert (batch.input_ids == TOK.image_token_id).sum(1).tolist() == [1] * 6
    assert batch.num_images.tolist() == [1] * 6 and batch.num_image_tiles.tolist() == [1] * 6
    assert batch.answers == [e.answer for e in exs] and batch.uids == [e.uid for e in exs]
    right = collate_prompts(recs, TOK, 32, instruction=SHORT_INSTRUCTION, padding_side="right")
    assert right.input_ids[0, : lengths[0]].tolist() == batch.prompt_ids[0]


def test_image_tensor_normalisation(records):
    exs, recs = records
    batch = collate_prompts(recs, TOK, image_size=32)
    assert batch.images.dtype == torch.float32 and batch.images.shape == (6, 3, 32, 32)
    raw = exs[3].image_array().astype(np.float64)  # [C, H, W] uint8 -> reference by hand
    assert np.allclose(batch.images[3].numpy(), (raw / 255.0 - 0.5) / 0.5, atol=1e-6)
    clip = image_to_tensor(exs[0].image, 32, mean=(0.1, 0.2, 0.3), std=(0.2, 0.4, 0.8))
    blue = exs[0].image_array()[2].astype(np.float64)
    assert np.allclose(clip[2].numpy(), (blue / 255.0 - 0.3) / 0.8, atol=1e-6)
    resized = image_to_tensor(Image.new("RGB", (50, 20), (255, 0, 0)), 16)
    assert resized.shape == (3, 16, 16) and torch.allclose(resized[0], torch.ones(16, 16))


def test_collate_errors(records):
    _, recs = records
    with pytest.raises(ValueError, match="max_prompt_len"):
        collate_prompts(recs, TOK, 32, max_prompt_len=10)
    with pytest.raises(ValueError, match="padding_side"):
        collate_prompts(recs, TOK, 32, padding_side="middle")
    with pytest.raises(ValueError, match="records"):
        collate_prompts([], TOK, 32)
    empty = PromptRecord(uid="u", images=[], question="q", answer=None, source_file="f", row=0)
    with pytest.raises(ValueError, match="no image"):
        collate_prompts([empty], TOK, 32)
    with pytest.raises(TypeError, match="image"):
        image_to_tensor(np.zeros((3, 4, 4)), 4)


PROMPT_IDS = st.lists(st.integers(10, 20), min_size=1, max_size=9)
RESPONSE_IDS = st.lists(st.integers(30, 40), min_size=0, max_size=9)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(PROMPT_IDS, RESPONSE_IDS), min_size=1, max_size=5),
       st.sampled_from(["left", "right"]))
def test_loss_mask_covers_exactly_the_response(pairs, side):
    # Prompt ids (10..20, plus an image placeholder) and response ids (30..40) never overlap,
    # so "label is a response token" can be read off the label values themselves.
    prompts = [[LLAVA_IMAGE_INDEX] + p for p, _ in pairs]
    responses = [r for _, r in pairs]
    seq = build_sequences(prompts, responses, pad_id=0, padding_side=side)
    full, mask = pad_sequences([p + r for p, r in zip(prompts, responses)], 0, side)
    assert torch.equal(seq.tokens, full[:, :-1]) and torch.equal(seq.labels, full[:, 1:])
    expected = (seq.labels >= 30) & (seq.labels <= 40)
    assert torch.equal(seq.loss_mask, expected.float())
    assert seq.loss_mask.sum(1).tolist() == [float(len(r)) for r in responses]
    assert not seq.loss_mask[seq.labels == LLAVA_IMAGE_INDEX].any()
    assert torch.equal(seq.attention_mask, mask[:, :-1])
    for b, (p, r) in enumerate(zip(prompts, responses)):
        real = seq.attention_mask[b]
        assert seq.position_ids[b][real].tolist() == list(range(int(real.sum())))
    # The logits at position t predict labels[t]: a response token's logit sits one to the left.
    if side == "right":
        for b, (p, r) in enumerate(zip(prompts, responses)):
            assert seq.loss_mask[b, len(p) - 1: len(p) - 1 + len(r)].sum() == len(r)


def test_sft_sequences_from_records(records):
    exs, recs = records
    batch = collate_prompts(recs, TOK, 32, instruction=SHORT_INSTRUCTION)
    responses = [encode_response(sft_target(e), TOK) for e in exs]
    seq = build_sequences(batch.prompt_ids, responses, TOK.pad_token_id)
    for b, ex in enumerate(exs):
        trained = seq.labels[b][seq.loss_mask[b].bool()].tolist()
        assert TOK.decode(trained) == sft_target(ex) + TOK.eos_token
        assert TOK.image_token_id not in trained and TOK.bos_token_id not in trained
    assert seq.response_lengths.tolist() == [len(r) for r in responses]
    with pytest.raises(ValueError, match="same length"):
        build_sequences(batch.prompt_ids, responses[:2], 0)
    with pytest.raises(ValueError, match="at least one token"):
        build_sequences([[]], [[31]], 0)


def test_synthetic_prompts_fit_the_tiny_default():
    # configs/tiny.yaml: max_prompt_len 64; every family's longest question must fit.
    exs = make_synthetic_splits(seed=0, n_sft=0, n_unlabeled=0, n_test=64)["test"]
    batch = collate_prompts(examples_to_records(exs), TOK, 32, instruction=SHORT_INSTRUCTION,
                            max_prompt_len=64)
    assert int(batch.prompt_lengths.max()) <= 64
