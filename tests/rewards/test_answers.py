import importlib.util
import pathlib
import re
import threading
import time

import pytest

from megatron_selfjudge.rewards import answers as A
from megatron_selfjudge.rewards.answers import (
    answer_classes, answers_equivalent, extract_boxed, normalize_answer, symbolic_worker,
)

_spec = importlib.util.spec_from_file_location(
    "equivalence_cases", pathlib.Path(__file__).with_name("equivalence_cases.py"))
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)
CASES = _cases.CASES
# The table is read under load on a shared 2-core box: give SymPy room so a slow parse is
# not mistaken for an inequality (the bound itself is tested separately below).
TABLE_TIMEOUT = 30.0


def test_table_is_large_and_covers_all_modes():
    assert len(CASES) >= 60
    assert {m for _, _, m, _, _ in CASES} == {"symbolic", "normalized", "exact"}
    assert any(exp for *_, exp, _ in CASES) and any(not exp for *_, exp, _ in CASES)


@pytest.mark.parametrize("a,b,mode,expected,why", CASES, ids=[c[4] for c in CASES])
def test_equivalence_table(a, b, mode, expected, why):
    assert answers_equivalent(a, b, mode, timeout=TABLE_TIMEOUT) is expected
    # equivalence is symmetric in every mode
    assert answers_equivalent(b, a, mode, timeout=TABLE_TIMEOUT) is expected


def test_normalization_is_idempotent_on_the_table():
    for a, b, *_ in CASES:
        for x in (a, b):
            assert normalize_answer(normalize_answer(x)) == normalize_answer(x), x


def test_modes_are_nested_on_the_table():
    # exact-equal implies normalized-equal implies symbolic-equal, for every pair in the table
    for a, b, *_ in CASES:
        if answers_equivalent(a, b, "exact"):
            assert answers_equivalent(a, b, "normalized"), (a, b)
        if answers_equivalent(a, b, "normalized"):
            assert answers_equivalent(a, b, "symbolic", timeout=TABLE_TIMEOUT), (a, b)


# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{2}", "2"),
    (r"\boxed {x+1}", "x+1"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{a{b}c}", "a{b}c"),
    (r"\boxed{}", ""),
    (r"\boxed{\boxed{7}}", "7"),
    ("no box here", None),
    (r"\boxed{1", None),
    (r"\boxed{1} and a truncated \boxed{2", None),
    (r"\boxed 5", None),
    ("", None),
    # issue 11: the last WELL-FORMED box wins; a brace-less mention of the word is skipped
    (r"\boxed{5} ... then \boxed without braces", "5"),
    (r"\boxed{5}. \boxed", "5"),
    (r"\boxed{5} and \boxed 7", "5"),
    (r"\boxed{3} and \boxedfoo{4}", "3"),
    (r"\boxed{5}, as asked, within \boxed{}", "5"),
    (r"\boxed{5} then \boxed{ }", "5"),
    (r"\boxed{} only", ""),
    (r"\boxed{5} \boxed without braces, then truncated \boxed{6", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_rejects_non_str():
    with pytest.raises(TypeError, match="text"):
        extract_boxed(None)


def _timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def test_extract_boxed_nested_braces_fast():
    depth = 10_000
    inner = "{" * depth + "7" + "}" * depth
    out, dt = _timed(extract_boxed, r"\boxed{" + inner + "}")
    assert out == inner and dt < 0.5
    out, dt = _timed(extract_boxed, r"\boxed{" + "{" * depth)  # never closed
    assert out is None and dt < 0.5


def test_extract_boxed_many_braceless_mentions_fast():
    text = r"\boxed{42}" + r" \boxed" * 200_000
    out, dt = _timed(extract_boxed, text)
    assert out == "42" and dt < 0.5
    out, dt = _timed(extract_boxed, r"\boxed{42}" + r" \boxed{}" * 200_000)
    assert out == "42" and dt < 0.5


def test_extract_boxed_megabyte_fast():
    big = "x" * 1_000_000
    out, dt = _timed(extract_boxed, big + r"\boxed{42}")
    assert out == "42" and dt < 0.5
    out, dt = _timed(extract_boxed, r"\boxed{" + "{}" * 500_000 + "}")
    assert out == "{}" * 500_000 and dt < 0.5
    out, dt = _timed(extract_boxed, r"\boxed{" + big)
    assert out is None and dt < 0.5


# ------------------------------------------------------------------ normalisation


@pytest.mark.parametrize("raw,norm", [
    (r"\left( 1, 2 \right)", "(1,2)"),
    (r"\text{A}", "A"),
    ("(B)", "B"),
    ("B.", "B"),
    ("option C", "C"),
    ("D) 30", "D"),
    (r"30^\circ", "30"),
    (r"30^{\circ}", "30"),
    ("30°", "30"),
    (r"\dfrac12", r"\frac{1}{2}"),
    (r"\tfrac{3}{4}", r"\frac{3}{4}"),
    (r"5 \text{ cm}", "5"),
    ("1,000", "1000"),
    (r"50\%", "50"),
    ("$x$", "x"),
    (r"\sin x", r"\sin x"),
    ("{5}", "5"),
    ("x = 2.", "x=2"),
    (r"\mathrm{\text{7}}", "7"),
    (r"\textbf{x} + 1", "x+1"),
    (r"\left[ 0, 1 \right)", "[0,1)"),
    (r"a \rightarrow b", r"a\rightarrow b"),
    (r"\big( x \big)", "(x)"),
    (r"x \circ y", r"x\circ y"),
    (r"30\circ", "30"),
    (r"45 \degree", "45"),
    (r"\circle", r"\circle"),
    (None, ""),
    (r"\varnothing", r"\emptyset"),
    ("∅", r"\emptyset"),
    (r"\{ \}", r"\emptyset"),
    ("−3", "-3"),
    (".5", "0.5"),
    ("(-.5, .25)", "(-0.5,0.25)"),
    (r"\sqrt2", r"\sqrt{2}"),
    (r"\sqrt23", r"\sqrt{2}3"),
    ("√12", r"\sqrt{12}"),
    (r"\frac1{2}", r"\frac{1}{2}"),
    ("2 1/2", r"2\frac{1}{2}"),
    ("5, 100", "5, 100"),
    ("5,100", "5100"),
    ("1, 2", "1,2"),
    ("(1,000)", "(1,000)"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_normalize_rejects_non_str():
    with pytest.raises(TypeError, match="answer"):
        normalize_answer(3)


def test_normalize_pathological_fast():
    for text in ("{" * 10_000 + "}" * 10_000, r"\text{" * 10_000 + "}" * 10_000,
                 "a" * 1_000_000, r"\frac{1}{" * 500 + "2" + "}" * 500):
        _, dt = _timed(normalize_answer, text)
        assert dt < 0.5


def test_size_refusals():
    assert A.symbolic_refusal("x" * (A.MAX_SYMBOLIC_LEN + 1)) == "length"
    assert A.symbolic_refusal(r"\frac{1}{" * 9 + "2" + "}" * 9) == "frac"
    assert A.symbolic_refusal("(" + "{" * 13 + "x" + "}" * 13 + ")") == "depth"
    assert A.symbolic_refusal("10^{10^{10}}") == "exponent"
    assert A.symbolic_refusal("x^{2}+2x+1") is None
    assert A.symbolic_refusal(r"\frac{\sqrt{3}}{2}") is None


@pytest.mark.parametrize("a,b,expected", [
    ("{" * 10_000 + "1" + "}" * 10_000, "1", False),
    ("{" * 10_000 + "1" + "}" * 10_000, "{" * 10_000 + "1" + "}" * 10_000, True),
    ("1" * 1_000_000, "1" * 999_999 + "2", False),
    (r"\frac{1}{" * 500 + "2" + "}" * 500, "0", False),
    (r"\frac{1}{" * 500 + "2" + "}" * 500, r"\frac{1}{" * 500 + "2" + "}" * 500, True),
    ("10^{10^{10}}", "10^{10^{9}}", False),
    # 10^200 - 1 vs 10^200: equal within 1e-6 relative (this was False only while `1e200`
    # was misread as 1*e*200)
    ("99999999999999999999" * 10, "1e200", True),
    ("99999999999999999999" * 10, "1e199", False),
    ("1e99999", "1e99998", False),
    ("10^{99999}", "10^{99998}", False),
    (r"(1,2)" * 30, r"\{1,2\}" * 30, False),
])
def test_pathological_comparisons_definite_and_fast(a, b, expected):
    out, dt = _timed(answers_equivalent, a, b, "symbolic")
    assert out is expected and dt < 1.0


# ------------------------------------------------------------------ time bound


SLOW_A, SLOW_B = "(x+1)^{1000}", "(x+2)^{1000}"  # SymPy needs many seconds to decide


def test_time_bound_holds_in_a_worker_thread():
    worker = symbolic_worker()
    assert worker.compare("x+1", "1+x", timeout=TABLE_TIMEOUT)  # warm the worker first
    before = worker.timeouts
    result = {}

    def run():
        result["eq"], result["dt"] = _timed(answers_equivalent, SLOW_A, SLOW_B, timeout=0.5)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert result["eq"] is False
    assert result["dt"] < 2.5, result["dt"]  # 0.5 s bound plus killing the worker
    assert worker.timeouts == before + 1
    # the worker is restarted transparently afterwards
    assert answers_equivalent("x^2+2x+1", "(x+1)^2", timeout=TABLE_TIMEOUT)


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout"):
        symbolic_worker().compare("x", "y", timeout=0)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="equivalence mode"):
        answers_equivalent("1", "1", "fuzzy")
    with pytest.raises(ValueError, match="equivalence mode"):
        answer_classes(["1"], "fuzzy")


# ------------------------------------------------------------------ classes


def test_answer_classes_first_seen_order():
    answers = ["7", r"\frac{14}{2}", None, "", "x+1", "7.0", "1+x", "B", "(B)", "3"]
    assert answer_classes(answers, "symbolic", timeout=TABLE_TIMEOUT) == \
        [0, 0, None, None, 1, 0, 1, 2, 2, 3]
    assert answer_classes(answers, "normalized") == [0, 1, None, None, 2, 3, 4, 5, 5, 6]
    assert answer_classes(answers, "exact") == [0, 1, None, None, 2, 3, 4, 5, 6, 7]


def test_answer_classes_exact_strips_whitespace():
    assert answer_classes(["5", " 5\n", "\t", "5 ", "05"], "exact") == [0, 0, None, 0, 1]


def test_answer_classes_keep_tuples_and_sets_apart():
    # A majority vote must not merge the pair (1,2) with the set {1,2}, nor (1,2) with [1,2].
    answers = ["(1,2)", r"\{1,2\}", r"\{2,1\}", "(2,1)", "[1,2]", "1e3", "1000", r"\varnothing",
               r"\emptyset"]
    assert answer_classes(answers, "symbolic", timeout=TABLE_TIMEOUT) == [0, 1, 1, 2, 3, 4, 4, 5, 5]


def test_answer_classes_memoises(monkeypatch):
    calls = []
    real = A._equal_normalized

    def counting(na, nb, mode, timeout):
        calls.append((na, nb))
        return real(na, nb, mode, timeout)

    monkeypatch.setattr(A, "_equal_normalized", counting)
    distinct = [str(k) for k in range(8)]
    assert answer_classes(distinct * 3, "symbolic") == list(range(8)) * 3
    g = len(distinct)
    assert len(calls) == g * (g - 1) // 2  # each distinct pair once, repeats are free
    assert len(set(calls)) == len(calls)


def test_worker_survives_being_killed():
    worker = symbolic_worker()
    assert worker.compare("2x", "x+x", timeout=TABLE_TIMEOUT)
    restarts = worker.restarts
    worker._proc.kill()
    worker._proc.wait()
    assert worker.compare("3x", "x+2x", timeout=TABLE_TIMEOUT)  # a pair not in the cache
    assert worker.restarts == restarts + 1


def test_module_never_evals():
    source = pathlib.Path(A.__file__).read_text()
    assert not re.search(r"\beval\(|\bexec\(", source)
