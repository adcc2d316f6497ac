"""`selfjudge plot RUN_DIR... [--out FILE.png] [--labels a,b]`: the papers' training curves as a PNG.

One panel per curve that at least one run logged, every run a line of its own colour in every
panel: from each run's metrics.jsonl (metrics.py) the reward mean, pseudo-label accuracy,
entropy, response length, KL and clip fraction over UPT steps; the held-out accuracy of the
run's evaluations (results.json: greedy pass@1 before training at step 0 and after it at the
last step); and benchmark accuracy over checkpoints, from the ``eval/<benchmark>/accuracy`` keys
that evaluation during training (trainer.eval_every) writes into the step lines. A curve no run
logged is left out and named in a note (printed, and written under the figure).
Bad input (a missing run directory, no step rows, labels that do not match) is a one-line error,
exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from megatron_selfjudge.metrics import METRICS_FILE, read_metrics

# (metrics.jsonl key, panel title): the curves of the papers' training figures.
CURVES = (
    ("reward_mean", "reward mean"),
    ("pseudo_label_acc", "pseudo-label accuracy"),
    ("entropy", "entropy"),
    ("response_len_mean", "response length (tokens)"),
    ("kl", "KL to the reference"),
    ("clip_frac", "clip fraction"),
)
HELDOUT = "held-out accuracy (greedy pass@1)"
BENCHMARKS = "benchmark accuracy over checkpoints"
_EVAL_KEY = re.compile(r"^eval/(?P<name>.+)/accuracy$")
RESULTS_FILE = "results.json"


class PlotError(ValueError):
    """Input the plot cannot use; the message names the run directory or file."""


@dataclass
class RunCurves:
    """One run's curves: step -> value per metric, benchmark accuracies and held-out evaluations."""

    label: str
    path: Path
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    heldout: list[tuple[int, float]] = field(default_factory=list)


def _number(value: object) -> Optional[float]:
    """A plottable value: a finite int or float (null, text and booleans are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def load_run(run_dir: str | Path, label: str) -> RunCurves:
    """Read a run directory's metrics.jsonl (and results.json when present) into its curves."""
    path = Path(run_dir)
    if not path.is_dir():
        raise PlotError(f"run directory {str(path)!r} does not exist")
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise PlotError(f"{str(path)!r} has no {METRICS_FILE} (not a run directory?)")
    try:
        rows = read_metrics(path)
    except (OSError, UnicodeDecodeError) as err:
        raise PlotError(f"{metrics}: cannot read ({err})") from None
    by_step: dict[int, dict] = {}
    for row in rows:
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            by_step[step] = row  # a resumed run rewrote its later steps: the last line wins
    if not by_step:
        raise PlotError(f"{metrics} holds no step rows")
    run = RunCurves(label=label, path=path)
    keys = [k for k, _ in CURVES] + sorted({k for r in by_step.values() for k in r if _EVAL_KEY.match(k)})
    for key in keys:
        points = [(s, v) for s, r in sorted(by_step.items()) if (v := _number(r.get(key))) is not None]
        if points:
            run.series[key] = points
    run.heldout = _heldout(path / RESULTS_FILE, last_step=max(by_step))
    return run


def _heldout(results: Path, last_step: int) -> list[tuple[int, float]]:
    """Held-out greedy pass@1 before (step 0) and after (the last step) training, from results.json."""
    if not results.is_file():
        return []
    try:
        evals = json.loads(results.read_text()).get("evals", {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise PlotError(f"{results}: not a readable results file ({type(err).__name__})") from None
    points = []
    for name, step in (("before", 0), ("after", last_step)):
        value = _number(evals.get(name, {}).get("greedy_pass1")) if isinstance(evals.get(name), dict) else None
        if value is not None:
            points.append((step, value))
    return points


def _smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (1: the values as logged)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_runs(runs: Sequence[RunCurves], smooth: int = 1):
    """The figure (matplotlib, Agg) of the runs' curves and the notes on curves no run logged."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the figure is only ever written to a file
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels: list[tuple[str, str]] = [(k, t) for k, t in CURVES if any(k in r.series for r in runs)]
    notes = [f"no run logged {t} ({k}): panel left out" for k, t in CURVES if (k, t) not in panels]
    if any(r.heldout for r in runs):
        panels.append(("heldout", HELDOUT))
    else:
        notes.append(f"no run has held-out evaluations ({RESULTS_FILE}): panel left out")
    benchmarks = sorted({k for r in runs for k in r.series if _EVAL_KEY.match(k)})
    if benchmarks:
        panels.append(("benchmarks", BENCHMARKS))
    else:
        notes.append("no eval/<benchmark>/accuracy keys (trainer.eval_every=0): benchmark panel left out")
    if not panels:
        raise PlotError("none of the runs logged any of the plotted metrics")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.6 * cols, 3.3 * rows + 0.6), dpi=100)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    styles = ("-", "--", ":", "-.")
    for n, (key, title) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, n + 1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("checkpoint step" if key == "benchmarks" else "step", fontsize=9)
        ax.grid(alpha=0.3)
        for run, colour in zip(runs, colours):
            if key == "heldout":
                if run.heldout:
                    xs, ys = zip(*run.heldout)
                    ax.plot(xs, ys, "o-", color=colour, label=run.label)
            elif key == "benchmarks":
                for b, name in enumerate(benchmarks):
                    if name in run.series:
                        xs, ys = zip(*run.series[name])
                        ax.plot(xs, ys, marker="o", linestyle=styles[b % len(styles)], color=colour,
                                label=f"{run.label}: {_EVAL_KEY.match(name)['name']}")
            elif key in run.series:
                xs, ys = zip(*run.series[key])
                ax.plot(xs, _smoothed(list(ys), smooth), color=colour, label=run.label, linewidth=1.4)
        if key == "benchmarks":
            ax.legend(fontsize=7)
    handles = [Line2D([], [], color=c, label=r.label) for r, c in zip(runs, colours)]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(runs), 6), fontsize=9, frameon=False)
    footer = notes + ([f"curves: moving average over {smooth} steps"] if smooth > 1 else [])
    if footer:
        fig.text(0.01, 0.005, "; ".join(footer), fontsize=6.5, color="0.35", wrap=True)
    fig.tight_layout(rect=(0, 0.03, 1, 1 - 0.45 / (3.3 * rows + 0.6)))
    return fig, notes


def _labels(text: Optional[str], run_dirs: Sequence[str]) -> list[str]:
    if text is None:
        names = [Path(d).resolve().name or str(d) for d in run_dirs]
        # Same-named folders (runs/a/tiny, runs/b/tiny) keep their parent for the legend.
        return [str(Path(*Path(d).resolve().parts[-2:])) if names.count(n) > 1 else n
                for d, n in zip(run_dirs, names)]
    labels = [s.strip() for s in text.split(",")]
    if len(labels) != len(run_dirs) or not all(labels):
        raise PlotError(f"--labels: {len(labels)} non-empty labels needed, one per run directory "
                        f"({len(run_dirs)} given), got {text!r}")
    return labels


def main(argv: Sequence[str]) -> int:
    """Entry point of `selfjudge plot`; returns the exit status (2: bad input, one line on stderr)."""
    parser = argparse.ArgumentParser(prog="selfjudge plot", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (trainer.run_dir)")
    parser.add_argument("--out", default="training_curves.png", help="PNG file to write (default %(default)s)")
    parser.add_argument("--labels", default=None, help="comma-separated legend labels, one per run directory")
    parser.add_argument("--smooth", type=int, default=1, help="trailing moving average over N steps (default 1)")
    args = parser.parse_args(list(argv))
    try:
        out = Path(args.out)
        if out.suffix.lower() != ".png":
            raise PlotError(f"--out {args.out!r}: the figure is written as PNG; name a .png file")
        if args.smooth < 1:
            raise PlotError(f"--smooth {args.smooth}: must be >= 1")
        runs = [load_run(d, label) for d, label in zip(args.run_dirs, _labels(args.labels, args.run_dirs))]
        fig, notes = plot_runs(runs, smooth=args.smooth)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(out, dpi=fig.dpi)
        except OSError as err:
            raise PlotError(f"--out {args.out!r}: cannot write ({err.strerror or err})") from None
    except PlotError as err:
        print(f"selfjudge plot: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}")
    print(f"{out}: {len(fig.axes)} panels, {len(runs)} run(s)")
    return 0
