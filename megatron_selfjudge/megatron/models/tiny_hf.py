"""Tiny random HF Qwen2.5-VL and Qwen2.5 text checkpoints, built from configs (no hub access).

Used by the tests and by `selfjudge convert tiny-qwen OUT [--text]`, which writes such a folder
for `model.hf_path` (examples/tiny_qwen2_5_vl_cpu.yaml trains one on CPU in seconds per step).

They keep what real checkpoints share and the bridge relies on: the real special-token ids
(151643 `<|endoftext|>` ... 151655 `<|image_pad|>`, 151656 `<|video_pad|>`; mbridge hard-codes
some of them), head_dim 32 (vLLM's CPU attention rejects 16), a byte-level BPE tokenizer whose
vocab is padded with filler tokens up to those ids, grouped-query attention, and for the VL model
a vision tower with window attention (two windows on a 168x112 image) plus one full-attention
block. Everything is written with `save_pretrained` into a folder, as a downloaded model would be.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

FIRST_SPECIAL_ID = 151643
# The Qwen2 / Qwen2.5-VL added tokens in id order, starting at FIRST_SPECIAL_ID.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
VOCAB_SIZE = 151680  # covers the special ids; divisible by 2 (TP=2) like the real 152064
IMAGE_SIZE = (168, 112)  # width, height: 12x8 patches of 14 -> 96 patches, 24 image tokens
# A Qwen-style chat template (system turn by default, image placeholders inside user turns).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_level_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def build_tokenizer():
    """A Qwen2Tokenizer: 256 byte symbols, a few merges, filler ids, then the real special tokens.

    EOS is `<|im_end|>` and padding `<|endoftext|>`, as in the Qwen2.5(-VL) Instruct tokenizers.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    alphabet = _byte_level_alphabet()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    for i in range(len(vocab), FIRST_SPECIAL_ID):
        vocab[f"<filler_{i}>"] = i
    # Qwen2Tokenizer's defaults make <|endoftext|> (id FIRST_SPECIAL_ID) EOS and padding.
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, errors="replace", model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in SPECIAL_TOKENS[1:]]})
    for i, token in enumerate(SPECIAL_TOKENS):
        got = tokenizer.convert_tokens_to_ids(token)
        if got != FIRST_SPECIAL_ID + i:
            raise AssertionError(f"{token} got id {got}, expected {FIRST_SPECIAL_ID + i}")
    # The Instruct checkpoints' choice: the end of a turn ends generation; <|endoftext|> still pads.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _text_kwargs() -> dict:
    return dict(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
                bos_token_id=FIRST_SPECIAL_ID, eos_token_id=FIRST_SPECIAL_ID + 2,
                pad_token_id=FIRST_SPECIAL_ID)


def _seeded_init(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter (norms too) so no tensor is the trivial all-ones/zeros init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:  # RMSNorm weights near 1 keep activations in range
                p.add_(1.0)


def make_tiny_qwen2_5(path: Path, seed: int = 0, tie_word_embeddings: bool = True) -> Path:
    """Write a tiny random Qwen2 (Qwen2.5 architecture) text checkpoint + tokenizer into `path`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    config = Qwen2Config(**_text_kwargs(), tie_word_embeddings=tie_word_embeddings, dtype="float32")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    _seeded_init(model, seed)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def make_tiny_qwen2_5_vl(path: Path, seed: int = 0, tie_word_embeddings: bool = False) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint + tokenizer + image processor into `path`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    text = _text_kwargs()
    text["rope_scaling"] = {"type": "mrope", "rope_type": "default", "mrope_section": [4, 6, 6]}
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, in_channels=3,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2,
                  window_size=112, out_hidden_size=text["hidden_size"], fullatt_block_indexes=[1],
                  hidden_act="silu")
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings,
                              image_token_id=FIRST_SPECIAL_ID + 12, video_token_id=FIRST_SPECIAL_ID + 13,
                              vision_start_token_id=FIRST_SPECIAL_ID + 9, vision_end_token_id=FIRST_SPECIAL_ID + 10,
                              dtype="float32")
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    _seeded_init(model, seed)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2).save_pretrained(path)
    return path


def random_image(seed: int = 0) -> Image.Image:
    """A deterministic random RGB image of IMAGE_SIZE."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8), "RGB")


# The tests' historical name (pytest does not collect it from a package module).
test_image = random_image
