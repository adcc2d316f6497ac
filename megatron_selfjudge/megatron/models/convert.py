"""`selfjudge convert`: HF Qwen2.5-VL / Qwen2.5 folders <-> this project's megatron checkpoints.

    selfjudge convert hf-to-megatron HF_DIR OUT [--dtype float32|bfloat16|float16]
    selfjudge convert megatron-to-hf CKPT OUT [--hf-dir DIR] [--dtype ...]
    selfjudge convert tiny-qwen OUT [--text] [--seed N]

hf-to-megatron writes a checkpoint root that megatron/checkpoint.py loads (any TP/PP layout:
the model is saved as megatron dist-checkpoint shards, which reshard on load):

    OUT/latest, OUT/step_00000000/   the weights (no optimizer state), trainer_state.json names the source
    OUT/hf/                          the source's config, tokenizer, chat template and processor files

megatron-to-hf takes a checkpoint folder (`.../step_XXXXXXXX`) or a checkpoint root (its newest
complete checkpoint), e.g. a training run's `checkpoints/`, and writes an HF folder that
transformers and vLLM load: config and tokenizer/processor files from `--hf-dir` (default: the
`hf/` folder beside the checkpoint, as hf-to-megatron leaves it) plus one `model.safetensors`.

tiny-qwen writes a tiny random Qwen2.5-VL (or, with --text, Qwen2.5 text) HF folder built from a
config, without the hub (megatron/models/tiny_hf.py): the `model.hf_path` of
examples/tiny_qwen2_5_vl_cpu.yaml.

The conversions run in one process on CPU (or one GPU) at TP=PP=1; the weights pass through mbridge's maps,
with the adjustments of megatron/models/mbridge_compat.py. Memory: about twice the weights in the
chosen dtype (the megatron module plus the tensors being written).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

HF_SUBDIR = "hf"
CONVERTED_STEP = 0


class ConvertError(ValueError):
    """A conversion that cannot run as asked (bad folder, existing output...); one line."""


def _one_process():
    """The one-rank process group the conversions run in (TP=PP=1), torn down after."""
    from megatron_selfjudge.runtime.setup import one_process

    return one_process("selfjudge convert", error=ConvertError)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"output {out} already exists and is not an empty folder")


def hf_to_megatron(hf_dir: str | Path, out: str | Path, dtype: Optional[str] = None) -> Path:
    """Convert an HF folder into a checkpoint root `out` (step 0, weights only); returns the step folder."""
    from megatron_selfjudge.megatron.checkpoint import save_checkpoint
    from megatron_selfjudge.megatron.models import qwen

    hf_dir, out = Path(hf_dir), Path(out)
    config = qwen.load_hf_config(hf_dir)  # fails early, in one line, on a bad folder
    _check_out(out)
    with _one_process():
        model = qwen.build_model(hf_dir, dtype=dtype)
        state = {"step": CONVERTED_STEP, "converted_from_hf": str(hf_dir.resolve()),
                 "model_type": config.model_type, "dtype": str(qwen.parse_dtype(dtype, config)).replace("torch.", "")}
        step_dir = save_checkpoint(out, CONVERTED_STEP, [model.module], optimizer=None, trainer_state=state,
                                   keep_last=None)
    (out / HF_SUBDIR).mkdir()
    for name in qwen.HF_SIDE_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out / HF_SUBDIR / name)
    return step_dir


def _resolve_checkpoint(ckpt: Path) -> Path:
    from megatron_selfjudge.megatron.checkpoint import META_FILE, latest_checkpoint

    if (ckpt / META_FILE).is_file():
        return ckpt
    if not ckpt.is_dir():
        raise ConvertError(f"checkpoint {ckpt} does not exist")
    found = latest_checkpoint(ckpt)
    if found is None:
        raise ConvertError(f"{ckpt} is neither a checkpoint folder nor a root holding a complete checkpoint")
    return found


def _resolve_hf_dir(step_dir: Path, hf_dir: Optional[str | Path]) -> Path:
    if hf_dir is not None:
        return Path(hf_dir)
    beside = step_dir.parent / HF_SUBDIR
    if (beside / "config.json").is_file():
        return beside
    raise ConvertError(f"no HF config beside {step_dir} (looked for {beside}/config.json); pass --hf-dir "
                       "with the model folder the run started from")


def megatron_to_hf(ckpt: str | Path, out: str | Path, hf_dir: Optional[str | Path] = None,
                   dtype: Optional[str] = None) -> Path:
    """Write the weights of checkpoint `ckpt` (a step folder or a root) as an HF folder `out`."""
    from megatron_selfjudge.megatron.checkpoint import load_checkpoint
    from megatron_selfjudge.megatron.models import qwen

    step_dir = _resolve_checkpoint(Path(ckpt))
    source = _resolve_hf_dir(step_dir, hf_dir)
    config = qwen.load_hf_config(source)
    out = Path(out)
    _check_out(out)
    with _one_process():
        model = qwen.build_model(source, dtype=dtype, load_weights=False)
        load_checkpoint(step_dir, [model.module], optimizer=None, load_rng=False)
        written = qwen.save_hf_folder(model, source, out, dtype=qwen.parse_dtype(dtype, config) if dtype else None)
    assert written is not None  # one process: rank 0
    return written


def tiny_qwen(out: str | Path, text: bool = False, seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-VL (or Qwen2.5 text) HF folder into `out` (must be absent or empty)."""
    from megatron_selfjudge.megatron.models import tiny_hf

    out = Path(out)
    _check_out(out)
    make = tiny_hf.make_tiny_qwen2_5 if text else tiny_hf.make_tiny_qwen2_5_vl
    return make(out, seed=seed)


def _quiet_libraries() -> None:
    """Hide notices of the libraries that say nothing about this conversion."""
    warnings.filterwarnings("ignore", message=".*(ShardedTensor|`load_state_dict` is deprecated).*",
                            category=FutureWarning)
    logging.getLogger("mbridge.models.qwen2_5_vl.model").setLevel(logging.ERROR)  # "under development"


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `selfjudge convert`."""
    parser = argparse.ArgumentParser(prog="selfjudge convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    dtypes = ["float32", "bfloat16", "float16"]
    p = sub.add_parser("hf-to-megatron", help="HF folder -> checkpoint root (step 0, any TP/PP on load)")
    p.add_argument("hf_dir")
    p.add_argument("out")
    p.add_argument("--dtype", choices=dtypes, default=None, help="weights dtype (default: the config's)")
    p = sub.add_parser("megatron-to-hf", help="checkpoint (step folder or root) -> HF folder")
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--hf-dir", default=None, help="model folder for config/tokenizer (default: CKPT's hf/)")
    p.add_argument("--dtype", choices=dtypes, default=None, help="saved dtype (default: the config's)")
    p = sub.add_parser("tiny-qwen", help="write a tiny random Qwen2.5-VL HF folder (no hub), e.g. for the CPU example")
    p.add_argument("out")
    p.add_argument("--text", action="store_true", help="a Qwen2.5 text model instead of Qwen2.5-VL")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`selfjudge convert ...`; bad input gives one line on stderr and exit code 2."""
    from megatron_selfjudge.megatron.models.qwen import HFFolderError
    from megatron_selfjudge.runtime.run_state import CheckpointDamaged

    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        if args.direction == "hf-to-megatron":
            done = hf_to_megatron(args.hf_dir, args.out, args.dtype)
        elif args.direction == "tiny-qwen":
            done = tiny_qwen(args.out, args.text, args.seed)
        else:
            done = megatron_to_hf(args.ckpt, args.out, args.hf_dir, args.dtype)
    except (ConvertError, HFFolderError, FileNotFoundError) as exc:
        print(f"selfjudge convert: {exc}", file=sys.stderr)
        return 2
    except CheckpointDamaged as exc:
        print(f"selfjudge convert: damaged checkpoint: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {done}")
    return 0
