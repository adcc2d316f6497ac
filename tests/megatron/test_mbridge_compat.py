"""mbridge_compat without process groups: version guard, switches, the config view, M-RoPE positions."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import tiny_qwen  # noqa: E402

from megatron_selfjudge.megatron.models import mbridge_compat, qwen  # noqa: E402


def test_other_versions_are_refused(monkeypatch):
    real = mbridge_compat.metadata.version
    monkeypatch.setattr(mbridge_compat.metadata, "version",
                        lambda name: "0.15.2" if name == "mbridge" else real(name))
    with pytest.raises(RuntimeError, match=r"mbridge 0\.15\.2 \(needs 0\.15\.1\)"):
        mbridge_compat.check_versions()
    monkeypatch.setattr(mbridge_compat.metadata, "version", real)
    mbridge_compat.check_versions()


def test_disabled_switches_one_adjustment_and_restores_it():
    assert mbridge_compat.enabled("merger_fc1_split")
    with mbridge_compat.disabled("merger_fc1_split"):
        assert not mbridge_compat.enabled("merger_fc1_split")
        assert mbridge_compat.enabled("local_specs")
    assert mbridge_compat.enabled("merger_fc1_split")
    with pytest.raises(ValueError, match="unknown mbridge adjustment"):
        with mbridge_compat.disabled("no_such_fix"):
            pass
    assert set(mbridge_compat.ADJUSTMENTS) == set(mbridge_compat.EVERY_DEVICE) | set(mbridge_compat.WITHOUT_TE)


def test_config_view_reads_text_config_and_rope_parameters(vl_dir):
    config = qwen.load_hf_config(vl_dir)
    view = mbridge_compat.BridgeConfigView(config)
    assert not hasattr(config, "num_hidden_layers")  # transformers 5 layout: under text_config
    assert (view.num_hidden_layers, view.hidden_size, view.vocab_size) == (2, 128, tiny_qwen.VOCAB_SIZE)
    assert view.rope_theta == 1000000.0 and view.rope_scaling["mrope_section"] == [4, 6, 6]
    assert view.vision_config.hidden_size == 64 and view.model_type == "qwen2_5_vl"
    with pytest.raises(AttributeError):
        view.no_such_key
    with pytest.raises(AttributeError, match="read-only"):
        view.hidden_size = 3


def _inputs(vl_dir: Path) -> dict:
    processor = qwen.load_processor(vl_dir)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"},
                                             {"type": "text", "text": "and answer."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(images=[tiny_qwen.test_image()], text=[text], return_tensors="pt"))


def test_mrope_positions_are_transformers_and_not_1d(vl_dir):
    from transformers import AutoModelForImageTextToText

    config = qwen.load_hf_config(vl_dir)
    inputs = _inputs(vl_dir)
    ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
    assert torch.equal(qwen.mm_token_type_ids(config, ids).long(), inputs["mm_token_type_ids"].long())
    ours = qwen.mrope_position_ids(config, ids, grid)
    model = AutoModelForImageTextToText.from_pretrained(str(vl_dir), local_files_only=True)
    theirs, _ = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=grid)
    assert torch.equal(ours, theirs)
    # The trap: plain 1-D positions are what HF silently uses without mm_token_type_ids.
    assert not torch.equal(ours, torch.arange(ids.shape[1]).expand(3, 1, -1))
    assert int(ours.max()) < ids.shape[1] - 1  # the 6x4 image grid takes 6 positions, not 24


def test_mbridge_positions_hard_code_the_merge_size(vl_dir):
    """Why caller_position_ids exists: mbridge's get_rope_index assumes spatial_merge_size 2."""
    from mbridge.models.qwen2_5_vl import rope_utils

    config = qwen.load_hf_config(vl_dir)
    inputs = _inputs(vl_dir)
    ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
    theirs, _ = rope_utils.get_rope_index(ids, image_grid_thw=grid)
    assert torch.equal(qwen.mrope_position_ids(config, ids, grid), theirs)  # merge size 2: they agree
    config.vision_config.spatial_merge_size = 1  # a tower that merges nothing: 96 tokens per image
    n_image = int(grid.prod())
    pad = config.image_token_id
    start = int((ids[0] == pad).nonzero()[0])
    wide = torch.cat([ids[:, :start], torch.full((1, n_image), pad), ids[:, start + int((ids[0] == pad).sum()):]], 1)
    theirs, _ = rope_utils.get_rope_index(wide, image_grid_thw=grid)
    assert not torch.equal(qwen.mrope_position_ids(config, wide, grid), theirs)


def test_position_input_checks(vl_dir):
    config = qwen.load_hf_config(vl_dir)
    inputs = _inputs(vl_dir)
    with pytest.raises(ValueError, match="no image_grid_thw"):
        qwen.mrope_position_ids(config, inputs["input_ids"])
    with pytest.raises(ValueError, match="gives 48 image tokens, input_ids hold 24"):
        qwen.mrope_position_ids(config, inputs["input_ids"], inputs["image_grid_thw"].repeat(2, 1))
    video = inputs["input_ids"].clone()
    video[0, 0] = config.video_token_id
    with pytest.raises(ValueError, match="video input needs torchvision"):
        qwen.mrope_position_ids(config, video, inputs["image_grid_thw"])


def test_image_only_processor(vl_dir):
    processor = qwen.load_processor(vl_dir)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert processor.video_processor.valid_kwargs is None
    with pytest.raises(RuntimeError, match="video input needs torchvision"):
        processor.video_processor([])
    out = processor(images=[tiny_qwen.test_image()], text=["<|vision_start|><|image_pad|><|vision_end|>hi"],
                    return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 8, 12]] and out["pixel_values"].shape == (96, 3 * 2 * 14 * 14)
    assert int((out["input_ids"] == qwen.load_hf_config(vl_dir).image_token_id).sum()) == 24


def test_folder_errors(tmp_path):
    with pytest.raises(qwen.HFFolderError, match="does not exist"):
        qwen.load_hf_config(tmp_path / "none")
    tmp_path.joinpath("config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(qwen.HFFolderError, match="'llama' is not supported"):
        qwen.load_hf_config(tmp_path)
