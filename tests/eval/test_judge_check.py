"""eval/judge_check.py: the candidates it grades, the AUC and the per-kind summary, by hand."""
import pytest

from megatron_selfjudge.data.prompts import sft_target
from megatron_selfjudge.data.synthetic import make_synthetic_splits
from megatron_selfjudge.eval.judge_check import RIGHT, auc, candidates, summarize
from megatron_selfjudge.rewards.answers import extract_boxed


def test_auc_by_hand():
    assert auc([1.0, 0.8], [0.2, 0.8]) == pytest.approx((1 + 1 + 1 + 0.5) / 4)  # one tie counts half
    assert auc([0.1], [0.9]) == 0.0 and auc([0.9], [0.1]) == 1.0
    assert auc([], [0.5]) is None and auc([0.5], []) is None


def test_summary_leaves_unparsed_out_of_means_and_counts_them_zero_in_the_auc():
    kinds = [RIGHT, RIGHT, "slip", "misread", "misread"]
    s = summarize(kinds, [1.0, None, 0.2, 0.3, None])
    assert s["kinds"][RIGHT] == {"candidates": 2, "unparsed": 1, "mean_score": 1.0}
    assert s["kinds"]["misread"] == {"candidates": 2, "unparsed": 1, "mean_score": 0.3}
    assert s["kinds"]["slip"]["mean_score"] == pytest.approx(0.2)
    # right [1, 0] vs flawed [0.2, 0.3, 0]: 1 beats all three; 0 loses to 0.2 and 0.3 and ties 0.
    assert s["auc_right_vs_flawed"] == pytest.approx((3 + 0.5) / 6)


def test_candidates_are_each_problem_right_then_flawed():
    examples = make_synthetic_splits(seed=2, n_sft=1, n_unlabeled=1, n_test=8)["test"]
    cands = candidates(examples, seed=0)
    assert [i for i, _, _ in cands] == sorted(i for i, _, _ in cands)
    for i, ex in enumerate(examples):
        mine = [(k, t) for j, k, t in cands if j == i]
        assert mine[0] == (RIGHT, sft_target(ex))
        assert len(mine) >= 2 and all(extract_boxed(t) != ex.answer for k, t in mine[1:])


def test_bad_arguments_are_one_line(tmp_path, capsys):
    from megatron_selfjudge.eval.judge_check import main

    assert main(["--checkpoint", str(tmp_path), "--limit", "-3"]) == 2
    assert capsys.readouterr().err == "judge_check: --limit and --temperature must be >= 0\n"
    assert main(["--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("judge_check: checkpoint ") and "does not exist" in err and err.count("\n") == 1
