"""`selfjudge compare` (megatron_selfjudge/compare.py): the plan, skipping finished runs, and tables whose
numbers are recomputed here from each run's own results.json."""
from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest

from megatron_selfjudge import cli, compare
from megatron_selfjudge.config import ConfigError, load_config

T975_1 = 12.706205  # Student t, 1 degree of freedom (2 seeds)
FIGS = {"greedy": "greedy_pass1", "sampled": "sampled_pass1", "maj": "maj_at_g"}


def _overrides(command: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in command if "=" in item and not item.startswith("-"))


def crafted_before(seed: int) -> dict:
    return {"greedy_pass1": 0.5 + 0.01 * (seed % 7), "sampled_pass1": 0.4, "maj_at_g": 0.45}


def crafted_entropy(mode: str, seed: int, step: int) -> float:
    return 0.1 * step + 0.01 * (seed % 5) + (0.5 if mode == "judge" else 0.0)


def crafted_delta(mode: str, seed: int) -> float:
    return {"majority": 0.02, "judge": 0.05}.get(mode, 0.0) + 0.01 * (seed % 3)


class FakeTrainer:
    """Stands in for `selfjudge train`: writes results.json with crafted figures; counts its calls."""

    def __init__(self, fail_mode: str | None = None, fail_warm_seed: int | None = None,
                 meet_first: int = 0):
        self.calls: list[dict] = []
        self.events: list[tuple[str, str]] = []  # ("start" | "end", run_dir), in time order
        self.fail_mode, self.fail_warm_seed = fail_mode, fail_warm_seed
        # The first `meet_first` calls wait for each other: they must run at the same time.
        self.barrier = threading.Barrier(meet_first, timeout=20) if meet_first else None
        self.lock = threading.Lock()

    def __call__(self, command: list[str], log_file: Path) -> int:
        o = _overrides(command)
        with self.lock:
            self.calls.append(o)
            self.events.append(("start", o["trainer.run_dir"]))
            meet = self.barrier is not None and len(self.calls) <= self.barrier.parties
        if meet:
            self.barrier.wait()
        try:
            return self._train(o)
        finally:
            with self.lock:
                self.events.append(("end", o["trainer.run_dir"]))

    def _train(self, o: dict) -> int:
        seed, run_dir, mode = int(o["trainer.seed"]), Path(o["trainer.run_dir"]), o["reward.mode"]
        warm = o["trainer.max_steps"] == "0" if "trainer.max_steps" in o else False
        if (warm and seed == self.fail_warm_seed) or (not warm and mode == self.fail_mode):
            return 1
        before = crafted_before(seed)
        after = before if warm else {k: v + crafted_delta(mode, seed) for k, v in before.items()}
        run_dir.mkdir(parents=True, exist_ok=True)
        evals = {name: {"n": 4, "samples": 8, "format_ok": 1.0, **figs} for name, figs in
                 (("before", before), ("after", after))}
        (run_dir / "results.json").write_text(json.dumps({"evals": evals}))
        if not warm:  # two logged steps; the entropy encodes the seed and mode
            rows = [{"step": k, "entropy": crafted_entropy(mode, seed, k), "reward_mean": 0.5} for k in (1, 2)]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return 0


def args_for(tmp_path: Path, *extra: str):
    parser = cli.build_parser()
    return parser.parse_args(["compare", "--out", str(tmp_path / "cmp"), *extra])


def test_plan_shares_one_warm_start_per_seed(tmp_path):
    base = load_config(None, [])
    plan = compare.make_plan(base, tmp_path, ["majority", "judge"], [7, 8], lr_scale=3.0, lr_scale_seeds=1)
    assert sorted(plan.warm) == [7, 8]
    assert "trainer.max_steps=0" in plan.warm[7].overrides
    assert [(r.seed, r.variant, r.mode) for r in plan.runs] == [
        (7, "lr x1", "majority"), (7, "lr x1", "judge"), (8, "lr x1", "majority"), (8, "lr x1", "judge"),
        (7, "lr x3", "majority"), (7, "lr x3", "judge")]
    for run in plan.runs:
        o = dict(item.split("=", 1) for item in run.overrides)
        assert o["trainer.init_from"] == str(plan.warm[run.seed].run_dir)
        assert float(o["optim.lr"]) == pytest.approx(base.optim.lr * (3 if run.variant == "lr x3" else 1))
        assert len({r.run_dir for r in plan.runs}) == len(plan.runs)
    assert compare.all_modes()[0] == "random" and compare.all_modes()[-1] == "ground_truth"


def test_tables_equal_the_per_run_figures_and_finished_runs_are_skipped(tmp_path):
    seeds = [1234, 1235]
    fake = FakeTrainer()
    lines: list[str] = []
    assert compare.run(args_for(tmp_path, "--seeds", "2", "--modes", "majority,judge"), lines.append, fake) == 0
    assert len(fake.calls) == 2 + 4
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    # Recomputed here from the runs' own files: change per seed, mean, t interval with 1 dof.
    for mode in ("majority", "judge"):
        for name, key in FIGS.items():
            changes = []
            for seed in seeds:
                evals = json.loads((tmp_path / "cmp" / f"seed_{seed}" / "lr_x1" / mode / "results.json").read_text())["evals"]
                changes.append(evals["after"][key] - evals["before"][key])
            mean = sum(changes) / 2
            half = T975_1 * abs(changes[0] - changes[1]) / math.sqrt(2) / math.sqrt(2)
            got = result["summary"]["lr x1"][mode][name]
            assert got["n"] == 2 and got["mean"] == pytest.approx(mean)
            assert got["low"] == pytest.approx(mean - half) and got["high"] == pytest.approx(mean + half)
    # judge - majority per seed is 0.03 on both seeds: a zero-width interval.
    paired = result["vs_majority"]["lr x1"]["judge"]["greedy"]
    assert paired["mean"] == pytest.approx(0.03) and paired["low"] == pytest.approx(0.03)
    table = (tmp_path / "cmp" / "compare.md").read_text()
    judge_greedy = result["summary"]["lr x1"]["judge"]["greedy"]
    assert f"| judge | 2 | {judge_greedy['mean']:+.3f} [{judge_greedy['low']:+.3f}, {judge_greedy['high']:+.3f}]" in table
    assert table.startswith("Runs: the embedded default with no overrides; seeds 1234, 1235; on ")
    assert "maj@8" in table and result["warm_start_summary"]["greedy"]["min"] == pytest.approx(0.5 + 0.01 * (1234 % 7))
    # Rerun: every run is finished, nothing is started, the same numbers come out.
    lines.clear()
    assert compare.run(args_for(tmp_path, "--seeds", "2", "--modes", "majority,judge"), lines.append, fake) == 0
    assert len(fake.calls) == 6 and sum(ln.startswith("skip") for ln in lines) == 6
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["summary"] == result["summary"]


def test_failed_runs_are_reported_and_a_failed_warm_start_skips_its_seed(tmp_path):
    fake = FakeTrainer(fail_mode="judge", fail_warm_seed=1235)
    lines: list[str] = []
    assert compare.run(args_for(tmp_path, "--seeds", "2", "--modes", "majority,judge"), lines.append, fake) == 1
    # Seed 1235's warm start failed: its two runs never start; seed 1234's judge run failed.
    assert len(fake.calls) == 2 + 2
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    status = {(r["seed"], r["mode"]): r["status"] for r in result["runs"]}
    assert status == {(1234, "majority"): "ran", (1234, "judge"): "failed",
                      (1235, "majority"): "not run: warm start failed", (1235, "judge"): "not run: warm start failed"}
    assert result["summary"]["lr x1"]["majority"]["greedy"]["n"] == 1 and "judge" not in result["summary"]["lr x1"]
    assert any(ln.startswith("FAIL") and "judge" in ln for ln in lines)


def test_parallel_jobs_give_the_serial_numbers_and_wait_for_their_warm_start(tmp_path):
    opts = ("--seeds", "3", "--modes", "majority,judge", "--lr-scale", "3", "--lr-scale-seeds", "2")
    serial = FakeTrainer()
    assert compare.run(args_for(tmp_path / "serial", *opts), lambda line: None, serial) == 0
    # Two jobs: the first two warm starts must run at once (the barrier times out otherwise).
    parallel = FakeTrainer(meet_first=2)
    lines: list[str] = []
    assert compare.run(args_for(tmp_path / "parallel", *opts, "--jobs", "2"), lines.append, parallel) == 0
    assert len(parallel.calls) == len(serial.calls) == 3 + 10
    # No run starts before its own seed's warm start has ended.
    for i, (kind, run_dir) in enumerate(parallel.events):
        if kind == "start" and "warm_start" not in run_dir:
            warm = str(Path(run_dir).parents[1] / "warm_start")
            assert ("end", warm) in parallel.events[:i], f"{run_dir} started before {warm} ended"
    results = [json.loads((tmp_path / d / "cmp" / "compare.json").read_text()) for d in ("serial", "parallel")]
    for key in ("summary", "vs_majority", "warm_start_summary", "curves"):
        assert results[0][key] == results[1][key], key
    assert sum(ln.startswith("done") for ln in lines) == 13
    with pytest.raises(ConfigError, match="--jobs"):
        compare.run(args_for(tmp_path / "bad", "--jobs", "0"), print, FakeTrainer())


def test_an_error_in_one_job_starts_no_queued_run(tmp_path):
    # One seed, six modes, two jobs: the first run raises (as Ctrl-C would end the harness); the
    # others that started wait, so the four still queued must be dropped, not started.
    other_started = threading.Event()
    calls: list[str] = []

    def runner(command, log_file):
        o = _overrides(command)
        calls.append(o["trainer.run_dir"])
        if o.get("trainer.max_steps") == "0":
            return FakeTrainer()(command, log_file)  # the warm start
        if o["reward.mode"] == "random":
            assert other_started.wait(timeout=20), "the second job never started"
            raise KeyboardInterrupt
        other_started.set()
        threading.Event().wait(timeout=2)  # still running while the harness stops
        return 1

    args = args_for(tmp_path, "--seeds", "1", "--modes", "random,majority,consistency,judge,agreement,neg_entropy",
                    "--jobs", "2")
    with pytest.raises(KeyboardInterrupt):
        compare.run(args, lambda line: None, runner)
    # The warm start, the raising run, the one running beside it, at most one taken right after.
    assert 3 <= len(calls) <= 4, calls


def test_curve_figures_hold_the_mean_curves_over_seeds(tmp_path):
    fake = FakeTrainer()
    assert compare.run(args_for(tmp_path, "--seeds", "2", "--modes", "majority,judge", "--lr-scale", "3",
                                "--lr-scale-seeds", "1"), lambda line: None, fake) == 0
    out = tmp_path / "cmp"
    result = json.loads((out / "compare.json").read_text())
    runs = {r.label: r for r in compare.mode_curves(result, "lr x1")}
    assert sorted(runs) == ["judge (2 seeds)", "majority (2 seeds)"]
    for mode in ("majority", "judge"):
        entropy = runs[f"{mode} (2 seeds)"].series["entropy"]
        assert [s for s, _ in entropy] == [1, 2]
        for step, value in entropy:
            assert value == pytest.approx(sum(crafted_entropy(mode, s, step) for s in (1234, 1235)) / 2)
        before = sum(crafted_before(s)["greedy_pass1"] for s in (1234, 1235)) / 2
        after = before + sum(crafted_delta(mode, s) for s in (1234, 1235)) / 2
        heldout = runs[f"{mode} (2 seeds)"].heldout
        assert heldout[0] == (0, pytest.approx(before)) and heldout[1] == (2, pytest.approx(after))
    assert [r.label for r in compare.mode_curves(result, "lr x3")] == ["majority (1 seed)", "judge (1 seed)"]
    for variant in ("lr_x1", "lr_x3"):
        png = out / f"curves_{variant}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_fail_before_any_run(tmp_path, capsys):
    fake = FakeTrainer()
    with pytest.raises(ConfigError, match="--seeds"):
        compare.run(args_for(tmp_path, "--seeds", "0"), print, fake)
    # A mode whose per-run config is invalid (ttrl needs more votes than samples) stops the plan.
    with pytest.raises(ConfigError, match="rollout.vote_n"):
        compare.run(args_for(tmp_path, "--modes", "majority,ttrl", "rollout.n=8", "rollout.vote_n=4"), print, fake)
    assert fake.calls == []
    assert cli.main(["compare", "--modes", "majority,nope", "--out", str(tmp_path)]) == 2
    assert "unknown: nope" in capsys.readouterr().err


TINY = ["trainer.sft_steps=2", "optim.sft_warmup_steps=0", "trainer.sft_batch_size=4", "data.synthetic_sft=8", "data.synthetic_unlabeled=8",
        "data.synthetic_test=4", "trainer.prompts_per_step=4", "trainer.mini_batch_prompts=4", "trainer.max_steps=1",
        "rollout.n=2", "rollout.max_response_len=8", "trainer.save_every=0"]


@pytest.mark.slow
def test_real_tiny_runs_resume_and_match_their_results(tmp_path):
    lines: list[str] = []
    # Two runs at once (--jobs 2): the real processes share nothing but the warm start they read.
    args = args_for(tmp_path, "--seeds", "2", "--modes", "majority,self_certainty", "--jobs", "2", *TINY)
    assert compare.run(args, lines.append) == 0, "\n".join(lines)
    out = tmp_path / "cmp"
    result = json.loads((out / "compare.json").read_text())
    for mode in ("majority", "self_certainty"):
        run_dirs = [out / f"seed_{s}" / "lr_x1" / mode for s in (1234, 1235)]
        for run_dir in run_dirs:
            saved = load_config(run_dir / "config.yaml", embedded_default=False)
            assert saved.trainer.init_from == str(run_dir.parents[1] / "warm_start")
            assert saved.reward.mode == mode and saved.trainer.sft_steps == 2
            assert "warm start: policy weights from" in (run_dir.parent / f"{mode}.log").read_text()
        for name, key in FIGS.items():
            changes = []
            for run_dir in run_dirs:
                evals = json.loads((run_dir / "results.json").read_text())["evals"]
                changes.append(evals["after"][key] - evals["before"][key])
            assert result["summary"]["lr x1"][mode][name]["mean"] == pytest.approx(sum(changes) / 2)
        curve = result["curves"]["lr x1"][mode]
        rows = [json.loads(ln) for d in run_dirs for ln in (d / "metrics.jsonl").read_text().splitlines()]
        assert curve["step"] == [1] and curve["entropy"][0] == pytest.approx(sum(r["entropy"] for r in rows) / 2)
    # The warm start is shared: each mode's "before" is the warm start's own final evaluation.
    warm = json.loads((out / "seed_1234" / "warm_start" / "results.json").read_text())["evals"]["after"]
    assert json.loads((out / "seed_1234" / "lr_x1" / "majority" / "results.json").read_text())["evals"]["before"] == warm
    # Rerun: nothing is started (a runner that is called fails the test).
    lines.clear()

    def must_not_run(command, log_file):
        raise AssertionError(f"finished run started again: {command}")

    assert compare.run(args, lines.append, must_not_run) == 0
    assert sum(ln.startswith("skip") for ln in lines) == 6


@pytest.mark.slow  # builds the tiny trainer in this process
def test_init_from_without_a_checkpoint_is_a_one_line_error(tmp_path, capsys):
    code = cli.main(["train", f"trainer.run_dir={tmp_path / 'run'}", f"trainer.init_from={tmp_path / 'nowhere'}",
                     *TINY])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("selfjudge: config error: trainer.init_from=") and "checkpoint" in err[-1]
