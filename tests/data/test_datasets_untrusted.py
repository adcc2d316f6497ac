"""Hostile dataset files: image paths leaving the data folder, oversized images, bad encodings."""

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_selfjudge.config import ConfigError, DataConfig, load_config
from megatron_selfjudge.data.datasets import DatasetError, ImageLimits, load_records

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
GEO3K = pa.schema([("images", pa.list_(IMAGE)), ("problem", pa.string()), ("answer", pa.string())])


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def solid_png(width: int, height: int, color=(200, 30, 30), rows: int | None = None) -> bytes:
    """A valid RGB PNG of one colour, built row by row so the test never holds the decoded image.

    rows < height writes only that many rows of pixel data (a header that promises more)."""
    line = b"\x00" + bytes(color) * width  # filter type 0, then the pixels of one row
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(line) for _ in range(height if rows is None else rows)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path: Path, images: list, schema: pa.Schema = GEO3K) -> Path:
    n = len(images)
    cols = {"images": images, "problem": [f"<image>q{i}" for i in range(n)], "answer": ["1"] * n}
    if "image" in schema.names:
        cols = {"image": images, "problem": cols["problem"], "solution": ["<answer>1</answer>"] * n}
    pq.write_table(pa.table(cols, schema=schema), path)
    return path


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        load_records(path, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- confinement
@pytest.fixture
def tree(tmp_path):
    """data/ holds the dataset and a good image; outside/ holds a readable image that rows must not reach."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    Image.new("RGB", (6, 6), (9, 9, 9)).save(data / "good.png")
    Image.new("RGB", (6, 6), (1, 2, 3)).save(outside / "secret.png")
    (data / "sub").mkdir()
    os.symlink(outside / "secret.png", data / "link.png")
    os.symlink(outside / "absent.png", data / "deadlink.png")
    os.symlink(data / "good.png", data / "sub" / "inner_link.png")  # stays inside: allowed
    (tmp_path / "data2").mkdir()  # a sibling whose name starts with the data folder's
    Image.new("RGB", (6, 6), (5, 5, 5)).save(tmp_path / "data2" / "img.png")
    return tmp_path


# (existing target, missing target) pairs: the refusal must read the same for both
ESCAPES = [
    ("../outside/secret.png", "../outside/absent.png"),
    ("{root}/outside/secret.png", "{root}/outside/absent.png"),
    ("link.png", "deadlink.png"),
    ("sub/../../outside/secret.png", "nosuchdir/../../outside/absent.png"),
    ("/etc/passwd", "/etc/no-such-file-here"),
    ("../data2/img.png", "../data2/absent.png"),
]


def _outside_message(msg: str, given: str) -> str:
    assert given in msg, msg
    return msg.replace(repr(given), "PATH")


@pytest.mark.parametrize("existing,missing", ESCAPES)
def test_image_paths_leaving_the_data_folder_are_refused_alike(tree, existing, missing):
    existing, missing = (p.format(root=tree) for p in (existing, missing))
    msgs = []
    for k, given in enumerate((existing, missing)):
        path = _jsonl(tree / "data" / f"rows{k}.jsonl", [{"images": ["good.png"], "problem": "fine"},
                                                       {"images": [given], "problem": "escape"}])
        msg = _error(path)
        assert msg.startswith(f"{path} row 1: field 'images'[0]: "), msg
        assert "outside" in msg and "\n" not in msg
        msgs.append(_outside_message(msg, given).replace(str(path), "FILE"))
    # Same words whether the target exists or not: the error tells nothing about the outside tree.
    assert msgs[0] == msgs[1]


def test_parquet_structs_and_lists_are_confined_and_skip_counts(tree):
    data = tree / "data"
    path = _parquet(data / "g.parquet", [
        [{"bytes": None, "path": "good.png"}],
        [{"bytes": None, "path": "../outside/secret.png"}],
        [{"bytes": None, "path": "good.png"}, {"bytes": None, "path": str(tree / "outside" / "secret.png")}],
        [{"bytes": None, "path": "sub/inner_link.png"}],
        [{"bytes": None, "path": "/etc/hostname"}],
    ])
    assert "row 1: field 'images'[0]" in _error(path)
    result = load_records(path, on_error="skip")
    assert [r.row for r in result.records] == [0, 3]
    assert result.skipped == 3 and all("outside" in e for e in result.errors)
    assert "row 2: field 'images'[1]" in result.errors[1]
    assert result.records[1].images[0].getpixel((0, 0)) == (9, 9, 9)

    geoqa = pa.schema([("image", IMAGE), ("problem", pa.string()), ("solution", pa.string())])
    path = _parquet(data / "q.parquet", [{"bytes": None, "path": "link.png"}], geoqa)
    assert "row 0: field 'image'" in _error(path) and "outside" in _error(path)


def test_extra_image_roots_and_symlinked_data_folder(tree, monkeypatch):
    path = _jsonl(tree / "data" / "r.jsonl", [{"image": "../outside/secret.png", "problem": "q"},
                                              {"image": "link.png", "problem": "q"}])
    for roots in ((str(tree / "outside"),), ("outside",)):  # absolute, or relative to the working dir
        monkeypatch.chdir(tree)
        recs = load_records(path, limits=ImageLimits(roots=roots)).records
        assert [r.images[0].getpixel((0, 0)) for r in recs] == [(1, 2, 3), (1, 2, 3)]
    # The data file reached through a symlinked folder: its real folder is the root.
    os.symlink(tree / "data", tree / "alias")
    (rec,) = load_records(_jsonl(tree / "alias" / "s.jsonl", [{"image": "good.png", "problem": "q"}])).records
    assert rec.images[0].getpixel((0, 0)) == (9, 9, 9)


def test_path_values_of_the_wrong_kind(tree):
    rows = [{"images": [{"path": 7}], "problem": "q"}, {"images": ["bad\x00name.png"], "problem": "q"},
            {"images": [["nested"]], "problem": "q"}, {"images": ["sub/" * 3000 + "x.png"], "problem": "q"}]
    result = load_records(_jsonl(tree / "data" / "k.jsonl", rows), on_error="skip")
    assert result.skipped == 4
    assert "'path' must be a string" in result.errors[0]
    assert "row 1" in result.errors[1] and "NUL" in result.errors[1]
    # A name the OS refuses is a row error, and a long value is shortened in the message.
    assert "row 3: field 'images'[0]: cannot read image file 'sub/sub/" in result.errors[3]
    assert "(File name too long)" in result.errors[3] and len(result.errors[3]) < 500


# ---------------------------------------------------------------- size limits
def _small_png(color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def test_pixel_cap_refuses_from_the_header(tmp_path):
    # Headers that declare 5000 x 5000 and 20000 x 20000 over a few rows of pixel data (Pillow
    # would fill the rest with black): the refusal must come from the declared size.
    huge = solid_png(5000, 5000, rows=3)
    bomb = solid_png(20000, 20000, rows=1)  # beyond PIL's own decompression-bomb limit
    path = _parquet(tmp_path / "big.parquet", [[{"bytes": _small_png(), "path": None}],
                                               [{"bytes": huge, "path": None}],
                                               [{"bytes": bomb, "path": None}]])
    cap = DataConfig().max_image_pixels
    assert cap == 16384 * 28 * 28  # Qwen2.5-VL's processor max_pixels
    msg = _error(path)
    assert msg == (f"{path} row 1: field 'images'[0]: image of 5000 x 5000 = 25000000 pixels exceeds "
                   f"data.max_image_pixels ({cap})")
    result = load_records(path, on_error="skip")
    assert result.skipped == 2 and len(result.records) == 1
    # Beyond Pillow's hard limit its own DecompressionBombError comes first: the same refusal.
    assert f"row 2: field 'images'[0]: image exceeds data.max_image_pixels ({cap})" in result.errors[1]
    assert "400000000 pixels" in result.errors[1] and "\n" not in result.errors[1]
    small = load_records(path, on_error="skip", limits=ImageLimits(max_pixels=100))
    assert small.skipped == 3 and "image of 20 x 16 = 320 pixels exceeds data.max_image_pixels (100)" \
        in small.errors[0]


def test_byte_and_count_caps(tmp_path):
    png = _small_png()
    Image.open(io.BytesIO(png)).save(tmp_path / "f.png")
    path = _parquet(tmp_path / "b.parquet", [[{"bytes": png, "path": None}], [{"bytes": None, "path": "f.png"}],
                                             [{"bytes": png, "path": None}] * 3])
    n = len(png)
    result = load_records(path, on_error="skip", limits=ImageLimits(max_bytes=n - 1, max_per_row=2))
    assert result.skipped == 3
    assert result.errors[0].endswith(f"row 0: field 'images'[0]: image of {n} bytes exceeds "
                                     f"data.max_image_bytes ({n - 1})")
    assert f"row 1: field 'images'[0]: image of {os.path.getsize(tmp_path / 'f.png')} bytes exceeds" \
        in result.errors[1]
    assert result.errors[2].endswith("row 2: field 'images' holds 3 images > data.max_images_per_row (2)")
    assert len(load_records(path, limits=ImageLimits(max_bytes=n, max_per_row=3))) == 3


def test_early_resize_towards_the_model_image_size(tmp_path):
    jpeg = io.BytesIO()
    Image.new("RGB", (1024, 1024), (0, 0, 250)).save(jpeg, format="JPEG")
    path = _parquet(tmp_path / "r.parquet", [[{"bytes": solid_png(1000, 800), "path": None}],
                                             [{"bytes": jpeg.getvalue(), "path": None}]])
    png_img, jpeg_img = (r.images[0] for r in load_records(path, limits=ImageLimits(target_size=32)))
    # Reduced by whole factors, never below the model's side: the final resize is still collate's.
    assert png_img.size == (40, 32) and png_img.getpixel((3, 3)) == (200, 30, 30)
    assert 32 <= min(jpeg_img.size) and max(jpeg_img.size) < 64
    assert all(abs(a - b) <= 3 for a, b in zip(jpeg_img.getpixel((5, 5)), (0, 0, 250)))
    full = load_records(path).records  # no target size: full resolution
    assert full[0].images[0].size == (1000, 800) and full[1].images[0].size == (1024, 1024)


def test_records_decode_images_on_access(tmp_path):
    path = _parquet(tmp_path / "l.parquet", [[{"bytes": _small_png((i, 0, 0)), "path": None}] * 2
                                             for i in range(3)])
    rec = load_records(path).records[2]
    assert len(rec.images) == 2
    assert not any(isinstance(v, Image.Image) for v in vars(rec.images).values())  # nothing decoded kept
    first, second = rec.images[0], list(rec.images)[1]
    assert first is not rec.images[0]  # a fresh decode on each access
    assert first.mode == "RGB" and first.getpixel((0, 0)) == second.getpixel((0, 0)) == (2, 0, 0)
    with pytest.raises(IndexError):
        rec.images[2]


def test_limits_come_from_the_data_config(tmp_path):
    assert ImageLimits() == ImageLimits.from_config(DataConfig())
    cfg = load_config(None, ["data.image_roots=[/srv/images]", "data.max_image_pixels=1000",
                             "data.max_image_bytes=2000", "data.max_images_per_row=3"])
    limits = ImageLimits.from_config(cfg.data, image_size=cfg.model.image_size)
    assert limits == ImageLimits(roots=("/srv/images",), max_pixels=1000, max_bytes=2000, max_per_row=3,
                                 target_size=cfg.model.image_size)
    for key in ("max_image_pixels", "max_image_bytes", "max_images_per_row"):
        with pytest.raises(ConfigError, match=f"data.{key}"):
            load_config(None, [f"data.{key}=0"])


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    from megatron_selfjudge.data.datasets import load_records
    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = []
    for path in sys.argv[1:]:
        base = peak_mb()
        result = load_records(path, on_error="skip")
        for rec in result.records:  # every image decoded once more, as training would
            for img in rec.images:
                img.getpixel((0, 0))
        out.append(f"{len(result.records)} {result.skipped} {peak_mb() - base:.1f}")
    print(";".join(out))
""")


@pytest.mark.slow
def test_memory_stays_bounded_on_large_single_colour_images(tmp_path):
    # 16 rows of 2500 x 2500 PNGs (under the cap): ~9 kB each on disk, 18.75 MB each decoded RGB.
    # Decoding them up front would keep 16 x 18.75 = 300 MB; decoded on access, the loader's peak
    # growth must stay under BOUND_MB (a few images in flight). 16 rows of 6000 x 6000 (36 M pixels,
    # over the cap; 108 MB each decoded) must be refused without decoding: growth under 40 MB.
    BOUND_MB = 100
    under = solid_png(2500, 2500)
    over = solid_png(6000, 6000)
    files = [_parquet(tmp_path / "under.parquet", [[{"bytes": under, "path": None}]] * 16),
             _parquet(tmp_path / "over.parquet", [[{"bytes": over, "path": None}]] * 16)]
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, *map(str, files)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (kept, skipped, grew), (kept_over, skipped_over, grew_over) = (
        tuple(float(x) for x in part.split()) for part in proc.stdout.strip().split(";"))
    assert (kept, skipped) == (16, 0) and (kept_over, skipped_over) == (0, 16)
    assert grew < BOUND_MB, f"peak RSS grew {grew:.0f} MB loading 16 images of 18.75 MB"
    assert grew_over < 40, f"peak RSS grew {grew_over:.0f} MB refusing over-cap images"


# ---------------------------------------------------------------- encodings and file formats
def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    good = json.dumps({"images": ["ok.png"], "problem": "fine"}).encode()
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n\n" + b'{"images": ["ok.png"], "problem": "caf\xe9"}\n'
                     + good + b"\n")
    assert _error(path) == (f"{path} row 1: line 3 is not UTF-8 text (byte 0xe9 at column 39)")
    result = load_records(path, on_error="skip")
    assert [r.row for r in result.records] == [0, 2] and result.skipped == 1


def test_jsonl_lines_that_are_not_objects(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    path = tmp_path / "odd.jsonl"
    path.write_text("\n".join([json.dumps({"images": ["ok.png"], "problem": "fine"}), "42", "null",
                               '"text"', "[" * 100000 + "]" * 100000]) + "\n")
    result = load_records(path, on_error="skip")
    assert len(result) == 1 and result.skipped == 4
    assert "row 1: line 2 is not a JSON object (got int)" in result.errors[0]
    assert "row 3: line 4 is not a JSON object (got str)" in result.errors[2]
    assert "row 4: invalid JSON on line 5" in result.errors[3] and "\n" not in result.errors[3]


@pytest.mark.parametrize("content", [b"", b"PAR1 garbage bytes that are not parquet", "truncated"])
def test_broken_parquet_is_one_line_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.parquet"
    if content == "truncated":
        good = _parquet(tmp_path / "good.parquet", [[{"bytes": _small_png(), "path": None}]] * 4).read_bytes()
        content = good[: len(good) // 2]
    path.write_bytes(content)
    msg = _error(path, on_error="skip")
    assert msg.startswith(f"{path}: not a readable parquet file") and "\n" not in msg


def test_parquet_text_that_is_not_utf8_is_a_row_error(tmp_path):
    # Parquet does not validate string columns on read: plant invalid bytes in an uncompressed file.
    table = pa.table({"images": [[{"bytes": _small_png(), "path": None}]] * 3,
                      "problem": ["<image>one", "<image>two ZZ here", "<image>three"], "answer": ["1"] * 3},
                     schema=GEO3K)
    path = tmp_path / "text.parquet"
    pq.write_table(table, path, compression="none", use_dictionary=False, write_statistics=False)
    raw = path.read_bytes()
    assert raw.count(b"ZZ") == 1
    path.write_bytes(raw.replace(b"ZZ", b"\xff\xfe"))
    assert _error(path) == f"{path} row 1: column 'problem' holds text that is not UTF-8"
    result = load_records(path, on_error="skip")
    assert [r.question for r in result.records] == ["one", "three"] and result.skipped == 1


def test_arrow_errors_are_flattened_to_one_line(tmp_path):
    # A damaged footer makes Arrow's thrift reader answer with a message that ends in a newline.
    good = _parquet(tmp_path / "good.parquet", [[{"bytes": _small_png(), "path": None}]] * 4).read_bytes()
    footer = len(good) - 8 - struct.unpack("<I", good[-8:-4])[0]  # start of the thrift metadata
    damaged = tmp_path / "footer.parquet"
    damaged.write_bytes(good[:footer] + b"\xff" * 16 + good[footer + 16:])
    msg = _error(damaged)
    assert msg.startswith(f"{damaged}: not a readable parquet file") and "\n" not in msg.strip() \
        and msg == msg.strip()


def test_parquet_column_names_that_are_not_utf8(tmp_path):
    table = pa.table({"images": [[{"bytes": _small_png(), "path": None}]], "problem": ["q"], "noteZZ": ["x"]})
    path = tmp_path / "names.parquet"
    pq.write_table(table, path)
    raw = path.read_bytes()
    assert raw.count(b"noteZZ") == 2  # the footer's schema and column chunk (Arrow's copy is base64)
    path.write_bytes(raw.replace(b"noteZZ", b"note\xc3\x28"))
    msg = _error(path, on_error="skip")
    assert msg.startswith(f"{path}: not a readable parquet file (") and "\n" not in msg
