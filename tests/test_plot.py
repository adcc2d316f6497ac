"""`selfjudge plot`: panels per logged curve, several runs on one figure, a PNG that is not blank."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from megatron_selfjudge.cli import main as cli_main
from megatron_selfjudge.plot import BENCHMARKS, CURVES, HELDOUT, load_run, plot_runs

RUN_COLOUR = (31, 119, 180)  # matplotlib's C0: the first run's lines


def _run(path, steps=20, keys=tuple(k for k, _ in CURVES), evals=("mathvision",), eval_every=5, shift=0.0):
    path.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        row = {"step": s, **{k: math.sin(s / 3 + shift) + 1.5 for k in keys}, "time_rollout": 0.1}
        if s % eval_every == 0:
            row.update({f"eval/{b}/accuracy": 0.2 + 0.01 * s + 0.05 * i for i, b in enumerate(evals)})
        lines.append(json.dumps(row))
    lines.append('{"step": 99, "reward_m')  # a torn last line (killed mid-write) is ignored
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (path / "results.json").write_text(json.dumps(
        {"evals": {"before": {"greedy_pass1": 0.5}, "after": {"greedy_pass1": 0.6 + shift}}}))
    return path


def test_two_runs_on_one_figure_with_every_panel(tmp_path, capsys):
    a = _run(tmp_path / "majority")
    b = _run(tmp_path / "judge", shift=0.1, evals=("mathvision", "wemath"))
    runs = [load_run(a, "majority"), load_run(b, "judge")]
    assert runs[0].series["reward_mean"][0] == (1, pytest.approx(math.sin(1 / 3) + 1.5))
    assert [s for s, _ in runs[1].series["eval/wemath/accuracy"]] == [5, 10, 15, 20]
    assert runs[1].heldout == [(0, 0.5), (20, pytest.approx(0.7))]
    fig, notes = plot_runs(runs)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [t for _, t in CURVES] + [HELDOUT, BENCHMARKS] and not notes
    assert all(len(ax.lines) == 2 for ax in fig.axes[:len(CURVES) + 1])  # one line per run
    assert len(fig.axes[-1].lines) == 3  # majority: mathvision; judge: mathvision, wemath
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["majority", "judge"]

    out = tmp_path / "curves.png"
    assert cli_main(["plot", str(a), str(b), "--out", str(out), "--labels", "majority,judge"]) == 0
    assert f"{out}: 8 panels, 2 run(s)" in capsys.readouterr().out
    png = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert png.shape[:2] == (fig.canvas.get_width_height()[1], fig.canvas.get_width_height()[0])
    assert png.std() > 0
    fig.canvas.draw()  # the saved file has the figure's size and dpi: the same pixel boxes
    height = png.shape[0]
    for ax in fig.axes:
        box = ax.get_window_extent()
        region = png[int(height - box.y1) + 2:int(height - box.y0) - 2, int(box.x0) + 2:int(box.x1) - 2]
        non_white = (region < 250).any(axis=-1).mean()
        first_run = (np.abs(region - RUN_COLOUR).sum(axis=-1) < 40).sum()
        assert non_white > 0.002 and first_run > 20, (ax.get_title(), non_white, first_run)


def test_missing_metrics_are_skipped_with_a_note(tmp_path, capsys):
    a = _run(tmp_path / "a", keys=("reward_mean", "entropy"), evals=())
    (a / "results.json").unlink()
    out = tmp_path / "a.png"
    assert cli_main(["plot", str(a), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no run logged KL to the reference (kl): panel left out" in printed
    assert "no run has held-out evaluations" in printed and "benchmark panel left out" in printed
    fig, notes = plot_runs([load_run(a, "a")])
    assert [ax.get_title() for ax in fig.axes] == ["reward mean", "entropy"] and len(notes) == 6
    assert out.is_file()


def test_null_values_leave_gaps_not_errors(tmp_path):
    a = _run(tmp_path / "a", steps=6)
    rows = [json.loads(ln) for ln in (a / "metrics.jsonl").read_text().splitlines()[:-1]]
    rows[2]["kl"] = None  # metrics.py writes non-finite values as null
    rows[3]["entropy"] = "n/a"
    (a / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = load_run(a, "a")
    assert [s for s, _ in run.series["kl"]] == [1, 2, 4, 5, 6]
    assert [s for s, _ in run.series["entropy"]] == [1, 2, 3, 5, 6]


@pytest.mark.parametrize("case, expect", [
    ("missing", "run directory '{d}' does not exist"),
    ("no_file", "'{d}' has no metrics.jsonl"),
    ("empty", "{d}/metrics.jsonl holds no step rows"),
    ("not_rows", "{d}/metrics.jsonl holds no step rows"),
    ("labels", "--labels: 1 non-empty labels needed, one per run directory (2 given)"),
    ("suffix", "the figure is written as PNG"),
])
def test_bad_input_is_a_one_line_error_exit_2(tmp_path, capsys, case, expect):
    d = tmp_path / "run"
    args = [str(d)]
    if case != "missing":
        d.mkdir()
    if case == "empty":
        (d / "metrics.jsonl").write_text("")
    if case == "not_rows":
        (d / "metrics.jsonl").write_text('3\n["step"]\n{"step": "one"}\n')
    if case in ("labels", "suffix"):
        _run(tmp_path / "other")
        _run(d := tmp_path / "run2")
        args = [str(tmp_path / "other"), str(d)]
    out = tmp_path / ("curves.jpg" if case == "suffix" else "curves.png")
    extra = ["--labels", "only"] if case == "labels" else []
    assert cli_main(["plot", *args, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("selfjudge plot: ")
    assert expect.format(d=d) in err
    assert not out.exists()
