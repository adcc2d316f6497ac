"""VLMEvalKit TSVs are read in bounded memory: a row that shares an earlier row's image by `index`
gets it read again from that row's byte offset, not from a copy of every image kept since the first row."""
from __future__ import annotations

import base64
import csv
import io
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import bench_fixtures as F  # noqa: E402

from megatron_selfjudge.eval.benchmarks import BenchmarkData, BenchmarkError, get_benchmark, iter_items  # noqa: E402

SOURCES = 240  # rows that hold an image
PAYLOAD = 250_000  # bytes of each image (~333 KB as base64)
LATE_REFS = 90  # rows at the end that name an earlier row's index (read again from the file)


def _large_png_b64(seed: int) -> str:
    """A PNG whose first pixel's red value is seed % 256 (to tell the images apart), padded to PAYLOAD
    bytes after its end chunk (Pillow stops reading there): a large cell without encoding a large image."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, 0, 0)).save(buf, format="PNG")
    data = buf.getvalue()
    return base64.b64encode(data + np.random.default_rng(seed).bytes(PAYLOAD - len(data))).decode()


def _write(path: Path) -> dict[str, int]:
    """The TSV, streamed to disk; returns each question's expected first red value (-1: a row error)."""
    rng = np.random.default_rng(1)
    expect: dict[str, int] = {}
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["index", "image", "question", "answer", "choices"], delimiter="\t",
                           lineterminator="\n")
        w.writeheader()

        def row(index: int, image: str, shade: int) -> None:
            w.writerow(dict(index=index, image=image, question=f"q{index}?", answer="1", choices="[]"))
            expect[str(index)] = shade

        for k in range(SOURCES):
            row(k, _large_png_b64(k), k % 256)
            row(1000 + k, str(k), k % 256)  # the next row shares it (VLMEvalKit's layout of MathVerse versions)
        for j, k in enumerate(rng.integers(0, SOURCES, LATE_REFS)):
            row(2000 + j, str(int(k)), int(k) % 256)  # a row far from the one holding its image
        row(9000, "777", -1)  # no earlier row holds index 777: a row error naming it
    return expect


def test_a_large_tsv_is_read_in_bounded_memory_and_shared_images_resolve(tmp_path):
    expect = _write(tmp_path / "MathVision.tsv")
    size = (tmp_path / "MathVision.tsv").stat().st_size
    assert size > 75e6
    bench = get_benchmark("mathvision")
    data = BenchmarkData(bench, [])
    got: dict[str, int] = {}
    # tracemalloc counts Python's allocations (cells, decoded bytes), whatever else runs on the machine.
    tracemalloc.start()
    try:
        for item in iter_items(bench, tmp_path, data=data):
            got[item.qid] = item.images[0].getpixel((0, 0))[0]  # decoded as a prompt would (Pillow's own memory)
            del item  # items are consumed and dropped, as evaluate_benchmark's batches are
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == {q: v for q, v in expect.items() if v >= 0}
    assert [(s.row, s.reason) for s in data.skipped] == [
        (2 * SOURCES + LATE_REFS, "field 'image' refers to index 777, which no earlier row holds")]
    # Stated bound: 12 MB for an ~80 MB file (measured ~5 MB: the cell being read as bytes, text and csv's
    # 4-byte-per-character field, its decoded image, the last image kept for the rows after it, a row read
    # again). It depends on the largest row, not on the file. Keeping every image would hold ~60 MB.
    print(f"TSV {size / 1e6:.0f} MB, traced peak {peak / 1e6:.1f} MB")
    assert peak < 12e6


def _shade(item) -> int:
    return item.images[0].getpixel((0, 0))[0]


def test_rows_read_again_by_offset_across_multiline_cells_and_line_endings(tmp_path):
    # CRLF line ends, a quoted question holding CRLF, LF and a lone CR, and a lone-CR row end: the
    # offsets must land on the referenced row's first byte whatever came before it.
    header = "index\timage\tquestion\tanswer\tchoices\r\n"
    body = (f"1\t{F.b64png(11)}\t\"a\r\nb\nc\rd?\"\t1\t[]\r\n"
            f"2\t{F.b64png(22)}\tb?\t2\t[]\r"
            f"3\t{F.b64png(33)}\t\"c\nc?\"\t3\t[]\n"
            "4\t1\td?\t4\t[]\r\n"  # the image of row 1, two rows back: read again
            "5\t3\te?\t5\t[]\r\n"
            "6\t2\tf?\t6\t[]\r\n"
            "7\t1\tg?\t7\t[]\r\n")
    (tmp_path / "MathVision.tsv").write_bytes((header + body).encode())
    data = BenchmarkData(get_benchmark("mathvision"), [])
    items = list(iter_items(get_benchmark("mathvision"), tmp_path, data=data))
    assert not data.skipped
    assert [(i.qid, _shade(i)) for i in items] == [("1", 11), ("2", 22), ("3", 33), ("4", 11), ("5", 33),
                                                   ("6", 22), ("7", 11)]
    assert items[3].images._sources[0].where == "field 'image' (shared with index 1)"


def test_a_tsv_that_is_not_utf8_names_the_line(tmp_path):
    F._write_tsv(tmp_path / "MathVision.tsv", [dict(index=k, image=F.b64png(k), question=f"{k}?", answer="1",
                                                    choices="[]") for k in range(3)])
    path = tmp_path / "MathVision.tsv"
    path.write_bytes(path.read_bytes().replace(b"2?", b"2\xff?"))
    with pytest.raises(BenchmarkError, match=r"MathVision.tsv: not UTF-8 text \(line 4: .*byte 0xff"):
        list(iter_items(get_benchmark("mathvision"), tmp_path))
