import importlib.util

import pytest
import torch

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
