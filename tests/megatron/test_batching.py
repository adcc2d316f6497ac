"""PolicyBatch validation and slicing; token-budget micro-batches; DP shards; prompt mini-batches."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_selfjudge.megatron.batching import (
    PolicyBatch,
    data_parallel_shard,
    micro_batches_by_tokens,
    prompt_mini_batches,
)

IMG = -200


def _batch() -> PolicyBatch:
    # Row 0: bos, image, q, r1, r2 (labels shifted); row 1: bos, q, image, q, r1, pad; row 2: no image.
    tokens = torch.tensor([[1, IMG, 7, 8, 9, 0],
                           [1, 7, IMG, 7, 8, 0],
                           [1, 7, 8, 9, 0, 0]])
    labels = torch.tensor([[IMG, 7, 8, 9, 0, 0],
                           [7, IMG, 7, 8, 4, 0],
                           [7, 8, 9, 0, 0, 0]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 0, 0],
                              [0, 0, 0, 1, 1, 0],
                              [0, 1, 1, 0, 0, 0]], dtype=torch.float32)
    images = torch.arange(2, dtype=torch.float32).view(2, 1, 1, 1).expand(2, 3, 4, 4).clone()
    return PolicyBatch(tokens=tokens, labels=labels, loss_mask=loss_mask, advantages=torch.tensor([1.0, -1.0, 0.5]),
                       images=images, old_logp=-torch.ones(3, 6))


def test_row_lengths_cover_last_response_label_and_last_image():
    batch = _batch()
    assert batch.row_lengths(IMG).tolist() == [4, 5, 3]
    # Each image adds image_seq_len - 1 decoder positions.
    assert batch.token_costs(IMG, image_seq_len=16).tolist() == [4 + 15, 5 + 15, 3]
    assert batch.token_costs(IMG, image_seq_len=0).tolist() == [4, 5, 3]


def test_select_trims_columns_and_keeps_images_with_their_rows():
    batch = _batch()
    sub = batch.select([2, 1], IMG)
    assert sub.tokens.shape == (2, 5)
    assert torch.equal(sub.tokens, batch.tokens[[2, 1], :5])
    assert torch.equal(sub.loss_mask, batch.loss_mask[[2, 1], :5])
    assert torch.equal(sub.advantages, torch.tensor([0.5, -1.0]))
    assert sub.old_logp.shape == (2, 5)
    # Row 2 has no image, row 1 owns the second image.
    assert sub.images.shape == (1, 3, 4, 4) and float(sub.images[0, 0, 0, 0]) == 1.0
    assert sub.num_images.tolist() == [0, 1]
    only_text = batch.select([2], IMG)
    assert only_text.images.shape[0] == 0 and only_text.tokens.shape == (1, 3)


def test_select_rejects_bad_indices():
    with pytest.raises(ValueError, match="row indices"):
        _batch().select([3], IMG)
    with pytest.raises(ValueError, match="at least one"):
        _batch().select([], IMG)


@pytest.mark.parametrize("field, value, error, match", [
    ("labels", torch.zeros(3, 5, dtype=torch.long), ValueError, "labels shape"),
    ("loss_mask", torch.full((3, 6), 0.5), ValueError, "0/1"),
    ("tokens", torch.zeros(3, 6), TypeError, "tokens must be an integer"),
    ("advantages", torch.zeros(2), ValueError, "advantages"),
    ("images", torch.zeros(3, 3, 4, 4), ValueError, "num_images"),
    ("ref_logp", torch.zeros(3, 6, dtype=torch.long), TypeError, "ref_logp"),
])
def test_bad_fields_are_named(field, value, error, match):
    batch = _batch()
    kwargs = {f: getattr(batch, f) for f in ("tokens", "labels", "loss_mask", "advantages", "images")}
    kwargs["num_images"] = torch.tensor([1, 1, 0])
    kwargs[field] = value
    with pytest.raises(error, match=match):
        PolicyBatch(**kwargs)


def test_micro_batches_by_tokens_hand_example():
    # Longest first: [9], then 5+5 fit in 10 (2 x 5), then 4+3 (2 x 4 = 8 <= 10, 3 x 4 > 10), then [2].
    groups = micro_batches_by_tokens([5, 9, 4, 5, 3, 2], max_tokens=10)
    assert groups == [[1], [0, 3], [2, 4], [5]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.integers(50, 300))
def test_micro_batches_partition_rows_within_budget(lengths, budget):
    groups = micro_batches_by_tokens(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert len(group) * max(lengths[i] for i in group) <= budget
    assert groups == micro_batches_by_tokens(lengths, budget)  # deterministic


def test_micro_batches_refuse_rows_over_budget_and_bad_budget():
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        micro_batches_by_tokens([3, 12], max_tokens=10)
    with pytest.raises(ValueError, match="max_tokens"):
        micro_batches_by_tokens([3], max_tokens=0)


@pytest.mark.parametrize("rows, size", [(8, 2), (7, 2), (5, 4), (4, 4)])
def test_data_parallel_shards_partition_and_balance(rows, size):
    shards = [data_parallel_shard(rows, r, size) for r in range(size)]
    assert sum(shards, []) == list(range(rows))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_data_parallel_shard_needs_a_row_per_rank():
    with pytest.raises(ValueError, match="data-parallel"):
        data_parallel_shard(1, 0, 2)
    with pytest.raises(ValueError, match="dp_rank"):
        data_parallel_shard(4, 2, 2)


def test_prompt_mini_batches_keep_groups_together():
    group_ids = ["a", "a", "b", "c", "b", "c", "d", "d"]
    assert prompt_mini_batches(group_ids, 2) == [[0, 1, 2, 4], [3, 5, 6, 7]]
    assert prompt_mini_batches(torch.tensor([3, 3, 1]), 5) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="prompts_per_mini_batch"):
        prompt_mini_batches(group_ids, 0)


def test_prompt_shard_gives_each_rank_its_part_of_every_mini_batch():
    from megatron_selfjudge.megatron.batching import prompt_shard

    assert prompt_shard(8, 4, 0, 2) == [0, 1, 4, 5] and prompt_shard(8, 4, 1, 2) == [2, 3, 6, 7]
    assert prompt_shard(6, 3, 0, 1) == list(range(6))
    for dp in (1, 2, 4):  # the ranks' shares partition the step, mini-batch by mini-batch
        shares = [prompt_shard(16, 8, r, dp) for r in range(dp)]
        assert sorted(sum(shares, [])) == list(range(16))
        for j in range(2):
            local = [s[j * 8 // dp:(j + 1) * 8 // dp] for s in shares]
            assert sorted(sum(local, [])) == list(range(8 * j, 8 * j + 8))
    with pytest.raises(ValueError, match="does not split over 4"):
        prompt_shard(12, 6, 0, 4)
    with pytest.raises(ValueError, match="do not split into mini-batches"):
        prompt_shard(10, 4, 0, 1)


def test_shared_images_are_held_once_and_select_like_copies():
    """A prompt's G rows pass one image tensor: the batch keeps it once, and every selection and
    row_images() equal those of a batch holding a copy per row."""
    from megatron_selfjudge.data.collate import build_sequences

    per_prompt = [torch.full((1, 3, 4, 4), float(p)) for p in range(3)]
    rows = [per_prompt[p] for p in (0, 0, 1, 1, 2, 2)]  # 3 prompts x G = 2
    seqs = build_sequences([[1, IMG, 5]] * 6, [[6, 7], [6], [7, 7], [5], [6, 6], [7]], pad_id=0)
    shared = PolicyBatch.sharing_images(seqs, torch.zeros(6), rows)
    copied = PolicyBatch.from_sequences(seqs, torch.zeros(6), images=torch.cat(rows),
                                        num_images=torch.ones(6, dtype=torch.long))
    assert shared.images.shape[0] == 3 and copied.images.shape[0] == 6
    assert torch.equal(shared.row_images(), copied.row_images())
    for pick in ([1, 4], [5, 0, 3], [2]):
        a, b = shared.select(pick, IMG), copied.select(pick, IMG)
        assert torch.equal(a.row_images(), b.row_images()), pick
        assert a.images.shape[0] == len({r // 2 for r in pick})  # one image per distinct prompt
    with pytest.raises(ValueError, match="image_index must lie in"):
        PolicyBatch.from_sequences(seqs, torch.zeros(6), images=torch.cat(per_prompt),
                                   num_images=torch.ones(6, dtype=torch.long),
                                   image_index=torch.tensor([0, 0, 1, 1, 2, 3]))
