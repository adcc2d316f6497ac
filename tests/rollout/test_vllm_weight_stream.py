"""The vLLM weight push's bucketed stream (no engine needed): buckets, tied head, dtype, bytes, laziness."""
from __future__ import annotations

import pytest
import torch

from megatron_selfjudge.rollout.vllm_engine import VllmSettings, WeightStream


def _tensors(sizes):
    return [(f"w{i}", torch.full((n,), float(i))) for i, n in enumerate(sizes)]


def test_buckets_hold_at_most_bucket_bytes_plus_one_tensor_and_the_source_is_read_lazily():
    pulled = []

    def source():
        for name, t in _tensors([100, 100, 100, 300, 50]):
            pulled.append(name)
            yield name, t

    stream = WeightStream(source(), bucket_bytes=800, device=torch.device("cpu"), dtype=torch.float32, tied=False)
    it = iter(stream)
    name, tensor = next(it)
    # The first bucket fills at 800 bytes (w0+w1 = 800): nothing beyond it was pulled from the exporter.
    assert name == "w0" and pulled == ["w0", "w1"]
    rest = list(it)
    assert [n for n, _ in rest] == ["w1", "w2", "w3", "w4"]
    assert stream.buckets == 3 and stream.bytes == 650 * 4
    assert stream.peak_bucket_bytes == 1600  # w2 (400 B) + w3 (1200 B): one tensor past the bound at most
    assert stream.names == ["w0", "w1", "w2", "w3", "w4"]


def test_tied_head_is_dropped_and_dtype_converted():
    src = [("model.embed_tokens.weight", torch.ones(4, 2)), ("lm_head.weight", torch.ones(4, 2))]
    stream = WeightStream(src, bucket_bytes=1, device=torch.device("cpu"), dtype=torch.bfloat16, tied=True)
    out = list(stream)
    assert [n for n, _ in out] == ["model.embed_tokens.weight"] and out[0][1].dtype == torch.bfloat16
    untied = list(WeightStream(src, bucket_bytes=1, device=torch.device("cpu"), dtype=torch.float32, tied=False))
    assert [n for n, _ in untied] == ["model.embed_tokens.weight", "lm_head.weight"]


def test_bad_items_and_settings_are_refused():
    with pytest.raises(TypeError, match="expected"):
        list(WeightStream([("w", [1.0])], bucket_bytes=8, device=torch.device("cpu"), dtype=torch.float32,
                          tied=False))
    with pytest.raises(ValueError, match="bucket_bytes"):
        WeightStream([], bucket_bytes=0, device=torch.device("cpu"), dtype=torch.float32, tied=False)
    with pytest.raises(ValueError, match="sleep_level"):
        VllmSettings(sleep_level=3)
    with pytest.raises(ValueError, match="dtype"):
        VllmSettings(dtype="int8")
