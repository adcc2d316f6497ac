"""`selfjudge compare`: every reward mode from one shared warm start per seed, with 95% intervals.

For each seed S the harness first trains the warm start once (`<out>/seed_S/warm_start`: the SFT
stage and no UPT step), then, for every reward mode and learning-rate variant, a UPT run that
starts from it (`trainer.init_from`) in `<out>/seed_S/<variant>/<mode>`. Each run is a
`selfjudge train` subprocess (a fresh process: megatron's global state never leaks between runs)
with the user's config and overrides, then the per-run keys (trainer.seed, trainer.run_dir,
trainer.init_from, reward.mode, optim.lr). A run whose results.json holds both evaluations is
finished and skipped on a rerun; an unfinished one is started again and resumes from its own
checkpoints (trainer.resume=auto). `--jobs N` runs up to N of these processes at once (each run is
one process; with OMP_NUM_THREADS=1, N = the core count keeps every core busy); a seed's runs are
queued as soon as its warm start is done, behind the warm starts still waiting.

Reported per variant and mode, over seeds (stats.mean_interval: mean and 95% Student-t interval):
the change after - before of each held-out figure (greedy pass@1, sampled pass@1, maj@G), and
the paired per-seed difference of that change against the majority-vote run of the same warm
start; the warm start's own figures with their spread; the per-step means over seeds of the
training curves (entropy, response length, reward, pseudo-label accuracy, KL, clip fraction). The
table is printed and written to `<out>/compare.md`, everything to `<out>/compare.json`, and the
mean curves of every mode, one figure per learning-rate variant, to `<out>/curves_lr_x1.png`
(and `curves_lr_x3.png` for --lr-scale 3) with `selfjudge plot`'s panels; there the held-out
panel is the mean greedy pass@1 over seeds before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_selfjudge.config import ConfigError, Config, load_config
from megatron_selfjudge.runtime.setup import without_launch_env
from megatron_selfjudge.stats import mean_interval, paired_interval

FIGURES = (("greedy", "greedy_pass1"), ("sampled", "sampled_pass1"), ("maj", "maj_at_g"))
CURVE_KEYS = ("entropy", "response_len_mean", "reward_mean", "pseudo_label_acc", "kl", "clip_frac")
# Table order: the controls first, then the label-free rewards, the supervised upper bound last.
MODE_ORDER = ("random", "majority", "consistency", "judge", "judge_raw", "agreement", "self_certainty",
              "neg_entropy", "ttrl", "ground_truth")
BASELINE_MODE = "majority"  # the paired differences are taken against this mode's runs
RUN_RECORD = "compare_run.json"  # wall time of a run, written by the harness next to its results


def all_modes() -> list[str]:
    """Every registered reward mode, in table order (modes registered elsewhere follow)."""
    from megatron_selfjudge.rewards.combine import REWARD_MODES

    return [m for m in MODE_ORDER if m in REWARD_MODES] + [m for m in REWARD_MODES if m not in MODE_ORDER]


@dataclass(frozen=True)
class Run:
    """One `selfjudge train` run of the plan."""

    seed: int
    variant: str  # "warm_start" or a learning-rate variant such as "lr x1"
    mode: str
    run_dir: Path
    overrides: tuple[str, ...]  # the per-run keys, applied after the user's overrides


@dataclass
class Plan:
    """Warm starts and UPT runs, and the config each is checked against before anything runs."""

    warm: dict[int, Run] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)


def variant_name(scale: float) -> str:
    """'lr x1', 'lr x3', 'lr x0.5'."""
    return f"lr x{scale:g}"


def make_plan(base: Config, out: Path, modes: Sequence[str], seeds: Sequence[int],
              lr_scale: Optional[float], lr_scale_seeds: int) -> Plan:
    """The warm start of each seed, then every mode at the base learning rate (and the scaled one)."""
    plan = Plan()
    variants = [(1.0, list(seeds))] + ([(lr_scale, list(seeds)[:lr_scale_seeds])] if lr_scale else [])
    for seed in seeds:
        warm_dir = out / f"seed_{seed}" / "warm_start"
        # The warm start trains only stage 1; its reward mode is never used (majority needs no Judge).
        plan.warm[seed] = Run(seed, "warm_start", "", warm_dir, (
            f"trainer.seed={seed}", f"trainer.run_dir={warm_dir}", "trainer.max_steps=0", "trainer.init_from=''",
            "reward.mode=majority"))
    for scale, variant_seeds in variants:
        name = variant_name(scale)
        for seed in variant_seeds:
            for mode in modes:
                run_dir = out / f"seed_{seed}" / name.replace(" ", "_") / mode
                plan.runs.append(Run(seed, name, mode, run_dir, (
                    f"trainer.seed={seed}", f"trainer.run_dir={run_dir}", f"trainer.init_from={plan.warm[seed].run_dir}",
                    f"reward.mode={mode}", f"optim.lr={base.optim.lr * scale!r}")))
    return plan


def finished(run_dir: Path) -> bool:
    """Whether the run wrote results.json with both evaluations (then it is skipped)."""
    try:
        evals = json.loads((run_dir / "results.json").read_text())["evals"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(evals, dict) and "before" in evals and "after" in evals


def read_results(run_dir: Path) -> dict:
    """The evaluations of a finished run ({'before': {...}, 'after': {...}})."""
    return json.loads((run_dir / "results.json").read_text())["evals"]


def train_command(config: Optional[str], overrides: Sequence[str]) -> list[str]:
    """The `selfjudge train` command line of one run (the same interpreter as this process)."""
    return [sys.executable, "-m", "megatron_selfjudge.cli", "train",
            *(["--config", config] if config else []), *overrides]


def run_subprocess(command: list[str], log_file: Path) -> int:
    """Run command with its output in log_file; returns the exit code."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a") as log:
        # Each run is a one-process job with its own rendezvous; inheriting this process's (a
        # port a caller's process group may still hold) would make it fail with EADDRINUSE.
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False,
                              env=without_launch_env(os.environ)).returncode


def execute(run: Run, config: Optional[str], user_overrides: Sequence[str], echo: Callable[[str], None],
            runner: Callable[[list[str], Path], int] = run_subprocess) -> dict:
    """Run (or skip, when finished) one planned run; its record: status and wall time."""
    label = f"seed {run.seed} {run.variant}" + (f" {run.mode}" if run.mode else "")
    record_file = run.run_dir / RUN_RECORD
    if finished(run.run_dir):
        previous = json.loads(record_file.read_text()) if record_file.is_file() else {}
        echo(f"skip  {label}: finished ({run.run_dir})")
        return {"status": "skipped", "time_s": previous.get("time_s")}
    echo(f"run   {label} -> {run.run_dir}")
    start = time.perf_counter()
    code = runner(train_command(config, [*user_overrides, *run.overrides]), run.run_dir.parent / f"{run.run_dir.name}.log")
    seconds = time.perf_counter() - start
    if code != 0 or not finished(run.run_dir):
        echo(f"FAIL  {label}: exit code {code} after {seconds:.0f} s; see {run.run_dir.parent / (run.run_dir.name + '.log')}")
        return {"status": "failed", "time_s": seconds, "exit_code": code}
    record_file.write_text(json.dumps({"time_s": seconds}))
    echo(f"done  {label} in {seconds:.0f} s")
    return {"status": "ran", "time_s": seconds}


def execute_plan(plan: Plan, config: Optional[str], user_overrides: Sequence[str], echo: Callable[[str], None],
                 runner: Callable[[list[str], Path], int] = run_subprocess, jobs: int = 1) -> dict[Path, dict]:
    """Every warm start, then each seed's runs once its warm start is done, up to `jobs` at a time.

    Returns each run folder's record (execute's, or 'not run: warm start failed'). With jobs=1 the
    order is the plan's: the warm starts, then the runs."""
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            echo(line)

    records: dict[Path, dict] = {}
    not_run = {"status": "not run: warm start failed"}
    if jobs == 1:
        for warm in plan.warm.values():
            records[warm.run_dir] = execute(warm, config, user_overrides, say, runner)
        for run in plan.runs:
            warm_failed = records[plan.warm[run.seed].run_dir]["status"] == "failed"
            records[run.run_dir] = dict(not_run) if warm_failed else execute(run, config, user_overrides, say, runner)
        return records
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        warm_futures = {pool.submit(execute, warm, config, user_overrides, say, runner): seed
                        for seed, warm in plan.warm.items()}
        run_futures = {}
        for future in as_completed(warm_futures):
            seed = warm_futures[future]
            records[plan.warm[seed].run_dir] = future.result()
            for run in (r for r in plan.runs if r.seed == seed):
                if records[plan.warm[seed].run_dir]["status"] == "failed":
                    records[run.run_dir] = dict(not_run)
                else:  # queued behind the warm starts still waiting, in the plan's order
                    run_futures[pool.submit(execute, run, config, user_overrides, say, runner)] = run
        for future in as_completed(run_futures):
            records[run_futures[future].run_dir] = future.result()
    finally:
        # On an error or Ctrl-C (which the running children get too), queued runs are dropped, not started.
        pool.shutdown(wait=True, cancel_futures=True)
    return records


def _figures(evals: dict, which: str) -> dict[str, float]:
    return {name: float(evals[which][key]) for name, key in FIGURES}


def _curves(run_dirs: Sequence[Path]) -> dict[str, list[Optional[float]]]:
    """Per step, the mean over runs of each curve key (None where no run logged it)."""
    from megatron_selfjudge.metrics import read_metrics

    per_step: dict[int, dict[str, list[float]]] = {}
    for run_dir in run_dirs:
        for row in read_metrics(run_dir):
            slot = per_step.setdefault(int(row["step"]), {})
            for key in CURVE_KEYS:
                if isinstance(row.get(key), (int, float)):
                    slot.setdefault(key, []).append(float(row[key]))
    steps = sorted(per_step)
    out: dict[str, list[Optional[float]]] = {"step": steps}
    for key in CURVE_KEYS:
        out[key] = [sum(v) / len(v) if (v := per_step[s].get(key)) else None for s in steps]
    return out


def summarize(plan: Plan, records: dict[Path, dict]) -> dict:
    """Figures of every finished run, and their means and intervals per variant and mode."""
    warm = {seed: _figures(read_results(r.run_dir), "after") for seed, r in plan.warm.items() if finished(r.run_dir)}
    runs = []
    for r in plan.runs:
        entry = {"seed": r.seed, "variant": r.variant, "mode": r.mode, "run_dir": str(r.run_dir),
                 **records.get(r.run_dir, {})}
        if finished(r.run_dir):
            evals = read_results(r.run_dir)
            before, after = _figures(evals, "before"), _figures(evals, "after")
            entry.update(before=before, after=after, change={k: after[k] - before[k] for k in after},
                         samples=int(evals["after"].get("samples", 0)))
        runs.append(entry)
    summary: dict = {}
    vs_baseline: dict = {}
    curves: dict = {}
    for variant in dict.fromkeys(e["variant"] for e in runs):
        done = [e for e in runs if e["variant"] == variant and "change" in e]
        summary[variant], vs_baseline[variant], curves[variant] = {}, {}, {}
        base = {e["seed"]: e["change"] for e in done if e["mode"] == BASELINE_MODE}
        for mode in dict.fromkeys(e["mode"] for e in runs if e["variant"] == variant):
            mine = [e for e in done if e["mode"] == mode]
            if not mine:
                continue
            summary[variant][mode] = {name: mean_interval([e["change"][name] for e in mine]).as_dict()
                                      for name, _ in FIGURES}
            paired = [e for e in mine if e["seed"] in base]
            if mode != BASELINE_MODE and paired:
                vs_baseline[variant][mode] = {
                    name: paired_interval([e["change"][name] for e in paired],
                                          [base[e["seed"]][name] for e in paired]).as_dict()
                    for name, _ in FIGURES}
            curves[variant][mode] = _curves([Path(e["run_dir"]) for e in mine])
    warm_summary = {}
    if warm:
        for name, _ in FIGURES:
            values = [w[name] for w in warm.values()]
            warm_summary[name] = {**mean_interval(values).as_dict(), "min": min(values), "max": max(values)}
    samples = next((e["samples"] for e in runs if e.get("samples")), 0)
    return {"warm_start": {str(s): w for s, w in warm.items()}, "warm_start_summary": warm_summary,
            "runs": runs, "summary": summary, f"vs_{BASELINE_MODE}": vs_baseline, "curves": curves,
            "samples": samples}


def _cell(interval: dict, digits: int = 3) -> str:
    from megatron_selfjudge.stats import Interval

    nan = float("nan")
    return Interval(interval["mean"], interval["low"] if interval["low"] is not None else nan,
                    interval["high"] if interval["high"] is not None else nan, interval["n"]).format(digits)


def format_tables(result: dict) -> str:
    """Markdown: the warm start, then per variant the change of each figure per mode (and vs majority)."""
    g = result.get("samples") or "G"
    heads = {"greedy": "greedy pass@1", "sampled": "sampled pass@1", "maj": f"maj@{g}"}
    lines = []
    if "seeds" in result:  # what was run, where (run() adds these; summarize alone does not)
        config = result.get("config") or "the embedded default"
        extra = " ".join(result.get("overrides") or []) or "no overrides"
        m = result.get("machine", {})
        where = f"{m.get('platform', '?')}, {m.get('cpus', '?')} CPUs, " + (
            f"GPU {m['cuda']}" if m.get("cuda") else "no GPU") + f", torch {m.get('torch', '?')}"
        lines += [f"Runs: {config} with {extra}; seeds {', '.join(map(str, result['seeds']))}; on {where}.", ""]
    ws = result["warm_start_summary"]
    if ws:
        lines.append(f"Warm start (after SFT), {ws['greedy']['n']} seeds: " + "; ".join(
            f"{heads[name]} {ws[name]['mean']:.3f}" + (f" [{ws[name]['low']:.3f}, {ws[name]['high']:.3f}]"
                                                      if ws[name]["low"] is not None else "")
            + f" (min {ws[name]['min']:.3f}, max {ws[name]['max']:.3f})" for name, _ in FIGURES))
        lines.append("")
    for variant, modes in result["summary"].items():
        lines.append(f"Change after - before, {variant}: mean [95% interval] over seeds")
        lines.append("")
        lines.append("| reward.mode | seeds | " + " | ".join(heads[n] for n, _ in FIGURES) + " |")
        lines.append("|---|---|" + "---|" * len(FIGURES))
        for mode, figs in modes.items():
            lines.append(f"| {mode} | {figs['greedy']['n']} | " + " | ".join(_cell(figs[n]) for n, _ in FIGURES) + " |")
        paired = result[f"vs_{BASELINE_MODE}"].get(variant, {})
        if paired:
            lines.append("")
            lines.append(f"Paired per seed, change of the mode - change of {BASELINE_MODE}, {variant}")
            lines.append("")
            lines.append("| reward.mode | seeds | " + " | ".join(heads[n] for n, _ in FIGURES) + " |")
            lines.append("|---|---|" + "---|" * len(FIGURES))
            for mode, figs in paired.items():
                lines.append(f"| {mode} | {figs['greedy']['n']} | " + " | ".join(_cell(figs[n]) for n, _ in FIGURES)
                             + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def curve_figure_path(out: Path, variant: str) -> Path:
    """<out>/curves_lr_x1.png for the variant 'lr x1'."""
    return out / f"curves_{variant.replace(' ', '_')}.png"


def mode_curves(result: dict, variant: str) -> list:
    """The variant's modes as plot.RunCurves: the mean curves over seeds, and the held-out panel's
    mean greedy pass@1 before (step 0) and after (the last step) over the finished runs."""
    from megatron_selfjudge.plot import RunCurves

    runs = []
    for mode, curve in result["curves"].get(variant, {}).items():
        steps = curve["step"]
        series = {key: [(s, v) for s, v in zip(steps, curve[key]) if v is not None]
                  for key in CURVE_KEYS if any(v is not None for v in curve.get(key, []))}
        done = [e for e in result["runs"] if e["variant"] == variant and e["mode"] == mode and "after" in e]
        heldout = []
        if done and steps:
            heldout = [(0, sum(e["before"]["greedy"] for e in done) / len(done)),
                       (steps[-1], sum(e["after"]["greedy"] for e in done) / len(done))]
        runs.append(RunCurves(label=f"{mode} ({len(done)} seed{'' if len(done) == 1 else 's'})", path=Path(),
                              series=series, heldout=heldout))
    return runs


def plot_curves(result: dict, out: Path) -> list[Path]:
    """Per variant, one PNG of every mode's mean curves (selfjudge plot's panels); the files written."""
    from megatron_selfjudge.plot import plot_runs

    written = []
    for variant in result["curves"]:
        runs = mode_curves(result, variant)
        if not any(r.series for r in runs):
            continue  # no finished run logged a curve
        fig, _ = plot_runs(runs)
        path = curve_figure_path(out, variant)
        fig.savefig(path, dpi=fig.dpi)
        written.append(path)
    return written


def machine() -> dict:
    """Where the runs ran (for the README's table)."""
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `selfjudge compare` on parser p."""
    p.add_argument("--config", default=None, help="YAML file (default: the embedded tiny CPU config)")
    p.add_argument("--out", default="runs/compare", help="folder of every run, compare.json and compare.md")
    p.add_argument("--modes", default=None,
                   help="comma-separated reward modes (default: every registered mode)")
    p.add_argument("--seeds", type=int, default=5, help="seeds at the config's learning rate (default 5)")
    p.add_argument("--first-seed", type=int, default=None, help="first seed (default: the config's trainer.seed)")
    p.add_argument("--lr-scale", type=float, default=None, help="also run every mode at this multiple of optim.lr")
    p.add_argument("--lr-scale-seeds", type=int, default=3, help="seeds of the --lr-scale variant (default 3)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each one process (default 1; with OMP_NUM_THREADS=1, up to the core count)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every run")


def parse_modes(text: Optional[str]) -> list[str]:
    """The --modes list, checked against the reward registry."""
    known = all_modes()
    if text is None:
        return known
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in known]
    if not modes or unknown or len(set(modes)) != len(modes):
        raise ConfigError(f"--modes={text!r} must list distinct reward modes from {', '.join(known)}"
                          + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    return modes


def run(args: argparse.Namespace, echo: Callable[[str], None] = print,
        runner: Callable[[list[str], Path], int] = run_subprocess) -> int:
    """Plan, check every run's config, run what is not finished, print and write the tables."""
    modes = parse_modes(args.modes)
    if args.seeds < 1:
        raise ConfigError(f"--seeds={args.seeds} must be >= 1")
    if args.lr_scale is not None and not args.lr_scale > 0:
        raise ConfigError(f"--lr-scale={args.lr_scale} must be > 0")
    if args.jobs < 1:
        raise ConfigError(f"--jobs={args.jobs} must be >= 1")
    if args.lr_scale_seeds < 1:
        raise ConfigError(f"--lr-scale-seeds={args.lr_scale_seeds} must be >= 1")
    base = load_config(args.config, args.overrides)
    first = base.trainer.seed if args.first_seed is None else args.first_seed
    seeds = [first + i for i in range(args.seeds)]
    out = Path(args.out)
    plan = make_plan(base, out, modes, seeds, args.lr_scale, args.lr_scale_seeds)
    # Every run's config is checked before the first one starts: a bad mode/override fails in seconds.
    for run in [*plan.warm.values(), *plan.runs]:
        try:
            load_config(args.config, [*args.overrides, *run.overrides])
        except ConfigError as exc:
            raise ConfigError(f"{run.variant} {run.mode} seed {run.seed}: {exc}") from None
    echo(f"compare: {len(seeds)} seeds x {len(modes)} modes"
         + (f" (+ lr x{args.lr_scale:g} on {min(args.lr_scale_seeds, len(seeds))} seeds)" if args.lr_scale else "")
         + f", {len(plan.warm)} warm starts + {len(plan.runs)} runs under {out}")
    records = execute_plan(plan, args.config, args.overrides, echo, runner, args.jobs)
    failed = sum(r["status"] == "failed" for r in records.values())
    result = summarize(plan, records)
    result.update(config=args.config, overrides=list(args.overrides), seeds=seeds, modes=modes, machine=machine(),
                  warm_start_runs={str(s): records[w.run_dir] for s, w in plan.warm.items()})
    table = format_tables(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    (out / "compare.md").write_text(table)
    echo(table)
    for path in plot_curves(result, out):
        echo(f"curves: {path}")
    if failed:
        echo(f"compare: {failed} run(s) failed (their logs are named above)")
        return 1
    return 0
