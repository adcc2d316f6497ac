"""Refusals and fallbacks of runtime/run_state.py on hand-made inputs (no model is built)."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_selfjudge.config import load_config, to_yaml
from megatron_selfjudge.runtime.run_state import (CheckpointDamaged, RunStateError, check_config_drift,
                                                  load_newest_intact, require_initial_copy)


def _loader(damaged: set[str]):
    calls = []

    def load(path: Path) -> dict:
        calls.append(path.name)
        if path.name in damaged:
            raise CheckpointDamaged(f"checkpoint file {path}/dist/__0_0.distcp is missing")
        return {"step": int(path.name.split("_")[1])}
    return load, calls


def test_newest_intact_skips_damaged_ones_and_says_so(tmp_path):
    cands = [tmp_path / "step_00000006", tmp_path / "step_00000004", tmp_path / "step_00000002"]
    load, calls = _loader({"step_00000006", "step_00000004"})
    warnings = []
    path, state = load_newest_intact(cands, load, warnings.append, True, tmp_path)
    assert path.name == "step_00000002" and state == {"step": 2}
    assert calls == ["step_00000006", "step_00000004", "step_00000002"]
    assert len(warnings) == 2 and "step_00000006 is damaged" in warnings[0] and "next older" in warnings[0]


def test_all_damaged_is_refused_not_restarted(tmp_path):
    cands = [tmp_path / "step_00000004", tmp_path / "step_00000002"]
    load, _ = _loader({"step_00000004", "step_00000002"})
    with pytest.raises(RunStateError) as info:
        load_newest_intact(cands, load, lambda _: None, True, tmp_path)
    message = str(info.value)
    assert "none can be resumed" in message and "step_00000002" in message and "trainer.resume=never" in message
    # Only partial step folders: still a sign of an earlier run, still refused.
    with pytest.raises(RunStateError, match="no complete step checkpoint"):
        load_newest_intact([], load, lambda _: None, True, tmp_path)
    # A folder without checkpoints is a fresh run.
    assert load_newest_intact([], load, lambda _: None, False, tmp_path) is None


def test_other_load_errors_are_not_taken_for_damage(tmp_path):
    def load(path: Path) -> dict:
        raise ValueError("checkpoint does not match the model at 'decoder.x'")

    with pytest.raises(ValueError, match="does not match the model"):
        load_newest_intact([tmp_path / "step_00000002"], load, lambda _: None, True, tmp_path)


def test_initial_copy_missing_or_incomplete_names_it(tmp_path):
    with pytest.raises(RunStateError, match=r"initial is missing.*reference model and the Judge"):
        require_initial_copy(tmp_path / "initial", 7, None)
    (tmp_path / "initial").mkdir()
    with pytest.raises(RunStateError, match="initial holds no complete checkpoint"):
        require_initial_copy(tmp_path / "initial", 7, None)
    found = tmp_path / "initial" / "step_00000000"
    assert require_initial_copy(tmp_path / "initial", 7, found) == found


def test_config_drift_refused_unless_allowed(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(load_config(None, [])))
    before = saved.read_text()
    changed = load_config(None, ["reward.mode=majority"])
    with pytest.raises(RunStateError) as info:
        check_config_drift(saved, changed, [])
    message = str(info.value)
    assert "reward.mode: 'judge' -> 'majority'" in message and "allow_config_change=[reward.mode]" in message
    assert saved.read_text() == before
    assert check_config_drift(saved, changed, ["reward.mode"]) == ["reward.mode"]
    # No saved file: nothing to compare (a fresh run directory).
    assert check_config_drift(tmp_path / "absent.yaml", changed, []) == []


def test_damaged_saved_config_is_a_one_line_refusal(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_bytes(b"\xff\xfe: [unclosed")
    with pytest.raises(RunStateError, match="cannot compare with the saved config") as info:
        check_config_drift(saved, load_config(None, []), [])
    assert "\n" not in str(info.value)
