"""`selfjudge` command line: train, env, bench, data.

Single process:  selfjudge train [--config FILE] [key=value ...]
Plan a run:      selfjudge train --config FILE --dry-run [--world-size N] [--gpu-memory GIB]
Bug reports:     selfjudge env [--config FILE] [key=value ...]
Check a config:  selfjudge config check [--config FILE] [key=value ...]  (resolved YAML, or the error; exit 2)
Benchmarks:      selfjudge eval --checkpoint RUN_DIR|HF_DIR --benchmarks mathvision,wemath --data ROOT
HF checkpoints:  selfjudge convert hf-to-megatron HF_DIR OUT | megatron-to-hf CKPT OUT [--hf-dir DIR] | tiny-qwen OUT
New questions:   selfjudge synth --checkpoint RUN_DIR --data FILE --strategy in-context|direct --out FILE
Training curves: selfjudge plot RUN_DIR... [--out FILE.png] [--labels a,b]
Compare rewards: selfjudge compare [--config FILE] [--seeds 5] [--lr-scale 3] [--modes a,b] [--jobs N] [key=value ...]
Multi-process:   torchrun --nproc-per-node N -m megatron_selfjudge.cli train parallel.tp=2 ...
With no --config, `train` runs the embedded tiny default on CPU.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Optional, Sequence

from megatron_selfjudge.config import ConfigError, load_config
from megatron_selfjudge.data.datasets import DatasetError
from megatron_selfjudge.runtime.lock import RunDirError
from megatron_selfjudge.runtime.preflight import PreflightError
from megatron_selfjudge.runtime.ranks import RankFailedError
from megatron_selfjudge.runtime.run_state import CheckpointDamaged, RunStateError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML file (default: the embedded tiny CPU config)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the config dataclasses, e.g. loss.beta_kl=0.02")


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:  # before the trainer's import: a dry run builds nothing and imports no megatron
        from megatron_selfjudge.runtime import dry_run

        return dry_run.main(cfg, args.world_size, args.gpu_memory)
    from megatron_selfjudge import trainer

    return trainer.main(cfg)


def _cmd_config_check(args: argparse.Namespace) -> int:
    from megatron_selfjudge.config import to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "rollout":
        from megatron_selfjudge.rollout import bench as rollout_bench

        rollout_bench.main(args.bench_args)  # prints the table and writes the JSON
        return 0
    from megatron_selfjudge.kernels import bench

    bench.main(args.bench_args)  # prints the table and writes the JSON
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    from megatron_selfjudge import env_report

    return env_report.main(args.config, args.overrides)


def _cmd_data(args: argparse.Namespace) -> int:
    from megatron_selfjudge.data import cli as data_cli

    return data_cli.main(args.data_args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from megatron_selfjudge import compare

    return compare.run(args)


def _cmd_convert(args: argparse.Namespace) -> int:
    from megatron_selfjudge.megatron.models import convert

    return convert.main(args.convert_args)


def _cmd_synth(args: argparse.Namespace) -> int:
    from megatron_selfjudge.synth import cli as synth_cli

    return synth_cli.main(args.synth_args)


def _cmd_plot(args: argparse.Namespace) -> int:
    from megatron_selfjudge import plot

    return plot.main(args.plot_args)


def _cmd_eval(args: argparse.Namespace) -> int:
    from megatron_selfjudge.eval import run as eval_run

    return eval_run.main(args.eval_args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `selfjudge` command."""
    parser = argparse.ArgumentParser(prog="selfjudge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="label-free GRPO post-training (embedded tiny default without --config)")
    _add_config_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="validate, print the layout, batches and per-GPU memory estimate; build nothing")
    p.add_argument("--world-size", type=int, default=None,
                   help="--dry-run: processes of the run (default: WORLD_SIZE, else one node of 8)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB",
                   help="--dry-run: memory of one GPU in GiB (default 80)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("config", help="`config check`: load and validate a config without building a model")
    p_sub = p.add_subparsers(dest="config_command", required=True)
    p = p_sub.add_parser("check", help="print the resolved YAML (exit 0) or the one-line error (exit 2)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config_check)

    p = sub.add_parser("bench", help="benchmarks; `selfjudge bench kernels|rollout --help` for options")
    p.add_argument("what", choices=["kernels", "rollout"])
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("env", help="versions, GPUs, launch layout and the pre-flight verdicts, for bug reports")
    _add_config_args(p)
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("data", help="write the synthetic task (`data synthetic --out DIR`) or check a file")
    p.add_argument("data_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("compare", help="every reward mode from one warm start per seed, with 95% intervals")
    from megatron_selfjudge import compare

    compare.add_arguments(p)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("convert", help="`convert hf-to-megatron HF_DIR OUT` / `convert megatron-to-hf CKPT OUT`")
    p.add_argument("convert_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_convert)

    # prefix_chars: every argument, options included, passes through to `selfjudge eval`'s own parser.
    p = sub.add_parser("eval", add_help=False, prefix_chars="\0",
                       help="benchmarks (MathVision, MathVerse, WeMath, LogicVista, DynaMath, MathVista) on a "
                            "checkpoint; --help")
    p.add_argument("eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_eval)

    # prefix_chars: every argument, options included, passes through to `selfjudge synth`'s own parser.
    p = sub.add_parser("synth", add_help=False, prefix_chars="\0",
                       help="new questions from a trained policy (MM-UPT in-context / direct), filtered; --help")
    p.add_argument("synth_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_synth)

    # prefix_chars: every argument, options included, passes through to `selfjudge plot`'s own parser.
    p = sub.add_parser("plot", add_help=False, prefix_chars="\0",
                       help="training curves of run directories as one PNG (RUN_DIR... --out FILE.png); --help")
    p.add_argument("plot_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_plot)
    return parser


def _quiet_megatron() -> None:
    """Hide megatron-core's start-up notices that do not concern this run (no Apex/TE on CPU)."""
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*", category=UserWarning)
    logging.getLogger("megatron.core.models.multimodal.llava_model").setLevel(logging.ERROR)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `selfjudge` console script."""
    args = build_parser().parse_args(argv)
    _quiet_megatron()
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"selfjudge: config error: {exc}", file=sys.stderr)
        return 2
    except (DatasetError, FileNotFoundError) as exc:
        print(f"selfjudge: data error: {exc}", file=sys.stderr)
        return 2
    except PreflightError as exc:
        print(f"selfjudge: pre-flight check failed: {exc}", file=sys.stderr)
        return 2
    except (RunDirError, RankFailedError) as exc:  # RankFailedError: the failing rank printed the cause
        print(f"selfjudge: {exc}", file=sys.stderr)
        return 2
    except RunStateError as exc:
        print(f"selfjudge: cannot resume: {exc}", file=sys.stderr)
        return 2
    except CheckpointDamaged as exc:
        print(f"selfjudge: damaged checkpoint: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
