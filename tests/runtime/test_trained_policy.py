"""runtime/trained_policy.locate: which checkpoint folders name a policy, and their run's config."""
from pathlib import Path

import pytest

from megatron_selfjudge.megatron.checkpoint import DIST_DIR, META_FILE, TRAINER_STATE_FILE
from megatron_selfjudge.runtime.trained_policy import PolicyLoadError, locate


def _step(folder: Path) -> Path:
    for name in (META_FILE, TRAINER_STATE_FILE, f"{DIST_DIR}/metadata.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    return folder


@pytest.fixture
def run(tmp_path) -> Path:
    (tmp_path / "config.yaml").write_text("{}\n")
    _step(tmp_path / "checkpoints" / "step_00000025")
    _step(tmp_path / "checkpoints" / "step_00000050")
    _step(tmp_path / "checkpoints" / "initial" / "step_00000000")
    return tmp_path


def test_run_directory_and_its_checkpoints_root(run):
    for where in (locate(run), locate(run / "checkpoints")):
        assert where.config_file == run / "config.yaml"
        assert [p.name for p in where.candidates] == ["step_00000050", "step_00000025"]


def test_one_step_folder(run):
    where = locate(run / "checkpoints" / "step_00000025")
    assert where.config_file == run / "config.yaml" and where.candidates == [run / "checkpoints" / "step_00000025"]


def test_the_warm_start_the_frozen_judge_is(run):
    for path in (run / "checkpoints" / "initial", run / "checkpoints" / "initial" / "step_00000000"):
        where = locate(path)
        assert where.config_file == run / "config.yaml"
        assert where.candidates == [run / "checkpoints" / "initial" / "step_00000000"]


def test_refusals_name_the_path(run, tmp_path):
    with pytest.raises(PolicyLoadError, match="does not exist"):
        locate(tmp_path / "nope")
    empty = tmp_path / "elsewhere" / "deeper"
    empty.mkdir(parents=True)
    with pytest.raises(PolicyLoadError, match="is not a run directory"):
        locate(empty)
    with pytest.raises(PolicyLoadError, match="holds no complete step checkpoint"):
        locate(tmp_path / "elsewhere")  # a folder of a run directory that holds no checkpoint
