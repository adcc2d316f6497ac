"""qwen_sizes: parameter counts from config.json against transformers' own models, tied and untied, VL and text."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from megatron_selfjudge.megatron.models import qwen_sizes
from megatron_selfjudge.megatron.models.qwen_sizes import HFConfigError, parameter_counts

sys.path.insert(0, str(Path(__file__).parent))
from tiny_qwen import make_tiny_qwen2_5, make_tiny_qwen2_5_vl  # noqa: E402

SEVEN_B = Path(__file__).parents[1] / "fixtures" / "qwen2_5_vl_7b_instruct_config.json"

# Which counted part each HF parameter belongs to, by its name (transformers 5.19 names).
_PARTS = (("visual.patch_embed.", "vision_patch_embed"), ("visual.blocks.", "vision_blocks"),
          ("visual.merger.", "vision_merger"), ("embed_tokens.", "embedding"), (".layers.", "decoder_layers"),
          ("lm_head.", "lm_head"), ("norm.", "final_norm"))


def _hf_parts(model: torch.nn.Module) -> dict[str, int]:
    """transformers' parameters summed per part (shared tensors once: a tied lm_head is the embedding)."""
    out = dict.fromkeys(dict(_PARTS).values(), 0)
    for name, p in model.named_parameters():  # named_parameters() yields a tied tensor once
        part = next(part for key, part in _PARTS if key in name)
        out[part] += p.numel()
    return out


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", ["vl", "text"])
def test_counts_equal_transformers_models(tmp_path, kind, tied):
    from transformers import AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration

    if kind == "vl":
        folder = make_tiny_qwen2_5_vl(tmp_path / "m", tie_word_embeddings=tied)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)
    else:
        folder = make_tiny_qwen2_5(tmp_path / "m", tie_word_embeddings=tied)
        model = AutoModelForCausalLM.from_pretrained(folder)
    counts = parameter_counts(json.loads((folder / "config.json").read_text()))
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    assert counts == _hf_parts(model)
    assert (counts["lm_head"] == 0) == tied
    assert (counts["vision_blocks"] > 0) == (kind == "vl")


def test_qwen2_5_vl_7b_instruct():
    """The published config: transformers' model (on the meta device) and the published 8.29 B agree."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = json.loads(SEVEN_B.read_text())
    counts = parameter_counts(config)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))
    total = sum(counts.values())
    assert total == sum(p.numel() for p in model.parameters())
    assert counts == _hf_parts(model)
    assert round(total / 1e9, 2) == 8.29  # the model card's figure
    # One decoder layer by hand: q (3584x3584 + bias), k and v (3584x512 + bias), o (no bias), SwiGLU, 2 norms.
    layer = (3584 * 3584 + 3584) + 2 * (3584 * 512 + 512) + 3584 * 3584 + 3 * 3584 * 18944 + 2 * 3584
    assert counts["decoder_layers"] == 28 * layer
    s = qwen_sizes.sizes(config)
    assert (s.num_key_value_heads, s.head_dim, s.vision.fullatt_block_indexes) == (4, 128, (7, 15, 23, 31))


def test_both_config_layouts_agree():
    """transformers 5 nests the text sizes under text_config; the published file keeps them on top."""
    from transformers import Qwen2_5_VLConfig

    flat = json.loads(SEVEN_B.read_text())
    nested = Qwen2_5_VLConfig(**flat).to_dict()
    assert "text_config" in nested and "hidden_size" in nested["text_config"]
    assert parameter_counts(nested) == parameter_counts(flat)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="llava"), "model_type 'llava' is not supported"),
    (lambda c: c.pop("num_hidden_layers"), "num_hidden_layers is missing"),
    (lambda c: c.update(num_key_value_heads=5), "num_attention_heads=28 is not a multiple of num_key_value_heads=5"),
    (lambda c: c["vision_config"].update(depth="32"), "vision_config: depth='32' must be a positive integer"),
    (lambda c: c.pop("vision_config"), "needs a vision_config object"),
])
def test_bad_configs_are_one_line_errors(edit, message):
    config = json.loads(SEVEN_B.read_text())
    edit(config)
    with pytest.raises(HFConfigError) as err:
        qwen_sizes.sizes(config, where="x/config.json")
    assert message in str(err.value) and str(err.value).startswith("x/config.json") and "\n" not in str(err.value)


def test_read_config_refusals(tmp_path):
    with pytest.raises(HFConfigError, match="is not a folder"):
        qwen_sizes.read_config(tmp_path / "nope")
    with pytest.raises(HFConfigError, match="has no config.json"):
        qwen_sizes.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(HFConfigError, match="is not valid JSON"):
        qwen_sizes.read_config(tmp_path)
