"""`selfjudge convert`: HF folder -> megatron checkpoint -> HF folder is lossless and loads in transformers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "megatron"))

import tiny_qwen  # noqa: E402

from megatron_selfjudge.megatron.models import convert  # noqa: E402

pytest.importorskip("mbridge")


def _selfjudge(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "megatron_selfjudge.cli", "convert", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def _logits(path: Path, vision: bool, inputs: dict) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = cls.from_pretrained(str(path), local_files_only=True).eval()
    with torch.no_grad():
        return model(**inputs).logits


def _inputs(path: Path, vision: bool) -> dict:
    from megatron_selfjudge.megatron.models import qwen

    if not vision:
        return dict(qwen.load_tokenizer(path)(["The answer is 42."], return_tensors="pt"))
    processor = qwen.load_processor(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many sides?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(images=[tiny_qwen.test_image(3)], text=[text], return_tensors="pt"))


def _convert(vision: bool, *args: str) -> None:
    """The VL round trip runs the command as a user does; the text one calls its main() in this process
    (the same code without three more interpreter start-ups and megatron imports)."""
    if vision:
        done = _selfjudge(*args)
        assert done.returncode == 0, done.stderr[-2000:]
    else:
        assert convert.main(list(args)) == 0


@pytest.mark.parametrize("vision", [True, False], ids=["qwen2_5_vl", "qwen2_5"])
def test_round_trip_is_bit_identical_and_loads_in_transformers(vision, tmp_path):
    from safetensors.torch import load_file

    make = tiny_qwen.make_tiny_qwen2_5_vl if vision else tiny_qwen.make_tiny_qwen2_5
    src = make(tmp_path / "src", seed=7)
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"

    _convert(vision, "hf-to-megatron", str(src), str(ckpt))
    assert (ckpt / "latest").read_text().strip() == "step_00000000"
    state = json.loads((ckpt / "step_00000000" / "trainer_state.json").read_text())
    assert state["step"] == 0 and state["model_type"] == ("qwen2_5_vl" if vision else "qwen2")
    assert (ckpt / "hf" / "config.json").is_file() and (ckpt / "hf" / "tokenizer.json").is_file()

    _convert(vision, "megatron-to-hf", str(ckpt), str(back))  # the root: its newest checkpoint

    original, exported = load_file(str(src / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    inputs = _inputs(back, vision)
    assert torch.equal(_logits(back, vision, inputs), _logits(src, vision, inputs))
    assert (back / "chat_template.jinja").read_text() == (src / "chat_template.jinja").read_text()
    assert (back / "config.json").read_bytes() == (src / "config.json").read_bytes()

    if not vision:  # a bf16 export says so in its config and loads as bf16
        half = tmp_path / "half"
        _convert(vision, "megatron-to-hf", str(ckpt / "step_00000000"), str(half), "--dtype", "bfloat16")
        weights = load_file(str(half / "model.safetensors"))
        assert all(t.dtype == torch.bfloat16 for t in weights.values())
        assert all(torch.equal(weights[k], original[k].to(torch.bfloat16)) for k in original)
        assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
        from transformers import AutoModelForCausalLM

        assert AutoModelForCausalLM.from_pretrained(str(half), local_files_only=True).dtype == torch.bfloat16


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert convert.main(["hf-to-megatron", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert convert.main(["hf-to-megatron", str(llama), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model_type 'llama' is not supported" in err and err.count("\n") == 1

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert convert.main(["hf-to-megatron", str(broken), str(tmp_path / "out")]) == 2
    assert str(broken / "config.json") in capsys.readouterr().err

    assert convert.main(["megatron-to-hf", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert convert.main(["megatron-to-hf", str(llama), str(tmp_path / "out")]) == 2
    assert "neither a checkpoint folder nor a root" in capsys.readouterr().err


def test_existing_output_is_refused(tmp_path, capsys):
    src = tiny_qwen.make_tiny_qwen2_5(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert.main(["hf-to-megatron", str(src), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def _load_converted_worker(rank: int, world: int, src: str, step_dir: str, inputs: dict, tp: int, pp: int) -> dict:
    from megatron_selfjudge.megatron.checkpoint import load_checkpoint
    from megatron_selfjudge.megatron.models import qwen
    from megatron_selfjudge.megatron.parallel import initialize_parallel

    initialize_parallel(tp=tp, pp=pp)
    model = qwen.build_model(src, load_weights=False)
    load_checkpoint(step_dir, [model.module], optimizer=None, load_rng=False)
    model.module.eval()
    with torch.no_grad():
        out = qwen.forward(model, inputs["input_ids"], qwen.position_ids(model, inputs["input_ids"],
                                                                           inputs["image_grid_thw"]),
                           inputs["pixel_values"], inputs["image_grid_thw"])
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        return {"logits": gather_from_tensor_model_parallel_region(out) if tp > 1 else out}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo test of megatron-core (like tests/megatron/)")
def test_converted_checkpoint_loads_at_tp2(tmp_path):
    """The hf-to-megatron output reshards: a TP=2 run loads it and matches transformers."""
    from dist_utils import run_distributed

    src = tiny_qwen.make_tiny_qwen2_5_vl(tmp_path / "src", seed=5)
    done = _selfjudge("hf-to-megatron", str(src), str(tmp_path / "ckpt"))
    assert done.returncode == 0, done.stderr[-2000:]
    inputs = _inputs(src, True)
    results = run_distributed(_load_converted_worker, 2, str(src), str(tmp_path / "ckpt" / "step_00000000"),
                              inputs, 2, 1, timeout=600)
    diff = (results[0]["logits"] - _logits(src, True, inputs)).abs().max().item()
    assert diff < 1e-4, diff
