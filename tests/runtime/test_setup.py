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


def test_compare_runs_do_not_inherit_a_rendezvous(monkeypatch, tmp_path):
    from megatron_selfjudge.compare import run_subprocess

    monkeypatch.setenv("MASTER_PORT", "48739")
    monkeypatch.setenv("WORLD_SIZE", "1")
    log = tmp_path / "child.log"
    code = "import os; print(os.environ.get('MASTER_PORT'), os.environ.get('WORLD_SIZE'), os.environ.get('PATH') is not None)"
    assert run_subprocess([sys.executable, "-c", code], log) == 0
    assert log.read_text().split() == ["None", "None", "True"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
