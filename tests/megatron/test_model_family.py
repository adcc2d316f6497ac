"""The model-family interface is real: a family written here, not shipped, trains end to end.

`ByteGPTFamily` has its own tokenizer (UTF-8 bytes), its own prompt format and its own module
builder; registering it is all it takes for `selfjudge train model.preset=test-byte-gpt` to use
it through the trainer, the rollout engine, forward and the update, none of which knows it.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import run_distributed  # noqa: E402

from megatron_selfjudge.megatron.models.family import ModelFamily, ModelInfo  # noqa: E402


class ByteTokenizer:
    """UTF-8 bytes 0..255, then pad, bos, eos."""

    pad_token_id, bos_token_id, eos_token_id = 256, 257, 258
    vocab_size = 260  # one spare id keeps the vocabulary even

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class ByteGPTFamily(ModelFamily):
    name = "test-byte-gpt"
    multimodal = False
    calls: dict = {"prompt_ids": 0, "run": 0, "describe": 0}

    def __init__(self, cfg):
        super().__init__(cfg)
        self._tokenizer = ByteTokenizer()

    @property
    def tokenizer(self):
        return self._tokenizer

    def prompt_ids(self, question: str, num_images: int, instruction: str) -> list[int]:
        type(self).calls["prompt_ids"] += 1
        return [ByteTokenizer.bos_token_id] + self._tokenizer.encode(f"Q: {question} {instruction}\nA: ")

    def module_builder(self):
        from megatron.core import parallel_state

        from megatron_selfjudge.megatron.models.builders import build_gpt

        r = self.cfg.rollout
        return functools.partial(build_gpt, vocab_size=ByteTokenizer.vocab_size, num_layers=1, hidden_size=32,
                                 num_attention_heads=2, ffn_hidden_size=64,
                                 max_seq_len=r.max_prompt_len + r.max_response_len,
                                 pre_process=parallel_state.is_pipeline_first_stage(),
                                 post_process=parallel_state.is_pipeline_last_stage(),
                                 seed=self.cfg.trainer.seed)

    @classmethod
    def describe(cls, bare):
        cls.calls["describe"] += 1
        param = next(bare.parameters())
        return ModelInfo(family=cls, multimodal=False, image_token_index=-1, image_seq_len=0, max_seq_len=None,
                         pipeline_parallel=False, device=param.device, dtype=param.dtype)

    @classmethod
    def run(cls, model, micro, info):
        cls.calls["run"] += 1
        positions = torch.arange(micro.tokens.shape[1], device=info.device).expand_as(micro.tokens)
        return model(micro.tokens, positions, None)


def _train_with_test_family(rank: int, world: int, run_dir: str) -> dict:
    from megatron_selfjudge import trainer
    from megatron_selfjudge.config import load_config
    from megatron_selfjudge.megatron.models.family import register_family
    from megatron_selfjudge.metrics import read_metrics

    register_family(ByteGPTFamily)
    cfg = load_config(None, [
        "model.preset=test-byte-gpt", "trainer.sft_steps=2", "optim.sft_warmup_steps=0", "trainer.max_steps=2", "trainer.prompts_per_step=2",
        "trainer.mini_batch_prompts=2", "rollout.n=2", "rollout.max_response_len=8", "rollout.max_prompt_len=160",
        "data.synthetic_sft=8", "data.synthetic_unlabeled=8", "data.synthetic_test=2", f"trainer.run_dir={run_dir}",
        "reward.mode=majority"])
    code = trainer.main(cfg)
    return {"code": code, "calls": dict(ByteGPTFamily.calls), "steps": read_metrics(Path(run_dir))}


@pytest.mark.slow
def test_a_family_defined_in_a_test_trains_without_touching_the_pipeline(tmp_path):
    [out] = run_distributed(_train_with_test_family, 1, str(tmp_path / "run"), timeout=600)
    assert out["code"] == 0
    assert [row["step"] for row in out["steps"]] == [1, 2]
    assert all(row["rollouts_per_rank"] == 4 for row in out["steps"])  # 2 prompts x 2 samples
    # Its prompt format, module description and forward were the ones used.
    assert out["calls"]["prompt_ids"] > 0 and out["calls"]["describe"] > 0 and out["calls"]["run"] > 0


def test_unknown_family_and_duplicate_names_are_refused():
    from megatron_selfjudge.config import ConfigError, load_config
    from megatron_selfjudge.megatron.models import family

    with pytest.raises(ConfigError, match="model.preset='nope' is not one of .*tiny-gpt"):
        load_config(None, ["model.preset=nope"])
    with pytest.raises(ValueError, match="already registered"):
        family.register_family(type("Dup", (ByteGPTFamily,), {"name": "tiny-gpt"}))
    family.register_family(ByteGPTFamily)
    try:
        assert "test-byte-gpt" in family.family_names()
        assert load_config(None, ["model.preset=test-byte-gpt"]).model.preset == "test-byte-gpt"
    finally:
        family.unregister_family("test-byte-gpt")
    assert "test-byte-gpt" not in family.family_names()
