"""The qwen2.5-vl / qwen2.5 model families against transformers (the independent reference).

- prompt ids equal the HF processor's output on the chat template (images of two sizes: the
  image-token count follows each image);
- the family's forward on a PolicyBatch (two rows, different image sizes, a response each)
  gives transformers' logits, and the in-process megatron engine's greedy tokens (static KV
  cache, M-RoPE, prompts whose image tokens run past the prefill window) equal transformers'
  generate;
- config errors are one line.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import tiny_qwen  # noqa: E402
from dist_utils import run_distributed  # noqa: E402

TOL = 1e-4
QUESTIONS = ("What is 2+2?", "Hi?")
INSTRUCTION = " Reply <think>..</think>\\boxed{}."
RESPONSES = ([72, 105, 33, 151645], [101, 102])


def _cfg(preset: str, path, *extra: str):
    from megatron_selfjudge.config import load_config

    return load_config(None, [f"model.preset={preset}", f"model.hf_path='{path}'", "model.params_dtype=float32",
                              *extra])


def _images() -> list[Image.Image]:
    """A 168x112 and a 224x224 image: 24 and 64 image tokens."""
    return [tiny_qwen.random_image(0), tiny_qwen.random_image(1).resize((224, 224))]


def _hf_inputs(path: Path, question: str, image: Image.Image) -> dict:
    """transformers' processor on the chat template, with mm_token_type_ids (M-RoPE)."""
    from megatron_selfjudge.data.prompts import build_prompt_text
    from megatron_selfjudge.megatron.models import qwen

    processor = qwen.load_processor(path)
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": build_prompt_text(question, INSTRUCTION)}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out = dict(processor(images=[image], text=[text], return_tensors="pt"))
    out["mm_token_type_ids"] = (out["input_ids"] == 151655).int()
    return out


def test_prompt_ids_match_the_processor(vl_dir, text_dir):
    from megatron_selfjudge.megatron.models.family import build_family
    from megatron_selfjudge.megatron.models import qwen

    family = build_family(_cfg("qwen2.5-vl", vl_dir))
    for question, image in zip(QUESTIONS, _images()):
        images = family.images([image])
        ids = family.expand_images(family.prompt_ids(question, 1, INSTRUCTION), images)
        reference = _hf_inputs(vl_dir, question, image)
        assert ids == reference["input_ids"][0].tolist()
        assert torch.equal(images.rows, reference["pixel_values"].float())
        assert torch.equal(images.grid, reference["image_grid_thw"])
    assert family.image_token_counts(family.images(_images())) == [24, 64]
    none = family.images([])  # an image-free row of a VL batch keeps the PackedImages layout
    assert len(none) == 0 and family.expand_images(family.prompt_ids("Hi?", 0, ""), none).count(151655) == 0
    # One placeholder per image before expansion (what vLLM takes); special-token text stays text.
    raw = family.prompt_ids("a <|im_end|> b", 2, "")
    assert raw.count(151655) == 2 and raw.count(151645) == 2  # only the template's turn ends
    text_family = build_family(_cfg("qwen2.5", text_dir))
    tokenizer = qwen.load_tokenizer(text_dir)
    messages = [{"role": "user", "content": "Add 17 and 25." + INSTRUCTION}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert text_family.prompt_ids("Add 17 and 25.", 0, INSTRUCTION) == list(expected)
    assert text_family.images([]) is None and not text_family.multimodal


def test_config_errors_are_one_line(vl_dir, text_dir, tmp_path):
    from megatron_selfjudge.config import ConfigError
    from megatron_selfjudge.megatron.models.family import build_family

    cases = [(_cfg("qwen2.5-vl", ""), "model.hf_path: model.preset=qwen2.5-vl needs a local HF model folder"),
             (_cfg("qwen2.5-vl", tmp_path / "absent"), "does not exist"),
             (_cfg("qwen2.5-vl", text_dir), "use model.preset=qwen2.5"),
             (_cfg("qwen2.5", vl_dir), "use model.preset=qwen2.5-vl")]
    for cfg, message in cases:
        with pytest.raises(ConfigError, match="model.hf_path") as err:
            build_family(cfg)
        assert message in str(err.value) and "\n" not in str(err.value)


def _forward_and_generate(rank: int, world: int, path: str) -> dict:
    from megatron_selfjudge.data.collate import build_sequences
    from megatron_selfjudge.megatron.batching import PolicyBatch
    from megatron_selfjudge.megatron.forward import model_info
    from megatron_selfjudge.megatron.models.family import build_family
    from megatron_selfjudge.megatron.parallel import initialize_parallel
    from megatron_selfjudge.rollout.base import RolloutRequest, SamplingConfig
    from megatron_selfjudge.rollout.megatron_engine import MegatronRolloutEngine

    initialize_parallel(tp=1, pp=1)
    family = build_family(_cfg("qwen2.5-vl", path))
    module = family.builder()()
    info = model_info(module)
    images = [family.images([img]) for img in _images()]
    prompts = [family.expand_images(family.prompt_ids(q, 1, INSTRUCTION), im) for q, im in zip(QUESTIONS, images)]
    seqs = build_sequences(prompts, [list(r) for r in RESPONSES], family.tokenizer.pad_token_id)
    batch = PolicyBatch.sharing_images(seqs, torch.zeros(2), images)
    module.eval()
    with torch.no_grad():
        logits = family.run(module, batch, info)
    engine = MegatronRolloutEngine(module, family.tokenizer, max_batch_size=4)
    requests = [RolloutRequest(uid=f"r{i}", prompt_ids=p, images=im) for i, (p, im) in enumerate(zip(prompts, images))]
    out = engine.generate(requests, SamplingConfig(n=1, greedy=True, max_new_tokens=6, seed=0))
    return {"tokens": batch.tokens, "logits": logits, "generated": [t.response_ids for t in out],
            "marker": info.image_token_index, "image_seq_len": info.image_seq_len}


def test_forward_and_greedy_generation_match_transformers(vl_dir):
    from transformers import AutoModelForImageTextToText

    from megatron_selfjudge.megatron.models.family import build_family

    got = run_distributed(_forward_and_generate, 1, str(vl_dir), timeout=600)[0]
    assert got["marker"] == 151652 and got["image_seq_len"] == 0
    model = AutoModelForImageTextToText.from_pretrained(str(vl_dir), dtype=torch.float32, local_files_only=True).eval()
    family = build_family(_cfg("qwen2.5-vl", vl_dir))
    assert family.parameter_count() == sum(p.numel() for p in model.parameters())
    worst = 0.0
    for row, (question, image, response) in enumerate(zip(QUESTIONS, _images(), RESPONSES)):
        inputs = _hf_inputs(vl_dir, question, image)
        n_prompt = inputs["input_ids"].shape[1]
        ids = torch.cat([inputs["input_ids"], torch.tensor([response])], dim=1)
        width = ids.shape[1] - 1  # tokens hold the prompt and the response but its last token (labels shift)
        assert got["tokens"][row, :width].tolist() == ids[0, :width].tolist()
        full = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids),
                    mm_token_type_ids=(ids == 151655).int())
        with torch.no_grad():
            reference = model(**full).logits[0]
            generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, n_prompt:].tolist()
        worst = max(worst, (got["logits"][row, :width] - reference[:width]).abs().max().item())
        stop = generated.index(151645) + 1 if 151645 in generated else len(generated)
        assert got["generated"][row] == generated[:stop], (row, got["generated"][row], generated)
    assert worst < TOL, f"max abs logits difference {worst:.3g}"


def test_judge_prompt_goes_through_the_chat_template(vl_dir):
    """The generative Judge's rubric prompt: trainer.encode -> family.prompt_ids + expand_images, as the processor."""
    from types import SimpleNamespace

    from megatron_selfjudge.data.prompts import build_prompt_text  # every family's text: stripped + instruction
    from megatron_selfjudge.judges import GenerativeJudge, JudgePrompt
    from megatron_selfjudge.megatron.models import qwen
    from megatron_selfjudge.megatron.models.family import build_family
    from megatron_selfjudge.rewards.judge import build_judge_prompt
    from megatron_selfjudge.rollout.base import Trajectory
    from megatron_selfjudge.trainer import Trainer

    cfg = _cfg("qwen2.5-vl", vl_dir, "judge.max_prompt_len=4096")
    trainer = SimpleNamespace(cfg=cfg, family=build_family(cfg))
    image = _images()[1]
    images = trainer.family.images([image])

    def encode(text, n, images=None):  # what Trainer.judge_scores hands the Judge
        return Trainer.encode(trainer, text, n, instruction="", limit_key="judge.max_prompt_len", images=images)

    answer = "<think>2+2=4</think>\\boxed{4}"
    trajectory = Trajectory(uid="q", sample_index=0, prompt_ids=[1], response_ids=[2], logprobs=torch.zeros(1),
                            finish_reason="stop", text=answer)
    (request,) = GenerativeJudge(None, encode, samples=1, temperature=1.0, top_p=1.0, max_tokens=8, seed=0).requests(
        [JudgePrompt(uid="q", question=QUESTIONS[0], images=images)], [trajectory])
    processor = qwen.load_processor(vl_dir)
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text",
                                              "text": build_prompt_text(build_judge_prompt(QUESTIONS[0], answer), "")}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    assert request.prompt_ids == processor(images=[image], text=[text], return_tensors="pt")["input_ids"][0].tolist()
    assert request.images is images
