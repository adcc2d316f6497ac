"""Benchmark loaders and grading on fixture files in the published schemas (tests/eval/bench_fixtures.py).

Expected grades are hand-computed from the fixture rows and the benchmarks' rules (DATASETS.md).
A scripted policy answers each question with a chosen response, so every table below follows
from those responses alone.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_fixtures as F  # noqa: E402

from megatron_selfjudge.eval.benchmarks import BenchmarkData, BenchmarkError, get_benchmark, iter_items  # noqa: E402
from megatron_selfjudge.eval.benchmarks_grading import is_correct  # noqa: E402
from megatron_selfjudge.eval.run import EvalSettings, PolicyGenerator, evaluate_benchmark, write_results  # noqa: E402


def read(name: str, root: Path, **kw):
    data = BenchmarkData(get_benchmark(name), [])
    return list(iter_items(get_benchmark(name), root, data=data, **kw)), data


def scripted(responses: dict):
    """A generator answering item qid with responses[qid] (a string, or a list of K strings)."""
    def generate(items, settings):
        out = []
        for item in items:
            r = responses.get(item.qid, "no answer")
            out.append(list(r) if isinstance(r, (list, tuple)) else [r] * settings.n)
        return out
    return generate


def run(name: str, root: Path, responses: dict, **settings):
    return evaluate_benchmark(get_benchmark(name), root, scripted(responses), EvalSettings(**settings))


# ---------------------------------------------------------------- loading

def test_mathvision_hub_reads_test_split_and_reports_broken_rows(tmp_path):
    F.mathvision_hub(tmp_path)
    items, data = read("mathvision", tmp_path)
    assert [i.qid for i in items] == ["1", "2", "3", "5"]  # the testmini file is not read, id 4 is broken
    assert [Path(f).name for f in data.files] == ["test-00000-of-00001.parquet"]
    assert [(Path(s.file).name, s.row) for s in data.skipped] == [("test-00000-of-00001.parquet", 3)]
    assert "'F'" in data.skipped[0].reason
    opt, image_only, free = items[0], items[1], items[2]
    assert opt.prompt == "2+2?\nOptions:\nA. 3\nB. 4\nC. 5\nAnswer with the option's letter."
    assert (opt.kind, opt.gold, opt.choices) == ("choice", "B", ("3", "4", "5"))
    # Options drawn in the image: no option texts to render, the letters are named in the hint.
    assert image_only.choices == () and "A, B, C, D, E are shown in the image" in image_only.prompt
    assert (free.kind, free.gold, free.prompt) == ("free", "0.5", "1/2=?")
    assert items[0].categories == {"subject": ["algebra"], "level": ["1"]}
    assert items[0].images[0].size == (8, 8)


def test_images_stay_encoded_until_accessed(tmp_path):
    F.mathvision_hub(tmp_path)
    items, _ = read("mathvision", tmp_path)
    broken = items[3]
    assert broken.qid == "5"  # loading did not decode its image ...
    from megatron_selfjudge.data.datasets import DatasetError

    with pytest.raises(DatasetError, match=r"row 4: .*not a readable image"):
        broken.images[0]  # ... access does, and names the file and row


def test_tsv_layouts(tmp_path):
    F.mathvision_tsv(tmp_path)
    items, data = read("mathvision", tmp_path)
    assert [(i.qid, i.kind, i.gold, i.choices) for i in items] == [("1", "choice", "B", ("3", "4", "5")),
                                                                  ("2", "free", "0.5", ())]
    assert len(data.skipped) == 1 and data.skipped[0].row == 2 and "base64" in data.skipped[0].reason
    F.wemath_tsv(tmp_path)
    items, data = read("wemath", tmp_path)
    assert len(items) == 16 and not data.skipped and items[0].choices == ("1", "2", "3")
    F.dynamath_tsv(tmp_path)
    items, _ = read("dynamath", tmp_path)
    assert sorted((i.group, i.part) for i in items) == [(q, str(v)) for q in "123" for v in (1, 2, 3)]


def test_tsv_shared_image_reference_and_unknown_reference(tmp_path):
    F._write_tsv(tmp_path / "MathVision.tsv", [
        dict(index=1, image=F.b64png(5), question="a?", answer="1", choices="[]"),
        dict(index=2, image="1", question="b?", answer="2", choices="[]"),  # VLMEvalKit: the image of index 1
        dict(index=3, image="9", question="c?", answer="3", choices="[]"),  # no earlier row 9
    ])
    items, data = read("mathvision", tmp_path)
    assert [i.qid for i in items] == ["1", "2"] and items[1].images[0].size == (8, 8)
    assert data.skipped[0].row == 2 and "index 9" in data.skipped[0].reason


def test_missing_benchmark_files_is_one_line_error(tmp_path):
    with pytest.raises(BenchmarkError, match="MathVision: no files under"):
        read("mathvision", tmp_path)


def test_logicvista_json_multi_select_and_image_only_options(tmp_path):
    F.logicvista_json(tmp_path)
    items, data = read("logicvista", tmp_path)
    assert [(i.qid, i.gold) for i in items] == [("v1_0", "A"), ("v1_1", "B, D"), ("v1_2", "A, C")]
    assert data.skipped[0].row == 3 and "'maybe'" in data.skipped[0].reason
    assert items[1].categories == {"skill": ["deductive", "spatial"]} and "letters of every correct" in items[1].prompt


def test_image_path_outside_folder_is_refused_at_access(tmp_path):
    folder = tmp_path / "LogicVista"
    F.logicvista_json(tmp_path)
    data = json.loads((folder / "dataset.json").read_text())
    data["v1_0"]["imagename"] = "../../secret.png"
    (folder / "dataset.json").write_text(json.dumps(data))
    items, _ = read("logicvista", tmp_path)
    from megatron_selfjudge.data.datasets import DatasetError

    with pytest.raises(DatasetError, match="outside the data folder"):
        items[0].images[0]


def test_limit_counts_problems_with_all_their_parts(tmp_path):
    F.dynamath_hub(tmp_path)
    items, _ = read("dynamath", tmp_path, limit=2)
    assert sorted((i.group, i.part) for i in items) == [(q, str(v)) for q in "12" for v in (1, 2, 3)]
    F.mathvision_hub(tmp_path)
    items, _ = read("mathvision", tmp_path, limit=2)
    assert [i.qid for i in items] == ["1", "2"]


# ---------------------------------------------------------------- grading rules

@pytest.mark.parametrize("answer,ok", [("B", True), ("(B)", True), ("B. 4", True), ("4", True), ("\\text{B}", True),
                                       ("A", False), ("3", False), ("5", False), (None, False)])
def test_multiple_choice_letter_or_option_text(tmp_path, answer, ok):
    F.mathvision_hub(tmp_path)
    item = read("mathvision", tmp_path)[0][0]
    assert is_correct(item, answer) is ok


@pytest.mark.parametrize("answer,ok", [("B, D", True), ("D,B", True), ("\\text{D and B}", True), ("(B) (D)", True),
                                       ("B", False), ("B, C, D", False), ("BD", False)])
def test_logicvista_letter_sets(tmp_path, answer, ok):
    F.logicvista_json(tmp_path)
    item = read("logicvista", tmp_path)[0][1]
    assert is_correct(item, answer) is ok


@pytest.mark.parametrize("answer,ok", [("1.25", True), ("1.2505", True), ("1.251", True), ("1.2511", False),
                                       ("5/4", True), ("1.3", False)])
def test_dynamath_float_tolerance(tmp_path, answer, ok):
    F.dynamath_hub(tmp_path)
    item = read("dynamath", tmp_path)[0][0]
    assert item.gold == "1.25" and is_correct(item, answer) is ok


def test_dynamath_text_is_a_substring_rule(tmp_path):
    F.dynamath_hub(tmp_path)
    text = [i for i in read("dynamath", tmp_path)[0] if i.kind == "text"][0]
    assert text.gold == "yes1"
    assert is_correct(text, "\\text{Yes1, it is}") and not is_correct(text, "no")


@pytest.mark.parametrize("pid,answer,ok", [("1", "B", True), ("1", "blue", True), ("1", "bleu", True),
                                           ("1", "red", False), ("2", "3", True), ("2", "3.7", True),
                                           ("2", "4", False), ("3", "1.54", True), ("3", "1.56", False)])
def test_mathvista_normalisation(tmp_path, pid, answer, ok):
    F.mathvista_hub(tmp_path)
    item = {i.qid: i for i in read("mathvista", tmp_path)[0]}[pid]
    assert is_correct(item, answer) is ok


# ---------------------------------------------------------------- benchmark scores

def test_wemath_strict_and_loose_four_dimensions(tmp_path):
    """Hand-computed: composite 1 strict RM / loose CM, 2 IG, 3 RM both, 4 IK, 5 (3-step) CM."""
    F.wemath_hub(tmp_path)
    right, wrong = F.boxed("A"), F.boxed("B")
    plan = {"1": ([right, wrong], right), "2": ([right, right], wrong), "3": ([wrong, wrong], right),
            "4": ([wrong, right], wrong), "5": ([right, right, right], right)}
    responses = {}
    for pid, (subs, composite) in plan.items():
        steps = len(subs)
        for k, r in enumerate(subs, 1):
            responses[f"{pid}:{steps}steps_{k}"] = r
        responses[f"{pid}:{steps}steps_multi"] = composite
    s = run("wemath", tmp_path, responses).summary
    assert (s.graded, s.correct) == (16, 10)  # plain accuracy over rows: 2 + 2 + 1 + 1 + 4 of 16
    assert s.scores["composites"] == 5 and s.scores["incomplete_composites"] == 0
    strict, loose = s.scores["strict"], s.scores["loose"]
    assert {k: strict[k] for k in ("IK", "IG", "CM", "RM")} == {"IK": 1, "IG": 1, "CM": 1, "RM": 2}
    assert {k: loose[k] for k in ("IK", "IG", "CM", "RM")} == {"IK": 1, "IG": 1, "CM": 2, "RM": 1}
    assert strict["score"] == pytest.approx((5 - 0.5 - 2 - 1) / 5)  # 0.3
    assert loose["score"] == pytest.approx((5 - 0.5 - 1 - 1) / 5)  # 0.5
    assert s.categories["problem"]["2-step composite"] == {"n": 4, "correct": 2, "accuracy": 0.5}


def test_wemath_incomplete_composite_is_not_scored(tmp_path):
    F.wemath_hub(tmp_path)
    s = run("wemath", tmp_path, {}, limit=1).summary
    assert s.graded == 3 and s.scores["composites"] == 1


def test_dynamath_worst_case_over_variants(tmp_path):
    """q1 right in all 3 variants, q2 in 2 of 3, q3 in none: average 5/9, worst case 1/3."""
    F.dynamath_hub(tmp_path)
    responses = {f"1:v{v}": F.boxed(F.dynamath_gold("1", v)) for v in (1, 2, 3)}
    responses.update({"2:v1": F.boxed("A"), "2:v2": F.boxed("B"), "2:v3": F.boxed("A")})  # v3's gold is C
    s = run("dynamath", tmp_path, responses).summary
    assert s.accuracy == pytest.approx(5 / 9)
    assert s.scores["worst_case_accuracy"] == pytest.approx(1 / 3) and s.scores["questions"] == 3
    assert s.scores["average_accuracy"] == pytest.approx(5 / 9)
    assert s.categories["subject"]["subjA"]["correct"] == 3 and s.categories["subject"]["subjB"]["correct"] == 2


def test_mathverse_accuracy_per_version(tmp_path):
    """Problem 1 (MC, gold B) right in its text versions only, problem 2 (gold 12) right except Vision Only."""
    rows = F.mathverse_hub(tmp_path)
    responses = {}
    for r in rows:
        text_version = r["problem_version"] in ("Text Dominant", "Text Lite")
        if r["problem_index"] == "1":
            responses[r["sample_index"]] = F.boxed("B" if text_version else "A")
        else:
            responses[r["sample_index"]] = F.boxed("13" if r["problem_version"] == "Vision Only" else "12")
    s = run("mathverse", tmp_path, responses).summary
    per = {v: c["accuracy"] for v, c in s.categories["version"].items()}
    assert per == {"Text Dominant": 1.0, "Text Lite": 1.0, "Vision Intensive": 0.5, "Vision Dominant": 0.5,
                   "Vision Only": 0.0}
    assert s.accuracy == pytest.approx(6 / 10)


def test_majority_at_k_groups_a_letter_with_its_option_text(tmp_path):
    """K=3: 'A', '4' (= option B's text) and 'B' -> B wins 2:1 as one class; sampled pass@1 is 2/3."""
    F.mathvision_hub(tmp_path)
    res = run("mathvision", tmp_path, {"1": [F.boxed("A"), F.boxed("4"), F.boxed("B")]}, n=3, limit=1)
    assert res.summary.accuracy == 1.0 and res.summary.sampled_pass1 == pytest.approx(2 / 3)
    assert res.predictions[0]["canonical"] == "B"


def test_report_files_and_counts(tmp_path):
    F.mathvision_hub(tmp_path)
    F.dynamath_hub(tmp_path)
    settings = EvalSettings()
    results = [evaluate_benchmark(get_benchmark("mathvision"), tmp_path,
                                  scripted({"1": F.boxed("B"), "3": F.boxed("\\frac{1}{2}")}), settings),
               evaluate_benchmark(get_benchmark("dynamath"), tmp_path, scripted({}), settings)]
    out = write_results(tmp_path / "out", results, settings, "fixture")
    doc = json.loads((out / "mathvision.json").read_text())
    assert (doc["graded"], doc["correct"], doc["skipped"]) == (4, 2, 1) and doc["accuracy"] == 0.5
    assert doc["skipped_rows"][0]["row"] == 3 and doc["settings"]["metric"] == "greedy"
    assert "rule-based" in doc["protocol"] and "torch" in doc["versions"]
    preds = [json.loads(ln) for ln in (out / "mathvision.predictions.jsonl").read_text().splitlines()]
    assert [(p["id"], p["extracted"], p["gold"], p["correct"]) for p in preds][:3] == [
        ("1", "B", "B", True), ("2", None, "D", False), ("3", "\\frac{1}{2}", "0.5", True)]
    report = (out / "report.md").read_text()
    assert "| MathVision | 50.0 | 2 | 4 | 1 |" in report and "| DynaMath | 0.0 | 0 | 9 | 0 |" in report
    assert "| average | 25.0 |" in report


# ---------------------------------------------------------------- generation through a family

class _Family:
    """The part of a model family PolicyGenerator uses: one id per character, images as tensors."""

    multimodal = True

    def prompt_ids(self, question, num_images, instruction):
        return [-200] * num_images + [ord(c) % 100 for c in question + instruction]

    def num_images(self, images):
        return len(images)

    def images(self, images):
        return torch.zeros(len(images), 3, 4, 4)

    def expand_images(self, ids, images):
        return ids


class _Engine:
    """Answers \\boxed{B}, or `texts[uid]`; extraction prompts (uid extract:...) get \\boxed{0.5}."""

    def __init__(self, texts=None):
        self.calls, self.texts = [], texts or {}

    def generate(self, requests, sampling):
        from megatron_selfjudge.rollout.base import Trajectory

        self.calls.append(([r.uid for r in requests], sampling))
        return [Trajectory(r.uid, k, r.prompt_ids, [1], torch.zeros(1), "stop",
                           "\\boxed{0.5}" if r.uid.startswith("extract:") else self.texts.get(r.uid, F.boxed("B")))
                for r in requests for k in range(sampling.n)]


def test_policy_generator_skips_undecodable_images_and_long_prompts(tmp_path):
    F.mathvision_hub(tmp_path)
    engine = _Engine()
    res = evaluate_benchmark(get_benchmark("mathvision"), tmp_path, PolicyGenerator(_Family(), engine, 110),
                             EvalSettings(instruction="short"))
    reasons = {s.row: s.reason for s in res.skipped}
    assert "not a readable image" in reasons[4]  # qid 5: its image bytes are broken
    assert "exceeds rollout.max_prompt_len=110" in reasons[1]  # qid 2's hint makes its prompt too long
    uids, sampling = engine.calls[0]
    assert uids == ["mathvision:1", "mathvision:3"] and sampling.greedy and sampling.n == 1
    assert res.summary.graded == 2 and res.summary.correct == 1  # 'B' is right for qid 1 only


def test_policy_extractor_restates_answers_without_a_box(tmp_path):
    """qid 3 (gold 0.5) answers in words: the rule finds nothing; --extractor policy asks the model."""
    F.mathvision_hub(tmp_path)
    texts = {"mathvision:3": "<think>half</think> it is one half"}
    for extractor, correct in (("rule", 1), ("policy", 2)):
        engine = _Engine(texts)
        policy = PolicyGenerator(_Family(), engine, 400)
        res = evaluate_benchmark(get_benchmark("mathvision"), tmp_path, policy,
                                 EvalSettings(instruction="short", extractor=extractor, max_new_tokens=16),
                                 extract=policy.extract)
        pred = {p["id"]: p for p in res.predictions}["3"]
        assert res.summary.correct == correct
        if extractor == "rule":
            assert len(engine.calls) == 1 and pred["extracted"] is None and pred["extracted_by"] is None
        else:
            uids, sampling = engine.calls[1]
            assert uids == ["extract:mathvision:3:0"] and sampling.greedy and sampling.max_new_tokens == 16
            assert (pred["extracted"], pred["extracted_by"], pred["correct"]) == ("0.5", "policy", True)


def test_tsv_layouts_of_the_other_benchmarks(tmp_path):
    F.mathverse_tsv(tmp_path)
    items, data = read("mathverse", tmp_path)
    assert [(i.part, i.kind, i.gold) for i in items] == [("Text Dominant", "choice", "B"),
                                                        ("Vision Only", "choice", "B")]
    assert items[1].prompt.startswith("Answer the question shown in the image.") and items[1].images[0].size == (8, 8)
    F.logicvista_tsv(tmp_path)
    items, data = read("logicvista", tmp_path)
    assert [(i.gold, len(i.images)) for i in items] == [("A, C", 2), ("B", 1)] and not data.skipped
    assert items[0].categories == {"skill": ["spatial", "deductive"]}
    F.mathvista_tsv(tmp_path)
    items, data = read("mathvista", tmp_path)
    assert [(i.kind, i.gold, i.precision) for i in items] == [("choice", "B", None), ("float", "1.5", 1)]
    assert items[1].prompt.endswith("(unit: cm)") and is_correct(items[0], "blue") and is_correct(items[1], "1.52")


def _dp_eval(rank: int, world_size: int, root: str) -> tuple[list, list]:
    """One data-parallel rank's evaluation of the DynaMath fixture with a uid-keyed fake engine."""
    from megatron_selfjudge.megatron.parallel import initialize_parallel

    initialize_parallel(tp=1, pp=1)
    engine = _Engine({f"dynamath:{q}:v{v}": F.boxed(F.dynamath_gold(q, v)) for q, v in (("1", 1), ("2", 3), ("3", 2))})
    res = evaluate_benchmark(get_benchmark("dynamath"), root, PolicyGenerator(_Family(), engine, 400),
                             EvalSettings(instruction="short", batch_size=4))
    return [(p["id"], p["response"], p["correct"]) for p in res.predictions], [u for uids, _ in engine.calls
                                                                                 for u in uids]


@pytest.mark.slow
def test_data_parallel_ranks_share_generation_and_agree(tmp_path):
    """DP=2: each rank generates for half of every batch; both grade all 9 items as DP=1 does."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "megatron"))
    from dist_utils import run_distributed

    F.dynamath_hub(tmp_path)
    (one, one_uids), = run_distributed(_dp_eval, 1, str(tmp_path))
    (r0, uids0), (r1, uids1) = run_distributed(_dp_eval, 2, str(tmp_path))
    # Right: the three scripted golds, and the default \boxed{B} on question 2's variant 2 (gold B).
    assert r0 == r1 == one and sum(c for _, _, c in one) == 4
    assert not set(uids0) & set(uids1) and sorted(uids0 + uids1) == sorted(one_uids) and len(one_uids) == 9
