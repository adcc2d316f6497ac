import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "megatron"))  # tiny_qwen, dist_utils

# Multi-process tests of megatron-core run on CPU under gloo through megatron/cpu.py, which is
# inactive when CUDA is present; on a GPU machine only their `gpu`-marked versions run.
_CPU_GLOO_SUITES = ("tests/megatron/", "tests/rollout/", "tests/test_trainer.py")

collect_ignore_glob = []
if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
    collect_ignore_glob = ["megatron/*", "rollout/*", "test_trainer.py"]


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
        return
    skip_cpu = pytest.mark.skip(reason="CPU/gloo test of megatron-core; runs on machines without CUDA")
    for item in items:
        path = item.nodeid.replace("\\", "/")
        if "gpu" not in item.keywords and any(path.startswith(s) or ("/" + s) in path for s in _CPU_GLOO_SUITES):
            item.add_marker(skip_cpu)


# One tiny random HF folder of each kind per session, shared by the Qwen tests (model, family, vLLM,
# trainer): read-only for every test. Made by `selfjudge convert tiny-qwen`, which this also tests.
@pytest.fixture(scope="session")
def vl_dir(tmp_path_factory) -> Path:
    """The tiny Qwen2.5-VL folder (seed 0), the `model.hf_path` of examples/tiny_qwen2_5_vl_cpu.yaml."""
    import tiny_qwen  # transformers: imported only by the sessions that use the folder

    return tiny_qwen.convert_tiny_qwen(tmp_path_factory.mktemp("hf") / "tiny_qwen2_5_vl")


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """The tiny Qwen2.5 text folder (seed 0, tied embeddings)."""
    import tiny_qwen

    return tiny_qwen.convert_tiny_qwen(tmp_path_factory.mktemp("hf") / "tiny_qwen2_5", "--text")
