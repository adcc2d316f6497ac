"""The tests' access to the tiny HF Qwen folders: the package's builder (megatron/models/tiny_hf.py)."""
from megatron_selfjudge.megatron.models.tiny_hf import *  # noqa: F401,F403
from megatron_selfjudge.megatron.models.tiny_hf import (  # noqa: F401  (names `import *` would skip)
    CHAT_TEMPLATE, FIRST_SPECIAL_ID, IMAGE_SIZE, SPECIAL_TOKENS, VOCAB_SIZE, build_tokenizer,
    make_tiny_qwen2_5, make_tiny_qwen2_5_vl, random_image, test_image,
)
