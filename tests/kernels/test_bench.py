"""The kernel benchmark's code path on a tiny shape (interpreter on CPU): JSON fields and agreement."""
import json
import re
from pathlib import Path

import pytest
import torch

from megatron_selfjudge.kernels import bench

PHASES = ("forward", "backward", "fwd_bwd")


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return bench.main(["--suite", "logits", "--tokens", "16", "24", "--vocab", "300", "--reps", "1", "--warmup", "0",
                       "--providers", "fused", "eager", "liger", "--block-v", "128", "--out", str(out)])["logits"]


def test_json_is_written_with_device_versions_and_shapes(payload):
    stored = json.loads(open(payload["path"]).read())
    assert stored["tokens"] == [16, 24] and stored["vocab"] == 300 and stored["dtype"] == "bfloat16"
    assert stored["device"] and stored["device_type"] in ("cpu", "cuda")
    assert stored["versions"]["torch"] and stored["versions"]["triton"]
    name = Path(payload["path"]).name
    assert name.startswith("grpo_loss_") and name.endswith(f"_{stored['date'][:10]}.json")
    assert re.sub(r"[^a-z0-9]+", "-", stored["device"].lower()).strip("-") in name
    assert stored["copy_bandwidth_gbps"] > 0
    assert "reads logits once" in stored["min_bytes"] and stored["fused_block_v"] == 128


def test_every_provider_and_shape_is_reported(payload):
    rows = {(r["provider"], r["tokens"]): r for r in payload["results"]}
    assert set(rows) == {(p, n) for p in ("fused", "eager", "liger") for n in (16, 24)}
    for provider in ("fused", "eager"):
        for n in (16, 24):
            row = rows[(provider, n)]
            assert row["status"] == "ok"
            for phase in PHASES:
                assert row[f"{phase}_ms"] > 0
                # GB/s is derived from the stated byte model: 1x, 2x, 3x N*V*2 bytes.
                factor = {"forward": 1, "backward": 2, "fwd_bwd": 3}[phase]
                expected = factor * n * 300 * 2 / row[f"{phase}_ms"] / 1e6
                assert row[f"{phase}_gbps"] == pytest.approx(expected)
                assert row[f"{phase}_frac_of_bound"] == pytest.approx(expected / payload["copy_bandwidth_gbps"])
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        assert rows[("liger", 16)]["status"].startswith("skipped: not installed")


def test_kernel_numbers_agree_with_the_reference(payload):
    for check in payload["checks"]:
        assert check["rows"] == check["tokens"]
        assert check["loss_max_abs_diff"] < 1e-5
        assert check["logprobs_max_abs_diff"] < 1e-5
        assert check["grad_max_ulp"] <= 1


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="tokens"):
        bench.run_kernel_bench(tokens=[0], vocab=10, out_dir=tmp_path, show=False)
    with pytest.raises(ValueError, match="dtype"):
        bench.run_kernel_bench(tokens=[4], vocab=10, dtype="int8", out_dir=tmp_path, show=False)
    with pytest.raises(SystemExit):
        bench.main(["--providers", "nope"])
    with pytest.raises(SystemExit):
        bench.main(["--suite", "everything"])


def test_ulp_distance_counts_representable_values():
    one = torch.tensor([1.0], dtype=torch.bfloat16)
    above, below = torch.tensor([1.0 + 2.0 ** -7, 1.0 - 2.0 ** -8], dtype=torch.bfloat16)  # the neighbours of 1
    assert int(bench.ulp_distance(one, above.view(1))) == 1 and int(bench.ulp_distance(one, below.view(1))) == 1
    assert int(bench.ulp_distance(above.view(1), below.view(1))) == 2
    zeros = torch.tensor([0.0, -0.0], dtype=torch.float16)
    assert int(bench.ulp_distance(zeros[:1], zeros[1:])) == 0
    # Across zero: the smallest subnormals on each side are 2 apart.
    tiny = torch.tensor([2.0 ** -24], dtype=torch.float16)
    assert int(bench.ulp_distance(tiny, -tiny)) == 2
    with pytest.raises(TypeError, match="bf16 or two fp16"):
        bench.ulp_distance(one.float(), one.float())
