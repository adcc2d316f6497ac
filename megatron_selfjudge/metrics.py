"""Per-step metrics: one JSON object per line in metrics.jsonl plus TensorBoard scalars.

Only the writer rank (global rank 0) touches the files; other ranks get a writer whose
calls do nothing, so the trainer never branches on the rank.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from megatron_selfjudge.runtime.files import write_atomic

METRICS_FILE = "metrics.jsonl"
# The keys every step line carries (DESIGN.md contract); more may follow.
STEP_KEYS = ("step", "reward_mean", "adv_mean", "adv_std", "loss", "kl", "clip_frac", "entropy",
             "response_len_mean", "judge_unparsed")


def _plain(value: Any) -> Any:
    """Convert tensors and numpy scalars to JSON numbers; non-finite floats to null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends step metrics to metrics.jsonl and TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def _file(self, prefix: str) -> Path:
        # Stage-1 (SFT) rows go to sft_metrics.jsonl so metrics.jsonl holds only UPT steps.
        return self.path if prefix == "train" else self.path.with_name(f"{prefix}_{METRICS_FILE}")

    def truncate_after(self, step: int, prefix: str = "train") -> None:
        """Drop lines of steps > step (a resumed run rewrites what the killed run wrote after its checkpoint).

        The kept lines replace the file atomically (runtime.files.write_atomic): a crash inside
        the rewrite leaves the old file or the new one, never a truncated mix.
        """
        path = self._file(prefix)
        if not self.enabled or not path.exists():
            return
        kept = [json.dumps(row) for row in _rows(path) if row.get("step", -1) <= step]
        write_atomic(path, "".join(ln + "\n" for ln in kept), fault_point="metrics_rewrite")

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> None:
        """Write one line for `step` (non-finite floats become null); `prefix` names the stage."""
        if not self.enabled:
            return
        path = self._file(prefix)
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items() if k != "step"}}
        with path.open("a") as f:
            f.write(json.dumps(row, sort_keys=False) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
            self._tb.flush()

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All step rows of a run directory, in file order."""
    path = Path(run_dir) / METRICS_FILE
    return _rows(path) if path.exists() else []


def _rows(path: Path) -> list[dict]:
    """Parsed lines; a torn last line (the process was killed mid-write) is ignored."""
    rows = []
    for ln in path.read_text().splitlines():
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            continue
    return rows

