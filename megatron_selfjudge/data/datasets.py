"""Local loaders for the training sets' published schemas (DATASETS.md), one record type out.

Schemas read (``schema="auto"`` picks one from the file):

- ``geometry3k`` / ``mmr1`` (parquet): ``images`` list of ``{bytes, path}``, ``problem``
  (Geometry3K starts it with ``<image>``), ``answer``; optional ``id``, ``choices``,
  ``ground_truth`` (and ``uid``, ``family``, ``reasoning`` from the synthetic writer).
- ``geoqa`` (parquet, R1-V format): ``image`` one ``{bytes, path}``, ``problem``,
  ``solution`` like ``<answer> 145° </answer>``.
- ``jsonl``: one JSON object a line, ``images`` (list of paths) or ``image`` (a path),
  ``problem`` or ``question``, optional ``answer``, ``id``/``uid``; relative paths are
  resolved against the JSONL file's folder.

Every row becomes a ``PromptRecord`` with decoded RGB images and the question with its
``<image>`` tags removed (collate puts the image placeholders back). A row with a missing
or null field, or an image that cannot be decoded, raises ``DatasetError`` naming the file
and the row; with ``on_error="skip"`` it is skipped and counted instead. A required column
that is absent from a parquet file fails the whole file in either mode. Field values are
only ever read as data (no eval).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .prompts import strip_image_tags
from .synthetic import Example

SCHEMAS = ("auto", "geometry3k", "mmr1", "geoqa", "jsonl")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_META_FIELDS = ("choices", "ground_truth", "family", "reasoning")


class DatasetError(ValueError):
    """A dataset file or row that cannot be used; the message names the file and row."""


class _RowError(Exception):
    """Raised inside a row parser; the loader adds the file name and row number."""


@dataclass
class PromptRecord:
    """One prompt: its images, the question (image tags removed) and the answer if known."""

    uid: str
    images: list[Image.Image]
    question: str
    answer: str | None
    source_file: str
    row: int
    meta: dict = field(default_factory=dict)


@dataclass
class LoadResult:
    """Records read from one file, and how many rows were skipped (on_error='skip')."""

    records: list[PromptRecord]
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # one message per skipped row

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[PromptRecord]:
        return iter(self.records)


# ---------------------------------------------------------------- field readers
def _require(row: dict, name: str) -> Any:
    if name not in row:
        raise _RowError(f"missing field {name!r}")
    if row[name] is None:
        raise _RowError(f"field {name!r} is null")
    return row[name]


def _text(row: dict, name: str) -> str:
    value = _require(row, name)
    if not isinstance(value, str):
        raise _RowError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _question(row: dict, name: str) -> str:
    question = strip_image_tags(_text(row, name))
    if not question:
        raise _RowError(f"field {name!r} has no text besides image tags")
    return question


def _optional_answer(row: dict, name: str, required: bool) -> str | None:
    if required:
        _require(row, name)
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _RowError(f"field {name!r} must be a string or number, got {type(value).__name__}")
    return str(value).strip()


def _open_image(data: bytes | None, path: str | None, base_dir: Path, where: str) -> Image.Image:
    """Decode image bytes, or read the file at path (relative to base_dir) when bytes are absent."""
    try:
        if data is not None:
            if not isinstance(data, (bytes, bytearray)):
                raise _RowError(f"{where}: 'bytes' must be binary, got {type(data).__name__}")
            img = Image.open(io.BytesIO(data))
        elif path:
            full = Path(path) if Path(path).is_absolute() else base_dir / path
            if not full.is_file():
                raise _RowError(f"{where}: image file not found: {full}")
            img = Image.open(full)
        else:
            raise _RowError(f"{where}: has neither image bytes nor a path")
        img.load()  # decode now, so a truncated file fails here and not inside collate
        return img.convert("RGB")
    except _RowError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise _RowError(f"{where}: not a readable image ({type(err).__name__}: {err})") from err


def _image_struct(value: Any, base_dir: Path, where: str) -> Image.Image:
    if isinstance(value, str):  # JSONL: a bare path
        return _open_image(None, value, base_dir, where)
    if not isinstance(value, dict):
        raise _RowError(f"{where}: expected a {{bytes, path}} struct, got {type(value).__name__}")
    return _open_image(value.get("bytes"), value.get("path"), base_dir, where)


def _image_list(row: dict, name: str, base_dir: Path) -> list[Image.Image]:
    value = _require(row, name)
    if not isinstance(value, list) or not value:
        raise _RowError(f"field {name!r} must be a non-empty list of images")
    return [_image_struct(v, base_dir, f"field {name!r}[{k}]") for k, v in enumerate(value)]


def _uid(row: dict, stem: str, index: int) -> str:
    for key in ("uid", "id"):
        value = row.get(key)
        if value is not None and not isinstance(value, (dict, list)):
            return f"{stem}:{value}"
    return f"{stem}:{index}"


def _meta(row: dict) -> dict:
    return {k: row[k] for k in _META_FIELDS if row.get(k) is not None}


# ---------------------------------------------------------------- row parsers per schema
def _parse_images_problem_answer(row: dict, base_dir: Path, require_answer: bool) -> tuple:
    return (_image_list(row, "images", base_dir), _question(row, "problem"),
            _optional_answer(row, "answer", require_answer))


def _parse_geoqa(row: dict, base_dir: Path, require_answer: bool) -> tuple:
    images = [_image_struct(_require(row, "image"), base_dir, "field 'image'")]
    solution = row.get("solution")
    if require_answer:
        solution = _text(row, "solution")
    answer = None
    if solution is not None:
        if not isinstance(solution, str):
            raise _RowError(f"field 'solution' must be a string, got {type(solution).__name__}")
        tagged = _ANSWER_TAG.findall(solution)
        # R1-V wraps the answer in <answer> tags; an untagged solution is taken whole.
        answer = (tagged[-1] if tagged else solution).strip()
    return images, _question(row, "problem"), answer


def _parse_jsonl(row: dict, base_dir: Path, require_answer: bool) -> tuple:
    if "images" in row:
        images = _image_list(row, "images", base_dir)
    elif "image" in row:
        images = [_image_struct(_require(row, "image"), base_dir, "field 'image'")]
    else:
        raise _RowError("missing field 'images' (or 'image')")
    if "problem" not in row and "question" not in row:
        raise _RowError("missing field 'problem' (or 'question')")
    question = _question(row, "problem" if "problem" in row else "question")
    return images, question, _optional_answer(row, "answer", require_answer)


_PARSERS: dict[str, Callable[[dict, Path, bool], tuple]] = {
    "geometry3k": _parse_images_problem_answer,
    "mmr1": _parse_images_problem_answer,
    "geoqa": _parse_geoqa,
    "jsonl": _parse_jsonl,
}
_REQUIRED_COLUMNS = {"geometry3k": ("images", "problem"), "mmr1": ("images", "problem"),
                     "geoqa": ("image", "problem")}


# ---------------------------------------------------------------- file readers
def _parquet_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise DatasetError(f"{path}: not a readable parquet file ({err})") from err


def detect_schema(path: str | Path) -> str:
    """Name of the schema of a dataset file: 'geometry3k', 'geoqa' or 'jsonl'."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        return "jsonl"
    names = set(_parquet_schema(path).names)
    if "images" in names:
        return "geometry3k"  # MMR1 shares this layout
    if "image" in names:
        return "geoqa"
    raise DatasetError(f"{path}: cannot tell the schema: no 'images' or 'image' column "
                       f"(columns: {sorted(names)})")


def _parquet_rows(path: Path, schema: str, answer_column: str | None,
                  require_answer: bool) -> Iterator[tuple[int, dict]]:
    names = _parquet_schema(path).names
    required = list(_REQUIRED_COLUMNS[schema]) + ([answer_column] if require_answer and answer_column else [])
    missing = [c for c in required if c not in names]
    if missing:
        # The column is absent for every row, so even skip mode cannot use the file.
        raise DatasetError(f"{path} row 0: missing column {missing[0]!r} (absent from every row; "
                           f"columns: {names})")
    try:
        index = 0
        with pq.ParquetFile(path) as pfile:
            for batch in pfile.iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    yield index, row
                    index += 1
    except (pa.ArrowException, OSError) as err:
        raise DatasetError(f"{path}: parquet read failed near row {index} ({err})") from err


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | _RowError]]:
    with path.open(encoding="utf-8") as fh:
        index = 0
        for line in fh:
            if not line.strip():
                continue  # blank lines are not rows
            try:
                row = json.loads(line)
                yield index, (row if isinstance(row, dict) else _RowError("line is not a JSON object"))
            except json.JSONDecodeError as err:
                yield index, _RowError(f"invalid JSON ({err})")
            index += 1


def load_records(path: str | Path, *, schema: str = "auto", on_error: str = "raise",
                 require_answer: bool = False, max_rows: int | None = None) -> LoadResult:
    """Read a dataset file into PromptRecords; bad rows raise DatasetError or are skipped."""
    path = Path(path)
    if schema not in SCHEMAS:
        raise ValueError(f"schema: unknown {schema!r}; choose one of {SCHEMAS}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: must be 'raise' or 'skip', got {on_error!r}")
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows: must be >= 0, got {max_rows}")
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    schema = detect_schema(path) if schema == "auto" else schema
    answer_column = {"geoqa": "solution", "jsonl": None}.get(schema, "answer")
    rows = _jsonl_rows(path) if schema == "jsonl" else _parquet_rows(path, schema, answer_column,
                                                                   require_answer)
    parse = _PARSERS[schema]
    result = LoadResult(records=[])
    for index, row in rows:
        if max_rows is not None and len(result.records) >= max_rows:
            break
        try:
            if isinstance(row, _RowError):
                raise row
            images, question, answer = parse(row, path.parent, require_answer)
        except _RowError as err:
            message = f"{path} row {index}: {err}"
            if on_error == "raise":
                raise DatasetError(message) from None
            result.skipped += 1
            result.errors.append(message)
            continue
        result.records.append(PromptRecord(uid=_uid(row, path.stem, index), images=images,
                                           question=question, answer=answer,
                                           source_file=str(path), row=index, meta=_meta(row)))
    return result


def examples_to_records(examples: Sequence[Example], source: str = "synthetic") -> list[PromptRecord]:
    """In-memory synthetic Examples as PromptRecords (no parquet round trip needed)."""
    return [PromptRecord(uid=ex.uid, images=[ex.image], question=ex.question, answer=ex.answer,
                         source_file=source, row=i,
                         meta={"family": ex.family, "reasoning": ex.reasoning})
            for i, ex in enumerate(examples)]
