"""Process set-up: a one-process run invents its rendezvous and takes it away again."""
from __future__ import annotations

import os
import sys

import pytest

from megatron_selfjudge.runtime.setup import setup_distributed, teardown_distributed

RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_one_process_rendezvous_is_removed_on_teardown(monkeypatch):
    for key in RANK_VARS:
        monkeypatch.delenv(key, raising=False)
    created = setup_distributed(1, 1, seed=0)
    try:
        assert created and os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_PORT"]
    finally:
        teardown_distributed(created)
    # A child started afterwards (e.g. a `selfjudge compare` run) must not inherit a port.
    assert not [k for k in RANK_VARS if k in os.environ]


def test_one_process_group_takes_another_port_when_its_first_is_taken(monkeypatch):
    import socket

    from megatron_selfjudge.runtime import setup

    for key in RANK_VARS:
        monkeypatch.delenv(key, raising=False)
    # Another job binds the port between the pick and the bind: the first pick is that port.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        picks = iter([taken.getsockname()[1]])
        real_free_port = setup.free_port
        monkeypatch.setattr(setup, "free_port", lambda: next(picks, None) or real_free_port())
        created = setup_distributed(1, 1, seed=0)
        try:
            assert created and os.environ["MASTER_PORT"] != str(taken.getsockname()[1])
        finally:
            teardown_distributed(created)
        # Every pick taken: the last EADDRINUSE is raised, nothing is left behind.
        monkeypatch.setattr(setup, "free_port", lambda: taken.getsockname()[1])
        import torch.distributed as dist

        with pytest.raises(dist.DistNetworkError, match="EADDRINUSE"):
            setup_distributed(1, 1, seed=0)
        assert not dist.is_initialized() and not [k for k in RANK_VARS if k in os.environ]


def test_compare_runs_do_not_inherit_a_rendezvous(monkeypatch, tmp_path):
    from megatron_selfjudge.compare import run_subprocess

    monkeypatch.setenv("MASTER_PORT", "48739")
    monkeypatch.setenv("WORLD_SIZE", "1")
    log = tmp_path / "child.log"
    code = "import os; print(os.environ.get('MASTER_PORT'), os.environ.get('WORLD_SIZE'), os.environ.get('PATH') is not None)"
    assert run_subprocess([sys.executable, "-c", code], log) == 0
    assert log.read_text().split() == ["None", "None", "True"]


def _clear_rendezvous(monkeypatch) -> None:
    for key in RANK_VARS:
        monkeypatch.delenv(key, raising=False)


def _left_behind() -> list[str]:
    return [k for k in RANK_VARS if k in os.environ]


def test_convert_leaves_no_rendezvous(monkeypatch, tmp_path):
    """Both in-process conversions (as `selfjudge compare`/tests call them) take their one-rank group down."""
    pytest.importorskip("mbridge")
    from megatron_selfjudge.megatron.models import convert

    _clear_rendezvous(monkeypatch)
    src = convert.tiny_qwen(tmp_path / "src", text=True)
    assert _left_behind() == []  # writing the folder needs no process group
    convert.hf_to_megatron(src, tmp_path / "ckpt")
    assert _left_behind() == []
    convert.megatron_to_hf(tmp_path / "ckpt", tmp_path / "back")
    assert _left_behind() == [] and (tmp_path / "back" / "model.safetensors").is_file()


def test_rollout_bench_leaves_no_rendezvous_even_when_it_fails(monkeypatch):
    """`selfjudge bench rollout` holds a one-rank group while it times the engines and removes it after."""
    pytest.importorskip("mbridge")
    from megatron_selfjudge.rollout import bench

    _clear_rendezvous(monkeypatch)
    seen = {}

    def stop(engine, requests, sampling):  # the first timing: the group is up; end the bench here
        seen.update({k: os.environ.get(k) for k in RANK_VARS})
        engine.close()
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(bench, "_timed_generate", stop)
    with pytest.raises(RuntimeError, match="stopped by the test"):
        bench.run(bench._parser().parse_args(["--text", "--prompts", "1", "--samples", "1", "--max-new-tokens", "1"]))
    assert seen["WORLD_SIZE"] == "1" and seen["MASTER_PORT"]
    assert _left_behind() == []


def test_trained_policy_single_process_leaves_no_rendezvous(monkeypatch):
    from megatron_selfjudge.runtime.trained_policy import single_process

    _clear_rendezvous(monkeypatch)
    with single_process(seed=0):
        assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_PORT"]
    assert _left_behind() == []


def test_one_process_commands_refuse_torchrun_in_one_line(monkeypatch, tmp_path):
    from megatron_selfjudge.megatron.models import convert
    from megatron_selfjudge.rollout import bench
    from megatron_selfjudge.runtime.trained_policy import PolicyLoadError, single_process

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PolicyLoadError, match="runs in one process, but WORLD_SIZE=2"):
        with single_process(seed=0):
            pass
    with pytest.raises(convert.ConvertError, match="selfjudge convert runs in one process, but WORLD_SIZE=2"):
        with convert._one_process():
            pass
    with pytest.raises(SystemExit) as exc:
        bench.main(["--text", "--out", str(tmp_path)])
    assert exc.value.code == 2


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
