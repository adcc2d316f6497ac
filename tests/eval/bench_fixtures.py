"""Small benchmark files in the published schemas (DATASETS.md), written by the tests.

Each writer returns the rows it wrote as plain dicts, so tests can state what grading must give.
Questions are short: the tiny character-level policy's prompt cap is a few dozen characters.
"""
from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(shade: int = 0, size: int = 8) -> bytes:
    """A tiny PNG of one grey level."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (shade, shade, shade)).save(buf, format="PNG")
    return buf.getvalue()


def b64png(shade: int = 0) -> str:
    """A tiny PNG as VLMEvalKit's base64 cell."""
    return base64.b64encode(png(shade)).decode()


def _write_parquet(path: Path, rows: list[dict], schema: pa.Schema, row_group_size: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)


def _write_tsv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=names, delimiter="\t", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in names})


def img(shade: int = 0) -> dict:
    """A hub image struct."""
    return {"bytes": png(shade), "path": None}


BROKEN_IMAGE = {"bytes": b"not an image", "path": None}


# ---------------------------------------------------------------- MathVision
MATHVISION_SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()), ("options", pa.list_(pa.string())),
                               ("image", pa.string()), ("decoded_image", IMAGE), ("answer", pa.string()),
                               ("solution", pa.string()), ("level", pa.int64()), ("subject", pa.string())])


def mathvision_hub(root: Path) -> list[dict]:
    """Test split: option-text MC, options only in the image, free form, two broken rows; testmini ignored."""
    rows = [
        dict(id="1", question="<image1>2+2?", options=["3", "4", "5"], answer="B", level=1, subject="algebra"),
        dict(id="2", question="<image1>Which?", options=["A", "B", "C", "D", "E"], answer="D", level=2,
             subject="geometry"),
        dict(id="3", question="<image1>1/2=?", options=[], answer="0.5", level=1, subject="algebra"),
        dict(id="4", question="<image1>Bad", options=["1", "2"], answer="F", level=1, subject="algebra"),  # F: none
        dict(id="5", question="<image1>Img?", options=[], answer="7", level=3, subject="geometry"),  # broken image
    ]
    for k, r in enumerate(rows):
        r.update(image=f"images/{r['id']}.jpg", solution="", decoded_image=BROKEN_IMAGE if r["id"] == "5" else img(k))
    _write_parquet(root / "MathVision" / "data" / "test-00000-of-00001.parquet", rows, MATHVISION_SCHEMA)
    _write_parquet(root / "MathVision" / "data" / "testmini-00000-of-00001.parquet", rows[:1], MATHVISION_SCHEMA)
    return rows


def mathvision_tsv(root: Path) -> list[dict]:
    """VLMEvalKit layout: choices as a Python list repr; a row with bad base64."""
    rows = [
        dict(index=1, image=b64png(10), question="2+2?", answer="B", choices="['3', '4', '5']", category="algebra"),
        dict(index=2, image=b64png(20), question="1/2=?", answer="0.5", choices="[]", category="algebra"),
        dict(index=3, image="@@not base64@@", question="x?", answer="1", choices="[]", category="algebra"),
    ]
    _write_tsv(root / "MathVision.tsv", rows)
    return rows


# ---------------------------------------------------------------- MathVerse
MATHVERSE_SCHEMA = pa.schema([("sample_index", pa.string()), ("problem_index", pa.string()),
                              ("problem_version", pa.string()), ("question", pa.string()), ("image", IMAGE),
                              ("answer", pa.string()), ("question_type", pa.string()),
                              ("metadata", pa.struct([("split", pa.string()), ("source", pa.string()),
                                                      ("subject", pa.string()), ("subfield", pa.string())])),
                              ("query_wo", pa.string()), ("query_cot", pa.string()),
                              ("question_for_eval", pa.string())])
VERSIONS = ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only")


def mathverse_hub(root: Path) -> list[dict]:
    """Two problems in five versions: problem 1 multiple choice, problem 2 free form (Vision Only has no text)."""
    rows = []
    for p, (qtype, answer, subject) in enumerate([("multi-choice", "B", "plane"), ("free-form", "12", "solid")], 1):
        for v, version in enumerate(VERSIONS):
            question = "" if version == "Vision Only" else f"P{p} v{v}? A:1 B:2"
            rows.append(dict(sample_index=str(len(rows) + 1), problem_index=str(p), problem_version=version,
                             question=question, image=img(v), answer=answer, question_type=qtype,
                             metadata=dict(split="testmini", source="x", subject=subject, subfield="y"),
                             query_wo="", query_cot="", question_for_eval=question))
    _write_parquet(root / "MathVerse" / "testmini.parquet", rows, MATHVERSE_SCHEMA, row_group_size=3)
    return rows


# ---------------------------------------------------------------- WeMath
WEMATH_SCHEMA = pa.schema([("ID", pa.string()), ("split", pa.string()), ("knowledge concept", pa.string()),
                           ("question", pa.string()), ("option", pa.string()), ("answer", pa.string()),
                           ("image_path", IMAGE), ("key", pa.string()), ("question number", pa.int64()),
                           ("knowledge concept description", pa.string())])


def wemath_rows() -> list[dict]:
    """Four 2-step composites and one 3-step composite (gold always A)."""
    rows = []
    for pid, steps in (("1", 2), ("2", 2), ("3", 2), ("4", 2), ("5", 3)):
        for key in [f"{steps}steps_{k}" for k in range(1, steps + 1)] + [f"{steps}steps_multi"]:
            rows.append({"ID": pid, "split": "testmini", "knowledge concept": f"c{pid}", "question": f"Q{pid} {key}",
                         "option": "A. 1;B. 2;C. 3", "answer": "A", "image_path": img(int(pid)), "key": key,
                         "question number": len(rows), "knowledge concept description": ""})
    return rows


def wemath_hub(root: Path) -> list[dict]:
    rows = wemath_rows()
    _write_parquet(root / "WeMath" / "testmini.parquet", rows, WEMATH_SCHEMA, row_group_size=4)
    return rows


def wemath_tsv(root: Path) -> list[dict]:
    """VLMEvalKit layout: options in columns A, B, C."""
    rows = [{"index": k, "image": b64png(k), "question": r["question"], "answer": "A", "ID": r["ID"], "key": r["key"],
             "A": "1", "B": "2", "C": "3", "hint": "", "requirement": ""} for k, r in enumerate(wemath_rows())]
    _write_tsv(root / "WeMath.tsv", rows)
    return rows


# ---------------------------------------------------------------- LogicVista
def logicvista_json(root: Path) -> dict:
    """dataset.json + images/: single and multi-select letters, options only in the image, one broken item."""
    folder = root / "LogicVista"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    items = {
        "v1_0": dict(imagename="0.png", question="Pick one.", answer="A", reasoning="", skill=["inductive"]),
        "v1_1": dict(imagename="1.png", question="Pick all.", answer="B, D", reasoning="",
                     skill=["deductive", "spatial"]),
        "v1_2": dict(imagename="2.png", question="Pick all.", answer="A, C", reasoning="", skill=["spatial"]),
        "v1_3": dict(imagename="3.png", question="Bad.", answer="maybe", reasoning="", skill=["spatial"]),
    }
    for k in range(4):
        (folder / "images" / f"{k}.png").write_bytes(png(k * 30))
    (folder / "dataset.json").write_text(json.dumps(items))
    return items


# ---------------------------------------------------------------- DynaMath
DYNAMATH_SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()), ("image", pa.string()),
                             ("decoded_image", IMAGE), ("ground_truth", pa.string()), ("answer_type", pa.string()),
                             ("subject", pa.string()), ("knowledge_level", pa.string())])
DYNAMATH_QUESTIONS = (("1", "float", "subjA"), ("2", "multiple choice", "subjB"), ("3", "text", "subjA"))


def dynamath_gold(qid: str, variant: int) -> str:
    """Gold answer of a question's variant (differs per variant, as the generated variants do)."""
    kind = dict((q, t) for q, t, _ in DYNAMATH_QUESTIONS)[qid]
    return {"float": f"{variant}.25", "multiple choice": "ABC"[variant - 1], "text": f"yes{variant}"}[kind]


def dynamath_hub(root: Path, variants: int = 3) -> list[dict]:
    """sample_variantK files, one row per question each."""
    rows = []
    for v in range(1, variants + 1):
        part = [dict(id=q, question=f"D{q}?", image=f"{q}.png", decoded_image=img(v), ground_truth=dynamath_gold(q, v),
                     answer_type=t, subject=s, knowledge_level="elementary") for q, t, s in DYNAMATH_QUESTIONS]
        _write_parquet(root / "DynaMath" / f"sample_variant{v}-00000-of-00001.parquet", part, DYNAMATH_SCHEMA)
        rows += [dict(r, variant=v) for r in part]
    return rows


def dynamath_tsv(root: Path, variants: int = 3) -> list[dict]:
    rows = []
    for v in range(1, variants + 1):
        for q, t, s in DYNAMATH_QUESTIONS:
            rows.append(dict(index=len(rows), image=b64png(v), question=f"D{q}?", answer=dynamath_gold(q, v), qid=q,
                             varid=v, answer_type=t, subject=s, knowledge_level="elementary"))
    _write_tsv(root / "DynaMath.tsv", rows)
    return rows


# ---------------------------------------------------------------- MathVista
MATHVISTA_SCHEMA = pa.schema([("pid", pa.string()), ("question", pa.string()), ("image", pa.string()),
                              ("decoded_image", IMAGE), ("choices", pa.list_(pa.string())), ("unit", pa.string()),
                              ("precision", pa.float64()), ("answer", pa.string()), ("question_type", pa.string()),
                              ("answer_type", pa.string()),
                              ("metadata", pa.struct([("task", pa.string()), ("category", pa.string())])),
                              ("query", pa.string())])


def mathvista_hub(root: Path) -> list[dict]:
    """MC with a text answer, an integer, a float with precision 1, and a MC row whose answer is no choice."""
    base = dict(image="x.png", unit=None, precision=None, query="")
    rows = [
        dict(base, pid="1", question="Color?", choices=["red", "blue"], answer="blue", question_type="multi_choice",
             answer_type="text", metadata=dict(task="FQA", category="x")),
        dict(base, pid="2", question="Count?", choices=None, answer="3", question_type="free_form",
             answer_type="integer", metadata=dict(task="VQA", category="x")),
        dict(base, pid="3", question="Len?", choices=None, answer="1.5", precision=1.0, question_type="free_form",
             answer_type="float", metadata=dict(task="VQA", category="x")),
        dict(base, pid="4", question="Bad?", choices=["a", "b"], answer="c", question_type="multi_choice",
             answer_type="text", metadata=dict(task="FQA", category="x")),
    ]
    for k, r in enumerate(rows):
        r["decoded_image"] = img(k)
    _write_parquet(root / "MathVista" / "data" / "testmini-00000-of-00001.parquet", rows, MATHVISTA_SCHEMA)
    return rows


def boxed(answer: str) -> str:
    """A response in the project's format."""
    return f"<think>ok</think>\\boxed{{{answer}}}"


def mathverse_tsv(root: Path) -> list[dict]:
    """VLMEvalKit layout: the version in `category`; a later version shares the first row's image by index."""
    rows = [dict(index=1, image=b64png(1), question="P1? A:1 B:2", answer="B", category="Text Dominant",
                 query_cot="", question_for_eval="", subject="plane", subfield="y"),
            dict(index=2, image="1", question="", answer="B", category="Vision Only", query_cot="",
                 question_for_eval="", subject="plane", subfield="y")]
    _write_tsv(root / "MathVerse_MINI.tsv", rows)
    return rows


def logicvista_tsv(root: Path) -> list[dict]:
    """VLMEvalKit layout: skill as a comma list; one row holds two images (a JSON list of base64)."""
    rows = [dict(index=0, image=json.dumps([b64png(1), b64png(2)]), question="Pick all.", answer="A, C",
                 skill="spatial, deductive", capability="x"),
            dict(index=1, image=b64png(3), question="Pick one.", answer="B", skill="numerical", capability="x")]
    _write_tsv(root / "LogicVista.tsv", rows)
    return rows


def mathvista_tsv(root: Path) -> list[dict]:
    """VLMEvalKit layout: choices as a Python list repr, NaN-free blanks for free-form rows."""
    rows = [dict(index=1, image=b64png(1), question="Color?", answer="blue", choices="['red', 'blue']", unit="",
                 precision="", question_type="multi_choice", answer_type="text", task="FQA"),
            dict(index=2, image=b64png(2), question="Len?", answer="1.5", choices="", unit="cm", precision="1.0",
                 question_type="free_form", answer_type="float", task="VQA")]
    _write_tsv(root / "MathVista_MINI.tsv", rows)
    return rows
