
import torch

from megatron_selfjudge.metrics import MetricsWriter, read_metrics


def test_jsonl_and_tensorboard(tmp_path):
    w = MetricsWriter(tmp_path)
    w.log(1, {"loss": torch.tensor(0.5), "kl": 0.1, "entropy": float("nan")})
    w.log(2, {"loss": 0.25, "kl": 0.2, "entropy": 1.0})
    w.close()
    rows = read_metrics(tmp_path)
    assert rows == [{"step": 1, "loss": 0.5, "kl": 0.1, "entropy": None},
                    {"step": 2, "loss": 0.25, "kl": 0.2, "entropy": 1.0}]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())


def test_truncate_after_and_disabled(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for s in range(1, 6):
        w.log(s, {"loss": s / 10})
    w.truncate_after(3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    off = MetricsWriter(tmp_path / "other", enabled=False)
    off.log(1, {"loss": 1.0})
    assert not (tmp_path / "other").exists()


def test_other_stages_go_to_their_own_file(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.log(1, {"sft_nll": 2.0}, prefix="sft")
    w.log(1, {"loss": 0.5})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}]
    assert (tmp_path / "sft_metrics.jsonl").read_text().strip() == '{"step": 1, "sft_nll": 2.0}'


def test_torn_last_line_is_ignored(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}]
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.truncate_after(5)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'


def _failing_writes(monkeypatch, folder):
    """Make every text file opened for writing under `folder` fail on write (a full disk)."""
    import builtins
    import errno
    import io
    import os

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self._f = f

        def write(self, text):
            self._f.write(text[: len(text) // 2])
            self._f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def patched(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        inside = str(file).startswith(str(folder))
        return Full(f) if inside and any(c in mode for c in "wa") else f

    monkeypatch.setattr(builtins, "open", patched)
    monkeypatch.setattr(io, "open", patched)


def test_failed_rewrite_leaves_the_original_whole(tmp_path, monkeypatch):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for s in range(1, 6):
        w.log(s, {"loss": s / 10})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    _failing_writes(monkeypatch, tmp_path)
    try:
        w.truncate_after(3)
    except OSError:
        pass
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no half-written temporary
    w.truncate_after(3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_kill_inside_the_rewrite_keeps_old_or_new(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    w = MetricsWriter(tmp_path, tensorboard=False)
    for s in range(1, 6):
        w.log(s, {"loss": s / 10})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    code = ("import sys\nfrom megatron_selfjudge.metrics import MetricsWriter\n"
            "MetricsWriter(sys.argv[1], tensorboard=False).truncate_after(3)\n")
    env = {**os.environ, "SELFJUDGE_TEST_KILL_AT": "metrics_rewrite"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "metrics.jsonl").read_bytes() == before  # killed before the rename: old file
    assert (tmp_path / "metrics.jsonl.part").exists()
    w.truncate_after(3)  # the resumed run's rewrite replaces the stale temporary
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert not (tmp_path / "metrics.jsonl.part").exists()
