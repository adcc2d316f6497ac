"""`selfjudge eval` and evaluation during training, on fixture benchmarks and the embedded tiny policy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import bench_fixtures as F  # noqa: E402

from megatron_selfjudge.config import ConfigError, load_config  # noqa: E402
from megatron_selfjudge.eval import run as eval_run  # noqa: E402
from megatron_selfjudge.metrics import read_metrics  # noqa: E402

BENCHES = ("mathvision", "mathverse", "wemath", "logicvista", "dynamath", "mathvista")
# Graded and skipped rows of each fixture benchmark, from the fixture files (bench_fixtures.py):
# MathVision: 5 rows, one with a gold letter outside its options (at load), one undecodable
# image (at generation); LogicVista: 4 items, one with a non-letter answer; MathVista: 4 rows,
# one whose answer is no choice; the others have no broken row.
EXPECTED = {"mathvision": (3, 2), "mathverse": (10, 0), "wemath": (16, 0), "logicvista": (3, 1), "dynamath": (9, 0),
            "mathvista": (3, 1)}
TINY = ["trainer.sft_steps=0", "trainer.max_steps=2", "trainer.save_every=0", "trainer.prompts_per_step=4",
        "trainer.mini_batch_prompts=2", "rollout.n=2", "rollout.max_response_len=16", "data.synthetic_sft=32",
        "data.synthetic_unlabeled=64", "data.synthetic_test=4", "model.num_layers=1",
        "rollout.max_prompt_len=192"]  # the benchmarks' prompts are longer than the synthetic task's
TIMEOUT = 600


def fixture_root(root: Path) -> Path:
    F.mathvision_hub(root)
    F.mathverse_hub(root)
    F.wemath_tsv(root)  # the VLMEvalKit layout for one benchmark
    F.logicvista_json(root)
    F.dynamath_hub(root)
    F.mathvista_hub(root)
    return root


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_selfjudge.cli", *args], env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)


# ---------------------------------------------------------------- arguments and config

@pytest.mark.parametrize("args,message", [
    (["--benchmarks", "mathvision", "--data", "."], "required: --checkpoint"),
    (["--checkpoint", ".", "--benchmarks", "mathvison", "--data", "."], "--benchmarks: unknown mathvison"),
    (["--checkpoint", ".", "--benchmarks", "wemath,wemath", "--data", "."], "named twice"),
    (["--checkpoint", ".", "--benchmarks", "wemath", "--data", "/no/such/dir"], "--data /no/such/dir: not a folder"),
    (["--checkpoint", ".", "--benchmarks", "wemath", "--data", ".", "--limit", "0"], "--limit must be >= 1"),
    (["--checkpoint", ".", "--benchmarks", "wemath", "--data", ".", "--n", "0"], "--n must be >= 1"),
    (["--checkpoint", ".", "--benchmarks", "wemath", "--data", ".", "--temperature", "nan"], "--temperature"),
    (["--checkpoint", ".", "--benchmarks", "wemath", "--data", ".", "--instruction", "loud"], "--instruction"),
    (["--checkpoint", "/no/such", "--benchmarks", "wemath", "--data", "."], "checkpoint /no/such does not exist"),
    (["--checkpoint", "{tmp}", "--benchmarks", "wemath", "--data", "."], "is not a run directory"),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys, args, message):
    code = eval_run.main([a.replace("{tmp}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_hf_folder_no_family_accepts_is_one_line(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    code = eval_run.main(["--checkpoint", str(tmp_path / "hf"), "--benchmarks", "wemath", "--data", str(tmp_path),
                          "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "no model family loads this HF folder" in err and err.count("\n") == 1, err


def test_eval_during_training_config_is_checked():
    with pytest.raises(ConfigError, match="trainer.eval_benchmarks"):
        load_config(None, ["trainer.eval_every=5"])
    with pytest.raises(ConfigError, match="trainer.eval_benchmarks"):
        load_config(None, ["trainer.eval_every=5", "trainer.eval_benchmarks=[mathvison]", "trainer.eval_data=x"])
    with pytest.raises(ConfigError, match="trainer.eval_data"):
        load_config(None, ["trainer.eval_every=5", "trainer.eval_benchmarks=[wemath]"])
    with pytest.raises(ConfigError, match="trainer.eval_every"):
        load_config(None, ["trainer.eval_every=-1"])
    cfg = load_config(None, ["trainer.eval_every=5", "trainer.eval_benchmarks=[wemath,dynamath]",
                             "trainer.eval_data=x", "trainer.eval_limit=10"])
    assert cfg.trainer.eval_benchmarks == ["wemath", "dynamath"] and cfg.trainer.eval_every == 5


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """Two UPT steps of the tiny default with every benchmark evaluated at each step."""
    tmp = tmp_path_factory.mktemp("evalrun")
    data, run_dir = fixture_root(tmp / "data"), tmp / "run"
    proc = _cli("train", *TINY, f"trainer.run_dir={run_dir}", "trainer.eval_every=1",
                f"trainer.eval_benchmarks=[{','.join(BENCHES)}]", f"trainer.eval_data={data}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir, data


@pytest.mark.slow
def test_training_logs_accuracy_per_checkpoint(trained):
    run_dir, _ = trained
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for bench in BENCHES:
            assert 0.0 <= row[eval_run.metric_key(bench)] <= 1.0
        assert "reward_mean" in row  # the step's own metrics are on the same line
    for step in (1, 2):
        folder = run_dir / "eval" / f"step_{step:08d}"
        for bench, (graded, skipped) in EXPECTED.items():
            doc = json.loads((folder / f"{bench}.json").read_text())
            assert (doc["graded"], doc["skipped"], doc["step"]) == (graded, skipped, step), bench
            lines = (folder / f"{bench}.predictions.jsonl").read_text().splitlines()
            assert len(lines) == graded
            assert doc["accuracy"] == sum(json.loads(ln)["correct"] for ln in lines) / graded
            assert rows[step - 1][eval_run.metric_key(bench)] == doc["accuracy"]


@pytest.mark.slow
def test_eval_cli_on_the_checkpoint_matches_training_eval(trained, tmp_path):
    """`selfjudge eval` of the saved step-2 checkpoint greedily writes what the trainer's eval at step 2 wrote."""
    run_dir, data = trained
    out = tmp_path / "out"
    proc = _cli("eval", "--checkpoint", str(run_dir), "--benchmarks", ",".join(BENCHES), "--data", str(data),
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = (out / "report.md").read_text()
    for bench, (graded, skipped) in EXPECTED.items():
        doc = json.loads((out / f"{bench}.json").read_text())
        assert (doc["graded"], doc["skipped"], doc["step"]) == (graded, skipped, 2), bench
        assert len(doc["skipped_rows"]) == skipped and all("row" in r and r["file"] for r in doc["skipped_rows"])
        mine = [json.loads(ln) for ln in (out / f"{bench}.predictions.jsonl").read_text().splitlines()]
        theirs = [json.loads(ln) for ln in
                  (run_dir / "eval" / "step_00000002" / f"{bench}.predictions.jsonl").read_text().splitlines()]
        assert [(p["id"], p["response"], p["correct"]) for p in mine] == \
            [(p["id"], p["response"], p["correct"]) for p in theirs], bench
        title = doc["benchmark"]
        assert f"| {title} | " in report and f"| {graded} | {skipped} |" in report
    assert "| average |" in report and "not VLMEvalKit's LLM answer extractor" in report


@pytest.mark.slow
def test_eval_cli_on_an_hf_folder_limit_and_sampling(tmp_path):
    """An HF folder (a tiny random Qwen2.5-VL, built by its family): --limit 1 reads one problem (a WeMath
    composite: 3 rows, a DynaMath question: 3 variants); --n 2 samples, maj@2; the policy extractor runs."""
    pytest.importorskip("megatron_selfjudge.megatron.models.qwen_family")  # the HF family (its own helper's work)
    from megatron_selfjudge.megatron.models.tiny_hf import make_tiny_qwen2_5_vl

    hf, data, out = make_tiny_qwen2_5_vl(tmp_path / "hf"), fixture_root(tmp_path / "data"), tmp_path / "out"
    proc = _cli("eval", "--checkpoint", str(hf), "--benchmarks", "wemath,dynamath", "--data", str(data),
                "--limit", "1", "--n", "2", "--temperature", "0.7", "--seed", "3", "--max-new-tokens", "8",
                "--extractor", "policy", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    wemath = json.loads((out / "wemath.json").read_text())
    assert wemath["graded"] == 3 and wemath["scores"]["composites"] == 1 and wemath["model"] == "qwen2.5-vl"
    assert wemath["settings"]["metric"] == "maj@2" and "sampled_pass1" in wemath
    assert wemath["settings"]["extractor"] == "policy" and "restate" in wemath["protocol"]
    dynamath = json.loads((out / "dynamath.json").read_text())
    assert dynamath["graded"] == 3 and dynamath["scores"]["questions"] == 1  # one question, its 3 variants
    preds = [json.loads(ln) for ln in (out / "wemath.predictions.jsonl").read_text().splitlines()]
    assert all(isinstance(p["response"], list) and len(p["response"]) == 2 for p in preds)
    assert all(set(p["extracted_by"]) <= {None, "rule", "policy"} for p in preds)
    assert not (hf / "eval").exists()  # nothing is written into the model folder
