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

Training files stream (``open_records`` -> ``StreamingRecords``): the load-time check reads a
parquet file a row group at a time (JSONL in chunks of lines), decoding images in a pool of
``workers`` spawned processes with at most 2 x workers units in flight, and keeps only the
positions of the usable rows (three int64 per row); ``take`` reads the row groups or lines
that hold the asked rows, each once. Resident memory is bounded by a row group, not the file.
A file whose size or modification time changed since its check is refused. ``load_records``
(held-out sets, small files) is the same scan followed by one ``take`` of every row.
"""

from __future__ import annotations

import io
import itertools
import json
import multiprocessing
import os
import re
import warnings
from array import array
from collections import deque
from collections.abc import Sequence as SequenceABC
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from megatron_selfjudge.config import DataConfig

from .prompts import strip_image_tags
from .synthetic import Example

SCHEMAS = ("auto", "geometry3k", "mmr1", "geoqa", "jsonl")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BUFFER_NAME = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
_META_FIELDS = ("choices", "ground_truth", "family", "reasoning")
# Raster formats of the published sets. Pillow's other openers are left out: EPS, for one,
# hands the file to Ghostscript, which is no thing to run on untrusted rows.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_DATA_DEFAULTS = DataConfig()


class DatasetError(ValueError):
    """A dataset file or row that cannot be used; the message names the file and row."""


class RowError(Exception):
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
class RowContext:
    """What the row parsers of one file need: its folder, the resolved roots and the limits."""

    base_dir: Path
    roots: tuple[Path, ...]
    limits: ImageLimits
    # Decode each image once while parsing: the load-time scan does, to find broken rows before
    # training; rows re-read for a step do not (their images are decoded on use, LazyImages).
    check_images: bool = True


@dataclass(frozen=True)
class ImageSource:
    """One image of a row, still encoded: its bytes, or a file path confined at every read."""

    where: str  # e.g. "field 'images'[0]", for messages
    data: bytes | None = None
    path: str | None = None


class LazyImages(SequenceABC):
    """A record's images, kept encoded; each access decodes (within the limits) a fresh RGB image."""

    def __init__(self, sources: Sequence[ImageSource], context: RowContext, source_file: str, row: int):
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
        except RowError as err:  # the file changed since it was checked at load
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


def one_line(err: BaseException) -> str:
    """A library's error text on one printable line (Arrow's thrift messages end in newlines)."""
    text = "".join(c if c.isprintable() else " " for c in str(err))
    return " ".join(text.split())


# ---------------------------------------------------------------- field readers
def _require(row: dict, name: str) -> Any:
    if name not in row:
        raise RowError(f"missing field {name!r}")
    if row[name] is None:
        raise RowError(f"field {name!r} is null")
    return row[name]


def _text(row: dict, name: str) -> str:
    value = _require(row, name)
    if not isinstance(value, str):
        raise RowError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _question(row: dict, name: str) -> str:
    question = strip_image_tags(_text(row, name))
    if not question:
        raise RowError(f"field {name!r} has no text besides image tags")
    return question


def _optional_answer(row: dict, name: str, required: bool) -> str | None:
    if required:
        _require(row, name)
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(f"field {name!r} must be a string or number, got {type(value).__name__}")
    return str(value).strip()


def _shown(value: str, limit: int = 200) -> str:
    """A row's text for a message: quoted, and cut when long (paths can be kilobytes)."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"


def _confined_path(value: Any, context: RowContext, where: str) -> Path:
    """The real path of a row's image file, refused unless it lies inside the allowed roots."""
    if not isinstance(value, str):
        raise RowError(f"{where}: 'path' must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise RowError(f"{where}: 'path' contains a NUL byte")
    joined = context.base_dir / value  # an absolute value replaces the base
    real = Path(os.path.realpath(joined))
    if not any(real.is_relative_to(root) for root in context.roots):
        # One message whether or not the target exists: a row must not probe the file system.
        raise RowError(f"{where}: image path {_shown(value)} is outside the data folder and "
                        "data.image_roots")
    try:
        found = real.is_file()
    except OSError as err:  # e.g. a name longer than the OS allows
        raise RowError(f"{where}: cannot read image file {_shown(value)} ({err.strerror})") from None
    if not found:
        raise RowError(f"{where}: image file not found: {_shown(str(joined))}")
    return real


def _too_large(where: str, size: int, limits: ImageLimits) -> None:
    if size > limits.max_bytes:
        raise RowError(f"{where}: image of {size} bytes exceeds data.max_image_bytes ({limits.max_bytes})")


def _read_bytes(source: ImageSource, context: RowContext) -> bytes:
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
        raise RowError(f"{source.where}: cannot read image file ({err.strerror})") from None
    _too_large(source.where, len(data), context.limits)
    return data


def _decode(source: ImageSource, context: RowContext) -> Image.Image:
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
            raise RowError(f"{where}: image of {width} x {height} = {width * height} pixels exceeds "
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
    except RowError:
        raise
    except Image.DecompressionBombError as err:
        raise RowError(f"{where}: image exceeds data.max_image_pixels ({limits.max_pixels}): "
                        f"{one_line(err)}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        # Pillow names the buffer by its address; a message must read the same in every run.
        text = _BUFFER_NAME.sub("the encoded image", one_line(err))
        raise RowError(f"{where}: not a readable image ({type(err).__name__}: {text})") from err


def _image_source(value: Any, context: RowContext, where: str) -> ImageSource:
    """A checked image of a row: decoded once here (and dropped) so broken rows surface at load."""
    if isinstance(value, str):  # JSONL: a bare path
        value = {"path": value}
    if not isinstance(value, dict):
        raise RowError(f"{where}: expected a {{bytes, path}} struct, got {type(value).__name__}")
    data, path = value.get("bytes"), value.get("path")
    if data is not None:
        if not isinstance(data, (bytes, bytearray)):
            raise RowError(f"{where}: 'bytes' must be binary, got {type(data).__name__}")
        source = ImageSource(where, data=bytes(data))
    elif path is not None and path != "":
        source = ImageSource(where, path=path)
    else:
        raise RowError(f"{where}: has neither image bytes nor a path")
    if context.check_images:
        _decode(source, context)
    return source


def _image_list(row: dict, name: str, context: RowContext) -> list[ImageSource]:
    value = _require(row, name)
    if not isinstance(value, list) or not value:
        raise RowError(f"field {name!r} must be a non-empty list of images")
    limit = context.limits.max_per_row
    if len(value) > limit:
        raise RowError(f"field {name!r} holds {len(value)} images > data.max_images_per_row ({limit})")
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
def _parse_images_problem_answer(row: dict, context: RowContext, require_answer: bool) -> tuple:
    return (_image_list(row, "images", context), _question(row, "problem"),
            _optional_answer(row, "answer", require_answer))


def _parse_geoqa(row: dict, context: RowContext, require_answer: bool) -> tuple:
    images = [_image_source(_require(row, "image"), context, "field 'image'")]
    solution = row.get("solution")
    if require_answer:
        solution = _text(row, "solution")
    answer = None
    if solution is not None:
        if not isinstance(solution, str):
            raise RowError(f"field 'solution' must be a string, got {type(solution).__name__}")
        tagged = _ANSWER_TAG.findall(solution)
        # R1-V wraps the answer in <answer> tags; an untagged solution is taken whole.
        answer = (tagged[-1] if tagged else solution).strip()
    return images, _question(row, "problem"), answer


def _parse_jsonl(row: dict, context: RowContext, require_answer: bool) -> tuple:
    if "images" in row:
        images = _image_list(row, "images", context)
    elif "image" in row:
        images = [_image_source(_require(row, "image"), context, "field 'image'")]
    else:
        raise RowError("missing field 'images' (or 'image')")
    if "problem" not in row and "question" not in row:
        raise RowError("missing field 'problem' (or 'question')")
    question = _question(row, "problem" if "problem" in row else "question")
    return images, question, _optional_answer(row, "answer", require_answer)


_PARSERS: dict[str, Callable[[dict, RowContext, bool], tuple]] = {
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
        raise DatasetError(f"{path}: not a readable parquet file ({one_line(err)})") from None


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


def batch_rows(batch: pa.RecordBatch | pa.Table) -> list[dict | RowError]:
    """Rows of a record batch or table as dicts; a row whose text is not UTF-8 becomes a row error."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        pass  # parquet does not validate string columns: find the bad rows one by one
    rows: list[dict | RowError] = []
    for i in range(batch.num_rows):
        row: dict = {}
        for name, column in zip(batch.schema.names, batch.columns):
            try:
                row[name] = column[i].as_py()
            except UnicodeDecodeError:
                row = RowError(f"column {name!r} holds text that is not UTF-8")
                break
        rows.append(row)
    return rows


def _jsonl_line(number: int, line: bytes) -> dict | RowError:
    """One JSONL line as a row, or the row error that says why it is not one."""
    if number == 1 and line.startswith(b"\xef\xbb\xbf"):
        line = line[3:]  # a UTF-8 byte-order mark
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return RowError(f"line {number} is not UTF-8 text "
                         f"(byte 0x{line[err.start]:02x} at column {err.start + 1})")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        return RowError(f"invalid JSON on line {number} ({err.msg} at column {err.colno})")
    except RecursionError:
        return RowError(f"invalid JSON on line {number} (nested too deeply)")
    if not isinstance(row, dict):
        return RowError(f"line {number} is not a JSON object (got {type(row).__name__})")
    return row


@dataclass(frozen=True)
class _FileSpec:
    """What reading one dataset file needs; picklable, so decode workers get it too."""

    path: Path  # absolute
    schema: str  # a concrete schema, not 'auto'
    require_answer: bool
    limits: ImageLimits

    def context(self, check_images: bool) -> RowContext:
        """The row context of this file: real paths (symlinks resolved) on both sides of the check."""
        roots = tuple(Path(os.path.realpath(r)) for r in (self.path.parent, *self.limits.roots))
        return RowContext(base_dir=self.path.parent, roots=roots, limits=self.limits,
                           check_images=check_images)

    def record(self, row: dict | RowError, index: int, context: RowContext) -> PromptRecord:
        """Row `index` as a PromptRecord; raises RowError when it is not usable."""
        if isinstance(row, RowError):
            raise row
        sources, question, answer = _PARSERS[self.schema](row, context, self.require_answer)
        return PromptRecord(uid=_uid(row, self.path.stem, index),
                            images=LazyImages(sources, context, str(self.path), index),
                            question=question, answer=answer, source_file=str(self.path), row=index,
                            meta=_meta(row))


_CHUNK_ROWS = 256  # lines a decode worker checks per task
_BATCH_ROWS = 32  # parquet rows turned into Python objects at once (their images held twice)


# One scanned row: (row index, byte offset of its line (JSONL; -1 for parquet), JSONL line number
# (0 for parquet), the error message or None, whether it has an answer).
_Scanned = tuple[int, int, int, str | None, bool]


def _scan_rows(spec: _FileSpec, rows: Iterator[tuple[int, int, int, dict | RowError]]) -> list[_Scanned]:
    """Parse every row (decoding its images once) and say which are usable."""
    context = spec.context(check_images=True)
    out: list[_Scanned] = []
    for index, offset, number, row in rows:
        try:
            record = spec.record(row, index, context)
        except RowError as err:
            out.append((index, offset, number, f"{spec.path} row {index}: {err}", False))
            continue
        out.append((index, offset, number, None, record.answer is not None))
    return out


def _parquet_failure(spec: _FileSpec, index: int, err: BaseException) -> DatasetError:
    return DatasetError(f"{spec.path}: parquet read failed near row {index} ({one_line(err)})")


def _scan_parquet_group(spec: _FileSpec, group: int, first: int) -> list[_Scanned]:
    """Scan one row group (row `first` of the file is its first), in small batches."""
    def rows() -> Iterator[tuple[int, int, int, dict | RowError]]:
        index = first
        with pq.ParquetFile(spec.path) as pfile:
            # Small batches: a batch's encoded images are held twice (Arrow and Python).
            for batch in pfile.iter_batches(batch_size=_BATCH_ROWS, row_groups=[group]):
                for row in batch_rows(batch):
                    yield index, -1, 0, row
                    index += 1
    try:
        return _scan_rows(spec, rows())
    except (pa.ArrowException, OSError, ValueError) as err:
        raise _parquet_failure(spec, first, err) from None


def _scan_jsonl_chunk(spec: _FileSpec, lines: list[tuple[int, int, int, bytes]]) -> list[_Scanned]:
    """Scan a chunk of (row index, byte offset, line number, line) of a JSONL file."""
    return _scan_rows(spec, ((i, off, num, _jsonl_line(num, line)) for i, off, num, line in lines))




def _jsonl_chunks(path: Path) -> Iterator[list[tuple[int, int, int, bytes]]]:
    # Bytes, decoded line by line: one line in another encoding is one bad row, not a failed file.
    try:
        with path.open("rb") as fh:
            index, offset, chunk = 0, 0, []
            for number, line in enumerate(fh, start=1):
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue  # blank lines are not rows
                chunk.append((index, start, number, line))
                index += 1
                if len(chunk) == _CHUNK_ROWS:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk
    except OSError as err:
        raise DatasetError(f"{path}: cannot read ({err.strerror or err})") from None


def _parquet_starts(spec: _FileSpec) -> np.ndarray:
    """First row of every row group, and the row count last (from the footer, nothing decoded)."""
    try:
        with pq.ParquetFile(spec.path) as pfile:
            meta = pfile.metadata
            counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DatasetError(f"{spec.path}: not a readable parquet file ({one_line(err)})") from None
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


def _scan_tasks(spec: _FileSpec, starts: np.ndarray | None) -> Iterator[tuple[Callable, tuple]]:
    """(function, arguments) of each unit of the scan, in file order."""
    if starts is None:
        for chunk in _jsonl_chunks(spec.path):
            yield _scan_jsonl_chunk, (spec, chunk)
    else:
        for group in range(len(starts) - 1):
            yield _scan_parquet_group, (spec, group, int(starts[group]))


def _run_in_order(tasks: Iterator[tuple[Callable, tuple]], workers: int) -> Iterator[list[_Scanned]]:
    """Results of the tasks in order; with workers > 0 in a pool of that many processes, at most
    2 x workers tasks in flight (the bounded queue: a fast reader cannot fill memory)."""
    tasks = iter(tasks)
    head = list(itertools.islice(tasks, 2))
    if workers <= 0 or len(head) < 2:  # one unit: a pool's start-up would cost more than it saves
        for func, args in itertools.chain(head, tasks):
            yield func(*args)
        return
    # spawn: the caller may hold threads (torch, gloo) that a forked child would inherit broken.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: deque = deque()
        try:
            for func, args in itertools.chain(head, tasks):
                pending.append(pool.submit(func, *args))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # stopped early (data.limit reached, or a bad row under on_error=raise)
            for future in pending:
                future.cancel()


class StreamingRecords(SequenceABC):
    """The usable rows of one dataset file, read on demand: only their positions stay in memory.

    ``take(indices)`` reads the row groups (parquet) or lines (JSONL) that hold the rows, each
    once; their images stay encoded (LazyImages). ``skipped``/``errors`` report the broken rows
    the load-time scan found; a file that changes afterwards is refused, not read.
    """

    def __init__(self, spec: _FileSpec, rows: np.ndarray, offsets: np.ndarray, numbers: np.ndarray,
                 starts: np.ndarray | None, fingerprint: tuple[int, int], *, skipped: int = 0,
                 errors: Sequence[str] = (), labelled: int = 0):
        self._spec, self._rows, self._offsets, self._numbers = spec, rows, offsets, numbers
        self._starts, self._fingerprint = starts, fingerprint
        self.skipped, self.errors, self.labelled = skipped, list(errors), labelled
        self.schema = spec.schema
        self.path = spec.path

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int | slice) -> PromptRecord | list[PromptRecord]:
        if isinstance(index, slice):
            return self.take(range(*index.indices(len(self))))
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range ({len(self)} usable rows)")
        return self.take([index % len(self)])[0]

    def __iter__(self) -> Iterator[PromptRecord]:
        """Every usable row in file order, one row group (or chunk of lines) in memory at a time."""
        if self._starts is None:
            bounds = list(range(0, len(self), _CHUNK_ROWS)) + [len(self)]
        else:  # the positions where a new row group begins
            bounds = np.searchsorted(self._rows, self._starts).tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if hi > lo:
                yield from (rec for _, rec in self._records(np.arange(lo, hi, dtype=np.int64)))

    @property
    def file_rows(self) -> np.ndarray:
        """Row number in the file of each usable row."""
        return self._rows

    def take(self, indices: Sequence[int]) -> list[PromptRecord]:
        """The records at these positions (0 <= i < len), in the order asked."""
        positions = np.asarray(indices, dtype=np.int64).reshape(-1)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"positions outside 0..{len(self) - 1}")
        out: list[PromptRecord | None] = [None] * len(positions)
        for slot, record in self._records(positions):
            out[slot] = record
        return out  # type: ignore[return-value]

    def _records(self, positions: np.ndarray) -> Iterator[tuple[int, PromptRecord]]:
        """(slot in the request, record) for each position, made one at a time."""
        self._check_unchanged()
        context = self._spec.context(check_images=False)
        for slot, index, row in self._read(positions):
            try:
                yield slot, self._spec.record(row, index, context)
            except RowError as err:  # the scan accepted it: the file changed under the same size and time
                raise DatasetError(f"{self.path} row {index}: {err}") from None

    def _read(self, positions: np.ndarray) -> Iterator[tuple[int, int, dict | RowError]]:
        """(slot in the request, file row, row) for each position, reading each row group once."""
        rows = self._rows[positions]
        if self._starts is None:
            with self.path.open("rb") as fh:
                for slot, pos in enumerate(positions):
                    fh.seek(int(self._offsets[pos]))
                    yield slot, int(rows[slot]), _jsonl_line(int(self._numbers[pos]), fh.readline())
            return
        groups = np.searchsorted(self._starts, rows, side="right") - 1
        index = int(rows[0]) if len(rows) else 0
        try:
            with pq.ParquetFile(self.path) as pfile:
                for group in np.unique(groups):
                    slots = np.flatnonzero(groups == group)
                    index = int(rows[slots[0]])
                    # One row group in memory at a time; only the asked rows become Python
                    # objects, a small batch at a time.
                    table = pfile.read_row_group(int(group)).take(rows[slots] - self._starts[group])
                    for lo in range(0, len(slots), _BATCH_ROWS):
                        batch = slots[lo:lo + _BATCH_ROWS]
                        for slot, row in zip(batch, batch_rows(table.slice(lo, len(batch)))):
                            yield int(slot), int(rows[slot]), row
        except (pa.ArrowException, OSError, ValueError) as err:
            raise _parquet_failure(self._spec, index, err) from None

    def _check_unchanged(self) -> None:
        try:
            now = _fingerprint(self.path)
        except OSError as err:
            raise DatasetError(f"{self.path}: cannot read ({err.strerror or err})") from None
        if now != self._fingerprint:
            raise DatasetError(f"{self.path}: changed since its rows were checked at load "
                               "(size or modification time); restart to check it again")


def _fingerprint(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _check_args(schema: str, on_error: str, limit: int | None) -> None:
    if schema not in SCHEMAS:
        raise ValueError(f"schema: unknown {schema!r}; choose one of {SCHEMAS}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: must be 'raise' or 'skip', got {on_error!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit (max_rows): must be >= 0, got {limit}")


def open_records(path: str | Path, *, schema: str = "auto", on_error: str = "raise",
                 require_answer: bool = False, limit: int | None = None,
                 limits: ImageLimits | None = None, workers: int = 0) -> StreamingRecords:
    """Scan a dataset file once (images decoded in `workers` processes, 0: here) and return its
    usable rows, read on demand. Bad rows raise DatasetError or, with on_error='skip', are
    counted in ``skipped`` and listed in ``errors``. limit: keep the first N usable rows.

    limits defaults to the ``data`` defaults of the config (confined paths, capped images)."""
    _check_args(schema, on_error, limit)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    schema = detect_schema(path) if schema == "auto" else schema
    # Absolute now, so a later change of the working directory cannot move a record's images.
    spec = _FileSpec(path=path.absolute(), schema=schema, require_answer=require_answer,
                     limits=ImageLimits() if limits is None else limits)
    fingerprint = _fingerprint(path)
    starts = None
    if schema != "jsonl":
        names = _parquet_schema(path).names
        answer_column = "solution" if schema == "geoqa" else "answer"
        required = list(_REQUIRED_COLUMNS[schema]) + ([answer_column] if require_answer else [])
        missing = [c for c in required if c not in names]
        if missing:
            # The column is absent for every row, so even skip mode cannot use the file.
            raise DatasetError(f"{path} row 0: missing column {missing[0]!r} (absent from every row; "
                               f"columns: {names})")
        starts = _parquet_starts(spec)
    kept: dict[str, array] = {"rows": array("q"), "offsets": array("q"), "numbers": array("q")}
    skipped, labelled, errors = 0, 0, []
    results = _run_in_order(_scan_tasks(spec, starts), workers)
    try:
        for scanned in results:
            for index, offset, number, message, has_answer in scanned:
                if limit is not None and len(kept["rows"]) >= limit:
                    break
                if message is not None:
                    if on_error == "raise":
                        raise DatasetError(message)
                    skipped += 1
                    errors.append(message)
                    continue
                kept["rows"].append(index)
                kept["offsets"].append(offset)
                kept["numbers"].append(number)
                labelled += has_answer
            if limit is not None and len(kept["rows"]) >= limit:
                break
    finally:
        results.close()  # stops the pool's queued work when the scan ends early
    if _fingerprint(path) != fingerprint:
        raise DatasetError(f"{path}: changed while it was being checked; try again")
    arrays = {k: np.frombuffer(v, dtype=np.int64).copy() if len(v) else np.zeros(0, np.int64)
              for k, v in kept.items()}
    return StreamingRecords(spec, arrays["rows"], arrays["offsets"], arrays["numbers"], starts, fingerprint,
                            skipped=skipped, errors=errors, labelled=labelled)


def load_records(path: str | Path, *, schema: str = "auto", on_error: str = "raise",
                 require_answer: bool = False, max_rows: int | None = None,
                 limits: ImageLimits | None = None) -> LoadResult:
    """Read a dataset file into PromptRecords held in memory (images encoded); bad rows raise
    DatasetError or are skipped. For training sets, open_records streams instead."""
    source = open_records(path, schema=schema, on_error=on_error, require_answer=require_answer,
                          limit=max_rows, limits=limits)
    return LoadResult(records=source.take(range(len(source))), skipped=source.skipped,
                      errors=source.errors, schema=source.schema)


class ConcatRecords(SequenceABC):
    """Several files' records as one sequence (positions run through the parts in order)."""

    def __init__(self, parts: Sequence[Sequence[PromptRecord]]):
        self.parts = list(parts)
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> PromptRecord:  # type: ignore[override]
        return self.take([index])[0]

    def __iter__(self) -> Iterator[PromptRecord]:
        for part in self.parts:
            yield from part

    def take(self, indices: Sequence[int]) -> list[PromptRecord]:
        """The records at these positions, in the order asked; each part is read once."""
        positions = np.asarray(indices, dtype=np.int64).reshape(-1)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"positions outside 0..{len(self) - 1}")
        which = np.searchsorted(self.starts, positions, side="right") - 1
        out: list[PromptRecord | None] = [None] * len(positions)
        for k in np.unique(which):
            slots = np.flatnonzero(which == k)
            for slot, rec in zip(slots, take_records(self.parts[k], positions[slots] - self.starts[k])):
                out[slot] = rec
        return out  # type: ignore[return-value]


def take_records(records: Sequence[PromptRecord], indices: Sequence[int]) -> list[PromptRecord]:
    """records[i] for each index: one read per row group for streamed files, plain indexing for lists."""
    take = getattr(records, "take", None)
    return take(indices) if take is not None else [records[int(i)] for i in indices]


def examples_to_records(examples: Sequence[Example], source: str = "synthetic") -> list[PromptRecord]:
    """In-memory synthetic Examples as PromptRecords (no parquet round trip needed)."""
    return [PromptRecord(uid=ex.uid, images=[ex.image], question=ex.question, answer=ex.answer,
                         source_file=source, row=i,
                         meta={"family": ex.family, "reasoning": ex.reasoning})
            for i, ex in enumerate(examples)]
