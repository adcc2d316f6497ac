"""The backend-neutral rollout contract: config validation, request checks, the backend registry."""
from __future__ import annotations

import sys

import pytest
import torch

from megatron_selfjudge.rollout import base
from megatron_selfjudge.rollout.base import (
    RolloutEngine,
    RolloutRequest,
    SamplingConfig,
    Trajectory,
    available_engines,
    build_engine,
    check_requests,
    default_stop_ids,
    register_engine,
)


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 1.5), ("n", True),
    ("temperature", 0.0), ("temperature", -1.0), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5),
    ("max_new_tokens", 0), ("max_new_tokens", 2.0),
    ("stop_token_ids", (1, -2)), ("stop_token_ids", ("a",)),
    ("seed", -1), ("seed", 0.5),
])
def test_sampling_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


def test_sampling_config_greedy_must_be_bool_and_stop_ids_become_a_tuple():
    with pytest.raises(TypeError, match="greedy"):
        SamplingConfig(greedy=1)
    cfg = SamplingConfig(stop_token_ids=[5, 7])
    assert cfg.stop_token_ids == (5, 7)
    assert hash(cfg) == hash(SamplingConfig(stop_token_ids=(5, 7)))  # frozen: usable as a key


def test_rollout_request_validation():
    with pytest.raises(ValueError, match="uid"):
        RolloutRequest("", [1, 2])
    with pytest.raises(ValueError, match="empty"):
        RolloutRequest("a", [])
    with pytest.raises(ValueError, match="ints"):
        RolloutRequest("a", [1, 2.5])
    req = RolloutRequest("a", torch.tensor([4, 5, -200]))
    assert req.prompt_ids == [4, 5, -200] and all(type(t) is int for t in req.prompt_ids)
    with pytest.raises(ValueError, match="1-D"):
        RolloutRequest("a", torch.ones(2, 2, dtype=torch.long))


def test_check_requests_rejects_duplicate_uids_and_wrong_types():
    a, b = RolloutRequest("a", [1]), RolloutRequest("b", [2])
    check_requests([a, b])
    with pytest.raises(ValueError, match="'a' appears twice"):
        check_requests([a, b, RolloutRequest("a", [3])])
    with pytest.raises(ValueError, match="empty"):
        check_requests([])
    with pytest.raises(TypeError, match=r"requests\[1\]"):
        check_requests([a, "b"])
    with pytest.raises(TypeError):
        check_requests(a)


def test_trajectory_checks_logprob_shape_dtype_and_finish_reason():
    ok = dict(uid="a", sample_index=0, prompt_ids=[1], response_ids=[3, 4],
              logprobs=torch.zeros(2), finish_reason="stop", text="x")
    Trajectory(**ok)
    with pytest.raises(ValueError, match="finish_reason"):
        Trajectory(**{**ok, "finish_reason": "eos"})
    with pytest.raises(ValueError, match="logprobs"):
        Trajectory(**{**ok, "logprobs": torch.zeros(3)})
    with pytest.raises(ValueError, match="logprobs"):
        Trajectory(**{**ok, "logprobs": torch.zeros(2, dtype=torch.float64)})


def test_default_stop_ids_adds_the_tokenizer_eos_once():
    class Tok:
        eos_token_id = 2

    assert default_stop_ids(Tok(), SamplingConfig(stop_token_ids=(9,))) == (9, 2)
    assert default_stop_ids(Tok(), SamplingConfig(stop_token_ids=(2, 9))) == (2, 9)
    assert default_stop_ids(None, SamplingConfig(stop_token_ids=(9,))) == (9,)


def test_build_engine_unknown_name_lists_known_backends():
    with pytest.raises(ValueError, match=r"unknown backend 'sglang'.*'megatron', 'vllm'"):
        build_engine("sglang")


def test_builtin_backends_are_imported_lazily():
    # Choosing the backend by name is what imports it: the interface itself never pulls it in.
    assert base._BUILTIN_ENGINES["megatron"].startswith("megatron_selfjudge.rollout.megatron_engine:")
    assert "megatron" in available_engines()


class _EchoEngine(RolloutEngine):
    """A minimal backend: repeats the prompt; proves the registry and the ABC wiring."""

    def __init__(self, suffix: int):
        self.suffix = suffix
        self.loaded = []

    def generate(self, requests, sampling):
        check_requests(requests)
        return [Trajectory(r.uid, s, r.prompt_ids, [*r.prompt_ids, self.suffix],
                           torch.zeros(len(r.prompt_ids) + 1), "length", "")
                for r in requests for s in range(sampling.n)]

    def _load_weights(self, named_tensors):
        self.loaded = list(named_tensors)
        return sum(t.numel() * t.element_size() for _, t in self.loaded)


def test_register_engine_then_build_by_name(monkeypatch):
    monkeypatch.setattr(base, "_REGISTERED_ENGINES", {})
    register_engine("echo", _EchoEngine)
    engine = build_engine("echo", suffix=7)
    out = engine.generate([RolloutRequest("a", [1, 2])], SamplingConfig(n=2))
    assert [t.sample_index for t in out] == [0, 1] and out[0].response_ids == [1, 2, 7]
    assert "echo" in available_engines()
    with pytest.raises(ValueError, match="already registered"):
        register_engine("echo", _EchoEngine)
    with pytest.raises(ValueError, match="already registered"):
        register_engine("megatron", _EchoEngine)


def test_engine_abc_requires_generate():
    class Half(RolloutEngine):
        pass

    with pytest.raises(TypeError):
        Half()


def test_weight_versions_sleep_and_close():
    from megatron_selfjudge.rollout.base import EngineStateError
    from megatron_selfjudge.rollout.weight_sync import WeightSync

    engine = _EchoEngine(3)
    tensors = [("model.embed_tokens.weight", torch.ones(4, 2)), ("lm_head.weight", torch.ones(4, 2))]
    sync = WeightSync(engine, export=lambda: iter(tensors))
    assert engine.weights_version == 0
    sync.ensure_current(0)
    with pytest.raises(EngineStateError, match="version 0, the policy is at 1"):  # stale weights refused
        sync.ensure_current(1)
    report = sync.push(1)
    assert report["weight_sync_bytes"] == 64.0 and report["time_weight_sync"] >= 0
    assert [name for name, _ in engine.loaded] == ["model.embed_tokens.weight", "lm_head.weight"]
    sync.ensure_current(1)
    with pytest.raises(ValueError, match="older than the loaded 1"):
        engine.update_weights(tensors, 0)
    with pytest.raises(ValueError, match="holds its own weights"):
        engine.update_weights(None, 2)
    engine.sleep()
    with pytest.raises(EngineStateError, match="asleep"):
        sync.ensure_current(1)
    engine.wake_up()
    sync.ensure_current(1)
    engine.close()
    with pytest.raises(EngineStateError, match="closed"):
        engine.update_weights(tensors, 2)
    with pytest.raises(ValueError, match="needs an exporter"):
        WeightSync(_EchoEngine(1))


def test_importing_the_interface_does_not_import_megatron():
    import subprocess

    code = ("import sys, megatron_selfjudge.rollout.base as b; "
            "print(any(m.startswith('megatron.core') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
