"""The synthetic task: determinism, disjoint splits, and answers recovered from the pixels."""

import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_selfjudge.data.synthetic import (AXIS, COLORS, DIGIT_GLYPHS, FAMILIES, INK,
                                               content_key, make_synthetic_splits, render_example,
                                               write_geometry3k_parquet)


@pytest.fixture(scope="module")
def splits():
    return make_synthetic_splits(seed=7, n_sft=24, n_unlabeled=48, n_test=32, image_size=32)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as an array of (row, col) pixels."""
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    h, w = mask.shape
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        stack, pixels = [(r0, c0)], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        stack.append((rr, cc))
        comps.append(np.array(pixels))
    return comps


def _color_mask(arr: np.ndarray, rgb) -> np.ndarray:
    return np.all(arr == np.array(rgb, dtype=np.uint8), axis=-1)


def _read_digit(pixels: np.ndarray) -> int:
    """Decode one digit blob: downsample its bounding box to 3x5 cells, match a glyph."""
    r0, c0 = pixels.min(0)
    r1, c1 = pixels.max(0)
    scale = (r1 - r0 + 1) // 5
    assert (r1 - r0 + 1, c1 - c0 + 1) == (5 * scale, 3 * scale)
    on = {(int(r), int(c)) for r, c in pixels}
    cells = tuple("".join("1" if (r0 + r * scale + scale // 2, c0 + c * scale + scale // 2) in on
                          else "0" for c in range(3)) for r in range(5))
    matches = [d for d, g in DIGIT_GLYPHS.items() if g == cells]
    assert len(matches) == 1, cells
    return matches[0]


def _answer_from_pixels(ex, question: str | None = None) -> int:
    """Recompute the answer to `question` (default the example's own) from the image and the
    question text only (not the generator's meta)."""
    arr = np.asarray(ex.image)
    q = ex.question if question is None else question
    if ex.family in ("count", "compare"):
        if q in ("How many shapes?", "How many dots?"):
            return sum(len(_components(_color_mask(arr, rgb))) for rgb in COLORS.values())
    if ex.family == "count":
        color = re.fullmatch(r"How many (\w+) shapes\?", q).group(1)
        return len(_components(_color_mask(arr, COLORS[color])))
    if ex.family == "add":
        blobs = sorted(_components(_color_mask(arr, INK)), key=lambda p: p[:, 1].min())
        assert len(blobs) == 2
        a, b = (_read_digit(blob) for blob in blobs)
        return {"Add the two digits.": a + b, "What is the left digit?": a, "What is the right digit?": b}[q]
    if ex.family == "compare":
        one = re.fullmatch(r"How many (\w+) dots\?", q)
        if one:
            return len(_components(_color_mask(arr, COLORS[one.group(1)])))
        more, fewer = re.fullmatch(r"How many more (\w+) than (\w+) dots\?", q).groups()
        n = {c: len(_components(_color_mask(arr, COLORS[c]))) for c in (more, fewer)}
        return n[more] - n[fewer]
    if ex.family == "bar":
        ticks = np.nonzero(_color_mask(arr, AXIS)[:, 2])[0]
        unit = int(np.median(np.diff(ticks)))  # tick marks sit one unit apart
        heights = {c: int(_color_mask(arr, rgb).any(axis=1).sum()) // unit for c, rgb in COLORS.items()}
        asked = re.fullmatch(r"How tall is the (\w+) bar\?", q).group(1)
        return max(heights.values()) if asked == "tallest" else heights[asked]
    raise AssertionError(ex.family)


def test_same_seed_gives_identical_bytes():
    a = make_synthetic_splits(seed=3, n_sft=8, n_unlabeled=8, n_test=8)
    b = make_synthetic_splits(seed=3, n_sft=8, n_unlabeled=8, n_test=8)
    for name in a:
        assert [e.png_bytes() for e in a[name]] == [e.png_bytes() for e in b[name]]
        assert [(e.uid, e.question, e.answer) for e in a[name]] == [(e.uid, e.question, e.answer) for e in b[name]]
    c = make_synthetic_splits(seed=4, n_sft=8, n_unlabeled=8, n_test=8)
    assert [e.png_bytes() for e in c["test"]] != [e.png_bytes() for e in a["test"]]


def test_test_split_does_not_depend_on_train_sizes(splits):
    small = make_synthetic_splits(seed=7, n_sft=2, n_unlabeled=3, n_test=32)
    assert [e.uid for e in small["test"]] == [e.uid for e in splits["test"]]


def test_splits_are_disjoint_by_content(splits):
    assert {k: len(v) for k, v in splits.items()} == {"train_sft": 24, "train_unlabeled": 48, "test": 32}
    # Recompute the content hash from the pixels rather than trusting the stored uid.
    keys = {name: [content_key(e.family, e.question, e.image) for e in exs] for name, exs in splits.items()}
    all_keys = [k for ks in keys.values() for k in ks]
    assert len(all_keys) == len(set(all_keys))


def test_every_answer_matches_the_pixels(splits):
    for exs in splits.values():
        for ex in exs:
            assert int(ex.answer) == _answer_from_pixels(ex), (ex.uid, ex.question, ex.meta)


def test_every_other_question_is_answered_by_the_pixels(splits):
    """The alternatives a question-writing warm start teaches: distinct, new, answered right."""
    for ex in (e for v in splits.values() for e in v):
        questions = [ex.question] + [q for q, _, _ in ex.alternatives]
        assert len(ex.alternatives) >= 2 and len(set(questions)) == len(questions), ex.alternatives
        for q, answer, reasoning in ex.alternatives:
            assert int(answer) == _answer_from_pixels(ex, q), (ex.uid, q, ex.meta)
            last = re.split(r"[=, ]", reasoning)[-1]
            assert last == answer or (reasoning == "none" and answer == "0"), (q, answer, reasoning)


def test_answers_are_short_integers_and_families_balanced(splits):
    exs = [e for v in splits.values() for e in v]
    assert all(re.fullmatch(r"\d{1,2}", e.answer) and 0 <= int(e.answer) <= 18 for e in exs)
    counts = Counter(e.family for e in splits["test"])
    assert counts == {f: 8 for f in FAMILIES}
    # Different answers within a family must come from different images.
    for fam in FAMILIES:
        by_image = {}
        for e in exs:
            if e.family == fam:
                by_image.setdefault(e.png_bytes(), set()).add(e.answer)
        assert all(len(a) == 1 for a in by_image.values())


def test_reasoning_trace_agrees_with_answer(splits):
    for ex in (e for v in splits.values() for e in v):
        if ex.family == "count":
            assert ex.reasoning.split(",")[-1] == ex.answer
        elif ex.family in ("add", "compare"):
            lhs, rhs = ex.reasoning.split("=")
            a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", lhs).groups()
            assert int(rhs) == (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(ex.answer)
        else:
            assert ex.reasoning.split()[-1] == ex.answer


def test_larger_images_render_correctly():
    exs = make_synthetic_splits(seed=1, n_sft=0, n_unlabeled=0, n_test=12, image_size=48)["test"]
    assert all(e.image.size == (48, 48) for e in exs)
    for ex in exs:
        assert int(ex.answer) == _answer_from_pixels(ex)
    assert exs[0].image_array().shape == (3, 48, 48) and exs[0].image_array().dtype == np.uint8


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="families"):
        make_synthetic_splits(0, 1, 1, 1, families=["clock"])
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_splits(0, 1, 1, 1, image_size=8)
    with pytest.raises(ValueError, match="n_test"):
        make_synthetic_splits(0, 1, 1, -1)
    with pytest.raises(ValueError, match="families"):
        render_example("nope", 0, 0, 0)


def test_parquet_writer_uses_geometry3k_schema(tmp_path, splits):
    path = write_geometry3k_parquet(splits["test"][:5], tmp_path / "test.parquet")
    schema = pq.read_schema(path)
    assert schema.names == ["images", "problem", "answer", "id"]
    images = schema.field("images").type
    assert pa.types.is_list(images)
    struct = images.value_type
    assert pa.types.is_struct(struct)
    assert [(f.name, f.type) for f in struct] == [("bytes", pa.binary()), ("path", pa.string())]
    assert schema.field("problem").type == pa.string() and schema.field("answer").type == pa.string()
    table = pq.read_table(path).to_pylist()
    assert all(r["problem"].startswith("<image>") and len(r["images"]) == 1 for r in table)
    assert [r["answer"] for r in table] == [e.answer for e in splits["test"][:5]]
    with_meta = pq.read_schema(write_geometry3k_parquet(splits["test"][:2], tmp_path / "m.parquet",
                                                        include_meta=True))
    assert with_meta.names[-3:] == ["uid", "family", "reasoning"]
