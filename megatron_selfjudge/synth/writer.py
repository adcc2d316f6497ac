"""Synthesised rows written in a training schema that `data.train` and `selfjudge data check` read.

- ``.parquet``: the Geometry3K / MM-UPT layout (`images` list of ``{bytes, path}`` with the PNG
  bytes inside, `problem` starting with one ``<image>`` per image, `answer` = the majority
  answer, `id`), plus the provenance columns `source_uid`, `strategy` and `agreement`, which
  the loader ignores.
- ``.jsonl``: one object a line with the same fields; `images` are paths of PNG files written
  into the folder ``<name>_images/`` beside the file, relative to it, so the loader's
  confinement check (inside the data file's folder) admits them.
Both are written under temporary names and renamed into place when complete, so a failed run
leaves no half-written data set behind.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from megatron_selfjudge.data.synthetic import GEOMETRY3K_SCHEMA
from megatron_selfjudge.synth.pipeline import SynthRow

FORMATS = (".parquet", ".jsonl")
PART = ".part"
_PROVENANCE = [pa.field("source_uid", pa.string()), pa.field("strategy", pa.string()),
               pa.field("agreement", pa.float64())]
SCHEMA = pa.schema(list(GEOMETRY3K_SCHEMA) + _PROVENANCE)
_ROWS_PER_GROUP = 256  # parquet row group: bounded memory while writing, small reads while training


def images_dir(out: Path) -> Path:
    """Where a JSONL output's image files go: ``<name>_images`` beside it."""
    return out.with_name(out.stem + "_images")


def outputs_of(out: Path) -> list[Path]:
    """Every path a synthesis run writes for output file `out` (data, images, summary)."""
    paths = [out, summary_path(out)]
    return paths + [images_dir(out)] if out.suffix == ".jsonl" else paths


def summary_path(out: Path) -> Path:
    """The JSON summary beside the output file."""
    return out.with_name(out.stem + ".summary.json")


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _problem(row: SynthRow) -> str:
    return "<image>" * len(row.images) + row.question


class RowWriter:
    """Writes rows one by one; `close(commit=True)` publishes, `close(commit=False)` discards."""

    def __init__(self, out: Path):
        if out.suffix not in FORMATS:
            raise ValueError(f"output {out}: unknown format {out.suffix!r}; use one of {FORMATS}")
        self.out = out
        self.rows = 0
        self._part = out.with_name(out.name + PART)
        self._buffer: list[dict] = []  # parquet records of the next row group
        self._parquet = None
        self._jsonl = None
        if out.suffix == ".jsonl":
            self._images_part = images_dir(out).with_name(images_dir(out).name + PART)
            shutil.rmtree(self._images_part, ignore_errors=True)  # a failed run's leftovers
            self._images_part.mkdir(parents=True)
            self._jsonl = open(self._part, "w", encoding="utf-8")
        else:
            self._parquet = pq.ParquetWriter(self._part, SCHEMA)

    def write(self, row: SynthRow) -> None:
        """Add one row."""
        names = [f"{self.rows:06d}_{k}.png" for k in range(len(row.images))]
        if self._jsonl is not None:
            for name, img in zip(names, row.images):
                (self._images_part / name).write_bytes(_png(img))
            folder = images_dir(self.out).name
            self._jsonl.write(json.dumps(self._record(row, [f"{folder}/{n}" for n in names])) + "\n")
        else:
            images = [{"bytes": _png(img), "path": name} for name, img in zip(names, row.images)]
            self._buffer.append(self._record(row, images))
            if len(self._buffer) >= _ROWS_PER_GROUP:
                self._flush()
        self.rows += 1

    def _record(self, row: SynthRow, images: Any) -> dict:
        return {"images": images, "problem": _problem(row), "answer": row.answer, "id": self.rows,
                "source_uid": row.source_uid, "strategy": row.strategy, "agreement": row.agreement}

    def _flush(self) -> None:
        if self._buffer:
            self._parquet.write_table(pa.Table.from_pylist(self._buffer, schema=SCHEMA))
            self._buffer = []

    def close(self, commit: bool) -> None:
        """Publish the output (rename into place) or remove what was written."""
        if self._parquet is not None:
            if commit:
                self._flush()
            self._parquet.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if not commit:
            self._part.unlink(missing_ok=True)
            if self._jsonl is not None:
                shutil.rmtree(self._images_part, ignore_errors=True)
            return
        if self._jsonl is not None:
            final = images_dir(self.out)
            if final.exists():
                shutil.rmtree(final)  # --force: the previous run's images of this output
            os.replace(self._images_part, final)
        os.replace(self._part, self.out)
