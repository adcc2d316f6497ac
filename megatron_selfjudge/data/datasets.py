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

Every row becomes a ``PromptRecord`` with its images and the question with its ``<image>``
tags removed (collate puts the image placeholders back). A row with a missing or null field,
or an image that cannot be decoded, raises ``DatasetError`` naming the file and the row; with
``on_error="skip"`` it is skipped and counted instead. A required column that is absent from
a parquet file, or a file that cannot be read as its format, fails the whole file in either
mode. Field values are only ever read as data (no eval).

Rows are untrusted input, so ``ImageLimits`` (from ``data.*`` of the config) bounds them:

- an image path must resolve (symlinks followed) inside the data file's folder or one of
  ``data.image_roots``; any other path is refused with one message whether or not it exists;
- an image whose header declares more than ``data.max_image_pixels`` pixels, or whose encoded
  form exceeds ``data.max_image_bytes``, is refused before it is decoded; a row may hold at
  most ``data.max_images_per_row`` images;
- records keep images encoded and decode them on each access (``LazyImages``), reduced early
  towards the model's image size, so resident memory holds compressed bytes, not pixels.
  Each image is decoded once at load to find broken rows before training starts.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from megatron_selfjudge.config import DataConfig

from .prompts import strip_image_tags
from .synthetic import Example

SCHEMAS = ("auto", "geometry3k", "mmr1", "geoqa", "jsonl")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_META_FIELDS = ("choices", "ground_truth", "family", "reasoning")
# Raster formats of the published sets. Pillow's other openers are left out: EPS, for one,
# hands the file to Ghostscript, which is no thing to run on untrusted rows.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_DATA_DEFAULTS = DataConfig()


class DatasetError(ValueError):
    """A dataset file or row that cannot be used; the message names the file and row."""


class _RowError(Exception):
    """Raised inside a row parser; the loader adds the file name and row number."""


@dataclass(frozen=True)
class ImageLimits:
    """Where a row's image files may live and how large its images may be (see the module doc)."""

    roots: tuple[str, ...] = tuple(_DATA_DEFAULTS.image_roots)  # besides the data file's folder
    max_pixels: int = _DATA_DEFAULTS.max_image_pixels
    max_bytes: int = _DATA_DEFAULTS.max_image_bytes
    max_per_row: int = _DATA_DEFAULTS.max_images_per_row
    target_size: int | None = None  # the model's image side: decoding reduces towards it

    @classmethod
    def from_config(cls, data: DataConfig, image_size: int | None = None) -> "ImageLimits":
        """The limits of a run's ``data`` section; image_size is ``model.image_size``."""
        return cls(roots=tuple(data.image_roots), max_pixels=data.max_image_pixels,
                   max_bytes=data.max_image_bytes, max_per_row=data.max_images_per_row,
                   target_size=image_size)


@dataclass(frozen=True)
class _RowContext:
    """What the row parsers of one file need: its folder, the resolved roots and the limits."""

    base_dir: Path
    roots: tuple[Path, ...]
    limits: ImageLimits


@dataclass(frozen=True)
class _ImageSource:
    """One image of a row, still encoded: its bytes, or a file path confined at every read."""

    where: str  # e.g. "field 'images'[0]", for messages
    data: bytes | None = None
    path: str | None = None


class LazyImages(SequenceABC):
    """A record's images, kept encoded; each access decodes (within the limits) a fresh RGB image."""

    def __init__(self, sources: Sequence[_ImageSource], context: _RowContext, source_file: str, row: int):
        self._sources = tuple(sources)
        self._context = context
        self._origin = f"{source_file} row {row}"

    def __len__(self) -> int:
        return len(self._sources)

    def __getitem__(self, index: int | slice) -> Image.Image | list[Image.Image]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        source = self._sources[index]
        try:
            return _decode(source, self._context)
        except _RowError as err:  # the file changed since it was checked at load
            raise DatasetError(f"{self._origin}: {err}") from None


@dataclass
class PromptRecord:
    """One prompt: its images, the question (image tags removed) and the answer if known."""

    uid: str
    images: Sequence[Image.Image]  # a list, or LazyImages for rows read from files
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
    schema: str = ""  # the schema the file was read with

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[PromptRecord]:
        return iter(self.records)


def _one_line(err: BaseException) -> str:
    """A library's error text on one printable line (Arrow's thrift messages end in newlines)."""
    text = "".join(c if c.isprintable() else " " for c in str(err))
    return " ".join(text.split())


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


def _shown(value: str, limit: int = 200) -> str:
    """A row's text for a message: quoted, and cut when long (paths can be kilobytes)."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"


def _confined_path(value: Any, context: _RowContext, where: str) -> Path:
    """The real path of a row's image file, refused unless it lies inside the allowed roots."""
    if not isinstance(value, str):
        raise _RowError(f"{where}: 'path' must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise _RowError(f"{where}: 'path' contains a NUL byte")
    joined = context.base_dir / value  # an absolute value replaces the base
    real = Path(os.path.realpath(joined))
    if not any(real.is_relative_to(root) for root in context.roots):
        # One message whether or not the target exists: a row must not probe the file system.
        raise _RowError(f"{where}: image path {_shown(value)} is outside the data folder and "
                        "data.image_roots")
    try:
        found = real.is_file()
    except OSError as err:  # e.g. a name longer than the OS allows
        raise _RowError(f"{where}: cannot read image file {_shown(value)} ({err.strerror})") from None
    if not found:
        raise _RowError(f"{where}: image file not found: {_shown(str(joined))}")
    return real


def _too_large(where: str, size: int, limits: ImageLimits) -> None:
    if size > limits.max_bytes:
        raise _RowError(f"{where}: image of {size} bytes exceeds data.max_image_bytes ({limits.max_bytes})")


def _read_bytes(source: _ImageSource, context: _RowContext) -> bytes:
    """The encoded image: the row's bytes, or the confined file's (read no further than the cap)."""
    if source.data is not None:
        _too_large(source.where, len(source.data), context.limits)
        return source.data
    real = _confined_path(source.path, context, source.where)
    try:
        _too_large(source.where, real.stat().st_size, context.limits)
        with real.open("rb") as fh:
            data = fh.read(context.limits.max_bytes + 1)  # the file may have grown since stat
    except OSError as err:
        raise _RowError(f"{source.where}: cannot read image file ({err.strerror})") from None
    _too_large(source.where, len(data), context.limits)
    return data


def _decode(source: _ImageSource, context: _RowContext) -> Image.Image:
    """Decode one image into RGB, refusing oversized ones from their header, before decoding."""
    where, limits = source.where, context.limits
    data = _read_bytes(source, context)
    try:
        with warnings.catch_warnings():
            # The pixel cap below replaces Pillow's warning; its hard limit (twice its warning
            # level) still raises DecompressionBombError, handled as the same refusal.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
        width, height = img.size
        if width * height > limits.max_pixels:
            raise _RowError(f"{where}: image of {width} x {height} = {width * height} pixels exceeds "
                            f"data.max_image_pixels ({limits.max_pixels})")
        target = limits.target_size
        if target and img.format == "JPEG":
            img.draft("RGB", (target, target))  # DCT scaling: decode at 1/2, 1/4 or 1/8 directly
        img.load()  # decode now, so a truncated file fails here and not inside collate
        img = img.convert("RGB")
        if target:
            factor = min(img.width // target, img.height // target)
            if factor >= 2:  # whole-factor box reduction; collate's resize makes the final size
                img = img.reduce(factor)
        return img
    except _RowError:
        raise
    except Image.DecompressionBombError as err:
        raise _RowError(f"{where}: image exceeds data.max_image_pixels ({limits.max_pixels}): "
                        f"{_one_line(err)}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise _RowError(f"{where}: not a readable image ({type(err).__name__}: {_one_line(err)})") from err


def _image_source(value: Any, context: _RowContext, where: str) -> _ImageSource:
    """A checked image of a row: decoded once here (and dropped) so broken rows surface at load."""
    if isinstance(value, str):  # JSONL: a bare path
        value = {"path": value}
    if not isinstance(value, dict):
        raise _RowError(f"{where}: expected a {{bytes, path}} struct, got {type(value).__name__}")
    data, path = value.get("bytes"), value.get("path")
    if data is not None:
        if not isinstance(data, (bytes, bytearray)):
            raise _RowError(f"{where}: 'bytes' must be binary, got {type(data).__name__}")
        source = _ImageSource(where, data=bytes(data))
    elif path is not None and path != "":
        source = _ImageSource(where, path=path)
    else:
        raise _RowError(f"{where}: has neither image bytes nor a path")
    _decode(source, context)
    return source


def _image_list(row: dict, name: str, context: _RowContext) -> list[_ImageSource]:
    value = _require(row, name)
    if not isinstance(value, list) or not value:
        raise _RowError(f"field {name!r} must be a non-empty list of images")
    limit = context.limits.max_per_row
    if len(value) > limit:
        raise _RowError(f"field {name!r} holds {len(value)} images > data.max_images_per_row ({limit})")
    return [_image_source(v, context, f"field {name!r}[{k}]") for k, v in enumerate(value)]


def _uid(row: dict, stem: str, index: int) -> str:
    for key in ("uid", "id"):
        value = row.get(key)
        if value is not None and not isinstance(value, (dict, list)):
            return f"{stem}:{value}"
    return f"{stem}:{index}"


def _meta(row: dict) -> dict:
    return {k: row[k] for k in _META_FIELDS if row.get(k) is not None}


# ---------------------------------------------------------------- row parsers per schema
def _parse_images_problem_answer(row: dict, context: _RowContext, require_answer: bool) -> tuple:
    return (_image_list(row, "images", context), _question(row, "problem"),
            _optional_answer(row, "answer", require_answer))


def _parse_geoqa(row: dict, context: _RowContext, require_answer: bool) -> tuple:
    images = [_image_source(_require(row, "image"), context, "field 'image'")]
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


def _parse_jsonl(row: dict, context: _RowContext, require_answer: bool) -> tuple:
    if "images" in row:
        images = _image_list(row, "images", context)
    elif "image" in row:
        images = [_image_source(_require(row, "image"), context, "field 'image'")]
    else:
        raise _RowError("missing field 'images' (or 'image')")
    if "problem" not in row and "question" not in row:
        raise _RowError("missing field 'problem' (or 'question')")
    question = _question(row, "problem" if "problem" in row else "question")
    return images, question, _optional_answer(row, "answer", require_answer)


_PARSERS: dict[str, Callable[[dict, _RowContext, bool], tuple]] = {
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
    except (pa.ArrowException, OSError, ValueError) as err:  # ValueError: names that are not UTF-8
        raise DatasetError(f"{path}: not a readable parquet file ({_one_line(err)})") from None


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


def _batch_rows(batch: pa.RecordBatch) -> list[dict | _RowError]:
    """A record batch as row dicts; a row whose text is not UTF-8 becomes a row error."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        pass  # parquet does not validate string columns: find the bad rows one by one
    rows: list[dict | _RowError] = []
    for i in range(batch.num_rows):
        row: dict = {}
        for name, column in zip(batch.schema.names, batch.columns):
            try:
                row[name] = column[i].as_py()
            except UnicodeDecodeError:
                row = _RowError(f"column {name!r} holds text that is not UTF-8")
                break
        rows.append(row)
    return rows


def _parquet_rows(path: Path, schema: str, answer_column: str | None,
                  require_answer: bool) -> Iterator[tuple[int, dict | _RowError]]:
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
            # Small batches: a batch's encoded images are held twice (Arrow and Python).
            for batch in pfile.iter_batches(batch_size=32):
                for row in _batch_rows(batch):
                    yield index, row
                    index += 1
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DatasetError(f"{path}: parquet read failed near row {index} ({_one_line(err)})") from None


def _jsonl_line(number: int, line: bytes) -> dict | _RowError:
    """One JSONL line as a row, or the row error that says why it is not one."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return _RowError(f"line {number} is not UTF-8 text "
                         f"(byte 0x{line[err.start]:02x} at column {err.start + 1})")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        return _RowError(f"invalid JSON on line {number} ({err.msg} at column {err.colno})")
    except RecursionError:
        return _RowError(f"invalid JSON on line {number} (nested too deeply)")
    if not isinstance(row, dict):
        return _RowError(f"line {number} is not a JSON object (got {type(row).__name__})")
    return row


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | _RowError]]:
    # Bytes, decoded line by line: one line in another encoding is one bad row, not a failed file.
    try:
        with path.open("rb") as fh:
            index = 0
            for number, line in enumerate(fh, start=1):
                if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]  # a UTF-8 byte-order mark
                if not line.strip():
                    continue  # blank lines are not rows
                yield index, _jsonl_line(number, line)
                index += 1
    except OSError as err:
        raise DatasetError(f"{path}: cannot read ({err.strerror or err})") from None


def load_records(path: str | Path, *, schema: str = "auto", on_error: str = "raise",
                 require_answer: bool = False, max_rows: int | None = None,
                 limits: ImageLimits | None = None) -> LoadResult:
    """Read a dataset file into PromptRecords; bad rows raise DatasetError or are skipped.

    limits defaults to the ``data`` defaults of the config (confined paths, capped images)."""
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
    limits = ImageLimits() if limits is None else limits
    # Real paths (symlinks resolved) on both sides of the containment check.
    roots = tuple(Path(os.path.realpath(r)) for r in (path.parent, *limits.roots))
    # Absolute now, so a later change of the working directory cannot move a record's images.
    context = _RowContext(base_dir=path.parent.absolute(), roots=roots, limits=limits)
    result = LoadResult(records=[], schema=schema)
    for index, row in rows:
        if max_rows is not None and len(result.records) >= max_rows:
            break
        try:
            if isinstance(row, _RowError):
                raise row
            sources, question, answer = parse(row, context, require_answer)
        except _RowError as err:
            message = f"{path} row {index}: {err}"
            if on_error == "raise":
                raise DatasetError(message) from None
            result.skipped += 1
            result.errors.append(message)
            continue
        images = LazyImages(sources, context, str(path), index)
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
