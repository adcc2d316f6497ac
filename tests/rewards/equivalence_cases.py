r"""Answer-equivalence table: (a, b, mode, expected, why).

Decisions this table pins down (documented in rewards/answers.py):
- numbers agree within 1e-6 relative (plus 1e-12 absolute near zero);
- `1/2`, `\dfrac12`, `\frac{1}{2}`, `0.5` are all equal under `symbolic`, but `normalized`
  only rewrites `\dfrac12` to `\frac{1}{2}` (no arithmetic);
- degrees and percent signs are stripped, not converted (`90^\circ` != `\pi/2`,
  `12\%` != `0.12`); simple units after a number are stripped (`5 cm` == `5`);
- choice letters compare as letters only; point/segment/angle names as strings only;
- an empty answer equals nothing, itself included;
- towers like `10^{10^{10}}` are refused by the symbolic path (equal only to themselves).
"""

S, N, E = "symbolic", "normalized", "exact"

CASES = [
    # numbers: fractions, decimals, tolerance
    ("0.5", r"\frac{1}{2}", S, True, "decimal vs frac"),
    ("1/2", r"\dfrac12", S, True, "slash vs brace-less dfrac"),
    ("2", "2.0000001", S, True, "5e-8 relative is inside 1e-6"),
    ("2", "2.001", S, False, "5e-4 relative is outside"),
    ("2", "2.0", S, True, "trailing zero"),
    ("12", "12.0000", S, True, "trailing zeros"),
    ("1.5", r"\frac{3}{2}", S, True, "improper fraction"),
    ("1/3", "2/6", S, True, "unreduced fraction"),
    (r"\frac{1}{3}", "0.3333333", S, True, "1e-7 relative"),
    (r"\frac{1}{3}", "0.333", S, False, "1e-3 relative"),
    (r"-\frac{1}{2}", "-0.5", S, True, "sign outside frac"),
    (r"\frac{-1}{2}", "-0.5", S, True, "sign inside frac"),
    ("2", "-2", S, False, "sign matters"),
    ("10", "100", S, False, "order of magnitude"),
    ("0", "0.0", S, True, "zero"),
    ("0", "0.000001", S, False, "absolute floor is only 1e-12"),
    ("1,000", "1000", S, True, "thousands separator"),
    ("1000000", "10^6", S, True, "power of ten"),
    ("0.1+0.2", "0.3", S, True, "arithmetic evaluated exactly"),
    # sqrt, pi
    (r"\sqrt{2}", "1.41421356", S, True, "1.7e-9 relative"),
    (r"\sqrt{2}", "1.414", S, False, "1.5e-4 relative"),
    (r"3\pi", "9.42477796", S, True, "8e-11 relative"),
    (r"\pi", "3.14", S, False, "crude pi"),
    (r"\pi", "3.14159265", S, True, "1e-9 relative"),
    (r"2\sqrt{2}", r"\sqrt{8}", S, True, "surd simplification"),
    (r"2\sqrt{3}", r"\sqrt{12}", S, True, "surd simplification"),
    (r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt{3}", S, True, "reordered product"),
    (r"\frac{\sqrt{3}}{2}", "0.8660254", S, True, "4e-9 relative"),
    (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}", S, True, "slash vs frac with surd"),
    (r"\sqrt{2}", "2^{1/2}", S, True, "fractional power"),
    (r"6\sqrt{3}", "10.392304845", S, True, "surd vs decimal"),
    # degrees, percent, units, wrappers
    (r"30^\circ", "30", S, True, "degree sign"),
    (r"30^{\circ}", "30°", S, True, "two degree spellings"),
    (r"90^\circ", r"\frac{\pi}{2}", S, False, "degrees are stripped, not converted"),
    (r"50\%", "50", S, True, "percent stripped"),
    (r"12\%", "0.12", S, False, "percent not converted"),
    (r"5\text{ cm}", "5", S, True, "unit in text"),
    ("5", "5m", S, True, "unit after number"),
    (r"4 \text{ units}", "4", S, True, "units word"),
    (r"\frac{5}{2}\text{cm}^2", "2.5", S, True, "squared unit after a frac"),
    (r"\$5", "5", S, True, "currency sign"),
    (r"\text{3}", "3", S, True, "text-wrapped number"),
    (r"\boxed{4}", "4", S, True, "nested box"),
    (r"\left(1,2\right)", "(1, 2)", S, True, "left/right and spaces"),
    (r"\frac{1}{2}", r"\tfrac{1}{2}", S, True, "tfrac"),
    ("4.", "4", S, True, "trailing period"),
    # choice letters
    (r"\text{A}", "A", S, True, "text-wrapped letter"),
    ("(B)", "B.", S, True, "two letter spellings"),
    ("C", "C.", S, True, "letter with period"),
    ("A", "B", S, False, "different letters"),
    ("C", "3", S, False, "a letter is not a number"),
    ("option A", "A)", S, True, "option prefix vs paren"),
    (r"\text{(A)}", "Option (A)", S, True, "text-wrapped parenthesised letter"),
    ("B. 30", "B", S, True, "letter followed by option text"),
    ("a", "A", S, False, "lower-case a is a variable, not a choice"),
    # symbolic expressions
    ("x+1", "1+x", S, True, "commutativity"),
    ("x^2+2x+1", "(x+1)^2", S, True, "expansion"),
    ("x^2", "x^{2}", S, True, "braced exponent"),
    ("2x", r"x \cdot 2", S, True, "cdot"),
    ("x", "y", S, False, "different symbols"),
    (r"\sin x", r"\sin(x)", S, True, "function call spacing"),
    ("y=2x+1", "y=1+2x", S, True, "equations"),
    ("x=2", "2", S, True, "assignment vs value"),
    ("x>1", "1<x", S, True, "flipped inequality"),
    (r"\{1,2\}", r"\{2,1\}", S, True, "sets are unordered"),
    ("(0,1)", "[0,1]", S, False, "open vs closed interval"),
    # geometry names compare as strings
    (r"\angle ABC", r"\angle BAC", S, False, "different angles, not products"),
    (r"\angle ABC", r"\angle  ABC", S, True, "same angle, extra space"),
    ("AB", "BA", S, False, "names compare as strings"),
    # degenerate and pathological
    ("", "", S, False, "empty answers equal nothing"),
    ("", "0", S, False, "empty vs zero"),
    ("   ", "   ", S, False, "whitespace-only is empty"),
    (r"\frac{1}{0}", "1", S, False, "division by zero"),
    (r"\frac{1}{0}", r"\frac{1}{0}", S, True, "identical strings"),
    (r"\frac{1}{0}", r"\infty", S, False, "complex infinity is not +infinity"),
    (r"\infty", "10^{100}", S, False, "infinity is not a big number"),
    ("10^{10^{10}}", "10^{10^{10}}+1", S, False, "tower refused"),
    ("10^{10^{10}}", "10^{10^{10}}", S, True, "identical tower"),
    ("9^{9^{9^{9}}}", "9^{9^{9^{9}}}+0", S, False, "taller tower refused"),
    # normalized mode: string equality after normalisation, no arithmetic
    ("0.5", r"\frac{1}{2}", N, False, "no arithmetic"),
    ("1/2", r"\dfrac12", N, False, "slash is not rewritten"),
    (r"\dfrac12", r"\frac{1}{2}", N, True, "dfrac and brace-less args"),
    ("(B)", "B.", N, True, "letters"),
    (r"30^\circ", "30", N, True, "degrees"),
    ("x+1", "1+x", N, False, "no algebra"),
    ("2", "2.0", N, False, "no numeric parse"),
    (r"\left( 1, 2 \right)", "(1,2)", N, True, "left/right and spaces"),
    ("", "", N, False, "empty"),
    # exact mode: raw string identity
    ("0.5", "0.5", E, True, "identical"),
    (" 0.5", "0.5", E, False, "whitespace matters"),
    ("A", "A.", E, False, "no letter normalisation"),
    (r"\frac{1}{2}", r"\dfrac{1}{2}", E, False, "no dfrac rewrite"),
    ("", "", E, False, "empty"),
]
