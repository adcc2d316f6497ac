"""The embedded default task: small visual-math problems rendered with Pillow.

Four task families, each a few short integers that a tiny model must read from the
pixels (the question alone never gives the answer away):

- ``count``:   how many shapes of one named colour (distractors in other colours).
- ``add``:     the sum of two digits drawn with a built-in 3x5 bitmap font.
- ``compare``: how many more dots of colour X than of colour Y.
- ``bar``:     the height of a named (or the tallest) bar in a three-bar chart.

Everything is deterministic from the seed: each example draws from its own NumPy
generator keyed by (seed, split, index, attempt), digits use a bitmap font rather than
a system font, and shapes are drawn without anti-aliasing, so the same seed gives the
same pixels on any machine with the same Pillow. Shapes never touch (a gap of at least
two pixels) and every colour is exact, so tests can recover the answer from the pixels.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

SPLITS = ("test", "train_sft", "train_unlabeled")  # generation order: test first, so it never moves
FAMILIES = ("count", "add", "compare", "bar")

# Saturated colours for the objects; the background is always light grey (>= 200 per channel).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
}
# Inclusive answer ranges; they set the difficulty (and the answer prior) of each family.
COUNT_RANGE = (1, 9)  # count: target shapes
DISTRACTOR_RANGE = (0, 3)  # count: shapes in other colours
COMPARE_RANGE = (1, 7)  # compare: dots of the more frequent colour
BAR_RANGE = (1, 8)  # bar: bar heights in units
INK = (20, 20, 20)  # digit colour of the ``add`` family
AXIS = (120, 120, 120)  # bar-chart axis and ticks

# 3x5 bitmap digits, rows top to bottom. Every glyph is one 4-connected blob and all ten
# differ, so a reader can decode a digit from its downsampled bounding box.
DIGIT_GLYPHS: dict[int, tuple[str, ...]] = {
    0: ("111", "101", "101", "101", "111"),
    1: ("010", "110", "010", "010", "111"),
    2: ("111", "001", "111", "100", "111"),
    3: ("111", "001", "111", "001", "111"),
    4: ("101", "101", "111", "001", "001"),
    5: ("111", "100", "111", "001", "111"),
    6: ("111", "100", "111", "101", "111"),
    7: ("111", "001", "001", "001", "001"),
    8: ("111", "101", "111", "101", "111"),
    9: ("111", "101", "111", "001", "111"),
}


@dataclass(frozen=True)
class Example:
    """One rendered problem: RGB image, question, integer answer as text, and how it was made."""

    uid: str
    family: str
    image: Image.Image
    question: str
    answer: str
    reasoning: str  # the short trace an SFT target puts inside <think>...</think>
    meta: dict = field(default_factory=dict)  # the generator's parameters (counts, digits, heights)
    # Other questions the same image answers, each (question, answer, reasoning): what a
    # question-writing warm start (data.synthetic_sft_ask) teaches the policy to ask.
    alternatives: tuple[tuple[str, str, str], ...] = ()

    def image_array(self) -> np.ndarray:
        """The image as a uint8 array [C, H, W]."""
        return np.asarray(self.image, dtype=np.uint8).transpose(2, 0, 1).copy()

    def png_bytes(self) -> bytes:
        """The image encoded as PNG (deterministic for a given Pillow/zlib)."""
        buf = io.BytesIO()
        self.image.save(buf, format="PNG", optimize=False, compress_level=6)
        return buf.getvalue()


@dataclass
class _Drawn:
    image: Image.Image
    question: str
    answer: int
    reasoning: str
    meta: dict
    alternatives: list[tuple[str, int, str]] = field(default_factory=list)


def _enumeration(n: int) -> str:
    """The counting trace of n objects ('1,2,3'; 'none' for zero)."""
    return ",".join(str(i) for i in range(1, n + 1)) or "none"


def _canvas(rng: np.random.Generator, size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    # A slightly varying light background so that the model cannot key on one exact colour.
    bg = tuple(int(v) for v in rng.integers(200, 256, size=3))
    img = Image.new("RGB", (size, size), bg)
    return img, ImageDraw.Draw(img)


GRID = 4  # shapes sit in a GRID x GRID layout of cells, at most one per cell


def _grid_spots(rng: np.random.Generator, size: int, n: int) -> tuple[list[tuple[int, int]], int]:
    """Top-left corners of n shapes in distinct grid cells (small jitter), and the shape size.

    With 32-pixel images and 8-pixel ViT patches a cell is one patch, so a tiny ViT sees
    each object whole; counting still needs the language model to add over patches.
    """
    if n > GRID * GRID:
        raise ValueError(f"cannot place {n} shapes in a {GRID}x{GRID} grid")
    cell = size // GRID
    box = max(4, cell // 2)
    slack = max(0, cell - box - 2)  # keeps two free pixels between shapes in adjacent cells
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    spots = [(int(c % GRID) * cell + int(rng.integers(0, slack + 1)),
              int(c // GRID) * cell + int(rng.integers(0, slack + 1))) for c in cells]
    return spots, box


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, x: int, y: int, box: int,
                color: tuple[int, int, int]) -> None:
    if kind == "circle":
        draw.ellipse((x, y, x + box - 1, y + box - 1), fill=color)
    else:
        draw.rectangle((x, y, x + box - 1, y + box - 1), fill=color)


def _draw_count(rng: np.random.Generator, size: int) -> _Drawn:
    names = list(COLORS)
    target = names[int(rng.integers(len(names)))]
    others = [c for c in names if c != target]
    n = int(rng.integers(COUNT_RANGE[0], COUNT_RANGE[1] + 1))
    n_distract = int(rng.integers(DISTRACTOR_RANGE[0], DISTRACTOR_RANGE[1] + 1))
    spots, box = _grid_spots(rng, size, n + n_distract)
    img, draw = _canvas(rng, size)
    colors = [target] * n + [others[int(rng.integers(2))] for _ in range(n_distract)]
    for (x, y), cname in zip(spots, colors):
        _draw_shape(draw, ("circle", "square")[int(rng.integers(2))], x, y, box, COLORS[cname])
    alternatives = [(f"How many {c} shapes?", colors.count(c), _enumeration(colors.count(c))) for c in others]
    alternatives.append(("How many shapes?", len(colors), _enumeration(len(colors))))
    return _Drawn(img, f"How many {target} shapes?", n, _enumeration(n),
                  {"color": target, "count": n, "distractors": n_distract, "box": box}, alternatives)


def _draw_digit(draw: ImageDraw.ImageDraw, digit: int, x: int, y: int, scale: int,
                color: tuple[int, int, int]) -> None:
    for r, row in enumerate(DIGIT_GLYPHS[digit]):
        for c, bit in enumerate(row):
            if bit == "1":
                x0, y0 = x + c * scale, y + r * scale
                draw.rectangle((x0, y0, x0 + scale - 1, y0 + scale - 1), fill=color)


def _draw_add(rng: np.random.Generator, size: int) -> _Drawn:
    a, b = int(rng.integers(10)), int(rng.integers(10))
    scale = max(2, size // 10)
    w, h = 3 * scale, 5 * scale
    half = size // 2
    # One digit centred in each half, jittered by a few pixels: the left-to-right order is
    # unambiguous and a tiny ViT can learn the glyphs from a few hundred examples.
    jx = jy = max(1, size // 12)
    xa = (half - w) // 2 + int(rng.integers(-jx, jx + 1))
    xb = half + (half - w) // 2 + int(rng.integers(-jx, jx + 1))
    ya, yb = ((size - h) // 2 + int(rng.integers(-jy, jy + 1)) for _ in range(2))
    img, draw = _canvas(rng, size)
    _draw_digit(draw, a, xa, ya, scale, INK)
    _draw_digit(draw, b, xb, yb, scale, INK)
    alternatives = [("What is the left digit?", a, f"left {a}"), ("What is the right digit?", b, f"right {b}")]
    return _Drawn(img, "Add the two digits.", a + b, f"{a}+{b}={a + b}",
                  {"digits": [a, b], "scale": scale}, alternatives)


def _draw_compare(rng: np.random.Generator, size: int) -> _Drawn:
    names = list(COLORS)
    i, j = rng.choice(len(names), size=2, replace=False)
    more, fewer = names[int(i)], names[int(j)]
    n_more = int(rng.integers(COMPARE_RANGE[0], COMPARE_RANGE[1] + 1))
    n_fewer = int(rng.integers(0, n_more + 1))
    spots, box = _grid_spots(rng, size, n_more + n_fewer)
    img, draw = _canvas(rng, size)
    colors = [more] * n_more + [fewer] * n_fewer
    order = rng.permutation(len(colors))  # interleave colours so position gives nothing away
    for k, (x, y) in zip(order, spots):
        _draw_shape(draw, "circle", x, y, box, COLORS[colors[int(k)]])
    diff = n_more - n_fewer
    alternatives = [(f"How many {more} dots?", n_more, _enumeration(n_more)),
                    (f"How many {fewer} dots?", n_fewer, _enumeration(n_fewer)),
                    ("How many dots?", n_more + n_fewer, _enumeration(n_more + n_fewer))]
    return _Drawn(img, f"How many more {more} than {fewer} dots?", diff,
                  f"{n_more}-{n_fewer}={diff}",
                  {"colors": [more, fewer], "counts": [n_more, n_fewer], "box": box}, alternatives)


def _draw_bar(rng: np.random.Generator, size: int) -> _Drawn:
    unit = max(2, (size - 6) // 10)
    names = [str(c) for c in rng.permutation(list(COLORS))]
    heights = [int(h) for h in rng.integers(BAR_RANGE[0], BAR_RANGE[1] + 1, size=3)]
    img, draw = _canvas(rng, size)
    base, left = size - 3, 3
    draw.line((left, base, size - 2, base), fill=AXIS)
    draw.line((left, 1, left, base), fill=AXIS)
    for t in range(1, BAR_RANGE[1] + 1):  # a tick mark at every possible height, left of the axis
        draw.point((left - 1, base - t * unit), fill=AXIS)
    width = (size - left - 4) // 3 - 2
    for k, (cname, h) in enumerate(zip(names, heights)):
        x0 = left + 2 + k * (width + 2)
        draw.rectangle((x0, base - h * unit, x0 + width - 1, base - 1), fill=COLORS[cname])
    askable = [(f"How tall is the {c} bar?", h, f"{c} {h}") for c, h in zip(names, heights)]
    askable.append(("How tall is the tallest bar?", max(heights), ",".join(map(str, heights)) + f" max {max(heights)}"))
    if rng.integers(2) == 0:
        ask = names[int(rng.integers(3))]
        pick = names.index(ask)
    else:
        ask, pick = "tallest", len(names)
    question, ans, reasoning = askable.pop(pick)
    return _Drawn(img, question, ans, reasoning,
                  {"colors": names, "heights": heights, "asked": ask, "unit": unit, "base": base}, askable)


_GENERATORS: dict[str, Callable[[np.random.Generator, int], _Drawn]] = {
    "count": _draw_count,
    "add": _draw_add,
    "compare": _draw_compare,
    "bar": _draw_bar,
}


def content_key(family: str, question: str, image: Image.Image) -> str:
    """A hash of what the model sees (family, question, pixels); equal keys = duplicate problems."""
    h = hashlib.sha256()
    h.update(f"{family}\n{question}\n{image.size}\n".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def render_example(family: str, seed: int, split_index: int, index: int, image_size: int = 32,
                   attempt: int = 0) -> Example:
    """Render one problem from its own RNG stream (attempt > 0 re-draws after a duplicate)."""
    if family not in _GENERATORS:
        raise ValueError(f"families: unknown family {family!r}; known: {sorted(_GENERATORS)}")
    rng = np.random.default_rng([seed, split_index, index, attempt, FAMILIES.index(family)])
    drawn = _GENERATORS[family](rng, image_size)
    key = content_key(family, drawn.question, drawn.image)
    return Example(uid=f"{family}-{key[:16]}", family=family, image=drawn.image,
                   question=drawn.question, answer=str(drawn.answer),
                   reasoning=drawn.reasoning, meta=drawn.meta,
                   alternatives=tuple((q, str(a), r) for q, a, r in drawn.alternatives))


def _other(rng: np.random.Generator, value: int, lo: int, hi: int) -> Optional[int]:
    """A value of [lo, hi] other than `value`, or None when there is none."""
    choices = [v for v in range(lo, hi + 1) if v != value]
    return int(choices[int(rng.integers(len(choices)))]) if choices else None


def flawed_solutions(ex: Example, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Wrong solutions of the example's own question, (flaw, reasoning, answer), one per flaw its family has.

    ``misread``: the trace reads other values than the image shows and follows them correctly;
    ``slip``: it reads the right values and then computes wrongly; ``mismatch``: the trace is right
    and the boxed answer is not its result. A Judge that checks the trace against the image tells
    them apart from a right solution (what data.synthetic_sft_judge teaches).
    """
    m, answer = ex.meta, int(ex.answer)
    wrong = _other(rng, answer, 0, 18)
    out = [("mismatch", ex.reasoning, str(wrong))]
    if ex.family == "add":
        a, b = m["digits"]
        a2 = _other(rng, a, 0, 9)
        out += [("misread", f"{a2}+{b}={a2 + b}", str(a2 + b)), ("slip", f"{a}+{b}={wrong}", str(wrong))]
    elif ex.family == "count":
        n2 = _other(rng, m["count"], *COUNT_RANGE)
        out.append(("misread", _enumeration(n2), str(n2)))
    elif ex.family == "compare":
        more, fewer = m["counts"]
        more2 = _other(rng, more, max(fewer, COMPARE_RANGE[0]), COMPARE_RANGE[1])
        if more2 is not None:
            out.append(("misread", f"{more2}-{fewer}={more2 - fewer}", str(more2 - fewer)))
        out.append(("slip", f"{more}-{fewer}={wrong}", str(wrong)))
    elif ex.family == "bar":
        heights = list(m["heights"])
        if m["asked"] == "tallest":
            k = heights.index(max(heights))
            misread = list(heights)
            misread[k] = _other(rng, heights[k], *BAR_RANGE)
            if max(misread) != answer:
                out.append(("misread", ",".join(map(str, misread)) + f" max {max(misread)}", str(max(misread))))
            out.append(("slip", ",".join(map(str, heights)) + f" max {wrong}", str(wrong)))
        else:
            h2 = _other(rng, answer, *BAR_RANGE)
            out.append(("misread", f"{m['asked']} {h2}", str(h2)))
    return out


def _fill_split(seed: int, split_index: int, n: int, image_size: int, families: Sequence[str],
                seen: set[str]) -> list[Example]:
    out: list[Example] = []
    index = 0
    while len(out) < n:
        family = families[len(out) % len(families)]  # round robin keeps the families balanced
        for attempt in range(50):
            ex = render_example(family, seed, split_index, index, image_size, attempt)
            if ex.uid not in seen:
                seen.add(ex.uid)
                out.append(ex)
                break
        else:
            raise RuntimeError(f"could not render a new {family!r} problem at size {image_size}; "
                               "the split is larger than this family's distinct problems")
        index += 1
    return out


def make_synthetic_splits(seed: int, n_sft: int, n_unlabeled: int, n_test: int,
                          image_size: int = 32,
                          families: Sequence[str] = FAMILIES) -> dict[str, list[Example]]:
    """Disjoint splits {'train_sft', 'train_unlabeled', 'test'}, deterministic from the seed."""
    if image_size < 24:
        raise ValueError(f"image_size: must be >= 24 to fit the drawings, got {image_size}")
    families = tuple(families)
    if not families:
        raise ValueError("families: need at least one task family")
    for fam in families:
        if fam not in _GENERATORS:
            raise ValueError(f"families: unknown family {fam!r}; known: {sorted(_GENERATORS)}")
    sizes = {"test": n_test, "train_sft": n_sft, "train_unlabeled": n_unlabeled}
    for name, n in sizes.items():
        if n < 0:
            raise ValueError(f"n_{name}: must be >= 0, got {n}")
    seen: set[str] = set()  # shared across splits: a problem lands in at most one split
    return {name: _fill_split(seed, k, sizes[name], image_size, families, seen)
            for k, name in enumerate(SPLITS)}


GEOMETRY3K_SCHEMA = pa.schema([
    ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
    ("problem", pa.string()),
    ("answer", pa.string()),
    ("id", pa.int64()),
])


def write_geometry3k_parquet(examples: Sequence[Example], path: str | Path,
                             include_meta: bool = False) -> Path:
    """Save examples as parquet in the Geometry3K schema; include_meta adds uid/family/reasoning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: dict[str, list] = {
        "images": [[{"bytes": ex.png_bytes(), "path": f"{ex.uid}.png"}] for ex in examples],
        "problem": ["<image>" + ex.question for ex in examples],
        "answer": [ex.answer for ex in examples],
        "id": list(range(len(examples))),
    }
    schema = GEOMETRY3K_SCHEMA
    if include_meta:
        for name in ("uid", "family", "reasoning"):
            cols[name] = [getattr(ex, name) for ex in examples]
            schema = schema.append(pa.field(name, pa.string()))
    pq.write_table(pa.table(cols, schema=schema), path)
    return path
