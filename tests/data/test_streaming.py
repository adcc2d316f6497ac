"""Streamed training files: row groups read on demand, data.limit, seeded and resumable order,
several files mixed by data.weights, broken rows reported, and memory bounded by a row group."""

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_selfjudge.cli import main as cli_main
from megatron_selfjudge.config import ConfigError, load_config
from megatron_selfjudge.data.datasets import (ConcatRecords, DatasetError, StreamingRecords, load_records,
                                              open_records)
from megatron_selfjudge.data.task import MixedSampler, PromptSampler, load_task, step_counts

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
GEO3K = pa.schema([("images", pa.list_(IMAGE)), ("problem", pa.string()), ("answer", pa.string())])


def _png(value: int, size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value % 256, 7, 7)).save(buf, format="PNG")
    return buf.getvalue()


def _geo3k(path, n: int, group: int, broken=(), start: int = 0):
    """n rows in row groups of `group`; rows in `broken` hold bytes that are no image."""
    images = [[{"bytes": b"not an image" if i in broken else _png(i), "path": None}] for i in range(n)]
    table = pa.table({"images": images, "problem": [f"<image>q{start + i}" for i in range(n)],
                      "answer": [str(start + i) for i in range(n)]}, schema=GEO3K)
    pq.write_table(table, path, row_group_size=group)
    return path


def _jsonl(path, n: int, broken=()):
    (path.parent / "img.png").write_bytes(_png(3))
    lines = ["{not json" if i in broken else json.dumps({"image": "img.png", "problem": f"j{i}", "answer": i})
             for i in range(n)]
    path.write_text("\n\n".join(lines) + "\n")  # blank lines between rows are not rows
    return path


def _config(files, *extra):
    train = str(files) if not isinstance(files, list) else "[" + ",".join(str(f) for f in files) + "]"
    return load_config(None, [f"data.train={train}", "data.workers=0", *extra])


# ---------------------------------------------------------------- reading on demand
def test_streamed_rows_equal_the_in_memory_loader(tmp_path):
    path = _geo3k(tmp_path / "g.parquet", n=23, group=5, broken={4, 11})
    assert pq.ParquetFile(path).metadata.num_row_groups == 5
    mem = load_records(path, on_error="skip")
    stream = open_records(path, on_error="skip")
    assert isinstance(stream, StreamingRecords) and len(stream) == len(mem) == 21
    assert stream.skipped == mem.skipped == 2
    assert [r.question for r in stream] == [r.question for r in mem.records]
    assert [r.row for r in stream] == [i for i in range(23) if i not in (4, 11)]
    picked = [20, 0, 7, 3, 19, 7]  # any order, repeats allowed, across row groups
    got = stream.take(picked)
    assert [r.question for r in got] == [mem.records[i].question for i in picked]
    assert got[2].images[0].getpixel((0, 0)) == mem.records[7].images[0].getpixel((0, 0))
    assert stream[-1].question == "q22" and [r.row for r in stream[2:4]] == [2, 3]
    with pytest.raises(IndexError):
        stream.take([21])


def test_jsonl_rows_are_read_back_by_offset(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", n=7, broken={2})
    stream = open_records(path, on_error="skip")
    assert len(stream) == 6 and stream.skipped == 1
    assert f"{path} row 2: invalid JSON on line 5" in stream.errors[0]
    assert [r.question for r in stream.take([5, 0, 2])] == ["j6", "j0", "j3"]
    assert [r.answer for r in stream] == ["0", "1", "3", "4", "5", "6"]


def test_limit_keeps_the_first_usable_rows(tmp_path):
    path = _geo3k(tmp_path / "g.parquet", n=30, group=4, broken={1, 2})
    stream = open_records(path, on_error="skip", limit=5)
    assert [r.row for r in stream] == [0, 3, 4, 5, 6] and stream.skipped == 2
    assert len(open_records(path, on_error="skip", limit=0)) == 0
    cfg = _config(path, "data.on_error=skip", "data.limit=6", "trainer.prompts_per_step=2",
                  "trainer.mini_batch_prompts=1")
    assert [r.row for r in load_task(cfg).train] == [0, 3, 4, 5, 6, 7]


def test_broken_rows_raise_with_file_and_row(tmp_path):
    path = _geo3k(tmp_path / "g.parquet", n=12, group=3, broken={7, 9})
    with pytest.raises(DatasetError, match=rf"^{path} row 7: field 'images'\[0\]: not a readable image"):
        open_records(path)
    stream = open_records(path, on_error="skip")
    assert [e.split(":")[0] for e in stream.errors] == [f"{path} row 7", f"{path} row 9"]
    assert 7 not in stream.file_rows.tolist() and 9 not in stream.file_rows.tolist()


def test_a_file_changed_after_its_check_is_refused(tmp_path):
    path = _geo3k(tmp_path / "g.parquet", n=8, group=4)
    stream = open_records(path)
    _geo3k(path, n=8, group=4, broken={1})  # same name, rewritten with a broken row
    with pytest.raises(DatasetError, match="changed since its rows were checked at load"):
        stream.take([1])


@pytest.mark.slow
def test_decode_workers_give_the_same_rows_and_errors(tmp_path):
    path = _geo3k(tmp_path / "g.parquet", n=40, group=4, broken={5, 33})
    here = open_records(path, on_error="skip", workers=0)
    pool = open_records(path, on_error="skip", workers=2)
    assert pool.file_rows.tolist() == here.file_rows.tolist() and pool.errors == here.errors
    assert len(open_records(path, on_error="skip", workers=2, limit=3)) == 3
    with pytest.raises(DatasetError, match=rf"{path} row 5:"):  # the first bad row in file order
        open_records(path, workers=2)
    jl = _jsonl(tmp_path / "t.jsonl", n=600, broken={300})  # three chunks of lines
    assert open_records(jl, on_error="skip", workers=2).errors == open_records(jl, on_error="skip").errors


# ---------------------------------------------------------------- order and resume
def test_embedded_task_order_is_the_seeded_permutation():
    cfg = load_config(None, [])
    task = load_task(cfg)
    sampler = task.sampler(cfg.trainer.seed)
    n, k = len(task.train), cfg.trainer.prompts_per_step
    drawn = [r.uid for _ in range(n // k + 2) for r in task.draw(sampler.next(k))]
    # The order before streaming: one permutation of all prompts per epoch, remainder dropped.
    expect = []
    for epoch in (0, 1):
        order = np.random.default_rng([cfg.trainer.seed, epoch]).permutation(n)
        expect += [task.train[i].uid for i in order[:(n // k) * k]]
    assert drawn == expect[:len(drawn)]


def test_sampler_resumes_from_its_state_and_shuffle_off_is_file_order():
    a = PromptSampler(10, seed=3)
    first = [a.next(4) for _ in range(3)]  # the third draw starts epoch 1
    b = PromptSampler(10, seed=3)
    b.next(4)
    resumed = PromptSampler(10, seed=3, **json.loads(json.dumps(b.state())))
    assert [resumed.next(4), resumed.next(4)] == first[1:]
    assert sorted(first[0] + first[1]) != first[0] + first[1]  # shuffled
    plain = PromptSampler(10, seed=3, shuffle=False)
    assert [plain.next(4), plain.next(4), plain.next(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]


def test_step_counts_share_out_by_largest_remainder():
    assert step_counts([0.7, 0.3], 512) == [358, 154]
    assert step_counts([1, 1, 1], 4) == [2, 1, 1]
    assert step_counts([3, 1], 4) == [3, 1]
    for weights, k in (([0.2, 0.5, 0.3], 7), ([5, 1, 1, 1], 33)):
        assert sum(step_counts(weights, k)) == k


def test_mixed_sampler_takes_each_files_share_and_resumes():
    sizes, counts = [10, 4], [3, 1]
    s = MixedSampler(sizes, counts, seed=5)
    steps = [s.next(4) for _ in range(6)]
    for step in steps:
        assert sum(i < 10 for i in step) == 3 and len(set(step)) == 4
    first_file = [i for st in steps[:3] for i in st if i < 10]
    assert sorted(first_file) == sorted(set(first_file)) and len(first_file) == 9  # one epoch, no repeat
    assert len({i for st in steps[:4] for i in st if i >= 10}) == 4  # the small file: one epoch in 4 steps
    t = MixedSampler(sizes, counts, seed=5)
    for _ in range(2):
        t.next(4)
    resumed = MixedSampler(sizes, counts, seed=5, **json.loads(json.dumps(t.state())))
    assert [resumed.next(4) for _ in range(4)] == steps[2:]
    with pytest.raises(ValueError, match="shared out for 4"):
        s.next(5)


def test_files_mixed_by_weights_through_load_task(tmp_path):
    a = _geo3k(tmp_path / "a.parquet", n=20, group=6)
    b = _jsonl(tmp_path / "b.jsonl", n=5)
    cfg = _config([a, b], "data.weights=[0.75,0.25]", "trainer.prompts_per_step=4",
                  "trainer.mini_batch_prompts=2")
    task = load_task(cfg)
    assert isinstance(task.train, ConcatRecords) and len(task.train) == 25 and task.step_counts == [3, 1]
    sampler = task.sampler(cfg.trainer.seed)
    for _ in range(5):
        recs = task.draw(sampler.next(4))
        assert sorted(r.source_file.endswith("b.jsonl") for r in recs) == [False, False, False, True]
    state = sampler.state()
    again = task.sampler(cfg.trainer.seed, state)
    assert [r.uid for r in task.draw(again.next(4))] == [r.uid for r in task.draw(sampler.next(4))]
    with pytest.raises(ValueError, match="data cursor is for one pool"):
        task.sampler(cfg.trainer.seed, {"epoch": 0, "offset": 0})
    # Without weights: one pool of 25 prompts.
    pooled = load_task(_config([a, b], "trainer.prompts_per_step=4", "trainer.mini_batch_prompts=2"))
    assert pooled.step_counts is None and len(pooled.sampler(0).next(25 // 4 * 4)) == 24


def test_mixing_errors_name_the_file_and_weight(tmp_path):
    a = _geo3k(tmp_path / "a.parquet", n=20, group=6)
    b = _jsonl(tmp_path / "b.jsonl", n=2)
    step = ("trainer.prompts_per_step=8", "trainer.mini_batch_prompts=2")
    with pytest.raises(DatasetError, match=r"b.jsonl' holds 2 usable rows .*its 4 prompts of a step"):
        load_task(_config([a, b], "data.weights=[1,1]", *step))
    with pytest.raises(DatasetError, match=r"data.weights\[1\]=0.01 gives .*b.jsonl' no prompt"):
        load_task(_config([a, b], "data.weights=[1,0.01]", *step))


@pytest.mark.parametrize("overrides, key", [
    (["data.train=[a.parquet,b.jsonl]", "data.weights=[1]"], "data.weights"),
    (["data.train=a.parquet", "data.weights=[1]"], "data.weights"),
    (["data.train=[a.parquet,b.jsonl]", "data.weights=[1,0]"], "data.weights"),
    (["data.train=[a.parquet,a.parquet]"], "data.train"),
    (["data.train=[synthetic,a.parquet]"], "data.train"),
    (["data.train=[]"], "data.train"),
    (["data.train=3"], "data.train"),
    (["data.limit=-1"], "data.limit"),
    (["data.workers=-1"], "data.workers"),
])
def test_bad_data_settings_are_one_line_config_errors(overrides, key, capsys):
    with pytest.raises(ConfigError, match=f"^{key}="):
        load_config(None, overrides)
    assert cli_main(["config", "check", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"config error: {key}=" in err


# ---------------------------------------------------------------- memory
MEMORY_SCRIPT = textwrap.dedent("""
    import sys, threading, time, psutil
    from megatron_selfjudge.data.datasets import open_records
    from megatron_selfjudge.data.task import PromptSampler
    proc = psutil.Process()
    base_rss = proc.memory_info().rss
    # The peak, sampled every millisecond (ru_maxrss would carry the parent's peak across exec).
    high, done = [base_rss], threading.Event()
    def watch():
        while not done.is_set():
            high[0] = max(high[0], proc.memory_info().rss)
            time.sleep(0.001)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stream = open_records(sys.argv[1], workers=0)  # every image decoded once, in this process
    seen = 0
    for rec in stream:  # a pass in file order, each image decoded as training would
        rec.images[0].getpixel((0, 0))
        seen += 1
    sampler = PromptSampler(len(stream), seed=0)
    for _ in range(2):  # two shuffled steps: rows from every row group
        for rec in stream.take(sampler.next(32)):
            rec.images[0].getpixel((0, 0))
    done.set()
    watcher.join()
    print(len(stream), seen, proc.memory_info().rss - base_rss, high[0] - base_rss)
""")


def _noise_parquet(path, rows: int, group: int = 40) -> int:
    """rows of ~197 KB incompressible images (noise PNGs, no dictionary, no compression) in row groups
    of `group` rows (~8 MB each); returns the file's size."""
    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(24):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, format="PNG",
                                                                                  compress_level=0)
        pngs.append(buf.getvalue())
    with pq.ParquetWriter(path, GEO3K, compression="NONE", use_dictionary=False) as writer:
        for start in range(0, rows, group):
            n = min(group, rows - start)
            writer.write_table(pa.table({
                "images": [[{"bytes": pngs[(start + i) % len(pngs)], "path": None}] for i in range(n)],
                "problem": [f"<image>q{start + i}" for i in range(n)], "answer": ["1"] * n}, schema=GEO3K))
    return path.stat().st_size


def _memory_of_a_pass(path) -> tuple[int, int]:
    """(RSS growth at the end, peak RSS growth) of a fresh process that scans, iterates and samples the file."""
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path)], capture_output=True, text=True,
                         timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr
    n, seen, rss_delta, peak_delta = map(int, out.stdout.split())
    assert n == seen == pq.ParquetFile(path).metadata.num_rows
    return rss_delta, peak_delta


@pytest.mark.slow
def test_iterating_a_large_parquet_keeps_memory_bounded(tmp_path):
    # The same rows in a file of 150 and one of 1200 (30 and 236 MB). Streaming holds a row group and a
    # batch's rows, and 3 int64 positions per usable row, so memory must not grow with the file's size.
    sizes, memory = {}, {}
    for rows in (150, 1200):
        path = tmp_path / f"big{rows}.parquet"
        sizes[rows] = _noise_parquet(path, rows)
        memory[rows] = _memory_of_a_pass(path)
        path.unlink()  # one file on disk at a time
    assert sizes[1200] > 230e6
    (small_end, small_peak), (large_end, large_peak) = memory[150], memory[1200]
    per_row = (large_peak - small_peak) / 1050
    for rows in (150, 1200):
        print(f"file {sizes[rows] / 1e6:.0f} MB ({rows} rows): RSS growth {memory[rows][0] / 1e6:.1f} MB, "
              f"peak {memory[rows][1] / 1e6:.1f} MB")
    print(f"peak growth per added row {per_row / 1e3:.1f} KB (a row holds {sizes[1200] / 1200 / 1e3:.0f} KB)")
    # Stated bounds. Per row: the 1050 added rows (206 MB) may add at most 12 MB, i.e. < 12 KB a row against
    # the ~197 KB of data a row (what keeping rows would cost). Measured: 0 to 6 MB, whether or not the
    # allocators keep one more row group's buffers (8 MB) at the end. So a 2 GB file of these rows
    # (~10,000 rows) stays under 80 MB + 10,000 x 12 KB.
    assert large_peak - small_peak < 12e6 and large_end - small_end < 12e6, "memory grows with the file"
    # Each pass: 80 MB (measured ~48 MB: a row group read (8 MB) and its taken copy, a 32-row batch as
    # Python bytes, the decoded image, allocator slack).
    assert max(small_peak, small_end, large_peak, large_end) < 80e6


def test_preflight_names_the_missing_file_of_a_list(tmp_path):
    from megatron_selfjudge.runtime.preflight import PreflightError, check_data

    a = _geo3k(tmp_path / "a.parquet", n=4, group=4)
    cfg = _config([a, tmp_path / "gone.jsonl"])
    with pytest.raises(PreflightError, match=r"^data.train\[1\]='.*gone.jsonl' does not exist on this node"):
        check_data(cfg)
    assert check_data(_config(a)) == f"data.train {a}"
