"""The tests' access to the tiny HF Qwen folders: the package's builder (megatron/models/tiny_hf.py).

tests/conftest.py makes one of each per session (`vl_dir`, `text_dir`), with `selfjudge convert
tiny-qwen` as a user runs it; every test reads them and none writes into them.
"""
import os
import subprocess
import sys
from pathlib import Path

from megatron_selfjudge.megatron.models.tiny_hf import *  # noqa: F401,F403
from megatron_selfjudge.megatron.models.tiny_hf import (  # noqa: F401  (names `import *` would skip)
    CHAT_TEMPLATE, FIRST_SPECIAL_ID, IMAGE_SIZE, SPECIAL_TOKENS, VOCAB_SIZE, build_tokenizer,
    make_tiny_qwen2_5, make_tiny_qwen2_5_vl, random_image, test_image,
)
from megatron_selfjudge.runtime.setup import without_launch_env

ROOT = Path(__file__).resolve().parents[2]


def convert_tiny_qwen(out: Path, *flags: str) -> Path:
    """`selfjudge convert tiny-qwen OUT [--text]` in a child process (no rendezvous variables); returns OUT."""
    env = dict(without_launch_env(os.environ), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_selfjudge.cli", "convert", "tiny-qwen", str(out), *flags],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == f"wrote {out}", proc.stdout
    return out
