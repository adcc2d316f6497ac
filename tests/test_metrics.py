
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
