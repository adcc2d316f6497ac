"""Benchmark loaders: MathVision, MathVerse, WeMath, LogicVista, DynaMath, MathVista from local files.

Layouts read (facts in DATASETS.md), found under ``ROOT`` (the ``--data`` folder):

- hub parquet: ``ROOT/<benchmark>/**/*.parquet`` (folder name matched case-insensitively, e.g.
  ``ROOT/MathVision/data/test-00000-of-00001.parquet``). Images are ``{bytes, path}`` structs (or
  a path string relative to the benchmark folder). When file names carry split prefixes, only the
  benchmark's reported split is read (MathVision ``test``; MathVerse, WeMath, MathVista
  ``testmini``); DynaMath's ``sample_variantK`` files are its variants.
- VLMEvalKit TSV: ``ROOT/<Benchmark>*.tsv`` or ``ROOT/<benchmark>/*.tsv``: ``index``, ``image``
  (base64, a JSON list of them, or the ``index`` of an earlier row whose image it shares),
  ``question``, ``answer`` and the per-benchmark columns.
- LogicVista's release: ``ROOT/LogicVista/dataset.json`` (keyed ``v1_0``...) beside ``images/``.

Rows are read lazily: parquet files batch by batch (row groups on demand), TSV and JSON row by
row (a TSV row naming an earlier row's image gets it by reading that row again at its byte
offset, so memory does not grow with the file); images stay encoded in the item and are decoded
only when a prompt is built (`BenchItem.images` is a `LazyImages`, with the training loaders'
limits and path confinement).
A row that cannot be used (missing field, unreadable answer, bad base64, ...) becomes a
`Skipped` entry naming its file and row, reported and counted, never graded.

Each item carries the prompt the benchmark expects (`BenchItem.prompt`): the question without
image tags, multiple-choice options rendered one per line as ``A. text``, and a one-sentence
hint where the options or the question live only in the image; the model family adds the
project's format instruction. Grading is in `benchmarks_grading`.
"""
from __future__ import annotations

import base64
import binascii
import csv
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq

from megatron_selfjudge.data.datasets import (
    DatasetError,
    ImageLimits,
    ImageSource,
    LazyImages,
    RowContext,
    RowError,
    batch_rows,
    one_line,
)
from megatron_selfjudge.data.prompts import strip_image_tags

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Grading kinds: one letter | a set of letters | a math answer | DynaMath float / text | MathVista's.
KINDS = ("choice", "letters", "free", "float", "text", "integer", "list")


class BenchmarkError(DatasetError):
    """A benchmark that cannot be read at all (no files, unreadable file); one line."""


@dataclass
class BenchItem:
    """One graded question of a benchmark, its prompt and what grading needs."""

    benchmark: str
    qid: str  # the benchmark's question id
    prompt: str  # question text shown to the model (options rendered), without the format instruction
    images: Sequence[Any]  # LazyImages: decoded on access
    gold: str  # the reference answer (a letter, letters "B, D", a value, or MathVista's option text)
    kind: str  # one of KINDS
    choices: tuple[str, ...] = ()  # option texts in letter order; () when free form or only in the image
    precision: Optional[int] = None  # MathVista floats: decimals to round to
    categories: dict[str, list[str]] = field(default_factory=dict)  # sub-category -> values of this item
    group: str = ""  # problem the item belongs to (--limit counts these; WeMath / DynaMath score them)
    part: str = ""  # the item's place in its group: MathVerse version, WeMath key, DynaMath variant
    source_file: str = ""
    row: int = 0

    @property
    def where(self) -> str:
        """`file row N`, for messages and the predictions file."""
        return f"{self.source_file} row {self.row}"


@dataclass(frozen=True)
class Skipped:
    """A row that was not graded: its file, row and why."""

    file: str
    row: int
    reason: str

    def as_dict(self) -> dict:
        """Plain dict for JSON."""
        return {"file": self.file, "row": self.row, "reason": self.reason}


@dataclass
class RawRow:
    """A row as read from its file, before the benchmark's parser."""

    fields: dict
    layout: str  # hub | tsv | json
    file: Path
    row: int
    context: RowContext
    variant: Optional[str] = None  # DynaMath variant named by the hub file


# ---------------------------------------------------------------- field readers

def _get(row: dict, *names: str, required: bool = True) -> Any:
    """The first present, non-null, non-blank field of names."""
    for name in names:
        value = row.get(name)
        if value is not None and not (isinstance(value, str) and not value.strip()) \
                and not (isinstance(value, float) and value != value):  # NaN: a blank TSV cell read by pandas
            return value
    if required:
        raise RowError(f"missing or empty field {names[0]!r}" + (f" (or {', '.join(map(repr, names[1:]))})"
                                                                    if len(names) > 1 else ""))
    return None


def _str(row: dict, *names: str, required: bool = True) -> Optional[str]:
    value = _get(row, *names, required=required)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(f"field {names[0]!r} must be text or a number, got {type(value).__name__}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


_QUOTED_RE = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"", re.DOTALL)


def _text_list(value: Any, name: str) -> list[str]:
    """A list of strings from a list, a JSON list, or a Python-style list literal (read, never evaluated)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text or text in ("[]", "None", "nan"):
            return []
        if not text.startswith("["):
            raise RowError(f"field {name!r} is not a list: {text[:60]!r}")
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            # VLMEvalKit writes Python reprs ("['a', 'b']"): take the quoted strings as they stand.
            items = [a if a or not b else b for a, b in _QUOTED_RE.findall(text)]
            if not items and text.strip("[] "):
                raise RowError(f"field {name!r} is not a readable list: {text[:60]!r}") from None
    else:
        raise RowError(f"field {name!r} must be a list, got {type(value).__name__}")
    if not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in items):
        raise RowError(f"field {name!r} must hold strings")
    return [str(x).strip() for x in items]


def _question_text(row: dict, *names: str, required: bool = True) -> str:
    text = _str(row, *names, required=required) or ""
    return strip_image_tags(text)


def render_options(choices: Sequence[str]) -> str:
    """Options one per line as `A. text`."""
    return "\n".join(f"{LETTERS[k]}. {c}" for k, c in enumerate(choices))


def _options_only_in_image(choices: Sequence[str]) -> bool:
    """MathVision lists `['A', 'B', ...]` when the option contents are drawn in the image."""
    return bool(choices) and all(c.strip().rstrip(".").strip("()") in ("", LETTERS[k]) for k, c in enumerate(choices))


def _letters_hint(letters: str, multi: bool = False) -> str:
    if multi:
        return (f"The options {', '.join(letters)} are shown in the image; more than one may be correct. "
                "Answer with the letters of every correct option, separated by commas.")
    return f"The options {', '.join(letters)} are shown in the image. Answer with the letter of the correct option."


def _mc_prompt(question: str, choices: Sequence[str]) -> str:
    return f"{question}\nOptions:\n{render_options(choices)}\nAnswer with the option's letter."


def _letter(value: str, n_choices: int, what: str = "answer") -> str:
    """A gold letter, checked against the number of options (when known)."""
    text = value.strip().strip("()").rstrip(".").strip()
    if len(text) != 1 or text not in LETTERS or (n_choices and LETTERS.index(text) >= n_choices):
        raise RowError(f"{what} {value!r} is not an option letter" + (f" (A-{LETTERS[n_choices - 1]})"
                                                                       if n_choices else ""))
    return text


_LETTER_SPLIT_RE = re.compile(r"\s*(?:,|;|/|&|\band\b|\s)\s*")


def parse_letter_set(text: str) -> Optional[frozenset[str]]:
    """Letters of a multi-select answer ('B, D', '(A) and (C)'); None when a part is not a letter."""
    parts = [p.strip().strip("()").rstrip(".:").strip() for p in _LETTER_SPLIT_RE.split(text.strip())]
    parts = [p for p in parts if p]
    if not parts or not all(len(p) == 1 and p in LETTERS for p in parts):
        return None
    return frozenset(parts)


# ---------------------------------------------------------------- images

def _image_from_value(value: Any, where: str) -> ImageSource:
    """A hub image value: a {bytes, path} struct, or a path string (relative to the benchmark folder)."""
    if isinstance(value, str):
        return ImageSource(where, path=value)
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            if not isinstance(data, (bytes, bytearray)):
                raise RowError(f"{where}: 'bytes' must be binary, got {type(data).__name__}")
            return ImageSource(where, data=bytes(data))
        if isinstance(path, str) and path:
            return ImageSource(where, path=path)
        raise RowError(f"{where}: has neither image bytes nor a path")
    raise RowError(f"{where}: expected an image struct or path, got {type(value).__name__}")


def _hub_images(row: RawRow, columns: Sequence[str], required: bool = True) -> list[ImageSource]:
    """The images of a hub row from the first of `columns` that holds one (a list column gives several)."""
    for name in columns:
        value = row.fields.get(name)
        if value is None or value == "" or value == []:
            continue
        if isinstance(value, list):
            return [_image_from_value(v, f"field {name!r}[{k}]") for k, v in enumerate(value)]
        return [_image_from_value(value, f"field {name!r}")]
    if required:
        raise RowError(f"no image (looked in {', '.join(map(repr, columns))})")
    return []


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        raise RowError(f"{where}: not valid base64 ({one_line(err)})") from None


def _tsv_images(row: RawRow, required: bool = True) -> list[ImageSource]:
    """The TSV images (decoded from base64 by the reader, see _TsvReader)."""
    images = row.fields.get("__images__")
    if isinstance(images, RowError):
        raise images
    if not images:
        if required:
            raise RowError("missing or empty field 'image'")
        return []
    return images


# ---------------------------------------------------------------- file readers

def _parquet_rows(path: Path) -> Iterator[tuple[int, Union[dict, RowError]]]:
    index = 0
    try:
        with pq.ParquetFile(path) as pfile:
            # Batches of a few rows: only the current batch's image bytes are held by Arrow.
            for batch in pfile.iter_batches(batch_size=16):
                for row in batch_rows(batch):
                    yield index, row
                    index += 1
    except (pa.ArrowException, OSError, ValueError) as err:
        raise BenchmarkError(f"{path}: parquet read failed near row {index} ({one_line(err)})") from None


class _Lines:
    """Text lines of a binary file, split where text mode with ``newline=""`` splits them (after
    ``\n``, ``\r\n`` or a lone ``\r``), with the byte offset of the next one: where a row starts."""

    _LONE_CR = re.compile(rb"(?<=\r)(?!\n)")

    def __init__(self, fh: Any):
        self.fh = fh
        self.offset = fh.tell()
        self.line = 0  # number of the line last returned (or being decoded), from 1
        self._pieces: list[bytes] = []  # the rest of a line cut at a lone CR, in reverse order

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        if not self._pieces:
            line = self.fh.readline()
            if not line:
                raise StopIteration
            if b"\r" not in line:  # the usual line: no split, no copy
                self.offset += len(line)
                self.line += 1
                return line.decode("utf-8")
            self._pieces = [p for p in self._LONE_CR.split(line) if p][::-1]
        piece = self._pieces.pop()
        self.offset += len(piece)
        self.line += 1
        return piece.decode("utf-8")  # a UTF-8 sequence holds no CR or LF byte: cutting there is safe


class _TsvReader:
    """Rows of a VLMEvalKit TSV, one at a time; images as encoded sources.

    VLMEvalKit stores an image once and lets later rows name it by the `index` of that row. The
    reader keeps, for each row whose images decoded, only the byte offset where the row starts, and
    reads that row again when a later row names it (the last row's images are kept, for the rows
    that follow it). Memory holds a few rows' images and one offset per row, whatever the file's size.
    """

    def __init__(self, path: Path):
        self.path = path
        self.offsets: dict[str, int] = {}  # index -> byte offset of its row (rows whose images decoded)
        self._fieldnames: list[str] = []
        self._last: tuple[str, list[bytes]] = ("", [])  # the index and images of the last row decoded
        self._again: Optional[Any] = None  # a second handle on the file, for rows read again

    @staticmethod
    def _blobs(text: str) -> list[bytes]:
        """The encoded images of an image cell: one base64 string or a JSON list of them."""
        parts = _text_list(text, "image") if text.startswith("[") else [text]
        return [_b64(p, f"field 'image'[{k}]") for k, p in enumerate(parts)]

    def _shared(self, index: str) -> list[bytes]:
        """The images of the earlier row `index`, read again from its offset unless it was the last."""
        if self._last[0] == index:
            return self._last[1]
        if self._again is None:
            self._again = self.path.open("rb")
        changed = RowError(f"field 'image' refers to index {index}, whose row changed since it was read")
        try:
            self._again.seek(self.offsets[index])
            row = next(csv.DictReader(_Lines(self._again), fieldnames=self._fieldnames, delimiter="\t"), None)
        except (UnicodeDecodeError, csv.Error, OSError):  # it read well before: the file was rewritten
            raise changed from None
        if row is None or str(row.get("index", "")).strip() != index:
            raise changed
        blobs = self._blobs(str(row.get("image") or "").strip())
        self._last = (index, blobs)
        return blobs

    def _images(self, value: Any, index: str, offset: int) -> Union[list[ImageSource], RowError]:
        if value is None or not str(value).strip():
            return []
        text = str(value).strip()
        try:
            if len(text) <= 64 and text in self.offsets and text != index:
                return [ImageSource(f"field 'image' (shared with index {text})", data=b)
                        for b in self._shared(text)]
            if len(text) <= 64 and re.fullmatch(r"\d+", text):
                raise RowError(f"field 'image' refers to index {text}, which no earlier row holds")
            blobs = self._blobs(text)
        except RowError as err:
            return err
        self.offsets[index] = offset
        self._last = (index, blobs)
        return [ImageSource(f"field 'image'[{k}]", data=b) for k, b in enumerate(blobs)]

    def rows(self) -> Iterator[tuple[int, Union[dict, RowError]]]:
        """(row number, fields) per data line; '__images__' holds the image sources or the row's error."""
        csv.field_size_limit(sys.maxsize)  # base64 images are megabytes in one cell
        lines: Optional[_Lines] = None
        try:
            with self.path.open("rb") as fh:
                lines = _Lines(fh)
                reader = csv.DictReader(lines, delimiter="\t")
                if not reader.fieldnames or "index" not in reader.fieldnames:
                    raise BenchmarkError(f"{self.path}: not a VLMEvalKit TSV (no 'index' column in the header "
                                         f"{reader.fieldnames})")
                self._fieldnames = list(reader.fieldnames)
                k = 0
                while True:
                    offset = lines.offset  # the reader reads no further than the row it returns
                    row = next(reader, None)
                    if row is None:
                        break
                    if None in row:  # more cells than header columns
                        yield k, RowError(f"{len(row[None])} more cells than the header has columns")
                    else:
                        row["__images__"] = self._images(row.get("image"), str(row.get("index", "")).strip(),
                                                         offset)
                        yield k, row
                    k += 1
        except UnicodeDecodeError as err:
            where = f"line {lines.line}: " if lines is not None else ""  # the codec's position is in that line
            raise BenchmarkError(f"{self.path}: not UTF-8 text ({where}{one_line(err)})") from None
        except csv.Error as err:
            raise BenchmarkError(f"{self.path}: not a readable TSV ({one_line(err)})") from None
        except OSError as err:
            raise BenchmarkError(f"{self.path}: cannot read ({err.strerror or err})") from None
        finally:
            if self._again is not None:
                self._again.close()
                self._again = None


def _json_rows(path: Path) -> Iterator[tuple[int, Union[dict, RowError]]]:
    """LogicVista's dataset.json: an object of items keyed v1_0, v1_1, ... (row = position in the file)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise BenchmarkError(f"{path}: not a readable JSON file ({one_line(err)})") from None
    if isinstance(data, dict):
        entries = list(data.items())
    elif isinstance(data, list):
        entries = [(str(k), v) for k, v in enumerate(data)]
    else:
        raise BenchmarkError(f"{path}: expected an object of items, got {type(data).__name__}")
    for k, (key, value) in enumerate(entries):
        if not isinstance(value, dict):
            yield k, RowError(f"item {key!r} is not an object")
        else:
            yield k, {"__key__": key, **value}


# ---------------------------------------------------------------- benchmarks

@dataclass(frozen=True)
class Benchmark:
    """One benchmark: where its files are, how a row becomes an item, its sub-categories."""

    name: str  # lower-case key (--benchmarks)
    title: str
    parse: Callable[[RawRow], BenchItem]
    split: Optional[str] = None  # hub split read when file names carry splits
    categories: tuple[str, ...] = ()  # sub-category names reported


def _item(bench: str, row: RawRow, **kw: Any) -> BenchItem:
    kw.setdefault("group", kw["qid"])
    return BenchItem(benchmark=bench, source_file=str(row.file), row=row.row, **kw)


def _lazy(row: RawRow, sources: list[ImageSource]) -> LazyImages:
    return LazyImages(sources, row.context, str(row.file), row.row)


def _parse_mathvision(row: RawRow) -> BenchItem:
    f = row.fields
    hub = row.layout == "hub"
    qid = _str(f, "id" if hub else "index")
    question = _question_text(f, "question")
    choices = _text_list(f.get("options") if hub else f.get("choices"), "options" if hub else "choices")
    gold = _str(f, "answer")
    images = _hub_images(row, ("decoded_image", "image")) if hub else _tsv_images(row)
    cats = {"subject": [_str(f, "subject", "category", required=False) or "unknown"],
            "level": [_str(f, "level", required=False) or "unknown"]}
    if not choices:
        kind, prompt, shown = "free", question, ()
    elif _options_only_in_image(choices):
        kind, shown = "choice", ()
        prompt = f"{question}\n{_letters_hint(LETTERS[:len(choices)])}"
        gold = _letter(gold, len(choices))
    else:
        kind, shown = "choice", tuple(choices)
        prompt = _mc_prompt(question, choices)
        gold = _gold_letter(gold, choices)
    if not question and not images:
        raise RowError("no question text and no image")
    return _item("mathvision", row, qid=qid, prompt=prompt, images=_lazy(row, images), gold=gold, kind=kind,
                 choices=shown, categories=cats)


def _gold_letter(gold: str, choices: Sequence[str]) -> str:
    """A multiple-choice gold answer as its letter: the letter itself, or the text of one option."""
    text = gold.strip().strip("()").rstrip(".")
    if len(text) == 1 and text in LETTERS[:len(choices)]:
        return text
    matches = [k for k, c in enumerate(choices) if c.strip() == gold.strip()]
    if len(matches) == 1:
        return LETTERS[matches[0]]
    raise RowError(f"answer {gold!r} is neither an option letter nor the text of exactly one option")


MATHVERSE_VERSIONS = ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only")


def _parse_mathverse(row: RawRow) -> BenchItem:
    f = row.fields
    hub = row.layout == "hub"
    qid = _str(f, "sample_index", "index")
    version = _str(f, "problem_version", "category", required=False) or "unknown"
    question = _question_text(f, "question", required=False)
    gold = _str(f, "answer")
    qtype = _str(f, "question_type", required=False)
    meta = f.get("metadata") if isinstance(f.get("metadata"), dict) else {}
    subject = _str(f, "subject", required=False) or _str(meta, "subject", required=False) or "unknown"
    images = _hub_images(row, ("image", "decoded_image"), required=False) if hub else _tsv_images(row, False)
    is_mc = qtype == "multi-choice" if qtype else bool(re.fullmatch(r"\(?[A-H]\)?\.?", gold))
    if not question:
        if not images:
            raise RowError("no question text and no image")
        question = "Answer the question shown in the image."  # Vision Only: the whole problem is drawn
    if is_mc:
        gold = _letter(gold, 0)
        prompt = question + "\nAnswer with the option's letter."
    else:
        prompt = question
    return _item("mathverse", row, qid=qid, prompt=prompt, images=_lazy(row, images), gold=gold,
                 kind="choice" if is_mc else "free", categories={"version": [version], "subject": [subject]},
                 group=_str(f, "problem_index", required=False) or qid, part=version)


_WEMATH_OPTION_RE = re.compile(r"(?:^|;)\s*([A-H])\s*[.:：]\s*")
_WEMATH_KEY_RE = re.compile(r"^(\d)steps?_(\d|multi)$")


def _wemath_options(text: str) -> list[str]:
    """'A. 3;B. 4;C. 5' -> ['3', '4', '5'] (letters must run A, B, C... in order)."""
    marks = list(_WEMATH_OPTION_RE.finditer(text))
    if not marks or [m.group(1) for m in marks] != list(LETTERS[:len(marks)]):
        raise RowError(f"field 'option' is not of the form 'A. ...;B. ...': {text[:80]!r}")
    ends = [m.start() for m in marks[1:]] + [len(text)]
    return [text[m.end():end].strip().rstrip(";").strip() for m, end in zip(marks, ends)]


def _parse_wemath(row: RawRow) -> BenchItem:
    f = row.fields
    hub = row.layout == "hub"
    pid = _str(f, "ID")
    key = _str(f, "key")
    m = _WEMATH_KEY_RE.match(key)
    if not m:
        raise RowError(f"field 'key' {key!r} is not one of 2steps_1..2steps_multi, 3steps_1..3steps_multi")
    if hub:
        choices = _wemath_options(_str(f, "option"))
        images = _hub_images(row, ("image_path", "image", "decoded_image"))
        qid = f"{pid}:{key}"
    else:
        choices = [c for c in (_str(f, L, required=False) for L in LETTERS[:8]) if c is not None]
        images = _tsv_images(row)
        qid = _str(f, "index")
    question = _question_text(f, "question")
    gold = _gold_letter(_str(f, "answer"), choices)
    steps = f"{m.group(1)}-step"
    role = "composite" if m.group(2) == "multi" else "one-step"
    cats = {"problem": [f"{steps} {role}"],
            "knowledge concept": [_str(f, "knowledge concept", required=False) or "unknown"]}
    return _item("wemath", row, qid=qid, prompt=_mc_prompt(question, choices), images=_lazy(row, images), gold=gold,
                 kind="choice", choices=tuple(choices), categories=cats, group=f"{steps}:{pid}", part=key)


def _parse_logicvista(row: RawRow) -> BenchItem:
    f = row.fields
    if row.layout == "json":
        qid = _str(f, "__key__")
        name = _str(f, "imagename")
        images = [ImageSource("field 'imagename'", path=str(Path("images") / name))]
    elif row.layout == "hub":
        qid = _str(f, "id", "index", required=False) or str(row.row)
        images = _hub_images(row, ("image", "decoded_image"))
    else:
        qid = _str(f, "index")
        images = _tsv_images(row)
    question = _question_text(f, "question")
    gold_text = _str(f, "answer")
    gold = parse_letter_set(gold_text)
    if gold is None:
        raise RowError(f"answer {gold_text!r} is not a list of option letters")
    skills = f.get("skill")
    skills = _text_list(skills, "skill") if isinstance(skills, (list, tuple)) or \
        (isinstance(skills, str) and skills.strip().startswith("[")) else \
        [s.strip() for s in str(skills).split(",") if s.strip()] if skills else []
    prompt = f"{question}\nMore than one option may be correct: answer with the letters of every correct option, " \
             "separated by commas."
    return _item("logicvista", row, qid=qid, prompt=prompt, images=_lazy(row, images),
                 gold=", ".join(sorted(gold)), kind="letters", categories={"skill": skills or ["unknown"]})


_DYNAMATH_TYPES = {"float": "float", "multiple choice": "choice", "text": "text"}
_VARIANT_RE = re.compile(r"variant[_-]?(\d+)", re.IGNORECASE)


def _parse_dynamath(row: RawRow) -> BenchItem:
    f = row.fields
    hub = row.layout == "hub"
    qid = _str(f, "qid", "question_id", "id")
    variant = _str(f, "varid", "variant", required=False) or row.variant
    if variant is None:
        raise RowError("no variant: neither a 'varid' column nor a sample_variantK file name")
    atype = (_str(f, "answer_type") or "").lower()
    if atype not in _DYNAMATH_TYPES:
        raise RowError(f"answer_type {atype!r} is not one of {', '.join(_DYNAMATH_TYPES)}")
    kind = _DYNAMATH_TYPES[atype]
    gold = _str(f, "ground_truth", "answer")
    if kind == "choice":
        gold = _letter(gold, 0, "ground_truth")
    question = _question_text(f, "question")
    images = _hub_images(row, ("decoded_image", "image")) if hub else _tsv_images(row)
    hint = {"choice": "Answer with the option's letter.", "float": "Answer with a number.",
            "text": "Answer with a short text."}[kind]
    cats = {"subject": [_str(f, "subject", required=False) or "unknown"],
            "knowledge level": [_str(f, "knowledge_level", required=False) or "unknown"]}
    return _item("dynamath", row, qid=f"{qid}:v{variant}", prompt=f"{question}\n{hint}", images=_lazy(row, images),
                 gold=gold, kind=kind, categories=cats, group=qid, part=str(variant))


_MATHVISTA_TYPES = {"text": "text", "integer": "integer", "float": "float", "list": "list"}


def _parse_mathvista(row: RawRow) -> BenchItem:
    f = row.fields
    hub = row.layout == "hub"
    qid = _str(f, "pid", "index")
    question = _question_text(f, "question")
    choices = _text_list(f.get("choices"), "choices")
    qtype = _str(f, "question_type", required=False) or ("multi_choice" if choices else "free_form")
    atype = (_str(f, "answer_type", required=False) or "text").lower()
    gold = _str(f, "answer")
    precision = None
    meta = f.get("metadata") if isinstance(f.get("metadata"), dict) else {}
    cats = {"task": [_str(meta, "task", required=False) or _str(f, "task", required=False) or "unknown"]}
    images = _hub_images(row, ("decoded_image", "image")) if hub else _tsv_images(row)
    if qtype == "multi_choice":
        if not choices:
            raise RowError("multi_choice question without choices")
        # MathVista's gold is the option's text (never its letter): it must be exactly one option.
        matches = [k for k, c in enumerate(choices) if c.strip() == gold.strip()]
        if len(matches) != 1:
            raise RowError(f"answer {gold!r} is not the text of exactly one of the choices")
        kind, gold = "choice", LETTERS[matches[0]]
        prompt = _mc_prompt(question, choices)
    else:
        if atype not in _MATHVISTA_TYPES:
            raise RowError(f"answer_type {atype!r} is not one of {', '.join(_MATHVISTA_TYPES)}")
        kind = _MATHVISTA_TYPES[atype]
        prompt = question
        unit = _str(f, "unit", required=False)
        if kind == "float":
            p = _get(f, "precision", required=False)
            try:
                precision = int(float(p)) if p is not None else 1
            except (TypeError, ValueError):
                raise RowError(f"precision {p!r} is not a number") from None
            prompt += f"\nAnswer with a number with {precision} decimal place{'s' if precision != 1 else ''}."
        elif kind == "integer":
            prompt += "\nAnswer with an integer."
        if unit:
            prompt += f" (unit: {unit})"
    return _item("mathvista", row, qid=qid, prompt=prompt, images=_lazy(row, images), gold=gold, kind=kind,
                 choices=tuple(choices) if kind == "choice" else (), precision=precision, categories=cats)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("mathvision", "MathVision", _parse_mathvision, split="test", categories=("subject", "level")),
    Benchmark("mathverse", "MathVerse", _parse_mathverse, split="testmini", categories=("version", "subject")),
    Benchmark("wemath", "WeMath", _parse_wemath, split="testmini", categories=("problem", "knowledge concept")),
    Benchmark("logicvista", "LogicVista", _parse_logicvista, categories=("skill",)),
    Benchmark("dynamath", "DynaMath", _parse_dynamath, categories=("subject", "knowledge level")),
    Benchmark("mathvista", "MathVista", _parse_mathvista, split="testmini", categories=("task",)),
)}
BENCHMARK_NAMES = tuple(BENCHMARKS)


def get_benchmark(name: str) -> Benchmark:
    """The benchmark registered under `name` (case-insensitive)."""
    key = name.strip().lower()
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARK_NAMES)}")
    return BENCHMARKS[key]


# ---------------------------------------------------------------- finding and reading files

def _split_of(path: Path) -> Optional[str]:
    m = re.match(r"^([A-Za-z_]+?)(?:-\d{5}-of-\d{5})?$", path.stem)
    return m.group(1).lower() if m else None


def find_files(bench: Benchmark, root: Union[str, Path]) -> list[tuple[Path, str, Path]]:
    """(file, layout, benchmark folder) of a benchmark under root, in reading order."""
    root = Path(root)
    if not root.is_dir():
        raise BenchmarkError(f"--data {root}: not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() == bench.name)
    found: list[tuple[Path, str, Path]] = []
    for folder in folders:
        parquets = sorted(folder.rglob("*.parquet"))
        if bench.split:
            chosen = [p for p in parquets if _split_of(p) == bench.split]
            parquets = chosen or parquets
        found += [(p, "hub", folder) for p in parquets]
        found += [(p, "tsv", folder) for p in sorted(folder.rglob("*.tsv"))]
        found += [(p, "json", folder) for p in sorted(folder.rglob("dataset.json"))]
    found += [(p, "tsv", root) for p in sorted(root.glob("*.tsv"))
              if re.match(rf"^{bench.name}(?:[_-]|$)", p.stem.lower())]
    if not found:
        raise BenchmarkError(f"{bench.title}: no files under {root} (expected {root}/{bench.title}/**/*.parquet, "
                             f"{root}/{bench.title}*.tsv" + (f" or {root}/{bench.title}/dataset.json"
                                                              if bench.name == "logicvista" else "") + ")")
    return found


def _variant_of(path: Path) -> Optional[str]:
    m = _VARIANT_RE.search(path.stem)
    return m.group(1) if m else None


@dataclass
class BenchmarkData:
    """Items streamed from a benchmark's files, and the rows skipped so far."""

    bench: Benchmark
    files: list[Path]
    skipped: list[Skipped] = field(default_factory=list)
    rows_read: int = 0


def iter_items(bench: Benchmark, root: Union[str, Path], *, limit: Optional[int] = None,
               limits: Optional[ImageLimits] = None, data: Optional[BenchmarkData] = None) -> Iterator[BenchItem]:
    """Items of a benchmark's files in order; skipped rows go to `data.skipped` (pass one to read them).

    `limit`: the first `limit` problems (groups: a DynaMath question with its variants, a WeMath
    composite with its sub-problems, a MathVerse problem in its versions; else one row each).
    Rows of later problems are passed over; rows are not reported as skipped once the limit is reached.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    files = find_files(bench, root)
    data = data if data is not None else BenchmarkData(bench, [])
    data.files = [f for f, _, _ in files]
    limits = limits or ImageLimits()
    groups: set[str] = set()
    # Ungrouped benchmarks can stop reading at the limit; grouped ones look for later parts.
    grouped = bench.name in ("dynamath", "wemath", "mathverse")
    seen_ids: set[str] = set()
    for path, layout, folder in files:
        roots = tuple(Path(os.path.realpath(r)) for r in (folder, path.parent, *limits.roots))
        # Hub image paths are relative to the dataset's root; LogicVista's to its dataset.json.
        base = path.parent if layout == "json" else folder
        context = RowContext(base_dir=base.absolute(), roots=roots, limits=limits)
        rows = (_parquet_rows(path) if layout == "hub" else _TsvReader(path).rows() if layout == "tsv"
                else _json_rows(path))
        variant = _variant_of(path) if layout == "hub" else None
        for index, fields in rows:
            full = limit is not None and len(groups) >= limit
            if full and not grouped:
                return
            data.rows_read += 1
            try:
                if isinstance(fields, RowError):
                    raise fields
                item = bench.parse(RawRow(fields, layout, path, index, context, variant))
                if item.qid in seen_ids:
                    raise RowError(f"question id {item.qid!r} appears twice")
            except RowError as err:
                if not full:
                    data.skipped.append(Skipped(str(path), index, str(err)))
                continue
            if full and item.group not in groups:
                continue
            seen_ids.add(item.qid)
            groups.add(item.group)
            yield item
