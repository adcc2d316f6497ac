r"""Final-answer extraction and answer equivalence (exact | normalized | symbolic).

Model text is untrusted: nothing here evals it. Symbolic comparison uses math-verify
(parse LaTeX to SymPy, then compare) in a separate worker process, because math-verify's
own timeout is `signal.alarm`, which only works in the main thread and cannot interrupt a
SymPy call holding the GIL. The worker is killed and restarted when a comparison runs past
its time bound, so the bound holds from any thread. Inputs over a size limit are refused
before parsing and compare unequal unless their normalised strings are identical.

Extraction (`extract_boxed`): the content of the last WELL-FORMED `\boxed{...}` (balanced
braces). A mention of the word `\boxed` with no brace after it, a different command such as
`\boxedfoo`, and an empty box (`within \boxed{}` echoed from the prompt) are skipped and the
search goes on backwards; a last box left unclosed means the response was cut off: no answer.

Normalisation (`normalize_answer`, used by `normalized` and `symbolic`): strip `$` and `\$`,
`\left`/`\right`/`\displaystyle`, spacing commands; Unicode `−` `×` `·` `π` `∞` `∅` `√` become
`-` `\times` `\cdot` `\pi` `\infty` `\emptyset` `\sqrt` (`√12` is `\sqrt{12}`); `\varnothing`,
`∅` and `\{\}` become `\emptyset`; `\dfrac`/`\tfrac` -> `\frac`, and brace-less arguments are
read one token at a time as TeX does (`\frac12`, `\frac1{2}` -> `\frac{1}{2}`, `\sqrt2` ->
`\sqrt{2}`, `\sqrt23` -> `\sqrt{2}3`); `.5` -> `0.5`; unwrap `\text{}`, `\mathrm{}`,
`\textbf{}`, `\mbox{}`, `\boxed{}` (and similar); drop degree marks (`^\circ`, `^{\circ}`,
`°`, `\degree`, a `degrees` unit) and percent signs (not converted: `50\%` stays 50, the value
MathVista stores, and is not 0.5); drop whitespace (kept as one space between a command and a
letter, `\sin x`); drop trailing periods and enclosing braces; drop a unit right after a
number or `}`: cm, mm, m, km, in/inch(es), ft/feet, meters, centimeters, millimeters,
kilometers, unit(s), deg/degree(s), percent, optionally `sq`/`square` before and `^2`/`^3` after.
Choice letters `A`, `(A)`, `A.`, `A)`, `A:`, `option A`, `(A) text`, `A. text` become `A`
(upper case only: `a` is a variable). Answers over MAX_NORMALIZE_LEN characters only lose
their whitespace.

Notations of numbers (the rules `normalized`/`symbolic` follow):
- thousands separators: a whole answer that is one number with commas before groups of
  exactly three digits and no space after any comma is that number (`1,000`, `12,345.5`,
  `1{,}000` are 1000 and 12345.5, as in MATH's grader and math-verify). A comma followed by a
  space separates list items (`5, 100` is the list of 5 and 100, kept as `5, 100`), and inside
  brackets commas always separate elements (`(1,000)` is a pair). No decimal comma: `1,5` is
  a list;
- scientific notation is a number: `1e3`, `1E3`, `1.5E+03`, `1.5\times10^{3}`,
  `1.5\cdot10^3` (exact, via Fractions, for exponents up to MAX_DECIMAL_EXPONENT); inside
  longer expressions e-literals are rewritten to `\times10^{..}` before parsing, since the
  parser reads `1e3` as 1*e*3. A digit run must start the literal and an integer must follow
  the `e`: `2e` and `e^{3}` keep Euler's number, and `2e-3` is 0.002;
- mixed numbers: an integer directly before `\frac{p}{q}` of integers is a mixed number
  (`2\frac{1}{2}` = 5/2, as in MATH and math-verify), as is `2 1/2` (MATH's grader);
  products are written `2\cdot\frac{1}{2}`;
- `-0` equals `0`, `0.5` equals `.5` and `\frac{1}{2}`; degrees and percent as above.

Containers (decided to agree with the PRM800K/MATH rule-based grader, the family of the
`mathruler.grader` that EasyR1's math reward, and so MM-UPT, uses, and with math-verify
wherever the two agree):
- `\{...\}` is a set: order and repeats do not matter (`\{1,2\}` == `\{2,1,2\}`);
- a bracketed list is ordered and its brackets matter: `(1,2)` != `(2,1)`, `[1,2]` != `(1,2)`
  != `(1,2]` != `[1,2)`. `(a, b)` is one notation whether read as the open interval or the
  ordered pair, so both readings give the same verdicts (the parser makes `(1,2)` an open
  interval and `(2,1)` a tuple; both compare as the ordered pair of their ends);
- a tuple or interval never equals a set, at any depth (`(1,2)` != `\{1,2\}`,
  `\{(1,2)\}` != `\{\{1,2\}\}`); math-verify would accept both;
- a bare list `1, 2` (no brackets) is an unordered list of answers, i.e. a set: it equals
  `2, 1` and `\{1,2\}` but not the pair `(1,2)` (math-verify's special case equating it with
  an open interval is not kept: it would make the relation intransitive, `(1,2)` ~ `1,2` ~
  `2,1` ~ `(2,1)`);
- a single value equals the one-element set of it (`2` == `\{2\}`), as in math-verify;
- `\emptyset` equals its synonyms and nothing else (not `\{\emptyset\}`, not 0).

Symbolic equality: identical normalised strings are equal; a choice letter equals only the
same letter; point/segment/angle names (`AB`, `\angle ABC`) compare as strings; two plain
numeric literals (including scientific notation and mixed numbers) compare exactly as
fractions within REL_TOL; bracketed lists with different brackets are unequal; everything
else goes to the worker: math-verify parses both, answers whose container structure differs
(set vs tuple/interval, sizes, nesting) are unequal, closed-form numbers (sqrt, pi, powers...)
compare within REL_TOL relative (+ABS_TOL), other objects through math-verify's `verify` in
either direction. Exponents with five or more digits (`10^{99999}`, `1e99999`) are refused.
Empty answers equal nothing.

`exact` compares the raw strings with surrounding whitespace stripped (inner whitespace
counts); an answer that is only whitespace is empty.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from fractions import Fraction

import numpy as np

EQUIVALENCE_MODES = ("exact", "normalized", "symbolic")

# Defaults for the symbolic path. Answers in the target benchmarks are short; anything
# beyond these is almost certainly degenerate model output, not a real answer.
SYMBOLIC_TIMEOUT_S = 5.0  # math-verify's own default bound
MAX_SYMBOLIC_LEN = 200
MAX_BRACE_DEPTH = 12
MAX_FRAC_COUNT = 8
MAX_NORMALIZE_LEN = 4096  # longer "answers" are degenerate: only whitespace is removed
_RESULT_CACHE_SIZE = 1 << 16
REL_TOL = 1e-6
ABS_TOL = 1e-12  # only matters for values at (or extremely near) zero

_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)


_ESCAPE_RE = re.compile(r"\\.", re.DOTALL)
_VECTOR_SCAN_MIN = 4096  # tokens; below this a Python scan is cheaper than going through numpy


def _match_brace(text: str, open_idx: int) -> int | None:
    """Index of the '}' closing the '{' at open_idx, or None; escaped braces do not count."""
    depth = 0
    for n, m in enumerate(_BRACE_TOKEN.finditer(text, open_idx)):
        if n == _VECTOR_SCAN_MIN:
            # A short box closes within a few tokens, however long the text after it; past
            # this many tokens a prefix sum over the rest is cheaper than this loop.
            return _match_brace_vectorised(text, open_idx)
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return None


def _match_brace_vectorised(text: str, open_idx: int) -> int | None:
    # A Python loop over a megabyte of braces takes about a second; a prefix sum takes ms.
    seg = _ESCAPE_RE.sub("##", text[open_idx:])  # same length, escapes neutralised
    codes = np.frombuffer(seg.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    depth = np.cumsum((codes == ord("{")).astype(np.int64) - (codes == ord("}")))
    zeros = np.flatnonzero(depth == 0)
    return open_idx + int(zeros[0]) if zeros.size else None


# A box opening: `\boxed{` or `\boxed {`, not `\boxedfoo{`, not the word `\boxed` alone.
_BOX_OPEN_RE = re.compile(r"\\boxed[ \t]*\{")
_NONEMPTY_BOX_OPEN_RE = re.compile(r"\\boxed[ \t]*\{(?!\s*\})")  # `within \boxed{}` is no answer


def extract_boxed(text: str) -> str | None:
    r"""Content of the last well-formed, non-empty `\boxed{...}`; None if there is none or it is unclosed."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    last = None
    for last in _NONEMPTY_BOX_OPEN_RE.finditer(text):  # one C-level scan, whatever the mentions
        pass
    if last is None:
        return "" if _BOX_OPEN_RE.search(text) else None  # only empty boxes: an empty answer
    open_idx = last.end() - 1
    close = _match_brace(text, open_idx)
    # A truncated last box means the response never finished its answer: no answer.
    return None if close is None else text[open_idx + 1 : close]


# ---------------------------------------------------------------- normalisation

_WRAPPERS = ("text", "textbf", "textit", "textrm", "mathrm", "mathbf", "mathit", "mbox", "boxed")
_WRAPPER_RE = re.compile(r"\\(" + "|".join(_WRAPPERS) + r")\s*\{")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_DEGREE_RE = re.compile(
    r"\^\s*\{\s*\\(?:circ|degree)\s*\}|\^\s*\\(?:circ|degree)(?![A-Za-z])|°"
    r"|(?<=[\d}])\s*\\(?:circ|degree)(?![A-Za-z])"  # a bare `30\circ`; `f \circ g` stays
)
# `\left(` -> `(`, but `\leftarrow` is a different command and stays.
_SIZING_RE = re.compile(r"\\(?:left|right|displaystyle|big|Big|bigg|Bigg)(?![A-Za-z])")
_CMD_SPACE_RE = re.compile(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])")
_FRAC_SHORT_RE = re.compile(r"\\frac(\d)(\d)")
_FRAC_HALF_SHORT_RE = re.compile(r"\\frac(\{[^{}]*\})(\d)")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_FRAC_FIRST_SHORT_RE = re.compile(r"\\frac(\d)(?=\{)")
_SQRT_SHORT_RE = re.compile(r"\\sqrt(\d)")  # TeX takes one token: `\sqrt23` is `\sqrt{2}3`
_UNICODE_ROOT_RE = re.compile(r"√\s*(\d+(?:\.\d+)?)")  # `√12` is the root of the whole number
# Unicode spellings of LaTeX; the trailing space keeps a following letter out of the command
# name (`2πr` -> `2\pi r`), and is dropped again with the other whitespace.
_UNICODE_MATH = {"−": "-", "×": "\\times ", "·": "\\cdot ", "⋅": "\\cdot ", "π": "\\pi ",
                 "∞": "\\infty ", "∅": "\\emptyset ", "√": "\\sqrt "}
_UNICODE_MATH_RE = re.compile("|".join(_UNICODE_MATH))
_EMPTYSET_RE = re.compile(r"\\varnothing(?![A-Za-z])")
_LEADING_POINT_RE = re.compile(r"(?<![\w.}\])])\.(?=\d)")  # `.5` -> `0.5`, `x.5` untouched
_MIXED_SPACE_RE = re.compile(r"^([+-]?\d+)\s+(\d+)\s*/\s*(\d+)$")  # `2 1/2`, as in MATH's grader
# Choice letters: A, (A), A., A), A:, "option A", and a letter followed by option text.
_CHOICE_RE = re.compile(r"^(?:(?i:option|choice|answer)\s*:?\s*)?\(?([A-Z])\)?\s*[.:)]?$")
_CHOICE_TEXT_RE = re.compile(r"^(?:\(([A-Z])\)|([A-Z])[.:)])\s+\S")
# Units stripped only right after a number or a closing brace, e.g. `5cm`, `\frac{1}{2}m^2`.
_UNITS = (
    "centimeters", "centimetres", "millimeters", "meters", "metres", "kilometers", "inches",
    "degrees", "degree", "units", "unit", "feet", "inch", "deg", "cm", "mm", "km", "ft", "in", "m",
    "percent",  # dropped like `%`, not converted
)
_UNIT_RE = re.compile(r"(?<=[\d}])(?:sq\.?|square)?(?:" + "|".join(_UNITS) + r")(?:\^\{?[23]\}?|²|³)?$")


_UNWRAP_TOKEN_RE = re.compile(_WRAPPER_RE.pattern + r"|\\.|[{}]", re.DOTALL)


def _unwrap_commands(s: str) -> str:
    r"""Replace `\text{X}`-style wrappers by X in one linear pass (wrappers may nest)."""
    if "\\" not in s:
        return s
    out: list[str] = []
    stack: list[bool] = []  # True = this brace pair belongs to a removed wrapper
    pos = 0
    for m in _UNWRAP_TOKEN_RE.finditer(s):
        tok = m.group()
        out.append(s[pos : m.start()])
        pos = m.end()
        if m.group(1):  # a wrapper command with its opening brace: drop both
            stack.append(True)
        elif tok == "{":
            stack.append(False)
            out.append(tok)
        elif tok == "}" and stack:
            if not stack.pop():
                out.append(tok)
        else:  # escapes such as \{ and unmatched closing braces stay as they are
            out.append(tok)
    out.append(s[pos:])
    return "".join(out)


def _strip_outer_braces(s: str) -> str:
    # Quadratic in the nesting depth, so only called on strings under MAX_SYMBOLIC_LEN.
    while len(s) >= 2 and s[0] == "{" and _match_brace(s, 0) == len(s) - 1:
        s = s[1:-1]
    return s


def normalize_answer(s: str | None) -> str:
    r"""Project normalisation of an answer string (see module docs); '' for None."""
    if s is None:
        return ""
    if not isinstance(s, str):
        raise TypeError(f"answer must be str or None, got {type(s).__name__}")
    s = s.strip()
    if len(s) > MAX_NORMALIZE_LEN:
        return "".join(s.split())
    s = s.replace("\\$", "").replace("$", "")  # math delimiters and currency signs
    s = _UNICODE_ROOT_RE.sub(r"\\sqrt{\1}", s)
    s = _UNICODE_MATH_RE.sub(lambda m: _UNICODE_MATH[m.group()], s)
    s = _EMPTYSET_RE.sub(r"\\emptyset", s)
    s = _SIZING_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _unwrap_commands(s)
    s = _SPACING_RE.sub(" ", s)
    s = _DEGREE_RE.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip().rstrip(".").strip()
    choice = _CHOICE_RE.match(s) or _CHOICE_TEXT_RE.match(s)
    if choice:
        return next(g for g in choice.groups() if g)
    s = _MIXED_SPACE_RE.sub(r"\1\\frac{\2}{\3}", s)  # before `2 1/2` loses its space
    spaced_commas = bool(re.search(r",\s", s))  # `5, 100` is a list, `5,100` a number
    # Whitespace carries no meaning except between a command and a letter (`\sin x`).
    s = _CMD_SPACE_RE.sub(lambda m: m.group(1) + "\x00", s)
    s = "".join(s.split()).replace("\x00", " ")
    s = s.replace("{,}", ",").replace("\\{\\}", "\\emptyset")
    s = _FRAC_SHORT_RE.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_HALF_SHORT_RE.sub(r"\\frac\1{\2}", s)
    s = _FRAC_FIRST_SHORT_RE.sub(r"\\frac{\1}", s)
    s = _SQRT_SHORT_RE.sub(r"\\sqrt{\1}", s)
    s = _LEADING_POINT_RE.sub("0.", s)
    s = _UNIT_RE.sub("", s)
    s = s.rstrip(".")
    if len(s) <= MAX_SYMBOLIC_LEN:
        s = _strip_outer_braces(s)
    if _THOUSANDS_RE.match(s):
        # Kept as `5, 100` (which the parser reads as a list), never merged into 5100.
        s = s.replace(",", ", ") if spaced_commas else s.replace(",", "")
    return s


def is_choice_letter(norm: str) -> bool:
    """True if a normalised answer is a multiple-choice letter."""
    return len(norm) == 1 and "A" <= norm <= "Z"


_GEOMETRIC_NAME_RE = re.compile(
    r"^(?:\\(?:angle|measuredangle|triangle|overline|overarc|widehat|odot) ?)?\{?[A-Z]{2,}\}?$"
)


def is_geometric_name(norm: str) -> bool:
    r"""True for point/segment/angle names (`AB`, `\angle ABC`): SymPy would read them as products."""
    return bool(_GEOMETRIC_NAME_RE.match(norm))


# ---------------------------------------------------------------- numbers

_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_SIMPLE_NUM_RE = re.compile(rf"^({_NUM})$")
_SIMPLE_RATIO_RE = re.compile(rf"^([+-]?)(?:\\frac\{{({_NUM})\}}\{{({_NUM})\}}|({_NUM})/({_NUM}))$")
# Scientific notation: `1e3`, `1.5E+03`, `1.5\times10^{3}`, `2.5\cdot10^-2` (the exponent
# is one token or a braced integer, as TeX reads it).
_SCIENTIFIC_RE = re.compile(
    rf"^({_NUM})(?:[eE]([+-]?\d+)|(?:\\times|\\cdot|\*)10\^(?:\{{([+-]?\d+)\}}|(\d)))$")
_MIXED_RE = re.compile(r"^([+-]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}$")  # `2\frac{1}{2}` is 5/2
# An e-notation literal inside a longer expression, rewritten for the parser, which would
# read `1e3` as 1*e*3. A digit run must start it (`x2e3` is not one), and `2e` stays 2*e.
_E_LITERAL_RE = re.compile(r"(?<![A-Za-z\\\d.])(\d+(?:\.\d*)?|\.\d+)[eE]([+-]?\d+)(?![\d.])")
MAX_DECIMAL_EXPONENT = 1000  # 10^1000 is exact as a Fraction in microseconds; beyond: no answer
_BIG_EXPONENT_RE = re.compile(r"(?:\^\{?|(?<=\d)[eE])[+-]?\d{5,}")


def simple_number(norm: str) -> Fraction | None:
    r"""Exact value of a plain numeric literal (int, decimal, a/b, \frac{a}{b}, 1e3, a mixed number), else None."""
    if len(norm) > MAX_SYMBOLIC_LEN:
        return None
    m = _SIMPLE_NUM_RE.match(norm)
    if m:
        return Fraction(m.group(1))
    m = _SCIENTIFIC_RE.match(norm)
    if m:
        mantissa, exponent = m.group(1), int(next(g for g in m.groups()[1:] if g))
        if abs(exponent) > MAX_DECIMAL_EXPONENT:
            return None  # checked before 10**exponent is built
        return Fraction(mantissa) * Fraction(10) ** exponent
    m = _MIXED_RE.match(norm)
    if m:
        sign, whole, num, den = m.groups()
        if int(den) == 0:
            return None
        value = int(whole) + Fraction(int(num), int(den))
        return -value if sign == "-" else value
    m = _SIMPLE_RATIO_RE.match(norm)
    if not m:
        return None
    sign, fn, fd, rn, rd = m.groups()
    num, den = Fraction(fn or rn), Fraction(fd or rd)
    if den == 0:
        return None  # not a finite number; let the symbolic path decide
    value = num / den
    return -value if sign == "-" else value


def numbers_close(x, y, rel_tol: float = REL_TOL, abs_tol: float = ABS_TOL) -> bool:
    """|x - y| <= rel_tol * max(|x|, |y|) + abs_tol (works for Fractions and floats)."""
    return abs(x - y) <= rel_tol * max(abs(x), abs(y)) + abs_tol


def symbolic_refusal(norm: str) -> str | None:
    """Why a normalised answer is too large to parse symbolically, or None if it is fine."""
    if len(norm) > MAX_SYMBOLIC_LEN:
        return "length"
    if norm.count("\\frac") > MAX_FRAC_COUNT:
        return "frac"
    depth = max_depth = exp_depth = 0
    exp_stack: list[bool] = []  # per open brace: does it open an exponent group?
    for i, c in enumerate(norm):
        if c == "{":
            is_exp = i > 0 and norm[i - 1] == "^"
            exp_stack.append(is_exp)
            exp_depth += is_exp
            depth += 1
            max_depth = max(max_depth, depth)
        elif c == "}" and exp_stack:
            exp_depth -= exp_stack.pop()
            depth -= 1
        elif c == "^" and (exp_depth > 0 or norm[i + 1 : i + 2] == "^"):
            return "exponent"  # towers like 10^{10^{10}}: astronomically large, never an answer
    if max_depth > MAX_BRACE_DEPTH:
        return "depth"
    if _BIG_EXPONENT_RE.search(norm):
        return "exponent"  # 10^{99999}, 1e99999: a SymPy integer with that many digits
    return None


def _parser_latex(norm: str) -> str:
    r"""A normalised answer as the symbolic parser should see it: `1e3` -> `1\times10^{3}`."""
    return _E_LITERAL_RE.sub(r"\1\\times10^{\2}", norm)


def _bracket_pair(norm: str) -> str | None:
    """The outer brackets of a bracketed comma list such as `(1,2)` or `[0,1)`, else None."""
    if len(norm) < 3 or norm[0] not in "([" or norm[-1] not in ")]":
        return None
    depth, has_comma = 0, False
    for i, c in enumerate(norm):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0 and i < len(norm) - 1:
                return None  # `(1,2)\cup(3,4)`: not one bracketed group
        elif c == "," and depth == 1:
            has_comma = True
    return norm[0] + norm[-1] if has_comma else None


# ---------------------------------------------------------------- symbolic worker


def _mv_parse(norm: str):
    from math_verify import parse

    return parse("\\boxed{" + norm + "}", parsing_timeout=None)


def _numeric_value(expr):
    """30-digit value of a closed-form finite real/complex number, else None."""
    try:
        if not getattr(expr, "is_number", False):
            return None
        value = expr.evalf(30)
        return value if value.is_finite else None
    except Exception:  # SymPy raises many types on exotic objects
        return None


def _shape(expr) -> str:
    """Container structure of a parsed answer: sets `{..}` (unordered), tuples `(..)`, intervals."""
    from latex2sympy2_extended import is_expr_of_only_symbols
    from sympy import Eq, FiniteSet, Interval, Tuple
    from sympy.sets.sets import EmptySet

    if isinstance(expr, Eq) and is_expr_of_only_symbols(expr.lhs):
        expr = expr.rhs  # `x \in (1,2)` and `x = \{1,2\}` are judged by their value
    if isinstance(expr, Tuple):
        return "(" + ",".join(_shape(a) for a in expr.args) + ")"
    if isinstance(expr, Interval):
        # The parser reads `(1,2)` as an open interval and `(2,1)` as a tuple: one notation, one shape.
        return ("(" if expr.left_open else "[") + _shape(expr.start) + "," + _shape(expr.end) + \
            (")" if expr.right_open else "]")
    if isinstance(expr, FiniteSet):
        return "{" + ",".join(sorted(_shape(a) for a in expr.args)) + "}"
    if isinstance(expr, EmptySet):
        return "{}"
    return "x"  # a number, expression, relation, union...: no container structure to check


def _shapes_compatible(a, b) -> bool:
    """False when two parsed answers are different kinds of container (a tuple vs a set, ...)."""
    try:
        sa, sb = _shape(a), _shape(b)
    except Exception:  # SymPy raises many types on exotic objects; let verify decide
        return True
    # A plain value may still equal a one-element set (`2` vs `\{2\}`) or a relation a set.
    return sa == sb or sa == "x" or sb == "x"


def _is_plain_expression(expr) -> bool:
    """An expression in free symbols, not an equation, set, interval, tuple or matrix."""
    from sympy import Expr

    return isinstance(expr, Expr) and bool(expr.free_symbols) and not expr.is_number


def _compare_parsed(pa, pb) -> bool:
    """Numbers: 1e-6 relative; otherwise math-verify's verify in either direction."""
    from math_verify import verify

    if not pa or not pb:
        return False
    if not _shapes_compatible(pa[0], pb[0]):
        return False  # math-verify would compare a tuple with a set of the same elements as equal
    va, vb = _numeric_value(pa[0]), _numeric_value(pb[0])
    if va is not None and vb is not None:
        diff = abs((va - vb).evalf(30))
        scale = max(abs(va).evalf(30), abs(vb).evalf(30))
        return bool(diff <= REL_TOL * scale + ABS_TOL)
    # A number against an expression in x, y, ...: verify would try to solve and simplify
    # (0.1 s per pair) to confirm what is almost always a mismatch; `x=2` vs `2` still
    # reaches verify, since an equation is not a plain expression.
    if (va is not None and _is_plain_expression(pb[0])) or (vb is not None and _is_plain_expression(pa[0])):
        return False
    return bool(verify(pa, pb, timeout_seconds=None) or verify(pb, pa, timeout_seconds=None))


def _worker_main() -> None:
    """Loop of the symbolic worker process: one JSON request per line in, one answer out."""
    import logging
    from functools import lru_cache

    from megatron_selfjudge.runtime.children import ignore_job_signals, start_parent_watchdog

    ignore_job_signals()  # a job-wide preemption signal is the trainer's to handle
    start_parent_watchdog(os.getppid())  # exit with the run, even mid-comparison (runtime.children)
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    cached_parse = lru_cache(maxsize=4096)(_mv_parse)
    _compare_parsed(cached_parse("x+1"), cached_parse("1+x"))  # warm SymPy/lark caches
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        try:
            eq = _compare_parsed(cached_parse(req["a"]), cached_parse(req["b"]))
            proto.write(json.dumps({"eq": eq}) + "\n")
        except Exception as exc:  # report, keep serving
            proto.write(json.dumps({"eq": False, "error": type(exc).__name__}) + "\n")


class SymbolicWorker:
    """A math-verify process with a hard per-comparison time bound, usable from any thread."""

    def __init__(self, start_timeout: float = 120.0):
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._lock = threading.Lock()
        self.timeouts = 0  # comparisons cut off by the bound (observable in tests/metrics)
        self.restarts = 0
        self.owner_pid = os.getpid()  # a forked child must not share this process's pipes
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()  # settled pairs only

    def _start(self) -> None:
        # Run this file as a script: the worker needs only math-verify, not the package
        # (whose __init__ may import torch and megatron, seconds of start-up per restart).
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--symbolic-worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        self._buf = b""
        if self._readline(self.start_timeout) is None:
            self._kill()
            raise RuntimeError("symbolic answer worker did not start (math-verify import failed?)")

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout):
                f.close()
        self._proc = None

    def _readline(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # worker died
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def compare(self, a: str, b: str, timeout: float = SYMBOLIC_TIMEOUT_S) -> bool:
        """Symbolic equality of two normalised answers; False when the bound is exceeded."""
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        key = (a, b) if a <= b else (b, a)  # the comparison is symmetric
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            eq = self._ask(a, b, timeout)
            if eq is not None:
                self._cache[key] = eq
                if len(self._cache) > _RESULT_CACHE_SIZE:
                    self._cache.popitem(last=False)
            return bool(eq)

    def _ask(self, a: str, b: str, timeout: float) -> bool | None:
        """One round trip to the worker (lock held); None when the bound was exceeded."""
        request = (json.dumps({"a": a, "b": b}) + "\n").encode()
        for attempt in range(2):  # a dead worker is restarted once
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._start()
                self.restarts += 1
            try:
                self._proc.stdin.write(request)
                self._proc.stdin.flush()
                break
            except OSError:
                self._kill()
                if attempt:
                    raise
        reply = self._readline(timeout)
        if reply is None:
            self.timeouts += 1
            self._kill()  # the only way to stop a runaway SymPy call
            return None
        return bool(reply.get("eq", False))

    def close(self) -> None:
        """Stop the worker process."""
        with self._lock:
            self._kill()


_WORKER: SymbolicWorker | None = None
_WORKER_INIT = threading.Lock()


def symbolic_worker() -> SymbolicWorker:
    """The process-wide symbolic worker (started lazily on first use)."""
    global _WORKER
    with _WORKER_INIT:
        if _WORKER is None or _WORKER.owner_pid != os.getpid():
            _WORKER = SymbolicWorker()
            import atexit

            atexit.register(_WORKER.close)
        return _WORKER


# ---------------------------------------------------------------- equivalence


def _check_mode(mode: str) -> None:
    if mode not in EQUIVALENCE_MODES:
        raise ValueError(f"equivalence mode must be one of {EQUIVALENCE_MODES}, got {mode!r}")


def _equal_normalized(na: str, nb: str, mode: str, timeout: float) -> bool:
    if not na or not nb:
        return False  # an empty answer is no answer
    if na == nb:
        return True
    if mode == "normalized" or is_choice_letter(na) or is_choice_letter(nb):
        return False  # letters only ever match the same letter
    if is_geometric_name(na) or is_geometric_name(nb):
        return False  # `\angle ABC` vs `\angle BAC` are different angles, not equal products
    xa, xb = simple_number(na), simple_number(nb)
    if xa is not None and xb is not None:
        return numbers_close(xa, xb)
    ba, bb = _bracket_pair(na), _bracket_pair(nb)
    if ba and bb and ba != bb:
        return False  # `[2,1]` vs `(2,1)`: the parser turns both into the same tuple
    if symbolic_refusal(na) or symbolic_refusal(nb):
        return False
    return symbolic_worker().compare(_parser_latex(na), _parser_latex(nb), timeout)


def answers_equivalent(a: str | None, b: str | None, mode: str = "symbolic", *,
                       timeout: float = SYMBOLIC_TIMEOUT_S) -> bool:
    """Whether two extracted answers are the same under `mode` (None never matches)."""
    _check_mode(mode)
    if a is None or b is None:
        return False
    if mode == "exact":
        a, b = a.strip(), b.strip()  # surrounding whitespace is never part of the answer
        return a != "" and a == b
    return _equal_normalized(normalize_answer(a), normalize_answer(b), mode, timeout)


def answer_classes(answers: list[str | None], mode: str = "symbolic", *,
                   timeout: float = SYMBOLIC_TIMEOUT_S) -> list[int | None]:
    """Class id per answer (0, 1, ... in first-seen order); None for missing/empty answers."""
    _check_mode(mode)
    keys = [(a.strip() if a is not None else None) if mode == "exact" else normalize_answer(a)
            for a in answers]
    classes: list[int | None] = []
    reps: list[str] = []  # one representative key per class: its first member
    by_key: dict[str, int] = {}
    for key in keys:
        if key is None or key == "":
            classes.append(None)
            continue
        cls = by_key.get(key)
        if cls is None and mode != "exact":
            # Identical keys were handled above, so each (key, rep) pair is compared once.
            cls = next((c for c, rep in enumerate(reps)
                        if _equal_normalized(key, rep, mode, timeout)), None)
        if cls is None:
            cls = len(reps)
            reps.append(key)
        by_key[key] = cls
        classes.append(cls)
    return classes


if __name__ == "__main__" and sys.argv[1:] == ["--symbolic-worker"]:
    _worker_main()
