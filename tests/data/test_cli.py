"""`selfjudge data check` and `selfjudge train` on broken data files: exit codes and one-line errors."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from megatron_selfjudge.cli import main

from test_datasets_untrusted import solid_png  # tests/data is on sys.path (rootdir-less test modules)


def _run(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err.splitlines()


@pytest.fixture
def bad_files(tmp_path):
    """A JSONL file with one good row and four bad ones, a garbage parquet file, a missing file."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (4, 4)).save(data / "ok.png")
    (data / "big.png").write_bytes(solid_png(5000, 5000, rows=2))
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    good = json.dumps({"images": ["ok.png"], "problem": "fine"}).encode()
    rows = data / "rows.jsonl"
    rows.write_bytes(b"\n".join([
        good,
        b'{"images": ["ok.png"], "problem": "caf\xe9"}',
        json.dumps({"images": ["../outside.png"], "problem": "escape"}).encode(),
        json.dumps({"images": ["big.png"], "problem": "huge"}).encode(),
        b"[1, 2]",
    ]) + b"\n")
    junk = data / "junk.parquet"
    junk.write_bytes(b"definitely not parquet")
    return {"rows": rows, "junk": junk, "missing": data / "absent.parquet"}


def test_data_check_reports_each_bad_row(capsys, bad_files):
    path = bad_files["rows"]
    rc, out, err = _run(capsys, "data", "check", str(path))
    assert rc == 1 and err == []
    assert out[0] == f"{path}: schema jsonl, 1 usable rows (0 with answers), 4 skipped"
    assert out[1:] == [
        f"  skipped: {path} row 1: line 2 is not UTF-8 text (byte 0xe9 at column 39)",
        f"  skipped: {path} row 2: field 'images'[0]: image path '../outside.png' is outside the data "
        "folder and data.image_roots",
        f"  skipped: {path} row 3: field 'images'[0]: image of 5000 x 5000 = 25000000 pixels exceeds "
        "data.max_image_pixels (12845056)",
        f"  skipped: {path} row 4: line 5 is not a JSON object (got list)",
    ]
    # The limits are the command's options too.
    rc, out, _ = _run(capsys, "data", "check", str(path), "--image-root", str(path.parent.parent),
                      "--max-image-pixels", "25000000")
    assert rc == 1 and out[0].endswith("3 usable rows (0 with answers), 2 skipped")
    assert [line.split(" row ")[1][:1] for line in out[1:]] == ["1", "4"]


@pytest.mark.parametrize("which", ["junk", "missing"])
def test_data_check_fatal_file_errors_are_one_line(capsys, bad_files, which):
    rc, out, err = _run(capsys, "data", "check", str(bad_files[which]))
    assert rc == 2 and out == [] and len(err) == 1
    assert err[0].startswith("selfjudge: data error: ") and str(bad_files[which]) in err[0]


@pytest.mark.slow
def test_train_on_a_broken_file_exits_2_with_one_line(tmp_path, bad_files):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    for which, expected in (("rows", "row 1: line 2 is not UTF-8 text"), ("junk", "not a readable parquet")):
        proc = subprocess.run([sys.executable, "-m", "megatron_selfjudge.cli", "train",
                               f"data.train={bad_files[which]}", f"trainer.run_dir={tmp_path / which}"],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        # The error is the last line and the only one of its kind (progress lines come before it).
        errors = [line for line in proc.stderr.splitlines() if line.startswith("selfjudge:")]
        assert "Traceback" not in proc.stderr and errors == proc.stderr.strip().splitlines()[-1:], proc.stderr
        assert errors[0].startswith("selfjudge: data error: ") and str(bad_files[which]) in errors[0]
        assert expected in errors[0]
