"""load_task passes the data.* image limits (confinement roots, pixel cap, early resize) to the loaders."""
import json
import pytest
from PIL import Image
from megatron_selfjudge.config import load_config
from megatron_selfjudge.data.datasets import DatasetError
from megatron_selfjudge.data.task import load_task


ONE_PROMPT = ("trainer.prompts_per_step=1", "trainer.mini_batch_prompts=1")  # the files here hold one row


def test_load_task_applies_the_data_limits(tmp_path):
    images, data = tmp_path / "images", tmp_path / "data"
    images.mkdir(), data.mkdir()
    Image.new("RGB", (200, 130), (1, 2, 3)).save(images / "a.png")
    path = data / "t.jsonl"
    path.write_text(json.dumps({"image": str(images / "a.png"), "problem": "q"}) + "\n")
    with pytest.raises(DatasetError, match="outside the data folder"):
        load_task(load_config(None, [*ONE_PROMPT, f"data.train={path}"]))
    cfg = load_config(None, [*ONE_PROMPT, f"data.train={path}", f"data.image_roots=[{images}]"])
    (rec,) = load_task(cfg).train
    side = cfg.model.image_size  # reduced by a whole factor towards the model's side, never below it
    factor = min(200 // side, 130 // side)
    assert rec.images[0].size == (-(-200 // factor), -(-130 // factor)) and factor >= 2
    with pytest.raises(DatasetError, match="max_image_pixels"):
        load_task(load_config(None, [*ONE_PROMPT, f"data.train={path}", f"data.image_roots=[{images}]",
                                     "data.max_image_pixels=1000"]))


def test_a_training_file_smaller_than_one_step_is_refused_at_load(tmp_path):
    images, data = tmp_path / "images", tmp_path / "data"
    images.mkdir(), data.mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(data / "a.png")
    path = data / "t.jsonl"
    path.write_text(json.dumps({"image": "a.png", "problem": "q"}) + "\n")
    with pytest.raises(DatasetError, match=r"holds 1 usable rows .*fewer than one step's trainer.prompts_per_step=4"):
        load_task(load_config(None, [f"data.train={path}", "trainer.prompts_per_step=4",
                                     "trainer.mini_batch_prompts=2"]))
