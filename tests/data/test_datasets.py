"""Local loaders: Geometry3K / MMR1 / GeoQA parquet and JSONL fixtures, and corrupt input."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_selfjudge.data.datasets import (DatasetError, detect_schema, examples_to_records,
                                              load_records)
from megatron_selfjudge.data.synthetic import make_synthetic_splits, write_geometry3k_parquet

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _png(color=(10, 200, 30), size=(20, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _write(path, columns: dict, schema: pa.Schema):
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def _geo3k(tmp_path, n=4, name="geo3k.parquet", **overrides):
    cols = {
        "images": [[{"bytes": _png((i * 40, 0, 0)), "path": f"{i}.png"}] for i in range(n)],
        "problem": [f"<image>Find x in figure {i}." for i in range(n)],
        "answer": [str(10 + i) for i in range(n)],
        "id": list(range(100, 100 + n)),
        "choices": [["1", "2", "3", "4"]] * n,
        "ground_truth": ["A"] * n,
    }
    cols.update(overrides)
    cols = {k: v for k, v in cols.items() if v is not None}  # an override of None drops the column
    schema = pa.schema([("images", pa.list_(IMAGE)), ("problem", pa.string()), ("answer", pa.string()),
                        ("id", pa.int64()), ("choices", pa.list_(pa.string())), ("ground_truth", pa.string())])
    schema = pa.schema([f for f in schema if f.name in cols])
    return _write(tmp_path / name, cols, schema)


def test_synthetic_parquet_round_trip(tmp_path):
    exs = make_synthetic_splits(seed=2, n_sft=0, n_unlabeled=0, n_test=6)["test"]
    path = write_geometry3k_parquet(exs, tmp_path / "syn.parquet", include_meta=True)
    result = load_records(path)
    assert result.skipped == 0 and len(result) == 6
    for ex, rec in zip(exs, result):
        assert rec.question == ex.question and rec.answer == ex.answer
        assert np.array_equal(np.asarray(rec.images[0]), np.asarray(ex.image))  # PNG is lossless
        assert rec.meta["family"] == ex.family and rec.uid == f"syn:{ex.uid}"
    mem = examples_to_records(exs)
    assert [r.question for r in mem] == [r.question for r in result.records]


def test_geometry3k_fixture(tmp_path):
    path = _geo3k(tmp_path)
    assert detect_schema(path) == "geometry3k"
    recs = load_records(path).records
    assert [r.question for r in recs] == [f"Find x in figure {i}." for i in range(4)]
    assert [r.answer for r in recs] == ["10", "11", "12", "13"]
    assert recs[2].uid == "geo3k:102" and recs[2].row == 2 and recs[2].source_file == str(path)
    assert recs[0].meta == {"choices": ["1", "2", "3", "4"], "ground_truth": "A"}
    assert recs[3].images[0].mode == "RGB" and recs[3].images[0].getpixel((0, 0)) == (120, 0, 0)
    assert len(load_records(path, max_rows=2)) == 2


def test_mmr1_fixture_without_tag_or_id(tmp_path):
    schema = pa.schema([("images", pa.list_(IMAGE)), ("problem", pa.string()), ("answer", pa.string())])
    path = _write(tmp_path / "mmr1.parquet", {
        "images": [[{"bytes": _png(), "path": None}, {"bytes": _png((0, 0, 9)), "path": None}]],
        "problem": ["Which of the two shapes is larger?"], "answer": ["B"]}, schema)
    for schema_name in ("auto", "mmr1"):
        (rec,) = load_records(path, schema=schema_name).records
        assert rec.question == "Which of the two shapes is larger?" and rec.answer == "B"
        assert len(rec.images) == 2 and rec.uid == "mmr1:0"


def test_geoqa_fixture(tmp_path):
    schema = pa.schema([("image", IMAGE), ("problem", pa.string()), ("solution", pa.string())])
    path = _write(tmp_path / "geoqa.parquet", {
        "image": [{"bytes": _png(), "path": "a.png"}, {"bytes": _png(), "path": "b.png"}],
        "problem": ["As shown, angle ABC = 35°, find angle 1.", "Find the length."],
        "solution": ["<answer> 145° </answer>", "It is 5"]}, schema)
    assert detect_schema(path) == "geoqa"
    recs = load_records(path).records
    assert [r.answer for r in recs] == ["145°", "It is 5"]  # untagged solutions are taken whole
    assert recs[0].question.startswith("As shown") and len(recs[0].images) == 1


def test_jsonl_with_image_paths(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "img" / "a.png")
    rows = [{"images": ["img/a.png"], "problem": "<image>What colour?", "answer": 3, "id": "q1"},
            {"image": str(tmp_path / "img" / "a.png"), "question": "Same image?"}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    recs = load_records(path).records
    assert [(r.uid, r.question, r.answer) for r in recs] == [("data:q1", "What colour?", "3"),
                                                             ("data:1", "Same image?", None)]
    assert recs[1].images[0].getpixel((0, 0)) == (1, 2, 3)


def test_missing_file_and_not_parquet(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_records(tmp_path / "nope.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet")
    with pytest.raises(DatasetError, match="junk.parquet"):
        load_records(junk)


def test_missing_column_names_file_and_column(tmp_path):
    path = _geo3k(tmp_path, name="nocol.parquet", problem=None)
    assert "problem" not in pq.read_schema(path).names
    with pytest.raises(DatasetError, match=r"nocol\.parquet.*row 0.*'problem'"):
        load_records(path, on_error="skip")
    with pytest.raises(DatasetError, match="'answer'"):
        load_records(_geo3k(tmp_path, name="noans.parquet", answer=None), require_answer=True)


def test_null_field_and_bad_image_name_file_and_row(tmp_path):
    problems = ["<image>a", "<image>b", None, "<image>d", "<image>"]
    images = [[{"bytes": _png(), "path": None}], [{"bytes": b"not an image", "path": None}],
              [{"bytes": _png(), "path": None}], [{"bytes": _png(), "path": None}],
              [{"bytes": _png(), "path": None}]]
    path = _geo3k(tmp_path, n=5, name="bad.parquet", problem=problems, images=images)
    with pytest.raises(DatasetError, match=r"bad\.parquet row 1: field 'images'\[0\]: not a readable image"):
        load_records(path)
    result = load_records(path, on_error="skip")
    assert [r.row for r in result.records] == [0, 3]
    assert result.skipped == 3 and len(result.errors) == 3
    assert "row 2: field 'problem' is null" in result.errors[1]
    assert "row 4: field 'problem' has no text" in result.errors[2]


def test_truncated_image_and_empty_list(tmp_path):
    good = _png()
    images = [[{"bytes": good[: len(good) // 2], "path": None}], [], None,
              [{"bytes": None, "path": "missing.png"}]]
    path = _geo3k(tmp_path, n=4, name="trunc.parquet", images=images)
    result = load_records(path, on_error="skip")
    assert result.skipped == 4 and not result.records
    assert "row 0" in result.errors[0] and "not a readable image" in result.errors[0]
    assert "row 1: field 'images' must be a non-empty list" in result.errors[1]
    assert "row 2: field 'images' is null" in result.errors[2]
    assert "row 3" in result.errors[3] and "image file not found" in result.errors[3]


def test_jsonl_corrupt_rows(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        json.dumps({"images": ["ok.png"], "problem": "fine"}),
        "{broken json",
        json.dumps({"images": ["ok.png"]}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"images": ["ok.png"], "problem": "x", "answer": {"nested": 1}}),
    ]))
    with pytest.raises(DatasetError, match=r"bad\.jsonl row 1: invalid JSON"):
        load_records(path)
    result = load_records(path, on_error="skip")
    assert len(result) == 1 and result.skipped == 4
    assert "row 2: missing field 'problem'" in result.errors[1]
    assert "row 4: field 'answer' must be a string or number" in result.errors[3]


def test_bad_arguments(tmp_path):
    path = _geo3k(tmp_path)
    with pytest.raises(ValueError, match="schema"):
        load_records(path, schema="coco")
    with pytest.raises(ValueError, match="on_error"):
        load_records(path, on_error="ignore")
    with pytest.raises(DatasetError, match="missing column 'image'"):
        load_records(path, schema="geoqa")
